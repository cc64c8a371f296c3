"""The collection pipeline: packed windows -> model (stopped at the hook layer) -> SAE
encode -> sparse codes -> LMDB index writer, then metrics and neighbours.

A plain function with a ``progress`` callback and a ``should_stop`` check, shared by the
headless mode and the TUI's background worker. Tokenisation runs one batch ahead in a
thread; index writing (compression, LMDB) runs in the writer's own thread, so the model's
next batch overlaps with both. Stopping finishes the current commit and leaves the index
resumable: running the same configuration again continues after the last commit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saetui.collect.distributed import Team, dealt_batches, reduce_metric_sums
from saetui.collect.inputs import LoadedRun, load_run
from saetui.collect.job import (
    PHASES,
    CollectConfig,
    CollectProgress,
    CollectResult,
    StopRequested,
    finished_result,
    request_record,
)
from saetui.lm.device import dtype_name

__all__ = [
    "PHASES",
    "CollectConfig",
    "CollectProgress",
    "CollectResult",
    "StopRequested",
    "encode_batch",
    "run_collection",
]


class _Reporter:
    """Calls ``progress`` at most every ``interval`` seconds, and always on phase changes."""

    def __init__(self, progress: Callable[[CollectProgress], None] | None, interval: float = 0.25):
        self._progress = progress
        self._interval = interval
        self._last = 0.0
        self._phase = ""

    def __call__(self, update: CollectProgress, force: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if force or update.phase != self._phase or now - self._last >= self._interval:
            self._phase = update.phase
            self._last = now
            self._progress(update)


def run_config_of(config: CollectConfig, run: LoadedRun) -> dict[str, Any]:
    """The fields that identify a run: a resumed index must match all of them."""
    inputs = config.inputs
    return {
        "model": inputs.model,
        "hook": run.hook,
        "numerics": run.numerics,
        "dtype": dtype_name(run.model.dtype),
        "sae_path": str(Path(inputs.sae).resolve()),
        "sae_sha256": run.sae.content_hash(),
        "sae_format": run.sae.format,
        "sae_architecture": run.sae.architecture,
        "batchtopk_mode": run.sae.batchtopk_mode if run.sae.architecture == "batchtopk" else None,
        "threshold": _threshold_value(run.sae),
        "corpus": str(inputs.data),
        "corpus_sha256": run.corpus.content_hash,
        "text_field": inputs.text_field,
        "ctx_len": inputs.ctx_len,
    }


def _threshold_value(sae: Any) -> float | None:
    threshold = getattr(sae, "threshold", None)
    if sae.architecture == "batchtopk" and threshold is not None and threshold.numel() == 1:
        return float(threshold)
    return None


def _prefetch(batches: Iterator[Any], stop: threading.Event, depth: int = 2) -> Iterator[Any]:
    """Run ``batches`` (tokenisation) in a thread, ``depth`` batches ahead."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # re-raised in the consumer
            failure.append(error)
        finally:
            while True:
                try:
                    slots.put(done, timeout=0.1)
                    break
                except queue.Full:
                    if stop.is_set():
                        break

    thread = threading.Thread(target=produce, name="saetui-tokenise", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        thread.join()


@torch.no_grad()
def encode_batch(run: LoadedRun, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse codes of a window batch's real tokens (padding dropped, windows concatenated):
    feature ids [n_tokens, K] int32, values [n_tokens, K], and the counted-token mask."""
    # three host-to-device copies per batch (pinned, asynchronous on CUDA); the real-token
    # mask is built on the device
    device = torch.device(run.model.device)
    tokens = _to_device(batch.tokens, device)
    lengths = _to_device(batch.lengths, device)
    counted = _to_device(batch.mask, device)
    real = torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]
    activations = run.model.activations(tokens, run.hook)
    x = activations[real]
    ids, values = run.sae.encode_sparse(x, mask=counted[real])
    return ids.to(torch.int32), values, counted[real]


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: from pinned memory without waiting on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def run_collection(
    config: CollectConfig,
    *,
    progress: Callable[[CollectProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    say: Callable[[str], None] | None = None,
    team: Team | None = None,
) -> CollectResult:
    """Collect (or resume) the index at ``config.out``: loading, collecting, metrics,
    neighbours. Each phase records its completion in the index and is skipped when a
    later run finds it done; a finished index of the same request returns at once,
    without loading the model. ``should_stop`` is checked at safe points in every phase
    (between loading steps, batches and stripes): the result then says "stopped" and
    where, and running the same config again resumes.

    ``team``: the ranks of a distributed run (distributed.TorchTeam); each collects the
    windows dealt to it into its own shard of ``config.work_dir``. Default: one process.
    A failure on another rank raises distributed.RankFailed after this rank's shard is
    closed (resumable)."""
    started = time.perf_counter()
    report = _Reporter(progress)
    stop_requested = should_stop or (lambda: False)
    if team is None:
        team = Team(stop_requested)
    else:
        team.use_stop_check(stop_requested)

    def check_stop() -> None:
        if stop_requested():
            raise StopRequested

    phase = "loading"
    writer: Any = None
    collect_rate = 0.0
    try:
        report(CollectProgress("loading", message="checking the index"), force=True)
        done = finished_result(config)
        if team.all_agree(done is not None):
            assert done is not None
            report(CollectProgress("done", done.tokens, done.tokens, message="already finished"))
            team.finish()
            return done
        report(CollectProgress("loading", message="loading corpus, SAE and model"), force=True)
        run = load_run(config.inputs, say, check_stop=check_stop)
        team.sync()
        writer = _open_writer(config, run, team)
        team.sync()
        phase = "collecting"
        collect_rate = _collecting_phase(config, run, writer, report, check_stop, team)
        writer.flush()
        skipped = []
        phases = writer.get_meta("phases") or {}
        windows = writer.next_window
        phase = "metrics"
        if team.all_agree(phases.get("metrics", {}).get("windows") == windows):
            skipped.append("metrics")
            metrics = _stored_metrics(writer, team)
        else:
            metrics = _metrics_phase(config, run, writer, report, check_stop, team)
            phases["metrics"] = {"windows": windows, "finished": time.time()}
            writer.put_meta("phases", phases)
        phase = "neighbours"
        if team.all_agree(phases.get("neighbours", {}).get("windows") == windows):
            skipped.append("neighbours")
        else:
            from saetui.collect.neighbours import neighbours_phase

            neighbours_phase(config, run, writer, report, check_stop, team, config.work_dir)
            phases["neighbours"] = {"windows": windows, "finished": time.time()}
            writer.put_meta("phases", phases)
        tokens = team.sum_ints([writer.summaries.n_tokens])[0]
        writer.finish()
        team.finish()
        if config.gather:
            _gather(config, team, say)
    except (StopRequested, KeyboardInterrupt) as stop:
        team.abort(None)
        tokens = 0
        if writer is not None:
            writer.close()
            tokens = writer.tokens_committed
        team.finish(quiet=True)
        if isinstance(stop, KeyboardInterrupt):
            raise
        message = f"stopped while {phase}; run the same command again to resume"
        report(CollectProgress("done", tokens, None, message=message), force=True)
        return CollectResult(
            config.out,
            "stopped",
            tokens,
            time.perf_counter() - started,
            collect_rate,
            phase=phase,
        )
    except BaseException as error:
        team.abort(error)
        if writer is not None:
            writer.close()
        team.finish(quiet=True)
        raise
    report(CollectProgress("done", tokens, tokens, message="finished"), force=True)
    return CollectResult(
        config.out,
        "finished",
        tokens,
        time.perf_counter() - started,
        collect_rate,
        metrics,
        skipped=tuple(skipped),
    )


def _stored_metrics(writer: Any, team: Team) -> dict[str, Any]:
    """Metrics an earlier run stored (in the main rank's shard), on every rank."""
    return team.gather_objects(writer.get_meta("metrics") if team.is_main else None)[0] or {}


def _gather(config: CollectConfig, team: Team, say: Callable[[str], None] | None) -> None:
    """Copy every rank's finished shard from its shard directory into ``config.out``."""
    from saetui.index.merge import copy_shard, verify_index

    if Path(config.work_dir).resolve() != Path(config.out).resolve():
        copy_shard(config.work_dir, team.rank, config.out, replace=True)
    team.finish()
    if team.is_main:
        report = verify_index(config.out)
        if say is not None:
            say(report.summary())


def _open_writer(config: CollectConfig, run: LoadedRun, team: Team) -> Any:
    from saetui.index import IndexWriter

    if team.is_main:
        _check_other_shards(config.work_dir, team.world, config.overwrite)
    writer = IndexWriter.create_or_resume(
        config.work_dir,
        run_config_of(config, run),
        d_sae=run.sae.d_sae,
        ctx_len=config.inputs.ctx_len,
        vocab=run.model.vocabulary(),
        overwrite=config.overwrite,
        top_k=config.top_k_examples,
        summary_device=run.model.device,
        shard=team.rank,
        layout=team.layout,
    )
    try:
        writer.put_meta("run_details", {**run.model.describe(), "sae": _sae_facts(run.sae)})
        writer.put_meta("request", request_record(config))
    except BaseException:
        writer.close()
        raise
    return writer


def _check_other_shards(path: Path, world: int, overwrite: bool) -> None:
    """Shards past this run's ranks come from a run with more processes: removed with
    overwrite, refused otherwise (they would be read as part of this index)."""
    import shutil

    from saetui.errors import SaetuiInputError
    from saetui.index import format as fmt

    if not Path(path).is_dir():
        return
    extra = sorted(
        p
        for p in Path(path).iterdir()
        if p.is_dir()
        and p.name.startswith(fmt.SHARD_PREFIX)
        and p.name[len(fmt.SHARD_PREFIX) :].isdigit()
        and int(p.name[len(fmt.SHARD_PREFIX) :]) >= world
    )
    if not extra:
        return
    if overwrite:
        for shard in extra:
            shutil.rmtree(shard)
        return
    from saetui.index.merge import read_shard

    try:
        layout = read_shard(extra[-1], int(extra[-1].name[len(fmt.SHARD_PREFIX) :])).layout
        by = f"{layout.world} processes" if layout else "more processes"
    except SaetuiInputError:
        by = "more processes"
    raise SaetuiInputError(
        f"the index {path} was collected by {by} (it holds {extra[-1].name}), not "
        f"{world}: run again with as many processes to resume it, or pass --overwrite to "
        "rebuild it."
    )


def _collecting_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
    team: Team | None = None,
) -> float:
    """Every window after the index's last commit (of those dealt to this rank); returns
    the job's tokens/s while collecting."""
    from saetui.corpus import batch_windows, estimate_tokens, iter_windows

    team = team or Team()
    inputs = config.inputs
    estimated = estimate_tokens(run.corpus, run.model.tokenizer)
    total = min(estimated, inputs.max_tokens) if inputs.max_tokens else estimated
    mine = writer.summaries.n_tokens
    first_tokens = done = team.sync(tokens=mine, more=True).tokens
    report(CollectProgress("collecting", done, max(total, done)), force=True)
    windows: Iterator[Any] = iter_windows(
        run.corpus,
        run.model.tokenizer,
        ctx_len=inputs.ctx_len,
        max_tokens=inputs.max_tokens,
        start_window=writer.next_window,
    )
    layout = team.layout
    if layout is not None:
        windows = (window for window in windows if layout.owns(window.window_id))
    stop_tokeniser = threading.Event()
    collect_started = time.perf_counter()
    batches = _prefetch(batch_windows(windows, inputs.batch_size), stop_tokeniser)
    try:
        while True:
            batch = next(batches, None)
            if batch is not None:
                ids, values, counted = encode_batch(run, batch)
                writer.add_windows(
                    batch.window_ids,
                    batch.tokens,
                    [
                        [(s.doc_id, s.doc_offset, s.start, s.length) for s in window]
                        for window in batch.segments
                    ],
                    ids,
                    values,
                    mask=counted,
                    lengths=batch.lengths,
                )
                # Counted here: reading writer.summaries would wait for its merge thread.
                mine += int(batch.lengths.sum())
            # one small all-reduce per batch: the job's tokens, a stop or a failure anywhere
            state = team.sync(tokens=mine, more=batch is not None)
            done = state.tokens
            rate = (done - first_tokens) / max(time.perf_counter() - collect_started, 1e-9)
            report(
                CollectProgress(
                    "collecting",
                    tokens_done=done,
                    tokens_total=max(total, done),
                    tokens_per_s=rate,
                    eta_s=max(total - done, 0) / rate if rate > 0 else None,
                )
            )
            if not state.more:
                break
            if batch is not None:
                check_stop()
    finally:
        batches.close()
    return (done - first_tokens) / max(time.perf_counter() - collect_started, 1e-9)


def _sae_facts(sae: Any) -> dict[str, Any]:
    from saetui.sae import describe

    return {key: value for key, value in describe(sae).items() if key != "path"}


def _metrics_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
    team: Team | None = None,
) -> dict[str, Any]:
    """SAE quality on the first ``metrics_tokens`` tokens, plus density over the whole run."""
    from saetui.collect.evaluate import evaluate_sae
    from saetui.corpus import batch_windows, iter_windows

    inputs = config.inputs
    budget = config.metrics_tokens
    report(CollectProgress("metrics", 0, budget, message="reconstruction and CE loss"), force=True)
    windows = iter_windows(
        run.corpus, run.model.tokenizer, ctx_len=inputs.ctx_len, max_tokens=budget
    )
    # small batches: a stop request waits for at most one batch of three forward passes
    batches = batch_windows(windows, max(1, inputs.batch_size // 4))
    team = team or Team()
    metrics = evaluate_sae(
        run.model,
        run.sae,
        run.hook,
        batches if team.world == 1 else dealt_batches(batches, team, budget),
        max_tokens=budget if team.world == 1 else None,
        progress=lambda n: report(CollectProgress("metrics", n, budget)),
        check_stop=check_stop,
        reduce=None if team.world == 1 else lambda *sums: reduce_metric_sums(team, sums),
    )
    metrics = {
        f"sample_{key}" if key in _DENSITY_KEYS else key: value for key, value in metrics.items()
    }
    metrics.update(_density_over_collection(writer.summaries, run.sae.d_sae, team))
    metrics["metrics_tokens_requested"] = budget
    if team.is_main:
        writer.put_metrics(metrics)
    return metrics


_DENSITY_KEYS = ("dead_features", "dead_fraction", "dense_1pct", "dense_10pct")


def _density_over_collection(
    summaries: Any, d_sae: int, team: Team | None = None
) -> dict[str, Any]:
    team = team or Team()
    counts = team.sum_array(summaries.count.cpu().numpy().astype(np.int64))
    n_counted = team.sum_ints([int(summaries.n_counted)])[0]
    tokens = max(n_counted, 1)
    density = counts / tokens
    return {
        "collection_tokens": n_counted,
        "dead_features": int((counts == 0).sum()),
        "dead_fraction": float((counts == 0).mean()),
        "dense_1pct": int((density > 0.01).sum()),
        "dense_10pct": int((density > 0.10).sum()),
    }

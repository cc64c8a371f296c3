"""The collection pipeline: packed windows -> model (stopped at the hook layer) -> SAE
encode -> sparse codes -> LMDB index writer, then metrics and neighbours.

A plain function with a ``progress`` callback and a ``should_stop`` check, shared by the
headless mode and the TUI's background worker. Tokenisation runs one batch ahead in a
thread; index writing (compression, LMDB) runs in the writer's own thread, so the model's
next batch overlaps with both. Stopping finishes the current commit and leaves the index
resumable: running the same configuration again continues after the last commit.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saetui.collect.distributed import Team
from saetui.collect.evaluate import (
    EncodedWindows,
    add_reconstruction,
    encode_windows,
    measure_sample,
)
from saetui.collect.inputs import LoadedRun, load_run
from saetui.collect.job import (
    PHASES,
    CollectConfig,
    CollectProgress,
    CollectResult,
    StopRequested,
    check_request,
    finished_result,
    request_record,
)
from saetui.collect.metrics import (
    BehaviourMetrics,
    ReconstructionAccumulator,
    density_metrics,
    merge_families,
    saelens_density_metrics,
    special_token_ids,
    weight_metrics,
)
from saetui.errors import SaetuiInputError
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
def write_encoded(writer: Any, batch: Any, encoded: EncodedWindows) -> None:
    """One batch of windows into the index: tokens, document segments and sparse codes."""
    writer.add_windows(
        batch.window_ids,
        batch.tokens,
        [
            [(s.doc_id, s.doc_offset, s.start, s.length) for s in window]
            for window in batch.segments
        ],
        encoded.ids,
        encoded.values,
        mask=encoded.counted,
        lengths=batch.lengths,
    )


def encode_windows_of(run: LoadedRun, batch: Any) -> EncodedWindows:
    """A window batch through the model (stopped after the hook's layer) and the SAE; the
    tokens go to the device from pinned memory, asynchronously, on CUDA."""
    tokens = _to_device(batch.tokens, torch.device(run.model.device))
    activations = run.model.activations(tokens, run.hook)
    return encode_windows(run.sae, activations, batch)


def encode_batch(run: LoadedRun, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse codes of a window batch's real tokens (padding dropped, windows concatenated):
    feature ids [n_tokens, K] int32, values [n_tokens, K], and the counted-token mask."""
    encoded = encode_windows_of(run, batch)
    return encoded.ids, encoded.values, encoded.counted


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

    ``overwrite`` on an existing index builds the new one beside it (``.NAME.overwrite``)
    and swaps it in only when it has finished, keeping the user's labels: a stop or a
    crash leaves the old index as it was, and the same command resumes the new one.

    ``team``: the ranks of a distributed run (distributed.TorchTeam); each collects the
    windows dealt to it into its own shard of ``config.work_dir``. Default: one process.
    A failure on another rank raises distributed.RankFailed after this rank's shard is
    closed (resumable). Under torchrun ``overwrite`` rebuilds each shard in place.

    ``config.saes`` with several SAEs: one pass of the model for all of them, one index
    each under ``config.out`` (:func:`saetui.collect.multi.run_several`)."""
    if config.several:
        from saetui.collect.multi import run_several

        return run_several(config, progress=progress, should_stop=should_stop, say=say, team=team)
    out = Path(config.out)
    distributed = team is not None and team.world > 1
    if distributed or not (config.overwrite and (out / "saetui-index.json").exists()):
        return _run(config, progress=progress, should_stop=should_stop, say=say, team=team)
    check_request(config)  # the old index: no other writer may hold it
    staging = out.with_name(f".{out.name}.overwrite")
    staged = dataclasses.replace(config, out=staging, overwrite=False)
    if staging.exists() and _stored_request(staging) != request_record(staged):
        shutil.rmtree(staging)  # a replacement for another request, never user data
    result = _run(staged, progress=progress, should_stop=should_stop, say=say)
    if result.status == "finished":
        _swap_in(staging, out)
    result.out = out
    return result


def _stored_request(path: Path) -> Any:
    from saetui.index import open_index

    try:
        with open_index(path) as index:
            return index.get_meta("request")
    except SaetuiInputError:
        return None


def _swap_in(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` index at ``out``; the old one's labels come along."""
    retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    labels = out / "user"
    if labels.is_dir() and not (staging / "user").exists():
        labels.rename(staging / "user")
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)


def _run(
    config: CollectConfig,
    *,
    progress: Callable[[CollectProgress], None] | None,
    should_stop: Callable[[], bool] | None,
    say: Callable[[str], None] | None,
    team: Team | None = None,
) -> CollectResult:
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
        check_request(config, shard=team.rank)
        done = finished_result(config)
        if team.all_agree(done is not None):
            assert done is not None
            phase = "postings"
            _postings_phase(config, team, report, check_stop, say)
            report(CollectProgress("done", done.tokens, done.tokens, message="already finished"))
            team.finish()
            return done
        report(CollectProgress("loading", message="loading corpus, SAE and model"), force=True)
        run = load_run(config.inputs, say, check_stop=check_stop)
        team.sync()
        if team.is_main:  # creates the index directory and its marker first
            writer = _open_writer(config, run, team)
        team.sync()
        if not team.is_main:
            writer = _open_writer(config, run, team)
        team.sync()
        reconstruction = _Reconstruction(config, run, writer, team.layout)
        phase = "collecting"
        collect_rate = _collecting_phase(
            config, run, writer, report, check_stop, reconstruction, team
        )

        def enter(name: str) -> None:
            nonlocal phase
            phase = name

        metrics, skipped, tokens = finish_index(
            config, run, writer, report, check_stop, reconstruction, team, say, enter
        )
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


@dataclasses.dataclass
class MeasuredSample:
    """CE loss and KL already measured on the sample ``windows`` (with other SAEs, sharing
    the forward passes that do not depend on the SAE): the metrics phase uses them."""

    windows: list[int]
    behaviour: BehaviourMetrics


def metrics_done(writer: Any) -> bool:
    """Whether the index records its metrics phase done for the windows it holds."""
    phases = writer.get_meta("phases") or {}
    return bool(phases.get("metrics", {}).get("windows") == writer.next_window)


def finish_index(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
    reconstruction: _Reconstruction,
    team: Team,
    say: Callable[[str], None] | None,
    enter: Callable[[str], None],
    measured: MeasuredSample | None = None,
) -> tuple[dict[str, Any], list[str], int]:
    """The phases after collecting — metrics, neighbours, finishing the index, postings —
    each skipped when the index records it done; ``enter`` hears each phase's name.
    Returns the metrics, the phases skipped and the job's tokens."""
    metrics, skipped = metrics_step(
        config, run, writer, report, check_stop, reconstruction, team, enter, measured
    )
    tokens, neighbours_skipped = finish_after_metrics(
        config, run, writer, report, check_stop, team, say, enter
    )
    return metrics, skipped + (["neighbours"] if neighbours_skipped else []), tokens


def metrics_step(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
    reconstruction: _Reconstruction,
    team: Team,
    enter: Callable[[str], None],
    measured: MeasuredSample | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The metrics phase, skipped when the index records it done (then its stored metrics),
    its completion recorded; ``measured``: CE loss and KL already measured on the sample.
    Returns the metrics and ``["metrics"]`` when skipped."""
    writer.flush()
    enter("metrics")
    if team.all_agree(metrics_done(writer)):
        return _stored_metrics(writer, team), ["metrics"]
    metrics = _metrics_phase(
        config, run, writer, report, check_stop, reconstruction, team, measured
    )
    phases = writer.get_meta("phases") or {}
    phases["metrics"] = {"windows": writer.next_window, "finished": time.time()}
    writer.put_meta("phases", phases)
    return metrics, []


def finish_after_metrics(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
    team: Team,
    say: Callable[[str], None] | None,
    enter: Callable[[str], None],
) -> tuple[int, bool]:
    """The phases after metrics: neighbours (skipped when recorded done), finishing the
    index, postings. Returns the job's tokens and whether neighbours were skipped."""
    phases = writer.get_meta("phases") or {}
    windows = writer.next_window
    enter("neighbours")
    skipped = team.all_agree(phases.get("neighbours", {}).get("windows") == windows)
    if not skipped:
        from saetui.collect.neighbours import neighbours_phase

        neighbours_phase(config, run, writer, report, check_stop, team, config.work_dir)
        phases["neighbours"] = {"windows": windows, "finished": time.time()}
        writer.put_meta("phases", phases)
    tokens = team.sum_ints([writer.summaries.n_tokens])[0]
    writer.finish()
    team.finish()
    if config.gather:
        _gather(config, team, say)
    enter("postings")
    _postings_phase(config, team, report, check_stop, say)
    return int(tokens), skipped


def _postings_phase(
    config: CollectConfig,
    team: Team,
    report: Any,
    check_stop: Callable[[], None],
    say: Callable[[str], None] | None,
) -> None:
    """With ``config.postings``: build (or finish) the index's postings after it finished;
    resumable like every phase (a finished index reruns only this part)."""
    if config.postings is False:
        return
    if team.world > 1:
        if team.is_main and say is not None and config.postings:
            say(
                f"postings are not built under torchrun: once every shard is in {config.out}, "
                f"run `saetui postings {config.out}`."
            )
        return
    from saetui.index.postings import build_postings, postings_by_default

    if config.postings is None and not postings_by_default(config.out):
        return

    def progress(update: Any) -> None:
        report(
            CollectProgress(
                "postings",
                message=f"postings: {update.windows_done:,}/{update.windows_total:,} windows, "
                f"{update.nnz_per_s / 1e6:.1f} M nonzeros/s",
            )
        )

    report(CollectProgress("postings", message="building the postings"), force=True)
    build_postings(config.out, check_stop=check_stop, progress=progress)


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
        details = {**run.model.describe(), "sae": _sae_facts(run.sae), "precision": _precision(run)}
        writer.put_meta("run_details", details)
        if run.sae.history:  # the TUI reads the training history from the index, not the SAE
            writer.put_meta("sae_history", run.sae.history)
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
    reconstruction: _Reconstruction,
    team: Team | None = None,
) -> float:
    """Every window after the index's last commit (of those dealt to this rank), its
    reconstruction metrics accumulated on the way; returns the job's tokens/s while
    collecting."""
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
                encoded = encode_windows_of(run, batch)
                write_encoded(writer, batch, encoded)
                reconstruction.add(batch, encoded, check_stop)
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
    except (StopRequested, KeyboardInterrupt):
        # queued after the windows it covers, so it never claims uncommitted ones
        reconstruction.save()
        raise
    finally:
        close = getattr(batches, "close", None)  # a generator: stops the tokeniser thread
        if close is not None:
            close()
    # (after any other error the writer may be broken: the sums since the last save are
    # recomputed on resume, and the error itself reaches the user unmasked)
    reconstruction.save()
    return (done - first_tokens) / max(time.perf_counter() - collect_started, 1e-9)


def _sae_facts(sae: Any) -> dict[str, Any]:
    from saetui.sae import describe

    return {key: value for key, value in describe(sae).items() if key != "path"}


def _precision(run: LoadedRun) -> dict[str, str]:
    """The dtypes the model runs in and the SAE encodes in (its own, whatever the model's)."""
    return {"model": dtype_name(run.model.dtype), "sae": dtype_name(run.sae.dtype)}


RECONSTRUCTION_STATE = "reconstruction_state"  # meta: the folded reconstruction sums
RECONSTRUCTION_SAVE_S = 10.0
# The CE/KL sample when --metrics-tokens is not given: this share of the collection's tokens,
# at least CE_SAMPLE_MIN_TOKENS (or every token of a smaller run), at most CE_SAMPLE_MAX_TOKENS.
CE_SAMPLE_FRACTION = 0.01
CE_SAMPLE_MIN_TOKENS = 512
CE_SAMPLE_MAX_TOKENS = 20_000


class _Reconstruction:
    """Both families' reconstruction metrics from the collection's own activations: added
    as batches are encoded, their folded sums saved in the index every few seconds (and on
    a stop), and, after a resume, caught up by re-encoding the few windows the saved sums
    do not cover."""

    def __init__(
        self, config: CollectConfig, run: LoadedRun, writer: Any, layout: Any = None
    ) -> None:
        self._config, self._run, self._writer, self._layout = config, run, writer, layout
        self.special_ids = special_token_ids(run.model.tokenizer)
        state = writer.get_meta(RECONSTRUCTION_STATE)
        if isinstance(state, dict) and state.get("folded_windows", 0) > writer.next_window:
            state = None  # written for windows this index does not hold
        self.accumulator = ReconstructionAccumulator.from_state(
            state, run.sae.d_in, run.sae.d_sae, run.model.device
        )
        self._saved = time.monotonic()

    def add(self, batch: Any, encoded: EncodedWindows, check_stop: Callable[[], None]) -> None:
        first = int(batch.window_ids[0])
        next_window = self.accumulator.next_window
        if next_window is not None and next_window < first:
            self.catch_up(first, check_stop)
        add_reconstruction(self.accumulator, self._run.sae, batch, encoded, self.special_ids)
        if time.monotonic() - self._saved >= RECONSTRUCTION_SAVE_S:
            self.save()

    def save(self) -> None:
        if self.accumulator.folded_windows:
            self._writer.put_meta(RECONSTRUCTION_STATE, self.accumulator.state())
        self._saved = time.monotonic()

    def catch_up(self, end: int, check_stop: Callable[[], None]) -> None:
        """Re-encode committed windows [next, end) (those this rank holds) that the saved
        sums do not cover."""
        from saetui.index import open_index

        layout = self._layout
        ids = [
            w
            for w in range(self.accumulator.next_window or 0, end)
            if layout is None or layout.owns(w)
        ]
        if not ids:
            return
        with open_index(self._config.work_dir) as index:
            for batch in index_batches(index, ids, self._config.inputs.batch_size):
                check_stop()
                encoded = encode_windows_of(self._run, batch)
                add_reconstruction(
                    self.accumulator, self._run.sae, batch, encoded, self.special_ids
                )


def index_batches(index: Any, window_ids: Any, batch_size: int) -> Iterator[Any]:
    """Window batches (as :func:`saetui.corpus.batch_windows` makes them) of committed
    windows read back from an index: the collection's own tokens, no re-tokenising."""
    from saetui.corpus.windows import Segment, WindowBatch

    ids = [int(w) for w in window_ids]
    for a in range(0, len(ids), batch_size):
        views = [index.window(w) for w in ids[a : a + batch_size]]
        width = max(len(v.token_ids) for v in views)
        tokens = np.zeros((len(views), width), dtype=np.int64)
        mask = np.zeros((len(views), width), dtype=bool)
        for row, view in enumerate(views):
            tokens[row, : len(view.token_ids)] = view.token_ids
            mask[row, : len(view.mask)] = view.mask
        yield WindowBatch(
            tokens=tokens,
            lengths=np.array([len(v.token_ids) for v in views], dtype=np.int64),
            mask=mask,
            window_ids=np.array(ids[a : a + batch_size], dtype=np.int64),
            segments=[
                [Segment(s.doc_id, s.doc_offset, s.start, s.length) for s in v.segments]
                for v in views
            ],
        )


def ce_sample_windows(windows: int, tokens: int, requested: int | None) -> tuple[list[int], int]:
    """The windows whose CE loss and KL are measured, spread evenly over the collection, and
    the token budget they stand for: ``requested`` tokens, or (None) CE_SAMPLE_FRACTION of
    the collection's ``tokens`` within CE_SAMPLE_MIN_TOKENS and CE_SAMPLE_MAX_TOKENS."""
    if windows <= 0:
        return [], 0
    if requested is None:
        budget = round(tokens * CE_SAMPLE_FRACTION)
        budget = min(max(budget, CE_SAMPLE_MIN_TOKENS), CE_SAMPLE_MAX_TOKENS)
    else:
        budget = requested
    per_window = max(tokens / windows, 1.0)
    count = min(windows, max(1, int(np.ceil(budget / per_window))))
    picked = sorted({int((i + 0.5) * windows / count) for i in range(count)})
    return picked, budget


def _metrics_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
    reconstruction: _Reconstruction,
    team: Team | None = None,
    measured: MeasuredSample | None = None,
) -> dict[str, Any]:
    """Reconstruction metrics of every collected token (accumulated while collecting), CE
    loss and KL of both families on a sample of the collection's windows, densities over the
    whole run, the SAE's weight metrics. In a distributed run each rank adds its own windows
    and the sample windows it holds; the sums are added over ranks (every SAELens batch of
    16 windows lies within one rank's block), and the main rank stores the result."""
    from saetui.index import open_index

    team = team or Team()
    summaries = writer.summaries
    report(CollectProgress("metrics", message="reconstruction metrics"), force=True)
    reconstruction.catch_up(writer.next_window, check_stop)
    accumulator = reconstruction.accumulator
    accumulator.finish()
    accumulator.reduce(team.sum_array)
    windows, collected, counted = team.sum_ints(
        [writer.windows_added, int(summaries.n_tokens), int(summaries.n_counted)]
    )
    sample, budget = ce_sample_windows(windows, collected, config.metrics_tokens)
    share = len(sample) / max(windows, 1)
    report(
        CollectProgress(
            "metrics",
            0,
            None,
            message=f"CE loss and KL on {len(sample):,} of {windows:,} windows ({share:.1%})",
        ),
        force=True,
    )
    layout = team.layout
    mine = [w for w in sample if layout is None or layout.owns(w)]
    with open_index(config.work_dir) as index:
        mine_tokens = sum(len(index.window(w).token_ids) for w in mine)
        # small batches: a stop waits for at most one batch of five forward passes
        if measured is not None and measured.windows == mine:
            behaviour = measured.behaviour
        else:
            batches = index_batches(index, mine, max(1, config.inputs.batch_size // 4))
            behaviour = measure_sample(
                run.model,
                run.sae,
                run.hook,
                batches,
                progress=lambda n: report(CollectProgress("metrics", n, mine_tokens)),
                check_stop=check_stop,
            )
    behaviour = BehaviourMetrics.combine(team.gather_objects(behaviour))
    sample_tokens = team.sum_ints([mine_tokens])[0]
    reconstructed = accumulator.result()
    saelens_tokens = reconstructed.get("saelens", {}).get("tokens", 0)
    saelens_counts = accumulator.saelens_feature_counts.cpu().numpy()
    counts = team.sum_array(summaries.count.cpu().numpy().astype(np.int64))
    weights = weight_metrics(run.sae)
    cosine = np.asarray(weights["encoder_decoder_cosine_sim"])
    metrics = merge_families(
        reconstructed,
        density_metrics(counts, counted),
        {"collection_tokens": counted},
        {
            "saelens": {
                **saelens_density_metrics(saelens_counts, saelens_tokens),
                "encoder_decoder_cosine_sim_mean": float(cosine.mean()),
            }
        },
        behaviour.result(),
        {
            "ce_sample": {
                "windows": len(sample),
                "of_windows": windows,
                "tokens": sample_tokens,
                "of_tokens": collected,
                "requested_tokens": config.metrics_tokens,
                "budget_tokens": budget,
                "rule": "windows spread evenly over the collection",
            },
            "precision": _precision(run),
        },
    )
    if team.is_main:
        writer.put_metrics(metrics)
        density = saelens_counts / max(saelens_tokens, 1)
        writer.put_meta("saelens_feature_metrics", {"feature_density": density.tolist(), **weights})
    return metrics

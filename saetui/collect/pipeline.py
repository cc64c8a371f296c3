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
    tokens = torch.as_tensor(batch.tokens)
    lengths = torch.as_tensor(batch.lengths)
    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    activations = run.model.activations(tokens, run.hook)
    device = activations.device
    real, counted = real.to(device), torch.as_tensor(batch.mask, device=device)
    x = activations[real]
    ids, values = run.sae.encode_sparse(x, mask=counted[real])
    return ids.to(torch.int32), values, counted[real]


def run_collection(
    config: CollectConfig,
    *,
    progress: Callable[[CollectProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    say: Callable[[str], None] | None = None,
) -> CollectResult:
    """Collect (or resume) the index at ``config.out``: loading, collecting, metrics,
    neighbours. Each phase records its completion in the index and is skipped when a
    later run finds it done; a finished index of the same request returns at once,
    without loading the model. ``should_stop`` is checked at safe points in every phase
    (between loading steps, batches and stripes): the result then says "stopped" and
    where, and running the same config again resumes.

    ``overwrite`` on an existing index builds the new one beside it (``.NAME.overwrite``)
    and swaps it in only when it has finished, keeping the user's labels: a stop or a
    crash leaves the old index as it was, and the same command resumes the new one."""
    out = Path(config.out)
    if not (config.overwrite and (out / "saetui-index.json").exists()):
        return _run(config, progress=progress, should_stop=should_stop, say=say)
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
    from saetui.errors import SaetuiInputError
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
) -> CollectResult:
    started = time.perf_counter()
    report = _Reporter(progress)
    stop_requested = should_stop or (lambda: False)

    def check_stop() -> None:
        if stop_requested():
            raise StopRequested

    report(CollectProgress("loading", message="checking the index"), force=True)
    check_request(config)
    done = finished_result(config)
    if done is not None:
        report(CollectProgress("done", done.tokens, done.tokens, message="already finished"))
        return done
    phase = "loading"
    writer: Any = None
    collect_rate = 0.0
    try:
        report(CollectProgress("loading", message="loading corpus, SAE and model"), force=True)
        run = load_run(config.inputs, say, check_stop=check_stop)
        writer = _open_writer(config, run)
        phase = "collecting"
        collect_rate = _collecting_phase(config, run, writer, report, check_stop)
        writer.flush()
        skipped = []
        phases = writer.get_meta("phases") or {}
        windows = writer.next_window
        phase = "metrics"
        if phases.get("metrics", {}).get("windows") == windows:
            skipped.append("metrics")
            metrics = writer.get_meta("metrics") or {}
        else:
            metrics = _metrics_phase(config, run, writer, report, check_stop)
            phases["metrics"] = {"windows": windows, "finished": time.time()}
            writer.put_meta("phases", phases)
        phase = "neighbours"
        if phases.get("neighbours", {}).get("windows") == windows:
            skipped.append("neighbours")
        else:
            _neighbours_phase(config, run, writer, report, check_stop)
            phases["neighbours"] = {"windows": windows, "finished": time.time()}
            writer.put_meta("phases", phases)
        tokens = writer.summaries.n_tokens
        writer.finish()
    except StopRequested:
        tokens = 0
        if writer is not None:
            writer.close()
            tokens = writer.tokens_committed
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
    except BaseException:
        if writer is not None:
            writer.close()
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


def _open_writer(config: CollectConfig, run: LoadedRun) -> Any:
    from saetui.index import IndexWriter

    writer = IndexWriter.create_or_resume(
        config.out,
        run_config_of(config, run),
        d_sae=run.sae.d_sae,
        ctx_len=config.inputs.ctx_len,
        vocab=run.model.vocabulary(),
        overwrite=config.overwrite,
        top_k=config.top_k_examples,
        summary_device=run.model.device,
    )
    try:
        writer.put_meta("run_details", {**run.model.describe(), "sae": _sae_facts(run.sae)})
        if run.sae.history:  # the TUI reads the training history from the index, not the SAE
            writer.put_meta("sae_history", run.sae.history)
        writer.put_meta("request", request_record(config))
    except BaseException:
        writer.close()
        raise
    return writer


def _collecting_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
) -> float:
    """Every window after the index's last commit; returns tokens/s while collecting."""
    from saetui.corpus import batch_windows, estimate_tokens, iter_windows

    inputs = config.inputs
    estimated = estimate_tokens(run.corpus, run.model.tokenizer)
    total = min(estimated, inputs.max_tokens) if inputs.max_tokens else estimated
    first_tokens = done = writer.summaries.n_tokens
    report(CollectProgress("collecting", done, max(total, done)), force=True)
    windows = iter_windows(
        run.corpus,
        run.model.tokenizer,
        ctx_len=inputs.ctx_len,
        max_tokens=inputs.max_tokens,
        start_window=writer.next_window,
    )
    stop_tokeniser = threading.Event()
    collect_started = time.perf_counter()
    for batch in _prefetch(batch_windows(windows, inputs.batch_size), stop_tokeniser):
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
        done += int(batch.lengths.sum())
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
        check_stop()
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
    metrics = evaluate_sae(
        run.model,
        run.sae,
        run.hook,
        batch_windows(windows, max(1, inputs.batch_size // 4)),
        max_tokens=budget,
        progress=lambda n: report(CollectProgress("metrics", n, budget)),
        check_stop=check_stop,
    )
    metrics = {
        f"sample_{key}" if key in _DENSITY_KEYS else key: value for key, value in metrics.items()
    }
    metrics.update(_density_over_collection(writer.summaries, run.sae.d_sae))
    metrics["metrics_tokens_requested"] = budget
    writer.put_metrics(metrics)
    return metrics


_DENSITY_KEYS = ("dead_features", "dead_fraction", "dense_1pct", "dense_10pct")


def _density_over_collection(summaries: Any, d_sae: int) -> dict[str, Any]:
    counts = summaries.count.cpu().numpy()
    tokens = max(int(summaries.n_counted), 1)
    density = counts / tokens
    return {
        "collection_tokens": int(summaries.n_counted),
        "dead_features": int((counts == 0).sum()),
        "dead_fraction": float((counts == 0).mean()),
        "dense_1pct": int((density > 0.01).sum()),
        "dense_10pct": int((density > 0.10).sum()),
    }


def _neighbours_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: _Reporter,
    check_stop: Callable[[], None],
) -> None:
    """Decoder-cosine and co-occurrence neighbours, and logit effects, into the index."""
    from saetui.analysis.cooccurrence import METRICS, cooccurrence_neighbours
    from saetui.analysis.neighbours import decoder_cosine_neighbours, logit_effects
    from saetui.index import open_index

    report(CollectProgress("neighbours", message="decoder-cosine neighbours"), force=True)
    w_dec = run.sae.W_dec.detach()
    ids, scores = decoder_cosine_neighbours(w_dec, top_n=config.neighbours, check_stop=check_stop)
    w_u = getattr(run.model.bridge, "W_U", None)
    w_out = run.model.residual_directions(run.hook, w_dec)  # hook_z: through W_O
    if w_u is not None and w_out is not None and w_u.shape[0] == w_out.shape[1]:
        report(CollectProgress("neighbours", message="logit effects"), force=True)
        effects = logit_effects(
            w_out,
            w_u.detach(),
            check_stop=check_stop,
            vocab_size=run.model.tokenizer_vocab_size,
        )
    else:
        effects = None
    # Co-occurrence reads the committed forward index: the writer's data must be on disk.
    # The reader shares the writer's environment (see index/env.py).
    writer.flush()
    report(CollectProgress("neighbours", message="co-occurrence"), force=True)
    with open_index(config.out) as index:
        result = cooccurrence_neighbours(
            lambda: _binary_chunks(index, run.sae.d_sae),
            run.sae.d_sae,
            top_n=config.neighbours,
            min_count=config.cooccurrence_min_count,
            check_stop=check_stop,
        )
    # every list is computed before any is stored: a stop leaves none half-written
    writer.put_neighbours("decoder_cosine", ids, scores)
    if effects is not None:
        up_ids, up_values, down_ids, down_values = effects
        writer.put_neighbours("logit_promoted", up_ids, up_values)
        writer.put_neighbours("logit_suppressed", down_ids, down_values)
    for metric in METRICS:
        writer.put_neighbours(metric, result.ids[metric], result.scores[metric])


def _binary_chunks(index: Any, d_sae: int) -> Iterator[Any]:
    """The forward index as binary CSR matrices [tokens, d_sae], one per chunk."""
    import scipy.sparse as sp

    for chunk in index.iter_forward():
        data = np.ones(len(chunk.feature_ids), dtype=np.float32)
        yield sp.csr_matrix(
            (data, chunk.feature_ids, chunk.offsets), shape=(len(chunk.offsets) - 1, d_sae)
        )

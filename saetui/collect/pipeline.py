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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saetui.collect.inputs import LoadedRun, RunInputs, load_run
from saetui.lm.device import dtype_name

PHASES = ("loading", "collecting", "metrics", "neighbours", "done")  # CollectProgress.phase


@dataclass
class CollectConfig:
    """Everything a collection run needs; the run-identity part is recorded in the index."""

    out: Path
    inputs: RunInputs
    metrics_tokens: int = 20_000
    overwrite: bool = False
    neighbours: int = 16
    cooccurrence_min_count: int = 3
    top_k_examples: int = 64


@dataclass
class CollectProgress:
    phase: str
    tokens_done: int = 0
    tokens_total: int | None = None
    tokens_per_s: float = 0.0
    eta_s: float | None = None
    message: str = ""


@dataclass
class CollectResult:
    out: Path
    status: str  # "finished" | "stopped"
    tokens: int
    seconds: float
    collect_tokens_per_s: float
    metrics: dict[str, Any] = field(default_factory=dict)


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
    """Collect (or resume collecting) the index at ``config.out``; see the module docstring."""
    from saetui.corpus import batch_windows, estimate_tokens, iter_windows
    from saetui.index import IndexWriter

    started = time.perf_counter()
    report = _Reporter(progress)
    stop_requested = should_stop or (lambda: False)
    report(CollectProgress("loading", message="loading corpus, SAE and model"), force=True)
    run = load_run(config.inputs, say)
    inputs = config.inputs
    model, sae = run.model, run.sae
    writer = IndexWriter.create_or_resume(
        config.out,
        run_config_of(config, run),
        d_sae=sae.d_sae,
        ctx_len=inputs.ctx_len,
        vocab=model.vocabulary(),
        overwrite=config.overwrite,
        top_k=config.top_k_examples,
        summary_device=model.device,
    )
    try:
        writer.put_meta("run_details", {**model.describe(), "sae": _sae_facts(sae)})
        estimated = estimate_tokens(run.corpus, model.tokenizer)
        total = min(estimated, inputs.max_tokens) if inputs.max_tokens else estimated
        first_tokens = writer.summaries.n_tokens
        done = first_tokens
        windows = iter_windows(
            run.corpus,
            model.tokenizer,
            ctx_len=inputs.ctx_len,
            max_tokens=inputs.max_tokens,
            start_window=writer.next_window,
        )
        stop_tokeniser = threading.Event()
        collect_started = time.perf_counter()
        stopped = False
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
            if stop_requested():
                stopped = True
                break
        stop_tokeniser.set()
        collected = writer.summaries.n_tokens - first_tokens
        collect_rate = collected / max(time.perf_counter() - collect_started, 1e-9)
        if stopped:
            writer.close()
            report(
                CollectProgress(
                    "done", writer.summaries.n_tokens, total, message="stopped; run again to resume"
                ),
                force=True,
            )
            return CollectResult(
                config.out,
                "stopped",
                writer.summaries.n_tokens,
                time.perf_counter() - started,
                collect_rate,
            )
        writer.flush()
        metrics = _metrics_phase(config, run, writer, report)
        _neighbours_phase(config, run, writer, report)
        tokens = writer.summaries.n_tokens
        writer.finish()
    except BaseException:
        writer.close()
        raise
    report(CollectProgress("done", tokens, tokens, message="finished"), force=True)
    return CollectResult(
        config.out, "finished", tokens, time.perf_counter() - started, collect_rate, metrics
    )


def _sae_facts(sae: Any) -> dict[str, Any]:
    from saetui.sae import describe

    return {key: value for key, value in describe(sae).items() if key != "path"}


def _metrics_phase(
    config: CollectConfig, run: LoadedRun, writer: Any, report: _Reporter
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
    metrics = evaluate_sae(
        run.model,
        run.sae,
        run.hook,
        batch_windows(windows, inputs.batch_size),
        max_tokens=budget,
        progress=lambda n: report(CollectProgress("metrics", n, budget)),
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
    config: CollectConfig, run: LoadedRun, writer: Any, report: _Reporter
) -> None:
    """Decoder-cosine and co-occurrence neighbours, and logit effects, into the index."""
    from saetui.analysis.cooccurrence import METRICS, cooccurrence_neighbours
    from saetui.analysis.neighbours import decoder_cosine_neighbours, logit_effects
    from saetui.index import open_index

    report(CollectProgress("neighbours", message="decoder-cosine neighbours"), force=True)
    w_dec = run.sae.W_dec.detach()
    ids, scores = decoder_cosine_neighbours(w_dec, top_n=config.neighbours)
    writer.put_neighbours("decoder_cosine", ids, scores)
    w_u = getattr(run.model.bridge, "W_U", None)
    w_out = run.model.residual_directions(run.hook, w_dec)  # hook_z: through W_O
    if w_u is not None and w_out is not None and w_u.shape[0] == w_out.shape[1]:
        report(CollectProgress("neighbours", message="logit effects"), force=True)
        up_ids, up_values, down_ids, down_values = logit_effects(
            w_out, w_u.detach(), vocab_size=run.model.tokenizer_vocab_size
        )
        writer.put_neighbours("logit_promoted", up_ids, up_values)
        writer.put_neighbours("logit_suppressed", down_ids, down_values)
    # Co-occurrence reads the committed forward index: the writer's data must be on disk,
    # and a reader may not be open in this process when the writer goes on writing.
    writer.flush()
    report(CollectProgress("neighbours", message="co-occurrence"), force=True)
    with open_index(config.out) as index:
        result = cooccurrence_neighbours(
            lambda: _binary_chunks(index, run.sae.d_sae),
            run.sae.d_sae,
            top_n=config.neighbours,
            min_count=config.cooccurrence_min_count,
        )
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

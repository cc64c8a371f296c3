"""The collection's phases around its metrics: collecting (every window after the index's
last commit through the model, the SAE and the writer), then neighbours, finishing the
index, gathering shards and building the postings. Each records its completion in the
index and is skipped when a later run finds it done."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from saetui.collect.distributed import Team
from saetui.collect.encoding import encode_windows_of, prefetch, write_encoded
from saetui.collect.index_ops import gather_shards
from saetui.collect.inputs import LoadedRun
from saetui.collect.job import CollectConfig, CollectProgress, Reporter, StopRequested
from saetui.collect.metrics_phase import MeasuredSample, Reconstruction, metrics_step


def collecting_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: Reporter,
    check_stop: Callable[[], None],
    reconstruction: Reconstruction,
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
    batches = prefetch(batch_windows(windows, inputs.batch_size), stop_tokeniser)
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
            report(collecting_progress(done, first_tokens, collect_started, total))
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


def collecting_progress(
    done: int, first_tokens: int, started: float, total: int, message: str = ""
) -> CollectProgress:
    """The collecting phase's progress: tokens so far, the rate since this run started
    (``started``: ``time.perf_counter()`` when ``first_tokens`` were already held), ETA."""
    rate = (done - first_tokens) / max(time.perf_counter() - started, 1e-9)
    return CollectProgress(
        "collecting",
        tokens_done=done,
        tokens_total=max(total, done),
        tokens_per_s=rate,
        eta_s=max(total - done, 0) / rate if rate > 0 else None,
        message=message,
    )


def finish_index(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: Reporter,
    check_stop: Callable[[], None],
    reconstruction: Reconstruction,
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


def finish_after_metrics(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: Reporter,
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
        gather_shards(config, team, say)
    enter("postings")
    postings_phase(config, team, report, check_stop, say)
    return int(tokens), skipped


def postings_phase(
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

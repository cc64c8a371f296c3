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
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saetui.collect.distributed import Team
from saetui.collect.encoding import encode_batch, encode_windows_of, write_encoded
from saetui.collect.index_ops import index_batches, open_writer, stored_request, swap_in
from saetui.collect.inputs import load_run
from saetui.collect.job import (
    PHASES,
    CollectConfig,
    CollectProgress,
    CollectResult,
    Reporter,
    StopRequested,
    check_request,
    finished_result,
    request_record,
)
from saetui.collect.metrics_phase import (
    RECONSTRUCTION_STATE,
    MeasuredSample,
    Reconstruction,
    ce_sample_windows,
    metrics_done,
    metrics_step,
)
from saetui.collect.phases import (
    collecting_phase,
    finish_after_metrics,
    finish_index,
    postings_phase,
)

__all__ = [
    "PHASES",
    "RECONSTRUCTION_STATE",
    "CollectConfig",
    "CollectProgress",
    "CollectResult",
    "MeasuredSample",
    "StopRequested",
    "ce_sample_windows",
    "encode_batch",
    "encode_windows_of",
    "finish_after_metrics",
    "index_batches",
    "metrics_done",
    "metrics_step",
    "run_collection",
    "write_encoded",
]


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
    if staging.exists() and stored_request(staging) != request_record(staged):
        shutil.rmtree(staging)  # a replacement for another request, never user data
    result = _run(staged, progress=progress, should_stop=should_stop, say=say)
    if result.status == "finished":
        swap_in(staging, out)
    result.out = out
    return result


def _run(
    config: CollectConfig,
    *,
    progress: Callable[[CollectProgress], None] | None,
    should_stop: Callable[[], bool] | None,
    say: Callable[[str], None] | None,
    team: Team | None = None,
) -> CollectResult:
    started = time.perf_counter()
    report = Reporter(progress)
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
            postings_phase(config, team, report, check_stop, say)
            report(CollectProgress("done", done.tokens, done.tokens, message="already finished"))
            team.finish()
            return done
        report(CollectProgress("loading", message="loading corpus, SAE and model"), force=True)
        run = load_run(config.inputs, say, check_stop=check_stop)
        team.sync()
        if team.is_main:  # creates the index directory and its marker first
            writer = open_writer(config, run, team)
        team.sync()
        if not team.is_main:
            writer = open_writer(config, run, team)
        team.sync()
        reconstruction = Reconstruction(config, run, writer, team.layout)
        phase = "collecting"
        collect_rate = collecting_phase(
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

"""Several SAEs collected in one pass over the corpus: ``saetui collect --sae A --sae B``.

The model runs once per batch, stopped after the deepest of the SAEs' hooks, and every
SAE encodes its own hook's activations into its own index. ``OUT/<name>`` (the SAE
directory's name, made unique) is an ordinary, complete saetui index — the one a
separate ``saetui collect --sae A --out OUT/<name>`` would write, request record
included — so every reader, export, the TUI and ``saetui compare OUT/a OUT/b`` work on
it unchanged; ``OUT/saetui-indexes.json`` lists them. Each index stores its own copy of
the windows' tokens (benchmarks/bench_multi_sae.py measures what that costs).

The metrics phase measures CE loss and KL of every SAE on the same sample windows in one
go: the clean forward pass (reading every hook) and the zero-ablation passes of each hook
run once per batch, only the passes with an SAE spliced in run per SAE; then each index
stores its metrics. Neighbours and postings run per SAE, one index after the other (each
reads its own index), with the model kept loaded. Every index records its own progress,
so a stop anywhere resumes: collecting restarts at the index that is furthest behind, an
index that already holds a window skips it, and metrics are measured only for the
indexes that have not recorded theirs.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saetui.collect.distributed import Team
from saetui.collect.encoding import prefetch, to_device, write_encoded
from saetui.collect.evaluate import encode_windows
from saetui.collect.index_ops import index_batches, open_writer, swap_in
from saetui.collect.job import (
    CollectConfig,
    CollectProgress,
    CollectResult,
    Reporter,
    StopRequested,
    check_request,
    finished_result,
    member_configs,
)
from saetui.collect.members import Member, load_members, tokens_of, work_config, write_list
from saetui.collect.metrics_phase import (
    MeasuredSample,
    Reconstruction,
    ce_sample_windows,
    metrics_done,
    metrics_step,
)
from saetui.collect.phases import collecting_progress, finish_after_metrics, postings_phase
from saetui.errors import SaetuiInputError


def run_several(
    config: CollectConfig,
    *,
    progress: Callable[[CollectProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    say: Callable[[str], None] | None = None,
    team: Team | None = None,
) -> CollectResult:
    """Collect (or resume) one index per SAE of ``config.saes`` under ``config.out`` in one
    pass of the model. The result covers the whole request (``members``: each index's
    own); a stop leaves every index resumable by the same request."""
    if team is not None and team.world > 1:
        raise SaetuiInputError(
            "several --sae cannot run under torchrun yet: run one torchrun job per SAE, or "
            "collect the SAEs together in one process."
        )
    started = time.perf_counter()
    stop_requested = should_stop or (lambda: False)

    def check_stop() -> None:
        if stop_requested():
            raise StopRequested

    report = Reporter(progress)
    phase = "loading"
    members: list[Member] = []
    collect_rate = 0.0
    try:
        report(CollectProgress("loading", message="checking the indexes"), force=True)
        check_request(config)
        members = [
            Member(name, member, work_config(member)) for name, member in member_configs(config)
        ]
        for member in members:
            member.result = finished_result(member.work)
        pending = [member for member in members if member.result is None]
        if pending:
            report(CollectProgress("loading", message="loading corpus, SAEs and model"), force=True)
            load_members(config.inputs, pending, say, check_stop)
        write_list(config, members)
        if pending:
            for member in pending:
                assert member.run is not None
                member.writer = open_writer(member.work, member.run, Team())
                member.reconstruction = Reconstruction(member.work, member.run, member.writer)
            phase = "collecting"
            collect_rate = _collect_together(config, pending, report, check_stop)

        def enter(name: str) -> None:
            nonlocal phase
            phase = name

        pending = [member for member in members if member.result is None]
        if pending:
            enter("metrics")
            measured = _measure_together(pending, report, check_stop)
            for member in pending:
                _metrics(member, report, check_stop, stop_requested, enter, measured)
        for member in members:
            _finish(member, report, check_stop, say, stop_requested, enter)
        # Only once every index finished do the staged ones replace the old: a stop before
        # this point finds every staged index again and resumes it.
        for member in members:
            if member.staged:
                assert member.result is not None
                swap_in(Path(member.work.out), Path(member.config.out))
                member.result = dataclasses.replace(member.result, out=Path(member.config.out))
    except (StopRequested, KeyboardInterrupt) as stop:
        for member in members:
            if member.writer is not None:
                member.writer.close()
        if isinstance(stop, KeyboardInterrupt):
            raise
        tokens = min((tokens_of(m) for m in members), default=0)
        message = f"stopped while {phase}; run the same command again to resume"
        report(CollectProgress("done", tokens, None, message=message), force=True)
        return CollectResult(
            Path(config.out),
            "stopped",
            tokens,
            time.perf_counter() - started,
            collect_rate,
            phase=phase,
            members=tuple((m.name, m.result) for m in members if m.result is not None),
        )
    except BaseException:
        for member in members:
            if member.writer is not None:
                member.writer.close()
        raise
    results = [m.result for m in members if m.result is not None]
    tokens = min((r.tokens for r in results), default=0)
    skipped = set.intersection(*(set(r.skipped) for r in results)) if results else set()
    report(CollectProgress("done", tokens, tokens, message="finished"), force=True)
    return CollectResult(
        Path(config.out),
        "finished",
        tokens,
        time.perf_counter() - started,
        collect_rate,
        skipped=tuple(p for p in ("collecting", "metrics", "neighbours") if p in skipped),
        members=tuple((m.name, m.result) for m in members if m.result is not None),
    )


def _rows_from(batch: Any, first: int) -> Any:
    """The windows of ``batch`` from row ``first`` on."""
    return dataclasses.replace(
        batch,
        tokens=batch.tokens[first:],
        lengths=batch.lengths[first:],
        mask=batch.mask[first:],
        window_ids=batch.window_ids[first:],
        segments=batch.segments[first:],
    )


def _collect_together(
    config: CollectConfig,
    members: list[Member],
    report: Reporter,
    check_stop: Callable[[], None],
) -> float:
    """Every window after the earliest index's last commit through the model once; each
    SAE encodes the windows its index does not hold yet. Returns tokens/s."""
    from saetui.corpus import batch_windows, estimate_tokens, iter_windows

    inputs = config.inputs
    run = members[0].run
    assert run is not None
    starts = [int(m.writer.next_window) for m in members]
    behind = members[starts.index(min(starts))]
    estimated = estimate_tokens(run.corpus, run.model.tokenizer)
    total = min(estimated, inputs.max_tokens) if inputs.max_tokens else estimated
    done = first_tokens = int(behind.writer.summaries.n_tokens)
    report(CollectProgress("collecting", done, max(total, done)), force=True)
    windows = iter_windows(
        run.corpus,
        run.model.tokenizer,
        ctx_len=inputs.ctx_len,
        max_tokens=inputs.max_tokens,
        start_window=min(starts),
    )
    hooks = sorted({m.run.hook for m in members if m.run is not None})
    stop_tokeniser = threading.Event()
    started = time.perf_counter()
    batches: Iterator[Any] = prefetch(batch_windows(windows, inputs.batch_size), stop_tokeniser)
    try:
        for batch in batches:
            tokens = to_device(batch.tokens, run.model.device)
            activations = run.model.activations_at(tokens, hooks)
            first_window = int(batch.window_ids[0])
            for member, start in zip(members, starts, strict=True):
                skip = max(start - first_window, 0)
                if skip >= len(batch):
                    continue
                part = batch if skip == 0 else _rows_from(batch, skip)
                assert member.run is not None and member.reconstruction is not None
                encoded = encode_windows(member.run.sae, activations[member.run.hook][skip:], part)
                write_encoded(member.writer, part, encoded)
                member.reconstruction.add(part, encoded, check_stop)
            done += int(np.asarray(batch.lengths).sum())
            report(collecting_progress(done, first_tokens, started, total, f"{len(members)} SAEs"))
            check_stop()
    except (StopRequested, KeyboardInterrupt):
        for member in members:
            assert member.reconstruction is not None
            member.reconstruction.save()
        raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    for member in members:
        assert member.reconstruction is not None
        member.reconstruction.save()
    return (done - first_tokens) / max(time.perf_counter() - started, 1e-9)


def _named(member: Member, report: Reporter) -> Reporter:
    """``report`` with the member's name before each message."""

    def named(update: CollectProgress) -> None:
        message = f"{member.name}: {update.message}" if update.message else member.name
        report(dataclasses.replace(update, message=message))

    return Reporter(named, interval=0.0)


def _measure_together(
    members: list[Member], report: Reporter, check_stop: Callable[[], None]
) -> dict[str, MeasuredSample]:
    """CE loss and KL of every member whose index has not recorded its metrics, measured
    together on the sample windows they share (the same collection: the same sample),
    sharing the clean and zero-ablation forward passes; by member name. A member alone in
    its sample is left to its own metrics phase."""
    from saetui.collect.evaluate import measure_samples
    from saetui.index import open_index

    groups: dict[tuple[int, ...], list[Member]] = {}
    for member in members:
        writer = member.writer
        writer.flush()
        if metrics_done(writer):
            continue
        sample, _ = ce_sample_windows(
            int(writer.windows_added), int(writer.summaries.n_tokens), member.work.metrics_tokens
        )
        groups.setdefault(tuple(sample), []).append(member)
    measured: dict[str, MeasuredSample] = {}
    for windows, group in groups.items():
        if len(group) < 2:
            continue
        first = group[0]
        assert first.run is not None
        names = ", ".join(m.name for m in group)
        with open_index(first.work.work_dir) as index:
            total = sum(len(index.window(w).token_ids) for w in windows)
            report(
                CollectProgress(
                    "metrics",
                    0,
                    total,
                    message=f"CE loss and KL of {names} on {len(windows):,} windows",
                ),
                force=True,
            )
            batches = index_batches(index, windows, max(1, first.work.inputs.batch_size // 4))
            behaviours = measure_samples(
                first.run.model,
                [(m.run.sae, m.run.hook) for m in group if m.run is not None],
                batches,
                progress=_sample_progress(report, total, f"CE loss and KL of {names}"),
                check_stop=check_stop,
            )
        for member, behaviour in zip(group, behaviours, strict=True):
            measured[member.name] = MeasuredSample(list(windows), behaviour)
    return measured


def _sample_progress(report: Reporter, total: int, message: str) -> Callable[[int], None]:
    def progress(done: int) -> None:
        report(CollectProgress("metrics", done, total, message=message))

    return progress


def _metrics(
    member: Member,
    report: Reporter,
    check_stop: Callable[[], None],
    stop_requested: Callable[[], bool],
    enter: Callable[[str], None],
    measured: dict[str, MeasuredSample],
) -> None:
    """A collecting member's metrics phase (skipped when its index records it done), with
    the CE loss and KL measured together when there are any; stored in its index."""
    assert member.run is not None and member.reconstruction is not None
    member.started = time.perf_counter()
    member.metrics, member.skipped = metrics_step(
        member.work,
        member.run,
        member.writer,
        _named(member, report),
        check_stop,
        member.reconstruction,
        Team(stop_requested),
        lambda phase: enter(f"{phase} of {member.name}"),
        measured.get(member.name),
    )


def _finish(
    member: Member,
    report: Reporter,
    check_stop: Callable[[], None],
    say: Callable[[str], None] | None,
    stop_requested: Callable[[], bool],
    enter: Callable[[str], None],
) -> None:
    """A member's phases after metrics (neighbours, postings), or only its postings when
    its index had finished (a staged index replaces the old one later, with the others)."""
    own = _named(member, report)
    if member.result is not None:  # finished before: at most its postings are left
        enter(f"postings of {member.name}")
        postings_phase(member.work, Team(), own, check_stop, say)
    else:
        assert member.run is not None and member.metrics is not None
        tokens, neighbours_skipped = finish_after_metrics(
            member.work,
            member.run,
            member.writer,
            own,
            check_stop,
            Team(stop_requested),
            say,
            lambda phase: enter(f"{phase} of {member.name}"),
        )
        member.writer = None  # finished and closed
        skipped = member.skipped + (["neighbours"] if neighbours_skipped else [])
        member.result = CollectResult(
            Path(member.config.out),
            "finished",
            tokens,
            time.perf_counter() - member.started,
            0.0,
            member.metrics,
            skipped=tuple(skipped),
        )

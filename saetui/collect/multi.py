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
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saetui.collect.distributed import Team
from saetui.collect.evaluate import encode_windows
from saetui.collect.inputs import LoadedRun, RunInputs, load_run
from saetui.collect.job import (
    CollectConfig,
    CollectProgress,
    CollectResult,
    StopRequested,
    check_request,
    finished_result,
    member_configs,
    request_record,
)
from saetui.collect.pipeline import (
    MeasuredSample,
    _open_writer,
    _prefetch,
    _Reconstruction,
    _Reporter,
    _stored_request,
    _swap_in,
    _to_device,
    ce_sample_windows,
    finish_after_metrics,
    index_batches,
    metrics_done,
    metrics_step,
    write_encoded,
)
from saetui.errors import SaetuiInputError
from saetui.index import format as fmt


@dataclasses.dataclass
class _Member:
    """One SAE of the request: its name, its own request (``work``: where it is written,
    a staging folder beside the index under --overwrite) and, once loaded, its run."""

    name: str
    config: CollectConfig
    work: CollectConfig
    run: LoadedRun | None = None
    writer: Any = None
    reconstruction: _Reconstruction | None = None
    result: CollectResult | None = None
    metrics: dict[str, Any] | None = None  # once its metrics phase has run or been skipped
    skipped: list[str] = dataclasses.field(default_factory=list)
    started: float = 0.0

    @property
    def staged(self) -> bool:
        return Path(self.work.out) != Path(self.config.out)


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

    report = _Reporter(progress)
    phase = "loading"
    members: list[_Member] = []
    collect_rate = 0.0
    try:
        report(CollectProgress("loading", message="checking the indexes"), force=True)
        check_request(config)
        members = [
            _Member(name, member, _work_config(member)) for name, member in member_configs(config)
        ]
        for member in members:
            member.result = finished_result(member.work)
        pending = [member for member in members if member.result is None]
        if pending:
            report(CollectProgress("loading", message="loading corpus, SAEs and model"), force=True)
            _load(config.inputs, pending, say, check_stop)
        _write_list(config, members)
        if pending:
            for member in pending:
                assert member.run is not None
                member.writer = _open_writer(member.work, member.run, Team())
                member.reconstruction = _Reconstruction(member.work, member.run, member.writer)
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
    except (StopRequested, KeyboardInterrupt) as stop:
        for member in members:
            if member.writer is not None:
                member.writer.close()
        if isinstance(stop, KeyboardInterrupt):
            raise
        tokens = min((_tokens_of(m) for m in members), default=0)
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


def _work_config(member: CollectConfig) -> CollectConfig:
    """Where a member's index is written: in place, or under --overwrite of an existing
    index a staging folder beside it that replaces it once finished (as one SAE's
    ``run_collection`` does)."""
    out = Path(member.out)
    if not (member.overwrite and (out / fmt.MARKER_FILE).exists()):
        return dataclasses.replace(member, overwrite=False)
    staging = out.with_name(f".{out.name}.overwrite")
    staged = dataclasses.replace(member, out=staging, overwrite=False)
    if staging.exists() and _stored_request(staging) != request_record(staged):
        shutil.rmtree(staging)  # a replacement for another request, never user data
    return staged


def _load(
    inputs: RunInputs,
    members: list[_Member],
    say: Callable[[str], None] | None,
    check_stop: Callable[[], None],
) -> None:
    """The corpus and the model once, every SAE of ``members``; refuses SAEs that need
    another model, numerics or start token than the first."""
    from saetui.lm import resolve_hook
    from saetui.sae import load_sae

    first = members[0]
    saes = [
        load_sae(
            m.work.inputs.sae, batchtopk_mode=inputs.batchtopk_mode, threshold=inputs.threshold
        )
        for m in members
    ]
    check_stop()
    _check_compatible(inputs, members, saes)
    run = load_run(first.work.inputs, say, check_stop=check_stop, sae=saes[0])
    first.run = run
    for member, sae in zip(members[1:], saes[1:], strict=True):
        check_stop()
        hook = resolve_hook(
            run.model,
            hook=inputs.hook,
            layer=inputs.layer,
            hook_name=inputs.hook_name,
            sae_hook=sae.hook_name,
            sae_d_in=sae.d_in,
        )
        sae.to(run.model.device)
        needs_threshold = sae.architecture == "batchtopk" and sae.batchtopk_mode == "threshold"
        if needs_threshold and sae.threshold is None:
            from saetui.collect.inputs import estimate_threshold

            estimate_threshold(sae, run.model, run.corpus, hook, inputs.ctx_len, inputs.batch_size)
        member.run = LoadedRun(run.corpus, sae, run.model, hook, run.numerics)


def _check_compatible(inputs: RunInputs, members: list[_Member], saes: list[Any]) -> None:
    """Every SAE runs on one model load: the same model (where the SAEs name theirs), the
    same numerics and start token (unless the command line sets them)."""

    def model_of(sae: Any) -> str | None:
        name = getattr(sae, "model_name", None)
        return str(name).rstrip("/").split("/")[-1].lower() if name else None

    first = members[0].work.inputs.sae
    checks: list[tuple[str, Callable[[Any], Any], str]] = [
        ("was trained on", lambda sae: model_of(sae), "collect SAEs of one model together"),
    ]
    if inputs.numerics is None:
        checks.append(
            (
                "needs numerics",
                lambda sae: sae.default_numerics(),
                "pass --numerics to choose one for all, or collect them separately",
            )
        )
    if inputs.start_token is None:
        checks.append(
            (
                "needs the start-token rule",
                lambda sae: sae.default_start_token(),
                "one model load has one rule, so collect them separately",
            )
        )
    for what, value_of, fix in checks:
        expected = value_of(saes[0])
        for member, sae in zip(members[1:], saes[1:], strict=True):
            value = value_of(sae)
            if expected is not None and value is not None and value != expected:
                raise SaetuiInputError(
                    f"--sae {member.work.inputs.sae} {what} {value} but --sae {first} {what} "
                    f"{expected}: {fix}."
                )


def _write_list(config: CollectConfig, members: list[_Member]) -> None:
    entries = [
        {
            "name": m.name,
            "sae": str(Path(m.config.inputs.sae).expanduser().resolve()),
            "hook": m.run.hook if m.run is not None else _stored_hook(m.config.out),
        }
        for m in members
    ]
    fmt.write_several(Path(config.out), entries)


def _stored_hook(path: Path) -> str | None:
    """The hook a finished index was collected at."""
    from saetui.index import open_index

    try:
        with open_index(path) as index:
            hook = index.meta.run_config.get("hook")
    except SaetuiInputError:
        return None
    return str(hook) if hook is not None else None


def _tokens_of(member: _Member) -> int:
    if member.result is not None:
        return member.result.tokens
    if member.writer is not None:
        return int(member.writer.tokens_committed)
    return 0


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
    members: list[_Member],
    report: _Reporter,
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
    batches: Iterator[Any] = _prefetch(batch_windows(windows, inputs.batch_size), stop_tokeniser)
    try:
        for batch in batches:
            tokens = _to_device(batch.tokens, run.model.device)
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
            rate = (done - first_tokens) / max(time.perf_counter() - started, 1e-9)
            report(
                CollectProgress(
                    "collecting",
                    tokens_done=done,
                    tokens_total=max(total, done),
                    tokens_per_s=rate,
                    eta_s=max(total - done, 0) / rate if rate > 0 else None,
                    message=f"{len(members)} SAEs",
                )
            )
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


def _named(member: _Member, report: _Reporter) -> _Reporter:
    """``report`` with the member's name before each message."""

    def named(update: CollectProgress) -> None:
        message = f"{member.name}: {update.message}" if update.message else member.name
        report(dataclasses.replace(update, message=message))

    return _Reporter(named, interval=0.0)


def _measure_together(
    members: list[_Member], report: _Reporter, check_stop: Callable[[], None]
) -> dict[str, MeasuredSample]:
    """CE loss and KL of every member whose index has not recorded its metrics, measured
    together on the sample windows they share (the same collection: the same sample),
    sharing the clean and zero-ablation forward passes; by member name. A member alone in
    its sample is left to its own metrics phase."""
    from saetui.collect.evaluate import measure_samples
    from saetui.index import open_index

    groups: dict[tuple[int, ...], list[_Member]] = {}
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


def _sample_progress(report: _Reporter, total: int, message: str) -> Callable[[int], None]:
    def progress(done: int) -> None:
        report(CollectProgress("metrics", done, total, message=message))

    return progress


def _metrics(
    member: _Member,
    report: _Reporter,
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
    member: _Member,
    report: _Reporter,
    check_stop: Callable[[], None],
    say: Callable[[str], None] | None,
    stop_requested: Callable[[], bool],
    enter: Callable[[str], None],
) -> None:
    """A member's phases after metrics (neighbours, postings), or only its postings when
    its index had finished; then the staged index replaces the old one."""
    from saetui.collect.pipeline import _postings_phase

    own = _named(member, report)
    if member.result is not None:  # finished before: at most its postings are left
        enter(f"postings of {member.name}")
        _postings_phase(member.work, Team(), own, check_stop, say)
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
    if member.staged:
        _swap_in(Path(member.work.out), Path(member.config.out))
        member.result = dataclasses.replace(member.result, out=Path(member.config.out))

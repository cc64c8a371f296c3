"""The SAEs of a several-SAE request (:mod:`saetui.collect.multi`): each one's own request
and where its index is written, loading them all on one model load, and the list of
indexes under ``OUT``."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saetui.collect.index_ops import stored_request
from saetui.collect.inputs import LoadedRun, RunInputs, load_run
from saetui.collect.job import CollectConfig, CollectResult, request_record
from saetui.collect.metrics_phase import Reconstruction
from saetui.errors import SaetuiInputError
from saetui.index import format as fmt


@dataclasses.dataclass
class Member:
    """One SAE of the request: its name, its own request (``work``: where it is written,
    a staging folder beside the index under --overwrite) and, once loaded, its run."""

    name: str
    config: CollectConfig
    work: CollectConfig
    run: LoadedRun | None = None
    writer: Any = None
    reconstruction: Reconstruction | None = None
    result: CollectResult | None = None
    metrics: dict[str, Any] | None = None  # once its metrics phase has run or been skipped
    skipped: list[str] = dataclasses.field(default_factory=list)
    started: float = 0.0

    @property
    def staged(self) -> bool:
        return Path(self.work.out) != Path(self.config.out)


def work_config(member: CollectConfig) -> CollectConfig:
    """Where a member's index is written: in place, or under --overwrite of an existing
    index a staging folder beside it that replaces it once finished (as one SAE's
    ``run_collection`` does)."""
    out = Path(member.out)
    if not (member.overwrite and (out / fmt.MARKER_FILE).exists()):
        return dataclasses.replace(member, overwrite=False)
    staging = out.with_name(f".{out.name}.overwrite")
    staged = dataclasses.replace(member, out=staging, overwrite=False)
    if staging.exists() and stored_request(staging) != request_record(staged):
        shutil.rmtree(staging)  # a replacement for another request, never user data
    return staged


def load_members(
    inputs: RunInputs,
    members: list[Member],
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


def _check_compatible(inputs: RunInputs, members: list[Member], saes: list[Any]) -> None:
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


def write_list(config: CollectConfig, members: list[Member]) -> None:
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


def tokens_of(member: Member) -> int:
    if member.result is not None:
        return member.result.tokens
    if member.writer is not None:
        return int(member.writer.tokens_committed)
    return 0

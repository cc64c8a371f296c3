"""What a collection job is — its config, progress updates, result and request record —
in a module that imports neither torch nor Textual, so the TUI process and the command
line can describe, start and judge a job without loading a model."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saetui.collect.inputs import RunInputs

PHASES = ("loading", "collecting", "metrics", "neighbours", "done")  # CollectProgress.phase
EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class StopRequested(Exception):
    """Raised at a safe point (between batches, stripes or loading steps) when the job was
    asked to stop; everything committed so far stays and the job resumes from it."""


@dataclass
class CollectConfig:
    """Everything a collection run needs; the run-identity part is recorded in the index."""

    out: Path
    inputs: RunInputs
    # tokens of the CE-loss/KL sample (whole windows of the collection); None: 1% of the
    # collection, at least 512 and at most 20,000 (saetui.collect.metrics_phase.ce_sample_windows)
    metrics_tokens: int | None = None
    overwrite: bool = False
    neighbours: int = 16
    cooccurrence_min_count: int = 3
    top_k_examples: int = 64
    # Where this process writes its shard (a distributed run: a disk of this machine);
    # None: in ``out``. With ``gather``, finished shards are then copied into ``out``.
    shard_dir: Path | None = None
    gather: bool = False
    # build the per-feature postings (saetui postings) once the index has finished; None:
    # when the index holds under 100M tokens (saetui.index.postings.postings_by_default)
    postings: bool | None = None
    # Several SAEs collected in one pass (``saetui collect --sae A --sae B``): ``out`` is
    # then a folder holding one ordinary index per SAE (saetui.collect.multi); () or one
    # path: the single index of ``inputs.sae`` at ``out``.
    saes: tuple[Path, ...] = ()

    @property
    def several(self) -> bool:
        """Whether this request collects several SAEs (one index each, under ``out``)."""
        return len(self.saes) > 1

    @property
    def work_dir(self) -> Path:
        """The index directory this process writes."""
        return Path(self.shard_dir or self.out)


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
    phase: str = "done"  # where a stopped job stopped
    skipped: tuple[str, ...] = ()  # phases already done by an earlier run
    # several SAEs in one pass: each index's own result, by name (saetui.collect.multi)
    members: tuple[tuple[str, CollectResult], ...] = ()


def check_request(config: CollectConfig, shard: int = 0) -> None:
    """Everything about a request that can be checked without loading anything: option
    ranges and the output directory (``shard``: the one this process writes). Raises one
    SaetuiInputError sentence."""
    from saetui.errors import SaetuiInputError
    from saetui.index.env import check_output

    if config.several:
        check_several(config)
        return
    config.inputs.check()
    if config.metrics_tokens is not None and (
        not isinstance(config.metrics_tokens, int) or config.metrics_tokens < 1
    ):
        raise SaetuiInputError(
            f"--metrics-tokens {config.metrics_tokens} must be at least 1; leave it out to "
            "measure CE loss and KL on 1% of the collection."
        )
    for name, value, low in (
        ("neighbours per feature", config.neighbours, 1),
        ("co-occurrence minimum count", config.cooccurrence_min_count, 1),
        ("top examples per feature", config.top_k_examples, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise SaetuiInputError(f"{name} {value} must be a whole number >= {low}.")
    check_output(config.work_dir, shard)


def request_record(config: CollectConfig) -> dict[str, Any]:
    """What the user asked for, with the size and mtime of every input file: a finished
    index whose stored record equals this one needs no model load to be reopened."""
    inputs = asdict(config.inputs)
    inputs["sae"] = str(Path(config.inputs.sae).expanduser().resolve())
    files: dict[str, list[int]] = {}
    for root in (Path(inputs["sae"]), Path(str(config.inputs.data)).expanduser()):
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                stat = path.stat()
                files[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return {
        "inputs": {
            key: str(value) if isinstance(value, Path) else value for key, value in inputs.items()
        },
        "files": files,
        "metrics_tokens": config.metrics_tokens,
        "neighbours": config.neighbours,
        "cooccurrence_min_count": config.cooccurrence_min_count,
        "top_k_examples": config.top_k_examples,
    }


def finished_result(config: CollectConfig) -> CollectResult | None:
    """The result of an earlier run of exactly this request if it finished, else None."""
    from saetui.errors import SaetuiInputError
    from saetui.index import open_index

    if config.several:
        members = [(name, finished_result(member)) for name, member in member_configs(config)]
        done = [(name, result) for name, result in members if result is not None]
        if len(done) < len(members):
            return None
        return CollectResult(
            Path(config.out),
            "finished",
            min(result.tokens for _, result in done),
            0.0,
            0.0,
            skipped=("collecting", "metrics", "neighbours"),
            members=tuple(done),
        )
    work = config.work_dir
    if config.overwrite or not (work / "saetui-index.json").is_file():
        return None
    try:
        with open_index(work) as index:
            progress = index.progress()
            stored = index.get_meta("request")
            metrics = index.metrics()
    except (SaetuiInputError, OSError):
        return None  # the full path gives the precise sentence
    if not progress.finished or stored != request_record(config):
        return None
    return CollectResult(
        Path(config.out),
        "finished",
        progress.tokens,
        0.0,
        0.0,
        metrics,
        skipped=("collecting", "metrics", "neighbours"),
    )


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that runs this job again (and so resumes it)."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    program = os.path.basename(sys.argv[0]) if argv is None else "saetui"
    if program in ("__main__.py", "-m", "-c") or not program:
        program = "saetui"
    return shlex.join([program, *args])


def sae_names(saes: tuple[Path, ...] | list[Path]) -> list[str]:
    """The folder name of each SAE's index: its directory's name, ``-2``, ``-3``... added
    where two SAEs' directories share a name."""
    names: list[str] = []
    for sae in saes:
        base = Path(sae).expanduser().resolve().name or "sae"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def member_configs(config: CollectConfig) -> list[tuple[str, CollectConfig]]:
    """One ordinary single-SAE request per SAE of a several-SAE ``config``: the index of
    SAE ``name`` at ``out/name``, with the options they share."""
    from dataclasses import replace

    return [
        (
            name,
            replace(
                config,
                out=Path(config.out) / name,
                saes=(),
                inputs=replace(config.inputs, sae=Path(sae)),
            ),
        )
        for name, sae in zip(sae_names(config.saes), config.saes, strict=True)
    ]


def check_several(config: CollectConfig) -> None:
    """A several-SAE request: no SAE twice, an output folder that is new, empty or one
    made by such a request, and each SAE's own request; one SaetuiInputError sentence."""
    from saetui.errors import SaetuiInputError
    from saetui.index import format as fmt

    seen: dict[Path, Path] = {}
    for sae in config.saes:
        resolved = Path(sae).expanduser().resolve()
        if resolved in seen:
            raise SaetuiInputError(
                f"--sae {sae} is given twice (as {seen[resolved]} too): name each SAE once."
            )
        seen[resolved] = Path(sae)
    if config.shard_dir is not None:
        raise SaetuiInputError(
            "several --sae cannot run under torchrun yet: run one torchrun job per SAE, or "
            "collect the SAEs together in one process."
        )
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise SaetuiInputError(f"--out {out} is a file: pass a directory for the indexes.")
    if (out / fmt.MARKER_FILE).exists():
        raise SaetuiInputError(
            f"--out {out} is a single SAE's index; several --sae need a new or empty "
            "directory, which gets one index per SAE inside."
        )
    manifest = fmt.read_several(out)
    if manifest is None and out.is_dir() and any(out.iterdir()):
        raise SaetuiInputError(
            f"--out {out} is a directory with files in it that holds no saetui indexes: pass "
            "a new or empty directory."
        )
    members = member_configs(config)
    if manifest is not None and not config.overwrite:
        wanted = [(name, str(m.inputs.sae.expanduser().resolve())) for name, m in members]
        stored = [(entry.get("name"), entry.get("sae")) for entry in manifest]
        if wanted != stored:
            names = ", ".join(str(entry.get("name")) for entry in manifest)
            raise SaetuiInputError(
                f"--out {out} holds the indexes of other SAEs ({names}): pass --overwrite to "
                "replace them, or choose another --out."
            )
    for _, member in members:
        check_request(member)


class Reporter:
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

"""Gather the shards of a distributed collection into one index directory.

LMDB must not be shared over a network filesystem by processes that write it, so each
rank of a multi-node run writes its shard to a disk of its own machine (``--shard-dir``).
Afterwards every finished shard is copied -- with py-lmdb's ``copy(compact=True)``, which
is ``mdb_copy -c``: a consistent snapshot written sequentially, free pages dropped -- into
one directory, from where the TUI reads it as one index. A shard is only copied when it
is finished and belongs to the same run (identity: run config, d_sae, ctx_len, vocabulary,
summary sizes) and the same layout (world size, block) as the shards already there; once
all ranks are present, the window counts are checked against the layout (every global
window 0..N-1 held exactly once).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from saetui.errors import SaetuiInputError
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.layout import ShardLayout


@dataclass
class ShardInfo:
    """What a shard says about itself (its meta records)."""

    path: Path
    shard: int
    identity: dict[str, Any]
    layout: ShardLayout | None
    progress: dict[str, Any]


@dataclass
class MergeReport:
    """The state of a gathered index."""

    path: Path
    shards: list[int] = field(default_factory=list)
    world: int = 1
    missing: list[int] = field(default_factory=list)
    windows: int = 0
    tokens: int = 0
    copied: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        """One line for the user."""
        if self.complete:
            return (
                f"the index {self.path} is complete: {len(self.shards)} shard(s), "
                f"{self.windows:,} windows, {self.tokens:,} tokens; browse it with: "
                f"saetui open {self.path}"
            )
        missing = ", ".join(str(s) for s in self.missing[:8])
        more = "..." if len(self.missing) > 8 else ""
        return (
            f"the index {self.path} holds shards {self.shards} of {self.world}: shards "
            f"{missing}{more} are still missing; merge the other machines' shard directories "
            "into it too."
        )


def shard_dirs(index: Path) -> list[tuple[int, Path]]:
    """(shard number, directory) of every shard with data in an index directory."""
    if not index.is_dir():
        return []
    out = []
    for path in sorted(index.iterdir()):
        number = path.name[len(fmt.SHARD_PREFIX) :]
        if (
            path.name.startswith(fmt.SHARD_PREFIX)
            and number.isdigit()
            and path.is_dir()
            and (path / "data.mdb").exists()
        ):
            out.append((int(number), path))
    return out


def read_shard(path: Path, shard: int) -> ShardInfo:
    """The identity, layout and progress records of one shard directory."""
    shared = envs.acquire(path, fmt.SHARD_DBS, write=False)
    try:
        with shared.env.begin() as txn:
            shape = txn.get(fmt.META_SHAPE, db=shared.dbs[fmt.DB_META])
            progress = txn.get(fmt.META_PROGRESS, db=shared.dbs[fmt.DB_META])
    finally:
        envs.release(shared)
    if shape is None or progress is None:
        raise SaetuiInputError(
            f"{path} holds no committed data: it is not a finished shard; run the collection "
            "again to finish it."
        )
    stored = json.loads(shape)
    return ShardInfo(
        path,
        shard,
        stored["identity"],
        ShardLayout.from_json(stored.get("layout")),
        json.loads(progress),
    )


def _check_same_run(a: ShardInfo, b: ShardInfo) -> None:
    if a.identity != b.identity:
        differing = sorted(
            key
            for key in set(a.identity) | set(b.identity)
            if a.identity.get(key) != b.identity.get(key)
        )
        raise SaetuiInputError(
            f"{b.path} was collected with a different {', '.join(differing)} than {a.path}: "
            "merge only the shards of one run."
        )
    la, lb = a.layout, b.layout
    if la is None or lb is None or (la.world, la.block) != (lb.world, lb.block):
        raise SaetuiInputError(
            f"{b.path} and {a.path} are not ranks of one distributed run (different numbers of "
            "processes): merge only the shards of one run."
        )


def copy_shard(source: Path, shard: int, dest: Path, *, replace: bool = False) -> Path:
    """Copy finished shard ``shard`` of the index at ``source`` into the index at ``dest``
    (compacted); refuses a shard of another run than those already in ``dest``."""
    source, dest = Path(source), Path(dest)
    src_dir = fmt.shard_dir(source, shard)
    info = read_shard(src_dir, shard)
    if not info.progress.get("finished"):
        raise SaetuiInputError(
            f"shard {shard} in {source} is not finished: run the collection again to finish it, "
            "then merge."
        )
    if info.layout is not None and info.layout.rank != shard:
        raise SaetuiInputError(f"{src_dir} holds rank {info.layout.rank}'s windows, not {shard}'s.")
    for number, path in shard_dirs(dest):
        if number != shard:
            _check_same_run(read_shard(path, number), info)
            break
    target = fmt.shard_dir(dest, shard)
    if (target / "data.mdb").exists():
        if not replace:
            raise SaetuiInputError(
                f"{target} exists already: pass --overwrite to replace it with {src_dir}."
            )
        shutil.rmtree(target)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / fmt.MARKER_FILE).exists():
        fmt.read_marker(dest)
    elif any(p for p in dest.iterdir() if not p.name.startswith(".")):
        raise SaetuiInputError(
            f"{dest} is a non-empty directory that is not a saetui index: pass a new or empty "
            "directory."
        )
    # write into a temporary directory, then rename: a reader never sees half a shard
    partial = dest / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    shared = envs.acquire(src_dir, fmt.SHARD_DBS, write=False)
    try:
        shared.env.copy(str(partial), compact=True)
    except lmdb.Error as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise SaetuiInputError(f"copying {src_dir} to {dest} failed: {error}.") from None
    finally:
        envs.release(shared)
    partial.rename(target)
    fmt.write_marker(dest)
    return target


def merge_indexes(sources: list[Path], dest: Path, *, replace: bool = False) -> MergeReport:
    """Copy every finished shard of the index directories ``sources`` into ``dest``."""
    dest = Path(dest)
    seen: dict[int, Path] = {}
    infos = []
    for source in sources:
        source = Path(source)
        fmt.read_marker(source)
        found = shard_dirs(source)
        if not found:
            raise SaetuiInputError(f"{source} holds no shards: pass the --shard-dir of a rank.")
        for number, path in found:
            if number in seen:
                raise SaetuiInputError(
                    f"shard {number} is in both {seen[number]} and {source}: pass each rank's "
                    "shard once."
                )
            seen[number] = source
            infos.append(read_shard(path, number))
    for info in infos[1:]:
        _check_same_run(infos[0], info)
    copied = []
    for info in infos:
        source = seen[info.shard]
        if Path(source).resolve() == dest.resolve():
            continue
        copy_shard(source, info.shard, dest, replace=replace)
        copied.append(info.shard)
    report = verify_index(dest)
    report.copied = copied
    return report


def verify_index(path: Path) -> MergeReport:
    """Check a gathered index: one run, one layout, and -- once every rank is there --
    window counts that cover the global windows exactly."""
    path = Path(path)
    infos = [read_shard(p, n) for n, p in shard_dirs(path)]
    if not infos:
        raise SaetuiInputError(f"{path} holds no shards.")
    for info in infos[1:]:
        _check_same_run(infos[0], info)
    layout = infos[0].layout
    world = layout.world if layout is not None else 1
    present = [info.shard for info in infos]
    report = MergeReport(
        path,
        shards=present,
        world=world,
        missing=[r for r in range(world) if r not in present],
        windows=sum(int(info.progress["windows"]) for info in infos),
        tokens=sum(int(info.progress["tokens"]) for info in infos),
    )
    if report.complete and layout is not None:
        for info in infos:
            expected = info.layout.owned_below(report.windows)  # type: ignore[union-attr]
            if int(info.progress["windows"]) != expected:
                raise SaetuiInputError(
                    f"shard {info.shard} holds {info.progress['windows']} windows but the other "
                    f"shards make {report.windows} in all, of which rank {info.shard} collects "
                    f"{expected}: its shard comes from another (unfinished or longer) run."
                )
    return report

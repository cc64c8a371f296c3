"""A copy of an index fit to share: no local paths, no timestamps, no stale records.

Every shard is copied with LMDB's compacting copy, its metadata is rewritten (absolute
paths become file names, timestamps 0, the request record with the input files' paths
and mtimes dropped), and it is compacted once more, so the old versions of those records
are not left in free pages of the file. Labels and notes come along unless asked not to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from saetui.errors import SaetuiInputError
from saetui.index import env as envs
from saetui.index import format as fmt

TIME_KEYS = ("updated", "created", "finished", "t")
DROPPED_META = (fmt.USER_META_PREFIX + b"request",)


def share_copy(index_path: str | Path, out: str | Path, *, labels: bool = True) -> Path:
    """Write the shareable copy of ``index_path`` to ``out`` (a new directory)."""
    source, target = Path(index_path), Path(out)
    fmt.read_marker(source)
    if target.exists():
        raise SaetuiInputError(f"{target} exists: give a new directory for the shared copy.")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        shards = sorted(p for p in source.glob(f"{fmt.SHARD_PREFIX}*") if (p / "data.mdb").exists())
        if not shards:
            raise SaetuiInputError(f"the index {source} has no committed data to share yet.")
        for shard in shards:
            _copy_shard(shard, staging / shard.name)
        if labels and (source / fmt.USER_ENV / "data.mdb").exists():
            _compact_copy(source / fmt.USER_ENV, staging / fmt.USER_ENV, fmt.DB_LABELS)
        fmt.write_marker(staging)
        os.replace(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise SaetuiInputError(
            f"cannot write the shared copy {target}: {error.strerror or error}; choose a "
            "writable place with room for it."
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def scrub(value: Any, key: str = "") -> Any:
    """A JSON value without local paths (a path keeps its last part) and timestamps."""
    if isinstance(value, dict):
        return {k: scrub(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if key in TIME_KEYS and isinstance(value, (int, float)):
        return 0
    if isinstance(value, str) and value.startswith(("/", "~")):
        return Path(value).name
    return value


def _copy_shard(shard: Path, target: Path) -> None:
    middle = target.with_name(f"{target.name}.scrub")
    _compact_copy(shard, middle, fmt.DB_META)
    entry = envs.acquire(middle, fmt.SHARD_DBS, write=True)
    try:
        meta = entry.dbs[fmt.DB_META]
        with entry.write_lock, entry.env.begin(write=True) as txn:
            for key, raw in list(txn.cursor(db=meta)):
                if key in DROPPED_META:
                    txn.delete(key, db=meta)
                elif key != fmt.META_VOCAB:  # the only binary (compressed) record
                    txn.put(key, fmt.dumps(scrub(json.loads(raw))), db=meta)
        # the compacting copy leaves the rewritten records' old versions behind
        target.mkdir()
        entry.env.copy(str(target), compact=True)
    finally:
        envs.release(entry)
    shutil.rmtree(middle)


def _compact_copy(source: Path, target: Path, probe_db: bytes) -> None:
    target.mkdir(parents=True)
    entry = envs.acquire(source, (probe_db,), write=False)
    try:
        entry.env.copy(str(target), compact=True)
    finally:
        envs.release(entry)

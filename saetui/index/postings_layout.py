"""Postings layout: constants, LMDB keys, the per-part facts and the build state.

The byte layout is in ``saetui/index/README.md`` (Postings) and in
:mod:`saetui.index.postings_codec` (the ``post`` records)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from saetui.index import env as envs
from saetui.index import format as fmt

POSTINGS_DIR = "postings"
# 2: dense feature pieces also keep a bitmap; 3: long feature pieces are stored in value tiers
VERSION = 3
DB_META = b"meta"
DB_PARTS = b"parts"
DB_POST = b"post"
DB_TEXT = b"text"
DB_DOCS = b"docs"
POSTINGS_DBS = (DB_META, DB_PARTS, DB_POST, DB_TEXT, DB_DOCS)
STATE_KEY = b"state"

KIND_FEATURE = 0
KIND_TOKEN = 1
IDS_PER_RECORD = 1024
TOP_MIN = 2048  # feature pieces with more postings than this are stored in value tiers
TOP_N = 64  # postings in a piece's first (highest) value tier; each next tier is 4x as deep
TIER_GROWTH = 4
BITMAP_DENSITY = 32  # feature pieces firing on >= 1/32 of a part's span keep a bitmap
FRAME_POSTINGS = 4096  # ids of a record share zstd frames of about this many postings
DEFAULT_PART_NNZ = 16_000_000  # ~128 MB of sort keys while a part is transposed
MAX_PART_TOKENS = 1 << 24
HEADER_CACHE = 8192  # parsed record headers a reader keeps
SHARD_SHIFT = fmt.GIDX_BITS  # a position across shards: shard << 40 | global index
ABSENT_TOKEN = 0xFFFFFFFF

POST_KEY = struct.Struct(">HIBI")
PART_KEY = struct.Struct(">HI")


def postings_dir(index_path: str | Path) -> Path:
    return Path(index_path) / POSTINGS_DIR


def post_key(shard: int, part: int, kind: int, record: int) -> bytes:
    return POST_KEY.pack(shard, part, kind, record)


def part_key(shard: int, part: int) -> bytes:
    return PART_KEY.pack(shard, part)


@dataclass(frozen=True)
class PartInfo:
    """A run of whole windows of one shard whose postings were transposed together."""

    shard: int
    part: int
    first_window: int
    end_window: int
    first_gidx: int
    end_gidx: int  # one past the last token's global index
    tokens: int
    counted: int
    nnz: int

    @property
    def first(self) -> int:
        """First position (shard << 40 | global index) the part covers."""
        return (self.shard << SHARD_SHIFT) | self.first_gidx

    @property
    def end(self) -> int:
        return (self.shard << SHARD_SHIFT) | self.end_gidx

    @property
    def span(self) -> int:
        return self.end_gidx - self.first_gidx


def disk_bytes(index_path: str | Path) -> int:
    data = postings_dir(index_path) / "data.mdb"
    return data.stat().st_blocks * 512 if data.exists() else 0


@contextmanager
def write_txn(entry: envs.SharedEnv) -> Iterator[lmdb.Transaction]:
    """A write transaction on the postings environment, under its write lock."""
    with entry.write_lock:
        try:
            with entry.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as exc:
            raise fmt.translate_lmdb_error(exc, entry.path) from None


def read_state(entry: envs.SharedEnv) -> dict[str, Any] | None:
    with entry.env.begin() as txn:
        raw = txn.get(STATE_KEY, db=entry.dbs[DB_META])
    if raw is None:
        return None
    state: dict[str, Any] = json.loads(raw)
    return state

"""Torch-free codecs of the summary records (readers import only this)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from saetui.index import codec
from saetui.index.format import u32_key

if TYPE_CHECKING:
    from saetui.index.summary import SummarySnapshot

SUM_UNIT_LOG2 = 24
SUMSQ_UNIT_LOG2 = 16
FEATURE_CHUNK = 256  # features per `ftopk` / `fsamp` record

TOPK_DTYPE = np.dtype([("key", "<i8"), ("tok", "<i4")])
SAMP_DTYPE = np.dtype([("bin", "u1"), ("gidx", "<i8"), ("bits", "<u2"), ("tok", "<i4")])
TTOK_DTYPE = np.dtype([("feature", "<u4"), ("count", "<u2")])
_COL_HEAD = struct.Struct("<I")


def encode_columns(snap: SummarySnapshot) -> bytes:
    cols = np.stack([snap.count, snap.sum_fx, snap.sumsq_fx, snap.max_bits]).astype("<i8")
    return codec.compress(_COL_HEAD.pack(snap.d_sae) + cols.tobytes())


def decode_columns(blob: bytes) -> np.ndarray:
    """[4, d_sae] int64: count, sum (2**-24 units), sumsq (2**-16 units), max fp16 bits."""
    raw = codec.decompress(blob)
    (d,) = _COL_HEAD.unpack_from(raw)
    if len(raw) != _COL_HEAD.size + 32 * d:
        raise codec.CorruptBlockError("summary columns have the wrong size")
    return np.frombuffer(raw, "<i8", 4 * d, _COL_HEAD.size).reshape(4, d)


def decode_topk(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, TOPK_DTYPE)


def decode_samples(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, SAMP_DTYPE)


def decode_ttok(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, TTOK_DTYPE)


def feature_blob(txn: Any, db: Any, feature: int) -> bytes | None:
    """One feature's bytes from a chunked `ftopk` / `fsamp` sub-db (None: no entries)."""
    rec = txn.get(u32_key(feature // FEATURE_CHUNK), db=db)
    if rec is None:
        return None
    blob = codec.chunk_blob(rec, feature % FEATURE_CHUNK)
    return blob or None


def _feature_blobs(txn: Any, db: Any) -> Iterator[tuple[int, bytes]]:
    for key, rec in txn.cursor(db=db):
        base = struct.unpack(">I", key)[0] * FEATURE_CHUNK
        for j, blob in enumerate(codec.unpack_chunk(rec)):
            if blob:
                yield base + j, blob


_U64 = np.uint64
_GOLD_U = _U64(0x9E3779B97F4A7C15)
_C1_U = _U64(0xFF51AFD7ED558CCD)
_C2_U = _U64(0xC4CEB9FE1A85EC53)


def sample_hash(feature: int, global_index: np.ndarray) -> np.ndarray:
    """summary.sample_hash in numpy (uint64 wrapping arithmetic): the hash that picks a
    feature's interval samples, so a reader can merge the samples of several shards."""
    x = np.asarray(global_index, dtype=np.int64).astype(_U64) * _GOLD_U
    x ^= x >> _U64(33)
    x *= _C1_U
    x ^= x >> _U64(33)
    x ^= np.array([feature], dtype=_U64) * _GOLD_U
    x *= _C2_U
    x ^= x >> _U64(29)
    return (x & _U64((1 << 62) - 1)).astype(np.int64)

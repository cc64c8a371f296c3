"""The on-disk summary records, torch-free: the `SummarySnapshot` a checkpoint holds and
the numpy codecs between it and the `fsum`, `fhist`, `ftopk`, `fsamp` and `ttok` sub-dbs.

`summary.py` (torch accumulators) produces snapshots, the writer stores them with
`summary_record_chunks`, a resuming writer reads them back with `load_snapshot_records`,
and the reader decodes single records; imports go one way: summary -> records.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from saetui.index import codec
from saetui.index.format import HIST_CHUNK, N_HIST_BINS, N_SAMPLE_BINS, dumps, u32_key

SUM_UNIT_LOG2 = 24
SUMSQ_UNIT_LOG2 = 16
FEATURE_CHUNK = 256  # features per `ftopk` / `fsamp` record

TOPK_DTYPE = np.dtype([("key", "<i8"), ("tok", "<i4")])
SAMP_DTYPE = np.dtype([("bin", "u1"), ("gidx", "<i8"), ("bits", "<u2"), ("tok", "<i4")])
TTOK_DTYPE = np.dtype([("feature", "<u4"), ("count", "<u2")])
_COL_HEAD = struct.Struct("<I")


@dataclass
class SummarySnapshot:
    """Summary state on CPU; samp_* are [d_sae, N_SAMPLE_BINS * S] (octave-major)."""

    d_sae: int
    top_k: int
    samples_per_bin: int
    n_counted: int
    n_tokens: int
    next_window: int
    count: np.ndarray
    sum_fx: np.ndarray
    sumsq_fx: np.ndarray
    max_bits: np.ndarray
    hist: np.ndarray
    topk_key: np.ndarray
    topk_tok: np.ndarray
    samp_gidx: np.ndarray
    samp_bits: np.ndarray
    samp_tok: np.ndarray

    def info(self) -> dict[str, Any]:
        return {
            "d_sae": self.d_sae,
            "top_k": self.top_k,
            "samples_per_bin": self.samples_per_bin,
            "n_counted": self.n_counted,
            "n_tokens": self.n_tokens,
            "next_window": self.next_window,
            "sum_unit_log2": SUM_UNIT_LOG2,
            "sumsq_unit_log2": SUMSQ_UNIT_LOG2,
        }


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


def feature_blobs(txn: Any, db: Any) -> Iterator[tuple[int, bytes]]:
    """Every (feature, bytes) of a chunked `ftopk` / `fsamp` sub-db, features ascending."""
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
    hashed: np.ndarray = (x & _U64((1 << 62) - 1)).astype(np.int64)
    return hashed


# --- whole snapshots <-> records ---------------------------------------------------


def _ragged(rows: np.ndarray, counts: np.ndarray, base: int) -> list[tuple[bytes, bytes]]:
    """`FEATURE_CHUNK` features per record: their first counts[i] items of a [n, W] array.

    Many small per-feature records would make each checkpoint's `drop` read every leaf
    page of the old summaries into the map (hundreds of MB of RSS); chunk records live in
    overflow pages, which drop frees without reading.
    """
    buf = rows.tobytes()
    width = rows.shape[1] * rows.dtype.itemsize
    isz = rows.dtype.itemsize
    out = []
    for c in range(0, len(rows), FEATURE_CHUNK):
        blobs = [
            buf[i * width : i * width + int(counts[i]) * isz]
            for i in range(c, min(c + FEATURE_CHUNK, len(rows)))
        ]
        out.append((u32_key((base + c) // FEATURE_CHUNK), codec.pack_chunk(blobs)))
    return out


def summary_record_chunks(
    snap: SummarySnapshot, features_per_chunk: int = 64 * FEATURE_CHUNK
) -> Iterator[tuple[str, list[tuple[bytes, bytes]]]]:
    """(sub-db name, records) pieces, keys ascending per sub-db, ready for append.

    Built a slice of features at a time so a checkpoint needs little memory beyond the
    snapshot itself.
    """
    yield "fsum", [(b"columns", encode_columns(snap)), (b"info", dumps(snap.info()))]
    hist = snap.hist
    yield (
        "fhist",
        [
            (
                u32_key(c),
                codec.compress(hist[c * HIST_CHUNK : (c + 1) * HIST_CHUNK].astype("<i8").tobytes()),
            )
            for c in range((snap.d_sae + HIST_CHUNK - 1) // HIST_CHUNK)
        ],
    )
    s = snap.samples_per_bin
    for a in range(0, snap.d_sae, features_per_chunk):
        b = min(a + features_per_chunk, snap.d_sae)
        keys = snap.topk_key[a:b]
        topk = np.empty(keys.shape, TOPK_DTYPE)
        topk["key"], topk["tok"] = keys, snap.topk_tok[a:b]
        yield "ftopk", _ragged(topk, (keys >= 0).sum(1), a)
    for a in range(0, snap.d_sae, features_per_chunk):
        b = min(a + features_per_chunk, snap.d_sae)
        gidx = snap.samp_gidx[a:b]
        valid = gidx >= 0
        order = np.argsort(~valid, axis=1, kind="stable")
        samp = np.empty(gidx.shape, SAMP_DTYPE)
        samp["bin"] = np.broadcast_to(np.arange(gidx.shape[1]) // s, gidx.shape)
        samp["gidx"], samp["bits"], samp["tok"] = gidx, snap.samp_bits[a:b], snap.samp_tok[a:b]
        samp = np.take_along_axis(samp, order, axis=1)
        yield "fsamp", _ragged(samp, valid.sum(1), a)
    # inverted index token -> features whose top-K examples fire on it
    ok = snap.topk_key >= 0
    feat = np.nonzero(ok)[0].astype(np.int64)
    pairs = (snap.topk_tok[ok].astype(np.int64) << 32) | feat
    uniq, cnt = np.unique(pairs, return_counts=True)
    toks = uniq >> 32
    rec = np.empty(len(uniq), TTOK_DTYPE)
    rec["feature"], rec["count"] = uniq & 0xFFFFFFFF, np.minimum(cnt, 65535)
    bounds = np.flatnonzero(np.diff(toks)) + 1
    starts = np.concatenate([[0], bounds]) if len(uniq) else np.array([], dtype=np.int64)
    ends = np.concatenate([bounds, [len(uniq)]]) if len(uniq) else starts
    buf, isz = rec.tobytes(), TTOK_DTYPE.itemsize
    yield (
        "ttok",
        [
            (u32_key(int(toks[a])), buf[a * isz : b * isz])
            for a, b in zip(starts, ends, strict=True)
        ],
    )


def summary_records(snap: SummarySnapshot) -> dict[str, list[tuple[bytes, bytes]]]:
    """All summary records at once, by sub-db name (tests and small indexes)."""
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, records in summary_record_chunks(snap):
        out.setdefault(name, []).extend(records)
    return out


def load_snapshot_records(txn: Any, dbs: dict[bytes, Any], d_sae: int) -> SummarySnapshot | None:
    """Rebuild a snapshot from the summary sub-dbs; None if no checkpoint was written."""
    info_raw = txn.get(b"info", db=dbs[b"fsum"])
    if info_raw is None:
        return None
    info = json.loads(info_raw)
    k, s = info["top_k"], info["samples_per_bin"]
    cols = decode_columns(txn.get(b"columns", db=dbs[b"fsum"]))
    hist = np.zeros((d_sae, N_HIST_BINS), dtype=np.int64)
    for key, blob in txn.cursor(db=dbs[b"fhist"]):
        c = struct.unpack(">I", key)[0]
        chunk = np.frombuffer(codec.decompress(blob), "<i8").reshape(-1, N_HIST_BINS)
        hist[c * HIST_CHUNK : c * HIST_CHUNK + len(chunk)] = chunk
    topk_key = np.full((d_sae, k), -1, dtype=np.int64)
    topk_tok = np.full((d_sae, k), -1, dtype=np.int64)
    for i, blob in feature_blobs(txn, dbs[b"ftopk"]):
        rec = decode_topk(blob)
        topk_key[i, : len(rec)], topk_tok[i, : len(rec)] = rec["key"], rec["tok"]
    width = N_SAMPLE_BINS * s
    samp_gidx = np.full((d_sae, width), -1, dtype=np.int64)
    samp_bits = np.full((d_sae, width), -1, dtype=np.int64)
    samp_tok = np.full((d_sae, width), -1, dtype=np.int64)
    for i, blob in feature_blobs(txn, dbs[b"fsamp"]):
        rec = decode_samples(blob)
        # entries of one bin were stored in rank order: rebuild their slot within the bin
        run_start = np.ones(len(rec), dtype=bool)
        run_start[1:] = rec["bin"][1:] != rec["bin"][:-1]
        idx = np.arange(len(rec))
        slot = idx - np.maximum.accumulate(np.where(run_start, idx, 0))
        col = rec["bin"].astype(np.int64) * s + slot
        samp_gidx[i, col], samp_bits[i, col], samp_tok[i, col] = (
            rec["gidx"],
            rec["bits"],
            rec["tok"],
        )
    return SummarySnapshot(
        d_sae=d_sae,
        top_k=k,
        samples_per_bin=s,
        n_counted=info["n_counted"],
        n_tokens=info["n_tokens"],
        next_window=info["next_window"],
        count=cols[0].copy(),
        sum_fx=cols[1].copy(),
        sumsq_fx=cols[2].copy(),
        max_bits=cols[3].copy(),
        hist=hist,
        topk_key=topk_key,
        topk_tok=topk_tok,
        samp_gidx=samp_gidx,
        samp_bits=samp_bits,
        samp_tok=samp_tok,
    )

"""Building the postings: the forward index transposed, in its own LMDB environment.

``INDEX/postings/`` holds, for every feature, the sorted global token indices where it
fires with their fp16 values, and for every token id the positions where it occurs. It is
built by a post-pass over the committed forward index (:func:`build_postings`), so the
shard format and the writer stay untouched. The pass reads the shard in window order and
cuts it into *parts* of about ``part_nnz`` nonzeros (whole windows); each part is
transposed in memory (one sort of packed 64-bit keys: bounded memory) and committed in one
write transaction together with the build state. A stop keeps the committed parts and the
next build continues after them; a grown index gets new parts for its new windows; an
index that was replaced (other settings, other first window) or postings of an older
format are rebuilt from scratch.

Layout (keys big-endian; README.md in this directory has the table):

- ``meta/state``: JSON ``{version, identity, shards: {shard: {windows, parts, ...}}}``
- ``parts`` (u16 shard, u32 part): JSON, the part's windows, global indices, counts
- ``post`` (u16 shard, u32 part, u8 kind, u32 record): records of 1024 ids of one kind
  (0 features, 1 token ids), see :mod:`saetui.index.postings_codec`
- ``text`` (u16 shard, u32 part): zstd of the part's token ids (u32; absent positions
  0xFFFFFFFF), counted-mask bits and document ids (i64; -1 outside documents).
- ``docs`` (u64 document id): i64 rows (shard, first global index, length) of the
  document's counted tokens.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.postings_codec import encode_records
from saetui.index.postings_layout import (
    ABSENT_TOKEN,
    DB_DOCS,
    DB_META,
    DB_PARTS,
    DB_POST,
    DB_TEXT,
    DEFAULT_PART_NNZ,
    IDS_PER_RECORD,
    KIND_FEATURE,
    KIND_TOKEN,
    MAX_PART_TOKENS,
    POSTINGS_DBS,
    STATE_KEY,
    TOP_MIN,
    VERSION,
    disk_bytes,
    part_key,
    post_key,
    postings_dir,
    read_state,
    write_txn,
)

TEXT_HEAD = struct.Struct("<QI")
DEFAULT_ON_TOKENS = 100_000_000  # collections smaller than this build postings by default


def postings_by_default(index_path: str | Path) -> bool:
    """Whether a collection that neither asked for postings nor refused them builds them:
    when its index holds under ``DEFAULT_ON_TOKENS`` tokens (about 2 B per nonzero on disk
    and 1/10 of the collection's time or less)."""
    from saetui.index.reader import open_index

    with open_index(index_path) as reader:
        return int(reader.progress().tokens) < DEFAULT_ON_TOKENS


@dataclass(frozen=True)
class BuildProgress:
    windows_done: int
    windows_total: int
    nnz_done: int
    nnz_per_s: float
    message: str = ""


@dataclass(frozen=True)
class BuildReport:
    """What a build did; ``bytes`` is the postings environment's size on disk."""

    windows: int  # windows covered after the build
    new_windows: int  # windows transposed by this build
    nnz: int  # nonzeros covered after the build
    new_nnz: int
    parts: int
    seconds: float
    bytes: int
    rebuilt: bool  # the old postings did not match the index and were dropped

    @property
    def nnz_per_s(self) -> float:
        return self.new_nnz / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_nnz(self) -> float:
        return self.bytes / self.nnz if self.nnz else 0.0


def _identity(reader: Any) -> str:
    meta = reader.meta
    blob = fmt.dumps({"run_config": meta.run_config, "d_sae": meta.d_sae, "ctx_len": meta.ctx_len})
    return hashlib.sha256(blob).hexdigest()[:16]


def _anchor(reader: Any, shard: int) -> str:
    """Fingerprint of the shard's first window: a replaced index does not match it."""
    scan = next(iter(reader.scan_forward(shard, 0, 1, windows_per_chunk=1)))
    return hashlib.sha256(np.ascontiguousarray(scan.token_ids, "<u4").tobytes()).hexdigest()[:16]


def _shard_windows(reader: Any) -> dict[int, int]:
    progress = reader.progress()
    return {
        shard: int(p["windows"]) for shard, p in zip(reader.shard_ids, progress.shards, strict=True)
    }


# ------------------------------------------------------------------ building


def build_postings(
    index_path: str | Path,
    *,
    reader: Any = None,
    part_nnz: int = DEFAULT_PART_NNZ,
    top_min: int = TOP_MIN,
    progress: Callable[[BuildProgress], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> BuildReport:
    """Build, extend or rebuild the postings of the index at ``index_path`` up to its
    committed windows. ``check_stop`` is called between chunks and raises to stop (the
    parts committed so far stay, and the next build continues after them); ``progress``
    gets a :class:`BuildProgress` about every chunk. ``top_min``: pieces with more postings
    keep a top list. ``reader``: an open IndexReader of the
    index to use (e.g. one sharing a writer's environment), else one is opened here."""
    from saetui.index.reader import open_index

    index_path = Path(index_path)
    if part_nnz < 1:
        raise SaetuiInputError(f"part size {part_nnz} must be at least 1 nonzero.")
    own_reader = reader is None
    if own_reader:
        reader = open_index(index_path)
    started = time.perf_counter()
    try:
        folder = postings_dir(index_path)
        folder.mkdir(exist_ok=True)
        lock = envs.WriterLock(folder, index_path)
        try:
            entry = envs.acquire(folder, POSTINGS_DBS, write=True)
            try:
                builder = _Builder(reader, entry, part_nnz, progress, check_stop, started)
                builder.top_min = top_min  # pieces with more postings get value tiers
                return builder.run()
            finally:
                envs.release(entry)
        finally:
            lock.release()
    finally:
        if own_reader:
            reader.close()


class _Builder:
    def __init__(
        self,
        reader: Any,
        entry: envs.SharedEnv,
        part_nnz: int,
        progress: Callable[[BuildProgress], None] | None,
        check_stop: Callable[[], None] | None,
        started: float,
    ) -> None:
        self.reader, self.entry = reader, entry
        self.top_min = TOP_MIN
        self.part_nnz = part_nnz
        self.progress = progress
        self.check_stop = check_stop or (lambda: None)
        self.started = self._mark = started
        meta = reader.meta
        self.ctx = meta.ctx_len
        self.n_features = meta.d_sae
        self.n_tokens = max(len(reader.vocab), 1)
        id_bits = max(self.n_features - 1, self.n_tokens - 1, 1).bit_length()
        self.pos_bits = 48 - id_bits
        if self.pos_bits < 20:
            raise SaetuiInputError(
                f"postings support up to 2^28 features or token ids; this index has "
                f"{self.n_features} features and {self.n_tokens} token ids: query it without "
                "postings."
            )
        self.max_part_tokens = min(MAX_PART_TOKENS, 1 << self.pos_bits)

    def _write(self) -> Any:
        return write_txn(self.entry)

    def run(self) -> BuildReport:
        reader = self.reader
        committed = _shard_windows(reader)
        identity = _identity(reader)
        anchors = {s: _anchor(reader, s) for s, n in committed.items() if n > 0}
        state = read_state(self.entry)
        rebuilt = False
        stale = state is not None and (
            state.get("version") != VERSION
            or state.get("identity") != identity
            or any(
                info.get("anchor") not in (None, anchors.get(int(s)))
                or info.get("windows", 0) > committed.get(int(s), 0)
                for s, info in state.get("shards", {}).items()
            )
        )
        if state is None or stale:
            rebuilt = stale
            state = {
                "version": VERSION,
                "identity": identity,
                "ctx_len": self.ctx,
                "d_sae": self.n_features,
                "vocab_size": self.n_tokens,
                "ids_per_record": IDS_PER_RECORD,
                "serial": 0,
                "created": time.time(),
                "build_seconds": 0.0,
                "shards": {},
            }
            with self._write() as txn:
                for name in POSTINGS_DBS:
                    txn.drop(self.entry.dbs[name], delete=False)
                txn.put(STATE_KEY, fmt.dumps(state), db=self.entry.dbs[DB_META])
        self.state = state
        total = sum(committed.values())
        done = sum(int(info.get("windows", 0)) for info in state["shards"].values())
        self.windows_total, self.windows_done = total, done
        before_windows, before_nnz = done, self._nnz()
        self.new_nnz = 0
        for shard, n_windows in committed.items():
            info = state["shards"].setdefault(
                str(shard), {"windows": 0, "parts": 0, "nnz": 0, "tokens": 0, "counted": 0}
            )
            if n_windows > 0:
                info["anchor"] = anchors[shard]
            if info["windows"] < n_windows:
                self._shard(shard, info, n_windows)
        seconds = time.perf_counter() - self.started
        return BuildReport(
            windows=self.windows_done,
            new_windows=self.windows_done - before_windows,
            nnz=self._nnz(),
            new_nnz=self._nnz() - before_nnz,
            parts=sum(int(i["parts"]) for i in state["shards"].values()),
            seconds=seconds,
            bytes=disk_bytes(self.reader.path),
            rebuilt=rebuilt,
        )

    def _nnz(self) -> int:
        return sum(int(info.get("nnz", 0)) for info in self.state["shards"].values())

    def _shard(self, shard: int, info: dict[str, Any], n_windows: int) -> None:
        buffer: list[Any] = []
        nnz = tokens = 0
        per_chunk = 8
        first = int(info["windows"])
        for scan in self.reader.scan_forward(shard, first, n_windows, windows_per_chunk=per_chunk):
            self.check_stop()
            scan_nnz = int(scan.offsets[-1])
            if buffer and (
                nnz + scan_nnz > self.part_nnz * 1.25
                or tokens + len(scan.global_index) > self.max_part_tokens
            ):
                self._flush(shard, info, buffer, nnz)
                buffer, nnz, tokens = [], 0, 0
            buffer.append(scan)
            nnz += scan_nnz
            tokens += len(scan.global_index)
            if nnz >= self.part_nnz:
                self._flush(shard, info, buffer, nnz)
                buffer, nnz, tokens = [], 0, 0
            # about four chunks per part: memory stays near part_nnz
            windows = scan.end_window - scan.first_window
            per_window = max(scan_nnz / max(windows, 1), 1.0)
            per_chunk = int(min(256, max(1, self.part_nnz / per_window / 4)))
            self._report(nnz)
        if buffer:
            self._flush(shard, info, buffer, nnz)
            self._report(0)

    def _report(self, pending_nnz: int) -> None:
        if self.progress is None:
            return
        seconds = max(time.perf_counter() - self.started, 1e-9)
        done = self.new_nnz + pending_nnz
        self.progress(BuildProgress(self.windows_done, self.windows_total, done, done / seconds))

    def _flush(self, shard: int, info: dict[str, Any], scans: list[Any], nnz: int) -> None:
        self.check_stop()
        gidx = np.concatenate([s.global_index for s in scans])
        first_g = int(gidx[0])
        local = gidx - first_g
        span = int(local[-1]) + 1
        counted = np.concatenate([s.counted for s in scans])
        token_ids = np.concatenate([s.token_ids for s in scans]).astype(np.uint32)
        doc_ids = np.concatenate([s.doc_ids for s in scans])
        counts = np.concatenate([np.diff(s.offsets) for s in scans])
        feature_ids = np.concatenate([s.feature_ids for s in scans]).astype(np.uint64)
        bits = np.concatenate([s.values16 for s in scans]).view(np.uint16).astype(np.uint64)
        shift = np.uint64(self.pos_bits + 16)
        keys = feature_ids << shift
        keys |= np.repeat(local.astype(np.uint64), counts) << np.uint64(16)
        keys |= bits
        del feature_ids, bits
        keys.sort()
        records = encode_records(
            keys,
            self.pos_bits,
            self.n_features,
            with_values=True,
            top_min=self.top_min,
            span=span,
        )
        del keys
        where = np.flatnonzero(counted)
        tkeys = (token_ids[where].astype(np.uint64) << shift) | (
            local[where].astype(np.uint64) << np.uint64(16)
        )
        tkeys.sort()
        token_records = encode_records(
            tkeys, self.pos_bits, self.n_tokens, with_values=False, top_min=self.top_min
        )
        full_tokens = np.full(span, ABSENT_TOKEN, np.uint32)
        full_tokens[local] = token_ids
        full_counted = np.zeros(span, bool)
        full_counted[local] = counted
        full_docs = np.full(span, -1, np.int64)
        full_docs[local] = doc_ids
        text = codec.compress(
            b"".join(
                (
                    TEXT_HEAD.pack(first_g, span),
                    full_tokens.astype("<u4").tobytes(),
                    np.packbits(full_counted).tobytes(),
                    full_docs.astype("<i8").tobytes(),
                )
            )
        )
        docs = _doc_rows(shard, gidx[where], doc_ids[where])
        part = int(info["parts"])
        windows = (int(scans[0].first_window), int(scans[-1].end_window))
        record = {
            "first_window": windows[0],
            "end_window": windows[1],
            "first_gidx": first_g,
            "end_gidx": first_g + span,
            "tokens": len(gidx),
            "counted": len(where),
            "nnz": nnz,
        }
        new_info = dict(info)
        new_info.update(
            windows=windows[1],
            parts=part + 1,
            nnz=int(info["nnz"]) + nnz,
            tokens=int(info["tokens"]) + len(gidx),
            counted=int(info["counted"]) + len(where),
        )
        state = dict(self.state)
        state["shards"] = {**self.state["shards"], str(shard): new_info}
        state["serial"] = int(self.state["serial"]) + 1
        now = time.perf_counter()
        state["build_seconds"] = float(self.state.get("build_seconds", 0.0)) + now - self._mark
        self._mark = now
        state["updated"] = time.time()
        dbs = self.entry.dbs
        with self._write() as txn:
            for kind, recs in ((KIND_FEATURE, records), (KIND_TOKEN, token_records)):
                for rec_id, blob in recs:
                    txn.put(post_key(shard, part, kind, rec_id), blob, db=dbs[DB_POST])
            txn.put(part_key(shard, part), fmt.dumps(record), db=dbs[DB_PARTS])
            txn.put(part_key(shard, part), text, db=dbs[DB_TEXT])
            for doc, rows in docs:
                key = fmt.u64_key(doc)
                old = txn.get(key, db=dbs[DB_DOCS])
                txn.put(key, (old or b"") + rows, db=dbs[DB_DOCS])
            txn.put(STATE_KEY, fmt.dumps(state), db=dbs[DB_META])
        info.update(new_info)
        self.state = state
        self.state["shards"][str(shard)] = info
        self.windows_done += windows[1] - windows[0]
        self.new_nnz += nnz


def _doc_rows(shard: int, gidx: np.ndarray, docs: np.ndarray) -> list[tuple[int, bytes]]:
    """Per document: i64 rows (shard, first global index, length) of its counted tokens."""
    keep = docs >= 0
    gidx, docs = gidx[keep], docs[keep]
    if not len(gidx):
        return []
    breaks = np.flatnonzero((np.diff(docs) != 0) | (np.diff(gidx) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(gidx)]]))
    rows = np.stack([np.full(len(starts), shard), gidx[starts], lengths], axis=1).astype("<i8")
    run_docs = docs[starts]
    order = np.argsort(run_docs, kind="stable")
    out: list[tuple[int, bytes]] = []
    sorted_docs = run_docs[order]
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_docs)) + 1, [len(order)]])
    for i in range(len(cuts) - 1):
        sel = order[cuts[i] : cuts[i + 1]]
        out.append((int(sorted_docs[cuts[i]]), rows[sel].tobytes()))
    return out

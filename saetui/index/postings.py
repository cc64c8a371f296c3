"""Per-feature postings: the forward index transposed, in its own LMDB environment.

``INDEX/postings/`` holds, for every feature, the sorted global token indices where it
fires with their fp16 values, and for every token id the positions where it occurs. It is
built by a post-pass over the committed forward index (:func:`build_postings`), so the
shard format and the writer stay untouched. The pass reads the shard in window order and
cuts it into *parts* of about ``part_nnz`` nonzeros (whole windows); each part is
transposed in memory (one sort of packed 64-bit keys: bounded memory) and committed in one
write transaction together with the build state. A stop keeps the committed parts and the
next build continues after them; a grown index gets new parts for its new windows; an
index that was replaced (other settings, other first window) is rebuilt from scratch.

Layout (keys big-endian; README.md in this directory has the table):

- ``meta/state``: JSON ``{version, identity, shards: {shard: {windows, parts, ...}}}``
- ``parts`` (u16 shard, u32 part): JSON, the part's windows, global indices, counts
- ``post`` (u16 shard, u32 part, u8 kind, u32 record): the postings of ids
  ``[record * IDS_PER_RECORD, ...)`` of one kind (0 features, 1 token ids) in that part:
  a header (``u32 count[n] | u16 max_bits[n]``, frame, top-list and bitmap tables), then
  the frames, top lists and bitmaps. A frame holds the pieces of consecutive ids: one byte
  (0 raw, 1 zstd), then position deltas as u32 in 4 byte planes (first delta from the
  part's first global index) and, for features, fp16 values in 2 byte planes. Pieces with more than
  ``TOP_MIN`` postings also keep their ``TOP_N`` largest values as i64 keys
  ``fp16 bits << 40 | (2^40 - 1 - global index)``, descending, so the first pages of a
  feature by value need no full decode; those firing on at least 1/``BITMAP_DENSITY`` of
  the part's span also keep a bitmap of it (one zstd frame), so co-firing counts of
  frequent features are ANDs.
- ``text`` (u16 shard, u32 part): zstd of the part's token ids (u32; absent positions
  0xFFFFFFFF), counted-mask bits and document ids (i64; -1 outside documents).
- ``docs`` (u64 document id): i64 rows (shard, first global index, length) of the
  document's counted tokens.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from saetui.errors import IndexDamagedError, SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt

POSTINGS_DIR = "postings"
VERSION = 2  # 2: dense feature pieces also keep a bitmap
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
TOP_MIN = 2048  # pieces with more postings than this keep a top list
TOP_N = 64
BITMAP_DENSITY = 32  # feature pieces firing on >= 1/32 of a part's span keep a bitmap
FRAME_POSTINGS = 4096  # ids of a record share zstd frames of about this many postings
DEFAULT_PART_NNZ = 16_000_000  # ~128 MB of sort keys while a part is transposed
MAX_PART_TOKENS = 1 << 24
HEADER_CACHE = 8192  # parsed record headers a reader keeps
SHARD_SHIFT = fmt.GIDX_BITS  # a position across shards: shard << 40 | global index
ABSENT_TOKEN = 0xFFFFFFFF

_POST_KEY = struct.Struct(">HIBI")
_PART_KEY = struct.Struct(">HI")
_U32 = struct.Struct("<I")
# n ids, n frames, n top lists, n bitmaps, header zstd?, header bytes
_REC_HEAD = struct.Struct("<IIIIBI")
_TEXT_HEAD = struct.Struct("<QI")


def postings_dir(index_path: str | Path) -> Path:
    return Path(index_path) / POSTINGS_DIR


def post_key(shard: int, part: int, kind: int, record: int) -> bytes:
    return _POST_KEY.pack(shard, part, kind, record)


def part_key(shard: int, part: int) -> bytes:
    return _PART_KEY.pack(shard, part)


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


def disk_bytes(index_path: str | Path) -> int:
    data = postings_dir(index_path) / "data.mdb"
    return data.stat().st_blocks * 512 if data.exists() else 0


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
                builder.top_min = top_min
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
        return _write_txn(self.entry)

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
        records = _records(
            keys,
            self.pos_bits,
            first_g,
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
        token_records = _records(
            tkeys, self.pos_bits, first_g, self.n_tokens, with_values=False, top_min=self.top_min
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
                    _TEXT_HEAD.pack(first_g, span),
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


def _records(
    keys: np.ndarray,
    pos_bits: int,
    first_g: int,
    n_ids: int,
    *,
    with_values: bool,
    top_min: int = TOP_MIN,
    span: int = 0,
) -> list[tuple[int, bytes]]:
    """The ``post`` records of one part and kind from its sorted packed keys
    (id << pos_bits + 16 | local position << 16 | fp16 bits)."""
    if not len(keys):
        return []
    ids = (keys >> np.uint64(pos_bits + 16)).astype(np.int64)
    pos = ((keys >> np.uint64(16)) & np.uint64((1 << pos_bits) - 1)).astype(np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1])
    ends = np.concatenate([starts[1:], [len(keys)]])
    deltas = np.empty(len(pos), np.int64)
    deltas[0] = pos[0]
    deltas[1:] = pos[1:] - pos[:-1]
    deltas[starts] = pos[starts]
    n_planes = 6 if with_values else 4
    planes = np.empty((n_planes, len(keys)), np.uint8)
    planes[:4] = deltas.astype("<u4").view(np.uint8).reshape(-1, 4).T
    bits = None
    if with_values:
        bits = (keys & np.uint64(0xFFFF)).astype(np.int64)
        planes[4:] = bits.astype("<u2").view(np.uint8).reshape(-1, 2).T
        max_bits = np.maximum.reduceat(bits, starts)
    else:
        max_bits = np.zeros(len(starts), np.int64)
    group_ids = ids[starts]
    out: list[tuple[int, bytes]] = []
    record_of = group_ids // IDS_PER_RECORD
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(record_of)) + 1, [len(starts)]])
    for r in range(len(bounds) - 1):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        rec_id = int(record_of[lo])
        base_id = rec_id * IDS_PER_RECORD
        n = min(IDS_PER_RECORD, n_ids - base_id)
        count = np.zeros(n, "<u4")
        maxb = np.zeros(n, "<u2")
        slots = group_ids[lo:hi] - base_id
        count[slots] = ends[lo:hi] - starts[lo:hi]
        maxb[slots] = max_bits[lo:hi]
        # frames: runs of consecutive ids with about FRAME_POSTINGS postings share one zstd
        # frame (small pieces alone would each pay for a frame and its entropy tables)
        frame_first: list[int] = [0]
        frames: list[bytes] = []
        first_group, pending = lo, 0
        for g in range(lo, hi):
            pending += int(ends[g] - starts[g])
            if pending >= FRAME_POSTINGS or g == hi - 1:
                a, b = int(starts[first_group]), int(ends[g])
                frames.append(_frame(planes[:, a:b].tobytes()))
                frame_first.append(int(group_ids[g]) - base_id + 1)
                first_group, pending = g + 1, 0
        frame_first[-1] = n
        top_slots: list[int] = []
        tops: list[bytes] = []
        if bits is not None:
            for g in np.flatnonzero(ends[lo:hi] - starts[lo:hi] > max(top_min, TOP_N)) + lo:
                a, b = int(starts[g]), int(ends[g])
                gidx = first_g + pos[a:b]
                top = (bits[a:b] << fmt.GIDX_BITS) | (fmt.GIDX_MASK - gidx)
                top = np.partition(top, b - a - TOP_N)[b - a - TOP_N :]
                top_slots.append(int(group_ids[g]) - base_id)
                tops.append(np.sort(top)[::-1].astype("<i8").tobytes())
        # dense pieces: a bitmap over the part's span too, so co-firing counts are ANDs
        bitmap_slots: list[int] = []
        bitmaps: list[bytes] = []
        if bits is not None and span > 0:
            dense = (ends[lo:hi] - starts[lo:hi]) * BITMAP_DENSITY >= span
            dense &= ends[lo:hi] - starts[lo:hi] > max(top_min, TOP_N)
            for g in np.flatnonzero(dense) + lo:
                a, b = int(starts[g]), int(ends[g])
                mask = np.zeros(span, bool)
                mask[pos[a:b]] = True
                bitmap_slots.append(int(group_ids[g]) - base_id)
                bitmaps.append(_frame(np.packbits(mask).tobytes()))
        bitmap_off = np.zeros(len(bitmaps) + 1, "<u4")
        np.cumsum([len(m) for m in bitmaps], out=bitmap_off[1:])
        frame_off = np.zeros(len(frames) + 1, "<u4")
        np.cumsum([len(f) for f in frames], out=frame_off[1:])
        top_off = np.zeros(len(tops) + 1, "<u4")
        np.cumsum([len(t) // 8 for t in tops], out=top_off[1:])
        header = b"".join(
            (
                count.tobytes(),
                maxb.tobytes(),
                np.asarray(frame_first, "<u4").tobytes(),
                frame_off.tobytes(),
                np.asarray(top_slots, "<u4").tobytes(),
                top_off.tobytes(),
                np.asarray(bitmap_slots, "<u4").tobytes(),
                bitmap_off.tobytes(),
            )
        )
        packed = codec.compress(header)
        flag = 1 if len(packed) < len(header) else 0
        header = packed if flag else header
        out.append(
            (
                rec_id,
                b"".join(
                    (
                        _REC_HEAD.pack(n, len(frames), len(tops), len(bitmaps), flag, len(header)),
                        header,
                        *frames,
                        *tops,
                        *bitmaps,
                    )
                ),
            )
        )
    return out


def _frame(raw: bytes) -> bytes:
    packed = codec.compress(raw) if len(raw) > 32 else raw
    return b"\x01" + packed if len(packed) < len(raw) else b"\x00" + raw


@dataclass(frozen=True)
class _Record:
    """The decoded header of one ``post`` record (cached by the reader)."""

    count: np.ndarray  # int64 [n]
    max_bits: np.ndarray  # uint16 [n]
    frame_first: np.ndarray  # int64 [n_frames + 1]: first slot of each frame
    frame_off: np.ndarray  # int64 [n_frames + 1]: byte offsets in the frame area
    top_slots: dict[int, tuple[int, int]]  # slot -> (first, end) entry in the top area
    frames_at: int  # byte offset of the frame area in the record
    tops_at: int
    n_planes: int
    bitmap_slots: dict[int, tuple[int, int]]  # slot -> byte range of its bitmap frame


def _parse_record(rec: memoryview | bytes, n_planes: int) -> _Record:
    try:
        n, n_frames, n_tops, n_bitmaps, flag, size = _REC_HEAD.unpack_from(rec, 0)
        head = bytes(rec[_REC_HEAD.size : _REC_HEAD.size + size])
        raw = codec.decompress(head) if flag else head
        off = 0
        count = np.frombuffer(raw, "<u4", n, off).astype(np.int64)
        off += 4 * n
        max_bits = np.frombuffer(raw, "<u2", n, off)
        off += 2 * n
        frame_first = np.frombuffer(raw, "<u4", n_frames + 1, off).astype(np.int64)
        off += 4 * (n_frames + 1)
        frame_off = np.frombuffer(raw, "<u4", n_frames + 1, off).astype(np.int64)
        off += 4 * (n_frames + 1)
        slots = np.frombuffer(raw, "<u4", n_tops, off).tolist()
        off += 4 * n_tops
        top_off = np.frombuffer(raw, "<u4", n_tops + 1, off).tolist()
        off += 4 * (n_tops + 1)
        bitmap_slots = np.frombuffer(raw, "<u4", n_bitmaps, off).tolist()
        off += 4 * n_bitmaps
        bitmap_off = np.frombuffer(raw, "<u4", n_bitmaps + 1, off).tolist()
    except Exception as exc:  # zstd, struct or size errors
        raise codec.CorruptBlockError(f"postings record: {exc}") from None
    frames_at = _REC_HEAD.size + size
    tops_at = frames_at + int(frame_off[-1])
    bitmaps_at = tops_at + 8 * int(top_off[-1])
    return _Record(
        count=count,
        max_bits=max_bits,
        frame_first=frame_first,
        frame_off=frame_off,
        top_slots={s: (top_off[i], top_off[i + 1]) for i, s in enumerate(slots)},
        frames_at=frames_at,
        tops_at=tops_at,
        n_planes=n_planes,
        bitmap_slots={
            slot: (bitmaps_at + bitmap_off[i], bitmaps_at + bitmap_off[i + 1])
            for i, slot in enumerate(bitmap_slots)
        },
    )


def _decode(
    rec: memoryview | bytes, head: _Record, slot: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Local positions (int64, relative to the part's first global index) and, for
    features, fp16 values of the id in ``slot``."""
    frame = int(np.searchsorted(head.frame_first, slot, side="right")) - 1
    first_slot = int(head.frame_first[frame])
    column = int(head.count[first_slot:slot].sum())
    width = int(head.count[first_slot : int(head.frame_first[frame + 1])].sum())
    count = int(head.count[slot])
    a = head.frames_at + int(head.frame_off[frame])
    b = head.frames_at + int(head.frame_off[frame + 1])
    blob = rec[a:b]
    try:
        raw = codec.decompress(blob[1:]) if blob[0] == 1 else bytes(blob[1:])
        planes = np.frombuffer(raw, np.uint8).reshape(head.n_planes, width)
    except Exception as exc:  # zstd or size mismatch
        raise codec.CorruptBlockError(f"postings frame: {exc}") from None
    # gather the four byte planes into little-endian u32 deltas (one strided copy)
    raw4 = np.empty((count, 4), np.uint8)
    raw4[:] = planes[:4, column : column + count].T
    deltas = raw4.view("<u4").ravel()
    pos = np.cumsum(deltas, dtype=np.uint32).astype(np.int64)  # local positions < 2^32
    if head.n_planes == 4:
        return pos, None
    raw2 = np.empty((count, 2), np.uint8)
    raw2[:] = planes[4:6, column : column + count].T
    return pos, raw2.view("<f2").ravel()


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


@contextmanager
def _write_txn(entry: envs.SharedEnv) -> Iterator[lmdb.Transaction]:
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
    return None if raw is None else json.loads(raw)


# ------------------------------------------------------------------ reading


class Postings:
    """Read access to an index's postings (thread-safe: one read transaction per call).

    Open with :func:`open_postings`; ``None`` fields mean the postings do not exist yet.
    Positions are ``shard << 40 | global index`` (int64), sorted."""

    def __init__(self, index_path: str | Path, entry: envs.SharedEnv) -> None:
        self.index_path = Path(index_path)
        self.entry = entry
        self._lock = threading.Lock()
        self._parts: tuple[tuple[float, int], list[PartInfo]] | None = None
        self._serial_of_parts: tuple[float, int] = (0.0, -1)
        self._headers: OrderedDict[tuple[float, bytes], _Record] = OrderedDict()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        envs.release(self.entry)

    def __enter__(self) -> Postings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        if self._closed:
            raise SaetuiInputError(f"the postings of {self.index_path} are closed.")
        try:
            with self.entry.env.begin(buffers=True) as txn:
                yield txn
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
            raise IndexDamagedError(
                f"the postings of the index {self.index_path} are damaged "
                f"({type(exc).__name__}): delete {postings_dir(self.index_path)} and build "
                "them again with `saetui postings`."
            ) from None

    def state(self) -> dict[str, Any] | None:
        with self._read() as txn:
            raw = txn.get(STATE_KEY, db=self.entry.dbs[DB_META])
            return None if raw is None else json.loads(bytes(raw))

    def parts(self) -> list[PartInfo]:
        """Every committed part, in (shard, part) order (cached per build serial)."""
        state = self.state()
        serial = (0.0, -1) if state is None else (state.get("created", 0.0), int(state["serial"]))
        with self._lock:
            if self._parts is not None and self._parts[0] == serial:
                return self._parts[1]
        out = []
        with self._read() as txn:
            for key, value in txn.cursor(db=self.entry.dbs[DB_PARTS]):
                shard, part = _PART_KEY.unpack(bytes(key))
                info = json.loads(bytes(value))
                out.append(PartInfo(shard=shard, part=part, **info))
        with self._lock:
            self._parts = (serial, out)
            self._serial_of_parts = serial
        return out

    # -------------------------------------------------------------- per id

    def _record(
        self, txn: lmdb.Transaction, kind: int, ident: int, part: PartInfo
    ) -> tuple[memoryview | None, _Record | None, int]:
        """(record buffer, parsed header, slot) of one id in one part; None when absent."""
        rec_id, slot = divmod(ident, IDS_PER_RECORD)
        key = post_key(part.shard, part.part, kind, rec_id)
        rec = txn.get(key, db=self.entry.dbs[DB_POST])
        if rec is None:
            return None, None, slot
        cache_key = (self._serial_of_parts[0], key)  # records never change within a build
        with self._lock:
            head = self._headers.get(cache_key)
            if head is not None:
                self._headers.move_to_end(cache_key)
        if head is None:
            head = _parse_record(rec, 6 if kind == KIND_FEATURE else 4)
            with self._lock:
                self._headers[cache_key] = head
                while len(self._headers) > HEADER_CACHE:
                    self._headers.popitem(last=False)
        if slot >= len(head.count):
            return None, None, slot
        return rec, head, slot

    def counts(self, kind: int, ident: int) -> int:
        """How many positions the id has (a feature's firings, a token's occurrences)."""
        total = 0
        parts = self.parts()
        with self._read() as txn:
            for part in parts:
                _, head, slot = self._record(txn, kind, ident, part)
                if head is not None:
                    total += int(head.count[slot])
        return total

    def max_value(self, feature: int) -> float:
        """The feature's largest activation."""
        best = 0
        parts = self.parts()
        with self._read() as txn:
            for part in parts:
                _, head, slot = self._record(txn, KIND_FEATURE, feature, part)
                if head is not None:
                    best = max(best, int(head.max_bits[slot]))
        return float(np.uint16(best).view(np.float16))

    def read(
        self,
        kind: int,
        ident: int,
        *,
        limit: int | None = None,
        parts: list[PartInfo] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Sorted positions of one id (and fp16 values for features), over ``parts``
        (default all); with ``limit``, the first ``limit`` positions (at least) only."""
        pos_out: list[np.ndarray] = []
        val_out: list[np.ndarray] = []
        got = 0
        parts = self.parts() if parts is None else parts
        with self._read() as txn:
            for part in parts:
                rec, head, slot = self._record(txn, kind, ident, part)
                if head is None or not head.count[slot]:
                    continue
                pos, vals = _decode(rec, head, slot)
                pos_out.append(pos + part.first)
                if vals is not None:
                    val_out.append(vals)
                got += len(pos)
                if limit is not None and got >= limit:
                    break
        positions = np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64)
        if kind != KIND_FEATURE:
            return positions, None
        values = np.concatenate(val_out) if val_out else np.zeros(0, np.float16)
        return positions, values

    def top(self, feature: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The feature's ``n`` largest values (ties: earliest position) and their positions,
        from the parts' top lists; None when ``n`` is deeper than the top lists reach."""
        if n > TOP_N:
            return None
        bits_out: list[np.ndarray] = []
        pos_out: list[np.ndarray] = []
        parts = self.parts()
        with self._read() as txn:
            for part in parts:
                rec, head, slot = self._record(txn, KIND_FEATURE, feature, part)
                if head is None or not head.count[slot]:
                    continue
                top = head.top_slots.get(slot)
                if top is not None:  # no need to decode the piece
                    gk = np.frombuffer(rec, "<i8", top[1] - top[0], head.tops_at + 8 * top[0])
                    gidx = fmt.GIDX_MASK - (gk & fmt.GIDX_MASK)
                    bits = gk >> fmt.GIDX_BITS
                else:
                    pos, vals = _decode(rec, head, slot)
                    gidx = pos + part.first_gidx
                    bits = vals.view(np.uint16).astype(np.int64)
                bits_out.append(bits)
                pos_out.append((np.int64(part.shard) << SHARD_SHIFT) | gidx)
        if not bits_out:
            return np.zeros(0, np.float16), np.zeros(0, np.int64)
        bits = np.concatenate(bits_out)
        positions = np.concatenate(pos_out)
        order = np.lexsort((positions, -bits))[:n]
        return bits[order].astype(np.uint16).view(np.float16), positions[order]

    def bits(self, feature: int, part: PartInfo) -> np.ndarray:
        """Where the feature fires in one part: bool over the part's span (positions
        ``part.first + i``), from its bitmap when dense, else from its postings."""
        span = part.end_gidx - part.first_gidx
        with self._read() as txn:
            rec, head, slot = self._record(txn, KIND_FEATURE, feature, part)
            if head is None or not head.count[slot]:
                return np.zeros(span, bool)
            where = head.bitmap_slots.get(slot)
            if where is not None:
                blob = rec[where[0] : where[1]]
                try:
                    raw = codec.decompress(blob[1:]) if blob[0] == 1 else bytes(blob[1:])
                except Exception as exc:  # zstd
                    raise codec.CorruptBlockError(f"postings bitmap: {exc}") from None
                return np.unpackbits(np.frombuffer(raw, np.uint8), count=span).view(bool)
            pos, _ = _decode(rec, head, slot)
        mask = np.zeros(span, bool)
        mask[pos] = True
        return mask

    def part_top(self, feature: int, part: PartInfo) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(fp16 bits desc, positions, complete) of the feature's best postings in one part:
        its top list (``complete`` False: more postings lie below it) or, for a short piece,
        all of them; None when it does not fire there."""
        with self._read() as txn:
            rec, head, slot = self._record(txn, KIND_FEATURE, feature, part)
            if head is None or not head.count[slot]:
                return None
            top = head.top_slots.get(slot)
            if top is not None:
                gk = np.frombuffer(rec, "<i8", top[1] - top[0], head.tops_at + 8 * top[0])
                gidx = fmt.GIDX_MASK - (gk & fmt.GIDX_MASK)
                bits, complete = gk >> fmt.GIDX_BITS, False
            else:
                pos, vals = _decode(rec, head, slot)
                gidx = pos + part.first_gidx
                bits, complete = vals.view(np.uint16).astype(np.int64), True
        positions = (np.int64(part.shard) << SHARD_SHIFT) | gidx
        order = np.lexsort((positions, -bits))
        return bits[order], positions[order], complete

    # -------------------------------------------------------------- text and documents

    def text(self, part: PartInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids u32, counted bool, document ids i64) of every position of a part."""
        with self._read() as txn:
            blob = txn.get(part_key(part.shard, part.part), db=self.entry.dbs[DB_TEXT])
            if blob is None:
                raise IndexDamagedError(
                    f"the postings of {self.index_path} lack the text of part {part.part}: "
                    f"delete {postings_dir(self.index_path)} and build them again."
                )
            raw = codec.decompress(blob)
        first_g, span = _TEXT_HEAD.unpack_from(raw)
        off = _TEXT_HEAD.size
        tokens = np.frombuffer(raw, "<u4", span, off)
        off += 4 * span
        counted = np.unpackbits(np.frombuffer(raw, np.uint8, (span + 7) // 8, off))[:span]
        off += (span + 7) // 8
        docs = np.frombuffer(raw, "<i8", span, off)
        return tokens, counted.astype(bool), docs

    def document(self, doc: int) -> np.ndarray:
        """i64 rows (shard, first global index, length) of a document's counted tokens."""
        if doc < 0:
            return np.zeros((0, 3), np.int64)
        with self._read() as txn:
            raw = txn.get(fmt.u64_key(doc), db=self.entry.dbs[DB_DOCS])
            data = b"" if raw is None else bytes(raw)
        return np.frombuffer(data, "<i8").reshape(-1, 3)


def open_postings(index_path: str | Path, *, write: bool | None = None) -> Postings | None:
    """The postings of the index at ``index_path``, or None when none were built.
    ``write`` (default: when the directory allows): open the environment writable, so a
    build can run in this process later (one process cannot reopen it writable)."""
    folder = postings_dir(index_path)
    if not (folder / "data.mdb").exists():
        return None
    if write is None:
        write = envs.directory_writable(folder)
    try:
        entry = envs.acquire(folder, POSTINGS_DBS, write=write)
    except lmdb.NotFoundError:
        return None
    return Postings(index_path, entry)

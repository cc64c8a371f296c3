"""Per-feature postings: read access (:class:`Postings`) and the names of the postings API.

The postings are built by :mod:`saetui.index.postings_build` (a resumable post-pass over
the forward index), their records coded by :mod:`saetui.index.postings_codec`, their keys
and constants in :mod:`saetui.index.postings_layout`; everything public is importable from
here. Positions are ``shard << 40 | global index`` (int64), sorted.
"""

from __future__ import annotations

import heapq
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from saetui.errors import IndexDamagedError, SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.postings_build import (
    DEFAULT_ON_TOKENS,
    TEXT_HEAD,
    BuildProgress,
    BuildReport,
    build_postings,
    postings_by_default,
)
from saetui.index.postings_codec import (
    Record,
    decode,
    decode_bitmap,
    decode_tier,
    parse_record,
)
from saetui.index.postings_layout import (
    ABSENT_TOKEN,
    BITMAP_DENSITY,
    DB_DOCS,
    DB_META,
    DB_PARTS,
    DB_POST,
    DB_TEXT,
    DEFAULT_PART_NNZ,
    HEADER_CACHE,
    IDS_PER_RECORD,
    KIND_FEATURE,
    KIND_TOKEN,
    PART_KEY,
    POSTINGS_DBS,
    POSTINGS_DIR,
    SHARD_SHIFT,
    STATE_KEY,
    TOP_MIN,
    TOP_N,
    VERSION,
    PartInfo,
    disk_bytes,
    part_key,
    post_key,
    postings_dir,
    read_state,
)

__all__ = [
    "ABSENT_TOKEN",
    "BITMAP_DENSITY",
    "DEFAULT_ON_TOKENS",
    "DEFAULT_PART_NNZ",
    "IDS_PER_RECORD",
    "KIND_FEATURE",
    "KIND_TOKEN",
    "POSTINGS_DIR",
    "SHARD_SHIFT",
    "TOP_MIN",
    "TOP_N",
    "VERSION",
    "BuildProgress",
    "BuildReport",
    "PartInfo",
    "Postings",
    "build_postings",
    "disk_bytes",
    "open_postings",
    "part_key",
    "post_key",
    "postings_by_default",
    "postings_dir",
    "read_state",
]


class Postings:
    """Read access to an index's postings (thread-safe: one read transaction per call).

    Open with :func:`open_postings`; ``None`` fields mean the postings do not exist yet."""

    def __init__(self, index_path: str | Path, entry: envs.SharedEnv) -> None:
        self.index_path = Path(index_path)
        self.entry = entry
        self._lock = threading.Lock()
        self._parts: tuple[tuple[float, int], list[PartInfo]] | None = None
        self._serial_of_parts: tuple[float, int] = (0.0, -1)
        self._headers: OrderedDict[tuple[float, bytes], Record] = OrderedDict()
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
            if raw is None:
                return None
            state: dict[str, Any] = json.loads(bytes(raw))
            return state

    def check_version(self) -> None:
        """A sentence (SaetuiInputError) when the postings were built in another format."""
        state = self.state()
        if state is not None and state.get("version") != VERSION:
            raise SaetuiInputError(
                f"the postings of {self.index_path} are in format {state.get('version')}, "
                f"this saetui reads format {VERSION}: rebuild them with "
                f"`saetui postings {self.index_path}`."
            )

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
                shard, part = PART_KEY.unpack(bytes(key))
                info = json.loads(bytes(value))
                out.append(PartInfo(shard=shard, part=part, **info))
        with self._lock:
            self._parts = (serial, out)
            self._serial_of_parts = serial
        return out

    # -------------------------------------------------------------- per id

    def _record(
        self, txn: lmdb.Transaction, kind: int, ident: int, part: PartInfo
    ) -> tuple[memoryview | bytes, Record, int] | None:
        """(record buffer, parsed header, slot) of one id in one part; None when it has no
        postings there."""
        rec_id, slot = divmod(ident, IDS_PER_RECORD)
        key = post_key(part.shard, part.part, kind, rec_id)
        rec = txn.get(key, db=self.entry.dbs[DB_POST])
        if rec is None:
            return None
        cache_key = (self._serial_of_parts[0], key)  # records never change within a build
        with self._lock:
            head = self._headers.get(cache_key)
            if head is not None:
                self._headers.move_to_end(cache_key)
        if head is None:
            head = parse_record(rec, 6 if kind == KIND_FEATURE else 4)
            with self._lock:
                self._headers[cache_key] = head
                while len(self._headers) > HEADER_CACHE:
                    self._headers.popitem(last=False)
        if slot >= len(head.count) or not head.count[slot]:
            return None
        return rec, head, slot

    def counts(self, kind: int, ident: int) -> int:
        """How many positions the id has (a feature's firings, a token's occurrences)."""
        total = 0
        parts = self.parts()
        with self._read() as txn:
            for part in parts:
                got = self._record(txn, kind, ident, part)
                if got is not None:
                    total += int(got[1].count[got[2]])
        return total

    def part_counts(self, kind: int, ident: int) -> list[int]:
        """How many positions the id has in each part (in :meth:`parts` order)."""
        parts = self.parts()
        out = []
        with self._read() as txn:
            for part in parts:
                got = self._record(txn, kind, ident, part)
                out.append(0 if got is None else int(got[1].count[got[2]]))
        return out

    def max_value(self, feature: int) -> float:
        """The feature's largest activation."""
        best = 0
        parts = self.parts()
        with self._read() as txn:
            for part in parts:
                got = self._record(txn, KIND_FEATURE, feature, part)
                if got is not None:
                    best = max(best, int(got[1].max_bits[got[2]]))
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
        got_n = 0
        parts = self.parts() if parts is None else parts
        with self._read() as txn:
            for part in parts:
                got = self._record(txn, kind, ident, part)
                if got is None:
                    continue
                pos, vals = decode(*got)
                pos_out.append(pos + part.first)
                if vals is not None:
                    val_out.append(vals)
                got_n += len(pos)
                if limit is not None and got_n >= limit:
                    break
        positions = np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64)
        if kind != KIND_FEATURE:
            return positions, None
        values = np.concatenate(val_out) if val_out else np.zeros(0, np.float16)
        return positions, values

    @contextmanager
    def _within(self, txn: lmdb.Transaction | None) -> Iterator[lmdb.Transaction]:
        """``txn`` when given (one read transaction for many lookups), else a new one."""
        if txn is not None:
            yield txn
        else:
            with self._read() as new:
                yield new

    def tier_maxes(
        self, feature: int, part: PartInfo, txn: lmdb.Transaction | None = None
    ) -> list[int]:
        """Largest fp16 bits of each value tier of the feature in one part, highest first
        (a short piece is one tier); empty when it does not fire there."""
        with self._within(txn) as txn:
            got = self._record(txn, KIND_FEATURE, feature, part)
            if got is None:
                return []
            _, head, slot = got
            tiers = head.tiers.get(slot)
            if tiers is None:
                return [int(head.max_bits[slot])]
            maxes: list[int] = head.tier_max[tiers[0] : tiers[1]].tolist()
            return maxes

    def tier(
        self, feature: int, part: PartInfo, tier: int, txn: lmdb.Transaction | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(positions sorted, fp16 values) of one value tier of the feature in one part."""
        with self._within(txn) as txn:
            got = self._record(txn, KIND_FEATURE, feature, part)
            if got is None:
                return np.zeros(0, np.int64), np.zeros(0, np.float16)
            rec, head, slot = got
            if slot in head.tiers:
                pos, vals = decode_tier(rec, head, slot, tier)
            else:
                pos, maybe = decode(rec, head, slot)
                assert maybe is not None
                vals = maybe
        return pos + part.first, vals

    def ranked(
        self,
        feature: int,
        n: int,
        *,
        keep: Callable[[int, np.ndarray], np.ndarray] | None = None,
        total: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The feature's ``n`` best postings (value desc, ties by position) whose positions
        pass ``keep(part index, positions) -> bool mask or indices`` (all when None): value
        tiers are decoded from the highest, over all parts, until the n-th best found outranks every
        tier not decoded (or ``total`` matches, when known, were all found). Returns (fp16
        values, positions)."""
        parts = self.parts()
        with self._read() as txn:  # one transaction for every record it reads
            heap: list[tuple[int, int, int]] = []  # (-max bits, part index, tier)
            maxes: list[list[int]] = []
            for i, part in enumerate(parts):
                m = self.tier_maxes(feature, part, txn)
                maxes.append(m)
                if m:
                    heap.append((-m[0], i, 0))
            heapq.heapify(heap)
            bits_out: list[np.ndarray] = []
            pos_out: list[np.ndarray] = []
            found = 0
            best = np.zeros(0, np.int64)  # the n largest fp16 bits found so far
            while heap and n > 0:
                if total is not None and found >= total:
                    break
                if len(best) >= n and int(best.min()) > -heap[0][0]:
                    break  # the n-th best found outranks every tier not decoded
                _, i, t = heapq.heappop(heap)
                if t + 1 < len(maxes[i]):
                    heapq.heappush(heap, (-maxes[i][t + 1], i, t + 1))
                pos, vals = self.tier(feature, parts[i], t, txn)
                if keep is not None:
                    sel = keep(i, pos)
                    pos, vals = pos[sel], vals[sel]
                if len(pos):
                    bits = vals.view(np.uint16).astype(np.int64)
                    bits_out.append(bits)
                    pos_out.append(pos)
                    found += len(pos)
                    best = np.concatenate([best, bits])
                    if len(best) > n:
                        best = np.partition(best, len(best) - n)[len(best) - n :]
        if not bits_out:
            return np.zeros(0, np.float16), np.zeros(0, np.int64)
        bits = np.concatenate(bits_out)
        positions = np.concatenate(pos_out)
        order = np.lexsort((positions, -bits))[:n]
        return bits[order].astype(np.uint16).view(np.float16), positions[order]

    def top(self, feature: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The feature's ``n`` largest values (ties: earliest position) and their positions,
        decoding only the value tiers that can hold them."""
        return self.ranked(feature, n)

    def bits(self, feature: int, part: PartInfo) -> np.ndarray:
        """Where the feature fires in one part: bool over the part's span (positions
        ``part.first + i``), from its bitmap when dense, else from its postings."""
        return np.unpackbits(self.packed_bits(feature, part), count=part.span).view(bool)

    def cofiring_masks(
        self, positive: list[int], negative: list[int]
    ) -> dict[int, tuple[np.ndarray, int]]:
        """Per part index where all ``positive`` features fire and no ``negative`` one:
        (packed mask, how many positions), parts without any left out; one transaction."""
        out: dict[int, tuple[np.ndarray, int]] = {}
        parts = self.parts()
        with self._read() as txn:
            for i, part in enumerate(parts):
                mask = self.packed_bits(positive[0], part, txn)  # 8 positions a byte
                for f in positive[1:]:
                    if not mask.any():
                        break
                    mask &= self.packed_bits(f, part, txn)
                for f in negative:
                    if not mask.any():
                        break
                    mask &= ~self.packed_bits(f, part, txn)
                hits = int(np.bitwise_count(mask).sum())
                if hits:
                    out[i] = (mask, hits)
        return out

    def packed_bits(
        self, feature: int, part: PartInfo, txn: lmdb.Transaction | None = None
    ) -> np.ndarray:
        """:meth:`bits` packed (``np.packbits`` order, ``(span + 7) // 8`` bytes): dense
        features' bitmaps as stored, so masks of frequent features AND 8 positions a byte."""
        with self._within(txn) as txn:
            got = self._record(txn, KIND_FEATURE, feature, part)
            if got is None:
                return np.zeros((part.span + 7) // 8, np.uint8)
            rec, head, slot = got
            where = head.bitmap_slots.get(slot)
            if where is not None:
                return np.array(decode_bitmap(rec, where, part.span))
            pos, _ = decode(rec, head, slot)
        mask = np.zeros(part.span, bool)
        mask[pos] = True
        return np.packbits(mask)

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
            raw = codec.decompress(bytes(blob))
        _first_g, span = TEXT_HEAD.unpack_from(raw)
        off = TEXT_HEAD.size
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

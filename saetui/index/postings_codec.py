"""The ``post`` records of the postings: encoding (build) and decoding (read).

A record holds the postings of ids ``[record * IDS_PER_RECORD, ...)`` of one kind in one
part: ``_REC_HEAD`` (n ids, n frames, n tiered ids, n tiers, n bitmaps, header zstd?,
header bytes), the header (``u32 count[n] | u16 max_bits[n] | u32 frame_first[f+1] |
u32 frame_off[f+1] | u32 tiered_slot[s] | u32 tier_first[s+1] | u32 tier_count[t] |
u16 tier_max[t] | u32 tier_off[t+1] | u32 bitmap_slot[b] | u32 bitmap_off[b+1]``), then
the frames, the tiers and the bitmaps.

- A frame holds the pieces of consecutive short ids: one byte (0 raw, 1 zstd), then
  position deltas as u32 in 4 byte planes (first delta from the part's first global
  index) and, for features, fp16 values in 2 byte planes.
- A long feature piece (more than ``top_min`` postings) is stored in *value tiers*
  instead: its postings ranked by (value desc, position asc) and cut at ranks 64, 256,
  1024, ... (x4); each tier is one frame of its postings in position order. Every
  posting of tier t outranks every posting of tier t+1, so a first page by value decodes
  tiers from the top and stops as soon as it is proven; ``tier_max`` is each tier's
  largest fp16 bits.
- Feature pieces firing on at least 1/``BITMAP_DENSITY`` of the part's span also keep a
  bitmap of it (one zstd frame): co-firing masks of frequent features are ANDs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from saetui.index import codec
from saetui.index.postings_layout import (
    BITMAP_DENSITY,
    FRAME_POSTINGS,
    IDS_PER_RECORD,
    TIER_GROWTH,
    TOP_MIN,
    TOP_N,
)

_REC_HEAD = struct.Struct("<IIIIIBI")
_FULL = 0xFFFFFFFF


def _frame(raw: bytes) -> bytes:
    packed = codec.compress(raw) if len(raw) > 32 else raw
    return b"\x01" + packed if len(packed) < len(raw) else b"\x00" + raw


def _planes(pos: np.ndarray, bits: np.ndarray | None) -> np.ndarray:
    """Byte planes of sorted local positions (deltas, first from 0) and fp16 bits."""
    deltas = np.diff(pos, prepend=0).astype("<u4")
    planes = np.empty((4 if bits is None else 6, len(pos)), np.uint8)
    planes[:4] = deltas.view(np.uint8).reshape(-1, 4).T
    if bits is not None:
        planes[4:] = bits.astype("<u2").view(np.uint8).reshape(-1, 2).T
    return planes


def tier_bounds(count: int) -> list[int]:
    """Rank cuts of a tiered piece of ``count`` postings: 0, 64, 256, ..., count."""
    out, r = [0], TOP_N
    while r < count:
        out.append(r)
        r *= TIER_GROWTH
    out.append(count)
    return out


def _tiers(pos: np.ndarray, bits: np.ndarray) -> tuple[list[bytes], list[int], list[int]]:
    """(frames, counts, max bits) of one piece's value tiers (``pos`` sorted), highest
    first. From the deepest cut up: a one-rank partition splits the candidates into those
    above the cut and the next tier (about 2.3 passes over the piece in all)."""
    # unique ranking key: value desc, then position asc
    key = (bits.astype(np.int64) << 32) | (_FULL - pos.astype(np.int64))
    idx = np.arange(len(pos))  # ascending, so every tier's positions stay sorted
    low_first: list[np.ndarray] = []
    for r in reversed(tier_bounds(len(pos))[1:-1]):
        k = key[idx]
        above = k >= np.partition(k, len(k) - r)[len(k) - r]
        low_first.append(idx[~above])
        idx = idx[above]
    low_first.append(idx)
    frames, counts, maxes = [], [], []
    for sel in reversed(low_first):
        frames.append(_frame(_planes(pos[sel], bits[sel]).tobytes()))
        counts.append(len(sel))
        maxes.append(int(bits[sel].max()))
    return frames, counts, maxes


def encode_records(
    keys: np.ndarray,
    pos_bits: int,
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
    sizes = ends - starts
    bits = np.zeros(len(keys), np.int64)
    if with_values:
        bits = (keys & np.uint64(0xFFFF)).astype(np.int64)
        max_bits = np.maximum.reduceat(bits, starts)
        tiered = sizes > max(top_min, TOP_N)
    else:
        max_bits = np.zeros(len(starts), np.int64)
        tiered = np.zeros(len(starts), bool)
    group_ids = ids[starts]
    # byte planes of the short pieces only, compacted: a frame of consecutive short ids is
    # one slice of them (long pieces are coded tier by tier)
    short = np.repeat(~tiered, sizes) if tiered.any() else slice(None)
    deltas = np.empty(len(pos), np.int64)
    deltas[0] = pos[0]
    deltas[1:] = pos[1:] - pos[:-1]
    deltas[starts] = pos[starts]
    short_deltas = deltas[short]
    framed_planes = np.empty((6 if with_values else 4, len(short_deltas)), np.uint8)
    framed_planes[:4] = short_deltas.astype("<u4").view(np.uint8).reshape(-1, 4).T
    if with_values:
        framed_planes[4:] = bits[short].astype("<u2").view(np.uint8).reshape(-1, 2).T
    del deltas, short_deltas
    framed_end = np.cumsum(np.where(tiered, 0, sizes))
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
        count[slots] = sizes[lo:hi]
        maxb[slots] = max_bits[lo:hi]
        # frames: runs of consecutive short ids with about FRAME_POSTINGS postings share
        # one zstd frame (small pieces alone would each pay for a frame and its tables)
        frame_first: list[int] = [0]
        frames: list[bytes] = []
        framed = np.flatnonzero(~tiered[lo:hi]) + lo
        first_col = int(framed_end[lo] - (0 if tiered[lo] else sizes[lo]))
        col = first_col
        framed_sizes = sizes[framed].tolist()
        framed_gids = group_ids[framed].tolist()
        for i, size in enumerate(framed_sizes):
            col += size
            if col - first_col >= FRAME_POSTINGS or i == len(framed_sizes) - 1:
                frames.append(_frame(framed_planes[:, first_col:col].tobytes()))
                frame_first.append(framed_gids[i] - base_id + 1)
                first_col = col
        frame_first[-1] = n
        tier_slots: list[int] = []
        tier_first: list[int] = [0]
        tier_frames: list[bytes] = []
        tier_counts: list[int] = []
        tier_maxes: list[int] = []
        bitmap_slots: list[int] = []
        bitmaps: list[bytes] = []
        for g in (np.flatnonzero(tiered[lo:hi]) + lo).tolist():
            a, b = int(starts[g]), int(ends[g])
            t_frames, t_counts, t_maxes = _tiers(pos[a:b], bits[a:b])
            tier_slots.append(int(group_ids[g]) - base_id)
            tier_frames += t_frames
            tier_counts += t_counts
            tier_maxes += t_maxes
            tier_first.append(len(tier_counts))
            # dense pieces: a bitmap over the part's span too, so co-firing masks are ANDs
            if span > 0 and (b - a) * BITMAP_DENSITY >= span:
                mask = np.zeros(span, bool)
                mask[pos[a:b]] = True
                bitmap_slots.append(int(group_ids[g]) - base_id)
                bitmaps.append(_frame(np.packbits(mask).tobytes()))

        def offsets(blobs: list[bytes]) -> bytes:
            off = np.zeros(len(blobs) + 1, "<u4")
            np.cumsum([len(x) for x in blobs], out=off[1:])
            return off.tobytes()

        header = b"".join(
            (
                count.tobytes(),
                maxb.tobytes(),
                np.asarray(frame_first, "<u4").tobytes(),
                offsets(frames),
                np.asarray(tier_slots, "<u4").tobytes(),
                np.asarray(tier_first, "<u4").tobytes(),
                np.asarray(tier_counts, "<u4").tobytes(),
                np.asarray(tier_maxes, "<u2").tobytes(),
                offsets(tier_frames),
                np.asarray(bitmap_slots, "<u4").tobytes(),
                offsets(bitmaps),
            )
        )
        packed = codec.compress(header)
        flag = 1 if len(packed) < len(header) else 0
        header = packed if flag else header
        head = _REC_HEAD.pack(
            n, len(frames), len(tier_slots), len(tier_counts), len(bitmaps), flag, len(header)
        )
        out.append((rec_id, b"".join((head, header, *frames, *tier_frames, *bitmaps))))
    return out


@dataclass(frozen=True)
class Record:
    """The decoded header of one ``post`` record (cached by the reader)."""

    count: np.ndarray  # int64 [n]
    max_bits: np.ndarray  # uint16 [n]
    frame_count: np.ndarray  # int64 [n]: count, 0 for tiered slots (not in a frame)
    frame_first: np.ndarray  # int64 [n_frames + 1]: first slot of each frame
    frame_off: np.ndarray  # int64 [n_frames + 1]: byte offsets in the frame area
    tiers: dict[int, tuple[int, int]]  # tiered slot -> (first, end) entry of the tier table
    tier_count: np.ndarray  # int64 [n_tiers]
    tier_max: np.ndarray  # int64 [n_tiers]: fp16 bits
    tier_off: np.ndarray  # int64 [n_tiers + 1]: byte offsets in the record
    frames_at: int  # byte offset of the frame area in the record
    n_planes: int
    bitmap_slots: dict[int, tuple[int, int]]  # slot -> byte range of its bitmap frame


def parse_record(rec: memoryview | bytes, n_planes: int) -> Record:
    try:
        n, n_frames, n_tiered, n_tiers, n_bitmaps, flag, size = _REC_HEAD.unpack_from(rec, 0)
        head = bytes(rec[_REC_HEAD.size : _REC_HEAD.size + size])
        raw = codec.decompress(head) if flag else head
        off = 0

        def take(dtype: str, k: int) -> np.ndarray:
            nonlocal off
            arr = np.frombuffer(raw, dtype, k, off)
            off += arr.nbytes
            return arr

        count = take("<u4", n).astype(np.int64)
        max_bits = take("<u2", n)
        frame_first = take("<u4", n_frames + 1).astype(np.int64)
        frame_off = take("<u4", n_frames + 1).astype(np.int64)
        tier_slots = take("<u4", n_tiered).tolist()
        tier_first = take("<u4", n_tiered + 1).tolist()
        tier_count = take("<u4", n_tiers).astype(np.int64)
        tier_max = take("<u2", n_tiers).astype(np.int64)
        tier_off = take("<u4", n_tiers + 1).astype(np.int64)
        bitmap_slots = take("<u4", n_bitmaps).tolist()
        bitmap_off = take("<u4", n_bitmaps + 1).tolist()
    except Exception as exc:  # zstd, struct or size errors
        raise codec.CorruptBlockError(f"postings record: {exc}") from None
    frames_at = _REC_HEAD.size + size
    tiers_at = frames_at + int(frame_off[-1])
    bitmaps_at = tiers_at + int(tier_off[-1])
    frame_count = count.copy()
    frame_count[tier_slots] = 0
    return Record(
        count=count,
        max_bits=max_bits,
        frame_count=frame_count,
        frame_first=frame_first,
        frame_off=frame_off,
        tiers={s: (tier_first[i], tier_first[i + 1]) for i, s in enumerate(tier_slots)},
        tier_count=tier_count,
        tier_max=tier_max,
        tier_off=tier_off + tiers_at,
        frames_at=frames_at,
        n_planes=n_planes,
        bitmap_slots={
            slot: (bitmaps_at + bitmap_off[i], bitmaps_at + bitmap_off[i + 1])
            for i, slot in enumerate(bitmap_slots)
        },
    )


def _unframe(blob: memoryview | bytes, n_planes: int, width: int) -> np.ndarray:
    try:
        raw = codec.decompress(bytes(blob[1:])) if blob[0] == 1 else bytes(blob[1:])
        return np.frombuffer(raw, np.uint8).reshape(n_planes, width)
    except Exception as exc:  # zstd or size mismatch
        raise codec.CorruptBlockError(f"postings frame: {exc}") from None


def _columns(planes: np.ndarray, column: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (int64) and fp16 values (or None) of ``count`` columns of byte planes."""
    raw4 = np.empty((count, 4), np.uint8)
    raw4[:] = planes[:4, column : column + count].T  # one strided copy into u32 deltas
    pos = np.cumsum(raw4.view("<u4").ravel(), dtype=np.uint32).astype(np.int64)
    if planes.shape[0] == 4:
        return pos, None
    raw2 = np.empty((count, 2), np.uint8)
    raw2[:] = planes[4:6, column : column + count].T
    return pos, raw2.view("<f2").ravel()


def decode_tier(
    rec: memoryview | bytes, head: Record, slot: int, tier: int
) -> tuple[np.ndarray, np.ndarray]:
    """Local positions (sorted) and fp16 values of tier ``tier`` of a tiered slot."""
    t = head.tiers[slot][0] + tier
    blob = rec[int(head.tier_off[t]) : int(head.tier_off[t + 1])]
    pos, vals = _columns(_unframe(blob, 6, int(head.tier_count[t])), 0, int(head.tier_count[t]))
    assert vals is not None
    return pos, vals


def decode(
    rec: memoryview | bytes, head: Record, slot: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Local positions (int64, sorted, relative to the part's first global index) and, for
    features, fp16 values of the id in ``slot``."""
    tiers = head.tiers.get(slot)
    if tiers is not None:
        got = [decode_tier(rec, head, slot, t) for t in range(tiers[1] - tiers[0])]
        return merge_tiers(got)
    frame = int(np.searchsorted(head.frame_first, slot, side="right")) - 1
    first_slot = int(head.frame_first[frame])
    column = int(head.frame_count[first_slot:slot].sum())
    width = int(head.frame_count[first_slot : int(head.frame_first[frame + 1])].sum())
    a = head.frames_at + int(head.frame_off[frame])
    b = head.frames_at + int(head.frame_off[frame + 1])
    planes = _unframe(rec[a:b], head.n_planes, width)
    return _columns(planes, column, int(head.count[slot]))


def merge_tiers(tiers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One position-sorted list of disjoint tiers (each sorted): a scatter into the span
    when dense, else a stable sort of the concatenation (a merge of sorted runs)."""
    pos = np.concatenate([p for p, _ in tiers])
    vals = np.concatenate([v for _, v in tiers])
    if not len(pos):
        return pos, vals
    span = int(pos.max()) + 1
    if len(pos) * 8 >= span:
        by_pos = np.zeros(span, np.float16)
        seen = np.zeros(span, bool)
        by_pos[pos] = vals
        seen[pos] = True
        where = np.flatnonzero(seen)
        return where.astype(np.int64), by_pos[where]
    order = np.argsort(pos, kind="stable")
    return pos[order], vals[order]


def decode_bitmap(rec: memoryview | bytes, where: tuple[int, int], span: int) -> np.ndarray:
    """A piece's bitmap as packed bits (uint8, big-endian bit order, ``(span + 7) // 8``)."""
    blob = rec[where[0] : where[1]]
    try:
        raw = codec.decompress(bytes(blob[1:])) if blob[0] == 1 else bytes(blob[1:])
    except Exception as exc:  # zstd
        raise codec.CorruptBlockError(f"postings bitmap: {exc}") from None
    packed = np.frombuffer(raw, np.uint8)
    if len(packed) != (span + 7) // 8:
        raise codec.CorruptBlockError("postings bitmap: wrong size")
    return packed

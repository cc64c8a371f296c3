"""Window and token access over the shards: decoded window blocks (an LRU of the most
recent), tokens with their features, document contexts across windows and shards, one
feature's contexts for many windows, and whole-shard scans of the forward index.

Reads that map many pages call `ShardSet.release_mapped_pages` so RSS does not grow
toward the index size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from saetui.errors import IndexDamagedError, SaetuiInputError
from saetui.index import codec
from saetui.index import format as fmt
from saetui.index.lru import LRU
from saetui.index.shards import Shard, ShardSet
from saetui.index.types import (
    DocumentContext,
    ForwardChunk,
    ForwardScan,
    Segment,
    TokenFeatures,
    WindowView,
)

Block = tuple[codec.WindowRecord, codec.ForwardBlock]
Context = tuple[codec.WindowRecord, np.ndarray, list[str]]  # record, one feature, strings


class WindowStore:
    """Windows of an index by global id; thread-safe (the block cache has its own lock)."""

    def __init__(self, shards: ShardSet, ctx_len: int, block_cache: int = 512) -> None:
        self.shards = shards
        self.ctx_len = ctx_len
        self._blocks: LRU[tuple[int, int], Block] = LRU(block_cache)

    # ------------------------------------------------------------ blocks

    def block(self, shard: int, window: int) -> Block:
        """The decoded window record and forward block of (global) window ``window`` held
        by ``shard`` (cached)."""
        key = (shard, window)
        hit = self._blocks.get(key)
        if hit is not None:
            return hit
        s = self.shards.shard(shard)
        local = self.local_or_raise(s, window)
        with self.shards.guard(s.path):
            with self.shards.read_buffers(s) as txn:  # zero-copy: slice one window out
                tok_buf = txn.get(fmt.u64_key(local), db=s.dbs[fmt.DB_TOK])
                chunk = txn.get(fmt.u64_key(local // codec.FWD_CHUNK), db=s.dbs[fmt.DB_FWD])
                fwd = None if chunk is None else codec.chunk_blob(chunk, local % codec.FWD_CHUNK)
                tok = None if tok_buf is None else bytes(tok_buf)
            if tok is None or fwd is None:
                n = self.shards.window_count(s)
                held = (
                    f"{n} committed windows (0-{n - 1})"
                    if s.layout is None
                    else f"{n} committed windows of those dealt to rank {s.index}"
                )
                raise SaetuiInputError(
                    f"window {window} is not in the index: shard {shard} has {held}."
                )
            value = (codec.decode_window(tok), codec.decode_forward(fwd))
        self.shards.release_mapped_pages()
        self._blocks.put(key, value)
        return value

    def cached(self, shard: int, window: int) -> Block | None:
        """A decoded block if the cache holds it (no read)."""
        return self._blocks.get((shard, window))

    @staticmethod
    def local_or_raise(s: Shard, window: int) -> int:
        try:
            return s.local(window)
        except ValueError:
            owner = s.layout.owner(window) if s.layout is not None else s.index
            raise SaetuiInputError(
                f"window {window} is in shard {owner}, not shard {s.index}: pass shard={owner} "
                "or leave shard out."
            ) from None

    def _adjacent(self, window: int, shard: int) -> codec.WindowRecord | None:
        """A window next to one being shown: in the same shard, or in the shard that holds
        it in a distributed index; None when it is not (yet) in the index."""
        if self.shards.distributed:
            shard = self.shards.owner(window, None)
        s = self.shards.shard(shard)
        try:
            local = s.local(window)
        except ValueError:
            return None
        if local >= self.shards.window_count(s):
            return None
        return self.block(shard, window)[0]

    # ------------------------------------------------------------ windows & tokens

    def window(self, window: int, shard: int | None = None) -> WindowView:
        """Tokens, mask and document segments of one window (shard None: the shard that
        holds it)."""
        w = check_window(window)
        shard = self.shards.owner(w, shard)
        rec, _ = self.block(shard, w)
        return WindowView(
            shard=shard,
            window=w,
            token_ids=rec.token_ids,
            tokens=self.shards.token_strings(rec.token_ids),
            mask=rec.mask,
            segments=[Segment(*map(int, row)) for row in rec.segments],
        )

    def token(self, window: int, position: int, shard: int | None = None) -> TokenFeatures:
        """All active features at one token, strongest first (shard None: the shard that
        holds the window)."""
        w = check_window(window)
        shard = self.shards.owner(w, shard)
        rec, blk = self.block(shard, w)
        n = len(rec.token_ids)
        if not isinstance(position, (int, np.integer)) or not 0 <= position < n:
            raise SaetuiInputError(
                f"position {position} is outside window {window}, which has {n} tokens (0-{n - 1})."
            )
        a, b = blk.offsets[position], blk.offsets[position + 1]
        vals = blk.values16[a:b].astype(np.float32)
        order = np.argsort(-vals, kind="stable")
        return TokenFeatures(
            shard=shard,
            window=w,
            position=int(position),
            token_id=int(rec.token_ids[position]),
            token=self.shards.token_strings([rec.token_ids[position]])[0],
            counted=bool(rec.mask[position]),
            feature_ids=blk.feature_ids[a:b][order],
            values=vals[order],
        )

    def window_activations(self, window: int, features: list[int], shard: int = 0) -> np.ndarray:
        """float32 ``[len(features), n_tokens]``: each (checked) feature on every token."""
        _, blk = self.block(shard, check_window(window))
        out = np.zeros((len(features), blk.n_tokens), np.float32)
        for row, f in enumerate(features):
            out[row] = blk.feature_activations(f)
        return out

    def document_context(
        self, global_index: int, radius: int = 64, shard: int | None = None
    ) -> DocumentContext:
        """Up to `radius` tokens either side of a token, within its document, across windows
        (and across shards in a distributed index)."""
        window, pos = divmod(int(global_index), self.ctx_len)
        shard = self.shards.owner(check_window(window), shard)
        rec, _ = self.block(shard, window)
        strings = self.shards.token_strings
        if pos >= len(rec.token_ids):
            raise SaetuiInputError(
                f"global index {global_index} points past the end of window {window}."
            )
        seg = segment_at(rec.segments, pos)
        if seg is None:
            ids = rec.token_ids[max(0, pos - radius) : pos + radius + 1]
            start = max(0, pos - radius)
            return DocumentContext(shard, -1, start, ids, strings(ids), pos - start)
        doc_id, doc_off, s_start, s_len = (int(x) for x in seg)
        focus_doc = doc_off + pos - s_start
        pieces: list[tuple[int, np.ndarray]] = [(doc_off, rec.token_ids[s_start : s_start + s_len])]
        # walk back/forward while the document continues into neighbouring windows
        w, cur = window, (doc_off, s_start)
        while cur[0] > focus_doc - radius and cur[0] > 0 and w > 0:
            w -= 1
            prev = self._adjacent(w, shard)
            if prev is None or not len(prev.segments):
                break
            last = prev.segments[-1]
            if int(last[0]) != doc_id or int(last[1] + last[3]) != cur[0]:
                break
            pieces.insert(0, (int(last[1]), prev.token_ids[int(last[2]) : int(last[2] + last[3])]))
            cur = (int(last[1]), int(last[2]))
        end = doc_off + s_len
        w = window
        if s_start + s_len == len(rec.token_ids):
            while end <= focus_doc + radius:
                w += 1
                nxt = self._adjacent(w, shard)
                if nxt is None or not len(nxt.segments):
                    break
                first = nxt.segments[0]
                if int(first[0]) != doc_id or int(first[1]) != end or int(first[2]) != 0:
                    break
                pieces.append((end, nxt.token_ids[: int(first[3])]))
                end += int(first[3])
                if int(first[3]) != len(nxt.token_ids):
                    break
        base = pieces[0][0]
        ids = np.concatenate([p for _, p in pieces])
        lo = max(0, focus_doc - radius - base)
        hi = min(len(ids), focus_doc + radius + 1 - base)
        ids = ids[lo:hi]
        return DocumentContext(shard, doc_id, base + lo, ids, strings(ids), focus_doc - base - lo)

    def contexts(self, f: int, entries: list[tuple[int, int]]) -> dict[tuple[int, int], Context]:
        """(window record, feature f on each token, token strings) per (shard, window) of
        the (shard, global index) ``entries``.

        Decoded blocks in the cache are used; the others are read in one transaction per
        shard and only this feature is decoded from them (not cached: a feature's contexts
        are scattered over the corpus and would only evict the blocks `token()` reuses).
        """
        strings = self.shards.token_strings
        out: dict[tuple[int, int], Context] = {}
        missing: dict[int, list[int]] = {}
        for shard, gidx in entries:
            key = (shard, gidx // self.ctx_len)
            if key in out or key[1] in missing.get(shard, ()):
                continue
            hit = self._blocks.get(key)
            if hit is not None:
                rec, blk = hit
                out[key] = (rec, blk.feature_activations(f), strings(rec.token_ids))
            else:
                missing.setdefault(shard, []).append(key[1])
        for shard, windows in missing.items():
            s = self.shards.shard(shard)
            with self.shards.read_buffers(s) as txn:
                for window in windows:
                    local = self.local_or_raise(s, window)
                    tok = txn.get(fmt.u64_key(local), db=s.dbs[fmt.DB_TOK])
                    chunk = txn.get(fmt.u64_key(local // codec.FWD_CHUNK), db=s.dbs[fmt.DB_FWD])
                    fwd = (
                        None if chunk is None else codec.chunk_blob(chunk, local % codec.FWD_CHUNK)
                    )
                    if tok is None or fwd is None:
                        break
                    rec = codec.decode_window(bytes(tok))
                    acts = codec.feature_activations(fwd, f)
                    out[(shard, window)] = (rec, acts, strings(rec.token_ids))
            for window in windows:
                if (shard, window) not in out:
                    self.block(shard, window)  # raises the "not in the index" error
        if missing:
            self.shards.release_mapped_pages(sum(len(w) for w in missing.values()))
        return out

    # ------------------------------------------------------------ scans

    def iter_forward(
        self,
        windows_per_chunk: int = 256,
        *,
        shard: int | None = None,
        first: int = 0,
        end: int | None = None,
    ) -> Iterator[ForwardChunk]:
        """Every committed window's sparse activations, shard by shard in window order,
        in chunks of about ``windows_per_chunk`` windows, counted tokens only (BOS/pad
        dropped). One short read transaction per chunk; the block cache is left alone.

        ``shard``: only that shard, and only its windows with local ids in
        ``[first, end)`` (a distributed shard numbers the windows it holds 0, 1, ...)."""
        per_read = max(1, windows_per_chunk // codec.FWD_CHUNK)
        for s in self.shards.shards if shard is None else [self.shards.shard(shard)]:
            n_windows = self.shards.window_count(s)
            lo = first if shard is not None else 0
            if shard is not None and end is not None:
                n_windows = min(n_windows, end)
            first_record = lo // codec.FWD_CHUNK
            while first_record * codec.FWD_CHUNK < n_windows:
                offsets, ids, values = [np.zeros(1, np.int64)], [], []
                with self.shards.read(s) as txn:
                    for record in range(first_record, first_record + per_read):
                        chunk = txn.get(fmt.u64_key(record), db=s.dbs[fmt.DB_FWD])
                        if chunk is None:
                            break
                        for i in range(codec.chunk_count(chunk)):
                            window = record * codec.FWD_CHUNK + i
                            if window >= n_windows:
                                break
                            if window < lo:
                                continue
                            tok = txn.get(fmt.u64_key(window), db=s.dbs[fmt.DB_TOK])
                            blob = codec.chunk_blob(chunk, i)
                            if tok is None or blob is None:
                                raise _missing(s, window)
                            block = codec.decode_forward(blob)
                            counted = np.flatnonzero(codec.decode_window(tok).mask)
                            starts, ends = block.offsets[counted], block.offsets[counted + 1]
                            lengths = ends - starts
                            take = np.repeat(ends - np.cumsum(lengths), lengths) + np.arange(
                                int(lengths.sum())
                            )
                            ids.append(block.feature_ids[take])
                            values.append(block.values16[take])
                            offsets.append(offsets[-1][-1] + np.cumsum(lengths))
                first_window = max(first_record * codec.FWD_CHUNK, lo)
                first_record += per_read
                # a scan maps the whole index in turn: give the pages back as it goes
                self.shards.release_mapped_pages(per_read * codec.FWD_CHUNK)
                if not ids:
                    continue
                yield ForwardChunk(
                    shard=s.index,
                    first_window=first_window,
                    offsets=np.concatenate(offsets),
                    feature_ids=np.concatenate(ids),
                    values=np.concatenate(values).astype(np.float32),
                )

    def scan_forward(
        self,
        shard: int = 0,
        first_window: int = 0,
        end_window: int | None = None,
        windows_per_chunk: int = 256,
    ) -> Iterator[ForwardScan]:
        """Every token of the shard's committed windows ``[first_window, end_window)``
        (local ids: a distributed shard numbers its own windows 0, 1, ...) with its global
        index, token id, counted flag, document and sparse activations, in window order and
        chunks of ``windows_per_chunk`` windows. One short read transaction per chunk; the
        block cache is left alone."""
        s = self.shards.shard(shard)
        n_windows = self.shards.window_count(s)
        end = n_windows if end_window is None else min(int(end_window), n_windows)
        ctx = self.ctx_len
        window = max(0, int(first_window))
        while window < end:
            stop = min(end, window + max(1, windows_per_chunk))
            parts: list[tuple[int, codec.WindowRecord, codec.ForwardBlock]] = []
            with self.shards.read(s) as txn:
                record, chunk = -1, None
                for w in range(window, stop):
                    if w // codec.FWD_CHUNK != record:
                        record = w // codec.FWD_CHUNK
                        chunk = txn.get(fmt.u64_key(record), db=s.dbs[fmt.DB_FWD])
                    tok = txn.get(fmt.u64_key(w), db=s.dbs[fmt.DB_TOK])
                    blob = None if chunk is None else codec.chunk_blob(chunk, w % codec.FWD_CHUNK)
                    if tok is None or blob is None:
                        raise _missing(s, w)
                    parts.append((w, codec.decode_window(tok), codec.decode_forward(blob)))
            n = [len(rec.token_ids) for _, rec, _ in parts]
            doc_ids = np.full(sum(n), -1, np.int64)
            doc_offsets = np.full(sum(n), -1, np.int64)
            base = 0
            for (_, rec, _), length in zip(parts, n, strict=True):
                for doc, offset, start, size in rec.segments.tolist():
                    doc_ids[base + start : base + start + size] = doc
                    doc_offsets[base + start : base + start + size] = offset + np.arange(size)
                base += length
            nnz = np.cumsum([0] + [int(blk.offsets[-1]) for _, _, blk in parts])
            yield ForwardScan(
                shard=shard,
                first_window=window,
                end_window=stop,
                global_index=np.concatenate(
                    [
                        s.global_window(w) * ctx + np.arange(length)
                        for (w, _, _), length in zip(parts, n, strict=True)
                    ]
                ),
                token_ids=np.concatenate([rec.token_ids for _, rec, _ in parts]),
                counted=np.concatenate([rec.mask for _, rec, _ in parts]),
                doc_ids=doc_ids,
                doc_offsets=doc_offsets,
                offsets=np.concatenate(
                    [[0]] + [blk.offsets[1:] + nnz[i] for i, (_, _, blk) in enumerate(parts)]
                ).astype(np.int64),
                feature_ids=np.concatenate([blk.feature_ids for _, _, blk in parts]),
                values16=np.concatenate([blk.values16 for _, _, blk in parts]),
            )
            self.shards.release_mapped_pages(len(parts))
            window = stop


def check_window(window: int) -> int:
    if not isinstance(window, (int, np.integer)) or window < 0:
        raise SaetuiInputError(f"window {window} is not a window id: expected an integer >= 0.")
    return int(window)


def segment_at(segments: np.ndarray, pos: int) -> np.ndarray | None:
    """The segment row (doc_id, doc_offset, start, length) that covers window position
    ``pos``, or None outside every document."""
    for row in segments:
        if row[2] <= pos < row[2] + row[3]:
            found: np.ndarray = row
            return found
    return None


def _missing(s: Shard, window: int) -> IndexDamagedError:
    return IndexDamagedError(
        f"window {window} of shard {s.index} of the index {s.path.parent} is missing although "
        "committed: restore the index or collect it again."
    )

"""IndexReader: the Python API over an index (and the TUI's only door to the data).

Every call runs its own short read transaction, so a reader never pins old pages while a
collector writes and always sees committed, consistent data. Thread-safe: LMDB read
transactions are per call and the caches are guarded by a lock.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from saetui.errors import IndexDamagedError, IndexEmptyError, SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.layout import ShardLayout
from saetui.index.records import (
    SUM_UNIT_LOG2,
    SUMSQ_UNIT_LOG2,
    decode_columns,
    decode_samples,
    decode_topk,
    decode_ttok,
    feature_blob,
    sample_hash,
)
from saetui.index.types import (
    Bookmark,
    DocumentContext,
    Example,
    FeatureDetail,
    FeatureFilter,
    FeaturePage,
    FeatureStats,
    ForwardChunk,
    ForwardScan,
    IndexMeta,
    IntervalSamples,
    Label,
    Neighbours,
    Progress,
    Segment,
    TokenFeatures,
    TokenMatch,
    WindowView,
)
from saetui.index.user import UserStore

SORT_KEYS = ("id", "count", "density", "mean", "std", "max", "label")


@dataclass
class _Columns:
    serial: tuple[int, ...]
    count: np.ndarray
    density: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    counted_tokens: int
    orders: dict[tuple[str, bool], np.ndarray] = field(default_factory=dict)


class _Shard:
    def __init__(self, index: int, path: Path, shared: envs.SharedEnv):
        self.index, self.path, self.shared = index, path, shared
        self.env, self.dbs = shared.env, shared.dbs
        self.layout: ShardLayout | None = None  # set for a shard of a distributed run

    def local(self, window: int) -> int:
        """This shard's own id of (global) window ``window``."""
        return window if self.layout is None else self.layout.local_window(window)


# ------------------------------------------------------------------ reader


def open_index(path: str | Path) -> IndexReader:
    """Open the index at `path` for reading (and for user labels/bookmarks)."""
    return IndexReader(path)


class IndexReader:
    """Read access to every shard of an index, merged; see the module docstring."""

    def __init__(self, path: str | Path, block_cache: int = 512) -> None:
        t0 = time.perf_counter()
        self.path = Path(path)
        content = fmt.read_marker(self.path)
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[int, int], tuple[codec.WindowRecord, codec.ForwardBlock]]
        self._blocks = OrderedDict()
        self._block_cache = block_cache
        self._columns: _Columns | None = None
        self._hist_cache: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._vocab: list[str] | None = None
        self._vocab_arr: np.ndarray | None = None
        self._reads_since_unmap = 0
        self._vocab_lower: list[str] | None = None
        self._shards: list[_Shard] = []
        # reads in flight: close() waits for them before it releases the environments
        self._reads = threading.Condition()
        self._in_flight = 0
        self._closed = False
        shape = None
        try:
            dirs = sorted(
                p for p in self.path.iterdir() if p.name.startswith(fmt.SHARD_PREFIX) and p.is_dir()
            )
            for d in dirs:
                if not (d / "data.mdb").exists():
                    continue
                shard_id = int(d.name[len(fmt.SHARD_PREFIX) :])
                try:
                    with self._guard(d):
                        shared = envs.acquire(d, fmt.SHARD_DBS, write=False)
                except lmdb.NotFoundError:  # a writer created it but has not committed yet
                    continue
                shard = _Shard(shard_id, d, shared)
                self._shards.append(shard)
                with self._read(shard) as txn:
                    raw = txn.get(fmt.META_SHAPE, db=shard.dbs[fmt.DB_META])
                if raw is None:
                    self._shards.pop()
                    envs.release(shared)
                    continue
                s = json.loads(raw)
                shard.layout = ShardLayout.from_json(s.get("layout"))
                if shape is None:
                    shape = s
                elif s["identity"] != shape["identity"]:
                    raise SaetuiInputError(
                        f"shard {d.name} of {self.path} was built with different settings than "
                        "the other shards: rebuild it."
                    )
            if shape is None:
                raise IndexEmptyError(
                    f"the index {self.path} has no committed data yet: wait for the collector's "
                    "first commit (about a second) and open it again."
                )
            self._check_layouts()
        except BaseException:
            self.close()
            raise
        ident = shape["identity"]
        self.meta = IndexMeta(
            path=self.path,
            format_version=int(content["format_version"]),
            run_config=ident["run_config"],
            d_sae=int(ident["d_sae"]),
            ctx_len=int(ident["ctx_len"]),
            top_k=int(ident["top_k"]),
            samples_per_bin=int(ident["samples_per_bin"]),
            n_shards=len(self._shards),
            lmdb_engine=shape.get("lmdb_engine", ""),
            hist_bin_edges=np.asarray(shape["hist_bin_edges"]),
        )
        self.user = UserStore(self.path, self.meta.d_sae)
        self.open_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------ plumbing

    @property
    def distributed(self) -> bool:
        """Whether the shards are the ranks of one distributed collection (global window
        ids), rather than shards that number their windows each by themselves."""
        return bool(self._shards) and self._shards[0].layout is not None

    def _check_layouts(self) -> None:
        layouts = [s.layout for s in self._shards]
        if all(layout is None for layout in layouts):
            return
        first = next(layout for layout in layouts if layout is not None)
        for s in self._shards:
            ok = (
                s.layout is not None
                and (s.layout.world, s.layout.block) == (first.world, first.block)
                and s.layout.rank == s.index
            )
            if not ok:
                raise SaetuiInputError(
                    f"shard {s.path.name} of {self.path} does not belong to the same distributed "
                    f"run as the others ({first.world} processes): remove it or rebuild the index."
                )

    def _owner(self, window: int, shard: int | None) -> int:
        """The shard that holds (global) window ``window``; ``shard`` if one is named."""
        if shard is not None:
            return shard
        if self.distributed:
            return self._shards[0].layout.owner(window)  # type: ignore[union-attr]
        return 0

    def close(self) -> None:
        """Wait for reads in flight in other threads, then release the environments; later
        calls raise a SaetuiInputError sentence."""
        with self._reads:
            if self._closed:
                return
            self._closed = True
            while self._in_flight:
                self._reads.wait()
        for s in self._shards:  # kept: every later read refuses in _counted()
            envs.release(s.shared)
        if hasattr(self, "user"):
            self.user.close()

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _counted(self) -> Iterator[None]:
        """Work on the environments that close() must wait for."""
        with self._reads:
            if self._closed:
                raise SaetuiInputError(f"the index reader of {self.path} is closed.")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._reads:
                self._in_flight -= 1
                if not self._in_flight:
                    self._reads.notify_all()

    @contextmanager
    def _read(self, s: _Shard, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """One short read transaction on a shard (counted, errors as sentences)."""
        with self._counted(), self._guard(s.path), s.env.begin(buffers=buffers) as txn:
            yield txn

    @contextmanager
    def _guard(self, where: Path | str) -> Iterator[None]:
        try:
            yield
        except codec.CorruptBlockError as exc:
            raise IndexDamagedError(
                f"{_shard_name(where)} holds a damaged record ({exc}): restore the index from "
                "a copy or collect it again."
            ) from None
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
            raise IndexDamagedError(
                f"{_shard_name(where)} is damaged ({type(exc).__name__}): restore the index "
                "from a copy or collect it again."
            ) from None

    def _shard(self, shard: int) -> _Shard:
        for s in self._shards:
            if s.index == shard:
                return s
        raise SaetuiInputError(
            f"shard {shard} is not in the index {self.path}: it has shards "
            f"{[s.index for s in self._shards]}."
        )

    def _check_feature(self, feature: int) -> int:
        d = self.meta.d_sae
        if not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < d:
            raise SaetuiInputError(
                f"feature {feature} is out of range: this index has d_sae={d} features (0-{d - 1})."
            )
        return int(feature)

    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            s = self._shards[0]
            with self._read(s) as txn:
                raw = txn.get(fmt.META_VOCAB, db=s.dbs[fmt.DB_META])
                vocab = json.loads(codec.decompress(raw))
            self._vocab = vocab
        return self._vocab

    def token_strings(self, token_ids: np.ndarray | list[int]) -> list[str]:
        if self._vocab_arr is None:
            self._vocab_arr = np.array(self.vocab, dtype=object)
        vocab = self._vocab_arr
        n = len(vocab)
        ids = np.asarray(token_ids, dtype=np.int64).ravel()
        if len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < n):
            return vocab[ids].tolist()  # one fancy index instead of a Python loop per token
        return [vocab[t] if 0 <= t < n else f"<{t}>" for t in ids.tolist()]

    def progress(self) -> Progress:
        """Committed progress summed over shards (a fresh read each call)."""
        shards = []
        for s in self._shards:
            with self._read(s) as txn:
                shards.append(json.loads(txn.get(fmt.META_PROGRESS, db=s.dbs[fmt.DB_META])))
        return Progress(
            windows=sum(p["windows"] for p in shards),
            tokens=sum(p["tokens"] for p in shards),
            counted_tokens=sum(p["counted_tokens"] for p in shards),
            nonzeros=sum(p["nonzeros"] for p in shards),
            summary_windows=sum(p["summary_windows"] for p in shards),
            finished=all(p["finished"] for p in shards),
            updated=max(p.get("updated", 0.0) for p in shards),
            shards=tuple(shards),
        )

    def metrics(self) -> dict[str, Any]:
        """Run metrics stored by the collector (first shard that has them)."""
        for s in self._shards:
            with self._read(s) as txn:
                raw = txn.get(fmt.META_METRICS, db=s.dbs[fmt.DB_META])
            if raw is not None:
                return json.loads(raw)
        return {}

    def get_meta(self, name: str) -> Any:
        """A JSON value stored with `IndexWriter.put_meta(name, ...)`, or None."""
        for s in self._shards:
            with self._read(s) as txn:
                raw = txn.get(fmt.USER_META_PREFIX + name.encode(), db=s.dbs[fmt.DB_META])
            if raw is not None:
                return json.loads(raw)
        return None

    # ------------------------------------------------------------ windows & tokens

    def _window_count(self, s: _Shard) -> int:
        with self._read(s) as txn:
            return int(json.loads(txn.get(fmt.META_PROGRESS, db=s.dbs[fmt.DB_META]))["windows"])

    def _block(self, shard: int, window: int) -> tuple[codec.WindowRecord, codec.ForwardBlock]:
        key = (shard, window)
        with self._lock:
            hit = self._blocks.get(key)
            if hit is not None:
                self._blocks.move_to_end(key)
                return hit
        s = self._shard(shard)
        local = self._local_or_raise(s, window)
        with self._guard(s.path):
            with self._read(s, buffers=True) as txn:  # zero-copy: slice one window out
                tok = txn.get(fmt.u64_key(local), db=s.dbs[fmt.DB_TOK])
                chunk = txn.get(fmt.u64_key(local // codec.FWD_CHUNK), db=s.dbs[fmt.DB_FWD])
                fwd = None if chunk is None else codec.chunk_blob(chunk, local % codec.FWD_CHUNK)
                tok = None if tok is None else bytes(tok)
            if tok is None or fwd is None:
                n = self._window_count(s)
                held = (
                    f"{n} committed windows (0-{n - 1})"
                    if s.layout is None
                    else f"{n} committed windows of those dealt to rank {s.index}"
                )
                raise SaetuiInputError(
                    f"window {window} is not in the index: shard {shard} has {held}."
                )
            value = (codec.decode_window(tok), codec.decode_forward(fwd))
        self._release_mapped_pages()
        with self._lock:
            self._blocks[key] = value
            while len(self._blocks) > self._block_cache:
                self._blocks.popitem(last=False)
        return value

    def _local_or_raise(self, s: _Shard, window: int) -> int:
        try:
            return s.local(window)
        except ValueError:
            owner = s.layout.owner(window)  # type: ignore[union-attr]
            raise SaetuiInputError(
                f"window {window} is in shard {owner}, not shard {s.index}: pass shard={owner} "
                "or leave shard out."
            ) from None

    def _release_mapped_pages(self, windows_read: int = 1) -> None:
        """Every ~2048 windows read (~350 MB mapped), unmap the index pages reads faulted into
        this process (they stay in the page cache): RSS otherwise grows toward the index
        size. Costs well under a millisecond each time."""
        with self._lock:
            self._reads_since_unmap += windows_read
            if self._reads_since_unmap < 2048:
                return
            self._reads_since_unmap = 0
        # inline (well under a millisecond) and counted as a read, so close() cannot unmap
        # the environment, and let the address range be reused, under the madvise
        with self._counted():
            fmt.unmap_file_pages([s.path / "data.mdb" for s in self._shards])

    def _check_window(self, window: int) -> int:
        if not isinstance(window, (int, np.integer)) or window < 0:
            raise SaetuiInputError(f"window {window} is not a window id: expected an integer >= 0.")
        return int(window)

    def window(self, window: int, shard: int | None = None) -> WindowView:
        """Tokens, mask and document segments of one window (shard None: the shard that
        holds it)."""
        shard = self._owner(self._check_window(window), shard)
        rec, _ = self._block(shard, int(window))
        return WindowView(
            shard=shard,
            window=int(window),
            token_ids=rec.token_ids,
            tokens=self.token_strings(rec.token_ids),
            mask=rec.mask,
            segments=[Segment(*map(int, row)) for row in rec.segments],
        )

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
        for s in self._shards if shard is None else [self._shard(shard)]:
            n_windows = self._window_count(s)
            lo = first if shard is not None else 0
            if shard is not None and end is not None:
                n_windows = min(n_windows, end)
            first_record = lo // codec.FWD_CHUNK
            while first_record * codec.FWD_CHUNK < n_windows:
                offsets, ids, values = [np.zeros(1, np.int64)], [], []
                with self._read(s) as txn:
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
                            block = codec.decode_forward(codec.chunk_blob(chunk, i))
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
                self._release_mapped_pages(per_read * codec.FWD_CHUNK)
                if not ids:
                    continue
                yield ForwardChunk(
                    shard=s.index,
                    first_window=first_window,
                    offsets=np.concatenate(offsets),
                    feature_ids=np.concatenate(ids),
                    values=np.concatenate(values).astype(np.float32),
                )

    def token(self, window: int, position: int, shard: int | None = None) -> TokenFeatures:
        """All active features at one token, strongest first (shard None: the shard that
        holds the window)."""
        shard = self._owner(self._check_window(window), shard)
        rec, blk = self._block(shard, int(window))
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
            window=int(window),
            position=int(position),
            token_id=int(rec.token_ids[position]),
            token=self.token_strings([rec.token_ids[position]])[0],
            counted=bool(rec.mask[position]),
            feature_ids=blk.feature_ids[a:b][order],
            values=vals[order],
        )

    def document_context(
        self, global_index: int, radius: int = 64, shard: int | None = None
    ) -> DocumentContext:
        """Up to `radius` tokens either side of a token, within its document, across windows
        (and across shards in a distributed index)."""
        ctx = self.meta.ctx_len
        window, pos = divmod(int(global_index), ctx)
        shard = self._owner(self._check_window(window), shard)
        rec, _ = self._block(shard, window)
        if pos >= len(rec.token_ids):
            raise SaetuiInputError(
                f"global index {global_index} points past the end of window {window}."
            )
        seg = _segment_at(rec.segments, pos)
        if seg is None:
            ids = rec.token_ids[max(0, pos - radius) : pos + radius + 1]
            start = max(0, pos - radius)
            return DocumentContext(shard, -1, start, ids, self.token_strings(ids), pos - start)
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
        return DocumentContext(
            shard, doc_id, base + lo, ids, self.token_strings(ids), focus_doc - base - lo
        )

    def _adjacent(self, window: int, shard: int) -> codec.WindowRecord | None:
        """A window next to one being shown: in the same shard, or in the shard that holds
        it in a distributed index; None when it is not (yet) in the index."""
        if self.distributed:
            shard = self._owner(window, None)
        s = self._shard(shard)
        try:
            local = s.local(window)
        except ValueError:
            return None
        if local >= self._window_count(s):
            return None
        return self._block(shard, window)[0]

    # ------------------------------------------------------------ per-feature summaries

    def _load_columns(self) -> _Columns:
        serial = []
        for s in self._shards:
            with self._read(s) as txn:
                p = json.loads(txn.get(fmt.META_PROGRESS, db=s.dbs[fmt.DB_META]))
            serial.append(int(p["summary_serial"]))
        key = tuple(serial)
        with self._lock:
            if self._columns is not None and self._columns.serial == key:
                return self._columns
        d = self.meta.d_sae
        count = np.zeros(d, np.int64)
        sum_fx = np.zeros(d, np.int64)
        sumsq_fx = np.zeros(d, np.int64)
        max_bits = np.zeros(d, np.int64)
        counted = 0
        for s in self._shards:
            with self._read(s) as txn:
                blob = txn.get(b"columns", db=s.dbs[fmt.DB_FSUM])
                info = txn.get(b"info", db=s.dbs[fmt.DB_FSUM])
                if blob is None or info is None:
                    continue
                cols = decode_columns(blob)
            count += cols[0]
            sum_fx += cols[1]
            sumsq_fx += cols[2]
            np.maximum(max_bits, cols[3], out=max_bits)
            counted += int(json.loads(info)["n_counted"])
        with np.errstate(invalid="ignore", divide="ignore"):
            c = count.astype(np.float64)
            mean = np.where(count > 0, sum_fx / 2.0**SUM_UNIT_LOG2 / np.maximum(c, 1), 0.0)
            ex2 = np.where(count > 0, sumsq_fx / 2.0**SUMSQ_UNIT_LOG2 / np.maximum(c, 1), 0.0)
            std = np.sqrt(np.maximum(ex2 - mean * mean, 0.0))
        cols_obj = _Columns(
            serial=key,
            count=count,
            density=count / max(counted, 1),
            mean=mean,
            std=std,
            max=max_bits.astype(np.uint16).view(np.float16).astype(np.float64),
            counted_tokens=counted,
        )
        with self._lock:
            self._columns = cols_obj
        return cols_obj

    def stats(self, feature: int) -> FeatureStats:
        """Count, density, mean, std, max and the log-spaced histogram of one feature."""
        f = self._check_feature(feature)
        cols = self._load_columns()
        chunk, row = divmod(f, fmt.HIST_CHUNK)
        hist = np.zeros(fmt.N_HIST_BINS, np.int64)
        for s in self._shards:
            hkey = (cols.serial, s.index, chunk)
            with self._lock:
                arr = self._hist_cache.get(hkey)
            if arr is None:
                with self._read(s) as txn:
                    blob = txn.get(fmt.u32_key(chunk), db=s.dbs[fmt.DB_FHIST])
                    arr = (
                        np.frombuffer(codec.decompress(blob), "<i8").reshape(-1, fmt.N_HIST_BINS)
                        if blob is not None
                        else np.zeros((0, fmt.N_HIST_BINS), np.int64)
                    )
                with self._lock:
                    self._hist_cache[hkey] = arr
                    while len(self._hist_cache) > 64:
                        self._hist_cache.popitem(last=False)
            if row < len(arr):
                hist += arr[row]
        return FeatureStats(
            feature=f,
            count=int(cols.count[f]),
            density=float(cols.density[f]),
            mean=float(cols.mean[f]),
            std=float(cols.std[f]),
            max=float(cols.max[f]),
            histogram=hist,
            bin_edges=self.meta.hist_bin_edges,
            counted_tokens=cols.counted_tokens,
        )

    def _topk_entries(self, f: int) -> list[tuple[int, int, int, int]]:
        """(value bits, shard, global index, token) of the feature's top-K, best first."""
        out = []
        for s in self._shards:
            with self._read(s) as txn:
                blob = feature_blob(txn, s.dbs[fmt.DB_FTOPK], f)
            if blob is None:
                continue
            rec = decode_topk(blob)
            keys = rec["key"].astype(np.int64)
            bits = keys >> fmt.GIDX_BITS
            gidx = fmt.GIDX_MASK - (keys & fmt.GIDX_MASK)
            out += list(
                zip(
                    bits.tolist(),
                    [s.index] * len(rec),
                    gidx.tolist(),
                    rec["tok"].tolist(),
                    strict=False,
                )
            )
        if self.distributed:  # global token indexes: ties go to the earliest token
            out.sort(key=lambda e: (-e[0], e[2], e[1]))
        else:
            out.sort(key=lambda e: (-e[0], e[1], e[2]))
        return out[: self.meta.top_k]

    def _contexts(
        self, f: int, entries: list[tuple[int, int]]
    ) -> dict[tuple[int, int], tuple[codec.WindowRecord, np.ndarray, list[str]]]:
        """(window record, feature f on each token, token strings) per (shard, window).

        Decoded blocks in the cache are used; the others are read in one transaction per
        shard and only this feature is decoded from them (not cached: a feature's contexts
        are scattered over the corpus and would only evict the blocks `token()` reuses).
        """
        ctx = self.meta.ctx_len
        out: dict[tuple[int, int], tuple[codec.WindowRecord, np.ndarray, list[str]]] = {}
        missing: dict[int, list[int]] = {}
        for shard, gidx in entries:
            key = (shard, gidx // ctx)
            if key in out or key[1] in missing.get(shard, ()):
                continue
            with self._lock:
                hit = self._blocks.get(key)
            if hit is not None:
                rec, blk = hit
                out[key] = (rec, blk.feature_activations(f), self.token_strings(rec.token_ids))
            else:
                missing.setdefault(shard, []).append(key[1])
        for shard, windows in missing.items():
            s = self._shard(shard)
            with self._read(s, buffers=True) as txn:
                for window in windows:
                    local = self._local_or_raise(s, window)
                    tok = txn.get(fmt.u64_key(local), db=s.dbs[fmt.DB_TOK])
                    chunk = txn.get(fmt.u64_key(local // codec.FWD_CHUNK), db=s.dbs[fmt.DB_FWD])
                    i = local % codec.FWD_CHUNK
                    fwd = None if chunk is None else codec.chunk_blob(chunk, i)
                    if tok is None or fwd is None:
                        break
                    rec = codec.decode_window(bytes(tok))
                    acts = codec.feature_activations(fwd, f)
                    out[(shard, window)] = (rec, acts, self.token_strings(rec.token_ids))
            for window in windows:
                if (shard, window) not in out:
                    self._block(shard, window)  # raises the "not in the index" error
        if missing:
            self._release_mapped_pages(sum(len(w) for w in missing.values()))
        return out

    def _example(
        self,
        f: int,
        shard: int,
        gidx: int,
        bits: int,
        context: tuple[codec.WindowRecord, np.ndarray, list[str]] | None = None,
    ) -> Example:
        window, pos = divmod(gidx, self.meta.ctx_len)
        if context is None:
            rec, blk = self._block(shard, window)
            context = (rec, blk.feature_activations(f), self.token_strings(rec.token_ids))
        rec, activations, tokens = context
        seg = _segment_at(rec.segments, pos)
        doc_id, doc_off = (-1, pos) if seg is None else (int(seg[0]), int(seg[1] + pos - seg[2]))
        seg_start, seg_length = (
            (0, len(rec.token_ids)) if seg is None else (int(seg[2]), int(seg[3]))
        )
        return Example(
            feature=f,
            value=float(np.uint16(bits).view(np.float16)),
            shard=shard,
            window=window,
            position=pos,
            global_index=gidx,
            doc_id=doc_id,
            doc_offset=doc_off,
            token_ids=rec.token_ids,
            tokens=list(tokens),
            activations=activations,
            mask=rec.mask,
            segment_start=seg_start,
            segment_length=seg_length,
        )

    def top_examples(self, feature: int, n: int = 50) -> list[Example]:
        """The feature's strongest activations with their windows (ties: earliest token)."""
        f = self._check_feature(feature)
        entries = self._topk_entries(f)[:n]
        contexts = self._contexts(f, [(sh, g) for _, sh, g, _ in entries])
        ctx = self.meta.ctx_len
        return [self._example(f, sh, g, b, contexts[(sh, g // ctx)]) for b, sh, g, _ in entries]

    def top_tokens(self, feature: int) -> list[tuple[str, int]]:
        """Token strings the feature's top-K examples fire on, with counts, commonest first."""
        f = self._check_feature(feature)
        counts = Counter(t for _, _, _, t in self._topk_entries(f))
        strings = self.token_strings(list(counts))
        return sorted(zip(strings, counts.values(), strict=False), key=lambda x: (-x[1], x[0]))

    def interval_samples(self, feature: int, with_context: bool = True) -> list[IntervalSamples]:
        """A few deterministic random activations per octave of activation value."""
        f = self._check_feature(feature)
        per_bin: dict[int, list[tuple[int, int, int]]] = {}
        for s in self._shards:
            with self._read(s) as txn:
                blob = feature_blob(txn, s.dbs[fmt.DB_FSAMP], f)
            if blob is None:
                continue
            for b, g, bits in zip(
                *(decode_samples(blob)[k].tolist() for k in ("bin", "gidx", "bits")), strict=False
            ):
                per_bin.setdefault(b, []).append((s.index, g, bits))
        out = []
        for b in sorted(per_bin, reverse=True):
            entries = per_bin[b]
            if self.distributed and len(self._shards) > 1:
                # the ones a single process keeps: smallest hash(feature, global index)
                hashes = sample_hash(f, np.array([g for _, g, _ in entries], dtype=np.int64))
                entries = [entries[i] for i in np.argsort(hashes, kind="stable")]
            entries = entries[: self.meta.samples_per_bin]
            low = 2.0 ** (b + fmt.HIST_MIN_OCTAVE)
            examples = (
                [self._example(f, sh, g, bits) for sh, g, bits in entries] if with_context else []
            )
            out.append(IntervalSamples(low=low, high=2 * low, examples=examples))
        return out

    def neighbours(self, feature: int, metric: str | None = None) -> dict[str, Neighbours]:
        """Stored neighbour lists of a feature, by metric (all metrics when None)."""
        f = self._check_feature(feature)
        out: dict[str, Neighbours] = {}
        for s in self._shards:
            with self._read(s) as txn:
                raw = txn.get(fmt.META_NBR_METRICS, db=s.dbs[fmt.DB_META])
                names = json.loads(raw) if raw else []
                for mid, name in enumerate(names):
                    if name in out or (metric is not None and name != metric):
                        continue
                    blob = txn.get(fmt.nbr_key(f, mid), db=s.dbs[fmt.DB_FNBR])
                    if blob is None:
                        continue
                    n = len(blob) // 8
                    out[name] = Neighbours(
                        name,
                        np.frombuffer(blob, "<u4", n).astype(np.int64),
                        np.frombuffer(blob, "<f4", n, 4 * n),
                    )
        return out

    def feature(self, feature: int, n_examples: int = 50) -> FeatureDetail:
        """Everything the feature screen shows."""
        f = self._check_feature(feature)
        return FeatureDetail(
            stats=self.stats(f),
            examples=self.top_examples(f, n_examples),
            samples=self.interval_samples(f),
            top_tokens=self.top_tokens(f),
            neighbours=self.neighbours(f),
            label=self.label(f),
        )

    def features(
        self,
        sort: str = "density",
        descending: bool = True,
        filter: FeatureFilter | None = None,  # noqa: A002 - the API name the issue asks for
        page: int = 0,
        page_size: int = 100,
    ) -> FeaturePage:
        """One page of the table of all features, sorted and filtered (ties by feature id)."""
        if sort not in SORT_KEYS:
            raise SaetuiInputError(f"cannot sort features by {sort!r}: use one of {SORT_KEYS}.")
        if page < 0 or page_size < 1:
            raise SaetuiInputError("page must be >= 0 and page_size >= 1.")
        cols = self._load_columns()
        labels = self.labels() if (sort == "label" or filter is not None) else None
        order = self._order(cols, sort, descending, labels)
        if filter is not None:
            keep = np.ones(self.meta.d_sae, bool)
            if filter.min_density is not None:
                keep &= cols.density >= filter.min_density
            if filter.max_density is not None:
                keep &= cols.density <= filter.max_density
            if filter.min_max is not None:
                keep &= cols.max >= filter.min_max
            if filter.alive is not None:
                keep &= (cols.count > 0) == filter.alive
            if filter.labelled is not None or filter.label_contains:
                has = np.zeros(self.meta.d_sae, bool)
                needle = (filter.label_contains or "").lower()
                for f, lab in (labels or {}).items():
                    if f < self.meta.d_sae and needle in (lab.label + " " + lab.notes).lower():
                        has[f] = True
                if filter.labelled is False:
                    keep &= ~has
                else:
                    keep &= has
            order = order[keep[order]]
        rows = order[page * page_size : (page + 1) * page_size]
        if labels is None:
            labels = self.labels() if len(rows) else {}
        return FeaturePage(
            total=len(order),
            page=page,
            page_size=page_size,
            sort=sort,
            descending=descending,
            feature=rows,
            count=cols.count[rows],
            density=cols.density[rows],
            mean=cols.mean[rows],
            std=cols.std[rows],
            max=cols.max[rows],
            labels=[labels[f].label if f in labels else "" for f in rows.tolist()],
            counted_tokens=cols.counted_tokens,
        )

    def _order(
        self, cols: _Columns, sort: str, descending: bool, labels: dict[int, Label] | None
    ) -> np.ndarray:
        if sort == "label":
            keys = [(labels or {}).get(f) for f in range(self.meta.d_sae)]
            order = np.array(
                sorted(
                    range(self.meta.d_sae),
                    key=lambda f: (keys[f] is None, keys[f].label if keys[f] else "", f),
                ),
                dtype=np.int64,
            )
            return order[::-1].copy() if descending else order
        with self._lock:
            hit = cols.orders.get((sort, descending))
        if hit is not None:
            return hit
        ids = np.arange(self.meta.d_sae)
        if sort == "id":
            order = ids[::-1].copy() if descending else ids
        else:
            values = getattr(cols, sort)
            # lexsort: last key is primary; ties resolved by ascending feature id
            order = np.lexsort((ids, -values if descending else values))
        with self._lock:
            cols.orders[(sort, descending)] = order
        return order

    def search_tokens(
        self, text: str, exact: bool = False, limit: int = 100, match: str | None = None
    ) -> list[TokenMatch]:
        """Features whose top examples fire on tokens matching ``text``, most examples first.

        ``match``: "word" (default) — the token without its leading space or word marker
        equals ``text``, case-insensitive (so "the" finds " the" and "The"); "raw" — the
        token is exactly ``text`` (leading spaces count); "glob" — ``text`` is a shell
        pattern over the lower-cased token without its space (``*ing``, ``*photo*``).
        ``exact=True`` is "word" (kept for old callers)."""
        if not text:
            raise SaetuiInputError("search text is empty: type part of a token, e.g. 'photo'.")
        match = match or "word"
        if match not in ("word", "raw", "glob"):
            raise SaetuiInputError(f"token match {match!r} is not one of word, raw, glob.")
        if self._vocab_lower is None:
            self._vocab_lower = [t.strip(" Ġ▁").lower() for t in self.vocab]
        needle = text.strip(" Ġ▁").lower() if match != "raw" else text
        if match == "raw":
            matches = [i for i, t in enumerate(self.vocab) if t == needle]
        elif match == "glob":
            import fnmatch

            matches = [i for i, t in enumerate(self._vocab_lower) if fnmatch.fnmatchcase(t, needle)]
        else:
            matches = [i for i, t in enumerate(self._vocab_lower) if t == needle]
        counts: Counter[int] = Counter()
        tokens_of: dict[int, set[int]] = {}
        for s in self._shards:
            with self._read(s) as txn:
                db = s.dbs[fmt.DB_TTOK]
                for t in matches:
                    blob = txn.get(fmt.u32_key(t), db=db)
                    if blob is None:
                        continue
                    rec = decode_ttok(blob)
                    for f, c in zip(rec["feature"].tolist(), rec["count"].tolist(), strict=False):
                        counts[f] += c
                        tokens_of.setdefault(f, set()).add(t)
        best = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:limit]
        return [TokenMatch(f, c, self.token_strings(sorted(tokens_of[f]))) for f, c in best]

    # ------------------------------------------------------------ user data (UserStore)

    def set_label(self, feature: int, label: str, notes: str = "") -> None:
        """Store (or replace) the user's label and notes for a feature."""
        self.user.set_labels({self._check_feature(feature): (label, notes)})

    def set_labels(self, labels: dict[int, str | tuple[str, str]]) -> None:
        """Store many labels in one short write transaction (e.g. `saetui labels import`)."""
        self.user.set_labels(labels)

    def delete_label(self, feature: int) -> None:
        self.user.delete_label(feature)

    def label(self, feature: int) -> Label | None:
        return self.user.label(feature)

    def labels(self) -> dict[int, Label]:
        return self.user.labels()

    def add_bookmark(self, feature: int, note: str = "") -> None:
        self.user.add_bookmark(feature, note)

    def remove_bookmark(self, feature: int) -> None:
        self.user.remove_bookmark(feature)

    def bookmarks(self) -> list[Bookmark]:
        return self.user.bookmarks()

    # ------------------------------------------------------------ positions (postings, queries)

    @property
    def shard_ids(self) -> list[int]:
        """The ids of the shards this reader merges, in the order of ``progress().shards``."""
        return [s.index for s in self._shards]

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
        s = self._shard(shard)
        n_windows = self._window_count(s)
        end = n_windows if end_window is None else min(int(end_window), n_windows)
        ctx = self.meta.ctx_len
        window = max(0, int(first_window))
        while window < end:
            stop = min(end, window + max(1, windows_per_chunk))
            parts: list[tuple[int, codec.WindowRecord, codec.ForwardBlock]] = []
            with self._read(s) as txn:
                record, chunk = -1, None
                for w in range(window, stop):
                    if w // codec.FWD_CHUNK != record:
                        record = w // codec.FWD_CHUNK
                        chunk = txn.get(fmt.u64_key(record), db=s.dbs[fmt.DB_FWD])
                    tok = txn.get(fmt.u64_key(w), db=s.dbs[fmt.DB_TOK])
                    blob = None if chunk is None else codec.chunk_blob(chunk, w % codec.FWD_CHUNK)
                    if tok is None or blob is None:
                        raise IndexDamagedError(
                            f"window {w} of shard {shard} of the index {self.path} is missing "
                            "although committed: restore the index or collect it again."
                        )
                    with self._guard(s.path):
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
                        self._global_window(s, w) * ctx + np.arange(length)
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
            self._release_mapped_pages(len(parts))
            window = stop

    @staticmethod
    def _global_window(s: _Shard, local: int) -> int:
        return local if s.layout is None else int(s.layout.global_window(local))

    def window_activations(self, window: int, features: list[int], shard: int = 0) -> np.ndarray:
        """The activation of each of ``features`` on every token of one window: float32
        ``[len(features), n_tokens]`` (0 where a feature does not fire)."""
        fs = [self._check_feature(f) for f in features]
        _, blk = self._block(shard, self._check_window(window))
        out = np.zeros((len(fs), blk.n_tokens), np.float32)
        for row, f in enumerate(fs):
            out[row] = blk.feature_activations(f)
        return out


def _segment_at(segments: np.ndarray, pos: int) -> np.ndarray | None:
    for row in segments:
        if row[2] <= pos < row[2] + row[3]:
            return row
    return None


def _shard_name(where: Path | str) -> str:
    """'shard 0 of the index INDEX' for a shard directory, else the path."""
    path = Path(where)
    if path.name.startswith(fmt.SHARD_PREFIX) and path.name[len(fmt.SHARD_PREFIX) :].isdigit():
        return f"shard {int(path.name[len(fmt.SHARD_PREFIX) :])} of the index {path.parent}"
    return f"the index {path}"

"""Per-feature queries merged over the shards: summary columns (count, density, mean, std,
max) and histograms, top examples with their contexts, interval samples, stored
neighbours, the sorted and filtered table of all features, and token search.

Merging rules (README "index format"): counts and sums add up, maxima take the max,
top-K lists merge by (value desc, global index), samples keep per octave the smallest
hash(feature, global index).
"""

from __future__ import annotations

import fnmatch
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.index import codec
from saetui.index import format as fmt
from saetui.index.lru import LRU
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
from saetui.index.shards import ShardSet
from saetui.index.types import (
    Example,
    FeatureFilter,
    FeaturePage,
    FeatureStats,
    IndexMeta,
    IntervalSamples,
    Label,
    Neighbours,
    TokenMatch,
)
from saetui.index.windows import Context, WindowStore, segment_at

SORT_KEYS = ("id", "count", "density", "mean", "std", "max", "label")
HIST_CACHE = 64  # histogram chunks (1024 features each) kept per reader
TopEntry = tuple[int, int, int, int]  # value bits, shard, global index, token


@dataclass
class Columns:
    """Summary columns merged over the shards, as of the shards' `summary_serial`s."""

    serial: tuple[int, ...]
    count: np.ndarray
    density: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    counted_tokens: int
    orders: dict[tuple[str, bool], np.ndarray] = field(default_factory=dict)


class FeatureQueries:
    """Everything about features; thread-safe (caches keyed by the summary checkpoint)."""

    def __init__(
        self,
        shards: ShardSet,
        windows: WindowStore,
        meta: IndexMeta,
        labels: Callable[[], dict[int, Label]],
    ) -> None:
        self.shards, self.windows, self.meta = shards, windows, meta
        self._labels = labels
        self._lock = threading.Lock()  # guards _columns and each Columns.orders
        self._columns: Columns | None = None
        self._hist: LRU[tuple[tuple[int, ...], int, int], np.ndarray] = LRU(HIST_CACHE)

    def check_feature(self, feature: int) -> int:
        d = self.meta.d_sae
        if not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < d:
            raise SaetuiInputError(
                f"feature {feature} is out of range: this index has d_sae={d} features (0-{d - 1})."
            )
        return int(feature)

    # ------------------------------------------------------------ summaries

    def load_columns(self) -> Columns:
        """The merged summary columns, re-read only after a new checkpoint."""
        key = tuple(
            int(self.shards.progress_record(s)["summary_serial"]) for s in self.shards.shards
        )
        with self._lock:
            if self._columns is not None and self._columns.serial == key:
                return self._columns
        d = self.meta.d_sae
        count = np.zeros(d, np.int64)
        sum_fx = np.zeros(d, np.int64)
        sumsq_fx = np.zeros(d, np.int64)
        max_bits = np.zeros(d, np.int64)
        counted = 0
        for s in self.shards.shards:
            with self.shards.read(s) as txn:
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
        columns = Columns(
            serial=key,
            count=count,
            density=count / max(counted, 1),
            mean=mean,
            std=std,
            max=max_bits.astype(np.uint16).view(np.float16).astype(np.float64),
            counted_tokens=counted,
        )
        with self._lock:
            self._columns = columns
        return columns

    def stats(self, feature: int) -> FeatureStats:
        """Count, density, mean, std, max and the log-spaced histogram of one feature."""
        f = self.check_feature(feature)
        cols = self.load_columns()
        chunk, row = divmod(f, fmt.HIST_CHUNK)
        hist = np.zeros(fmt.N_HIST_BINS, np.int64)
        for s in self.shards.shards:
            hkey = (cols.serial, s.index, chunk)
            arr = self._hist.get(hkey)
            if arr is None:
                with self.shards.read(s) as txn:
                    blob = txn.get(fmt.u32_key(chunk), db=s.dbs[fmt.DB_FHIST])
                    arr = (
                        np.frombuffer(codec.decompress(blob), "<i8").reshape(-1, fmt.N_HIST_BINS)
                        if blob is not None
                        else np.zeros((0, fmt.N_HIST_BINS), np.int64)
                    )
                self._hist.put(hkey, arr)
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

    # ------------------------------------------------------------ examples

    def _topk_entries(self, f: int) -> list[TopEntry]:
        """(value bits, shard, global index, token) of the feature's top-K, best first."""
        out: list[TopEntry] = []
        for s in self.shards.shards:
            with self.shards.read(s) as txn:
                blob = feature_blob(txn, s.dbs[fmt.DB_FTOPK], f)
            if blob is None:
                continue
            rec = decode_topk(blob)
            keys = rec["key"].astype(np.int64)
            bits = keys >> fmt.GIDX_BITS
            gidx = fmt.GIDX_MASK - (keys & fmt.GIDX_MASK)
            out += zip(
                bits.tolist(), [s.index] * len(rec), gidx.tolist(), rec["tok"].tolist(), strict=True
            )
        if self.shards.distributed:  # global token indexes: ties go to the earliest token
            out.sort(key=lambda e: (-e[0], e[2], e[1]))
        else:
            out.sort(key=lambda e: (-e[0], e[1], e[2]))
        return out[: self.meta.top_k]

    def _example(
        self, f: int, shard: int, gidx: int, bits: int, context: Context | None = None
    ) -> Example:
        window, pos = divmod(gidx, self.meta.ctx_len)
        if context is None:
            rec, blk = self.windows.block(shard, window)
            context = (rec, blk.feature_activations(f), self.shards.token_strings(rec.token_ids))
        rec, activations, tokens = context
        seg = segment_at(rec.segments, pos)
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
        f = self.check_feature(feature)
        entries = self._topk_entries(f)[:n]
        contexts = self.windows.contexts(f, [(sh, g) for _, sh, g, _ in entries])
        ctx = self.meta.ctx_len
        return [self._example(f, sh, g, b, contexts[(sh, g // ctx)]) for b, sh, g, _ in entries]

    def top_tokens(self, feature: int) -> list[tuple[str, int]]:
        """Token strings the feature's top-K examples fire on, with counts, commonest first."""
        f = self.check_feature(feature)
        counts = Counter(t for _, _, _, t in self._topk_entries(f))
        strings = self.shards.token_strings(list(counts))
        return sorted(zip(strings, counts.values(), strict=True), key=lambda x: (-x[1], x[0]))

    def interval_samples(self, feature: int, with_context: bool = True) -> list[IntervalSamples]:
        """A few deterministic random activations per octave of activation value."""
        f = self.check_feature(feature)
        per_bin: dict[int, list[tuple[int, int, int]]] = {}
        for s in self.shards.shards:
            with self.shards.read(s) as txn:
                blob = feature_blob(txn, s.dbs[fmt.DB_FSAMP], f)
            if blob is None:
                continue
            rec = decode_samples(blob)
            for b, g, bits in zip(
                rec["bin"].tolist(), rec["gidx"].tolist(), rec["bits"].tolist(), strict=True
            ):
                per_bin.setdefault(b, []).append((s.index, g, bits))
        out = []
        for b in sorted(per_bin, reverse=True):
            entries = per_bin[b]
            if self.shards.distributed and len(self.shards.shards) > 1:
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
        f = self.check_feature(feature)
        out: dict[str, Neighbours] = {}
        for s in self.shards.shards:
            with self.shards.read(s) as txn:
                raw = txn.get(fmt.META_NBR_METRICS, db=s.dbs[fmt.DB_META])
                names: list[str] = json.loads(raw) if raw else []
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

    # ------------------------------------------------------------ the feature table

    def features(
        self,
        sort: str = "density",
        descending: bool = True,
        filter: FeatureFilter | None = None,  # the API name the issue asks for
        page: int = 0,
        page_size: int = 100,
    ) -> FeaturePage:
        """One page of the table of all features, sorted and filtered (ties by feature id)."""
        if sort not in SORT_KEYS:
            raise SaetuiInputError(f"cannot sort features by {sort!r}: use one of {SORT_KEYS}.")
        if page < 0 or page_size < 1:
            raise SaetuiInputError("page must be >= 0 and page_size >= 1.")
        d = self.meta.d_sae
        cols = self.load_columns()
        labels = self._labels() if (sort == "label" or filter is not None) else None
        order = self._order(cols, sort, descending, labels)
        if filter is not None:
            keep = np.ones(d, bool)
            if filter.min_density is not None:
                keep &= cols.density >= filter.min_density
            if filter.max_density is not None:
                keep &= cols.density <= filter.max_density
            if filter.min_max is not None:
                keep &= cols.max >= filter.min_max
            if filter.alive is not None:
                keep &= (cols.count > 0) == filter.alive
            if filter.labelled is not None or filter.label_contains:
                has = np.zeros(d, bool)
                needle = (filter.label_contains or "").lower()
                for f, lab in (labels or {}).items():
                    if f < d and needle in (lab.label + " " + lab.notes).lower():
                        has[f] = True
                keep &= ~has if filter.labelled is False else has
            order = order[keep[order]]
        rows = order[page * page_size : (page + 1) * page_size]
        if labels is None:
            labels = self._labels() if len(rows) else {}
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
        self, cols: Columns, sort: str, descending: bool, labels: dict[int, Label] | None
    ) -> np.ndarray:
        d = self.meta.d_sae
        if sort == "label":
            names = labels or {}

            def by_label(f: int) -> tuple[bool, str, int]:
                lab = names.get(f)
                return (lab is None, lab.label if lab is not None else "", f)

            order = np.array(sorted(range(d), key=by_label), dtype=np.int64)
            return order[::-1].copy() if descending else order
        with self._lock:
            hit = cols.orders.get((sort, descending))
        if hit is not None:
            return hit
        ids = np.arange(d)
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
        """Features whose top examples fire on tokens matching ``text``; see
        `IndexReader.search_tokens`."""
        if not text:
            raise SaetuiInputError("search text is empty: type part of a token, e.g. 'photo'.")
        match = match or "word"
        if match not in ("word", "raw", "glob"):
            raise SaetuiInputError(f"token match {match!r} is not one of word, raw, glob.")
        needle = text.strip(" Ġ▁").lower() if match != "raw" else text
        if match == "raw":
            matches = [i for i, t in enumerate(self.shards.vocab) if t == needle]
        elif match == "glob":
            lower = self.shards.vocab_lower
            matches = [i for i, t in enumerate(lower) if fnmatch.fnmatchcase(t, needle)]
        else:
            matches = [i for i, t in enumerate(self.shards.vocab_lower) if t == needle]
        counts: Counter[int] = Counter()
        tokens_of: dict[int, set[int]] = {}
        for s in self.shards.shards:
            with self.shards.read(s) as txn:
                db = s.dbs[fmt.DB_TTOK]
                for t in matches:
                    blob = txn.get(fmt.u32_key(t), db=db)
                    if blob is None:
                        continue
                    rec = decode_ttok(blob)
                    for f, c in zip(rec["feature"].tolist(), rec["count"].tolist(), strict=True):
                        counts[f] += c
                        tokens_of.setdefault(f, set()).add(t)
        best = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:limit]
        strings = self.shards.token_strings
        return [TokenMatch(f, c, strings(sorted(tokens_of[f]))) for f, c in best]

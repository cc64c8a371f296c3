"""Co-occurrence neighbours from the forward index: one pass, bounded memory.

Counting is N * k^2 pair updates whatever d_sae is, but keeping every pair's count is not
bounded (up to min(N * k^2, d_sae^2) distinct pairs: ~22 GB as dense stripes at d_sae
131k). So:

- tokens are read in groups (global window order); a group's pair counts are one sparse
  product ``A.T @ A`` of its binary token x feature matrix (C++ in scipy, no Python loop
  per token), diagonal dropped;
- group counts are summed exactly into a *pending* sparse matrix; when it holds more than
  ``pending_pairs`` entries it is *folded* into two bounded candidate tables per feature:
  one weighted by count (what P(g|f) ranks by) and one by count / count(g) (lift: what
  NPMI and Jaccard favour), ``candidates // 2`` slots each. A table is a Misra-Gries
  summary (mergeable form, Agarwal et al. 2012): when a feature's row overflows, the
  (C+1)-th largest weight is subtracted from all and what is not positive leaves;
- every candidate also keeps its exact count since it entered; scores use that count and
  the exact per-feature counts.

Exact while no feature has more distinct partners than its table holds (tables fill only
when some feature meets more than ``candidates // 2`` others); beyond that a partner whose
weight exceeds 1/(C+1) of the feature's total is guaranteed kept, and its count is exact
unless it was evicted once. Memory: the tables (about 24 * candidates bytes per feature),
the pending matrix (12 bytes per entry) and one group's product. Rows are independent, so
each rank can fold its own rows of a distributed run, and fold points depend on the data
only (entry counts), never on timing: a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

METRICS = ("jaccard", "npmi", "p_g_given_f")
DEFAULT_CANDIDATES = 64
DEFAULT_PENDING_PAIRS = 1 << 22  # ~50 MB of exact pair counts between folds
GROUP_TOKENS = 4096  # tokens per group: one product of <= 4096 * k^2 entries

_NO_ID = np.int32(-1)


@dataclass
class CooccurrenceNeighbours:
    """Top-N co-occurring features per feature for each metric; -1 pads missing slots."""

    ids: dict[str, np.ndarray]  # metric -> int64 [rows, n]
    scores: dict[str, np.ndarray]  # metric -> float32 [rows, n]
    counts: np.ndarray  # int64 [d_sae]: tokens each feature fired on
    tokens: int
    overflowed: int = 0  # features whose candidate table overflowed at least once


def tokens_matrix(offsets: np.ndarray, feature_ids: np.ndarray, d_sae: int) -> sp.csr_matrix:
    """Binary [tokens, d_sae] CSR matrix of which features fired on which token."""
    data = np.ones(len(feature_ids), dtype=np.int32)
    return sp.csr_matrix(
        (data, feature_ids.astype(np.int32, copy=False), offsets),
        shape=(len(offsets) - 1, d_sae),
    )


def pair_counts(tokens: sp.csr_matrix) -> sp.csr_matrix:
    """[d_sae, d_sae] counts of tokens on which both features fired, diagonal dropped,
    indices sorted (CSR, int32 counts)."""
    binary = tokens if tokens.dtype == np.int32 else tokens.astype(np.int32)
    product = binary.T.tocsr() @ binary
    # the product is symmetric: its CSC form (a linear counting sort) is its sorted CSR form
    product = product.tocsc()
    n = product.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(product.indptr))
    on_diagonal = product.indices == rows
    counts = np.diff(product.indptr) - np.bincount(rows[on_diagonal], minlength=n)
    del rows
    off_diagonal = ~on_diagonal
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    result = sp.csr_matrix(
        (product.data[off_diagonal], product.indices[off_diagonal], indptr),
        shape=product.shape,
    )
    result.has_sorted_indices = True
    return result


class _CandidateTable:
    """Per row, at most ``capacity`` (partner, weight, count since entry) in a Misra-Gries
    summary; partners kept in ascending id order."""

    def __init__(self, n_rows: int, capacity: int) -> None:
        self.ids = np.full((n_rows, capacity), _NO_ID, dtype=np.int32)
        self.weight = np.zeros((n_rows, capacity), dtype=np.float32)
        self.seen = np.zeros((n_rows, capacity), dtype=np.int64)
        self.overflowed = np.zeros(n_rows, dtype=bool)

    def fold(self, pending: sp.csr_matrix, scale: np.ndarray | None) -> None:
        """Add ``pending`` counts (weighted by ``scale[partner]``, or by 1) and cut every
        row back to ``capacity`` partners."""
        n, capacity = self.ids.shape
        have = self.ids >= 0
        slots = np.flatnonzero(have)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(have.sum(1), out=indptr[1:])
        # one sparse sum gives the union of table and pending entries; each entry gets at
        # most one of each, so the table's slot (high 32 bits) and the pending count (low
        # 32 bits) come out packed side by side
        table = sp.csr_matrix(
            ((slots + 1).astype(np.int64) << 32, self.ids.reshape(-1)[slots], indptr),
            shape=pending.shape,
        )
        union = (table + pending.astype(np.int64)).tocsr()
        del table, slots
        union.sort_indices()
        slot = (union.data >> 32) - 1
        seen = union.data & 0xFFFFFFFF
        partners = union.indices
        lengths = np.diff(union.indptr)
        del union
        values = seen.astype(np.float32)
        if scale is not None:
            values *= scale[partners]
        in_table = np.flatnonzero(slot >= 0)
        old = slot[in_table]
        values[in_table] += self.weight.reshape(-1)[old]
        seen[in_table] += self.seen.reshape(-1)[old]
        del slot, in_table, old
        row_of = np.repeat(np.arange(n, dtype=np.int32), lengths)
        over = lengths > capacity
        if over.any():
            # the (capacity+1)-th largest weight of each overflowing row, from one sort of
            # (row, weight descending) keys; float32 > 0 orders like its bits
            in_over = over[row_of]
            keys = row_of[in_over].astype(np.uint64)
            keys <<= np.uint64(32)
            keys |= np.uint64(0xFFFFFFFF) - values[in_over].view(np.uint32).astype(np.uint64)
            del in_over
            keys.sort()
            starts = np.concatenate([[0], np.cumsum(lengths[over])[:-1]])
            kth = keys[starts + capacity] & np.uint64(0xFFFFFFFF)
            del keys
            cut = np.zeros(n, dtype=np.float32)
            cut[over] = (np.uint64(0xFFFFFFFF) - kth).astype(np.uint32).view(np.float32)
            values -= cut[row_of]
            keep = np.flatnonzero(values > 0)
            self.overflowed |= over
        else:
            keep = np.arange(len(values))
        kept_rows = row_of[keep]
        per_row = np.bincount(kept_rows, minlength=n)
        slot_in_row = np.arange(len(kept_rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        flat = kept_rows.astype(np.int64) * capacity + slot_in_row
        self.ids.fill(_NO_ID)
        self.weight.fill(0)
        self.seen.fill(0)
        self.ids.reshape(-1)[flat] = partners[keep]
        self.weight.reshape(-1)[flat] = values[keep]
        self.seen.reshape(-1)[flat] = seen[keep]


class CooccurrenceCounter:
    """Bounded co-occurrence state of feature rows ``rows`` = [lo, hi) (all rows in one
    process; a share of them per rank in a distributed run).

    ``counts`` (int64 [d_sae]) and ``tokens`` are the exact per-feature token counts and the
    number of tokens over the whole collection.
    """

    def __init__(
        self,
        d_sae: int,
        counts: np.ndarray,
        tokens: int,
        *,
        rows: tuple[int, int] | None = None,
        top_n: int = 16,
        min_count: int = 3,
        candidates: int = DEFAULT_CANDIDATES,
    ) -> None:
        if candidates < 2 or top_n < 1:
            raise ValueError("candidates must be >= 2 and top_n >= 1")
        self.d_sae = d_sae
        self.rows = rows or (0, d_sae)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.tokens = int(tokens)
        self.top_n, self.min_count = top_n, min_count
        n = self.rows[1] - self.rows[0]
        self._by_count = _CandidateTable(n, max(1, candidates // 2))
        self._by_lift = _CandidateTable(n, max(1, candidates - candidates // 2))
        self._inverse_count = (1.0 / np.maximum(self.counts, max(min_count, 1))).astype(np.float32)
        self._pending: sp.csr_matrix | None = None

    @property
    def pending_entries(self) -> int:
        """Exact pair counts held since the last fold."""
        return 0 if self._pending is None else int(self._pending.nnz)

    def add(self, pairs: sp.csr_matrix) -> None:
        """Add pair counts of this counter's rows ([hi - lo, d_sae], from pair_counts)."""
        if pairs.nnz == 0:
            return
        self._pending = pairs if self._pending is None else (self._pending + pairs).tocsr()

    def fold(self) -> None:
        """Fold the pending counts into the candidate tables (a no-op when none)."""
        pending = self._pending
        if pending is None:
            return
        self._by_count.fold(pending, None)
        self._by_lift.fold(pending, self._inverse_count)
        self._pending = None

    def state(self) -> dict[str, np.ndarray]:
        """The tables as arrays (after a fold: pending counts are not part of it)."""
        if self._pending is not None:
            raise RuntimeError("fold before taking the state")
        out = {}
        for name, table in (("count", self._by_count), ("lift", self._by_lift)):
            for field in ("ids", "weight", "seen", "overflowed"):
                out[f"{name}_{field}"] = getattr(table, field)
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        for name, table in (("count", self._by_count), ("lift", self._by_lift)):
            for field in ("ids", "weight", "seen", "overflowed"):
                value = np.asarray(state[f"{name}_{field}"])
                if value.shape != getattr(table, field).shape:
                    raise ValueError("co-occurrence state of another shape")
                setattr(table, field, value.astype(getattr(table, field).dtype))
        self._pending = None

    def result(self, rows_per_step: int = 8192) -> CooccurrenceNeighbours:
        """Top-N neighbours of this counter's rows by each metric (folds first); ranked a
        slice of rows at a time so the temporaries stay small."""
        self.fold()
        lo, hi = self.rows
        n = hi - lo
        out_ids = {m: np.full((n, self.top_n), -1, dtype=np.int64) for m in METRICS}
        out_scores = {m: np.zeros((n, self.top_n), dtype=np.float32) for m in METRICS}
        for a in range(0, n, rows_per_step):
            b = min(a + rows_per_step, n)
            for metric, (ids, scores) in self._rank(a, b).items():
                out_ids[metric][a:b, : ids.shape[1]] = ids
                out_scores[metric][a:b, : ids.shape[1]] = scores
        overflowed = int((self._by_count.overflowed | self._by_lift.overflowed).sum())
        return CooccurrenceNeighbours(out_ids, out_scores, self.counts, self.tokens, overflowed)

    def _rank(self, a: int, b: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(ids, scores) of table rows [a, b) by each metric, best first; ties: smaller id."""
        tables = (self._by_count, self._by_lift)
        # candidates of both tables; a partner in both keeps its larger count
        ids = np.concatenate([t.ids[a:b] for t in tables], axis=1).astype(np.int64)
        seen = np.concatenate([t.seen[a:b] for t in tables], axis=1)
        ids[ids < 0] = 0xFFFFFFFF
        keys = (ids.astype(np.uint64) << np.uint64(32)) | (
            np.uint64(0xFFFFFFFF) - np.minimum(seen, 0xFFFFFFFF).astype(np.uint64)
        )
        keys.sort(axis=1)  # by partner, larger count first
        ids = (keys >> np.uint64(32)).astype(np.int64)
        seen = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
        first = np.ones(ids.shape, dtype=bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        valid = first & (ids < self.d_sae) & (seen >= max(self.min_count, 1))
        ids = np.where(valid, ids, 0)
        lo = self.rows[0]
        c_fg = seen.astype(np.float64)
        c_f = self.counts[lo + a : lo + b].astype(np.float64)[:, None]
        c_g = self.counts[ids].astype(np.float64)
        n_tokens = max(self.tokens, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            p_fg = c_fg / n_tokens
            by_metric = {
                "jaccard": c_fg / (c_f + c_g - c_fg),
                "npmi": np.log(p_fg / ((c_f / n_tokens) * (c_g / n_tokens))) / -np.log(p_fg),
                "p_g_given_f": c_fg / c_f,
            }
        top_n = min(self.top_n, ids.shape[1])
        out = {}
        for metric, values in by_metric.items():
            values = np.where(valid & np.isfinite(values), values, -np.inf)
            # stable on rows in ascending partner order: ties go to the smaller id
            order = np.argsort(-values, axis=1, kind="stable")[:, :top_n]
            best = np.take_along_axis(values, order, axis=1)
            keep = np.isfinite(best)
            out[metric] = (
                np.where(keep, np.take_along_axis(ids, order, axis=1), -1),
                np.where(keep, best, 0.0).astype(np.float32),
            )
        return out


def cooccurrence_neighbours(
    chunks: Callable[[], Iterable[sp.csr_matrix]],
    d_sae: int,
    *,
    top_n: int = 16,
    min_count: int = 3,
    counts: np.ndarray | None = None,
    tokens: int | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    pending_pairs: int = DEFAULT_PENDING_PAIRS,
    check_stop: Callable[[], None] | None = None,
) -> CooccurrenceNeighbours:
    """Jaccard, NPMI and P(g|f) neighbours of every feature, in one process.

    ``chunks()`` yields binary CSR matrices [tokens, d_sae] (a feature fired on a token),
    each counted as one group. Without ``counts`` and ``tokens`` (per-feature token counts
    and the token total) a first, cheap pass counts them, so ``chunks`` is called twice.
    Pairs seen on fewer than ``min_count`` tokens are ignored. ``check_stop`` is called
    between chunks and raises to stop.
    """
    check = check_stop or (lambda: None)
    if counts is None or tokens is None:
        counts = np.zeros(d_sae, dtype=np.int64)
        tokens = 0
        for chunk in chunks():
            check()
            counts += np.bincount(chunk.indices, minlength=d_sae)
            tokens += chunk.shape[0]
    counter = CooccurrenceCounter(
        d_sae, counts, tokens, top_n=top_n, min_count=min_count, candidates=candidates
    )
    if tokens:
        for chunk in chunks():
            check()
            counter.add(pair_counts(chunk))
            if counter.pending_entries >= pending_pairs:
                counter.fold()
    return counter.result()

"""SAE-vs-SAE comparison: decoder-direction matching, activation matching on shared
windows, and splits of a smaller SAE's features into a larger one's (no Textual here).

- Decoder matching: cosines of unit decoder rows, ``chunk`` rows at a time on the best
  device (cuda > mps > cpu), top-N neighbours both ways. A one-to-one assignment uses
  ``scipy.optimize.linear_sum_assignment`` (maximum total cosine) when both sizes are at most
  ``hungarian_max``; above that a greedy matching over the top-N candidate edges (highest
  cosine first, each feature used once). Greedy is a 1/2-approximation of the maximum-weight
  matching; a feature whose N candidates were all taken stays unassigned.
- Activation matching: both forward indexes are streamed chunk by chunk in step; each chunk's
  co-firing counts are one sparse product of its binary token x feature matrices, summed into a
  sparse pair table (exact while it holds at most ``max_pairs`` pairs; past that each feature
  keeps its ``candidates`` most frequent partners, and ``pruned`` says so).
- Splits: a child of parent p (smaller SAE) is a feature c of the larger SAE with decoder cosine
  >= ``split_cosine`` and at least ``child_precision`` of c's firings on tokens where p fires.
  A second pass measures coverage: the share of p's firings where some child fires, and of
  the children's firings (any child) where p fires; and keeps the first tokens where p fires
  without any child (absorption candidates) and where a child fires without p.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from saetui.errors import SaetuiInputError

HUNGARIAN_MAX = 8192
HISTOGRAM_EDGES = np.linspace(-1.0, 1.0, 41)
# run_config fields that describe the SAE or the model's numerics, not the corpus windows
_NOT_CORPUS = {
    "hook",
    "numerics",
    "dtype",
    "sae_path",
    "sae_sha256",
    "sae_format",
    "sae_architecture",
    "batchtopk_mode",
    "threshold",
}


@dataclass
class DecoderMatch:
    """Decoder-direction matching of SAE A [d_a] against SAE B [d_b]."""

    ids_ab: np.ndarray  # int64 [d_a, n]: B's nearest features to each A feature
    cos_ab: np.ndarray  # float32 [d_a, n]
    ids_ba: np.ndarray  # int64 [d_b, n]
    cos_ba: np.ndarray  # float32 [d_b, n]
    pairs: np.ndarray  # int64 [m, 2]: the one-to-one assignment (a, b)
    pair_cos: np.ndarray  # float32 [m]
    method: str  # "hungarian" or "greedy"
    seconds: float = 0.0

    @property
    def best_cos_ab(self) -> np.ndarray:
        return self.cos_ab[:, 0]

    @property
    def best_cos_ba(self) -> np.ndarray:
        return self.cos_ba[:, 0]

    @property
    def mean_max_cos_ab(self) -> float:
        """Mean over A's features of the best cosine in B."""
        return float(self.best_cos_ab.mean())

    @property
    def mean_max_cos_ba(self) -> float:
        return float(self.best_cos_ba.mean())

    def histogram(self) -> dict[str, list[float] | list[int]]:
        """Counts of best-match cosines both ways in 40 bins over [-1, 1]."""
        return {
            "edges": [round(float(e), 4) for e in HISTOGRAM_EDGES],
            "a_to_b": np.histogram(self.best_cos_ab, HISTOGRAM_EDGES)[0].tolist(),
            "b_to_a": np.histogram(self.best_cos_ba, HISTOGRAM_EDGES)[0].tolist(),
        }

    def unmatched(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Features of A, and of B, whose best cosine on the other side is below threshold."""
        return (
            np.flatnonzero(self.best_cos_ab < threshold),
            np.flatnonzero(self.best_cos_ba < threshold),
        )


def _unit(w_dec: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.nn.functional.normalize(w_dec.to(device=device, dtype=torch.float32), dim=-1)


@torch.no_grad()
def cross_neighbours(
    w_a: torch.Tensor,
    w_b: torch.Tensor,
    top_n: int = 8,
    chunk: int = 4096,
    *,
    device: torch.device | str | None = None,
    max_chunk_bytes: int = 256 << 20,
    check_stop: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``top_n`` features of B by decoder cosine for every feature of A.

    ``w_a`` [d_a, d_in], ``w_b`` [d_b, d_in]; never more than ``max_chunk_bytes`` of cosines at
    once. Returns (ids int64 [d_a, n], cosines float32 [d_a, n]) on the CPU, best first.
    """
    from saetui.sae.model import best_device

    dev = torch.device(device) if device is not None else best_device()
    unit_a, unit_b = _unit(w_a, dev), _unit(w_b, dev)
    d_a, d_b = unit_a.shape[0], unit_b.shape[0]
    n = min(top_n, d_b)
    chunk = max(1, min(chunk, max_chunk_bytes // (4 * d_b)))
    ids = np.empty((d_a, n), dtype=np.int64)
    scores = np.empty((d_a, n), dtype=np.float32)
    for start in range(0, d_a, chunk):
        if check_stop is not None:
            check_stop()
        best = (unit_a[start : start + chunk] @ unit_b.T).topk(n, dim=-1)
        stop = start + best.values.shape[0]
        ids[start:stop] = best.indices.cpu().numpy()
        scores[start:stop] = best.values.float().cpu().numpy()
    return ids, scores


def greedy_assignment(
    ids_ab: np.ndarray, cos_ab: np.ndarray, ids_ba: np.ndarray, cos_ba: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs from the top-N candidate edges of both directions, highest cosine
    first. Returns (pairs int64 [m, 2], cosines float32 [m])."""
    d_a, d_b = ids_ab.shape[0], ids_ba.shape[0]
    a = np.concatenate([np.repeat(np.arange(d_a), ids_ab.shape[1]), ids_ba.ravel()])
    b = np.concatenate([ids_ab.ravel(), np.repeat(np.arange(d_b), ids_ba.shape[1])])
    cos = np.concatenate([cos_ab.ravel(), cos_ba.ravel()])
    key = a.astype(np.int64) * d_b + b
    key, first = np.unique(key, return_index=True)
    a, b, cos = a[first], b[first], cos[first]
    order = np.argsort(-cos, kind="stable")
    used_a = np.zeros(d_a, dtype=bool)
    used_b = np.zeros(d_b, dtype=bool)
    taken = []
    for i in order.tolist():  # O(edges): 65k x 2 x N edges is seconds
        if not used_a[a[i]] and not used_b[b[i]]:
            used_a[a[i]] = used_b[b[i]] = True
            taken.append(i)
    sel = np.asarray(taken, dtype=np.int64)
    return np.stack([a[sel], b[sel]], axis=1).astype(np.int64), cos[sel].astype(np.float32)


@torch.no_grad()
def hungarian_assignment(
    w_a: torch.Tensor, w_b: torch.Tensor, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one assignment of maximum total decoder cosine (dense; min(d_a, d_b) pairs)."""
    from scipy.optimize import linear_sum_assignment

    from saetui.sae.model import best_device

    dev = torch.device(device) if device is not None else best_device()
    cos = (_unit(w_a, dev) @ _unit(w_b, dev).T).cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return np.stack([rows, cols], axis=1).astype(np.int64), cos[rows, cols].astype(np.float32)


def match_decoders(
    w_a: torch.Tensor,
    w_b: torch.Tensor,
    top_n: int = 8,
    *,
    hungarian_max: int = HUNGARIAN_MAX,
    device: torch.device | str | None = None,
    check_stop: Callable[[], None] | None = None,
) -> DecoderMatch:
    """Top-N decoder neighbours both ways and a one-to-one assignment (Hungarian when both
    sizes are <= ``hungarian_max``, else greedy over the candidates)."""
    import time

    if w_a.shape[1] != w_b.shape[1]:
        raise SaetuiInputError(
            f"the two SAEs have different d_in ({w_a.shape[1]} and {w_b.shape[1]}): compare "
            "SAEs trained on the same hook width."
        )
    t0 = time.perf_counter()
    ids_ab, cos_ab = cross_neighbours(w_a, w_b, top_n, device=device, check_stop=check_stop)
    ids_ba, cos_ba = cross_neighbours(w_b, w_a, top_n, device=device, check_stop=check_stop)
    if max(w_a.shape[0], w_b.shape[0]) <= hungarian_max:
        pairs, pair_cos = hungarian_assignment(w_a, w_b, device)
        method = "hungarian"
    else:
        pairs, pair_cos = greedy_assignment(ids_ab, cos_ab, ids_ba, cos_ba)
        method = "greedy"
    return DecoderMatch(
        ids_ab, cos_ab, ids_ba, cos_ba, pairs, pair_cos, method, time.perf_counter() - t0
    )


# ------------------------------------------------------------------ activations


def corpus_identity(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run_config fields that fix the corpus windows (not the SAE or numerics)."""
    ident = {k: v for k, v in run_config.items() if k not in _NOT_CORPUS}
    if "corpus_sha256" in ident:  # the same corpus may sit at two paths
        ident.pop("corpus", None)
    return ident


def check_same_windows(index_a: Any, index_b: Any) -> None:
    """Raise SaetuiInputError unless both indexes hold the same corpus windows."""
    pa, pb = index_a.progress(), index_b.progress()
    ia, ib = corpus_identity(index_a.meta.run_config), corpus_identity(index_b.meta.run_config)
    if (
        ia != ib
        or index_a.meta.ctx_len != index_b.meta.ctx_len
        or (pa.windows, pa.counted_tokens) != (pb.windows, pb.counted_tokens)
        or index_a.meta.n_shards != index_b.meta.n_shards
    ):
        raise SaetuiInputError(
            f"the indexes {index_a.path} and {index_b.path} were not collected over the same "
            "corpus windows (model, corpus, context length or window count differ): compare "
            "the SAE directories instead for decoder matching only."
        )


def _binary(offsets: np.ndarray, ids: np.ndarray, values: np.ndarray, d: int) -> sp.csr_matrix:
    """Binary [tokens, d] CSR matrix of which features fired (value > 0)."""
    fired = values > 0
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[fired]
    data = np.ones(len(row), dtype=np.int32)
    return sp.csr_matrix((data, (row, ids[fired].astype(np.int64))), shape=(len(offsets) - 1, d))


def _chunks_in_step(
    index_a: Any, index_b: Any, windows_per_chunk: int
) -> Iterator[tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray, np.ndarray]]:
    """The same windows of both indexes, chunk by chunk: (binary A [tokens, d_a], binary B
    [tokens, d_b], global token index [tokens] = window * ctx_len + position, counted
    [tokens]); BOS/pad tokens are rows without features."""
    if index_a.shard_ids != index_b.shard_ids:
        raise SaetuiInputError(
            f"the indexes {index_a.path} and {index_b.path} have different shards: collect "
            "both with the same layout (or merge them) before comparing activations."
        )
    for shard in index_a.shard_ids:
        for ca, cb in zip(
            index_a.scan_forward(shard, windows_per_chunk=windows_per_chunk),
            index_b.scan_forward(shard, windows_per_chunk=windows_per_chunk),
            strict=False,
        ):
            if not np.array_equal(ca.global_index, cb.global_index) or not np.array_equal(
                ca.token_ids, cb.token_ids
            ):
                raise SaetuiInputError(
                    f"the indexes {index_a.path} and {index_b.path} hold different tokens at "
                    f"window {ca.first_window}: collect both over the same corpus windows."
                )
            yield (
                _binary(ca.offsets, ca.feature_ids, ca.values16, index_a.meta.d_sae),
                _binary(cb.offsets, cb.feature_ids, cb.values16, index_b.meta.d_sae),
                ca.global_index,
                ca.counted,
            )


@dataclass
class ActivationMatch:
    """Co-firing of A's and B's features on the same tokens."""

    cofire: sp.csr_matrix  # int64 [d_a, d_b]: tokens on which both fired
    count_a: np.ndarray  # int64 [d_a]: tokens each A feature fired on
    count_b: np.ndarray  # int64 [d_b]
    tokens: int
    pruned: bool = False

    def jaccard(self) -> sp.csr_matrix:
        """Jaccard of firing token sets for every co-firing pair (sparse, float64)."""
        co = self.cofire.tocoo()
        union = self.count_a[co.row] + self.count_b[co.col] - co.data
        return sp.csr_matrix(
            (co.data / np.maximum(union, 1), (co.row, co.col)), shape=self.cofire.shape
        )

    def best_partners(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per feature the partner of highest Jaccard: side -> (partner, jaccard, cofire);
        partner -1 for a feature that never co-fired."""
        jac = self.jaccard()
        out = {}
        for side, matrix, co in (
            ("a", jac.tocsr(), self.cofire.tocsr()),
            ("b", jac.T.tocsr(), self.cofire.T.tocsr()),
        ):
            n = matrix.shape[0]
            partner = np.full(n, -1, dtype=np.int64)
            best = np.zeros(n, dtype=np.float64)
            count = np.zeros(n, dtype=np.int64)
            rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
            if matrix.nnz:
                order = np.lexsort((-matrix.data, rows))
                first = order[np.r_[0, np.flatnonzero(np.diff(rows[order])) + 1]]
                partner[rows[first]] = matrix.indices[first]
                best[rows[first]] = matrix.data[first]
                co.sort_indices()
                count[rows[first]] = np.asarray(co[rows[first], matrix.indices[first]]).ravel()
            out[side] = (partner, best, count)
        return out


def _prune(pairs: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """Keep each entry that is among the ``keep`` largest of its row or of its column."""
    co = pairs.tocoo()
    mask = np.zeros(co.nnz, dtype=bool)
    for major in (co.row, co.col):
        order = np.lexsort((-co.data, major))
        sorted_major = major[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_major)) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        mask[order[rank < keep]] = True
    return sp.csr_matrix((co.data[mask], (co.row[mask], co.col[mask])), shape=pairs.shape)


def match_activations(
    index_a: Any,
    index_b: Any,
    *,
    windows_per_chunk: int = 256,
    max_pairs: int = 1 << 24,
    candidates: int = 64,
    check_stop: Callable[[], None] | None = None,
) -> ActivationMatch:
    """Co-firing counts of every pair of features over the shared windows, streamed."""
    check_same_windows(index_a, index_b)
    d_a, d_b = index_a.meta.d_sae, index_b.meta.d_sae
    total = sp.csr_matrix((d_a, d_b), dtype=np.int64)
    count_a = np.zeros(d_a, dtype=np.int64)
    count_b = np.zeros(d_b, dtype=np.int64)
    tokens, pruned = 0, False
    for fa, fb, _, counted in _chunks_in_step(index_a, index_b, windows_per_chunk):
        if check_stop is not None:
            check_stop()
        total = total + (fa.T.tocsr() @ fb).astype(np.int64)
        count_a += np.bincount(fa.indices, minlength=d_a)
        count_b += np.bincount(fb.indices, minlength=d_b)
        tokens += int(counted.sum())
        if total.nnz > max_pairs:
            total, pruned = _prune(total, candidates).astype(np.int64), True
    return ActivationMatch(total.tocsr(), count_a, count_b, tokens, pruned)


# ------------------------------------------------------------------ splits


@dataclass
class Split:
    """A feature of the smaller SAE and the larger SAE's features that cover it."""

    parent: int
    parent_count: int
    children: list[dict[str, float | int]] = field(default_factory=list)
    parent_covered: float = 0.0  # share of the parent's firings where some child fires
    children_covered: float = 0.0  # share of the children's firings where the parent fires
    # (window, position) of the first tokens where the parent fires and no child does
    # (absorption candidates), and where some child fires without the parent
    parent_only: list[tuple[int, int]] = field(default_factory=list)
    children_only: list[tuple[int, int]] = field(default_factory=list)


def find_splits(
    decoder: DecoderMatch,
    activations: ActivationMatch,
    index_a: Any,
    index_b: Any,
    *,
    split_cosine: float = 0.5,
    child_precision: float = 0.5,
    min_children: int = 2,
    examples: int = 5,
    windows_per_chunk: int = 256,
    check_stop: Callable[[], None] | None = None,
) -> tuple[str, list[Split]]:
    """Parents in the smaller SAE (A when sizes are equal) with at least ``min_children``
    children in the larger, with coverage from a second pass over both indexes.
    Each split keeps up to ``examples`` tokens where the parent fires without any child, and
    where a child fires without the parent. Returns (the parents' side "a" or "b", splits
    ordered by parent)."""
    d_a, d_b = activations.count_a.size, activations.count_b.size
    side = "a" if d_a <= d_b else "b"
    ids, cos = (decoder.ids_ab, decoder.cos_ab) if side == "a" else (decoder.ids_ba, decoder.cos_ba)
    co = activations.cofire.tocsr() if side == "a" else activations.cofire.T.tocsr()
    co.sort_indices()
    count_p = activations.count_a if side == "a" else activations.count_b
    count_c = activations.count_b if side == "a" else activations.count_a
    parent, child = np.nonzero(cos >= split_cosine)
    child_id = ids[parent, child]
    joint = np.asarray(co[parent, child_id]).ravel() if len(parent) else np.zeros(0)
    precision = joint / np.maximum(count_c[child_id], 1)
    ok = (precision >= child_precision) & (count_c[child_id] > 0)
    parent, child, child_id, joint = parent[ok], child[ok], child_id[ok], joint[ok]
    n_children = np.bincount(parent, minlength=ids.shape[0])
    keep = n_children[parent] >= min_children
    parent, child, child_id, joint = parent[keep], child[keep], child_id[keep], joint[keep]
    splits: dict[int, Split] = {}
    for p, slot, c, j in zip(
        parent.tolist(), child.tolist(), child_id.tolist(), joint.tolist(), strict=True
    ):
        split = splits.setdefault(p, Split(p, int(count_p[p])))
        split.children.append(
            {
                "feature": c,
                "cosine": float(cos[p, slot]),
                "cofire": int(j),
                "count": int(count_c[c]),
            }
        )
    if not splits:
        return side, []
    # second pass: per parent, tokens where it fires and some child fires / any child fires
    n_p, n_c = ids.shape[0], count_c.size
    member = sp.csr_matrix(
        (np.ones(len(parent), dtype=np.int32), (child_id, parent)), shape=(n_c, n_p)
    )
    both = np.zeros(n_p, dtype=np.int64)
    any_child = np.zeros(n_p, dtype=np.int64)
    need = {"parent_only": np.zeros(n_p, dtype=np.int64), "children_only": np.zeros(n_p, np.int64)}
    for need_of in need.values():
        need_of[list(splits)] = examples
    ctx_len = index_a.meta.ctx_len
    for fa, fb, global_index, _ in _chunks_in_step(index_a, index_b, windows_per_chunk):
        if check_stop is not None:
            check_stop()
        fp, fc = (fa, fb) if side == "a" else (fb, fa)
        hit = (fc @ member).astype(bool).astype(np.int32)  # [tokens, n_p]: some child fired
        joint_hits = hit.multiply(fp).tocsr()
        any_child += np.asarray(hit.sum(axis=0)).ravel()
        both += np.asarray(joint_hits.sum(axis=0)).ravel()
        for kind, only in (("parent_only", fp - joint_hits), ("children_only", hit - joint_hits)):
            left = need[kind]
            if not left.any():
                continue
            only = only.tocoo()
            pick = (only.data > 0) & (left[only.col] > 0)
            rows, cols = only.row[pick], only.col[pick]
            order = np.lexsort((rows, cols))
            rows, cols = rows[order], cols[order]
            starts = np.r_[0, np.flatnonzero(np.diff(cols)) + 1] if len(cols) else np.zeros(0, int)
            rank = np.arange(len(cols)) - np.repeat(starts, np.diff(np.r_[starts, len(cols)]))
            take = rank < left[cols]
            for row, col in zip(rows[take].tolist(), cols[take].tolist(), strict=True):
                position = int(global_index[row])
                getattr(splits[col], kind).append(divmod(position, ctx_len))
            np.subtract.at(left, cols[take], 1)
    for p, split in splits.items():
        split.parent_covered = float(both[p] / max(split.parent_count, 1))
        split.children_covered = float(both[p] / max(any_child[p], 1))
    return side, [splits[p] for p in sorted(splits)]

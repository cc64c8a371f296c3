"""Co-occurrence neighbours from the forward index, without re-running the model.

Counting is N * k^2 pair updates whatever d_sae is; memory is bounded by processing the
features in stripes: each stripe of ``stripe`` features keeps a dense [stripe, d_sae]
count table and makes one pass over the token chunks, so any d_sae fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

METRICS = ("jaccard", "npmi", "p_g_given_f")


@dataclass
class CooccurrenceNeighbours:
    """Top-N co-occurring features per feature for each metric; -1 pads missing slots."""

    ids: dict[str, np.ndarray]  # metric -> int64 [d_sae, n]
    scores: dict[str, np.ndarray]  # metric -> float32 [d_sae, n]
    counts: np.ndarray  # int64 [d_sae]: tokens each feature fired on
    tokens: int


def cooccurrence_neighbours(
    chunks: Callable[[], Iterable[sp.csr_matrix]],
    d_sae: int,
    *,
    top_n: int = 16,
    min_count: int = 3,
    stripe: int = 2048,
    check_stop: Callable[[], None] | None = None,
) -> CooccurrenceNeighbours:
    """Jaccard, NPMI and P(g|f) neighbours of every feature.

    ``chunks()`` yields binary CSR matrices [tokens, d_sae] (a feature fired on a token);
    it is called once per stripe. Pairs seen on fewer than ``min_count`` tokens are ignored.
    ``check_stop`` is called between chunks and raises to stop.
    """
    check = check_stop or (lambda: None)
    counts = np.zeros(d_sae, dtype=np.int64)
    tokens = 0
    for chunk in chunks():
        check()
        counts += np.asarray((chunk > 0).sum(axis=0)).ravel()
        tokens += chunk.shape[0]
    ids = {m: np.full((d_sae, top_n), -1, dtype=np.int64) for m in METRICS}
    scores = {m: np.zeros((d_sae, top_n), dtype=np.float32) for m in METRICS}
    if tokens == 0:
        return CooccurrenceNeighbours(ids, scores, counts, tokens)
    for start in range(0, d_sae, stripe):
        stop = min(start + stripe, d_sae)
        pair_counts = np.zeros((stop - start, d_sae), dtype=np.int64)
        for chunk in chunks():
            check()
            binary = (chunk > 0).astype(np.int32).tocsc()
            pair_counts += (binary[:, start:stop].T @ binary).toarray()
        own = np.arange(stop - start)
        pair_counts[own, own + start] = 0
        _rank_stripe(pair_counts, counts, tokens, start, min_count, ids, scores)
    return CooccurrenceNeighbours(ids, scores, counts, tokens)


def _rank_stripe(
    pair_counts: np.ndarray,
    counts: np.ndarray,
    tokens: int,
    start: int,
    min_count: int,
    ids: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
) -> None:
    top_n = next(iter(ids.values())).shape[1]
    c_fg = pair_counts.astype(np.float64)
    c_f = counts[start : start + pair_counts.shape[0]].astype(np.float64)[:, None]
    c_g = counts.astype(np.float64)[None, :]
    valid = pair_counts >= max(min_count, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_fg = c_fg / tokens
        by_metric = {
            "jaccard": c_fg / (c_f + c_g - c_fg),
            "npmi": np.log(p_fg / ((c_f / tokens) * (c_g / tokens))) / -np.log(p_fg),
            "p_g_given_f": c_fg / c_f,
        }
    rows = np.arange(pair_counts.shape[0])[:, None]
    for metric, values in by_metric.items():
        values = np.where(valid & np.isfinite(values), values, -np.inf)
        k = min(top_n, values.shape[1])
        part = np.argpartition(-values, k - 1, axis=1)[:, :k]
        order = np.argsort(-values[rows, part], axis=1, kind="stable")
        best = part[rows, order]
        best_values = values[rows, best]
        keep = np.isfinite(best_values)
        stop = start + pair_counts.shape[0]
        ids[metric][start:stop, :k] = np.where(keep, best, -1)
        scores[metric][start:stop, :k] = np.where(keep, best_values, 0.0)

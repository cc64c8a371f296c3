"""Query results (pages, contexts, documents) and the sorted-array helpers that fill them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from saetui.index import format as fmt
from saetui.index.postings import SHARD_SHIFT


@dataclass(frozen=True)
class QueryPage:
    """One page of a query's matches."""

    expression: str
    total: int  # matches in the whole index
    order: str
    offset: int
    positions: np.ndarray  # int64 shard << 40 | global index
    features: list[int]  # the positive features of the expression
    values: np.ndarray  # float32 [len(positions), len(features)]; 0 where one does not fire
    counts: dict[str, int] = field(default_factory=dict)  # per positive atom
    pmi: float | None = None  # log P(all) / prod P(atom), with two or more positive atoms

    def locations(self) -> list[tuple[int, int]]:
        """(shard, global index) of each match."""
        return [(int(p) >> SHARD_SHIFT, int(p) & fmt.GIDX_MASK) for p in self.positions]


@dataclass(frozen=True)
class QueryContext:
    """A match in its window: tokens and the activations of the expression's features."""

    shard: int
    window: int
    position: int  # of the match inside the window
    global_index: int
    tokens: list[str]
    activations: np.ndarray  # float32 [len(features), len(tokens)]
    features: list[int]


@dataclass(frozen=True)
class DocumentView:
    """A whole document (its counted tokens, across windows) with features' activations."""

    doc: int
    positions: np.ndarray  # int64 shard << 40 | global index, in document order
    tokens: list[str]
    features: list[int]
    activations: np.ndarray  # float32 [len(features), len(positions)]
    locations: list[tuple[int, int, int]]  # (shard, window, position in window) per token

    def index_of(self, position: int) -> int | None:
        """Where the token at ``position`` is in the document, or None."""
        hit = np.flatnonzero(self.positions == position)
        return int(hit[0]) if len(hit) else None


def values_at(feature: tuple[np.ndarray, np.ndarray], positions: np.ndarray) -> np.ndarray:
    """The feature's value at each of ``positions`` (0 where it does not fire)."""
    fpos, fvals = feature
    out = np.zeros(len(positions), np.float32)
    if not len(fpos) or not len(positions):
        return out
    at = np.searchsorted(fpos, positions)
    at[at == len(fpos)] = 0
    hit = fpos[at] == positions
    out[hit] = fvals[at[hit]]
    return out


def first_by_value(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, ties by index (the positions are sorted):
    a partition first, so a first page of a million matches sorts only its candidates."""
    if n >= len(values):
        return np.argsort(-values, kind="stable")
    if n <= 0:
        return np.zeros(0, np.int64)
    kth = np.partition(-values, n - 1)[n - 1]
    candidates = np.flatnonzero(-values <= kth)
    return candidates[np.argsort(-values[candidates], kind="stable")][:n]


def member(sorted_a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """Which entries of ``sorted_a`` occur in ``sorted_b`` (both sorted, unique): a binary
    search of the much shorter one into the other, else np.isin (a merge of both)."""
    if not len(sorted_a) or not len(sorted_b):
        return np.zeros(len(sorted_a), bool)
    if 16 * min(len(sorted_a), len(sorted_b)) > max(len(sorted_a), len(sorted_b)):
        return np.isin(sorted_a, sorted_b, assume_unique=True)
    if len(sorted_a) <= len(sorted_b):
        at = np.searchsorted(sorted_b, sorted_a)
        at[at == len(sorted_b)] = 0
        same: np.ndarray = sorted_b[at] == sorted_a
        return same
    at = np.searchsorted(sorted_a, sorted_b)
    keep = at < len(sorted_a)
    at, found = at[keep], sorted_b[keep]
    out = np.zeros(len(sorted_a), bool)
    out[at[sorted_a[at] == found]] = True
    return out

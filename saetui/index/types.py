"""Result types of the index's Python API (what :class:`IndexReader` returns)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IndexMeta:
    path: Path
    format_version: int
    run_config: dict[str, Any]
    d_sae: int
    ctx_len: int
    top_k: int
    samples_per_bin: int
    n_shards: int
    lmdb_engine: str
    hist_bin_edges: np.ndarray


@dataclass(frozen=True)
class Progress:
    windows: int
    tokens: int
    counted_tokens: int
    nonzeros: int
    summary_windows: int
    finished: bool
    updated: float
    shards: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class FeatureStats:
    feature: int
    count: int
    density: float  # fraction of counted (non-BOS/pad) tokens on which it fires
    mean: float
    std: float
    max: float
    histogram: np.ndarray  # int64 [n_bins]
    bin_edges: np.ndarray  # float [n_bins + 1]
    counted_tokens: int


@dataclass(frozen=True)
class Segment:
    doc_id: int
    doc_offset: int
    start: int
    length: int


@dataclass(frozen=True)
class WindowView:
    shard: int
    window: int
    token_ids: np.ndarray
    tokens: list[str]
    mask: np.ndarray
    segments: list[Segment]


@dataclass(frozen=True)
class Example:
    """One activation in context: the window around it and the feature on every token."""

    feature: int
    value: float
    shard: int
    window: int
    position: int  # the firing token inside the window
    global_index: int  # window * ctx_len + position
    doc_id: int
    doc_offset: int  # the firing token's offset inside its document
    token_ids: np.ndarray
    tokens: list[str]
    activations: np.ndarray  # float32, this feature on each token of the window
    mask: np.ndarray  # bool, the window's counted tokens (False: BOS / padding)
    segment_start: int  # the firing token's document occupies window positions
    segment_length: int  # [segment_start, segment_start + segment_length)


@dataclass(frozen=True)
class IntervalSamples:
    low: float
    high: float
    examples: list[Example]


@dataclass(frozen=True)
class Neighbours:
    metric: str
    ids: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Label:
    feature: int
    label: str
    notes: str
    updated: float


@dataclass(frozen=True)
class Bookmark:
    feature: int
    note: str
    created: float


@dataclass(frozen=True)
class FeatureDetail:
    stats: FeatureStats
    examples: list[Example]
    samples: list[IntervalSamples]
    top_tokens: list[tuple[str, int]]
    neighbours: dict[str, Neighbours]
    label: Label | None


@dataclass(frozen=True)
class ForwardChunk:
    """Counted tokens of consecutive windows: token t owns ids/values[offsets[t]:offsets[t+1]]."""

    shard: int
    first_window: int
    offsets: np.ndarray  # int64 [n_tokens + 1]
    feature_ids: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 [nnz]


@dataclass(frozen=True)
class TokenFeatures:
    shard: int
    window: int
    position: int
    token_id: int
    token: str
    counted: bool  # False for BOS/pad positions, which carry no features
    feature_ids: np.ndarray  # sorted by value, largest first
    values: np.ndarray


@dataclass(frozen=True)
class DocumentContext:
    shard: int
    doc_id: int
    doc_offset: int  # offset of token_ids[0] inside the document
    token_ids: np.ndarray
    tokens: list[str]
    focus: int  # index of the requested token in token_ids


@dataclass(frozen=True)
class FeatureFilter:
    """Row filter for `features()`; None fields do not filter."""

    min_density: float | None = None
    max_density: float | None = None
    min_max: float | None = None
    alive: bool | None = None  # True: fired at least once; False: dead only
    labelled: bool | None = None
    label_contains: str | None = None


@dataclass(frozen=True)
class FeaturePage:
    total: int  # rows passing the filter
    page: int
    page_size: int
    sort: str
    descending: bool
    feature: np.ndarray
    count: np.ndarray
    density: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    labels: list[str]
    counted_tokens: int  # density denominator of the summaries this page comes from


@dataclass(frozen=True)
class TokenMatch:
    feature: int
    count: int  # top examples of the feature that fire on a matching token
    tokens: list[str]


@dataclass(frozen=True)
class ForwardScan:
    """Every token of consecutive windows ``[first_window, end_window)`` of one shard, with
    where it is: token t owns ids/values[offsets[t]:offsets[t+1]] (none when not counted)."""

    shard: int
    first_window: int
    end_window: int
    global_index: np.ndarray  # int64 [n_tokens]: window * ctx_len + position
    token_ids: np.ndarray  # uint32 [n_tokens]
    counted: np.ndarray  # bool [n_tokens]; False for BOS/pad, which carry no features
    doc_ids: np.ndarray  # int64 [n_tokens]; -1 outside any document
    doc_offsets: np.ndarray  # int64 [n_tokens]: offset inside the document (-1 outside)
    offsets: np.ndarray  # int64 [n_tokens + 1]
    feature_ids: np.ndarray  # int32 [nnz], ascending within a token
    values16: np.ndarray  # float16 [nnz]

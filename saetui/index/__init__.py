"""saetui.index: the LMDB token-feature index (layout in README.md next to this file).

Write with `IndexWriter.create_or_resume(...)`, read with `open_index(path)`.
"""

from saetui.index.reader import (
    Bookmark,
    DocumentContext,
    Example,
    FeatureDetail,
    FeatureFilter,
    FeaturePage,
    FeatureStats,
    IndexMeta,
    IndexReader,
    IntervalSamples,
    Label,
    Neighbours,
    Progress,
    Segment,
    TokenFeatures,
    TokenMatch,
    WindowView,
    open_index,
)
from saetui.index.summary import FeatureSummaries
from saetui.index.writer import IndexWriter

__all__ = [
    "Bookmark",
    "DocumentContext",
    "Example",
    "FeatureDetail",
    "FeatureFilter",
    "FeaturePage",
    "FeatureStats",
    "FeatureSummaries",
    "IndexMeta",
    "IndexReader",
    "IndexWriter",
    "IntervalSamples",
    "Label",
    "Neighbours",
    "Progress",
    "Segment",
    "TokenFeatures",
    "TokenMatch",
    "WindowView",
    "open_index",
]

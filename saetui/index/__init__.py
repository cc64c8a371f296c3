"""saetui.index: the LMDB token-feature index (layout in README.md next to this file).

Write with `IndexWriter.create_or_resume(...)`, read with `open_index(path)`; build the
per-feature postings with `build_postings(path)` and query them with `open_query(path)`. Reading
does not import torch; `IndexWriter` and `FeatureSummaries` load it on first use.
"""

from typing import Any

from saetui.index.postings import BuildReport, build_postings, open_postings
from saetui.index.query import QueryContext, QueryEngine, QueryPage, open_query, parse_query
from saetui.index.reader import IndexReader, open_index
from saetui.index.types import (
    Bookmark,
    DocumentContext,
    Example,
    FeatureDetail,
    FeatureFilter,
    FeaturePage,
    FeatureStats,
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

__all__ = [
    "Bookmark",
    "BuildReport",
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
    "QueryContext",
    "QueryEngine",
    "QueryPage",
    "Segment",
    "TokenFeatures",
    "TokenMatch",
    "UserStore",
    "WindowView",
    "build_postings",
    "open_index",
    "open_postings",
    "open_query",
    "parse_query",
]


def __getattr__(name: str) -> Any:
    if name == "IndexWriter":
        from saetui.index.writer import IndexWriter

        return IndexWriter
    if name == "FeatureSummaries":
        from saetui.index.summary import FeatureSummaries

        return FeatureSummaries
    raise AttributeError(f"module 'saetui.index' has no attribute {name!r}")

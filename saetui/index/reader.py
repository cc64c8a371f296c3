"""IndexReader: the Python API over an index (and the TUI's only door to the data).

Every call runs its own short read transaction, so a reader never pins old pages while a
collector writes and always sees committed, consistent data. Thread-safe: LMDB read
transactions are per call and every cache has its own lock.

The reader is a front over four parts, one job each:

- `shards.ShardSet`: the shard environments, counted read transactions, damage guards,
  and what the shards share (identity, vocabulary, progress, meta);
- `windows.WindowStore`: windows, tokens, document contexts and forward scans;
- `features.FeatureQueries`: summaries, examples, samples, neighbours, the feature
  table and token search;
- `user.UserStore`: the user's labels and bookmarks (their own environment).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from saetui.index import format as fmt
from saetui.index.features import SORT_KEYS, Columns, FeatureQueries
from saetui.index.shards import ShardSet
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
    TokenFeatures,
    TokenMatch,
    WindowView,
)
from saetui.index.user import UserStore
from saetui.index.windows import WindowStore

__all__ = ["SORT_KEYS", "IndexReader", "open_index"]


def open_index(path: str | Path) -> IndexReader:
    """Open the index at `path` for reading (and for user labels/bookmarks)."""
    return IndexReader(path)


class IndexReader:
    """Read access to every shard of an index, merged; see the module docstring."""

    def __init__(self, path: str | Path, block_cache: int = 512) -> None:
        t0 = time.perf_counter()
        self.path = Path(path)
        self._shards = ShardSet(self.path)
        try:
            self.meta = _index_meta(self.path, self._shards)
        except BaseException:
            self._shards.close()
            raise
        self.user = UserStore(self.path, self.meta.d_sae)
        self._windows = WindowStore(self._shards, self.meta.ctx_len, block_cache)
        self._features = FeatureQueries(self._shards, self._windows, self.meta, self.user.labels)
        self.open_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------ the index

    @property
    def distributed(self) -> bool:
        """Whether the shards are the ranks of one distributed collection (global window
        ids), rather than shards that number their windows each by themselves."""
        return self._shards.distributed

    @property
    def shard_ids(self) -> list[int]:
        """The ids of the shards this reader merges, in the order of ``progress().shards``."""
        return self._shards.ids

    @property
    def vocab(self) -> list[str]:
        """Token strings by token id."""
        return self._shards.vocab

    def token_strings(self, token_ids: np.ndarray | list[int]) -> list[str]:
        """The strings of ``token_ids``; ``<id>`` for an id outside the vocabulary."""
        return self._shards.token_strings(token_ids)

    def progress(self) -> Progress:
        """Committed progress summed over shards (a fresh read each call)."""
        return self._shards.progress()

    def metrics(self) -> dict[str, Any]:
        """Run metrics stored by the collector (first shard that has them)."""
        found = self._shards.first_meta(fmt.META_METRICS)
        return found if isinstance(found, dict) else {}

    def get_meta(self, name: str) -> Any:
        """A JSON value stored with `IndexWriter.put_meta(name, ...)`, or None."""
        return self._shards.first_meta(fmt.USER_META_PREFIX + name.encode())

    def close(self) -> None:
        """Wait for reads in flight in other threads, then release the environments; later
        calls raise a SaetuiInputError sentence."""
        self._shards.close()
        self.user.close()

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_feature(self, feature: int) -> int:
        """``feature`` as an int, or a sentence when it is not a feature of this index."""
        return self._features.check_feature(feature)

    # ------------------------------------------------------------ windows & tokens

    def window(self, window: int, shard: int | None = None) -> WindowView:
        """Tokens, mask and document segments of one window (shard None: the shard that
        holds it)."""
        return self._windows.window(window, shard)

    def token(self, window: int, position: int, shard: int | None = None) -> TokenFeatures:
        """All active features at one token, strongest first (shard None: the shard that
        holds the window)."""
        return self._windows.token(window, position, shard)

    def document_context(
        self, global_index: int, radius: int = 64, shard: int | None = None
    ) -> DocumentContext:
        """Up to `radius` tokens either side of a token, within its document, across windows
        (and across shards in a distributed index)."""
        return self._windows.document_context(global_index, radius, shard)

    def window_activations(self, window: int, features: list[int], shard: int = 0) -> np.ndarray:
        """The activation of each of ``features`` on every token of one window: float32
        ``[len(features), n_tokens]`` (0 where a feature does not fire)."""
        fs = [self._check_feature(f) for f in features]
        return self._windows.window_activations(window, fs, shard)

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
        return self._windows.iter_forward(windows_per_chunk, shard=shard, first=first, end=end)

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
        return self._windows.scan_forward(shard, first_window, end_window, windows_per_chunk)

    # ------------------------------------------------------------ features

    def _load_columns(self) -> Columns:
        """The merged summary columns (count, density, mean, std, max per feature)."""
        return self._features.load_columns()

    def stats(self, feature: int) -> FeatureStats:
        """Count, density, mean, std, max and the log-spaced histogram of one feature."""
        return self._features.stats(feature)

    def top_examples(self, feature: int, n: int = 50) -> list[Example]:
        """The feature's strongest activations with their windows (ties: earliest token)."""
        return self._features.top_examples(feature, n)

    def top_tokens(self, feature: int) -> list[tuple[str, int]]:
        """Token strings the feature's top-K examples fire on, with counts, commonest first."""
        return self._features.top_tokens(feature)

    def interval_samples(self, feature: int, with_context: bool = True) -> list[IntervalSamples]:
        """A few deterministic random activations per octave of activation value."""
        return self._features.interval_samples(feature, with_context)

    def neighbours(self, feature: int, metric: str | None = None) -> dict[str, Neighbours]:
        """Stored neighbour lists of a feature, by metric (all metrics when None)."""
        return self._features.neighbours(feature, metric)

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
        filter: FeatureFilter | None = None,  # the API name the issue asks for
        page: int = 0,
        page_size: int = 100,
    ) -> FeaturePage:
        """One page of the table of all features, sorted and filtered (ties by feature id)."""
        return self._features.features(sort, descending, filter, page, page_size)

    def search_tokens(
        self, text: str, exact: bool = False, limit: int = 100, match: str | None = None
    ) -> list[TokenMatch]:
        """Features whose top examples fire on tokens matching ``text``, most examples first.

        ``match``: "word" (default) — the token without its leading space or word marker
        equals ``text``, case-insensitive (so "the" finds " the" and "The"); "raw" — the
        token is exactly ``text`` (leading spaces count); "glob" — ``text`` is a shell
        pattern over the lower-cased token without its space (``*ing``, ``*photo*``).
        ``exact=True`` is "word" (kept for old callers)."""
        return self._features.search_tokens(text, exact, limit, match)

    # ------------------------------------------------------------ user data (UserStore)

    def set_label(self, feature: int, label: str, notes: str = "") -> None:
        """Store (or replace) the user's label and notes for a feature."""
        self.user.set_labels({self._check_feature(feature): (label, notes)})

    def set_labels(self, labels: Mapping[int, str | tuple[str, str]]) -> None:
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


def _index_meta(path: Path, shards: ShardSet) -> IndexMeta:
    shape = shards.shape
    ident = shape["identity"]
    return IndexMeta(
        path=path,
        format_version=int(shards.marker["format_version"]),
        run_config=ident["run_config"],
        d_sae=int(ident["d_sae"]),
        ctx_len=int(ident["ctx_len"]),
        top_k=int(ident["top_k"]),
        samples_per_bin=int(ident["samples_per_bin"]),
        n_shards=len(shards.shards),
        lmdb_engine=shape.get("lmdb_engine", ""),
        hist_bin_edges=np.asarray(shape["hist_bin_edges"]),
    )

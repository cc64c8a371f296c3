"""The plumbing of :class:`saetui.tui.source.IndexSource`: the reader opened lazily (the
index may not exist yet while a collection starts), a small cache of derived values, and
the serial that says when feature summaries changed. Every method may block."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from textual.cache import LRUCache

from saetui.errors import IndexEmptyError, IndexMissingError

CACHED_VALUES = 4096  # derived values kept (top tokens, subsets, columns), least used go


class IndexNotReady(Exception):
    """The index has no committed data yet (a collection is starting)."""


class SourceBase:
    """Opens one index for the app and keeps what the reads share."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: Any = None
        self._lock = threading.Lock()
        self._user_generation = 0
        # Textual's LRUCache has no lock and the table and feature workers share it
        self._cache: LRUCache[tuple[Any, ...], Any] = LRUCache(CACHED_VALUES)
        self._cache_lock = threading.Lock()
        self._closed = False
        self._engine: Any = None  # the QueryEngine, opened on the first query

    # ------------------------------------------------------------------ plumbing

    @property
    def reader(self) -> Any:
        """The open IndexReader; IndexNotReady until the first commit, SaetuiInputError when
        the path is not a readable index."""
        with self._lock:
            if self._closed:
                raise IndexNotReady("the index is closed")
            if self._reader is None:
                from saetui.index import open_index

                if not self.path.exists():
                    raise IndexNotReady(f"waiting for {self.path} to be created")
                try:
                    self._reader = open_index(self.path)
                except (IndexEmptyError, IndexMissingError) as error:
                    raise IndexNotReady(str(error)) from None
            return self._reader

    def reopen(self) -> None:
        """Read the index afresh (e.g. after ``--overwrite`` swapped a new one in)."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            with self._cache_lock:
                self._cache.clear()

    def is_open(self) -> bool:
        return self._reader is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _cached(self, key: tuple[Any, ...], make: Any) -> Any:
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = make()  # outside the lock: a read may take a while
            with self._cache_lock:
                self._cache.set(key, hit)
        return hit

    def _serial(self) -> tuple[int, ...]:
        """Changes when the feature summaries change (the reader's checkpoint serial)."""
        progress = self.reader.progress()
        return (progress.summary_windows, progress.windows, int(progress.finished))

    def _columns(self, sort: str = "id", descending: bool = False, filter: Any = None) -> Any:
        reader = self.reader
        return reader.features(
            sort=sort, descending=descending, filter=filter, page=0, page_size=reader.meta.d_sae
        )

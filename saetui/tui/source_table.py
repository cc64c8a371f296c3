"""The feature table's reads for :class:`saetui.tui.source.IndexSource`: a page of rows
under a sort, filter and search; the next feature in the table's order; the rows to export.
Every method blocks: the app calls them from thread workers."""

from __future__ import annotations

from typing import Any

import numpy as np

from saetui.tui.model import FeatureRow, TablePage, TableQuery
from saetui.tui.render import show_token
from saetui.tui.source_base import SourceBase

DENSE_THRESHOLD = 0.01  # "dense" = fires on more than 1% of tokens
TOP_TOKENS_SHOWN = 3


class TableReads(SourceBase):
    """Rows of the feature table."""

    # ------------------------------------------------------------------ table

    def _filter(self, query: TableQuery) -> Any:
        from saetui.index import FeatureFilter

        args: dict[str, Any] = {}
        if query.filter == "alive":
            args["alive"] = True
        elif query.filter == "dead":
            args["alive"] = False
        elif query.filter == "dense":
            args["min_density"] = DENSE_THRESHOLD
        elif query.filter == "labelled":
            args["labelled"] = True
        elif query.filter == "unlabelled":
            args["labelled"] = False
        if query.density_min is not None:
            args["min_density"] = max(args.get("min_density", 0.0), query.density_min)
        if query.density_max is not None:
            args["max_density"] = query.density_max
        return FeatureFilter(**args) if args else None

    def _bookmarks(self) -> set[int]:
        return {b.feature for b in self.reader.bookmarks()}

    def search_ids(self, text: str) -> list[int]:
        """Features matching a search, label matches first, then token matches:

        - ``123`` or ``#123``: that feature;
        - ``word``: labels and notes containing it, and tokens equal to it without their
          leading space, any case (``the`` finds " the" and "The", not "their");
        - ``"  the"`` in quotes: tokens exactly as typed, spaces included;
        - ``*ing`` / ``pho*``: tokens matching the pattern (``*`` any text).
        """
        reader = self.reader
        if not text.strip():
            return []
        number = text.strip().lstrip("#")
        if number.isdigit():
            feature = int(number)
            return [feature] if feature < reader.meta.d_sae else []
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'"
        if quoted:
            needle, match = text[1:-1], "raw"
        else:
            needle = text.strip()
            match = "glob" if any(c in needle for c in "*?[") else "word"
        if not needle:
            return []
        lowered = needle.strip().lower()
        ids = [
            f
            for f, label in sorted(reader.labels().items())
            if not quoted and lowered in (label.label + " " + label.notes).lower()
        ]
        seen = set(ids)
        for hit in reader.search_tokens(needle, limit=500, match=match):
            if hit.feature not in seen:
                seen.add(hit.feature)
                ids.append(hit.feature)
        return ids

    def page(self, query: TableQuery, offset: int, limit: int) -> TablePage:
        reader = self.reader
        serial = self._serial()
        generation = hash((serial, self._user_generation))
        bookmarks = self._bookmarks()
        if query.search or query.filter == "bookmarked" or query.sort == "score":
            key = ("subset", query, generation)
            ids = self._cached(key, lambda: self._subset(query, bookmarks))
            rows_ids = ids[offset : offset + limit]
            columns = self._cached(("columns", generation), self._columns)
            labels = reader.labels()
            rows = [
                self._row(
                    int(f),
                    columns.count[f],
                    columns.density[f],
                    columns.mean[f],
                    columns.max[f],
                    labels[f].label if f in labels else "",
                    bookmarks,
                    serial,
                )
                for f in rows_ids
            ]
            return TablePage(total=len(ids), offset=offset, rows=rows, generation=generation)
        if offset % limit:
            raise ValueError("page offsets must be multiples of the page size")
        page = reader.features(
            sort=query.sort,
            descending=query.descending,
            filter=self._filter(query),
            page=offset // limit,
            page_size=limit,
        )
        rows = [
            self._row(int(f), c, d, m, x, label, bookmarks, serial)
            for f, c, d, m, x, label in zip(
                page.feature.tolist(),
                page.count.tolist(),
                page.density.tolist(),
                page.mean.tolist(),
                page.max.tolist(),
                page.labels,
                strict=True,
            )
        ]
        return TablePage(total=int(page.total), offset=offset, rows=rows, generation=generation)

    def step(self, query: TableQuery, feature: int, delta: int) -> int:
        """The feature ``delta`` rows from ``feature`` in the table's order under ``query``
        (clamped at its ends); by id when ``feature`` is not among the rows."""
        if query.search or query.filter == "bookmarked":
            order = self._subset(query, self._bookmarks())
        else:
            order = self._columns(query.sort, query.descending, self._filter(query)).feature
        where = np.flatnonzero(order == feature)
        if not len(order) or not len(where):
            return int(min(max(feature + delta, 0), self.reader.meta.d_sae - 1))
        return int(order[min(max(int(where[0]) + delta, 0), len(order) - 1)])

    def _subset(self, query: TableQuery, bookmarks: set[int]) -> np.ndarray:
        """Feature ids of a search or the bookmark filter, in the query's sort order (search
        results stay in relevance order while the sort is the default, by id)."""
        by_score = query.sort == "score"
        sort = "id" if by_score else query.sort
        columns = self._columns(sort, query.descending and not by_score, self._filter(query))
        order = columns.feature
        if by_score:  # scored features first, best (or worst, reversed) first
            scores = self.scores()
            order = np.array(
                sorted(
                    order.tolist(),
                    key=lambda f: (
                        f not in scores,
                        -scores.get(f, 0.0) if query.descending else scores.get(f, 0.0),
                    ),
                ),
                dtype=np.int64,
            )
        if query.filter == "bookmarked":
            order = order[np.isin(order, np.fromiter(bookmarks, np.int64, len(bookmarks)))]
        if not query.search:
            return order
        found = self.search_ids(query.search)
        if query.sort == "id" and not query.descending:
            allowed = set(order.tolist())
            return np.array([f for f in found if f in allowed], dtype=np.int64)
        return order[np.isin(order, np.array(found, dtype=np.int64))]

    def scores(self) -> dict[int, float]:
        """Each scored feature's imported explanation score (the mean over its scorers)."""
        from saetui.export.scores import feature_scores

        key = ("scores", self._user_generation)
        return self._cached(
            key,
            lambda: {
                f: sum(per.values()) / len(per)
                for f, per in feature_scores(self.reader).items()
                if per
            },
        )

    def _row(
        self,
        feature: int,
        count: Any,
        density: Any,
        mean: Any,
        max_value: Any,
        label: str,
        bookmarks: set[int],
        serial: tuple[int, ...],
    ) -> FeatureRow:
        tokens = self._cached(("top_tokens", feature, serial), lambda: self._top_tokens(feature))
        return FeatureRow(
            feature=feature,
            label=label,
            density=float(density),
            mean=float(mean),
            max=float(max_value),
            count=int(count),
            top_tokens=tokens,
            bookmarked=feature in bookmarks,
            score=self.scores().get(feature),
        )

    def _top_tokens(self, feature: int) -> str:
        top = self.reader.top_tokens(feature)[:TOP_TOKENS_SHOWN]
        return " ".join(repr(show_token(token)) for token, _ in top)

    # ------------------------------------------------------------------ table export (JSON)

    def export_table(self, query: TableQuery) -> list[dict[str, Any]]:
        """Every row matching the table's sort and filter (search and bookmark filter too)."""
        reader = self.reader
        if query.search or query.filter == "bookmarked":
            ids = self._subset(query, self._bookmarks())
        else:
            ids = self._columns(query.sort, query.descending, self._filter(query)).feature
        columns = self._columns()
        labels = reader.labels()
        return [
            {
                "feature": int(f),
                "label": labels[f].label if f in labels else "",
                "density": float(columns.density[f]),
                "mean": float(columns.mean[f]),
                "max": float(columns.max[f]),
                "count": int(columns.count[f]),
            }
            for f in ids.tolist()
        ]

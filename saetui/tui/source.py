"""The app's door to an index: wraps :class:`saetui.index.IndexReader` and turns its results
into the display types of :mod:`saetui.tui.model`. No analysis here, only reads, joins with
labels/bookmarks, and caching. Every method blocks: the app calls them from thread workers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import IndexEmptyError, IndexMissingError, SaetuiInputError
from saetui.tui.model import (
    ActiveFeature,
    Context,
    FeatureDetail,
    FeatureRow,
    QueryMatch,
    QueryResult,
    RunPlots,
    RunState,
    TablePage,
    TableQuery,
)
from saetui.tui.render import show_token

DENSE_THRESHOLD = 0.01  # "dense" = fires on more than 1% of tokens
TOP_TOKENS_SHOWN = 3
LOGIT_PREFIX = "logit_"  # neighbour metrics holding token ids: a feature's logit effects


class IndexNotReady(Exception):
    """The index has no committed data yet (a collection is starting)."""


class IndexSource:
    """Reads one index for the app; opens the reader lazily (the index may not exist yet
    while a collection starts)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: Any = None
        self._lock = threading.Lock()
        self._user_generation = 0
        self._cache: dict[tuple[Any, ...], Any] = {}
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

    # ------------------------------------------------------------------ queries

    def query(self, expression: str, limit: int = 50, order: str = "value") -> QueryResult:
        """A page of matches of a query expression (saetui.index.query) with their windows;
        SaetuiInputError sentences for bad expressions or missing postings."""
        from saetui.index import QueryEngine

        reader = self.reader
        with self._lock:
            if self._engine is None:
                self._engine = QueryEngine.open(reader)
            engine = self._engine
        page = engine.query(expression, limit=limit, order=order)
        matches = []
        rows = zip(
            engine.contexts(page), page.values.tolist(), page.positions.tolist(), strict=True
        )
        for ctx, row, key in rows:
            acts = ctx.activations[0] if page.features else np.zeros(len(ctx.tokens))
            context = Context(
                window=ctx.window,
                position=ctx.position,
                value=float(row[0]) if row else 0.0,
                tokens=list(ctx.tokens),
                values=acts.astype(float).tolist(),
                window_position=ctx.position,
            )
            matches.append(QueryMatch(ctx.shard, ctx.window, ctx.position, key, row, context))
        return QueryResult(
            page.expression, page.total, page.features, page.counts, page.pmi, matches
        )

    def document(self, match: QueryMatch, feature: int) -> Context:
        """The whole document of a query match (across windows) shaded by ``feature``."""
        with self._lock:
            engine = self._engine
        if engine is None:
            raise SaetuiInputError("run a query first: the document view opens one of its matches.")
        doc = engine.document_of(match.key)
        if doc < 0:
            raise SaetuiInputError(
                f"the token at window {match.window}, position {match.position} belongs to no "
                "document: open it with Enter instead."
            )
        view = engine.document(doc, [feature] if feature >= 0 else [])
        at = view.index_of(match.key) or 0
        values = view.activations[0] if len(view.features) else np.zeros(len(view.tokens))
        return Context(
            window=match.window,
            position=at,
            value=float(values[at]),
            tokens=view.tokens,
            values=values.astype(float).tolist(),
            window_position=match.position,
            document=doc,
            document_offset=at,
            locations=[(window, pos) for _, window, pos in view.locations],
        )

    def _cached(self, key: tuple[Any, ...], make: Any) -> Any:
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            hit = self._cache[key] = make()
        return hit

    def _serial(self) -> tuple[int, ...]:
        """Changes when the feature summaries change (the reader's checkpoint serial)."""
        progress = self.reader.progress()
        return (progress.summary_windows, progress.windows, int(progress.finished))

    # ------------------------------------------------------------------ run

    def run_state(self) -> RunState:
        reader = self.reader
        progress = reader.progress()
        config = dict(reader.meta.run_config)
        generation = hash(
            (progress.windows, progress.summary_windows, progress.finished, self._user_generation)
        )
        history = reader.get_meta("sae_history")
        return RunState(
            path=str(self.path),
            config=config,
            d_sae=reader.meta.d_sae,
            tokens=int(progress.tokens),
            windows=int(progress.windows),
            phase="done" if progress.finished else "collecting",
            finished=bool(progress.finished),
            metrics=reader.metrics(),
            generation=generation,
            history=history if isinstance(history, dict) else None,
            details=reader.get_meta("run_details") or {},
        )

    def _columns(self, sort: str = "id", descending: bool = False, filter: Any = None) -> Any:
        reader = self.reader
        return reader.features(
            sort=sort, descending=descending, filter=filter, page=0, page_size=reader.meta.d_sae
        )

    def run_plots(self) -> RunPlots:
        page = self._columns()
        alive = page.count > 0
        metrics = self.reader.metrics()
        l0 = metrics.get("l0_histogram") or []
        l0_hist = [(float(edge), int(count)) for edge, count in l0] if isinstance(l0, list) else []
        return RunPlots(
            log10_density=np.log10(page.density[alive]).tolist(),
            mean_activation=page.mean[alive].tolist(),
            density=page.density[alive].tolist(),
            l0_histogram=l0_hist,
        )

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

    # ------------------------------------------------------------------ feature

    def check_feature(self, feature: int) -> None:
        d_sae = self.reader.meta.d_sae
        if not 0 <= feature < d_sae:
            raise SaetuiInputError(
                f"feature {feature} is out of range: this index has features 0-{d_sae - 1}."
            )

    def feature(self, feature: int) -> FeatureDetail:
        reader = self.reader
        self.check_feature(feature)
        detail = reader.feature(feature, n_examples=50)
        stats = detail.stats
        labels = reader.labels()
        label = detail.label
        row = FeatureRow(
            feature=feature,
            label=label.label if label else "",
            density=stats.density,
            mean=stats.mean,
            max=stats.max,
            count=stats.count,
            top_tokens=" ".join(t for t, _ in detail.top_tokens[:TOP_TOKENS_SHOWN]),
            bookmarked=feature in self._bookmarks(),
            score=self.scores().get(feature),
        )
        edges = stats.bin_edges.tolist()
        counts = stats.histogram.tolist()
        nonzero = [i for i, c in enumerate(counts) if c]
        histogram = (
            [(edges[i], counts[i]) for i in range(nonzero[0], nonzero[-1] + 1)] if nonzero else []
        )
        neighbours = {
            metric: self.named(
                [(f, s) for f, s in zip(n.ids.tolist(), n.scores.tolist(), strict=True) if f >= 0],
                labels,
            )
            for metric, n in detail.neighbours.items()
            if not metric.startswith(LOGIT_PREFIX)
        }
        # Logit effects stored by the collector hold token ids, not features.
        effects = {
            metric: list(
                zip(
                    self.reader.token_strings(n.ids[n.ids >= 0]),
                    n.scores[n.ids >= 0].tolist(),
                    strict=True,
                )
            )
            for metric, n in detail.neighbours.items()
            if metric.startswith(LOGIT_PREFIX)
        }
        return FeatureDetail(
            row=row,
            notes=label.notes if label else "",
            contexts=[self._context(e) for e in detail.examples],
            samples=[
                (
                    f"{s.low:.3g}–{s.high:.3g}: {_share(stats, s.low, s.high)} of its activations",
                    [self._context(e) for e in s.examples],
                )
                for s in detail.samples
            ],
            histogram=histogram,
            top_tokens=list(detail.top_tokens),
            neighbours=neighbours,
            tokens_seen=stats.counted_tokens,
            promoted=effects.get("logit_promoted", []),
            suppressed=effects.get("logit_suppressed", []),
        )

    def _context(self, example: Any) -> Context:
        """An example cut to its document: a window may pack several documents, and the
        BOS / padding tokens that the index does not count are not text to show."""
        tokens = list(example.tokens)
        values = example.activations.astype(float).tolist()
        position = int(example.position)
        start = int(example.segment_start)
        stop = start + int(example.segment_length)
        counted = example.mask
        while start < position and not counted[start]:
            start += 1
        while stop - 1 > position and not counted[stop - 1]:
            stop -= 1
        return Context(
            window=int(example.window),
            position=position - start,
            value=float(example.value),
            tokens=tokens[start:stop],
            values=values[start:stop],
            window_position=position,
            document=int(getattr(example, "doc_id", -1)),
            document_offset=int(getattr(example, "doc_offset", -1)),
        )

    def ablation_inputs(self, feature: int, n: int) -> list[tuple[tuple[int, int], list[int]]]:
        """((window, position), tokens of the window up to the token after the firing one)
        for the feature's top ``n`` examples: what an ablation of each context runs."""
        examples = self.reader.top_examples(feature, n)
        return [
            ((int(e.window), int(e.position)), e.token_ids[: e.position + 2].tolist())
            for e in examples
        ]

    def cached_ablation(self, feature: int, where: tuple[int, int]) -> Any:
        return self.reader.user.cached(["ablation", feature, *where])

    def keep_ablation(self, feature: int, where: tuple[int, int], summary: Any) -> None:
        self.reader.user.put_cached(["ablation", feature, *where], summary)

    def token_features(self, window: int, position: int) -> list[ActiveFeature]:
        token = self.reader.token(window, position)
        return self.named(zip(token.feature_ids.tolist(), token.values.tolist(), strict=True))

    def named(self, scored: Any, labels: dict[int, Any] | None = None) -> list[ActiveFeature]:
        """(feature, score) pairs as ActiveFeatures with label and top tokens, the one way
        every list names a feature."""
        if labels is None:
            labels = self.reader.labels()
        serial = self._serial()
        out = []
        for feature, score in scored:
            feature = int(feature)
            tokens = self._cached(
                ("top_tokens", feature, serial), lambda f=feature: self._top_tokens(f)
            )
            label = labels[feature].label if feature in labels else ""
            out.append(ActiveFeature(feature, float(score), label, tokens))
        return out

    def labels_of(self, features: list[int]) -> dict[int, str]:
        labels = self.reader.labels()
        return {f: labels[f].label for f in features if f in labels}

    # ------------------------------------------------------------------ user data

    def set_label(self, feature: int, label: str, notes: str) -> None:
        reader = self.reader
        if label.strip() or notes.strip():
            reader.set_label(feature, label.strip(), notes.strip())
        else:
            reader.delete_label(feature)
        self._user_generation += 1

    def set_bookmark(self, feature: int, bookmarked: bool) -> None:
        reader = self.reader
        if bookmarked:
            reader.add_bookmark(feature)
        else:
            reader.remove_bookmark(feature)
        self._user_generation += 1

    def is_bookmarked(self, feature: int) -> bool:
        return feature in self._bookmarks()

    def labels_of_all(self) -> dict[int, str]:
        return {f: label.label for f, label in self.reader.labels().items()}

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


def _share(stats: Any, low: float, high: float) -> str:
    """The share of a feature's activations in [low, high), from its histogram."""
    edges = stats.bin_edges[:-1]
    inside = (edges >= low * (1 - 1e-9)) & (edges < high * (1 - 1e-9))
    total = int(stats.histogram.sum())
    share = int(stats.histogram[inside].sum()) / total if total else 0.0
    return f"{share:.1%}" if share >= 0.001 else f"{share:.2%}"

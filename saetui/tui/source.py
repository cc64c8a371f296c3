"""The app's door to an index: wraps :class:`saetui.index.IndexReader` and turns its results
into the display types of :mod:`saetui.tui.model`. No analysis here, only reads, joins with
labels/bookmarks, and caching. Every method blocks: the app calls them from thread workers.

Three modules, one class: :mod:`saetui.tui.source_base` (opening the reader, the cache),
:mod:`saetui.tui.source_table` (the feature table's rows), and this one (queries, the run,
a feature's detail, labels and bookmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.tui.model import (
    ActiveFeature,
    Context,
    FeatureDetail,
    FeatureRow,
    QueryMatch,
    QueryResult,
    RunPlots,
    RunState,
)
from saetui.tui.source_base import IndexNotReady
from saetui.tui.source_table import DENSE_THRESHOLD, TOP_TOKENS_SHOWN, TableReads

__all__ = ["DENSE_THRESHOLD", "IndexNotReady", "IndexSource"]

LOGIT_PREFIX = "logit_"  # neighbour metrics holding token ids: a feature's logit effects


class IndexSource(TableReads):
    """Reads one index for the app; opens the reader lazily (the index may not exist yet
    while a collection starts). The plumbing is :class:`SourceBase`, the table's reads
    :class:`TableReads`."""

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

    # ------------------------------------------------------------------ run

    def run_details(self) -> dict[str, Any] | None:
        """What the collector recorded about its run (start-token rule, model facts)."""
        details = self.reader.get_meta("run_details")
        return details if isinstance(details, dict) else None

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


def _share(stats: Any, low: float, high: float) -> str:
    """The share of a feature's activations in [low, high), from its histogram."""
    edges = stats.bin_edges[:-1]
    inside = (edges >= low * (1 - 1e-9)) & (edges < high * (1 - 1e-9))
    total = int(stats.histogram.sum())
    share = int(stats.histogram[inside].sum()) / total if total else 0.0
    return f"{share:.1%}" if share >= 0.001 else f"{share:.2%}"

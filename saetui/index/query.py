"""Queries over an index's postings: where features fire, co-fire, or fire without another.

Expressions are parsed by :mod:`saetui.index.query_syntax` (``f:123``, ``f:1 > 2.5``,
``tok:" the"``, ``re:/get/``, ``doc:17``, ``&``, ``|``, ``!``, parentheses). Results are
sets of positions ``shard << 40 | global index`` of counted tokens (BOS and pad never
match), paged by value (of the first feature named positively) or by position. First pages
by value of ``f:A`` and of conjunctions of features come from
:mod:`saetui.index.query_ranked` (value tiers, bitmaps) without a full evaluation; regex
and document lookups from :mod:`saetui.index.query_text`. Every answer comes from the
postings (``saetui postings INDEX`` builds them); no Textual here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.index import format as fmt
from saetui.index import query_ranked
from saetui.index.postings import KIND_FEATURE, KIND_TOKEN, SHARD_SHIFT, Postings, open_postings
from saetui.index.query_pages import (
    DocumentView,
    QueryContext,
    QueryPage,
    first_by_value,
    member,
    values_at,
)
from saetui.index.query_ranked import forward_values
from saetui.index.query_syntax import (
    And,
    Document,
    Feature,
    Node,
    Not,
    Or,
    Regex,
    Token,
    describe,
    parse_query,
    positive_features,
)
from saetui.index.query_text import document_positions, regex_positions, text_at

__all__ = [
    "ORDERS",
    "And",
    "Document",
    "DocumentView",
    "Feature",
    "Node",
    "Not",
    "Or",
    "QueryContext",
    "QueryEngine",
    "QueryPage",
    "Regex",
    "Token",
    "open_query",
    "parse_query",
    "positive_features",
]

ORDERS = ("value", "position")
PAGE_FROM_FORWARD = 256  # pages up to this many rows read unread features' values per token


class QueryEngine:
    """Answers query expressions from an index's postings (thread-safe reads)."""

    def __init__(self, reader: Any, postings: Postings) -> None:
        self.reader, self.postings = reader, postings
        self._vocab_ids: dict[str, list[int]] | None = None

    @classmethod
    def open(cls, reader: Any) -> QueryEngine:
        """The engine of an open IndexReader; a sentence when it has no postings (postings
        older than the index answer for the windows they cover: see ``coverage``)."""
        postings = open_postings(reader.path)
        if postings is None or postings.state() is None:
            if postings is not None:
                postings.close()
            raise SaetuiInputError(
                f"the index {reader.path} has no postings yet: build them with "
                f"`saetui postings {reader.path}`, then query again."
            )
        try:
            postings.check_version()
        except SaetuiInputError:
            postings.close()
            raise
        return cls(reader, postings)

    def close(self) -> None:
        self.postings.close()

    def __enter__(self) -> QueryEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- atoms

    def coverage(self) -> tuple[int, int]:
        """(windows the postings cover, windows the index has committed): queries answer
        the first only; ``saetui postings`` adds the rest."""
        state = self.postings.state() or {}
        covered = sum(int(s.get("windows", 0)) for s in state.get("shards", {}).values())
        return covered, int(self.reader.progress().windows)

    def counted_tokens(self) -> int:
        state = self.postings.state() or {}
        return sum(int(s.get("counted", 0)) for s in state.get("shards", {}).values())

    def _feature(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        self.reader._check_feature(feature)
        pos, vals = self.postings.read(KIND_FEATURE, feature)
        assert vals is not None  # features have values
        return pos, vals.astype(np.float32)

    def token_ids(self, text: str) -> list[int]:
        """Ids of the vocabulary entries whose string is exactly ``text``."""
        if self._vocab_ids is None:
            ids: dict[str, list[int]] = {}
            for i, s in enumerate(self.reader.vocab):
                ids.setdefault(s, []).append(i)
            self._vocab_ids = ids
        return self._vocab_ids.get(text, [])

    def _token(self, text: str) -> np.ndarray:
        ids = self.token_ids(text)
        if not ids:
            raise SaetuiInputError(
                f"tok:{json.dumps(text)} is no token of this index's vocabulary: check spaces "
                "and case (tokens often start with a space), or use re:/.../ instead."
            )
        parts = [self.postings.read(KIND_TOKEN, i)[0] for i in ids]
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))

    def _regex(self, pattern: str) -> np.ndarray:
        return regex_positions(self.reader, self.postings, pattern)

    def _document(self, doc: int) -> np.ndarray:
        return document_positions(self.postings, doc)

    # -------------------------------------------------------------- evaluation

    def _eval(self, node: Node, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Sorted unique positions of ``node``; fills ``values`` with the positions and
        values of every feature read (and remembers every other atom's answer there too,
        under its syntax node, so counts do not run a regex twice)."""
        memo: dict[Any, Any] = values
        if isinstance(node, (Token, Regex, Document)):
            if node not in memo:
                memo[node] = self._eval_atom(node)
            found: np.ndarray = memo[node]
            return found
        if isinstance(node, Feature):
            if node.feature not in values:
                values[node.feature] = self._feature(node.feature)
            pos, vals = values[node.feature]
            if node.op is None:
                return pos
            t = np.float32(node.threshold)
            keep = {
                ">": vals > t,
                ">=": vals >= t,
                "<": vals < t,
                "<=": vals <= t,
            }[node.op]
            kept: np.ndarray = pos[keep]
            return kept
        if isinstance(node, Or):
            parts = [self._eval(t, values) for t in node.terms]
            return np.unique(np.concatenate(parts))
        if isinstance(node, And):
            positive = [t for t in node.terms if not isinstance(t, Not)]
            negative = [t.term for t in node.terms if isinstance(t, Not)]
            # the smallest positive term first (features by their count, unread)
            positive.sort(key=lambda t: self._size(t, values))
            result = self._eval(positive[0], values)
            for t, keep in [(t, True) for t in positive[1:]] + [(t, False) for t in negative]:
                if not len(result):
                    break
                if self._probe_instead(t, values):
                    # a long posting list: look the candidates up in its per-part bitmaps
                    # rather than decode it whole
                    assert isinstance(t, Feature)
                    hit = self._fires(t.feature, result)
                else:
                    hit = member(result, self._eval(t, values))
                result = result[hit if keep else ~hit]
            return result
        raise SaetuiInputError(f"a negation ({describe(node)}) needs a positive term beside it.")

    def _size(self, node: Node, values: dict[Any, Any]) -> int:
        """How many positions ``node`` has: read from the headers for a plain feature."""
        if isinstance(node, Feature) and node.op is None and node.feature not in values:
            self.reader._check_feature(node.feature)
            return self.postings.counts(KIND_FEATURE, node.feature)
        return len(self._eval(node, values))

    def _probe_instead(self, node: Node, values: dict[Any, Any]) -> bool:
        if not isinstance(node, Feature) or node.op is not None or node.feature in values:
            return False
        self.reader._check_feature(node.feature)
        # a frequent feature's bitmaps answer any number of candidates faster than decoding
        # (and intersecting) its postings; a rare one is decoded
        return self.postings.counts(KIND_FEATURE, node.feature) >= query_ranked.FREQUENT

    def _fires(self, feature: int, positions: np.ndarray) -> np.ndarray:
        """Whether the feature fires at each of ``positions`` (sorted), part by part."""
        parts = self.postings.parts()
        firsts = np.array([p.first for p in parts], np.int64)
        owner = np.searchsorted(firsts, positions, side="right") - 1
        out = np.zeros(len(positions), bool)
        bounds = np.flatnonzero(np.diff(owner)) + 1
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(positions)], strict=True):
            i = int(owner[a])
            if i < 0 or a == b:
                continue
            local = positions[a:b] - parts[i].first
            ok = local < parts[i].end - parts[i].first
            bits = self.postings.bits(feature, parts[i])
            out[a:b][ok] = bits[local[ok]]
        return out

    def _eval_atom(self, node: Token | Regex | Document) -> np.ndarray:
        if isinstance(node, Token):
            return self._token(node.text)
        if isinstance(node, Regex):
            return self._regex(node.pattern)
        return self._document(node.doc)

    def query(
        self, expression: str | Node, *, limit: int = 20, offset: int = 0, order: str = "value"
    ) -> QueryPage:
        """One page of the matches of ``expression`` (``order``: "value", the first positive
        feature's activation, strongest first, ties by position; or "position")."""
        if order not in ORDERS:
            raise SaetuiInputError(f"order {order!r} is unknown: expected one of {ORDERS}.")
        if limit < 0 or offset < 0:
            raise SaetuiInputError(
                f"limit {limit} and offset {offset} must be >= 0: pass a page size and start."
            )
        text = expression if isinstance(expression, str) else describe(expression)
        node = parse_query(expression) if isinstance(expression, str) else expression
        features = positive_features(node)
        values: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        fast = self._top_page(node, text, limit, offset, order)
        if fast is None:
            fast = self._cofiring_page(node, text, limit, offset, order)
        if fast is not None:
            return fast
        positions = self._eval(node, values)
        if order == "value" and features:
            if features[0] not in values:
                values[features[0]] = self._feature(features[0])
            page = first_by_value(values_at(values[features[0]], positions), offset + limit)
            page = page[offset:]
        else:
            page = np.arange(offset, min(offset + limit, len(positions)))
        table = np.zeros((len(page), len(features)), np.float32)
        for j, f in enumerate(features):  # only the page's rows: cheap for any match count
            if f in values or len(page) > PAGE_FROM_FORWARD:
                if f not in values:
                    values[f] = self._feature(f)
                table[:, j] = values_at(values[f], positions[page])
            else:  # a feature never decoded: its values at a few tokens from the forward index
                table[:, j] = self._forward_values(f, positions[page])
        counts, pmi = self._cofiring(node, len(positions), values)
        return QueryPage(
            expression=text,
            total=len(positions),
            order=order,
            offset=offset,
            positions=positions[page],
            features=features,
            values=table,
            counts=counts,
            pmi=pmi,
        )

    def _top_page(
        self, node: Node, text: str, limit: int, offset: int, order: str
    ) -> QueryPage | None:
        return query_ranked.top_page(self.reader, self.postings, node, text, limit, offset, order)

    def _forward_values(self, feature: int, positions: np.ndarray) -> np.ndarray:
        return forward_values(self.reader, feature, positions)

    def _cofiring_page(
        self, node: Node, text: str, limit: int, offset: int, order: str
    ) -> QueryPage | None:
        return query_ranked.cofiring_page(
            self.reader, self.postings, self.counted_tokens, node, text, limit, offset, order
        )

    def _cofiring(
        self, node: Node, joint: int, values: dict[int, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[dict[str, int], float | None]:
        atoms = (
            [t for t in node.terms if not isinstance(t, Not)] if isinstance(node, And) else [node]
        )
        counts = {describe(a): self._size(a, values) for a in atoms}
        if len(atoms) < 2 or joint == 0:
            return counts, None
        n = self.counted_tokens()
        if n == 0 or 0 in counts.values():
            return counts, None
        log_p = math.log(joint / n) - sum(math.log(c / n) for c in counts.values())
        return counts, log_p

    def count(self, expression: str) -> int:
        """How many counted tokens match ``expression``."""
        return len(self._eval(parse_query(expression), {}))

    # -------------------------------------------------------------- contexts and stats

    def contexts(self, page: QueryPage) -> list[QueryContext]:
        """Each match of a page in its window, with the page's features' activations."""
        ctx = self.reader.meta.ctx_len
        out = []
        for shard, gidx in page.locations():
            window, pos = divmod(gidx, ctx)
            view = self.reader.window(window, shard)
            acts = (
                self.reader.window_activations(window, page.features, shard)
                if page.features
                else np.zeros((0, len(view.tokens)), np.float32)
            )
            out.append(QueryContext(shard, window, pos, gidx, view.tokens, acts, page.features))
        return out

    def _text_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return text_at(self.postings, positions)

    def document_of(self, position: int) -> int:
        """The document id of the token at ``position`` (-1 outside documents)."""
        return int(self._text_at(np.array([position], np.int64))[1][0])

    def document(self, doc: int, features: list[int] | None = None) -> DocumentView:
        """Every counted token of document ``doc`` across windows (and shards), with the
        activations of ``features`` from the postings."""
        features = [self.reader._check_feature(f) for f in features or []]
        positions = self._document(int(doc))
        if not len(positions):
            raise SaetuiInputError(
                f"document {doc} is not in the index {self.reader.path}: pick a document id "
                "from a match (doc: queries list its tokens)."
            )
        order = np.lexsort((positions >> SHARD_SHIFT, positions & fmt.GIDX_MASK))
        positions = positions[order]
        token_ids, _ = self._text_at(positions)
        acts = np.zeros((len(features), len(positions)), np.float32)
        for row, f in enumerate(features):
            acts[row] = values_at(self._feature(f), positions)
        tokens = self.reader.token_strings(token_ids)
        ctx = self.reader.meta.ctx_len
        locations = [
            (int(p) >> SHARD_SHIFT, *divmod(int(p) & fmt.GIDX_MASK, ctx)) for p in positions
        ]
        return DocumentView(int(doc), positions, tokens, features, acts, locations)

    def quantiles(self, feature: int, qs: list[float] | np.ndarray) -> np.ndarray:
        """Exact quantiles (``np.quantile``, linear) of the feature's nonzero fp16
        activations over the whole index; NaN when it never fires."""
        q = np.asarray(qs, np.float64)
        if q.size and (q.min() < 0 or q.max() > 1):
            raise SaetuiInputError(f"quantiles {q.tolist()} must lie in [0, 1].")
        _, vals = self._feature(feature)
        if not len(vals):
            return np.full(q.shape, np.nan)
        return np.quantile(vals.astype(np.float64), q)


def open_query(index_path: str | Path) -> tuple[Any, QueryEngine]:
    """(reader, engine) of the index at ``index_path``; close both when done."""
    from saetui.index.reader import open_index

    reader = open_index(index_path)
    try:
        return reader, QueryEngine.open(reader)
    except BaseException:
        reader.close()
        raise

"""Queries over an index's postings: where features fire, co-fire, or fire without another.

Expressions (``parse_query``)::

    f:123            every firing of feature 123
    f:123 > 5.0      firings above a value (also >=, <, <=)
    tok:" the"       every occurrence of a token (its exact string, JSON-style quoted)
    re:/getattr/     tokens a regex match over the detokenised window text overlaps
    doc:17           every token of document 17
    A & B, A & !B, A | B, (A | B) & !C

Results are sets of positions ``shard << 40 | global index`` of counted tokens (BOS and pad
never match), paged by value (of the first feature named positively) or by position.
Negations must sit in a conjunction with at least one positive term. Every answer comes
from the postings (``saetui postings INDEX`` builds them); no Textual here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.index import format as fmt
from saetui.index.postings import (
    KIND_FEATURE,
    KIND_TOKEN,
    SHARD_SHIFT,
    TOP_N,
    Postings,
    open_postings,
)

ORDERS = ("value", "position")
FREQUENT = 50_000  # postings above which a feature is looked up in bitmaps, not decoded
PAGE_FROM_FORWARD = 256  # pages up to this many rows read unread features' values per token
_EMPTY = np.zeros(0, np.int64)

# ------------------------------------------------------------------ syntax tree


@dataclass(frozen=True)
class Feature:
    feature: int
    op: str | None = None  # ">", ">=", "<", "<="
    threshold: float = 0.0


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Regex:
    pattern: str


@dataclass(frozen=True)
class Document:
    doc: int


@dataclass(frozen=True)
class Not:
    term: Node


@dataclass(frozen=True)
class And:
    terms: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    terms: tuple[Node, ...]


Node = Feature | Token | Regex | Document | Not | And | Or

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def fail(self, expected: str) -> SaetuiInputError:
        where = self.text[self.i :][:20] or "the end"
        return SaetuiInputError(
            f"cannot read the query {self.text!r}: expected {expected} at {where!r}; write e.g. "
            'f:123, f:1 & !f:2, f:3 > 2.5, tok:" the", re:/get/ or doc:17.'
        )

    def skip(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self, s: str) -> bool:
        self.skip()
        return self.text.startswith(s, self.i)

    def parse(self) -> Node:
        node = self.disjunction()
        self.skip()
        if self.i < len(self.text):
            raise self.fail("'&', '|' or the end of the query")
        return node

    def disjunction(self) -> Node:
        terms = [self.conjunction()]
        while self.peek("|"):
            self.i += 1
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else Or(tuple(terms))

    def conjunction(self) -> Node:
        terms = [self.unary()]
        while self.peek("&"):
            self.i += 1
            terms.append(self.unary())
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def unary(self) -> Node:
        if self.peek("!"):
            self.i += 1
            return Not(self.unary())
        if self.peek("("):
            self.i += 1
            node = self.disjunction()
            if not self.peek(")"):
                raise self.fail("')'")
            self.i += 1
            return node
        return self.atom()

    def integer(self, what: str) -> int:
        self.skip()
        m = re.compile(r"\d+").match(self.text, self.i)
        if m is None:
            raise self.fail(what)
        self.i = m.end()
        return int(m.group())

    def atom(self) -> Node:
        self.skip()
        if self.peek("f:"):
            self.i += 2
            feature = self.integer("a feature id after 'f:'")
            for op in (">=", "<=", ">", "<"):
                if self.peek(op):
                    self.i += len(op)
                    self.skip()
                    m = _NUMBER.match(self.text, self.i)
                    if m is None:
                        raise self.fail(f"a number after '{op}'")
                    self.i = m.end()
                    return Feature(feature, op, float(m.group()))
            return Feature(feature)
        if self.peek("doc:"):
            self.i += 4
            return Document(self.integer("a document id after 'doc:'"))
        if self.peek("tok:"):
            self.i += 4
            if not self.peek('"'):
                raise self.fail("a quoted token after 'tok:', e.g. tok:\" the\"")
            try:
                text, end = json.JSONDecoder().raw_decode(self.text, self.i)
            except json.JSONDecodeError:
                raise self.fail("a closed, JSON-quoted string after 'tok:'") from None
            self.i = end
            return Token(str(text))
        if self.peek("re:/"):
            self.i += 4
            out, j = [], self.i
            while j < len(self.text) and self.text[j] != "/":
                if self.text[j] == "\\" and j + 1 < len(self.text) and self.text[j + 1] == "/":
                    out.append("/")
                    j += 2
                    continue
                out.append(self.text[j])
                j += 1
            if j >= len(self.text):
                raise self.fail("a closing '/' after 're:/...'")
            pattern = "".join(out)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SaetuiInputError(
                    f"cannot read the query {self.text!r}: the regex /{pattern}/ is invalid "
                    f"({exc}); fix it (Python re syntax)."
                ) from None
            self.i = j + 1
            return Regex(pattern)
        raise self.fail("f:, tok:, re:, doc:, '!' or '('")


def parse_query(text: str) -> Node:
    """The syntax tree of a query expression; a SaetuiInputError sentence when it is
    malformed (or only negative)."""
    if not isinstance(text, str) or not text.strip():
        raise SaetuiInputError(
            "the query is empty: write an expression such as f:123 or f:1 & !f:2."
        )
    node = _Parser(text).parse()
    _check_positive(node, text)
    return node


def _check_positive(node: Node, text: str) -> None:
    """Every negation must be bounded by a positive term of its conjunction."""
    if isinstance(node, Not):
        raise SaetuiInputError(
            f"the query {text!r} asks only for what is absent: combine a negation with a "
            "positive term, e.g. f:1 & !f:2."
        )
    if isinstance(node, And):
        if all(isinstance(t, Not) for t in node.terms):
            _check_positive(node.terms[0], text)
        for t in node.terms:
            _check_positive(t.term if isinstance(t, Not) else t, text)
    if isinstance(node, Or):
        for t in node.terms:
            _check_positive(t, text)


def positive_features(node: Node) -> list[int]:
    """Features named outside any negation, in order of appearance (no repeats)."""
    out: list[int] = []

    def walk(n: Node) -> None:
        if isinstance(n, Feature) and n.feature not in out:
            out.append(n.feature)
        elif isinstance(n, (And, Or)):
            for t in n.terms:
                walk(t)

    walk(node)
    return out


# ------------------------------------------------------------------ results


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


def _describe(node: Node) -> str:
    if isinstance(node, Feature):
        tail = "" if node.op is None else f" {node.op} {node.threshold:g}"
        return f"f:{node.feature}{tail}"
    if isinstance(node, Token):
        return "tok:" + json.dumps(node.text)
    if isinstance(node, Regex):
        return f"re:/{node.pattern}/"
    if isinstance(node, Document):
        return f"doc:{node.doc}"
    if isinstance(node, Not):
        return "!" + _describe(node.term)
    sep = " & " if isinstance(node, And) else " | "
    return "(" + sep.join(_describe(t) for t in node.terms) + ")"


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
        """Counted tokens that a match of ``pattern`` overlaps, matching the text of each
        window (so a match may span tokens, never windows)."""
        rx = re.compile(pattern)
        vocab = np.array(self.reader.vocab + [""], dtype=object)
        absent = len(vocab) - 1
        ctx = self.reader.meta.ctx_len
        out: list[np.ndarray] = []
        for part in self.postings.parts():
            tokens, counted, _ = self.postings.text(part)
            ids = np.where(tokens >= absent, absent, tokens).astype(np.int64)
            strings = vocab[ids]
            gidx = part.first_gidx + np.arange(len(tokens))
            cuts = np.flatnonzero(np.diff(gidx // ctx)) + 1
            bounds = np.concatenate([[0], cuts, [len(tokens)]])
            lengths = np.fromiter((len(s) for s in strings), np.int64, len(strings))
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                text = "".join(strings[a:b])
                if not text:
                    continue
                ends = np.cumsum(lengths[a:b])
                starts = ends - lengths[a:b]
                hit = np.zeros(b - a, bool)
                for m in rx.finditer(text):
                    s, e = m.span()
                    if e == s:  # an empty match touches the token it sits in
                        e = s + 1
                    lo = int(np.searchsorted(ends, s, side="right"))
                    hi = int(np.searchsorted(starts, e, side="left"))
                    hit[lo:hi] = True
                hit &= counted[a:b]
                if hit.any():
                    out.append(part.first + a + np.flatnonzero(hit))
        return np.concatenate(out) if out else _EMPTY

    def _document(self, doc: int) -> np.ndarray:
        rows = self.postings.document(doc)
        if not len(rows):
            return _EMPTY
        parts = [
            (np.int64(shard) << SHARD_SHIFT) + first + np.arange(length, dtype=np.int64)
            for shard, first, length in rows.tolist()
        ]
        return np.sort(np.concatenate(parts))

    # -------------------------------------------------------------- evaluation

    def _eval(self, node: Node, values: dict[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Sorted unique positions of ``node``; fills ``values`` with the positions and
        values of every feature read (and remembers every other atom's answer there too,
        under its syntax node, so counts do not run a regex twice)."""
        memo: dict[Any, Any] = values  # type: ignore[assignment]
        if isinstance(node, (Token, Regex, Document)):
            if node not in memo:
                memo[node] = self._eval_atom(node)
            return memo[node]
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
            return pos[keep]
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
                    hit = _member(result, self._eval(t, values))
                result = result[hit if keep else ~hit]
            return result
        raise SaetuiInputError(f"a negation ({_describe(node)}) needs a positive term beside it.")

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
        return self.postings.counts(KIND_FEATURE, node.feature) >= FREQUENT

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
        text = expression if isinstance(expression, str) else _describe(expression)
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
            page = _first_by_value(_values_at(values[features[0]], positions), offset + limit)
            page = page[offset:]
        else:
            page = np.arange(offset, min(offset + limit, len(positions)))
        table = np.zeros((len(page), len(features)), np.float32)
        for j, f in enumerate(features):  # only the page's rows: cheap for any match count
            if f in values or len(page) > PAGE_FROM_FORWARD:
                if f not in values:
                    values[f] = self._feature(f)
                table[:, j] = _values_at(values[f], positions[page])
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
        """A lone ``f:N`` by value, first pages: from the postings' top lists, no decode."""
        if not (isinstance(node, Feature) and node.op is None and order == "value"):
            return None
        self.reader._check_feature(node.feature)
        top = self.postings.top(node.feature, offset + limit)
        if top is None:
            return None
        vals, positions = top
        total = self.postings.counts(KIND_FEATURE, node.feature)
        return QueryPage(
            expression=text,
            total=total,
            order=order,
            offset=offset,
            positions=positions[offset : offset + limit],
            features=[node.feature],
            values=vals[offset : offset + limit].astype(np.float32).reshape(-1, 1),
            counts={_describe(node): total},
        )

    def _forward_values(self, feature: int, positions: np.ndarray) -> np.ndarray:
        """The feature's value at each of a few ``positions``, from the forward index."""
        ctx = self.reader.meta.ctx_len
        out = np.zeros(len(positions), np.float32)
        for i, p in enumerate(positions.tolist()):
            window, at = divmod(p & fmt.GIDX_MASK, ctx)
            token = self.reader.token(window, at, shard=p >> SHARD_SHIFT)
            hit = np.flatnonzero(token.feature_ids == feature)
            if len(hit):
                out[i] = token.values[hit[0]]
        return out

    def _cofiring_page(
        self, node: Node, text: str, limit: int, offset: int, order: str
    ) -> QueryPage | None:
        """``f:A & f:B & !f:C ...`` by value, first pages, when A is frequent: per part, the
        features' bitmaps ANDed give the count, and A's top list filtered by them the page,
        without decoding the long postings. None when the top lists cannot prove the page
        (the caller then evaluates in full)."""
        if order != "value" or not isinstance(node, And) or offset + limit > TOP_N:
            return None
        positive: list[int] = []
        negative: list[int] = []
        for term in node.terms:
            inner = term.term if isinstance(term, Not) else term
            if not isinstance(inner, Feature) or inner.op is not None:
                return None
            self.reader._check_feature(inner.feature)
            (negative if isinstance(term, Not) else positive).append(inner.feature)
        first = positive[0]
        counts = {f"f:{f}": self.postings.counts(KIND_FEATURE, f) for f in positive}
        if counts[f"f:{first}"] < FREQUENT:
            return None  # short postings: the full evaluation is as fast
        total, listed = 0, 0
        floor = -1  # fp16 bits no unlisted posting of a truncated top list exceeds
        found_bits, found_pos = [], []
        for part in self.postings.parts():
            top = self.postings.part_top(first, part)
            if top is None:
                continue
            mask = self.postings.bits(first, part)
            for f in positive[1:]:
                mask &= self.postings.bits(f, part)
            for f in negative:
                mask &= ~self.postings.bits(f, part)
            total += int(np.count_nonzero(mask))
            bits, positions, complete = top
            keep = mask[(positions & fmt.GIDX_MASK) - part.first_gidx]
            found_bits.append(bits[keep])
            found_pos.append(positions[keep])
            listed += int(keep.sum())
            if not complete:
                floor = max(floor, int(bits[-1]))
        n = offset + limit
        bits = np.concatenate(found_bits) if found_bits else np.zeros(0, np.int64)
        positions = np.concatenate(found_pos) if found_pos else _EMPTY
        ranked = np.lexsort((positions, -bits))[:n]
        # proven when every match is listed, or the n-th listed beats every unlisted value
        if listed < total and (len(ranked) < n or int(bits[ranked[-1]]) <= floor):
            return None
        page = ranked[offset:n]
        table = np.zeros((len(page), len(positive)), np.float32)
        table[:, 0] = bits[page].astype(np.uint16).view(np.float16)
        for j, f in enumerate(positive[1:], start=1):
            table[:, j] = self._forward_values(f, positions[page])
        pmi = None
        n_tokens = self.counted_tokens()
        if len(positive) >= 2 and total and n_tokens:
            pmi = math.log(total / n_tokens) - sum(math.log(c / n_tokens) for c in counts.values())
        return QueryPage(
            expression=text,
            total=total,
            order=order,
            offset=offset,
            positions=positions[page],
            features=positive,
            values=table,
            counts=counts,
            pmi=pmi,
        )

    def _cofiring(
        self, node: Node, joint: int, values: dict[int, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[dict[str, int], float | None]:
        atoms = (
            [t for t in node.terms if not isinstance(t, Not)] if isinstance(node, And) else [node]
        )
        counts = {_describe(a): self._size(a, values) for a in atoms}
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
        """(token ids, document ids) at ``positions`` (any order), from the text tables."""
        parts = self.postings.parts()
        firsts = np.array([p.first for p in parts], np.int64)
        owner = np.searchsorted(firsts, positions, side="right") - 1
        tokens = np.zeros(len(positions), np.int64)
        docs = np.full(len(positions), -1, np.int64)
        for i in np.unique(owner).tolist():
            if i < 0:
                continue
            sel = np.flatnonzero(owner == i)
            local = positions[sel] - parts[i].first
            ok = local < parts[i].end - parts[i].first
            part_tokens, _, part_docs = self.postings.text(parts[i])
            tokens[sel[ok]] = part_tokens[local[ok]]
            docs[sel[ok]] = part_docs[local[ok]]
        return tokens, docs

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
            acts[row] = _values_at(self._feature(f), positions)
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


def _values_at(feature: tuple[np.ndarray, np.ndarray], positions: np.ndarray) -> np.ndarray:
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


def _first_by_value(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, ties by index (the positions are sorted):
    a partition first, so a first page of a million matches sorts only its candidates."""
    if n >= len(values):
        return np.argsort(-values, kind="stable")
    if n <= 0:
        return np.zeros(0, np.int64)
    kth = np.partition(-values, n - 1)[n - 1]
    candidates = np.flatnonzero(-values <= kth)
    return candidates[np.argsort(-values[candidates], kind="stable")][:n]


def _member(sorted_a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """Which entries of ``sorted_a`` occur in ``sorted_b`` (both sorted, unique): a binary
    search of the much shorter one into the other, else np.isin (a merge of both)."""
    if not len(sorted_a) or not len(sorted_b):
        return np.zeros(len(sorted_a), bool)
    if 16 * min(len(sorted_a), len(sorted_b)) > max(len(sorted_a), len(sorted_b)):
        return np.isin(sorted_a, sorted_b, assume_unique=True)
    if len(sorted_a) <= len(sorted_b):
        at = np.searchsorted(sorted_b, sorted_a)
        at[at == len(sorted_b)] = 0
        return sorted_b[at] == sorted_a
    at = np.searchsorted(sorted_a, sorted_b)
    keep = at < len(sorted_a)
    at, found = at[keep], sorted_b[keep]
    out = np.zeros(len(sorted_a), bool)
    out[at[sorted_a[at] == found]] = True
    return out


def open_query(index_path: str | Path) -> tuple[Any, QueryEngine]:
    """(reader, engine) of the index at ``index_path``; close both when done."""
    from saetui.index.reader import open_index

    reader = open_index(index_path)
    try:
        return reader, QueryEngine.open(reader)
    except BaseException:
        reader.close()
        raise

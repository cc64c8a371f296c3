"""Query expressions: their syntax tree, parser and canonical text.

Expressions (``parse_query``)::

    f:123            every firing of feature 123
    f:123 > 5.0      firings above a value (also >=, <, <=)
    tok:" the"       every occurrence of a token (its exact string, JSON-style quoted)
    re:/getattr/     tokens a regex match over the detokenised window text overlaps
    doc:17           every token of document 17
    A & B, A & !B, A | B, (A | B) & !C

Negations must sit in a conjunction with at least one positive term.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from saetui.errors import SaetuiInputError


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


def describe(node: Node) -> str:
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
        return "!" + describe(node.term)
    sep = " & " if isinstance(node, And) else " | "
    return "(" + sep.join(describe(t) for t in node.terms) + ")"

"""First pages by value without a full evaluation: ``f:A`` and ``f:A & f:B & !f:C ...``.

Both walk the value tiers of the ranking feature A (its postings cut at value ranks 64,
256, 1024, ...; see :mod:`saetui.index.postings_codec`) from the highest, over all parts,
and stop as soon as the page is proven: the n-th best match found outranks every tier not
yet decoded. For a conjunction, each part's match mask is the AND of the features'
bitmaps (dense pieces) or decoded positions (short ones), so the count of the co-firing
set (and its PMI) is exact and costs one bitmap per feature and part; when the set is
small (at most ``FEW_MATCHES``) and looking its values up in the forward index is cheaper
than the expected tier walk (about ``4n / matches`` of A's postings), its positions come
from the masks and A's values from the forward index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from saetui.index import format as fmt
from saetui.index.postings import KIND_FEATURE, SHARD_SHIFT, Postings
from saetui.index.query_pages import QueryPage, values_at
from saetui.index.query_syntax import And, Feature, Node, Not, describe

FREQUENT = 50_000  # postings above which a feature is looked up in bitmaps, not decoded
RANKED_MAX = 4096  # deepest lone f:A value page served from the value tiers
COFIRING_MAX = 256  # deepest co-firing value page served from masks and tiers
FEW_MATCHES = 256  # co-firing sets up to this size may take A's values from the forward index
FORWARD_S = 5e-4  # about one forward-index token lookup (a window decoded, cold cache)
DECODE_S = 1e-7  # about one posting decoded (measured ratio: 1,000-10,000 per lookup)


def forward_values(reader: Any, feature: int, positions: np.ndarray) -> np.ndarray:
    """The feature's value at each of a few ``positions``, from the forward index."""
    ctx = reader.meta.ctx_len
    out = np.zeros(len(positions), np.float32)
    for i, p in enumerate(positions.tolist()):
        window, at = divmod(p & fmt.GIDX_MASK, ctx)
        token = reader.token(window, at, shard=p >> SHARD_SHIFT)
        hit = np.flatnonzero(token.feature_ids == feature)
        if len(hit):
            out[i] = token.values[hit[0]]
    return out


def set_bits(packed: np.ndarray) -> np.ndarray:
    """Indices of the set bits of a packed mask (``np.packbits`` order), ascending: only
    its nonzero bytes are unpacked (a sparse mask of a long span costs its bytes / 8)."""
    nz = np.flatnonzero(packed)
    rows, cols = np.nonzero(np.unpackbits(packed[nz]).reshape(-1, 8))
    out: np.ndarray = nz[rows] * 8 + cols
    return out


def values_of(reader: Any, postings: Postings, feature: int, positions: np.ndarray) -> np.ndarray:
    """The feature's value at each of a few ``positions`` (0 where it does not fire): from
    its postings in the parts that hold them when decoding those is cheaper than a
    forward-index lookup per position, else from the forward index."""
    parts = postings.parts()
    firsts = np.array([p.first for p in parts], np.int64)
    owners = sorted(set((np.searchsorted(firsts, positions, side="right") - 1).tolist()))
    counts = postings.part_counts(KIND_FEATURE, feature)
    decode = sum(counts[i] for i in owners if i >= 0)
    if decode * DECODE_S >= len(positions) * FORWARD_S:
        return forward_values(reader, feature, positions)
    pos, vals = postings.read(KIND_FEATURE, feature, parts=[parts[i] for i in owners if i >= 0])
    assert vals is not None
    return values_at((pos, vals.astype(np.float32)), positions)


def top_page(
    reader: Any, postings: Postings, node: Node, text: str, limit: int, offset: int, order: str
) -> QueryPage | None:
    """A lone ``f:N`` by value: its best postings from the value tiers."""
    if not (isinstance(node, Feature) and node.op is None and order == "value"):
        return None
    if offset + limit > RANKED_MAX:
        return None
    reader._check_feature(node.feature)
    vals, positions = postings.ranked(node.feature, offset + limit)
    total = postings.counts(KIND_FEATURE, node.feature)
    return QueryPage(
        expression=text,
        total=total,
        order=order,
        offset=offset,
        positions=positions[offset : offset + limit],
        features=[node.feature],
        values=vals[offset : offset + limit].astype(np.float32).reshape(-1, 1),
        counts={describe(node): total},
    )


def _plain_features(reader: Any, node: Node) -> tuple[list[int], list[int]] | None:
    """(positive, negative) features of a conjunction of plain ``f:N`` and ``!f:N``."""
    if not isinstance(node, And):
        return None
    positive: list[int] = []
    negative: list[int] = []
    for term in node.terms:
        inner = term.term if isinstance(term, Not) else term
        if not isinstance(inner, Feature) or inner.op is not None:
            return None
        reader._check_feature(inner.feature)
        (negative if isinstance(term, Not) else positive).append(inner.feature)
    return (positive, negative) if positive else None


def cofiring_page(
    reader: Any,
    postings: Postings,
    counted_tokens: Callable[[], int],
    node: Node,
    text: str,
    limit: int,
    offset: int,
    order: str,
) -> QueryPage | None:
    """``f:A & f:B & !f:C ...`` by value when A is frequent: per part the match mask from
    bitmaps (exact count), then A's value tiers filtered by it until the page is proven.
    None when the query has another shape (the caller evaluates it in full)."""
    n = offset + limit
    if order != "value" or n > COFIRING_MAX:
        return None
    features = _plain_features(reader, node)
    if features is None:
        return None
    positive, negative = features
    first = positive[0]
    counts = {f"f:{f}": postings.counts(KIND_FEATURE, f) for f in positive}
    if counts[f"f:{first}"] < FREQUENT:
        return None  # short postings: the full evaluation is as fast
    parts = postings.parts()
    found_masks = postings.cofiring_masks(positive, negative)
    masks = {i: mask for i, (mask, _) in found_masks.items()}
    part_hits = {i: hits for i, (_, hits) in found_masks.items()}
    total = sum(part_hits.values())
    walk_s = counts[f"f:{first}"] * min(1.0, 4 * n / max(total, 1)) * DECODE_S
    if total <= FEW_MATCHES and total * FORWARD_S <= walk_s:
        found = [parts[i].first + set_bits(m) for i, m in sorted(masks.items())]
        positions = np.concatenate(found) if found else np.zeros(0, np.int64)
        values = values_of(reader, postings, first, positions)
        ranked = np.lexsort((positions, -values))[:n]
        positions, values = positions[ranked], values[ranked]
    else:
        matches: dict[int, np.ndarray] = {}

        def keep(i: int, pos: np.ndarray) -> np.ndarray:
            mask = masks.get(i)
            if mask is None:
                return np.zeros(0, np.int64)
            if part_hits[i] * 64 < len(pos):  # few matches here: find each in the tier
                if i not in matches:
                    matches[i] = parts[i].first + set_bits(mask)
                found = matches[i]
                at = np.searchsorted(pos, found)
                ok = at < len(pos)
                at, found = at[ok], found[ok]
                where: np.ndarray = at[pos[at] == found]
                return where
            local = pos - parts[i].first
            hit: np.ndarray = (mask[local >> 3] >> (7 - (local & 7)).astype(np.uint8)) & 1 > 0
            return hit

        vals16, positions = postings.ranked(first, n, keep=keep, total=total)
        values = vals16.astype(np.float32)
    page = slice(offset, n)
    table = np.zeros((len(positions[page]), len(positive)), np.float32)
    table[:, 0] = values[page]
    for j, f in enumerate(positive[1:], start=1):
        table[:, j] = values_of(reader, postings, f, positions[page])
    pmi = None
    n_tokens = counted_tokens()
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

"""Text search over the postings' per-part text tables: regex over the detokenised text
of windows, token ids and document ids at positions, and a document's positions."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from saetui.index.postings import SHARD_SHIFT, Postings

EMPTY = np.zeros(0, np.int64)


def regex_positions(reader: Any, postings: Postings, pattern: str) -> np.ndarray:
    """Counted tokens that a match of ``pattern`` overlaps, matching the text of each
    window (so a match may span tokens, never windows)."""
    rx = re.compile(pattern)
    vocab = np.array([*reader.vocab, ""], dtype=object)
    absent = len(vocab) - 1
    ctx = reader.meta.ctx_len
    out: list[np.ndarray] = []
    for part in postings.parts():
        tokens, counted, _ = postings.text(part)
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
    return np.concatenate(out) if out else EMPTY


def document_positions(postings: Postings, doc: int) -> np.ndarray:
    """Sorted positions of every counted token of document ``doc``."""
    rows = postings.document(doc)
    if not len(rows):
        return EMPTY
    parts = [
        (np.int64(shard) << SHARD_SHIFT) + first + np.arange(length, dtype=np.int64)
        for shard, first, length in rows.tolist()
    ]
    return np.sort(np.concatenate(parts))


def text_at(postings: Postings, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, document ids) at ``positions`` (any order), from the text tables."""
    parts = postings.parts()
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
        part_tokens, _, part_docs = postings.text(parts[i])
        tokens[sel[ok]] = part_tokens[local[ok]]
        docs[sel[ok]] = part_docs[local[ok]]
    return tokens, docs

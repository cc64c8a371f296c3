"""Tokenise a corpus and cut it into model windows of ``ctx_len`` tokens.

Each document is tokenised on its own (no special tokens added by the
tokenizer) and, when BOS is used, gets the tokenizer's BOS prepended. Offsets
inside a document (``doc_offset``) count that BOS as position 0, so the first
text token of a document has ``doc_offset == 1`` (``0`` when BOS is off).

Windows are built by a deterministic packer:

- A document of at most ``ctx_len`` tokens (BOS included) is *short* and is
  never split: it goes into the open window with the least room that still
  holds all of it (best fit), otherwise into a new window.
- A *long* document fills one window with its first ``ctx_len`` tokens, then
  continuation windows that each begin with a fresh BOS (so the model always
  sees BOS at position 0; that BOS belongs to no segment) followed by the next
  ``ctx_len - 1`` tokens. Its last, partial piece opens a window that short
  documents may then fill.
- At most ``open_windows`` (default 16) windows are open at once. A window is
  emitted as soon as it is full; when a new one must be opened while all slots
  are taken, the fullest open window is emitted first (ties: the oldest). What
  is still open at the end is emitted in the order it was opened.

Only windows closed before they are full carry padding, and a window is only
closed early when none of the 16 open ones had room for the next document. On
the sample corpus (SmolLM2 tokenizer, ctx_len 128; paragraphs of ~50 tokens,
many of 65-128 that cannot share a window) padding is 2.2% of window positions
(2.0% with 64 open windows; 21% with a single one).
Packed documents share a window, so a later document's tokens can attend to an
earlier one's: each begins with its own BOS, as in the usual packed training.
Window ids number windows in the order they are emitted, from 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from saetui.corpus.readers import Corpus
from saetui.errors import SaetuiInputError

DEFAULT_CTX_LEN = 128
DEFAULT_OPEN_WINDOWS = 16
_TOKENIZE_CHUNK_DOCS = 256
# Longer documents are tokenised in pieces of this many characters, as they are needed.
LONG_DOCUMENT_CHARS = 100_000


@dataclass(frozen=True)
class Segment:
    """Window positions ``[start, start + length)`` hold the tokens
    ``[doc_offset, doc_offset + length)`` of document ``doc_id`` (BOS = offset 0)."""

    doc_id: int
    doc_offset: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class Window:
    """One model input: up to ``ctx_len`` token ids and where each came from."""

    window_id: int
    tokens: np.ndarray  # uint32 [n], n <= ctx_len, no padding
    segments: list[Segment]
    # Whether documents begin with a prepended BOS (their offset-0 token).
    prepend_bos: bool

    def __len__(self) -> int:
        return len(self.tokens)

    def counted_mask(self) -> np.ndarray:
        """bool [n]: True where the activation counts in statistics (not a BOS)."""
        return _counted_mask(self.segments, len(self.tokens), self.prepend_bos)

    def locate(self, position: int) -> tuple[int, int] | None:
        """``(doc_id, doc_offset)`` of the token at ``position``; None for a continuation BOS."""
        return locate(self.segments, position)


@dataclass
class WindowBatch:
    """A batch of windows, right-padded to the longest window of the batch."""

    tokens: np.ndarray  # int64 [B, T], padding = pad id (0 when the tokenizer has none)
    lengths: np.ndarray  # int64 [B], real tokens per window
    mask: np.ndarray  # bool [B, T], True for real tokens that are not BOS
    window_ids: np.ndarray  # int64 [B]
    segments: list[list[Segment]]

    def __len__(self) -> int:
        return len(self.window_ids)


def locate(segments: Sequence[Segment], position: int) -> tuple[int, int] | None:
    """Map a window position to ``(doc_id, doc_offset)``; None for a continuation BOS
    or a padding position."""
    for segment in segments:
        if segment.start <= position < segment.end:
            return segment.doc_id, segment.doc_offset + position - segment.start
    return None


def _counted_mask(segments: Sequence[Segment], n: int, prepend_bos: bool) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for segment in segments:
        mask[segment.start : segment.end] = True
        if prepend_bos and segment.doc_offset == 0:
            mask[segment.start] = False
    return mask


def resolve_prepend_bos(tokenizer: Any, prepend_bos: bool | None) -> bool:
    """None means auto: prepend when the tokenizer has a BOS token.

    Documents are always tokenised without the tokenizer's own special tokens,
    so BOS is added exactly once whether or not the tokenizer would add it.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is None:
        return bos is not None
    if prepend_bos and bos is None:
        raise SaetuiInputError(
            f"The tokenizer {type(tokenizer).__name__} has no BOS token, so it cannot be "
            "prepended; turn BOS prepending off for this model."
        )
    return bool(prepend_bos)


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched call)."""
    if not texts:
        return []
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # no "longer than model_max_length" warning: we cut windows ourselves
    )
    ids: list[list[int]] = encoded["input_ids"]  # a Hugging Face BatchEncoding
    return ids


def _documents(corpus: Corpus | Sequence[str]) -> Sequence[str]:
    return corpus.documents if isinstance(corpus, Corpus) else corpus


def _document_tokens(
    documents: Sequence[str], ids: list[int], tokenizer: Any, bos: int | None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(doc_id, tokens with BOS)`` for the documents ``ids``, tokenised in batches."""
    for first in range(0, len(ids), _TOKENIZE_CHUNK_DOCS):
        chunk = ids[first : first + _TOKENIZE_CHUNK_DOCS]
        for doc_id, token_ids in zip(
            chunk, tokenize_documents(tokenizer, [documents[i] for i in chunk]), strict=True
        ):
            tokens = np.empty(len(token_ids) + (bos is not None), dtype=np.uint32)
            if bos is not None:
                tokens[0] = bos
            tokens[bos is not None :] = token_ids
            yield doc_id, tokens


# A planned window: its segments, each with a token array of its document that starts
# at document offset ``base`` (the whole document, base 0, unless the document was
# streamed in pieces; None when only lengths are planned, as in count_windows).
_Plan = list[tuple[Segment, "np.ndarray | None", int]]


class _Packer:
    """The packing policy of the module docstring, on document lengths."""

    def __init__(self, ctx_len: int, prepend_bos: bool, open_windows: int) -> None:
        self.ctx_len = ctx_len
        self.prepend_bos = prepend_bos
        self.open_windows = open_windows
        self._open: list[tuple[_Plan, list[int]]] = []  # (plan, [used]) in opening order

    def add(self, doc_id: int, n: int, tokens: np.ndarray | None) -> list[_Plan]:
        """Place a document of ``n`` tokens (BOS included); return the windows it closes."""
        emitted: list[_Plan] = []
        if n - self.prepend_bos <= 0:
            return emitted  # no text tokens: nothing to show or count
        ctx = self.ctx_len
        if n <= ctx:
            # Best fit: the open window with the least room that still holds the document.
            fitting = [
                (ctx - used[0], i) for i, (_, used) in enumerate(self._open) if ctx - used[0] >= n
            ]
            if fitting:
                plan, used = self._open[min(fitting)[1]]
                plan.append((Segment(doc_id, 0, used[0], n), tokens, 0))
                used[0] += n
                if used[0] == ctx:
                    emitted.append(self._close(plan))
                return emitted
            emitted.extend(self._open_window([(Segment(doc_id, 0, 0, n), tokens, 0)], n))
            return emitted
        emitted.append([(Segment(doc_id, 0, 0, ctx), tokens, 0)])
        start = int(self.prepend_bos)  # continuation windows begin with a fresh BOS
        step = ctx - start
        offset = ctx
        while n - offset > step:
            emitted.append([(Segment(doc_id, offset, start, step), tokens, 0)])
            offset += step
        emitted.extend(self.add_tail(doc_id, offset, n - offset, tokens, 0))
        return emitted

    def add_tail(
        self, doc_id: int, offset: int, length: int, tokens: np.ndarray | None, base: int
    ) -> list[_Plan]:
        """The last piece of a long document: it opens a window short ones may fill."""
        start = int(self.prepend_bos)
        segment = Segment(doc_id, offset, start, length)
        return self._open_window([(segment, tokens, base)], start + length)

    def _open_window(self, plan: _Plan, used: int) -> list[_Plan]:
        emitted: list[_Plan] = []
        if used == self.ctx_len:
            return [plan]
        if len(self._open) >= self.open_windows:
            fullest = max(range(len(self._open)), key=lambda i: (self._open[i][1][0], -i))
            emitted.append(self._open.pop(fullest)[0])
        self._open.append((plan, [used]))
        return emitted

    def _close(self, plan: _Plan) -> _Plan:
        index = next(i for i, (p, _) in enumerate(self._open) if p is plan)
        return self._open.pop(index)[0]

    def flush(self) -> list[_Plan]:
        plans = [plan for plan, _ in self._open]
        self._open.clear()
        return plans


def _check_ctx_len(ctx_len: int) -> None:
    if ctx_len < 2:
        raise SaetuiInputError(
            f"--ctx-len is {ctx_len}; give at least 2 tokens (BOS plus one token), e.g. 128."
        )


def _plans(
    corpus: Corpus | Sequence[str],
    tokenizer: Any,
    ctx_len: int,
    prepend_bos: bool | None,
    open_windows: int,
    keep_tokens: bool,
) -> Iterator[tuple[_Plan, bool]]:
    _check_ctx_len(ctx_len)
    bos_flag = resolve_prepend_bos(tokenizer, prepend_bos)
    bos = int(tokenizer.bos_token_id) if bos_flag else None
    packer = _Packer(ctx_len, bos_flag, open_windows)
    documents = _documents(corpus)
    short_ids = [i for i, text in enumerate(documents) if len(text) <= LONG_DOCUMENT_CHARS]
    long_ids = {i for i, text in enumerate(documents) if len(text) > LONG_DOCUMENT_CHARS}
    shorts = _document_tokens(documents, short_ids, tokenizer, bos)
    pending = next(shorts, None)
    for doc_id in range(len(documents)):
        if doc_id in long_ids:
            for plan in _stream_long(packer, doc_id, documents[doc_id], tokenizer, bos):
                yield plan, bos_flag
            continue
        assert pending is not None and pending[0] == doc_id
        tokens = pending[1]
        pending = next(shorts, None)
        for plan in packer.add(doc_id, len(tokens), tokens if keep_tokens else None):
            yield plan, bos_flag
    for plan in packer.flush():
        yield plan, bos_flag


def _stream_long(
    packer: _Packer, doc_id: int, text: str, tokenizer: Any, bos: int | None
) -> Iterator[_Plan]:
    """Windows of a very long document, tokenised piece by piece, so a consumer that
    stops early (``max_tokens``) never tokenises or holds the whole text. Windows are the
    same as the packer makes from the whole document: its first ``ctx_len`` tokens, then
    continuation windows, then a tail piece that short documents may join."""
    ctx = packer.ctx_len
    start = int(packer.prepend_bos)
    step = ctx - start
    buffer = np.empty(0, dtype=np.uint32)
    base = 0  # document offset of buffer[0]
    offset = 0  # document offset of the next window's first token
    pieces = _token_pieces(text, tokenizer, bos)
    exhausted = False
    while not exhausted:
        piece = next(pieces, None)
        if piece is None:
            exhausted = True
        else:
            buffer = np.concatenate([buffer[offset - base :], piece])
            base = offset
        if offset == 0:
            if len(buffer) <= ctx and not exhausted:
                continue
            if len(buffer) <= ctx:  # the whole document fits one window: a short one
                yield from packer.add(doc_id, len(buffer), buffer)
                return
            yield [(Segment(doc_id, 0, 0, ctx), buffer, base)]
            offset = ctx
        # a continuation window only once more than `step` tokens follow (else: the tail)
        while base + len(buffer) - offset > step:
            yield [(Segment(doc_id, offset, start, step), buffer, base)]
            offset += step
    tail = base + len(buffer) - offset
    if tail > 0:
        yield from packer.add_tail(doc_id, offset, tail, buffer, base)


def _token_pieces(text: str, tokenizer: Any, bos: int | None) -> Iterator[np.ndarray]:
    """Token ids of ``text`` in pieces of about LONG_DOCUMENT_CHARS characters, cut just
    before a whitespace (where pre-tokenizers split anyway), BOS first."""
    first = True
    position = 0
    while position < len(text):
        end = min(len(text), position + LONG_DOCUMENT_CHARS)
        if end < len(text):
            cut = max(text.rfind(" ", position + 1, end), text.rfind("\n", position + 1, end))
            end = cut if cut > position else end
        ids = tokenize_documents(tokenizer, [text[position:end]])[0]
        piece = np.asarray(([bos] if first and bos is not None else []) + list(ids), np.uint32)
        first = False
        position = end
        yield piece


def _plan_length(plan: _Plan) -> int:
    return plan[-1][0].end


def iter_windows(
    corpus: Corpus | Sequence[str],
    tokenizer: Any,
    ctx_len: int = DEFAULT_CTX_LEN,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
    start_window: int = 0,
    *,
    open_windows: int = DEFAULT_OPEN_WINDOWS,
) -> Iterator[Window]:
    """Stream the windows of ``corpus`` (deterministic for the same corpus, tokenizer,
    ``ctx_len``, BOS choice and ``open_windows``).

    ``max_tokens`` stops after the window that brings the running total of window
    tokens (BOS included, counted from window 0) to ``max_tokens`` or more.
    ``start_window`` resumes: windows before it are planned (the corpus is
    tokenised again) but not yielded, and later windows are identical to a full run.
    """
    total = 0
    bos = getattr(tokenizer, "bos_token_id", None)
    plans = _plans(corpus, tokenizer, ctx_len, prepend_bos, open_windows, True)
    for window_id, (plan, bos_flag) in enumerate(plans):
        if max_tokens is not None and total >= max_tokens:
            return
        total += _plan_length(plan)
        if window_id >= start_window:
            yield _build_window(window_id, plan, bos_flag, bos)


def _build_window(window_id: int, plan: _Plan, bos_flag: bool, bos: int | None) -> Window:
    tokens = np.empty(_plan_length(plan), dtype=np.uint32)
    if plan[0][0].start == 1:  # a continuation window: fresh BOS at position 0
        if bos is None:  # the packer reserves position 0 only when a BOS is prepended
            raise ValueError("a continuation window needs the tokenizer's BOS id")
        tokens[0] = bos
    for segment, doc_tokens, base in plan:
        assert doc_tokens is not None
        first = segment.doc_offset - base
        tokens[segment.start : segment.end] = doc_tokens[first : first + segment.length]
    return Window(window_id, tokens, [segment for segment, _, _ in plan], bos_flag)


def count_windows(
    corpus: Corpus | Sequence[str],
    tokenizer: Any,
    ctx_len: int = DEFAULT_CTX_LEN,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
    *,
    open_windows: int = DEFAULT_OPEN_WINDOWS,
) -> int:
    """Exactly how many windows :func:`iter_windows` yields from window 0 (tokenises once)."""
    total = 0
    count = 0
    for plan, _ in _plans(corpus, tokenizer, ctx_len, prepend_bos, open_windows, False):
        if max_tokens is not None and total >= max_tokens:
            break
        total += _plan_length(plan)
        count += 1
    return count


def estimate_tokens(
    corpus: Corpus | Sequence[str],
    tokenizer: Any,
    prepend_bos: bool | None = None,
    sample_docs: int = 256,
) -> int:
    """Estimated document tokens (BOS included) of the corpus, from an evenly spaced
    sample of ``sample_docs`` documents scaled by characters; exact when the corpus
    has no more documents than that."""
    documents = _documents(corpus)
    if not documents:
        return 0
    bos = int(resolve_prepend_bos(tokenizer, prepend_bos))
    stride = max(1, len(documents) // sample_docs)
    # a prefix of each sampled document: a 50 MB document is estimated, not tokenised
    sample = [text[:LONG_DOCUMENT_CHARS] for text in documents[::stride]]
    tokens = sum(len(ids) for ids in tokenize_documents(tokenizer, sample))
    sample_chars = sum(len(text) for text in sample)
    all_chars = sum(len(text) for text in documents)
    if stride == 1 and sample_chars == all_chars:
        return tokens + bos * len(documents)
    return round(tokens * all_chars / max(sample_chars, 1)) + bos * len(documents)


def batch_windows(
    windows: Iterable[Window], batch_size: int, pad_token_id: int | None = None
) -> Iterator[WindowBatch]:
    """Group windows into batches of ``batch_size`` (the last may be smaller).

    Padding is on the right, so under causal attention it never changes what
    real tokens see; ``mask`` leaves out padding and every BOS.
    """
    if batch_size < 1:
        raise SaetuiInputError(f"--batch-size is {batch_size}; give a positive number.")
    pending: list[Window] = []
    for window in windows:
        pending.append(window)
        if len(pending) == batch_size:
            yield _make_batch(pending, pad_token_id)
            pending = []
    if pending:
        yield _make_batch(pending, pad_token_id)


def _make_batch(windows: list[Window], pad_token_id: int | None) -> WindowBatch:
    width = max(len(w) for w in windows)
    pad = 0 if pad_token_id is None else pad_token_id
    tokens = np.full((len(windows), width), pad, dtype=np.int64)
    mask = np.zeros((len(windows), width), dtype=bool)
    for row, window in enumerate(windows):
        tokens[row, : len(window)] = window.tokens
        mask[row, : len(window)] = window.counted_mask()
    return WindowBatch(
        tokens=tokens,
        lengths=np.array([len(w) for w in windows], dtype=np.int64),
        mask=mask,
        window_ids=np.array([w.window_id for w in windows], dtype=np.int64),
        segments=[w.segments for w in windows],
    )


def document_char_spans(tokenizer: Any, text: str, prepend_bos: bool) -> list[tuple[int, int]]:
    """Character span of each document token, indexed by ``doc_offset`` (BOS -> (0, 0)).

    Needs a fast tokenizer (offset mapping); byte-level tokens inside one
    character share that character's span.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return [(0, 0), *spans] if prepend_bos else spans


def document_text_span(
    tokenizer: Any, text: str, doc_start: int, doc_end: int, prepend_bos: bool
) -> tuple[int, int]:
    """Character range ``[a, b)`` of ``text`` covered by the document tokens with
    offsets ``[doc_start, doc_end)`` (so ``text[a:b]`` is that context)."""
    spans = document_char_spans(tokenizer, text, prepend_bos)
    # BOS covers no text: start at the first text token.
    chosen = spans[max(doc_start, int(prepend_bos)) : min(doc_end, len(spans))]
    if not chosen:
        return (0, 0)
    return min(a for a, _ in chosen), max(b for _, b in chosen)

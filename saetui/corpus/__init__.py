"""Corpus readers (json, jsonl, txt, directory, datasets) and windowing into model inputs."""

from saetui.corpus.readers import Corpus, content_hash, read_corpus
from saetui.corpus.split import held_out_ids, split_documents
from saetui.corpus.windows import (
    DEFAULT_CTX_LEN,
    Segment,
    Window,
    WindowBatch,
    batch_windows,
    count_windows,
    document_char_spans,
    document_text_span,
    estimate_tokens,
    iter_windows,
    locate,
    resolve_prepend_bos,
    tokenize_documents,
)

__all__ = [
    "DEFAULT_CTX_LEN",
    "Corpus",
    "Segment",
    "Window",
    "WindowBatch",
    "batch_windows",
    "content_hash",
    "count_windows",
    "document_char_spans",
    "document_text_span",
    "estimate_tokens",
    "held_out_ids",
    "iter_windows",
    "locate",
    "read_corpus",
    "resolve_prepend_bos",
    "split_documents",
    "tokenize_documents",
]

"""What the old pipeline's export (``saetui.export.old_pipeline``) holds, computed from an
index: the token order it numbered tokens by, contexts, analysis results, feature summaries,
decoder similarity and co-occurrence matrices, the activation database; plus the per-feature
record of the JSONL export. The writers and the file layout are in ``old_pipeline``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError

OLD_TOP_EXAMPLES = 25  # the old pipeline's feature_summary_top_k
OLD_CONTEXT_TOKENS = 10  # tokens either side of the firing one (its context_size)


@dataclass
class TokenMetadata:
    """One token of the activation database, with the old pipeline's field names."""

    global_idx: int  # row of the activation matrix
    text_idx: int  # document index in the corpus
    position: int  # token offset inside the document's text (its first token is 0)
    token_id: int
    token_str: str


# ---------------------------------------------------------------------- token order


def _prepends_start_token(index: Any) -> bool:
    """Whether documents begin with a start token saetui put there (offset 0, not text)."""
    details = index.get_meta("run_details") or {}
    start = details.get("start_token")
    return True if not isinstance(start, dict) else start.get("id") is not None


@dataclass
class TokenOrder:
    """The collection's counted tokens in the old pipeline's order: by document, then
    position inside the document's text. Arrays are in that (row) order."""

    text_idx: np.ndarray  # int64 [n]
    position: np.ndarray  # int64 [n]
    token_id: np.ndarray  # int64 [n]
    index_row: np.ndarray  # int64 [n]: the row's counted-token number in window order
    _keys: np.ndarray  # sorted saetui global indices (window * ctx_len + position)
    _rows: np.ndarray  # row of each of _keys

    def __len__(self) -> int:
        return len(self.text_idx)

    def row_of(self, global_index: int) -> int:
        """The old ``global_idx`` of a token named by saetui's global index."""
        at = int(np.searchsorted(self._keys, global_index))
        if at >= len(self._keys) or self._keys[at] != global_index:
            raise KeyError(global_index)
        return int(self._rows[at])


def token_order(index: Any) -> TokenOrder:
    """One pass over the index's windows: every counted token's document and position."""
    ctx = index.meta.ctx_len
    prepend = int(_prepends_start_token(index))
    docs, positions, token_ids, keys = [], [], [], []
    for window in range(index.progress().windows):
        view = index.window(window)
        where = np.zeros(len(view.token_ids), dtype=np.int64)
        doc = np.full(len(view.token_ids), -1, dtype=np.int64)
        for s in view.segments:
            doc[s.start : s.start + s.length] = s.doc_id
            where[s.start : s.start + s.length] = s.doc_offset + np.arange(s.length)
        counted = np.flatnonzero(view.mask)
        docs.append(doc[counted])
        positions.append(where[counted] - prepend)
        token_ids.append(view.token_ids[counted].astype(np.int64))
        keys.append(window * ctx + counted)
    if not docs:
        empty = np.zeros(0, dtype=np.int64)
        return TokenOrder(empty, empty, empty, empty, empty, empty)
    doc, position = np.concatenate(docs), np.concatenate(positions)
    order = np.lexsort((position, doc))  # row -> counted-token number in window order
    key = np.concatenate(keys)
    rows = np.empty(len(order), dtype=np.int64)
    rows[order] = np.arange(len(order))
    by_key = np.argsort(key)
    return TokenOrder(
        doc[order],
        position[order],
        np.concatenate(token_ids)[order],
        order,
        key[by_key],
        rows[by_key],
    )


# ---------------------------------------------------------------------- contexts


def load_tokenizer(index: Any) -> Any | None:
    """The run's tokenizer (for the old contexts), or None when it cannot be loaded here."""
    from transformers import AutoTokenizer

    from saetui.lm.embedded import EMBEDDED_MODELS, embedded_model_dir
    from saetui.lm.hub import model_source
    from saetui.lm.names import DEFAULT_MODEL

    name = str(index.meta.run_config.get("model") or "")
    try:
        if name in EMBEDDED_MODELS:
            return AutoTokenizer.from_pretrained(str(embedded_model_dir(name)))
        source = model_source(name, DEFAULT_MODEL)
        return AutoTokenizer.from_pretrained(
            source.location, local_files_only=source.local_files_only, cache_dir=source.cache_dir
        )
    except (SaetuiInputError, OSError, ValueError):
        return None


class Contexts:
    """Old-pipeline contexts: up to ``radius`` tokens either side of a token inside its own
    document (its counted tokens, so never a start token), detokenised by the run's
    tokenizer, or, when it cannot be loaded, the index's token strings joined."""

    def __init__(
        self, index: Any, order: TokenOrder, tokenizer: Any | None, radius: int = OLD_CONTEXT_TOKENS
    ):
        self._index, self._order, self._tokenizer, self._radius = index, order, tokenizer, radius

    def __call__(self, row: int) -> str:
        text = self._order.text_idx
        lo, hi = max(0, row - self._radius), min(len(text), row + self._radius + 1)
        # rows are sorted by document, then position: keep the ones of this document
        lo += int(np.searchsorted(text[lo:hi], text[row], side="left"))
        hi = lo + int(np.searchsorted(text[lo:hi], text[row], side="right"))
        ids = self._order.token_id[lo:hi]
        if self._tokenizer is None:
            return "".join(self._index.token_strings(ids))
        return self._tokenizer.decode([int(i) for i in ids])


# ---------------------------------------------------------------------- results


def hook_parts(hook: str | None) -> tuple[int | None, str | None]:
    from saetui.lm.model import hook_layer

    if not hook:
        return None, None
    layer = hook_layer(hook)
    name = hook.split(".", 2)[2] if layer is not None and hook.count(".") >= 2 else hook
    return layer, name


def analysis_results(index: Any) -> dict[str, Any]:
    """The old ``analysis_results`` JSON (its keys, with saetui's correct values) from an
    index's stored metrics and summaries, saetui's own keys and the SAELens family beside."""
    metrics = index.metrics()
    d_sae = index.meta.d_sae
    page = index.features(sort="id", descending=False, page_size=d_sae)
    counts = np.asarray(page.count)
    tokens = max(index.progress().counted_tokens, 1)
    frequency = counts / tokens
    dead = np.flatnonzero(counts == 0)
    sample = metrics.get("ce_sample") or {}
    return {
        "sparsity": {
            "l0_mean": metrics.get("l0_mean"),
            "l0_std": metrics.get("l0_std"),
            "l1_mean": metrics.get("l1_mean"),
            "l1_std": metrics.get("l1_std"),
            "n_features": int(d_sae),
            "n_tokens": int(tokens),
            "mean_activation_frequency": float(frequency.mean()),
            "median_activation_frequency": float(np.median(frequency)),
        },
        "dead_features": {
            "n_dead": len(dead),
            "pct_dead": 100.0 * len(dead) / d_sae,
            "threshold": 0.0,
            "use_training_metric": True,  # dead = never fired in the collection
            "count": len(dead),
            "fraction": float(len(dead) / d_sae),
            "indices": dead.tolist(),
            "dense_1pct": int((frequency > 0.01).sum()),
            "dense_10pct": int((frequency > 0.10).sum()),
        },
        "reconstruction": {
            "mse": metrics.get("mse"),
            "explained_variance": metrics.get("explained_variance"),
            "cosine_similarity": metrics.get("cosine"),
            "original_std": metrics.get("original_std"),
            "residual_std": metrics.get("residual_std"),
            "n_tokens": metrics.get("tokens"),
            "explained_variance_legacy": metrics.get("explained_variance_legacy"),
            "fvu": metrics.get("fvu"),
            "l2_ratio": metrics.get("l2_ratio"),
        },
        "ablation": {
            "baseline_loss": metrics.get("ce_clean"),
            "zero_ablation_loss": metrics.get("ce_zero_ablation"),
            "sae_reconstruction_loss": metrics.get("ce_with_sae"),
            "loss_recovered": metrics.get("ce_loss_recovered"),
            "n_batches": sample.get("windows"),
            "kl_divergence": metrics.get("kl_clean_sae"),
            "n_tokens": metrics.get("ce_tokens"),
            "sample": sample or None,
        },
        "saelens": metrics.get("saelens", {}),
        "config": index.meta.run_config,
    }


def feature_summaries(
    index: Any,
    order: TokenOrder,
    contexts: Callable[[int], str],
    top_examples: int = OLD_TOP_EXAMPLES,
) -> Iterator[dict[str, Any]]:
    """One old-format summary per feature that fired, in feature order."""
    page = index.features(sort="id", descending=False, page_size=index.meta.d_sae)
    tokens = max(int(page.counted_tokens), 1)
    for feature, count, mean in zip(
        page.feature.tolist(), page.count.tolist(), page.mean.tolist(), strict=True
    ):
        if count <= 0:
            continue  # the old pipeline wrote no line for a feature that never fired
        examples = []
        for example in index.top_examples(feature, top_examples):
            row = order.row_of(example.global_index)
            examples.append(
                {
                    "token": example.tokens[example.position],
                    "activation": float(example.value),
                    "context": contexts(row),
                    "position": int(order.position[row]),
                    "text_idx": int(order.text_idx[row]),
                    "global_idx": row,
                }
            )
        yield {
            "feature": int(feature),
            "activation_frequency": float(count),
            "activation_fraction": count / tokens,
            "mean_activation": float(mean),
            "top_examples": examples,
        }


def feature_record(index: Any, feature: int, n_examples: int = 20) -> dict[str, Any]:
    """Everything the feature view shows, as JSON values."""
    detail = index.feature(feature, n_examples=n_examples)
    stats = detail.stats

    def example_json(example: Any) -> dict[str, Any]:
        return {
            "value": float(example.value),
            "window": int(example.window),
            "position": int(example.position),
            "doc_id": int(example.doc_id),
            "doc_offset": int(example.doc_offset),
            "global_index": int(example.global_index),
            "tokens": list(example.tokens),
            "activations": [round(float(a), 5) for a in example.activations],
        }

    return {
        "feature": feature,
        "label": detail.label.label if detail.label else None,
        "notes": detail.label.notes if detail.label else None,
        "count": int(stats.count),
        "density": float(stats.density),
        "mean": float(stats.mean),
        "std": float(stats.std),
        "max": float(stats.max),
        "histogram": {"counts": stats.histogram.tolist(), "bin_edges": stats.bin_edges.tolist()},
        "top_tokens": [[token, int(count)] for token, count in detail.top_tokens],
        "top_examples": [example_json(e) for e in detail.examples],
        "interval_samples": [
            {
                "low": float(s.low),
                "high": float(s.high),
                "examples": [example_json(e) for e in s.examples],
            }
            for s in detail.samples
        ],
        "neighbours": {
            metric: {"ids": n.ids.tolist(), "scores": [float(x) for x in n.scores]}
            for metric, n in detail.neighbours.items()
        },
    }


# ---------------------------------------------------------------------- matrices


def decoder_similarity(index: Any) -> np.ndarray:
    from saetui.sae import load_sae

    sae_path = index.meta.run_config.get("sae_path")
    if not sae_path or not Path(sae_path).exists():
        raise SaetuiInputError(
            f"The SAE this index was collected with ({sae_path}) is not there any more; the "
            "similarity matrix needs its decoder: restore it or export without matrices."
        )
    import torch

    w_dec = load_sae(sae_path).W_dec.detach().float()
    unit = torch.nn.functional.normalize(w_dec, dim=-1)
    return (unit @ unit.T).numpy()


def cooccurrence_counts(index: Any) -> np.ndarray:
    """Dense [d_sae, d_sae] int32 counts of tokens on which both features fired (the
    diagonal: tokens each feature fired on), from one scan of the forward index."""
    import scipy.sparse as sp

    d_sae = index.meta.d_sae
    counts = np.zeros((d_sae, d_sae), dtype=np.int32)
    for chunk in index.iter_forward():
        fired = sp.csr_matrix(
            (np.ones(len(chunk.feature_ids), np.int32), chunk.feature_ids, chunk.offsets),
            shape=(len(chunk.offsets) - 1, d_sae),
        )
        counts += (fired.T @ fired).toarray().astype(np.int32)
    return counts


def phi_correlation(counts: np.ndarray, tokens: int, stripe: int = 1024) -> np.ndarray:
    """The phi coefficient (Pearson correlation of the binary firing indicators) of every
    feature pair from co-occurrence ``counts`` over ``tokens`` tokens, float32 in [-1, 1].
    Undefined where a feature never (or always) fires: 0 there, its diagonal included."""
    n = np.diag(counts).astype(np.float64)
    spread = np.sqrt(n * (tokens - n))
    out = np.zeros(counts.shape, dtype=np.float32)
    for a in range(0, len(n), stripe):
        b = min(a + stripe, len(n))
        numerator = tokens * counts[a:b].astype(np.float64) - n[a:b, None] * n[None, :]
        denominator = spread[a:b, None] * spread[None, :]
        block = np.divide(
            numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0
        )
        out[a:b] = np.clip(block, -1.0, 1.0)
    return out


# ---------------------------------------------------------------------- activation database


def activation_database(index: Any, order: TokenOrder) -> dict[str, Any]:
    """The old ``ActivationDatabase`` pickle's content: ``activation_matrix`` (scipy CSR,
    float32 [n_tokens, d_sae], rows in the old token order), ``token_metadata`` (one
    :class:`TokenMetadata` per row) and ``feature_metadata``."""
    import scipy.sparse as sp

    d_sae = index.meta.d_sae
    parts = [
        sp.csr_matrix(
            (chunk.values.astype(np.float32), chunk.feature_ids, chunk.offsets),
            shape=(len(chunk.offsets) - 1, d_sae),
        )
        for chunk in index.iter_forward()
    ]
    window_order = (
        sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, d_sae), dtype=np.float32)
    )
    matrix = window_order[order.index_row].astype(np.float32)
    matrix.sort_indices()
    strings = index.token_strings(order.token_id)
    metadata = [
        TokenMetadata(row, int(doc), int(pos), int(token), text)
        for row, (doc, pos, token, text) in enumerate(
            zip(order.text_idx, order.position, order.token_id, strings, strict=True)
        )
    ]
    counts = np.diff(matrix.tocsc().indptr).astype(np.int64)
    totals = np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()
    mean = np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)
    n_tokens = matrix.shape[0]
    return {
        "activation_matrix": matrix,
        "token_metadata": metadata,
        "feature_metadata": {
            "n_features": int(d_sae),
            "n_tokens": int(n_tokens),
            "activation_counts": counts.tolist(),
            "total_activations": totals.tolist(),
            "mean_activation": mean.tolist(),
            "sparsity": 1.0 - matrix.nnz / max(n_tokens * d_sae, 1),
            "ever_fired": (counts > 0).tolist(),
            "activation_threshold": 0.0,
        },
    }

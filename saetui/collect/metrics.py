"""SAE quality metrics in two named families, accumulated in float64 on the device that runs
the SAE, from the collection's own activations (reconstruction) and from spliced forward
passes over a sample of its windows (CE loss and KL).

``saetui`` family — the definitions saetui reports first (token-weighted over the counted
tokens: real tokens that are not a document's start token; padding never counts):

- explained variance = 1 - sum_t ||x_t - x̂_t||² / sum_t ||x_t - mean_t x||²;
- fvu = 1 - explained variance; MSE = mean over every element of (x - x̂)²;
- explained variance (legacy) = mean over tokens of 1 - ||x - x̂||² / ||x - mean_batch x||²;
- cosine(x, x̂), L2 ratio ||x̂|| / ||x||, L0 = active features per token, L1 = sum of |f|;
- CE at positions whose token and next token are counted and whose next token is no start
  token; CE zero-ablation replaces the counted positions only; CE loss recovered =
  (CE_zero - CE_sae) / (CE_zero - CE_clean); KL(clean || SAE) over the same positions;
- dead = never fired in the collection; dense = fires on more than 1% / 10% of tokens.

``saelens`` family — computed as SAELens ``evals.py`` computes them (SAEBench core reports
the same keys); the batch is a group of ``SAELENS_BATCH_WINDOWS`` windows by window id,
special tokens (the tokenizer's BOS, EOS and pad ids) are left out by id:

- explained_variance = 1 - mean_b(mean_t ||x - x̂||²) / (M - (M / d)²) with
  M = mean_b(mean_t ||x||²): it squares the mean of x², and weights batches equally;
- mse = mean over tokens of ||x - x̂||² / (tokens in the token's batch);
- explained_variance_legacy, cossim, l2_norm_in, l2_norm_out, l2_ratio (||x|| < 1e-4
  counted as 1), relative_reconstruction_bias = mean_b(mean ||x̂||² / mean x·x̂), l0 (f > 0),
  l1 (sum of f), feature_density, frac_alive, freq_over_1/10_percent and their normalised
  forms (SAEBench), encoder-decoder cosine per feature;
- CE at every non-special position whose next token is real (a next document's start token
  included); zero-ablation replaces every position; KL at every non-special position,
  a window's last included; ce_loss_score and kl_div_score = (ablation - SAE) / ablation
  (CE: divided by ablation - clean).

The accumulators live in :mod:`saetui.collect.reconstruction` (reconstruction and sparsity)
and :mod:`saetui.collect.behaviour` (CE loss and KL); this module holds the densities, the
weight metrics and the joining of families, and re-exports the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from saetui.collect.behaviour import (
    LOGPROB_CHUNK_ELEMENTS,
    BehaviourMetrics,
    ScoredBatch,
    next_token_loss_mask,
    saelens_positions,
)
from saetui.collect.reconstruction import (
    F64,
    SAELENS_BATCH_WINDOWS,
    STATE_VERSION,
    ReconstructionAccumulator,
)

__all__ = [
    "F64",
    "LOGPROB_CHUNK_ELEMENTS",
    "SAELENS_BATCH_WINDOWS",
    "STATE_VERSION",
    "BehaviourMetrics",
    "ReconstructionAccumulator",
    "ScoredBatch",
    "density_metrics",
    "merge_families",
    "next_token_loss_mask",
    "saelens_density_metrics",
    "saelens_positions",
    "special_token_ids",
    "weight_metrics",
]


def special_token_ids(tokenizer: Any) -> list[int]:
    """The ids SAELens' eval runner ignores: the tokenizer's pad, EOS and BOS (as saetui's
    start-token rule set it)."""
    ids = {getattr(tokenizer, name, None) for name in ("pad_token_id", "eos_token_id")}
    ids.add(getattr(tokenizer, "bos_token_id", None))
    return sorted(int(i) for i in ids if i is not None)


def density_metrics(counts: np.ndarray, tokens: int) -> dict[str, Any]:
    """saetui's dead/dense counts from per-feature firing counts over ``tokens`` tokens."""
    counts = np.asarray(counts)
    density = counts / max(int(tokens), 1)
    return {
        "dead_features": int((counts == 0).sum()),
        "dead_fraction": float((counts == 0).mean()) if len(counts) else 0.0,
        "dense_1pct": int((density > 0.01).sum()),
        "dense_10pct": int((density > 0.10).sum()),
    }


def saelens_density_metrics(counts: np.ndarray, tokens: int) -> dict[str, Any]:
    """SAEBench core's ``misc_metrics`` from SAELens' ``feature_density`` (fractions)."""
    density = np.asarray(counts, dtype=np.float64) / max(int(tokens), 1)
    total = float(density.sum())

    def normalised(threshold: float) -> float:
        return float(density[density > threshold].sum() / total) if total > 0 else 0.0

    return {
        "feature_density_mean": float(density.mean()) if len(density) else 0.0,
        "frac_alive": float((density > 0).mean()) if len(density) else 0.0,
        "freq_over_1_percent": float((density > 0.01).mean()) if len(density) else 0.0,
        "freq_over_10_percent": float((density > 0.1).mean()) if len(density) else 0.0,
        "normalized_freq_over_1_percent": normalised(0.01),
        "normalized_freq_over_10_percent": normalised(0.1),
    }


@torch.no_grad()
def weight_metrics(sae: Any) -> dict[str, list[float]]:
    """SAELens' feature-wise weight metrics: encoder norm, encoder bias (``b_mag`` for gated,
    zeros when there is none) and the cosine between each feature's encoder and decoder."""
    w_enc = sae.W_enc.detach().to(F64)
    w_dec = sae.W_dec.detach().to(F64)
    cosine = torch.nn.functional.cosine_similarity(w_enc.T, w_dec, dim=-1)
    bias = sae.b_mag if sae.architecture == "gated" else sae.b_enc
    bias = torch.zeros(sae.d_sae, dtype=F64) if bias is None else bias.detach().to(F64)
    return {
        "encoder_norm": w_enc.norm(dim=0).cpu().tolist(),
        "encoder_bias": bias.reshape(-1).cpu().tolist(),
        "encoder_decoder_cosine_sim": cosine.cpu().tolist(),
    }


def merge_families(*parts: dict[str, Any]) -> dict[str, Any]:
    """Merge metric dicts, joining their nested ``saelens`` dicts."""
    out: dict[str, Any] = {}
    saelens: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "saelens":
                saelens.update(value)
            else:
                out[key] = value
    if saelens:
        out["saelens"] = saelens
    return out

"""Streaming SAE quality metrics (SAELens' current definitions), token-weighted,
accumulated in float64, with padding and BOS positions excluded by the caller's mask.

- explained variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), over all tokens;
- legacy explained variance: the per-batch, per-token form older SAELens versions logged,
  mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2 (kept for comparison);
- MSE (per element), cosine(x, x_hat), L2 ratio ||x_hat|| / ||x||, L0 and L1 per token;
- CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean); KL(P_clean || P_sae).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

F64 = torch.float64


@dataclass
class ReconstructionMetrics:
    """Running sums for reconstruction and sparsity metrics over real tokens."""

    d_sae: int
    tokens: int = 0
    sum_sq_error: float = 0.0
    sum_sq_x: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_cosine: float = 0.0
    sum_l2_ratio: float = 0.0
    sum_legacy_ev: float = 0.0
    sum_l0: float = 0.0
    sum_sq_l0: float = 0.0
    sum_l1: float = 0.0
    elements_per_token: int = 0
    feature_counts: torch.Tensor | None = field(default=None, repr=False)
    l0_counts: torch.Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, feature_acts: torch.Tensor) -> None:
        """Add real tokens: ``x``, ``x_hat`` [n, d_in] and dense ``feature_acts`` [n, d_sae]."""
        if x.shape[0] == 0:
            return
        x64, xh64 = x.to(F64), x_hat.to(F64)
        error = (x64 - xh64).pow(2).sum(-1)
        self.tokens += x.shape[0]
        self.elements_per_token = x.shape[1]
        self.sum_sq_error += float(error.sum())
        self.sum_sq_x += float(x64.pow(2).sum())
        batch_sum = x64.sum(0)
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum.to(self.sum_x)
        x_norm = x64.norm(dim=-1)
        xh_norm = xh64.norm(dim=-1)
        self.sum_cosine += float(torch.nn.functional.cosine_similarity(x64, xh64, dim=-1).sum())
        self.sum_l2_ratio += float((xh_norm / x_norm.clamp_min(1e-12)).sum())
        centred = (x64 - x64.mean(0, keepdim=True)).pow(2).sum(-1).clamp_min(1e-12)
        self.sum_legacy_ev += float((1 - error / centred).sum())
        active = feature_acts != 0
        l0 = active.sum(-1).to(F64)
        self.sum_l0 += float(l0.sum())
        self.sum_sq_l0 += float(l0.pow(2).sum())
        l0_bins = torch.bincount(active.sum(-1).cpu(), minlength=self.d_sae + 1)
        self.l0_counts = l0_bins if self.l0_counts is None else self.l0_counts + l0_bins
        self.sum_l1 += float(feature_acts.to(F64).abs().sum())
        counts = active.sum(0).to(torch.int64)
        self.feature_counts = (
            counts
            if self.feature_counts is None
            else self.feature_counts + counts.to(self.feature_counts)
        )

    def result(self) -> dict[str, Any]:
        """The metrics as plain floats (empty dict before any token)."""
        n = self.tokens
        if n == 0:
            return {}
        mean_x = self.sum_x / n
        total_variance = self.sum_sq_x / n - float(mean_x.pow(2).sum())
        l0_mean = self.sum_l0 / n
        counts = self.feature_counts.cpu()
        density = counts.to(F64) / n
        return {
            "tokens": n,
            "mse": self.sum_sq_error / (n * self.elements_per_token),
            "explained_variance": 1 - (self.sum_sq_error / n) / total_variance,
            "explained_variance_legacy": self.sum_legacy_ev / n,
            "fvu": (self.sum_sq_error / n) / total_variance,
            "cosine": self.sum_cosine / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "l0_mean": l0_mean,
            "l0_std": math.sqrt(max(self.sum_sq_l0 / n - l0_mean**2, 0.0)),
            "l1_mean": self.sum_l1 / n,
            "dead_features": int((counts == 0).sum()),
            "dead_fraction": float((counts == 0).to(F64).mean()),
            "dense_1pct": int((density > 0.01).sum()),
            "dense_10pct": int((density > 0.10).sum()),
            # [[L0, tokens with that L0], ...] for the L0-per-token histogram
            "l0_histogram": [
                [int(value), int(self.l0_counts[value])]
                for value in self.l0_counts.nonzero().flatten().tolist()
            ],
        }


@dataclass
class ModelBehaviourMetrics:
    """Running sums of next-token CE (clean, SAE spliced in, zero-ablated) and KL."""

    tokens: int = 0
    ce_clean: float = 0.0
    ce_sae: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0

    @torch.no_grad()
    def update(
        self,
        clean_logits: torch.Tensor,
        sae_logits: torch.Tensor,
        zero_logits: torch.Tensor,
        targets: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> None:
        """Add positions where ``loss_mask`` [b, t] is true; logits predict ``targets`` [b, t]."""
        if not bool(loss_mask.any()):
            return
        # log-softmax in float32 (a float64 copy of [tokens, vocab] logits costs more than the
        # forward pass); per-token results are summed in float64.
        picked = [
            logits[loss_mask].float().log_softmax(-1)
            for logits in (clean_logits, sae_logits, zero_logits)
        ]
        target = targets[loss_mask]
        nll = [-lp.gather(-1, target[:, None]).squeeze(-1).to(F64) for lp in picked]
        clean_lp, sae_lp = picked[0], picked[1]
        self.tokens += int(target.shape[0])
        self.ce_clean += float(nll[0].sum())
        self.ce_sae += float(nll[1].sum())
        self.ce_zero += float(nll[2].sum())
        self.kl += float((clean_lp.exp() * (clean_lp - sae_lp)).sum(-1).to(F64).sum())

    def result(self) -> dict[str, Any]:
        n = self.tokens
        if n == 0:
            return {}
        clean, sae, zero = self.ce_clean / n, self.ce_sae / n, self.ce_zero / n
        return {
            "ce_tokens": n,
            "ce_clean": clean,
            "ce_with_sae": sae,
            "ce_zero_ablation": zero,
            "ce_loss_recovered": (zero - sae) / (zero - clean) if zero != clean else float("nan"),
            "kl_clean_sae": self.kl / n,
        }


def next_token_loss_mask(
    tokens: torch.Tensor, real: torch.Tensor, bos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and the positions whose next-token loss counts.

    A position counts when it is a real, non-BOS token (its activation is the one the SAE
    replaces) and the next token is real and not a BOS (a new packed document).
    """
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    next_real = torch.zeros_like(real)
    next_real[:, :-1] = real[:, 1:]
    if bos_id is not None:
        next_real &= targets != bos_id
    return targets, real & next_real

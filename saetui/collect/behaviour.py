"""CE loss and KL of both metric families (their definitions: :mod:`saetui.collect.metrics`)
from spliced forward passes: running float64 sums, log-probabilities taken a bounded number
of rows at a time, and the positions each family scores."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from saetui.collect.reconstruction import F64

LOGPROB_CHUNK_ELEMENTS = 1 << 24  # float64 log-probabilities held at once (128 MiB)


@dataclass
class BehaviourMetrics:
    """Running sums of next-token CE and KL for both families over spliced forward passes."""

    windows: int = 0
    batches: int = 0
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            [
                "ce_tokens",
                "ce_clean",
                "ce_sae",
                "ce_zero",
                "kl",
                "sl_ce_tokens",
                "sl_ce_clean",
                "sl_ce_sae",
                "sl_ce_abl",
                "sl_kl_tokens",
                "sl_kl_sae",
                "sl_kl_abl",
            ],
            0.0,
        )
    )

    @classmethod
    def combine(cls, parts: Iterable[BehaviourMetrics]) -> BehaviourMetrics:
        """One set of sums from several processes' (a distributed run's ranks)."""
        total = cls()
        for part in parts:
            total.windows += part.windows
            total.batches += part.batches
            for key, value in part.sums.items():
                total.sums[key] = total.sums.get(key, 0.0) + value
        return total

    @torch.no_grad()
    def update(
        self,
        clean_logits: torch.Tensor,
        variants: Iterable[tuple[str, torch.Tensor | None]],
        targets: torch.Tensor,
        positions: dict[str, torch.Tensor],
        windows: int,
    ) -> None:
        """Add one batch of ``windows`` windows.

        ``variants`` yields ``(name, logits [b, t, V])`` for "sae" (spliced at counted
        tokens), "sae_saelens" (spliced at non-special tokens; None: the same logits as
        "sae"), "zero" (counted tokens zeroed) and "zero_all" (every position zeroed); each
        is scored as it comes, so only one is held besides the clean logits. ``positions``
        [b, t] holds "ce" (saetui CE and KL), "sl_ce" (SAELens CE) and "sl_kl" (SAELens KL);
        ``targets`` [b, t] is the next token of each position. Log-probabilities are taken
        in float64, a bounded number of rows at a time."""
        batch = ScoredBatch(clean_logits, targets, positions, windows)
        scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, logits in variants:
            scores[name] = scores["sae"] if logits is None else batch.score(logits)
        self.add(batch, scores)

    def add(self, batch: ScoredBatch, scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add ``batch`` with its variants' ``scores`` (:meth:`ScoredBatch.score` of the logits
        named as in :meth:`update`); several SAEs at one hook share the batch and its "zero"
        and "zero_all" scores."""
        self.windows += batch.windows
        self.batches += 1
        clean_nll = batch.clean_nll
        sums = self.sums
        ce, sl_ce, sl_kl = batch.picked["ce"], batch.picked["sl_ce"], batch.picked["sl_kl"]
        sums["ce_tokens"] += int(ce.sum())
        sums["ce_clean"] += float(clean_nll[ce].sum())
        sums["ce_sae"] += float(scores["sae"][0][ce].sum())
        sums["ce_zero"] += float(scores["zero"][0][ce].sum())
        sums["kl"] += float(scores["sae"][1][ce].sum())
        sums["sl_ce_tokens"] += int(sl_ce.sum())
        sums["sl_ce_clean"] += float(clean_nll[sl_ce].sum())
        sums["sl_ce_sae"] += float(scores["sae_saelens"][0][sl_ce].sum())
        sums["sl_ce_abl"] += float(scores["zero_all"][0][sl_ce].sum())
        sums["sl_kl_tokens"] += int(sl_kl.sum())
        sums["sl_kl_sae"] += float(scores["sae_saelens"][1][sl_kl].sum())
        sums["sl_kl_abl"] += float(scores["zero_all"][1][sl_kl].sum())

    def result(self) -> dict[str, Any]:
        """saetui's CE/KL keys, and the SAELens ones nested under ``saelens``."""
        s = self.sums
        out: dict[str, Any] = {}
        n = s["ce_tokens"]
        if n:
            clean, sae, zero = s["ce_clean"] / n, s["ce_sae"] / n, s["ce_zero"] / n
            out.update(
                {
                    "ce_tokens": int(n),
                    "ce_clean": clean,
                    "ce_with_sae": sae,
                    "ce_zero_ablation": zero,
                    "ce_loss_recovered": _ratio(zero - sae, zero - clean),
                    "kl_clean_sae": s["kl"] / n,
                }
            )
        saelens: dict[str, Any] = {}
        m = s["sl_ce_tokens"]
        if m:
            clean, sae, abl = s["sl_ce_clean"] / m, s["sl_ce_sae"] / m, s["sl_ce_abl"] / m
            saelens.update(
                {
                    "ce_tokens": int(m),
                    "ce_loss_without_sae": clean,
                    "ce_loss_with_sae": sae,
                    "ce_loss_with_ablation": abl,
                    "ce_loss_score": _ratio(abl - sae, abl - clean),
                }
            )
        k = s["sl_kl_tokens"]
        if k:
            kl_sae, kl_abl = s["sl_kl_sae"] / k, s["sl_kl_abl"] / k
            saelens.update(
                {
                    "kl_tokens": int(k),
                    "kl_div_with_sae": kl_sae,
                    "kl_div_with_ablation": kl_abl,
                    "kl_div_score": _ratio(kl_abl - kl_sae, kl_abl),
                }
            )
        if saelens:
            out["saelens"] = saelens
        return out


class ScoredBatch:
    """One batch's clean side of CE and KL: the rows any family scores (the union of
    ``positions``), their targets and clean log-likelihoods; :meth:`score` scores a
    variant's logits against it. What does not depend on the SAE, shared by every SAE
    measured on the batch."""

    @torch.no_grad()
    def __init__(
        self,
        clean_logits: torch.Tensor,
        targets: torch.Tensor,
        positions: dict[str, torch.Tensor],
        windows: int,
    ) -> None:
        union = positions["ce"] | positions["sl_ce"] | positions["sl_kl"]
        self.windows = windows
        self.union = union
        self.picked = {name: positions[name][union] for name in ("ce", "sl_ce", "sl_kl")}
        self.target = targets[union]
        self.clean_rows = clean_logits[union]
        self.clean_nll, _ = _scores(self.clean_rows, self.clean_rows, self.target)

    @torch.no_grad()
    def score(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row NLL under ``logits`` [b, t, V] and KL(clean || them), in float64."""
        return _scores(self.clean_rows, logits[self.union], self.target)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else float("nan")


def _scores(
    clean: torch.Tensor, other: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL of ``target`` under ``other`` and KL(clean || other), in float64."""
    nll, kl = [], []
    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(clean.shape[-1], 1))
    for a in range(0, len(target), rows):
        b = a + rows
        lp_clean = clean[a:b].to(F64).log_softmax(-1)
        lp = lp_clean if other is clean else other[a:b].to(F64).log_softmax(-1)
        nll.append(-lp.gather(-1, target[a:b, None]).squeeze(-1))
        kl.append((lp_clean.exp() * (lp_clean - lp)).sum(-1))
    if not nll:
        empty = torch.zeros(0, dtype=F64, device=clean.device)
        return empty, empty
    return torch.cat(nll), torch.cat(kl)


def next_token_loss_mask(
    tokens: torch.Tensor, real: torch.Tensor, bos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and the positions whose next-token loss counts in the saetui family.

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


def saelens_positions(
    real: torch.Tensor, special: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' CE and KL positions in right-padded windows: KL at every real non-special
    token; CE where, in addition, the next position is a real token (whatever it is)."""
    kl = real & ~special
    ce = torch.zeros_like(kl)
    ce[:, :-1] = kl[:, :-1] & real[:, 1:]
    return ce, kl

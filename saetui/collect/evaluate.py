"""Measure an SAE on a model and corpus: reconstruction, sparsity and CE-loss metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from saetui.collect.metrics import (
    ModelBehaviourMetrics,
    ReconstructionMetrics,
    next_token_loss_mask,
)


@torch.no_grad()
def evaluate_sae(
    model: Any,
    sae: Any,
    hook: str,
    batches: Iterable[Any],
    *,
    max_tokens: int | None = None,
    with_ce: bool = True,
    progress: Callable[[int], None] | None = None,
    check_stop: Callable[[], None] | None = None,
    reduce: Callable[..., tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Metrics of ``sae`` at ``hook`` over window batches (``tokens`` [b, t], ``mask`` [b, t]
    true on real non-BOS tokens). The SAE replaces the activation only at masked positions,
    so BOS and padding keep their clean values in the spliced forward pass.
    ``check_stop`` is called between batches and raises to stop. ``reduce`` combines the
    running sums with other processes' (a distributed run) before the metrics are taken."""
    reconstruction = ReconstructionMetrics(d_sae=sae.d_sae)
    behaviour = ModelBehaviourMetrics()
    device = model.device
    sae_dtype = sae.dtype
    for batch in batches:
        if check_stop is not None:
            check_stop()
        tokens = torch.as_tensor(batch.tokens, device=device)
        mask = torch.as_tensor(batch.mask, device=device)
        if with_ce:
            clean_logits, activations = model.logits_and_activations(tokens, hook)
        else:
            activations = model.activations(tokens, hook)
        x = activations[mask].to(sae_dtype)
        feature_acts = sae.encode(x)
        x_hat = sae.decode(feature_acts)
        reconstruction.update(x, x_hat, feature_acts)
        if with_ce:
            spliced = activations.clone()
            spliced[mask] = x_hat.to(spliced.dtype)
            zeroed = activations.masked_fill(mask[..., None], 0.0)
            targets, loss_mask = next_token_loss_mask(tokens, mask, model.bos_token_id)
            behaviour.update(
                clean_logits,
                model.logits_with_activation(tokens, hook, spliced),
                model.logits_with_activation(tokens, hook, zeroed),
                targets,
                loss_mask,
            )
        if progress:
            progress(reconstruction.tokens)
        if max_tokens is not None and reconstruction.tokens >= max_tokens:
            break
    if reduce is not None:
        reconstruction, behaviour = reduce(reconstruction, behaviour)
    return {**reconstruction.result(), **behaviour.result()}

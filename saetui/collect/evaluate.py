"""Measure an SAE on a model and windows: reconstruction and sparsity from the activations
the SAE encodes, CE loss and KL from forward passes with the activation replaced. Both
metric families (:mod:`saetui.collect.metrics`) come out of the same passes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saetui.collect.metrics import (
    BehaviourMetrics,
    ReconstructionAccumulator,
    density_metrics,
    merge_families,
    next_token_loss_mask,
    saelens_density_metrics,
    saelens_positions,
    special_token_ids,
)


@dataclass
class EncodedWindows:
    """A window batch's real tokens (padding dropped, windows concatenated) as the SAE saw
    them: its input ``x`` [n, d_in], sparse codes ``ids``/``values`` [n, K] (value 0: empty
    slot; start tokens get none) and which rows are ``counted`` [n]."""

    x: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor
    counted: torch.Tensor


def real_mask(batch: Any) -> np.ndarray:
    """bool [B, T]: positions inside each window (not padding)."""
    width = np.asarray(batch.tokens).shape[1]
    return np.arange(width)[None, :] < np.asarray(batch.lengths)[:, None]


@torch.no_grad()
def encode_windows(sae: Any, activations: torch.Tensor, batch: Any) -> EncodedWindows:
    """Encode the real tokens of ``batch`` from its activations [B, T, d_in]."""
    device = activations.device
    real = torch.as_tensor(real_mask(batch), device=device)
    counted = torch.as_tensor(np.asarray(batch.mask), device=device)[real]
    x = activations[real]
    ids, values = sae.encode_sparse(x, mask=counted)
    return EncodedWindows(x, ids.to(torch.int32), values, counted)


@torch.no_grad()
def add_reconstruction(
    accumulator: ReconstructionAccumulator,
    sae: Any,
    batch: Any,
    encoded: EncodedWindows,
    special_ids: list[int],
) -> None:
    """Feed a batch's counted tokens to ``accumulator`` (decoded from their sparse codes, on
    the device the SAE runs on)."""
    mask = np.asarray(batch.mask)
    counted = encoded.counted
    x, ids, values = encoded.x[counted], encoded.ids[counted], encoded.values[counted]
    x_hat = sae.decode_sparse(ids, values, x)
    saelens = ~np.isin(np.asarray(batch.tokens), special_ids)[mask]
    accumulator.add(batch.window_ids, mask.sum(1), saelens, x, x_hat, ids, values)


@torch.no_grad()
def add_behaviour(
    behaviour: BehaviourMetrics,
    model: Any,
    sae: Any,
    hook: str,
    batch: Any,
    special_ids: list[int],
) -> tuple[torch.Tensor, EncodedWindows]:
    """One batch of CE loss and KL for both families: a clean forward pass (which also reads
    the hook), then the passes with the activation replaced, from the hook onward.

    saetui splices x̂ into the counted tokens and zeroes only those; SAELens splices into
    every non-special token and zeroes every position. Returns the hook activations and the
    batch's codes, for callers that also want reconstruction metrics."""
    tokens = torch.as_tensor(np.asarray(batch.tokens), device=model.device)
    clean_logits, activations = model.logits_and_activations(tokens, hook)
    device = activations.device
    tokens = tokens.to(device)
    real = torch.as_tensor(real_mask(batch), device=device)
    counted = torch.as_tensor(np.asarray(batch.mask), device=device)
    special = torch.isin(tokens, torch.tensor(special_ids, dtype=tokens.dtype, device=device))
    encoded = encode_windows(sae, activations, batch)
    # x̂ at every real token that either family replaces (its code from the batch's encode)
    splice_rows = encoded.counted | ~special[real]
    rows = splice_rows.nonzero().flatten()
    x_hat = sae.decode_sparse(encoded.ids[rows], encoded.values[rows], encoded.x[rows])
    reconstructed = activations.clone()
    where = torch.zeros_like(real)
    where[real] = splice_rows
    reconstructed[where] = x_hat.to(activations.dtype)
    saelens_splice = real & ~special
    targets, ce_positions = next_token_loss_mask(tokens, counted, model.bos_token_id)
    sl_ce, sl_kl = saelens_positions(real, special)

    def replaced(at: torch.Tensor) -> torch.Tensor:
        return torch.where(at[..., None], reconstructed, activations)

    def variants() -> Iterator[tuple[str, torch.Tensor | None]]:
        yield "sae", model.logits_with_activation(tokens, hook, replaced(counted))
        same = torch.equal(saelens_splice, counted)
        yield (
            "sae_saelens",
            None if same else model.logits_with_activation(tokens, hook, replaced(saelens_splice)),
        )
        zeroed = activations.masked_fill(counted[..., None], 0.0)
        yield "zero", model.logits_with_activation(tokens, hook, zeroed)
        yield "zero_all", model.logits_with_activation(tokens, hook, torch.zeros_like(activations))

    behaviour.update(
        clean_logits,
        variants(),
        targets,
        {"ce": ce_positions, "sl_ce": sl_ce, "sl_kl": sl_kl},
        windows=len(batch.window_ids),
    )
    return activations, encoded


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
    """Both metric families of ``sae`` at ``hook`` over consecutive window batches from
    window 0 (``tokens`` [b, t], ``lengths``, ``mask`` true on counted tokens, ``window_ids``).
    The saetui family's keys are top-level, the SAELens family's under ``saelens``.
    ``check_stop`` is called between batches and raises to stop."""
    special = special_token_ids(model.tokenizer)
    reconstruction: ReconstructionAccumulator | None = None
    behaviour = BehaviourMetrics()
    counts = torch.zeros(sae.d_sae, dtype=torch.int64)
    tokens_done = 0
    for batch in batches:
        if check_stop is not None:
            check_stop()
        if with_ce:
            _, encoded = add_behaviour(behaviour, model, sae, hook, batch, special)
        else:
            tokens = torch.as_tensor(np.asarray(batch.tokens), device=model.device)
            encoded = encode_windows(sae, model.activations(tokens, hook), batch)
        if reconstruction is None:
            reconstruction = ReconstructionAccumulator(sae.d_in, sae.d_sae, encoded.x.device)
        add_reconstruction(reconstruction, sae, batch, encoded, special)
        fired = encoded.ids[encoded.counted][encoded.values[encoded.counted] > 0]
        counts += torch.bincount(fired.to(torch.int64).cpu(), minlength=sae.d_sae)
        tokens_done += int(np.asarray(batch.mask).sum())
        if progress:
            progress(tokens_done)
        if max_tokens is not None and tokens_done >= max_tokens:
            break
    if reconstruction is None:
        return {}
    reconstruction.finish()
    result = reconstruction.result()
    sl_tokens = result.get("saelens", {}).get("tokens", 0)
    return merge_families(
        result,
        density_metrics(counts.numpy(), result.get("tokens", 0)),
        {
            "saelens": saelens_density_metrics(
                reconstruction.saelens_feature_counts.cpu().numpy(), sl_tokens
            )
        },
        behaviour.result(),
    )


def measure_sample(
    model: Any,
    sae: Any,
    hook: str,
    batches: Iterable[Any],
    *,
    progress: Callable[[int], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> BehaviourMetrics:
    """CE loss and KL of both families over window batches in any order (the metrics
    phase's sample of the collection); ``check_stop`` is called between batches."""
    special = special_token_ids(model.tokenizer)
    behaviour = BehaviourMetrics()
    done = 0
    for batch in batches:
        if check_stop is not None:
            check_stop()
        add_behaviour(behaviour, model, sae, hook, batch, special)
        done += int(np.asarray(batch.lengths).sum())
        if progress:
            progress(done)
    return behaviour

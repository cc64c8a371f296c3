"""Measure an SAE on a model and windows: reconstruction and sparsity from the activations
the SAE encodes, CE loss and KL from forward passes with the activation replaced. Both
metric families (:mod:`saetui.collect.metrics`) come out of the same passes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saetui.collect.metrics import (
    BehaviourMetrics,
    ReconstructionAccumulator,
    ScoredBatch,
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


@dataclass
class Splice:
    """An SAE whose CE loss and KL are measured with it spliced in at ``hook``, into its own
    ``behaviour`` sums."""

    behaviour: BehaviourMetrics
    sae: Any
    hook: str


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
    return add_behaviours([Splice(behaviour, sae, hook)], model, batch, special_ids)[0]


@torch.no_grad()
def add_behaviours(
    splices: Sequence[Splice], model: Any, batch: Any, special_ids: list[int]
) -> list[tuple[torch.Tensor, EncodedWindows]]:
    """:func:`add_behaviour` for several SAEs, sharing the forward passes that do not depend
    on the SAE: one clean pass reads every hook, the two zero-ablation passes run once per
    hook, and only the spliced passes run per SAE (k SAEs at one hook: 3 + k or 3 + 2k
    passes instead of 4k or 5k). Returns each splice's hook activations and codes."""
    tokens = torch.as_tensor(np.asarray(batch.tokens), device=model.device)
    hooks = list(dict.fromkeys(splice.hook for splice in splices))
    if len(hooks) == 1:
        clean_logits, activation = model.logits_and_activations(tokens, hooks[0])
        activations = {hooks[0]: activation}
    else:
        clean_logits, activations = model.logits_and_activations_at(tokens, hooks)
    device = activations[hooks[0]].device
    tokens = tokens.to(device)
    real = torch.as_tensor(real_mask(batch), device=device)
    counted = torch.as_tensor(np.asarray(batch.mask), device=device)
    special = torch.isin(tokens, torch.tensor(special_ids, dtype=tokens.dtype, device=device))
    saelens_splice = real & ~special
    targets, ce_positions = next_token_loss_mask(tokens, counted, model.bos_token_id)
    sl_ce, sl_kl = saelens_positions(real, special)
    shared = ScoredBatch(
        clean_logits,
        targets,
        {"ce": ce_positions, "sl_ce": sl_ce, "sl_kl": sl_kl},
        windows=len(batch.window_ids),
    )
    del clean_logits  # the scored rows are kept; the whole [b, t, V] is not needed again
    out: dict[int, tuple[torch.Tensor, EncodedWindows]] = {}
    for hook in hooks:
        acts = activations[hook]
        zeroed = acts.masked_fill(counted[..., None], 0.0)
        zero = shared.score(model.logits_with_activation(tokens, hook, zeroed))
        zero_all = shared.score(model.logits_with_activation(tokens, hook, torch.zeros_like(acts)))
        for number, splice in enumerate(splices):
            if splice.hook != hook:
                continue
            sae = splice.sae
            encoded = encode_windows(sae, acts, batch)
            # x̂ at every real token that either family replaces (its code from the batch's encode)
            splice_rows = encoded.counted | ~special[real]
            rows = splice_rows.nonzero().flatten()
            x_hat = sae.decode_sparse(encoded.ids[rows], encoded.values[rows], encoded.x[rows])
            reconstructed = acts.clone()
            where = torch.zeros_like(real)
            where[real] = splice_rows
            reconstructed[where] = x_hat.to(acts.dtype)

            spliced = shared.score(
                model.logits_with_activation(
                    tokens, hook, torch.where(counted[..., None], reconstructed, acts)
                )
            )
            if torch.equal(saelens_splice, counted):
                spliced_saelens = spliced
            else:
                logits = model.logits_with_activation(
                    tokens, hook, torch.where(saelens_splice[..., None], reconstructed, acts)
                )
                spliced_saelens = shared.score(logits)
            splice.behaviour.add(
                shared,
                {
                    "sae": spliced,
                    "sae_saelens": spliced_saelens,
                    "zero": zero,
                    "zero_all": zero_all,
                },
            )
            out[number] = (acts, encoded)
    return [out[number] for number in range(len(splices))]


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
    return measure_samples(model, [(sae, hook)], batches, progress=progress, check_stop=check_stop)[
        0
    ]


def measure_samples(
    model: Any,
    saes: Sequence[tuple[Any, str]],
    batches: Iterable[Any],
    *,
    progress: Callable[[int], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> list[BehaviourMetrics]:
    """:func:`measure_sample` for several ``(sae, hook)`` over the same batches, sharing the
    forward passes that do not depend on the SAE (:func:`add_behaviours`); one result each."""
    special = special_token_ids(model.tokenizer)
    splices = [Splice(BehaviourMetrics(), sae, hook) for sae, hook in saes]
    done = 0
    for batch in batches:
        if check_stop is not None:
            check_stop()
        add_behaviours(splices, model, batch, special)
        done += int(np.asarray(batch.lengths).sum())
        if progress:
            progress(done)
    return [splice.behaviour for splice in splices]

"""Probe: run a text through the model and SAE and report which features fire where.

Neuronpedia's "search via inference" without a browser: per token the strongest features,
and for the whole text the features ranked by their maximum activation. Pure domain code
(no Textual); the TUI runs :func:`probe` in a thread worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError

MAX_PROBE_TOKENS = 1024


@dataclass(frozen=True)
class ProbeFeature:
    """One feature's showing over the whole probed text."""

    feature: int
    max_value: float
    position: int  # token position (into ProbeResult.tokens) of the maximum
    n_tokens: int  # tokens on which it fired


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe` found. Token positions exclude the BOS token the model was fed."""

    text: str
    tokens: list[str]
    token_ids: list[int]
    per_token: list[list[tuple[int, float]]]  # per token: (feature, value), strongest first
    ranked: list[ProbeFeature]  # every feature that fired, by max activation, descending
    hook: str = ""
    truncated: bool = False
    focus: int | None = None  # the feature the text was shaded by ("this feature" mode)
    focus_values: list[float] = field(default_factory=list)  # its activation on every token

    def activations_of(self, feature: int) -> list[float]:
        """This feature's activation on every token: exact for the focus feature, else 0
        where it was not among a token's top features."""
        if feature == self.focus:
            return list(self.focus_values)
        return [dict(top).get(feature, 0.0) for top in self.per_token]


@dataclass
class ProbeInputs:
    """A loaded model, SAE and the hook the SAE reads: what :func:`probe` needs."""

    model: Any  # saetui.lm.LanguageModel
    sae: Any  # saetui.sae.SparseAutoencoder
    hook: str
    extra: dict[str, Any] = field(default_factory=dict)


def tokenize_for_probe(model: Any, text: str) -> tuple[list[int], bool]:
    """Token ids of ``text`` (BOS first when the model has one), capped at MAX_PROBE_TOKENS."""
    if not text.strip():
        raise SaetuiInputError("The probe text is empty: type some text to run through the model.")
    ids = list(model.tokenizer.encode(text, add_special_tokens=False))
    bos = model.bos_token_id
    if bos is not None:
        ids = [int(bos), *ids]
    truncated = len(ids) > MAX_PROBE_TOKENS
    return ids[:MAX_PROBE_TOKENS], truncated


@torch.no_grad()
def probe(
    model: Any,
    sae: Any,
    hook: str,
    text: str,
    top_per_token: int = 5,
    focus: int | None = None,
) -> ProbeResult:
    """Encode ``text`` at ``hook`` with ``sae``; per token the top features, and every
    feature that fired ranked by its maximum activation over the text; with ``focus``,
    that one feature's activation on every token too (Neuronpedia's activation testing).

    The BOS position is fed (the collection feeds it too, so activations match the index)
    but left out of the result: its activations are outliers unrelated to the text.
    """
    if top_per_token < 1:
        raise SaetuiInputError(f"top_per_token {top_per_token} must be at least 1.")
    if focus is not None and not 0 <= focus < sae.d_sae:
        raise SaetuiInputError(
            f"feature {focus} is out of range: the SAE has features 0-{sae.d_sae - 1}."
        )
    ids, truncated = tokenize_for_probe(model, text)
    has_bos = model.bos_token_id is not None
    tokens = torch.tensor([ids], dtype=torch.long)
    x = model.activations(tokens, hook)[0]
    if has_bos:
        x = x[1:]
        ids = ids[1:]
    sae_param = sae.W_enc
    acts = sae.encode(x.to(device=sae_param.device, dtype=sae_param.dtype)).float().cpu()
    n = acts.shape[0]
    k = min(top_per_token, acts.shape[1])
    top = acts.topk(k, dim=-1) if n else None
    per_token: list[list[tuple[int, float]]] = []
    for pos in range(n):
        assert top is not None
        pairs = [
            (int(f), float(v))
            for f, v in zip(top.indices[pos].tolist(), top.values[pos].tolist(), strict=True)
            if v > 0
        ]
        per_token.append(pairs)
    ranked: list[ProbeFeature] = []
    if n:
        max_values, argmax = acts.max(dim=0)
        fired = (acts > 0).sum(dim=0)
        order = torch.argsort(max_values, descending=True, stable=True)
        for feature in order.tolist():
            value = float(max_values[feature])
            if value <= 0:
                break
            ranked.append(ProbeFeature(feature, value, int(argmax[feature]), int(fired[feature])))
    decoded = [model.tokenizer.decode([i]) for i in ids]
    return ProbeResult(
        text=text,
        tokens=decoded,
        token_ids=[int(i) for i in ids],
        per_token=per_token,
        ranked=ranked,
        hook=hook,
        truncated=truncated,
        focus=focus,
        focus_values=acts[:, focus].tolist() if focus is not None else [],
    )


def probe_loader(
    *,
    model: str,
    sae: str | Path,
    hook: str | None = None,
    numerics: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    batchtopk_mode: str | None = None,
    threshold: float | None = None,
    start_token: str | None = None,
) -> Callable[[], ProbeInputs]:
    """A zero-argument function that loads model and SAE for the probe (called lazily, in a
    worker thread, the first time the user probes). Errors are SaetuiInputError sentences."""

    def load() -> ProbeInputs:
        from saetui.lm import load_model, resolve_hook
        from saetui.sae import load_sae

        loaded_sae = load_sae(sae, batchtopk_mode=batchtopk_mode, threshold=threshold)
        chosen_numerics = numerics or loaded_sae.default_numerics()
        lm = load_model(
            model,
            device=device,
            dtype=dtype,
            numerics=chosen_numerics,
            start_token=start_token or loaded_sae.default_start_token(),
        )
        resolved = resolve_hook(
            lm, hook=hook, sae_hook=loaded_sae.hook_name, sae_d_in=loaded_sae.d_in
        )
        loaded_sae.to(lm.device, lm.dtype)
        return ProbeInputs(lm, loaded_sae, resolved, {"numerics": chosen_numerics})

    return load


def probe_spec_from_run(
    run_config: dict[str, Any], run_details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The :func:`probe_loader` keywords for the model and SAE a collection run recorded in
    its index: its ``run_config`` (what ``saetui.collect`` writes) and, for the start-token
    rule, its ``run_details`` meta entry (without it the SAE's default rule is used, which is
    what ``saetui collect`` uses). Raises SaetuiInputError when the run names no model or SAE
    (the probe then says so instead of crashing)."""
    model = run_config.get("model")
    sae = run_config.get("sae_path")
    if not model or not sae:
        raise SaetuiInputError(
            "The index does not record which model and SAE made it, so the probe cannot load "
            "them; open it with `saetui collect` options that name --model and --sae."
        )
    return {
        "model": str(model),
        "sae": str(sae),
        "hook": run_config.get("hook"),
        "numerics": run_config.get("numerics"),
        "device": "auto",  # where the probe runs now, not where the run was collected
        "dtype": run_config.get("dtype") or "auto",
        "batchtopk_mode": run_config.get("batchtopk_mode"),
        "threshold": run_config.get("threshold"),
        "start_token": _recorded_start_token(run_details or {}),
    }


def _recorded_start_token(run_details: dict[str, Any]) -> str | None:
    """The start-token rule a run recorded with its model details, if any."""
    recorded = run_details.get("start_token")
    rule = recorded.get("rule") if isinstance(recorded, dict) else None
    return rule if isinstance(rule, str) else None


@torch.no_grad()
def feature_logit_effects(
    inputs: ProbeInputs, feature: int, top_n: int = 10
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Tokens one feature's decoder direction promotes and suppresses through the unembedding
    (W_dec[f] @ W_U): a single row, cheap enough to compute on demand."""
    from saetui.analysis.neighbours import logit_effects

    w_dec = inputs.sae.W_dec[feature : feature + 1].float().cpu()
    w_u = inputs.model.bridge.W_U.float().cpu()
    w_out = inputs.model.residual_directions(inputs.hook, w_dec)  # hook_z: through W_O
    if w_out is None or w_out.shape[1] != w_u.shape[0]:
        raise SaetuiInputError(
            f"the SAE's decoder width {w_dec.shape[1]} at {inputs.hook} does not map to the "
            f"model's d_model {w_u.shape[0]}: logit effects need the SAE's own model and hook."
        )
    w_dec = w_out.float().cpu()
    up_ids, up_vals, down_ids, down_vals = logit_effects(
        w_dec, w_u, top_n=top_n, vocab_size=inputs.model.tokenizer_vocab_size
    )
    decode = inputs.model.tokenizer.decode
    promoted = [
        (decode([i]), v) for i, v in zip(up_ids[0].tolist(), up_vals[0].tolist(), strict=True)
    ]
    suppressed = [
        (decode([i]), v) for i, v in zip(down_ids[0].tolist(), down_vals[0].tolist(), strict=True)
    ]
    return promoted, suppressed

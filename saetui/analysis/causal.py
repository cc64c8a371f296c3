"""Causal checks beside the observational panes: what a feature *does*.

- :func:`ablate` — re-run a context with one feature's contribution removed at the hook,
  ``x' = x - a_f · W_dec[f]`` at the positions where it fires. Everything else the SAE
  does not explain (its error term ``x - x_hat``) is kept, so the change is the feature's
  alone, not the SAE's reconstruction error. Reports, per token, the change of the loss of
  predicting the next token, and the top ± logit changes where the feature fires.
- :func:`steer` — generate from a prompt with features added to (or clamped at) the hook,
  beside the same generation unsteered. Modes: ``all`` (every position, prompt and
  generated), ``prompt`` (prompt positions only), ``frozen`` (only the newest position at
  each step: earlier positions keep their unsteered keys and values, i.e. attention to
  the past is frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.lm.hooks import read_view, split_head, write_view

STEER_MODES = ("all", "prompt", "frozen")


@dataclass(frozen=True)
class AblationResult:
    feature: int
    tokens: list[str]
    activation: list[float]  # the feature on each token
    loss_clean: list[float]  # loss of predicting token t+1 at t (NaN for the last token)
    loss_ablated: list[float]
    promoted: list[list[tuple[str, float]]]  # per token: logits the feature raised most
    suppressed: list[list[tuple[str, float]]]  # (the ablation lowered them)

    @property
    def delta_loss(self) -> list[float]:
        """Loss with the feature removed minus the clean loss, per token (positive: the
        feature helped predict the next token)."""
        return [a - c for a, c in zip(self.loss_ablated, self.loss_clean, strict=True)]

    @property
    def mean_delta_where_fires(self) -> float:
        values = [
            d
            for d, a in zip(self.delta_loss[:-1], self.activation[:-1], strict=True)
            if a > 0 and d == d
        ]
        return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class SteeringResult:
    prompt: str
    features: dict[int, float]
    mode: str
    clamp: bool
    steered: list[str]  # generated tokens
    unsteered: list[str]
    steered_ids: list[int] = field(default_factory=list)
    unsteered_ids: list[int] = field(default_factory=list)

    @property
    def steered_text(self) -> str:
        return "".join(self.steered)

    @property
    def unsteered_text(self) -> str:
        return "".join(self.unsteered)


def _check_feature(sae: Any, feature: int) -> int:
    if not 0 <= int(feature) < sae.d_sae:
        raise SaetuiInputError(
            f"feature {feature} is out of range: the SAE has features 0-{sae.d_sae - 1}."
        )
    return int(feature)


@torch.no_grad()
def ablate(
    model: Any, sae: Any, hook: str, token_ids: list[int], feature: int, top_n: int = 5
) -> AblationResult:
    """Remove ``feature``'s contribution from one token sequence; see the module docstring."""
    f = _check_feature(sae, feature)
    if len(token_ids) < 2:
        raise SaetuiInputError("ablation needs a context of at least 2 tokens.")
    tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=model.device)
    logits, x = model.logits_and_activations(tokens, hook)
    x32 = x[0].to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    acts = sae.encode(x32)[:, f]
    removed = acts[:, None] * sae.W_dec[f][None, :]
    ablated = (x32 - removed).to(dtype=x.dtype, device=x.device)[None]
    logits_ablated = model.logits_with_activation(tokens, hook, ablated)
    clean, changed = (
        _next_token_loss(logits[0], tokens[0]),
        _next_token_loss(logits_ablated[0], tokens[0]),
    )
    delta = (logits[0] - logits_ablated[0]).float()  # what the feature added to each logit
    vocab = model.tokenizer_vocab_size
    delta = delta[:, :vocab]
    decode = model.tokenizer.decode
    promoted: list[list[tuple[str, float]]] = []
    suppressed: list[list[tuple[str, float]]] = []
    for pos in range(delta.shape[0]):
        if float(acts[pos]) <= 0:
            promoted.append([])
            suppressed.append([])
            continue
        up = delta[pos].topk(top_n)
        down = (-delta[pos]).topk(top_n)
        promoted.append(
            [
                (decode([i]), float(v))
                for i, v in zip(up.indices.tolist(), up.values.tolist(), strict=True)
            ]
        )
        suppressed.append(
            [
                (decode([i]), -float(v))
                for i, v in zip(down.indices.tolist(), down.values.tolist(), strict=True)
            ]
        )
    return AblationResult(
        feature=f,
        tokens=[decode([i]) for i in token_ids],
        activation=acts.float().cpu().tolist(),
        loss_clean=clean,
        loss_ablated=changed,
        promoted=promoted,
        suppressed=suppressed,
    )


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    losses = torch.nn.functional.cross_entropy(
        logits[:-1].float(), tokens[1:].to(logits.device), reduction="none"
    )
    return [*losses.cpu().tolist(), float("nan")]


@torch.no_grad()
def steer(
    model: Any,
    sae: Any,
    hook: str,
    prompt: str,
    features: dict[int, float],
    n_tokens: int = 20,
    *,
    mode: str = "all",
    clamp: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> SteeringResult:
    """Generate ``n_tokens`` from ``prompt`` with ``features`` steered, and without.

    ``features`` maps feature id to a strength: with ``clamp=False`` ``strength · W_dec[f]``
    is added (the feature "fires" with that activation on top of whatever it does); with
    ``clamp=True`` its decoded contribution ``a_f · W_dec[f]`` is replaced by
    ``strength · W_dec[f]`` (the rest of the activation, SAE error included, is kept). Greedy unless
    ``temperature`` > 0 (then sampled with ``seed``, the same draws for both runs).
    """
    from saetui.analysis.probe import tokenize_for_probe

    if mode not in STEER_MODES:
        raise SaetuiInputError(f"steering mode {mode!r} is not one of {', '.join(STEER_MODES)}.")
    if not features:
        raise SaetuiInputError("steering needs at least one feature and a strength.")
    if not 1 <= n_tokens <= 512:
        raise SaetuiInputError(f"{n_tokens} tokens to generate: give 1 to 512.")
    steering = {_check_feature(sae, f): float(s) for f, s in features.items()}
    ids, _ = tokenize_for_probe(model, prompt)
    steered = _generate(model, sae, hook, ids, steering, n_tokens, mode, clamp, temperature, seed)
    plain = _generate(model, sae, hook, ids, {}, n_tokens, mode, clamp, temperature, seed)
    decode = model.tokenizer.decode
    return SteeringResult(
        prompt=prompt,
        features=steering,
        mode=mode,
        clamp=clamp,
        steered=[decode([i]) for i in steered],
        unsteered=[decode([i]) for i in plain],
        steered_ids=steered,
        unsteered_ids=plain,
    )


def steering_hook(
    model: Any,
    sae: Any,
    hook: str,
    steering: dict[int, float],
    *,
    mode: str,
    clamp: bool,
    prompt_length: int,
) -> tuple[str, Any]:
    """``(hook point, hook function)`` that steers ``steering`` features at ``hook``."""
    base, head = split_head(hook)
    directions = {
        f: sae.W_dec[f].detach().to(device=model.device, dtype=model.dtype) for f in steering
    }

    def add(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        x = read_view(activation, head).clone()
        length = x.shape[1]
        where = {
            "prompt": slice(0, prompt_length),
            "frozen": slice(length - 1, length),
            "all": slice(0, length),
        }[mode]
        for f, strength in steering.items():
            if clamp:
                encoded = sae.encode(x[0, where].to(device=sae.W_enc.device, dtype=sae.W_enc.dtype))
                scale = (strength - encoded[:, f]).to(device=x.device, dtype=x.dtype)
                x[0, where] += scale[:, None] * directions[f]
            else:
                x[0, where] += strength * directions[f]
        return write_view(activation, x, head)

    return base, add


def _generate(
    model: Any,
    sae: Any,
    hook: str,
    prompt_ids: list[int],
    steering: dict[int, float],
    n_tokens: int,
    mode: str,
    clamp: bool,
    temperature: float,
    seed: int,
) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    vocab = model.tokenizer_vocab_size
    hooks = []
    if steering:
        hooks = [
            steering_hook(
                model, sae, hook, steering, mode=mode, clamp=clamp, prompt_length=len(prompt_ids)
            )
        ]
    for _ in range(n_tokens):
        tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
        if hooks:
            logits = model.bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)
        else:
            logits = model.logits(tokens)
        last = logits[0, -1, :vocab].float().cpu()
        if temperature > 0:
            probabilities = torch.softmax(last / temperature, dim=-1)
            next_id = int(torch.multinomial(probabilities, 1, generator=generator))
        else:
            next_id = int(last.argmax())
        ids.append(next_id)
    return ids[len(prompt_ids) :]


def parse_steering(text: str) -> tuple[dict[int, float], dict[str, Any]]:
    """``"#123 x8 #45 x-4 mode=frozen tokens=30 clamp temp=0.7 seed=1"`` -> features and
    :func:`steer` options (``123:8`` works for a feature too)."""
    features: dict[int, float] = {}
    options: dict[str, Any] = {}
    words = text.replace(",", " ").split()
    pending: int | None = None
    for word in words:
        if word.startswith("#") and word[1:].isdigit():
            pending = int(word[1:])
            features[pending] = 1.0
        elif word.startswith(("x", "×")) and pending is not None:
            features[pending] = _number(word[1:], word)
        elif ":" in word and word.split(":")[0].isdigit():
            feature, strength = word.split(":", 1)
            features[int(feature)] = _number(strength, word)
        elif word == "clamp":
            options["clamp"] = True
        elif "=" in word:
            key, value = word.split("=", 1)
            if key == "mode":
                options["mode"] = value
            elif key in ("tokens", "n"):
                options["n_tokens"] = int(_number(value, word))
            elif key in ("temp", "temperature"):
                options["temperature"] = _number(value, word)
            elif key == "seed":
                options["seed"] = int(_number(value, word))
            else:
                raise SaetuiInputError(f"{word!r}: unknown steering option {key!r}.")
        else:
            raise SaetuiInputError(
                f"{word!r} is not part of a steering spec: write e.g. '#123 x8 mode=frozen "
                "tokens=20' (features as #id xstrength or id:strength)."
            )
    if not features:
        raise SaetuiInputError("name at least one feature to steer, e.g. '#123 x8'.")
    return features, options


def _number(text: str, word: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SaetuiInputError(f"{word!r}: {text!r} is not a number.") from None


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


class CausalSession:
    """Ablation and steering over an index, with the model and SAE its run recorded,
    loaded once (for notebooks and the ``saetui ablate`` / ``saetui steer`` commands)."""

    def __init__(self, index_path: str | Any) -> None:
        from saetui.analysis.probe import probe_loader, probe_spec_from_run
        from saetui.index import open_index

        self.index_path = index_path
        with open_index(index_path) as index:
            spec = probe_spec_from_run(index.meta.run_config, index.get_meta("run_details"))
        self.inputs = probe_loader(**spec)()

    def ablate(self, feature: int, contexts: int = 10) -> list[dict[str, Any]]:
        """Each of the feature's top contexts re-run without it: the next-token loss change
        at the firing token, the mean where it fires, and the logits it moved there."""
        from saetui.index import open_index

        with open_index(self.index_path) as index:
            examples = index.top_examples(feature, contexts)
        out = []
        for example in examples:
            position = int(example.position)
            ids = example.token_ids[: position + 2].tolist()
            result = ablate(self.inputs.model, self.inputs.sae, self.inputs.hook, ids, feature)
            out.append(
                {
                    "window": int(example.window),
                    "position": position,
                    "activation": float(example.value),
                    "token": result.tokens[position],
                    "next_token": result.tokens[position + 1] if position + 1 < len(ids) else None,
                    # None when the firing token ends the window (no next token to predict)
                    "delta_loss": _finite(result.delta_loss[position]),
                    "mean_delta_where_fires": result.mean_delta_where_fires,
                    "promoted": result.promoted[position],
                    "suppressed": result.suppressed[position],
                }
            )
        return out

    def steer(self, prompt: str, features: dict[int, float], **options: Any) -> SteeringResult:
        return steer(
            self.inputs.model, self.inputs.sae, self.inputs.hook, prompt, features, **options
        )

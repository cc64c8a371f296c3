"""SAELens: ``cfg.json`` + ``sae_weights.safetensors``, v6 (nested ``metadata``) and pre-6.0 (flat).

Encode formulas follow SAELens' inference classes: standard = relu(pre); topk =
top-k of pre with relu on the kept values; jumprelu = relu(pre) * (pre > threshold);
gated = (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag),
with sae_in = x - b_dec when ``apply_b_dec_to_input``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.lm.hooks import with_head
from saetui.sae._checks import (
    check_finite,
    check_shape,
    config_int,
    full_hook_name,
    parse_dtype,
    read_json,
    require_tensors,
)
from saetui.sae.model import NORMALIZATIONS, SparseAutoencoder, weights_kwargs

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SCALER = "activation_scaler.json"
FILES = (CONFIG, WEIGHTS)

# SAELens architecture name -> ours.
_ARCHITECTURES = {
    "standard": "relu",
    "relu": "relu",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
_EXTRA_TENSORS = {
    "relu": ["b_enc"],
    "topk": ["b_enc"],
    "batchtopk": ["b_enc"],
    "jumprelu": ["b_enc", "threshold"],
    "gated": ["b_gate", "b_mag", "r_mag"],
}


def matches(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types and OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaetuiInputError(
            f"{path} could not be read as safetensors ({reason}); re-download or re-export it."
        ) from None


def _architecture(config: dict[str, Any], path: Path) -> str:
    raw = config.get("architecture", "standard")
    activation = config.get("activation_fn_str") or config.get("activation_fn")
    if raw == "standard" and activation == "topk":
        raw = "topk"  # pre-6.0 TopK SAEs were "standard" with a topk activation function
    elif raw in ("standard", "jumprelu", "gated") and activation not in (None, "relu"):
        raise SaetuiInputError(
            f"{path} uses activation function {activation!r}, which saetui does not support "
            "(only relu and topk); convert the SAE first."
        )
    if raw not in _ARCHITECTURES:
        raise SaetuiInputError(
            f"{path} names architecture {raw!r}; saetui reads SAELens architectures "
            f"{', '.join(sorted(_ARCHITECTURES))}, so convert the SAE to one of those."
        )
    return _ARCHITECTURES[raw]


def _k(config: dict[str, Any], path: Path) -> int | None:
    kwargs = config.get("activation_fn_kwargs") or {}
    value = config.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if value is None:
        raise SaetuiInputError(f"{path} describes a top-k SAE but has no 'k' entry; add it.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise SaetuiInputError(f"{path} has k = {value!r}, expected a number >= 1; fix it.")
    return round(value)


def load(directory: Path) -> SparseAutoencoder:
    config_path = directory / CONFIG
    weights_path = directory / WEIGHTS
    config = read_json(config_path, "a SAELens SAE")
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else None
    meta = metadata if metadata is not None else config  # pre-6.0: everything is flat
    architecture = _architecture(config, config_path)
    d_in = config_int(config, "d_in", config_path)
    d_sae = config_int(config, "d_sae", config_path)
    k = _k(config, config_path) if architecture in ("topk", "batchtopk") else None
    normalize = config.get("normalize_activations") or "none"
    if normalize not in NORMALIZATIONS:
        raise SaetuiInputError(
            f"{config_path} has normalize_activations = {normalize!r}; saetui understands "
            f"{', '.join(NORMALIZATIONS)}, so fold the normalisation into the weights first."
        )
    reshape = config.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):
        raise SaetuiInputError(
            f"{config_path} asks for reshape_activations = {reshape!r}; saetui reads SAELens "
            "SAEs with none or hook_z (heads flattened), so convert the SAE first."
        )

    state = load_safetensors(weights_path)
    if architecture == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    require_tensors(
        state, ["W_enc", "W_dec", "b_dec", *_EXTRA_TENSORS[architecture]], weights_path, "SAELens"
    )
    source = f"{config_path} (d_in {d_in}, d_sae {d_sae})"
    check_shape(state["W_enc"], (d_in, d_sae), "W_enc", weights_path, source)
    check_shape(state["W_dec"], (d_sae, d_in), "W_dec", weights_path, source)
    check_shape(state["b_dec"], (d_in,), "b_dec", weights_path, source)
    for name in _EXTRA_TENSORS[architecture]:
        check_shape(state[name], (d_sae,), name, weights_path, source)
    dtype = parse_dtype(config.get("dtype"), config_path) or state["W_enc"].dtype
    names = ["W_enc", "W_dec", "b_dec", *_EXTRA_TENSORS[architecture]]
    tensors = {name: state[name].to(torch.float32) for name in names}
    if config.get("finetuning_scaling_factor") and "scaling_factor" in state:
        # pre-6.0 fine-tuned SAEs scale features before decoding: fold it into W_dec rows.
        check_shape(state["scaling_factor"], (d_sae,), "scaling_factor", weights_path, source)
        tensors["W_dec"] = tensors["W_dec"] * state["scaling_factor"].float().unsqueeze(1)
    check_finite(tensors, weights_path)

    scale = _activation_scale(directory) if normalize == "expected_average_only_in" else None
    if scale is not None:
        # SAELens' fold_activation_norm_scaling_factor: encode sees x * scale, decode / scale.
        tensors["W_enc"] = tensors["W_enc"] * scale
        tensors["W_dec"] = tensors["W_dec"] / scale
        tensors["b_dec"] = tensors["b_dec"] / scale

    hook, hook_layer = full_hook_name(
        meta.get("hook_name") or meta.get("hook_point"),
        meta.get("hook_layer", meta.get("hook_point_layer")),
    )
    # One attention head of a per-head hook (hook_z [.., n_heads, d_head]): d_in = d_head.
    head = meta.get("hook_head_index", meta.get("hook_point_head_index"))
    if hook is not None and isinstance(head, int) and not isinstance(head, bool):
        hook = with_head(hook, head)
    threshold = config.get("batchtopk_threshold") if architecture == "batchtopk" else None
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        tensors["threshold"] = torch.tensor(float(threshold))
    weight_files = [weights_path] + ([directory / SCALER] if scale is not None else [])
    return SparseAutoencoder(
        architecture=architecture,
        format="saelens",
        k=k,
        apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        activation_scale=scale,
        hook_name=hook,
        hook_layer=hook_layer,
        model_name=meta.get("model_name"),
        source_path=directory,
        weight_files=weight_files,
        config=config,
        **weights_kwargs({name: tensor.to(dtype) for name, tensor in tensors.items()}),
    )


def _activation_scale(directory: Path) -> float | None:
    """The training-time input scale SAELens keeps next to checkpoints, if any."""
    path = directory / SCALER
    if not path.is_file():
        return None
    value = read_json(path, "the activation scaler").get("scaling_factor")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SaetuiInputError(
            f"{path} has scaling_factor = {value!r}, expected a positive number; fix it."
        )
    return float(value)


def save(sae: SparseAutoencoder, directory: Path) -> list[tuple[str, Any]]:
    """What to write for a SAELens v6 export: ``[(file name, payload)]``.

    A BatchTopK SAE with a known threshold is written as JumpReLU (as SAELens
    itself does); without one it keeps architecture "batchtopk" and ``k``.
    """
    architecture = sae.architecture
    tensors: dict[str, torch.Tensor] = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    b_enc = sae.b_enc if sae.b_enc is not None else torch.zeros_like(sae.W_enc[0])
    thresholded = sae.threshold is not None and sae.batchtopk_mode == "threshold"
    if architecture == "batchtopk" and thresholded:
        architecture = "jumprelu"
        tensors["threshold"] = sae.required_buffer("threshold").expand(sae.d_sae)
    elif architecture == "jumprelu":
        tensors["threshold"] = sae.required_buffer("threshold")
    if architecture == "gated":
        for name in ("b_gate", "b_mag", "r_mag"):
            tensors[name] = sae.required_buffer(name)
    else:
        tensors["b_enc"] = b_enc
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    config: dict[str, Any] = {
        "architecture": "standard" if architecture == "relu" else architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        # An average-norm scale has been folded into the weights at load time.
        "normalize_activations": (
            "none"
            if sae.normalize_activations == "expected_average_only_in"
            else sae.normalize_activations
        ),
        "reshape_activations": "none",
        "metadata": {
            "model_name": sae.model_name,
            "hook_name": sae.hook_name,
            "hook_layer": sae.hook_layer,
            "saetui_source_format": sae.format,
            "saetui_numerics": sae.default_numerics(),
        },
    }
    if architecture in ("topk", "batchtopk"):
        config["k"] = sae.k
    if architecture == "batchtopk" and sae.threshold is not None:
        config["batchtopk_threshold"] = float(sae.threshold)
    return [(WEIGHTS, tensors), (CONFIG, json.dumps(config, indent=2))]

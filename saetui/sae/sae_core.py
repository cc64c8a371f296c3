"""The old pipeline's ``sae_core`` export: ``weights.pt`` + ``config.json`` [+ ``history.json``]."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.sae._checks import (
    check_finite,
    check_shape,
    config_int,
    full_hook_name,
    parse_dtype,
    read_json,
    require_tensors,
)
from saetui.sae.model import SparseAutoencoder

WEIGHTS = "weights.pt"
CONFIG = "config.json"
HISTORY = "history.json"
FILES = (WEIGHTS, CONFIG)


def matches(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def _resolve_hook(config: dict[str, Any]) -> tuple[str | None, int | None]:
    layer = config.get("hook_layer")
    hook, hook_layer = full_hook_name(config.get("hook_name"), layer)
    if hook is not None:
        return hook, hook_layer
    spec = config.get("hook_spec")
    if isinstance(spec, str):
        hook, hook_layer = full_hook_name(spec, layer)
    elif isinstance(spec, dict):
        hook, hook_layer = full_hook_name(
            spec.get("hook_name") or spec.get("name"),
            spec.get("hook_layer", spec.get("layer", layer)),
        )
    if hook is None and isinstance(layer, int):
        hook_layer = layer
    return hook, hook_layer


def load_weights_pt(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file, never unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives since torch 1.6
            raise SaetuiInputError(
                f"{path} could not be read as a torch state dict (not a torch file); "
                "re-export the SAE weights with torch.save(model.state_dict(), ...)."
            ) from None
        raise SaetuiInputError(
            f"{path} holds Python objects besides tensors, which saetui refuses to unpickle "
            "(weights_only); re-export the SAE weights with torch.save(model.state_dict(), ...)."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaetuiInputError(
            f"{path} could not be read as a torch state dict ({reason}); "
            "re-export the SAE weights with torch.save(model.state_dict(), ...)."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SaetuiInputError(
            f"{path} does not hold a flat state dict of tensors; "
            "re-export the SAE weights with torch.save(model.state_dict(), ...)."
        )
    return state


def load(directory: Path) -> SparseAutoencoder:
    config_path = directory / CONFIG
    weights_path = directory / WEIGHTS
    config = read_json(config_path, "an sae_core SAE")
    state = load_weights_pt(weights_path)
    require_tensors(state, ["W_enc", "b_enc", "W_dec", "b_dec"], weights_path, "sae_core")
    d_in = config_int(config, "d_in", config_path)
    d_sae = config_int(config, "d_sae", config_path)
    source = f"{config_path} (d_in {d_in}, d_sae {d_sae})"
    check_shape(state["W_enc"], (d_in, d_sae), "W_enc", weights_path, source)
    check_shape(state["W_dec"], (d_sae, d_in), "W_dec", weights_path, source)
    check_shape(state["b_enc"], (d_sae,), "b_enc", weights_path, source)
    check_shape(state["b_dec"], (d_in,), "b_dec", weights_path, source)
    dtype = parse_dtype(config.get("dtype"), config_path) or state["W_enc"].dtype
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if not state[name].is_floating_point():  # a cast would hide nonsense weights
            raise SaetuiInputError(
                f"{weights_path} stores {name} as {str(state[name].dtype).removeprefix('torch.')}, "
                "not as floating point: export the weights as float32, float16 or bfloat16."
            )
    tensors = {name: state[name].to(dtype) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    check_finite(tensors, weights_path)

    top_k = config_int(config, "top_k", config_path, required=False)
    if top_k is not None and top_k < 1:
        top_k = None  # the trainer writes 0 / null for a plain ReLU SAE
    history = None
    history_path = directory / HISTORY
    if history_path.is_file():
        raw = read_json(history_path, "the training history")
        history = {key: value for key, value in raw.items() if isinstance(value, list)}
    hook, hook_layer = _resolve_hook(config)
    batchtopk = top_k is not None
    threshold = config.get("threshold")
    if not (batchtopk and isinstance(threshold, (int, float))):
        threshold = None
    return SparseAutoencoder(
        architecture="batchtopk" if batchtopk else "relu",
        format="sae_core",
        W_enc=tensors["W_enc"],
        # BatchTopK in sae_core encodes relu((x - b_dec) @ W_enc): its b_enc is unused.
        b_enc=None if batchtopk else tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        threshold=None if threshold is None else torch.tensor(float(threshold), dtype=dtype),
        k=top_k,
        apply_b_dec_to_input=batchtopk,
        hook_name=hook,
        hook_layer=hook_layer,
        model_name=config.get("model_name"),
        history=history,
        source_path=directory,
        weight_files=[weights_path],
        config=config,
    )


def save(sae: SparseAutoencoder, directory: Path) -> list[tuple[str, Any]]:
    """What to write for an sae_core export: ``[(file name, payload)]``."""
    if sae.architecture not in ("relu", "batchtopk"):
        raise SaetuiInputError(
            f"the sae_core format holds only ReLU and BatchTopK SAEs, and the SAE from "
            f"{sae.source_path} is {sae.architecture}; save it in the saelens format instead."
        )
    if sae.normalize_activations not in ("none", "expected_average_only_in"):
        raise SaetuiInputError(
            f"the sae_core format cannot express normalize_activations="
            f"{sae.normalize_activations!r} of the SAE from {sae.source_path}; "
            "save it in the saelens format instead."
        )
    if sae.architecture == "batchtopk" and not sae.apply_b_dec_to_input:
        raise SaetuiInputError(
            f"the sae_core format's BatchTopK subtracts b_dec from its input, and the SAE "
            f"from {sae.source_path} does not; save it in the saelens format instead."
        )
    if sae.architecture == "relu" and sae.apply_b_dec_to_input:
        raise SaetuiInputError(
            f"the sae_core format's ReLU SAE does not subtract b_dec from its input, and the "
            f"SAE from {sae.source_path} does; save it in the saelens format instead."
        )
    state = {
        "W_enc": sae.W_enc.detach().cpu().contiguous(),
        "b_enc": (sae.b_enc if sae.b_enc is not None else torch.zeros(sae.d_sae, dtype=sae.dtype))
        .detach()
        .cpu()
        .contiguous(),
        "W_dec": sae.W_dec.detach().cpu().contiguous(),
        "b_dec": sae.b_dec.detach().cpu().contiguous(),
    }
    if sae.architecture == "batchtopk" and sae.b_enc is not None and bool(sae.b_enc.any()):
        raise SaetuiInputError(
            f"the sae_core format's BatchTopK has no encoder bias, and the SAE from "
            f"{sae.source_path} has a nonzero one; save it in the saelens format instead."
        )
    config = {key: value for key, value in sae.config.items() if sae.format == "sae_core"}
    config.update(
        d_in=sae.d_in,
        d_sae=sae.d_sae,
        dtype=str(sae.dtype).removeprefix("torch."),
        top_k=sae.k if sae.architecture == "batchtopk" else None,
        hook_name=sae.hook_name,
        hook_layer=sae.hook_layer,
        model_name=sae.model_name,
    )
    if sae.architecture == "batchtopk" and sae.threshold is not None:
        config["threshold"] = float(sae.threshold)
    files: list[tuple[str, Any]] = [(WEIGHTS, state), (CONFIG, json.dumps(config, indent=2))]
    if sae.history is not None:
        files.append((HISTORY, json.dumps(sae.history)))
    return files

"""saprmarks/dictionary_learning: ``ae.pt`` (a state dict) + ``config.json`` (``{"trainer":
{...}, "buffer": {...}}``) per trainer directory, as its ``trainSAE`` writes them.

``config.json``'s ``trainer.dict_class`` names the layout of ``ae.pt``:

- ``AutoEncoder`` (standard, p-anneal trainers): ``bias``, ``encoder.weight [F, D]``,
  ``encoder.bias``, ``decoder.weight [D, F]``; relu(encoder(x - bias)), decoded
  ``decoder(f) + bias``. Loaded as its ``from_pretrained`` does by default: decoder columns
  scaled to unit norm, the encoder rows and bias scaled by the same norms (same
  reconstruction, comparable feature magnitudes).
- ``AutoEncoderNew``: ``encoder.weight/bias``, ``decoder.weight/bias``; relu(encoder(x)).
- ``GatedAutoEncoder`` (gated, GDM trainers): ``decoder_bias``, ``encoder.weight``,
  ``r_mag``, ``gate_bias``, ``mag_bias``, ``decoder.weight``; with x' = x - decoder_bias,
  (encoder(x') + gate_bias > 0) * relu(exp(r_mag) * encoder(x') + mag_bias).
- ``JumpReluAutoEncoder``: ``W_enc [D, F]``, ``b_enc``, ``W_dec [F, D]``, ``b_dec``,
  ``threshold [F]``; relu(pre) * (pre > threshold), pre = x @ W_enc + b_enc.
- ``AutoEncoderTopK``: ``encoder.weight/bias``, ``decoder.weight``, ``b_dec``, ``k``
  (``threshold``); top-k per token of relu(encoder(x - b_dec)).
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` (``W_enc [D, F]``, ``b_enc``, ``W_dec``,
  ``b_dec``, ``k``, ``threshold``): relu(encoder(x - b_dec)) kept above the global
  ``threshold`` the trainer estimated (its ``encode`` default); an SAE whose threshold was
  never set (-1) falls back to per-token top-k.

``trainer.layer`` with ``trainer.submodule_name`` (or the directory names of the released
dictionaries: ``resid_out_layer3``, ``mlp_out_layer1``, ``attn_out_layer0``, ``embed``) and
``buffer.io`` give the hook: the output of the Hugging Face decoder layer, MLP or attention
module the nnsight buffer read (``blocks.L.hook_resid_post``, ``blocks.L.mlp.hook_out``,
``blocks.L.attn.hook_out``; ``io: in`` reads their inputs). Trained on raw Hugging Face
numerics with the tokenizer's own special tokens.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.sae._checks import check_finite, check_shape, read_json, require_tensors
from saetui.sae.model import SparseAutoencoder, weights_kwargs

WEIGHTS = "ae.pt"
CONFIG = "config.json"
FILES = (WEIGHTS, CONFIG)
FORMAT = "dictionary_learning"

# dict_class -> (our architecture, tensors ae.pt must hold)
_CLASSES: dict[str, tuple[str, list[str]]] = {
    "AutoEncoder": ("relu", ["bias", "encoder.weight", "encoder.bias", "decoder.weight"]),
    "AutoEncoderNew": (
        "relu",
        ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"],
    ),
    "GatedAutoEncoder": (
        "gated",
        ["decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"],
    ),
    "JumpReluAutoEncoder": ("jumprelu", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]),
    "AutoEncoderTopK": ("topk", ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"]),
    "BatchTopKSAE": ("batchtopk", ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec"]),
    "MatryoshkaBatchTopKSAE": ("batchtopk", ["W_enc", "b_enc", "W_dec", "b_dec"]),
}
_TRAINER_CLASSES = {
    "StandardTrainer": "AutoEncoder",
    "StandardTrainerAprilUpdate": "AutoEncoder",
    "PAnnealTrainer": "AutoEncoder",
    "GatedSAETrainer": "GatedAutoEncoder",
    "GatedAnnealTrainer": "GatedAutoEncoder",
    "JumpReluTrainer": "JumpReluAutoEncoder",
    "TopKTrainer": "AutoEncoderTopK",
    "BatchTopKTrainer": "BatchTopKSAE",
    "MatryoshkaBatchTopKTrainer": "MatryoshkaBatchTopKSAE",
}


def matches(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaetuiInputError(
            f"{path} could not be read as a dictionary_learning state dict ({reason}); "
            "point at the ae.pt that trainSAE saved at the end of training."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("ae"), dict) and "step" in state:
        raise SaetuiInputError(
            f"{path} is a dictionary_learning mid-training backup (step {state['step']}), not "
            "the final dictionary; let training finish, or use a checkpoints/ae_N.pt file."
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SaetuiInputError(
            f"{path} does not hold a flat state dict of tensors as dictionary_learning saves "
            "it; point at the ae.pt that trainSAE saved."
        )
    return state


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON object ``config[key]``, or an empty one where it is absent or not an object."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _dict_class(config: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> str:
    trainer = _section(config, "trainer")
    name = trainer.get("dict_class") or _TRAINER_CLASSES.get(str(trainer.get("trainer_class")))
    if name is None:  # older configs: tell the layouts apart by their tensors
        if "decoder_bias" in state and "r_mag" in state:
            name = "GatedAutoEncoder"
        elif "threshold" in state and "W_enc" in state and "k" not in state:
            name = "JumpReluAutoEncoder"
        elif "bias" in state and "encoder.weight" in state:
            name = "AutoEncoder"
        elif "decoder.bias" in state:
            name = "AutoEncoderNew"
    if name not in _CLASSES:
        raise SaetuiInputError(
            f"{path} names dict_class {name!r}; saetui reads the dictionary_learning classes "
            f"{', '.join(_CLASSES)}, so convert the dictionary first."
        )
    return str(name)


def _hook(config: dict[str, Any], directory: Path) -> tuple[str | None, int | None]:
    """The hook the nnsight buffer read, from the trainer config or the release's folders."""
    trainer = _section(config, "trainer")
    buffer = _section(config, "buffer")
    reads_input = buffer.get("io") == "in"
    layer = trainer.get("layer")
    layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
    # The submodule name, else the release's folders (``mlp_out_layer1/10_32768``).
    names = [str(trainer.get("submodule_name") or ""), directory.name, directory.parent.name]
    for name in names:
        kind = _kind(name.lower())
        if kind is None:
            continue
        if layer is None and kind != "embed":
            found = re.search(r"(\d+)", name.split("layer")[-1])
            layer = int(found.group(1)) if found else None
        if kind == "embed":
            return "hook_embed", None
        if layer is None:
            return None, None
        if kind == "resid":
            return f"blocks.{layer}.{'hook_resid_pre' if reads_input else 'hook_resid_post'}", layer
        return f"blocks.{layer}.{kind}.{'hook_in' if reads_input else 'hook_out'}", layer
    return None, layer


def _kind(name: str) -> str | None:
    if "resid" in name:
        return "resid"
    if "mlp" in name:
        return "mlp"
    if "attn" in name or "attention" in name:
        return "attn"
    if name.startswith("embed"):
        return "embed"
    return None


def load(directory: Path) -> SparseAutoencoder:
    config_path = directory / CONFIG
    weights_path = directory / WEIGHTS
    config = read_json(config_path, "a dictionary_learning SAE")
    state = _read_state(weights_path)
    dict_class = _dict_class(config, state, config_path)
    architecture, needed = _CLASSES[dict_class]
    require_tensors(state, needed, weights_path, f"dictionary_learning {dict_class}")
    state = {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in state.items()
    }
    tensors = _tensors(dict_class, state)
    d_in, d_sae = (int(n) for n in tensors["W_enc"].shape)
    source = f"its W_enc shape [{d_in}, {d_sae}] (dictionary_learning {dict_class})"
    check_shape(tensors["W_dec"], (d_sae, d_in), "W_dec (decoder)", weights_path, source)
    check_shape(tensors["b_dec"], (d_in,), "b_dec (decoder bias)", weights_path, source)
    for name in ("b_enc", "threshold", "b_gate", "b_mag", "r_mag"):
        if tensors.get(name) is not None and tensors[name].ndim == 1:
            check_shape(tensors[name], (d_sae,), name, weights_path, source)
    check_finite(tensors, weights_path)

    trainer = _section(config, "trainer")
    k = None
    mode = "per-token"
    if architecture in ("topk", "batchtopk"):
        k = _k(trainer, state, config_path)
        threshold = tensors.pop("threshold", None)
        if architecture == "batchtopk" and threshold is not None and float(threshold) >= 0:
            tensors["threshold"] = threshold.reshape(())
            mode = "threshold"  # BatchTopKSAE.encode's default: the trained global threshold
    hook, layer = _hook(config, directory)
    return SparseAutoencoder(
        architecture=architecture,
        format=FORMAT,
        k=k,
        batchtopk_mode=mode,
        apply_b_dec_to_input=dict_class not in ("AutoEncoderNew", "JumpReluAutoEncoder"),
        hook_name=hook,
        hook_layer=layer,
        model_name=trainer.get("lm_name"),
        source_path=directory,
        weight_files=[weights_path],
        config={**config, "dict_class": dict_class},
        **weights_kwargs(tensors),
    )


def _k(trainer: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> int:
    value = trainer.get("k")
    if value is None and "k" in state:
        value = int(state["k"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SaetuiInputError(
            f"{path} gives no positive integer k for this dictionary_learning top-k SAE "
            "(trainer.k, or the k tensor in ae.pt); add trainer.k."
        )
    return value


def _tensors(dict_class: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout (W_enc [D, F], W_dec [F, D], b_dec, ...) from ``dict_class``'s state dict."""
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        names = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]
        return {name: state[name] for name in names if name in state}
    if dict_class == "GatedAutoEncoder":
        return {
            "W_enc": state["encoder.weight"].t().contiguous(),
            "W_dec": state["decoder.weight"].t().contiguous(),
            "b_dec": state["decoder_bias"],
            "b_gate": state["gate_bias"],
            "b_mag": state["mag_bias"],
            "r_mag": state["r_mag"],
        }
    tensors = {
        "W_enc": state["encoder.weight"].t().contiguous(),
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].t().contiguous(),
    }
    if dict_class == "AutoEncoder":
        # AutoEncoder.from_pretrained(normalize_decoder=True): unit-norm decoder directions,
        # the norms moved into the encoder (relu(n * pre) = n * relu(pre) for n > 0).
        norms = tensors["W_dec"].norm(dim=1).clamp_min(1e-12)
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
        tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["b_dec"] = state["bias"]
    elif dict_class == "AutoEncoderNew":
        tensors["b_dec"] = state["decoder.bias"]
    else:  # AutoEncoderTopK, BatchTopKSAE
        tensors["b_dec"] = state["b_dec"]
        if "threshold" in state:
            tensors["threshold"] = state["threshold"]
    return tensors

"""Tiny random SAEs written to disk in every supported format, plus their raw tensors.

Each builder returns ``(directory, tensors)`` where ``tensors`` are the float32
tensors that went into the files, so tests can compute reference encodings with
plain torch formulas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

D_IN = 16
D_SAE = 64
K = 4


def random_tensors(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    """Weights scaled so that a sizeable share of features fire on unit-normal inputs."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    return {
        "W_enc": randn(d_in, d_sae, scale=d_in**-0.5),
        "b_enc": randn(d_sae, scale=0.3),
        "W_dec": randn(d_sae, d_in, scale=d_sae**-0.5),
        "b_dec": randn(d_in, scale=0.2),
        "threshold": torch.rand(d_sae, generator=gen) * 0.5,
        "b_gate": randn(d_sae, scale=0.3),
        "b_mag": randn(d_sae, scale=0.3),
        "r_mag": randn(d_sae, scale=0.2),
    }


def write_sae_core(
    directory: Path,
    *,
    top_k: int | None = K,
    seed: int = 0,
    hook_name: str = "hook_resid_post",
    hook_layer: int | None = 9,
    history: dict | None = None,
    extra_config: dict | None = None,
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(seed)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    state["num_batches_not_active"] = torch.zeros(D_SAE)
    torch.save(state, directory / "weights.pt")
    config = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "hook_layer": hook_layer,
        "hook_name": hook_name,
        "hook_spec": None,
        "top_k": top_k,
        "top_k_aux": 8,
        **(extra_config or {}),
    }
    (directory / "config.json").write_text(json.dumps(config))
    if history is not None:
        (directory / "history.json").write_text(json.dumps(history))
    return directory, tensors


_SAELENS_TENSORS = {
    "standard": ["W_enc", "W_dec", "b_dec", "b_enc"],
    "topk": ["W_enc", "W_dec", "b_dec", "b_enc"],
    "jumprelu": ["W_enc", "W_dec", "b_dec", "b_enc", "threshold"],
    "gated": ["W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"],
}


def write_saelens(
    directory: Path,
    architecture: str = "standard",
    *,
    seed: int = 0,
    apply_b_dec_to_input: bool = True,
    normalize_activations: str = "none",
    legacy: bool = False,
    drop: tuple[str, ...] = (),
    extra_config: dict | None = None,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A SAELens SAE: v6 nested config, or a pre-6.0 flat one with ``legacy``."""
    tensors = random_tensors(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n in _SAELENS_TENSORS[architecture] if n not in drop]
    save_file(
        {n: tensors[n].contiguous() for n in names}, str(directory / "sae_weights.safetensors")
    )
    if legacy:
        config = {
            "architecture": "standard" if architecture == "topk" else architecture,
            "d_in": D_IN,
            "d_sae": D_SAE,
            "activation_fn_str": "topk" if architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": K} if architecture == "topk" else {},
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "finetuning_scaling_factor": False,
            "context_size": 128,
            "model_name": "gpt2-small",
            "hook_point": "blocks.8.hook_resid_pre",
            "hook_point_layer": 8,
            "hook_point_head_index": None,
            "prepend_bos": True,
            "normalize_activations": normalize_activations,
            "dtype": "float32",
            "device": "cpu",
        }
    else:
        config = {
            "architecture": architecture,
            "d_in": D_IN,
            "d_sae": D_SAE,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "normalize_activations": normalize_activations,
            "reshape_activations": "none",
            "metadata": {
                "model_name": "smollm2-135m",
                "hook_name": "blocks.9.hook_resid_post",
                "prepend_bos": True,
                "context_size": 128,
            },
        }
        if architecture == "topk":
            config["k"] = K
    config.update(extra_config or {})
    (directory / "cfg.json").write_text(json.dumps(config))
    return directory, tensors


def write_sparsify(
    root: Path, hookpoint: str = "layers.9", *, seed: int = 0, num_latents: int | None = D_SAE
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(seed)
    directory = root / hookpoint
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "encoder.weight": tensors["W_enc"].t().contiguous(),
            "encoder.bias": tensors["b_enc"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
        },
        str(directory / "sae.safetensors"),
    )
    config = {
        "activation": "topk",
        "expansion_factor": D_SAE // D_IN,
        "normalize_decoder": True,
        "num_latents": num_latents or 0,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    (directory / "cfg.json").write_text(json.dumps(config))
    return directory, tensors


def write_gemma_scope(
    root: Path,
    relative: str = "gemma-scope-2b-pt-res/layer_9/width_16k/average_l0_71",
    *,
    seed: int = 0,
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(seed)
    directory = root / relative
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / "params.npz",
        **{n: tensors[n].numpy() for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")},
    )
    return directory, tensors

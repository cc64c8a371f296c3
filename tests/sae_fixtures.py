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
    d_in: int = D_IN,
    d_sae: int = D_SAE,
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(seed, d_in, d_sae)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    state["num_batches_not_active"] = torch.zeros(d_sae)
    torch.save(state, directory / "weights.pt")
    config = {
        "d_in": d_in,
        "d_sae": d_sae,
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
    d_in: int = D_IN,
    d_sae: int = D_SAE,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A SAELens SAE: v6 nested config, or a pre-6.0 flat one with ``legacy``."""
    tensors = random_tensors(seed, d_in, d_sae)
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n in _SAELENS_TENSORS[architecture] if n not in drop]
    save_file(
        {n: tensors[n].contiguous() for n in names}, str(directory / "sae_weights.safetensors")
    )
    if legacy:
        config = {
            "architecture": "standard" if architecture == "topk" else architecture,
            "d_in": d_in,
            "d_sae": d_sae,
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
            "d_in": d_in,
            "d_sae": d_sae,
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
    root: Path,
    hookpoint: str = "layers.9",
    *,
    seed: int = 0,
    num_latents: int | None = D_SAE,
    d_in: int = D_IN,
    d_sae: int = D_SAE,
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(seed, d_in, d_sae)
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
        "expansion_factor": d_sae // d_in,
        "normalize_decoder": True,
        "num_latents": num_latents or 0,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    (directory / "cfg.json").write_text(json.dumps(config))
    return directory, tensors


def write_gemma_scope(
    root: Path,
    relative: str = "gemma-scope-2b-pt-res/layer_9/width_16k/average_l0_71",
    *,
    seed: int = 0,
    d_in: int = D_IN,
    d_sae: int = D_SAE,
) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(seed, d_in, d_sae)
    directory = root / relative
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / "params.npz",
        **{n: tensors[n].numpy() for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")},
    )
    return directory, tensors


def dictionary_learning_state(
    dict_class: str, *, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE, k: int = K
) -> dict[str, torch.Tensor]:
    """A random ``ae.pt`` state dict laid out as dictionary_learning's ``dict_class`` saves it
    (``nn.Linear`` weights are [out, in]; decoder columns deliberately not unit norm)."""
    t = random_tensors(seed, d_in, d_sae)
    gen = torch.Generator().manual_seed(seed + 1)
    encoder_weight = t["W_enc"].t().contiguous()  # [d_sae, d_in]
    decoder_weight = (t["W_dec"].t() * (0.5 + torch.rand(d_sae, generator=gen))).contiguous()
    if dict_class == "AutoEncoder":
        return {
            "bias": t["b_dec"],
            "encoder.weight": encoder_weight,
            "encoder.bias": t["b_enc"],
            "decoder.weight": decoder_weight,
        }
    if dict_class == "AutoEncoderNew":
        return {
            "encoder.weight": encoder_weight,
            "encoder.bias": t["b_enc"],
            "decoder.weight": decoder_weight,
            "decoder.bias": t["b_dec"],
        }
    if dict_class == "GatedAutoEncoder":
        return {
            "decoder_bias": t["b_dec"],
            "encoder.weight": encoder_weight,
            "r_mag": t["r_mag"],
            "gate_bias": t["b_gate"],
            "mag_bias": t["b_mag"],
            "decoder.weight": decoder_weight,
        }
    if dict_class == "JumpReluAutoEncoder":
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        return {name: t[name] for name in names}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(0.35),
            "decoder.weight": decoder_weight,
            "encoder.weight": encoder_weight,
            "encoder.bias": t["b_enc"],
            "b_dec": t["b_dec"],
        }
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(0.35),
            "group_sizes": torch.tensor([d_sae // 4, d_sae - d_sae // 4]),
            "W_enc": t["W_enc"],
            "b_enc": t["b_enc"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
        }
    raise ValueError(dict_class)


_TRAINERS = {
    "AutoEncoder": "StandardTrainer",
    "AutoEncoderNew": "StandardTrainerAprilUpdate",
    "GatedAutoEncoder": "GatedSAETrainer",
    "JumpReluAutoEncoder": "JumpReluTrainer",
    "AutoEncoderTopK": "TopKTrainer",
    "BatchTopKSAE": "BatchTopKTrainer",
    "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
}


def write_dictionary_learning(
    directory: Path,
    dict_class: str = "BatchTopKSAE",
    *,
    seed: int = 0,
    d_in: int = D_IN,
    d_sae: int = D_SAE,
    layer: int | None = 3,
    submodule_name: str | None = "resid_post_layer_3",
    io: str = "out",
    trainer_extra: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """``ae.pt`` + ``config.json`` as dictionary_learning's ``trainSAE`` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = dictionary_learning_state(dict_class, seed=seed, d_in=d_in, d_sae=d_sae)
    torch.save(state, directory / "ae.pt")
    trainer = {
        "trainer_class": _TRAINERS[dict_class],
        "dict_class": dict_class,
        "lr": 1e-4,
        "steps": 1000,
        "seed": seed,
        "activation_dim": d_in,
        "dict_size": d_sae,
        "device": "cpu",
        "layer": layer,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "wandb_name": "test",
        "submodule_name": submodule_name,
    }
    if "k" in state:
        trainer["k"] = int(state["k"])
    trainer.update(trainer_extra or {})
    config = {
        "trainer": trainer,
        "buffer": {
            "d_submodule": d_in,
            "io": io,
            "n_ctxs": 100,
            "ctx_len": 128,
            "refresh_batch_size": 8,
            "out_batch_size": 64,
            "device": "cpu",
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    return directory, state

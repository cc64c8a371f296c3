"""EleutherAI sparsify: one folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Encode: relu((x - b_dec) @ encoder.weight.T + encoder.bias), then top-k per token.

The folder name is the Hugging Face module the SAE was trained on, and sparsify reads that
module's *output*. It maps to a TransformerBridge hook like this (any ``model.`` /
``gpt_neox.`` / ``transformer.`` prefix dropped first):

- ``layers.9`` / ``h.9`` (decoder-layer output)  -> ``blocks.9.hook_resid_post``
- ``layers.9.mlp`` / ``h.9.mlp``                 -> ``blocks.9.mlp.hook_out``
- ``layers.9.self_attn`` / ``.attn`` / ``.attention`` -> ``blocks.9.attn.hook_out``
- ``embed_tokens`` / ``wte``                     -> ``hook_embed``

``blocks.9.mlp.hook_out`` is the MLP module's own output. On most models it is the same
hook point as ``hook_mlp_out`` (and a run names it so); on Gemma-2/3 ``hook_mlp_out`` comes
after ``post_feedforward_layernorm`` and would feed the SAE something it never saw (likewise
attention and ``post_attention_layernorm``). Anything else leaves the hook unresolved
(give it with --hook).
"""

from __future__ import annotations

import re
from pathlib import Path

from saetui.errors import SaetuiInputError
from saetui.sae._checks import (
    check_finite,
    check_shape,
    config_int,
    read_json,
    require_tensors,
)
from saetui.sae.model import SparseAutoencoder, weights_kwargs
from saetui.sae.saelens import load_safetensors

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
FILES = (CONFIG, WEIGHTS)

_PREFIXES = ("model.", "gpt_neox.", "transformer.", "base_model.model.")
_LAYER = re.compile(r"^(?:layers|h|blocks)\.(\d+)(?:\.(\w+))?$")
_SUBMODULES = {
    None: "hook_resid_post",
    "mlp": "mlp.hook_out",
    "self_attn": "attn.hook_out",
    "attn": "attn.hook_out",
    "attention": "attn.hook_out",
}


def matches(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def hook_from_hookpoint(hookpoint: str) -> tuple[str | None, int | None]:
    """Map a sparsify hookpoint (folder name) to a TransformerLens hook name and layer."""
    name = hookpoint
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    if name in ("embed_tokens", "wte", "embed_in"):
        return "hook_embed", None
    match = _LAYER.match(name)
    if not match:
        return None, None
    layer = int(match.group(1))
    hook = _SUBMODULES.get(match.group(2))
    return (f"blocks.{layer}.{hook}" if hook else None), layer


def load(directory: Path) -> SparseAutoencoder:
    config_path = directory / CONFIG
    weights_path = directory / WEIGHTS
    config = read_json(config_path, "a sparsify SAE")
    if config.get("transcode") or config.get("skip_connection"):
        raise SaetuiInputError(
            f"{config_path} describes a transcoder or skip connection, not a sparse "
            "autoencoder; saetui reads plain sparsify SAEs."
        )
    if config.get("activation", "topk") != "topk":
        raise SaetuiInputError(
            f"{config_path} uses activation {config.get('activation')!r}; saetui reads sparsify "
            "SAEs with the topk activation only."
        )
    k = config_int(config, "k", config_path)
    state = load_safetensors(weights_path)
    require_tensors(
        state, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights_path, "sparsify"
    )
    encoder = state["encoder.weight"]
    d_in = config_int(config, "d_in", config_path, required=False) or int(encoder.shape[-1])
    d_sae = config_int(config, "num_latents", config_path, required=False)
    if not d_sae:
        factor = config_int(config, "expansion_factor", config_path, required=False)
        d_sae = d_in * factor if factor else int(encoder.shape[0])
    source = f"{config_path} (d_in {d_in}, {d_sae} latents)"
    check_shape(encoder, (d_sae, d_in), "encoder.weight", weights_path, source)
    check_shape(state["encoder.bias"], (d_sae,), "encoder.bias", weights_path, source)
    check_shape(state["W_dec"], (d_sae, d_in), "W_dec", weights_path, source)
    check_shape(state["b_dec"], (d_in,), "b_dec", weights_path, source)
    if not 1 <= k <= d_sae:
        raise SaetuiInputError(f"{config_path} has k = {k}, expected 1..{d_sae}; fix it.")
    tensors = {
        "W_enc": encoder.t().contiguous(),
        "b_enc": state["encoder.bias"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    check_finite(tensors, weights_path)
    hook, layer = hook_from_hookpoint(directory.name)
    dtype = encoder.dtype
    return SparseAutoencoder(
        architecture="topk",
        format="sparsify",
        k=k,
        apply_b_dec_to_input=True,
        hook_name=hook,
        hook_layer=layer,
        source_path=directory,
        weight_files=[weights_path],
        config={**config, "hookpoint": directory.name},
        **weights_kwargs({name: t.to(dtype) for name, t in tensors.items()}),
    )


def is_multi_hook_root(directory: Path) -> list[str]:
    """Names of sparsify hookpoint folders directly inside ``directory`` (a whole release)."""
    names = [child.name for child in directory.iterdir() if child.is_dir() and matches(child)]
    # natural order: layers.2 before layers.10
    return sorted(
        names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]
    )

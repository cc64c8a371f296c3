"""Gemma Scope: ``params.npz`` with ``W_enc, W_dec, b_enc, b_dec, threshold`` (JumpReLU).

No ``b_dec`` subtraction before encoding. The release's own folder layout
(``gemma-scope-2b-pt-res/layer_9/width_16k/average_l0_71/params.npz``) names
the layer; residual SAEs read ``blocks.L.hook_resid_post``, ``-mlp`` releases
``blocks.L.hook_mlp_out``, attention (``-att``) releases ``blocks.L.attn.hook_z`` with the
heads flattened (d_in = n_heads * d_head); paths without a ``layer_N`` part leave the hook
unresolved.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from saetui.errors import SaetuiInputError
from saetui.sae._checks import check_finite, check_shape, require_tensors
from saetui.sae.model import SparseAutoencoder, weights_kwargs

WEIGHTS = "params.npz"
FILES = (WEIGHTS,)
_NAMES = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]
_LAYER = re.compile(r"^layer_(\d+)$")


def matches(directory: Path) -> bool:
    return (directory / WEIGHTS).is_file()


def hook_from_path(path: Path) -> tuple[str | None, int | None]:
    """``.../gemma-scope-2b-pt-res/layer_9/width_16k/...`` -> ("blocks.9.hook_resid_post", 9)."""
    layer = None
    for part in path.parts:
        match = _LAYER.match(part)
        if match:
            layer = int(match.group(1))
    if layer is None:
        return None, None
    text = "/".join(path.parts).lower()
    if re.search(r"(-|_)att(n)?(\b|-|_|/)", text):
        return f"blocks.{layer}.attn.hook_z", layer
    if re.search(r"(-|_)mlp(\b|-|_|/)", text):
        return f"blocks.{layer}.hook_mlp_out", layer
    return f"blocks.{layer}.hook_resid_post", layer


def load(weights_path: Path) -> SparseAutoencoder:
    """Load from the ``.npz`` file itself (the directory holding it is the SAE)."""
    try:
        with np.load(weights_path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaetuiInputError(
            f"{weights_path} could not be read as a numpy .npz archive ({reason}); re-download it."
        ) from None
    tensors = {str(name): torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    require_tensors(tensors, _NAMES, weights_path, "Gemma Scope")
    if tensors["W_enc"].ndim != 2:
        raise SaetuiInputError(
            f"{weights_path}: W_enc has shape {list(tensors['W_enc'].shape)}, expected "
            "[d_in, d_sae]; the file is not a Gemma Scope SAE."
        )
    d_in, d_sae = (int(n) for n in tensors["W_enc"].shape)
    source = f"W_enc's shape [{d_in}, {d_sae}]"
    check_shape(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path, source)
    check_shape(tensors["b_dec"], (d_in,), "b_dec", weights_path, source)
    for name in ("b_enc", "threshold"):
        check_shape(tensors[name], (d_sae,), name, weights_path, source)
    check_finite(tensors, weights_path)
    hook, layer = hook_from_path(weights_path.resolve().parent)
    dtype = tensors["W_enc"].dtype if tensors["W_enc"].is_floating_point() else torch.float32
    return SparseAutoencoder(
        architecture="jumprelu",
        format="gemma_scope",
        apply_b_dec_to_input=False,
        hook_name=hook,
        hook_layer=layer,
        source_path=weights_path.parent,
        weight_files=[weights_path],
        config={"d_in": d_in, "d_sae": d_sae, "file": weights_path.name},
        **weights_kwargs({name: tensors[name].to(dtype) for name in _NAMES}),
    )

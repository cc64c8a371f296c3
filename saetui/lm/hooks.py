"""How saetui reads a hook point: TransformerBridge names, per-head views, module outputs.

- A hook whose activation is per head (``blocks.L.attn.hook_z``, ``hook_q``/``k``/``v``:
  ``[batch, pos, n_heads, d_head]``) is read *flattened* to ``n_heads * d_head``, head-major
  (SAELens' ``reshape_activations: hook_z``, Gemma Scope's attention SAEs, and the input of
  the attention output projection ``o_proj``).
- ``blocks.L.attn.hook_z[H]`` reads head ``H`` alone (``d_head`` wide): SAELens'
  ``hook_head_index``. Replacing it in a forward pass replaces that head only.
- ``blocks.L.mlp.hook_out`` / ``blocks.L.attn.hook_out`` are the outputs of the Hugging Face
  MLP / attention modules themselves, what sparsify and dictionary_learning hook. On most
  architectures they *are* ``hook_mlp_out`` / ``hook_attn_out`` (the same hook point, and
  saetui then uses the familiar name); on Gemma-2 and Gemma-3 those sit after
  ``post_feedforward_layernorm`` / ``post_attention_layernorm``, the module outputs before.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_HEAD = re.compile(r"^(?P<base>.+)\[(?P<head>\d+)\]$")
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# Familiar TransformerLens names, preferred when a hook point has several names.
_CANONICAL = ("hook_resid_post", "hook_mlp_out", "hook_attn_out", "hook_resid_pre")


def split_head(hook: str) -> tuple[str, int | None]:
    """``"blocks.1.attn.hook_z[3]"`` -> ``("blocks.1.attn.hook_z", 3)``; no index -> None."""
    match = _HEAD.match(hook)
    if match is None:
        return hook, None
    return match.group("base"), int(match.group("head"))


def with_head(hook: str, head: int | None) -> str:
    """The hook name that reads ``head`` of ``hook`` (``hook`` itself for None)."""
    return hook if head is None else f"{hook}[{head}]"


def read_view(value: torch.Tensor, head: int | None) -> torch.Tensor:
    """What saetui reads from a cached activation: per-head activations flattened, or one
    head of them; anything else as it is."""
    if value.ndim == 4:
        return value.flatten(-2) if head is None else value[..., head, :]
    return value


def write_view(original: torch.Tensor, replacement: torch.Tensor, head: int | None) -> torch.Tensor:
    """``original`` with the part :func:`read_view` reads replaced by ``replacement``."""
    replacement = replacement.to(device=original.device, dtype=original.dtype)
    if original.ndim == 4:
        if head is None:
            return replacement.reshape(original.shape)
        spliced = original.clone()
        spliced[..., head, :] = replacement
        return spliced
    return replacement


def canonical_hook(hook_dict: dict[str, Any], hook: str) -> str:
    """The familiar TransformerLens name of the hook point ``hook`` names, when it has one
    (``blocks.1.mlp.hook_out`` -> ``blocks.1.hook_mlp_out`` on Llama, unchanged on Gemma-2)."""
    base, head = split_head(hook)
    match = _LAYER.match(base)
    point = hook_dict.get(base)
    if match is None or point is None:
        return hook
    for name in _CANONICAL:
        alias = f"blocks.{match.group(1)}.{name}"
        if alias != base and hook_dict.get(alias) is point:
            return with_head(alias, head)
    return hook

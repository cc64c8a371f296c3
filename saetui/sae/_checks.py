"""Shared reading and validation for the per-format loaders: every failure is a SaetuiInputError."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

import torch

from saetui.errors import SaetuiInputError

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(value: Any, path: Path) -> torch.dtype | None:
    """``"float32"`` / ``"torch.bfloat16"`` / None -> torch dtype."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise SaetuiInputError(
            f"{path} names dtype {value!r}, expected one of float32, float16, bfloat16, "
            "float64; fix the dtype entry."
        )
    return _DTYPES[name]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning any failure into one clear sentence."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SaetuiInputError(f"{path} does not exist; {what} needs it.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaetuiInputError(
            f"{path} is not readable JSON ({exc}); {what} needs a valid JSON object there."
        ) from None
    if not isinstance(data, dict):
        raise SaetuiInputError(
            f"{path} holds a JSON {type(data).__name__}, expected an object of settings "
            f"for {what}; check the file."
        )
    return data


@overload
def config_int(
    config: Mapping[str, Any], key: str, path: Path, *, required: Literal[True] = ...
) -> int: ...


@overload
def config_int(
    config: Mapping[str, Any], key: str, path: Path, *, required: bool
) -> int | None: ...


def config_int(
    config: Mapping[str, Any], key: str, path: Path, *, required: bool = True
) -> int | None:
    """``config[key]`` as an int; a missing entry is an error when ``required``, else None."""
    value = config.get(key)
    if value is None:
        if required:
            raise SaetuiInputError(f"{path} has no {key!r} entry; add it (an integer).")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SaetuiInputError(f"{path} has {key} = {value!r}, expected an integer; fix it.")
    return int(value)


def require_tensors(
    tensors: dict[str, torch.Tensor], names: list[str], path: Path, format_name: str
) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise SaetuiInputError(
            f"{path} lacks tensor(s) {', '.join(missing)} (it has "
            f"{', '.join(sorted(tensors)) or 'none'}); a {format_name} SAE needs "
            f"{', '.join(names)}, so re-export it."
        )


def check_shape(
    tensor: torch.Tensor, expected: tuple[int, ...], name: str, path: Path, source: str
) -> None:
    if tuple(tensor.shape) != expected:
        raise SaetuiInputError(
            f"{path}: tensor {name} has shape {list(tensor.shape)} but {source} implies "
            f"{list(expected)}; the weights and config do not belong together."
        )


def check_finite(tensors: Mapping[str, torch.Tensor | None], path: Path) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise SaetuiInputError(
                f"{path}: tensor {name} holds {bad} NaN/inf value(s); the SAE is broken, "
                "use another checkpoint."
            )


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def full_hook_name(name: Any, layer: Any) -> tuple[str | None, int | None]:
    """Resolve ``("hook_resid_post", 9)`` or ``("blocks.9.hook_resid_post", None)``.

    Returns ``(full hook name or None, layer or None)``; a short name without a
    layer stays unresolved (None) because the layer cannot be guessed.
    """
    layer_int = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
    if not isinstance(name, str) or not name:
        return None, layer_int
    match = _BLOCK.match(name)
    if match:
        return name, int(match.group(1))
    if name.startswith(("hook_embed", "hook_pos_embed", "ln_final")):
        return name, layer_int
    if layer_int is None:
        return None, None
    short = name if name.startswith(("hook_", "attn.", "mlp.", "ln")) else f"hook_{name}"
    return f"blocks.{layer_int}.{short}", layer_int

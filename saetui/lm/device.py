"""Device and dtype choice: cuda > mps > cpu, bf16 on accelerators, fp32 on the CPU."""

from __future__ import annotations

import torch

from saetui.errors import SaetuiInputError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: the requested one, else cuda > mps > cpu."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise SaetuiInputError(
                f"--device {requested!r} is not a device name; use auto, cpu, cuda, cuda:N or mps."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SaetuiInputError(
                f"--device {requested} was asked for but no CUDA GPU is visible; "
                "use --device cpu or auto."
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise SaetuiInputError(
                f"--device {requested} was asked for but MPS is not available; use --device cpu."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The compute dtype: the requested one, else bf16 on an accelerator and fp32 on the CPU."""
    if requested and requested != "auto":
        if requested not in _DTYPES:
            raise SaetuiInputError(
                f"--dtype {requested!r} is not supported; use auto, float32, bfloat16 or float16."
            )
        return _DTYPES[requested]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 and so on."""
    return str(dtype).removeprefix("torch.")

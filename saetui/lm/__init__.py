"""Language models: the embedded sample model, TransformerLens loading, hooks, numerics,
hub names and the start token put in front of documents.

Attributes load on first use, so ``saetui.lm.names`` and ``saetui.lm.embedded`` do not
import torch (the TUI process never needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

from saetui.lm.names import DEFAULT_MODEL, NUMERICS

_LAZY = {
    "pick_device": "saetui.lm.device",
    "pick_dtype": "saetui.lm.device",
    "EMBEDDED_MODELS": "saetui.lm.embedded",
    "cache_root": "saetui.lm.embedded",
    "LanguageModel": "saetui.lm.model",
    "hook_layer": "saetui.lm.model",
    "load_model": "saetui.lm.model",
    "resolve_hook": "saetui.lm.model",
    "START_TOKEN_RULES": "saetui.lm.start",
}

__all__ = ["DEFAULT_MODEL", "NUMERICS", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'saetui.lm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

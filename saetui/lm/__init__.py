"""Language models: the embedded sample model, TransformerLens loading, hooks, numerics,
hub names and the start token put in front of documents."""

from saetui.lm.device import pick_device, pick_dtype
from saetui.lm.embedded import EMBEDDED_MODELS, cache_root
from saetui.lm.model import (
    DEFAULT_MODEL,
    NUMERICS,
    LanguageModel,
    hook_layer,
    load_model,
    resolve_hook,
)
from saetui.lm.start import START_TOKEN_RULES

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "NUMERICS",
    "START_TOKEN_RULES",
    "LanguageModel",
    "cache_root",
    "hook_layer",
    "load_model",
    "pick_device",
    "pick_dtype",
    "resolve_hook",
]

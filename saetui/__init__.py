"""saetui: a terminal explorer for sparse-autoencoder features."""

from __future__ import annotations

__version__ = "0.1.0"

from saetui.errors import SaetuiInputError
from saetui.index import open_index as open_index

__all__ = ["SaetuiInputError", "__version__", "ablate", "open_index", "steer"]


def ablate(index: str, feature: int, contexts: int = 10) -> list[dict]:
    """Remove ``feature`` on its top contexts (the index's own model and SAE): per context
    the next-token loss change at the firing token. See saetui.analysis.causal."""
    from saetui.analysis.causal import CausalSession

    return CausalSession(index).ablate(feature, contexts)


def steer(index: str, prompt: str, features: dict[int, float], **options: object) -> object:
    """Generate from ``prompt`` with ``features`` ({id: strength}) steered, beside the
    unsteered text; for many calls keep a saetui.analysis.causal.CausalSession instead."""
    from saetui.analysis.causal import CausalSession

    return CausalSession(index).steer(prompt, features, **options)

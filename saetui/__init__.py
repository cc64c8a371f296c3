"""saetui: a terminal explorer for sparse-autoencoder features."""

from __future__ import annotations

__version__ = "0.1.0"

from saetui.errors import SaetuiInputError
from saetui.index import open_index as open_index

__all__ = ["SaetuiInputError", "__version__"]

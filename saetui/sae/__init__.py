"""Sparse autoencoders: one :class:`SparseAutoencoder` type and one loader per on-disk format."""

from saetui.sae.loader import EXPECTED, describe, detect_format, load_sae, save_sae
from saetui.sae.model import (
    ARCHITECTURES,
    BATCHTOPK_MODES,
    FORMATS,
    SparseAutoencoder,
    best_device,
)

__all__ = [
    "ARCHITECTURES",
    "BATCHTOPK_MODES",
    "EXPECTED",
    "FORMATS",
    "SparseAutoencoder",
    "best_device",
    "describe",
    "detect_format",
    "load_sae",
    "save_sae",
]

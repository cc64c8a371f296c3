"""Deterministic train / held-out split of documents, shared by SAE training and evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from saetui.errors import SaetuiInputError


def held_out_ids(
    documents: Sequence[str], held_out_fraction: float = 0.1, seed: int = 0
) -> list[int]:
    """Ids (indices) of the held-out documents, ascending.

    Documents are ranked by sha256(seed, text) and the first
    ``round(fraction * n)`` are held out: the choice depends on the texts, not
    on their order, so reordering or appending documents moves few of them.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise SaetuiInputError(
            f"held_out_fraction is {held_out_fraction}; give a fraction in [0, 1), e.g. 0.1."
        )
    n_held_out = round(held_out_fraction * len(documents))
    prefix = f"{seed}\0".encode()
    ranked = sorted(
        range(len(documents)),
        key=lambda i: (hashlib.sha256(prefix + documents[i].encode("utf-8")).digest(), i),
    )
    return sorted(ranked[:n_held_out])


def split_documents(
    documents: Sequence[str], held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` documents, each in corpus order (see :func:`held_out_ids`)."""
    held = set(held_out_ids(documents, held_out_fraction, seed))
    train = [text for i, text in enumerate(documents) if i not in held]
    held_out = [text for i, text in enumerate(documents) if i in held]
    return train, held_out

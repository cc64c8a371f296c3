"""Which corpus windows a shard holds when several processes collect one index.

A distributed collection of ``world`` processes deals the corpus's windows out in blocks
of ``block`` consecutive windows, round robin: window ``w`` belongs to rank
``(w // block) % world``. Every rank plans the same windows (the packer is sequential),
keeps its own, and writes them to its own shard under consecutive *local* ids; records
that name a token (top-K, samples) use the *global* window id, so a merged index holds the
same numbers as a single-process one. The assignment depends only on (rank, world,
block): a relaunch with the same world size continues exactly where each shard stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

import numpy as np

# Two forward chunks (codec.FWD_CHUNK) and one SAELens metrics batch
# (collect.reconstruction.SAELENS_BATCH_WINDOWS): each rank folds whole batches of its own
# windows.
BLOCK_WINDOWS = 16


@dataclass(frozen=True)
class ShardLayout:
    """Rank ``rank`` of ``world`` processes, dealt blocks of ``block`` windows."""

    rank: int
    world: int
    block: int = BLOCK_WINDOWS

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world or self.block < 1:
            raise ValueError(f"invalid shard layout {self}")

    def owner(self, window: int) -> int:
        """The rank that collects global window ``window``."""
        return (int(window) // self.block) % self.world

    def owns(self, window: int) -> bool:
        return self.owner(window) == self.rank

    @overload
    def global_window(self, local: int) -> int: ...
    @overload
    def global_window(self, local: np.ndarray) -> np.ndarray: ...
    def global_window(self, local: int | np.ndarray) -> int | np.ndarray:
        """Global window id of this shard's ``local``-th window (scalar or array)."""
        ids = np.asarray(local, dtype=np.int64)
        block, offset = np.divmod(ids, self.block)
        out: np.ndarray = (block * self.world + self.rank) * self.block + offset
        return int(out) if out.ndim == 0 else out

    def local_window(self, window: int) -> int:
        """This shard's local id of global window ``window`` (which it must own)."""
        block, offset = divmod(int(window), self.block)
        if block % self.world != self.rank:
            raise ValueError(f"window {window} belongs to rank {self.owner(window)}")
        return (block // self.world) * self.block + offset

    def owned_below(self, window: int) -> int:
        """How many windows with ids below ``window`` this rank owns (a local id bound)."""
        cycle = self.block * self.world
        full, rest = divmod(int(window), cycle)
        return full * self.block + min(max(rest - self.rank * self.block, 0), self.block)

    def to_json(self) -> dict[str, int]:
        return {"rank": self.rank, "world": self.world, "block": self.block}

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> ShardLayout | None:
        if not value:
            return None
        return cls(int(value["rank"]), int(value["world"]), int(value["block"]))


def solo_layout(layout: ShardLayout | None) -> ShardLayout | None:
    """A world of one is the single-process index: no layout is recorded for it."""
    return None if layout is None or layout.world == 1 else layout

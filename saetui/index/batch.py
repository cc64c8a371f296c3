"""A batch of windows as `IndexWriter.add_windows` takes it, checked and normalised in
the caller's thread: every wrong shape or value is one SaetuiInputError sentence before
anything reaches the commit thread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from saetui.errors import SaetuiInputError

ArrayInput = npt.ArrayLike | torch.Tensor  # numpy, torch (any device) or nested lists


@dataclass
class WindowBatch:
    """Windows [first, first + len(lens)) of a shard (local ids), checked."""

    first: int
    lens: np.ndarray  # int64 [n_windows]
    tokens: np.ndarray  # uint32 [n_tokens], windows concatenated
    segments: list[np.ndarray]  # per window int64 [n_seg, 4]
    ids: np.ndarray  # [n_tokens, K] feature ids
    vals: np.ndarray  # float32 [n_tokens, K], 0 = inactive slot
    mask: np.ndarray  # bool [n_tokens], False = BOS/pad


def as_numpy(x: ArrayInput) -> np.ndarray:
    """A numpy view of an array-like argument (a torch tensor is moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        out: np.ndarray = x.detach().to("cpu").numpy()
        return out
    return np.asarray(x)


def check_batch(
    first: int,
    wids: np.ndarray,
    tokens: Sequence[ArrayInput] | np.ndarray | torch.Tensor,
    segments: Sequence[Sequence[Sequence[int]]],
    feature_ids: ArrayInput,
    values: ArrayInput,
    mask: ArrayInput | None,
    lengths: Sequence[int] | np.ndarray | None,
    ctx_len: int,
    d_sae: int,
) -> WindowBatch:
    """The batch of ``add_windows`` arguments for windows ``wids`` (global ids, checked in
    order by the writer), or a sentence naming what is wrong."""
    n_w = len(wids)
    if isinstance(tokens, (np.ndarray, torch.Tensor)) and as_numpy(tokens).ndim == 2:
        if lengths is None:
            raise SaetuiInputError("a padded 2-D tokens array needs `lengths`.")
        padded = as_numpy(tokens)
        lens = np.asarray(lengths, dtype=np.int64)
        keep = np.arange(padded.shape[1])[None, :] < lens[:, None]
        tokens_flat = padded[keep].astype(np.uint32)
    else:
        parts = [as_numpy(t).ravel() for t in tokens]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        tokens_flat = np.concatenate(parts).astype(np.uint32) if parts else np.zeros(0, np.uint32)
    if len(lens) != n_w or len(segments) != n_w:
        raise SaetuiInputError(
            f"got {n_w} window ids but {len(lens)} token sequences and {len(segments)} "
            "segment lists: pass one of each per window."
        )
    if lens.min() < 1 or lens.max() > ctx_len:
        raise SaetuiInputError(
            f"window lengths must be 1 to ctx_len={ctx_len} tokens, got "
            f"{int(lens.min())}-{int(lens.max())}."
        )
    n_tok = int(lens.sum())
    ids_np = as_numpy(feature_ids)
    vals_np = as_numpy(values).astype(np.float32, copy=False)
    if ids_np.ndim != 2 or ids_np.shape != vals_np.shape or ids_np.shape[0] != n_tok:
        raise SaetuiInputError(
            f"feature_ids and values must both be [n_tokens={n_tok}, K], got "
            f"{tuple(ids_np.shape)} and {tuple(vals_np.shape)}."
        )
    mask_np = np.ones(n_tok, dtype=bool) if mask is None else as_numpy(mask).astype(bool).ravel()
    if len(mask_np) != n_tok:
        raise SaetuiInputError(f"mask must have n_tokens={n_tok} entries, got {len(mask_np)}.")
    if vals_np.size:
        lo, hi = float(vals_np.min()), float(vals_np.max())
        if not (lo >= 0 and np.isfinite(hi)):
            raise SaetuiInputError(
                "activation values must be finite and >= 0 (0 = inactive slot); got "
                f"min {lo}, max {hi}."
            )
        active_ids = np.where(vals_np != 0, ids_np, 0)
        if int(active_ids.min()) < 0 or int(active_ids.max()) >= d_sae:
            raise SaetuiInputError(
                f"feature ids must lie in [0, {d_sae}) (d_sae) for active slots, got "
                f"{int(active_ids.min())}-{int(active_ids.max())}."
            )
    seg_arrays = [np.asarray(s, dtype=np.int64).reshape(-1, 4) for s in segments]
    for w, seg in enumerate(seg_arrays):
        if len(seg) and (
            seg[:, 2].min() < 0 or (seg[:, 2] + seg[:, 3]).max() > lens[w] or seg[:, 3].min() < 1
        ):
            raise SaetuiInputError(
                f"segments of window {int(wids[w])} do not fit its {int(lens[w])} tokens: "
                "each needs 0 <= start and start + length <= window length."
            )
    return WindowBatch(first, lens, tokens_flat, seg_arrays, ids_np, vals_np, mask_np)

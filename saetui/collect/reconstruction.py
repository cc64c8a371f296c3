"""Both metric families' reconstruction and sparsity sums (their definitions:
:mod:`saetui.collect.metrics`), accumulated in float64 on the device that runs the SAE from
the collection's own activations, folded a SAELens batch of windows at a time; their JSON
state lets a resumed run continue."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

F64 = torch.float64
SAELENS_BATCH_WINDOWS = 16  # SAELens' and SAEBench's default batch_size_prompts
STATE_VERSION = 1

# Slots of the running float64 sums (one tensor per family, so a batch costs one add);
# err is the sum over elements of x - x̂ (for the residual's standard deviation).
_SAETUI = ["tokens", "sse", "xx", "err", "cos", "ratio", "legacy", "l0", "l0_sq", "l1", "l1_sq"]
_SAELENS = [
    "batches",
    "tokens",
    "mean_xx",
    "mean_sse",
    "legacy",
    "cos",
    "norm_in",
    "norm_out",
    "ratio",
    "rrb",
    "l0",
    "l1",
]


@dataclass
class _Rows:
    """Per-token values of counted rows waiting for their SAELens batch to be complete."""

    window: np.ndarray  # int64 [n] window id of each row
    saelens: np.ndarray  # bool [n] not a special token
    x: torch.Tensor  # [n, d] the SAE's input, as the model produced it
    scalars: torch.Tensor  # float64 [n, 8]: sse, xx, hh, xh, cos, l0, l1, err
    ids: torch.Tensor  # [n, K] active feature ids (value 0 = empty slot)
    values: torch.Tensor  # [n, K]

    @staticmethod
    def cat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        width = max(p.ids.shape[1] for p in parts)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        return _Rows(
            np.concatenate([p.window for p in parts]),
            np.concatenate([p.saelens for p in parts]),
            torch.cat([p.x for p in parts]),
            torch.cat([p.scalars for p in parts]),
            torch.cat([pad(p.ids) for p in parts]),
            torch.cat([pad(p.values) for p in parts]),
        )

    def slice(self, a: int, b: int) -> _Rows:
        return _Rows(
            self.window[a:b],
            self.saelens[a:b],
            self.x[a:b],
            self.scalars[a:b],
            self.ids[a:b],
            self.values[a:b],
        )


class ReconstructionAccumulator:
    """Both families' reconstruction and sparsity sums over consecutive windows (a rank of a
    distributed run skips the other ranks' windows, whole SAELens batches at a time).

    Windows arrive in order (``add``); rows of a SAELens batch (``group_windows`` windows by
    window id) wait until the batch is complete, then fold into the sums. ``state`` is the
    folded part as JSON (a resumed run continues from it), ``finish`` folds the last,
    partial batch at the end of the data.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        device: torch.device | str = "cpu",
        group_windows: int = SAELENS_BATCH_WINDOWS,
    ) -> None:
        self.d_in, self.d_sae, self.group_windows = d_in, d_sae, group_windows
        self.device = torch.device(device)
        self.next_window: int | None = None  # first window not added yet
        self.folded_windows: int | None = None  # windows [start, folded) are in the sums
        self.start_window: int | None = None
        self._pending: list[_Rows] = []
        self._saetui = torch.zeros(len(_SAETUI), dtype=F64, device=self.device)
        self._saelens = torch.zeros(len(_SAELENS), dtype=F64, device=self.device)
        self._sum_x = torch.zeros(d_in, dtype=F64, device=self.device)
        self._l0_hist = torch.zeros(d_sae + 1, dtype=torch.int64, device=self.device)
        self._saelens_counts = torch.zeros(d_sae, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ adding

    @torch.no_grad()
    def add(
        self,
        window_ids: np.ndarray,
        rows_per_window: np.ndarray,
        saelens: np.ndarray,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        ids: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Add consecutive windows ``window_ids`` whose counted tokens are the rows of ``x``,
        ``x_hat`` [n, d_in] and the sparse codes ``ids``/``values`` [n, K] (value 0: empty
        slot); ``rows_per_window`` [B] counts them per window, ``saelens`` [n] says which are
        no special token."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        if len(window_ids) == 0:
            return
        first = int(window_ids[0])
        if self.next_window is None:
            self.next_window = self.folded_windows = self.start_window = first
        expected = np.concatenate([[self.next_window], window_ids[:-1] + 1])
        jumps = window_ids != expected
        g = self.group_windows
        if np.any(jumps & ((window_ids < expected) | (window_ids % g != 0) | (expected % g != 0))):
            raise ValueError(
                f"windows must follow window {self.next_window - 1} without gaps, or skip "
                f"whole batches of {g} windows (another process's)"
            )
        x64, h64 = x.to(F64), x_hat.to(F64)
        sse = (x64 - h64).pow(2).sum(-1)
        xx, hh, xh = x64.pow(2).sum(-1), h64.pow(2).sum(-1), (x64 * h64).sum(-1)
        cos = torch.nn.functional.cosine_similarity(x64, h64, dim=-1)
        active = values > 0
        scalars = torch.stack(
            [
                sse,
                xx,
                hh,
                xh,
                cos,
                active.sum(-1).to(F64),
                values.to(F64).sum(-1),
                (x64 - h64).sum(-1),
            ],
            dim=-1,
        )
        self._pending.append(
            _Rows(
                np.repeat(window_ids, np.asarray(rows_per_window, dtype=np.int64)),
                np.asarray(saelens, dtype=bool),
                x,
                scalars,
                ids,
                values,
            )
        )
        self.next_window = int(window_ids[-1]) + 1
        complete = self.next_window // self.group_windows * self.group_windows
        if self.folded_windows is None or complete > self.folded_windows:
            self._fold_until(complete)

    def reduce(self, sum_array: Callable[[np.ndarray], np.ndarray]) -> None:
        """Add the folded sums of every process of a distributed run (``sum_array``: an
        element-wise sum over them) into this one; call after :meth:`finish` on each."""
        for name in ("_saetui", "_saelens", "_sum_x", "_l0_hist", "_saelens_counts"):
            tensor = getattr(self, name)
            total = sum_array(tensor.cpu().numpy())
            setattr(self, name, torch.as_tensor(total, dtype=tensor.dtype, device=self.device))

    def finish(self) -> None:
        """Fold the last, partial SAELens batch (no more windows follow)."""
        folded = self.folded_windows
        if self.next_window is not None and (folded is None or self.next_window > folded):
            self._fold_until(self.next_window)

    def _fold_until(self, end: int) -> None:
        rows = _Rows.cat(self._pending)
        self._pending = []
        cut = int(np.searchsorted(rows.window, end))
        start = 0
        while start < cut:
            group = int(rows.window[start]) // self.group_windows
            stop = int(np.searchsorted(rows.window, (group + 1) * self.group_windows))
            stop = min(stop, cut)
            self._fold(rows.slice(start, stop))
            start = stop
        if cut < len(rows.window):
            self._pending = [rows.slice(cut, len(rows.window))]
        self.folded_windows = end

    def _fold(self, rows: _Rows) -> None:
        sse, xx, hh, xh, cos, l0, l1, err = rows.scalars.unbind(-1)
        x64 = rows.x.to(F64)
        centred = (x64 - x64.mean(0, keepdim=True)).pow(2).sum(-1)
        legacy = 1 - sse / centred.clamp_min(1e-12)
        norm_in, norm_out = xx.sqrt(), hh.sqrt()
        self._saetui += torch.stack(
            [
                torch.tensor(float(len(rows.window)), dtype=F64, device=sse.device),
                sse.sum(),
                xx.sum(),
                err.sum(),
                cos.sum(),
                (norm_out / norm_in.clamp_min(1e-12)).sum(),
                legacy.sum(),
                l0.sum(),
                l0.pow(2).sum(),
                l1.sum(),
                l1.pow(2).sum(),
            ]
        )
        self._sum_x += x64.sum(0)
        self._l0_hist += torch.bincount(l0.to(torch.int64), minlength=self.d_sae + 1)
        keep = torch.as_tensor(rows.saelens, device=sse.device)
        m = int(rows.saelens.sum())
        if m == 0:
            return  # SAELens would average an empty batch into NaN; it has none of these
        sse, xx, hh, xh, l0, l1 = (t[keep] for t in (sse, xx, hh, xh, l0, l1))
        x_s = x64[keep]
        centred = (x_s - x_s.mean(0, keepdim=True)).pow(2).sum(-1)
        norm_in, norm_out = xx.sqrt(), hh.sqrt()
        ratio_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        self._saelens += torch.stack(
            [
                torch.tensor(1.0, dtype=F64, device=sse.device),
                torch.tensor(float(m), dtype=F64, device=sse.device),
                xx.mean(),
                sse.mean(),
                (1 - sse / centred).sum(),
                (xh / (norm_in * norm_out)).sum(),
                norm_in.sum(),
                norm_out.sum(),
                (norm_out / ratio_in).sum(),
                hh.mean() / xh.mean(),
                l0.sum(),
                l1.sum(),
            ]
        )
        fired = rows.ids[keep][rows.values[keep] > 0]
        self._saelens_counts += torch.bincount(fired.to(torch.int64), minlength=self.d_sae)

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The folded sums as JSON values (what a resumed run continues from)."""
        return {
            "version": STATE_VERSION,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "group_windows": self.group_windows,
            "start_window": self.start_window,
            "folded_windows": self.folded_windows,
            "saetui": self._saetui.tolist(),
            "saelens": self._saelens.tolist(),
            "sum_x": self._sum_x.tolist(),
            "l0_histogram": _sparse(self._l0_hist),
            "saelens_counts": _sparse(self._saelens_counts),
        }

    @classmethod
    def from_state(
        cls, state: Any, d_in: int, d_sae: int, device: torch.device | str = "cpu"
    ) -> ReconstructionAccumulator:
        """An accumulator continuing ``state``; a fresh one (from window 0) when the state is
        missing or was written for another SAE shape or batch rule."""
        acc = cls(d_in, d_sae, device)
        fits = (
            isinstance(state, dict)
            and state.get("version") == STATE_VERSION
            and (state.get("d_in"), state.get("d_sae")) == (d_in, d_sae)
            and state.get("group_windows") == acc.group_windows
            and state.get("start_window") == 0
            and isinstance(state.get("folded_windows"), int)
            and state["folded_windows"] % acc.group_windows == 0
        )
        if not fits:
            acc.next_window = acc.folded_windows = acc.start_window = 0
            return acc
        acc.start_window = 0
        acc.next_window = acc.folded_windows = int(state["folded_windows"])
        dev = acc.device
        acc._saetui = torch.tensor(state["saetui"], dtype=F64, device=dev)
        acc._saelens = torch.tensor(state["saelens"], dtype=F64, device=dev)
        acc._sum_x = torch.tensor(state["sum_x"], dtype=F64, device=dev)
        acc._l0_hist = _dense(state["l0_histogram"], d_sae + 1, dev)
        acc._saelens_counts = _dense(state["saelens_counts"], d_sae, dev)
        return acc

    # ------------------------------------------------------------------ results

    @property
    def saelens_feature_counts(self) -> torch.Tensor:
        """Per-feature firing counts over the SAELens family's tokens."""
        return self._saelens_counts

    def result(self) -> dict[str, Any]:
        """Both families (the ``saelens`` one nested) over the folded windows."""
        s = dict(zip(_SAETUI, self._saetui.tolist(), strict=True))
        n = s["tokens"]
        if n == 0:
            return {}
        d = self.d_in
        mean_x = self._sum_x / n
        total_variance = s["xx"] / n - float(mean_x.pow(2).sum())
        l0_mean, l1_mean = s["l0"] / n, s["l1"] / n
        elements = n * d
        element_mean = float(self._sum_x.sum()) / elements
        err_mean = s["err"] / elements
        out: dict[str, Any] = {
            "tokens": int(n),
            "mse": s["sse"] / elements,
            "explained_variance": 1 - (s["sse"] / n) / total_variance,
            "explained_variance_legacy": s["legacy"] / n,
            "fvu": (s["sse"] / n) / total_variance,
            "cosine": s["cos"] / n,
            "l2_ratio": s["ratio"] / n,
            "l0_mean": l0_mean,
            "l0_std": math.sqrt(max(s["l0_sq"] / n - l0_mean**2, 0.0)),
            "l1_mean": l1_mean,
            "l1_std": math.sqrt(max(s["l1_sq"] / n - l1_mean**2, 0.0)),
            # standard deviations over every element (what the old pipeline plotted)
            "original_std": math.sqrt(max(s["xx"] / elements - element_mean**2, 0.0)),
            "residual_std": math.sqrt(max(s["sse"] / elements - err_mean**2, 0.0)),
            # [[L0, tokens with that L0], ...] for the L0-per-token histogram
            "l0_histogram": _sparse(self._l0_hist),
        }
        sl = dict(zip(_SAELENS, self._saelens.tolist(), strict=True))
        if sl["tokens"] > 0:
            batches, tokens = sl["batches"], sl["tokens"]
            mean_sum_of_squares = sl["mean_xx"] / batches
            total = mean_sum_of_squares - (mean_sum_of_squares / d) ** 2
            out["saelens"] = {
                "tokens": int(tokens),
                "batches": int(batches),
                "explained_variance": 1 - (sl["mean_sse"] / batches) / total,
                "explained_variance_legacy": sl["legacy"] / tokens,
                "mse": sl["mean_sse"] / tokens,
                "cossim": sl["cos"] / tokens,
                "l2_norm_in": sl["norm_in"] / tokens,
                "l2_norm_out": sl["norm_out"] / tokens,
                "l2_ratio": sl["ratio"] / tokens,
                "relative_reconstruction_bias": sl["rrb"] / batches,
                "l0": sl["l0"] / tokens,
                "l1": sl["l1"] / tokens,
            }
        return out


def _sparse(counts: torch.Tensor) -> list[list[int]]:
    values = counts.cpu()
    return [[int(i), int(values[i])] for i in values.nonzero().flatten().tolist()]


def _dense(pairs: Iterable[Iterable[int]], size: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.int64)
    for index, count in pairs:
        out[int(index)] = int(count)
    return out.to(device)

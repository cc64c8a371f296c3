"""Per-feature summaries merged incrementally with torch ops (cpu, cuda or mps).

Every quantity is independent of how the corpus is cut into batches, so a run resumed
after a crash ends with exactly the summaries of an uninterrupted run:

- values are rounded to fp16 first (what the forward index stores);
- count, histogram: integer counts; sum and sum of squares: int64 fixed point
  (sum in units of 2**-24, exact for fp16; squares rounded to units of 2**-16);
- max: of the fp16 bit patterns, which order like the values for positive numbers;
- top-K: key = fp16 bits << 40 | (2**40 - 1 - global index): larger value wins, ties go
  to the smaller global token index; keys are unique per feature;
- interval samples: per feature and octave of the value, the `samples_per_bin`
  activations with the smallest hash(feature, global index) (a fixed hash).

The state leaves torch as a `records.SummarySnapshot` (numpy), which `records.py` turns
into the on-disk records and back.
"""

from __future__ import annotations

import numpy as np
import torch

from saetui.index import codec
from saetui.index.batch import ArrayInput
from saetui.index.format import (
    GIDX_BITS,
    GIDX_MASK,
    HIST_BINS_PER_OCTAVE,
    HIST_MIN_OCTAVE,
    N_HIST_BINS,
    N_SAMPLE_BINS,
)
from saetui.index.records import SUM_UNIT_LOG2, SUMSQ_UNIT_LOG2, SummarySnapshot

_HASH_MASK = (1 << 62) - 1
_M31 = (1 << 31) - 1
_M35 = (1 << 35) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLD = _signed(0x9E3779B97F4A7C15)
_C1 = _signed(0xFF51AFD7ED558CCD)
_C2 = _signed(0xC4CEB9FE1A85EC53)


def token_hash(global_index: torch.Tensor) -> torch.Tensor:
    """First stage of the sample hash, once per token: murmur3's finaliser, wrapping int64."""
    x = global_index * _GOLD
    x = x ^ ((x >> 33) & _M31)
    x = x * _C1
    return x ^ ((x >> 33) & _M31)


def mix_feature(token_part: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Second stage, once per activation: fold in the feature id; a 62-bit result."""
    x = token_part ^ (feature * _GOLD)
    x = x * _C2
    x = x ^ ((x >> 29) & _M35)
    return x & _HASH_MASK


def sample_hash(feature: torch.Tensor, global_index: torch.Tensor) -> torch.Tensor:
    """Deterministic 62-bit hash of (feature, global index) that picks interval samples."""
    return mix_feature(token_hash(global_index), feature)


def fp16_bits(values: torch.Tensor) -> torch.Tensor:
    """fp16 bit patterns (int64) of activations rounded as the forward index stores them."""
    v = values.float()
    v16 = v.clamp(max=codec.FP16_MAX).half()
    tiny = (v16 == 0) & (v > 0)
    v16 = torch.where(tiny, torch.full_like(v16, codec.FP16_TINY), v16)
    return v16.view(torch.int16).long() & 0xFFFF


def _octave(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 10) - 15 - HIST_MIN_OCTAVE).clamp(0, N_SAMPLE_BINS - 1)


def _hist_bin(bits: torch.Tensor) -> torch.Tensor:
    raw = ((bits >> 10) - 15 - HIST_MIN_OCTAVE) * HIST_BINS_PER_OCTAVE + ((bits >> 8) & 3)
    return raw.clamp(0, N_HIST_BINS - 1)


_TOPK_PAYLOAD = [torch.int32]  # token id
_SAMPLE_PAYLOAD = [torch.int64, torch.int32, torch.int32]  # global index, fp16 bits, token


class _TopTable:
    """Per group (row), the K largest int64 keys with payloads; rows sorted descending.

    Candidates above a row's current K-th key are buffered and merged in bulk (merging is
    order-independent, so when it happens does not change the result); after warm-up few
    candidates pass the threshold and merges become rare.
    """

    def __init__(
        self, n_groups: int, k: int, payload_dtypes: list[torch.dtype], device: torch.device
    ) -> None:
        self.key = torch.full((n_groups, k), -1, dtype=torch.int64, device=device)
        self.payload = [
            torch.full((n_groups, k), -1, dtype=dt, device=device) for dt in payload_dtypes
        ]
        self.thr = self.key[:, -1].contiguous()  # smallest kept key per row: the entry bar
        self._pending: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
        self._n_pending = 0
        self.flush_at = max(1 << 21, n_groups * k // 4)

    def add(self, group: torch.Tensor, key: torch.Tensor, payload: list[torch.Tensor]) -> None:
        # index_select + nonzero: much faster on CPU than boolean-mask indexing
        sel = (key > self.thr.index_select(0, group)).nonzero().squeeze(1)
        n = len(sel)
        if n == 0:
            return
        picked = [
            p.index_select(0, sel).to(s.dtype) for p, s in zip(payload, self.payload, strict=True)
        ]
        self._pending.append((group.index_select(0, sel), key.index_select(0, sel), picked))
        self._n_pending += n
        if self._n_pending >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        group = torch.cat([p[0] for p in self._pending])
        key = torch.cat([p[1] for p in self._pending])
        payload = [torch.cat([p[2][i] for p in self._pending]) for i in range(len(self.payload))]
        self._pending, self._n_pending = [], 0
        k = self.key.shape[1]
        dev = self.key.device
        # order candidates by (group ascending, key descending), keep the first k per group
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(group.index_select(0, order), stable=True)]
        group = group.index_select(0, order)
        ug, cnt = torch.unique_consecutive(group, return_counts=True)
        n_groups = len(ug)
        row = torch.repeat_interleave(torch.arange(n_groups, device=dev), cnt)
        rank = torch.arange(len(group), device=dev) - torch.repeat_interleave(
            torch.cumsum(cnt, 0) - cnt, cnt
        )
        keep = (rank < k).nonzero().squeeze(1)
        order = order.index_select(0, keep)
        row, rank = row.index_select(0, keep), rank.index_select(0, keep)
        key = key.index_select(0, order)
        payload = [p.index_select(0, order) for p in payload]
        # merge rows in slices so the [rows, 2k] temporaries stay small (~16 MB each)
        step = max(1, (1 << 20) // k)
        bounds = torch.searchsorted(
            row, torch.arange(0, n_groups + step, step, device=dev).clamp(max=n_groups)
        ).tolist()
        for i, a in enumerate(range(0, n_groups, step)):
            b = min(a + step, n_groups)
            ca, cb = bounds[i], bounds[i + 1]
            rows = ug[a:b]
            r, rk = row[ca:cb] - a, rank[ca:cb]
            cand_key = torch.full((b - a, k), -1, dtype=torch.int64, device=dev)
            cand_key[r, rk] = key[ca:cb]
            merged = torch.cat([self.key[rows], cand_key], dim=1)
            # keys are unique within a row (except the -1 of empty slots): deterministic
            top, idx = torch.sort(merged, dim=1, descending=True, stable=True)
            self.key[rows] = top[:, :k]
            idx = idx[:, :k]
            for state, p in zip(self.payload, payload, strict=True):
                cand = torch.full((b - a, k), -1, dtype=state.dtype, device=dev)
                cand[r, rk] = p[ca:cb]
                state[rows] = torch.gather(torch.cat([state[rows], cand], dim=1), 1, idx)
        self.thr = self.key[:, -1].contiguous()


class FeatureSummaries:
    """Running per-feature statistics, top-K examples and interval samples.

    Memory is fixed: about d_sae * (K * 12 + 24 * S * 24 + 24 * 8 * 4) bytes.
    """

    def __init__(
        self,
        d_sae: int,
        ctx_len: int,
        top_k: int = 64,
        samples_per_bin: int = 3,
        device: str | torch.device = "cpu",
    ) -> None:
        self.d_sae, self.ctx_len = d_sae, ctx_len
        self.top_k, self.samples_per_bin = top_k, samples_per_bin
        self.device = torch.device(device)
        dev = self.device
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.sum_fx = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.sumsq_fx = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.max_bits = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.hist = torch.zeros(d_sae * N_HIST_BINS, dtype=torch.int64, device=dev)
        # top-K payload: token id; samples payload: global index, fp16 bits, token id
        self.topk = _TopTable(d_sae, top_k, _TOPK_PAYLOAD, dev)
        self.samples = _TopTable(d_sae * N_SAMPLE_BINS, samples_per_bin, _SAMPLE_PAYLOAD, dev)
        self.n_counted = 0  # unmasked tokens seen (the density denominator)
        self.n_tokens = 0
        self.next_window = 0  # summaries cover windows [0, next_window)

    def update_windows(
        self,
        first_window: int,
        lengths: ArrayInput,
        token_ids: ArrayInput,
        feature_ids: ArrayInput,
        values: ArrayInput,
        mask: ArrayInput | None = None,
        _checked: bool = False,
        window_ids: ArrayInput | None = None,
    ) -> None:
        """Merge consecutive windows starting at `first_window` (must equal next_window).

        lengths [n_windows]; token_ids [n_tokens] (windows concatenated); feature_ids and
        values [n_tokens, K] (value 0 = inactive slot); mask bool [n_tokens] or None.
        window_ids [n_windows]: the global window ids that name tokens in top-K and samples
        (default first_window, first_window + 1, ...: a shard of its own).
        Tensors may live on any device; they are moved to this accumulator's device.
        """
        if first_window != self.next_window:
            raise ValueError(
                f"summaries cover windows up to {self.next_window}, got window {first_window}"
            )
        dev = self.device
        lengths_t = torch.as_tensor(np.asarray(lengths), dtype=torch.int64, device=dev)
        n_tokens = int(lengths_t.sum())
        ids = torch.as_tensor(feature_ids, device=dev)
        vals = torch.as_tensor(values, device=dev)
        toks = torch.as_tensor(token_ids, device=dev).long()
        if window_ids is None:
            named = torch.arange(first_window, first_window + len(lengths_t), device=dev)
        else:
            named = torch.as_tensor(window_ids, dtype=torch.int64, device=dev)
            if named.shape != lengths_t.shape:
                raise ValueError("window_ids needs one id per window")
        wid = torch.repeat_interleave(named, lengths_t)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        pos = torch.arange(n_tokens, device=dev) - torch.repeat_interleave(starts, lengths_t)
        gidx = wid * self.ctx_len + pos
        k = ids.shape[1]
        if mask is not None:
            m = torch.as_tensor(mask, device=dev).bool()
            n_counted = int(m.sum())
            # masked tokens drop whole rows: select counted rows first (row copies are cheap)
            if n_counted < n_tokens:
                rows = m.nonzero().squeeze(1)
                ids, vals = ids.index_select(0, rows), vals.index_select(0, rows)
                gidx, toks = gidx.index_select(0, rows), toks.index_select(0, rows)
        else:
            n_counted = n_tokens
        bits = fp16_bits(vals).reshape(-1)
        hash_tok = token_hash(gidx)
        if bool((bits != 0).all()):
            # every slot active (the usual TopK case): per-token values broadcast to slots
            f = ids.reshape(-1).long()
            b = bits
            g = gidx[:, None].expand(-1, k).reshape(-1)
            tok = toks[:, None].expand(-1, k).reshape(-1)
            hash_token = hash_tok[:, None].expand(-1, k).reshape(-1)
        else:
            # flat index + index_select: boolean / 2-D advanced indexing is slow on CPU
            idx = (bits != 0).nonzero().squeeze(1)
            row = torch.div(idx, k, rounding_mode="floor")
            f = ids.reshape(-1).index_select(0, idx).long()
            b = bits.index_select(0, idx)
            g = gidx.index_select(0, row)
            tok = toks.index_select(0, row)
            hash_token = hash_tok.index_select(0, row)
        self._merge(f, b, g, tok, hash_token, n_tokens, checked=_checked)
        self.n_counted += n_counted
        self.n_tokens += n_tokens
        self.next_window = first_window + len(lengths_t)

    def _merge(
        self,
        f: torch.Tensor,
        b: torch.Tensor,
        g: torch.Tensor,
        tok: torch.Tensor,
        hash_token: torch.Tensor,
        n_tokens: int,
        checked: bool = False,
    ) -> None:
        if len(f) == 0:
            return
        # checked: the writer validated the ids of active slots already
        if not checked and (int(f.min()) < 0 or int(f.max()) >= self.d_sae):
            raise ValueError(f"feature ids must lie in [0, {self.d_sae})")
        d = self.d_sae
        self.count += torch.bincount(f, minlength=d)
        v = (b.to(torch.int16)).view(torch.float16).double()
        # integers held exactly in float64: fp16 values are multiples of 2**-24
        fx = v * float(1 << SUM_UNIT_LOG2)
        fx2 = torch.round(v * v * float(1 << SUMSQ_UNIT_LOG2))
        # one float64 bincount is exact while every per-feature batch sum stays below 2**52
        vmax = float(v.max())
        if (vmax * vmax * 2.0**SUMSQ_UNIT_LOG2 + vmax * 2.0**SUM_UNIT_LOG2) * n_tokens < 2.0**52:
            self.sum_fx += torch.bincount(f, weights=fx, minlength=d).long()
            self.sumsq_fx += torch.bincount(f, weights=fx2, minlength=d).long()
        else:
            self._add_exact(self.sum_fx, f, fx.long())
            self._add_exact(self.sumsq_fx, f, fx2.long())
        self.max_bits.scatter_reduce_(0, f, b, reduce="amax")
        # scatter_add_ beats index_add_ on the CPU for this random-access update
        self.hist.scatter_add_(0, f * N_HIST_BINS + _hist_bin(b), torch.ones_like(f))
        self.topk.add(f, (b << GIDX_BITS) | (GIDX_MASK - g), [tok])
        self.samples.add(
            f * N_SAMPLE_BINS + _octave(b), _HASH_MASK - mix_feature(hash_token, f), [g, b, tok]
        )

    def _add_exact(self, total: torch.Tensor, f: torch.Tensor, fx: torch.Tensor) -> None:
        """total[f] += fx exactly: float64 bincount of 20-bit halves stays below 2**53."""
        lo = (fx & ((1 << 20) - 1)).double()
        hi = (fx >> 20).double()
        d = self.d_sae
        total += torch.bincount(f, weights=lo, minlength=d).long()
        total += torch.bincount(f, weights=hi, minlength=d).long() << 20

    # --- snapshots -------------------------------------------------------------------

    def snapshot(self, copy: bool = True) -> SummarySnapshot:
        """The state as CPU numpy (for a checkpoint written by the writer thread).

        copy=False shares the tables on the CPU: only for a final checkpoint, after which
        nothing updates the summaries.
        """

        self.topk.flush()
        self.samples.flush()

        def n(t: torch.Tensor) -> np.ndarray:
            a = t.detach().to("cpu").numpy()
            return a.copy() if copy and t.device.type == "cpu" else a

        return SummarySnapshot(
            d_sae=self.d_sae,
            top_k=self.top_k,
            samples_per_bin=self.samples_per_bin,
            n_counted=self.n_counted,
            n_tokens=self.n_tokens,
            next_window=self.next_window,
            count=n(self.count),
            sum_fx=n(self.sum_fx),
            sumsq_fx=n(self.sumsq_fx),
            max_bits=n(self.max_bits),
            hist=n(self.hist).reshape(self.d_sae, N_HIST_BINS),
            topk_key=n(self.topk.key),
            topk_tok=n(self.topk.payload[0]),
            samp_gidx=n(self.samples.payload[0]).reshape(self.d_sae, -1),
            samp_bits=n(self.samples.payload[1]).reshape(self.d_sae, -1),
            samp_tok=n(self.samples.payload[2]).reshape(self.d_sae, -1),
        )

    def load_snapshot(self, snap: SummarySnapshot) -> None:
        """Restore a snapshot (shapes must match this accumulator's)."""
        dev = self.device

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64, device=dev)

        self.count, self.sum_fx, self.sumsq_fx = t(snap.count), t(snap.sum_fx), t(snap.sumsq_fx)
        self.max_bits = t(snap.max_bits)
        self.hist = t(snap.hist).reshape(-1)
        self.topk = _TopTable(self.d_sae, self.top_k, _TOPK_PAYLOAD, dev)
        self.topk.key, self.topk.payload = t(snap.topk_key), [t(snap.topk_tok).int()]
        shape = (self.d_sae * N_SAMPLE_BINS, self.samples_per_bin)
        self.samples = _TopTable(shape[0], shape[1], _SAMPLE_PAYLOAD, dev)
        gidx = t(snap.samp_gidx).reshape(shape)
        self.samples.payload = [
            gidx,
            t(snap.samp_bits).reshape(shape).int(),
            t(snap.samp_tok).reshape(shape).int(),
        ]
        feat = torch.arange(self.d_sae, device=dev).repeat_interleave(N_SAMPLE_BINS)[:, None]
        h = sample_hash(feat.expand(shape), gidx.clamp(min=0))
        self.samples.key = torch.where(gidx >= 0, _HASH_MASK - h, torch.full_like(h, -1))
        self.topk.thr = self.topk.key[:, -1].contiguous()
        self.samples.thr = self.samples.key[:, -1].contiguous()
        self.n_counted, self.n_tokens = snap.n_counted, snap.n_tokens
        self.next_window = snap.next_window

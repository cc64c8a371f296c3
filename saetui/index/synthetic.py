"""Synthetic SAE activations for tests and the benchmark (no model needed).

Window w's data depends only on (seed, w), so any batching, or a resume after a crash,
feeds the writer exactly the same input. Feature frequencies are Zipf-distributed and
activation values log-normal, like real SAE features.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SyntheticCorpus:
    d_sae: int = 512
    ctx_len: int = 32
    k: int = 8
    vocab_size: int = 300
    seed: int = 0
    zipf: float = 1.1
    doc_len: int = 45  # documents have doc_len/2 .. 3*doc_len/2 tokens, BOS first
    inactive: float = 0.25  # share of inactive (0-valued) slots, as ReLU SAEs pad

    def __post_init__(self) -> None:
        p = 1.0 / np.arange(1, self.d_sae + 1) ** self.zipf
        # shuffle which ids are frequent so density is not monotone in the id
        perm = np.random.default_rng(self.seed + 7).permutation(self.d_sae)
        self._cdf = np.cumsum(p / p.sum())
        self._perm = perm

    def vocab(self) -> list[str]:
        words = ["the", "photo", "Photograph", " cat", " dog", "ing", " run", "\n", "<bos>"]
        return [words[i] if i < len(words) else f"t{i}" for i in range(self.vocab_size)]

    def _doc_bounds(self, upto: int) -> np.ndarray:
        """Start offsets (in the token stream) of documents, covering [0, upto)."""
        rng = np.random.default_rng([self.seed, 1])
        starts = [0]
        while starts[-1] < upto:
            starts.append(starts[-1] + int(rng.integers(self.doc_len // 2, 3 * self.doc_len // 2)))
        return np.array(starts, dtype=np.int64)

    def window_lengths(self, n_windows: int) -> np.ndarray:
        return np.full(n_windows, self.ctx_len, dtype=np.int64)

    def windows(self, first: int, n: int, n_total: int | None = None) -> dict[str, Any]:
        """Arguments for IndexWriter.add_windows for windows [first, first + n)."""
        ctx, k = self.ctx_len, self.k
        bounds = self._doc_bounds((first + n) * ctx + 1)
        tokens, segments, ids_all, vals_all, masks = [], [], [], [], []
        for w in range(first, first + n):
            length = ctx
            if n_total is not None and w == n_total - 1:
                length = max(1, ctx // 2 + (w % 5))  # the last window may be short
            rng = np.random.default_rng([self.seed, 2, w])
            a, b = w * ctx, w * ctx + length
            toks = rng.integers(9, self.vocab_size, length).astype(np.uint32)
            mask = np.ones(length, dtype=bool)
            segs = []
            i0 = int(np.searchsorted(bounds, a, side="right")) - 1
            i = i0
            while bounds[i] < b:
                s, e = max(int(bounds[i]), a), min(int(bounds[i + 1]), b)
                segs.append((i, s - int(bounds[i]), s - a, e - s))
                if bounds[i] >= a:
                    toks[bounds[i] - a] = 8  # BOS
                    mask[bounds[i] - a] = False
                i += 1
            u = rng.random((length, k))
            raw = np.searchsorted(self._cdf, u).astype(np.int64)
            raw.sort(axis=1)
            raw = (np.maximum.accumulate(raw - np.arange(k), axis=1) + np.arange(k)) % self.d_sae
            ids = self._perm[raw]
            vals = rng.lognormal(0.0, 1.0, (length, k)).astype(np.float32)
            vals[rng.random((length, k)) < self.inactive] = 0.0
            # coarse values make equal activations common: exercises the tie-break
            vals[:, :2] = np.round(vals[:, :2] * 4) / 4
            tokens.append(toks)
            segments.append(segs)
            ids_all.append(ids)
            vals_all.append(vals)
            masks.append(mask)
        return {
            "window_ids": np.arange(first, first + n),
            "tokens": tokens,
            "segments": segments,
            "feature_ids": np.concatenate(ids_all),
            "values": np.concatenate(vals_all),
            "mask": np.concatenate(masks),
        }


def write_synthetic(
    path: str | Path,
    corpus: SyntheticCorpus,
    n_windows: int,
    batch_windows: int = 7,
    **writer_kwargs: Any,
) -> None:
    """Write (or resume writing) a synthetic index of n_windows windows and finish it."""
    from saetui.index.writer import IndexWriter

    with IndexWriter.create_or_resume(
        path,
        {"model": "synthetic", "seed": corpus.seed},
        corpus.d_sae,
        corpus.ctx_len,
        corpus.vocab(),
        **writer_kwargs,
    ) as writer:
        w = writer.next_window
        while w < n_windows:
            n = min(batch_windows, n_windows - w)
            writer.add_windows(**corpus.windows(w, n, n_total=n_windows))
            w += n
        writer.finish()


if __name__ == "__main__":  # used by the crash tests: python -m saetui.index.synthetic PATH N
    import json

    args = json.loads(sys.argv[1])
    write_synthetic(
        args["path"],
        SyntheticCorpus(**args.get("corpus", {})),
        args["n_windows"],
        args.get("batch_windows", 7),
        **args.get("writer", {}),
    )

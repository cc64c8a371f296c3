"""Compare two indexes through the reader API: what a user sees must be the same, whatever
shards hold it (a distributed index against a single-process one)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from saetui.index import IndexReader


def _examples(examples: list[Any]) -> list[tuple]:
    return [
        (
            e.value,
            e.window,
            e.position,
            e.global_index,
            e.doc_id,
            e.doc_offset,
            tuple(e.token_ids.tolist()),
            tuple(np.round(e.activations, 6).tolist()),
        )
        for e in examples
    ]


def assert_same_index(a_path: Path, b_path: Path, *, metrics: bool = True) -> None:
    """Every window, token, per-feature summary, example, sample and neighbour list of the
    index at ``a_path`` equals the one at ``b_path``; metrics equal to 1e-9 (float64 sums
    reduced in another order)."""
    # a tiny block cache: every read goes to the shard that holds the window
    with IndexReader(a_path, block_cache=2) as a, IndexReader(b_path, block_cache=2) as b:
        pa, pb = a.progress(), b.progress()
        for field in ("windows", "tokens", "counted_tokens", "nonzeros", "finished"):
            assert getattr(pa, field) == getattr(pb, field), field
        d = a.meta.d_sae
        assert d == b.meta.d_sae and a.meta.ctx_len == b.meta.ctx_len
        fa = a.features(sort="id", descending=False, page_size=d)
        fb = b.features(sort="id", descending=False, page_size=d)
        for column in ("feature", "count", "density", "mean", "std", "max"):
            np.testing.assert_array_equal(getattr(fa, column), getattr(fb, column), column)
        for window in range(pa.windows):
            wa, wb = a.window(window), b.window(window)
            assert wa.tokens == wb.tokens and wa.segments == wb.segments
            np.testing.assert_array_equal(wa.mask, wb.mask)
            for position in range(len(wa.tokens)):
                ta, tb = a.token(window, position), b.token(window, position)
                np.testing.assert_array_equal(ta.feature_ids, tb.feature_ids)
                np.testing.assert_array_equal(ta.values, tb.values)
        for feature in range(d):
            np.testing.assert_array_equal(a.stats(feature).histogram, b.stats(feature).histogram)
            assert _examples(a.top_examples(feature, a.meta.top_k)) == _examples(
                b.top_examples(feature, b.meta.top_k)
            ), f"top examples of feature {feature}"
            sa = [(s.low, _examples(s.examples)) for s in a.interval_samples(feature)]
            sb = [(s.low, _examples(s.examples)) for s in b.interval_samples(feature)]
            assert sa == sb, f"interval samples of feature {feature}"
            assert a.top_tokens(feature) == b.top_tokens(feature)
            na, nb = a.neighbours(feature), b.neighbours(feature)
            assert sorted(na) == sorted(nb)
            for metric in na:
                np.testing.assert_array_equal(na[metric].ids, nb[metric].ids, metric)
                np.testing.assert_allclose(na[metric].scores, nb[metric].scores, rtol=1e-6)
        ctx = a.meta.ctx_len
        for gidx in range(0, pa.windows * ctx, max(1, pa.windows * ctx // 23)):
            try:
                ca = a.document_context(gidx, radius=40)
            except Exception as error:  # past a short window's end: both must refuse
                try:
                    b.document_context(gidx, radius=40)
                except type(error):
                    continue
                raise
            cb = b.document_context(gidx, radius=40)
            assert (ca.doc_id, ca.doc_offset, ca.focus, ca.tokens) == (
                cb.doc_id,
                cb.doc_offset,
                cb.focus,
                cb.tokens,
            )
        if metrics:
            assert_metrics_close(a.metrics(), b.metrics())


# CE loss and KL come from forward passes over the sampled windows, batched by whichever
# process holds them: float32 logits of a window differ in their last bits with the batch's
# padding, so those figures agree to about 1e-7, everything else to rounding.
FORWARD_PASS_KEYS = ("ce_", "kl")


def assert_metrics_close(ma: dict, mb: dict, path: str = "") -> None:
    """Two metrics dicts hold the same keys and values (floats to tolerance)."""
    assert sorted(ma) == sorted(mb), path
    for key, value in ma.items():
        where = f"{path}{key}"
        other = mb[key]
        if isinstance(value, dict):
            assert_metrics_close(value, other, f"{where}.")
        elif isinstance(value, float) and not math.isnan(value):
            loose = any(part in key for part in FORWARD_PASS_KEYS)
            rel = 1e-6 if loose else 1e-9
            assert math.isclose(value, other, rel_tol=rel, abs_tol=1e-12), (where, value, other)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert np.allclose(value, other, rtol=1e-9, atol=1e-12), where
        else:
            assert value == other or value != value, (where, value, other)

"""``saetui compare A B``: load both sides (index or SAE directory), run the comparison,
summarise it in a few lines and export it as JSON (schema in docs/COMPARE.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saetui.analysis.compare import (
    HUNGARIAN_MAX,
    DecoderMatch,
    find_splits,
    match_activations,
    match_decoders,
)
from saetui.errors import SaetuiInputError

SCHEMA = "saetui-compare/1"
MATCH_THRESHOLDS = (0.5, 0.7, 0.9)
SPLIT_CANDIDATES = 16  # decoder neighbours a parent's children are looked for among


@dataclass
class Side:
    """One side of a comparison: its decoder and, for an index, the index's path."""

    path: Path
    kind: str  # "index" or "sae"
    w_dec: torch.Tensor  # [d_sae, d_in]
    index: Path | None = None

    def describe(self) -> dict[str, Any]:
        d_sae, d_in = self.w_dec.shape
        return {"path": str(self.path), "kind": self.kind, "d_sae": int(d_sae), "d_in": int(d_in)}


def load_side(path: Path) -> Side:
    """An index directory (its SAE from the run config) or an SAE directory."""
    from saetui.index.format import MARKER_FILE
    from saetui.sae import load_sae

    if not path.exists():
        raise SaetuiInputError(
            f"{path} does not exist: pass a saetui index directory or an SAE directory."
        )
    if (path / MARKER_FILE).is_file():
        from saetui.index import open_index

        with open_index(path) as index:
            sae_path = index.meta.run_config.get("sae_path")
        if not sae_path or not Path(sae_path).exists():
            raise SaetuiInputError(
                f"the index {path} does not name an SAE directory that exists here "
                f"({sae_path or 'none recorded'}): pass the SAE directory as well to compare "
                "decoders."
            )
        return Side(path, "index", load_sae(sae_path).W_dec.detach().float(), index=path)
    return Side(path, "sae", load_sae(path).W_dec.detach().float())


def compare(
    a: Side,
    b: Side,
    *,
    top_n: int = 5,
    hungarian_max: int = HUNGARIAN_MAX,
    unmatched_below: float = 0.5,
    split_cosine: float = 0.5,
    child_precision: float = 0.5,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (docs/COMPARE.md); activation matching and
    splits only when both sides are indexes. ``progress`` hears each phase's name as it
    starts; ``check_stop`` is called between chunks and may raise to abandon the work."""
    from saetui.index import open_index

    say = progress or (lambda phase: None)

    if a.w_dec.shape[1] != b.w_dec.shape[1]:
        raise SaetuiInputError(
            f"{a.path} has d_in {a.w_dec.shape[1]} and {b.path} has d_in {b.w_dec.shape[1]}: "
            "compare SAEs trained on activations of the same width."
        )
    # splits and the greedy fallback look at SPLIT_CANDIDATES neighbours; the export keeps top_n
    say("decoder matching")
    decoder = match_decoders(
        a.w_dec,
        b.w_dec,
        top_n=max(top_n, SPLIT_CANDIDATES),
        hungarian_max=hungarian_max,
        device=device,
        check_stop=check_stop,
    )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "a": a.describe(),
        "b": b.describe(),
        "decoder": _decoder_section(decoder, unmatched_below, top_n),
        "activation": None,
        "splits": None,
    }
    if a.index is None or b.index is None:
        return report
    with open_index(a.index) as index_a, open_index(b.index) as index_b:
        say("activation matching")
        activations = match_activations(index_a, index_b, check_stop=check_stop)
        say("splits")
        side, splits = find_splits(
            decoder,
            activations,
            index_a,
            index_b,
            split_cosine=split_cosine,
            child_precision=child_precision,
            check_stop=check_stop,
        )
    best = activations.best_partners()
    jaccard = activations.jaccard().tocsr()
    pairs = decoder.pairs
    pair_jaccard = (
        np.asarray(jaccard[pairs[:, 0], pairs[:, 1]]).ravel() if len(pairs) else np.zeros(0)
    )
    for row, value in zip(report["decoder"]["pairs"], pair_jaccard, strict=True):
        row["jaccard"] = round(float(value), 6)
    report["activation"] = {
        "tokens": activations.tokens,
        "pruned": activations.pruned,
        **{
            f"best_{s}": [
                {
                    s: i,
                    "partner": int(partner[i]),
                    "jaccard": round(float(score[i]), 6),
                    "cofire": int(co[i]),
                    "count": int(counts[i]),
                }
                for i in range(len(partner))
            ]
            for s, (partner, score, co), counts in (
                ("a", best["a"], activations.count_a),
                ("b", best["b"], activations.count_b),
            )
        },
    }
    report["splits"] = {
        "parent_side": side,
        "split_cosine": split_cosine,
        "child_precision": child_precision,
        "trees": [
            {
                "parent": s.parent,
                "count": s.parent_count,
                "parent_covered": round(s.parent_covered, 6),
                "children_covered": round(s.children_covered, 6),
                "parent_only": [list(t) for t in s.parent_only],
                "children_only": [list(t) for t in s.children_only],
                "children": [
                    {**c, "cosine": round(float(c["cosine"]), 6)}
                    for c in sorted(s.children, key=lambda c: -c["cofire"])
                ],
            }
            for s in splits
        ],
    }
    return report


def _decoder_section(decoder: DecoderMatch, unmatched_below: float, top_n: int) -> dict[str, Any]:
    unmatched_a, unmatched_b = decoder.unmatched(unmatched_below)
    return {
        "method": decoder.method,
        "seconds": round(decoder.seconds, 3),
        "mean_max_cosine_a_to_b": round(decoder.mean_max_cos_ab, 6),
        "mean_max_cosine_b_to_a": round(decoder.mean_max_cos_ba, 6),
        "histogram": decoder.histogram(),
        "pairs": [
            {"a": int(i), "b": int(j), "cosine": round(float(c), 6)}
            for (i, j), c in zip(decoder.pairs.tolist(), decoder.pair_cos, strict=True)
        ],
        "neighbours_a_to_b": _neighbours(decoder.ids_ab[:, :top_n], decoder.cos_ab[:, :top_n]),
        "neighbours_b_to_a": _neighbours(decoder.ids_ba[:, :top_n], decoder.cos_ba[:, :top_n]),
        "unmatched_below": unmatched_below,
        "unmatched_a": unmatched_a.tolist(),
        "unmatched_b": unmatched_b.tolist(),
    }


def _neighbours(ids: np.ndarray, cos: np.ndarray) -> list[dict[str, list[Any]]]:
    return [
        {"ids": row.tolist(), "cosines": np.round(c.astype(np.float64), 6).tolist()}
        for row, c in zip(ids, cos, strict=True)
    ]


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    a, b, dec = report["a"], report["b"], report["decoder"]
    cos = np.asarray([p["cosine"] for p in dec["pairs"]], dtype=np.float64)
    above = ", ".join(f"{int((cos >= t).sum())} >= {t}" for t in MATCH_THRESHOLDS)
    lines = [
        f"A: {a['path']} ({a['kind']}, d_sae {a['d_sae']}, d_in {a['d_in']})",
        f"B: {b['path']} ({b['kind']}, d_sae {b['d_sae']}, d_in {b['d_in']})",
        (
            f"decoder: mean max cosine A->B {dec['mean_max_cosine_a_to_b']:.3f}, "
            f"B->A {dec['mean_max_cosine_b_to_a']:.3f} ({dec['seconds']:.1f} s)"
        ),
        f"matched pairs ({dec['method']}, {len(cos)}): {above}",
        (
            f"unmatched (best cosine < {dec['unmatched_below']}): A {len(dec['unmatched_a'])}, "
            f"B {len(dec['unmatched_b'])}"
        ),
    ]
    act = report["activation"]
    if act is None:
        lines.append("activations: not compared (both sides must be indexes of the same windows)")
    else:
        jac = np.asarray([p.get("jaccard", 0.0) for p in dec["pairs"]], dtype=np.float64)
        lines.append(
            f"activations: {act['tokens']} shared tokens; matched pairs with Jaccard >= 0.5: "
            f"{int((jac >= 0.5).sum())}" + (" (pair table pruned)" if act["pruned"] else "")
        )
        splits = report["splits"]
        lines.append(
            f"splits: {len(splits['trees'])} features of {splits['parent_side'].upper()} split "
            f"into 2+ features of {'B' if splits['parent_side'] == 'a' else 'A'}"
        )
    return "\n".join(lines)


def write_json(report: dict[str, Any], out: Path) -> None:
    """Write the report atomically (a temporary sibling renamed into place)."""
    if not out.parent.is_dir():
        raise SaetuiInputError(
            f"--json {out}: the folder {out.parent} does not exist; create it or pick another."
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

"""What the compare screen displays: the report of :func:`saetui.analysis.compare_report.compare`
as rows and trees, with the sort orders of the pair table. Plain data, no Textual."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# sort key -> (column title, descending by default)
PAIR_SORTS: dict[str, tuple[str, bool]] = {
    "cosine": ("decoder cosine", True),
    "jaccard": ("Jaccard", True),
    "density": ("density change", True),
    "a": ("A id", False),
}


@dataclass(frozen=True)
class PairRow:
    """One matched pair: A's feature, B's, and how alike they are."""

    a: int
    b: int
    cosine: float
    jaccard: float | None = None  # of their firing token sets (both sides indexes)
    density_a: float | None = None
    density_b: float | None = None

    @property
    def density_change(self) -> float | None:
        """log10(density of b / density of a); None when either never fired or is unknown."""
        if not self.density_a or not self.density_b:
            return None
        return math.log10(self.density_b / self.density_a)

    def key(self, sort: str) -> float | None:
        return {
            "cosine": self.cosine,
            "jaccard": self.jaccard,
            "density": self.density_change,
            "a": float(self.a),
        }[sort]


@dataclass(frozen=True)
class SplitChild:
    feature: int
    cosine: float
    cofire: int  # tokens where both the parent and this child fire
    count: int  # tokens where this child fires


@dataclass(frozen=True)
class SplitTree:
    """A parent of the smaller SAE and its children in the larger one."""

    parent: int
    count: int
    parent_covered: float
    children_covered: float
    children: list[SplitChild]
    parent_only: list[tuple[int, int]]  # (window, position): parent fires, no child does
    children_only: list[tuple[int, int]]


@dataclass
class Comparison:
    """The comparison of index A with index B, ready to show."""

    path_a: Path
    path_b: Path
    d_a: int
    d_b: int
    method: str
    mean_max_ab: float
    mean_max_ba: float
    pairs: list[PairRow]
    tokens: int | None = None  # shared tokens compared; None: decoders only
    parent_side: str | None = None  # "a" or "b": the smaller SAE, whose features split
    splits: list[SplitTree] = field(default_factory=list)
    unmatched_a: list[int] = field(default_factory=list)
    unmatched_b: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def from_report(cls, report: dict[str, Any], seconds: float = 0.0) -> Comparison:
        dec, act, splits = report["decoder"], report["activation"], report["splits"]
        tokens: int | None = int(act["tokens"]) if act else None
        density: dict[str, list[float]] = {}
        if act:
            total = max(int(act["tokens"]), 1)
            for side in ("a", "b"):
                density[side] = [row["count"] / total for row in act[f"best_{side}"]]
        pairs = [
            PairRow(
                a=p["a"],
                b=p["b"],
                cosine=p["cosine"],
                jaccard=p.get("jaccard"),
                density_a=density["a"][p["a"]] if density else None,
                density_b=density["b"][p["b"]] if density else None,
            )
            for p in dec["pairs"]
        ]
        trees = [
            SplitTree(
                parent=t["parent"],
                count=t["count"],
                parent_covered=t["parent_covered"],
                children_covered=t["children_covered"],
                children=[
                    SplitChild(c["feature"], c["cosine"], c["cofire"], c["count"])
                    for c in t["children"]
                ],
                parent_only=[(w, p) for w, p in t["parent_only"]],
                children_only=[(w, p) for w, p in t["children_only"]],
            )
            for t in (splits["trees"] if splits else [])
        ]
        return cls(
            path_a=Path(report["a"]["path"]),
            path_b=Path(report["b"]["path"]),
            d_a=report["a"]["d_sae"],
            d_b=report["b"]["d_sae"],
            method=dec["method"],
            mean_max_ab=dec["mean_max_cosine_a_to_b"],
            mean_max_ba=dec["mean_max_cosine_b_to_a"],
            pairs=pairs,
            tokens=tokens,
            parent_side=splits["parent_side"] if splits else None,
            splits=sorted(trees, key=lambda t: -t.count),
            unmatched_a=list(dec["unmatched_a"]),
            unmatched_b=list(dec["unmatched_b"]),
            seconds=seconds,
        )

    @property
    def child_side(self) -> str | None:
        return None if self.parent_side is None else ("b" if self.parent_side == "a" else "a")

    def sorted_pairs(self, sort: str, descending: bool) -> list[PairRow]:
        """The pairs in ``sort`` order; pairs without that score (never fired, decoders
        only) come last either way."""
        known = [p for p in self.pairs if p.key(sort) is not None]
        unknown = [p for p in self.pairs if p.key(sort) is None]
        known.sort(key=lambda p: (p.key(sort), -p.a if descending else p.a), reverse=descending)
        return known + unknown

    def features_shown(self) -> dict[str, set[int]]:
        """Per side, the features the pair table and the split trees name."""
        shown: dict[str, set[int]] = {"a": set(), "b": set()}
        for pair in self.pairs:
            shown["a"].add(pair.a)
            shown["b"].add(pair.b)
        if self.parent_side is not None and self.child_side is not None:
            for tree in self.splits:
                shown[self.parent_side].add(tree.parent)
                shown[self.child_side].update(c.feature for c in tree.children)
        return shown

    def describe(self) -> str:
        """One line: sizes, mean max cosines, pairs, splits."""
        strong = sum(p.cosine >= 0.7 for p in self.pairs)
        text = (
            f"A d_sae {self.d_a:,} ⇄ B d_sae {self.d_b:,} · mean max cos A→B "
            f"{self.mean_max_ab:.2f} B→A {self.mean_max_ba:.2f} · {len(self.pairs):,} pairs "
            f"({self.method}), {strong:,} with cos ≥ 0.7"
        )
        if self.parent_side is not None:
            text += f" · {len(self.splits):,} splits of {self.parent_side.upper()}"
        else:
            text += " · decoders only"
        return text

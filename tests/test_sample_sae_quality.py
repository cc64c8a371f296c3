"""The README's sample-SAE quality table: its figures are sample_data/sae/quality.json's
(what scripts/train_sample_sae.py measured on held-out paragraphs), and they meet the floors
its "floor" column promises. Re-measure with ``scripts/train_sample_sae.py --evaluate-only``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUALITY = json.loads((REPO / "sample_data" / "sae" / "quality.json").read_text())

# README row label -> (quality.json key, scale from the stored value to the shown one)
ROWS = {
    "fraction of variance unexplained": ("fvu", 1.0),
    "explained variance": ("explained_variance", 1.0),
    "cosine(x, x̂)": ("cosine", 1.0),
    "dead features (never fired on held-out)": ("dead_fraction", 100.0),  # shown in %
    "CE loss recovered": ("ce_loss_recovered", 1.0),
    "KL(clean ‖ SAE) per token": ("kl_clean_sae", 1.0),
    "L0": ("l0_mean", 1.0),
}


def quality_table() -> dict[str, tuple[str, str]]:
    """``{row label: (value cell, floor cell)}`` of the README's quality table."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    header = re.search(
        r"^\| metric \(held-out, ([\d,]+) tokens\) \| value \| floor \|$", readme, re.M
    )
    assert header, "README.md has no sample-SAE quality table"
    assert int(header.group(1).replace(",", "")) == QUALITY["tokens"]
    rows = {}
    for line in readme[header.end() :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        label, value, floor = (cell.strip() for cell in line.strip("|").split("|"))
        rows[label] = (value, floor)
    return rows


def shown(value_cell: str) -> float:
    """The number a value cell shows (for "0 of 2048 (0.0%)" the percentage)."""
    percent = re.search(r"\(([\d.]+)%\)", value_cell)
    return float(percent.group(1)) if percent else float(value_cell.replace(",", ""))


@pytest.mark.parametrize("label", sorted(ROWS))
def test_readme_figures_are_the_measured_ones(label):
    value_cell, _ = quality_table()[label]
    key, scale = ROWS[label]
    digits = len(value_cell.split(".")[1].split()[0].rstrip("%)")) if "." in value_cell else 0
    assert shown(value_cell) == round(QUALITY[key] * scale, digits), label


def test_every_floor_holds():
    floors = {label: floor for label, (_, floor) in quality_table().items() if floor}
    assert set(floors) == {
        "fraction of variance unexplained",
        "dead features (never fired on held-out)",
        "CE loss recovered",
    }
    for label, floor in floors.items():
        key, scale = ROWS[label]
        found = re.fullmatch(r"([≤≥]) ([\d.]+)(%?)", floor)
        assert found, floor
        value = QUALITY[key] * scale
        bound = float(found.group(2))
        assert (value <= bound) if found.group(1) == "≤" else (value >= bound), (label, value)


def test_ce_row_is_the_measured_losses():
    value_cell, _ = quality_table()["CE clean / with SAE / zero-ablated"]
    clean, with_sae, zero = (float(v) for v in value_cell.split(" / "))
    assert clean == round(QUALITY["ce_clean"], 3)
    assert with_sae == round(QUALITY["ce_with_sae"], 3)
    assert zero == round(QUALITY["ce_zero_ablation"], 3)

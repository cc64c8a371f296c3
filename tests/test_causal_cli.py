"""saetui ablate / saetui steer and the Python API over a real index (tiny GPT-2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import saetui
from saetui.analysis.causal import parse_steering


def _saetui(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saetui", *args], capture_output=True, text=True, timeout=300
    )


def test_steering_specs_parse_and_refuse_in_a_sentence():
    features, options = parse_steering("#12 x8, #3 x-2.5 mode=frozen tokens=30 clamp seed=4")
    assert features == {12: 8.0, 3: -2.5}
    assert options == {"mode": "frozen", "n_tokens": 30, "clamp": True, "seed": 4}
    assert parse_steering("7:1.5")[0] == {7: 1.5}
    for bad in ("", "mode=all", "#3 xbig", "#3 color=red", "hello"):
        with pytest.raises(saetui.SaetuiInputError):
            parse_steering(bad)


def test_ablate_and_steer_commands_print_json(tiny_index):
    index = str(tiny_index[2])
    with saetui.open_index(index) as reader:
        feature = int(reader.features(sort="density", page_size=1).feature[0])
    done = _saetui("ablate", index, "--feature", str(feature), "--contexts", "3")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["contexts"]
    assert len(rows) == 3 and all("delta_loss" in row and "promoted" in row for row in rows)
    # the same numbers from the Python API
    direct = saetui.ablate(index, feature, contexts=3)
    for a, b in zip(rows, direct, strict=True):
        assert (a["delta_loss"] is None) == (b["delta_loss"] is None)
        assert a["delta_loss"] is None or a["delta_loss"] == pytest.approx(
            b["delta_loss"], abs=1e-5
        )
    zero = _saetui("steer", index, "--prompt", "w1 w2 w3", "--feature", f"{feature}:0")
    assert zero.returncode == 0, zero.stderr
    record = json.loads(zero.stdout)
    assert record["steered_ids"] == record["unsteered_ids"] and record["steered_text"]
    bad = _saetui("ablate", index, "--feature", "99999")
    assert bad.returncode == 2 and "out of range" in bad.stderr

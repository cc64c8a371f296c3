"""The package as users install it: a wheel with the sample inside, run outside the clone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_the_wheel_carries_the_sample_and_runs_the_demo(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("saetui-*.whl")
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    away = tmp_path / "elsewhere"  # not the clone: nothing may come from the checkout
    away.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, cwd=away, env=env,
            timeout=400,
        )  # fmt: skip

    where = run("-c", "import saetui; print(saetui.__file__)")
    assert where.stdout.strip().startswith(str(target)), where
    info = run("-m", "saetui", "info", "--sae", str(target / "saetui" / "sample_data" / "sae"))
    assert info.returncode == 0, info.stderr[-2000:]
    assert "batchtopk" in info.stdout
    second = target / "saetui" / "sample_data" / "sae_1024"  # demo --compare's second SAE
    assert {p.name for p in second.iterdir()} >= {"config.json", "weights.pt", "quality.json"}
    demo = run(
        "-m", "saetui", "demo", "--headless", "--max-tokens", "500", "--metrics-tokens", "128",
        "--out", str(away / "index"),
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (away / "index" / "saetui-index.json").exists()
    assert "holds" in demo.stdout
    # the demo builds the postings, so its queries answer at once
    query = run("-m", "saetui", "query", str(away / "index"), "f:0 | f:1", "--json")
    assert query.returncode == 0, query.stderr[-2000:]

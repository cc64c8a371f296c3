"""The real ``saetui`` command in a subprocess: help, info, demo and user errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"
SAMPLE_SAE = SAMPLE_DATA / "sae"
SAMPLE_CORPUS = SAMPLE_DATA / "corpus.json"


def saetui(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saetui", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("saetui: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_subcommands():
    result = saetui("--help")
    assert result.returncode == 0
    for command in ("demo", "collect", "open", "export", "labels", "info"):
        assert command in result.stdout


def test_info_describes_the_sample_sae():
    result = saetui("info", "--sae", str(SAMPLE_SAE))
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert rows["format"] == "sae_core"
    assert rows["architecture"] == "batchtopk"
    assert rows["d_in"] == "576"
    assert rows["d_sae"] == "2048"
    assert rows["k"] == "32"
    assert rows["hook_name"] == "blocks.9.hook_resid_post"
    assert rows["dtype"] == "float32"
    assert int(rows["history_length"]) > 0


def test_info_json():
    result = saetui("info", "--sae", str(SAMPLE_SAE), "--json")
    facts = json.loads(result.stdout)
    assert facts["d_sae"] == 2048 and facts["hook_layer"] == 9


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["info", "--sae", "no/such/sae"], ["no/such/sae"]),
        (["info", "--sae", str(SAMPLE_CORPUS)], ["corpus.json"]),
        (["demo", "--data", "no/such/corpus.json"], ["no/such/corpus.json"]),
        (["demo", "--ctx-len", "1"], ["--ctx-len"]),
        (["export", "no/such/index", "--out", "x"], ["no/such/index"]),
        (["open", "no/such/index"], ["no/such/index"]),
        (
            ["demo", "--compare", "--sae", str(SAMPLE_DATA / "sae"), "--sae", "other"],
            ["demo --compare", "one --sae"],
        ),
        (["demo", "--compare", "no/such/sae"], ["--compare no/such/sae", "SAE directory"]),
        (["labels", "import", "no/such/labels.jsonl", str(SAMPLE_DATA)], ["not a saetui index"]),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, fragments):
    assert_user_error(saetui(*args), *fragments)


def test_bad_hook_fails_before_any_forward_pass():
    result = saetui("demo", "--hook", "blocks.9.hook_resid_pots", "--max-tokens", "64")
    assert_user_error(result, "blocks.9.hook_resid_pots", "blocks.9.hook_resid_post")


def test_demo_headless_builds_the_sample_index_and_prints_metrics(tmp_path):
    out = tmp_path / "demo-index"
    args = ["demo", "--headless", "--max-tokens", "600", "--metrics-tokens", "300"]
    result = saetui(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "collected" in result.stdout and str(out) in result.stdout
    for label in ("explained variance", "CE loss recovered", "dead features", "L0"):
        assert label in result.stdout, label
    # Running it again resumes the finished index instead of starting over.
    held = re.search(r"holds ([\d,]+) tokens", result.stdout)
    assert held, result.stdout
    again = saetui(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    # nothing collected the second time: no "collected N tokens into ..." line
    assert not re.search(r"^collected [\d,]+ tokens", again.stdout, re.MULTILINE)
    assert re.search(r"^collected [\d,]+ tokens", result.stdout, re.MULTILINE)
    assert f"holds {held.group(1)} tokens (already finished: nothing to do)" in again.stdout


@pytest.mark.slow
def test_demo_compare_headless_collects_both_sample_saes_and_compares(tmp_path):
    out = tmp_path / "demo-index"
    args = ["demo", "--compare", "--headless", "--max-tokens", "600", "--metrics-tokens", "128"]
    result = saetui(*args, "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    second = tmp_path / "demo-index-sae_1024"
    assert (out / "saetui-index.json").exists() and (second / "saetui-index.json").exists()
    assert "d_sae 2048" in result.stdout and "d_sae 1024" in result.stdout
    assert "mean max cosine" in result.stdout and "splits:" in result.stdout
    assert "shared tokens" in result.stdout
    assert f"--compare {second}" in result.stdout
    # both indexes finished: a second run only compares
    again = saetui(*args, "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished: nothing to do") == 2
    assert "mean max cosine" in again.stdout

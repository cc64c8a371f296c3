"""Several SAEs collected in one pass (``saetui collect --sae A --sae B``): each index
equals the one a separate run writes, at the same or different hooks, across a stop and
resume; bad requests are one sentence and exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_collect_config, write_tiny_sae
from index_equality import assert_same_index

from saetui.cli import build_parser, main
from saetui.collect.pipeline import run_collection
from saetui.index import format as fmt
from saetui.index import open_index


def _sae_at_layer(directory: Path, layer: int, seed: int) -> Path:
    """A tiny SAE (in a directory named ``sae``) reading blocks.<layer>.hook_resid_post."""
    path = write_tiny_sae(directory / "sae", seed=seed)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hook_layer": layer}))
    return path


@pytest.fixture(scope="module")
def other_saes(tmp_path_factory, tiny_gpt2_dir, tiny_corpus_file):
    """Two more SAEs — one at the tiny SAE's hook (blocks.1), one at blocks.0 — and each
    one's index from a run of its own."""
    root = tmp_path_factory.mktemp("multi-saes")
    same = _sae_at_layer(root / "same", 1, seed=2)
    lower = _sae_at_layer(root / "lower", 0, seed=3)
    alone = {}
    for name, sae in (("same", same), ("lower", lower)):
        out = root / f"alone-{name}"
        run_collection(tiny_collect_config(out, tiny_gpt2_dir, sae, tiny_corpus_file))
        alone[name] = out
    return same, lower, alone


def test_one_pass_equals_separate_runs_at_same_and_different_hooks(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index, other_saes
):
    same, lower, alone = other_saes
    out = tmp_path / "out"
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, saes=(tiny_sae_dir, same, lower)
    )
    result = run_collection(config)
    assert result.status == "finished"
    # the two other SAE directories are both named "sae": the index names are made unique
    first = tiny_sae_dir.name
    assert [name for name, _ in result.members] == [first, "sae", "sae-2"]
    listed = fmt.read_several(out)
    assert [(e["name"], e["hook"]) for e in listed] == [
        (first, "blocks.1.hook_resid_post"),
        ("sae", "blocks.1.hook_resid_post"),
        ("sae-2", "blocks.0.hook_resid_post"),
    ]
    assert_same_index(out / first, tiny_index[2])
    assert_same_index(out / "sae", alone["same"])
    assert_same_index(out / "sae-2", alone["lower"])
    # each index carries the request of a separate run: that run finds it finished
    again = run_collection(
        tiny_collect_config(out / "sae-2", tiny_gpt2_dir, lower, tiny_corpus_file)
    )
    assert again.status == "finished" and "collecting" in again.skipped


def test_stop_while_collecting_then_resume_from_indexes_at_different_windows(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index, other_saes
):
    _same, lower, alone = other_saes
    out = tmp_path / "out"
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, saes=(tiny_sae_dir, lower)
    )
    phases: list[str] = []
    checks: list[int] = []

    def stop() -> bool:  # asked once per batch while collecting: stop after the third
        if "collecting" in phases:
            checks.append(1)
        return len(checks) >= 3

    first = run_collection(config, progress=lambda u: phases.append(u.phase), should_stop=stop)
    assert (first.status, first.phase) == ("stopped", "collecting")
    with open_index(out / tiny_sae_dir.name) as index:
        assert index.progress().windows > 0 and not index.progress().finished
    shutil.rmtree(out / "sae")  # one index far behind the other: both must catch up
    second = run_collection(config)
    assert second.status == "finished"
    assert_same_index(out / tiny_sae_dir.name, tiny_index[2])
    assert_same_index(out / "sae", alone["lower"])


def test_stop_while_measuring_metrics_together_resumes_them(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index, other_saes
):
    same, _, alone = other_saes
    out = tmp_path / "out"
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, saes=(tiny_sae_dir, same)
    )
    seen: list[str] = []

    def progress(update) -> None:
        seen.append(f"{update.phase} {update.message}")

    def stop() -> bool:
        return any(line.startswith("metrics CE loss and KL of") for line in seen)

    first = run_collection(config, progress=progress, should_stop=stop)
    assert (first.status, first.phase) == ("stopped", "metrics")
    # both SAEs' CE loss and KL are measured in one go, over the same sample
    assert any(f"CE loss and KL of {tiny_sae_dir.name}, sae on" in line for line in seen)
    for name in (tiny_sae_dir.name, "sae"):
        with open_index(out / name) as index:
            assert not index.progress().finished and "metrics" not in (
                index.get_meta("phases") or {}
            )
    second = run_collection(config)
    assert second.status == "finished"
    for name, result in second.members:
        assert "metrics" not in result.skipped, name
    assert_same_index(out / tiny_sae_dir.name, tiny_index[2])
    assert_same_index(out / "sae", alone["same"])


def test_metrics_are_measured_only_for_the_indexes_that_lack_them(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index, other_saes
):
    same, lower, alone = other_saes
    out = tmp_path / "out"
    first = tiny_sae_dir.name
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, saes=(tiny_sae_dir, same, lower)
    )
    collecting: list[str] = []
    checks: list[int] = []

    def stop() -> bool:  # asked once per batch while collecting: stop after the third
        if "collecting" in collecting:
            checks.append(1)
        return len(checks) >= 3

    stopped = run_collection(
        config, progress=lambda u: collecting.append(u.phase), should_stop=stop
    )
    assert (stopped.status, stopped.phase) == ("stopped", "collecting")
    # the first SAE's index (the request of a separate run) goes on alone up to its
    # neighbours: its metrics are recorded, the other two indexes have none
    phases: list[str] = []
    alone_run = run_collection(
        tiny_collect_config(out / first, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file),
        progress=lambda u: phases.append(u.phase),
        should_stop=lambda: "neighbours" in phases,
    )
    assert (alone_run.status, alone_run.phase) == ("stopped", "neighbours")
    seen: list[str] = []
    result = run_collection(config, progress=lambda u: seen.append(str(u.message)))
    assert result.status == "finished"
    members = dict(result.members)
    assert "metrics" in members[first].skipped
    assert "metrics" not in members["sae"].skipped and "metrics" not in members["sae-2"].skipped
    measuring = {line.split(" on ")[0] for line in seen if line.startswith("CE loss and KL of")}
    assert measuring == {"CE loss and KL of sae, sae-2"}
    assert_same_index(out / first, tiny_index[2])
    assert_same_index(out / "sae", alone["same"])
    assert_same_index(out / "sae-2", alone["lower"])


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_requests_are_one_sentence(
    tmp_path, capsys, monkeypatch, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    common = ["--model", str(tiny_gpt2_dir), "--data", str(tiny_corpus_file), "--headless"]
    common += ["--device", "cpu", "--ctx-len", "24"]
    code, err = _cli(
        capsys, "collect", "--sae", str(tiny_sae_dir), "--sae", str(tiny_sae_dir) + "/",
        "--out", str(tmp_path / "twice"), *common,
    )  # fmt: skip
    assert code == 2 and "is given twice" in err and err.count("\n") == 1
    other_model = write_tiny_sae(tmp_path / "other")
    config = json.loads((other_model / "config.json").read_text())
    config["model_name"] = "gpt2-medium"
    (other_model / "config.json").write_text(json.dumps(config))
    mine = write_tiny_sae(tmp_path / "mine")
    config["model_name"] = "tiny-gpt2"
    (mine / "config.json").write_text(json.dumps(config))
    code, err = _cli(
        capsys, "collect", "--sae", str(mine), "--sae", str(other_model),
        "--out", str(tmp_path / "models"), *common,
    )  # fmt: skip
    assert code == 2 and "was trained on gpt2-medium" in err and err.count("\n") == 1
    assert not (tmp_path / "models").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, err = _cli(
        capsys, "collect", "--sae", str(mine), "--sae", str(tiny_sae_dir),
        "--out", str(taken), *common,
    )  # fmt: skip
    assert code == 2 and "not a saetui index" not in err and "new or empty" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # one rank of a torchrun job
    monkeypatch.setenv("RANK", "0")
    code, err = _cli(
        capsys, "collect", "--sae", str(mine), "--sae", str(tiny_sae_dir),
        "--out", str(tmp_path / "ranks"), *common,
    )  # fmt: skip
    assert code == 2 and "cannot run under torchrun yet" in err and err.count("\n") == 1


def test_one_sae_keeps_the_single_index_request():
    args = build_parser().parse_args(["collect", "--sae", "a", "--data", "d", "--out", "o"])
    from saetui.cli import _collect_config

    config = _collect_config(args, Path("o"))
    assert config.saes == () and not config.several and config.inputs.sae == Path("a")
    demo = build_parser().parse_args(["demo"])
    assert _collect_config(demo, Path("o")).inputs.sae.name == "sae"


def test_headless_command_open_and_info(
    tmp_path, capsys, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, other_saes
):
    same = other_saes[0]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "saetui", "collect", "--sae", str(tiny_sae_dir)]
    command += ["--sae", str(same), "--out", str(out), "--model", str(tiny_gpt2_dir)]
    command += ["--data", str(tiny_corpus_file), "--device", "cpu", "--ctx-len", "24"]
    command += ["--batch-size", "4", "--metrics-tokens", "200", "--max-tokens", "300"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    first = tiny_sae_dir.name
    assert f"saetui open {out / first}" in done.stdout and "metrics of sae " in done.stdout
    code, err = _cli(capsys, "open", str(out))
    assert code == 2 and f"holds one index per SAE ({first}, sae): pass one of them" in err
    assert main(["info", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"]) for r in rows] == [(first, "finished"), ("sae", "finished")]


def test_overwrite_stopped_after_one_index_finished_resumes_without_collecting_it_again(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index, other_saes
):
    """--overwrite stages every index beside the old one; the staged ones replace the old
    only once all finished, so a stop after the first finished leaves it staged and the
    rerun does not collect it again."""
    same, _, alone = other_saes
    out = tmp_path / "out"
    options = {"saes": (tiny_sae_dir, same)}
    assert (
        run_collection(
            tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, **options)
        ).status
        == "finished"
    )
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, overwrite=True, **options
    )
    phases: list[str] = []

    def stop() -> bool:  # the second index's neighbours: the first one has finished
        return phases.count("neighbours") >= 2

    def progress(update) -> None:
        if not phases or phases[-1] != update.phase:
            phases.append(update.phase)

    first = run_collection(config, progress=progress, should_stop=stop)
    assert first.status == "stopped", phases
    staged = out / f".{tiny_sae_dir.name}.overwrite"
    assert staged.exists()  # finished, not yet swapped in
    phases.clear()
    second = run_collection(config, progress=progress)
    assert second.status == "finished"
    results = dict(second.members)
    assert "collecting" in results[tiny_sae_dir.name].skipped, results
    assert not staged.exists() and not (out / ".sae.overwrite").exists()
    assert_same_index(out / tiny_sae_dir.name, tiny_index[2])
    assert_same_index(out / "sae", alone["same"])

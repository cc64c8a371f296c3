"""Stop means stop in every phase, and no finished work is done twice: the pipeline over
a tiny GPT-2 and a real index, and the headless command with real signals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import tiny_collect_config, tiny_documents

from saetui.collect import inputs as inputs_module
from saetui.collect.pipeline import run_collection
from saetui.index import open_index


def _stop_in(phase: str):
    """A progress sink and a stop check that asks to stop once ``phase`` has begun."""
    seen: list[str] = []

    def progress(update) -> None:
        seen.append(update.phase)

    return progress, (lambda: phase in seen), seen


def test_stop_while_loading_writes_nothing(tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file):
    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    progress, stop, _ = _stop_in("loading")
    result = run_collection(config, progress=progress, should_stop=stop)
    assert (result.status, result.phase, result.tokens) == ("stopped", "loading", 0)
    assert not out.exists()


@pytest.mark.parametrize("phase", ["metrics", "neighbours"])
def test_stop_in_a_later_phase_then_resume_does_only_what_is_left(
    phase, tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index
):
    _, _, reference = tiny_index
    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    progress, stop, _ = _stop_in(phase)
    first = run_collection(config, progress=progress, should_stop=stop)
    assert (first.status, first.phase) == ("stopped", phase)
    with open_index(out) as index, open_index(reference) as whole:
        assert not index.progress().finished
        assert index.progress().tokens == whole.progress().tokens  # collecting was done
        assert index.neighbours(0) == {}  # nothing half-written
        assert bool(index.metrics()) == (phase == "neighbours")
    progress, _, seen = _stop_in("never")
    second = run_collection(config, progress=progress)
    assert second.status == "finished"
    assert ("metrics" in second.skipped) == (phase == "neighbours")
    assert ("metrics" in seen) == (phase == "metrics")
    with open_index(out) as index, open_index(reference) as whole:
        assert index.progress().finished
        assert index.metrics()["explained_variance"] == whole.metrics()["explained_variance"]
        for metric, expected in whole.neighbours(5).items():
            assert index.neighbours(5)[metric].ids.tolist() == expected.ids.tolist()


def test_a_finished_index_reopens_without_loading_anything(tmp_path, tiny_index, monkeypatch):
    result, _, reference = tiny_index
    out = tmp_path / "index"
    shutil.copytree(reference, out)
    config = tiny_collect_config(out, *_inputs_of(reference))

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished index must not load the model")

    monkeypatch.setattr(inputs_module, "load_run", no_loading)
    monkeypatch.setattr("saetui.collect.pipeline.load_run", no_loading)
    again = run_collection(config)
    assert again.status == "finished" and "collecting" in again.skipped
    assert again.tokens == result.tokens and again.metrics == result.metrics


def _inputs_of(index_path):
    with open_index(index_path) as index:
        request = index.get_meta("request")["inputs"]
    return request["model"], request["sae"], request["data"]


def test_headless_signal_during_metrics_exits_130_resumably(tmp_path, tiny_gpt2_dir, tiny_sae_dir):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(tiny_documents(200, seed=2)))
    out = tmp_path / "index"
    command = [
        sys.executable, "-m", "saetui", "collect", "--headless", "--model", str(tiny_gpt2_dir),
        "--sae", str(tiny_sae_dir), "--data", str(corpus), "--out", str(out), "--ctx-len", "24",
        "--batch-size", "4", "--metrics-tokens", "100000", "--device", "cpu",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    lines = []
    for line in process.stdout:  # not a tty: one line per phase change
        lines.append(line)
        if line.startswith("metrics"):
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "stopped while metrics" in stdout and "resumable" in stdout
    with open_index(out) as index:
        assert not index.progress().finished and index.progress().tokens > 0
        assert not index.metrics()


def test_overwrite_builds_beside_and_swaps_only_when_finished(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index
):
    out = tmp_path / "index"
    shutil.copytree(tiny_index[2], out)
    with open_index(out) as index:
        index.set_label(3, "kept across the overwrite")
        old_tokens = index.progress().tokens
    before = sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file())
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, ctx_len=16, overwrite=True
    )
    calls = iter(range(1000))
    stopped = run_collection(config, should_stop=lambda: next(calls) >= 4)
    assert stopped.status == "stopped"
    after = sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file())
    assert [n for n, _ in after if n != "writer.lock"] == [
        n for n, _ in before if n != "writer.lock"
    ]
    with open_index(out) as index:  # the old index, untouched and readable
        assert index.meta.ctx_len == 24 and index.progress().tokens == old_tokens
    finished = run_collection(config)  # resumes the replacement, then swaps it in
    assert finished.status == "finished" and finished.out == out
    with open_index(out) as index:
        assert index.meta.ctx_len == 16 and index.progress().finished
        assert index.label(3).label == "kept across the overwrite"
    assert not (tmp_path / ".index.overwrite").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["index"]

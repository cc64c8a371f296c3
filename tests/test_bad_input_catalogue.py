"""A catalogue of bad inputs through the real command line, one line a case.

Each case: the command, the words its one-sentence message must hold, and a check that
nothing was left behind (no new index, the existing good index unchanged, no traceback,
exit 2). Adding a case is one entry in CASES.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_documents, write_tiny_sae

# name -> (argv, words in the message); {tags} are filled from the fixture's paths
CASES: dict[str, tuple[str, str]] = {
    # collect: options
    "ctx-len-1": ("collect {run} --out {new} --ctx-len 1", "--ctx-len 1"),
    "ctx-len-huge": ("collect {run} --out {new} --ctx-len 70000", "at most 65535"),
    "batch-size-0": ("collect {run} --out {new} --batch-size 0", "--batch-size 0"),
    "max-tokens-0": ("collect {run} --out {new} --max-tokens 0", "--max-tokens 0"),
    "max-tokens-neg": ("collect {run} --out {new} --max-tokens -5", "--max-tokens -5"),
    "max-tokens-text": ("collect {run} --out {new} --max-tokens many", "invalid int"),
    "metrics-tokens-neg": ("collect {run} --out {new} --metrics-tokens -5", "--metrics-tokens"),
    "threshold-nan": ("collect {run} --out {new} --threshold nan", "--threshold nan"),
    "threshold-neg": ("collect {run} --out {new} --threshold -1", "--threshold -1"),
    "threshold-inf": ("collect {run} --out {new} --threshold inf", "--threshold inf"),
    "threshold-per-token": (
        "collect {run} --out {new} --threshold 0.5 --batchtopk-mode per-token",
        "--batchtopk-mode threshold",
    ),
    "threshold-relu": ("collect {relu_run} --out {new} --threshold 0.5", "BatchTopK"),
    "batch-mode-relu": ("collect {relu_run} --out {new} --batchtopk-mode batch", "BatchTopK"),
    "batch-mode-bogus": ("collect {run} --out {new} --batchtopk-mode often", "invalid choice"),
    "numerics-bogus": ("collect {run} --out {new} --numerics fancy", "invalid choice"),
    "device-cuda": ("collect {run} --out {new} --device cuda", "CUDA"),
    "device-bogus": ("collect {run} --out {new} --device banana", "banana"),
    "dtype-bogus": ("collect {run} --out {new} --dtype float8", "float8"),
    "no-out": ("collect {run}", "--out"),
    "no-sae": ("collect --model {model} --data {corpus} --out {new}", "--sae"),
    # collect: the SAE
    "sae-missing": ("collect {run_no_sae} --sae {tmp}/nope --out {new}", "does not exist"),
    "sae-empty-dir": ("collect {run_no_sae} --sae {empty_dir} --out {new}", "SAE"),
    "sae-a-text-file": ("collect {run_no_sae} --sae {text_file} --out {new}", "SAE"),
    "sae-bad-json": ("collect {run_no_sae} --sae {sae_bad_json} --out {new}", "config.json"),
    "sae-int-weights": ("collect {run_no_sae} --sae {sae_int} --out {new}", "floating point"),
    "sae-nan-weights": ("collect {run_no_sae} --sae {sae_nan} --out {new}", "NaN"),
    "sae-k-above-d-sae": ("collect {run_no_sae} --sae {sae_big_k} --out {new}", "k=100"),
    "sae-wrong-width": ("collect {run_no_sae} --sae {sae_wide} --out {new}", "48"),
    "sae-two-formats": ("collect {run_no_sae} --sae {sae_two} --out {new}", "several formats"),
    # collect: the corpus
    "data-missing": ("collect {run_no_data} --data {tmp}/nope.json --out {new}", "nope.json"),
    "data-empty-list": ("collect {run_no_data} --data {empty_list} --out {new}", "empty"),
    "data-not-a-list": ("collect {run_no_data} --data {json_dict} --out {new}", "list"),
    "data-bad-json": ("collect {run_no_data} --data {bad_json} --out {new}", "JSON"),
    "data-jsonl-no-field": (
        "collect {run_no_data} --data {jsonl} --text-field body --out {new}",
        "body",
    ),
    "data-binary": ("collect {run_no_data} --data {binary} --out {new}", "binary.txt"),
    "data-numbers": ("collect {run_no_data} --data {json_numbers} --out {new}", "string"),
    # collect: the model and hook
    "model-missing-dir": ("collect {run_no_model} --model {tmp}/no-model --out {new}", "no-model"),
    "model-no-config": ("collect {run_no_model} --model {empty_dir} --out {new}", "empty"),
    "model-remote-code": (
        "collect {run_no_model} --model {remote_model} --out {new}",
        "never runs code",
    ),
    "hook-missing-layer": (
        "collect {run} --hook blocks.99.hook_resid_post --out {new}",
        "blocks.99",
    ),
    "hook-garbage": ("collect {run} --hook not-a-hook --out {new}", "not-a-hook"),
    "layer-99": ("collect {run} --layer 99 --out {new}", "99"),
    # collect: the output
    "out-is-a-file": ("collect {run} --out {text_file}", "is a file"),
    "out-non-index-dir": ("collect {run} --out {busy_dir}", "not a saetui index"),
    "out-under-a-file": ("collect {run} --out {text_file}/index", "is a file"),
    "out-other-config": ("collect {run} --out {good} --ctx-len 16", "ctx_len"),
    "out-damaged-marker": ("collect {run} --out {damaged}", "damaged"),
    "out-locked": ("collect {run} --out {locked}", "another saetui writer"),
    # open
    "open-missing": ("open {tmp}/nope", "does not exist"),
    "open-non-index": ("open {busy_dir}", "not a saetui index"),
    "open-a-file": ("open {text_file}", "not a saetui index"),
    "open-damaged": ("open {damaged}", "damaged"),
    "open-feature-range": ("open {good} --feature 999999", "out of range"),
    "open-feature-neg": ("open {good} --feature -1", "out of range"),
    # export
    "export-missing": ("export {tmp}/nope --out {tmp}/x", "does not exist"),
    "export-non-index": ("export {busy_dir} --out {tmp}/x", "not a saetui index"),
    "query-no-postings": ("query {good} f:1", "saetui postings"),
    "query-bad-expression": ("query {good} f:1&&", "cannot read the query"),
    "query-only-negation": ("query {good} !f:1", "asks only for what is absent"),
    "query-limit-neg": ("query {good} f:1 --limit -1", "--limit -1"),
    "query-by-bogus": ("query {good} f:1 --by size", "invalid choice"),
    "query-missing": ("query {tmp}/nope f:1", "does not exist"),
    "postings-missing": ("postings {tmp}/nope", "does not exist"),
    "postings-part-0": ("postings {good} --part-nnz 0", "--part-nnz 0"),
    "export-top-0": ("export {good} --out {tmp}/x --top-examples 0", "--top-examples 0"),
    "export-top-neg": ("export {good} --out {tmp}/x --top-examples -1", "--top-examples -1"),
    "export-format": ("export {good} --out {tmp}/x --format excel", "invalid choice"),
    # labels
    "labels-missing-file": ("labels import {tmp}/nope.jsonl {good}", "nope.jsonl"),
    "labels-binary": ("labels import {binary} {good}", "binary.txt"),
    "labels-bad-jsonl": ("labels import {bad_json} {good}", "JSON"),
    "labels-out-of-range": ("labels import {labels_range} {good}", "outside this index"),
    "labels-non-index": ("labels import {labels_ok} {busy_dir}", "not a saetui index"),
    # info and the command line itself
    "info-missing": ("info --sae {tmp}/nope", "does not exist"),
    "info-empty": ("info --sae {empty_dir}", "SAE"),
    "no-command": ("", "COMMAND"),
    "unknown-command": ("frobnicate", "invalid choice"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, tiny_index):
    """Paths the cases name: good inputs, broken copies, a good index to leave untouched."""
    tmp = tmp_path_factory.mktemp("catalogue")
    good = tmp / "good"
    shutil.copytree(tiny_index[2], good)
    shutil.rmtree(good / "postings", ignore_errors=True)  # an index queried before its postings
    common = (
        f"--headless --device cpu --ctx-len 24 --batch-size 2 --metrics-tokens 50 "
        f"--model {tiny_gpt2_dir}"
    )
    paths = {
        "tmp": tmp,
        "good": good,
        "model": tiny_gpt2_dir,
        "corpus": tiny_corpus_file,
        "run": f"{common} --sae {tiny_sae_dir} --data {tiny_corpus_file}",
        "run_no_sae": f"{common} --data {tiny_corpus_file}",
        "run_no_data": f"{common} --sae {tiny_sae_dir}",
        "run_no_model": (
            f"--headless --device cpu --ctx-len 24 --sae {tiny_sae_dir} --data {tiny_corpus_file}"
        ),
    }
    relu = write_tiny_sae(tmp / "relu-sae", k=None)
    paths["relu_run"] = f"{common} --sae {relu} --data {tiny_corpus_file}"
    (tmp / "empty").mkdir()
    paths["empty_dir"] = tmp / "empty"
    paths["text_file"] = tmp / "notes.txt"
    paths["text_file"].write_text("just a note\n")
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    paths["busy_dir"] = busy
    # broken SAEs
    bad_json = write_tiny_sae(tmp / "sae-bad-json")
    (bad_json / "config.json").write_text("{not json")
    paths["sae_bad_json"] = bad_json
    for name, change in (
        ("sae_int", lambda s: {k: (v * 100).to(torch.int64) for k, v in s.items()}),
        ("sae_nan", lambda s: {**s, "W_enc": s["W_enc"].fill_(float("nan"))}),
    ):
        folder = write_tiny_sae(tmp / name)
        state = torch.load(folder / "weights.pt", weights_only=True)
        torch.save(change(state), folder / "weights.pt")
        paths[name] = folder
    big_k = write_tiny_sae(tmp / "sae-big-k")
    config = json.loads((big_k / "config.json").read_text())
    (big_k / "config.json").write_text(json.dumps({**config, "top_k": 100}))
    paths["sae_big_k"] = big_k
    paths["sae_wide"] = write_tiny_sae(tmp / "sae-wide", d_in=48)
    two = write_tiny_sae(tmp / "sae-two")
    (two / "cfg.json").write_text("{}")
    (two / "sae_weights.safetensors").write_bytes(b"")
    paths["sae_two"] = two
    # broken corpora
    for name, text in (
        ("empty_list", "[]"),
        ("json_dict", '{"text": "a"}'),
        ("bad_json", "[1, 2"),
        ("json_numbers", "[1, 2, 3]"),
    ):
        paths[name] = tmp / f"{name}.json"
        paths[name].write_text(text)
    paths["jsonl"] = tmp / "docs.jsonl"
    paths["jsonl"].write_text("\n".join(json.dumps({"text": d}) for d in tiny_documents(5)))
    paths["binary"] = tmp / "binary.txt"
    paths["binary"].write_bytes(bytes(range(256)) * 64)
    # a model folder whose config wants its own code
    remote = tmp / "remote-model"
    shutil.copytree(tiny_gpt2_dir, remote)
    model_config = json.loads((remote / "config.json").read_text())
    model_config.update(model_type="evil_lm", auto_map={"AutoConfig": "evil.Config"})
    (remote / "config.json").write_text(json.dumps(model_config))
    (remote / "evil.py").write_text(f"open({str(tmp / 'ran')!r}, 'w')\n")
    paths["remote_model"] = remote
    # indexes: damaged marker, held by another writer
    damaged = tmp / "damaged"
    shutil.copytree(good, damaged)
    (damaged / "saetui-index.json").write_text("{broken")
    paths["damaged"] = damaged
    locked = tmp / "locked"
    shutil.copytree(good, locked)
    paths["locked"] = locked
    # labels
    paths["labels_range"] = tmp / "range.jsonl"
    paths["labels_range"].write_text('{"feature": 999999, "label": "x"}\n')
    paths["labels_ok"] = tmp / "ok.jsonl"
    paths["labels_ok"].write_text('{"feature": 1, "label": "x"}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(locked / "shard-00000" / "writer.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield paths
    holder.kill()
    holder.wait()
    assert not (tmp / "ran").exists()  # no model folder's code ever ran


_HOLD_LOCK = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d on test' % os.getpid()); "
    "print('held', flush=True); time.sleep(600)"
)


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name not in ("lock.mdb", "writer.lock")
    )


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_sentence_exit_2_and_leaves_nothing(case, world, tmp_path):
    template, words = CASES[case]
    new = tmp_path / "new-index"
    args = template.format(**{**world, "new": new}).split()
    before = {name: _snapshot(world[name]) for name in ("good", "busy_dir", "locked")}
    result = subprocess.run(
        [sys.executable, "-m", "saetui", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    message = result.stderr.strip()
    assert result.returncode == 2, f"{case}: exit {result.returncode}\n{message}"
    assert "Traceback" not in result.stderr, message
    assert words in message, f"{case}: {words!r} not in {message!r}"
    assert not new.exists(), f"{case} left {new} behind"
    for name, listing in before.items():
        assert _snapshot(world[name]) == listing, f"{case} changed {name}"

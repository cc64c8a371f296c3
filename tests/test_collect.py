"""The collection pipeline end to end on a tiny GPT-2 with a real LMDB index: what it
stores, resume after a stop, config mismatches, and the headless command with signals."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_HOOK, tiny_collect_config, tiny_documents

from saetui.collect.pipeline import run_collection
from saetui.corpus import batch_windows, iter_windows
from saetui.errors import SaetuiInputError
from saetui.index import open_index
from saetui.lm import load_model
from saetui.sae import load_sae


@pytest.fixture(scope="module")
def finished_index(tiny_index):
    return tiny_index


def test_collection_stores_what_the_sae_computes(
    finished_index, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    result, _updates, out = finished_index
    assert result.status == "finished"
    index = open_index(out)
    progress = index.progress()
    assert progress.finished and progress.tokens == result.tokens > 0
    # sae_core SAEs default to the HookedTransformer numerics, and the run records it.
    assert index.meta.run_config["numerics"] == "hooked"
    model = load_model(str(tiny_gpt2_dir), device="cpu", numerics="hooked")
    sae = load_sae(tiny_sae_dir)
    documents = json.loads(tiny_corpus_file.read_text())
    # The first two batches exactly as the pipeline formed them (same shapes, same numerics).
    batches = batch_windows(iter_windows(documents, model.tokenizer, ctx_len=24), 4)
    for batch in itertools.islice(batches, 2):
        tokens = torch.as_tensor(batch.tokens)
        activations = model.activations(tokens, TINY_HOOK)
        for row, window in enumerate(batch.window_ids.tolist()):
            view = index.window(window)
            length = int(batch.lengths[row])
            assert view.token_ids.tolist() == batch.tokens[row, :length].tolist()
            ids, values = sae.encode_sparse(activations[row, :length])
            for position in range(length):
                stored = index.token(window, position)
                assert stored.counted == bool(batch.mask[row, position])
                if not stored.counted:
                    assert len(stored.feature_ids) == 0
                    continue
                expected = {
                    int(i): float(v)
                    for i, v in zip(ids[position], values[position], strict=True)
                    if v > 0
                }
                got = dict(zip(stored.feature_ids.tolist(), stored.values.tolist(), strict=True))
                assert got.keys() == expected.keys()
                for feature, value in expected.items():
                    assert got[feature] == pytest.approx(value, rel=2e-3, abs=1e-3)  # fp16


def test_collection_stores_metrics_and_neighbours(finished_index):
    _result, updates, out = finished_index
    index = open_index(out)
    metrics = index.metrics()
    for key in (
        "explained_variance",
        "ce_loss_recovered",
        "kl_clean_sae",
        "l0_mean",
        "dead_features",
        "dense_1pct",
        "dense_10pct",
        "collection_tokens",
    ):
        assert key in metrics, key
    assert metrics["collection_tokens"] == index.progress().counted_tokens
    neighbours = index.neighbours(5)
    nbrs = neighbours["decoder_cosine"]
    assert len(nbrs.ids) > 0 and 5 not in nbrs.ids.tolist()
    assert {"jaccard", "npmi", "p_g_given_f", "logit_promoted", "logit_suppressed"} <= set(
        neighbours
    )
    promoted = neighbours["logit_promoted"]
    assert (promoted.ids >= 0).all() and list(promoted.scores) == sorted(promoted.scores)[::-1]
    phases = [u.phase for u in updates]
    assert phases[0] == "loading" and phases[-1] == "done"
    assert {"collecting", "metrics", "neighbours"} <= set(phases)
    collecting = [u for u in updates if u.phase == "collecting"]
    assert collecting[-1].tokens_done <= collecting[-1].tokens_total


def test_stop_then_resume_equals_an_uninterrupted_run(
    tmp_path, finished_index, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    _, _, reference_out = finished_index
    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    calls = iter(range(1000))
    first = run_collection(config, should_stop=lambda: next(calls) >= 3)
    assert first.status == "stopped"
    with open_index(out) as index:
        partial = index.progress()
    assert 0 < partial.tokens < open_index(reference_out).progress().tokens
    assert not partial.finished
    second = run_collection(config)
    assert second.status == "finished"
    resumed, reference = open_index(out), open_index(reference_out)
    assert resumed.progress().tokens == reference.progress().tokens
    for feature in range(64):
        a, b = resumed.stats(feature), reference.stats(feature)
        assert (a.count, a.max, a.mean) == (b.count, b.max, b.mean)
        assert np.array_equal(a.histogram, b.histogram)
        top_a = [(e.value, e.global_index) for e in resumed.top_examples(feature, 10)]
        top_b = [(e.value, e.global_index) for e in reference.top_examples(feature, 10)]
        assert top_a == top_b


def test_a_different_config_is_refused_naming_the_field(
    tmp_path, finished_index, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    _, _, reference_out = finished_index
    out = tmp_path / "index"
    shutil.copytree(reference_out, out)
    before = sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file())
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, ctx_len=16)
    with pytest.raises(SaetuiInputError, match="ctx_len"):
        run_collection(config)
    assert sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file()) == before


def _collect_command(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, *extra):
    return [
        sys.executable,
        "-m",
        "saetui",
        "collect",
        "--headless",
        "--model",
        str(tiny_gpt2_dir),
        "--sae",
        str(tiny_sae_dir),
        "--data",
        str(tiny_corpus_file),
        "--out",
        str(out),
        "--ctx-len",
        "24",
        "--batch-size",
        "2",
        "--metrics-tokens",
        "100",
        "--device",
        "cpu",
        *extra,
    ]


def test_headless_sigterm_stops_resumably_then_finishes(tmp_path, tiny_gpt2_dir, tiny_sae_dir):
    # A corpus big enough that the signal lands while collecting, not during exit.
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(tiny_documents(400, seed=1)))
    out = tmp_path / "index"
    command = _collect_command(out, tiny_gpt2_dir, tiny_sae_dir, corpus, "--batch-size", "1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "saetui-index.json").exists():
            try:
                with open_index(out) as index:
                    if index.progress().tokens > 0:
                        break
            except SaetuiInputError:
                pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "resumable" in stdout
    assert "Traceback" not in stderr
    with open_index(out) as index:
        assert index.progress().tokens > 0
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    # Not a TTY: plain progress lines and the metrics summary.
    assert "\r" not in finished.stdout
    assert "explained variance" in finished.stdout
    assert "CE loss recovered" in finished.stdout
    reference = tmp_path / "reference"
    uninterrupted = subprocess.run(
        [
            *command[: command.index("--out") + 1],
            str(reference),
            *command[command.index("--out") + 2 :],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    with open_index(out) as resumed, open_index(reference) as whole:
        assert resumed.progress().tokens == whole.progress().tokens
        assert resumed.progress().finished
        for feature in range(0, 64, 7):
            assert resumed.stats(feature).count == whole.stats(feature).count
            assert [e.global_index for e in resumed.top_examples(feature, 5)] == [
                e.global_index for e in whole.top_examples(feature, 5)
            ]


def test_headless_bad_input_exits_2_without_leaving_an_index(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    out = tmp_path / "index"
    command = _collect_command(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, "--hook", "blocks.7.hook_resid_post"
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "blocks.7.hook_resid_post" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_forward_scan_matches_token_lookups(finished_index):
    _, _, out = finished_index
    with open_index(out) as index:
        chunks = list(index.iter_forward(windows_per_chunk=8))
        scanned = []
        for chunk in chunks:
            for t in range(len(chunk.offsets) - 1):
                a, b = chunk.offsets[t], chunk.offsets[t + 1]
                scanned.append(sorted(chunk.feature_ids[a:b].tolist()))
        looked_up = []
        for window in range(index.progress().windows):
            for position in range(len(index.window(window).token_ids)):
                token = index.token(window, position)
                if token.counted:
                    looked_up.append(sorted(token.feature_ids.tolist()))
        assert scanned == looked_up
        assert len(scanned) == index.progress().counted_tokens
        # Co-occurrence agrees with a brute-force pass over the same tokens.
        with_neighbours = [
            (feature, index.neighbours(feature)["jaccard"]) for feature in range(index.meta.d_sae)
        ]
    with_neighbours = [(f, n) for f, n in with_neighbours if len(n.ids)]
    assert with_neighbours
    fired = [set(ids) for ids in scanned]
    for feature, jaccard in with_neighbours[:10]:
        best = int(jaccard.ids[0])
        both = sum(1 for f in fired if feature in f and best in f)
        either = sum(1 for f in fired if feature in f or best in f)
        assert both >= 3  # the minimum count
        assert jaccard.scores[0] == pytest.approx(both / either, rel=1e-5)

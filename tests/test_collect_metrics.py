"""The metrics phase of a real collection: both families stored, reconstruction metrics from
the collection's own activations (equal to a separate evaluation of the same windows, also
after a stop or a crash), CE loss and KL on the windows the sample names, the SAE in its own
dtype whatever the model's."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_HOOK, tiny_collect_config

from saetui.collect import metrics_phase
from saetui.collect.evaluate import evaluate_sae, measure_sample
from saetui.collect.pipeline import ce_sample_windows, run_collection
from saetui.corpus import batch_windows, iter_windows
from saetui.errors import SaetuiInputError
from saetui.index import open_index
from saetui.lm import load_model
from saetui.sae import load_sae

RECONSTRUCTION_KEYS = [
    "tokens",
    "mse",
    "explained_variance",
    "explained_variance_legacy",
    "fvu",
    "cosine",
    "l2_ratio",
    "l0_mean",
    "l0_std",
    "l1_mean",
    "l1_std",
    "original_std",
    "residual_std",
]
SAELENS_RECONSTRUCTION_KEYS = [
    "tokens",
    "batches",
    "explained_variance",
    "explained_variance_legacy",
    "mse",
    "cossim",
    "l2_norm_in",
    "l2_norm_out",
    "l2_ratio",
    "relative_reconstruction_bias",
    "l0",
    "l1",
]
SAELENS_BEHAVIOUR_KEYS = [
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_score",
    "kl_div_with_sae",
    "kl_div_with_ablation",
    "kl_div_score",
]


@pytest.fixture(scope="module")
def separately(tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file):
    """The collection's windows measured by evaluate_sae, outside the pipeline."""
    model = load_model(str(tiny_gpt2_dir), device="cpu", numerics="hooked")
    sae = load_sae(tiny_sae_dir)
    documents = json.loads(tiny_corpus_file.read_text())
    windows = list(iter_windows(documents, model.tokenizer, ctx_len=24))
    return model, sae, windows, evaluate_sae(model, sae, TINY_HOOK, batch_windows(windows, 4))


def _assert_reconstruction_equal(stored, expected):
    for key in RECONSTRUCTION_KEYS:
        assert stored[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    for key in SAELENS_RECONSTRUCTION_KEYS:
        assert stored["saelens"][key] == pytest.approx(
            expected["saelens"][key], rel=1e-9, abs=1e-12
        ), key


def test_a_stored_run_holds_both_families_over_its_own_tokens(tiny_index, separately):
    _, _, out = tiny_index
    model, sae, windows, expected = separately
    with open_index(out) as index:
        metrics = index.metrics()
        details = index.get_meta("run_details")
        per_feature = index.get_meta("saelens_feature_metrics")
        counted = index.progress().counted_tokens
    # reconstruction: every collected token, exactly what a separate evaluation gives
    assert metrics["tokens"] == metrics["collection_tokens"] == counted
    _assert_reconstruction_equal(metrics, expected)
    for key in ("frac_alive", "freq_over_1_percent", "freq_over_10_percent"):
        assert metrics["saelens"][key] == pytest.approx(expected["saelens"][key], rel=1e-12)
    for key in SAELENS_BEHAVIOUR_KEYS:
        assert key in metrics["saelens"], key
    assert len(per_feature["feature_density"]) == sae.d_sae
    assert len(per_feature["encoder_decoder_cosine_sim"]) == sae.d_sae
    assert metrics["precision"] == details["precision"] == {"model": "float32", "sae": "float32"}

    # CE loss and KL: the windows the sample names, and nothing else
    sample = metrics["ce_sample"]
    ids, budget = ce_sample_windows(len(windows), sum(len(w) for w in windows), 200)
    assert (sample["windows"], sample["of_windows"], budget) == (len(ids), len(windows), 200)
    assert sample["tokens"] == sum(len(windows[i]) for i in ids) >= 200
    assert len(ids) < len(windows)
    chosen = [windows[i] for i in ids]
    behaviour = measure_sample(model, sae, TINY_HOOK, batch_windows(chosen, 1)).result()
    for key in ("ce_clean", "ce_with_sae", "ce_zero_ablation", "kl_clean_sae"):
        assert metrics[key] == pytest.approx(behaviour[key], rel=1e-6), key
    for key in SAELENS_BEHAVIOUR_KEYS:
        assert metrics["saelens"][key] == pytest.approx(behaviour["saelens"][key], rel=1e-6), key


def test_sample_windows_spread_over_the_collection():
    ids, budget = ce_sample_windows(1000, 128_000, None)
    assert budget == 1280  # 1% of the collection
    assert len(ids) == 10 and ids[0] < 100 and ids[-1] > 900
    ids, budget = ce_sample_windows(20, 2000, None)
    assert budget == 512 and len(ids) == 6  # the floor
    ids, _ = ce_sample_windows(20, 2000, 10**9)
    assert ids == list(range(20))  # more than the collection: all of it, never other tokens
    _, budget = ce_sample_windows(100_000, 10**8, None)
    assert budget == 20_000  # the cap


@pytest.mark.parametrize("saved", [True, False], ids=["stopped", "killed-before-saving"])
def test_reconstruction_metrics_survive_a_stop(
    saved, tmp_path, monkeypatch, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, separately
):
    *_, expected = separately
    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    if not saved:  # a process killed before it saved its sums: the resume re-encodes
        monkeypatch.setattr(metrics_phase.Reconstruction, "save", lambda self: None)
    calls = iter(range(1000))
    first = run_collection(config, should_stop=lambda: next(calls) >= 9)
    assert first.status == "stopped" and first.phase == "collecting"
    with open_index(out) as index:
        state = index.get_meta(metrics_phase.RECONSTRUCTION_STATE)
        committed = index.progress().windows
    if saved:  # saved on the stop: only the open SAELens batch is left to re-encode
        assert committed - 16 < state["folded_windows"] <= committed
    else:
        assert state is None
    monkeypatch.undo()
    second = run_collection(config)
    assert second.status == "finished"
    with open_index(out) as index:
        _assert_reconstruction_equal(index.metrics(), expected)


def test_metrics_tokens_must_be_positive(tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file):
    config = tiny_collect_config(
        tmp_path / "index", tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, metrics_tokens=0
    )
    with pytest.raises(SaetuiInputError, match="--metrics-tokens 0 must be at least 1"):
        run_collection(config)
    assert not (tmp_path / "index").exists()


def test_the_sae_encodes_in_its_own_dtype_under_a_bf16_model(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    out = tmp_path / "index"
    config = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, dtype="bfloat16", max_tokens=300
    )
    assert run_collection(config).status == "finished"
    with open_index(out) as index:
        assert index.get_meta("run_details")["precision"] == {
            "model": "bfloat16",
            "sae": "float32",
        }
        assert index.get_meta("run_details")["sae"]["dtype"] == "float32"
        assert index.metrics()["precision"]["sae"] == "float32"

"""The probe on the real embedded model with a small SAE at blocks.9.hook_resid_post."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_relu_sae

from saetui.analysis.probe import probe, probe_loader, probe_spec_from_run
from saetui.errors import SaetuiInputError

HOOK = "blocks.9.hook_resid_post"
SAMPLE_SAE = Path(__file__).resolve().parent.parent / "sample_data" / "sae"


def random_sae(d_in: int = 576, d_sae: int = 256, seed: int = 0):
    return random_relu_sae(d_in, d_sae, -0.5, seed, HOOK)


@pytest.fixture(scope="module")
def sae():
    return random_sae()


TEXT = "def add(a, b):\n    return a + b  # the sum"


def test_probe_matches_direct_encoding(embedded_model, sae):
    result = probe(embedded_model, sae, HOOK, TEXT, top_per_token=3)
    ids = embedded_model.tokenizer.encode(TEXT, add_special_tokens=False)
    assert result.token_ids == ids
    assert "".join(result.tokens) == TEXT
    full = [embedded_model.bos_token_id, *ids]
    x = embedded_model.activations(torch.tensor([full]), HOOK)[0, 1:]
    acts = sae.encode(x).float()
    assert len(result.per_token) == len(ids)
    for pos, top in enumerate(result.per_token):
        assert len(top) <= 3
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for feature, value in top:
            assert value == pytest.approx(float(acts[pos, feature]), rel=1e-5)
        # nothing outside the reported top is stronger than the weakest reported one
        if len(top) == 3:
            assert float(acts[pos].topk(3).values[-1]) == pytest.approx(values[-1], rel=1e-5)
    maxima = acts.max(dim=0).values
    fired = int((maxima > 0).sum())
    assert fired > 0
    assert len(result.ranked) == fired
    ranked_values = [f.max_value for f in result.ranked]
    assert ranked_values == sorted(ranked_values, reverse=True)
    best = result.ranked[0]
    assert best.feature == int(maxima.argmax())
    assert best.max_value == pytest.approx(float(maxima.max()), rel=1e-5)
    assert float(acts[best.position, best.feature]) == pytest.approx(best.max_value, rel=1e-5)
    assert best.n_tokens == int((acts[:, best.feature] > 0).sum())
    column = result.activations_of(result.per_token[0][0][0])
    assert column[0] == result.per_token[0][0][1]


def test_probe_rejects_empty_text(embedded_model, sae):
    with pytest.raises(SaetuiInputError, match="empty"):
        probe(embedded_model, sae, HOOK, "   \n")


def test_probe_loader_reports_missing_sae(tmp_path):
    load = probe_loader(model="smollm2-135m", sae=tmp_path / "nowhere", device="cpu")
    with pytest.raises(SaetuiInputError):
        load()


def test_probe_with_sample_sae(embedded_model):
    from saetui.sae import load_sae

    sample = load_sae(SAMPLE_SAE, device="cpu")  # shipped with the repository
    assert sample.architecture == "batchtopk" and sample.k == 32
    # Ask for every feature per token, so only the SAE's own sparsity limits the lists.
    result = probe(
        embedded_model, sample, sample.hook_name or HOOK, "import os\nprint(os.sep)", sample.d_sae
    )
    counts = [len(top) for top in result.per_token]
    # BatchTopK per token: at most k features per token, and some token uses all k.
    assert 0 < max(counts) <= sample.k
    assert sample.k in counts
    # Every feature active on some token is ranked, and nothing else.
    active = {feature for top in result.per_token for feature, _ in top}
    assert {f.feature for f in result.ranked} == active


def test_probe_spec_is_what_the_collection_recorded(tiny_index):
    from saetui.index import open_index

    _, _, index_path = tiny_index
    with open_index(index_path) as index:
        config = index.meta.run_config
        details = index.get_meta("run_details")
    spec = probe_spec_from_run(config, details)
    assert spec["model"] == config["model"] and spec["sae"] == config["sae_path"]
    for key in ("hook", "numerics", "dtype", "batchtopk_mode", "threshold"):
        assert spec[key] == config[key], key
    assert spec["start_token"] == details["start_token"]["rule"]
    # without the details the SAE's own default rule applies (what the collector used)
    assert probe_spec_from_run(config)["start_token"] is None


def test_probe_spec_refuses_a_run_without_model_or_sae():
    with pytest.raises(SaetuiInputError, match="does not record which model and SAE"):
        probe_spec_from_run({"model": "smollm2-135m", "hook": HOOK})


def test_probe_module_imports_no_textual():
    code = (
        "import sys, saetui.analysis.probe; print('textual' in sys.modules, 'rich' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"

"""Exports in the old pipeline's layout, the JSONL export, and labels import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from saetui.errors import SaetuiInputError
from saetui.export.labels import import_labels, read_labels
from saetui.export.old_pipeline import export_jsonl, export_sae_core
from saetui.index import open_index

OLD_EXAMPLE_KEYS = {"token", "activation", "context", "position", "text_idx", "global_idx"}


def test_sae_core_export_has_the_old_files_and_key_names(tiny_index, tmp_path):
    _, _, index_path = tiny_index
    out = tmp_path / "analysis"
    paths = export_sae_core(index_path, out, top_examples=5, say=lambda _: None)
    names = {p.relative_to(out).as_posix().split("_2")[0] for p in paths}
    assert {
        "results/analysis_results",
        "results/feature_summaries",
        "matrices/feature_similarity",
        "SUMMARY",
        "README",
    } <= names
    results = json.loads(next(out.glob("results/analysis_results_*.json")).read_text())
    assert {"sparsity", "dead_features", "reconstruction", "ablation"} <= results.keys()
    assert results["ablation"]["ce_loss_recovered"] is not None
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        metrics = index.metrics()
        first_top = index.top_examples(0, 5)
    assert results["reconstruction"]["explained_variance"] == metrics["explained_variance"]
    assert results["dead_features"]["count"] == metrics["dead_features"]
    lines = next(out.glob("results/feature_summaries_*.jsonl")).read_text().splitlines()
    assert len(lines) == d_sae
    record = json.loads(lines[0])
    assert {"feature", "activation_frequency", "mean_activation", "top_examples"} <= record.keys()
    assert record["feature"] == 0
    assert [e["global_idx"] for e in record["top_examples"]] == [e.global_index for e in first_top]
    for example in record["top_examples"]:
        assert set(example) == OLD_EXAMPLE_KEYS
    cooccurrence = np.load(next(out.glob("matrices/feature_cooccurrence_*.npy")))
    assert cooccurrence.shape == (d_sae, d_sae)
    assert (cooccurrence == cooccurrence.T).all()
    with open_index(index_path) as index:
        assert [int(cooccurrence[f, f]) for f in range(d_sae)] == [
            index.stats(f).count for f in range(d_sae)
        ]
    similarity = np.load(next(out.glob("matrices/feature_similarity_*.npy")))
    assert similarity.shape == (d_sae, d_sae)
    np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-5)
    summary = json.loads(next(out.glob("SUMMARY_*.json")).read_text())
    assert summary["d_sae"] == d_sae and summary["files"]
    assert not list(tmp_path.glob(".analysis-*")), "staging directory left behind"


def test_jsonl_export_holds_what_the_feature_view_shows(tiny_index, tmp_path):
    _, _, index_path = tiny_index
    out = export_jsonl(index_path, tmp_path / "features.jsonl", n_examples=3)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    with open_index(index_path) as index:
        assert len(records) == index.meta.d_sae
        busiest = max(records, key=lambda r: r["count"])
        stats = index.stats(busiest["feature"])
    assert busiest["count"] == stats.count and busiest["max"] == pytest.approx(stats.max)
    for key in ("histogram", "top_tokens", "top_examples", "interval_samples", "neighbours"):
        assert key in busiest
    example = busiest["top_examples"][0]
    assert len(example["tokens"]) == len(example["activations"])
    assert "decoder_cosine" in busiest["neighbours"]


def test_labels_import_reads_old_and_neuronpedia_fields(tiny_index, tmp_path):
    _, _, original = tiny_index
    index_path = tmp_path / "index"
    shutil.copytree(original, index_path)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"feature": 1, "label": "poly", "explanation": "polysemantic mess"},
                {
                    "modelId": "smollm2",
                    "layer": "9-res",
                    "index": "2",
                    "description": "Python keywords",
                },
                {"latent": 3, "explanation": "closing brackets"},
            ]
        )
        + "\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "saetui", "labels", "import", str(labels), str(index_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "imported 3 labels" in result.stdout
    with open_index(index_path) as index:
        stored = index.labels()
    assert stored[1].label == "poly" and stored[1].notes == "polysemantic mess"
    assert stored[2].label == "Python keywords"
    assert stored[3].label == "closing brackets"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"feature": 1, "label": "a"}', "{not json"], r"Line 2 .* not valid JSON"),
        (['{"label": "a"}'], r"no feature id"),
        (['{"feature": 999999, "label": "a"}'], r"outside this index"),
        (['{"feature": 1}'], r"no label text"),
        ([""], r"holds no records"),
    ],
)
def test_bad_labels_files_change_nothing(tiny_index, tmp_path, lines, message):
    _, _, original = tiny_index
    index_path = tmp_path / "index"
    shutil.copytree(original, index_path)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(SaetuiInputError, match=message):
        import_labels(labels, index_path)
    with open_index(index_path) as index:
        assert index.labels() == {}


def test_read_labels_keeps_the_last_record_of_a_feature(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"feature": 4, "label": "old"}\n{"feature": 4, "label": "new"}\n')
    assert read_labels(labels, 10) == {4: ("new", "")}

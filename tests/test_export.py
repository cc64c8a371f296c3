"""Exports in the old pipeline's layout, the JSONL export, and labels import."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from saetui.errors import SaetuiInputError
from saetui.export.labels import import_annotations, read_labels
from saetui.export.old_pipeline import export_jsonl, export_sae_core
from saetui.index import open_index

OLD_EXAMPLE_KEYS = {"token", "activation", "context", "position", "text_idx", "global_idx"}


@pytest.fixture(scope="module")
def exported(tiny_index, tiny_corpus_file, tmp_path_factory):
    """The tiny index exported with the activation database, and what the notebook needs
    besides: the corpus's documents and the model's tokenizer."""
    from transformers import AutoTokenizer

    _, _, index_path = tiny_index
    out = tmp_path_factory.mktemp("export") / "analysis"
    said: list[str] = []
    paths = export_sae_core(index_path, out, activation_db=True, say=said.append)
    with open_index(index_path) as index:
        tokenizer = AutoTokenizer.from_pretrained(index.meta.run_config["model"])
    documents = json.loads(tiny_corpus_file.read_text())
    return out, paths, index_path, documents, tokenizer, said


class OldNotebook:
    """What the old ``interp_analysis.ipynb`` cells read, written from the old pipeline's
    own readers (``ActivationDatabase.load`` / ``get_token_context``, the SUMMARY and
    results cells): file names by pattern, keys by name, nothing else."""

    def __init__(self, base):
        self.base = base
        self.summary = json.loads(next(base.glob("SUMMARY_*.json")).read_text())
        self.results = json.loads((base / self.summary["files"]["results"]).read_text())
        self.summaries = [
            json.loads(line)
            for line in (base / self.summary["files"]["feature_summaries"]).read_text().splitlines()
        ]
        self.similarity = np.load(base / self.summary["files"]["similarity_matrix"])
        self.cooccurrence = np.load(base / self.summary["files"]["cooccurrence_matrix"])

    def activation_db(self):
        with open(self.base / self.summary["files"]["activation_db"], "rb") as handle:
            data = pickle.load(handle)
        return data["activation_matrix"], data["token_metadata"], data["feature_metadata"]

    @staticmethod
    def token_context(token_metadata, token_idx, context_size=10):
        metadata = token_metadata[token_idx]
        text_tokens = [t for t in token_metadata if t.text_idx == metadata.text_idx]
        start = max(0, metadata.position - context_size)
        end = min(len(text_tokens), metadata.position + context_size + 1)
        return [t.token_id for t in text_tokens[start:end]]


def _document_ids(tokenizer, documents, text_idx):
    return tokenizer(documents[text_idx], add_special_tokens=False)["input_ids"]


def test_results_and_summary_have_the_old_keys_and_meanings(exported):
    out, _paths, index_path, documents, _, _ = exported
    notebook = OldNotebook(out)
    results, summary = notebook.results, notebook.summary
    with open_index(index_path) as index:
        metrics = index.metrics()
        d_sae = index.meta.d_sae
        counts = np.asarray(index.features(sort="id", descending=False, page_size=d_sae).count)
        counted = index.progress().counted_tokens
    sparsity = results["sparsity"]
    for key in ("l0_mean", "l0_std", "l1_mean", "l1_std"):
        assert isinstance(sparsity[key], float) and sparsity[key] >= 0, key
    assert (sparsity["n_features"], sparsity["n_tokens"]) == (d_sae, counted)
    dead = results["dead_features"]
    assert dead["n_dead"] == int((counts == 0).sum()) > 0
    assert dead["pct_dead"] == pytest.approx(100 * dead["n_dead"] / d_sae)  # a percentage
    assert 1 < dead["pct_dead"] <= 100
    reconstruction = results["reconstruction"]
    assert reconstruction["explained_variance"] == metrics["explained_variance"]
    assert reconstruction["cosine_similarity"] == metrics["cosine"]
    assert reconstruction["mse"] == metrics["mse"] and reconstruction["n_tokens"] == counted
    assert reconstruction["original_std"] > 0 and reconstruction["residual_std"] > 0
    ablation = results["ablation"]
    base, zero, sae = (
        ablation["baseline_loss"],
        ablation["zero_ablation_loss"],
        ablation["sae_reconstruction_loss"],
    )
    assert ablation["loss_recovered"] == pytest.approx((zero - sae) / (zero - base))
    assert ablation["n_batches"] == metrics["ce_sample"]["windows"]
    assert results["saelens"]["explained_variance"] == metrics["saelens"]["explained_variance"]
    # SUMMARY: the old keys, then saetui's
    assert (summary["layer"], summary["hook_name"]) == (1, "hook_resid_post")
    assert summary["dataset_size"] == len(documents)
    assert summary["n_tokens_processed"] == counted and summary["n_features"] == d_sae
    assert summary["dead_features"] == {"n_dead": dead["n_dead"], "pct_dead": dead["pct_dead"]}
    assert summary["ablation"]["loss_recovered"] == ablation["loss_recovered"]
    assert summary["top_features"] == sorted(range(d_sae), key=lambda f: (-counts[f], f))[:10]
    assert all((out / path).is_file() for path in summary["files"].values())
    config = json.loads(next(out.glob("config_*.json")).read_text())
    assert config["layer"] == 1 and config["batch_size"] == 4
    assert not list(out.parent.glob(".analysis-*")), "staging directory left behind"


def test_feature_summaries_have_the_old_semantics(exported):
    out, _, index_path, documents, tokenizer, said = exported
    notebook = OldNotebook(out)
    _, token_metadata, _ = notebook.activation_db()
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        counts = np.asarray(index.features(sort="id", descending=False, page_size=d_sae).count)
        counted = index.progress().counted_tokens
    records = notebook.summaries
    # dead features are omitted, as the old pipeline did
    assert [r["feature"] for r in records] == [f for f in range(d_sae) if counts[f] > 0]
    at_start = 0
    for record in records:
        count = counts[record["feature"]]
        # a raw count (a float, as the old file had it), the fraction under its own name
        assert record["activation_frequency"] == float(count)
        assert record["activation_fraction"] == pytest.approx(count / counted)
        examples = record["top_examples"]
        assert len(examples) == min(25, count)  # the old default: 25 examples
        values = [e["activation"] for e in examples]
        assert values == sorted(values, reverse=True)
        for example in examples:
            assert set(example) == OLD_EXAMPLE_KEYS
            ids = _document_ids(tokenizer, documents, example["text_idx"])
            position = example["position"]  # the document's first text token is 0
            assert example["token"] == tokenizer.decode([ids[position]])
            window = ids[max(0, position - 10) : position + 11]
            assert example["context"] == tokenizer.decode(window)
            assert "<bos>" not in example["context"]
            assert example["context"] in documents[example["text_idx"]]
            row = token_metadata[example["global_idx"]]
            assert (row.text_idx, row.position) == (example["text_idx"], position)
            at_start += position == 0
    assert at_start > 0  # "fraction at position 0" is no longer always 0
    assert not said  # the tokenizer loaded: contexts are detokenised, not joined


def test_matrices_hold_a_phi_correlation_and_the_counts_beside_it(exported):
    out, _, index_path, *_ = exported
    notebook = OldNotebook(out)
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        rows = [
            np.add.reduceat(np.eye(d_sae, dtype=np.int64)[chunk.feature_ids], chunk.offsets[:-1])
            if len(chunk.feature_ids)
            else np.zeros((0, d_sae), dtype=np.int64)
            for chunk in index.iter_forward()
        ]
    fired = np.concatenate(rows) > 0  # [tokens, d_sae], every token has >= 1 feature (k = 4)
    phi = notebook.cooccurrence
    assert phi.dtype == np.float32 and phi.shape == (d_sae, d_sae)
    assert np.allclose(phi, phi.T) and phi.min() >= -1 and phi.max() <= 1
    alive = fired.any(0) & ~fired.all(0)
    expected = np.corrcoef(fired[:, alive].T.astype(np.float64))
    np.testing.assert_allclose(phi[np.ix_(alive, alive)], expected, atol=1e-5)
    assert not phi[~alive].any() and not phi[:, ~alive].any()
    counts = np.load(next(out.glob("matrices/feature_cooccurrence_counts_*.npy")))
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, (fired.T.astype(np.int64) @ fired).astype(np.int32))
    assert notebook.similarity.dtype == np.float32
    np.testing.assert_allclose(np.diag(notebook.similarity), 1.0, rtol=1e-5)


def test_activation_database_loads_as_the_old_pickle(exported):
    out, _, index_path, documents, tokenizer, _ = exported
    matrix, token_metadata, feature_metadata = OldNotebook(out).activation_db()
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        counted = index.progress().counted_tokens
        counts = np.asarray(index.features(sort="id", descending=False, page_size=d_sae).count)
    assert matrix.format == "csr" and matrix.dtype == np.float32
    assert matrix.shape == (counted, d_sae) == (len(token_metadata), feature_metadata["n_features"])
    assert feature_metadata["activation_counts"] == counts.tolist()
    assert feature_metadata["ever_fired"] == (counts > 0).tolist()
    keys = [(t.text_idx, t.position) for t in token_metadata]
    assert keys == sorted(keys)  # documents in corpus order, positions in order
    assert [t.global_idx for t in token_metadata] == list(range(counted))
    for text_idx in {t.text_idx for t in token_metadata}:
        ids = _document_ids(tokenizer, documents, text_idx)
        rows = [t for t in token_metadata if t.text_idx == text_idx]
        assert [t.position for t in rows] == list(range(len(ids)))
        assert [t.token_id for t in rows] == ids
        assert rows[0].token_str == tokenizer.decode([ids[0]])
    # the notebook's get_token_context: the document's own tokens, nothing else
    middle = token_metadata[len(token_metadata) // 2]
    context = OldNotebook.token_context(token_metadata, middle.global_idx)
    ids = _document_ids(tokenizer, documents, middle.text_idx)
    assert context == ids[max(0, middle.position - 10) : middle.position + 11]
    # row values are the stored activations of that token
    with open_index(index_path) as index:
        example = index.top_examples(int(np.argmax(counts)), 1)[0]
        stored = index.token(example.window, example.position)
    row = next(
        t.global_idx
        for t in token_metadata
        if (t.text_idx, t.position) == (example.doc_id, example.doc_offset - 1)
    )
    got = matrix[row].toarray()[0]
    assert {int(f): float(v) for f, v in zip(stored.feature_ids, stored.values, strict=True)} == {
        int(f): float(got[f]) for f in np.flatnonzero(got)
    }


def test_jsonl_refuses_the_activation_database_flag(tiny_index, tmp_path, capsys):
    from saetui.cli import main

    _, _, index_path = tiny_index
    code = main(
        ["export", str(index_path), "--format", "jsonl", "--out", str(tmp_path / "f.jsonl"),
         "--activation-db"]
    )  # fmt: skip
    assert code == 2
    assert "--activation-db belongs to --format sae_core" in capsys.readouterr().err


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
        import_annotations(labels, index_path)
    with open_index(index_path) as index:
        assert index.labels() == {}


def test_read_labels_keeps_the_last_record_of_a_feature(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"feature": 4, "label": "old"}\n{"feature": 4, "label": "new"}\n')
    assert read_labels(labels, 10) == {4: ("new", "")}


def test_a_large_activation_database_is_warned_about(tiny_index, tmp_path, monkeypatch):
    from saetui.export import old_pipeline

    _, _, index_path = tiny_index
    monkeypatch.setattr(old_pipeline, "ACTIVATION_DB_WARN_TOKENS", 100)
    said: list[str] = []
    export_sae_core(index_path, tmp_path / "with", activation_db=True, say=said.append)
    assert any("the activation database holds" in line and "GB to load" in line for line in said)
    said.clear()
    export_sae_core(index_path, tmp_path / "without", say=said.append)
    assert not said and not list((tmp_path / "without").glob("activation_database/*"))

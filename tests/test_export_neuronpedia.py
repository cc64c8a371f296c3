"""Neuronpedia's import bundle: every record validates against the fields Neuronpedia's
SAEDashboard converter writes (its ``db_models`` dataclasses, serialised with orjson) and
the importer's layout; values agree with the index."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from datetime import datetime

import pytest

from saetui.cli import main
from saetui.errors import SaetuiInputError
from saetui.export.neuronpedia import export_neuronpedia
from saetui.index import open_index

# Transcribed from hijohnnylin/neuronpedia utils/neuronpedia-utils/neuronpedia_utils/
# db_models/*.py (what convert-saedashboard-to-neuronpedia-export.py dumps per record).
# "?" marks Optional[...]; "time" a datetime, which orjson writes as an ISO-8601 string.
FEATURE = {
    "modelId": "str", "layer": "str", "index": "str", "creatorId": "str?",
    "createdAt": "time", "maxActApprox": "float?", "hasVector": "bool",
    "vector": "list[float]", "vectorLabel": "str?", "vectorDefaultSteerStrength": "float?",
    "hookName": "str?", "topkCosSimIndices": "list[int]", "topkCosSimValues": "list[float]",
    "neuron_alignment_indices": "list[int]", "neuron_alignment_values": "list[float]",
    "neuron_alignment_l1": "list[float]", "correlated_neurons_indices": "list[int]",
    "correlated_neurons_pearson": "list[float]", "correlated_neurons_l1": "list[float]",
    "correlated_features_indices": "list[int]", "correlated_features_pearson": "list[float]",
    "correlated_features_l1": "list[float]", "neg_str": "list[str]",
    "neg_values": "list[float]", "pos_str": "list[str]", "pos_values": "list[float]",
    "frac_nonzero": "float", "freq_hist_data_bar_heights": "list[float]",
    "freq_hist_data_bar_values": "list[float]", "logits_hist_data_bar_heights": "list[float]",
    "logits_hist_data_bar_values": "list[float]", "decoder_weights_dist": "list[float]",
    "sourceSetName": "str?",
}  # fmt: skip
ACTIVATION = {
    "id": "str", "tokens": "list[str]", "index": "str", "layer": "str", "modelId": "str",
    "maxValue": "float", "maxValueTokenIndex": "int", "minValue": "float",
    "values": "list[float]", "creatorId": "str", "dataSource": "str?", "dataIndex": "str?",
    "dfaValues": "list[float]", "dfaTargetIndex": "int?", "dfaMaxValue": "float?",
    "createdAt": "time", "lossValues": "list[float]", "logitContributions": "str?",
    "binMin": "float?", "binMax": "float?", "binContains": "float?",
    "qualifyingTokenIndex": "int?", "zIndices": "list[list[int]]?", "zValues": "list[float]?",
}  # fmt: skip
EXPLANATION = {
    "id": "str", "modelId": "str", "layer": "str", "index": "str", "description": "str",
    "authorId": "str", "embedding": "list[float]?", "triggeredById": "str?",
    "typeName": "str?", "explanationModelName": "str?", "notes": "str?", "createdAt": "time",
}  # fmt: skip
MODEL = {
    "id": "str", "instruct": "bool", "creatorId": "str", "displayNameShort": "str",
    "displayName": "str", "tlensId": "str?", "dimension": "int?", "visibility": "str",
    "defaultSourceSetName": "str?", "defaultSourceId": "str?", "inferenceEnabled": "bool",
    "layers": "int", "neuronsPerLayer": "int", "createdAt": "time", "owner": "str",
    "updatedAt": "time", "website": "str?",
}  # fmt: skip
SOURCE = {
    "id": "str", "modelId": "str", "setName": "str", "creatorId": "str",
    "hasDashboards": "bool", "inferenceEnabled": "bool", "inferenceHosts": "list[str]",
    "saelensConfig": "str?", "saelensRelease": "str?", "saelensSaeId": "str?",
    "hfRepoId": "str?", "hfFolderId": "str?", "visibility": "str", "defaultOfModelId": "str?",
    "hasUmap": "bool", "hasUmapLogSparsity": "bool", "hasUmapClusters": "bool",
    "num_prompts": "int?", "num_tokens_in_prompt": "int?", "dataset": "str?", "notes": "str?",
    "createdAt": "time",
}  # fmt: skip
SOURCE_SET = {
    "modelId": "str", "name": "str", "creatorId": "str", "hasDashboards": "bool",
    "visibility": "str", "description": "str", "type": "str", "creatorName": "str",
    "urls": "list[str]", "creatorEmail": "str?", "releaseName": "str?",
    "defaultOfModelId": "str?", "defaultRange": "int", "defaultShowBreaks": "bool",
    "showDfa": "bool", "showCorrelated": "bool", "showHeadAttribution": "bool",
    "showUmap": "bool", "createdAt": "time",
}  # fmt: skip
RELEASE = {
    "name": "str", "description": "str", "creatorName": "str", "creatorId": "str",
    "visibility": "str", "isNewUi": "bool", "featured": "bool", "descriptionShort": "str?",
    "urls": "list[str]", "creatorEmail": "str?", "creatorNameShort": "str?",
    "defaultSourceSetName": "str?", "defaultSourceId": "str?",
    "defaultUmapSourceIds": "list[str]", "createdAt": "time",
}  # fmt: skip


def conforms(value, spec: str) -> bool:
    if spec.endswith("?"):
        return value is None or conforms(value, spec[:-1])
    if spec.startswith("list["):
        inner = spec[5:-1]
        return isinstance(value, list) and all(conforms(v, inner) for v in value)
    if spec == "time":
        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    if spec == "float":  # JSON numbers: an integral float may be written as an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is {"str": str, "int": int, "bool": bool}[spec]


def validate(record: dict, schema: dict, where: str) -> None:
    assert set(record) == set(schema), f"{where}: fields {set(record) ^ set(schema)}"
    for key, spec in schema.items():
        assert conforms(record[key], spec), f"{where}: {key}={record[key]!r} is not {spec}"


def read_jsonl_gz(path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def bundle(tiny_index, tmp_path_factory):
    _, _, original = tiny_index
    index_path = tmp_path_factory.mktemp("np-index") / "index"  # labelled: a private copy
    shutil.copytree(original, index_path, ignore=shutil.ignore_patterns("user"))
    with open_index(index_path) as index:
        page = index.features(sort="count", descending=True, page_size=index.meta.d_sae)
        labelled = {int(page.feature[0]): ("first label", "a note"), int(page.feature[1]): "two"}
        index.set_labels(labelled)
    out = tmp_path_factory.mktemp("np") / "bundle"
    argv = ["export", str(index_path), "--format", "neuronpedia", "--out", str(out)]
    assert main([*argv, "--model-id", "tiny-gpt2", "--top-examples", "5"]) == 0
    return out, index_path, labelled


def test_layout_is_what_the_importer_reads_and_every_record_validates(bundle):
    out, index_path, _ = bundle
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
    source = out / "tiny-gpt2" / "1-saetui-res-64"  # <model>/<layer>-<source set>
    for name, schema in (
        ("release", RELEASE),
        ("model", MODEL),
        ("sourceset", SOURCE_SET),
        ("source", SOURCE),
    ):
        lines = (source / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1
        validate(json.loads(lines[0]), schema, name)
    batch = re.compile(r"^batch-\d+\.jsonl\.gz$")  # the importer's explanation batch names
    features, activations, explanations = [], [], []
    for folder, rows, schema in (
        ("features", features, FEATURE),
        ("activations", activations, ACTIVATION),
        ("explanations", explanations, EXPLANATION),
    ):
        for path in sorted((source / folder).iterdir()):
            assert batch.match(path.name), path
            for n, record in enumerate(read_jsonl_gz(path)):
                validate(record, schema, f"{folder}/{path.name}:{n}")
                rows.append(record)
    assert [int(f["index"]) for f in features] == list(range(d_sae))
    assert len({a["id"] for a in activations}) == len(activations)
    assert {f["layer"] for f in features + activations + explanations} == {"1-saetui-res-64"}
    source_record = json.loads((source / "source.jsonl").read_text())
    assert source_record["id"] == "1-saetui-res-64" and source_record["setName"] == "saetui-res-64"


def test_values_agree_with_the_index(bundle):
    out, index_path, labelled = bundle
    source = out / "tiny-gpt2" / "1-saetui-res-64"
    features = {
        int(r["index"]): r for p in (source / "features").iterdir() for r in read_jsonl_gz(p)
    }
    activations: dict[int, list[dict]] = {}
    for path in (source / "activations").iterdir():
        for row in read_jsonl_gz(path):
            activations.setdefault(int(row["index"]), []).append(row)
    explanations = [r for p in (source / "explanations").iterdir() for r in read_jsonl_gz(p)]
    with open_index(index_path) as index:
        for feature, record in features.items():
            stats = index.stats(feature)
            assert record["frac_nonzero"] == pytest.approx(stats.density)
            assert sum(record["freq_hist_data_bar_heights"]) == stats.count
            neighbours = index.neighbours(feature)
            assert record["topkCosSimIndices"] == neighbours["decoder_cosine"].ids.tolist()
            promoted = neighbours["logit_promoted"]
            assert record["pos_str"] == index.token_strings(promoted.ids)
            assert record["pos_values"] == pytest.approx(promoted.scores.tolist(), abs=1e-3)
            rows = activations.get(feature, [])
            if stats.count == 0:
                assert rows == [] and record["maxActApprox"] == 0
                continue
            top = [r for r in rows if r["binMin"] == -1]
            examples = index.top_examples(feature, 5)
            assert len(top) == len(examples)
            for row, example in zip(top, examples, strict=True):
                assert row["tokens"] == example.tokens
                assert row["binMax"] == pytest.approx(stats.max)
                assert row["binContains"] == -1
                fired = row["values"][row["qualifyingTokenIndex"]]
                assert fired == pytest.approx(example.value, abs=1e-3)
                assert row["maxValue"] == max(row["values"])
            assert record["maxActApprox"] == pytest.approx(max(r["maxValue"] for r in rows))
            intervals = index.interval_samples(feature)
            sampled = [r for r in rows if r["binMin"] != -1]
            assert len(sampled) == sum(len(i.examples) for i in intervals)
            edges, counts = stats.bin_edges, stats.histogram
            shares = {}
            for row in sampled:
                fired = row["values"][row["qualifyingTokenIndex"]]
                assert row["binMin"] <= fired + 1e-3 and fired <= row["binMax"] + 1e-3
                inside = (edges[:-1] >= row["binMin"]) & (edges[1:] <= row["binMax"])
                assert row["binContains"] == pytest.approx(counts[inside].sum() / stats.count)
                shares[row["binMin"]] = row["binContains"]
            assert 0 < sum(shares.values()) <= 1 + 1e-9
    by_feature = {int(e["index"]): e for e in explanations}
    assert set(by_feature) == set(labelled)
    for feature, value in labelled.items():
        label, notes = value if isinstance(value, tuple) else (value, None)
        assert by_feature[feature]["description"] == label
        assert by_feature[feature]["notes"] == notes


def test_export_is_repeatable_and_rejects_bad_ids(bundle, tiny_index, tmp_path):
    out, index_path, _ = bundle
    again = tmp_path / "again"
    export_neuronpedia(index_path, again, model_id="tiny-gpt2", n_examples=5, say=lambda _: None)
    first = sorted(a["id"] for p in (out / "tiny-gpt2").rglob("activations/*.gz")
                   for a in read_jsonl_gz(p))  # fmt: skip
    second = sorted(a["id"] for p in (again / "tiny-gpt2").rglob("activations/*.gz")
                    for a in read_jsonl_gz(p))  # fmt: skip
    assert first == second  # the importer skips rows it already has
    with pytest.raises(SaetuiInputError, match="--model-id 'GPT 2' is not a Neuronpedia id"):
        export_neuronpedia(index_path, tmp_path / "bad", model_id="GPT 2", say=lambda _: None)
    part = export_neuronpedia(index_path, tmp_path / "part", features="2-4", say=lambda _: None)
    rows = [r for p in part.source_dir.glob("features/*.gz") for r in read_jsonl_gz(p)]
    assert [r["index"] for r in rows] == ["2", "3", "4"]
    assert part.features == 3 and part.batches == 1

"""``saetui labels import`` of a delphi run (explanations and detection / fuzzing scores)
and of Neuronpedia explanation exports (batch folders, gzipped JSONL, JSON arrays)."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from saetui.cli import main
from saetui.errors import SaetuiInputError
from saetui.export.delphi import balanced_accuracy
from saetui.export.labels import import_annotations
from saetui.export.neuronpedia import export_neuronpedia
from saetui.export.scores import feature_scores
from saetui.index import open_index


@pytest.fixture
def index_copy(tiny_index, tmp_path):
    """A private copy of the tiny index without labels."""
    _, _, original = tiny_index
    path = tmp_path / "index"
    shutil.copytree(original, path, ignore=shutil.ignore_patterns("user"))
    return path


def classified(activating: list[bool], predictions: list[bool | None]) -> list[dict]:
    """Examples as delphi's classifier scorers write them (ClassifierOutput fields)."""
    return [
        {
            "str_tokens": ["a", "b"],
            "activations": [0.0, 1.0] if act else [0.0, 0.0],
            "distance": 1,
            "activating": act,
            "prediction": pred,
            "probability": None,
            "correct": None if pred is None else pred == act,
        }
        for act, pred in zip(activating, predictions, strict=True)
    ]


def write_delphi_run(root, hook: str, latents: dict[int, tuple[str, list, list]]) -> None:
    (root / "explanations").mkdir(parents=True, exist_ok=True)
    for latent, (text, detection, fuzz) in latents.items():
        (root / "explanations" / f"{hook}_latent{latent}.txt").write_text(json.dumps(text))
        for scorer, examples in (("detection", detection), ("fuzz", fuzz)):
            folder = root / "scores" / scorer
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{hook}_latent{latent}.txt").write_text(json.dumps(examples))


def test_balanced_accuracy_is_delphis():
    # 3 of 4 activating examples caught (0.75), 1 of 2 non-activating rejected (0.5)
    examples = classified([True] * 4 + [False] * 2, [True, True, False, True, False, True])
    assert balanced_accuracy(examples) == pytest.approx((0.75 + 0.5) / 2)
    # examples the scorer failed on (no prediction) do not count
    examples += classified([True, False], [None, None])
    assert balanced_accuracy(examples) == pytest.approx((0.75 + 0.5) / 2)
    assert balanced_accuracy(classified([True], [None])) is None


def test_delphi_explanations_and_scores_land_in_the_index(index_copy, tmp_path, capsys):
    run = tmp_path / "results" / "myrun"
    perfect = classified([True, True, False, False], [True, True, False, False])
    half = classified([True, True, False, False], [True, False, True, False])
    write_delphi_run(
        run,
        "layers.1",
        {3: ("closing brackets", perfect, half), 7: ("the word 'cat'", half, perfect)},
    )
    assert main(["labels", "import", str(run), str(index_copy)]) == 0
    assert "imported 2 labels and detection, fuzz scores of 2 features" in capsys.readouterr().out
    with open_index(index_copy) as index:
        labels = index.labels()
        assert {f: lab.label for f, lab in labels.items()} == {
            3: "closing brackets",
            7: "the word 'cat'",
        }
        scores = feature_scores(index)
    assert scores == {
        3: {"detection": 1.0, "fuzz": 0.5},
        7: {"detection": 0.5, "fuzz": 1.0},
    }
    # a later scoring run replaces the scores of the latents it scored, keeps the others
    write_delphi_run(tmp_path / "rescored", "layers.1", {3: ("closing brackets", half, half)})
    import_annotations(tmp_path / "rescored" / "scores", index_copy)
    with open_index(index_copy) as index:
        assert feature_scores(index)[3] == {"detection": 0.5, "fuzz": 0.5}
        assert feature_scores(index)[7] == {"detection": 0.5, "fuzz": 1.0}


def test_delphi_runs_of_several_hookpoints_need_one_picked(index_copy, tmp_path, capsys):
    run = tmp_path / "run"
    ok = classified([True, False], [True, False])
    write_delphi_run(run, "layers.1", {2: ("two", ok, ok)})
    write_delphi_run(run, "layers.5", {60000: ("elsewhere", ok, ok)})
    assert main(["labels", "import", str(run), str(index_copy)]) == 2
    assert "several hookpoints (layers.1, layers.5)" in capsys.readouterr().err
    argv = ["labels", "import", str(run), str(index_copy), "--hookpoint", "layers.5"]
    assert main(argv) == 2
    assert "outside this index" in capsys.readouterr().err
    with pytest.raises(SaetuiInputError, match="no delphi explanations or scores"):
        import_annotations(run, index_copy, hookpoint="layers.9")
    assert main([*argv[:-1], "layers.1"]) == 0
    with open_index(index_copy) as index:
        assert index.label(2).label == "two"
        assert feature_scores(index) == {2: {"detection": 1.0, "fuzz": 1.0}}


def test_neuronpedia_explanations_round_trip(index_copy, tmp_path):
    with open_index(index_copy) as index:
        index.set_labels({1: ("opening quotes", "seen in dialogue"), 5: "numbers"})
    bundle = export_neuronpedia(index_copy, tmp_path / "np", say=lambda _: None)
    target = tmp_path / "fresh"
    shutil.copytree(index_copy, target, ignore=shutil.ignore_patterns("user"))
    # the bundle's source folder, its explanations folder, or one batch file
    for source in (
        bundle.source_dir,
        bundle.source_dir / "explanations",
        bundle.source_dir / "explanations" / "batch-0.jsonl.gz",
    ):
        assert import_annotations(source, target).labels == 2
        with open_index(target) as index:
            labels = {f: (lab.label, lab.notes) for f, lab in index.labels().items()}
        assert labels == {1: ("opening quotes", "seen in dialogue"), 5: ("numbers", "")}


def test_neuronpedia_json_array_and_gzip_exports(index_copy, tmp_path):
    records = [
        {"modelId": "gpt2-small", "layer": "1-res-jb", "index": "4", "description": "commas",
         "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
        {"modelId": "gpt2-small", "layer": "1-res-jb", "index": "9", "description": " years"},
    ]  # fmt: skip
    array = tmp_path / "explanations.json"
    array.write_text(json.dumps(records))
    assert import_annotations(array, index_copy).labels == 2
    with open_index(index_copy) as index:
        assert index.label(4).label == "commas"
        assert index.label(4).notes == "explained by gpt-4o-mini"
        assert index.label(9).label == "years"
    packed = tmp_path / "explanations.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"index": "11", "description": "semicolons"}\n'))
    assert import_annotations(packed, index_copy).labels == 1
    with open_index(index_copy) as index:
        assert index.label(11).label == "semicolons"


def test_folders_without_labels_are_one_sentence(index_copy, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["labels", "import", str(empty), str(index_copy)]) == 2
    assert "without batch-<n>.jsonl.gz files or delphi results" in capsys.readouterr().err
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"feature": 1, "label": "x"}\n')
    argv = ["labels", "import", str(labels), str(index_copy), "--hookpoint", "layers.1"]
    assert main(argv) == 2
    assert "--hookpoint belongs to delphi results" in capsys.readouterr().err


def test_imported_scores_show_in_the_html_export(index_copy, tmp_path):
    from saetui.export.html import export_html

    run = tmp_path / "run"
    write_delphi_run(
        run,
        "layers.1",
        {3: ("x", classified([True, False], [True, False]), classified([True], [False]))},
    )
    import_annotations(run, index_copy)
    export_html(index_copy, tmp_path / "site", features="2-4", say=lambda _: None)
    listing = (tmp_path / "site" / "index.html").read_text()
    assert ">detection score</th>" in listing and ">fuzz score</th>" in listing
    assert '<td class="num" data-v="1.0">1.000</td><td class="num" data-v="0.0">0.000</td>' in (
        listing
    )
    page = (tmp_path / "site" / "features" / "3.html").read_text()
    assert "detection score 1.000 · fuzz score 0.000" in page

"""`saetui export` through the CLI for every format: exit 0, the printed path, the one-line
summary on stderr, and that the summary's figures are the files' own."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from saetui.cli import main
from saetui.index import open_index


def export(index_path: Path, out: Path, capsys, *options: str) -> tuple[list[str], str]:
    """Run ``saetui export``; its stdout lines and its stderr."""
    assert main(["export", str(index_path), "--out", str(out), *options]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def figure(pattern: str, text: str) -> int:
    """The integer a summary line gives where ``pattern``'s group is."""
    found = re.search(pattern, text)
    assert found, (pattern, text)
    return int(found.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def index_facts(tiny_index):
    _, _, index_path = tiny_index
    with open_index(index_path) as index:
        page = index.features(sort="id", descending=False, page_size=index.meta.d_sae)
        return {
            "path": index_path,
            "d_sae": index.meta.d_sae,
            "windows": index.progress().windows,
            "fired": page.feature[page.count > 0].tolist(),
            "counts": dict(zip(page.feature.tolist(), page.count.tolist(), strict=True)),
        }


def test_sae_core_prints_every_file_it_wrote(index_facts, tmp_path, capsys):
    out = tmp_path / "analysis"
    printed, _ = export(index_facts["path"], out, capsys, "--top-examples", "2")
    paths = [Path(line) for line in printed]
    assert paths and all(path.is_file() for path in paths)
    summary_path = next(p for p in paths if p.name.startswith("SUMMARY_"))
    summary = json.loads(summary_path.read_text())
    # every file the summary names was written and printed
    assert {out / name for name in summary["files"].values()} <= {p.resolve() for p in paths}
    summaries = [
        json.loads(line)
        for line in (out / summary["files"]["feature_summaries"]).read_text().splitlines()
    ]
    assert [s["feature"] for s in summaries] == index_facts["fired"]
    assert all(1 <= len(s["top_examples"]) <= 2 for s in summaries)  # --top-examples 2
    for record in summaries:
        assert record["activation_frequency"] == index_facts["counts"][record["feature"]]


def test_jsonl_into_a_directory_writes_features_jsonl(index_facts, tmp_path, capsys):
    printed, _ = export(
        index_facts["path"], tmp_path / "dir", capsys, "--format", "jsonl", "--top-examples", "1"
    )
    assert printed == [str(tmp_path / "dir" / "features.jsonl")]
    records = [json.loads(line) for line in Path(printed[0]).read_text().splitlines()]
    assert [r["feature"] for r in records] == list(range(index_facts["d_sae"]))
    for record in records:
        assert record["count"] == index_facts["counts"][record["feature"]]
        assert len(record["top_examples"]) == (1 if record["count"] else 0)


def test_jsonl_to_a_jsonl_path_writes_there(index_facts, tmp_path, capsys):
    target = tmp_path / "named.jsonl"
    printed, _ = export(index_facts["path"], target, capsys, "--format", "jsonl")
    assert printed == [str(target)]
    assert len(target.read_text().splitlines()) == index_facts["d_sae"]


def test_html_summary_counts_the_pages_written(index_facts, tmp_path, capsys):
    out = tmp_path / "pages"
    printed, said = export(index_facts["path"], out, capsys, "--format", "html")
    assert printed == [str(out / "index.html")] and (out / "index.html").is_file()
    pages = sorted(int(p.stem) for p in (out / "features").glob("*.html"))
    assert pages == index_facts["fired"]
    assert figure(r"html: ([\d,]+) feature pages", said) == len(pages)


def test_delphi_summary_counts_the_cache_written(index_facts, tmp_path, capsys):
    out = tmp_path / "run"
    printed, said = export(index_facts["path"], out, capsys, "--format", "delphi", "--splits", "2")
    latents = out / "latents" / "layers.1"  # blocks.1.hook_resid_post
    assert printed == [str(latents)]
    files = sorted(latents.glob("*.safetensors"))
    assert len(files) == 2
    caches = [load_file(str(path)) for path in files]
    nonzeros = sum(len(cache["activations"]) for cache in caches)
    assert nonzeros > 0
    assert figure(r"delphi: ([\d,]+) activations", said) == nonzeros
    assert figure(r"of ([\d,]+) windows", said) == index_facts["windows"]
    assert figure(r"in (\d+) files", said) == 2
    assert "--hookpoints layers.1" in said
    # every file holds the same window tokens: [windows, ctx_len]
    assert {cache["tokens"].shape[0] for cache in caches} == {index_facts["windows"]}
    ctx_len = caches[0]["tokens"].shape[1]
    # delphi's default 32-token examples must divide the windows; said only when they do not
    assert ("--example_ctx_len" in said) == bool(ctx_len % 32)


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_neuronpedia_summary_counts_the_records_written(index_facts, tmp_path, capsys):
    out = tmp_path / "bundle"
    printed, said = export(
        index_facts["path"],
        out,
        capsys,
        "--format",
        "neuronpedia",
        "--model-id",
        "tiny-gpt2",
        "--features",
        "0-9",
        "--top-examples",
        "3",
    )
    source = Path(printed[0])
    assert len(printed) == 1 and source.parent == out / "tiny-gpt2"
    rows = {
        folder: [r for p in sorted((source / folder).iterdir()) for r in read_jsonl_gz(p)]
        for folder in ("features", "activations", "explanations")
    }
    assert [int(r["index"]) for r in rows["features"]] == list(range(10))
    assert figure(r"neuronpedia: ([\d,]+) features", said) == 10
    assert figure(r"([\d,]+) activations", said) == len(rows["activations"])
    assert figure(r"([\d,]+) explanations", said) == len(rows["explanations"])
    batches = {p.name for folder in rows for p in (source / folder).iterdir()}
    assert figure(r"in (\d+) batches", said) == len(batches)
    # the top activations (binMin -1; interval samples follow them): --top-examples 3
    top = [int(r["index"]) for r in rows["activations"] if r["binMin"] == -1]
    per_feature = np.bincount(top, minlength=10)
    fired = [f for f in range(10) if index_facts["counts"][f] > 0]
    assert fired and all(1 <= per_feature[f] <= 3 for f in fired) and per_feature.max() == 3
    assert not any(per_feature[f] for f in range(10) if f not in fired)

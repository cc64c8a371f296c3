"""delphi's latent cache written from an index: layout, dtypes and shapes as delphi's
``save_splits`` writes them, and every (batch, position, latent, activation) against the
index read token by token (a different path from the export's forward-index scan)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from saetui.cli import main
from saetui.errors import SaetuiInputError
from saetui.export.delphi import ACTIVE_THRESHOLD, export_delphi, split_ranges
from saetui.index import open_index


def index_truth(index) -> tuple[np.ndarray, set[tuple[int, int, int, float]]]:
    """Every window's tokens and every active (window, position, latent, fp16 value), read
    with ``IndexReader.token`` one position at a time."""
    ctx = index.meta.ctx_len
    windows = index.progress().windows
    tokens = np.zeros((windows, ctx), np.int64)
    active = set()
    for w in range(windows):
        view = index.window(w)
        tokens[w, : len(view.token_ids)] = view.token_ids
        for p in range(len(view.token_ids)):
            token = index.token(w, p)
            for f, v in zip(token.feature_ids.tolist(), token.values.tolist(), strict=True):
                if abs(v) > ACTIVE_THRESHOLD:
                    active.add((w, p, int(f), float(np.float16(v))))
    return tokens, active


def read_cache(latents_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], set]:
    """The files as delphi's TensorBuffer.load reads them: latent = offset + file's start."""
    files = {p.name: load_file(str(p)) for p in sorted(latents_dir.glob("*.safetensors"))}
    rows = set()
    for name, data in files.items():
        first = int(name.split("_")[0])
        locations = data["locations"].astype(np.int64)
        locations[:, 2] += first
        for (b, p, f), v in zip(locations.tolist(), data["activations"].tolist(), strict=True):
            rows.add((b, p, f, float(np.float16(v))))
    return files, rows


@pytest.fixture(scope="module")
def cache(tiny_index, tmp_path_factory):
    _, _, index_path = tiny_index
    out = tmp_path_factory.mktemp("delphi") / "run"
    argv = ["export", str(index_path), "--format", "delphi", "--out", str(out), "--splits", "3"]
    assert main(argv) == 0
    return out, index_path


def test_layout_shapes_and_dtypes_are_delphis(cache):
    out, index_path = cache
    with open_index(index_path) as index:
        d_sae, ctx = index.meta.d_sae, index.meta.ctx_len
        windows = index.progress().windows
        model = index.meta.run_config["model"]
    latents = out / "latents" / "layers.1"  # blocks.1.hook_resid_post is layers.1's output
    names = sorted(p.name for p in latents.glob("*.safetensors"))
    assert names == sorted(f"{a}_{b}.safetensors" for a, b in split_ranges(d_sae, 3))
    # delphi's ranges: torch.linspace(0, width, n + 1).long(), end inclusive
    bounds = np.linspace(0, d_sae, 4).astype(int)
    assert split_ranges(d_sae, 3) == [(bounds[i], bounds[i + 1] - 1) for i in range(3)]
    files, _ = read_cache(latents)
    for name, data in files.items():
        assert set(data) == {"locations", "activations", "tokens"}
        n = len(data["activations"])
        assert data["locations"].shape == (n, 3) and data["locations"].dtype == np.uint16
        assert data["activations"].dtype == np.float16
        assert data["tokens"].shape == (windows, ctx)
        first, last = (int(x) for x in name.removesuffix(".safetensors").split("_"))
        assert data["locations"][:, 2].max() <= last - first
    config = json.loads((latents / "config.json").read_text())
    assert config["model_name"] == model and config["cache_ctx_len"] == ctx
    assert config["n_splits"] == 3
    assert (out / "log" / "hookpoint_firing_counts.pt").is_file()


def test_every_activation_and_token_equals_the_index(cache):
    out, index_path = cache
    with open_index(index_path) as index:
        tokens, truth = index_truth(index)
        counts = index.features(sort="id", descending=False, page_size=index.meta.d_sae).count
    files, rows = read_cache(out / "latents" / "layers.1")
    n_rows = sum(len(d["activations"]) for d in files.values())
    assert n_rows == len(rows) == len(truth)  # no duplicates, nothing missing
    assert rows == truth
    for data in files.values():
        assert np.array_equal(data["tokens"], tokens)
    import torch

    firing = torch.load(out / "log" / "hookpoint_firing_counts.pt", weights_only=True)
    assert list(firing) == ["layers.1"]
    expected = np.bincount([f for _, _, f, v in truth if v > 0], minlength=len(counts))
    assert np.array_equal(firing["layers.1"].numpy(), expected)
    assert np.array_equal(expected, counts)  # the index's own per-feature counts agree


def test_wide_sae_gets_uint32_locations_and_named_hookpoint(tmp_path):
    from saetui.index.synthetic import SyntheticCorpus, write_synthetic

    index_path = tmp_path / "wide"
    write_synthetic(index_path, SyntheticCorpus(d_sae=70_000, ctx_len=16, k=4, seed=3), 12)
    out = tmp_path / "cache"
    said: list[str] = []
    report = export_delphi(index_path, out, n_splits=1, hookpoint="layers.7", say=said.append)
    files, rows = read_cache(out / "latents" / "layers.7")
    data = files["0_69999.safetensors"]
    assert data["locations"].dtype == np.uint32  # latent offsets pass 2**16
    with open_index(index_path) as index:
        _, truth = index_truth(index)
    assert rows == truth and report.nonzeros == len(truth) and report.windows == 12
    assert any("activations" in line for line in said)  # progress was shown


def test_bad_options_are_one_sentence(tiny_index, tmp_path, capsys):
    _, _, index_path = tiny_index
    argv = ["export", str(index_path), "--format", "delphi", "--out", str(tmp_path / "x")]
    assert main([*argv, "--splits", "0"]) == 2
    assert "--splits 0 must be between 1 and d_sae" in capsys.readouterr().err
    with pytest.raises(SaetuiInputError, match="cannot be a directory name"):
        export_delphi(index_path, tmp_path / "y", hookpoint="../up", say=lambda _: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


DELPHI_PYTHON = os.environ.get("SAETUI_DELPHI_PYTHON")


@pytest.mark.skipif(
    not DELPHI_PYTHON,
    reason="delphi does not install cleanly here (eai-delphi requires vllm and bitsandbytes); "
    "to run this check, set SAETUI_DELPHI_PYTHON to a Python that has `pip install --no-deps "
    "eai-delphi` plus faiss-cpu sentence-transformers blobfile orjson jaxtyping asyncer "
    "simple_parsing and saetui's torch/transformers",
)
def test_delphis_own_loader_reads_the_cache(cache):
    out, index_path = cache
    script = """
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.latents import LatentDataset
from delphi.latents.loader import TensorBuffer
root, hook = Path(sys.argv[1]), sys.argv[2]
files = sorted(str(p) for p in (root / "latents" / hook).glob("*.safetensors"))
buffers = [TensorBuffer(p, hook) for p in files]
rows = []
for b in buffers:
    for data in b:
        loc = data.activation_data.locations.tolist()
        act = data.activation_data.activations.tolist()
        rows += [[*l, a] for l, a in zip(loc, act)]
config = json.loads((root / "latents" / hook / "config.json").read_text())
dataset = LatentDataset(
    root / "latents",
    SamplerConfig(n_examples_train=4, n_examples_test=4, n_quantiles=2),
    ConstructorConfig(example_ctx_len=8, min_examples=5, n_non_activating=3),
    tokenizer=AutoTokenizer.from_pretrained(config["model_name"]),
    modules=[hook],
)
records = [(r.latent.latent_index, len(r.train), len(r.test)) for r in dataset]
print(json.dumps({"rows": rows, "tokens": list(buffers[0].tokens.shape), "records": records}))
"""
    run = subprocess.run(
        [DELPHI_PYTHON, "-c", script, str(out), "layers.1"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    with open_index(index_path) as index:
        tokens, truth = index_truth(index)
        counts = index.features(sort="id", descending=False, page_size=index.meta.d_sae).count
    assert result["tokens"] == list(tokens.shape)
    # delphi builds explainer/scorer records for the latents with enough activations
    built = {latent for latent, train, test in result["records"] if train and test}
    assert built and built <= {int(f) for f in range(len(counts)) if counts[f] >= 5}
    assert {(b, p, f, float(np.float16(v))) for b, p, f, v in result["rows"]} == truth


def test_module_runs_without_textual():
    code = "import sys, saetui.export.delphi, saetui.export.html; print('textual' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


def test_options_of_other_formats_are_refused(tiny_index, tmp_path, capsys):
    _, _, index_path = tiny_index
    argv = ["export", str(index_path), "--out", str(tmp_path / "x")]
    for extra, message in (
        (["--format", "html", "--splits", "3"], "--splits belongs to --format delphi"),
        (["--format", "delphi", "--features", "1-3"], "--features belongs to --format html"),
        (["--format", "jsonl", "--model-id", "m"], "--model-id belongs to --format neuronpedia"),
    ):
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main([*argv, "--format", "delphi", "--splits", "2"]) == 0
    assert "--example_ctx_len set to a divisor of 24" in capsys.readouterr().err

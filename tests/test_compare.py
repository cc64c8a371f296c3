"""SAE-vs-SAE comparison: decoder matching, activation matching, splits and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saetui.analysis.compare import (
    find_splits,
    match_activations,
    match_decoders,
)
from saetui.cli import main
from saetui.index import open_index
from saetui.index.synthetic import SyntheticCorpus
from tests.conftest import write_tiny_sae


def _permuted_copy(d_sae: int = 512, d_in: int = 64, noise: float = 0.3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w_a = torch.randn(d_sae, d_in, generator=gen)
    perm = torch.randperm(d_sae, generator=gen)
    scale = noise * w_a.norm(dim=1).mean() / d_in**0.5
    w_b = w_a[perm] + scale * torch.randn(d_sae, d_in, generator=gen)
    return w_a, w_b, perm.numpy()  # B's feature i is A's perm[i]


def _recovered(pairs: np.ndarray, perm: np.ndarray) -> float:
    truth = np.empty_like(perm)
    truth[perm] = np.arange(len(perm))  # A's feature a -> B's feature
    return float(np.mean(truth[pairs[:, 0]] == pairs[:, 1])) * len(pairs) / len(perm)


def test_hungarian_recovers_a_permutation():
    w_a, w_b, perm = _permuted_copy()
    match = match_decoders(w_a, w_b, top_n=4, device="cpu")
    assert match.method == "hungarian"
    assert _recovered(match.pairs, perm) >= 0.99
    assert match.mean_max_cos_ab > 0.9 and match.mean_max_cos_ba > 0.9
    hist = match.histogram()
    assert sum(hist["a_to_b"]) == 512 and len(hist["edges"]) == len(hist["a_to_b"]) + 1
    unmatched_a, unmatched_b = match.unmatched(0.5)
    assert len(unmatched_a) == 0 and len(unmatched_b) == 0


def test_greedy_fallback_recovers_a_permutation():
    w_a, w_b, perm = _permuted_copy(seed=1)
    match = match_decoders(w_a, w_b, top_n=4, hungarian_max=16, device="cpu")
    assert match.method == "greedy"
    assert _recovered(match.pairs, perm) >= 0.99


def test_unrelated_features_are_unmatched():
    w_a, w_b, _ = _permuted_copy(d_sae=128)
    w_b[:10] = torch.randn(10, w_b.shape[1])  # 10 of B's features have no partner in A
    match = match_decoders(w_a, w_b, device="cpu")
    _, unmatched_b = match.unmatched(0.6)
    assert set(unmatched_b.tolist()) == set(range(10))


def test_different_d_in_is_refused():
    from saetui.errors import SaetuiInputError

    with pytest.raises(SaetuiInputError, match="different d_in"):
        match_decoders(torch.randn(8, 16), torch.randn(8, 32), device="cpu")


# ------------------------------------------------------------------ splits over real indexes

D_IN, D_SMALL = 32, 64


def _split_pair(
    tmp: Path,
    *,
    sae_dirs: tuple[Path, Path] | None = None,
    seed_b: int = 0,
    absorbed: int | None = None,
):
    """A small SAE A and a width-doubled B whose features 2i, 2i+1 are perturbed copies of
    A's feature i, firing on a partition of i's tokens; one synthetic index for each, written
    with the real IndexWriter over the same windows. From window 30 on, A's feature
    ``absorbed`` fires with no child firing in B."""
    from saetui.index.writer import IndexWriter

    gen = torch.Generator().manual_seed(3)
    w_a = torch.randn(D_SMALL, D_IN, generator=gen)
    w_b = w_a.repeat_interleave(2, dim=0) + 0.4 * torch.randn(2 * D_SMALL, D_IN, generator=gen)
    corpus = SyntheticCorpus(d_sae=D_SMALL, k=4, ctx_len=16, seed=0)
    paths = tmp / "index-a", tmp / "index-b"
    writers = []
    for i, (path, d_sae) in enumerate(zip(paths, (D_SMALL, 2 * D_SMALL), strict=True)):
        config = {"model": "synthetic", "seed": 0 if i == 0 else seed_b}
        if sae_dirs is not None:
            config["sae_path"] = str(sae_dirs[i])
        writers.append(
            IndexWriter.create_or_resume(path, config, d_sae, corpus.ctx_len, corpus.vocab())
        )
    n_windows, w = 60, 0
    rng = np.random.default_rng(5)
    while w < n_windows:
        batch = corpus.windows(w, 10, n_total=n_windows)
        writers[0].add_windows(**batch)
        half = rng.integers(0, 2, batch["feature_ids"].shape)
        values = batch["values"].copy()
        if absorbed is not None and w >= 30:
            values[batch["feature_ids"] == absorbed] = 0.0
        ids_b = 2 * batch["feature_ids"] + half
        writers[1].add_windows(**{**batch, "feature_ids": ids_b, "values": values})
        w += 10
    for writer in writers:
        writer.finish()
        writer.close()
    return w_a, w_b, paths


def test_width_doubled_sae_is_found_as_splits(tmp_path):
    w_a, w_b, (path_a, path_b) = _split_pair(tmp_path)
    decoder = match_decoders(w_a, w_b, top_n=4, device="cpu")
    with open_index(path_a) as index_a, open_index(path_b) as index_b:
        activations = match_activations(index_a, index_b, windows_per_chunk=16)
        side, splits = find_splits(decoder, activations, index_a, index_b, windows_per_chunk=16)
    assert side == "a"
    best = activations.best_partners()
    fired_b = np.flatnonzero(activations.count_b > 0)
    assert np.array_equal(best["b"][0][fired_b], fired_b // 2)  # each child's partner: its parent
    both_fired = [
        p for p in range(D_SMALL) if activations.count_b[2 * p] and activations.count_b[2 * p + 1]
    ]
    assert len(both_fired) > D_SMALL // 2
    assert sorted(s.parent for s in splits) == both_fired
    for split in splits:
        assert {c["feature"] for c in split.children} == {2 * split.parent, 2 * split.parent + 1}
        assert split.parent_covered == 1.0 and split.children_covered == 1.0
        assert sum(c["cofire"] for c in split.children) >= split.parent_count
        assert split.parent_only == [] and split.children_only == []


def test_parent_firing_without_children_is_reported(tmp_path):
    w_a, w_b, paths = _split_pair(tmp_path / "whole")
    counts = np.zeros(D_SMALL, dtype=np.int64)
    with open_index(paths[0]) as index_a:
        for chunk in index_a.iter_forward():
            np.add.at(counts, chunk.feature_ids[chunk.values > 0], 1)
    absorbed = int(np.argsort(counts)[-3])  # a frequent parent
    _, _, (path_a, path_b) = _split_pair(tmp_path / "absorbed", absorbed=absorbed)
    decoder = match_decoders(w_a, w_b, top_n=4, device="cpu")
    with open_index(path_a) as index_a, open_index(path_b) as index_b:
        activations = match_activations(index_a, index_b, windows_per_chunk=16)
        _, splits = find_splits(
            decoder, activations, index_a, index_b, examples=4, windows_per_chunk=16
        )
        split = next(s for s in splits if s.parent == absorbed)
        assert 0.2 < split.parent_covered < 0.8 and split.children_covered == 1.0
        assert len(split.parent_only) == 4 and split.children_only == []
        for window, position in split.parent_only:
            assert window >= 30
            token = index_a.token(window, position)
            assert absorbed in token.feature_ids.tolist()
        assert all(s.parent_only == [] for s in splits if s.parent != absorbed)


def test_activation_matching_refuses_other_windows(tmp_path):
    from saetui.errors import SaetuiInputError

    _, _, (path_a, path_b) = _split_pair(tmp_path, seed_b=1)
    with (
        open_index(path_a) as index_a,
        open_index(path_b) as index_b,
        pytest.raises(SaetuiInputError, match="same corpus windows"),
    ):
        match_activations(index_a, index_b)


# ------------------------------------------------------------------ the CLI


def _sae_dir(directory: Path, w_dec: torch.Tensor) -> Path:
    """An sae_core SAE directory whose decoder is ``w_dec``."""
    write_tiny_sae(directory, d_in=w_dec.shape[1], d_sae=w_dec.shape[0])
    state = torch.load(directory / "weights.pt")
    state["W_dec"] = w_dec.clone()
    torch.save(state, directory / "weights.pt")
    return directory


def test_cli_compares_two_indexes_and_writes_the_schema(tmp_path, capsys):
    gen = torch.Generator().manual_seed(3)  # the decoders _split_pair draws
    w_a = torch.randn(D_SMALL, D_IN, generator=gen)
    w_b = w_a.repeat_interleave(2, dim=0) + 0.4 * torch.randn(2 * D_SMALL, D_IN, generator=gen)
    sae_dirs = _sae_dir(tmp_path / "sae-a", w_a), _sae_dir(tmp_path / "sae-b", w_b)
    _, _, (path_a, path_b) = _split_pair(tmp_path, sae_dirs=sae_dirs)
    out = tmp_path / "compare.json"
    assert main(["compare", str(path_a), str(path_b), "--json", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "mean max cosine" in printed and "splits:" in printed
    report = json.loads(out.read_text())
    assert report["schema"] == "saetui-compare/1"
    assert set(report) == {"schema", "a", "b", "decoder", "activation", "splits"}
    assert report["a"] == {"path": str(path_a), "kind": "index", "d_sae": 64, "d_in": 32}
    dec = report["decoder"]
    assert {
        "method",
        "mean_max_cosine_a_to_b",
        "mean_max_cosine_b_to_a",
        "histogram",
        "pairs",
    } <= set(dec)
    assert {"unmatched_a", "unmatched_b", "neighbours_a_to_b", "neighbours_b_to_a"} <= set(dec)
    assert len(dec["pairs"]) == 64 and set(dec["pairs"][0]) == {"a", "b", "cosine", "jaccard"}
    assert len(dec["neighbours_b_to_a"]) == 128 and len(dec["neighbours_b_to_a"][0]["ids"]) == 3
    assert all(p["b"] // 2 == p["a"] for p in dec["pairs"])
    act = report["activation"]
    assert len(act["best_a"]) == 64 and len(act["best_b"]) == 128
    assert set(act["best_b"][0]) == {"b", "partner", "jaccard", "cofire", "count"}
    trees = report["splits"]["trees"]
    assert report["splits"]["parent_side"] == "a" and len(trees) > 32
    assert {c["feature"] for c in trees[0]["children"]} == {
        2 * trees[0]["parent"],
        2 * trees[0]["parent"] + 1,
    }
    assert set(trees[0]) == {
        "parent",
        "count",
        "parent_covered",
        "children_covered",
        "children",
        "parent_only",
        "children_only",
    }


def test_cli_compares_sae_directories_by_decoder_only(tmp_path, capsys):
    w_a, w_b, perm = _permuted_copy(d_sae=96, d_in=32)
    a, b = _sae_dir(tmp_path / "a", w_a), _sae_dir(tmp_path / "b", w_b)
    out = tmp_path / "out.json"
    assert main(["compare", str(a), str(b), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["activation"] is None and report["splits"] is None
    pairs = np.array([[p["a"], p["b"]] for p in report["decoder"]["pairs"]])
    assert _recovered(pairs, perm) >= 0.99
    assert "activations: not compared" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "d_in", "windows", "top"])
def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, case):
    a = write_tiny_sae(tmp_path / "a", d_in=32)
    b = write_tiny_sae(tmp_path / "b", d_in=16 if case == "d_in" else 32)
    args = [str(a), str(b)]
    if case == "missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "windows":
        gen = torch.Generator().manual_seed(3)
        w_a = torch.randn(D_SMALL, D_IN, generator=gen)
        dirs = _sae_dir(tmp_path / "sa", w_a), _sae_dir(tmp_path / "sb", w_a.repeat(2, 1))
        args = [str(p) for p in _split_pair(tmp_path, sae_dirs=dirs, seed_b=1)[2]]
    elif case == "top":
        args.append("--top=0")
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert {"missing": "does not exist", "d_in": "d_in", "windows": "same corpus", "top": "--top"}[
        case
    ] in err
    assert err.startswith("saetui: error: ") and "\n" not in err and "Traceback" not in err


def test_a_pruned_pair_table_keeps_the_best_partners(tmp_path):
    _, _, (path_a, path_b) = _split_pair(tmp_path)
    with open_index(path_a) as index_a, open_index(path_b) as index_b:
        exact = match_activations(index_a, index_b)
        pruned = match_activations(
            index_a, index_b, windows_per_chunk=16, max_pairs=1000, candidates=8
        )
    assert pruned.pruned and not exact.pruned
    assert pruned.cofire.nnz < exact.cofire.nnz
    fired_b = np.flatnonzero(exact.count_b > 0)
    assert np.array_equal(pruned.best_partners()["b"][0][fired_b], fired_b // 2)
    assert np.array_equal(pruned.count_a, exact.count_a) and pruned.tokens == exact.tokens


def test_cli_compares_a_collected_index_with_itself(tiny_index, tmp_path):
    """A real collection (tiny GPT-2 and SAE): its run config names the SAE, the corpus check
    passes against itself, and every feature is its own partner."""
    _, _, path = tiny_index
    out = tmp_path / "self.json"
    assert main(["compare", str(path), str(path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    pairs = report["decoder"]["pairs"]
    assert all(p["a"] == p["b"] and p["cosine"] > 0.999 for p in pairs)
    assert all(
        p["jaccard"] == 1.0 for p in pairs if report["activation"]["best_a"][p["a"]]["count"]
    )
    assert report["activation"]["tokens"] > 0
    fired = [row for row in report["activation"]["best_a"] if row["count"]]
    assert fired and all(row["partner"] == row["a"] and row["jaccard"] == 1.0 for row in fired)

"""Bounded co-occurrence neighbours: exact against a dense brute force while the candidate
tables hold every partner, the heavy partners kept when they overflow, and the same result
whatever the split of rows (ranks) or a stop and resume at a fold."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from saetui.analysis.cooccurrence import (
    METRICS,
    CooccurrenceCounter,
    cooccurrence_neighbours,
    pair_counts,
    tokens_matrix,
)


def random_tokens(n_tokens: int, d_sae: int, k: int, seed: int = 0) -> sp.csr_matrix:
    """Binary token x feature rows with Zipf-like feature frequencies and a planted pair."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, d_sae + 1) ** 0.8
    rows = []
    for _ in range(n_tokens):
        features = set(rng.choice(d_sae, size=k, replace=False, p=p / p.sum()).tolist())
        if 3 in features:
            features.add(d_sae - 1)  # feature 3 always brings the rarest feature along
        rows.append(sorted(features))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return tokens_matrix(offsets, np.concatenate(rows), d_sae)


def brute_force(matrix: sp.csr_matrix, top_n: int, min_count: int) -> dict[str, np.ndarray]:
    dense = matrix.toarray().astype(np.float64)
    n_tokens, d = dense.shape
    pairs = dense.T @ dense
    counts = np.diag(pairs).copy()
    np.fill_diagonal(pairs, 0)
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        p = pairs / n_tokens
        scores = {
            "jaccard": pairs / (counts[:, None] + counts[None, :] - pairs),
            "npmi": np.log(p / np.outer(counts / n_tokens, counts / n_tokens)) / -np.log(p),
            "p_g_given_f": pairs / counts[:, None],
        }
    for metric, values in scores.items():
        ids = np.full((d, top_n), -1)
        for f in range(d):
            ok = [g for g in range(d) if pairs[f, g] >= min_count and np.isfinite(values[f, g])]
            ranked = sorted(ok, key=lambda g, f=f: (-values[f, g], g))[:top_n]
            ids[f, : len(ranked)] = ranked
        out[metric] = ids
    return out


def test_pair_counts_match_a_dense_product():
    matrix = random_tokens(300, 30, 5)
    dense = matrix.toarray()
    expected = dense.T @ dense
    np.fill_diagonal(expected, 0)
    np.testing.assert_array_equal(pair_counts(matrix).toarray(), expected)


def test_exact_while_every_partner_fits():
    matrix = random_tokens(600, 40, 6)
    chunks = [matrix[a : a + 97] for a in range(0, 600, 97)]
    result = cooccurrence_neighbours(
        lambda: chunks, 40, top_n=5, min_count=3, candidates=80, pending_pairs=500
    )
    assert result.overflowed == 0 and result.tokens == 600
    np.testing.assert_array_equal(result.counts, np.asarray(matrix.sum(0)).ravel())
    expected = brute_force(matrix, 5, 3)
    for metric in METRICS:
        np.testing.assert_array_equal(result.ids[metric], expected[metric], metric)
    assert result.ids["p_g_given_f"][3, 0] == 39  # the planted partner, P = 1
    assert np.isclose(result.scores["p_g_given_f"][3, 0], 1.0)


def test_small_tables_keep_the_heavy_partners():
    d = 300
    matrix = random_tokens(3000, d, 8, seed=1)
    result = cooccurrence_neighbours(
        lambda: [matrix[a : a + 256] for a in range(0, 3000, 256)],
        d,
        top_n=4,
        min_count=3,
        candidates=16,
        pending_pairs=2000,
    )
    assert result.overflowed > d // 2  # the tables did overflow
    # the planted partner (always together) is found by every metric, with its exact count
    for metric in METRICS:
        assert result.ids[metric][3, 0] == d - 1, metric
    dense = matrix.toarray()
    together = int((dense[:, 3] & dense[:, d - 1]).sum())
    assert np.isclose(result.scores["p_g_given_f"][3, 0], together / dense[:, 3].sum())
    # reported scores are never above the exact ones (counts are exact or lower bounds)
    exact = dense.T.astype(np.int64) @ dense
    counts = np.diag(exact)
    for f in range(0, d, 17):
        ranked = zip(result.ids["p_g_given_f"][f], result.scores["p_g_given_f"][f], strict=True)
        for g, score in ranked:
            if g >= 0:
                assert score <= exact[f, g] / counts[f] + 1e-6


def run_rows(groups, d, counts, tokens, rows, budget, stop_after=None, state=None):
    """A counter over ``rows`` fed ``groups``, folded after the groups ``budget`` picks (as
    ranks agree on from the global entry count); returns (counter, next group, last state)."""
    counter = CooccurrenceCounter(d, counts, tokens, rows=rows, top_n=4, min_count=2, candidates=12)
    start = 0
    if state is not None:
        start, arrays = state
        counter.load_state(arrays)
    saved = None
    for j in range(start, len(groups)):
        pairs = pair_counts(groups[j])
        counter.add(pairs[rows[0] : rows[1]])
        if budget(j):
            counter.fold()
            saved = (j + 1, {k: v.copy() for k, v in counter.state().items()})
            if stop_after is not None and j >= stop_after:
                return counter, j + 1, saved
    return counter, len(groups), saved


def test_split_rows_and_a_resume_give_the_same_neighbours():
    d = 200
    matrix = random_tokens(2400, d, 8, seed=2)
    groups = [matrix[a : a + 200] for a in range(0, 2400, 200)]
    counts = np.asarray(matrix.sum(0)).ravel().astype(np.int64)
    fold_after = {2, 5, 6, 9}  # fold points fixed by the data, as the global count makes them

    def budget(j):
        return j in fold_after

    whole, _, _ = run_rows(groups, d, counts, 2400, (0, d), budget)
    reference = whole.result()
    assert reference.overflowed > 0
    # two "ranks", each folding its own rows at the same points
    parts = [
        run_rows(groups, d, counts, 2400, rows, budget)[0].result() for rows in ((0, 77), (77, d))
    ]
    for metric in METRICS:
        joined = np.concatenate([p.ids[metric] for p in parts])
        np.testing.assert_array_equal(joined, reference.ids[metric])
    # stopped after the fold at group 5, resumed from that state
    _, _, saved = run_rows(groups, d, counts, 2400, (0, d), budget, stop_after=5)
    resumed, _, _ = run_rows(groups, d, counts, 2400, (0, d), budget, state=saved)
    for metric in METRICS:
        np.testing.assert_array_equal(resumed.result().ids[metric], reference.ids[metric])


def test_a_stopped_cooccurrence_pass_resumes_from_its_last_checkpoint(
    tmp_path, tiny_index, monkeypatch
):
    """The pipeline's pass over a real index: stopped after a checkpointed fold, the next
    run starts from the saved tables and ends with the lists of an uninterrupted run."""
    from saetui.collect import neighbours
    from saetui.collect.distributed import Team
    from saetui.collect.job import StopRequested
    from saetui.index import open_index

    _, _, path = tiny_index
    monkeypatch.setattr(neighbours, "CHECKPOINT_S", 0.0)  # save at every fold
    with open_index(path) as index:
        columns = index._load_columns()
        source = neighbours.ForwardSource(0, None, index.progress().windows)

        groups_read = []

        def run(stop_after: int | None):
            groups = iter(range(10_000))
            groups_read.append(0)

            def check_stop() -> None:
                groups_read[-1] += 1
                if stop_after is not None and next(groups) >= stop_after:
                    raise StopRequested

            return neighbours.cooccurrence_rows(
                index, source, columns.count, columns.counted_tokens, Team(),
                (0, index.meta.d_sae), top_n=6, min_count=2, check_stop=check_stop,
                report=lambda *a, **k: None, state_dir=tmp_path, candidates=8,
                pending_pairs=100, group_tokens=48,
            )  # fmt: skip

        reference = run(None)
        assert reference.overflowed > 0  # small tables: the folds matter
        (tmp_path / neighbours.COOCCURRENCE_FILE).unlink()
        with pytest.raises(StopRequested):
            run(stop_after=8)
        saved = np.load(tmp_path / neighbours.COOCCURRENCE_FILE)
        assert 0 < int(saved["next_group"]) <= 8
        resumed = run(None)
        # the second run read only the groups after the checkpoint
        assert groups_read[2] == groups_read[0] - int(saved["next_group"])
    for metric in METRICS:
        np.testing.assert_array_equal(resumed.ids[metric], reference.ids[metric])
        np.testing.assert_array_equal(resumed.scores[metric], reference.scores[metric])

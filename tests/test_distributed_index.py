"""Shards of a distributed collection (global window ids dealt in blocks) read as one index
that equals the single-process index of the same windows; layouts, resume and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from saetui.errors import SaetuiInputError
from saetui.index import IndexWriter, open_index
from saetui.index.layout import ShardLayout
from saetui.index.synthetic import SyntheticCorpus, write_synthetic
from tests.index_equality import assert_same_index

CORPUS = SyntheticCorpus(d_sae=96, ctx_len=16, k=6, vocab_size=120, doc_len=40)
N_WINDOWS = 61  # not a multiple of the block: the last block is partial
BLOCK = 8  # small blocks: several per rank in 61 windows (the pipeline deals 16)


def dealt_windows(corpus: SyntheticCorpus, window_ids: list[int], n_total: int) -> dict:
    """add_windows arguments for the (non-consecutive) windows ``window_ids``."""
    parts = [corpus.windows(w, 1, n_total=n_total) for w in window_ids]
    return {
        "window_ids": np.array(window_ids),
        "tokens": [p["tokens"][0] for p in parts],
        "segments": [p["segments"][0] for p in parts],
        "feature_ids": np.concatenate([p["feature_ids"] for p in parts]),
        "values": np.concatenate([p["values"] for p in parts]),
        "mask": np.concatenate([p["mask"] for p in parts]),
    }


def write_rank(path, layout: ShardLayout, *, upto: int | None = None, batch: int = 5) -> None:
    """Rank ``layout.rank``'s share of the synthetic corpus, in batches; finished unless
    stopped after ``upto`` of its windows."""
    mine = [w for w in range(N_WINDOWS) if layout.owns(w)]
    with IndexWriter.create_or_resume(
        path,
        {"model": "synthetic", "seed": CORPUS.seed},
        CORPUS.d_sae,
        CORPUS.ctx_len,
        CORPUS.vocab(),
        shard=layout.rank,
        layout=layout,
        top_k=8,
    ) as writer:
        done = mine.index(writer.next_window) if writer.next_window in mine else len(mine)
        stop = len(mine) if upto is None else upto
        for a in range(done, stop, batch):
            writer.add_windows(**dealt_windows(CORPUS, mine[a : min(a + batch, stop)], N_WINDOWS))
        if upto is None:
            writer.finish()


def test_layout_deals_disjoint_blocks_that_cover_the_corpus():
    layouts = [ShardLayout(r, 3, 4) for r in range(3)]
    owners = [[lay.owns(w) for lay in layouts].index(True) for w in range(50)]
    assert owners[:13] == [0] * 4 + [1] * 4 + [2] * 4 + [0]
    for lay in layouts:
        mine = [w for w in range(50) if lay.owns(w)]
        assert [lay.global_window(i) for i in range(len(mine))] == mine
        assert [lay.local_window(w) for w in mine] == list(range(len(mine)))
        assert [lay.owned_below(w) for w in range(51)] == [
            sum(1 for m in mine if m < w) for w in range(51)
        ]
        with pytest.raises(ValueError, match="belongs to rank"):
            lay.local_window(next(w for w in range(50) if not lay.owns(w)))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "ix"
    write_synthetic(path, CORPUS, N_WINDOWS, top_k=8)
    return path


def test_two_ranks_read_as_the_single_process_index(tmp_path, single):
    path = tmp_path / "ix"
    for rank in (1, 0):  # order does not matter
        write_rank(path, ShardLayout(rank, 2, BLOCK))
    with open_index(path) as index:
        assert index.distributed and index.meta.n_shards == 2
        assert [p["windows"] for p in index.progress().shards] == [32, 29]
        # a window is found in its rank's shard, and refused in the other one
        assert index.window(9).shard == 1 and index.window(17).shard == 0
        with pytest.raises(SaetuiInputError, match="window 9 is in shard 1"):
            index.window(9, shard=0)
    assert_same_index(path, single, metrics=False)


def test_a_rank_stopped_early_resumes_to_the_same_index(tmp_path, single):
    path = tmp_path / "ix"
    write_rank(path, ShardLayout(0, 3, BLOCK), upto=7)
    write_rank(path, ShardLayout(1, 3, BLOCK))
    write_rank(path, ShardLayout(2, 3, BLOCK), upto=3)
    with open_index(path) as index:
        assert index.progress().windows < N_WINDOWS and not index.progress().finished
    write_rank(path, ShardLayout(0, 3, BLOCK))
    write_rank(path, ShardLayout(2, 3, BLOCK))
    assert_same_index(path, single, metrics=False)


def test_windows_not_dealt_to_the_rank_are_refused(tmp_path):
    layout = ShardLayout(1, 2, BLOCK)
    with IndexWriter.create_or_resume(
        tmp_path / "ix",
        {"model": "synthetic"},
        CORPUS.d_sae,
        CORPUS.ctx_len,
        CORPUS.vocab(),
        shard=1,
        layout=layout,
    ) as writer:
        assert writer.next_window == 8
        with pytest.raises(SaetuiInputError, match="dealt to rank 1: expected window 8"):
            writer.add_windows(**dealt_windows(CORPUS, [0, 1], N_WINDOWS))
        writer.add_windows(**dealt_windows(CORPUS, [*range(8, 16), 24], N_WINDOWS))
        assert writer.next_window == 25


def test_another_world_size_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "ix"
    write_rank(path, ShardLayout(0, 2, BLOCK), upto=4)
    with pytest.raises(SaetuiInputError, match=r"rank 0 of 2 processes.*same number of processes"):
        write_rank(path, ShardLayout(0, 3, BLOCK))
    with pytest.raises(SaetuiInputError, match="rank 0 of 2 processes"):
        write_synthetic(path, CORPUS, N_WINDOWS, top_k=8)  # a single process


def test_merge_gathers_node_directories_and_refuses_what_does_not_fit(tmp_path, single):
    from saetui.index.merge import merge_indexes

    node0, node1, out = tmp_path / "node0", tmp_path / "node1", tmp_path / "out"
    write_rank(node0, ShardLayout(0, 2, BLOCK))
    write_rank(node1, ShardLayout(1, 2, BLOCK), upto=6)
    with pytest.raises(SaetuiInputError, match=r"shard 1 in .* is not finished"):
        merge_indexes([node1], out)
    first = merge_indexes([node0], out)
    assert first.copied == [0] and first.missing == [1]
    assert "shards 1 are still missing" in first.summary()
    write_rank(node1, ShardLayout(1, 2, BLOCK))  # resumed and finished
    with pytest.raises(SaetuiInputError, match="shard 0 is in both"):
        merge_indexes([node0, node0], tmp_path / "elsewhere")
    with pytest.raises(SaetuiInputError, match="exists already: pass --overwrite"):
        merge_indexes([node0, node1], out)
    report = merge_indexes([node1], out)
    assert report.complete and report.windows == N_WINDOWS
    assert_same_index(out, single, metrics=False)
    # a shard of another run (another seed) is refused
    other = SyntheticCorpus(d_sae=96, ctx_len=16, k=6, vocab_size=120, doc_len=40, seed=5)
    stranger = tmp_path / "stranger"
    with IndexWriter.create_or_resume(
        stranger,
        {"model": "synthetic", "seed": 5},
        96,
        16,
        other.vocab(),
        shard=1,
        layout=ShardLayout(1, 2, BLOCK),
        top_k=8,
    ) as writer:
        writer.add_windows(**dealt_windows(other, list(range(8, 16)), N_WINDOWS))
        writer.finish()
    with pytest.raises(SaetuiInputError, match="different run_config"):
        merge_indexes([stranger], out, replace=True)


def test_merge_checks_window_counts_against_the_layout(tmp_path):
    from saetui.index.merge import merge_indexes

    write_rank(tmp_path / "a", ShardLayout(0, 2, BLOCK))
    # rank 1 "finished" early: its shard lacks windows the layout deals it
    with IndexWriter.create_or_resume(
        tmp_path / "b",
        {"model": "synthetic", "seed": CORPUS.seed},
        CORPUS.d_sae,
        CORPUS.ctx_len,
        CORPUS.vocab(),
        shard=1,
        layout=ShardLayout(1, 2, BLOCK),
        top_k=8,
    ) as writer:
        writer.add_windows(**dealt_windows(CORPUS, list(range(8, 16)), N_WINDOWS))
        writer.finish()
    with pytest.raises(SaetuiInputError, match="shard 0 holds 32 windows but the other shards"):
        merge_indexes([tmp_path / "a", tmp_path / "b"], tmp_path / "out")

"""Postings (INDEX/postings): the transposed forward index equals a brute-force transpose,
on one shard and on the shards of a distributed run; a stopped build resumes to exactly
the postings of an uninterrupted one; a grown index is extended, a replaced one rebuilt."""

from __future__ import annotations

import pytest

from saetui.index import open_index
from saetui.index.layout import ShardLayout
from saetui.index.postings import (
    KIND_FEATURE,
    KIND_TOKEN,
    SHARD_SHIFT,
    build_postings,
    open_postings,
)
from saetui.index.synthetic import SyntheticCorpus, write_synthetic
from tests.test_distributed_index import BLOCK, write_rank

CORPUS = SyntheticCorpus(d_sae=64, ctx_len=16, k=6, vocab_size=60, doc_len=40)
N_WINDOWS = 50


def brute_force(path):
    """feature -> [(position, fp16 value)], token id -> [position], doc -> [position] from the
    forward index, token by token."""
    features, tokens, docs = {}, {}, {}
    with open_index(path) as reader:
        for shard in reader.shard_ids:
            for scan in reader.scan_forward(shard):
                for t in range(len(scan.global_index)):
                    pos = (shard << SHARD_SHIFT) | int(scan.global_index[t])
                    if not scan.counted[t]:
                        continue
                    tokens.setdefault(int(scan.token_ids[t]), []).append(pos)
                    if scan.doc_ids[t] >= 0:
                        docs.setdefault(int(scan.doc_ids[t]), []).append(pos)
                    a, b = scan.offsets[t], scan.offsets[t + 1]
                    for f, v in zip(scan.feature_ids[a:b], scan.values16[a:b], strict=True):
                        features.setdefault(int(f), []).append((pos, float(v)))
    return features, tokens, docs


def dump(path):
    """Everything the postings answer, as plain Python, for equality checks."""
    out = {}
    with open_postings(path) as post:
        for f in range(CORPUS.d_sae):
            pos, vals = post.read(KIND_FEATURE, f)
            out[("f", f)] = (pos.tolist(), vals.astype(float).tolist())
        for t in range(CORPUS.vocab_size):
            out[("t", t)] = post.read(KIND_TOKEN, t)[0].tolist()
        out["docs"] = [post.document(d).tolist() for d in range(40)]
        state = post.state()
    out["nnz"] = sum(s["nnz"] for s in state["shards"].values())
    return out


def assert_matches_brute_force(path):
    features, tokens, docs = brute_force(path)
    with open_postings(path) as post:
        for f in range(CORPUS.d_sae):
            pos, vals = post.read(KIND_FEATURE, f)
            want = features.get(f, [])
            assert pos.tolist() == [p for p, _ in want], f
            assert vals.astype(float).tolist() == [v for _, v in want], f
            assert post.counts(KIND_FEATURE, f) == len(want)
            if want:
                assert post.max_value(f) == max(v for _, v in want)
                # the first page by value: top lists (or decoded pieces) merged across parts
                top_vals, top_pos = post.top(f, 10)
                ranked = sorted(want, key=lambda pv: (-pv[1], pv[0]))[:10]
                assert top_pos.tolist() == [p for p, _ in ranked]
                assert top_vals.astype(float).tolist() == [v for _, v in ranked]
        for t in range(CORPUS.vocab_size):
            assert post.read(KIND_TOKEN, t)[0].tolist() == tokens.get(t, []), t
        for doc, positions in docs.items():
            rows = post.document(doc)
            got = sorted(
                (int(s) << SHARD_SHIFT) | (g + i) for s, g, n in rows.tolist() for i in range(n)
            )
            assert got == positions, doc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    write_synthetic(path, CORPUS, N_WINDOWS)
    return path


def test_postings_equal_a_brute_force_transpose(tmp_path, single):
    # small parts (several per shard) and small top lists exercise every code path
    report = build_postings(single, part_nnz=700, top_min=40)
    assert report.parts > 3 and report.new_windows == N_WINDOWS and not report.rebuilt
    with open_index(single) as reader:
        assert report.nnz == reader.progress().nonzeros
    assert report.bytes > 0 and report.bytes_per_nnz > 0
    assert_matches_brute_force(single)
    # a second build has nothing to do
    again = build_postings(single, part_nnz=700, top_min=40)
    assert again.new_windows == 0 and again.new_nnz == 0 and again.nnz == report.nnz


def test_a_stopped_build_resumes_to_the_uninterrupted_postings(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for path in (whole, stopped):
        write_synthetic(path, CORPUS, N_WINDOWS)
    build_postings(whole, part_nnz=500, top_min=40)

    calls = 0

    def stop_after_a_while():
        nonlocal calls
        calls += 1
        if calls == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_postings(stopped, part_nnz=500, top_min=40, check_stop=stop_after_a_while)
    with open_postings(stopped) as post:
        done = sum(s["windows"] for s in post.state()["shards"].values())
    assert 0 < done < N_WINDOWS  # stopped in the middle, with parts committed
    report = build_postings(stopped, part_nnz=500, top_min=40)
    assert report.new_windows == N_WINDOWS - done and not report.rebuilt
    assert dump(stopped) == dump(whole)


def test_a_grown_index_is_extended_and_a_replaced_one_rebuilt(tmp_path):
    path, fresh = tmp_path / "grown", tmp_path / "fresh"
    write_synthetic(path, CORPUS, 30)
    build_postings(path, part_nnz=600)
    write_synthetic(path, CORPUS, N_WINDOWS)  # the writer resumes and adds windows
    report = build_postings(path, part_nnz=600)
    assert report.new_windows == N_WINDOWS - 30 and not report.rebuilt
    write_synthetic(fresh, CORPUS, N_WINDOWS)
    build_postings(fresh, part_nnz=600)
    # the window the first writer finished short (the last one) is whole in both now
    assert_matches_brute_force(path)

    other = SyntheticCorpus(d_sae=64, ctx_len=16, k=6, vocab_size=60, doc_len=40, seed=5)
    write_synthetic(path, other, 20, overwrite=True)
    report = build_postings(path, part_nnz=600)
    assert report.rebuilt and report.windows == 20
    assert_matches_brute_force(path)


def test_postings_of_a_distributed_index(tmp_path):
    path = tmp_path / "ranks"
    for rank in (0, 1):
        write_rank(path, ShardLayout(rank, 2, BLOCK))
    report = build_postings(path, part_nnz=400)
    assert report.parts >= 4
    features, _, _ = brute_force(path)
    with open_postings(path) as post, open_index(path) as reader:
        assert {p.shard for p in post.parts()} == {0, 1}
        for f in range(96):
            pos, _ = post.read(KIND_FEATURE, f)
            assert pos.tolist() == [p for p, _ in features.get(f, [])]
        # a position names the shard and the global token index of that token
        pos, vals = post.read(KIND_FEATURE, 5)
        for p, v in zip(pos[:20].tolist(), vals[:20].tolist(), strict=True):
            shard, gidx = p >> SHARD_SHIFT, p & ((1 << SHARD_SHIFT) - 1)
            token = reader.token(gidx // 16, gidx % 16, shard=shard)
            assert token.values[list(token.feature_ids).index(5)] == pytest.approx(v)


def test_collect_with_postings_builds_them_and_a_stop_resumes(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    from saetui.collect.pipeline import run_collection
    from tests.conftest import tiny_collect_config

    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, postings=True)
    phases = []
    result = run_collection(
        config,
        progress=lambda update: phases.append(update.phase),
        should_stop=lambda: bool(phases) and phases[-1] == "postings",
    )
    assert result.status == "stopped" and result.phase == "postings"
    with open_index(out) as reader:
        total = reader.progress().windows
        assert reader.progress().finished
    post = open_postings(out)
    if post is not None:  # stopped before it transposed everything
        with post:
            state = post.state() or {"shards": {}}
            assert sum(s["windows"] for s in state["shards"].values()) < total
    # the same request again: the index is finished, only the postings are built
    result = run_collection(config, progress=lambda update: phases.append(update.phase))
    assert result.status == "finished"
    with open_index(out) as reader, open_postings(out) as post:
        state = post.state()
        assert sum(s["windows"] for s in state["shards"].values()) == reader.progress().windows
        assert sum(s["nnz"] for s in state["shards"].values()) == reader.progress().nonzeros
    features, _, _ = brute_force(out)
    with open_postings(out) as post:
        for f in list(features)[:20]:
            assert post.read(KIND_FEATURE, f)[0].tolist() == [p for p, _ in features[f]]


def test_collect_option_postings_reaches_the_config(tmp_path):
    from saetui.cli import _collect_config, build_parser

    argv = ["collect", "--sae", "s", "--data", "d.json", "--out", str(tmp_path)]
    for extra, wanted in (([], None), (["--postings"], True), (["--no-postings"], False)):
        args = build_parser().parse_args(argv + extra)
        assert _collect_config(args, tmp_path).postings is wanted


def test_collect_builds_postings_by_default_under_the_token_limit(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, monkeypatch
):
    """Neither --postings nor --no-postings: a collection builds them when its index holds
    fewer than DEFAULT_ON_TOKENS tokens, not otherwise; --no-postings never does."""
    from saetui.collect.pipeline import run_collection
    from saetui.index import postings_build
    from tests.conftest import tiny_collect_config

    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    assert config.postings is None
    with monkeypatch.context() as patch:  # an index "too large" for the default
        patch.setattr(postings_build, "DEFAULT_ON_TOKENS", 1)
        assert run_collection(config).status == "finished"
    assert open_postings(out) is None
    refused = tiny_collect_config(
        out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, postings=False
    )
    assert run_collection(refused).status == "finished"
    assert open_postings(out) is None
    # under the limit: the finished index reruns only the postings phase, and builds them
    phases = []
    assert run_collection(config, progress=lambda u: phases.append(u.phase)).status == "finished"
    assert "postings" in phases and "collecting" not in phases
    with open_index(out) as reader, open_postings(out) as post:
        state = post.state()
        assert sum(s["windows"] for s in state["shards"].values()) == reader.progress().windows

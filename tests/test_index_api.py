"""Writer + reader on real LMDB files: API, resume, bad input, shards, readers during writes."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from saetui import SaetuiInputError
from saetui.index import FeatureFilter, IndexWriter, codec, open_index
from saetui.index.synthetic import SyntheticCorpus, write_synthetic

CORPUS = SyntheticCorpus(d_sae=256, ctx_len=32, k=8, seed=0)
N_WINDOWS = 50


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ix") / "index"
    write_synthetic(path, CORPUS, N_WINDOWS, batch_windows=9)
    return path


def _expected():
    data = CORPUS.windows(0, N_WINDOWS, n_total=N_WINDOWS)
    lens = np.array([len(t) for t in data["tokens"]])
    return data, lens


def test_round_trip_tokens_forward_index_and_stats(built):
    data, lens = _expected()
    v16 = codec.to_fp16(data["values"])
    with open_index(built) as r:
        p = r.progress()
        assert (p.windows, p.tokens, p.finished) == (N_WINDOWS, lens.sum(), True)
        assert p.counted_tokens == data["mask"].sum()
        assert r.meta.d_sae == CORPUS.d_sae and r.meta.lmdb_engine.startswith("0.9")
        assert r.meta.run_config == {"model": "synthetic", "seed": 0}
        start = 0
        for w in (0, 17, N_WINDOWS - 1):
            start = int(lens[:w].sum())
            view = r.window(w)
            np.testing.assert_array_equal(view.token_ids, data["tokens"][w])
            assert view.tokens[0] == CORPUS.vocab()[data["tokens"][w][0]]
            assert [tuple(vars(s).values()) for s in view.segments] == [
                tuple(s) for s in data["segments"][w]
            ]
            for pos in range(lens[w]):
                tf = r.token(w, pos)
                g = start + pos
                act = (v16[g] != 0) & data["mask"][g]
                expect = dict(
                    zip(data["feature_ids"][g][act].tolist(), v16[g][act].tolist(), strict=False)
                )
                assert (
                    dict(zip(tf.feature_ids.tolist(), tf.values.tolist(), strict=False)) == expect
                )
                assert list(tf.values) == sorted(tf.values, reverse=True)
                assert tf.counted == data["mask"][g]
        # stats agree with a count over the input
        active = (v16 != 0) & data["mask"][:, None]
        counts = np.bincount(data["feature_ids"][active], minlength=CORPUS.d_sae)
        page = r.features(sort="id", descending=False, page_size=CORPUS.d_sae)
        np.testing.assert_array_equal(page.count, counts)
        top = int(np.argmax(counts))
        st = r.stats(top)
        assert st.count == counts[top] == st.histogram.sum()
        assert st.density == pytest.approx(counts[top] / data["mask"].sum())
        vals = v16[active][data["feature_ids"][active] == top].astype(np.float64)
        assert st.mean == pytest.approx(vals.mean()) and st.max == vals.max()
        assert st.std == pytest.approx(vals.std(), abs=1e-4)


def test_feature_detail_examples_contexts_and_search(built):
    with open_index(built) as r:
        page = r.features(sort="count", page_size=3)
        f = int(page.feature[0])
        assert page.count[0] >= page.count[1] >= page.count[2]
        detail = r.feature(f, n_examples=10)
        ex = detail.examples
        assert len(ex) == 10
        assert [e.value for e in ex] == sorted((e.value for e in ex), reverse=True)
        for e in ex:
            assert e.activations[e.position] == pytest.approx(e.value)
            assert len(e.tokens) == len(e.token_ids) == len(e.activations)
            assert e.global_index == e.window * CORPUS.ctx_len + e.position
            tf = r.token(e.window, e.position)
            assert f in tf.feature_ids.tolist()
        # ties broken by the earliest global index
        for a, b in itertools.pairwise(ex):
            if a.value == b.value:
                assert a.global_index < b.global_index
        assert sum(c for _, c in detail.top_tokens) == min(r.meta.top_k, detail.stats.count)
        assert detail.samples and all(
            iv.low <= e.value < iv.high or iv.low == 2.0**-8
            for iv in detail.samples
            for e in iv.examples
        )
        word, _ = detail.top_tokens[0]
        hits = r.search_tokens(word, exact=True)
        assert f in [m.feature for m in hits]
        assert all(word in m.tokens for m in hits)
        ctx = r.document_context(ex[0].global_index, radius=40)
        assert ctx.token_ids[ctx.focus] == ex[0].token_ids[ex[0].position]
        assert ctx.doc_id == ex[0].doc_id


def test_features_table_sort_filter_page(built):
    with open_index(built) as r:
        full = r.features(sort="density", page_size=1000)
        assert full.total == CORPUS.d_sae
        assert np.all(np.diff(full.density) <= 0)
        p2 = r.features(sort="density", page=1, page_size=10)
        np.testing.assert_array_equal(p2.feature, full.feature[10:20])
        alive = r.features(filter=FeatureFilter(alive=True), page_size=1000)
        assert alive.total == int((full.count > 0).sum())
        dense = r.features(filter=FeatureFilter(min_density=0.05), page_size=1000)
        assert np.all(dense.density >= 0.05) and dense.total == int((full.density >= 0.05).sum())
        asc = r.features(sort="max", descending=False, page_size=1000)
        assert np.all(np.diff(asc.max) >= 0)
        with pytest.raises(SaetuiInputError, match="sort"):
            r.features(sort="bogus")


def test_labels_bookmarks_and_neighbours(tmp_path):
    path = tmp_path / "ix"
    with IndexWriter.create_or_resume(
        path, {"m": 1}, CORPUS.d_sae, CORPUS.ctx_len, CORPUS.vocab()
    ) as w:
        w.add_windows(**CORPUS.windows(0, 4))
        ids = (np.arange(CORPUS.d_sae)[:, None] + np.arange(1, 4)[None, :]) % CORPUS.d_sae
        ids[5, 2] = -1
        w.put_neighbours("decoder_cosine", ids, np.full(ids.shape, 0.5, np.float32))
        w.put_metrics({"explained_variance": 0.9})
        w.put_meta("note", {"a": [1, 2]})
        w.finish()
    with open_index(path) as r:
        nb = r.neighbours(5)["decoder_cosine"]
        assert nb.ids.tolist() == [6, 7] and nb.scores.tolist() == [0.5, 0.5]
        assert r.metrics() == {"explained_variance": 0.9} and r.get_meta("note") == {"a": [1, 2]}
        assert r.labels() == {} and not (path / "user").exists()  # reading creates nothing
        r.set_label(3, "cats", notes="fires on cat")
        r.set_labels({4: "dogs", 5: ("photo", "n")})
        r.add_bookmark(7, "check")
    with open_index(path) as r:  # persisted
        assert {f: lab.label for f, lab in r.labels().items()} == {3: "cats", 4: "dogs", 5: "photo"}
        assert r.label(3).notes == "fires on cat"
        assert [b.feature for b in r.bookmarks()] == [7]
        page = r.features(filter=FeatureFilter(label_contains="cat"))
        assert page.feature.tolist() == [3] and page.labels == ["cats"]
        r.delete_label(3)
        r.remove_bookmark(7)
        assert 3 not in r.labels() and r.bookmarks() == []


def test_resume_refuses_other_config_and_keeps_files(tmp_path):
    path = tmp_path / "ix"
    write_synthetic(path, CORPUS, 10)
    data_file = path / "shard-00000" / "data.mdb"
    before = hashlib.sha256(data_file.read_bytes()).hexdigest()
    with pytest.raises(SaetuiInputError, match=r"run_config\.model.*ctx_len|ctx_len"):
        IndexWriter.create_or_resume(path, {"model": "other", "seed": 0}, 256, 64, CORPUS.vocab())
    with pytest.raises(SaetuiInputError, match="vocabulary"):
        IndexWriter.create_or_resume(
            path, {"model": "synthetic", "seed": 0}, 256, 32, CORPUS.vocab()[:-1]
        )
    assert hashlib.sha256(data_file.read_bytes()).hexdigest() == before
    # overwrite rebuilds from scratch
    with IndexWriter.create_or_resume(
        path, {"model": "other"}, 256, 32, CORPUS.vocab(), overwrite=True
    ) as w:
        assert w.next_window == 0
        w.add_windows(**CORPUS.windows(0, 2))
    with open_index(path) as r:
        assert r.progress().windows == 2 and r.meta.run_config == {"model": "other"}


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(SaetuiInputError, match="does not exist"):
        open_index(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(SaetuiInputError, match="not a saetui index"):
        open_index(tmp_path / "plain")
    with pytest.raises(SaetuiInputError, match="not a saetui index"):
        IndexWriter.create_or_resume(tmp_path / "plain", {}, 8, 8, ["a"])
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["x.txt"]

    path = tmp_path / "ix"
    write_synthetic(path, CORPUS, 12)
    marker = json.loads((path / "saetui-index.json").read_text())
    (path / "saetui-index.json").write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(SaetuiInputError, match="format version 99"):
        open_index(path)
    (path / "saetui-index.json").write_text(json.dumps(marker))

    data_file = path / "shard-00000" / "data.mdb"
    original = data_file.read_bytes()
    data_file.write_bytes(original[: len(original) // 2])
    with pytest.raises(SaetuiInputError, match="truncated"):
        open_index(path)
    assert data_file.stat().st_size == len(original) // 2  # nothing modified

    data_file.write_bytes(b"\xff" * 8192 + original[8192:])
    with pytest.raises(SaetuiInputError, match=r"LMDB|damaged"):
        open_index(path)

    # a damaged forward block: flip bytes inside the stored zstd frame of window 3
    data_file.write_bytes(original)
    with open_index(path) as r:
        blob_window = r.window(3)
    assert blob_window.window == 3
    import lmdb

    env = lmdb.open(str(path / "shard-00000"), max_dbs=16, readonly=True, lib_version=0)
    fwd_db = env.open_db(b"fwd", create=False)
    with env.begin() as txn:
        fwd = codec.chunk_blob(txn.get((0).to_bytes(8, "big"), db=fwd_db), 3)  # window 3
    env.close()
    at = original.find(fwd)
    assert at > 0
    broken = bytearray(original)
    broken[at + 12 : at + 40] = b"\x00" * 28
    data_file.write_bytes(bytes(broken))
    with open_index(path) as r:
        with pytest.raises(SaetuiInputError, match="damaged record"):
            r.token(3, 0)
        assert r.token(4, 0).window == 4  # the rest stays readable


def test_missing_committed_records_are_damage_sentences(tmp_path):
    """A committed window record or progress record that is gone reads as damage, with the
    shard named (not a TypeError from decoding None)."""
    import lmdb

    from saetui.errors import IndexDamagedError

    path = tmp_path / "ix"
    write_synthetic(path, CORPUS, 12)
    env = lmdb.open(str(path / "shard-00000"), max_dbs=16, lib_version=0)
    with env.begin(write=True) as txn:
        assert txn.delete((5).to_bytes(8, "big"), db=env.open_db(b"tok", txn=txn, create=False))
    env.close()
    with open_index(path) as r:
        with pytest.raises(IndexDamagedError, match=r"window 5 of shard 0 .* missing"):
            list(r.iter_forward())
        with pytest.raises(IndexDamagedError, match=r"window 5 of shard 0 .* missing"):
            list(r.scan_forward(0))
        assert r.window(4).window == 4  # the rest stays readable

    env = lmdb.open(str(path / "shard-00000"), max_dbs=16, lib_version=0)
    with env.begin(write=True) as txn:
        txn.delete(b"progress", db=env.open_db(b"meta", txn=txn, create=False))
    env.close()
    with (
        open_index(path) as r,
        pytest.raises(IndexDamagedError, match=r"shard 0 of the index .* no progress record"),
    ):
        r.progress()


def test_lru_keeps_the_most_recently_used():
    from saetui.index.lru import LRU

    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now the most recent
    cache.put("c", 3)  # drops "b", the least recent
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def test_out_of_range_queries(built):
    with open_index(built) as r:
        for call, match in (
            (lambda: r.feature(CORPUS.d_sae), "out of range"),
            (lambda: r.stats(-1), "out of range"),
            (lambda: r.token(N_WINDOWS, 0), "not in the index"),
            (lambda: r.token(0, CORPUS.ctx_len), "outside window"),
            (lambda: r.window(-3), "window id"),
            (lambda: r.token(0, 0, shard=4), "shard 4"),
            (lambda: r.search_tokens(""), "empty"),
        ):
            with pytest.raises(SaetuiInputError, match=match):
                call()


def test_bad_writer_input_is_refused(tmp_path):
    path = tmp_path / "ix"
    with IndexWriter.create_or_resume(path, {}, CORPUS.d_sae, CORPUS.ctx_len, CORPUS.vocab()) as w:
        good = CORPUS.windows(0, 2)
        bad_vals = good["values"].copy()
        bad_vals[0, 0] = -1
        bad_ids = good["feature_ids"].copy()
        bad_ids[good["values"] > 0] = CORPUS.d_sae
        for kwargs, match in (
            ({**good, "values": bad_vals}, ">= 0"),
            ({**good, "feature_ids": bad_ids}, "feature ids"),
            ({**good, "window_ids": [5, 6]}, "expected window 0"),
            ({**good, "mask": good["mask"][:-1]}, "mask"),
            ({**good, "segments": [[(0, 0, 0, 99)], [(0, 0, 0, 1)]]}, "segments"),
        ):
            with pytest.raises(SaetuiInputError, match=match):
                w.add_windows(**kwargs)
        w.add_windows(**good)
    with open_index(path) as r:
        assert r.progress().windows == 2


def test_map_full_is_clear_and_resumable(tmp_path):
    path = tmp_path / "ix"
    n = 300
    with pytest.raises(SaetuiInputError, match="map size"):
        write_synthetic(path, CORPUS, n, map_size=64 * 4096)
    with open_index(path) as r:
        committed = r.progress().windows
    assert committed < n
    write_synthetic(path, CORPUS, n)
    ref = tmp_path / "ref"
    write_synthetic(ref, CORPUS, n)
    with open_index(path) as a, open_index(ref) as b:
        assert a.progress().windows == n
        pa = a.features(sort="id", page_size=CORPUS.d_sae)
        pb = b.features(sort="id", page_size=CORPUS.d_sae)
        np.testing.assert_array_equal(pa.count, pb.count)
        np.testing.assert_array_equal(pa.mean, pb.mean)


def test_shards_are_read_as_one(tmp_path):
    path = tmp_path / "ix"
    other = SyntheticCorpus(d_sae=256, ctx_len=32, k=8, seed=1)
    write_synthetic(path, CORPUS, 20)
    # a second writer over a disjoint corpus shard (same run config)
    with IndexWriter.create_or_resume(
        path, {"model": "synthetic", "seed": 0}, 256, 32, CORPUS.vocab(), shard=1
    ) as w:
        w.add_windows(**other.windows(0, 15))
        w.finish()
    with open_index(path / "shard-00000" / "..") as r:
        assert r.meta.n_shards == 2
        assert r.progress().windows == 35
        page = r.features(sort="count", page_size=1)
        f = int(page.feature[0])
        d0 = CORPUS.windows(0, 20, n_total=20)
        d1 = other.windows(0, 15)
        expect = sum(
            int(
                ((codec.to_fp16(d["values"]) != 0) & d["mask"][:, None])[
                    d["feature_ids"] == f
                ].sum()
            )
            for d in (d0, d1)
        )
        assert r.stats(f).count == expect
        ex = r.top_examples(f, 64)
        assert {e.shard for e in ex} == {0, 1}
        assert [e.value for e in ex] == sorted((e.value for e in ex), reverse=True)
        for e in ex[:5]:
            assert r.token(e.window, e.position, shard=e.shard).feature_ids.tolist().count(f) == 1


def test_reader_threads_agree(built):
    with open_index(built) as r:
        features = list(range(0, CORPUS.d_sae, 7))
        expected = {f: [e.global_index for e in r.top_examples(f, 20)] for f in features}
        errors = []

        def work():
            try:
                for f in features:
                    assert [e.global_index for e in r.top_examples(f, 20)] == expected[f]
                    r.stats(f)
                    r.features(sort="mean", page=f % 3)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def test_reader_in_other_process_sees_only_committed_data(tmp_path):
    """A real writer process appends while this process reads: every read is consistent."""
    path = tmp_path / "ix"
    n = 1500
    args = {
        "path": str(path),
        "n_windows": n,
        "batch_windows": 5,
        "corpus": {"d_sae": 256, "ctx_len": 32, "k": 8, "seed": 0},
        "writer": {"commit_interval": 0.02, "checkpoint_interval": 0.1},
    }
    proc = subprocess.Popen([sys.executable, "-m", "saetui.index.synthetic", json.dumps(args)])
    data = CORPUS.windows(0, n, n_total=n)
    lens = np.array([len(t) for t in data["tokens"]])
    v16 = codec.to_fp16(data["values"])
    active = (v16 != 0) & data["mask"][:, None]
    win_of_token = np.repeat(np.arange(n), lens)
    # per-window feature counts and counted tokens, cumulated: what any prefix should show
    per_window = np.zeros((n + 1, CORPUS.d_sae), np.int64)
    rows, cols = np.nonzero(active)
    np.add.at(per_window, (win_of_token[rows] + 1, data["feature_ids"][rows, cols]), 1)
    cum_counts = np.cumsum(per_window, axis=0)
    cum_counted = np.concatenate([[0], np.cumsum(np.bincount(win_of_token[data["mask"]]))])
    seen = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                r = open_index(path)
            except SaetuiInputError:
                time.sleep(0.05)
                continue
            with r:
                p = r.progress()
                seen.add(p.windows)
                if p.windows:
                    w = p.windows - 1  # the newest committed window is complete
                    np.testing.assert_array_equal(r.window(w).token_ids, data["tokens"][w])
                with pytest.raises(SaetuiInputError, match="not in the index"):
                    r.token(n + 3, 0)
                # the summaries are those of exactly some committed prefix of windows
                page = r.features(sort="id", descending=False, page_size=CORPUS.d_sae)
                covered = int(np.searchsorted(cum_counted, page.counted_tokens))
                assert cum_counted[covered] == page.counted_tokens
                np.testing.assert_array_equal(page.count, cum_counts[covered])
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(seen) >= 2, "the reader should have seen the index grow"
    with open_index(path) as r:
        assert r.progress().windows == n and r.progress().finished


def test_reading_does_not_import_torch_or_textual(built):
    code = (
        "import sys; from saetui.index import open_index; "
        f"r = open_index({str(built)!r}); r.feature(1); r.features(); "
        "bad = [m for m in ('torch', 'textual', 'rich') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_share_copy_has_no_local_paths_or_timestamps_and_reads_the_same(
    tmp_path, tmp_path_factory, tiny_index
):
    import shutil
    import subprocess
    import sys

    from saetui.index.share import share_copy

    source = tmp_path / "source"
    shutil.copytree(tiny_index[2], source)
    with open_index(source) as r:
        r.set_label(3, "private note")
        assert str(tmp_path_factory.getbasetemp()) in str(r.meta.run_config)  # paths inside
    secret = str(tmp_path_factory.getbasetemp()).encode()
    copy = share_copy(source, tmp_path / "shared", labels=False)
    for path in copy.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    with open_index(source) as a, open_index(copy) as b:
        assert a.progress().tokens == b.progress().tokens
        assert b.progress().updated == 0 and b.label(3) is None
        for feature in (0, 5, 17):
            assert [e.global_index for e in a.top_examples(feature, 5)] == [
                e.global_index for e in b.top_examples(feature, 5)
            ]
    result = subprocess.run(
        [sys.executable, "-m", "saetui", "share", str(source), str(tmp_path / "with-labels")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with open_index(tmp_path / "with-labels") as b:
        assert b.label(3).label == "private note"
    again = subprocess.run(
        [sys.executable, "-m", "saetui", "share", str(source), str(tmp_path / "with-labels")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "exists" in again.stderr

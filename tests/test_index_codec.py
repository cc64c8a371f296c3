"""Round-trip and determinism properties of the index codecs and summary accumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saetui.index import codec
from saetui.index.format import GIDX_BITS, GIDX_MASK, HIST_MIN_OCTAVE, N_SAMPLE_BINS
from saetui.index.records import summary_records
from saetui.index.summary import FeatureSummaries, sample_hash
from saetui.index.synthetic import SyntheticCorpus


@st.composite
def batches(draw):
    n_windows = draw(st.integers(1, 4))
    lengths = np.array(draw(st.lists(st.integers(1, 20), min_size=n_windows, max_size=n_windows)))
    k = draw(st.sampled_from([1, 3, 8, 300]))
    d_sae = draw(st.sampled_from([5, 1000, 131072, 1 << 24]))
    n = int(lengths.sum())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.stack([rng.choice(d_sae, min(k, d_sae), replace=False) for _ in range(n)])
    if ids.shape[1] < k:
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])))
    scale = draw(st.sampled_from([1e-9, 1e-3, 1.0, 1e3, 1e6]))
    vals = (rng.lognormal(0, 2, (n, k)) * scale).astype(np.float32)
    vals[rng.random((n, k)) < draw(st.sampled_from([0.0, 0.5, 1.0]))] = 0
    if ids.shape[1] > d_sae:  # padded duplicate ids stay inactive
        vals[:, d_sae:] = 0
    mask = rng.random(n) > 0.2
    tokens = rng.integers(0, 2**32, n, dtype=np.uint32)
    segments = []
    for w in range(n_windows):
        cut = int(rng.integers(0, lengths[w] + 1))
        segs = [(7 * w, 0, 0, cut), (7 * w + 1, 3, cut, int(lengths[w]) - cut)]
        segments.append(np.array([s for s in segs if s[3] > 0], dtype=np.int64).reshape(-1, 4))
    return lengths, tokens, segments, ids, vals, mask


@settings(max_examples=60, deadline=None)
@given(batches())
def test_forward_and_window_records_round_trip(batch):
    lengths, tokens, segments, ids, vals, mask = batch
    v16 = codec.to_fp16(vals)
    assert np.all((v16 > 0) == (vals > 0)), "positive values must stay active in fp16"
    enc = codec.encode_batch(lengths, tokens, segments, ids, v16, mask)
    start = 0
    for w, n in enumerate(lengths):
        blk = codec.decode_forward(enc.fwd_records[w])
        rec = codec.decode_window(enc.tok_records[w])
        assert blk.n_tokens == n
        np.testing.assert_array_equal(rec.token_ids, tokens[start : start + n])
        np.testing.assert_array_equal(rec.mask, mask[start : start + n])
        np.testing.assert_array_equal(rec.segments, segments[w])
        assert rec.n_counted == mask[start : start + n].sum()
        for t in range(n):
            g = start + t
            active = (v16[g] != 0) & mask[g]
            order = np.argsort(ids[g][active], kind="stable")
            a, b = blk.offsets[t], blk.offsets[t + 1]
            np.testing.assert_array_equal(blk.feature_ids[a:b], ids[g][active][order])
            np.testing.assert_array_equal(blk.values16[a:b], v16[g][active][order])
        # the single-feature decoder used by top_examples agrees with the full decode
        for f in {*blk.feature_ids[:3].tolist(), int(ids.max()) + 1}:
            np.testing.assert_array_equal(
                codec.feature_activations(enc.fwd_records[w], f), blk.feature_activations(f)
            )
        start += n
    assert enc.nnz == sum(int(((v16 != 0) & mask[:, None]).sum()) for _ in [0])


def test_corrupt_blocks_raise_corrupt_block_error():
    enc = codec.encode_batch(
        np.array([2]),
        np.array([1, 2], np.uint32),
        [np.zeros((0, 4), np.int64)],
        np.array([[1, 2], [3, 4]]),
        codec.to_fp16(np.ones((2, 2))),
        np.ones(2, bool),
    )
    for bad in (b"", b"garbage", enc.fwd_records[0][:-3], codec.compress(b"\x01\x00\x05")):
        for decode in (
            codec.decode_forward,
            codec.decode_window,
            lambda b: codec.feature_activations(b, 1),
        ):
            with pytest.raises(codec.CorruptBlockError):  # decoding garbage must fail
                decode(bad)


def _reference(corpus: SyntheticCorpus, n_windows: int, top_k: int, s: int):
    """Brute-force summaries over the fp16-rounded synthetic data."""
    data = corpus.windows(0, n_windows, n_total=n_windows)
    lens = np.array([len(t) for t in data["tokens"]])
    wid = np.repeat(np.arange(n_windows), lens)
    pos = np.concatenate([np.arange(n) for n in lens])
    gidx = wid * corpus.ctx_len + pos
    toks = np.concatenate(data["tokens"]).astype(np.int64)
    v16 = codec.to_fp16(data["values"])
    active = (v16 != 0) & data["mask"][:, None]
    rows, cols = np.nonzero(active)
    f = data["feature_ids"][rows, cols]
    vals = v16[rows, cols]
    bits = vals.view(np.uint16).astype(np.int64)
    g = gidx[rows]
    ref = {}
    for feat in np.unique(f):
        sel = f == feat
        order = np.lexsort((g[sel], -vals[sel].astype(np.float64)))[:top_k]
        octave = np.clip((bits[sel] >> 10) - 15 - HIST_MIN_OCTAVE, 0, N_SAMPLE_BINS - 1)
        h = sample_hash(torch.full((int(sel.sum()),), int(feat)), torch.as_tensor(g[sel])).numpy()
        samples = set()
        for o in np.unique(octave):
            in_o = np.flatnonzero(octave == o)
            samples |= set(g[sel][in_o[np.argsort(h[in_o])[:s]]].tolist())
        ref[int(feat)] = {
            "count": int(sel.sum()),
            "sum": float(vals[sel].astype(np.float64).sum()),
            "max": float(vals[sel].max()),
            "top_gidx": g[sel][order].tolist(),
            "top_tok": toks[rows][sel][order].tolist(),
            "samples": samples,
        }
    return data, lens, ref, int(data["mask"].sum())


def test_summaries_match_brute_force_and_ignore_batching():
    corpus = SyntheticCorpus(d_sae=64, ctx_len=16, k=6, seed=3)
    n_windows, top_k, s = 40, 5, 2
    data, lens, ref, n_counted = _reference(corpus, n_windows, top_k, s)
    toks = np.concatenate(data["tokens"]).astype(np.int64)
    snaps = []
    for cuts in ([40], [1, 7, 13, 19], [3] * 14):
        acc = FeatureSummaries(corpus.d_sae, corpus.ctx_len, top_k, s)
        acc.topk.flush_at = acc.samples.flush_at = 50  # force many intermediate merges
        w = t = 0
        for c in cuts:
            c = min(c, n_windows - w)
            if c <= 0:
                break
            n = int(lens[w : w + c].sum())
            acc.update_windows(
                w,
                lens[w : w + c],
                toks[t : t + n],
                data["feature_ids"][t : t + n],
                data["values"][t : t + n],
                data["mask"][t : t + n],
            )
            w, t = w + c, t + n
        if w < n_windows:
            n = int(lens[w:].sum())
            acc.update_windows(
                w,
                lens[w:],
                toks[t:],
                data["feature_ids"][t:],
                data["values"][t:],
                data["mask"][t:],
            )
        snaps.append(acc.snapshot())
    for other in snaps[1:]:
        for name in ("count", "sum_fx", "sumsq_fx", "max_bits", "hist", "topk_key", "topk_tok"):
            np.testing.assert_array_equal(getattr(snaps[0], name), getattr(other, name))
        np.testing.assert_array_equal(snaps[0].samp_gidx, other.samp_gidx)
    snap = snaps[0]
    assert snap.n_counted == n_counted
    for feat in range(corpus.d_sae):
        r = ref.get(feat)
        if r is None:
            assert snap.count[feat] == 0 and snap.topk_key[feat, 0] == -1
            continue
        assert snap.count[feat] == r["count"] == snap.hist[feat].sum()
        assert abs(snap.sum_fx[feat] / 2**24 - r["sum"]) < 1e-6
        assert np.uint16(snap.max_bits[feat]).view(np.float16) == r["max"]
        keys = snap.topk_key[feat][snap.topk_key[feat] >= 0]
        assert (GIDX_MASK - (keys & GIDX_MASK)).tolist() == r["top_gidx"]
        assert (keys >> GIDX_BITS).tolist() == sorted((keys >> GIDX_BITS).tolist(), reverse=True)
        assert snap.topk_tok[feat][: len(keys)].tolist() == r["top_tok"]
        got = set(snap.samp_gidx[feat][snap.samp_gidx[feat] >= 0].tolist())
        assert got == r["samples"]


def test_summary_records_round_trip_through_lmdb(tmp_path):
    import lmdb

    from saetui.index.records import load_snapshot_records

    corpus = SyntheticCorpus(d_sae=1500, ctx_len=16, k=6, seed=4)
    data = corpus.windows(0, 30)
    acc = FeatureSummaries(corpus.d_sae, corpus.ctx_len, 7, 3)
    lens = np.array([len(t) for t in data["tokens"]])
    acc.update_windows(
        0,
        lens,
        np.concatenate(data["tokens"]).astype(np.int64),
        data["feature_ids"],
        data["values"],
        data["mask"],
    )
    snap = acc.snapshot()
    env = lmdb.open(str(tmp_path / "e"), max_dbs=8, lib_version=0)
    dbs = {}
    with env.begin(write=True) as txn:
        for name, recs in summary_records(snap).items():
            dbs[name.encode()] = env.open_db(name.encode(), txn=txn)
            with txn.cursor(db=dbs[name.encode()]) as cur:
                assert cur.putmulti(recs, append=True)[1] == len(recs)
    with env.begin() as txn:
        back = load_snapshot_records(txn, dbs, corpus.d_sae)
    env.close()
    for name in (
        "count", "sum_fx", "sumsq_fx", "max_bits", "hist", "topk_key", "topk_tok",
        "samp_gidx", "samp_bits", "samp_tok",
    ):  # fmt: skip
        np.testing.assert_array_equal(getattr(snap, name), getattr(back, name), err_msg=name)
    # a restored accumulator continues exactly like the original
    acc2 = FeatureSummaries(corpus.d_sae, corpus.ctx_len, 7, 3)
    acc2.load_snapshot(back)
    more = corpus.windows(30, 10)
    lens2 = np.array([len(t) for t in more["tokens"]])
    for a in (acc, acc2):
        a.update_windows(
            30,
            lens2,
            np.concatenate(more["tokens"]).astype(np.int64),
            more["feature_ids"],
            more["values"],
            more["mask"],
        )
    s1, s2 = acc.snapshot(), acc2.snapshot()
    np.testing.assert_array_equal(s1.topk_key, s2.topk_key)
    np.testing.assert_array_equal(s1.samp_gidx, s2.samp_gidx)
    np.testing.assert_array_equal(s1.hist, s2.hist)

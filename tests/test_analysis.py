"""Neighbours and effects against brute-force dense computations."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from saetui.analysis.cooccurrence import cooccurrence_neighbours
from saetui.analysis.neighbours import decoder_cosine_neighbours, logit_effects


def test_decoder_cosine_neighbours_match_dense_matrix():
    torch.manual_seed(0)
    w_dec = torch.randn(50, 8)
    ids, scores = decoder_cosine_neighbours(w_dec, top_n=5, chunk=7)
    unit = torch.nn.functional.normalize(w_dec, dim=-1)
    dense = unit @ unit.T
    dense.fill_diagonal_(-2)
    expected = dense.topk(5, dim=-1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(ids, expected.indices)
    assert not (ids == torch.arange(50)[:, None]).any()
    # a share of the rows (a rank's), in chunks bounded by bytes: the same rows
    part_ids, part_scores = decoder_cosine_neighbours(
        w_dec, top_n=5, rows=(13, 41), max_chunk_bytes=3 * 50 * 4
    )
    assert torch.equal(part_ids, ids[13:41])
    torch.testing.assert_close(part_scores, scores[13:41])


def test_logit_effects_are_top_and_bottom_of_dec_times_unembed():
    torch.manual_seed(1)
    w_dec, w_u = torch.randn(30, 8), torch.randn(8, 40)
    up_ids, up_vals, down_ids, down_vals = logit_effects(w_dec, w_u, top_n=3, chunk=4)
    effects = w_dec @ w_u
    torch.testing.assert_close(up_vals, effects.topk(3, dim=-1).values)
    torch.testing.assert_close(down_vals, effects.topk(3, dim=-1, largest=False).values)
    # Chunked and whole matmuls may differ in the last bit: compare values, not bits.
    torch.testing.assert_close(effects.gather(1, up_ids), up_vals)
    torch.testing.assert_close(effects.gather(1, down_ids), down_vals)


def test_logit_effects_ignore_unembedding_rows_past_the_tokenizer():
    # Real checkpoints pad W_U past the tokenizer; padding columns must never be reported,
    # however large their effect.
    torch.manual_seed(2)
    w_dec, w_u = torch.randn(12, 8), torch.randn(8, 40)
    w_u[:, 30:] = 100 * w_dec.sum(0, keepdim=True).T.sign()
    up_ids, up_vals, down_ids, _ = logit_effects(w_dec, w_u, top_n=5, vocab_size=30)
    assert int(up_ids.max()) < 30 and int(down_ids.max()) < 30
    expected = (w_dec @ w_u[:, :30]).topk(5, dim=-1)
    torch.testing.assert_close(up_vals, expected.values)
    padded_ids, _, _, _ = logit_effects(w_dec, w_u, top_n=5)
    assert int(padded_ids.max()) >= 30  # without the limit the padding wins
    # A vocabulary smaller than top_n gives every token once.
    few_ids, _, _, _ = logit_effects(w_dec, w_u, top_n=5, vocab_size=3)
    assert few_ids.shape == (12, 3) and sorted(few_ids[0].tolist()) == [0, 1, 2]


def test_cooccurrence_matches_dense_counts_across_chunks():
    rng = np.random.default_rng(0)
    d_sae, tokens = 40, 600
    # Correlated features: 3 and 4 fire together often.
    dense = rng.random((tokens, d_sae)) < 0.08
    dense[:, 4] |= dense[:, 3] & (rng.random(tokens) < 0.9)
    matrix = sp.csr_matrix(dense.astype(np.float32))

    def chunks():
        return (matrix[i : i + 97] for i in range(0, tokens, 97))

    result = cooccurrence_neighbours(chunks, d_sae, top_n=4, min_count=3, candidates=80)
    counts = dense.sum(0)
    pair = dense.T.astype(np.int64) @ dense.astype(np.int64)
    assert result.tokens == tokens
    assert np.array_equal(result.counts, counts)
    np.fill_diagonal(pair, 0)
    jaccard = pair / (counts[:, None] + counts[None, :] - pair)
    jaccard[pair < 3] = -np.inf
    for feature in range(d_sae):
        best = np.sort(jaccard[feature])[::-1][:4]
        got = result.scores["jaccard"][feature]
        np.testing.assert_allclose(got[np.isfinite(best)], best[np.isfinite(best)], rtol=1e-6)
        for neighbour in result.ids["jaccard"][feature]:
            assert neighbour == -1 or pair[feature, neighbour] >= 3
    assert result.ids["jaccard"][3][0] == 4
    assert result.ids["p_g_given_f"][3][0] == 4
    p_4_given_3 = pair[3, 4] / counts[3]
    np.testing.assert_allclose(result.scores["p_g_given_f"][3][0], p_4_given_3, rtol=1e-6)
    p_fg, p_f, p_g = pair[3, 4] / tokens, counts[3] / tokens, counts[4] / tokens
    npmi = np.log(p_fg / (p_f * p_g)) / -np.log(p_fg)
    assert result.ids["npmi"][3][0] == 4
    np.testing.assert_allclose(result.scores["npmi"][3][0], npmi, rtol=1e-6)


def test_cooccurrence_of_an_empty_collection():
    result = cooccurrence_neighbours(lambda: iter(()), 10, top_n=3)
    assert result.tokens == 0 and (result.ids["npmi"] == -1).all()

"""Encode/decode of every format and architecture against plain-torch references."""

from __future__ import annotations

import json
import os

import pytest
import torch
from sae_fixtures import (
    D_IN,
    D_SAE,
    K,
    write_gemma_scope,
    write_sae_core,
    write_saelens,
    write_sparsify,
)

from saetui.errors import SaetuiInputError
from saetui.sae import load_sae

# Tests run on the accelerator when SAETUI_TEST_DEVICE says so (e.g. "cuda"); cpu otherwise.
DEVICE = torch.device(os.environ.get("SAETUI_TEST_DEVICE", "cpu"))
ATOL = 1e-5


def activations(*shape: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D_IN, generator=gen).to(DEVICE)


def on(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(DEVICE) for name, t in tensors.items()}


def keep_top_per_row(acts: torch.Tensor, k: int) -> torch.Tensor:
    """Reference top-k: keep values at least as large as each row's k-th largest."""
    kth = acts.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return acts * (acts >= kth)


def keep_top_overall(acts: torch.Tensor, budget: int) -> torch.Tensor:
    kth = acts.reshape(-1).sort(descending=True).values[budget - 1]
    return acts * (acts >= kth)


def decode_ref(acts: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return acts @ t["W_dec"] + t["b_dec"]


def densify(indices: torch.Tensor, values: torch.Tensor, d_sae: int = D_SAE) -> torch.Tensor:
    dense = torch.zeros(indices.shape[0], d_sae, dtype=values.dtype, device=values.device)
    return dense.scatter_add_(1, indices, values)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=1e-4)


def check_sparse_matches_dense(sae, x: torch.Tensor, mask=None) -> tuple[torch.Tensor, ...]:
    dense = sae.encode(x, mask).reshape(-1, sae.d_sae)
    indices, values = sae.encode_sparse(x, mask)
    assert indices.dtype == torch.long and indices.shape == values.shape
    assert indices.shape[0] == dense.shape[0]
    assert_close(densify(indices, values), dense)
    assert_close(sae.decode_sparse(indices, values), sae.decode(dense))
    return indices, values


# ---------------------------------------------------------------- sae_core


def test_sae_core_relu_matches_reference(tmp_path):
    directory, t = write_sae_core(tmp_path / "sae", top_k=None)
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(3, 7)
    expected = torch.relu(x @ t["W_enc"] + t["b_enc"])
    assert sae.architecture == "relu" and sae.format == "sae_core" and sae.k is None
    assert_close(sae.encode(x), expected)
    assert_close(sae.decode(expected), decode_ref(expected, t))
    assert_close(sae(x), decode_ref(expected, t))
    indices, _ = check_sparse_matches_dense(sae, x)
    assert indices.shape[1] == int((expected > 0).sum(-1).max())


def test_sae_core_batchtopk_per_token_ignores_b_enc(tmp_path):
    directory, t = write_sae_core(tmp_path / "sae", top_k=K)
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(2, 9)
    pre = torch.relu((x - t["b_dec"]) @ t["W_enc"])
    expected = keep_top_per_row(pre, K)
    assert sae.architecture == "batchtopk" and sae.batchtopk_mode == "per-token"
    assert_close(sae.encode(x), expected)
    assert ((sae.encode(x) > 0).sum(-1) <= K).all()
    indices, _ = check_sparse_matches_dense(sae, x)
    assert indices.shape[1] == K
    assert_close(sae(x), decode_ref(expected, t))


def test_batchtopk_batch_mode_keeps_n_times_k_over_the_batch(tmp_path):
    directory, t = write_sae_core(tmp_path / "sae", top_k=K)
    sae = load_sae(directory, batchtopk_mode="batch", device=DEVICE)
    t = on(t)
    x = activations(3, 6)
    pre = torch.relu((x - t["b_dec"]) @ t["W_enc"])
    expected = keep_top_overall(pre, 18 * K)
    acts = sae.encode(x)
    assert_close(acts, expected)
    assert int((acts > 0).sum()) == 18 * K
    # Tokens may hold more or fewer than k features: that is what distinguishes batch mode.
    per_token = (acts > 0).sum(-1)
    assert per_token.max() > K or per_token.min() < K
    indices, _ = check_sparse_matches_dense(sae, x)
    assert indices.shape[1] == int(per_token.max())


def test_batchtopk_batch_mode_mask_excludes_positions_from_the_competition(tmp_path):
    directory, t = write_sae_core(tmp_path / "sae", top_k=K)
    sae = load_sae(directory, batchtopk_mode="batch", device=DEVICE)
    t = on(t)
    x = activations(2, 6)
    x[:, 0] *= 50  # a BOS-like outlier that would take most of the budget
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    mask[:, 0] = False
    mask[1, 4:] = False  # padding
    n_real = int(mask.sum())
    pre = torch.relu((x - t["b_dec"]) @ t["W_enc"])
    expected = torch.zeros_like(pre)
    expected[mask] = keep_top_overall(pre[mask], n_real * K)
    acts = sae.encode(x, mask)
    assert_close(acts, expected)
    assert (acts[~mask] == 0).all()
    assert int((acts > 0).sum()) == n_real * K
    # Same as encoding only the real tokens as one batch.
    assert_close(acts[mask], sae.encode(x[mask]))
    check_sparse_matches_dense(sae, x, mask)
    # Without the mask the outliers steal the budget: the result differs.
    assert not torch.allclose(sae.encode(x)[mask], acts[mask])


def test_batchtopk_threshold_mode_given_and_estimated(tmp_path):
    directory, t = write_sae_core(tmp_path / "sae", top_k=K)
    t = on(t)
    x = activations(4, 5)
    pre = torch.relu((x - t["b_dec"]) @ t["W_enc"])
    sae = load_sae(directory, threshold=0.4, device=DEVICE)
    assert sae.batchtopk_mode == "threshold"
    assert_close(sae.encode(x), pre * (pre > 0.4))
    check_sparse_matches_dense(sae, x)

    batches = [activations(2, 5, seed=s) for s in range(3)]
    estimator = load_sae(directory, batchtopk_mode="threshold", device=DEVICE)
    with pytest.raises(SaetuiInputError, match="threshold"):
        estimator.encode(x)
    value = estimator.estimate_threshold(batches)
    # Exactly n*k activations over the whole sample exceed it: mean L0 = k.
    sample = torch.cat([b.reshape(-1, D_IN) for b in batches])
    sample_pre = torch.relu((sample - t["b_dec"]) @ t["W_enc"]).reshape(-1)
    ranked = sample_pre.sort(descending=True).values
    n_k = sample.shape[0] * K
    assert float(ranked[n_k]) < value < float(ranked[n_k - 1])
    assert int((sample_pre > value).sum()) == n_k
    assert float((estimator.encode(sample) > 0).sum(-1).float().mean()) == pytest.approx(K)
    assert_close(estimator.encode(x), pre * (pre > value))
    assert estimator.threshold_source == "estimated: mean L0 = k over 30 tokens"


def test_estimate_threshold_respects_masks(tmp_path):
    directory, _ = write_sae_core(tmp_path / "sae", top_k=K)
    sae = load_sae(directory, batchtopk_mode="threshold", device=DEVICE)
    x = activations(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    mask[:, 0] = False
    x[:, 0] = 100.0  # outliers at excluded positions must not move the threshold
    masked = sae.estimate_threshold([(x, mask)])
    plain = sae.estimate_threshold([x[mask]])
    assert masked == pytest.approx(plain)
    # Several batches give the same value as one batch holding them all.
    split = sae.estimate_threshold([x[mask][:3], x[mask][3:]])
    assert split == pytest.approx(plain)


def test_estimate_threshold_with_too_few_positive_activations_keeps_every_one(tmp_path):
    directory, _ = write_sae_core(tmp_path / "sae", top_k=D_SAE)  # k = d_sae: budget too big
    sae = load_sae(directory, batchtopk_mode="threshold", device=DEVICE)
    assert sae.estimate_threshold([activations(3)]) == 0.0
    with pytest.raises(SaetuiInputError, match="no tokens"):
        sae.estimate_threshold([(activations(3), torch.zeros(3, dtype=torch.bool))])


# ---------------------------------------------------------------- SAELens


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    directory, t = write_saelens(tmp_path / "sae", "standard", apply_b_dec_to_input=apply_b_dec)
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(5)
    sae_in = x - t["b_dec"] if apply_b_dec else x
    expected = torch.relu(sae_in @ t["W_enc"] + t["b_enc"])
    assert sae.architecture == "relu" and sae.apply_b_dec_to_input is apply_b_dec
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t))
    check_sparse_matches_dense(sae, x)


@pytest.mark.parametrize("legacy", [False, True])
def test_saelens_topk_selects_before_relu(tmp_path, legacy):
    directory, t = write_saelens(tmp_path / "sae", "topk", legacy=legacy)
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(6)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    expected = torch.relu(keep_top_per_row(pre, K))
    assert sae.architecture == "topk" and sae.k == K
    assert_close(sae.encode(x), expected)
    indices, _ = check_sparse_matches_dense(sae, x)
    assert indices.shape[1] == K
    assert_close(sae(x), decode_ref(expected, t))


def test_saelens_jumprelu(tmp_path):
    directory, t = write_saelens(tmp_path / "sae", "jumprelu")
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(2, 4)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    expected = torch.relu(pre) * (pre > t["threshold"])
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t))
    check_sparse_matches_dense(sae, x)


@pytest.mark.parametrize("legacy", [False, True])
def test_saelens_gated(tmp_path, legacy):
    directory, t = write_saelens(tmp_path / "sae", "gated", legacy=legacy)
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(7)
    sae_in = x - t["b_dec"]
    gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
    magnitude = torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    expected = gate * magnitude
    assert sae.architecture == "gated"
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t))
    check_sparse_matches_dense(sae, x)


def test_saelens_constant_norm_rescale(tmp_path):
    directory, t = write_saelens(
        tmp_path / "sae", "standard", normalize_activations="constant_norm_rescale"
    )
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(5) * 7
    coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
    expected = torch.relu((x * coeff - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t) / coeff)
    indices, values = sae.encode_sparse(x)
    assert_close(sae.decode_sparse(indices, values, x), decode_ref(expected, t) / coeff)


def test_saelens_layer_norm(tmp_path):
    directory, t = write_saelens(tmp_path / "sae", "standard", normalize_activations="layer_norm")
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(5) * 3 + 1
    mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    expected = torch.relu(((x - mu) / (std + 1e-5) - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t) * std + mu)


def test_saelens_expected_average_scale_is_applied(tmp_path):
    directory, t = write_saelens(
        tmp_path / "sae", "standard", normalize_activations="expected_average_only_in"
    )
    (directory / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(5)
    expected = torch.relu((x * 0.25 - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert sae.activation_scale == 0.25
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t) / 0.25)


def test_saelens_legacy_finetuning_scaling_factor_folds_into_decoder(tmp_path):
    directory, t = write_saelens(
        tmp_path / "sae", "standard", legacy=True, extra_config={"finetuning_scaling_factor": True}
    )
    from safetensors.torch import load_file, save_file

    weights = load_file(str(directory / "sae_weights.safetensors"))
    weights["scaling_factor"] = torch.linspace(0.5, 2.0, D_SAE)
    save_file(weights, str(directory / "sae_weights.safetensors"))
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(4)
    acts = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    scale = weights["scaling_factor"].to(DEVICE)
    assert_close(sae(x), (acts * scale) @ t["W_dec"] + t["b_dec"])


# ---------------------------------------------------------------- sparsify, Gemma Scope


def test_sparsify_topk(tmp_path):
    directory, t = write_sparsify(tmp_path, "layers.9")
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(3, 4)
    pre = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    expected = keep_top_per_row(pre, K)
    assert sae.format == "sparsify" and sae.architecture == "topk" and sae.k == K
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t))
    indices, _ = check_sparse_matches_dense(sae, x)
    assert indices.shape[1] == K


def test_sparsify_latents_from_expansion_factor(tmp_path):
    directory, _ = write_sparsify(tmp_path, "layers.2", num_latents=None)
    assert load_sae(directory).d_sae == D_SAE


def test_gemma_scope_jumprelu_without_b_dec_subtraction(tmp_path):
    directory, t = write_gemma_scope(tmp_path)
    sae = load_sae(directory, device=DEVICE)
    t = on(t)
    x = activations(2, 3)
    pre = x @ t["W_enc"] + t["b_enc"]
    expected = torch.relu(pre) * (pre > t["threshold"])
    assert sae.format == "gemma_scope" and sae.architecture == "jumprelu"
    assert not sae.apply_b_dec_to_input
    assert_close(sae.encode(x), expected)
    assert_close(sae(x), decode_ref(expected, t))
    check_sparse_matches_dense(sae, x)


# ---------------------------------------------------------------- dtypes and devices


def test_bfloat16_encode_decode(tmp_path):
    directory, t = write_sae_core(tmp_path / "relu", top_k=None)
    sae = load_sae(directory, device=DEVICE, dtype=torch.bfloat16)
    t = on(t)
    x = activations(4, 5)
    assert sae.dtype == torch.bfloat16
    acts = sae.encode(x)
    assert acts.dtype == torch.bfloat16
    expected = torch.relu(x @ t["W_enc"] + t["b_enc"])
    assert_close(acts, expected, atol=0.05)
    assert_close(sae(x), decode_ref(expected, t), atol=0.05)
    indices, values = sae.encode_sparse(x)
    assert values.dtype == torch.bfloat16
    assert_close(sae.decode_sparse(indices, values), sae.decode(acts).reshape(20, D_IN), atol=0.05)

    topk_dir, _ = write_sae_core(tmp_path / "btk", top_k=K)
    for mode in ("per-token", "batch"):
        btk = load_sae(topk_dir, batchtopk_mode=mode, device=DEVICE, dtype=torch.bfloat16)
        indices, values = btk.encode_sparse(x)
        assert values.dtype == torch.bfloat16 and (values > 0).any()
        assert btk.decode_sparse(indices, values).shape == (20, D_IN)
    btk = load_sae(topk_dir, batchtopk_mode="threshold", dtype=torch.bfloat16, device=DEVICE)
    assert btk.estimate_threshold([x]) > 0


def test_to_changes_device_and_dtype(tmp_path):
    directory, _ = write_saelens(tmp_path / "sae", "jumprelu")
    sae = load_sae(directory).to(DEVICE, torch.float64)
    assert sae.dtype == torch.float64 and sae.threshold.dtype == torch.float64
    assert sae.device.type == DEVICE.type
    assert sae.encode(activations(3).double()).dtype == torch.float64


def test_wrong_width_is_a_clear_error(tmp_path):
    directory, _ = write_sae_core(tmp_path / "sae", top_k=None)
    sae = load_sae(directory)
    with pytest.raises(SaetuiInputError, match=str(directory)):
        sae.encode(torch.randn(3, D_IN + 1))

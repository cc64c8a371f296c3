"""Ablation and steering on a tiny GPT-2, checked against hand-computed splices."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_tiny_sae

from saetui.analysis.causal import ablate, steer, steering_hook
from saetui.lm import load_model
from saetui.sae import load_sae

HOOK0 = "blocks.0.hook_resid_post"
HOOK1 = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir, tmp_path_factory):
    model = load_model(str(tiny_gpt2_dir), device="cpu", numerics="raw")
    sae = load_sae(write_tiny_sae(tmp_path_factory.mktemp("relu"), k=None, seed=3))
    return model, sae


def test_ablation_equals_the_hand_computed_splice(tiny):
    model, sae = tiny
    ids = [0, *range(10, 40)]
    tokens = torch.tensor([ids])
    x = model.activations(tokens, HOOK0)[0]
    acts = sae.encode(x)
    feature = int((acts > 0).sum(0).argmax())  # one that fires somewhere
    result = ablate(model, sae, HOOK0, ids, feature)

    def remove(activation, hook=None):  # by hand: subtract a_f * W_dec[f] where it fires
        a = sae.encode(activation[0])[:, feature]
        return activation - (a[:, None] * sae.W_dec[feature])[None]

    logits = model.bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(HOOK0, remove)])
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
    assert result.loss_ablated[:-1] == pytest.approx(expected.tolist(), abs=1e-5)
    clean = torch.nn.functional.cross_entropy(
        model.logits(tokens)[0, :-1], tokens[0, 1:], reduction="none"
    )
    assert result.loss_clean[:-1] == pytest.approx(clean.tolist(), abs=1e-5)
    assert math.isnan(result.loss_clean[-1])
    fired = [a > 0 for a in result.activation]
    assert any(fired) and all(bool(p) == f for p, f in zip(result.promoted, fired, strict=True))
    # a feature that never fires changes nothing
    silent = int((acts > 0).sum(0).argmin())
    if not (acts[:, silent] > 0).any():
        quiet = ablate(model, sae, HOOK0, ids, silent)
        assert quiet.loss_ablated[:-1] == pytest.approx(quiet.loss_clean[:-1], abs=1e-6)


@pytest.mark.parametrize("mode", ["all", "prompt", "frozen"])
def test_steering_with_strength_zero_is_the_unsteered_generation(tiny, mode):
    model, sae = tiny
    result = steer(model, sae, HOOK1, "w1 w2 w3 w4", {5: 0.0}, n_tokens=8, mode=mode)
    assert result.steered_ids == result.unsteered_ids and len(result.steered_ids) == 8
    strong = steer(model, sae, HOOK0, "w1 w2 w3 w4", {5: 50.0}, n_tokens=8, mode=mode)
    assert strong.steered_ids != strong.unsteered_ids  # a strong push changes the text


def test_frozen_attention_keeps_earlier_keys_and_values(tiny):
    model, sae = tiny
    tokens = torch.tensor([[0, 11, 12, 13, 14, 15]])
    names = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]
    _, plain = model.bridge.run_with_cache(tokens, names_filter=names)
    for mode, earlier_unchanged in (("frozen", True), ("all", False)):
        hook = steering_hook(model, sae, HOOK0, {5: 30.0}, mode=mode, clamp=False, prompt_length=3)
        with model.bridge.hooks(fwd_hooks=[hook]):
            _, steered = model.bridge.run_with_cache(tokens, names_filter=names)
        for name in names:
            same = torch.allclose(steered[name][0, :-1], plain[name][0, :-1], atol=1e-6)
            assert same == earlier_unchanged, (mode, name)
            assert not torch.allclose(steered[name][0, -1], plain[name][0, -1], atol=1e-6)


def test_clamping_replaces_the_features_decoded_contribution(tiny):
    model, sae = tiny
    hook = steering_hook(model, sae, HOOK0, {5: 7.5}, mode="all", clamp=True, prompt_length=4)
    seen = {}

    def read(activation, hook=None):
        seen["x"] = activation.detach().clone()

    tokens = torch.tensor([[0, 11, 12, 13]])
    clean = model.activations(tokens, HOOK0)[0]
    model.bridge.run_with_hooks(tokens, fwd_hooks=[hook, (HOOK0, read)])
    a = sae.encode(clean)[:, 5]
    expected = clean + (7.5 - a)[:, None] * sae.W_dec[5][None]
    torch.testing.assert_close(seen["x"][0], expected, atol=1e-5, rtol=1e-5)

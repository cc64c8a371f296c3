"""The ``saelens`` metric family against a reference written here from SAELens' ``evals.py``
(``get_sparsity_and_variance_metrics``, ``get_recons_loss``,
``get_featurewise_weight_based_metrics``) and SAEBench core's ``calculate_misc_metrics``:
the Hugging Face model with PyTorch forward hooks, the SAE from its raw tensors, one SAELens
batch per 16 windows, special tokens (BOS, EOS, pad ids) ignored by id."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_HOOK, tiny_documents

from saetui.collect.evaluate import evaluate_sae
from saetui.collect.metrics import SAELENS_BATCH_WINDOWS, weight_metrics
from saetui.corpus import batch_windows, iter_windows
from saetui.lm import load_model
from saetui.sae import load_sae

# Documents with an EOS inside the text: counted by saetui (no document start), ignored by
# SAELens (a special id), so the two families' masks differ there.
EOS_TEXT = "w5 w6 <eos> w7 w8 w9"


def documents() -> list[str]:
    docs = tiny_documents(70, seed=3)
    docs[4] = EOS_TEXT
    docs[20] = EOS_TEXT + " w11 w12"
    return docs


@pytest.fixture(scope="module")
def measured(tiny_gpt2_dir, tiny_sae_dir):
    model = load_model(str(tiny_gpt2_dir), device="cpu", numerics="raw")
    sae = load_sae(tiny_sae_dir)
    windows = list(iter_windows(documents(), model.tokenizer, ctx_len=24))
    # collection batches of 5 windows: SAELens batches (16 windows) straddle them
    metrics = evaluate_sae(model, sae, TINY_HOOK, batch_windows(windows, 5))
    return metrics, windows, model, sae


def _reference(tiny_gpt2_dir, tiny_sae_dir, windows, special):
    """SAELens' formulas, one batch of 16 windows (prompts) at a time."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()
    state = torch.load(tiny_sae_dir / "weights.pt", weights_only=True)
    k = json.loads((tiny_sae_dir / "config.json").read_text())["top_k"]
    block = hf.transformer.h[1]

    def encode(x):
        pre = torch.relu((x - state["b_dec"]) @ state["W_enc"])
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(f):
        return f @ state["W_dec"] + state["b_dec"]

    def run(tokens, replace=None):
        captured = {}

        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured["x"] = hidden.detach().clone()
            if replace is None:
                return None
            new = replace(hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = block.register_forward_hook(hook)
        with torch.no_grad():
            logits = hf(tokens).logits
        handle.remove()
        return logits, captured["x"]

    recon = {name: [] for name in ("l2_norm_in", "l2_norm_out", "l2_ratio", "rrb", "l0", "l1")}
    recon.update(legacy=[], mse=[], cossim=[])
    mean_sum_of_squares, mean_act_per_dimension, mean_resid = [], [], []
    downstream = {name: [] for name in ("kl_sae", "kl_abl", "ce_sae", "ce_clean", "ce_abl")}
    fired_total = torch.zeros(state["W_enc"].shape[1], dtype=torch.float64)
    tokens_total = 0
    for first in range(0, len(windows), SAELENS_BATCH_WINDOWS):
        group = windows[first : first + SAELENS_BATCH_WINDOWS]
        xs, masks = [], []
        for window in group:
            tokens = torch.as_tensor(window.tokens.astype(np.int64))[None]
            mask = ~torch.isin(tokens, torch.tensor(special))
            clean, x = run(tokens)

            def sae_splice(hidden, mask=mask):
                new = decode(encode(hidden)).to(hidden.dtype)
                return torch.where(mask[..., None], new, hidden)

            sae_logits, _ = run(tokens, sae_splice)
            abl_logits, _ = run(tokens, torch.zeros_like)
            lp = {
                name: logits[0].double().log_softmax(-1)
                for name, logits in (("clean", clean), ("sae", sae_logits), ("abl", abl_logits))
            }
            # TransformerLens' loss_per_token: position i predicts token i + 1
            target = tokens[0, 1:]
            m = mask[0]
            for name, key in (("clean", "ce_clean"), ("sae", "ce_sae"), ("abl", "ce_abl")):
                nll = -lp[name][:-1].gather(-1, target[:, None]).squeeze(-1)
                downstream[key].append(nll[m[:-1]])
            p = lp["clean"].exp()
            downstream["kl_sae"].append((p * (lp["clean"] - lp["sae"])).sum(-1)[m])
            downstream["kl_abl"].append((p * (lp["clean"] - lp["abl"])).sum(-1)[m])
            xs.append(x[0][m])
            masks.append(m)
        x = torch.cat(xs)
        f = encode(x)
        x_hat = decode(f)
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        divisor = norm_in.clone()
        divisor[divisor.abs() < 1e-4] = 1
        recon["l2_norm_in"].append(norm_in)
        recon["l2_norm_out"].append(norm_out)
        recon["l2_ratio"].append(norm_out / divisor)
        recon["rrb"].append(((norm_out**2).mean() / (x * x_hat).sum(-1).mean()).unsqueeze(0))
        recon["l0"].append((f > 0).sum(-1).double())
        recon["l1"].append(f.sum(-1))
        resid = (x - x_hat).pow(2).sum(-1)
        recon["mse"].append(resid / len(x))
        recon["legacy"].append(1 - resid / (x - x.mean(0)).pow(2).sum(-1))
        mean_sum_of_squares.append(x.pow(2).sum(-1).mean(0))
        mean_act_per_dimension.append(x.pow(2).mean(0))
        mean_resid.append(resid.mean(0))
        recon["cossim"].append(
            (x / x.norm(dim=-1, keepdim=True) * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(-1)
        )
        fired_total += (f > 0).sum(0).double()
        tokens_total += len(x)
    out = {name: float(torch.cat(values).mean()) for name, values in recon.items()}
    ms = torch.stack(mean_sum_of_squares).mean(0)
    mad = torch.cat(mean_act_per_dimension).mean(0)
    out["explained_variance"] = float(1 - torch.stack(mean_resid).mean(0) / (ms - mad**2))
    out["explained_variance_legacy"] = out.pop("legacy")
    out["relative_reconstruction_bias"] = out.pop("rrb")
    down = {name: float(torch.cat(values).mean()) for name, values in downstream.items()}
    out.update(
        ce_loss_without_sae=down["ce_clean"],
        ce_loss_with_sae=down["ce_sae"],
        ce_loss_with_ablation=down["ce_abl"],
        ce_loss_score=(down["ce_abl"] - down["ce_sae"]) / (down["ce_abl"] - down["ce_clean"]),
        kl_div_with_sae=down["kl_sae"],
        kl_div_with_ablation=down["kl_abl"],
        kl_div_score=(down["kl_abl"] - down["kl_sae"]) / down["kl_abl"],
    )
    density = (fired_total / tokens_total).numpy()
    out.update(
        frac_alive=float((density > 0).mean()),
        freq_over_1_percent=float((density > 0.01).mean()),
        freq_over_10_percent=float((density > 0.1).mean()),
        normalized_freq_over_1_percent=float(density[density > 0.01].sum() / density.sum()),
        normalized_freq_over_10_percent=float(density[density > 0.1].sum() / density.sum()),
        feature_density_mean=float(density.mean()),
        tokens=tokens_total,
        batches=-(-len(windows) // SAELENS_BATCH_WINDOWS),
    )
    return out


def test_saelens_family_matches_its_published_formulas(measured, tiny_gpt2_dir, tiny_sae_dir):
    metrics, windows, model, _ = measured
    special = [model.tokenizer.pad_token_id, model.tokenizer.eos_token_id, 0]
    assert model.tokenizer.bos_token_id == 0
    assert len(windows) > 2 * SAELENS_BATCH_WINDOWS  # several batches and a partial one
    expected = _reference(tiny_gpt2_dir, tiny_sae_dir, windows, special)
    got = metrics["saelens"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_the_families_differ_where_their_definitions_do(measured):
    metrics, windows, _, _ = measured
    saelens = metrics["saelens"]
    # squaring the mean of x² instead of the mean of x inflates SAELens' explained variance
    assert saelens["explained_variance"] > metrics["explained_variance"]
    # the EOS inside two documents is counted by saetui and ignored by SAELens
    eos_tokens = sum(int((w.tokens == 1).sum()) for w in windows)
    assert eos_tokens >= 2
    assert metrics["tokens"] - saelens["tokens"] == eos_tokens
    # SAELens' MSE divides each token's squared error by its batch's token count
    per_token_error = metrics["mse"] * 32  # d_in 32: saetui's MSE is per element
    tokens_per_batch = saelens["tokens"] / saelens["batches"]
    assert saelens["mse"] == pytest.approx(per_token_error / tokens_per_batch, rel=0.3)
    # zero-ablating every position (start tokens included) hurts more
    assert saelens["ce_loss_with_ablation"] != pytest.approx(metrics["ce_zero_ablation"])


@pytest.mark.parametrize("k", [None, 4])
def test_weight_metrics_follow_the_raw_tensors(tmp_path, k):
    from conftest import write_tiny_sae

    directory = write_tiny_sae(tmp_path / "sae", k=k, seed=5)
    got = weight_metrics(load_sae(directory))
    state = torch.load(directory / "weights.pt", weights_only=True)
    enc = state["W_enc"].double()
    dec = state["W_dec"].double()
    unit_enc = enc / enc.norm(dim=0, keepdim=True)
    unit_dec = dec.T / dec.T.norm(dim=0, keepdim=True)
    expected = (unit_enc * unit_dec).sum(0)
    np.testing.assert_allclose(got["encoder_decoder_cosine_sim"], expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["encoder_norm"], enc.norm(dim=0).numpy(), rtol=1e-6)
    # a ReLU SAE adds b_enc; BatchTopK in the sae_core format encodes without it
    bias = state["b_enc"].double().numpy() if k is None else np.zeros(len(expected))
    np.testing.assert_allclose(got["encoder_bias"], bias, rtol=1e-6)

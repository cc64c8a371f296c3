"""The models and SAEs users bring, end to end on tiny random-init checkpoints of each
architecture (GPT-2, Pythia, Qwen3, Llama-3, Mistral, Gemma-2, Gemma-3; see tiny_models.py):
hook semantics against the Hugging Face modules, then collect -> metrics -> neighbours ->
open_index -> a feature's top examples for residual, MLP-out, attention-out and hook_z SAEs
of every format, in both numerics modes. The README's support table lists these cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_documents
from sae_fixtures import (
    write_dictionary_learning,
    write_gemma_scope,
    write_sae_core,
    write_saelens,
    write_sparsify,
)
from tiny_models import ARCHITECTURES, D_HEAD, D_MODEL, N_HEADS, TOKENIZER_SIZE, build_tiny_model

from saetui.collect.inputs import RunInputs
from saetui.collect.pipeline import CollectConfig, run_collection
from saetui.errors import SaetuiInputError
from saetui.index import open_index
from saetui.lm import load_model, resolve_hook
from saetui.sae import load_sae

ARCHS = list(ARCHITECTURES)
D_SAE = 96
LAYER = 1


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(name)``: the saved checkpoint directory of a tiny ``name`` model."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("arch-corpus") / "corpus.json"
    path.write_text(json.dumps(tiny_documents(30)))
    return path


def hf_modules(model: Any) -> tuple[Any, Any, Any]:
    """Layer LAYER's MLP, attention and attention output projection in the HF model."""
    hf = model.bridge.original_model
    base = hf.base_model
    layers = base.layers if hasattr(base, "layers") else base.h
    layer = layers[LAYER]
    attention = next(
        getattr(layer, name) for name in ("self_attn", "attention", "attn") if hasattr(layer, name)
    )
    projection = next(
        getattr(attention, name)
        for name in ("o_proj", "dense", "c_proj")
        if hasattr(attention, name)
    )
    return layer.mlp, attention, projection


def sparsify_hookpoint(arch: str, module: str | None) -> str:
    """What sparsify names layer LAYER's output / MLP / attention in ``arch``."""
    stem = f"h.{LAYER}" if arch == "gpt2" else f"layers.{LAYER}"
    if module is None:
        return stem
    attention = {"gpt2": "attn", "pythia": "attention"}.get(arch, "self_attn")
    return f"{stem}.{attention if module == 'attn' else 'mlp'}"


def module_hook(arch: str, module: str) -> str:
    """The hook saetui names for the output of the HF ``module`` (mlp or attn) of LAYER."""
    if ARCHITECTURES[arch].post_norms:
        return f"blocks.{LAYER}.{module}.hook_out"
    return f"blocks.{LAYER}.hook_{module}_out"


TOKENS = torch.tensor([[0, 7, 12, 40, 41, 9, 55, 23, 80]])


# ---------------------------------------------------------------- hook semantics


@pytest.mark.parametrize("arch", ARCHS)
def test_module_hooks_read_the_hugging_face_module_outputs(tiny_model, arch):
    model = load_model(str(tiny_model(arch)), device="cpu", numerics="raw")
    mlp, attention, projection = hf_modules(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            seen[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [
        mlp.register_forward_hook(keep("mlp")),
        attention.register_forward_hook(keep("attn")),
        projection.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0])),
    ]
    try:
        model.logits(TOKENS)
    finally:
        for handle in handles:
            handle.remove()
    for module in ("mlp", "attn"):
        ours = model.activations(TOKENS, f"blocks.{LAYER}.{module}.hook_out")
        torch.testing.assert_close(ours, seen[module], atol=1e-5, rtol=1e-5)
        # resolve_hook names it the familiar way where that is the same hook point.
        hook = resolve_hook(model, hook=f"blocks.{LAYER}.{module}.hook_out", sae_d_in=D_MODEL)
        assert hook == module_hook(arch, module)
        after_norm = model.activations(TOKENS, f"blocks.{LAYER}.hook_{module}_out")
        # Gemma-2/3: hook_mlp_out / hook_attn_out come after the post-norms.
        assert torch.allclose(after_norm, seen[module], atol=1e-5) != ARCHITECTURES[arch].post_norms
    # hook_z is read flattened, head-major: the attention output projection's input.
    z = model.activations(TOKENS, f"blocks.{LAYER}.attn.hook_z")
    assert z.shape == (1, TOKENS.shape[1], N_HEADS * D_HEAD)
    torch.testing.assert_close(z, seen["z"], atol=1e-5, rtol=1e-5)
    head = model.activations(TOKENS, f"blocks.{LAYER}.attn.hook_z[2]")
    torch.testing.assert_close(head, seen["z"][..., 2 * D_HEAD : 3 * D_HEAD])


SPLICED = [
    f"blocks.{LAYER}.mlp.hook_out",
    f"blocks.{LAYER}.attn.hook_z",
    f"blocks.{LAYER}.attn.hook_z[1]",
]


@pytest.mark.parametrize("arch", ["gemma2", "llama3"])
@pytest.mark.parametrize("hook", SPLICED)
def test_replacing_a_module_output_or_head_in_the_forward_pass(tiny_model, arch, hook):
    model = load_model(str(tiny_model(arch)), device="cpu", numerics="raw")
    clean, activation = model.logits_and_activations(TOKENS, hook)
    same = model.logits_with_activation(TOKENS, hook, activation)
    torch.testing.assert_close(same, clean, atol=1e-4, rtol=1e-4)
    changed = model.logits_with_activation(TOKENS, hook, torch.zeros_like(activation))
    assert (changed - clean).abs().max() > 1e-3


def test_hook_z_width_errors_are_one_sentence(tiny_model):
    model = load_model(str(tiny_model("llama3")), device="cpu", numerics="raw")
    z = f"blocks.{LAYER}.attn.hook_z"
    assert resolve_hook(model, hook=z, sae_d_in=N_HEADS * D_HEAD) == z
    assert resolve_hook(model, hook=f"{z}[3]", sae_d_in=D_HEAD) == f"{z}[3]"
    with pytest.raises(SaetuiInputError, match=r"one head of .*4 heads of 16.* --hook '.*\[H\]'"):
        resolve_hook(model, hook=z, sae_d_in=D_HEAD)
    with pytest.raises(SaetuiInputError, match=r"reads 64 \(4 heads x 16\)"):
        resolve_hook(model, hook=z, sae_d_in=32)
    with pytest.raises(SaetuiInputError, match="heads 0-3"):
        resolve_hook(model, hook=f"{z}[4]", sae_d_in=D_HEAD)
    with pytest.raises(SaetuiInputError, match="is not per head"):
        resolve_hook(model, hook=f"blocks.{LAYER}.hook_resid_post[0]")


def test_an_architecture_transformer_lens_cannot_boot_is_one_sentence(tmp_path):
    from conftest import write_tiny_tokenizer
    from transformers import BioGptConfig, BioGptForCausalLM

    config = BioGptConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BioGptForCausalLM(config).save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    with pytest.raises(SaetuiInputError, match="biogpt model, which TransformerLens"):
        load_model(str(tmp_path), device="cpu")


# ---------------------------------------------------------------- the end-to-end matrix


@dataclass(frozen=True)
class Case:
    """One cell of the matrix: an SAE of ``format`` at ``hook`` read with ``numerics``."""

    hook: str  # resid | mlp | attn | hook_z | hook_z[h]
    numerics: str
    format: str
    start_rule: str  # the start-token rule the SAE's source implies

    @property
    def id(self) -> str:
        return f"{self.hook}-{self.numerics}-{self.format}"


CASES = [
    Case("resid", "hooked", "saelens", "bos-or-eos"),
    Case("resid", "raw", "sparsify", "eos"),
    Case("mlp", "raw", "sparsify", "eos"),
    Case("mlp", "hooked", "sae_core", "bos-or-eos"),
    Case("attn", "raw", "dictionary_learning", "tokenizer"),
    Case("attn", "hooked", "saelens", "bos-or-eos"),
    Case("hook_z", "hooked", "saelens", "bos-or-eos"),
    Case("hook_z[2]", "raw", "saelens", "bos-or-eos"),
]


def write_case_sae(root: Path, arch: str, case: Case) -> tuple[Path, str, int]:
    """The SAE of ``case`` for ``arch``: (directory, hook the run must read, d_in)."""
    d_in = D_HEAD if case.hook == "hook_z[2]" else D_MODEL
    if case.format == "sparsify":
        module = None if case.hook == "resid" else case.hook
        directory, _ = write_sparsify(
            root, sparsify_hookpoint(arch, module), d_in=d_in, d_sae=D_SAE, num_latents=D_SAE
        )
        hook = f"blocks.{LAYER}.hook_resid_post" if module is None else module_hook(arch, module)
        return directory, hook, d_in
    if case.format == "sae_core":
        directory, _ = write_sae_core(
            root / "core",
            hook_name=f"hook_{case.hook}_out",
            hook_layer=LAYER,
            d_in=d_in,
            d_sae=D_SAE,
        )
        return directory, f"blocks.{LAYER}.hook_{case.hook}_out", d_in
    if case.format == "dictionary_learning":
        directory, _ = write_dictionary_learning(
            root / "dl",
            "BatchTopKSAE",
            d_in=d_in,
            d_sae=D_SAE,
            submodule_name=f"{case.hook}_out_layer_{LAYER}",
            layer=LAYER,
        )
        return directory, module_hook(arch, case.hook), d_in
    hooks = {
        "resid": f"blocks.{LAYER}.hook_resid_post",
        "attn": f"blocks.{LAYER}.hook_attn_out",
        "hook_z": f"blocks.{LAYER}.attn.hook_z",
        "hook_z[2]": f"blocks.{LAYER}.attn.hook_z",
    }
    metadata: dict[str, Any] = {
        "model_name": arch,
        "hook_name": hooks[case.hook],
        "prepend_bos": True,
        "context_size": 128,
    }
    extra: dict[str, Any] = {"metadata": metadata}
    if case.hook == "hook_z":
        extra["reshape_activations"] = "hook_z"
    if case.hook == "hook_z[2]":
        metadata["hook_head_index"] = 2
    architecture = "topk" if case.hook == "resid" else "standard"
    directory, _ = write_saelens(
        root / "lens", architecture, d_in=d_in, d_sae=D_SAE, extra_config=extra
    )
    hook = f"{hooks[case.hook]}[2]" if case.hook == "hook_z[2]" else hooks[case.hook]
    return directory, hook, d_in


def collect(tmp_path: Path, model_dir: Path, sae_dir: Path, corpus: Path, **inputs: Any):
    config = CollectConfig(
        out=tmp_path / "index",
        inputs=RunInputs(
            sae=sae_dir,
            data=str(corpus),
            model=str(model_dir),
            ctx_len=24,
            batch_size=8,
            device="cpu",
            dtype="float32",
            max_tokens=300,
            **inputs,
        ),
        metrics_tokens=120,
        neighbours=8,
    )
    return config, run_collection(config)


def check_index(out: Path, model: Any, sae: Any, hook: str) -> None:
    """What a user reads from the index matches the model and SAE."""
    with open_index(out) as index:
        assert index.progress().finished
        metrics = index.metrics()
        for key in ("explained_variance", "ce_loss_recovered", "kl_clean_sae", "l0_mean"):
            assert np.isfinite(metrics[key]), key
        counts = [(index.stats(f).count, f) for f in range(sae.d_sae)]
        count, feature = max(counts)
        assert count > 0
        neighbours = index.neighbours(feature)
        # Logit effects over the tokenizer's vocabulary, never the padded unembedding rows.
        for metric in ("logit_promoted", "logit_suppressed"):
            ids = neighbours[metric].ids
            assert len(ids) > 0 and int(ids.max()) < TOKENIZER_SIZE, metric
        assert len(neighbours["decoder_cosine"].ids) > 0
        examples = index.top_examples(feature, n=3)
        assert examples and examples[0].value > 0
        top = examples[0]
        assert len(top.tokens) == len(top.token_ids)
        assert top.activations[top.position] == pytest.approx(top.value, rel=1e-6)
        # The stored value is what the SAE computes at the hook for that window.
        tokens = torch.as_tensor(top.token_ids.astype(np.int64))[None]
        x = model.activations(tokens, hook)[0]
        mask = torch.as_tensor(top.mask)
        dense = sae.encode(x, mask)
        assert float(dense[top.position, feature]) == pytest.approx(top.value, rel=2e-3, abs=2e-3)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("arch", ARCHS)
def test_collect_end_to_end(tmp_path, tiny_model, corpus, arch, case):
    sae_dir, hook, d_in = write_case_sae(tmp_path / "sae", arch, case)
    numerics = {"numerics": case.numerics} if case.hook == "hook_z[2]" else {}
    config, result = collect(tmp_path, tiny_model(arch), sae_dir, corpus, **numerics)
    assert result.status == "finished" and result.tokens > 0
    with open_index(config.out) as index:
        run = index.meta.run_config
        details = index.get_meta("run_details")
        first_window = index.window(0).token_ids
    assert run["hook"] == hook and run["numerics"] == case.numerics
    start = details["start_token"]
    assert start["rule"] == case.start_rule
    model = load_model(
        str(tiny_model(arch)), device="cpu", numerics=case.numerics, start_token=case.start_rule
    )
    assert start["id"] == model.bos_token_id
    if start["id"] is None:  # no start token: the window opens on the document's first word
        assert model.tokenizer.convert_ids_to_tokens(int(first_window[0])).startswith("w")
    else:
        assert int(first_window[0]) == start["id"]
    sae = load_sae(sae_dir)
    assert sae.d_in == d_in
    check_index(config.out, model, sae, hook)
    if case.hook == "hook_z[2]":
        check_head_logit_effects(config.out, model, sae, head=2)


def check_head_logit_effects(out: Path, model: Any, sae: Any, head: int) -> None:
    """A per-head hook_z feature's logit effects go through that head's slice of the
    Hugging Face attention output projection, then the unembedding (raw numerics)."""
    _, _, projection = hf_modules(model)
    weight = projection.weight.detach()  # Linear [d_model, heads*d_head]; GPT-2 Conv1D [in, out]
    if type(projection).__name__ == "Conv1D":
        weight = weight.T
    to_residual = weight[:, head * D_HEAD : (head + 1) * D_HEAD]  # [d_model, d_head]
    unembed = model.bridge.original_model.get_output_embeddings().weight.detach()[:TOKENIZER_SIZE]
    effects = (sae.W_dec @ to_residual.T) @ unembed.T  # [d_sae, tokenizer vocabulary]
    with open_index(out) as index:
        for feature in (0, 1):
            promoted = index.neighbours(feature)["logit_promoted"]
            expected = effects[feature].topk(len(promoted.ids))
            np.testing.assert_allclose(
                promoted.scores, expected.values.numpy(), rtol=1e-3, atol=1e-4
            )


def test_gemma_scope_on_gemma2(tmp_path, tiny_model, corpus):
    directory, _ = write_gemma_scope(
        tmp_path,
        f"gemma-scope-2b-pt-res/layer_{LAYER}/width_16k/average_l0_71",
        d_in=D_MODEL,
        d_sae=D_SAE,
    )
    config, result = collect(tmp_path, tiny_model("gemma2"), directory, corpus)
    assert result.status == "finished"
    with open_index(config.out) as index:
        assert index.meta.run_config["hook"] == f"blocks.{LAYER}.hook_resid_post"
        assert index.meta.run_config["numerics"] == "raw"
        assert index.get_meta("run_details")["start_token"]["token"] == "<bos>"
    model = load_model(str(tiny_model("gemma2")), device="cpu", numerics="raw")
    check_index(config.out, model, load_sae(directory), f"blocks.{LAYER}.hook_resid_post")


def test_sparsify_mlp_sae_on_gemma2_matches_its_encode_of_the_module_output(
    tmp_path, tiny_model, corpus
):
    """sparsify reads ``model.layers.1.mlp``'s output before post_feedforward_layernorm;
    the index holds exactly sparsify's top-k codes of that output, from plain transformers."""
    from transformers import AutoModelForCausalLM

    directory, t = write_sparsify(
        tmp_path / "sae", "layers.1.mlp", d_in=D_MODEL, d_sae=D_SAE, num_latents=D_SAE
    )
    config, _ = collect(tmp_path, tiny_model("gemma2"), directory, corpus)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model("gemma2"), dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    hf.model.layers[LAYER].mlp.register_forward_hook(lambda m, a, out: seen.append(out))
    k = json.loads((directory / "cfg.json").read_text())["k"]
    with open_index(config.out) as index:
        for window in range(3):
            view = index.window(window)
            seen.clear()
            with torch.no_grad():
                hf(torch.as_tensor(view.token_ids.astype(np.int64))[None])
            x = seen[0][0]
            # sparsify's encode: top-k of relu((x - b_dec) @ encoder.weight.T + encoder.bias)
            pre = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
            top = pre.topk(k, dim=-1)
            for position in range(len(view.token_ids)):
                stored = index.token(window, position)
                if not stored.counted:
                    continue
                expected = {
                    int(i): float(v)
                    for i, v in zip(top.indices[position], top.values[position], strict=True)
                    if v > 0
                }
                got = dict(zip(stored.feature_ids.tolist(), stored.values.tolist(), strict=True))
                assert got.keys() == expected.keys()
                for feature, value in expected.items():
                    assert got[feature] == pytest.approx(value, rel=2e-3, abs=1e-3)
        # sparsify put EOS in front of every document, and so did the collection.
        assert int(index.window(0).token_ids[0]) == hf.config.eos_token_id


def test_threshold_mode_estimates_and_records_the_threshold(tmp_path, tiny_model, corpus):
    from saetui.collect.inputs import THRESHOLD_SAMPLE_TOKENS, estimate_threshold
    from saetui.corpus import read_corpus

    directory, _ = write_sae_core(
        tmp_path / "sae",
        hook_name="hook_resid_post",
        hook_layer=LAYER,
        d_in=D_MODEL,
        d_sae=D_SAE,
        top_k=4,
    )
    config, result = collect(
        tmp_path, tiny_model("qwen3"), directory, corpus, batchtopk_mode="threshold"
    )
    assert result.status == "finished"
    model = load_model(str(tiny_model("qwen3")), device="cpu", numerics="hooked")
    sae = load_sae(directory, batchtopk_mode="threshold")
    hook = f"blocks.{LAYER}.hook_resid_post"
    expected = estimate_threshold(sae, model, read_corpus(str(corpus)), hook, 24, 8)
    assert THRESHOLD_SAMPLE_TOKENS == 4096
    with open_index(config.out) as index:
        assert index.meta.run_config["batchtopk_mode"] == "threshold"
        assert index.meta.run_config["threshold"] == pytest.approx(expected, rel=1e-6)
        recorded = index.get_meta("run_details")["sae"]["threshold"]
        assert recorded["source"].startswith("estimated: mean L0 = k over ")
        # The whole tiny corpus is the sample: over its first tokens the mean L0 is near k.
        assert index.metrics()["l0_mean"] == pytest.approx(4, rel=0.25)


def test_hook_z_head_sae_in_the_probe_and_the_context_views(tmp_path, tiny_model, corpus):
    """A one-head hook_z SAE through what the TUI shows: the probe (loaded from the run the
    index recorded), a feature's logit effects, and the context around a top example."""
    from saetui.analysis.probe import (
        feature_logit_effects,
        probe,
        probe_loader,
        probe_spec_from_run,
    )

    case = Case("hook_z[2]", "raw", "saelens", "bos-or-eos")
    sae_dir, hook, _ = write_case_sae(tmp_path / "sae", "llama3", case)
    config, _ = collect(tmp_path, tiny_model("llama3"), sae_dir, corpus, numerics="raw")
    with open_index(config.out) as index:
        run_config = index.meta.run_config
        run_details = index.get_meta("run_details")
        feature = max(range(D_SAE), key=lambda f: index.stats(f).count)
        top = index.top_examples(feature, n=1)[0]
        context = index.document_context(top.global_index, radius=4)
        assert context.tokens[context.focus] == top.tokens[top.position]
        at_token = index.token(top.window, top.position)
        assert feature in at_token.feature_ids.tolist()
    inputs = probe_loader(**probe_spec_from_run(run_config, run_details))()
    assert inputs.hook == hook and inputs.model.numerics == "raw"
    text = "w3 w17 w42 w8 w8 w61"
    result = probe(inputs.model, inputs.sae, inputs.hook, text, top_per_token=3)
    words = inputs.model.tokenizer.encode(text, add_special_tokens=False)
    ids = [inputs.model.bos_token_id, *words]
    assert result.token_ids == words
    _, _, projection = hf_modules(inputs.model)
    seen: list[torch.Tensor] = []
    handle = projection.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    inputs.model.logits(torch.tensor([ids]))
    handle.remove()
    head = seen[0][0, 1:, 2 * D_HEAD : 3 * D_HEAD]  # head 2 of z, BOS dropped
    expected = inputs.sae.encode(head)
    for position, pairs in enumerate(result.per_token):
        for f, value in pairs:
            assert value == pytest.approx(float(expected[position, f]), rel=1e-4, abs=1e-5)
    promoted, suppressed = feature_logit_effects(inputs, feature, top_n=5)
    assert len(promoted) == 5 and promoted[0][1] >= promoted[-1][1]
    assert all(token.startswith(("w", "<")) for token, _ in promoted + suppressed)

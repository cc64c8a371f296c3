"""Format detection, metadata, errors, save/load round trips and describe()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
from saetui.sae import describe, detect_format, load_sae, save_sae

REPO = Path(__file__).resolve().parents[1]


def raises_naming(path: Path, match: str | None = None):
    """Expect a SaetuiInputError whose message names ``path`` (and matches ``match``)."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(SaetuiInputError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            message = str(self.info.value)
            assert str(path) in message, message
            if match is not None:
                assert match.lower() in message.lower(), message
            return handled

    return _Check()


# ---------------------------------------------------------------- detection and metadata


def test_detects_every_format(tmp_path):
    assert detect_format(write_sae_core(tmp_path / "a")[0])[0] == "sae_core"
    assert detect_format(write_saelens(tmp_path / "b")[0])[0] == "saelens"
    assert detect_format(write_sparsify(tmp_path / "c")[0])[0] == "sparsify"
    gemma_dir = write_gemma_scope(tmp_path / "d")[0]
    assert detect_format(gemma_dir) == ("gemma_scope", gemma_dir / "params.npz")


def test_path_to_a_format_file_loads_its_directory(tmp_path):
    core = write_sae_core(tmp_path / "core")[0]
    lens = write_saelens(tmp_path / "lens")[0]
    sparse = write_sparsify(tmp_path / "sp")[0]
    gemma = write_gemma_scope(tmp_path / "gs")[0]
    assert load_sae(core / "weights.pt").source_path == core
    assert load_sae(core / "config.json").format == "sae_core"
    assert load_sae(lens / "cfg.json").format == "saelens"
    assert load_sae(sparse / "sae.safetensors").format == "sparsify"
    assert load_sae(sparse / "cfg.json").format == "sparsify"
    assert load_sae(gemma / "params.npz").format == "gemma_scope"


@pytest.mark.parametrize(
    ("hook_name", "hook_layer", "hook_spec", "expected"),
    [
        ("hook_resid_post", 9, None, ("blocks.9.hook_resid_post", 9)),
        ("blocks.5.hook_mlp_out", None, None, ("blocks.5.hook_mlp_out", 5)),
        ("resid_pre", 3, None, ("blocks.3.hook_resid_pre", 3)),
        (None, 4, "blocks.4.hook_resid_post", ("blocks.4.hook_resid_post", 4)),
        (None, None, {"layer": 2, "name": "hook_resid_mid"}, ("blocks.2.hook_resid_mid", 2)),
        ("hook_resid_post", None, None, (None, None)),
    ],
)
def test_sae_core_hook_resolution(tmp_path, hook_name, hook_layer, hook_spec, expected):
    directory, _ = write_sae_core(
        tmp_path / "sae",
        hook_name=hook_name,
        hook_layer=hook_layer,
        extra_config={"hook_spec": hook_spec},
    )
    sae = load_sae(directory)
    assert (sae.hook_name, sae.hook_layer) == expected


def test_metadata_of_each_format(tmp_path):
    history = {"loss": [3.0, 2.0, 1.5], "recon_loss": [2.0, 1.0, 0.9], "sparsity": [1, 2, 3]}
    core = load_sae(write_sae_core(tmp_path / "core", history=history)[0])
    assert core.history == history and core.k == K and core.config["top_k_aux"] == 8
    assert core.default_numerics() == "hooked"
    assert core.default_start_token() == "bos-or-eos"
    # The project's own trainer records what it trained on; the config wins.
    own = load_sae(
        write_sae_core(tmp_path / "own", extra_config={"numerics": "raw", "start_token": "none"})[0]
    )
    assert own.default_numerics() == "raw" and own.default_start_token() == "none"

    lens = load_sae(write_saelens(tmp_path / "lens", "topk")[0])
    assert (lens.hook_name, lens.hook_layer, lens.model_name) == (
        "blocks.9.hook_resid_post",
        9,
        "smollm2-135m",
    )
    assert lens.default_numerics() == "hooked"
    legacy = load_sae(write_saelens(tmp_path / "legacy", "standard", legacy=True)[0])
    assert (legacy.hook_name, legacy.hook_layer, legacy.model_name) == (
        "blocks.8.hook_resid_pre",
        8,
        "gpt2-small",
    )
    raw_lens = load_sae(
        write_saelens(
            tmp_path / "raw",
            extra_config={"metadata": {"model_from_pretrained_kwargs": {"fold_ln": False}}},
        )[0]
    )
    assert raw_lens.default_numerics() == "raw"

    assert lens.default_start_token() == "bos-or-eos"
    no_bos = {"metadata": {"hook_name": "blocks.2.hook_resid_post", "prepend_bos": False}}
    no_bos_sae = load_sae(write_saelens(tmp_path / "nb", extra_config=no_bos)[0])
    assert no_bos_sae.default_start_token() == "none"
    z = {"reshape_activations": "hook_z", "metadata": {"hook_name": "blocks.4.attn.hook_z"}}
    assert load_sae(write_saelens(tmp_path / "z", extra_config=z)[0]).hook_name == (
        "blocks.4.attn.hook_z"
    )
    head = {"hook_point": "blocks.4.attn.hook_z", "hook_point_head_index": 3}
    legacy_head = load_sae(write_saelens(tmp_path / "h", legacy=True, extra_config=head)[0])
    assert (legacy_head.hook_name, legacy_head.hook_layer) == ("blocks.4.attn.hook_z[3]", 4)

    sparse = load_sae(write_sparsify(tmp_path / "sp", "layers.3.mlp")[0])
    assert sparse.default_start_token() == "eos"
    # sparsify hooks the MLP module's own output (before any post-MLP norm).
    assert (sparse.hook_name, sparse.hook_layer) == ("blocks.3.mlp.hook_out", 3)
    attention = load_sae(write_sparsify(tmp_path / "sp", "gpt_neox.layers.2.attention")[0])
    assert attention.hook_name == "blocks.2.attn.hook_out"
    assert sparse.default_numerics() == "raw"
    assert load_sae(write_sparsify(tmp_path / "sp", "model.layers.7")[0]).hook_name == (
        "blocks.7.hook_resid_post"
    )
    assert load_sae(write_sparsify(tmp_path / "sp", "unembed")[0]).hook_name is None

    gemma = load_sae(write_gemma_scope(tmp_path / "gs")[0])
    assert (gemma.hook_name, gemma.hook_layer) == ("blocks.9.hook_resid_post", 9)
    assert gemma.default_numerics() == "raw"
    assert gemma.default_start_token() == "tokenizer"
    mlp = load_sae(write_gemma_scope(tmp_path / "gs", "gemma-scope-2b-pt-mlp/layer_3/w")[0])
    assert mlp.hook_name == "blocks.3.hook_mlp_out"
    att = load_sae(write_gemma_scope(tmp_path / "gs", "gemma-scope-2b-pt-att/layer_5/w")[0])
    assert att.hook_name == "blocks.5.attn.hook_z"
    assert load_sae(write_gemma_scope(tmp_path / "gs", "elsewhere")[0]).hook_name is None


def test_content_hash_follows_the_weight_file(tmp_path):
    directory, _ = write_sae_core(tmp_path / "sae")
    first = load_sae(directory).content_hash()
    assert len(first) == 64 and first == load_sae(directory).content_hash()
    write_sae_core(directory, seed=5)
    assert load_sae(directory).content_hash() != first


def test_describe(tmp_path):
    history = {"loss": [1.0] * 5, "l1_loss": [0.1] * 5}
    info = describe(load_sae(write_sae_core(tmp_path / "core", history=history)[0]))
    assert info["format"] == "sae_core" and info["architecture"] == "batchtopk"
    assert (info["d_in"], info["d_sae"], info["k"]) == (D_IN, D_SAE, K)
    assert info["hook_name"] == "blocks.9.hook_resid_post" and info["dtype"] == "float32"
    assert info["history_length"] == 5 and info["threshold"] is None
    assert info["batchtopk_mode"] == "per-token"
    gemma = describe(load_sae(write_gemma_scope(tmp_path)[0]))
    assert gemma["threshold"]["kind"] == "per-feature" and gemma["k"] is None
    assert gemma["threshold"]["min"] <= gemma["threshold"]["mean"] <= gemma["threshold"]["max"]
    assert gemma["history_length"] is None
    thresholded = describe(load_sae(write_sae_core(tmp_path / "t")[0], threshold=0.3))
    assert thresholded["threshold"] == {
        "kind": "global",
        "value": pytest.approx(0.3),
        "source": "given",
    }
    json.dumps(info)  # printable as JSON by the CLI


@pytest.mark.skipif(not (REPO / "sample_data/sae").is_dir(), reason="sample SAE not built yet")
def test_sample_sae_loads():
    sae = load_sae(REPO / "sample_data/sae")
    assert sae.format == "sae_core" and sae.architecture == "batchtopk" and sae.k == 32
    assert sae.hook_name is not None and sae.hook_name.startswith("blocks.")


def test_second_sample_sae_loads_and_encodes_like_the_first():
    """The demo --compare pair: same model, hook and d_in, half the width, small on disk."""
    first, second = load_sae(REPO / "sample_data/sae"), load_sae(REPO / "sample_data/sae_1024")
    assert second.format == "sae_core" and second.architecture == "batchtopk"
    assert (second.d_sae, second.k) == (1024, 16)
    assert (second.hook_name, second.d_in) == (first.hook_name, first.d_in)
    assert second.config["model_name"] == first.config["model_name"]
    size = sum(f.stat().st_size for f in (REPO / "sample_data/sae_1024").iterdir())
    assert size <= 10 * 2**20
    quality = json.loads((REPO / "sample_data/sae_1024/quality.json").read_text())
    assert quality["explained_variance"] > 0.5 and quality["dead_fraction"] < 0.1
    x = torch.randn(4, 7, second.d_in) * 3
    codes = second.encode(x)
    assert codes.shape == (4, 7, 1024)
    assert int((codes > 0).sum(-1).max()) <= 16
    assert torch.isfinite(second(x)).all()


# ---------------------------------------------------------------- round trips


def _same_behaviour(a, b, x, mask=None):
    torch.testing.assert_close(a.encode(x, mask), b.encode(x, mask))
    torch.testing.assert_close(a(x, mask), b(x, mask))


@pytest.mark.parametrize("fmt", ["saelens", "sae_core"])
@pytest.mark.parametrize("top_k", [None, K])
def test_round_trip_sae_core(tmp_path, fmt, top_k):
    source = load_sae(write_sae_core(tmp_path / "src", top_k=top_k, history={"loss": [1, 2]})[0])
    out = save_sae(source, tmp_path / "out", format=fmt)
    copy = load_sae(out)
    assert copy.format == fmt and copy.architecture == source.architecture
    assert (copy.hook_name, copy.k, copy.d_sae) == (source.hook_name, source.k, source.d_sae)
    assert copy.default_numerics() == "hooked"
    x = torch.randn(3, 5, D_IN)
    _same_behaviour(source, copy, x)
    if fmt == "sae_core":
        assert copy.history == {"loss": [1, 2]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["weights.pt", "config.json", "history.json"]
        if fmt == "sae_core"
        else ["cfg.json", "sae_weights.safetensors"]
    )


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_round_trip_saelens_architectures(tmp_path, architecture):
    source = load_sae(write_saelens(tmp_path / "src", architecture)[0])
    copy = load_sae(save_sae(source, tmp_path / "out"))
    _same_behaviour(source, copy, torch.randn(6, D_IN))


def test_round_trip_keeps_raw_numerics_of_sparsify_and_gemma(tmp_path):
    for name, directory in (
        ("sp", write_sparsify(tmp_path / "sp")[0]),
        ("gs", write_gemma_scope(tmp_path / "gs")[0]),
    ):
        source = load_sae(directory)
        copy = load_sae(save_sae(source, tmp_path / f"out-{name}"))
        assert copy.default_numerics() == "raw" and copy.hook_name == source.hook_name
        _same_behaviour(source, copy, torch.randn(6, D_IN))


def test_thresholded_batchtopk_saves_as_jumprelu(tmp_path):
    source = load_sae(write_sae_core(tmp_path / "src")[0], threshold=0.3)
    copy = load_sae(save_sae(source, tmp_path / "out"))
    assert copy.architecture == "jumprelu"
    _same_behaviour(source, copy, torch.randn(8, D_IN))
    batch = load_sae(write_sae_core(tmp_path / "src2")[0], batchtopk_mode="batch")
    kept = load_sae(save_sae(batch, tmp_path / "out2"), batchtopk_mode="batch")
    assert kept.architecture == "batchtopk"
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    _same_behaviour(batch, kept, torch.randn(2, 4, D_IN), mask)


def test_save_refuses_clobbering_and_unrepresentable(tmp_path):
    source = load_sae(write_sae_core(tmp_path / "src")[0])
    out = save_sae(source, tmp_path / "out")
    with raises_naming(out, "already holds"):
        save_sae(source, out)
    save_sae(source, out, overwrite=True)
    gated = load_sae(write_saelens(tmp_path / "g", "gated")[0])
    with raises_naming(tmp_path / "g", "saelens format"):
        save_sae(gated, tmp_path / "nope", format="sae_core")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(SaetuiInputError, match="format"):
        save_sae(source, tmp_path / "x", format="onnx")


def test_failed_save_leaves_nothing_behind(tmp_path):
    source = load_sae(write_sae_core(tmp_path / "src", history={"loss": [1.0]})[0])
    source.history = {"loss": [object()]}  # not JSON-serialisable: fails mid-way
    with pytest.raises(TypeError):
        save_sae(source, tmp_path / "out", format="sae_core")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- errors


def test_a_refusal_names_the_format_it_recognised(tmp_path):
    core, _ = write_sae_core(tmp_path / "core", extra_config={"d_in": "sixteen"})
    with raises_naming(core, "looks like a sae_core SAE (weights.pt + config.json), but"):
        load_sae(core)
    lens, _ = write_saelens(tmp_path / "lens", extra_config={"d_sae": 32})
    with raises_naming(lens, "looks like a SAELens SAE"):
        load_sae(lens)
    lens_z, _ = write_saelens(tmp_path / "lz", extra_config={"reshape_activations": "hook_q"})
    with raises_naming(lens_z, "SAELens"):
        load_sae(lens_z)
    sparse, _ = write_sparsify(tmp_path / "sp")
    config = json.loads((sparse / "cfg.json").read_text())
    (sparse / "cfg.json").write_text(json.dumps({**config, "k": 0}))
    with raises_naming(sparse, "looks like a sparsify SAE (cfg.json + sae.safetensors), but"):
        load_sae(sparse)
    gemma, t = write_gemma_scope(tmp_path / "gs")
    np.savez(gemma / "params.npz", **{n: t[n].numpy() for n in ("W_enc", "W_dec", "b_enc")})
    with raises_naming(gemma / "params.npz", "Gemma Scope"):
        load_sae(gemma)
    # Every message stays one sentence.
    for directory in (core, lens, sparse):
        with pytest.raises(SaetuiInputError) as caught:
            load_sae(directory)
        assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")


def test_missing_path(tmp_path):
    with raises_naming(tmp_path / "nowhere", "does not exist"):
        load_sae(tmp_path / "nowhere")


def test_file_where_a_directory_is_expected(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    with raises_naming(notes, "directory"):
        load_sae(notes)
    checkpoint = tmp_path / "model.pt"
    torch.save({"W_enc": torch.zeros(2)}, checkpoint)
    with raises_naming(checkpoint, "exported SAE directory"):
        load_sae(checkpoint)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "weights.pt").write_bytes(b"")
    with raises_naming(stray / "weights.pt", "directory"):
        load_sae(stray / "weights.pt")  # a weights.pt outside an SAE directory


@pytest.mark.parametrize("name", ["checkpoint_epoch3.pt", "best_model.pt"])
def test_training_checkpoint_directory(tmp_path, name):
    directory = tmp_path / name
    (directory / "data").mkdir(parents=True)
    (directory / "data.pkl").write_bytes(b"\x80\x02}q\x00.")
    with raises_naming(directory, "training checkpoint") as info:
        load_sae(directory)
    assert "weights.pt + config.json" in str(info.value)


def test_run_directory_with_only_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}}, run / "checkpoint_epoch3.pt")
    with raises_naming(run, "training checkpoints"):
        load_sae(run)


def test_directory_matching_no_format_lists_every_format(tmp_path):
    (tmp_path / "README.md").write_text("nothing here")
    with raises_naming(tmp_path) as info:
        load_sae(tmp_path)
    for needed in ("weights.pt", "sae_weights.safetensors", "sae.safetensors", "params.npz"):
        assert needed in str(info.value)


def test_half_an_sae_names_the_missing_file(tmp_path):
    directory, _ = write_sae_core(tmp_path / "sae")
    (directory / "weights.pt").unlink()
    with raises_naming(directory, "no weights.pt"):
        load_sae(directory)
    lens, _ = write_saelens(tmp_path / "lens")
    (lens / "sae_weights.safetensors").unlink()
    with raises_naming(lens, "sae_weights.safetensors"):
        load_sae(lens)


def test_sparsify_release_root_points_at_a_hook(tmp_path):
    write_sparsify(tmp_path, "layers.1")
    write_sparsify(tmp_path, "layers.10")
    write_sparsify(tmp_path, "layers.2")
    with raises_naming(tmp_path, "layers.1, layers.2, layers.10"):
        load_sae(tmp_path)


def test_missing_tensors(tmp_path):
    lens, _ = write_saelens(tmp_path / "lens", "jumprelu", drop=("threshold",))
    with raises_naming(lens / "sae_weights.safetensors", "threshold"):
        load_sae(lens)
    core, t = write_sae_core(tmp_path / "core")
    torch.save({"W_enc": t["W_enc"], "b_enc": t["b_enc"]}, core / "weights.pt")
    with raises_naming(core / "weights.pt", "W_dec"):
        load_sae(core)
    gemma, t = write_gemma_scope(tmp_path / "gs")
    np.savez(gemma / "params.npz", W_enc=t["W_enc"].numpy(), W_dec=t["W_dec"].numpy())
    with raises_naming(gemma / "params.npz", "threshold"):
        load_sae(gemma)


def test_shapes_disagreeing_with_the_config_or_each_other(tmp_path):
    core, _ = write_sae_core(tmp_path / "core", extra_config={"d_sae": 32})
    with raises_naming(core / "weights.pt", "W_enc"):
        load_sae(core)
    lens, _ = write_saelens(tmp_path / "lens", extra_config={"d_in": 8})
    with raises_naming(lens / "sae_weights.safetensors", "shape"):
        load_sae(lens)
    sparse, _ = write_sparsify(tmp_path / "sp", num_latents=128)
    with raises_naming(sparse / "sae.safetensors", "encoder.weight"):
        load_sae(sparse)
    gemma, t = write_gemma_scope(tmp_path / "gs")
    arrays = {n: t[n].numpy() for n in ("W_enc", "b_enc", "b_dec", "threshold")}
    np.savez(gemma / "params.npz", W_dec=t["W_dec"][:, :8].numpy(), **arrays)
    with raises_naming(gemma / "params.npz", "W_dec"):
        load_sae(gemma)


def test_nan_and_inf_weights(tmp_path):
    core, t = write_sae_core(tmp_path / "core")
    t["W_dec"][3, 2] = float("nan")
    torch.save({n: t[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, core / "weights.pt")
    with raises_naming(core / "weights.pt", "NaN"):
        load_sae(core)
    gemma, t = write_gemma_scope(tmp_path / "gs")
    t["threshold"][0] = float("inf")
    np.savez(
        gemma / "params.npz",
        **{n: t[n].numpy() for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")},
    )
    with raises_naming(gemma / "params.npz", "threshold"):
        load_sae(gemma)


def test_unreadable_files(tmp_path):
    core, _ = write_sae_core(tmp_path / "core")
    (core / "config.json").write_text("{not json")
    with raises_naming(core / "config.json", "JSON"):
        load_sae(core)
    (core / "config.json").write_text("[1, 2]")
    with raises_naming(core / "config.json", "object"):
        load_sae(core)
    core2, _ = write_sae_core(tmp_path / "core2")
    (core2 / "weights.pt").write_bytes(b"garbage")
    with raises_naming(core2 / "weights.pt", "state dict"):
        load_sae(core2)
    lens, _ = write_saelens(tmp_path / "lens")
    (lens / "sae_weights.safetensors").write_bytes(b"garbage!")
    with raises_naming(lens / "sae_weights.safetensors", "safetensors"):
        load_sae(lens)
    gemma, _ = write_gemma_scope(tmp_path / "gs")
    (gemma / "params.npz").write_bytes(b"garbage")
    with raises_naming(gemma / "params.npz", "npz"):
        load_sae(gemma)


class _NotATensor:
    pass


def test_weights_pt_is_loaded_with_weights_only(tmp_path):
    core, t = write_sae_core(tmp_path / "core")
    torch.save(
        {**{n: t[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, "x": _NotATensor()},
        core / "weights.pt",
    )
    with raises_naming(core / "weights.pt", "refuses to unpickle"):
        load_sae(core)


def test_unknown_architecture_and_normalisation(tmp_path):
    lens, _ = write_saelens(tmp_path / "a", extra_config={"architecture": "matryoshka"})
    with raises_naming(lens / "cfg.json", "architecture 'matryoshka'"):
        load_sae(lens)
    lens, _ = write_saelens(tmp_path / "b", extra_config={"normalize_activations": "whiten"})
    with raises_naming(lens / "cfg.json", "whiten"):
        load_sae(lens)
    lens, _ = write_saelens(
        tmp_path / "c", legacy=True, extra_config={"activation_fn_str": "tanh-relu"}
    )
    with raises_naming(lens / "cfg.json", "tanh-relu"):
        load_sae(lens)
    lens, _ = write_saelens(tmp_path / "d", "topk", extra_config={"k": None})
    with raises_naming(lens / "cfg.json", "'k'"):
        load_sae(lens)


def test_batchtopk_options_on_other_architectures(tmp_path):
    relu = write_sae_core(tmp_path / "relu", top_k=None)[0]
    with raises_naming(relu, "BatchTopK"):
        load_sae(relu, batchtopk_mode="batch")
    with raises_naming(relu, "threshold"):
        load_sae(relu, threshold=0.5)
    assert load_sae(relu, batchtopk_mode="per-token").architecture == "relu"
    btk = write_sae_core(tmp_path / "btk")[0]
    with pytest.raises(SaetuiInputError, match="per-token"):
        load_sae(btk, batchtopk_mode="global")

"""dictionary_learning (saprmarks) SAEs: ``ae.pt`` + ``config.json`` of each trainer's layout,
encoded and decoded against its formulas computed from the raw tensors of the file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from sae_fixtures import D_IN, D_SAE, K, dictionary_learning_state, write_dictionary_learning

from saetui.errors import SaetuiInputError
from saetui.sae import describe, detect_format, load_sae


def inputs(n: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def reference(dict_class: str, s: dict[str, torch.Tensor], x: torch.Tensor, mode: str = ""):
    """(features, reconstruction) by dictionary_learning's own formulas on the raw state."""
    relu = torch.relu
    if dict_class == "AutoEncoder":
        f = relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        x_hat = f @ s["decoder.weight"].T + s["bias"]
        # from_pretrained(normalize_decoder=True) reports features times the decoder norms.
        return f * s["decoder.weight"].norm(dim=0), x_hat
    if dict_class == "AutoEncoderNew":
        f = relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        gate = (x_enc + s["gate_bias"] > 0).float()
        f = gate * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if dict_class == "AutoEncoderTopK" or mode == "per-token":
        top = post.topk(int(s["k"]), dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    elif mode == "batch":
        top = post.flatten().topk(int(s["k"]) * x.shape[0])
        f = torch.zeros_like(post).flatten().scatter_(0, top.indices, top.values)
        f = f.reshape(post.shape)
    else:  # BatchTopKSAE.encode's default: the trained global threshold
        f = post * (post > s["threshold"])
    return f, f @ s["decoder.weight"].T + s["b_dec"]


CLASSES = [
    ("AutoEncoder", "relu"),
    ("AutoEncoderNew", "relu"),
    ("GatedAutoEncoder", "gated"),
    ("JumpReluAutoEncoder", "jumprelu"),
    ("AutoEncoderTopK", "topk"),
    ("BatchTopKSAE", "batchtopk"),
    ("MatryoshkaBatchTopKSAE", "batchtopk"),
]


@pytest.mark.parametrize(("dict_class", "architecture"), CLASSES)
def test_each_trainer_layout_encodes_and_decodes_as_dictionary_learning(
    tmp_path, dict_class, architecture
):
    directory, state = write_dictionary_learning(tmp_path / "ae", dict_class)
    assert detect_format(directory) == ("dictionary_learning", directory)
    sae = load_sae(directory)
    assert (sae.format, sae.architecture, sae.d_in, sae.d_sae) == (
        "dictionary_learning",
        architecture,
        D_IN,
        D_SAE,
    )
    x = inputs()
    expected_f, expected_x_hat = reference(dict_class, state, x)
    f = sae.encode(x)
    assert int((f > 0).sum()) > 0
    torch.testing.assert_close(f, expected_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f), expected_x_hat, atol=1e-5, rtol=1e-5)
    assert sae.default_numerics() == "raw"
    assert sae.default_start_token() == "tokenizer"
    assert sae.model_name == "EleutherAI/pythia-70m-deduped"


def test_batchtopk_uses_its_trained_threshold_and_records_it(tmp_path):
    directory, state = write_dictionary_learning(tmp_path / "ae", "BatchTopKSAE")
    sae = load_sae(directory)
    assert sae.batchtopk_mode == "threshold" and sae.k == K
    assert describe(sae)["threshold"] == {
        "kind": "global",
        "value": pytest.approx(0.35),
        "source": "file",
    }
    x = inputs()
    for mode in ("per-token", "batch"):
        other = load_sae(directory, batchtopk_mode=mode)
        torch.testing.assert_close(
            other.encode(x), reference("BatchTopKSAE", state, x, mode)[0], atol=1e-5, rtol=1e-5
        )
    # A threshold never set in training (-1) leaves per-token top-k.
    untrained = dictionary_learning_state("BatchTopKSAE")
    untrained["threshold"] = torch.tensor(-1.0)
    fresh = load_sae(write_dictionary_learning(tmp_path / "fresh", state=untrained)[0])
    assert fresh.batchtopk_mode == "per-token" and fresh.threshold is None
    torch.testing.assert_close(
        fresh.encode(x), reference("BatchTopKSAE", untrained, x, "per-token")[0]
    )


@pytest.mark.parametrize(
    ("submodule_name", "io", "layer", "expected"),
    [
        ("resid_post_layer_3", "out", 3, ("blocks.3.hook_resid_post", 3)),
        ("mlp_out_layer_2", "out", 2, ("blocks.2.mlp.hook_out", 2)),
        ("attn_out_layer_1", "out", 1, ("blocks.1.attn.hook_out", 1)),
        ("mlp_in", "in", 4, ("blocks.4.mlp.hook_in", 4)),
        ("resid_3", "in", 3, ("blocks.3.hook_resid_pre", 3)),
        ("embed", "out", None, ("hook_embed", None)),
        (None, "out", 5, (None, 5)),
    ],
)
def test_hook_from_the_trainer_config(tmp_path, submodule_name, io, layer, expected):
    directory, _ = write_dictionary_learning(
        tmp_path / "ae", "AutoEncoder", submodule_name=submodule_name, io=io, layer=layer
    )
    sae = load_sae(directory)
    assert (sae.hook_name, sae.hook_layer) == expected


def test_hook_from_the_released_folder_names(tmp_path):
    # dictionaries/pythia-70m-deduped/mlp_out_layer1/10_32768/{ae.pt, config.json}
    directory, _ = write_dictionary_learning(
        tmp_path / "pythia-70m-deduped" / "mlp_out_layer1" / "10_32768",
        "AutoEncoder",
        submodule_name=None,
        layer=None,
    )
    assert load_sae(directory).hook_name == "blocks.1.mlp.hook_out"


def test_refusals_name_the_format(tmp_path):
    directory, _ = write_dictionary_learning(
        tmp_path / "odd", "AutoEncoder", trainer_extra={"dict_class": "CrossCoder"}
    )
    with pytest.raises(SaetuiInputError, match=r"CrossCoder.*dictionary_learning"):
        load_sae(directory)
    topk = dictionary_learning_state("AutoEncoderTopK")
    del topk["k"]
    directory, _ = write_dictionary_learning(tmp_path / "nok", "AutoEncoderTopK", state=topk)
    with pytest.raises(SaetuiInputError, match=r"dictionary_learning .*k"):
        load_sae(directory)
    broken = dictionary_learning_state("GatedAutoEncoder")
    del broken["r_mag"]
    directory, _ = write_dictionary_learning(tmp_path / "gated", "GatedAutoEncoder", state=broken)
    with pytest.raises(SaetuiInputError, match=r"r_mag.*dictionary_learning GatedAutoEncoder"):
        load_sae(directory)
    shapes = dictionary_learning_state("JumpReluAutoEncoder")
    shapes["W_dec"] = shapes["W_dec"][:, :5]
    directory, _ = write_dictionary_learning(tmp_path / "jr", "JumpReluAutoEncoder", state=shapes)
    with pytest.raises(SaetuiInputError, match="dictionary_learning"):
        load_sae(directory)


def test_a_mid_training_backup_is_refused(tmp_path):
    directory, state = write_dictionary_learning(tmp_path / "ae", "AutoEncoder")
    backup = {"step": 500, "ae": state, "config": {}, "norm_factor": 1.0}
    torch.save(backup, directory / "ae.pt")
    with pytest.raises(SaetuiInputError, match="mid-training backup"):
        load_sae(directory)


def test_half_a_dictionary_learning_directory_names_what_is_missing(tmp_path):
    directory, _ = write_dictionary_learning(tmp_path / "ae", "AutoEncoder")
    (directory / "config.json").unlink()
    with pytest.raises(
        SaetuiInputError, match=re.escape("ae.pt but no config.json; a dictionary_learning")
    ):
        load_sae(directory)
    directory, _ = write_dictionary_learning(tmp_path / "cfg", "AutoEncoder")
    (directory / "ae.pt").unlink()
    with pytest.raises(
        SaetuiInputError, match=re.escape("config.json but no ae.pt; a dictionary_learning")
    ):
        load_sae(directory)
    # An sae_core config.json without its weights still asks for weights.pt.
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "config.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    with pytest.raises(SaetuiInputError, match=re.escape("no weights.pt; a sae_core")):
        load_sae(tmp_path / "core")
    # Pointing at ae.pt itself loads its directory.
    full, _ = write_dictionary_learning(tmp_path / "full", "AutoEncoder")
    assert load_sae(full / "ae.pt").source_path == full

"""Tiny random-init Hugging Face checkpoints of the architectures users bring, built from
their ``transformers`` configs and saved as local model directories.

Hidden size 64, 4 heads of 16, 2 layers, a word-level tokenizer of 100 entries whose special
tokens look like the family's own. Qwen3 and Pythia pad their embedding/unembedding to 128
rows past the tokenizer, as the real checkpoints do (Qwen3-0.6B: 151,936 rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_SIZE = 100
PADDED_ROWS = 128
D_MODEL = 64
N_HEADS = 4
D_HEAD = 16


@dataclass(frozen=True)
class TokenizerStyle:
    """The special tokens of a model family and whether its tokenizer adds BOS by itself."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    adds_bos: bool = False


GPT2_STYLE = TokenizerStyle(("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None)
QWEN3_STYLE = TokenizerStyle(
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>"
)
LLAMA3_STYLE = TokenizerStyle(
    ("<|begin_of_text|>", "<|end_of_text|>"),
    "<|begin_of_text|>",
    "<|end_of_text|>",
    None,
    adds_bos=True,
)
GEMMA_STYLE = TokenizerStyle(
    ("<pad>", "<eos>", "<bos>", "<unk>"), "<bos>", "<eos>", "<pad>", adds_bos=True
)
MISTRAL_STYLE = TokenizerStyle(("<unk>", "<s>", "</s>"), "<s>", "</s>", None, adds_bos=True)


def write_family_tokenizer(directory: Path, style: TokenizerStyle) -> dict[str, int]:
    """A word-level tokenizer over 'w0'.. with the family's special tokens; returns their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(style.specials)}
    for i in range(TOKENIZER_SIZE - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    unk = "<unk>" if "<unk>" in vocab else style.specials[0]
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if style.adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A",
            pair=f"{style.bos} $A $B",
            special_tokens=[(style.bos, vocab[style.bos])],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=style.bos,
        eos_token=style.eos,
        pad_token=style.pad,
        unk_token=unk if "<unk>" in vocab else None,
    )
    fast.save_pretrained(directory)
    return vocab


@dataclass(frozen=True)
class Architecture:
    """How to build one tiny checkpoint: config class, model class, config keywords."""

    name: str
    config: str
    model: str
    style: TokenizerStyle
    options: dict[str, Any] = field(default_factory=dict)
    padded: bool = False  # embedding rows past the tokenizer, like the real checkpoints
    post_norms: bool = False  # norms after attention and MLP (Gemma-2/3)


_DECODER = {
    "hidden_size": D_MODEL,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": N_HEADS,
    "num_key_value_heads": 2,
    "head_dim": D_HEAD,
    "max_position_embeddings": 128,
}

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            GPT2_STYLE,
            {"n_layer": 2, "n_embd": D_MODEL, "n_head": N_HEADS, "n_positions": 128},
        ),
        Architecture(
            "pythia",
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            GPT2_STYLE,
            {
                "hidden_size": D_MODEL,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": N_HEADS,
                "max_position_embeddings": 128,
                "rotary_pct": 0.25,
            },
            padded=True,
        ),
        Architecture(
            "qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3_STYLE, _DECODER, padded=True
        ),
        Architecture("llama3", "LlamaConfig", "LlamaForCausalLM", LLAMA3_STYLE, _DECODER),
        Architecture("mistral", "MistralConfig", "MistralForCausalLM", MISTRAL_STYLE, _DECODER),
        Architecture(
            "gemma2", "Gemma2Config", "Gemma2ForCausalLM", GEMMA_STYLE, _DECODER, post_norms=True
        ),
        Architecture(
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            GEMMA_STYLE,
            _DECODER,
            post_norms=True,
        ),
    )
}


def build_tiny_model(directory: Path, name: str, seed: int = 0) -> Path:
    """Save a random-init ``name`` checkpoint and its tokenizer into ``directory``."""
    import torch
    import transformers

    arch = ARCHITECTURES[name]
    directory.mkdir(parents=True, exist_ok=True)
    ids = write_family_tokenizer(directory, arch.style)
    special = {
        "bos_token_id": ids.get(arch.style.bos) if arch.style.bos else None,
        "eos_token_id": ids[arch.style.eos],
        "pad_token_id": ids.get(arch.style.pad) if arch.style.pad else None,
    }
    rows = PADDED_ROWS if arch.padded else TOKENIZER_SIZE
    config = getattr(transformers, arch.config)(vocab_size=rows, **special, **arch.options)
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model)(config)
    with torch.no_grad():  # norms that are not the identity, so folding them changes numbers
        for module_name, parameter in model.named_parameters():
            if "norm" in module_name or ".ln_" in module_name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(directory)
    return directory

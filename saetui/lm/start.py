"""The token put in front of every document: what the SAE's training pipeline put there.

saetui tokenises documents without special tokens and prepends one *start token* itself
(``saetui.corpus.windows`` reads it as the tokenizer's ``bos_token_id``). Which token that
is depends on where the SAE was trained, because the activations at position 0 and the
attention sink differ with it:

- ``bos-or-eos``: the tokenizer's BOS, else its EOS. HookedTransformer's ``prepend_bos``
  (SAELens with ``prepend_bos: true``, the default; the project's ``sae_core`` trainer).
  For Qwen3, whose tokenizer has no BOS, that is ``<|im_end|>`` or ``<|endoftext|>``.
- ``eos``: the EOS token, else BOS. sparsify's ``chunk_and_tokenize`` joins documents with
  EOS and starts the stream with one.
- ``tokenizer``: the token the Hugging Face tokenizer adds in front by itself
  (``add_special_tokens=True``), else nothing: BOS for Llama, Mistral and Gemma, nothing for
  GPT-2, Pythia and Qwen3. dictionary_learning's activation buffer, Gemma Scope, plain HF use.
- ``none``: nothing (SAELens with ``prepend_bos: false``).
"""

from __future__ import annotations

from typing import Any

from saetui.errors import SaetuiInputError

START_TOKEN_RULES = ("bos-or-eos", "eos", "tokenizer", "none")
_PROBE_TEXT = "hello world"


def added_start_token(tokenizer: Any) -> int | None:
    """The id the tokenizer puts in front of a text by itself, if any."""
    plain = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"])
    if len(special) > len(plain) and special[len(special) - len(plain) :] == plain:
        return int(special[0])
    return None


def start_token_id(tokenizer: Any, rule: str) -> int | None:
    """The start token ``rule`` picks for ``tokenizer`` (None: no start token)."""
    if rule not in START_TOKEN_RULES:
        raise SaetuiInputError(
            f"start token rule {rule!r} is not known; use one of {', '.join(START_TOKEN_RULES)}."
        )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if rule == "bos-or-eos":
        return bos if bos is not None else eos
    if rule == "eos":
        return eos if eos is not None else bos
    if rule == "tokenizer":
        return added_start_token(tokenizer)
    return None


def apply_start_token(tokenizer: Any, rule: str) -> dict[str, Any]:
    """Make ``tokenizer.bos_token`` the start token ``rule`` picks (None for none); returns
    what a run records about it."""
    chosen = start_token_id(tokenizer, rule)
    text = None if chosen is None else tokenizer.convert_ids_to_tokens(chosen)
    tokenizer.bos_token = text
    return {"rule": rule, "token": text, "id": chosen}

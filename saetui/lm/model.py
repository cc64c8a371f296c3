"""Language-model loading through TransformerLens' TransformerBridge, hook resolution,
and the forward passes saetui needs (activations at a hook, logits with a hook replaced)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.lm.device import dtype_name, pick_device, pick_dtype
from saetui.lm.embedded import EMBEDDED_MODELS, embedded_model_dir
from saetui.lm.hooks import canonical_hook, read_view, split_head, write_view
from saetui.lm.hub import ModelSource, model_source
from saetui.lm.names import DEFAULT_MODEL, NUMERICS, NUMERICS_HELP  # noqa: F401 - re-exported
from saetui.lm.start import START_TOKEN_RULES, apply_start_token

DEFAULT_HOOK_NAME = "hook_resid_post"
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LanguageModel:
    """A loaded model plus what a run needs to record about it."""

    name: str
    bridge: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    numerics: str
    start: dict[str, Any] = field(default_factory=dict)  # the start-token rule, token and id
    _vocabulary: list[str] | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def vocab_size(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def tokenizer_vocab_size(self) -> int:
        """Token ids the tokenizer can produce. Checkpoints often pad their embedding and
        unembedding past it (Qwen3-0.6B: 151,936 rows); ids at or beyond it are no token."""
        return min(len(self.tokenizer), self.vocab_size)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def describe(self) -> dict[str, Any]:
        """The facts about the model a run records."""
        return {
            "model": self.name,
            "numerics": self.numerics,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "start_token": dict(self.start),
        }

    def vocabulary(self) -> list[str]:
        """Every token id's text, as a reader shows it."""
        if self._vocabulary is None:
            ids = range(len(self.tokenizer))
            self._vocabulary = [self.tokenizer.decode([i]) for i in ids]
        return self._vocabulary

    def hook_shape(self, hook: str) -> tuple[int, ...]:
        """The shape of the raw activation at ``hook`` (its head index ignored) for one
        2-token window: ``(1, 2, d)`` or, per head, ``(1, 2, n_heads, d_head)``."""
        base, _ = split_head(hook)
        tokens = torch.tensor([[self.bos_token_id or 0, 0]], device=self.device)
        return tuple(self._cached(tokens, base, stop=True).shape)

    def hook_width(self, hook: str) -> int:
        """The width of what saetui reads at ``hook`` (per-head hooks flattened)."""
        shape = self.hook_shape(hook)
        _, head = split_head(hook)
        return int(shape[-1]) if len(shape) != 4 or head is not None else shape[-2] * shape[-1]

    def _cached(self, tokens: torch.Tensor, base: str, *, stop: bool) -> torch.Tensor:
        layer = hook_layer(base)
        end = None if not stop or layer is None or layer + 1 >= self.n_layers else layer + 1
        _, cache = self.bridge.run_with_cache(
            tokens.to(self.device), names_filter=[base], stop_at_layer=end
        )
        return cache[base]

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor, hook: str) -> torch.Tensor:
        """Activations at ``hook`` for ``tokens`` [batch, pos], stopping after the hook's layer;
        per-head hooks are flattened or cut to the named head (:mod:`saetui.lm.hooks`).

        Windows are right-padded, and causal attention never lets a real token see a
        later pad, so no attention mask is needed; callers mask the pad positions out.
        """
        base, head = split_head(hook)
        return read_view(self._cached(tokens, base, stop=True), head)

    @torch.no_grad()
    def activations_at(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """Activations at every hook of ``hooks`` from one forward pass, stopped after the
        deepest hook's layer (each read as :meth:`activations` reads it)."""
        bases = sorted({split_head(hook)[0] for hook in hooks})
        layers = [hook_layer(base) for base in bases]
        end = None
        if all(layer is not None for layer in layers):
            deepest = max(layer for layer in layers if layer is not None)
            end = deepest + 1 if deepest + 1 < self.n_layers else None
        _, cache = self.bridge.run_with_cache(
            tokens.to(self.device), names_filter=bases, stop_at_layer=end
        )
        return {hook: read_view(cache[split_head(hook)[0]], split_head(hook)[1]) for hook in hooks}

    @torch.no_grad()
    def residual_directions(self, hook: str, directions: torch.Tensor) -> torch.Tensor | None:
        """``directions`` [n, width] at ``hook`` as what they write into the residual stream
        [n, d_model], for logit effects: hook_z directions (all heads flattened, or one head)
        through the attention output weights W_O; residual-width hooks as they are; None
        where saetui knows no such map (e.g. MLP neurons)."""
        base, head = split_head(hook)
        layer = hook_layer(base)
        if layer is not None and base.endswith("attn.hook_z"):
            w_o = self.bridge.blocks[layer].attn.W_O.detach()  # [n_heads, d_head, d_model]
            w_o = w_o.to(device=directions.device, dtype=torch.float32)
            if head is not None:
                return directions.float() @ w_o[head]
            n_heads, d_head, _ = w_o.shape
            if directions.shape[-1] != n_heads * d_head:
                return None
            return torch.einsum("nhd,hdm->nm", directions.float().reshape(-1, n_heads, d_head), w_o)
        return directions if directions.shape[-1] == self.d_model else None

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-forward logits."""
        return self.bridge(tokens.to(self.device), return_type="logits")

    @torch.no_grad()
    def logits_and_activations(
        self, tokens: torch.Tensor, hook: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean logits and the activation at ``hook`` (as :meth:`activations` reads it) from
        one forward pass."""
        base, head = split_head(hook)
        logits, cache = self.bridge.run_with_cache(tokens.to(self.device), names_filter=[base])
        return logits, read_view(cache[base], head)

    @torch.no_grad()
    def logits_and_activations_at(
        self, tokens: torch.Tensor, hooks: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clean logits and the activations at every hook of ``hooks`` (each read as
        :meth:`activations` reads it) from one forward pass."""
        bases = sorted({split_head(hook)[0] for hook in hooks})
        logits, cache = self.bridge.run_with_cache(tokens.to(self.device), names_filter=bases)
        return logits, {
            hook: read_view(cache[split_head(hook)[0]], split_head(hook)[1]) for hook in hooks
        }

    @torch.no_grad()
    def logits_with_activation(
        self, tokens: torch.Tensor, hook: str, activation: torch.Tensor
    ) -> torch.Tensor:
        """Logits when the activation at ``hook`` is ``activation`` (shaped as
        :meth:`activations` returns it; for one head, only that head is replaced).

        For residual-stream hooks the forward pass starts at the next block from the given
        residual (the layers before it would compute what is replaced anyway); for other
        hooks the whole forward runs with the activation swapped in.
        """
        base, head = split_head(hook)
        layer = hook_layer(base)
        start = None
        if layer is not None and base.endswith(".hook_resid_post"):
            start = layer + 1
        elif layer is not None and base.endswith(".hook_resid_pre"):
            start = layer
        if start is not None and start < self.n_layers:
            return self.bridge(activation, start_at_layer=start, return_type="logits")

        def splice(original: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return write_view(original, activation, head)

        return self.bridge.run_with_hooks(
            tokens.to(self.device), return_type="logits", fwd_hooks=[(base, splice)]
        )


def hook_layer(hook: str) -> int | None:
    """The block index in a hook name like ``blocks.9.hook_resid_post``."""
    match = _LAYER_RE.match(hook)
    return int(match.group(1)) if match else None


def resolve_hook(
    model: LanguageModel,
    *,
    hook: str | None = None,
    layer: int | None = None,
    hook_name: str | None = None,
    sae_hook: str | None = None,
    sae_d_in: int | None = None,
) -> str:
    """The full hook name a run reads, from ``--hook``, ``--layer``/``--hook-name`` or the
    SAE's own config, checked against the model (and the SAE's width) before any real work."""
    if hook is None and layer is not None:
        hook = f"blocks.{layer}.{hook_name or DEFAULT_HOOK_NAME}"
    elif hook is None and hook_name is not None and hook_name.startswith("blocks."):
        hook = hook_name
    elif hook is None and hook_name is not None:
        layer_of_sae = hook_layer(sae_hook) if sae_hook else None
        if layer_of_sae is None:
            raise SaetuiInputError(
                f"--hook-name {hook_name} needs a layer: add --layer L or give --hook "
                f"blocks.L.{hook_name}."
            )
        hook = f"blocks.{layer_of_sae}.{hook_name}"
    if hook is None:
        hook = sae_hook
    if hook is None:
        raise SaetuiInputError(
            "No hook point was given and the SAE's config names none; add --hook "
            f"blocks.L.{DEFAULT_HOOK_NAME} (or --layer L)."
        )
    valid = model.bridge.hook_dict
    base, head = split_head(hook)
    if base not in valid:
        layer_index = hook_layer(base)
        if layer_index is not None and layer_index >= model.n_layers:
            raise SaetuiInputError(
                f"Hook {hook} names layer {layer_index}, but {model.name} has layers "
                f"0-{model.n_layers - 1}; pick a layer in that range."
            )
        close = difflib.get_close_matches(base, list(valid), n=5, cutoff=0.6)
        suggestion = ", ".join(close) if close else f"blocks.0.{DEFAULT_HOOK_NAME}"
        raise SaetuiInputError(
            f"Hook {hook} does not exist in {model.name}; closest valid hook names: {suggestion}."
        )
    hook = canonical_hook(valid, hook)
    if head is not None or sae_d_in is not None:
        _check_width(model, hook, sae_d_in)
    return hook


def _check_width(model: LanguageModel, hook: str, sae_d_in: int | None) -> None:
    """The named head exists and the SAE's d_in is what saetui reads at ``hook``."""
    base, head = split_head(hook)
    shape = model.hook_shape(hook)
    per_head = len(shape) == 4
    if head is not None and not per_head:
        raise SaetuiInputError(
            f"Hook {hook} names head {head}, but {base} of {model.name} is not per head "
            f"(width {shape[-1]}); drop the [{head}]."
        )
    if per_head and head is not None and head >= shape[-2]:
        raise SaetuiInputError(
            f"Hook {hook} names head {head}, but {model.name} has heads 0-{shape[-2] - 1} "
            f"at {base}; pick a head in that range."
        )
    if sae_d_in is None:
        return
    width = model.hook_width(hook)
    if width == sae_d_in:
        return
    if per_head:
        n_heads, d_head = shape[-2], shape[-1]
        if head is None and sae_d_in == d_head:
            raise SaetuiInputError(
                f"The SAE expects d_in {sae_d_in}, one head of {base} ({n_heads} heads of "
                f"{d_head}), but names no head; give the head with --hook '{base}[H]'."
            )
        read = f"one head of {d_head}" if head is not None else f"{n_heads} heads x {d_head}"
        raise SaetuiInputError(
            f"The SAE expects d_in {sae_d_in} but hook {hook} of {model.name} reads {width} "
            f"({read}); use the SAE with the model and hook it was trained on."
        )
    raise SaetuiInputError(
        f"The SAE expects d_in {sae_d_in} but hook {hook} of {model.name} has width "
        f"{width}; use the SAE with the model and hook it was trained on."
    )


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    numerics: str = "raw",
    start_token: str = "bos-or-eos",
    progress: Callable[[str], None] | None = None,
) -> LanguageModel:
    """Load the embedded sample model, a local Hugging Face directory or a hub name,
    wrapped in a TransformerBridge with the chosen numerics.

    ``start_token`` is the rule (:mod:`saetui.lm.start`) for the token put in front of every
    document; the returned model's ``tokenizer.bos_token`` is that token (None for none).
    """
    if numerics not in NUMERICS:
        raise SaetuiInputError(
            f"--numerics {numerics!r} is not known; use one of {', '.join(NUMERICS)}."
        )
    if start_token not in START_TOKEN_RULES:
        raise SaetuiInputError(
            f"start token rule {start_token!r} is not known; use one of "
            f"{', '.join(START_TOKEN_RULES)}."
        )
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    if name in EMBEDDED_MODELS:
        source = ModelSource(str(embedded_model_dir(name, progress=progress)))
    else:
        source = model_source(name, DEFAULT_MODEL)
    directory = source.location
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # never run code shipped in a model folder (config.json auto_map): transformers would
    # ask "run the custom code? [y/N]" in a terminal, and TransformerBridge only boots
    # architectures transformers implements itself anyway
    where = {
        "local_files_only": source.local_files_only,
        "cache_dir": source.cache_dir,
        "trust_remote_code": False,
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **where)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **where)
    except (OSError, ValueError) as error:
        _refuse_remote_code(name, directory)  # the likelier reason, said plainly
        raise SaetuiInputError(
            f"Model {name} could not be loaded ({str(error).splitlines()[0]}); give a local "
            f"Hugging Face model directory, a hub name reachable from here, or {DEFAULT_MODEL}."
        ) from None
    # transformers wraps PreTrainedModel.to in a decorator whose typing loses `self`
    hf_model.to(torch_device).eval()  # type: ignore[arg-type]
    bridge = _boot_bridge(name, directory, hf_model, tokenizer, torch_device, torch_dtype)
    if numerics == "hooked":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    start = apply_start_token(tokenizer, start_token)
    return LanguageModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        numerics=numerics,
        start=start,
    )


def _refuse_remote_code(name: str, directory: str) -> None:
    """One sentence for a local model whose architecture only its own code implements."""
    import json

    from transformers import CONFIG_MAPPING

    config_file = Path(directory) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    if (
        isinstance(config, dict)
        and config.get("auto_map")
        and (config.get("model_type") not in CONFIG_MAPPING)
    ):
        raise SaetuiInputError(
            f"Model {name} needs its own Python code (auto_map in its config.json) to load, "
            "and saetui never runs code from a model folder: use a model of an architecture "
            "transformers implements (Llama, Qwen, Gemma, GPT-2, Pythia, ...)."
        )


def _boot_bridge(
    name: str,
    directory: str,
    hf_model: Any,
    tokenizer: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> Any:
    """The TransformerBridge around ``hf_model``, refusing unsupported architectures in a sentence.

    The bridge gets its own copy of the tokenizer: it rewrites the one it is given (BOS set
    to EOS when missing) and would reload one with ``add_bos_token`` from the model's name
    (a network call for hub names). saetui tokenises with its own copy and start-token rule.
    """
    import copy

    from transformer_lens.model_bridge import TransformerBridge

    bridge_tokenizer = copy.deepcopy(tokenizer)
    bridge_tokenizer.init_kwargs["add_bos_token"] = True  # no reload: saetui never uses it
    try:
        return TransformerBridge.boot_transformers(
            directory,
            hf_model=hf_model,
            tokenizer=bridge_tokenizer,
            device=device,
            dtype=dtype,
            trust_remote_code=False,
        )
    except (ValueError, NotImplementedError) as error:
        if "architecture" not in str(error).lower():
            raise
        kind = getattr(hf_model.config, "model_type", None) or type(hf_model).__name__
        raise SaetuiInputError(
            f"Model {name} is a {kind} model, which TransformerLens' TransformerBridge cannot "
            "load; use a model of a supported architecture (Llama, Mistral, Qwen, Gemma, "
            "GPT-2, GPT-NeoX/Pythia, ...)."
        ) from None

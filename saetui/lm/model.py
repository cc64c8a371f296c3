"""Language-model loading through TransformerLens' TransformerBridge, hook resolution,
and the forward passes saetui needs (activations at a hook, logits with a hook replaced)."""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.lm.device import dtype_name, pick_device, pick_dtype
from saetui.lm.embedded import EMBEDDED_MODELS, embedded_model_dir

DEFAULT_MODEL = "smollm2-135m"
NUMERICS = ("raw", "hooked")
NUMERICS_HELP = (
    "raw: Hugging Face numerics as the model ships; hooked: TransformerLens compatibility mode "
    "(LayerNorm folded, writing weights centred), the activations HookedTransformer gave and "
    "SAEs trained with HookedTransformer/SAELens saw"
)
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
    load_seconds: float = 0.0
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
        }

    def hook_names(self) -> list[str]:
        return sorted(self.bridge.hook_dict)

    def vocabulary(self) -> list[str]:
        """Every token id's text, as a reader shows it."""
        if self._vocabulary is None:
            ids = range(len(self.tokenizer))
            self._vocabulary = [self.tokenizer.decode([i]) for i in ids]
        return self._vocabulary

    def hook_width(self, hook: str) -> int:
        """The width of the activation at ``hook``, from one 2-token forward pass."""
        tokens = torch.tensor([[self.bos_token_id or 0, 0]], device=self.device)
        return int(self.activations(tokens, hook).shape[-1])

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor, hook: str) -> torch.Tensor:
        """Activations at ``hook`` for ``tokens`` [batch, pos], stopping after the hook's layer.

        Windows are right-padded, and causal attention never lets a real token see a
        later pad, so no attention mask is needed; callers mask the pad positions out.
        """
        layer = hook_layer(hook)
        stop = None if layer is None or layer + 1 >= self.n_layers else layer + 1
        _, cache = self.bridge.run_with_cache(
            tokens.to(self.device), names_filter=[hook], stop_at_layer=stop
        )
        return cache[hook]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-forward logits."""
        return self.bridge(tokens.to(self.device), return_type="logits")

    @torch.no_grad()
    def logits_and_activations(
        self, tokens: torch.Tensor, hook: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean logits and the activation at ``hook`` from one forward pass."""
        logits, cache = self.bridge.run_with_cache(tokens.to(self.device), names_filter=[hook])
        return logits, cache[hook]

    @torch.no_grad()
    def logits_with_activation(
        self, tokens: torch.Tensor, hook: str, activation: torch.Tensor
    ) -> torch.Tensor:
        """Logits when the activation at ``hook`` is ``activation``.

        For residual-stream hooks the forward pass starts at the next block from the given
        residual (the layers before it would compute what is replaced anyway); for other
        hooks the whole forward runs with the activation swapped in.
        """
        layer = hook_layer(hook)
        start = None
        if layer is not None and hook.endswith(".hook_resid_post"):
            start = layer + 1
        elif layer is not None and hook.endswith(".hook_resid_pre"):
            start = layer
        if start is not None and start < self.n_layers:
            return self.bridge(activation, start_at_layer=start, return_type="logits")

        def splice(original: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return activation.to(original.dtype)

        return self.bridge.run_with_hooks(
            tokens.to(self.device), return_type="logits", fwd_hooks=[(hook, splice)]
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
    if hook not in valid:
        layer_index = hook_layer(hook)
        if layer_index is not None and layer_index >= model.n_layers:
            raise SaetuiInputError(
                f"Hook {hook} names layer {layer_index}, but {model.name} has layers "
                f"0-{model.n_layers - 1}; pick a layer in that range."
            )
        close = difflib.get_close_matches(hook, list(valid), n=5, cutoff=0.6)
        suggestion = ", ".join(close) if close else f"blocks.0.{DEFAULT_HOOK_NAME}"
        raise SaetuiInputError(
            f"Hook {hook} does not exist in {model.name}; closest valid hook names: {suggestion}."
        )
    if sae_d_in is not None:
        width = model.hook_width(hook)
        if width != sae_d_in:
            raise SaetuiInputError(
                f"The SAE expects d_in {sae_d_in} but hook {hook} of {model.name} has width "
                f"{width}; use the SAE with the model and hook it was trained on."
            )
    return hook


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    numerics: str = "raw",
    progress: Callable[[str], None] | None = None,
) -> LanguageModel:
    """Load the embedded sample model, a local Hugging Face directory or a hub name,
    wrapped in a TransformerBridge with the chosen numerics."""
    if numerics not in NUMERICS:
        raise SaetuiInputError(
            f"--numerics {numerics!r} is not known; use one of {', '.join(NUMERICS)}."
        )
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    started = time.perf_counter()
    if name in EMBEDDED_MODELS:
        directory = str(embedded_model_dir(name, progress=progress))
    else:
        directory = name
        looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
        if looks_local and not Path(name).expanduser().is_dir():
            raise SaetuiInputError(
                f"Model directory {name} does not exist; give a Hugging Face model directory, "
                f"a hub name, or the embedded model {DEFAULT_MODEL}."
            )
        directory = str(Path(name).expanduser()) if looks_local else name
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise SaetuiInputError(
            f"Model {name} could not be loaded ({str(error).splitlines()[0]}); give a local "
            f"Hugging Face model directory, a hub name reachable from here, or {DEFAULT_MODEL}."
        ) from None
    hf_model.to(torch_device).eval()
    bridge = TransformerBridge.boot_transformers(
        directory, hf_model=hf_model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype
    )
    if numerics == "hooked":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return LanguageModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        numerics=numerics,
        load_seconds=time.perf_counter() - started,
    )

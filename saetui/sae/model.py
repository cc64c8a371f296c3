"""One sparse-autoencoder type for every on-disk format.

Weights are stored the same way whatever the format: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, depending on the architecture,
``b_enc``, ``threshold``, ``b_gate``, ``b_mag``, ``r_mag``. Encoding:

- ``relu``:      relu(sae_in @ W_enc + b_enc)
- ``topk``:      top-k per token of (sae_in @ W_enc + b_enc), relu on the kept values
- ``batchtopk``: relu(sae_in @ W_enc [+ b_enc]) then one of three inference modes
  (``per-token`` top-k, ``batch`` top n*k over the real tokens, ``threshold``)
- ``jumprelu``:  relu(pre) * (pre > threshold)
- ``gated``:     (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)

where ``sae_in`` is the (optionally normalised) input minus ``b_dec`` when
``apply_b_dec_to_input`` is set. Decoding is ``acts @ W_dec + b_dec`` in every case.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F

from saetui.errors import SaetuiInputError
from saetui.lm.model import NUMERICS
from saetui.lm.start import START_TOKEN_RULES

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
FORMATS = ("sae_core", "saelens", "sparsify", "gemma_scope", "dictionary_learning")
BATCHTOPK_MODES = ("per-token", "batch", "threshold")
# SAELens' values; "expected_average_only_in" is a constant input scale (folded at load when
# known), the other two are computed per token and undone on decode.
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")

_LAYER_NORM_EPS = 1e-5


WEIGHT_NAMES = ("W_enc", "W_dec", "b_dec", "b_enc", "threshold", "b_gate", "b_mag", "r_mag")


class SaeWeights(TypedDict):
    """The weight arguments of :class:`SparseAutoencoder` (those an architecture lacks are None)."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    b_enc: torch.Tensor | None
    threshold: torch.Tensor | None
    b_gate: torch.Tensor | None
    b_mag: torch.Tensor | None
    r_mag: torch.Tensor | None


def weights_kwargs(tensors: Mapping[str, torch.Tensor]) -> SaeWeights:
    """``{name: tensor}`` as :class:`SparseAutoencoder` weight arguments; unknown names fail."""
    unknown = sorted(set(tensors) - set(WEIGHT_NAMES))
    if unknown:
        raise ValueError(f"not SAE weight names: {', '.join(unknown)}")
    return SaeWeights(
        W_enc=tensors["W_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        b_enc=tensors.get("b_enc"),
        threshold=tensors.get("threshold"),
        b_gate=tensors.get("b_gate"),
        b_mag=tensors.get("b_mag"),
        r_mag=tensors.get("r_mag"),
    )


def best_device() -> torch.device:
    """The fastest device available here: cuda, then mps, then cpu."""
    from saetui.lm.device import pick_device

    return pick_device(None)


class SparseAutoencoder(torch.nn.Module):
    """A loaded SAE: weights, architecture, provenance, and encode/decode.

    Build one with :func:`saetui.sae.load_sae`; the constructor takes already
    validated tensors. Inference only: the weights are buffers, not parameters.
    """

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    b_enc: torch.Tensor | None
    threshold: torch.Tensor | None
    b_gate: torch.Tensor | None
    b_mag: torch.Tensor | None
    r_mag: torch.Tensor | None

    def __init__(
        self,
        *,
        architecture: str,
        format: str,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        b_enc: torch.Tensor | None = None,
        threshold: torch.Tensor | None = None,
        b_gate: torch.Tensor | None = None,
        b_mag: torch.Tensor | None = None,
        r_mag: torch.Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = False,
        normalize_activations: str = "none",
        activation_scale: float | None = None,
        batchtopk_mode: str = "per-token",
        hook_name: str | None = None,
        hook_layer: int | None = None,
        model_name: str | None = None,
        history: dict[str, list[Any]] | None = None,
        source_path: Path | None = None,
        weight_files: list[Path] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}")
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}")
        if normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize_activations {normalize_activations!r}")
        if architecture in ("topk", "batchtopk") and (k is None or k < 1):
            raise ValueError(f"architecture {architecture} needs k >= 1, got {k!r}")
        self.architecture = architecture
        self.format = format
        self.d_in = int(W_enc.shape[0])
        self.d_sae = int(W_enc.shape[1])
        self.k = None if k is None else int(k)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        # Recorded only: the scale itself is folded into the weights by the loader.
        self.activation_scale = activation_scale
        self.hook_name = hook_name
        self.hook_layer = hook_layer
        self.model_name = model_name
        self.history = history
        self.source_path = source_path
        self.weight_files = list(weight_files or [])
        self.config = dict(config or {})
        self.register_buffer("W_enc", W_enc)
        self.register_buffer("W_dec", W_dec)
        self.register_buffer("b_dec", b_dec)
        self.register_buffer("b_enc", b_enc)
        self.register_buffer("threshold", threshold)
        self.register_buffer("b_gate", b_gate)
        self.register_buffer("b_mag", b_mag)
        self.register_buffer("r_mag", r_mag)
        self.batchtopk_mode = "per-token"
        # Where a global threshold came from: "file", "given" or how it was estimated.
        self.threshold_source: str | None = "file" if threshold is not None else None
        self.set_batchtopk_mode(batchtopk_mode)

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def required_buffer(self, name: str) -> torch.Tensor:
        """The optional buffer ``name``, which this SAE's architecture requires."""
        tensor = getattr(self, name)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"a {self.architecture} SAE needs tensor {name}, and it has none")
        return tensor

    def _top_k(self) -> int:
        """``k`` of a topk/batchtopk SAE (the constructor checked it is set)."""
        if self.k is None:
            raise ValueError(f"a {self.architecture} SAE has no k")
        return self.k

    def set_batchtopk_mode(self, mode: str, threshold: float | None = None) -> None:
        """Choose how a BatchTopK SAE is applied at inference (recorded with the run)."""
        if mode not in BATCHTOPK_MODES:
            raise SaetuiInputError(
                f"BatchTopK mode {mode!r} is not one of {', '.join(BATCHTOPK_MODES)}; "
                "pick one of those."
            )
        if mode != "per-token" and self.architecture != "batchtopk":
            raise SaetuiInputError(
                f"BatchTopK mode {mode!r} only applies to BatchTopK SAEs, and this "
                f"{self.architecture} SAE from {self.source_path} is not one; drop the option."
            )
        if threshold is not None:
            self.threshold = torch.tensor(float(threshold), dtype=self.dtype, device=self.device)
            self.threshold_source = "given"
        self.batchtopk_mode = mode

    def default_numerics(self) -> str:
        """Which model numerics this SAE was most likely trained on: "hooked" or "raw".

        SAELens and the old ``sae_core`` pipeline collect activations from
        HookedTransformer, whose default weight processing (folded LayerNorm,
        centred writing weights) changes the residual stream: they get "hooked"
        (TransformerLens' compatibility mode). A SAELens config that records
        ``model_from_pretrained_kwargs`` turning that processing off was trained
        on unprocessed activations: "raw". sparsify hooks Hugging Face modules
        directly and Gemma Scope was trained on the original JAX model, so both
        saw raw numerics, as did dictionary_learning (nnsight on the Hugging Face model). An
        ``sae_core`` config's own ``numerics`` entry wins.
        """
        if self.format in ("sparsify", "gemma_scope", "dictionary_learning"):
            return "raw"
        if self.format == "sae_core" and self.config.get("numerics") in NUMERICS:
            return str(self.config["numerics"])  # written by the project's own trainer
        if self.format == "saelens":
            metadata = self.config.get("metadata") or {}
            if metadata.get("saetui_numerics") in ("hooked", "raw"):
                # a saetui export keeps its source's default
                return str(metadata["saetui_numerics"])
            kwargs = metadata.get("model_from_pretrained_kwargs")
            kwargs = kwargs or self.config.get("model_from_pretrained_kwargs") or {}
            if any(kwargs.get(flag) is False for flag in ("fold_ln", "center_writing_weights")):
                return "raw"
        return "hooked"

    def default_start_token(self) -> str:
        """The start-token rule (:mod:`saetui.lm.start`) of this SAE's training pipeline.

        SAELens (HookedTransformer ``prepend_bos``, from the config, default true) and
        ``sae_core``: "bos-or-eos"; sparsify (documents joined with EOS): "eos";
        dictionary_learning and Gemma Scope (the Hugging Face tokenizer's own special
        tokens): "tokenizer". An explicit ``start_token`` entry in the config wins.
        """
        own = self.config.get("start_token")
        if own in START_TOKEN_RULES:
            return str(own)
        if self.format == "sparsify":
            return "eos"
        if self.format in ("gemma_scope", "dictionary_learning"):
            return "tokenizer"
        if self.format == "saelens":
            metadata = self.config.get("metadata") or {}
            prepend = metadata.get("prepend_bos", self.config.get("prepend_bos", True))
            return "none" if prepend is False else "bos-or-eos"
        return "bos-or-eos"

    def content_hash(self) -> str:
        """sha256 of the weight files (or of the tensors for an SAE built in memory)."""
        digest = hashlib.sha256()
        if self.weight_files:
            for path in sorted(self.weight_files, key=lambda p: p.name):
                digest.update(path.name.encode())
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            return digest.hexdigest()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ encode

    def _flatten(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[-1] != self.d_in:
            raise SaetuiInputError(
                f"activations of width {x.shape[-1]} were given to the SAE from "
                f"{self.source_path}, which expects d_in {self.d_in}; use the hook it was "
                "trained on."
            )
        flat = x.reshape(-1, self.d_in).to(self.dtype)
        if mask is None:
            return flat, None
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask shape {tuple(mask.shape)} != {tuple(x.shape[:-1])}")
        return flat, mask.reshape(-1).to(device=flat.device, dtype=torch.bool)

    def _normalize_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_activations == "constant_norm_rescale":
            norm: torch.Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # untyped
            return x * (math.sqrt(self.d_in) / norm)
        if self.normalize_activations == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + _LAYER_NORM_EPS)
        return x

    def _denormalize_out(self, recon: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.normalize_activations not in ("constant_norm_rescale", "layer_norm") or x is None:
            return recon  # none to undo, or stays in the normalised space; forward() passes x
        x = x.reshape(recon.shape).to(recon.dtype)
        if self.normalize_activations == "constant_norm_rescale":
            norm: torch.Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # untyped
            return recon * (norm / math.sqrt(self.d_in))
        return recon * x.std(dim=-1, keepdim=True) + x.mean(dim=-1, keepdim=True)

    def _pre_acts(self, flat: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [N, d_sae]; for gated, the gated magnitudes."""
        sae_in = self._normalize_in(flat)
        if self.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        if self.architecture == "gated":
            gate = (sae_in @ self.W_enc + self.required_buffer("b_gate")) > 0
            scaled = self.W_enc * torch.exp(self.required_buffer("r_mag"))
            magnitude = torch.relu(sae_in @ scaled + self.required_buffer("b_mag"))
            return magnitude * gate
        pre = sae_in @ self.W_enc
        if self.b_enc is not None:
            pre = pre + self.b_enc
        return pre

    def _dense(self, flat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        pre = self._pre_acts(flat)
        arch = self.architecture
        if arch in ("relu", "gated"):
            acts = torch.relu(pre)
        elif arch == "jumprelu":
            acts = torch.relu(pre) * (pre > self.required_buffer("threshold"))
        elif arch == "topk" or (arch == "batchtopk" and self.batchtopk_mode == "per-token"):
            top = pre.topk(self._top_k(), dim=-1)
            acts = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        elif self.batchtopk_mode == "threshold":
            acts = torch.relu(pre)
            acts = acts * (acts > self._global_threshold())
        else:
            return self._batch_topk(torch.relu(pre), mask)
        if mask is not None:
            acts = acts * mask.unsqueeze(-1)
        return acts

    def _global_threshold(self) -> torch.Tensor:
        if self.threshold is None:
            raise SaetuiInputError(
                f"BatchTopK threshold mode needs a threshold for the SAE from "
                f"{self.source_path}; give one (--threshold) or estimate it from data first."
            )
        return self.threshold

    def _batch_topk(self, acts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Keep the n*k largest activations over the n real tokens of the batch."""
        if mask is not None:
            # Excluded positions (padding, BOS) take no part in the competition.
            acts = torch.where(mask.unsqueeze(-1), acts, torch.zeros_like(acts))
            n_real = int(mask.sum())
        else:
            n_real = acts.shape[0]
        budget = min(n_real * self._top_k(), acts.numel())
        if budget == 0:
            return torch.zeros_like(acts)
        flat = acts.reshape(-1)
        top = flat.topk(budget)
        kept = torch.zeros_like(flat).scatter_(0, top.indices, top.values)
        return kept.reshape(acts.shape)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dense feature activations ``[..., d_sae]`` for activations ``[..., d_in]``.

        ``mask`` (shape ``x.shape[:-1]``, True = real token) zeroes the features
        of excluded positions and, in BatchTopK ``batch`` mode, keeps them out of
        the top n*k competition (n = number of real tokens).
        """
        flat, flat_mask = self._flatten(x, mask)
        return self._dense(flat, flat_mask).reshape(*x.shape[:-1], self.d_sae)

    @torch.no_grad()
    def encode_sparse(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-width sparse codes: ``(indices [N, K'], values [N, K'])``, N = tokens.

        A value of 0 marks an inactive slot. K' = k for topk and per-token
        BatchTopK; otherwise K' = the largest number of active features of any
        token in this batch (at least 1).
        """
        flat, flat_mask = self._flatten(x, mask)
        per_token_k = self.architecture == "topk" or (
            self.architecture == "batchtopk" and self.batchtopk_mode == "per-token"
        )
        if per_token_k:
            top = self._pre_acts(flat).topk(self._top_k(), dim=-1)
            values = torch.relu(top.values)
            if flat_mask is not None:
                values = values * flat_mask.unsqueeze(-1)
            return top.indices, values
        acts = self._dense(flat, flat_mask)
        width = max(int((acts > 0).sum(dim=-1).max()) if acts.shape[0] else 0, 1)
        top = acts.topk(min(width, self.d_sae), dim=-1)
        return top.indices, top.values

    @torch.no_grad()
    def estimate_threshold(
        self, x_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    ) -> float:
        """Estimate and set the global BatchTopK threshold from a sample of activations.

        The sample is every batch given (a tensor, or ``(tensor, mask)`` whose False positions
        are left out); with n tokens in it, the threshold lies halfway between the n*k-th and
        the (n*k+1)-th largest relu pre-activation over the whole sample, so exactly n*k
        activations exceed it: the mean L0 over the sample is k, the sparsity batch top-k
        trained for (what BatchTopK training's running threshold approximates). With fewer
        than n*k positive activations the threshold is 0. Works in one pass over the batches,
        keeping only the n*k+1 largest values.
        """
        if self.architecture != "batchtopk":
            raise SaetuiInputError(
                f"a threshold can only be estimated for a BatchTopK SAE, and the SAE from "
                f"{self.source_path} is {self.architecture}; drop the threshold option."
            )
        rows: list[torch.Tensor] = []
        for item in x_batches:
            x, mask = item if isinstance(item, tuple) else (item, None)
            flat, flat_mask = self._flatten(x, mask)
            rows.append(flat if flat_mask is None else flat[flat_mask])
        n_tokens = sum(int(r.shape[0]) for r in rows)
        if n_tokens == 0:
            raise SaetuiInputError(
                f"no tokens were given to estimate the threshold of the SAE from "
                f"{self.source_path}; give more or other activations."
            )
        keep = n_tokens * self._top_k() + 1
        best = torch.empty(0, device=self.device, dtype=torch.float32)
        for flat in rows:
            acts = torch.relu(self._pre_acts(flat)).float().reshape(-1)
            candidates = torch.cat([best, acts.topk(min(keep, acts.numel())).values])
            best = candidates.topk(min(keep, candidates.numel())).values
        if best.numel() < keep or float(best[keep - 2]) <= 0:
            value = 0.0
        else:
            value = (float(best[keep - 2]) + float(best[keep - 1])) / 2
        self.threshold = torch.tensor(value, dtype=self.dtype, device=self.device)
        self.threshold_source = f"estimated: mean L0 = k over {n_tokens} tokens"
        return value

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` from dense feature activations ``[..., d_sae]``.

        With per-token input normalisation (constant_norm_rescale, layer_norm) pass
        the original ``x`` to map the reconstruction back to its scale.
        """
        recon = acts.to(self.dtype) @ self.W_dec + self.b_dec
        return self._denormalize_out(recon, x)

    @torch.no_grad()
    def decode_sparse(
        self, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reconstruction ``[N, d_in]`` from ``encode_sparse`` output, without densifying."""
        recon = F.embedding_bag(
            indices.to(self.device),
            self.W_dec,
            per_sample_weights=values.to(self.dtype),
            mode="sum",
        )
        return self._denormalize_out(recon + self.b_dec, x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction of ``x`` (same shape)."""
        return self.decode(self.encode(x, mask), x)

    def extra_repr(self) -> str:
        return (
            f"format={self.format}, architecture={self.architecture}, d_in={self.d_in}, "
            f"d_sae={self.d_sae}, k={self.k}, hook={self.hook_name}"
        )

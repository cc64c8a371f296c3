"""Find, load, save and describe SAEs of every supported on-disk format.

A path may be the SAE's directory or one of its own files (``weights.pt``,
``cfg.json``, ``params.npz``, ...): a file that belongs to a recognised SAE
directory loads that directory; any other file is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saetui.errors import SaetuiInputError
from saetui.sae import dictionary_learning, gemma_scope, sae_core, saelens, sparsify
from saetui.sae.model import BATCHTOPK_MODES, SparseAutoencoder, best_device

EXPECTED = (
    "weights.pt + config.json (sae_core), cfg.json + sae_weights.safetensors (SAELens), "
    "cfg.json + sae.safetensors (sparsify), ae.pt + config.json (dictionary_learning) or "
    "params.npz (Gemma Scope)"
)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Which formats a file name can belong to, for paths that point at a file.
_OWN_FILES = {
    "weights.pt": ("sae_core",),
    "config.json": ("sae_core", "dictionary_learning"),
    "ae.pt": ("dictionary_learning",),
    "history.json": ("sae_core",),
    "cfg.json": ("saelens", "sparsify"),
    "sae_weights.safetensors": ("saelens",),
    "activation_scaler.json": ("saelens",),
    "sae.safetensors": ("sparsify",),
}
_MATCHERS = {
    "sae_core": sae_core.matches,
    "saelens": saelens.matches,
    "sparsify": sparsify.matches,
    "gemma_scope": gemma_scope.matches,
    "dictionary_learning": dictionary_learning.matches,
}


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """Return ``(format, directory or .npz file to load)`` for a user-given path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SaetuiInputError(
            f"SAE path {path} does not exist; give the directory of an exported SAE ({EXPECTED})."
        )
    if path.is_file():
        return _detect_file(path)
    _refuse_checkpoint_dir(path)
    found = [name for name, matches in _MATCHERS.items() if matches(path)]
    if len(found) > 1:
        raise SaetuiInputError(
            f"SAE directory {path} holds the files of several formats ({', '.join(found)}); "
            "keep one SAE per directory."
        )
    if found:
        fmt = found[0]
        return fmt, (path / gemma_scope.WEIGHTS if fmt == "gemma_scope" else path)
    _explain_no_format(path)
    raise AssertionError("unreachable")


def _detect_file(path: Path) -> tuple[str, Path]:
    owners = _OWN_FILES.get(path.name, ())
    for fmt in owners:
        if _MATCHERS[fmt](path.parent):
            return fmt, path.parent
    if path.suffix == ".npz":
        return "gemma_scope", path
    if path.suffix in (*_CHECKPOINT_SUFFIXES, ".safetensors"):
        raise SaetuiInputError(
            f"SAE path {path} is a single weights file (likely a training checkpoint), but an "
            f"exported SAE directory is expected, holding {EXPECTED}; point at that "
            "directory or export the SAE first."
        )
    raise SaetuiInputError(
        f"SAE path {path} is a file, but a directory is expected holding {EXPECTED}; "
        "point at the SAE's directory."
    )


def _refuse_checkpoint_dir(path: Path) -> None:
    if path.suffix in _CHECKPOINT_SUFFIXES or (path / "data.pkl").is_file():
        raise SaetuiInputError(
            f"SAE path {path} is a training checkpoint directory (a saved torch checkpoint), "
            f"not an exported SAE; an exported SAE directory holds {EXPECTED}, so export the "
            "SAE from the checkpoint (e.g. with the trainer's export) and point at that."
        )


def _explain_no_format(path: Path) -> None:
    names = {child.name for child in path.iterdir()}
    hookpoints = sparsify.is_multi_hook_root(path)
    if hookpoints:
        shown = ", ".join(hookpoints[:6]) + (", ..." if len(hookpoints) > 6 else "")
        raise SaetuiInputError(
            f"SAE directory {path} holds one sparsify SAE per hook ({shown}); point at one "
            f"of them, e.g. {path / hookpoints[0]}."
        )
    nested = sorted(
        child.name
        for child in path.iterdir()
        if child.is_dir() and any(matches(child) for matches in _MATCHERS.values())
    )
    if nested:
        raise SaetuiInputError(
            f"SAE directory {path} holds SAEs in subdirectories ({', '.join(nested[:6])}); "
            f"point at one of them, e.g. {path / nested[0]}."
        )
    halves = [
        ("sae_core", sae_core.FILES),
        ("dictionary_learning", dictionary_learning.FILES),
        ("SAELens", saelens.FILES),
        ("sparsify", sparsify.FILES),
    ]
    if "config.json" in names and not names & {"weights.pt", "ae.pt"}:
        # config.json alone: dictionary_learning's holds a "trainer" section, sae_core's not.
        config = _peek_json(path / "config.json")
        drop = "sae_core" if "trainer" in config else "dictionary_learning"
        halves = [(fmt, files) for fmt, files in halves if fmt != drop]
    for fmt, files in halves:
        present = [name for name in files if name in names]
        missing = [name for name in files if name not in names]
        if present and missing and not (fmt in ("SAELens", "sparsify") and present == ["cfg.json"]):
            raise SaetuiInputError(
                f"SAE directory {path} has {', '.join(present)} but no {', '.join(missing)}; "
                f"a {fmt} SAE needs both, so copy the missing file there."
            )
    if "cfg.json" in names:
        raise SaetuiInputError(
            f"SAE directory {path} has cfg.json but neither sae_weights.safetensors (SAELens) "
            "nor sae.safetensors (sparsify); copy the weights file there."
        )
    checkpoints = sorted(n for n in names if n.endswith(_CHECKPOINT_SUFFIXES))
    if checkpoints:
        raise SaetuiInputError(
            f"SAE directory {path} holds training checkpoints ({', '.join(checkpoints[:4])}) "
            f"but no exported SAE; an exported SAE directory holds {EXPECTED}, so export "
            "one first."
        )
    raise SaetuiInputError(
        f"SAE directory {path} matches no known SAE format; it should hold {EXPECTED}."
    )


def _peek_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# How each format is named in messages, and the files that made saetui recognise it.
FORMAT_LABELS = {
    "sae_core": ("sae_core", "weights.pt + config.json"),
    "saelens": ("SAELens", "cfg.json + sae_weights.safetensors"),
    "sparsify": ("sparsify", "cfg.json + sae.safetensors"),
    "gemma_scope": ("Gemma Scope", "params.npz"),
    "dictionary_learning": ("dictionary_learning", "ae.pt + config.json"),
}


def _load_as(
    fmt: str, target: Path, loader: Callable[[Path], SparseAutoencoder]
) -> SparseAutoencoder:
    """Run ``fmt``'s loader; a refusal that does not name the format gets it named."""
    try:
        return loader(target)
    except SaetuiInputError as error:
        label, files = FORMAT_LABELS[fmt]
        message = str(error)
        if label.lower() in message.lower():
            raise
        where = target.parent if target.is_file() else target
        raise SaetuiInputError(
            f"SAE directory {where} looks like a {label} SAE ({files}), but "
            f"{message[0].lower() + message[1:] if message[:1].isupper() else message}"
        ) from None


def check_weights(sae: SparseAutoencoder, path: str | os.PathLike[str]) -> None:
    """Refuse an SAE that would load but compute nonsense: integer or non-finite weights,
    k above d_sae, a negative or non-finite threshold."""
    where = f"the {sae.format} SAE at {path}"
    for name in ("W_enc", "W_dec", "b_dec", "b_enc", "threshold"):
        tensor = getattr(sae, name)
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise SaetuiInputError(
                f"{where} stores {name} as {str(tensor.dtype).removeprefix('torch.')}, not as "
                "floating point: export the weights as float32, float16 or bfloat16."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise SaetuiInputError(
                f"{where} has NaN or infinite values in {name}: the checkpoint is damaged or "
                "diverged; export it again."
            )
    if sae.k is not None and sae.k > sae.d_sae:
        raise SaetuiInputError(
            f"{where} keeps k={sae.k} features per token but has only d_sae={sae.d_sae}: fix "
            "k (top_k / k in its config) to at most d_sae."
        )
    if sae.threshold is not None and bool((sae.threshold < 0).any()):
        raise SaetuiInputError(
            f"{where} has negative thresholds: a JumpReLU/BatchTopK threshold must be >= 0; "
            "check the checkpoint."
        )


def load_sae(
    path: str | os.PathLike[str],
    *,
    batchtopk_mode: str | None = None,
    threshold: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Load an SAE of any supported format, auto-detected from its files.

    ``batchtopk_mode`` is "per-token" (default), "batch" or "threshold" and only
    applies to BatchTopK SAEs; a ``threshold`` without a mode selects "threshold".
    ``device="auto"`` picks cuda, then mps, then cpu.
    """
    fmt, target = detect_format(path)
    loaders = {
        "sae_core": sae_core.load,
        "saelens": saelens.load,
        "sparsify": sparsify.load,
        "gemma_scope": gemma_scope.load,
        "dictionary_learning": dictionary_learning.load,
    }
    sae = _load_as(fmt, target, loaders[fmt])
    check_weights(sae, path)
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise SaetuiInputError(
            f"--threshold {threshold} is not a finite number >= 0: give the activation value "
            "below which BatchTopK features count as off (or leave it out to estimate it)."
        )
    if batchtopk_mode is None and threshold is not None:
        batchtopk_mode = "threshold"
    if threshold is not None and batchtopk_mode != "threshold":
        raise SaetuiInputError(
            f"--threshold {threshold} only applies with --batchtopk-mode threshold, not "
            f"{batchtopk_mode}: drop --threshold or choose that mode."
        )
    if threshold is not None and sae.architecture != "batchtopk":
        raise SaetuiInputError(
            f"a global threshold only applies to BatchTopK SAEs, and the SAE at {path} is "
            f"{sae.architecture}; drop the threshold option."
        )
    if batchtopk_mode is not None and batchtopk_mode not in BATCHTOPK_MODES:
        raise SaetuiInputError(
            f"BatchTopK mode {batchtopk_mode!r} is not one of {', '.join(BATCHTOPK_MODES)}; "
            "pick one of those."
        )
    if batchtopk_mode is not None and (
        sae.architecture == "batchtopk" or batchtopk_mode != "per-token"
    ):
        sae.set_batchtopk_mode(batchtopk_mode, threshold)
    target_device = best_device() if str(device) == "auto" else torch.device(device)
    return sae.to(device=target_device, dtype=dtype) if dtype else sae.to(target_device)


def save_sae(
    sae: SparseAutoencoder,
    directory: str | os.PathLike[str],
    format: str = "saelens",
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``sae`` as a ``saelens`` (v6) or ``sae_core`` directory; returns the directory.

    Files are written under temporary names and renamed at the end, so a failure
    leaves no half-written SAE behind.
    """
    writers = {"saelens": saelens.save, "sae_core": sae_core.save}
    if format not in writers:
        raise SaetuiInputError(
            f"cannot save an SAE in format {format!r}; choose saelens or sae_core."
        )
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise SaetuiInputError(
            f"{directory} is a file, but save_sae needs a directory to write into; "
            "choose another path."
        )
    files = writers[format](sae, directory)
    clashes = [name for name, _ in files if (directory / name).exists()]
    if clashes and not overwrite:
        raise SaetuiInputError(
            f"{directory} already holds {', '.join(clashes)}; choose an empty directory "
            "or allow overwriting."
        )
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    temporary: list[tuple[Path, Path]] = []
    try:
        for name, payload in files:
            tmp = directory / f".{name}.tmp"
            temporary.append((tmp, directory / name))
            if isinstance(payload, str):
                tmp.write_text(payload + "\n", encoding="utf-8")
            elif name.endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(payload, str(tmp))
            else:
                torch.save(payload, tmp)
        for tmp, final in temporary:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def describe(sae: SparseAutoencoder) -> dict[str, Any]:
    """A flat summary for ``saetui info``: format, shape, sparsity rule, hook, provenance."""
    threshold: dict[str, Any] | None = None
    if sae.threshold is not None:
        values = sae.threshold.detach().float().cpu().reshape(-1)
        if values.numel() == 1:
            threshold = {
                "kind": "global",
                "value": float(values[0]),
                "source": sae.threshold_source,
            }
        else:
            threshold = {
                "kind": "per-feature",
                "min": float(values.min()),
                "mean": float(values.mean()),
                "max": float(values.max()),
            }
    history_length = None
    if sae.history:
        history_length = max((len(v) for v in sae.history.values()), default=0)
    return {
        "path": str(sae.source_path) if sae.source_path else None,
        "format": sae.format,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "batchtopk_mode": sae.batchtopk_mode if sae.architecture == "batchtopk" else None,
        "threshold": threshold,
        "hook_name": sae.hook_name,
        "hook_layer": sae.hook_layer,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "model_name": sae.model_name,
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        "activation_scale": sae.activation_scale,
        "default_numerics": sae.default_numerics(),
        "default_start_token": sae.default_start_token(),
        "history_length": history_length,
    }

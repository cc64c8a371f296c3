"""Where a ``--model`` name points: a local directory, a Hugging Face hub name in the local
cache, or a hub name to download; decided without waiting on a network that is not there.

A name is a *local path* when it starts with ``.``, ``/`` or ``~``, ends with ``/``, holds
more than one ``/`` or a backslash, or its first component is an existing directory here
(``runs/model`` while ``./runs`` exists); a missing one fails at once. Anything else
(``gpt2``, ``Qwen/Qwen3-0.6B``) is a *hub name*: taken from the local Hugging Face cache when
it is there and the hub is unreachable or ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set;
otherwise, when the hub cannot be reached (one TCP connect, a few seconds at most), it fails
with a sentence that says how to point at a local copy instead of retrying for a minute.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from saetui.errors import SaetuiInputError

DEFAULT_ENDPOINT = "https://huggingface.co"
REACH_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a directory or hub name, and whether to stay offline."""

    location: str
    local_files_only: bool = False
    cache_dir: str | None = None


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (see the module docstring)."""
    if name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name:
        return True
    if name.count("/") > 1:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a true value, read now."""
    return any(
        os.environ.get(variable, "").strip().lower() in _TRUE
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as the environment names it now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def in_hub_cache(name: str, cache_dir: str) -> bool:
    """Whether the hub cache holds a snapshot of ``name`` with its config.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except Exception:  # an invalid repo id is simply not cached
        return False
    return isinstance(found, str)


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint (``HF_ENDPOINT``), bounded by ``timeout`` even when
    name resolution hangs. With a proxy configured the answer is left to the download."""
    if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, name="saetui-hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def model_source(name: str, default_model: str) -> ModelSource:
    """Resolve a ``--model`` name that is not an embedded model; see the module docstring."""
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(str(path))
    if path.exists():
        raise SaetuiInputError(
            f"Model path {name} is a file, but a Hugging Face model directory (config.json and "
            "weights) is expected; point --model at the directory that holds it."
        )
    if looks_like_path(name):
        raise SaetuiInputError(
            f"Model directory {name} does not exist; give an existing Hugging Face model "
            f"directory, a hub name, or the embedded model {default_model}."
        )
    cache_dir = hub_cache_dir()
    cached = in_hub_cache(name, cache_dir)
    if offline_requested():
        if cached:
            return ModelSource(name, local_files_only=True, cache_dir=cache_dir)
        raise SaetuiInputError(
            f"Model {name} is a Hugging Face hub name that is not in the local cache "
            f"({cache_dir}), and offline mode is set (HF_HUB_OFFLINE); download it where there "
            f"is network (huggingface-cli download {name} --local-dir DIR) and pass --model DIR."
        )
    if hub_reachable():
        return ModelSource(name, cache_dir=cache_dir)
    if cached:
        return ModelSource(name, local_files_only=True, cache_dir=cache_dir)
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    raise SaetuiInputError(
        f"Model {name} is a Hugging Face hub name, but {endpoint} cannot be reached from here "
        f"and the model is not in the local cache ({cache_dir}); download it where there is "
        f"network (huggingface-cli download {name} --local-dir DIR) and pass --model DIR."
    )

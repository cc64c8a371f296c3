"""Load and validate a run's inputs (corpus, SAE, model, hook) in the order that fails
fastest: files before the model load, the hook before any real forward pass."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saetui.errors import SaetuiInputError
from saetui.lm.names import DEFAULT_MODEL


@dataclass
class RunInputs:
    """What a user names on the command line for a run over a corpus."""

    sae: Path
    data: str
    model: str = DEFAULT_MODEL
    hook: str | None = None
    layer: int | None = None
    hook_name: str | None = None
    numerics: str | None = None
    device: str | None = "auto"
    dtype: str | None = "auto"
    text_field: str = "text"
    ctx_len: int = 128
    batch_size: int = 16
    max_tokens: int | None = None
    batchtopk_mode: str | None = None
    threshold: float | None = None
    # The token put in front of every document (saetui.lm.start); None: the SAE format's rule.
    start_token: str | None = None

    @classmethod
    def from_namespace(cls, args: Any) -> RunInputs:
        """From parsed command-line options (unknown attributes are ignored)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})

    def check(self) -> None:
        if self.ctx_len < 2:
            raise SaetuiInputError(f"--ctx-len {self.ctx_len} is too small; use at least 2 tokens.")
        if self.batch_size < 1:
            raise SaetuiInputError(f"--batch-size {self.batch_size} must be at least 1.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SaetuiInputError(f"--max-tokens {self.max_tokens} must be at least 1.")
        if self.ctx_len > 65535:
            raise SaetuiInputError(f"--ctx-len {self.ctx_len} is too large; use at most 65535.")
        if self.threshold is not None and not (
            math.isfinite(self.threshold) and self.threshold >= 0
        ):
            raise SaetuiInputError(
                f"--threshold {self.threshold} is not a finite number >= 0: give the BatchTopK "
                "activation threshold, or leave it out to estimate it."
            )
        if self.threshold is not None and self.batchtopk_mode not in (None, "threshold"):
            raise SaetuiInputError(
                f"--threshold only applies with --batchtopk-mode threshold, not "
                f"{self.batchtopk_mode}: drop --threshold or choose that mode."
            )
        for option, path in (("--sae", self.sae), ("--data", self.data)):
            if (
                isinstance(path, (str, Path))
                and _looks_local(str(path))
                and not Path(path).expanduser().exists()
            ):
                raise SaetuiInputError(f"{option} {path} does not exist: check the path.")


def _looks_local(name: str) -> bool:
    """A path on this machine, not a datasets/hub name (those contain no path separator
    other than one owner/name slash and do not exist locally)."""
    return name.startswith((".", "/", "~")) or Path(name).suffix in (".json", ".jsonl", ".txt")


@dataclass
class LoadedRun:
    corpus: Any
    sae: Any
    model: Any
    hook: str
    numerics: str


def load_run(
    inputs: RunInputs,
    say: Callable[[str], None] | None = None,
    check_stop: Callable[[], None] | None = None,
    sae: Any = None,
) -> LoadedRun:
    """Read the corpus, load the SAE (unless ``sae`` is given, loaded already) and the
    model, resolve and check the hook; ``check_stop`` is called between these steps and
    raises to stop."""
    from saetui.corpus import read_corpus
    from saetui.lm import load_model, resolve_hook
    from saetui.sae import load_sae

    check = check_stop or (lambda: None)
    inputs.check()
    corpus = read_corpus(inputs.data, text_field=inputs.text_field)
    check()
    if sae is None:
        sae = load_sae(inputs.sae, batchtopk_mode=inputs.batchtopk_mode, threshold=inputs.threshold)
    numerics = inputs.numerics or sae.default_numerics()
    check()
    started = time.perf_counter()
    model = load_model(
        inputs.model,
        device=inputs.device,
        dtype=inputs.dtype,
        numerics=numerics,
        start_token=inputs.start_token or sae.default_start_token(),
        progress=say,
    )
    if say:
        say(f"loaded {inputs.model} ({numerics} numerics) in {time.perf_counter() - started:.1f} s")
    check()
    hook = resolve_hook(
        model,
        hook=inputs.hook,
        layer=inputs.layer,
        hook_name=inputs.hook_name,
        sae_hook=sae.hook_name,
        sae_d_in=sae.d_in,
    )
    # The SAE encodes in its own dtype (the one it was trained and saved in), whatever the
    # model's: casting it to a bf16 model skews every stored activation and metric.
    sae.to(model.device)
    needs_threshold = sae.architecture == "batchtopk" and sae.batchtopk_mode == "threshold"
    if needs_threshold and sae.threshold is None:
        value = estimate_threshold(sae, model, corpus, hook, inputs.ctx_len, inputs.batch_size)
        if say:
            say(f"BatchTopK threshold {value:.6g} ({sae.threshold_source})")
    return LoadedRun(corpus=corpus, sae=sae, model=model, hook=hook, numerics=numerics)


THRESHOLD_SAMPLE_TOKENS = 4096


def estimate_threshold(
    sae: Any,
    model: Any,
    corpus: Any,
    hook: str,
    ctx_len: int,
    batch_size: int,
    max_tokens: int = THRESHOLD_SAMPLE_TOKENS,
) -> float:
    """Set a BatchTopK SAE's global threshold from the corpus's first windows.

    The sample is the windows of the first ``max_tokens`` tokens (4,096 by default; BOS and
    padding left out), cut and batched as the collection cuts them; the threshold makes the
    mean L0 over the sample equal k (:meth:`SparseAutoencoder.estimate_threshold`). The
    corpus order is fixed, so running the same configuration again gives the same value,
    which the run records.
    """
    import torch

    from saetui.corpus import batch_windows, iter_windows

    windows = iter_windows(corpus, model.tokenizer, ctx_len=ctx_len, max_tokens=max_tokens)
    sample = []
    for batch in batch_windows(windows, batch_size):
        activations = model.activations(torch.as_tensor(batch.tokens), hook)
        sample.append(activations[torch.as_tensor(batch.mask, device=activations.device)])
    return float(sae.estimate_threshold(sample))

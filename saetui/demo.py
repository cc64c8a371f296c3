"""``saetui demo``: load model, SAE and corpus, encode windows and print what the SAE found."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from saetui.errors import SaetuiInputError

DEMO_TOKENS = 4096


def load_inputs(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Corpus, SAE, model and hook from the common command-line options, validated in the
    order that fails fastest (files before the model load, hook before any forward pass)."""
    from saetui.corpus import read_corpus
    from saetui.lm import load_model, resolve_hook
    from saetui.sae import load_sae

    if args.ctx_len < 2:
        raise SaetuiInputError(f"--ctx-len {args.ctx_len} is too small; use at least 2 tokens.")
    if args.batch_size < 1:
        raise SaetuiInputError(f"--batch-size {args.batch_size} must be at least 1.")
    corpus = read_corpus(args.data, text_field=args.text_field)
    sae = load_sae(args.sae, batchtopk_mode=args.batchtopk_mode, threshold=args.threshold)
    numerics = args.numerics or sae.default_numerics()
    started = time.perf_counter()
    model = load_model(
        args.model, device=args.device, dtype=args.dtype, numerics=numerics, progress=say
    )
    say(f"loaded {args.model} ({numerics} numerics) in {time.perf_counter() - started:.1f} s")
    hook = resolve_hook(
        model,
        hook=args.hook,
        layer=args.layer,
        hook_name=args.hook_name,
        sae_hook=sae.hook_name,
        sae_d_in=sae.d_in,
    )
    sae.to(model.device, model.dtype)
    return {"corpus": corpus, "sae": sae, "model": model, "hook": hook, "numerics": numerics}


def run_demo(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Encode the first windows of the sample corpus and print the busiest features."""
    from saetui.collect.metrics import ReconstructionMetrics
    from saetui.corpus import batch_windows, iter_windows

    inputs = load_inputs(args, say)
    model, sae, hook = inputs["model"], inputs["sae"], inputs["hook"]
    corpus = inputs["corpus"]
    budget = args.max_tokens or DEMO_TOKENS
    print(f"corpus   {corpus.source}: {len(corpus.documents)} documents")
    print(f"SAE      {args.sae}: {sae.architecture}, d_in {sae.d_in}, d_sae {sae.d_sae}")
    print(f"model    {model.name} on {model.device} ({inputs['numerics']} numerics), hook {hook}")

    metrics = ReconstructionMetrics(d_sae=sae.d_sae)
    top_tokens: dict[int, Counter[int]] = {}
    started = time.perf_counter()
    windows = iter_windows(corpus, model.tokenizer, ctx_len=args.ctx_len, max_tokens=budget)
    with torch.no_grad():
        for batch in batch_windows(windows, args.batch_size):
            tokens = torch.as_tensor(batch.tokens)
            mask = torch.as_tensor(batch.mask)
            x = model.activations(tokens, hook)[mask]
            acts = sae.encode(x)
            metrics.update(x, sae.decode(acts), acts)
            token_ids = tokens.to(model.device)[mask]
            rows, cols = acts.nonzero(as_tuple=True)
            for row, feature in zip(rows.tolist(), cols.tolist(), strict=False):
                top_tokens.setdefault(feature, Counter())[int(token_ids[row])] += 1
    elapsed = time.perf_counter() - started
    result = metrics.result()
    if not result:
        raise SaetuiInputError(f"The corpus {corpus.source} gave no tokens to encode.")
    print(
        f"encoded  {result['tokens']} tokens in {elapsed:.1f} s "
        f"({result['tokens'] / elapsed:.0f} tokens/s)"
    )
    print(
        f"metrics  L0 {result['l0_mean']:.1f}  explained variance "
        f"{result['explained_variance']:.3f}  cosine {result['cosine']:.3f}  "
        f"features fired {sae.d_sae - result['dead_features']}/{sae.d_sae}"
    )
    print("busiest features (tokens fired on, most common tokens):")
    busiest = sorted(top_tokens, key=lambda f: -sum(top_tokens[f].values()))[:10]
    for feature in busiest:
        common = ", ".join(
            repr(model.tokenizer.decode([token])) for token, _ in top_tokens[feature].most_common(4)
        )
        print(f"  #{feature:<6} {sum(top_tokens[feature].values()):>5}  {common}")
    return 0

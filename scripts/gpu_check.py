"""GPU check: the embedded sample collected on CUDA (bf16 model, fp32 SAE, summaries merged
on the device) and on this machine's CPU (fp32) for the same tokens, the two indexes
compared, and the GPU's throughput printed. Run by scripts/gpu_check.sh on a GPU machine.

Checks (exit code 1 when one fails):
- the same windows and tokens in both indexes;
- per token, the same active features (fraction of tokens, target >= 0.99: bf16
  activations may swap a feature at the top-k boundary);
- values of the features both found, within bf16 tolerance (|a - b| <= 0.05 |b| + 0.02 for
  >= 99.9% of them);
- per feature, the same top-K examples up to ties (mean overlap of the global token indexes,
  target >= 0.95).
Figures: tokens/s of the model alone (forward stopped at the hook layer) and of the full
collection, the summary merge time per batch on the device, and host<->device copies per
batch (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def collect(out: Path, device: str, dtype: str, tokens: int, batch_size: int) -> dict:
    from saetui.collect.inputs import RunInputs
    from saetui.collect.pipeline import CollectConfig, run_collection

    inputs = RunInputs(
        sae=ROOT / "sample_data" / "sae",
        data=str(ROOT / "sample_data" / "corpus.json"),
        device=device,
        dtype=dtype,
        max_tokens=tokens,
        batch_size=batch_size,
    )
    started = time.perf_counter()
    result = run_collection(CollectConfig(out=out, inputs=inputs, metrics_tokens=2048))
    return {
        "seconds": time.perf_counter() - started,
        "collect_tokens_per_s": result.collect_tokens_per_s,
        "tokens": result.tokens,
    }


def compare(gpu: Path, cpu: Path) -> dict:
    from saetui.index import open_index

    with open_index(gpu) as a, open_index(cpu) as b:
        pa, pb = a.progress(), b.progress()
        assert (pa.windows, pa.tokens) == (pb.windows, pb.tokens), "different windows"
        same_sets = tokens = matched = close = 0
        for window in range(pa.windows):
            wa, wb = a.window(window), b.window(window)
            assert wa.tokens == wb.tokens, f"window {window} holds other tokens"
            for position in range(len(wa.tokens)):
                ta, tb = a.token(window, position), b.token(window, position)
                tokens += 1
                same_sets += set(ta.feature_ids.tolist()) == set(tb.feature_ids.tolist())
                va = dict(zip(ta.feature_ids.tolist(), ta.values.tolist(), strict=True))
                for feature, value in zip(tb.feature_ids.tolist(), tb.values.tolist(), strict=True):
                    if feature in va:
                        matched += 1
                        close += abs(va[feature] - value) <= 0.05 * abs(value) + 0.02
        overlaps = []
        for feature in range(a.meta.d_sae):
            ea = {e.global_index for e in a.top_examples(feature, a.meta.top_k)}
            eb = {e.global_index for e in b.top_examples(feature, b.meta.top_k)}
            if eb:
                overlaps.append(len(ea & eb) / len(eb))
    return {
        "tokens_same_features": same_sets / max(tokens, 1),
        "values_within_bf16": close / max(matched, 1),
        "topk_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
    }


def throughput(tokens: int, batch_size: int) -> dict:
    """Model-only tokens/s, summary merge per batch and copies per batch, on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    from saetui.collect.inputs import RunInputs, load_run
    from saetui.collect.pipeline import encode_batch
    from saetui.corpus import batch_windows, iter_windows
    from saetui.index.summary import FeatureSummaries

    inputs = RunInputs(
        sae=ROOT / "sample_data" / "sae",
        data=str(ROOT / "sample_data" / "corpus.json"),
        device="cuda",
        dtype="bfloat16",
        batch_size=batch_size,
    )
    run = load_run(inputs)
    windows = iter_windows(run.corpus, run.model.tokenizer, ctx_len=128, max_tokens=tokens)
    batches = list(batch_windows(windows, batch_size))
    n_tokens = sum(int(b.lengths.sum()) for b in batches)
    run.model.activations(torch.as_tensor(batches[0].tokens), run.hook)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        run.model.activations(torch.as_tensor(batch.tokens), run.hook)
    torch.cuda.synchronize()
    model_only = n_tokens / (time.perf_counter() - started)
    started = time.perf_counter()
    encoded = [encode_batch(run, batch) for batch in batches]
    torch.cuda.synchronize()
    model_and_sae = n_tokens / (time.perf_counter() - started)
    summaries = FeatureSummaries(run.sae.d_sae, 128, 64, 3, "cuda")
    merge_s = []
    first = 0
    for batch, (ids, values, counted) in zip(batches, encoded, strict=True):
        tokens_flat = np.concatenate(
            [row[: int(n)] for row, n in zip(batch.tokens, batch.lengths, strict=True)]
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        summaries.update_windows(
            first, batch.lengths, tokens_flat, ids, values, counted, window_ids=batch.window_ids
        )
        torch.cuda.synchronize()
        merge_s.append(time.perf_counter() - started)
        first += len(batch)
    probe = batches[: min(10, len(batches))]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in probe:
            ids, values, _ = encode_batch(run, batch)
            ids.cpu(), values.cpu()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    return {
        "model_only_tokens_per_s": model_only,
        "model_and_sae_tokens_per_s": model_and_sae,
        "summary_merge_ms_per_batch": 1000 * float(np.median(merge_s[1:] or merge_s)),
        "h2d_copies_per_batch": sum("HtoD" in n for n in names) / len(probe),
        "d2h_copies_per_batch": sum("DtoH" in n for n in names) / len(probe),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--throughput-tokens", type=int, default=200_000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="saetui-gpu-check-"))
    figures: dict = {}
    figures["cuda"] = collect(root / "cuda", "cuda", "bfloat16", args.tokens, args.batch_size)
    figures["cpu"] = collect(root / "cpu", "cpu", "float32", args.tokens, args.batch_size)
    figures["cuda_long"] = collect(
        root / "cuda-long", "cuda", "bfloat16", args.throughput_tokens, args.batch_size
    )
    figures["compare"] = compare(root / "cuda", root / "cpu")
    figures["throughput"] = throughput(args.throughput_tokens, args.batch_size)
    checks = {
        "tokens_same_features >= 0.99": figures["compare"]["tokens_same_features"] >= 0.99,
        "values_within_bf16 >= 0.999": figures["compare"]["values_within_bf16"] >= 0.999,
        "topk_overlap >= 0.95": figures["compare"]["topk_overlap"] >= 0.95,
    }
    for name, section in figures.items():
        print(name, json.dumps(section))
    t = figures["throughput"]
    print(
        f"model only {t['model_only_tokens_per_s']:,.0f} tokens/s, model + SAE "
        f"{t['model_and_sae_tokens_per_s']:,.0f}, full collect "
        f"{figures['cuda_long']['collect_tokens_per_s']:,.0f} (on {args.throughput_tokens:,} "
        "tokens); summary "
        f"merge {t['summary_merge_ms_per_batch']:.2f} ms/batch; copies per batch "
        f"{t['h2d_copies_per_batch']:.1f} H2D, {t['d2h_copies_per_batch']:.1f} D2H"
    )
    for name, ok in checks.items():
        print(f"{'ok ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Several SAEs in one pass vs one pass per SAE, on the embedded sample.

The sample SAE (SmolLM2-135M, blocks.9.hook_resid_post, d_sae 2048, k 32) and k-1 copies
of it with features permuted and weights noised (same shape and sparsity, sae_core format,
in a temporary directory). Each run is ``run_collection`` into a fresh index, in this
process with the model load included, whole pipeline (collecting, metrics, neighbours):

- one SAE alone, each SAE (the k separate passes; "one SAE" is their mean);
- the k SAEs together (``saetui collect --sae A --sae B ...``).

Prints the collecting-phase and end-to-end seconds, the ratio k-together / one-alone
(target <= 1.5 for k = 3) and k-together / k-separate, and what each index stores:
bytes of windows (tokens, segments: the part every index of one pass holds a copy of)
against bytes of features (sparse codes, summaries, examples, neighbours).
--json prints the figures as one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
WINDOW_DBS = ("tok",)  # per-window tokens and segments: the same in every index of a pass


def variant_sae(source: Path, out: Path, seed: int) -> Path:
    """A copy of the SAE at ``source`` with its features permuted and noised."""
    shutil.copytree(source, out)
    state = torch.load(source / "weights.pt", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(state["W_enc"].shape[1], generator=generator)
    for key, axis in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0), ("num_batches_not_active", 0)):
        if key in state:
            state[key] = state[key].index_select(axis, order)
    for key in ("W_enc", "W_dec"):
        noise = torch.randn(state[key].shape, generator=generator) * state[key].std() * 0.05
        state[key] = state[key] + noise
    torch.save(state, out / "weights.pt")
    return out


def db_bytes(index: Path) -> dict[str, int]:
    """Bytes of pages each database of an index's shards occupies."""
    import lmdb

    sizes: dict[str, int] = {}
    for shard in sorted(index.glob("shard-*")):
        env = lmdb.open(str(shard), readonly=True, lock=False, max_dbs=64)
        try:
            with env.begin() as txn:
                names = [key for key, _ in txn.cursor()]
                for name in names:
                    stat = txn.stat(env.open_db(name, txn=txn, create=False))
                    pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
                    sizes[name.decode()] = sizes.get(name.decode(), 0) + pages * stat["psize"]
        finally:
            env.close()
    return sizes


def collect(saes: list[Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from saetui.collect.inputs import RunInputs
    from saetui.collect.pipeline import CollectConfig, run_collection

    phases: dict[str, float] = {}
    current = [""]
    marks = [time.perf_counter()]

    def progress(update: Any) -> None:
        if update.phase != current[0]:
            now = time.perf_counter()
            if current[0]:
                phases[current[0]] = phases.get(current[0], 0.0) + now - marks[0]
            current[0], marks[0] = update.phase, now

    inputs = RunInputs(
        sae=saes[0],
        data=str(ROOT / "saetui" / "sample_data" / "corpus.json"),
        device=args.device,
        max_tokens=args.max_tokens,
    )
    config = CollectConfig(out=out, inputs=inputs, saes=tuple(saes) if len(saes) > 1 else ())
    started = time.perf_counter()
    result = run_collection(config, progress=progress)
    seconds = time.perf_counter() - started
    assert result.status == "finished", result
    progress(type("End", (), {"phase": "end"})())
    return {
        "tokens": result.tokens,
        "seconds": seconds,
        "collecting_s": phases["collecting"],
        "phases_s": {name: round(value, 2) for name, value in phases.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saes", type=int, default=3, help="SAEs collected together")
    parser.add_argument("--max-tokens", type=int, default=20_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="saetui-bench-multi-"))
    try:
        sample = ROOT / "saetui" / "sample_data" / "sae"
        saes = [sample] + [
            variant_sae(sample, work / f"sae-{i}", seed=i) for i in range(1, args.saes)
        ]
        # warm-up, not counted: the first run in a process pays the imports and cold file
        # caches (about 17 s of "loading" on this machine), which would land on whichever
        # variant runs first
        collect([sample], work / "warm-up", argparse.Namespace(**{**vars(args), "max_tokens": 256}))
        together = collect(saes, work / "together", args)
        print(f"together: {json.dumps(together)}", flush=True)
        alone = []
        for i, sae in enumerate(saes):
            alone.append(collect([sae], work / f"alone-{i}", args))
            print(f"alone {i}: {json.dumps(alone[-1])}", flush=True)
        separate = {key: sum(run[key] for run in alone) for key in ("seconds", "collecting_s")}
        # one SAE: the mean of the separate passes (the SAEs have one shape)
        one = {key: value / len(alone) for key, value in separate.items()}
        one["phases_s"] = {
            name: round(sum(run["phases_s"].get(name, 0.0) for run in alone) / len(alone), 2)
            for name in alone[0]["phases_s"]
        }
        sizes = db_bytes(work / "alone-0")
        windows = sum(v for k, v in sizes.items() if k in WINDOW_DBS)
        features = sum(v for k, v in sizes.items() if k not in WINDOW_DBS and k != "meta")
        per_token = {
            name: sizes.get(name, 0) / max(together["tokens"], 1) for name in ("tok", "fwd")
        }
        figures = {
            "saes": args.saes,
            "tokens": together["tokens"],
            "one_alone": one,
            "separate_passes": separate,
            "together": together,
            "collecting_ratio_vs_one": together["collecting_s"] / one["collecting_s"],
            "end_to_end_ratio_vs_one": together["seconds"] / one["seconds"],
            "collecting_ratio_vs_separate": together["collecting_s"] / separate["collecting_s"],
            "end_to_end_ratio_vs_separate": together["seconds"] / separate["seconds"],
            "bytes_per_index": sizes,
            "window_bytes_per_index": windows,
            "feature_bytes_per_index": features,
            "bytes_per_token": per_token,
        }
        k = args.saes
        print(f"{together['tokens']:,} tokens, {k} SAEs (d_sae 2048, k 32) at blocks.9")
        print(
            f"  one SAE (mean):     collecting {one['collecting_s']:6.1f} s, "
            f"end to end {one['seconds']:6.1f} s"
        )
        print(
            f"  {k} separate passes: collecting {separate['collecting_s']:6.1f} s, "
            f"end to end {separate['seconds']:6.1f} s"
        )
        print(
            f"  {k} in one pass:     collecting {together['collecting_s']:6.1f} s, "
            f"end to end {together['seconds']:6.1f} s"
        )
        for label, run in (("one SAE (mean)", one), (f"{k} together", together)):
            parts = ", ".join(f"{name} {value:.1f} s" for name, value in run["phases_s"].items())
            print(f"  phases of {label}: {parts}")
        print(
            f"  one pass / one SAE: collecting {figures['collecting_ratio_vs_one']:.2f}x, "
            f"end to end {figures['end_to_end_ratio_vs_one']:.2f}x (target <= 1.5x for 3)"
        )
        print(
            f"  one pass / separate: collecting {figures['collecting_ratio_vs_separate']:.2f}x, "
            f"end to end {figures['end_to_end_ratio_vs_separate']:.2f}x"
        )
        print(
            f"  per index: windows (copied in each) {windows / 1e6:.2f} MB, features "
            f"{features / 1e6:.2f} MB ({windows / max(windows + features, 1):.1%} of the index); "
            f"per token: windows {per_token['tok']:.1f} B, sparse codes {per_token['fwd']:.1f} B"
        )
        if args.json:
            print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Train the sample SAE shipped in sample_data/sae/ (sae_core format, BatchTopK).

SmolLM2-135M (embedded), blocks.9.hook_resid_post, d_sae 2048, k 32, on the training
split of sample_data/corpus.json; then measures it with saetui's own metric code on the
held-out paragraphs and writes the figures to sample_data/sae/quality.json.

Deterministic: fixed seeds, single-threaded-equivalent ops on the CPU. Takes minutes.
Usage: python scripts/train_sample_sae.py [--out sample_data/sae] [--epochs 20]

The second sample SAE (`saetui demo --compare`, tests) is the same model, hook, corpus and
recipe at another width: ``--second`` trains it into sample_data/sae_1024 (d_sae 1024, k 16;
4.7 MB of float32 weights), the same as ``--out sample_data/sae_1024 --d-sae 1024 --k 16``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saetui.collect.evaluate import evaluate_sae
from saetui.corpus import batch_windows, iter_windows, read_corpus, split_documents
from saetui.lm import load_model
from saetui.sae import load_sae

ROOT = Path(__file__).resolve().parent.parent
HOOK_LAYER = 9
HOOK = f"blocks.{HOOK_LAYER}.hook_resid_post"
NUMERICS = "hooked"  # what the sae_core format's SAEs were trained on (HookedTransformer)


def collect_activations(model, documents: list[str], ctx_len: int) -> torch.Tensor:
    """Activations at HOOK for every real non-BOS token of the corpus, [n, d_model]."""
    rows = []
    for batch in batch_windows(iter_windows(documents, model.tokenizer, ctx_len=ctx_len), 32):
        tokens = torch.as_tensor(batch.tokens)
        mask = torch.as_tensor(batch.mask)
        rows.append(model.activations(tokens, HOOK)[mask].float())
    return torch.cat(rows)


def batch_topk(pre: torch.Tensor, k: int, candidates: int = 4) -> torch.Tensor:
    """Keep the top n*k pre-activations of the batch, zero the rest.

    Two stages for speed on the CPU: each token's top ``candidates * k`` first, then the
    batch-wide top n*k among those (exact unless one token holds more than 4k of them).
    """
    per_token = pre.topk(min(candidates * k, pre.shape[-1]), dim=-1)
    kept = per_token.values.flatten().topk(k * pre.shape[0])
    rows = torch.div(kept.indices, per_token.values.shape[1], rounding_mode="floor")
    columns = per_token.indices.flatten()[kept.indices]
    acts = torch.zeros_like(pre)
    acts[rows, columns] = kept.values
    return acts


def train_batchtopk(
    activations: torch.Tensor, d_sae: int, k: int, k_aux: int, epochs: int, batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """A BatchTopK SAE with an auxiliary top-k loss on dead latents (Gao et al. 2024)."""
    generator = torch.Generator().manual_seed(0)
    n, d_in = activations.shape
    w_dec = torch.randn(d_sae, d_in, generator=generator)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    params = {
        "W_enc": torch.nn.Parameter(w_dec.T.clone()),
        "b_enc": torch.nn.Parameter(torch.zeros(d_sae)),
        "W_dec": torch.nn.Parameter(w_dec),
        "b_dec": torch.nn.Parameter(activations.mean(0)),
    }
    optimiser = torch.optim.Adam(params.values(), lr=4e-4, betas=(0.9, 0.999))
    steps_since_active = torch.zeros(d_sae, dtype=torch.long)
    history: dict[str, list[float]] = {"loss": [], "recon_loss": [], "aux_loss": [], "sparsity": []}
    total_variance = (activations - activations.mean(0)).pow(2).sum(-1).mean()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        sums = dict.fromkeys(history, 0.0)
        batches = 0
        for start in range(0, n - batch_size + 1, batch_size):
            x = activations[order[start : start + batch_size]]
            pre = torch.relu((x - params["b_dec"]) @ params["W_enc"])
            acts = batch_topk(pre, k)
            x_hat = acts @ params["W_dec"] + params["b_dec"]
            residual = x - x_hat
            recon = residual.pow(2).sum(-1).mean() / total_variance
            fired = (acts > 0).any(0)
            steps_since_active = torch.where(fired, 0, steps_since_active + 1)
            dead = steps_since_active > 50
            aux = torch.zeros(())
            if dead.any():
                dead_pre = pre.masked_fill(~dead, 0.0)
                aux_top = dead_pre.topk(min(k_aux, int(dead.sum())), dim=-1)
                aux_acts = torch.zeros_like(pre).scatter(-1, aux_top.indices, aux_top.values)
                aux_hat = aux_acts @ params["W_dec"]
                aux = (residual.detach() - aux_hat).pow(2).sum(-1).mean() / total_variance
            loss = recon + aux / 32
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
            sums["loss"] += float(loss.detach())
            sums["recon_loss"] += float(recon.detach())
            sums["aux_loss"] += float(aux.detach())
            sums["sparsity"] += float((acts > 0).float().sum(-1).mean())
            batches += 1
        for key in history:
            history[key].append(sums[key] / batches)
        print(
            f"epoch {epoch + 1}/{epochs}: fvu {history['recon_loss'][-1]:.4f} "
            f"aux {history['aux_loss'][-1]:.4f} dead {int(dead.sum())}",
            flush=True,
        )
    weights = {name: p.detach().clone().contiguous() for name, p in params.items()}
    weights["num_batches_not_active"] = steps_since_active
    return weights, history


def measure_quality(model, directory: Path, held_out_docs: list[str], ctx_len: int) -> dict:
    """Quality on the held-out paragraphs with saetui's own metric code; writes quality.json."""
    sae = load_sae(directory)
    windows = iter_windows(held_out_docs, model.tokenizer, ctx_len=ctx_len)
    quality = evaluate_sae(model, sae, HOOK, batch_windows(windows, 16))
    quality["held_out_documents"] = len(held_out_docs)
    quality["batchtopk_mode"] = sae.batchtopk_mode
    quality["numerics"] = NUMERICS
    (directory / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    return quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data" / "sae")
    parser.add_argument("--corpus", type=Path, default=ROOT / "sample_data" / "corpus.json")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--k-aux", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="measure the SAE already in --out on the held-out paragraphs, no training",
    )
    parser.add_argument(
        "--second",
        action="store_true",
        help="the second sample SAE: --out sample_data/sae_1024 --d-sae 1024 --k 16",
    )
    args = parser.parse_args()
    if args.second:
        args.out, args.d_sae, args.k = ROOT / "sample_data" / "sae_1024", 1024, 16
    torch.manual_seed(0)
    started = time.perf_counter()

    model = load_model("smollm2-135m", numerics=NUMERICS)
    corpus = read_corpus(args.corpus)
    train_docs, held_out_docs = split_documents(corpus.documents, held_out_fraction=0.1, seed=0)
    if args.evaluate_only:
        print(json.dumps(measure_quality(model, args.out, held_out_docs, args.ctx_len), indent=2))
        return
    activations = collect_activations(model, train_docs, args.ctx_len)
    print(
        f"{activations.shape[0]} training tokens at {HOOK} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    weights, history = train_batchtopk(
        activations, args.d_sae, args.k, args.k_aux, args.epochs, args.batch_size
    )
    config = {
        "d_in": activations.shape[1],
        "d_sae": args.d_sae,
        "dtype": "float32",
        "hook_layer": HOOK_LAYER,
        "hook_name": "hook_resid_post",
        "hook_spec": HOOK,
        "top_k": args.k,
        "top_k_aux": args.k_aux,
        "model_name": "smollm2-135m",
        "numerics": NUMERICS,
        "context_size": args.ctx_len,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": 4e-4,
        "training_tokens": int(activations.shape[0]),
        "trained_by": "scripts/train_sample_sae.py",
    }
    # Written to a temporary sibling and renamed, so a failed run leaves the old SAE intact.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sae-", dir=args.out.parent))
    torch.save(weights, staging / "weights.pt")
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "history.json").write_text(json.dumps(history, indent=2) + "\n")

    quality = measure_quality(model, staging, held_out_docs, args.ctx_len)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    print(json.dumps(quality, indent=2))
    print(f"done in {time.perf_counter() - started:.0f} s; SAE in {args.out}")


if __name__ == "__main__":
    main()

"""A plain-PyTorch reference collection, for bench_collect.py's third column: what a careful
user writes in ~30 lines without saetui. SmolLM2-135M (transformers, the layers after the
hook dropped), the sample SAE's per-token top-k encode, batched, and a running top-64 per
feature merged with torch.topk. Nothing is stored; no metrics, no neighbours."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def reference_collect(
    model_dir: Path, sae_dir: Path, texts: list[str], *, max_tokens: int, ctx: int = 128,
    batch: int = 16, layer: int = 9, k: int = 32, top: int = 64,
) -> dict:  # fmt: skip
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: layer + 1]  # stop after the hook layer
    captured = {}
    model.model.layers[layer].register_forward_hook(lambda m, i, o: captured.update(x=o))
    sae = torch.load(sae_dir / "weights.pt", weights_only=True)
    w_enc, b_dec = sae["W_enc"], sae["b_dec"]
    ids = [tokenizer.bos_token_id]
    for text in texts:  # BOS + document, concatenated, cut into windows
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.bos_token_id]
        if len(ids) >= max_tokens:
            break
    windows = torch.tensor(ids[: max_tokens // ctx * ctx]).view(-1, ctx)
    load_s = time.perf_counter() - started
    best = torch.zeros(top, w_enc.shape[1])
    collect_started = time.perf_counter()
    for start in range(0, len(windows), batch):
        model.model(windows[start : start + batch])
        x = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
        pre = torch.relu((x.reshape(-1, x.shape[-1]) - b_dec) @ w_enc)
        values, feature = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter_(1, feature, values)
        best = torch.cat([best, acts]).topk(top, dim=0).values
    collect_s = time.perf_counter() - collect_started
    return {
        "tokens": windows.numel(),
        "load_s": load_s,
        "collect_s": collect_s,
        "collect_tokens_per_s": windows.numel() / collect_s,
        "total_s": time.perf_counter() - started,
    }

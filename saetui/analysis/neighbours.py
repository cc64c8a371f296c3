"""Feature neighbours that need no corpus pass: decoder-cosine nearest features and the
tokens each feature's decoder direction promotes or suppresses through the unembedding."""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def decoder_cosine_neighbours(
    w_dec: torch.Tensor,
    top_n: int = 16,
    chunk: int = 4096,
    check_stop: Callable[[], None] | None = None,
    *,
    rows: tuple[int, int] | None = None,
    max_chunk_bytes: int = 256 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_n`` other features by cosine of decoder rows, for features ``rows``
    ([lo, hi), default all).

    ``w_dec`` is [d_sae, d_in]; the products run on its device, ``chunk`` rows at a time
    and never more than ``max_chunk_bytes`` of [rows, d_sae] cosines (512 rows at d_sae
    131k), so memory is bounded whatever d_sae is. Returns (ids int64 [rows, n], scores
    float32 [rows, n]) on the CPU. ``check_stop`` is called between chunks and raises to
    stop.
    """
    d_sae = w_dec.shape[0]
    lo, hi = rows or (0, d_sae)
    n = min(top_n, d_sae - 1)
    chunk = max(1, min(chunk, max_chunk_bytes // (4 * d_sae)))
    unit = torch.nn.functional.normalize(w_dec.float(), dim=-1)
    ids = torch.empty(hi - lo, n, dtype=torch.int64)
    scores = torch.empty(hi - lo, n, dtype=torch.float32)
    for start in range(lo, hi, chunk):
        if check_stop is not None:
            check_stop()
        part = unit[start : min(start + chunk, hi)]
        cosine = part @ unit.T
        own = torch.arange(start, start + part.shape[0], device=unit.device)
        cosine[torch.arange(part.shape[0], device=unit.device), own] = -float("inf")
        best = cosine.topk(n, dim=-1)
        ids[start - lo : start - lo + part.shape[0]] = best.indices.cpu()
        scores[start - lo : start - lo + part.shape[0]] = best.values.cpu()
    return ids, scores


@torch.no_grad()
def logit_effects(
    w_dec: torch.Tensor,
    w_u: torch.Tensor,
    top_n: int = 10,
    chunk: int = 1024,
    check_stop: Callable[[], None] | None = None,
    *,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens each feature promotes and suppresses: top/bottom of ``w_dec @ w_u``.

    ``w_dec`` [d_sae, d_model], ``w_u`` [d_model, vocab]. Only the first ``vocab_size``
    columns of ``w_u`` count: real checkpoints pad their unembedding past the tokenizer
    (Qwen3-0.6B: 151,936 rows), and a padding column is no token a reader can see. Returns
    promoted ids, promoted values, suppressed ids, suppressed values, each
    [d_sae, min(top_n, vocab)].
    """
    if vocab_size is not None:
        w_u = w_u[:, :vocab_size]
    d_sae = w_dec.shape[0]
    top_n = min(top_n, w_u.shape[1])
    outputs = [
        torch.empty(d_sae, top_n, dtype=dtype)
        for dtype in (torch.int64, torch.float32, torch.int64, torch.float32)
    ]
    w_u = w_u.float()
    for start in range(0, d_sae, chunk):
        if check_stop is not None:
            check_stop()
        effects = w_dec[start : start + chunk].float() @ w_u
        up = effects.topk(top_n, dim=-1)
        down = effects.topk(top_n, dim=-1, largest=False)
        stop = start + effects.shape[0]
        outputs[0][start:stop] = up.indices.cpu()
        outputs[1][start:stop] = up.values.cpu()
        outputs[2][start:stop] = down.indices.cpu()
        outputs[3][start:stop] = down.values.cpu()
    return outputs[0], outputs[1], outputs[2], outputs[3]

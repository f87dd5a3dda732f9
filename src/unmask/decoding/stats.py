"""Per-position statistics of a distribution, computed a chunk of positions at a time.

At a real checkpoint's vocabulary (LLaDA: 126,464) one position's float32 distribution is 0.5 MB,
so a step's block (32 sequences x 32 positions) is 0.5 GB of logits and every vocabulary-sized
temporary (softmax, log-softmax, their product) as much again. The statistics a policy reads are
per position (top-1, its probability, the top-1/top-2 margin, the entropy), so they are computed
over chunks of at most `LOGITS_BUDGET` vocabulary entries and only the (positions,) results are
kept; `project_stats` does the same from features, so a canvas read only through its statistics
(a draft canvas, the positions outside the current block) never has its logits held at once.
"""

from __future__ import annotations

from typing import Callable

import torch

# float32 entries one chunk's vocabulary-sized temporaries may hold (64 MiB each)
LOGITS_BUDGET = 1 << 24
STAT_KEYS = ("top1", "top1_prob", "margin", "entropy")


def chunk_rows(n: int, vocab: int) -> list[slice]:
    """Slices of `n` positions, each holding at most LOGITS_BUDGET entries of a `vocab`-wide tensor."""
    step = max(1, LOGITS_BUDGET // max(int(vocab), 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of (n, vocab) logits, in float32."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    top2 = torch.topk(log_probs, k=min(2, log_probs.shape[-1]), dim=-1)
    top1_prob = top2.values[..., 0].exp()
    second = top2.values[..., 1].exp() if top2.values.shape[-1] > 1 else torch.zeros_like(top1_prob)
    entropy = -(log_probs.exp() * log_probs.clamp(min=-1e30)).sum(-1)
    return {"top1": top2.indices[..., 0], "top1_prob": top1_prob, "margin": top1_prob - second, "entropy": entropy}


def token_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of the un-noised distribution, in float32. logits: (..., vocab).

    Returns top1, top1_prob, margin and entropy, each shaped like `logits` without its last axis."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    parts = [_stats(flat[rows]) for rows in chunk_rows(flat.shape[0], vocab)]
    if not parts:
        parts = [_stats(flat)]
    return {k: torch.cat([p[k] for p in parts]).reshape(lead) for k in STAT_KEYS}


def project_stats(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], vocab: int, mask_id: int,
                  keys=STAT_KEYS) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Statistics of the logits `head(features)` (n, F) -> (n, vocab) with the mask token's logit at
    -inf, a chunk of positions at a time, and whether each position's logits are usable (no NaN, no
    +inf, some finite value) as (n,) bool. The vocabulary-sized logits are dropped chunk by chunk."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    finite: list[torch.Tensor] = []
    for rows in chunk_rows(features.shape[0], vocab) or [slice(0, 0)]:
        logits = head(features[rows]).float()
        logits[:, mask_id] = float("-inf")
        finite.append(torch.isfinite(logits.amax(-1)))
        stats = _stats(logits)
        for k in keys:
            out[k].append(stats[k])
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(finite)

"""Verification: score a step's committed block and its drafts in one batched call (PSD).

A drafting policy returns, with its commits, K nested drafts of the block built from the same
call's predictions. The loop forwards one canvas per (sequence, level it really built) in one call
(one NFE per sequence, one row per canvas), asks the policy which depth to keep
(`Policy.accept`), and hands the accepted canvas's predictions to the sequence's next step, which
needs no call of its own.

The drafts are read only through their top-1 and its probability at the block's positions, so
those are computed a chunk at a time and no draft's logits are kept; the accepted canvas keeps its
features (the next step treats them as its own call's output: its block's logits are projected
from them, and without a cache its other positions become the last-known predictions, even when
that next step starts a new block). With a cache, draft rows compute their block only, over their
sequence's cached keys, and write nothing back.
"""

from __future__ import annotations

import torch

from unmask.decoding.calls import ModelCalls, Said
from unmask.decoding.policies.base import Policy, StepView


def verify(calls: ModelCalls, policy: Policy, view: StepView, state, drafts: torch.Tensor,
           committed_blk: torch.Tensor) -> tuple[torch.Tensor, dict[int, Said], dict[str, torch.Tensor]]:
    """Keep the depth of `drafts` (b, K, block) the policy accepts over `committed_blk` (b, block).

    Returns the accepted block tokens (b, block), per slot what the accepted canvas said (the next
    step's forward), and the policy's events."""
    table = calls.table
    idx, block_pos = view.rows, view.positions
    b, depth_max, block = drafts.shape
    device = drafts.device
    candidates = torch.cat([committed_blk[:, None], drafts], dim=1)  # (b, K+1, block)
    built = (candidates[:, 1:] != candidates[:, :-1]).any(-1).sum(-1)  # (b,) levels with new tokens
    verified = (built > 0).nonzero().squeeze(1)
    if verified.numel() == 0:
        # nothing to verify; the policy still hears "depth 0" for every sequence, as in a batch
        with calls.timed("policy_s"):
            _, events = policy.accept(view, state, candidates, candidates.clone(),
                                      torch.ones(candidates.shape, device=device))
        return committed_blk, {}, events
    # one canvas per (sequence, level 0..built)
    owner = torch.repeat_interleave(verified, built[verified] + 1)
    level = torch.cat([torch.arange(int(built[j]) + 1, device=device) for j in verified.tolist()])
    canvases = torch.arange(owner.shape[0], device=device)[:, None]
    owner_slots = idx[owner]
    tokens = table.canvas[owner_slots].clone()
    tokens[canvases, table.prompt_len + block_pos[owner]] = candidates[owner, level]
    per_seq = (built[verified] + 1).cpu()
    cached = table.cache is not None
    # with a cache, or a block-causal model (whose later positions nothing reads), the block alone
    block_only = cached or table.attn_block is not None
    where = block_pos[owner] if block_only else torch.arange(table.gen, device=device).expand(owner.shape[0], -1)
    if cached and table.attn_block is not None:
        # block-causal: the block's exact span (a shifted model's from the position before it), so
        # every key of the block is the draft's own, over the final keys of the finished blocks
        shift = int(calls.model.shifted)
        starts = table.prompt_len + block_pos[owner, 0]
        first = torch.maximum(starts - shift, table.prompt_start[owner_slots])
        features = calls.compute(idx[verified], first, starts + block, table.prompt_len + where - shift,
                                 read_only=True, tokens=tokens, owners=owner_slots, rows_per_seq=per_seq)
    else:
        features = calls.forward(idx[verified], where, partial=cached, tokens=tokens, owners=owner_slots,
                                 rows_per_seq=per_seq, read_only=cached)
    block_features = features if block_only else features[canvases, block_pos[owner]]  # (canvases, block, F)
    read = block_pos[owner] < table.row_gen[owner_slots][:, None]  # right padding is never read
    flat = block_features[read]
    stats = calls.stats(flat, owner_slots[:, None].expand_as(read)[read], keys=("top1", "top1_prob"))
    calls.check(verifying=True)
    top1_rows = torch.full(read.shape, -1, dtype=torch.long, device=device)
    conf_rows = torch.zeros(read.shape, device=device)
    top1_rows[read], conf_rows[read] = stats["top1"], stats["top1_prob"]
    # per sequence, the top-1 (and its probability) on each level's canvas (levels it did not
    # build repeat its last)
    starts = torch.cumsum(built[verified] + 1, 0) - (built[verified] + 1)
    draft_top1 = candidates.clone()
    draft_conf = torch.ones(candidates.shape, device=device)
    for k in range(depth_max + 1):
        pick = torch.minimum(torch.full_like(built[verified], k), built[verified])
        draft_top1[verified, k] = top1_rows[starts + pick]
        draft_conf[verified, k] = conf_rows[starts + pick]
    with calls.timed("policy_s"):
        depth, events = policy.accept(view, state, candidates, draft_top1, draft_conf)
    depth = torch.minimum(depth, built)
    accepted = candidates[torch.arange(b, device=device), depth]
    chosen = starts + depth[verified]  # the accepted canvas of each verified sequence
    # copies, so that the draft canvases' features are freed now
    said = {int(idx[j]): Said(where=where[chosen[n]].clone(), features=features[chosen[n]].clone())
            for n, j in enumerate(verified.tolist())}
    return accepted, said, events

"""PSD: parallel speculative decoding with multi-depth drafts and hierarchical verification."""

from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, most_confident, top_k_mask
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError

UNMASK_RULES = ("threshold", "topk", "margin")


@dataclass
class PSDConfig(PolicyConfig):
    unmask: str = "threshold"  # the adaptive unmasking policy: threshold | topk | margin
    tau: float = 0.9  # threshold on confidence (threshold) or on the top-1/top-2 margin (margin)
    k: int = 2  # positions per step for unmask=topk
    depth: int = 3  # K: drafts per step (the paper recommends 3)
    group: int = 0  # positions per draft group; 0 = the unmasking rule's simulated next step (the paper)
    # departures, off by default, each measured beside the paper's setting:
    group_by_rate: bool = False  # a group as large as this step's commit count (when group=0)
    adaptive_depth: bool = False  # draft at most one level deeper than the last accepted depth
    accept_tau: float = 0.0  # also require the confirming prediction's probability >= this (0: argmax only)

    def validate(self) -> None:
        super().validate()
        if self.unmask not in UNMASK_RULES:
            raise UnmaskError(f"unmask must be one of {', '.join(UNMASK_RULES)}, got {self.unmask!r}", field="unmask")
        if not 0.0 < self.tau <= 1.0:
            raise UnmaskError(f"tau must be in (0, 1], got {self.tau}", field="tau")
        if self.k < 1:
            raise UnmaskError(f"k must be >= 1, got {self.k}", field="k")
        if not 0 <= self.depth <= 16:
            raise UnmaskError(f"depth must be between 0 and 16 drafts, got {self.depth}", field="depth")
        if self.group < 0:
            raise UnmaskError(f"group must be >= 0, got {self.group}", field="group")
        if not 0.0 <= self.accept_tau <= 1.0:
            raise UnmaskError(f"accept_tau must be in [0, 1], got {self.accept_tau}", field="accept_tau")


@register_policy
class PSD(Policy):
    """Parallel speculative decoding (PSD, arXiv 2605.15609): commit, draft deeper, verify in one call.

    From one forward pass: an adaptive unmasking rule (threshold / top-k / margin) picks the
    positions to commit now; the remaining masked positions of the block, in descending confidence,
    form groups G1..GK, and draft k is the committed block plus G1..Gk filled with their current
    top-1 (nested drafts D1 ⊂ ... ⊂ DK, built with no model call). One batched call scores the
    committed block and all K drafts; hierarchical acceptance keeps the deepest k such that every
    group Gj equals the top-1 predicted on draft j-1, i.e. while Gj was still masked and conditioned
    on the shallower accepted groups. The accepted row's logits are the next step's forward pass, so
    a verification call also advances the decode. Rejected tokens are never committed.

    The paper's setting is the default: depth 3, and each group is the unmasking rule's simulated
    next step, i.e. the rule applied again to the positions still masked, with this call's scores.
    Every one of them is below the threshold (else the rule would have committed it now), so the
    threshold and margin rules' next step is their forced single most confident position, and
    top-k's is the next k: groups of 1 (k for top-k). `group=N` fixes the size. The first call of
    a decode is a plain forward.

    Departures, off by default: `group_by_rate=true` makes a group as large as the number of
    positions the rule committed this step (drafts grow with the rule's current rate);
    `adaptive_depth=true` drafts at most one level deeper than the depth accepted last time (as
    adaptive draft lengths do in AR speculative decoding), which saves rows when drafts keep failing.

    `accept_tau` (default 0, the paper's check) can also ask the confirming prediction to be
    confident: argmax agreement at probability 0.3 is weak evidence, and each accepted token skips
    the unmasking rule's own confidence test. Measured as an alternative in the bench.

    Exactness: with argmax agreement as the check, every accepted token is what the model predicts
    at that position given the context it was drafted against, but PSD does not reproduce the
    unmasking rule's own tokens step for step: the rule alone would wait for a drafted position to
    clear its threshold, while PSD commits it as soon as its prediction is confirmed. Its output is
    that of the rule "commit what the rule picks, plus every confirmed draft", not of the rule alone.
    """

    name = "psd"
    Config = PSDConfig
    departures = ("group_by_rate", "adaptive_depth", "accept_tau")

    def init_state(self, batch_size, gen_length, device):
        # last accepted depth per sequence (adaptive depth starts from the full depth)
        return {"last_depth": torch.full((batch_size,), self.config.depth, dtype=torch.long, device=device)}

    def _unmask(self, view) -> torch.Tensor:
        cfg = self.config
        if cfg.unmask == "topk":
            return top_k_mask(view.confidence, view.masked, torch.full_like(view.block_step, cfg.k))
        score = view.confidence if cfg.unmask == "threshold" else view.margin
        commit = view.masked & (score >= cfg.tau)
        none = ~commit.any(-1, keepdim=True)
        return commit | (most_confident(score, view.masked) & none)

    def decide(self, view, state):
        cfg = self.config
        commit = self._unmask(view)
        remaining = view.masked & ~commit
        n_remaining = remaining.sum(-1)
        if cfg.group:
            group = torch.full_like(n_remaining, cfg.group)
        elif cfg.group_by_rate:
            group = commit.sum(-1).clamp(min=1)
        else:  # the rule's simulated next step on what is still masked
            group = torch.full_like(n_remaining, cfg.k if cfg.unmask == "topk" else 1)
        cap = state["last_depth"][view.rows] + 1 if cfg.adaptive_depth else None
        drafts = nested_drafts(view, commit, view.confidence, group, cfg.depth, cap)
        return Decision(commit=commit, drafts=drafts)

    def accept(self, view, state, candidates, draft_top1, draft_conf):
        depth, drafted, events = hierarchical_depth(candidates, draft_top1, draft_conf, self.config.accept_tau)
        # only sequences that drafted learn from this call (a sequence with nothing to draft keeps
        # its history, alone or in a batch)
        state["last_depth"][view.rows[drafted > 0]] = depth[drafted > 0]
        return depth, events


def nested_drafts(view, commit: torch.Tensor, score: torch.Tensor, group: torch.Tensor, depth: int,
                  cap: torch.Tensor | None = None) -> torch.Tensor | None:
    """PSD's nested drafts D1 ⊂ ... ⊂ DK of the block: (batch, K, block), or None if none is needed.

    The positions left masked after `commit` are ranked by `score` (highest first) and cut into
    groups of `group[b]` positions; draft k is the committed block plus groups 1..k filled with
    this call's top-1. A row needs ceil(remaining / group) levels, at most `depth` (and at most
    `cap[b]`); a row that needs fewer levels than the batch repeats its deepest draft (no new tokens).
    """
    committed = torch.where(commit, view.candidate, view.tokens)
    remaining = view.masked & ~commit
    n_remaining = remaining.sum(-1)
    depth_row = torch.minimum((n_remaining + group - 1) // group, torch.full_like(n_remaining, depth))
    if cap is not None:
        depth_row = torch.minimum(depth_row, cap)
    levels_needed = int(depth_row.max()) if depth_row.numel() else 0
    if levels_needed == 0:
        return None
    # rank of each remaining position (0 = highest score), then its group (1-based)
    score = score.masked_fill(~remaining, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    group_of = ranks // group[:, None] + 1  # (batch, block)
    levels = torch.arange(1, levels_needed + 1, device=score.device)[None, :, None]  # (1, K, 1)
    take = remaining[:, None] & (group_of[:, None] <= torch.minimum(levels, depth_row[:, None, None]))
    return torch.where(take, view.top1[:, None], committed[:, None])


def hierarchical_depth(candidates, draft_top1, draft_conf, accept_tau: float = 0.0):
    """PSD's hierarchical acceptance: (accepted depth, levels built, events) per sequence.

    candidates: (batch, K+1, block) the committed block (depth 0) and the drafts; draft_top1 and
    draft_conf: the argmax predicted on each of those canvases and its probability. The accepted
    depth is the deepest k such that every group G_j (j <= k), the tokens draft j adds, equals the
    argmax predicted on draft j-1 (with probability >= accept_tau).
    """
    new = candidates[:, 1:] != candidates[:, :-1]  # (batch, K, block): group G_j of draft j
    # G_j disagrees with the call on draft j-1 (or agrees with less than accept_tau probability)
    wrong = new & ((candidates[:, 1:] != draft_top1[:, :-1]) | (draft_conf[:, :-1] < accept_tau))
    # a level with no new token (the row needed fewer drafts than the batch) confirms nothing
    ok = ~wrong.any(-1) & new.any(-1)  # (batch, K); empty levels only ever trail the full ones
    depth = torch.cumprod(ok.long(), dim=-1).sum(-1)  # deepest k with every level up to k consistent
    drafted = new.any(-1).sum(-1)
    per_level = new.sum(-1)  # (batch, K) tokens each group adds
    levels = torch.arange(per_level.shape[1], device=per_level.device)[None, :]
    accepted = (per_level * (levels < depth[:, None])).sum(-1)
    events = {"drafts_built": drafted.float(), "draft_depth_accepted": depth.float(),
              "draft_tokens_accepted": accepted.float()}
    return depth, drafted, events

"""Sparse mixture-of-experts feed-forward layers: routers and grouped experts.

Experts are SwiGLU MLPs whose weights are stacked, (experts, out, in), so that a layer runs as three
batched matrix products over the tokens grouped by expert (each token-expert assignment gathered
into its expert's rows, padded to the busiest expert), never as a Python loop over experts. The
stacked weights load from, and save to, the checkpoints' own per-expert names
(`experts.E.gate_proj.weight`, ...), so a checkpoint loads by name with no conversion.

Routers differ by family, and the differences change the logits, so each is a named setting:

- LLaDA-MoE: softmax over the router logits in float32, top-k, the weights *not* renormalised; its
  optional expert bias is added to the probabilities and so moves both the choice and the weights.
- LLaDA2.x (DeepSeek-V3's router): sigmoid scores in float32; an expert bias added for the choice
  only; experts in `n_group` groups, each group scored by the sum of its two best biased scores,
  only the best `topk_group` groups eligible; top-k of the eligible biased scores; the chosen
  experts' *unbiased* scores renormalised to sum 1 and scaled by `routed_scaling_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unmask.errors import UnmaskError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Experts(nn.Module):
    """`n` SwiGLU experts (hidden -> inter -> hidden) with stacked weights; forward over grouped tokens."""

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.n, self.hidden, self.inter = n, hidden, inter
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        self._register_state_dict_hook(_per_expert_names)
        self._register_load_state_dict_pre_hook(_stack_per_expert, with_module=True)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, hidden); experts, weights (T, k): each token's chosen experts and their weights.
        Returns (T, hidden): the weighted sum of each token's experts' outputs."""
        tokens, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.n)
        first = torch.cumsum(counts, 0) - counts
        expert_of = flat[order]
        slot = torch.arange(flat.shape[0], device=x.device) - first[expert_of]  # its row in its expert's group
        width = int(counts.max()) if flat.numel() else 0
        grouped = x.new_zeros((self.n, width, self.hidden))
        grouped[expert_of, slot] = x[order // k]
        h = F.silu(torch.bmm(grouped, self.gate_proj.transpose(1, 2))) * torch.bmm(grouped, self.up_proj.transpose(1, 2))
        out = torch.bmm(h, self.down_proj.transpose(1, 2))  # (n, width, hidden)
        per_assignment = out[expert_of, slot] * weights.reshape(-1)[order, None].to(out.dtype)
        result = torch.zeros_like(x)
        result.index_add_(0, order // k, per_assignment)
        return result


def _per_expert_names(module: Experts, state_dict, prefix, local_metadata) -> None:
    """state_dict() under the checkpoints' names: `{prefix}{e}.gate_proj.weight`, one per expert."""
    for name in PROJECTIONS:
        stacked = state_dict.pop(prefix + name)
        for e in range(module.n):
            state_dict[f"{prefix}{e}.{name}.weight"] = stacked[e]


def _stack_per_expert(module: Experts, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    """load_state_dict() from the checkpoints' per-expert names into the stacked weights."""
    for name in PROJECTIONS:
        keys = [f"{prefix}{e}.{name}.weight" for e in range(module.n)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


@dataclass
class RouterConfig:
    """How a family's router turns router logits into each token's experts and weights."""

    num_experts: int
    top_k: int
    score: str = "softmax"  # softmax | sigmoid
    renormalize: bool = False  # the chosen weights divided by their sum
    scaling: float = 1.0  # the chosen weights multiplied by this (routed_scaling_factor)
    n_group: int = 1  # group-limited routing: experts in n_group groups ...
    topk_group: int = 1  # ... of which only the best topk_group are eligible
    expert_bias: bool = False  # a learned bias added to the scores ...
    bias_in_weights: bool = False  # ... for the choice only (False), or for the weights too (LLaDA-MoE)
    float32_logits: bool = False  # the router's matrix product in float32 (LLaDA2), not the model's dtype

    def check(self, source: str) -> None:
        if self.score not in ("softmax", "sigmoid"):
            raise UnmaskError(f"{source}: router score function {self.score!r} is not implemented (softmax or sigmoid)")
        if not 0 < self.top_k <= self.num_experts:
            raise UnmaskError(f"{source}: {self.top_k} experts per token out of {self.num_experts} is not a valid routing")
        if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise UnmaskError(f"{source}: {self.num_experts} experts do not split into {self.n_group} groups with "
                              f"{self.topk_group} eligible")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise UnmaskError(f"{source}: top-{self.top_k} cannot be chosen from {self.topk_group} eligible groups")


def route(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts (T, k) and weights (T, k, float32) from router logits (T, num_experts)."""
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if cfg.score == "softmax" else torch.sigmoid(logits)
    choice = scores + bias.float() if bias is not None else scores
    if cfg.n_group > 1:
        tokens = choice.shape[0]
        groups = choice.view(tokens, cfg.n_group, -1)
        group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # (T, n_group)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
        choice = groups.masked_fill(~keep[..., None], float("-inf")).view(tokens, -1)
    experts = choice.topk(cfg.top_k, dim=-1).indices
    weights = (choice if cfg.bias_in_weights else scores).gather(1, experts)
    if cfg.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return experts, weights * cfg.scaling


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP with the usual projection names."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Router (`gate`), grouped experts (`experts`) and optional shared experts, by the checkpoints' names.

    `shared_name`: the attribute the shared experts live under (`shared_expert` in LLaDA-MoE,
    `shared_experts` in LLaDA2), None for none; `bias_in_gate`: the expert bias is stored as
    `gate.expert_bias` (LLaDA2) rather than `expert_bias`."""

    def __init__(self, hidden: int, inter: int, router: RouterConfig, shared_inter: int = 0,
                 shared_name: str | None = None, bias_in_gate: bool = False):
        super().__init__()
        self.router = router
        self.gate = nn.Linear(hidden, router.num_experts, bias=False)
        self.bias_in_gate = bias_in_gate
        if router.expert_bias:
            bias = nn.Parameter(torch.zeros(router.num_experts), requires_grad=False)
            if bias_in_gate:
                self.gate.expert_bias = bias
            else:
                self.expert_bias = bias
        self.experts = Experts(router.num_experts, hidden, inter)
        self.shared_name = shared_name if shared_inter else None
        if self.shared_name:
            setattr(self, self.shared_name, SwiGLU(hidden, shared_inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        bias = None
        if self.router.expert_bias:
            bias = self.gate.expert_bias if self.bias_in_gate else self.expert_bias
        if self.router.float32_logits:
            logits = F.linear(flat.float(), self.gate.weight.float())
        else:
            logits = F.linear(flat, self.gate.weight)
        experts, weights = route(logits, self.router, bias)
        out = self.experts(flat, experts, weights)
        if self.shared_name:
            out = out + getattr(self, self.shared_name)(flat)
        return out.reshape(shape)

"""Sparse mixture-of-experts feed-forward layers: routers and grouped experts.

Experts are SwiGLU MLPs whose weights are stacked, (experts, out, in), and tokens are grouped by
expert once (every token-expert assignment sorted by expert): a small call (a decode step's block)
runs as batched matrix products over the groups padded to the busiest expert, a large one as one
product per expert over its contiguous rows; never, as the reference code does, a loop that
searches every expert's tokens among all of them. The stacked weights load from, and save to, the
checkpoints' own per-expert names (`experts.E.gate_proj.weight`, ...), so a checkpoint loads by
name with no conversion. `benchmarks/moe_speed.py` measures both against that loop.

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
    """`n` SwiGLU experts (hidden -> inter -> hidden), weights stacked; forward over grouped tokens.

    The gate and up projections are stored together, `gate_up` (n, 2 inter, hidden), so that each
    expert's first product is one matrix product; state dicts still hold the checkpoints'
    per-expert `gate_proj` / `up_proj` / `down_proj`."""

    # rows per expert, on average, up to which the experts run as batched products over one padded
    # (experts, busiest expert's rows, hidden) buffer; past it, as one product per expert over its
    # contiguous rows of the sorted tokens (a padded buffer's elementwise passes then cost more).
    # A skewed routing whose busiest expert takes more than BUSIEST_PADDED rows also runs per expert,
    # so the padded buffer never outgrows experts x BUSIEST_PADDED rows.
    PADDED_ROWS = 16
    BUSIEST_PADDED = 64

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.n, self.hidden, self.inter = n, hidden, inter
        self.gate_up = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        self._register_state_dict_hook(_per_expert_names)
        self._register_load_state_dict_pre_hook(_stack_per_expert, with_module=True)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, hidden); experts, weights (T, k): each token's chosen experts and their weights.
        Returns (T, hidden): the weighted sum of each token's experts' outputs."""
        tokens, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        source = order // k  # the token of each grouped assignment
        counts = torch.bincount(flat, minlength=self.n)
        busiest = int(counts.max())
        if flat.numel() <= self.PADDED_ROWS * self.n and busiest <= self.BUSIEST_PADDED:
            out = self._padded(x, flat[order], counts, source, busiest)
        else:
            out = self._slices(x[source], counts)
        result = torch.zeros_like(x)
        result.index_add_(0, source, out * weights.reshape(-1)[order, None].to(out.dtype))
        return result

    def _swiglu(self, h: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = h.split(self.inter, dim=-1)
        return (F.silu(gate) * up) @ down

    def _padded(self, x, expert_of, counts, source, busiest: int):
        """Three batched products over the tokens gathered into (experts, busiest's rows, hidden)."""
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(expert_of.shape[0], device=x.device) - first[expert_of]  # row in its expert's group
        grouped = x.new_zeros((self.n, busiest, self.hidden))
        grouped[expert_of, slot] = x[source]
        out = self._swiglu(torch.bmm(grouped, self.gate_up.transpose(1, 2)), self.down_proj.transpose(1, 2))
        return out[expert_of, slot]

    def _slices(self, rows, counts):
        """One product per expert over its contiguous rows of the sorted assignments."""
        parts, start = [], 0
        for e, count in enumerate(counts.tolist()):
            if count:
                seg = rows[start: start + count]
                parts.append(self._swiglu(seg @ self.gate_up[e].T, self.down_proj[e].T))
                start += count
        return torch.cat(parts)


def _per_expert_names(module: Experts, state_dict, prefix, local_metadata) -> None:
    """state_dict() under the checkpoints' names: `{prefix}{e}.gate_proj.weight`, one per expert."""
    gate_up = state_dict.pop(prefix + "gate_up")
    down = state_dict.pop(prefix + "down_proj")
    for e in range(module.n):
        state_dict[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, : module.inter]
        state_dict[f"{prefix}{e}.up_proj.weight"] = gate_up[e, module.inter:]
        state_dict[f"{prefix}{e}.down_proj.weight"] = down[e]


def _stack_per_expert(module: Experts, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    """load_state_dict() from the checkpoints' per-expert names into the stacked weights."""
    names = {name: [f"{prefix}{e}.{name}.weight" for e in range(module.n)] for name in PROJECTIONS}
    if all(k in state_dict for keys in names.values() for k in keys):
        gate = [state_dict.pop(k) for k in names["gate_proj"]]
        up = [state_dict.pop(k) for k in names["up_proj"]]
        state_dict[prefix + "gate_up"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        state_dict[prefix + "down_proj"] = torch.stack([state_dict.pop(k) for k in names["down_proj"]])


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

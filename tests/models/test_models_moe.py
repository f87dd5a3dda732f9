"""Mixture-of-experts layers: routing worked by hand for each family's rule, grouped experts equal to
the sum over each token's experts (both ways of grouping), checkpoint names kept."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unmask.errors import UnmaskError
from unmask.models.moe import Experts, RouterConfig, route


def test_lladamoe_routing_is_a_softmax_top_k_not_renormalised_with_the_bias_in_the_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = [math.exp(v) for v in (2.0, 1.0, 0.0, -1.0)]
    probs = [p / sum(probs) for p in probs]  # 0.6439, 0.2369, 0.0871, 0.0321
    cfg = RouterConfig(num_experts=4, top_k=2, score="softmax")
    experts, weights = route(logits, cfg)
    assert experts.tolist() == [[0, 1]]
    assert weights[0].tolist() == pytest.approx([probs[0], probs[1]], abs=1e-6)  # not renormalised
    # a bias of 0.7 on expert 2 lifts it above expert 1 (0.0871 + 0.7 = 0.7871) and is in its weight
    biased = RouterConfig(num_experts=4, top_k=2, score="softmax", expert_bias=True, bias_in_weights=True)
    experts, weights = route(logits, biased, torch.tensor([0.0, 0.0, 0.7, 0.0]))
    assert experts.tolist() == [[2, 0]]
    assert weights[0].tolist() == pytest.approx([probs[2] + 0.7, probs[0]], abs=1e-6)


def test_llada2_routing_limits_groups_uses_the_bias_for_the_choice_only_renormalises_and_scales():
    # 4 experts in 2 groups ({0, 1}, {2, 3}); sigmoid scores s; the bias lifts expert 3
    logits = torch.tensor([[1.0, 0.5, 0.8, -0.5]])
    s = [1 / (1 + math.exp(-v)) for v in (1.0, 0.5, 0.8, -0.5)]  # 0.7311, 0.6225, 0.6900, 0.3775
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5])
    b = [s[0], s[1], s[2], s[3] + 0.5]  # 0.7311, 0.6225, 0.6900, 0.8775
    # group scores: the sum of each group's two best biased scores: 1.3536 and 1.5675 -> group 1 only
    assert b[2] + b[3] > b[0] + b[1]
    cfg = RouterConfig(num_experts=4, top_k=2, score="sigmoid", renormalize=True, scaling=2.5, n_group=2,
                       topk_group=1, expert_bias=True)
    experts, weights = route(logits, cfg, bias)
    assert experts.tolist() == [[3, 2]]  # by biased score, within the eligible group
    total = s[3] + s[2]  # the unbiased scores, renormalised, times 2.5
    assert weights[0].tolist() == pytest.approx([2.5 * s[3] / total, 2.5 * s[2] / total], abs=1e-6)


# (tokens, skewed, the way it takes): a few rows per expert run as padded products; many run per
# expert; so do a few tokens that all pick the same experts (the busiest would take 100 padded rows
# per expert, more than BUSIEST_PADDED = 64)
@pytest.mark.parametrize("tokens,skewed,way", [(3, False, "_padded"), (250, False, "_slices"), (100, True, "_slices")])
def test_grouped_experts_are_the_sum_over_each_tokens_experts(tokens, skewed, way, monkeypatch):
    torch.manual_seed(0)
    n = 40  # 16 x 40 = 640 assignments may be padded: 3 x 3 and 100 x 3 are under it, 250 x 3 is not
    layer = Experts(n, 8, 5)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(tokens, 8)
    experts = (torch.tensor([[4, 9, 1]]).expand(tokens, 3) if skewed
               else torch.stack([torch.randperm(n)[:3] for _ in range(tokens)]))
    weights = torch.rand(tokens, 3)
    want = torch.zeros(tokens, 8)
    for t in range(tokens):
        for j in range(3):
            e = int(experts[t, j])
            gate, up = layer.gate_up[e, :5], layer.gate_up[e, 5:]
            want[t] += weights[t, j] * (layer.down_proj[e] @ (F.silu(gate @ x[t]) * (up @ x[t])))
    taken = []
    for name in ("_padded", "_slices"):
        real = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    torch.testing.assert_close(layer(x, experts, weights), want, atol=1e-5, rtol=1e-5)
    assert taken == [way]


def test_expert_weights_keep_the_checkpoints_names():
    layer = Experts(2, 4, 3)
    torch.nn.init.normal_(layer.gate_up)
    torch.nn.init.normal_(layer.down_proj)
    state = layer.state_dict()
    assert sorted(state) == sorted(f"{e}.{name}.weight" for e in range(2) for name in ("gate_proj", "up_proj", "down_proj"))
    assert state["1.up_proj.weight"].shape == (3, 4) and torch.equal(state["1.up_proj.weight"], layer.gate_up[1, 3:])
    other = Experts(2, 4, 3)
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.gate_up, layer.gate_up) and torch.equal(other.down_proj, layer.down_proj)


def test_a_routing_that_cannot_be_chosen_is_refused():
    with pytest.raises(UnmaskError, match="top-8 cannot be chosen"):
        RouterConfig(num_experts=16, top_k=8, n_group=4, topk_group=1).check("config.json")
    with pytest.raises(UnmaskError, match="score function"):
        RouterConfig(num_experts=4, top_k=2, score="relu").check("config.json")

"""What the loop hands a policy: the StepView's statistics agree with its logits (docs/concepts.md: confidence
is the un-noised probability of the candidate, also when sampling), and random choices come from
each sequence's own generator.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from unmask.decoding import StepView, generate
from unmask.decoding.policies.low_confidence import LowConfidence
from unmask.decoding.policies.schedule import ScheduledConfig
from unmask.decoding.registry import parse_strategy

PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]


class Spy(LowConfidence):
    """low_confidence that keeps every view it was shown (not registered: passed as an instance)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.views: list[StepView] = []

    def decide(self, view, state):
        self.views.append(view)
        return super().decide(view, state)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_view_statistics_follow_the_logits(model, temperature):
    spy = Spy(ScheduledConfig(temperature=temperature))
    result = generate(model, PROMPTS, spy, gen_length=16, block_length=8)
    sampled_differs = 0
    for view in spy.views:
        log_probs = torch.log_softmax(view.logits.double(), dim=-1)
        probs = log_probs.exp()
        top = probs.topk(2, dim=-1)
        assert torch.equal(view.top1, top.indices[..., 0])
        torch.testing.assert_close(view.top1_prob.double(), top.values[..., 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(view.margin.double(), top.values[..., 0] - top.values[..., 1], atol=1e-5, rtol=1e-5)
        ent = -(probs * log_probs.clamp(min=-1e30)).nan_to_num().sum(-1)
        torch.testing.assert_close(view.entropy.double(), ent, atol=1e-4, rtol=1e-4)
        # confidence: the un-noised probability of the candidate
        cand_prob = probs.gather(-1, view.candidate[..., None]).squeeze(-1)
        torch.testing.assert_close(view.confidence.double(), cand_prob, atol=1e-5, rtol=1e-5)
        assert (view.candidate != model.mask_id).all()
        if temperature == 0:
            assert torch.equal(view.candidate, view.top1)
        else:
            sampled_differs += int((view.candidate != view.top1).sum())
        # block bookkeeping
        assert view.positions.shape == view.masked.shape == (view.batch, 8)
        assert ((view.positions % 8) == torch.arange(8)).all()
        assert torch.equal(view.masked, view.tokens == model.mask_id)
        assert view.masked.any(-1).all()  # a sequence whose block is full is not asked
        # nothing in a view is sized by the generation (16): a step's tensors follow the block (8)
        sized = {k: tuple(v.shape) for k, v in vars(view).items() if isinstance(v, torch.Tensor) and v.dim() > 1}
        assert all(shape[1] == 8 for shape in sized.values()), sized
    if temperature:
        assert sampled_differs > 0  # sampling really happened
    assert all(model.mask_id not in s.tokens for s in result.sequences)


def test_rows_leave_the_batch_when_done(llada):
    """With threshold, sequences finish at different steps; views then hold only the active rows."""

    class ThresholdSpy(type(parse_strategy("threshold"))):
        seen: list = []

        def decide(self, view, state):
            self.seen.append(view.rows.tolist())
            return super().decide(view, state)

    spy = ThresholdSpy(type(parse_strategy("threshold")).Config(tau=0.3))
    result = generate(llada, PROMPTS, spy, gen_length=32, block_length=8)
    nfe = [s.nfe for s in result.sequences]
    for row in range(len(PROMPTS)):
        assert sum(row in rows for rows in spy.seen) == nfe[row]
    assert len({len(rows) for rows in spy.seen}) > 1


def test_random_order_is_uniform_over_masked_positions():
    """random picks each masked position about equally often (per-sequence generators, seeds 0..399)."""
    policy = parse_strategy("random")
    block = 8
    masked = torch.tensor([[True, True, False, True, True, True, False, True]])
    counts: Counter = Counter()
    for seed in range(400):
        view = StepView(
            rows=torch.tensor([0]), positions=torch.arange(block)[None], tokens=torch.zeros(1, block, dtype=torch.long),
            masked=masked, logits=torch.zeros(1, block, 4), top1=torch.zeros(1, block, dtype=torch.long),
            top1_prob=torch.full((1, block), 0.25), candidate=torch.zeros(1, block, dtype=torch.long),
            confidence=torch.linspace(0.9, 0.1, block)[None], margin=torch.zeros(1, block), entropy=torch.zeros(1, block),
            stable=torch.ones(1, block, dtype=torch.long), prev_confidence=torch.zeros(1, block),
            block_step=torch.zeros(1, dtype=torch.long), step=0,
            block_length=block, gen_length=block, num_blocks=1, mask_id=3, stop_ids=(0,),
            generators=[torch.Generator().manual_seed(seed)],
        )
        commit = policy.decide(view, None).commit[0]
        assert int(commit.sum()) == 1 and bool((commit & masked[0]).any())
        counts[int(commit.nonzero())] += 1
    assert set(counts) == {0, 1, 3, 4, 5, 7}
    # expected 400/6 ~ 67 each; confidence order would always pick position 0
    assert min(counts.values()) > 35 and max(counts.values()) < 105, counts

"""The oracle bound (docs/measurements.md, "oracle TPF").

Reference decode: low_confidence, one token per step, greedy -> y*. The oracle then commits, at
every step, every masked block position whose current argmax is already y*_i (at least one, forced
to y*). It must reproduce y* exactly, take no more calls than the reference, and count only its
own decode.
"""

from __future__ import annotations

import numpy as np
import pytest

from unmask.decoding import generate

PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]


class CountingForward:
    """Wraps model.network.forward to count calls (restored on exit)."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __enter__(self):
        net = self.model.network
        self.original = net.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        net.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.network.forward  # drop the instance attribute, back to the class method
        return False


@pytest.mark.parametrize("early_stop", [True, False])
def test_oracle_reproduces_the_reference_with_fewer_calls(model, early_stop):
    kwargs = dict(gen_length=16, block_length=8, early_stop=early_stop)
    reference = generate(model, PROMPTS, "low_confidence:schedule=llada", **kwargs)
    oracle = generate(model, PROMPTS, "oracle", record_trace=True, **kwargs)
    fewer = 0
    for ref, orc in zip(reference.sequences, oracle.sequences):
        assert orc.tokens == ref.tokens
        assert orc.text == ref.text
        assert orc.nfe <= ref.nfe
        assert orc.nfe == orc.trace.steps == orc.rows
        fewer += orc.nfe < ref.nfe
    assert fewer > 0  # the bound is not vacuous on these models


def test_oracle_reference_is_one_token_per_step(model):
    """y* is the low_confidence decode with steps = gen_length, whatever the strategy default is."""
    reference = generate(model, PROMPTS, "low_confidence:steps=16,schedule=llada", gen_length=16, block_length=8)
    oracle = generate(model, PROMPTS, "oracle", gen_length=16, block_length=8)
    assert [s.tokens for s in oracle.sequences] == [s.tokens for s in reference.sequences]


def test_oracle_nfe_counts_only_its_own_decode(model):
    prompt = PROMPTS[:1]
    reference = generate(model, prompt, "low_confidence:schedule=llada", gen_length=16, block_length=8).sequences[0]
    with CountingForward(model) as counter:
        oracle = generate(model, prompt, "oracle", gen_length=16, block_length=8).sequences[0]
    assert counter.calls == reference.nfe + oracle.nfe  # the reference ran, but is not charged
    assert oracle.nfe < counter.calls
    assert oracle.tpf == 16 / oracle.nfe


def test_oracle_commits_exactly_the_agreeing_positions(model):
    result = generate(model, PROMPTS, "oracle", gen_length=16, block_length=8, record_trace=True)
    reference = generate(model, PROMPTS, "low_confidence:schedule=llada", gen_length=16, block_length=8)
    for seq, ref in zip(result.sequences, reference.sequences):
        tr = seq.trace
        y = np.asarray(ref.tokens)
        for s in range(tr.steps):
            b = int(tr.block[s])
            lo, hi = b * 8, (b + 1) * 8
            masked = tr.masked_before[s, lo:hi]
            committed = masked & (tr.tokens_after[s, lo:hi] != model.mask_id)
            agree = masked & (tr.top1[s, lo:hi] == y[lo:hi])
            if agree.any():
                assert np.array_equal(committed, agree), f"step {s}"
            else:
                assert int(committed.sum()) == 1
            assert (tr.tokens_after[s, lo:hi][committed] == y[lo:hi][committed]).all()


def test_oracle_never_needs_more_calls_than_the_reference_when_the_reference_stops_early(scripted, scripted_tokenizer):
    """Block 0 predictions do not depend on the canvas (so the oracle commits block 0 in one call); the tail
    predicts EOS only when block 0 has exactly one mask left, i.e. at the reference's last call of block 0,
    so the reference stops after block 0 with y* = W x5, EOS x27."""
    tok = scripted_tokenizer
    word, other, eos = tok.token_id("apples"), tok.token_id("pens"), tok.hf.eos_token_id
    mask_id = tok.hf.convert_tokens_to_ids("<|mdm_mask|>")

    def plan(prompt, gen_tokens, g):
        if g < 8:
            return (word if g < 5 else eos), 0.55 + 0.03 * ((g * 5) % 8)
        one_left = sum(t == mask_id for t in gen_tokens[:8]) == 1
        return (eos if one_left else other), 0.6

    model = scripted(plan, gen_length=32, block_length=8)
    reference = generate(model, [[20, 21]], "low_confidence").sequences[0]
    assert reference.stopped_early and reference.nfe == 8
    assert reference.tokens == [word] * 5 + [eos] * 27
    oracle = generate(model, [[20, 21]], "oracle").sequences[0]
    assert oracle.tokens == reference.tokens
    assert oracle.nfe <= reference.nfe

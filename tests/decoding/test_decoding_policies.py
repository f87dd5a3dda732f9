"""Properties every registered policy must have, on tiny random LLaDA and Dream models.

- the generation region ends with no mask;
- a committed token is never changed (non-remasking policies);
- the same seed gives the same tokens (also when sampling);
- batch invariance: a prompt in a left-padded batch decodes as it does alone (tokens and NFE);
- blocks: nothing in block k+1 is committed before block k is complete (one_shot: one call).
"""

from __future__ import annotations

import numpy as np
import pytest

from unmask.decoding import generate
from unmask.decoding import policy_names
from unmask.decoding.registry import parse_strategy, policy_class
from unmask.testing import controller_strategies

GEN, BLOCK = 16, 8
# prompts of clearly different lengths (the chat template wraps them), for padded batches
PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]

POLICIES = policy_names()
BASELINES = ("low_confidence", "random", "margin", "entropy", "threshold", "factor", "one_shot", "oracle")
# threshold at its default tau (0.9) never fires on a random tiny model; a lower tau makes it
# commit several tokens per step, which is what the properties should be exercised on
SPEC = {name: name for name in POLICIES}
SPEC["threshold"] = "threshold:tau=0.3"
SAMPLING = [n for n in POLICIES if n not in ("oracle",)]  # the oracle writes y*, not samples


@pytest.fixture(scope="module", autouse=True)
def _tspd_controller(tmp_path_factory):
    """tspd (with CE) runs in every property below with an untrained, seeded controller; a tau of
    0.5 makes it commit several positions per call on these tiny models."""
    SPEC.update(controller_strategies(tmp_path_factory.mktemp("controller")))


def spec_of(name: str, temperature: float = 0.0) -> str:
    base = SPEC[name]
    if temperature:
        base += ("," if ":" in base else ":") + f"temperature={temperature}"
    return base


def test_every_builtin_policy_is_registered():
    assert set(POLICIES) >= set(BASELINES)


@pytest.mark.parametrize("name", POLICIES)
def test_no_mask_left_and_committed_tokens_never_change(model, name, tt):
    result = generate(model, PROMPTS, spec_of(name), gen_length=GEN, block_length=BLOCK, record_trace=True)
    for seq in result.sequences:
        assert len(seq.tokens) == GEN
        assert model.mask_id not in seq.tokens, f"{name} left a mask in {seq.tokens}"
        trace = seq.trace
        # one trace row per step; a step is one model call for the baselines (a speculative policy
        # may spend an extra verification call, never fewer calls than steps)
        assert 0 < trace.steps <= seq.nfe
        if name in BASELINES:
            assert trace.steps == seq.nfe
        after = trace.tokens_after
        if policy_class(name).remasking:
            continue
        committed = after != model.mask_id
        if policy_class(name).edits:
            # token editing (llada21): a committed token changes only by an edit the trace records
            changed = {(s, int(p)) for s in range(1, trace.steps)
                       for p in np.flatnonzero(committed[s - 1] & (after[s] != after[s - 1]))}
            assert changed == set(trace.edited), name
            assert seq.events.get("edits", 0) == len(trace.edited)
            continue
        for s in range(trace.steps):
            later = after[s:]
            held = committed[s]
            assert (later[:, held] == after[s, held]).all(), f"{name}: a token committed by step {s} changed later"
        # the result is the trace's last canvas (no early stop fires on these prompts)
        final_committed = committed[-1]
        assert np.array_equal(np.asarray(seq.tokens)[final_committed], after[-1][final_committed])
        # commit_step agrees with the step at which each position stopped being masked
        first = np.argmax(committed, axis=0)
        assert np.array_equal(trace.commit_step[final_committed], first[final_committed])


@pytest.mark.parametrize("name", POLICIES)
def test_same_seed_same_tokens(model, name):
    runs = [generate(model, PROMPTS, spec_of(name), gen_length=GEN, block_length=BLOCK, seed=3) for _ in range(2)]
    assert [s.tokens for s in runs[0].sequences] == [s.tokens for s in runs[1].sequences]
    assert [s.nfe for s in runs[0].sequences] == [s.nfe for s in runs[1].sequences]


@pytest.mark.parametrize("name,temperature", [("low_confidence", 1.0), ("random", 0.0), ("random", 1.0)])
def test_seed_reproducible_and_actually_used_when_sampling(model, name, temperature):
    spec = spec_of(name, temperature)
    prompt = PROMPTS[:1]
    by_seed = {}
    for seed in range(4):
        a = generate(model, prompt, spec, gen_length=GEN, block_length=BLOCK, seed=seed).sequences[0].tokens
        b = generate(model, prompt, spec, gen_length=GEN, block_length=BLOCK, seed=seed).sequences[0].tokens
        assert a == b, f"{spec}: seed {seed} gave two different decodes"
        by_seed[seed] = tuple(a)
    assert len(set(by_seed.values())) > 1, f"{spec}: four seeds gave the same decode; the seed is not used"


@pytest.mark.parametrize("name,temperature", [(n, 0.0) for n in POLICIES] + [(n, 0.8) for n in SAMPLING])
def test_batch_invariance(model, name, temperature):
    spec = spec_of(name, temperature)
    lengths = [len(model.tokenizer.prompt_ids(p)) for p in PROMPTS]
    assert len(set(lengths)) == len(lengths)  # the batch really is padded
    batch = generate(model, PROMPTS, spec, gen_length=GEN, block_length=BLOCK, seed=5)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], spec, gen_length=GEN, block_length=BLOCK, seed=5).sequences[0]
        got = batch.sequences[i]
        assert got.prompt_ids == alone.prompt_ids
        assert got.tokens == alone.tokens, f"{spec}: prompt {i} decodes differently in a batch"
        assert got.nfe == alone.nfe
        assert got.rows == alone.rows
        assert got.text == alone.text


def test_batch_invariance_with_token_id_prompts_and_duplicate_rows(llada):
    """Raw id prompts (no template), and the same prompt twice in a batch: identical rows."""
    ids = [[20, 21, 22], [30] * 9, [20, 21, 22]]
    batch = generate(llada, ids, "random:temperature=0.5", gen_length=GEN, block_length=BLOCK, seed=1)
    alone = [generate(llada, [p], "random:temperature=0.5", gen_length=GEN, block_length=BLOCK, seed=1) for p in ids]
    assert [s.tokens for s in batch.sequences] == [a.sequences[0].tokens for a in alone]
    assert batch.sequences[0].tokens == batch.sequences[2].tokens


@pytest.mark.parametrize("name", [n for n in POLICIES if not policy_class(n).whole_generation])
def test_blocks_complete_left_to_right(model, name, tt):
    gen, block = 24, 8
    policy = parse_strategy(spec_of(name))
    result = generate(model, PROMPTS, policy, gen_length=gen, block_length=block, record_trace=True)
    # Dream's schedule (the fixed-rate orders on a Dream model) may commit nothing at a step
    empty_steps = policy.empty_steps
    for seq in result.sequences:
        trace = seq.trace
        committed = tt.committed(trace, model.mask_id)
        assert (np.diff(trace.block) >= 0).all() and trace.block[0] == 0
        assert set(trace.block.tolist()) == set(range(gen // block))
        for s in range(trace.steps):
            b = int(trace.block[s])
            start, end = b * block, (b + 1) * block
            assert not trace.masked_before[s, :start].any(), f"{name}: step {s} ran block {b} with earlier masks"
            assert trace.masked_before[s, end:].all(), f"{name}: a later block was touched before step {s}"
            assert not committed[s, :start].any() and not committed[s, end:].any()
            # (an editing policy's calls after its block is full commit nothing: they may only edit)
            if not empty_steps and trace.masked_before[s, start:end].any():
                assert committed[s, start:end].any(), f"{name}: step {s} committed nothing"
        # a block's last step leaves it full, and the next step moves on (an editing policy may hold
        # a full block open for more calls; it moves on only from a full block)
        for s in range(trace.steps - 1):
            b = int(trace.block[s])
            full = not (trace.tokens_after[s, b * block : (b + 1) * block] == model.mask_id).any()
            if policy.edits:
                assert full or trace.block[s + 1] == b
            else:
                assert (trace.block[s + 1] == b + 1) == full


def test_one_shot_is_a_single_call_over_the_whole_generation(model, tt):
    result = generate(model, PROMPTS, "one_shot", gen_length=24, block_length=8, record_trace=True)
    for seq in result.sequences:
        assert seq.nfe == 1 and seq.rows == 1 and seq.trace.steps == 1
        assert seq.trace.masked_before[0].all()
        assert tt.committed(seq.trace, model.mask_id)[0].all()
        assert model.mask_id not in seq.tokens
        # greedy one-shot writes the first call's argmax everywhere
        assert seq.tokens == seq.trace.top1[0].tolist()
        assert seq.tpf == 24

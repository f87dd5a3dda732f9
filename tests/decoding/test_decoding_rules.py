"""The commit rules of the baselines: LLaDA's schedule (low_confidence / random / margin / entropy),
Fast-dLLM's threshold and factor rules, Dream's margin and entropy orders.

Each rule is checked twice: on hand-made views (exact expectations computed independently here)
and on real decodes of tiny random models through the trace, so the loop is shown to hand the
policy the statistics the rule is defined on.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unmask.decoding import generate
from unmask.decoding.registry import parse_strategy
from unmask.errors import UnmaskError
from unmask.testing import logits_view

PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]
SCHEDULED = ["low_confidence", "random", "margin", "entropy"]


# ---------------------------------------------------------------------------------------------
# helpers


def llada_schedule(block_length: int, steps_per_block: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens for a fresh block: m // s each, +1 for the first m % s."""
    base, rem = divmod(block_length, steps_per_block)
    return [base + (1 if i < rem else 0) for i in range(steps_per_block)]


def top_k_expected(score: np.ndarray, masked: np.ndarray, k: int) -> set[int]:
    """Indices of the k best masked positions (ties: lower index first)."""
    cand = [i for i in range(len(score)) if masked[i]]
    cand.sort(key=lambda i: (-score[i], i))
    return set(cand[:k])


# ---------------------------------------------------------------------------------------------
# LLaDA's schedule (2)


@pytest.mark.parametrize("name", SCHEDULED)
def test_one_token_per_step_when_steps_equal_gen_length(model, name):
    gen = 16
    # on the Dream model the default schedule is Dream's (test_decoding_dream_schedule.py); LLaDA's is asked for
    for spec in (f"{name}:schedule=llada", f"{name}:steps={gen},schedule=llada"):
        result = generate(model, PROMPTS, spec, gen_length=gen, block_length=8, early_stop=False, record_trace=True)
        for seq in result.sequences:
            left = (seq.trace.tokens_after == model.mask_id).sum(1)
            assert left.tolist() == list(range(gen - 1, -1, -1)), f"{spec}: masks left after each step {left}"
            assert seq.nfe == gen and seq.rows == gen
            assert seq.tpf == 1.0


@pytest.mark.parametrize("name", SCHEDULED)
def test_two_tokens_per_step_with_half_the_steps(model, name):
    gen = 16
    result = generate(model, PROMPTS, f"{name}:steps={gen // 2},schedule=llada", gen_length=gen, block_length=8, early_stop=False, record_trace=True)
    for seq in result.sequences:
        left = (seq.trace.tokens_after == model.mask_id).sum(1)
        assert left.tolist() == list(range(gen - 2, -1, -2))
        assert seq.nfe == gen // 2
        assert seq.tpf == 2.0


@pytest.mark.parametrize("steps", [4, 6, 10])
def test_uneven_schedule_puts_the_remainder_first(llada, steps):
    gen, block = 16, 8
    result = generate(llada, PROMPTS[:1], f"low_confidence:steps={steps}", gen_length=gen, block_length=block,
                      early_stop=False, record_trace=True)
    trace = result.sequences[0].trace
    per_step = trace.masked_before.sum(1) - (trace.tokens_after == llada.mask_id).sum(1)
    expected = llada_schedule(block, steps // 2) * 2
    assert per_step.tolist() == expected
    assert result.sequences[0].nfe == steps


@pytest.mark.parametrize("steps", [3, 5, 7])
def test_steps_not_a_multiple_of_blocks_is_an_error(llada, steps):
    with pytest.raises(UnmaskError, match="multiple of the number of blocks"):
        generate(llada, PROMPTS[:1], f"low_confidence:steps={steps}", gen_length=16, block_length=8)


@pytest.mark.parametrize("name,stat,sign", [("low_confidence", "confidence", 1), ("margin", "margin", 1), ("entropy", "entropy", -1)])
def test_loop_commits_the_best_scored_positions(model, name, stat, sign):
    """Through the trace: each step commits the k masked block positions with the best score."""
    gen, block = 16, 8
    for steps in (gen, gen // 4):
        result = generate(model, PROMPTS, f"{name}:steps={steps},schedule=llada", gen_length=gen, block_length=block,
                          early_stop=False, record_trace=True)
        sched = llada_schedule(block, steps // (gen // block))
        for seq in result.sequences:
            tr = seq.trace
            score = sign * getattr(tr, stat)
            for s in range(tr.steps):
                b = int(tr.block[s])
                lo, hi = b * block, (b + 1) * block
                committed = tr.masked_before[s] & (tr.tokens_after[s] != model.mask_id)
                k = sched[s - int(np.flatnonzero(tr.block == b)[0])]
                want = {lo + i for i in top_k_expected(score[s, lo:hi], tr.masked_before[s, lo:hi], k)}
                assert set(np.flatnonzero(committed).tolist()) == want, f"{name} step {s}"
                # greedy: the committed token is the argmax of the call
                assert (tr.tokens_after[s][committed] == tr.top1[s][committed]).all()


# ---------------------------------------------------------------------------------------------
# Dream's margin and entropy orders on hand-made logits (5)


def designed_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where confidence, margin and entropy each prefer a different one.

    A: p=(.60,.35,...) conf .60 (best), margin .25;  B: p=(.50,.125 x4) margin .375 (best);
    C: p=(.48,.48,.04)  entropy .83 (lowest);       D: unmasked, best on every score.
    """
    eps = 1e-9
    rows = [
        [0.60, 0.35, 0.05 / 3, 0.05 / 3, 0.05 / 3],
        [0.50, 0.125, 0.125, 0.125, 0.125],
        [0.48, 0.48, 0.04, eps, eps],
        [0.99, 0.0025, 0.0025, 0.0025, 0.0025],
    ]
    probs = torch.tensor(rows, dtype=torch.float64)
    logits = torch.log(probs / probs.sum(-1, keepdim=True))[None]
    masked = torch.tensor([[True, True, True, False]])
    return logits, masked


@pytest.mark.parametrize("name,expected", [("low_confidence", 0), ("margin", 1), ("entropy", 2)])
def test_orders_on_designed_logits(name, expected):
    logits, masked = designed_logits()
    view = logits_view(logits, masked)
    # the design really separates the three scores
    conf, marg, ent = view.confidence[0, :3], view.margin[0, :3], view.entropy[0, :3]
    assert int(conf.argmax()) == 0 and int(marg.argmax()) == 1 and int(ent.argmin()) == 2
    decision = parse_strategy(name).decide(view, None)
    assert decision.commit.tolist() == [[i == expected for i in range(4)]]


@pytest.mark.parametrize("name,stat,sign", [("margin", "margin", 1), ("entropy", "entropy", -1), ("low_confidence", "confidence", 1)])
def test_orders_on_random_logits(name, stat, sign):
    gen_rng = torch.Generator().manual_seed(7)
    differs_from_confidence = 0
    for trial in range(20):
        b, block, vocab = 3, 8, 12
        scale = torch.rand(b, block, 1, generator=gen_rng) * 4 + 0.3  # sharpness varies per position
        logits = torch.randn(b, block, vocab, generator=gen_rng, dtype=torch.float64) * scale
        masked = torch.rand(b, block, generator=gen_rng) < 0.7
        masked[:, 0] = True
        num_blocks = 2
        for steps, block_step in ((16, 0), (4, 0), (4, 1), (6, 2)):
            view = logits_view(logits, masked, block_step=block_step, num_blocks=num_blocks)
            k = llada_schedule(block, steps // num_blocks)[block_step]
            commit = parse_strategy(f"{name}:steps={steps}").decide(view, None).commit
            for r in range(b):
                score = (sign * getattr(view, stat)[r]).double().numpy()
                want = top_k_expected(score, masked[r].numpy(), k)
                assert set(np.flatnonzero(commit[r].numpy()).tolist()) == want
                by_conf = top_k_expected(view.confidence[r].double().numpy(), masked[r].numpy(), k)
                differs_from_confidence += want != by_conf
    if name != "low_confidence":
        assert differs_from_confidence > 0, "random logits never separated the orders; the test is vacuous"


# ---------------------------------------------------------------------------------------------
# Fast-dLLM's factor rule (4)


def factor_expected(conf: list[float], masked: list[bool], f: float) -> int:
    c = sorted((x for x, m in zip(conf, masked) if m), reverse=True)
    n = 0
    for j, cj in enumerate(c, start=1):
        if cj >= 1 - f / (j + 1):
            n = j
        else:
            break
    return max(n, 1) if c else 0


@pytest.mark.parametrize(
    "conf,masked,f,n",
    [
        ([0.9, 0.7, 0.6, 0.2], [True] * 4, 1.0, 2),  # thresholds .5, .667, .75
        ([0.4, 0.3, 0.2, 0.1], [True] * 4, 1.0, 1),  # none qualifies: the most confident still goes
        ([0.99, 0.98, 0.97, 0.96], [True] * 4, 1.0, 4),
        ([0.99, 0.98, 0.7, 0.6], [False, False, True, True], 1.0, 1),  # unmasked confidences do not count
        ([0.95, 0.9, 0.8, 0.3], [True] * 4, 0.5, 2),  # f=.5: thresholds .75, .833, .875
        ([0.8, 0.7, 0.6, 0.55], [True] * 4, 2.0, 3),  # f=2: thresholds 0, .333, .5, .6 -> .55 fails at j=4
    ],
)
def test_factor_count_on_fake_views(conf, masked, f, n):
    assert factor_expected(conf, masked, f) == n  # the hand count agrees with the reference count
    view = SimpleNamespace(confidence=torch.tensor([conf]), masked=torch.tensor([masked]))
    commit = parse_strategy(f"factor:factor={f}").decide(view, None).commit[0]
    assert int(commit.sum()) == n
    assert not (commit & ~torch.tensor(masked)).any()
    # the committed ones are the n most confident masked positions
    order = sorted((i for i in range(4) if masked[i]), key=lambda i: -conf[i])
    assert set(np.flatnonzero(commit.numpy()).tolist()) == set(order[:n])


@pytest.mark.parametrize(
    "conf,masked,n_rule,n_code",
    [
        # f = 1, thresholds by rank j: (forced), 1 - 1/3 = .667, 1 - 1/4 = .75, 1 - 1/5 = .8
        ([0.99, 0.9, 0.5], [True] * 3, 2, 3),  # only the last (.5 < .75) fails: Fast-dLLM's code takes it
        ([0.99, 0.5, 0.4], [True] * 3, 1, 1),  # the 2nd fails (.5 < .667): both stop at 1
        ([0.99, 0.9, 0.8, 0.85], [True] * 4, 4, 4),  # sorted .99 .9 .85 .8: all pass
        ([0.99, 0.9, 0.7, 0.1], [True] * 4, 2, 2),  # 3rd (.7 < .75) fails before the last: no change
        ([0.99, 0.9, 0.5, 0.99], [True, True, True, False], 2, 3),  # m = 3 masked: the last masked is .5
        ([0.3], [True], 1, 1),  # one masked position: forced either way
    ],
)
def test_factor_last_goes_is_fast_dllm_code(conf, masked, n_rule, n_code):
    view = SimpleNamespace(confidence=torch.tensor([conf]), masked=torch.tensor([masked]))
    assert int(parse_strategy("factor").decide(view, None).commit[0].sum()) == n_rule
    commit = parse_strategy("factor:last_goes=true").decide(view, None).commit[0]
    assert int(commit.sum()) == n_code
    assert not (commit & ~torch.tensor(masked)).any()


def test_factor_last_goes_is_a_listed_departure():
    from unmask.decoding.registry import describe_policies

    entry = {e["name"]: e for e in describe_policies()}["factor"]
    assert {p["name"]: p.get("departure", False) for p in entry["params"]}["last_goes"] is True


@pytest.mark.parametrize("f", [0.25, 1.0, 3.0])
def test_factor_count_on_random_views(f):
    rng = np.random.default_rng(11)
    policy = parse_strategy(f"factor:factor={f}")
    counts = set()
    for _ in range(50):
        conf = 1 - rng.random((4, 8)) ** 3 * rng.random((4, 1))  # many confident, some not
        masked = rng.random((4, 8)) < 0.75
        masked[:, 3] = True
        view = SimpleNamespace(confidence=torch.tensor(conf, dtype=torch.float32), masked=torch.tensor(masked))
        commit = policy.decide(view, None).commit
        for r in range(4):
            c32 = torch.tensor(conf[r], dtype=torch.float32).double().numpy()
            n = factor_expected(c32.tolist(), masked[r].tolist(), f)
            assert int(commit[r].sum()) == n
            counts.add(n)
            chosen = c32[commit[r].numpy()]
            rest = c32[masked[r] & ~commit[r].numpy()]
            assert rest.size == 0 or chosen.min() >= rest.max()
    assert len(counts) > 2  # the random views exercised several prefix lengths


def test_factor_in_the_loop(model):
    result = generate(model, PROMPTS, "factor:factor=2.0", gen_length=16, block_length=8, record_trace=True)
    several = 0
    for seq in result.sequences:
        tr = seq.trace
        for s in range(tr.steps):
            b = int(tr.block[s])
            lo, hi = b * 8, (b + 1) * 8
            committed = tr.masked_before[s] & (tr.tokens_after[s] != model.mask_id)
            n = factor_expected(tr.confidence[s, lo:hi].tolist(), tr.masked_before[s, lo:hi].tolist(), 2.0)
            assert int(committed.sum()) == n
            several += n > 1
    assert several > 0


# ---------------------------------------------------------------------------------------------
# Fast-dLLM's threshold rule (3)


@pytest.mark.parametrize("tau", [0.3, 0.5])
def test_threshold_never_commits_below_tau_except_one_forced(model, tau):
    gen, block = 32, 8
    result = generate(model, PROMPTS, f"threshold:tau={tau}", gen_length=gen, block_length=block, record_trace=True)
    forced = parallel = 0
    for seq in result.sequences:
        tr = seq.trace
        for s in range(tr.steps):
            b = int(tr.block[s])
            lo, hi = b * block, (b + 1) * block
            masked = tr.masked_before[s, lo:hi]
            conf = tr.confidence[s, lo:hi]
            committed = masked & (tr.tokens_after[s, lo:hi] != model.mask_id)
            assert committed.any()
            qualifies = masked & (conf >= tau)
            if qualifies.any():
                # every qualifying position goes, and nothing else
                assert np.array_equal(committed, qualifies), f"step {s}: {conf[masked]} committed {committed}"
                parallel += int(committed.sum()) > 1
            else:
                assert int(committed.sum()) == 1
                best = np.flatnonzero(masked)[np.argmax(conf[masked])]
                assert committed[best]
                forced += 1
    assert forced > 0 and parallel > 0  # both branches were exercised


def test_threshold_on_fake_view():
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.99], [0.3, 0.6, 0.5, 0.1]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    view = SimpleNamespace(confidence=conf, masked=masked)
    commit = parse_strategy("threshold:tau=0.9").decide(view, None).commit
    assert commit.tolist() == [[True, False, True, False], [False, True, False, False]]

"""Dream's schedule for the fixed-rate orders (low_confidence / random / margin / entropy).

Dream-v0's `diffusion_generate` runs `steps` calls over the time grid t_0..t_n = linspace(1, eps,
n + 1) (eps = 1e-3 by default). Before step i there are m_i masked positions; the step commits
int(m_i * (1 - t_{i+1} / t_i)) of them, the best-scored ones (or ones sampled from
softmax(score / alg_temp) when alg_temp > 0), and the last step commits all that are left. A count
that rounds down to 0 commits nothing; the call still happens. Its random order ('origin') instead
commits each masked position independently with probability 1 - t_{i+1} / t_i.

On this grid t_i = 1 - i * d with d = (1 - eps) / n, so 1 - t_{i+1} / t_i = d / t_i; every expected
count below is worked out by hand from that formula, never read back from the implementation.
`schedule=auto` (the default) takes Dream's rule for a Dream checkpoint, LLaDA's even split otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unmask.decoding import DecodeConfig, generate
from unmask.decoding.policies.schedule import (
    ScheduledConfig,
    dream_counts,
    sample_positions,
)
from unmask.decoding.registry import parse_strategy
from unmask.testing import error_of, logits_view

PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]
SCORED = ["low_confidence", "margin", "entropy"]
SCHEDULED = SCORED + ["random"]
STAT = {"low_confidence": ("confidence", 1), "margin": ("margin", 1), "entropy": ("entropy", -1)}

# m=10 masked, n=4 steps, eps=1e-3: d = .999 / 4 = .24975, t = 1, .75025, .5005, .25075, .001
#   i=0: d / 1      = .24975 -> 10 x .24975 = 2.4975 -> 2, 8 left
#   i=1: d / .75025 = .33289 ->  8 x .33289 = 2.663  -> 2, 6 left
#   i=2: d / .5005  = .49900 ->  6 x .49900 = 2.994  -> 2, 4 left
#   i=3: the last step commits the 4 left
DREAM_10_4 = [2, 2, 2, 4]
LLADA_10_4 = [3, 3, 2, 2]  # LLaDA: 10 = 4 x 2 + 2, the remainder on the first two steps

# m=4, n=8: d = .999 / 8 = .124875, t_i = 1 - .124875 i
#   i=0: d / 1       = .12488 -> 4 x = .4995 -> 0      i=1: d / .875125 = .14269 -> 4 x = .5708 -> 0
#   i=2: d / .75025  = .16644 -> 4 x = .6658 -> 0      i=3: d / .625375 = .19968 -> 4 x = .7987 -> 0
#   i=4: d / .5005   = .24950 -> 4 x = .9980 -> 0      i=5: d / .375625 = .33245 -> 4 x = 1.330 -> 1, 3 left
#   i=6: d / .25075  = .49801 -> 3 x = 1.494 -> 1, 2 left;  i=7: the last step commits the 2 left
DREAM_4_8 = [0, 0, 0, 0, 0, 1, 1, 2]

# m=8, n=8 (Dream's usual steps = max_new_tokens): the same fractions as above
#   i=0: 8 x .12488 = .999 -> 0 (the first call commits nothing), 8 left
#   i=1: 8 x .14269 = 1.142 -> 1;  i=2: 7 x .16644 = 1.165 -> 1;  i=3: 6 x .19968 = 1.198 -> 1
#   i=4: 5 x .24950 = 1.248 -> 1;  i=5: 4 x .33245 = 1.330 -> 1;  i=6: 3 x .49801 = 1.494 -> 1
#   i=7: the 2 left
DREAM_8_8 = [0, 1, 1, 1, 1, 1, 1, 2]

# m=10, n=2, eps=1e-3: t = 1, .5005, .001 -> i=0: 10 x .4995 = 4.995 -> 4; i=1: the 6 left
# m=10, n=2, eps=.5:   t = 1, .75, .5    -> i=0: 10 x .25   = 2.5   -> 2; i=1: the 8 left
DREAM_10_2 = [4, 6]
DREAM_10_2_EPS_HALF = [2, 8]


def per_step_commits(trace, mask_id: int) -> list[int]:
    return (trace.masked_before.sum(1) - (trace.tokens_after == mask_id).sum(1)).tolist()


def top_k_expected(score: np.ndarray, masked: np.ndarray, k: int) -> set[int]:
    cand = sorted((i for i in range(len(score)) if masked[i]), key=lambda i: (-score[i], i))
    return set(cand[:k])


# ---------------------------------------------------------------------------------------------
# the count rule, by hand


@pytest.mark.parametrize("m,n,eps,expected", [
    (10, 4, 1e-3, DREAM_10_4),
    (4, 8, 1e-3, DREAM_4_8),
    (8, 8, 1e-3, DREAM_8_8),
    (10, 2, 1e-3, DREAM_10_2),
    (10, 2, 0.5, DREAM_10_2_EPS_HALF),
])
def test_dream_counts_follow_the_grid(m, n, eps, expected):
    left, counts = m, []
    for i in range(n):
        k = int(dream_counts(torch.tensor([left]), torch.tensor([i]), n, eps)[0])
        counts.append(k)
        left -= k
    assert counts == expected
    assert left == 0


@pytest.mark.parametrize("name", SCORED)
@pytest.mark.parametrize("m,n,expected", [(10, 4, DREAM_10_4), (4, 8, DREAM_4_8), (8, 8, DREAM_8_8)])
def test_policy_commits_dreams_counts_of_its_best_positions(name, m, n, expected):
    """Stepping the policy by hand over one block: Dream's counts, the best-scored masked positions,
    and steps that commit nothing where the count rounds to 0."""
    gen_rng = torch.Generator().manual_seed(3)
    scale = torch.rand(2, m, 1, generator=gen_rng) * 4 + 0.3
    logits = torch.randn(2, m, 12, generator=gen_rng, dtype=torch.float64) * scale
    policy = parse_strategy(f"{name}:schedule=dream,steps={n}")
    assert policy.empty_steps  # a step may rightly commit nothing: the loop must not force one
    masked = torch.ones(2, m, dtype=torch.bool)
    stat, sign = STAT[name]
    for i in range(n):
        view = logits_view(logits, masked, block_step=i)
        commit = policy.decide(view, None).commit
        assert not (commit & ~masked).any()
        for r in range(2):
            assert int(commit[r].sum()) == expected[i], f"step {i}"
            score = (sign * getattr(view, stat)[r]).double().numpy()
            assert set(np.flatnonzero(commit[r].numpy()).tolist()) == top_k_expected(score, masked[r].numpy(), expected[i])
        masked = masked & ~commit
    assert not masked.any()


# ---------------------------------------------------------------------------------------------
# through the loop: auto picks Dream's rule for a Dream checkpoint and LLaDA's otherwise


@pytest.mark.parametrize("name", SCORED)
def test_auto_schedule_follows_the_checkpoint(dream, llada, name):
    for model, expected in ((dream, DREAM_10_4), (llada, LLADA_10_4)):
        result = generate(model, PROMPTS, f"{name}:steps=4", gen_length=10, block_length=10,
                          early_stop=False, record_trace=True)
        for seq in result.sequences:
            assert per_step_commits(seq.trace, model.mask_id) == expected, model.name
            assert seq.nfe == 4
            assert model.mask_id not in seq.tokens


@pytest.mark.parametrize("name", SCORED)
def test_an_explicit_schedule_overrides_auto(dream, llada, name):
    for model, schedule, expected in ((dream, "llada", LLADA_10_4), (llada, "dream", DREAM_10_4)):
        result = generate(model, PROMPTS, f"{name}:steps=4,schedule={schedule}", gen_length=10, block_length=10,
                          early_stop=False, record_trace=True)
        for seq in result.sequences:
            assert per_step_commits(seq.trace, model.mask_id) == expected


def test_dreams_rule_restarts_in_every_block_and_takes_eps(dream):
    # two blocks of 10 with 8 steps: each block gets 4 steps and its own grid
    result = generate(dream, PROMPTS, "entropy:steps=8", gen_length=20, block_length=10,
                      early_stop=False, record_trace=True)
    for seq in result.sequences:
        assert per_step_commits(seq.trace, dream.mask_id) == DREAM_10_4 * 2
        assert seq.trace.block.tolist() == [0] * 4 + [1] * 4
    for spec, expected in (("margin:steps=2", DREAM_10_2), ("margin:steps=2,eps=0.5", DREAM_10_2_EPS_HALF)):
        result = generate(dream, PROMPTS, spec, gen_length=10, block_length=10, early_stop=False, record_trace=True)
        for seq in result.sequences:
            assert per_step_commits(seq.trace, dream.mask_id) == expected, spec


@pytest.mark.parametrize("name", SCORED)
def test_the_loop_commits_the_best_scored_positions_under_dreams_rule(dream, name):
    stat, sign = STAT[name]
    result = generate(dream, PROMPTS, f"{name}:steps=4", gen_length=10, block_length=10,
                      early_stop=False, record_trace=True)
    for seq in result.sequences:
        tr = seq.trace
        score = sign * getattr(tr, stat)
        for s in range(tr.steps):
            committed = tr.masked_before[s] & (tr.tokens_after[s] != dream.mask_id)
            want = top_k_expected(score[s], tr.masked_before[s], DREAM_10_4[s])
            assert set(np.flatnonzero(committed).tolist()) == want, f"{name} step {s}"


def test_prepare_resolves_auto(dream, llada):
    config = DecodeConfig(gen_length=16, block_length=8)
    for name in SCHEDULED:
        policy = parse_strategy(name)
        assert policy.schedule_in_use == "llada" and not policy.empty_steps  # never prepared
        policy.prepare(dream, [[1, 2]], config.resolved(dream.defaults))
        assert policy.schedule_in_use == "dream" and policy.empty_steps
        policy.prepare(llada, [[1, 2]], config.resolved(llada.defaults))
        assert policy.schedule_in_use == "llada" and not policy.empty_steps
        pinned = parse_strategy(f"{name}:schedule=llada")
        pinned.prepare(dream, [[1, 2]], config.resolved(dream.defaults))
        assert pinned.schedule_in_use == "llada"
        assert policy.params["schedule"] == "auto"  # params report the setting as given


@pytest.mark.parametrize("name", SCHEDULED)
def test_llada_checkpoints_decode_as_with_llada_schedule(llada, name):
    for steps in ("", ",steps=8"):
        default = generate(llada, PROMPTS, f"{name}:temperature=0{steps}", gen_length=16, block_length=8, seed=2)
        pinned = generate(llada, PROMPTS, f"{name}:schedule=llada{steps}", gen_length=16, block_length=8, seed=2)
        assert [s.tokens for s in default.sequences] == [s.tokens for s in pinned.sequences]
        assert [s.nfe for s in default.sequences] == [s.nfe for s in pinned.sequences]


# ---------------------------------------------------------------------------------------------
# alg_temp: positions sampled from softmax(score / alg_temp), from each sequence's own generator


@pytest.mark.parametrize("alg_temp,probs", [
    (1.0, [1 / 7, 2 / 7, 4 / 7]),  # weights e^0, e^ln2, e^ln4 = 1, 2, 4
    (2.0, [1 / (3 + math.sqrt(2)), math.sqrt(2) / (3 + math.sqrt(2)), 2 / (3 + math.sqrt(2))]),  # 1, 2^.5, 2
])
def test_one_sampled_position_follows_the_softmax(alg_temp, probs):
    draws = 7000
    score = torch.tensor([[0.0, math.log(2), math.log(4), 50.0]]).expand(draws, 4)
    allowed = torch.tensor([[True, True, True, False]]).expand(draws, 4)  # the best score is not masked
    g = torch.Generator().manual_seed(0)
    chosen = sample_positions(score, allowed, torch.ones(draws, dtype=torch.long), alg_temp, [g] * draws)
    assert (chosen.sum(-1) == 1).all() and not chosen[:, 3].any()
    freq = chosen.double().mean(0)[:3].tolist()
    for got, want in zip(freq, probs):
        assert abs(got - want) < 0.02, (freq, probs)


def test_two_sampled_positions_are_drawn_without_replacement():
    # weights 1, 2, 4; the pair left out by sequential draws without replacement:
    #   leave out 0: (2/7)(4/5) + (4/7)(2/3) = 64/105;  leave out 1: (1/7)(4/6) + (4/7)(1/3) = 2/7
    #   leave out 2: (1/7)(2/6) + (2/7)(1/5) = 11/105
    draws = 7000
    score = torch.tensor([[0.0, math.log(2), math.log(4)]]).expand(draws, 3)
    allowed = torch.ones(draws, 3, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    chosen = sample_positions(score, allowed, torch.full((draws,), 2), 1.0, [g] * draws)
    assert (chosen.sum(-1) == 2).all()
    left_out = (~chosen).double().mean(0).tolist()
    for got, want in zip(left_out, [64 / 105, 2 / 7, 11 / 105]):
        assert abs(got - want) < 0.02, left_out


def test_sampling_draws_from_each_rows_own_generator():
    gen_rng = torch.Generator().manual_seed(4)
    score = torch.randn(3, 12, generator=gen_rng)
    allowed = torch.rand(3, 12, generator=gen_rng) < 0.8
    k = torch.tensor([3, 0, 5])
    batch = sample_positions(score, allowed, k, 0.7, [torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    for r, seed in enumerate((10, 11, 12)):
        alone = sample_positions(score[r : r + 1], allowed[r : r + 1], k[r : r + 1], 0.7,
                                 [torch.Generator().manual_seed(seed)])
        assert torch.equal(batch[r], alone[0])
        assert int(batch[r].sum()) == min(int(k[r]), int(allowed[r].sum()))
        assert not (batch[r] & ~allowed[r]).any()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("name", SCORED)
def test_alg_temp_decodes_are_batch_invariant_and_really_sample(dream, name, temperature):
    spec = f"{name}:steps=4,alg_temp=5,temperature={temperature}"
    kwargs = dict(gen_length=10, block_length=10, early_stop=False, record_trace=True)
    batch = generate(dream, PROMPTS, spec, seed=5, **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(dream, [prompt], spec, seed=5, **kwargs).sequences[0]
        got = batch.sequences[i]
        assert got.tokens == alone.tokens, f"{spec}: prompt {i} decodes differently in a batch"
        assert np.array_equal(got.trace.commit_step, alone.trace.commit_step)
        assert got.nfe == alone.nfe == 4
        assert per_step_commits(got.trace, dream.mask_id) == DREAM_10_4  # sampling keeps Dream's counts
    # the order really is sampled: some seed commits other positions than the best-scored ones
    greedy = f"{name}:steps=4,temperature={temperature}"
    differs = 0
    for seed in range(4):
        a = generate(dream, PROMPTS[:1], spec, seed=seed, **kwargs).sequences[0].trace.commit_step
        b = generate(dream, PROMPTS[:1], greedy, seed=seed, **kwargs).sequences[0].trace.commit_step
        differs += not np.array_equal(a, b)
    assert differs > 0, f"{spec}: alg_temp never changed the order"


# ---------------------------------------------------------------------------------------------
# random under Dream's schedule: Dream's 'origin' rule


def test_random_commits_each_position_with_probability_one_minus_s_over_t():
    block = 2000
    logits = torch.zeros(1, block, 5, dtype=torch.float64)
    masked = torch.ones(1, block, dtype=torch.bool)
    policy = parse_strategy("random:schedule=dream,steps=4")
    # n=4, eps=1e-3 (see DREAM_10_4): p = .24975 at step 0, .49900 at step 2, 1 at the last step;
    # a Binomial(2000, p) count has standard deviation at most 22.4
    for step, p in ((0, 0.24975), (2, 0.49900), (3, 1.0)):
        commit = policy.decide(logits_view(logits, masked, block_step=step), None).commit
        assert abs(int(commit.sum()) - block * p) < 90, (step, int(commit.sum()))
    # only masked positions, and the same draws for the same sequence seed
    half = torch.arange(block)[None].expand(3, block) % 2 == 0
    commit = policy.decide(logits_view(logits.expand(3, block, 5), half, block_step=0, seeds=[7, 8, 7]), None).commit
    assert not (commit & ~half).any()
    assert torch.equal(commit[0], commit[2]) and not torch.equal(commit[0], commit[1])


def test_random_under_dreams_schedule_decodes_batch_invariantly(dream):
    kwargs = dict(gen_length=16, block_length=8, seed=3)
    batch = generate(dream, PROMPTS, "random:steps=8", **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(dream, [prompt], "random:steps=8", **kwargs).sequences[0]
        assert batch.sequences[i].tokens == alone.tokens
        assert dream.mask_id not in alone.tokens


# ---------------------------------------------------------------------------------------------
# bad values name the field


@pytest.mark.parametrize("spec,field", [
    ("margin:schedule=fast", "schedule"),
    ("margin:eps=1", "eps"),
    ("margin:eps=-0.1", "eps"),
    ("margin:eps=nan", "eps"),
    ("margin:alg_temp=-1", "alg_temp"),
    ("entropy:alg_temp=inf", "alg_temp"),
    ("low_confidence:schedule=llada,alg_temp=0.5", "alg_temp"),
    ("low_confidence:schedule=llada,eps=0.01", "eps"),
    ("random:schedule=dream,alg_temp=0.5", "alg_temp"),
    ("entropy:steps=0", "steps"),
])
def test_bad_values_name_the_field(spec, field):
    err = error_of(parse_strategy, spec)
    assert err.field == field
    assert field in str(err)


@pytest.mark.parametrize("make,field", [
    (lambda: ScheduledConfig(schedule="LLaDA"), "schedule"),
    (lambda: ScheduledConfig(eps=float("nan")), "eps"),
    (lambda: ScheduledConfig(alg_temp=float("nan")), "alg_temp"),
])
def test_configs_built_in_python_name_the_field(make, field):
    assert error_of(lambda: make().validate()).field == field


@pytest.mark.parametrize("which,spec,field", [
    ("llada", "margin:alg_temp=0.5", "alg_temp"),  # auto became llada, which has no alg_temp
    ("llada", "low_confidence:eps=0.01", "eps"),
    ("dream", "random:alg_temp=0.5", "alg_temp"),  # auto became Dream's origin rule
    ("dream", "margin:steps=66", "steps"),  # 33 calls per block of 8, over the loop's bound of 32
    ("dream", "entropy:steps=3", "steps"),  # not a multiple of the 2 blocks
])
def test_settings_that_do_not_fit_the_resolved_schedule_fail_at_decode(request, which, spec, field):
    model = request.getfixturevalue(which)
    err = error_of(generate, model, PROMPTS[:1], spec, gen_length=16, block_length=8)
    assert err.field == field


def test_the_loop_lets_dreams_schedule_commit_nothing_at_a_step(dream):
    # 16 positions in blocks of 8, 16 steps: 8 per block. Per block Dream's rule over 8 masked
    # positions with grid linspace(1, 1e-3, 9) gives, worked by hand: step 0 int(8 * (1 - s/t)) with
    # t = 1, s = 0.875125 -> int(0.999) = 0; then 1 each, and all that is left (2) on the last step:
    # [0, 1, 1, 1, 1, 1, 1, 2]. The loop must make the empty call and not force a commit.
    seq = generate(dream, ["hello"], "margin:steps=16", gen_length=16, block_length=8, early_stop=False,
                   record_trace=True).sequences[0]
    committed = (seq.trace.masked_before & (seq.trace.tokens_after != dream.mask_id)).sum(-1).tolist()
    assert committed == [0, 1, 1, 1, 1, 1, 1, 2] * 2
    assert seq.nfe == 16

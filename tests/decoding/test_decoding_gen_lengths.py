"""Sequences of different gen_length share one decode: the canvas is as wide as the longest, a shorter
sequence is right padded (its padding hidden from attention, never committed, never reported), and
each sequence decodes to exactly the tokens, NFE and rows it gets alone with its own gen_length, for
every policy, with and without the KV cache, in a static batch and when it joins a running decode
(a longer generation widens the generation region on the right)."""

from __future__ import annotations

import pytest
import torch

from unmask.decoding import DecodeConfig, generate, policy_names
from unmask.decoding.features import FEATURE_NAMES, FeatureTracker, step_features, trace_features
from unmask.decoding.loop import Decoder, encode_prompts, widen_state
from unmask.decoding.policies.threshold import Threshold, ThresholdConfig
from unmask.decoding.registry import parse_strategy
from unmask.errors import UnmaskError
from unmask.testing import controller_strategies, make_view, peaked, tiny_llada

BLOCK = 16
PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?", "hi there"]
SEEDS = [11, 22, 33, 44]
ALL = policy_names()
CONTINUOUS = [n for n in ALL if parse_strategy(n).continuous]
SPEC = {n: n for n in ALL}
SPEC["threshold"] = "threshold:tau=0.3"
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module", autouse=True)
def _controller(tmp_path_factory):
    SPEC.update(controller_strategies(tmp_path_factory.mktemp("c")))


def _with_temperature(spec: str, t: float) -> str:
    return spec + ((("," if ":" in spec else ":") + f"temperature={t}") if t else "")


def _alone(model, i, spec, gen_length, cache, seed=None, temperature=0.0):
    return generate(model, [PROMPTS[i]], _with_temperature(spec, temperature), gen_length=gen_length,
                    block_length=BLOCK, cache=cache, seed=SEEDS[i] if seed is None else seed).sequences[0]


def _same(got, want, what):
    assert got.tokens == want.tokens, f"{what}: tokens changed by sharing the decode"
    assert (got.nfe, got.rows, got.decided, got.stopped_early) == (want.nfe, want.rows, want.decided, want.stopped_early), what
    assert got.events == pytest.approx(want.events), what


# ---------------------------------------------------------------------------------------------
# a static batch of mixed lengths (every policy, the oracle included)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("name", ALL)
def test_a_batch_of_mixed_gen_lengths_decodes_each_as_alone(model, name, cache):
    lengths = [32, 16, 48]  # the longest is not first: the canvas is the longest, not the first
    result = generate(model, PROMPTS[:3], SPEC[name], gen_lengths=lengths, block_length=BLOCK, cache=cache, seed=5)
    assert result.config.gen_length == 48
    for i, g in enumerate(lengths):
        got = result.sequences[i]
        assert len(got.tokens) == g  # only its own generation, never the padding
        _same(got, _alone(model, i, SPEC[name], g, cache, seed=5), f"{name} {cache} prompt {i} (gen_length {g})")


@pytest.mark.parametrize("spec", ["one_shot:temperature=1.0", "random", "low_confidence:steps=6",
                                  "random:steps=6,schedule=dream", "entropy:steps=6,schedule=dream,alg_temp=0.5"])
def test_per_sequence_lengths_reach_sampling_and_schedules(model, spec):
    # one_shot's block is each sequence's own generation (its noise is drawn for that many positions);
    # an explicit step count splits over each sequence's own blocks: 6 calls in 1, 2 or 3 blocks
    lengths = [16, 48, 32]
    result = generate(model, PROMPTS[:3], spec, gen_lengths=lengths, block_length=BLOCK, seed=9)
    for i, g in enumerate(lengths):
        want = generate(model, [PROMPTS[i]], spec, gen_length=g, block_length=BLOCK, seed=9).sequences[0]
        _same(result.sequences[i], want, f"{spec} prompt {i}")
    if "steps=6" in spec and "dream" not in spec:
        assert [s.nfe for s in result.sequences] == [6, 6, 6]


def test_a_step_count_that_does_not_split_over_a_sequences_blocks_is_refused_before_decoding(llada):
    # 4 calls over 3 blocks (gen_length 48): refused up front, naming the steps, as alone
    with pytest.raises(UnmaskError, match="multiple of the number of blocks \\(3\\)") as err:
        generate(llada, PROMPTS[:2], "low_confidence:steps=4", gen_lengths=[16, 48], block_length=BLOCK)
    assert err.value.field == "steps"
    with pytest.raises(UnmaskError, match="does not divide gen_length 24"):
        generate(llada, PROMPTS[:2], "low_confidence", gen_lengths=[16, 24], block_length=BLOCK)
    with pytest.raises(UnmaskError, match="gen_lengths for"):
        generate(llada, PROMPTS[:2], "low_confidence", gen_lengths=[16], block_length=BLOCK)


# ---------------------------------------------------------------------------------------------
# joining a running decode with another gen_length

JOIN_AT = {2: [1], 5: [2, 3]}  # before the model call with this index, these prompts join
LENGTHS = [32, 48, 16, 32]  # prompt 1 widens the generation region, prompt 2 the prompt region
TEMPS = [0.0, 0.8, 0.0, 0.5]


def _join(model, spec, cache, finished, blocks=None):
    """Prompt 0 starts a decode; the others join as JOIN_AT says, each with its own seed, temperature
    and gen_length. Returns the result and the prompt index of each row."""
    policy = parse_strategy(spec)
    cfg = DecodeConfig(gen_length=LENGTHS[0], block_length=BLOCK, cache=cache).resolved(model.defaults)
    ids = encode_prompts(model, PROMPTS)
    policy.prepare(model, ids[:1], cfg)
    calls = {"n": 0}
    joined = [0]

    def admit(width, rows):
        calls["n"] += 1
        joined.extend(JOIN_AT.get(calls["n"], []))
        return [(ids[i], SEEDS[i], TEMPS[i], LENGTHS[i]) for i in JOIN_AT.get(calls["n"], [])]

    def on_block(row, block, tokens):
        if blocks is not None:
            blocks.append((row, block, list(tokens)))

    result = Decoder(model, policy, cfg, on_block=on_block).run(
        [ids[0]], seeds=[SEEDS[0]], temperatures=[TEMPS[0]], admit=admit, on_finish=lambda r, s: finished.append((r, s)))
    return result, joined


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("name", CONTINUOUS)
def test_joiners_of_other_gen_lengths_decode_as_they_do_alone(model, name, cache):
    finished = []
    result, order = _join(model, SPEC[name], cache, finished)
    # everyone joins while the first sequence still decodes, except under one_shot (one call: done
    # before anyone can join)
    assert len(order) == (1 if name == "one_shot" else len(PROMPTS))
    for row, i in enumerate(order):
        got = result.sequences[row]
        assert len(got.tokens) == LENGTHS[i]
        want = _alone(model, i, SPEC[name], LENGTHS[i], cache, temperature=TEMPS[i])
        _same(got, want, f"{name} {cache} prompt {i} (gen_length {LENGTHS[i]}, joined as row {row})")
    assert sorted(r for r, _ in finished) == list(range(len(order)))
    for row, seq in finished:  # reported as it left, as at the end
        assert seq.tokens == result.sequences[row].tokens and seq.nfe == result.sequences[row].nfe


def test_the_oracle_refuses_joiners_of_any_length(llada):
    policy = parse_strategy("oracle")
    cfg = DecodeConfig(gen_length=16, block_length=BLOCK).resolved(llada.defaults)
    ids = encode_prompts(llada, PROMPTS[:1])
    policy.prepare(llada, ids, cfg)
    with pytest.raises(UnmaskError, match="cannot take sequences into a running decode"):
        Decoder(llada, policy, cfg).run(ids, admit=lambda w, r: [(ids[0], 0, 0.0, 32)])


def test_streaming_and_traces_cover_only_a_sequences_own_blocks(llada):
    blocks = []
    policy = parse_strategy("low_confidence")
    cfg = DecodeConfig(gen_length=LENGTHS[0], block_length=BLOCK, early_stop=False,
                       record_trace=True).resolved(llada.defaults)
    ids = encode_prompts(llada, PROMPTS)
    calls = {"n": 0}

    def admit(width, rows):
        calls["n"] += 1
        return [(ids[i], SEEDS[i], 0.0, LENGTHS[i]) for i in JOIN_AT.get(calls["n"], [])]

    result = Decoder(llada, policy, cfg, on_block=lambda r, b, t: blocks.append((r, b, list(t)))).run(
        [ids[0]], seeds=[SEEDS[0]], admit=admit)
    order = [0, 1, 2, 3]
    for row, i in enumerate(order):
        g = LENGTHS[i]
        seq = result.sequences[row]
        mine = [(b, t) for r, b, t in blocks if r == row]
        # one report per own block, each with the generation up to that block's end, the last the result
        assert [b for b, _ in mine] == list(range(g // BLOCK))
        assert [len(t) for _, t in mine] == [BLOCK * (b + 1) for b, _ in mine]
        assert mine[-1][1] == seq.tokens and len(seq.tokens) == g and llada.mask_id not in seq.tokens
        assert seq.nfe == g  # one token per call, its own blocks only
        tr = seq.trace
        assert tr.top1.shape == tr.masked_before.shape == tr.tokens_after.shape == (seq.nfe, g)
        assert tr.commit_step.shape == (g,) and (tr.commit_step >= 0).all()
        assert tr.final_tokens.tolist() == seq.tokens


def test_a_joiner_that_would_widen_the_canvas_past_the_context_is_refused(llada):
    cfg = DecodeConfig(gen_length=16, block_length=BLOCK).resolved(llada.defaults)
    long_prompt = [5] * (llada.max_length - 32)  # fits with 32 positions to generate
    ok = Decoder(llada, parse_strategy("low_confidence"), cfg).run(
        [long_prompt], admit=lambda w, r: [([5, 6], 0, 0.0, 32)] if r == 1 else [])
    assert [len(s.tokens) for s in ok.sequences] == [16, 32]
    with pytest.raises(UnmaskError, match="exceeds the model's context"):
        Decoder(llada, parse_strategy("low_confidence"), cfg).run(
            [long_prompt], admit=lambda w, r: [([5, 6], 0, 0.0, 48)])


# ---------------------------------------------------------------------------------------------
# the stop rule, the non-finite check and the features read each sequence's own generation


def test_the_stop_rule_ignores_the_padding_of_a_shorter_sequence(scripted, scripted_tokenizer):
    tok = scripted_tokenizer
    word, other, eos = tok.token_id("apples"), tok.token_id("pens"), tok.hf.eos_token_id

    def plan(prompt, gen_tokens, g):
        # words, then EOS up to position 16; past 16 (the short sequence's padding) a word
        return (word if g < 5 else eos if g < 16 else other), 0.55 + 0.03 * ((g * 5) % 8)

    model = scripted(plan, gen_length=32, block_length=8)
    prompts = [[20, 21, 22], [23, 24]]
    mixed = generate(model, prompts, "low_confidence", gen_lengths=[16, 32], block_length=8).sequences
    assert mixed[0].stopped_early and mixed[0].nfe == 8  # stops after its first block, padding unread
    assert mixed[0].tokens == [word] * 5 + [eos] * 11
    assert not mixed[1].stopped_early and mixed[1].nfe == 32
    model.network.gen_length = 16  # the scripted net reads the generation as the last 16 columns
    alone = generate(model, prompts[:1], "low_confidence", gen_length=16, block_length=8).sequences[0]
    _same(mixed[0], alone, "stop rule")


def test_non_finite_logits_on_padding_are_never_read(scripted):
    short, long_ = (20, 21, 22), (23, 24)

    def plan(prompt, gen_tokens, g):
        # the short sequence's padding (positions 16..31 of its row) gets NaN logits
        return 30 + g % 4, (float("nan") if g >= 16 and prompt == short else 0.6)

    model = scripted(plan, gen_length=32, block_length=8)
    seqs = generate(model, [list(short), list(long_)], "threshold", gen_lengths=[16, 32], block_length=8).sequences
    assert [len(s.tokens) for s in seqs] == [16, 32]
    assert model.mask_id not in seqs[0].tokens + seqs[1].tokens


def test_gen_offset_is_relative_to_the_sequences_own_generation():
    # by hand: a sequence of gen_length 32 in a canvas of 48, block 16..23, position 20 -> 20 / 31
    ones = torch.ones(2, 8)
    f = step_features(ones * 0.5, ones * 0.2, ones, torch.full((2, 8, 3), float("nan")),
                      torch.full((2, 8, 3), float("nan")), ones.long(), torch.zeros(2, dtype=torch.bool),
                      torch.ones(2, 8, dtype=torch.bool), torch.zeros(2, dtype=torch.long),
                      torch.tensor([16, 16]), block_length=8, gen_length=torch.tensor([32, 48]))
    assert float(f[0, 4, COL["gen_offset"]]) == pytest.approx(20 / 31)
    assert float(f[1, 4, COL["gen_offset"]]) == pytest.approx(20 / 47)
    # online, from a view of that sequence in a 48-wide canvas
    view = make_view(peaked([2] * 8, [0.5] * 8, 12))
    view.positions = 16 + torch.arange(8)[None]
    view.gen_length, view.num_blocks = 48, 6
    view.row_gen_length, view.row_num_blocks = torch.tensor([32]), torch.tensor([4])
    tracker = FeatureTracker(window=1)
    obs = tracker.update(view, tracker.init_state(1, 48, torch.device("cpu")))
    assert float(obs.features[0, 4, COL["gen_offset"]]) == pytest.approx(20 / 31)


class RecordingThreshold(Threshold):
    """The threshold rule, logging the features it would hand a controller at every call."""

    def __init__(self):
        super().__init__(ThresholdConfig(tau=0.25))
        self.tracker = FeatureTracker(window=1)
        self.log = []

    def init_state(self, batch_size, gen_length, device):
        return self.tracker.init_state(batch_size, gen_length, device)

    def decide(self, view, state):
        self.log.append((view.rows.clone(), view.step, self.tracker.update(view, state).features.clone()))
        return super().decide(view, state)


def test_online_features_of_a_shorter_sequence_equal_the_offline_ones_from_its_trace():
    model = tiny_llada(gen_length=16, block_length=8)
    policy = RecordingThreshold()
    result = generate(model, PROMPTS[:2], policy, gen_lengths=[16, 32], block_length=8, record_trace=True,
                      early_stop=False)
    compared = 0
    for row, seq in enumerate(result.sequences):
        offline = trace_features(seq.trace, block_length=8)  # the trace is the sequence's own 16 or 32
        for rows, step, features in policy.log:
            j = (rows == row).nonzero()
            if len(j):
                torch.testing.assert_close(features[int(j[0, 0])], torch.from_numpy(offline.features[step]),
                                           rtol=1e-5, atol=1e-6)
                compared += 1
    assert compared == sum(s.nfe for s in result.sequences)


def test_widen_state_keeps_every_row_and_position():
    state = {"x": torch.arange(6.0).reshape(2, 3), "depth": torch.tensor([4, 5]), "h": (torch.ones(2, 3, 1),)}
    wider = {"x": torch.full((2, 5), -1.0), "depth": torch.tensor([0, 0]), "h": (torch.zeros(2, 5, 1),)}
    out = widen_state(state, wider)
    assert out["x"].tolist() == [[0, 1, 2, -1, -1], [3, 4, 5, -1, -1]]
    assert out["depth"].tolist() == [4, 5]  # its shape does not depend on the generation length
    assert out["h"][0][:, :, 0].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert widen_state(None, None) is None
    with pytest.raises(TypeError):
        widen_state(3, 4)

"""Continuous batching: sequences that join a running decode at step boundaries decode to exactly the
tokens (and NFE) they get alone, each with its own seed, for every policy, with and without the KV
cache; the oracle, which prepares per batch, refuses to take joiners."""

from __future__ import annotations

import pytest

from unmask.decoding import DecodeConfig, generate, policy_names
from unmask.decoding.loop import Decoder, encode_prompts, grow_state
from unmask.decoding.registry import parse_strategy
from unmask.errors import UnmaskError
from unmask.testing import controller_strategies

GEN, BLOCK = 16, 8
PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?", "hi there"]
SEEDS = [11, 22, 33, 44]
JOIN_AT = {2: [1], 5: [2, 3]}  # before the model call with this index, these prompts join
CONTINUOUS = [n for n in policy_names() if n != "oracle"]
SPEC = {n: n for n in CONTINUOUS}
SPEC["threshold"] = "threshold:tau=0.3"


@pytest.fixture(scope="module", autouse=True)
def _controller(tmp_path_factory):
    SPEC.update(controller_strategies(tmp_path_factory.mktemp("c")))


def _continuous(model, spec, cache, finished, temps=None):
    """Prompt 0 starts a decode; the others join as JOIN_AT says (with `temps[i]`, if given).
    Returns the result and the prompt index of each row."""
    policy = parse_strategy(spec)
    cfg = DecodeConfig(gen_length=GEN, block_length=BLOCK, cache=cache).resolved(model.defaults)
    ids = encode_prompts(model, PROMPTS)
    policy.prepare(model, ids, cfg)
    calls = {"n": 0}
    joined = [0]

    def admit(width, rows):
        calls["n"] += 1
        joined.extend(JOIN_AT.get(calls["n"], []))
        return [(ids[i], SEEDS[i]) + ((temps[i],) if temps else ()) for i in JOIN_AT.get(calls["n"], [])]

    # the first prompt is shorter than the third: its joining widens the prompt region mid-decode
    assert len(ids[2]) > len(ids[0])
    result = Decoder(model, policy, cfg).run([ids[0]], seeds=[SEEDS[0]], admit=admit,
                                             on_finish=lambda row, seq: finished.append((row, seq)))
    return result, joined


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("name", CONTINUOUS)
def test_joining_sequences_decode_as_they_do_alone(model, name, cache, temperature):
    spec = SPEC[name] + ((("," if ":" in SPEC[name] else ":") + f"temperature={temperature}") if temperature else "")
    finished = []
    result, order = _continuous(model, spec, cache, finished)
    # everyone joins while the first sequence still decodes, except under one_shot (one call: done
    # before anyone can join)
    assert len(order) == (1 if name == "one_shot" else len(PROMPTS))
    assert len(result.sequences) == len(order)
    for row, i in enumerate(order):
        alone = generate(model, [PROMPTS[i]], spec, gen_length=GEN, block_length=BLOCK, cache=cache, seed=SEEDS[i])
        got, want = result.sequences[row], alone.sequences[0]
        assert got.tokens == want.tokens, f"{name}: prompt {i} changed by joining the decode"
        assert got.nfe == want.nfe and got.rows == want.rows
    # each sequence was reported once, as soon as it left, with the same result as the end's
    assert sorted(r for r, _ in finished) == list(range(len(order)))
    for row, seq in finished:
        assert seq.tokens == result.sequences[row].tokens and seq.nfe == result.sequences[row].nfe


def test_joined_rows_really_overlapped(model):
    # not vacuous: the joiners took part in calls together with the first sequence
    finished = []
    result, order = _continuous(model, "low_confidence", "none", finished)
    assert order == [0, 1, 2, 3]
    first_left = [r for r, _ in finished].index(0)
    assert result.sequences[0].nfe == GEN  # one token per call: 16 calls, the last joiner came before call 6
    assert first_left < 3  # row 0 left before the later joiners were done


def test_the_oracle_refuses_joiners(model):
    policy = parse_strategy("oracle")
    cfg = DecodeConfig(gen_length=GEN, block_length=BLOCK).resolved(model.defaults)
    ids = encode_prompts(model, PROMPTS[:1])
    policy.prepare(model, ids, cfg)
    with pytest.raises(UnmaskError, match="cannot take sequences into a running decode"):
        Decoder(model, policy, cfg).run(ids, admit=lambda w, r: [])


def test_a_joiner_over_the_models_context_is_refused(model):
    cfg = DecodeConfig(gen_length=GEN, block_length=BLOCK).resolved(model.defaults)
    (short,) = encode_prompts(model, ["hi"])
    too_long = short * (model.max_length // len(short))
    with pytest.raises(UnmaskError, match="exceeds the model's context"):
        Decoder(model, parse_strategy("low_confidence"), cfg).run([short], admit=lambda w, r: [(too_long, 0)])


def test_grow_state_appends_rows_through_nested_structures():
    import torch

    a = {"x": torch.zeros(2, 3), "inner": {"h": torch.ones(2, 1)}, "pair": (torch.zeros(2), torch.ones(2))}
    b = {"x": torch.ones(1, 3), "inner": {"h": torch.zeros(1, 1)}, "pair": (torch.ones(1), torch.zeros(1))}
    g = grow_state(a, b)
    assert g["x"].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert g["inner"]["h"].tolist() == [[1], [1], [0]]
    assert g["pair"][0].tolist() == [0, 0, 1] and g["pair"][1].tolist() == [1, 1, 0]
    assert grow_state(None, None) is None
    with pytest.raises(TypeError):
        grow_state(3, 4)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_each_sequence_samples_at_its_own_temperature(model, name):
    # one decode, four temperatures (the first sequence's is the policy's own, 0): each sequence
    # decodes as it does alone with that temperature in its strategy
    temps = [0.0, 0.8, 0.5, 0.0]
    result, order = _continuous(model, SPEC[name], "none", [], temps)
    for row, i in enumerate(order):
        spec = SPEC[name] + (("," if ":" in SPEC[name] else ":") + f"temperature={temps[i]}" if temps[i] else "")
        alone = generate(model, [PROMPTS[i]], spec, gen_length=GEN, block_length=BLOCK, seed=SEEDS[i]).sequences[0]
        assert result.sequences[row].tokens == alone.tokens, (name, i, temps[i])


def test_temperatures_given_up_front_are_per_sequence(model):
    # the sampled sequence's tokens differ from greedy's (not vacuous), each matches its own decode
    cfg = DecodeConfig(gen_length=GEN, block_length=BLOCK).resolved(model.defaults)
    ids = encode_prompts(model, PROMPTS[:2])
    policy = parse_strategy("low_confidence")
    policy.prepare(model, ids, cfg)  # resolves the schedule (Dream's on the Dream model)
    result = Decoder(model, policy, cfg).run(ids, seeds=[5, 5], temperatures=[0.0, 1.5])
    greedy = generate(model, [PROMPTS[1]], "low_confidence", gen_length=GEN, block_length=BLOCK, seed=5).sequences[0]
    hot = generate(model, [PROMPTS[1]], "low_confidence:temperature=1.5", gen_length=GEN, block_length=BLOCK,
                   seed=5).sequences[0]
    assert result.sequences[1].tokens == hot.tokens != greedy.tokens
    with pytest.raises(UnmaskError, match="temperatures"):
        Decoder(model, parse_strategy("low_confidence"), cfg).run(ids, temperatures=[0.0])

"""A decode's memory follows its live sequences: slots are freed and reused, the canvas narrows when
the widest sequences leave, no per-sequence result is kept on request, and nothing grows with the
decode's history. Every continuous policy, with and without the cache; expected sizes worked by hand
from the growth rule (a full table grows by the larger of what is missing and its own size)."""

from __future__ import annotations

import pytest

from unmask.decoding import DecodeConfig, generate
from unmask.decoding.loop import Decoder, encode_prompts
from unmask.decoding.registry import parse_strategy
from unmask.testing import controller_strategies, write_tiny_controller

BLOCK = 8
PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?", "hi there",
           "sam has 3 cats", "x = 3 . print x"]
SEEDS = [11, 22, 33, 44, 55, 66]
TEMPS = [0.0, 0.8, 0.0, 0.5, 0.0, 1.1]
LENGTHS = [16, 24, 8, 16, 24, 8]
NAMES = ["ce", "entropy", "factor", "psd", "tspd", "learned_drafts", "low_confidence", "margin", "one_shot", "r2",
         "random", "threshold", "serve_default", "learned_drafts_chains"]
SPEC = {n: n for n in NAMES}
SPEC["threshold"] = "threshold:tau=0.3"


@pytest.fixture(scope="module", autouse=True)
def _controllers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c")
    SPEC.update(controller_strategies(folder))
    stability = write_tiny_controller(folder / "stability", seed=1, stability=True)
    # the server's fast default (FAST_DEFAULT) and learned_drafts' fewest-calls setting, on tiny controllers
    SPEC["serve_default"] = f"tspd:ce=true,stability=true,tau=0.5,controller={stability}"
    SPEC["learned_drafts_chains"] = (f"learned_drafts:tau=0.5,controller={stability},"
                                     "order=controller+position+confidence+least_confident,depth=5")


def _spec(name, t):
    spec = SPEC[name]
    return spec + ((("," if ":" in spec else ":") + f"temperature={t}") if t else "")


def _through_two_slots(model, spec, cache):
    """Six sequences through a decode that holds at most two: each joins as soon as a slot is free
    (with its own seed, temperature and gen_length). Returns the decoder, its result, the results
    handed to on_finish by sequence, and the most sequences that were live at once."""
    policy = parse_strategy(spec)
    cfg = DecodeConfig(gen_length=LENGTHS[0], block_length=BLOCK, cache=cache).resolved(model.defaults)
    ids = encode_prompts(model, PROMPTS)
    policy.prepare(model, ids[:1], cfg)
    finished, live = {}, {"n": 1, "most": 1}

    def admit(width, taken):
        if taken >= len(PROMPTS) or live["n"] >= 2:
            return []
        live["n"] += 1
        live["most"] = max(live["most"], live["n"])
        return [(ids[taken], SEEDS[taken], TEMPS[taken], LENGTHS[taken])]

    def on_finish(seq, result):
        finished[seq] = result
        live["n"] -= 1

    decoder = Decoder(model, policy, cfg)
    result = decoder.run([ids[0]], seeds=[SEEDS[0]], temperatures=[TEMPS[0]], admit=admit, on_finish=on_finish,
                         keep_results=False)
    return decoder, result, finished, live["most"]


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("name", NAMES)
def test_freed_slots_serve_later_sequences_as_if_each_were_alone(model, name, cache):
    decoder, result, finished, most = _through_two_slots(model, SPEC[name], cache)
    assert sorted(finished) == list(range(len(PROMPTS)))
    # by hand: one slot for the first sequence; a joiner that finds none free grows the table by
    # max(1 missing, 1 slot) = 1; never more than two are live, so two slots served all six. one_shot
    # decodes in one call, so each sequence has left before the next joins: one slot served all six
    slots = 1 if name == "one_shot" else 2
    assert most == slots and decoder.table.cap == slots
    if cache != "none":
        assert {k.shape[0] for k in decoder.table.cache.keys.values()} == {slots}
    assert result.sequences == []  # keep_results=False: the decode holds no result
    for seq, got in finished.items():
        want = generate(model, [PROMPTS[seq]], _spec(name, TEMPS[seq]), gen_length=LENGTHS[seq], block_length=BLOCK, cache=cache, seed=SEEDS[seq]).sequences[0]
        assert got.tokens == want.tokens, f"{name} {cache}: sequence {seq} changed by reusing a slot"
        assert (got.nfe, got.rows, got.decided, got.stopped_early) == (want.nfe, want.rows, want.decided,
                                                                       want.stopped_early)
        assert got.events == pytest.approx(want.events)


def test_the_canvas_narrows_when_the_widest_sequences_leave(llada):
    # prompt 2 is the longest (and its generation 8 the shortest); prompt 1's generation (24) the widest
    policy = parse_strategy("low_confidence")
    cfg = DecodeConfig(gen_length=16, block_length=BLOCK, early_stop=False).resolved(llada.defaults)
    ids = encode_prompts(llada, PROMPTS)
    widths = []
    decoder = Decoder(llada, policy, cfg, progress=lambda step: widths.append(
        (decoder.table.prompt_len, decoder.table.gen, decoder.table.canvas.shape[1])))

    def admit(width, taken):  # prompts 1 and 2 join at the second call
        return [(ids[i], SEEDS[i], 0.0, LENGTHS[i]) for i in (1, 2)] if taken == 1 else []

    result = decoder.run([ids[0]], seeds=[SEEDS[0]], admit=admit)
    longest = len(ids[2])
    assert longest > max(len(ids[0]), len(ids[1]))
    # low_confidence commits one position per call: prompt 2 (8 positions) leaves after its 8th call,
    # the decode's 9th; prompt 0 (16) after the decode's 16th; prompt 1 (24) after the 25th
    assert [s.nfe for s in result.sequences] == [16, 24, 8]
    assert widths[0] == (len(ids[0]), 16, len(ids[0]) + 16)
    assert widths[1] == (longest, 24, longest + 24)  # both joined: widened on both sides
    assert widths[8] == (max(len(ids[0]), len(ids[1])), 24, max(len(ids[0]), len(ids[1])) + 24)  # prompt 2 left
    assert widths[15] == (len(ids[1]), 24, len(ids[1]) + 24)  # prompt 0 left: prompt 1 alone
    assert len(widths) == 25


def test_the_redundancy_history_holds_one_block_of_calls(llada):
    # low_confidence, one commit per call: a block of 8 takes 8 calls, so the history (grown by
    # doubling from 1) holds 8 calls, whatever the number of blocks
    decoder = Decoder(llada, parse_strategy("low_confidence"),
                      DecodeConfig(gen_length=48, block_length=BLOCK, early_stop=False).resolved(llada.defaults))
    result = decoder.run(encode_prompts(llada, ["hello"]))
    assert result.sequences[0].nfe == 48
    assert decoder.table.hist.shape[1] == 8


def test_the_temporal_redundancy_is_settled_per_block_as_the_rule_counts_it(llada):
    # the rule, worked from the trace: (call, position) pairs of the current block still masked
    # after the call whose top-1 there already was the final token
    for spec in ("low_confidence", "threshold:tau=0.5", "psd:tau=0.5"):
        seq = generate(llada, ["what is 2 plus 3 ?"], spec, gen_length=24, block_length=BLOCK, record_trace=True,
                       early_stop=False).sequences[0]
        trace = seq.trace
        final = trace.final_tokens
        expected = 0
        for t in range(trace.steps):
            block = int(trace.block[t])
            for p in range(block * BLOCK, (block + 1) * BLOCK):
                if trace.tokens_after[t, p] == llada.mask_id and trace.top1[t, p] == final[p]:
                    expected += 1
        assert seq.events["temporal_redundant_steps"] == expected, spec

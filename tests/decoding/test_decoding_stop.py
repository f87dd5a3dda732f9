"""The stop rule and the accounting (docs/concepts.md: the stop rule; docs/measurements.md: NFE, rows,
TPF, useful tokens).

A scripted model fixes what every generation position predicts and how confident it is, so the
step at which each block completes, and whether the stop rule may fire, are known in advance.
"""

from __future__ import annotations

import pytest

from unmask.decoding import generate

GEN, BLOCK = 32, 8


def conf_of(g: int) -> float:
    """Distinct, unremarkable confidences (below 0.9), so low_confidence order is fixed."""
    return 0.55 + 0.03 * ((g * 5) % 8)


@pytest.fixture
def ids(scripted_tokenizer):
    tok = scripted_tokenizer
    return {
        "word": tok.token_id("apples"),
        "other": tok.token_id("pens"),
        "eos": tok.hf.eos_token_id,
        "eot": tok.token_id("<|eot_id|>"),
    }


def eos_after(j: int, word: int, stop: int, exceptions: dict[int, int] | None = None):
    exceptions = exceptions or {}

    def plan(prompt, gen_tokens, g):
        if g in exceptions:
            return exceptions[g], conf_of(g)
        return (word if g < j else stop), conf_of(g)

    return plan


PROMPT = [[20, 21, 22]]  # token ids: no chat template needed by the scripted model


@pytest.mark.parametrize("stop_name", ["eos", "eot"])
@pytest.mark.parametrize("strategy,block0_calls", [("low_confidence", 8), ("low_confidence:steps=16", 4), ("threshold", 8)])
def test_stops_after_the_block_with_the_committed_eos(scripted, ids, stop_name, strategy, block0_calls):
    stop, word = ids[stop_name], ids["word"]
    model = scripted(eos_after(5, word, stop), gen_length=GEN, block_length=BLOCK)
    seq = generate(model, PROMPT, strategy, record_trace=True).sequences[0]
    assert seq.stopped_early
    assert seq.nfe == block0_calls == seq.rows
    assert set(seq.trace.block.tolist()) == {0}
    # the rest of the canvas is filled with the predicted stop tokens
    assert seq.tokens == [word] * 5 + [stop] * (GEN - 5)
    assert model.mask_id not in seq.tokens
    assert (seq.trace.commit_step[BLOCK:] == -1).all()  # filled at stop, not committed by a step
    assert (seq.trace.commit_step[:BLOCK] >= 0).all()
    # answer: the text before the first EOS; useful tokens count only those
    assert seq.answer_ids == [word] * 5
    assert seq.useful_tokens == 5
    assert seq.text == model.tokenizer.decode([word] * 5) == "apples apples apples apples apples"
    assert seq.decided == GEN and seq.tpf == GEN / seq.nfe

    full = generate(model, PROMPT, strategy, early_stop=False).sequences[0]
    assert not full.stopped_early
    assert full.nfe == block0_calls * (GEN // BLOCK) > seq.nfe
    assert full.tokens == seq.tokens and full.text == seq.text and full.useful_tokens == 5


def test_no_stop_when_a_later_position_predicts_a_word(scripted, ids):
    word, eos = ids["word"], ids["eos"]
    model = scripted(eos_after(5, word, eos, {GEN - 1: ids["other"]}), gen_length=GEN, block_length=BLOCK)
    seq = generate(model, PROMPT, "low_confidence").sequences[0]
    assert not seq.stopped_early
    assert seq.nfe == GEN
    assert seq.tokens[-1] == ids["other"]
    # a word after the first EOS is never useful
    assert seq.answer_ids == [word] * 5 and seq.useful_tokens == 5


def test_stops_once_the_only_non_eos_prediction_is_committed(scripted, ids):
    word, eos = ids["word"], ids["eos"]
    model = scripted(eos_after(5, word, eos, {20: ids["other"]}), gen_length=GEN, block_length=BLOCK)
    seq = generate(model, PROMPT, "low_confidence", record_trace=True).sequences[0]
    assert seq.stopped_early
    assert seq.nfe == 3 * BLOCK  # blocks 0, 1, 2 (which holds position 20), then stop
    assert seq.trace.block.max() == 2
    assert seq.tokens[20] == ids["other"] and seq.tokens[24:] == [eos] * 8
    assert seq.useful_tokens == 5


def test_eos_only_predicted_is_not_enough(scripted, ids):
    """Block 0 commits no EOS, so predicted EOS after it does not stop the decode until block 1 commits one."""
    word, eos = ids["word"], ids["eos"]
    model = scripted(eos_after(BLOCK, word, eos), gen_length=GEN, block_length=BLOCK)
    seq = generate(model, PROMPT, "low_confidence", record_trace=True).sequences[0]
    assert seq.stopped_early
    assert seq.nfe == 2 * BLOCK
    assert seq.useful_tokens == BLOCK


def test_no_stop_on_the_last_block_and_first_eos_cuts(scripted, ids):
    """EOS only in the last block: the decode simply ends; the answer is cut at the first EOS."""
    word, eos = ids["word"], ids["eos"]
    model = scripted(eos_after(GEN - 3, word, eos), gen_length=GEN, block_length=BLOCK)
    seq = generate(model, PROMPT, "low_confidence").sequences[0]
    assert not seq.stopped_early and seq.nfe == GEN
    assert seq.useful_tokens == GEN - 3


# ---------------------------------------------------------------------------------------------
# accounting in a batch whose sequences finish at different steps (9)


class BatchSizes:
    def __init__(self, model):
        self.model, self.sizes = model, []

    def __enter__(self):
        net = self.model.network
        original = net.forward

        def counted(input_ids, *args, **kwargs):
            self.sizes.append(int(input_ids.shape[0]))
            return original(input_ids, *args, **kwargs)

        net.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.network.forward
        return False


def test_per_sequence_nfe_in_a_batch_scripted(scripted, ids):
    word, eos = ids["word"], ids["eos"]
    fast, slow, stop = [20], [21, 21], [22, 22, 22]

    def plan(prompt, gen_tokens, g):
        if prompt == tuple(fast):  # everything confident: one call per block
            return word, 0.95
        if prompt == tuple(stop):  # confident EOS after position 2: one call, then stop
            return (word if g < 3 else eos), 0.95
        return word, conf_of(g) - 0.2  # nothing reaches tau: one token per call

    model = scripted(plan, gen_length=GEN, block_length=BLOCK)
    prompts = [fast, slow, stop]
    expected = [GEN // BLOCK, GEN, 1]
    with BatchSizes(model) as calls:
        batch = generate(model, prompts, "threshold:tau=0.9")
    for seq, want in zip(batch.sequences, expected):
        assert seq.nfe == want
        assert seq.rows == seq.nfe
        assert seq.decided == GEN
        assert seq.tpf == seq.decided / seq.nfe
        assert 0 < seq.latency_s <= batch.wall_s
    assert batch.sequences[2].stopped_early and batch.sequences[2].useful_tokens == 3
    # finished sequences leave the batch: calls = the longest sequence, rows = the sum
    assert len(calls.sizes) == max(expected)
    assert sum(calls.sizes) == sum(s.rows for s in batch.sequences)
    for prompt, seq in zip(prompts, batch.sequences):
        alone = generate(model, [prompt], "threshold:tau=0.9").sequences[0]
        assert (alone.nfe, alone.rows, alone.tokens, alone.stopped_early) == (seq.nfe, seq.rows, seq.tokens, seq.stopped_early)


@pytest.mark.parametrize("strategy", ["threshold:tau=0.3", "factor:factor=2", "oracle"])
def test_per_sequence_nfe_in_a_batch_real_models(model, strategy):
    prompts = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]
    with BatchSizes(model) as calls:
        batch = generate(model, prompts, strategy, gen_length=32, block_length=8)
    nfes = [s.nfe for s in batch.sequences]
    alone = [generate(model, [p], strategy, gen_length=32, block_length=8).sequences[0].nfe for p in prompts]
    assert nfes == alone
    for seq in batch.sequences:
        assert seq.rows == seq.nfe and seq.decided == 32 and seq.tpf == 32 / seq.nfe
    if strategy != "oracle":  # the oracle's reference decode also calls the network
        assert len(calls.sizes) == max(nfes)
        assert sum(calls.sizes) == sum(nfes)
    if strategy.startswith("threshold"):
        assert len(set(nfes)) > 1  # the sequences really finished at different steps

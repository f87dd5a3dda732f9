"""PSD on hand-made logits: hierarchical acceptance, rows per call, no extra calls for drafts."""

import torch

from unmask.decoding import generate, parse_strategy
from unmask.testing import DRAFT_CONFIDENCES, DRAFT_WORDS, drafting_model, peaked, scripted_model, tiny_tokenizer

TOK = tiny_tokenizer()
V = len(TOK.hf)
MASK = TOK.hf.convert_tokens_to_ids("<|mdm_mask|>")
GEN = 8
TARGET = [TOK.token_id(w) for w in DRAFT_WORDS]
CONF = list(DRAFT_CONFIDENCES)
WRONG = TOK.token_id("dogs")


def _model(break_depth2: bool = False):
    # position 3 (group G2) changes its mind once G1 (positions 1, 2) is filled
    return drafting_model(break_at=(3, 1) if break_depth2 else None)


PSD = "psd:tau=0.9,group=2,depth=3"


def test_consistent_drafts_are_accepted_whole_and_the_verification_advances_the_decode():
    model = _model()
    result = generate(model, ["hello"], parse_strategy(PSD), record_trace=True)
    seq = result.sequences[0]
    # call 1: plain forward; commits position 0, drafts G1={1,2}, G2={3,4}, G3={5,6}
    # call 2: verifies x0..x3 (4 rows), accepts depth 3; its logits serve the next step, which
    # commits position 7 with no further call
    assert model.network.calls == [1, 4]
    assert seq.nfe == 2 and seq.rows == 5
    assert seq.tokens == TARGET
    assert seq.events["draft_depth_accepted"] == 3 and seq.events["draft_tokens_accepted"] == 6
    assert seq.trace.tokens_after[0].tolist() == TARGET[:7] + [MASK]


def test_a_draft_inconsistent_at_depth_2_keeps_depth_1_exactly():
    model = _model(break_depth2=True)
    result = generate(model, ["hello"], parse_strategy(PSD), record_trace=True)
    seq = result.sequences[0]
    after_first_verification = seq.trace.tokens_after[0].tolist()
    assert after_first_verification == TARGET[:3] + [MASK] * 5  # x(1): position 0 plus G1, nothing of G2/G3
    assert seq.events["draft_tokens_accepted"] >= 2
    assert seq.tokens[3] == WRONG  # the rejected draft token was never committed; the model's later word stands


def test_accept_tau_rejects_a_draft_confirmed_only_at_low_probability():
    # the same consistent drafts as above, but G1's confirming predictions have probability 0.5 and
    # 0.45: argmax agreement alone accepts them, accept_tau=0.6 does not, and nothing deeper either
    model = _model()
    result = generate(model, ["hello"], parse_strategy(PSD + ",accept_tau=0.6"), record_trace=True)
    seq = result.sequences[0]
    assert seq.trace.tokens_after[0].tolist() == TARGET[:1] + [MASK] * 7
    assert seq.tokens == TARGET  # still decodes, just without the weakly confirmed drafts
    loose = generate(_model(), ["hello"], parse_strategy(PSD + ",accept_tau=0.2")).sequences[0]
    assert loose.nfe == 2  # every confirmation (0.25 or more) clears 0.2: accepted whole, as with argmax only


def test_rows_per_call_equal_the_drafts_built_and_no_call_builds_drafts():
    model = _model()
    result = generate(model, ["hello"], parse_strategy("psd:tau=0.9,group=1,depth=2,adaptive_depth=false"))
    seq = result.sequences[0]
    calls = model.network.calls
    assert len(calls) == seq.nfe  # one network call per NFE: drafting costs no call
    assert sum(calls) == seq.rows
    # a plain forward; then per step x0 plus the drafts built: two while >= 2 positions remain to
    # draft, one when a single position is left (positions 0..7: 1 forced, 2 drafted, 1, 2, 1, 1)
    assert calls == [1, 3, 3, 2]
    assert seq.events["drafts_built"] == sum(calls) - len(calls)
    assert seq.tokens == TARGET


def test_psd_is_batch_invariant_and_counts_per_sequence():
    from unmask.testing import tiny_llada

    model = tiny_llada(gen_length=16, block_length=8)
    prompts = ["hello world", "what is 3 plus 4 ?", "tom has 5 apples"]
    batch = generate(model, prompts, "psd:tau=0.3")
    for prompt, seq in zip(prompts, batch.sequences):
        alone = generate(model, [prompt], "psd:tau=0.3").sequences[0]
        assert (alone.tokens, alone.nfe, alone.rows) == (seq.tokens, seq.nfe, seq.rows)



def test_the_default_groups_are_the_threshold_rules_simulated_next_step():
    # psd at its defaults (threshold 0.9, depth 3, the paper's setting). Every remaining position
    # is below 0.9, so the threshold rule's simulated next step is its forced single most
    # confident position: groups of one.
    # call 1: plain forward, commits position 0 (0.95); drafts G1={1}, G2={2}, G3={3}
    # call 2: verifies x0..x3 (4 rows), all consistent: depth 3. Its logits serve the next step:
    #         commits 4 (forced), drafts {5}, {6}, {7}
    # call 3: verifies 4 rows, depth 3: the block is full
    model = _model()
    seq = generate(model, ["hello"], parse_strategy("psd"), record_trace=True).sequences[0]
    assert model.network.calls == [1, 4, 4]
    assert seq.nfe == 3 and seq.rows == 9
    assert seq.tokens == TARGET
    assert seq.trace.tokens_after[0].tolist() == TARGET[:4] + [MASK] * 4


def test_group_by_rate_drafts_as_many_per_group_as_the_rule_committed():
    # two positions clear 0.9 on the first call (0.95, 0.93): group_by_rate makes groups of 2
    conf = [0.95, 0.93, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25]

    def rule(row, gen_start):
        probs = torch.full((row.shape[0], V), 1.0 / V)
        probs[gen_start:] = peaked(TARGET, conf, V)
        return probs

    model = scripted_model(rule, gen_length=GEN, block_length=GEN, tokenizer=TOK)
    seq = generate(model, ["hello"], parse_strategy("psd:group_by_rate=true"), record_trace=True).sequences[0]
    # call 1 commits 0, 1 and drafts G1={2,3}, G2={4,5}, G3={6,7}; call 2 accepts all of them
    assert model.network.calls == [1, 4]
    assert seq.trace.tokens_after[0].tolist() == TARGET

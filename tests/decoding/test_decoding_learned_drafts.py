"""learned_drafts: the united commit rule, drafts in controller order, verification, worked by hand."""

import pytest
import torch

from unmask.decoding import generate
from unmask.decoding.features import FEATURE_GROUPS
from unmask.decoding.policies.learned_drafts import LearnedDrafts, LearnedDraftsConfig
from unmask.decoding.policies.tspd import TSPD, TSPDConfig
from unmask.errors import UnmaskError
from unmask.testing import DRAFT_WORDS, drafting_model, make_view, peaked, tiny_tokenizer

TOK = tiny_tokenizer()
MASK = TOK.hf.convert_tokens_to_ids("<|mdm_mask|>")
TARGET = [TOK.token_id(w) for w in DRAFT_WORDS]
WRONG = TOK.token_id("dogs")


class StubController:
    """P(final) read from a fixed table (block,), the same for every row and call.

    It claims every feature group, as learned_drafts' controller (stability included) reads them.
    """

    groups = tuple(FEATURE_GROUPS)
    window = 1

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def probability(self, windows):
        return self.table.expand(windows.shape[0], -1)


def _policy(table, **config):
    return LearnedDrafts(LearnedDraftsConfig(**config), controller=StubController(table))


def _decide(policy, conf, masked):
    view = make_view(peaked([2, 3, 4, 5, 6], conf, 12), masked=masked)
    state = policy.init_state(1, 5, torch.device("cpu"))
    decision = policy.decide(view, state)
    decision.view_tokens = view.tokens[0]
    return decision


def _drafted(decision, view_tokens):
    """The positions each level adds to the committed block, level by level."""
    d = decision.drafts[0]
    prev = torch.where(decision.commit[0], torch.tensor([2, 3, 4, 5, 6]), view_tokens)
    out = []
    for k in range(d.shape[0]):
        out.append((d[k] != prev).nonzero().squeeze(1).tolist())
        prev = d[k]
    return out


CONF5 = [0.95, 0.3, 0.5, 0.45, 0.4]
TABLE5 = [0.2, 0.3, 0.8, 0.1, 0.6]


def test_commits_what_the_controller_or_the_confidence_trusts():
    # position 0: confidence 0.95 >= 0.9; position 2: P 0.8 > tau 0.7; position 4: P 0.6, not > 0.7
    decision = _decide(_policy(TABLE5, tau=0.7, depth=0), CONF5, [[True] * 5])
    assert decision.commit[0].tolist() == [True, False, True, False, False]
    assert decision.drafts is None  # depth 0: no drafts


def test_with_nothing_trusted_the_most_probable_by_the_controller_is_committed():
    # nothing reaches P > 0.9 or confidence >= 0.96: the highest P(final), position 2 (0.8), goes,
    # not the most confident (position 0)
    decision = _decide(_policy(TABLE5, conf_tau=0.96, depth=0), CONF5, [[True] * 5])
    assert decision.commit[0].tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("order, levels", [
    # after committing position 0 (0.95), the rest ranked by P(final) 0.8 (2), 0.6 (4), 0.3 (1), 0.1 (3)
    ("controller", [[2], [4], [1]]),
    # by confidence 0.5 (2), 0.45 (3), 0.4 (4), 0.3 (1): PSD's order
    ("confidence", [[2], [3], [4]]),
    # left to right
    ("position", [[1], [2], [3]]),
])
def test_drafts_one_position_per_level_in_the_chosen_order(order, levels):
    decision = _decide(_policy(TABLE5, order=order), CONF5, [[True] * 5])
    assert decision.commit[0].tolist() == [True, False, False, False, False]
    assert _drafted(decision, decision.view_tokens) == levels
    # every level holds the committed block plus the drafted positions' top-1 (tokens 2..6 here)
    assert decision.drafts[0, -1].tolist() == [2 if p == 0 else (p + 2 if [p] in levels else 0) for p in range(5)]


def test_a_block_with_fewer_masked_positions_than_the_depth_drafts_them_all():
    decision = _decide(_policy(TABLE5), CONF5, [[False, True, False, True, False]])
    # masked: 1 (P 0.3, conf 0.3), 3 (P 0.1): nothing trusted, 1 is forced; 3 is the only draft
    assert decision.commit[0].tolist() == [False, True, False, False, False]
    assert _drafted(decision, decision.view_tokens) == [[3]]


def _model(break_at=None):
    """Predicts TARGET with CONF everywhere; with `break_at=(p, q)`, position p predicts WRONG while
    position q is filled and p still masked."""
    return drafting_model(break_at=break_at)


RISING = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # P(final) favours the right end of the block


def test_a_decode_drafts_in_controller_order_and_verifies_in_the_same_call():
    # call 1: plain forward; commits 0 (0.95); nothing else is trusted (P <= 0.9, conf < 0.9);
    #         drafts by P(final): {7}, {7, 6}, {7, 6, 5}
    # call 2: scores x0 and the 3 drafts (4 rows); every level is confirmed: depth 3. Its logits are
    #         the next step: 1..4 left, none trusted, the most probable (4, P 0.5) is committed;
    #         drafts {3}, {3, 2}, {3, 2, 1}
    # call 3: 4 rows, depth 3: the block is full
    model = _model()
    policy = _policy(RISING)
    seq = generate(model, ["hello"], policy, record_trace=True).sequences[0]
    assert model.network.calls == [1, 4, 4]
    assert (seq.nfe, seq.rows) == (3, 9)
    assert seq.tokens == TARGET
    assert seq.trace.tokens_after[0].tolist() == TARGET[:1] + [MASK] * 4 + TARGET[5:]
    assert seq.events["draft_tokens_accepted"] == 6


def test_a_level_the_model_does_not_confirm_is_never_committed():
    # position 6 predicts WRONG once 7 is filled: level 2 (adding 6 = 'has') is not confirmed by the
    # call on level 1, so call 2 keeps depth 1: 0 and 7 only. 6 is then decided from level 1's logits
    # (where it says WRONG), never as the rejected draft
    model = _model(break_at=(6, 7))
    seq = generate(model, ["hello"], _policy(RISING), record_trace=True).sequences[0]
    assert seq.trace.tokens_after[0].tolist() == TARGET[:1] + [MASK] * 6 + TARGET[7:]
    assert seq.tokens[6] == WRONG
    assert seq.events["draft_depth_accepted"] >= 1


def test_bad_settings_are_refused_with_the_field_named():
    for bad in ({"order": "random"}, {"depth": 17}, {"conf_tau": 0.0}, {"ce": True}):
        with pytest.raises(UnmaskError) as err:
            LearnedDraftsConfig(**bad).validate()
        assert err.value.field == next(iter(bad))


def test_without_a_controller_it_says_how_to_get_one(tmp_path):
    from unmask.testing import tiny_llada

    model = tiny_llada(gen_length=8, block_length=8)
    model.path = str(tmp_path)
    reason = LearnedDrafts().unavailable(model)
    assert "no TSPD controller" in reason and "unmask train controller" in reason


@pytest.mark.parametrize("make", [
    lambda: _policy(RISING, depth=0),
    lambda: TSPD(TSPDConfig(conf_tau=0.9, stability=True), controller=StubController(RISING)),
], ids=["learned_drafts:depth=0", "tspd:conf_tau=0.9,stability=true"])
def test_depth_0_is_tspd_with_the_threshold_rule_beside_the_controller(make):
    # no drafts, so one row per call. Call 1: position 0 (confidence 0.95 >= 0.9) only, P(final)
    # is at most 0.8 < tau 0.9 and no other confidence reaches 0.9. Each later call trusts nothing
    # and commits the highest P(final) left: 7, 6, 5, 4, 3, 2, 1. So 8 calls, each adding the
    # position named here, and the target sentence
    model = _model()
    seq = generate(model, ["hello"], make(), record_trace=True).sequences[0]
    assert (seq.nfe, seq.rows) == (8, 8)
    assert model.network.calls == [1] * 8
    assert seq.tokens == TARGET
    added, before = [], set()
    for after in seq.trace.tokens_after:
        decided = {p for p, t in enumerate(after.tolist()) if t != MASK}
        added.append(sorted(decided - before))
        before = decided
    assert added == [[0], [7], [6], [5], [4], [3], [2], [1]]


# --- several draft orders: one chain each, the deepest confirmed kept ------------------------------

def test_several_orders_lay_one_chain_each_end_to_end():
    # committed: position 0 (0.95). Chain 1, controller order: 2, 4, 1 (P 0.8, 0.6, 0.3); chain 2,
    # left to right: 1, 2, 3. Each chain starts again from the committed block
    decision = _decide(_policy(TABLE5, order="controller+position"), CONF5, [[True] * 5])
    d = decision.drafts[0]
    assert d.shape[0] == 6
    committed = torch.tensor([2, 0, 0, 0, 0])  # position 0 committed (its top-1 is token 2), the rest masked
    drafted = [(level != committed).nonzero().squeeze(1).tolist() for level in d]
    assert drafted == [[2], [2, 4], [1, 2, 4], [1], [1, 2], [1, 2, 3]]


def test_a_row_with_fewer_positions_than_the_depth_drafts_one_chain_only():
    # two rows: the first leaves 4 positions to draft (chains of 3 levels), the second, masked at
    # 1 and 3, commits 1 (forced: nothing trusted, highest P) and leaves only 3: it drafts {3} once,
    # and every later canvas of its repeats that draft (no new canvas for the loop to forward)
    policy = _policy(TABLE5, order="controller+position")
    probs = torch.stack([peaked([2, 3, 4, 5, 6], CONF5, 12)] * 2)
    view = make_view(probs, masked=[[True] * 5, [False, True, False, True, False]])
    decision = policy.decide(view, policy.init_state(2, 5, torch.device("cpu")))
    assert decision.commit[1].tolist() == [False, True, False, False, False]
    committed = torch.where(decision.commit[1], torch.tensor([2, 3, 4, 5, 6]), view.tokens[1])
    short = torch.cat([committed[None], decision.drafts[1]])
    new = (short[1:] != short[:-1]).any(-1).tolist()
    assert new == [True, False, False, False, False, False]
    assert (short[1] != short[0]).nonzero().squeeze(1).tolist() == [3]


def _candidates(levels_per_chain, committed):
    """(1, 1 + C x K, 4) canvases: `committed`, then each chain's levels given as {position: token}."""
    out = [list(committed)]
    for chain in levels_per_chain:
        canvas = list(committed)
        for level in chain:
            for p, t in level.items():
                canvas[p] = t
            out.append(list(canvas))
    return torch.tensor([out])


M = 9  # the mask in the hand-made canvases below


def _top1(predictions):
    """(1, canvases, 4) top-1 per canvas from {canvas index: {position: token}}; unlisted: 7."""
    return torch.tensor([[[predictions.get(i, {}).get(p, 7) for p in range(4)] for i in range(5)]])


@pytest.mark.parametrize("predicted, chosen, kept_beyond_first", [
    # chain 1 adds 3 then 2; chain 2 adds 1 then 2. On the committed block (canvas 0) position 3
    # predicts 8, not the drafted 5: chain 1 is confirmed to depth 0. Position 1 predicts the drafted
    # 6 there, and on chain 2's first draft (canvas 3) position 2 predicts the drafted 4: depth 2,
    # the deepest, so canvas 1 x 2 + 2 = 4
    ({0: {3: 8, 1: 6}, 3: {2: 4}}, 4, 1.0),
    # both chains confirmed to depth 1 (canvas 1 does not confirm 2, nor canvas 3): the earlier
    # chain's, canvas 1
    ({0: {3: 5, 1: 6}, 1: {2: 8}, 3: {2: 8}}, 1, 0.0),
    # chain 1 confirmed to depth 2 (3 on canvas 0, then 2 on canvas 1), chain 2 to 1: canvas 2
    ({0: {3: 5, 1: 6}, 1: {2: 4}, 3: {2: 8}}, 2, 0.0),
])
def test_the_deepest_confirmed_chain_is_kept(predicted, chosen, kept_beyond_first):
    from unmask.decoding.policies.learned_drafts import deepest_chain

    cands = _candidates([[{3: 5}, {2: 4}], [{1: 6}, {2: 4}]], [1, M, M, M])
    index, events = deepest_chain(cands, _top1(predicted), torch.ones(cands.shape), depth=2)
    assert index.tolist() == [chosen]
    assert events["chain_kept_beyond_first"].tolist() == [kept_beyond_first]


def test_a_later_chain_that_repeats_the_first_chains_draft_confirms_nothing():
    from unmask.decoding.policies.learned_drafts import deepest_chain

    # one position left to draft: the first chain adds 3 (level 1, then a repeat), the second chain
    # repeats that draft. Canvas 0 confirms 3, so the first chain keeps depth 1 (canvas 1); the
    # second chain's canvases, though their tokens all agree, are not a chain of one position per level
    cands = _candidates([[{3: 5}, {}], [{3: 5}, {}]], [1, 2, 3, M])
    index, _ = deepest_chain(cands, _top1({0: {3: 5}}), torch.ones(cands.shape), depth=2)
    assert index.tolist() == [1]


def test_a_decode_keeps_the_chain_the_model_confirms_deepest():
    # position 6 predicts WRONG once 7 is filled while 6 is masked.
    # call 1: plain forward; commits 0 (0.95); drafts: controller order {7}, {7,6}, {7,6,5};
    #         left to right {1}, {1,2}, {1,2,3}
    # call 2: scores x0 and 6 drafts (7 rows). Controller chain: 7 confirmed, then 6 is not (the
    #         canvas with 7 filled says WRONG): depth 1. Left to right: 1, 2, 3 all confirmed: depth 3,
    #         kept. Its logits (7 still masked) are the next step: 4..7 left, none trusted, the most
    #         probable by P (7, 0.8) is committed; 4, 5, 6 are drafted: {6}, {6,5}, {6,5,4} and {4},
    #         {4,5}, {4,5,6}
    # call 3: 7 rows. Controller chain: 6 is not confirmed (7 is filled): depth 0. Left to right:
    #         4, 5 confirmed, 6 not: depth 2, kept. Its logits say WRONG at 6, the last masked
    #         position, which the next step commits (forced) without drafting: no further call
    model = _model(break_at=(6, 7))
    seq = generate(model, ["hello"], _policy(RISING, order="controller+position"), record_trace=True).sequences[0]
    assert model.network.calls == [1, 7, 7]
    assert (seq.nfe, seq.rows) == (3, 15)
    assert seq.trace.tokens_after[0].tolist() == TARGET[:4] + [MASK] * 4
    assert seq.trace.tokens_after[1].tolist() == TARGET[:6] + [MASK] + TARGET[7:]
    assert seq.tokens == TARGET[:6] + [WRONG] + TARGET[7:]
    assert seq.events["draft_tokens_accepted"] == 5
    assert seq.events["chain_kept_beyond_first"] == 2


@pytest.mark.parametrize("order, depth", [("controller+controller", 3), ("controller+random", 3),
                                          ("controller+", 3), ("+", 3), ("", 3), (None, 3),
                                          ("controller+position", 1)])
def test_bad_order_lists_are_refused(order, depth):
    with pytest.raises(UnmaskError) as err:
        LearnedDraftsConfig(order=order, depth=depth).validate()
    assert err.value.field == ("depth" if depth == 1 else "order")


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_several_chains_decode_padded_batches_as_each_prompt_alone(cache, tmp_path):
    from unmask.testing import tiny_llada, write_tiny_controller

    model = tiny_llada(gen_length=16, block_length=8)
    folder = write_tiny_controller(tmp_path / "controller-stability", stability=True)
    spec = f"learned_drafts:tau=0.5,order=controller+position+least_confident,controller={folder}"
    prompts = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?"]
    batch = generate(model, prompts, spec, cache=cache)
    for prompt, seq in zip(prompts, batch.sequences):
        assert model.mask_id not in seq.tokens
        alone = generate(model, [prompt], spec, cache=cache).sequences[0]
        assert (alone.tokens, alone.nfe, alone.rows) == (seq.tokens, seq.nfe, seq.rows), prompt

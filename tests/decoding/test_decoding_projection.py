"""What a step projects to the vocabulary: the current block of each canvas, and the positions the stop
rule reads only when it reads them; statistics a chunk at a time; a verification's accepted canvas
reused as the next step's call. Counts worked by hand from the rules; predictions checked against
the model called directly on the canvas, never against the loop's own output."""

from __future__ import annotations

import pytest
import torch

from unmask.decoding import generate, parse_strategy
from unmask.decoding import stats as stats_module
from unmask.decoding.sampling import gumbel_candidates
from unmask.testing import tiny_dream, tiny_llada


class HeadSpy:
    """Counts the positions `network.head` projects in each call (and the largest call)."""

    def __init__(self, model):
        self.network = model.network
        self.sizes: list[int] = []

    def __enter__(self):
        original = self.network.head

        def head(hidden):
            self.sizes.append(int(hidden.reshape(-1, hidden.shape[-1]).shape[0]))
            return original(hidden)

        self.network.head = head
        return self

    def __exit__(self, *exc):
        del self.network.head
        return False


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_only_the_current_block_is_projected(make, cache):
    # low_confidence, one commit per call, gen 16 in blocks of 8, no stop rule: 16 calls, and each
    # projects its block of 8 for each of the 2 sequences: 16 projections of 16 positions, whatever
    # the cache computes (the other positions are kept as hidden states, never projected)
    model = make(gen_length=16, block_length=8)
    with HeadSpy(model) as spy:
        result = generate(model, ["hello", "what is 3 plus 4 ?"], "low_confidence", cache=cache, early_stop=False)
    assert [s.nfe for s in result.sequences] == [16, 16]
    assert spy.sizes == [16] * 16


def test_the_stop_rule_projects_the_later_positions_only_when_it_reads_them():
    # a head that predicts EOS everywhere with certainty: the first call commits block 1 (8 EOS)
    # under threshold, the stop rule reads positions 8..23 (16 projected) and fires; one call in all
    model = tiny_llada(gen_length=24, block_length=8)
    sizes = []

    def head(hidden):
        sizes.append(int(hidden.reshape(-1, hidden.shape[-1]).shape[0]))
        logits = torch.zeros(hidden.shape[:-1] + (model.vocab_size,))
        logits[..., model.eos_id] = 50.0
        return logits

    model.network.head = head
    seq = generate(model, ["hello"], "threshold").sequences[0]
    assert seq.nfe == 1 and seq.stopped_early and seq.tokens == [model.eos_id] * 24
    assert sizes == [8, 16]
    # without the stop rule the later blocks are never read at that call: 8 per call, 3 calls
    sizes.clear()
    seq = generate(model, ["hello"], "threshold", early_stop=False).sequences[0]
    assert seq.nfe == 3 and sizes == [8, 8, 8]


@pytest.mark.parametrize("spec", ["low_confidence", "threshold:tau=0.5", "psd:tau=0.5,depth=3",
                                  "low_confidence:temperature=0.8", "r2:tau=0.5"])
def test_statistics_in_small_chunks_decode_the_same(monkeypatch, spec):
    # a budget of 3 vocabularies (96 tokens each): every projection of statistics holds at most 3
    # positions' logits at once, and the decode is unchanged
    model = tiny_llada(gen_length=16, block_length=8)
    prompts = ["hello", "what is 3 plus 4 ?", "tom has 5 apples"]
    whole = generate(model, prompts, spec, record_trace=True, seed=4)
    monkeypatch.setattr(stats_module, "LOGITS_BUDGET", 3 * model.vocab_size)
    chunked = generate(model, prompts, spec, record_trace=True, seed=4)
    for a, b in zip(whole.sequences, chunked.sequences):
        assert a.tokens == b.tokens and a.nfe == b.nfe and a.rows == b.rows
        torch.testing.assert_close(torch.as_tensor(a.trace.confidence), torch.as_tensor(b.trace.confidence))
    assert stats_module.chunk_rows(10, model.vocab_size) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_step_after_a_verification_reads_the_accepted_canvas(cache):
    # PSD's next step reuses the verification's accepted canvas instead of calling the model: its
    # view must hold what the model says on that canvas at the step's block, including the first
    # step of a new block (the model is called here, directly, on the canvas the step saw)
    model = tiny_llada(gen_length=24, block_length=8)
    psd = type(parse_strategy("psd"))

    class Spy(psd):
        seen: list = []

        def decide(self, view, state):
            self.seen.append((view.tokens.clone(), view.positions.clone(), view.logits.clone(), int(view.block_step[0])))
            return super().decide(view, state)

    spy = Spy(parse_strategy("psd:tau=0.5").config)
    prompt = ["what is 3 plus 4 ?"]
    seq = generate(model, prompt, spy, cache=cache, early_stop=False, record_trace=True).sequences[0]
    from unmask.decoding.loop import encode_prompts
    ids = encode_prompts(model, prompt)[0]
    # drafts were verified, and a later block started (its first step right after a verification)
    assert seq.events["drafts_built"] > 0 and any(block_step == 0 for *_, block_step in Spy.seen[1:])
    trace = seq.trace
    for t, (tokens, positions, logits, block_step) in enumerate(Spy.seen):
        canvas = trace.tokens_after[t - 1].tolist() if t else [model.mask_id] * 24
        assert tokens[0].tolist() == [canvas[p] for p in positions[0].tolist()]
        if cache == "none":  # the uncached call: the model on the whole canvas
            with torch.no_grad():
                want = model.logits(torch.tensor([ids + canvas]))[0, len(ids):].float()
            want[:, model.mask_id] = float("-inf")
            torch.testing.assert_close(logits[0], want[positions[0]], atol=1e-4, rtol=1e-4)
    Spy.seen = []


def test_sampling_draws_each_rows_block_times_vocabulary_from_its_own_generator():
    # rule: row j draws widths[j] x V uniforms from its generator, in one call, and none for the rest
    logits = torch.randn(2, 4, 5)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    gumbel_candidates(logits, [0.7, 1.3], gens, widths=[4, 2])
    for seed, width, g in [(1, 4, gens[0]), (2, 2, gens[1])]:
        fresh = torch.Generator().manual_seed(seed)
        torch.rand((width, 5), generator=fresh, dtype=torch.float64)
        assert torch.equal(g.get_state(), fresh.get_state())
    # by hand: with noise drawn as u, the candidate is argmax(logits / T - log(-log u))
    g = torch.Generator().manual_seed(7)
    u = torch.rand((4, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = (logits[0].double() / 0.7 - torch.log(-torch.log(u))).argmax(-1)
    assert torch.equal(gumbel_candidates(logits[:1], [0.7], [g])[0], want)

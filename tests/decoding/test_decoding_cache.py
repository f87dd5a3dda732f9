"""The KV cache: refreshed at every block start, never stale across blocks, batch-invariant."""

import numpy as np
import pytest
import torch

from unmask.decoding import generate, policy_names
from unmask.decoding.loop import encode_prompts, token_stats
from unmask.errors import UnmaskError
from unmask.models.cache import KVCache
from unmask.testing import controller_strategies, tiny_dream, tiny_llada

PROMPTS = ["hello world", "what is 3 plus 4 ?", "tom has 5 apples"]


def _dual_mismatch(model, prompt):
    """Largest gap between what a dual-cached decode saw and the dual cache done by hand.

    For every call, the reference refreshes a new cache on the canvas as it was at the start of
    that call's block, then computes the block's positions on the canvas as it is now. A decode
    that let a block read keys older than its own start (a stale position) disagrees.
    """
    result = generate(model, [prompt], "low_confidence", cache="dual", record_trace=True, early_stop=False)
    trace = result.sequences[0].trace
    ids = encode_prompts(model, [prompt])[0]
    block_len = model.defaults.block_length
    mask_row = [model.mask_id] * trace.tokens_after.shape[1]
    worst, block_start_canvas = 0.0, None
    for step in range(trace.steps):
        before = trace.tokens_after[step - 1].tolist() if step else mask_row
        if step == 0 or trace.block[step] != trace.block[step - 1]:
            block_start_canvas = before
        canvas_fill = torch.tensor([ids + block_start_canvas])
        canvas_now = torch.tensor([ids + before])
        cache = KVCache(1, torch.ones_like(canvas_fill, dtype=torch.bool))
        positions = torch.arange(canvas_fill.shape[1])[None]
        with torch.no_grad():
            model.logits(canvas_fill, cache=cache.fill(torch.tensor([0])))
            query = len(ids) + int(trace.block[step]) * block_len + torch.arange(block_len)[None]
            logits = model.logits_at(canvas_now, positions, query, cache).float()
        logits[..., model.mask_id] = float("-inf")
        exact = token_stats(logits)["top1_prob"][0].numpy()
        seen = trace.confidence[step][query[0].numpy() - len(ids)]
        worst = max(worst, float(np.abs(exact - seen).max()))
    return worst


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
def test_no_block_reads_keys_older_than_its_own_start(make):
    model = make(gen_length=32, block_length=8)
    assert _dual_mismatch(model, PROMPTS[1]) < 1e-4


def test_the_check_catches_a_cache_that_is_not_refreshed(monkeypatch):
    """Plant the bug (a fill that stores only once) and the same check must fail."""
    model = tiny_llada(gen_length=32, block_length=8)
    real_update = KVCache.update

    def stale_update(self, layer, k, v, key_mask):
        if self.query_pos is None and layer in self.keys:
            return k, v, key_mask  # refresh computed, but the stored keys are left stale
        return real_update(self, layer, k, v, key_mask)

    monkeypatch.setattr(KVCache, "update", stale_update)
    assert _dual_mismatch(model, PROMPTS[1]) > 1e-3


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
def test_cached_decodes_are_batch_invariant_for_every_policy(mode, make, tmp_path):
    model = make(gen_length=16, block_length=8)
    # tspd (with CE) runs with an untrained, seeded controller
    specs = {name: name for name in policy_names()}
    specs.update(controller_strategies(tmp_path / "controller"))
    for name, spec in specs.items():
        batch = generate(model, PROMPTS, spec, cache=mode)
        for prompt, seq in zip(PROMPTS, batch.sequences):
            alone = generate(model, [prompt], spec, cache=mode).sequences[0]
            assert (alone.tokens, alone.nfe, alone.rows) == (seq.tokens, seq.nfe, seq.rows), (name, prompt)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_loop_runs_the_steps_the_policy_asks_for(mode):
    model = tiny_llada(gen_length=16, block_length=8)
    seq = generate(model, [PROMPTS[0]], "low_confidence", cache=mode, early_stop=False).sequences[0]
    assert seq.nfe == 16
    seq = generate(model, [PROMPTS[0]], "low_confidence:steps=8", cache=mode, early_stop=False).sequences[0]
    assert seq.nfe == 8


def test_the_first_call_of_a_cached_decode_is_exact():
    model = tiny_llada(gen_length=16, block_length=8)
    plain = generate(model, [PROMPTS[2]], "low_confidence", record_trace=True).sequences[0].trace
    cached = generate(model, [PROMPTS[2]], "low_confidence", cache="dual", record_trace=True).sequences[0].trace
    np.testing.assert_allclose(plain.confidence[0], cached.confidence[0], atol=1e-5)
    assert plain.tokens_after[0].tolist() == cached.tokens_after[0].tolist()


def test_a_model_without_cache_support_says_so():
    model = tiny_llada(gen_length=16, block_length=8)
    model.supports_cache = False
    with pytest.raises(UnmaskError, match="does not support the KV cache"):
        generate(model, [PROMPTS[0]], "threshold", cache="dual")

"""Block diffusion in the one loop: the exact cache, batches and joiners, for every policy.

On a block-causal model (LLaDA2, SDAR, Fast-dLLM v2; tiny checkpoints of their real layouts) a
finished block's keys never change, so a cached decode must be token-identical to the uncached one,
for every policy, PSD's verification through the cache included; a prompt whose tail shares the
first block decodes in a padded batch, or joining a running decode, as it does alone. The calls
themselves are checked by hand: what each one computes, and how many there are.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unmask.decoding import DecodeConfig, generate, policy_names
from unmask.decoding.loop import Decoder, encode_prompts
from unmask.decoding.registry import parse_strategy
from unmask.models import load_model
from unmask.testing import controller_strategies, serve_jobs, write_tiny_llada

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
# family: its fixture's block length; llada_block is a block-causal LLaDA network (unmask's own
# block-diffusion fine-tune, `builtin:block`) of tiny random weights
FAMILIES = {"llada2": 8, "sdar": 4, "fastdllm_v2": 8, "llada_block": 8}
PROMPTS = ["tom has 5 apples", "what is 3 plus 4 ?", "hello world , tom has 3 pens and ann has"]
SPEC = {n: n for n in policy_names()}
SPEC["threshold"] = "threshold:tau=0.5"


@pytest.fixture(scope="module", autouse=True)
def _controllers(tmp_path_factory):
    SPEC.update(controller_strategies(tmp_path_factory.mktemp("c")))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    if name == "llada_block":
        path = write_tiny_llada(tmp_path_factory.mktemp("llada_block"), block_causal=True, seed=3)
    else:
        path = FIXTURES / name / "checkpoint"
    return name, load_model(str(path), device="cpu"), FAMILIES[name]


def _decode(model, block, spec, cache, prompts=PROMPTS, **kw):
    return generate(model, prompts, spec, gen_length=2 * block, block_length=block, cache=cache, chat=False, seed=3,
                    **kw).sequences


@pytest.mark.parametrize("name", policy_names())
def test_cached_decodes_are_token_identical_to_uncached_for_every_policy(family, name):
    _, model, block = family
    plain = _decode(model, block, SPEC[name], "none")
    for cache in ("dual", "prefix"):
        cached = _decode(model, block, SPEC[name], cache)
        assert [s.tokens for s in cached] == [s.tokens for s in plain], (name, cache)


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "oracle"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_padded_batch_decodes_each_prompt_as_alone(family, name, cache):
    # the prompts have three lengths, so three prompt tails share their first blocks differently
    _, model, block = family
    batch = _decode(model, block, SPEC[name], cache)
    for prompt, got in zip(PROMPTS, batch):
        alone = _decode(model, block, SPEC[name], cache, prompts=[prompt])[0]
        assert (got.tokens, got.nfe, got.rows) == (alone.tokens, alone.nfe, alone.rows), (name, prompt)


@pytest.mark.parametrize("spec", ["llada2", "llada21", "sdar", "fastdllm_v2", "psd", "threshold:tau=0.5"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_joiners_decode_as_alone(family, spec, cache):
    _, model, block = family
    policy = parse_strategy(spec)
    cfg = DecodeConfig(gen_length=2 * block, block_length=block, cache=cache).resolved(model.defaults)
    ids = encode_prompts(model, PROMPTS, chat=False)
    policy.prepare(model, ids[:1], cfg)
    finished = {}

    def admit(width, taken):  # one more prompt before each of the next calls
        return [(ids[taken], 7)] if taken < len(ids) else []

    Decoder(model, policy, cfg).run([ids[0]], seeds=[7], admit=admit, on_finish=lambda seq, r: finished.update({seq: r}),
                                    keep_results=False)
    assert sorted(finished) == [0, 1, 2]
    for seq, got in finished.items():
        alone = generate(model, [PROMPTS[seq]], spec, gen_length=2 * block, block_length=block, cache=cache, chat=False,
                         seed=7).sequences[0]
        assert (got.tokens, got.nfe) == (alone.tokens, alone.nfe), (spec, seq)


class Queries:
    """Records the canvas positions each cached call computes (features_at's queries)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        original = self.model.features_at

        def spy(input_ids, position_ids, query_pos, *args, **kwargs):
            self.calls.append(query_pos[0].tolist())
            return original(input_ids, position_ids, query_pos, *args, **kwargs)

        self.model.features_at = spy
        return self

    def __exit__(self, *exc):
        del self.model.features_at
        return False


def test_sdar_cached_calls_compute_the_prompts_whole_blocks_once_then_one_block_each():
    # SDAR, blocks of 4, a 6-token prompt: the prefill computes positions 0-3 (the whole block), the
    # first decode block is the tail (4, 5) and two masks; one commit per call (static); every
    # denoising call computes its block (4 positions), and a store call after each finished block
    # computes it once more with its final tokens: by hand, 1 + 2 x (2 + 1) + ... per block
    model = load_model(str(FIXTURES / "sdar" / "checkpoint"), device="cpu")
    prompt = [20, 21, 22, 23, 24, 25]
    with Queries(model) as q:
        seq = generate(model, [prompt], "sdar:rule=static", gen_length=8, block_length=4, cache="dual",
                       early_stop=False).sequences[0]
    # generation region: the tail (2) and 8 tokens, rounded to whole blocks: 12 positions, 3 blocks;
    # masks per block: 2, 4, 4; static commits one per call
    assert q.calls[0] == [0, 1, 2, 3]  # prefill
    blocks = [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    expected = [blocks[0]] * 2 + [blocks[0]] + [blocks[1]] * 4 + [blocks[1]] + [blocks[2]] * 4 + [blocks[2]]
    assert q.calls[1:] == expected
    assert seq.nfe == 1 + (2 + 1) + (4 + 1) + (4 + 1) == len(q.calls)
    assert len(seq.tokens) == 10  # 12 positions less the prompt's tail
    plain = generate(model, [prompt], "sdar:rule=static", gen_length=8, block_length=4, cache="none",
                     early_stop=False).sequences[0]
    assert plain.tokens == seq.tokens and plain.nfe == 2 + 4 + 4  # no prefill, no store calls


def test_llada2_cached_first_call_of_a_block_computes_the_finished_block_again():
    # LLaDA2's exact cache needs no call of its own: a block's first call computes the finished
    # block with its final tokens together with the new one (16 positions at blocks of 8)
    model = load_model(str(FIXTURES / "llada2" / "checkpoint"), device="cpu")
    prompt = [20, 21, 22, 23, 24, 25]  # 6 tokens: no whole block
    with Queries(model) as q:
        seq = generate(model, [prompt], "llada2", gen_length=8, block_length=8, cache="dual",
                       early_stop=False).sequences[0]
    block0 = list(range(0, 8))  # the prompt (0-5) and two masks
    block1 = list(range(8, 16))
    firsts = [c for c in q.calls if c[0] == 0 or len(c) > 8]
    assert q.calls[0] == block0 and [c for c in q.calls if len(c) == 16] == [block0 + block1]
    assert all(c == block0 for c in q.calls[: q.calls.index(block0 + block1)])
    assert all(c == block1 for c in q.calls[q.calls.index(block0 + block1) + 1:])
    plain = generate(model, [prompt], "llada2", gen_length=8, block_length=8, cache="none",
                     early_stop=False).sequences[0]
    assert (plain.tokens, plain.nfe) == (seq.tokens, seq.nfe) and seq.nfe == len(q.calls)
    assert firsts


def test_a_prompt_tail_is_never_in_the_answer_the_stream_or_the_trace(family):
    _, model, block = family
    prompt = list(range(20, 20 + block + 3))  # a whole block and a tail of 3
    blocks = []
    seq = generate(model, [prompt], "low_confidence", gen_length=2 * block, block_length=block, early_stop=False,
                   on_block=lambda s, b, t: blocks.append(t), record_trace=True).sequences[0]
    lead = 3
    width = -(-(lead + 2 * block) // block) * block
    assert len(seq.tokens) == width - lead and blocks[-1] == seq.tokens
    assert seq.trace.tokens_after.shape[1] == width - lead
    assert model.mask_id not in seq.tokens and torch.tensor(seq.tokens).ne(-1).all()


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_the_server_decodes_block_diffusion_requests_as_direct_decodes(family, cache):
    # requests whose prompts end at different places in their blocks share one continuous decode,
    # with the family's own decoder as the server's default, and each answer is the direct decode's
    from unmask.serve import GenerationRequest, build_engine

    name, model, block = family
    engine = build_engine(model, max_batch_size=2, cache=cache)
    if name != "llada_block":  # a family's own decoder; the block-causal LLaDA gets the server's fast default
        assert engine.config.strategy == model.default_strategy == name
    jobs = [engine.prepare(GenerationRequest(p, chat=False, gen_length=2 * block, block_length=block, seed=i))
            for i, p in enumerate(PROMPTS)]
    events = serve_jobs(engine, jobs, timeout=60)
    for i, prompt in enumerate(PROMPTS):
        answer = next(e for e in events if e.index == i and e.kind in ("done", "error"))
        assert answer.kind == "done", answer.message
        direct = generate(model, [prompt], engine.config.strategy, gen_length=2 * block, block_length=block, cache=cache, chat=False,
                          seed=i).sequences[0]
        assert answer.text == direct.text


@pytest.fixture(scope="module")
def llada2():
    return load_model(str(FIXTURES / "llada2" / "checkpoint"), device="cpu")  # blocks of 8


def test_the_server_counts_a_prompt_tail_in_whole_blocks_against_the_context(llada2):
    # blocks of 8, an 11-token prompt (one whole block and a tail of 3), gen_length 16: the prompt
    # region keeps 8 tokens and the generation region takes 3 + 16 = 19 positions, in whole blocks
    # 24, so the canvas is 8 + 24 = 32 positions, not 11 + 16 = 27
    from dataclasses import replace

    from unmask.errors import UnmaskError
    from unmask.serve import GenerationRequest, build_engine
    from unmask.serve.engine import canvas_fits

    prompt = list(range(20, 31))
    request = dict(chat=False, gen_length=16, block_length=8, strategy="low_confidence")
    with pytest.raises(UnmaskError, match="takes 32 positions in whole blocks of 8, more than the model's context of 30"):
        build_engine(replace(llada2, max_length=30)).prepare(GenerationRequest(prompt, **request))
    engine = build_engine(replace(llada2, max_length=32))
    tail = engine.prepare(GenerationRequest(prompt, **request))
    assert tail.region == (8, 24)
    # a 16-token prompt ends on a block boundary: (16, 16). Together, 16 + 24 = 40 positions
    whole = engine.prepare(GenerationRequest(list(range(20, 36)), **request))
    assert whole.region == (16, 16)
    assert canvas_fits([tail], 36) and canvas_fits([whole], 36)
    assert not canvas_fits([tail, whole], 39) and canvas_fits([tail, whole], 40)


def test_steps_split_over_the_blocks_that_hold_the_prompt_tail(llada2):
    # low_confidence with steps=N splits N calls over a sequence's blocks. gen_length 16 in blocks
    # of 8 after an 11-token prompt takes 3 blocks (a tail of 3 + 16 = 19 positions): steps=3 is one
    # call per block (3 calls, 21 tokens: 5 + 8 + 8); steps=2 cannot split over 3 blocks and is
    # refused before any call, by a direct decode and by the server alike. A 16-token prompt's 16
    # tokens take 2 blocks: steps=2 decodes in 2 calls and steps=3 is refused.
    from unmask.errors import UnmaskError
    from unmask.serve import GenerationRequest, build_engine

    engine = build_engine(llada2)
    for prompt, good, bad, blocks in ((list(range(20, 31)), 3, 2, 3), (list(range(20, 36)), 2, 3, 2)):
        seq = generate(llada2, [prompt], f"low_confidence:steps={good}", gen_length=16, block_length=8,
                       early_stop=False, chat=False).sequences[0]
        assert (seq.nfe, len(seq.tokens)) == (good, 8 * blocks - len(prompt) % 8)
        with pytest.raises(UnmaskError, match=f"steps {bad} must be a multiple of the number of blocks \\({blocks}\\)"):
            generate(llada2, [prompt], f"low_confidence:steps={bad}", gen_length=16, block_length=8, chat=False)
        with pytest.raises(UnmaskError, match=f"steps {bad} must be a multiple of the number of blocks \\({blocks}\\)"):
            engine.prepare(GenerationRequest(prompt, chat=False, gen_length=16, block_length=8,
                                             strategy=f"low_confidence:steps={bad}"))


def test_one_shot_attends_in_the_models_own_blocks(llada2):
    # one_shot's one block is the whole generation, but the model still attends in blocks of its own
    # length (8 here): an 11-token prompt keeps a tail of 3 in the generation region, and gen_length 24
    # takes ceil((3 + 24) / 8) = 4 blocks, 32 positions, 29 of them generated, all in one call
    from unmask.decoding.rows import RowTable

    seq = generate(llada2, [list(range(20, 31))], "one_shot", gen_length=24, chat=False).sequences[0]
    assert (seq.nfe, len(seq.tokens)) == (1, 29)
    cfg = DecodeConfig(gen_length=24).resolved(llada2.defaults, whole_generation=True)
    assert RowTable(llada2, parse_strategy("one_shot"), cfg, record_trace=False, use_cache=False).attn_block == 8


def test_rows_starting_a_block_never_widen_the_other_rows_call(tmp_path):
    # blocks of 8: an 8-token prompt (no tail) and a 4-token one (its tail shares the first block), so
    # the two rows start their blocks on different steps. A row's block-start call computes what is
    # before its block too (more than 8 positions); the other rows compute their block alone (8 or
    # fewer), in a call of their own: no call mixes the two, and a step with both makes two calls.
    from unmask.decoding.calls import width_groups

    assert [g.tolist() for g in width_groups(torch.tensor([16, 8, 24, 8]), 8)] == [[0, 2], [1, 3]]
    assert [g.tolist() for g in width_groups(torch.tensor([8, 8]), 8)] == [[0, 1]]
    model = load_model(str(write_tiny_llada(tmp_path, block_causal=True, seed=3)))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9]]
    widths = []
    original = model.features_at

    def spy(input_ids, position_ids, query_pos, *args, **kwargs):
        widths.append([len(set(row)) for row in query_pos.tolist()])
        return original(input_ids, position_ids, query_pos, *args, **kwargs)

    model.features_at = spy
    seqs = generate(model, prompts, "low_confidence:steps=6", gen_length=16, block_length=8, cache="dual",
                    chat=False, early_stop=False).sequences
    del model.features_at
    assert all(all(w > 8 for w in call) or all(w <= 8 for w in call) for call in widths), widths
    assert len(widths) > max(s.nfe for s in seqs)  # some step made two calls
    plain = generate(model, prompts, "low_confidence:steps=6", gen_length=16, block_length=8, cache="none",
                     chat=False, early_stop=False).sequences
    assert [(s.tokens, s.nfe) for s in seqs] == [(s.tokens, s.nfe) for s in plain]

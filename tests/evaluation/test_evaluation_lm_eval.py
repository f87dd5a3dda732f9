"""The lm-eval model `unmask`, called directly: the Monte Carlo loglikelihood against exact values,
determinism and order/batch invariance, generate_until's canvas and stop rules, and model_args."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval must never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from itertools import combinations  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from unmask.decoding import generate  # noqa: E402
from unmask.errors import UnmaskError  # noqa: E402
from unmask.evaluation import register  # noqa: E402

UnmaskLM = register()


def _ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _gen_requests(contexts, **gen_kwargs):
    gen_kwargs.setdefault("until", ["."])
    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return UnmaskLM(pretrained=tiny_checkpoint, strategy="threshold:tau=0.9", batch_size=4, mc_num=16, device="cpu")


@torch.no_grad()
def _log_probs(model, ids):
    """log-softmax (mask token excluded) at every position of one unpadded sequence: (len, vocab)."""
    logits = model.logits(torch.tensor([ids]))[0].double()
    logits[:, model.mask_id] = float("-inf")
    return torch.log_softmax(logits, -1)


def test_one_token_continuation_is_exact(lm):
    """L = 1: every sample masks the token with weight 1, so the estimate is its log-probability."""
    model, tok = lm.model, lm.model.tokenizer
    pairs = [("tom has 3 pens and ann has", " 2"), ("how many apples", " 5"), ("", " hello")]
    got = lm.loglikelihood(_ll_requests(pairs))
    for (context, continuation), (estimate, is_greedy) in zip(pairs, got):
        ctx, cont = tok.encode(context), tok.encode(continuation)
        assert len(cont) == 1
        log_probs = _log_probs(model, ctx + [model.mask_id])[-1]
        assert estimate == pytest.approx(float(log_probs[cont[0]]), abs=1e-5)
        assert is_greedy == (int(log_probs.argmax()) == cont[0])


def test_monte_carlo_estimate_approaches_the_exact_bound(tiny_checkpoint):
    """For L = 3 the bound's expectation is a sum over the 7 masking patterns; the estimate with
    many samples lands close to it."""
    lm = UnmaskLM(pretrained=tiny_checkpoint, mc_num=600, mc_batch_size=128, device="cpu")
    model, tok = lm.model, lm.model.tokenizer
    context, continuation = "tom has 3 pens and ann", " has 2 pens"
    ctx, cont = tok.encode(context), tok.encode(continuation)
    length = len(cont)
    assert length == 3
    exact = 0.0
    for count in range(1, length + 1):
        subsets = list(combinations(range(length), count))
        for subset in subsets:
            noisy = [model.mask_id if i in subset else t for i, t in enumerate(cont)]
            log_probs = _log_probs(model, ctx + noisy)[len(ctx) :]
            ce = -sum(float(log_probs[i, cont[i]]) for i in subset)
            exact -= (length / count) * ce / (len(subsets) * length)
    (estimate, _), = lm.loglikelihood(_ll_requests([(context, continuation)]))
    assert estimate == pytest.approx(exact, rel=0.02)
    # and a single pattern is not the answer: the masks really vary
    few = UnmaskLM(pretrained=tiny_checkpoint, mc_num=3, device="cpu")
    assert few.loglikelihood(_ll_requests([(context, continuation)]))[0][0] != pytest.approx(exact, rel=1e-6)


def test_mask_patterns_are_stratified_and_weighted(lm):
    patterns, weights = lm._mask_patterns(4)
    assert patterns.shape == (lm.mc_num + 1, 4) and weights.shape == (lm.mc_num + 1,)
    counts = patterns[:-1].sum(-1)
    assert sorted(counts.tolist()) == sorted([1, 2, 3, 4] * (lm.mc_num // 4))  # mc_num = 16: each l 4 times
    assert torch.allclose(weights[:-1], 4 / counts.double())
    assert patterns[-1].all() and weights[-1] == 0  # the greedy-check row


def test_loglikelihood_is_deterministic_and_order_invariant(tiny_checkpoint, lm):
    pairs = [
        ("tom has 3 pens", " and ann has 2 pens"), ("how many", " apples"), ("what is", " 3 plus 4 ?"),
        ("hello", " world"), ("sam", ""),
    ]
    first = lm.loglikelihood(_ll_requests(pairs))
    assert first[-1] == (0.0, True)
    again = UnmaskLM(pretrained=tiny_checkpoint, batch_size=4, mc_num=16, device="cpu").loglikelihood(_ll_requests(pairs))
    assert again == first
    # other packing (3 rows per forward) and reversed order: the same numbers, in the callers' order
    packed = UnmaskLM(pretrained=tiny_checkpoint, mc_num=16, mc_batch_size=3, device="cpu")
    reversed_out = packed.loglikelihood(_ll_requests(pairs[::-1]))[::-1]
    for (a, ga), (b, gb) in zip(first, reversed_out):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    other_seed = UnmaskLM(pretrained=tiny_checkpoint, mc_num=16, seed=1, device="cpu").loglikelihood(_ll_requests(pairs[:1]))
    assert other_seed[0][0] != pytest.approx(first[0][0], abs=1e-6)


def test_generate_until_batches_in_order_and_matches_the_loop(tiny_checkpoint, lm):
    contexts = ["how many apples", "tom has 3 pens and ann has 2 pens so", "hello", "what is 3 plus 4 ?", "sam gave"]
    out = lm.generate_until(_gen_requests(contexts, until=[]))
    single = UnmaskLM(pretrained=tiny_checkpoint, batch_size=1, device="cpu").generate_until(_gen_requests(contexts, until=[]))
    assert out == single
    model = lm.model
    for context, text in zip(contexts, out):  # no max_gen_toks: the full gen_length canvas, as `generate` decodes
        expected = generate(model, [model.tokenizer.encode(context)], "threshold:tau=0.9", gen_length=16, block_length=8, seed=0)
        assert text == expected.sequences[0].text
    stats = lm.last_generate_stats
    assert stats["requests"] == len(contexts) and stats["nfe"] > 0 and stats["tpf"] == pytest.approx(stats["decided"] / stats["nfe"])


def test_max_gen_toks_picks_the_canvas_and_cuts_the_answer(lm, caplog):
    assert (lm.gen_length, lm.block_length) == (16, 8)
    assert lm._generation_settings({"until": "x"}) == (["x"], None, 16, None)
    assert lm._generation_settings({"max_gen_toks": 5})[1:3] == (5, 8)  # rounded up to one block
    assert lm._generation_settings({"max_new_tokens": 9})[1:3] == (9, 16)
    with caplog.at_level("WARNING", logger="unmask.evaluation"):
        assert lm._generation_settings({"max_gen_toks": 100})[1:3] == (100, 16)  # capped at gen_length
    assert "capped" in caplog.text
    assert lm._generation_settings({"do_sample": True, "temperature": 0.7})[3] == 0.7
    assert lm._generation_settings({"do_sample": False, "temperature": 0.7})[3] is None
    texts = lm.generate_until(_gen_requests(["how many apples", "tom has 3 pens"], until=[], max_gen_toks=3))
    for text in texts:
        assert len(lm.model.tokenizer.encode(text)) <= 3
    full = lm.generate_until(_gen_requests(["how many apples"], until=[]))[0]
    word = full.split()[1] if len(full.split()) > 1 else None
    if word:  # a stop string cuts the text at its first occurrence
        cut = lm.generate_until(_gen_requests(["how many apples"], until=["zzz", word]))[0]
        assert cut == full[: full.index(word)]


def test_model_args_strategy_separators_and_errors(tiny_checkpoint):
    lm = UnmaskLM.create_from_arg_string(
        f"pretrained={tiny_checkpoint},strategy=threshold:tau=0.8;temperature=0|tau=0.7,device=cpu,gen_length=8"
    )
    assert lm.policy_name == "threshold" and lm.policy_params["tau"] == 0.7 and lm.gen_length == 8
    with pytest.raises(UnmaskError, match="unknown model_args.*temperature"):
        UnmaskLM.create_from_arg_string(f"pretrained={tiny_checkpoint},strategy=threshold:tau=0.8,temperature=0")
    with pytest.raises(UnmaskError, match="no parameter"):
        UnmaskLM(pretrained=tiny_checkpoint, strategy="threshold:bogus=1")
    with pytest.raises(UnmaskError, match="does not divide"):
        UnmaskLM(pretrained=tiny_checkpoint, gen_length=12, block_length=8, device="cpu")
    with pytest.raises(UnmaskError, match="batch_size auto"):
        UnmaskLM(pretrained=tiny_checkpoint, batch_size="auto")


def test_chat_template_model_arg_and_rolling(tiny_checkpoint, lm):
    chat = UnmaskLM(pretrained=tiny_checkpoint, apply_chat_template=True, device="cpu")
    tok = chat.model.tokenizer
    assert chat._prompt_ids("how many apples") == tok.prompt_ids("how many apples", chat=True)
    assert lm._prompt_ids("how many apples") == tok.encode("how many apples")  # raw by default
    text = chat.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text.startswith("<|startoftext|>") and text.endswith("<|end_header_id|>\n\n")
    # once lm-eval formats the prompts itself, the model arg must not wrap them a second time
    assert chat._prompt_ids(text) == tok.encode(text)
    with pytest.raises(NotImplementedError, match="bidirectional"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("hello world",), 0)])

"""The block-diffusion decoders against their reference code: tokens and model calls.

Each fixture (tests/fixtures/reference/<family>/, made by tools/reference_fixtures.py) holds a tiny
checkpoint and what the family's reference decoder generated on it and how many model calls it made.
unmask decodes the same prompts with the family's policy at the reference's settings, through its
one loop; the tokens must be identical and the NFE equal. How each reference defines its output is
mirrored here, from its code:

- LLaDA2's `generate` returns the first `gen_length` generated tokens, cut after the first EOS;
  it uses no cache (each call recomputes the prefix), so unmask's uncached decode counts its calls,
  and the exact cache (the finished block computed again with the next) makes the same calls.
- SDAR's evaluation decoder returns the whole canvas after the prompt (unreached blocks masked) and
  makes a prefill call and a store call per finished block: unmask's cached decode.
- Fast-dLLM v2's `generate` decodes `max_new_tokens // 32` blocks, the first the one holding the
  prompt's tail, returns the response cut after the first stop token, and ends with one more token
  (the finalize call after the last block predicts the next block's first): unmask's canvas ends at
  the last block, so that one token is past it; its calls (prefill, denoising, finalize) are counted
  by unmask's cached decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmask.decoding import generate
from unmask.models import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"


def _family(name):
    folder = FIXTURES / name
    record = json.loads((folder / "reference.json").read_text())
    return load_model(str(folder / "checkpoint"), device="cpu"), record["decodes"]


def _cut_after(tokens, stop_ids):
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def _cases(name):
    return [pytest.param(i, id=f"{name}-{i}") for i in range(len(json.loads(
        (FIXTURES / name / "reference.json").read_text())["decodes"]))]


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("case", _cases("llada2"))
def test_llada2_decoders_match_the_reference(case, cache):
    model, decodes = _family("llada2")
    ref = decodes[case]
    settings = ref["settings"]
    if ref["decoder"] == "llada2":
        spec = f"llada2:threshold={settings['threshold']},steps={settings['steps']}"
    else:
        spec = (f"llada21:threshold={settings['threshold']},editing_threshold={settings['editing_threshold']},"
                f"max_post_steps={settings['max_post_steps']}")
    seq = generate(model, [ref["prompt"]], spec, gen_length=ref["gen_length"], block_length=ref["block_length"],
                   cache=cache).sequences[0]
    got = _cut_after(seq.tokens[: ref["gen_length"]], [model.eos_id])
    assert got == ref["tokens"], (ref["decoder"], len(ref["prompt"]))
    assert seq.nfe == ref["nfe"]
    if ref["decoder"] == "llada21":
        assert seq.trace is None or seq.trace.edited is not None
        assert seq.events.get("edits", 0) >= 0


@pytest.mark.parametrize("case", _cases("sdar"))
def test_sdar_decoder_matches_the_reference(case):
    model, decodes = _family("sdar")
    ref = decodes[case]
    threshold = ref["settings"]["threshold"]
    spec = "sdar:rule=static" if threshold >= 1.0 else f"sdar:threshold={threshold}"
    cached = generate(model, [ref["prompt"]], spec, gen_length=ref["gen_length"], block_length=ref["block_length"],
                      cache="dual").sequences[0]
    assert cached.tokens == ref["tokens"], len(ref["prompt"])
    assert cached.nfe == ref["nfe"]
    # without the cache the same tokens; no prefill or store calls, so one call fewer per block
    # decoded (and the prefill when the prompt holds a whole block)
    plain = generate(model, [ref["prompt"]], spec, gen_length=ref["gen_length"], block_length=ref["block_length"],
                     cache="none").sequences[0]
    assert plain.tokens == ref["tokens"]


@pytest.mark.parametrize("cache", ["dual", "none"])
@pytest.mark.parametrize("case", _cases("fastdllm_v2"))
def test_fastdllm_v2_decoder_matches_the_reference(case, cache):
    model, decodes = _family("fastdllm_v2")
    ref = decodes[case]
    block = ref["block_length"]
    lead = len(ref["prompt"]) % block
    blocks = ref["max_new_tokens"] // block
    gen_length = blocks * block if lead == 0 else (blocks - 1) * block  # the same blocks as the reference's
    spec = f"fastdllm_v2:threshold={ref['settings']['threshold']},sub_block={ref['settings']['small_block']}"
    seq = generate(model, [ref["prompt"]], spec, gen_length=gen_length, block_length=block, cache=cache).sequences[0]
    want = ref["tokens"]
    got = _cut_after(seq.tokens, model.stop_ids)
    if want[-1] in model.stop_ids:
        assert got == want
    else:  # the reference's last token comes from the finalize call after the last block
        assert got == want[:-1] and len(got) == len(seq.tokens)
    if cache == "dual":
        assert seq.nfe == ref["nfe"]


def test_the_fixtures_exercise_stops_edits_and_parallel_commits():
    # not vacuous: the references stopped early in some decodes and not in others, LLaDA2.1 edited,
    # and the thresholds committed several positions per call somewhere
    stopped = {}
    for name in ("llada2", "sdar", "fastdllm_v2"):
        model, decodes = _family(name)
        for ref in decodes:
            stopped.setdefault(name, []).append(any(t in model.stop_ids for t in ref["tokens"]))
    assert all(any(v) and not all(v) for v in stopped.values()), stopped
    model, decodes = _family("llada2")
    edits = [generate(model, [r["prompt"]], "llada21", gen_length=16, block_length=8).sequences[0].events.get("edits", 0)
             for r in decodes if r["decoder"] == "llada21"]
    assert max(edits) > 0
    fast = [r for r in _family("sdar")[1] if r["settings"]["threshold"] < 1.0]
    assert any(len([t for t in r["tokens"] if t != 0]) > r["nfe"] for r in fast)  # more tokens than calls

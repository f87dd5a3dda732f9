"""LLaDA-MoE, LLaDA2, SDAR and Fast-dLLM v2: the native networks against their reference code.

The fixtures (tests/fixtures/reference/<family>/) are tiny checkpoints in each family's real layout
and the logits its reference modeling code computed on them, made once by
tools/reference_fixtures.py (which says where each reference comes from). Here each folder loads
through unmask's checkpoint loader, by the family's own tensor names and config keys, and its
logits must match the reference's within float32 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unmask.models import load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
TOLERANCE = 1e-4


def _reference(family):
    folder = FIXTURES / family
    return (folder / "checkpoint", json.loads((folder / "reference.json").read_text()),
            load_file(str(folder / "reference.safetensors")))


@pytest.mark.parametrize("family, kind, block_diffusion", [
    ("lladamoe", "lladamoe", False), ("llada2", "llada2", True), ("sdar", "sdar", True),
    ("fastdllm_v2", "fastdllm_v2", True)])
def test_each_family_loads_as_its_native_network(family, kind, block_diffusion):
    folder, _, _ = _reference(family)
    model = load_model(str(folder), device="cpu")
    assert model.kind == kind and (model.block_diffusion is not None) == block_diffusion
    assert model.mask_id == model.tokenizer.hf.mask_token_id
    assert model.shifted == (family == "fastdllm_v2")


def test_lladamoe_logits_match_the_reference():
    folder, record, tensors = _reference("lladamoe")
    model = load_model(str(folder), device="cpu")
    with torch.no_grad():
        for i, ids in enumerate(record["inputs"]):
            got = model.logits(torch.tensor([ids]))[0]
            want = tensors[f"logits_{i}"]
            assert (got - want).abs().max() <= TOLERANCE, (i, float((got - want).abs().max()))


@pytest.mark.parametrize("family", ["llada2", "sdar", "fastdllm_v2"])
def test_block_diffusion_logits_match_the_reference(family):
    # one forward of prompt + masked blocks under the family's block-causal attention
    folder, record, tensors = _reference(family)
    model = load_model(str(folder), device="cpu")
    ids = record["logit_inputs"][0]
    with torch.no_grad():
        got = model.logits(torch.tensor([ids]), attn_block=record["block"])[0]
    want = tensors["logits_0"]
    if model.shifted:  # the reference's logits at i predict token i + 1; unmask's at i predict token i
        want = torch.cat([want[:1], want[:-1]])
    assert (got - want).abs().max() <= TOLERANCE, float((got - want).abs().max())

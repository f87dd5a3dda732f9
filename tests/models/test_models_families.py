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


def _copy(family, tmp_path, **config_changes):
    """The family's tiny checkpoint copied to tmp_path with `config_changes` applied (None deletes)."""
    import shutil

    src = FIXTURES / family / "checkpoint"
    dst = tmp_path / family
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("family, change, words", [
    ("lladamoe", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ("lladamoe", {"moe_layer_freq": 1}, "moe_layer_freq must list one entry per layer"),
    ("lladamoe", {"partial_rotary_factor": None}, "lacks the LLaDA-MoE key(s) partial_rotary_factor"),
    ("lladamoe", {"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size -1 is not a width"),
    ("llada2", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("llada2", {"partial_rotary_factor": 0.1}, "partial_rotary_factor 0.1 gives 0 rotary dims"),
    ("llada2", {"n_group": 3}, "do not split into 3 groups"),
    ("sdar", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("sdar", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ("fastdllm_v2", {"head_dim": 4}, "head_dim 4 differs"),
])
def test_what_a_native_network_does_not_implement_is_refused_in_one_line(tmp_path, family, change, words):
    from unmask.errors import UnmaskError

    folder = _copy(family, tmp_path, **change)
    with pytest.raises(UnmaskError) as err:
        load_model(str(folder), device="cpu")
    message = str(err.value)
    assert words in message and "\n" not in message, message


def test_a_sharded_checkpoint_of_a_new_family_loads_the_same(tmp_path):
    from safetensors.torch import save_file

    folder = _copy("llada2", tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, record, tensors = _reference("llada2")
    model = load_model(str(folder), device="cpu")
    with torch.no_grad():
        got = model.logits(torch.tensor([record["logit_inputs"][0]]), attn_block=record["block"])[0]
    assert (got - tensors["logits_0"]).abs().max() <= TOLERANCE

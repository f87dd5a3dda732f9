"""The second built-in model, `builtin:block`: the built-in model fine-tuned into block diffusion.

What ships must be what the docs say: the built-in network's layout with unmask's `block_causal`
key, its own name, the built-in tokenizer, its own TSPD controllers, and an exact cache, which
`--cache auto` picks for it (and not for the bidirectional model).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from unmask.decoding import generate
from unmask.decoding.config import resolve_cache
from unmask.errors import UnmaskError
from unmask.models.loading import builtin_path, load_model, resolve_checkpoint

PROMPTS = ["what is 17 + 25 ?", "x = 3 ; y = x + 4 ; print ( y )"]


@pytest.fixture(scope="module")
def block():
    return load_model("builtin:block")


def test_shipped_folder_is_the_builtin_layout_made_block_causal():
    plain, block = builtin_path("builtin"), builtin_path("builtin:block")
    assert block == plain.parent / "block"
    cfg_plain = json.loads((plain / "config.json").read_text())
    cfg_block = json.loads((block / "config.json").read_text())
    assert cfg_block["block_causal"] is True and "block_causal" not in cfg_plain
    assert cfg_block["unmask_name"] == "builtin:block" and cfg_plain["unmask_name"] == "builtin"
    # the same network otherwise: every key but the block key, the name and the step count agree
    # the same decode defaults, and the serving default measured for it (docs/methods.md)
    assert cfg_block["unmask_defaults"] == {**cfg_plain["unmask_defaults"], "serve_strategy": "threshold"}
    # the same network otherwise: the configs as loaded agree but for the block key (the newer file
    # also spells out four LLaDA keys at their defaults, which the older one leaves out)
    net_plain = dataclasses.asdict(load_model("builtin").network.config)
    net_block = dataclasses.asdict(load_model("builtin:block").network.config)
    assert net_block.pop("block_causal") is True and net_plain.pop("block_causal") is False
    assert net_block == net_plain
    # the same tokenizer files, the fine-tuned weights (same tensors, other values)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (block / name).read_text() == (plain / name).read_text()
    w_plain, w_block = load_file(plain / "model.safetensors"), load_file(block / "model.safetensors")
    assert {k: v.shape for k, v in w_plain.items()} == {k: v.shape for k, v in w_block.items()}
    assert any(not torch.equal(w_plain[k], w_block[k]) for k in w_plain)
    # its own controllers, one per architecture and feature set tspd and learned_drafts read; the
    # ablations (controller-*-drop-*) are the bidirectional model's only
    for sub in ("controller", "controller-mlp", "controller-stability", "controller-mlp-stability"):
        assert {p.name for p in (block / sub).iterdir()} == {"controller.json", "controller.safetensors"}
    assert not (block / "trainer_state.pt").exists() and not (block / "train_log.jsonl").exists()


def test_loads_as_block_diffusion_with_the_exact_cache(block):
    assert block.name == "builtin:block"
    assert block.network.block_causal and block.block_diffusion is not None
    assert (block.defaults.gen_length, block.defaults.block_length) == (48, 16)
    # `auto` is the exact cache here and no cache on the bidirectional model
    assert resolve_cache("auto", block) == "dual"
    assert resolve_cache("auto", load_model("builtin")) == "none"
    assert resolve_cache("prefix", block) == "prefix"


def test_cached_and_uncached_decodes_are_token_identical(block):
    runs = {c: generate(block, PROMPTS, "threshold", cache=c) for c in ("none", "dual", "auto")}
    want = [(s.tokens, s.nfe) for s in runs["none"].sequences]
    for cache in ("dual", "auto"):
        assert [(s.tokens, s.nfe) for s in runs[cache].sequences] == want


def test_its_serving_default_is_its_own_measured_choice(block):
    from unmask.serve.engine import FAST_DEFAULT, serving_default

    assert block.defaults.serve_strategy == "threshold" and serving_default(block) == "threshold"
    assert serving_default(load_model("builtin")) == FAST_DEFAULT  # the bidirectional model keeps the rule


def test_an_unknown_builtin_name_lists_the_shipped_ones():
    with pytest.raises(UnmaskError, match=r"builtin:nope is missing .*\(shipped: builtin, builtin:block\)"):
        resolve_checkpoint("builtin:nope")

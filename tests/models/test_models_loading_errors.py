"""Broken or absent checkpoints end in one UnmaskError that names the problem, never a traceback or a hang."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from unmask.errors import UnmaskError
from unmask.models.loading import INDEX_FILE, load_model
from unmask.testing import write_tiny_dream, write_tiny_llada


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    return {
        "single": write_tiny_llada(root / "single", n_layers=1),
        "sharded": write_tiny_llada(root / "sharded", n_layers=1, max_shard_bytes=8_000),
        "dream": write_tiny_dream(root / "dream", num_hidden_layers=1),
    }


@pytest.fixture
def ckpt(originals, tmp_path):
    """A fresh copy of a valid checkpoint to break: ckpt('single'), ckpt('sharded'), ckpt('dream')."""
    return lambda kind="single": shutil.copytree(originals[kind], tmp_path / kind)


def expect_error(path, pattern: str) -> str:
    with pytest.raises(UnmaskError, match=pattern) as info:
        load_model(str(path), device="cpu")
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_valid_copies_load(ckpt):
    for kind in ("single", "sharded", "dream"):
        assert load_model(str(ckpt(kind)), device="cpu").kind == ("dream" if kind == "dream" else "llada")


def test_missing_config(ckpt):
    path = ckpt()
    (path / "config.json").unlink()
    expect_error(path, "no config.json")


def test_malformed_config(ckpt):
    path = ckpt()
    (path / "config.json").write_text('{"d_model": 32, "n_heads": ')
    expect_error(path, "config.json is not valid JSON")


def test_config_missing_required_keys(ckpt):
    path = ckpt("dream")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["hidden_size"], cfg["vocab_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    expect_error(path, "lacks the Dream key\\(s\\) hidden_size, vocab_size")


def test_no_safetensors(ckpt):
    path = ckpt()
    (path / "model.safetensors").unlink()
    expect_error(path, "no \\*.safetensors weights")


def test_only_pickle_weights(ckpt):
    path = ckpt()
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    expect_error(path, "only pickle weights.*safetensors only")


def test_shard_named_in_index_is_missing(ckpt):
    path = ckpt("sharded")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    expect_error(path, f"shard\\(s\\) {shards[-1].name} named in {INDEX_FILE} are missing")


@pytest.mark.parametrize("kind", ["single", "dream"])
def test_missing_tensor(ckpt, kind):
    path = ckpt(kind)
    state = load_file(str(path / "model.safetensors"))
    name = "model.transformer.blocks.0.k_proj.weight" if kind == "single" else "model.layers.0.self_attn.k_proj.bias"
    del state[name]
    save_file(state, str(path / "model.safetensors"))
    expect_error(path, f"lacks tensor\\(s\\) {name}")


@pytest.mark.parametrize("kind", ["single", "dream"])
def test_tensors_the_network_has_no_place_for(ckpt, kind):
    """q/k norms (say) in a checkpoint whose config does not declare them: refused, never dropped in silence."""
    path = ckpt(kind)
    state = load_file(str(path / "model.safetensors"))
    prefix = "model.transformer.blocks.0." if kind == "single" else "model.layers.0.self_attn."
    extra = [prefix + "k_norm.weight", prefix + "q_norm.weight"]
    for name in extra:
        state[name] = torch.ones(8)
    save_file(state, str(path / "model.safetensors"))
    arch = "llada" if kind == "single" else "dream"
    expect_error(path, f"has tensor\\(s\\) {extra[0]}, {extra[1]} that the native {arch} network of this config has no place for")


def test_extra_tensors_in_a_shard_are_counted(ckpt):
    path = ckpt("sharded")
    names = [f"model.transformer.blocks.0.extra_{i}.weight" for i in range(5)]
    save_file({name: torch.zeros(2) for name in names}, str(path / "model-extra.safetensors"))
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"].update({name: "model-extra.safetensors" for name in names})
    (path / INDEX_FILE).write_text(json.dumps(index))
    expect_error(path, f"has tensor\\(s\\) {names[0]}, {names[1]}, {names[2]} and 2 more that the native llada network")


def test_output_head_in_a_tied_checkpoint_is_refused(ckpt):
    """weight_tying=true computes logits from the embedding; a separate ff_out would be ignored."""
    path = ckpt()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "weight_tying": True}))
    expect_error(path, "has tensor\\(s\\) model.transformer.ff_out.weight that the native llada network")


def test_tensor_with_wrong_shape(ckpt):
    path = ckpt()
    state = load_file(str(path / "model.safetensors"))
    name = "model.transformer.blocks.0.up_proj.weight"
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(path / "model.safetensors"))
    expect_error(path, f"tensor {name} .* has shape \\(97, 32\\) but config.json implies \\(96, 32\\)")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(ckpt, damage):
    path = ckpt()
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"this is not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    expect_error(path, "model.safetensors is not a readable safetensors file")


def test_nonexistent_path(tmp_path):
    expect_error(tmp_path / "no" / "such" / "folder", "no checkpoint folder at")


def test_hub_id_without_network_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    start = time.monotonic()
    expect_error("unmask-tests-no-such-org/no-such-model", "could not fetch unmask-tests-no-such-org/no-such-model")
    assert time.monotonic() - start < 10

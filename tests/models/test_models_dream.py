"""Dream checkpoints: the real layout, native loading (no remote code), the forward pass and the shift."""

import json

import pytest
import torch

from unmask.errors import UnmaskError
from unmask.models.dream import DreamConfig
from unmask.models.loading import INDEX_FILE, load_model
from unmask.models.tokenizer import Tokenizer
from unmask.testing import assert_left_padding_is_invisible, reference_dream_logits, tiny_dream, tiny_dream_tokenizer, write_tiny_dream

# every key of Dream-v0-Instruct-7B's config.json
DREAM_CONFIG_KEYS = {
    "architectures", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "mask_token_id", "max_position_embeddings", "max_window_layers",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id", "rms_norm_eps",
    "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version",
    "use_cache", "use_sliding_window", "vocab_size",
}  # fmt: skip


def dream_names(n_layers: int, tied: bool = False) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied:
        names.add("lm_head.weight")
    for i in range(n_layers):
        layer = f"model.layers.{i}"
        names |= {f"{layer}.self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")}
        names |= {f"{layer}.self_attn.o_proj.weight", f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        names |= {f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= rel * scale, f"max difference {diff:.3g} exceeds {rel:g} x {scale:.3g}"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("dream") / "ckpt"
    write_tiny_dream(path, max_shard_bytes=20_000)
    return path


def test_sharded_checkpoint_has_dream_names_and_keys(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == dream_names(2)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    cfg = json.loads((sharded / "config.json").read_text())
    assert set(cfg) - {"unmask_defaults"} <= DREAM_CONFIG_KEYS
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA, as Dream-7B (28 q heads, 4 kv heads)
    tok = Tokenizer.from_dir(sharded).hf
    assert tok.mask_token == "<|mask|>" and "<|im_start|>" in tok.chat_template


def test_sharded_checkpoint_loads_and_matches_reference(sharded):
    model = load_model(str(sharded), device="cpu")
    assert model.kind == "dream" and model.shifted and model.supports_cache
    original = tiny_dream()
    hf = model.tokenizer.hf
    assert model.mask_id == hf.convert_tokens_to_ids("<|mask|>") == original.mask_id
    assert model.stop_ids == (hf.convert_tokens_to_ids("<|endoftext|>"), hf.convert_tokens_to_ids("<|im_end|>"))
    ids = torch.randint(0, model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        raw = model.network(ids, position_ids=positions)
        assert torch.equal(raw, original.network(ids, position_ids=positions))
        assert_close_relative(raw, reference_dream_logits(model.network, ids))
        # the shift: the logits returned for position i are the network's raw logits at i-1
        out = model.logits(ids)
    assert torch.equal(out[:, 1:], raw[:, :-1])
    assert torch.equal(out[:, 0], raw[:, 0])


def test_tied_and_multi_head_kv_variants_match_reference(tmp_path):
    from safetensors import safe_open

    path = write_tiny_dream(tmp_path / "ckpt", tie_word_embeddings=True, num_key_value_heads=4)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == dream_names(2, tied=True)
    model = load_model(str(path), device="cpu")
    ids = torch.randint(0, model.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = model.network(ids, position_ids=torch.arange(6)[None])
    assert_close_relative(raw, reference_dream_logits(model.network, ids))


def test_real_dream_config_loads_natively_without_remote_code(tmp_path):
    """Dream-7B's config.json names remote code in auto_map; the native network must not need it."""
    path = write_tiny_dream(tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        initializer_range=0.02, max_window_layers=28, torch_dtype="bfloat16", transformers_version="4.46.2",
    )  # fmt: skip
    del cfg["unmask_defaults"]
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(path), device="cpu", trust_remote_code=False)
    assert model.kind == "dream" and model.shifted


def test_left_padded_batch_matches_rows_alone():
    model = tiny_dream()
    tok = tiny_dream_tokenizer().hf
    rows = [tok.encode("tom has 3 apples and ann gets 2"), tok.encode("how many"), tok.encode("what is 5 + 7 ?")]
    # every real position, the first included (it keeps its own row, never the pad's before it)
    assert_left_padding_is_invisible(model, rows)


def test_dtype_default_and_bf16(sharded):
    assert {p.dtype for p in load_model(str(sharded), device="cpu").network.parameters()} == {torch.float32}
    model = load_model(str(sharded), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.network.parameters()} == {torch.bfloat16}


def test_config_errors_name_the_problem():
    with pytest.raises(UnmaskError, match="intermediate_size.*num_attention_heads"):
        DreamConfig.from_dict({"model_type": "Dream", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 4})
    base = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=4)
    with pytest.raises(UnmaskError, match="num_key_value_heads"):
        DreamConfig.from_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(UnmaskError, match="rope_scaling"):
        DreamConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert DreamConfig.from_dict({**base, "rope_scaling": None}).kv_heads == 2

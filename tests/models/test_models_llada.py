"""LLaDA checkpoints: the real layout (names, config keys, sharding), loading, and the forward pass."""

import json

import pytest
import torch

from unmask.models.base import DiffusionLM
from unmask.models.llada import LLaDAConfig, LLaDANetwork
from unmask.models.loading import INDEX_FILE, load_model, save_checkpoint
from unmask.testing import assert_left_padding_is_invisible, reference_llada_logits, tiny_llada, tiny_tokenizer, write_tiny_llada

# every key of LLaDA-8B-Instruct's config.json
LLADA_CONFIG_KEYS = {
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout", "attention_layer_norm",
    "attention_layer_norm_with_affine", "auto_map", "bias_for_layer_norm", "block_group_size", "block_type",
    "d_model", "embedding_dropout", "embedding_size", "eos_token_id", "flash_attention", "include_bias",
    "include_qkv_bias", "init_cutoff_factor", "init_device", "init_fn", "init_std", "input_emb_norm",
    "layer_norm_type", "layer_norm_with_affine", "mask_token_id", "max_sequence_length", "mlp_hidden_size",
    "mlp_ratio", "model_type", "multi_query_attention", "n_heads", "n_kv_heads", "n_layers", "pad_token_id",
    "precision", "residual_dropout", "rms_norm_eps", "rope", "rope_full_precision", "rope_theta", "scale_logits",
    "transformers_version", "use_cache", "vocab_size", "weight_tying",
}  # fmt: skip
BLOCK_TENSORS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


def llada_names(n_layers: int, tied: bool = False) -> set[str]:
    names = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    if not tied:
        names.add("model.transformer.ff_out.weight")
    for i in range(n_layers):
        names |= {f"model.transformer.blocks.{i}.{t}.weight" for t in BLOCK_TENSORS}
    return names


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= rel * scale, f"max difference {diff:.3g} exceeds {rel:g} x {scale:.3g}"


def tied_llada(seed: int = 0) -> DiffusionLM:
    """tiny_llada has no weight_tying switch; build the tied variant from its parts."""
    base = tiny_llada(seed=seed)
    cfg = LLaDAConfig(**{**vars(base.network.config), "weight_tying": True})
    network = LLaDANetwork(cfg)
    network.init_weights(std=0.5, seed=seed)
    base.network = network.eval()
    return base


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("llada") / "ckpt"
    write_tiny_llada(path, max_shard_bytes=20_000, n_layers=2)
    return path


def test_sharded_checkpoint_has_llada_names_and_keys(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == llada_names(2)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    cfg = json.loads((sharded / "config.json").read_text())
    assert set(cfg) - {"unmask_defaults"} <= LLADA_CONFIG_KEYS
    for key in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size", "mask_token_id"):
        assert key in cfg
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert (sharded / "tokenizer.json").exists() and (sharded / "tokenizer_config.json").exists()


def test_sharded_checkpoint_loads_and_matches_reference(sharded):
    model = load_model(str(sharded), device="cpu")
    assert model.kind == "llada" and not model.shifted and model.supports_cache
    original = tiny_llada(n_layers=2)
    assert model.mask_id == original.mask_id and model.stop_ids == original.stop_ids
    ids = torch.randint(0, model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.logits(ids)
        assert torch.equal(out, original.logits(ids))  # the weights that were written are the ones loaded
    assert_close_relative(out, reference_llada_logits(model.network, ids))


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_variants_load_and_match_reference(tmp_path, variant):
    if variant == "gqa":
        path = write_tiny_llada(tmp_path / "ckpt", n_heads=4, n_kv_heads=2)
        expected = llada_names(2)
    else:
        path = save_checkpoint(tied_llada(), tmp_path / "ckpt")
        expected = llada_names(2, tied=True)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected
    model = load_model(str(path), device="cpu")
    if variant == "gqa":
        assert model.network.model.transformer.blocks[0].k_proj.weight.shape[0] == 16  # 2 kv heads x head_dim 8
    ids = torch.randint(0, model.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_relative(model.logits(ids), reference_llada_logits(model.network, ids))


def test_left_padded_batch_matches_rows_alone():
    model = tiny_llada(n_kv_heads=2)
    tok = tiny_tokenizer().hf
    rows = [tok.encode("tom has 3 apples and ann gets 2"), tok.encode("how many"), tok.encode("what is 5 + 7 ?")]
    assert_left_padding_is_invisible(model, rows)


def test_dtype_default_and_bf16(sharded):
    assert {p.dtype for p in load_model(str(sharded), device="cpu").network.parameters()} == {torch.float32}
    model = load_model(str(sharded), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.network.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model.logits(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_block_causal_llada_attends_its_block_and_the_earlier_ones():
    # unmask's block-diffusion LLaDA (`block_causal`): with one block as long as the canvas it is the
    # bidirectional network; with blocks of 4, changing a token of block 2 changes nothing before it
    # and every position of block 2 and after (they all see it)
    from dataclasses import replace as dc_replace

    from unmask.testing import tiny_llada

    bidirectional = tiny_llada(seed=4)
    block = tiny_llada(seed=4, block_causal=True)
    assert dc_replace(bidirectional.network.config, block_causal=True) == block.network.config
    ids = torch.randint(5, 40, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = block.position_ids(mask)
    with torch.no_grad():
        torch.testing.assert_close(block.logits(ids, mask, pos, attn_block=12), bidirectional.logits(ids, mask, pos))
        before = block.logits(ids, mask, pos, attn_block=4)
        changed = ids.clone()
        changed[:, 9] = (changed[:, 9] + 1 - 5) % 35 + 5
        after = block.logits(changed, mask, pos, attn_block=4)
    assert torch.equal(before[:, :8], after[:, :8])
    assert ((before[:, 8:] - after[:, 8:]).abs().amax(-1) > 1e-4).all()

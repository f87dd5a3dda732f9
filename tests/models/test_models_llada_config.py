"""LLaDA's config.json: the real release loads, and every setting the native network does not implement is refused.

A setting that changes the forward pass (q/k norms, scaled logits, another norm or block type...) would
load into the native network and decode with wrong logits; the loader refuses it in one line instead,
naming the key, its value and the one value supported. Settings that do not change inference load at
any value.
"""

import json
import sys

import pytest
import torch

from unmask.cli import main
from unmask.models.llada import LLaDAConfig
from unmask.models.loading import load_model
from unmask.testing import error_of, write_tiny_llada

# GSAI-ML/LLaDA-8B-Instruct's config.json (LLaDA-8B-Base's has the same keys and values), key for key
LLADA_8B_INSTRUCT = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}
SIZES = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
         "mask_token_id", "eos_token_id", "pad_token_id", "max_sequence_length", "rope_theta")  # fmt: skip

# (key, refused value, the value the network implements)
REFUSED = [
    ("scale_logits", True, False),
    ("input_emb_norm", True, False),
    ("attention_layer_norm", True, False),
    ("layer_norm_type", "default", "rms"),
    ("layer_norm_type", "low_precision", "rms"),
    ("layer_norm_type", "gemma_rms", "rms"),
    ("layer_norm_with_affine", False, True),
    ("bias_for_layer_norm", True, False),
    ("include_bias", True, False),
    ("block_type", "sequential", "llama"),
    ("block_type", "parallel", "llama"),
    ("activation_type", "swiglu", "silu"),
    ("activation_type", "gelu", "silu"),
    ("rope", False, True),
    ("alibi", True, False),
    ("block_group_size", 2, 1),
    ("clip_qkv", 8.0, None),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, None),
]
# settings that do not change the forward pass (or match it), at values other than the release's
ACCEPTED = [
    ("bias_for_layer_norm", None),  # inherits include_bias=false
    ("attention_layer_norm_with_affine", False),  # only matters with attention_layer_norm
    ("rope_full_precision", False),
    ("flash_attention", True),
    ("attention_dropout", 0.1),
    ("residual_dropout", 0.1),
    ("embedding_dropout", 0.1),
    ("alibi_bias_max", 4.0),
    ("init_fn", "normal"),
    ("precision", None),
    ("use_cache", True),
    ("rope_scaling", {"rope_type": "default"}),
    ("clip_qkv", None),
    ("multi_query_attention", False),  # agrees with n_kv_heads == n_heads
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("llada") / "tiny", n_layers=1)


def real_keys_config(tiny_path, **changes) -> dict:
    """LLaDA-8B-Instruct's config.json with the tiny checkpoint's sizes and token ids."""
    tiny_cfg = json.loads((tiny_path / "config.json").read_text())
    cfg = {**LLADA_8B_INSTRUCT, **{k: tiny_cfg[k] for k in SIZES}}
    cfg["n_kv_heads"] = tiny_cfg["n_kv_heads"] or tiny_cfg["n_heads"]
    cfg.update(changes)
    return cfg


def checkpoint_with(tiny_path, tmp_path, **changes):
    import shutil

    path = shutil.copytree(tiny_path, tmp_path / "ckpt")
    (path / "config.json").write_text(json.dumps(real_keys_config(tiny_path, **changes)))
    return path


def test_the_real_config_reads_as_the_8b_network():
    cfg = LLaDAConfig.from_dict(LLADA_8B_INSTRUCT)
    assert (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.n_layers) == (4096, 32, 32, 32)
    assert (cfg.mlp_hidden_size, cfg.rows, cfg.rope_theta, cfg.rms_norm_eps) == (12288, 126464, 500000.0, 1e-5)
    assert not cfg.weight_tying and not cfg.include_bias and not cfg.include_qkv_bias
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.max_sequence_length) == (126336, 126081, 4096)


def test_a_checkpoint_with_the_real_keys_loads_and_computes_the_same_logits(tiny, tmp_path):
    path = checkpoint_with(tiny, tmp_path)
    model, original = load_model(str(path), device="cpu"), load_model(str(tiny), device="cpu")
    ids = torch.randint(0, model.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.logits(ids), original.logits(ids))


def test_unmask_writes_the_layout_keys_at_the_implemented_values(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    for key, _, supported in REFUSED:
        if key not in ("clip_qkv", "rope_scaling", "include_bias"):
            assert cfg[key] == supported, key


@pytest.mark.parametrize(("key", "value", "supported"), REFUSED, ids=[f"{k}={json.dumps(v)}" for k, v, _ in REFUSED])
def test_unimplemented_setting_is_refused_naming_key_value_and_support(tiny, tmp_path, key, value, supported):
    path = checkpoint_with(tiny, tmp_path, **{key: value})
    message = str(error_of(load_model, str(path), device="cpu"))
    assert f"{key}={json.dumps(value)}" in message
    assert f"supports only {key}={json.dumps(supported)}" in message
    assert str(path / "config.json") in message


@pytest.mark.parametrize(("key", "value"), ACCEPTED, ids=[f"{k}={json.dumps(v)}" for k, v in ACCEPTED])
def test_settings_that_do_not_change_the_forward_pass_load(tiny, tmp_path, key, value):
    assert load_model(str(checkpoint_with(tiny, tmp_path, **{key: value})), device="cpu").kind == "llada"


def test_multi_query_attention_means_one_kv_head():
    cfg = LLaDAConfig.from_dict({**LLADA_8B_INSTRUCT, "n_kv_heads": None, "multi_query_attention": True})
    assert cfg.kv_heads == 1
    cfg = LLaDAConfig.from_dict({**LLADA_8B_INSTRUCT, "n_kv_heads": None, "multi_query_attention": False})
    assert cfg.kv_heads == 32


def test_multi_query_attention_contradicting_n_kv_heads_is_refused():
    message = str(error_of(LLaDAConfig.from_dict, {**LLADA_8B_INSTRUCT, "multi_query_attention": True}))
    assert "multi_query_attention=true implies n_kv_heads=1 but n_kv_heads is 32" in message


def test_kv_heads_that_do_not_divide_the_heads_are_refused():
    message = str(error_of(LLaDAConfig.from_dict, {**LLADA_8B_INSTRUCT, "n_kv_heads": 5}))
    assert "n_heads 32 is not a multiple of n_kv_heads 5" in message


def test_embedding_smaller_than_vocabulary_is_refused():
    message = str(error_of(LLaDAConfig.from_dict, {**LLADA_8B_INSTRUCT, "embedding_size": 1000}))
    assert "embedding_size 1000 is smaller than vocab_size 126464" in message


def test_cli_prints_the_refusal_in_one_line_and_exits_2(tiny, tmp_path, capsys):
    path = checkpoint_with(tiny, tmp_path, scale_logits=True)
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(["generate", "hi", "--model", str(path)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "scale_logits=true" in err and "supports only scale_logits=false" in err

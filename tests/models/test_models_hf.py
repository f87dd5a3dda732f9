"""The generic `transformers` adapter, on a tiny BERT masked LM written by `transformers` itself."""

import json

import pytest
import torch

from unmask.errors import UnmaskError
from unmask.models.loading import load_model
from unmask.testing import assert_left_padding_is_invisible, tiny_tokenizer


def write_tiny_bert(path, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer.hf), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.hf.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(str(path))  # safetensors is the default format
    tokenizer.hf.save_pretrained(str(path))
    return model, tokenizer


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "ckpt"
    model, tokenizer = write_tiny_bert(path)
    return path, model, tokenizer


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def copy(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def test_adapter_logits_equal_transformers_logits(bert):
    path, reference, tokenizer = bert
    assert list(path.glob("*.safetensors"))
    model = load_model(str(path), device="cpu")
    assert model.kind == "hf" and not model.shifted and not model.supports_cache
    assert model.mask_id == tokenizer.hf.mask_token_id
    assert model.eos_id == tokenizer.hf.eos_token_id and model.vocab_size == len(tokenizer.hf)
    assert model.max_length == 64 and model.dtype == torch.float32
    ids = torch.randint(0, model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.logits(ids)
        expected = reference(input_ids=ids).logits
    assert out.dtype == torch.float32 and out.shape == (2, 10, model.vocab_size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_adapter_left_padded_batch_matches_rows_alone(bert):
    path, _, tokenizer = bert
    model = load_model(str(path), device="cpu")
    rows = [tokenizer.encode("tom has 3 apples"), tokenizer.encode("how many pens does ann have ?")]
    assert_left_padding_is_invisible(model, rows)


def test_adapter_reads_config_flags_and_dtype(bert, tmp_path):
    path = copy(bert[0], tmp_path / "ckpt")
    edit_config(path, mask_token_id=7, unmask_shifted=True, eos_token_id=[1, 3])
    model = load_model(str(path), device="cpu", dtype="bf16")
    assert model.mask_id == 7 and model.shifted and model.stop_ids[:2] == (1, 3) and model.eos_id == 1
    assert {p.dtype for p in model.network.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model.logits(torch.tensor([[4, 5, 6]])).dtype == torch.float32


def test_remote_code_needs_trust(bert, tmp_path):
    path = copy(bert[0], tmp_path / "ckpt")
    edit_config(path, auto_map={"AutoModelForMaskedLM": "modeling_x.XForMaskedLM"})
    with pytest.raises(UnmaskError, match="runs remote code.*--trust-remote-code"):
        load_model(str(path), device="cpu")


def test_no_mask_token_is_an_error(bert, tmp_path):
    path = copy(bert[0], tmp_path / "ckpt")
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("mask_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(UnmaskError, match="declares no mask token"):
        load_model(str(path), device="cpu")


def test_pickle_weights_are_refused(bert, tmp_path):
    path = copy(bert[0], tmp_path / "ckpt")
    for file in path.glob("*.safetensors"):
        file.unlink()
    torch.save(bert[1].state_dict(), path / "pytorch_model.bin")
    with pytest.raises(UnmaskError, match="safetensors only"):
        load_model(str(path), device="cpu")


def test_unknown_model_type_is_an_error(bert, tmp_path):
    path = copy(bert[0], tmp_path / "ckpt")
    edit_config(path, model_type="no-such-architecture", architectures=["NoSuchModel"])
    with pytest.raises(UnmaskError, match="model_type 'no-such-architecture'.*neither LLaDA nor Dream"):
        load_model(str(path), device="cpu")

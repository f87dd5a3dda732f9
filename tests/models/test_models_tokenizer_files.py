"""Tokenizer files that every supported transformers reads back: the built-in model's and those unmask writes.

transformers 5 saves its generic fast tokenizer as `TokenizersBackend` (a class 4.x lacks) and the chat
template in chat_template.jinja (which older 4.x does not read); unmask rewrites both so that the
checkpoint loads, chat template included, under the whole declared range (CI runs these tests under the
lowest supported transformers as well).
"""

import json

import pytest

from unmask.models.loading import builtin_path, load_model
from unmask.models.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer, make_portable
from unmask.testing import LLADA_CHAT_TEMPLATE, tiny_tokenizer, write_tiny_llada

MESSAGES = [{"role": "user", "content": "how many apples ?"}]


def assert_portable(folder):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["chat_template"]
    assert not (folder / CHAT_TEMPLATE_FILE).exists()
    return cfg


def test_builtin_tokenizer_files_name_a_class_every_version_has():
    cfg = assert_portable(builtin_path())
    from unmask.training.tokenizer import CHAT_TEMPLATE

    assert cfg["chat_template"] == CHAT_TEMPLATE


def test_builtin_chat_prompt():
    tok = Tokenizer.from_dir(builtin_path())
    ids = tok.chat_prompt(MESSAGES)
    text = tok.hf.decode(ids)
    assert text.startswith("<|startoftext|>") and text.rstrip().endswith("<|end_header_id|>")
    content = tok.encode("how many apples ?")
    assert any(ids[i : i + len(content)] == content for i in range(len(ids)))
    assert tok.hf.mask_token == "<|mdm_mask|>" and tok.hf.eos_token_id == 0


@pytest.mark.parametrize("shards", [None, 20_000])
def test_written_checkpoint_is_portable_and_reads_back_the_same(tmp_path, shards):
    path = write_tiny_llada(tmp_path / "ckpt", max_shard_bytes=shards)
    cfg = assert_portable(path)
    assert cfg["chat_template"] == LLADA_CHAT_TEMPLATE
    loaded, original = load_model(str(path), device="cpu").tokenizer, tiny_tokenizer()
    assert loaded.chat_prompt(MESSAGES) == original.chat_prompt(MESSAGES)
    assert loaded.encode("tom has 3 apples") == original.encode("tom has 3 apples")
    assert loaded.hf.mask_token == "<|mdm_mask|>"


def test_saving_twice_into_one_folder_and_rewriting_are_idempotent(tmp_path):
    tok = tiny_tokenizer()
    tok.save(tmp_path)
    first = (tmp_path / "tokenizer_config.json").read_text()
    tok.save(tmp_path)
    make_portable(tmp_path)
    assert (tmp_path / "tokenizer_config.json").read_text() == first
    assert_portable(tmp_path)


def test_a_template_file_becomes_the_inline_template(tmp_path):
    tiny_tokenizer(chat_template=None).hf.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "TokenizersBackend"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(LLADA_CHAT_TEMPLATE)
    make_portable(tmp_path)
    assert assert_portable(tmp_path)["chat_template"] == LLADA_CHAT_TEMPLATE


def test_other_tokenizer_classes_are_kept(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    make_portable(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"tokenizer_class": "Qwen2Tokenizer"}

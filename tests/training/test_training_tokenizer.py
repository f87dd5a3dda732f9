"""The built-in tokenizer covers every generated question and answer."""

from __future__ import annotations

import random

import pytest

from unmask.tasks import count_tokens, get_task
from unmask.training.tokenizer import SPECIAL_TOKENS, build_builtin_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer()


def squash(text: str) -> str:
    return "".join(text.lower().split())


@pytest.mark.parametrize("name", ["arith", "trace"])
def test_questions_and_responses_round_trip_without_unk(tokenizer, name):
    task = get_task(name)
    rng = random.Random(0)
    unk = tokenizer.hf.unk_token_id
    for split in ("train", "dev", "test"):
        for problem in task.problems(split, limit=100, seed=1):
            for text in (problem.question, task.sample_response(problem, rng)):
                ids = tokenizer.encode(text)
                assert unk not in ids, text
                assert len(ids) == count_tokens(text), text
                assert squash(tokenizer.decode(ids)) == squash(text)


def test_special_tokens_and_chat_template(tokenizer):
    hf = tokenizer.hf
    for token in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(token) != hf.unk_token_id or token == "<unk>"
    assert hf.eos_token == hf.pad_token == "<|endoftext|>"
    assert hf.mask_token == "<|mdm_mask|>"
    ids = tokenizer.prompt_ids("tom has 12 toys .")
    tokens = hf.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["<|startoftext|>", "<|start_header_id|>", "user", "<|end_header_id|>"]
    assert tokens[-3:] == ["<|start_header_id|>", "assistant", "<|end_header_id|>"]
    assert "1" in tokens and "2" in tokens


def test_saved_tokenizer_reloads(tmp_path, tokenizer):
    from unmask.models.tokenizer import Tokenizer

    tokenizer.hf.save_pretrained(str(tmp_path))
    again = Tokenizer.from_dir(tmp_path)
    text = "we print y . first set y to 13 . the answer is 13 ."
    assert again.encode(text) == tokenizer.encode(text)
    assert again.prompt_ids("b = 3 ; print ( b )") == tokenizer.prompt_ids("b = 3 ; print ( b )")

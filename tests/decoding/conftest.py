"""Shared fixtures for the decode-loop tests: tiny random models and a scripted model.

The scripted model is a `DiffusionLM` around a network whose logits are set by a Python function
of (prompt, current generation canvas, generation index), so a test fixes exactly which token each
position predicts and how confident it is, and can make that depend on what was committed so far.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.testing import tiny_dream, tiny_llada, tiny_tokenizer

GEN = 16
BLOCK = 8


@pytest.fixture(scope="session")
def llada() -> DiffusionLM:
    return tiny_llada(d_model=32, n_layers=2, seed=0, gen_length=GEN, block_length=BLOCK)


@pytest.fixture(scope="session")
def dream() -> DiffusionLM:
    return tiny_dream(hidden_size=32, num_hidden_layers=2, seed=0, gen_length=GEN, block_length=BLOCK)


@pytest.fixture(scope="session", params=["llada", "dream"])
def model(request) -> DiffusionLM:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------
# trace helpers (fixtures, since test modules must not import each other)


class TraceTools:
    @staticmethod
    def committed(trace, mask_id: int) -> np.ndarray:
        """(steps, gen) bool: positions committed by each step (masked before, not masked after)."""
        return trace.masked_before & (trace.tokens_after != mask_id)

    @staticmethod
    def masked_after(trace, mask_id: int) -> np.ndarray:
        return trace.tokens_after == mask_id


@pytest.fixture(scope="session")
def tt() -> TraceTools:
    return TraceTools()


# ---------------------------------------------------------------------------------------------
# the scripted model


class ScriptedNet(nn.Module):
    """Logits from `plan(prompt, gen_tokens, g) -> (token, confidence)` for every generation index g.

    The generation region is the last `gen_length` columns (the loop left-pads), so g does not
    depend on padding; the prompt is the unpadded part before it. Prompt positions get flat logits.
    """

    def __init__(self, vocab: int, gen_length: int, mask_id: int, plan: Callable):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # DiffusionLM reads device/dtype from a parameter
        self.vocab_size = vocab
        self.gen_length = gen_length
        self.mask_id = mask_id
        self.plan = plan
        self.calls: list[int] = []  # batch size of every forward

    def forward(self, input_ids, position_ids=None, key_mask=None, cache=None):
        batch, seq = input_ids.shape
        self.calls.append(batch)
        gen = self.gen_length
        logits = torch.zeros(batch, seq, self.vocab_size)
        # the mask id is removed by the loop; the other vocab-2 tokens share 1 - p
        others = self.vocab_size - 2
        for r in range(batch):
            prompt_cols = input_ids[r, : seq - gen]
            if key_mask is not None:
                prompt_cols = prompt_cols[key_mask[r, : seq - gen].bool()]
            prompt = tuple(int(t) for t in prompt_cols)
            gen_tokens = [int(t) for t in input_ids[r, seq - gen :]]
            for g in range(gen):
                token, conf = self.plan(prompt, gen_tokens, g)
                conf = min(max(conf, 1e-6), 1 - 1e-6)
                logits[r, seq - gen + g, token] = math.log(conf / (1 - conf) * others)
        return logits


@pytest.fixture(scope="session")
def scripted_tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def scripted(scripted_tokenizer):
    """Factory: `scripted(plan, gen_length=32, block_length=8)` -> a DiffusionLM driven by `plan`."""

    def make(plan: Callable, gen_length: int = 32, block_length: int = 8) -> DiffusionLM:
        tok = scripted_tokenizer
        hf = tok.hf
        mask_id = hf.convert_tokens_to_ids("<|mdm_mask|>")
        eos = hf.eos_token_id
        eot = tok.token_id("<|eot_id|>")
        net = ScriptedNet(len(hf) + 3, gen_length, mask_id, plan).eval()
        return DiffusionLM(
            network=net,
            tokenizer=tok,
            mask_id=mask_id,
            eos_id=eos,
            stop_ids=(eos, eot),
            pad_id=eos,
            name="scripted",
            defaults=DecodeDefaults(gen_length=gen_length, block_length=block_length),
            max_length=256,
        )

    return make

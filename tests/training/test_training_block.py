"""Block-diffusion fine-tuning (`unmask train sft --block-diffusion`), SDAR's two-copy recipe.

The masks are written out by hand from the rule (noisy -> noisy of its own block, noisy -> clean of
earlier blocks, clean -> clean of its block and earlier ones); the two-copy logits of each block
must be what the block-causal model says when decoding that block over clean earlier blocks; a
fine-tuned checkpoint reloads as a block-diffusion model whose cache is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unmask.decoding import generate
from unmask.errors import UnmaskError
from unmask.models import load_model
from unmask.testing import tiny_llada, write_tiny_llada
from unmask.training.block import make_block_causal, region_mask, two_copy_logits, two_copy_mask
from unmask.training.sft import prepare
from unmask.training.trainer import TrainConfig, masked_diffusion_loss

TASKS = ("arith:train_size=300", "trace:train_size=300")


def test_two_copy_mask_written_out_by_hand():
    # positions 0..3 in blocks of 2: blocks [0, 0, 1, 1]; queries and keys [noisy 0-3, clean 0-3]
    mask = two_copy_mask(torch.arange(4)[None], 2)[0].int().tolist()
    assert mask == [
        # noisy keys | clean keys
        [1, 1, 0, 0, 0, 0, 0, 0],  # noisy 0 (block 0): its own block; no earlier clean block
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noisy 2 (block 1): its own noisy block and clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean 0 (block 0): clean block 0 only, never the noisy copy
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # clean 2 (block 1): clean blocks 0 and 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]


def test_the_generation_region_runs_to_the_end_of_its_last_block():
    # gen_length 4 in blocks of 4, response columns 4 + 3 = 7. A 3-token prompt: its tail of 3 and 4
    # tokens take blocks 0-1 (8 positions), 5 of them response. A 4-token prompt ends block 0: the
    # 4 tokens fill block 1, 4 response columns. A 5-token prompt: tail 1 + 4 in blocks 1-2, 7 columns.
    rows = []
    for prompt in (3, 4, 5):
        pad = 5 - prompt
        rows.append([False] * pad + [True] * (prompt + 7))
    attention = torch.tensor(rows)
    response = torch.zeros_like(attention)
    response[:, 5:] = True
    inside = region_mask(attention, response, 4, 4)
    assert inside[:, 5:].sum(1).tolist() == [5, 4, 7] and not inside[:, :5].any()
    assert inside[0, 5:].tolist() == [True] * 5 + [False] * 2  # the first columns, never a gap


def test_each_blocks_two_copy_logits_are_what_decoding_that_block_sees():
    # the noisy copy's logits at block k must equal the block-causal model's on a canvas whose blocks
    # before k are clean and whose block k is the noisy one (later blocks are never seen)
    torch.manual_seed(0)
    model = tiny_llada(block_causal=True)
    block, seq = 4, 12
    clean = torch.randint(5, 40, (1, seq))
    noisy = clean.clone()
    noisy[0, [1, 2, 5, 8, 9, 11]] = model.mask_id
    attention = torch.ones_like(clean, dtype=torch.bool)
    keep = torch.arange(seq)[None]
    with torch.no_grad():
        got = two_copy_logits(model, noisy, clean, attention, block, keep)
        for k in range(seq // block):
            canvas = torch.cat([clean[:, : k * block], noisy[:, k * block:]], 1)
            want = model.logits(canvas, attention, model.position_ids(attention), attn_block=block)
            span = slice(k * block, (k + 1) * block)
            torch.testing.assert_close(got[:, span], want[:, span], atol=1e-5, rtol=1e-5)


def test_block_loss_scores_only_the_region_and_divides_by_its_answer_positions(tmp_path):
    config = TrainConfig(out=str(tmp_path / "run"), init=str(write_tiny_llada(tmp_path / "init")), tasks=TASKS,
                         batch_size=6, eval_every=0, save_every=0, progress=False, steps=1, gen_length=48,
                         block_length=16, block_diffusion=True)
    trainer = prepare(config)
    batch = trainer.next_batch()
    assert batch.gen_length == 48 + 15  # a block more, less one position
    loss, info = masked_diffusion_loss(trainer.model, batch, torch.Generator().manual_seed(0), block_length=16,
                                       block_diffusion=48)
    prompts = batch.attention_mask.sum(1) - 63
    regions = [-(-(int(p) + 48) // 16) * 16 - int(p) for p in prompts]  # whole blocks, less the prompt's tail
    assert info["response"][:, -63:].sum(1).tolist() == regions
    assert len(set(regions)) > 1  # prompts of several lengths: the regions differ
    assert not (info["masked"] & ~info["response"]).any()
    assert torch.isfinite(loss) and float(loss) > 0


def test_a_fine_tuned_checkpoint_reloads_as_a_block_diffusion_model_with_an_exact_cache(tmp_path):
    init = write_tiny_llada(tmp_path / "init")
    config = TrainConfig(out=str(tmp_path / "run"), init=str(init), tasks=TASKS, batch_size=4, eval_every=0,
                         save_every=0, progress=False, steps=2, gen_length=48, block_length=16, block_diffusion=True)
    prepare(config).train()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["block_causal"] is True
    model = load_model(str(tmp_path / "run"), device="cpu")
    assert model.block_diffusion is not None and model.block_diffusion.store_calls is False
    for spec in ("low_confidence", "threshold:tau=0.9", "psd"):
        plain, cached = (generate(model, ["tom has 5 apples"], spec, gen_length=48, block_length=16, cache=c, chat=False)
                         .sequences[0] for c in ("none", "dual"))
        assert plain.tokens == cached.tokens, spec
    # resumed, it carries on as a block-diffusion run
    resumed = prepare(TrainConfig(out=str(tmp_path / "run"), steps=3, resume=True, progress=False))
    assert resumed.config.block_diffusion and resumed.model.block_diffusion is not None
    # trained further without --block-diffusion, it is refused in one line
    with pytest.raises(UnmaskError, match="is a block-diffusion model; train it with --block-diffusion"):
        prepare(TrainConfig(out=str(tmp_path / "more"), init=str(tmp_path / "run"), tasks=TASKS, progress=False))


def test_refusals_name_what_to_change(tmp_path):
    with pytest.raises(UnmaskError, match="drop --block-masking"):
        TrainConfig(out=str(tmp_path), block_diffusion=True, block_frac=0.5).validate()
    sdar = load_model(str(Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "sdar" / "checkpoint"),
                      device="cpu")
    with pytest.raises(UnmaskError, match="fine-tunes LLaDA-layout networks"):
        make_block_causal(sdar)

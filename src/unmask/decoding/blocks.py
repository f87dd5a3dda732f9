"""Block completion's one rule that changes tokens: the stop rule."""

from __future__ import annotations

from typing import Callable

import torch


def stop_rule(table, slots: torch.Tensor, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              stop_ids) -> None:
    """A finished block holding a committed stop token, with only stop tokens predicted for every
    later masked position, ends the decode of that sequence: those positions are filled with their
    predictions, `predict(slots, later)` (r, gen) or wider, asked for only for the sequences whose
    finished block holds a stop token, at their `later` (r, gen) positions.

    Each sequence within its own generation (`row_gen`, in blocks of `row_block`): padding past it
    never counts."""
    gen_view = table.gen_view
    tokens = gen_view[slots]  # (r, gen)
    gen = tokens.shape[1]
    stop_ids = torch.as_tensor(stop_ids, device=tokens.device)
    own = table.row_gen[slots]  # (r,)
    block_end = (table.block_idx[slots] + 1) * table.row_block[slots]  # (r,)
    pos = torch.arange(gen, device=tokens.device)[None, :]
    decided_region = pos < block_end[:, None]
    has_stop = (torch.isin(tokens, stop_ids) & decided_region).any(-1) & (block_end < own)
    if not bool(has_stop.any()):
        return
    slots, tokens, own, block_end = slots[has_stop], tokens[has_stop], own[has_stop], block_end[has_stop]
    later = (pos >= block_end[:, None]) & (pos < own[:, None])
    predicted = predict(slots, later)[:, :gen]
    fire = (~later | torch.isin(predicted, stop_ids)).all(-1)
    if bool(fire.any()):
        fill_rows = slots[fire]
        table.canvas[fill_rows, table.prompt_len:] = torch.where(later[fire], predicted[fire], tokens[fire])
        table.stopped_early[fill_rows.cpu()] = True


STOP_RULES = ("predicted", "block", "answer", "none")


def stop_rule_of(policy, model, config) -> str:
    """The stop rule a decode runs: none without `early_stop`; else the policy's own (a family's
    decoder names its reference's), else the model's: `predicted` for bidirectional models, the
    family's for block-diffusion ones. A block-causal model never computes the positions after the
    block, so `predicted` becomes `block` there.

    - predicted: a finished block holding a stop token, with a stop token predicted at every later
      position, ends the sequence; the later positions are filled with their predictions (unmask's
      rule for LLaDA and Dream, `stop_rule` above).
    - block: a finished block whose generation so far holds a stop token ends the sequence (SDAR's
      generate, LLaDA2's own generate); the later blocks stay masked.
    - answer: the sequence ends as soon as a stop token is committed with nothing masked before it,
      even within a block (Fast-dLLM v2).
    - none: every block is decoded (LLaDA2.1's sampler by default).
    """
    if not config.early_stop:
        return "none"
    rule = getattr(policy, "stop_rule", None)
    if rule is None:
        rule = model.block_diffusion.stop_rule if model.block_diffusion is not None else "predicted"
    if rule == "predicted" and model.block_diffusion is not None:
        rule = "block"
    return rule


def block_stop(table, slots: torch.Tensor, stop_ids) -> torch.Tensor:
    """(r,) which of `slots`, whose current block just finished, hold a stop token in their
    generation up to that block's end; those are marked stopped early."""
    tokens = table.gen_view[slots]
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    end = (table.block_idx[slots] + 1) * table.row_block[slots]
    region = (pos >= table.lead[slots][:, None]) & (pos < end[:, None])
    fire = (torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device)) & region).any(-1)
    table.stopped_early[slots[fire].cpu()] = True
    return fire


def answer_stop(table, slots: torch.Tensor, stop_ids, mask_id: int | None = None) -> torch.Tensor:
    """(r,) which of `slots` hold a committed stop token in their generation with nothing masked
    before its first one (their answer can no longer change); those are marked stopped early."""
    tokens = table.gen_view[slots]
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    own = (pos >= table.lead[slots][:, None]) & (pos < table.row_gen[slots][:, None])
    is_stop = torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device)) & own
    first = torch.where(is_stop.any(-1), is_stop.float().argmax(-1), torch.full_like(slots, tokens.shape[1]))
    mask_id = table.model.mask_id if mask_id is None else mask_id
    masked_before = ((tokens == mask_id) & own & (pos < first[:, None])).any(-1)
    fire = is_stop.any(-1) & ~masked_before
    table.stopped_early[slots[fire].cpu()] = True
    return fire

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

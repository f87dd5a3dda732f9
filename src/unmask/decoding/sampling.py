"""Sampled candidates: LLaDA's Gumbel-max draw at a temperature, on the model's device.

Each sequence draws from its own generator (seeded with its seed, on the model's device), so a
prompt samples the same tokens alone or in any batch. The noise is float64, as LLaDA's is, and is
drawn one sequence at a time for its own block only: a step never holds more than one sequence's
(block, vocabulary) noise, and nothing crosses from the host.
"""

from __future__ import annotations

import math

import torch

# the noise of a slot past a sequence's own block (never committed): a constant, so such slots
# take the argmax and draw no numbers
_PAD_GUMBEL = -math.log(-math.log(0.5))


def gumbel_candidates(logits: torch.Tensor, temperature: list[float], generators: list[torch.Generator],
                      widths: list[int] | None = None, rows: list[int] | None = None) -> torch.Tensor:
    """Argmax of logits / T plus Gumbel noise drawn from each row's own generator, T per row.

    logits: (b, L, V); `rows`: the rows that sample (default all), each with its temperature,
    generator and width. `widths[j]`: the positions row j draws noise for (its own block; the
    default all L); the rest take the argmax, so a row draws the numbers it draws alone. Returns
    (len(rows), L)."""
    rows = list(range(logits.shape[0])) if rows is None else rows
    length, vocab = logits.shape[1:]
    widths = [length] * len(rows) if widths is None else widths
    out = torch.empty((len(rows), length), dtype=torch.long, device=logits.device)
    for n, (j, g, t, width) in enumerate(zip(rows, generators, temperature, widths)):
        scaled = logits[j].double() / t  # (L, V): one sequence at a time
        noise = torch.rand((width, vocab), generator=g, dtype=torch.float64, device=g.device).to(logits.device)
        scaled[:width] += -torch.log(-torch.log(noise.clamp(min=1e-20)))
        del noise
        scaled[width:] += _PAD_GUMBEL
        out[n] = scaled.argmax(-1)
    return out

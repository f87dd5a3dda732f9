"""The one small interface every model is seen through.

A `DiffusionLM` gives logits for every position at once (bidirectional attention), knows its
`mask_id` and its stop tokens, owns a tokenizer with a chat template, and lives on one device in
one dtype. Native networks (`llada.py`, `dream.py`) and the generic `transformers` adapter (`hf.py`)
all sit behind it, so the decode loop never knows which one it drives.

Shifted models (Dream predicts token i from the hidden state at i-1) are unshifted here: callers
always get "logits for position i".

Caching: `logits(..., cache=...)` is the hook the KV cache uses. A cache object owns per-layer keys
and values; native attention layers read and write it (see `unmask.models.cache`). Models that
cannot cache report `supports_cache = False` and the loop falls back to full forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unmask.models.tokenizer import Tokenizer


@dataclass
class DecodeDefaults:
    """Generation settings a checkpoint is best decoded with when the user gives none."""

    gen_length: int = 256
    block_length: int = 32


@dataclass
class DiffusionLM:
    """A masked diffusion LM behind the interface the decode loop uses.

    `network` maps (input_ids, position_ids, key_mask) to logits; for native models it is our own
    module, for the generic adapter a thin wrapper over `transformers`.
    """

    network: nn.Module
    tokenizer: Tokenizer
    mask_id: int
    eos_id: int
    stop_ids: tuple[int, ...]  # every token that ends an answer (EOS, end-of-turn)
    pad_id: int
    name: str
    shifted: bool = False
    max_length: int = 4096
    defaults: DecodeDefaults = field(default_factory=DecodeDefaults)
    supports_cache: bool = False
    path: str | None = None
    kind: str = "llada"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return self.network.vocab_size  # type: ignore[attr-defined]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "DiffusionLM":
        self.network.to(device=device, dtype=dtype)
        return self

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that ignore left padding, so a padded row sees the positions it has alone."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def logits(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq) bool, False on padding
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Logits for every position (batch, seq, vocab), already unshifted for shifted models."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            position_ids = self.position_ids(attention_mask)
        out = self.network(input_ids, position_ids=position_ids, key_mask=attention_mask, cache=cache)
        if self.shifted:
            # position i is predicted from hidden state i-1; a row's first real position (position 0,
            # after any left padding) keeps its own row, as it does when the row is decoded alone
            shifted = torch.cat([out[:, :1], out[:, :-1]], dim=1)
            out = torch.where((position_ids == 0)[..., None], out, shifted)
        return out

    def logits_at(
        self,
        input_ids: torch.Tensor,  # (rows, seq) whole canvases
        position_ids: torch.Tensor,  # (rows, seq)
        query_pos: torch.Tensor,  # (rows, q) canvas positions whose logits are wanted
        cache: Any,
        read_only: bool = False,
        rows: torch.Tensor | None = None,  # sequence of each row in the cache
    ) -> torch.Tensor:
        """Logits (rows, q, vocab) at `query_pos` only, attending over the cached keys and values.

        For a shifted model the queries are the positions before `query_pos` (their hidden states
        predict `query_pos`), so the caller never deals with the shift.
        """
        source = (query_pos - 1).clamp(min=0) if self.shifted else query_pos
        cache.partial(rows if rows is not None else torch.arange(input_ids.shape[0], device=input_ids.device), source, read_only)
        tokens = input_ids.gather(1, source)
        positions = position_ids.gather(1, source)
        return self.network(tokens, position_ids=positions, key_mask=None, cache=cache)

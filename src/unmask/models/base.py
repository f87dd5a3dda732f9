"""The one small interface every model is seen through.

A `DiffusionLM` gives logits for every position at once (bidirectional attention), knows its
`mask_id` and its stop tokens, owns a tokenizer with a chat template, and lives on one device in
one dtype. Native networks (`llada.py`, `dream.py`) and the generic `transformers` adapter (`hf.py`)
all sit behind it, so the decode loop never knows which one it drives.

Shifted models (Dream predicts token i from the hidden state at i-1) are unshifted here: callers
always get "logits for position i".

Projection: a decode reads the logits of few positions (the current block of each canvas), so the
interface splits a call in two: `features(...)` runs the network and keeps its output only at the
positions asked for, and `head(features)` projects them to the vocabulary. The native networks'
features are hidden states (`body` and `head`), so nothing vocabulary-sized is computed for a
position nobody reads; any other network's features are its logits.

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
    # what `unmask serve --strategy auto` runs on this checkpoint, where it was measured for it (config
    # `unmask_defaults.serve_strategy`; `builtin:block` names its own); None: `serving_default`'s rule
    serve_strategy: str | None = None


@dataclass(frozen=True)
class BlockDiffusion:
    """A block-diffusion family (LLaDA2.x, SDAR, Fast-dLLM v2): attention is block-causal, in blocks of
    the decode's block length anchored at position 0 (a prompt that does not end on a block boundary
    shares its last block with the first generated tokens), so a finished block's keys and values
    never change and the KV cache is exact. How the family's reference code runs its blocks:

    - `store_calls`: with the cache, the prompt's complete blocks are written by a call of their own
      (prefill) and each finished block by one more call over its final tokens (SDAR's store pass,
      Fast-dLLM v2's finalize), each one NFE; otherwise (LLaDA2) a block's first call computes the
      previous block again with the new one, which writes its keys at no extra call.
    - `bonus`: that call's last position predicts the next block's first token, which is committed at
      once, greedily (Fast-dLLM v2: its logits are shifted, so the prediction for a block's first
      position depends on finished blocks only). Needs the call with or without a cache.
    - `stop_rule`: the family's default stop rule (see `unmask.decoding.blocks`).
    """

    store_calls: bool = False
    bonus: bool = False
    stop_rule: str = "block"


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
    block_diffusion: BlockDiffusion | None = None  # None: bidirectional attention (LLaDA, Dream, LLaDA-MoE)
    default_strategy: str = "low_confidence"  # the family's own decoder (`unmask generate --strategy auto`)

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

    @property
    def has_head(self) -> bool:
        """Whether the network has a separate `head` (hidden states -> logits; its forward takes `keep`
        and `project=False`): the native networks do, so a decode projects to the vocabulary only
        the positions it reads."""
        return callable(getattr(self.network, "head", None))

    def _sources(self, at: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The canvas positions whose outputs predict `at` (rows, q): `at` itself, or for a shifted
        model the position before it, except at a row's first real position (position 0), which
        keeps its own output as it does when the row is decoded alone."""
        if not self.shifted:
            return at
        first = position_ids.gather(1, at) == 0
        return torch.where(first, at, (at - 1).clamp(min=0))

    def features(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq) bool, False on padding
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        at: torch.Tensor | None = None,  # (batch, q) positions whose predictions are wanted (default: all)
        attn_block: int | None = None,  # a block-diffusion model's block length (its attention is block-causal)
        shift: bool = True,  # False: `at` are the positions whose hidden states are wanted, whatever the shift
    ) -> torch.Tensor:
        """What `head` turns into the logits predicting `at` (batch, q, F), already unshifted.

        For a native network these are its final (normed) hidden states, F = its width, computed for
        every position (attention needs them) but kept only at `at`; for any other network they are
        its logits at `at`, F = the vocabulary, and `head` only casts them.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            position_ids = self.position_ids(attention_mask)
        if at is None:
            at = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        source = self._sources(at, position_ids) if shift else at
        extra = self._block_kwargs(attn_block)
        if self.has_head:
            return self.network(input_ids, position_ids=position_ids, key_mask=attention_mask, cache=cache,
                                keep=source, project=False, **extra)
        out = self.network(input_ids, position_ids=position_ids, key_mask=attention_mask, cache=cache, **extra)
        return out.gather(1, source[..., None].expand(-1, -1, out.shape[-1]))

    def features_at(
        self,
        input_ids: torch.Tensor,  # (rows, seq) whole canvases
        position_ids: torch.Tensor,  # (rows, seq)
        query_pos: torch.Tensor,  # (rows, q) canvas positions whose predictions are wanted
        cache: Any,
        read_only: bool = False,
        rows: torch.Tensor | None = None,  # sequence of each row in the cache
        attn_block: int | None = None,
        shift: bool = True,  # False: `query_pos` are the positions to compute, whatever the model's shift
    ) -> torch.Tensor:
        """`features` at `query_pos` only (rows, q, F), computing only those queries over the cached
        keys and values. For a shifted model the queries are the positions before `query_pos`
        (their hidden states predict `query_pos`), so the caller never deals with the shift. A
        block-causal model's queries attend only to the keys up to the end of the last query's block."""
        source = (query_pos - 1).clamp(min=0) if self.shifted and shift else query_pos
        limit = None
        if self.block_diffusion is not None and attn_block:
            last = int(position_ids.gather(1, source).max())  # the furthest query's position id ...
            limit = int((position_ids <= (last // attn_block + 1) * attn_block - 1).sum(-1).max())  # ... its block's end
        cache.partial(rows if rows is not None else torch.arange(input_ids.shape[0], device=input_ids.device), source,
                      read_only, key_limit=limit)
        tokens = input_ids.gather(1, source)
        positions = position_ids.gather(1, source)
        extra = self._block_kwargs(attn_block)
        if self.has_head:
            return self.network(tokens, position_ids=positions, key_mask=None, cache=cache, project=False, **extra)
        return self.network(tokens, position_ids=positions, key_mask=None, cache=cache, **extra)

    def _block_kwargs(self, attn_block: int | None) -> dict:
        """The network's block-causal argument: only a block-diffusion network takes one."""
        if self.block_diffusion is None:
            return {}
        if not attn_block:
            raise ValueError("a block-diffusion model is called with its block length (attn_block)")
        return {"attn_block": int(attn_block)}

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) from `features` (..., F), in the network's output dtype."""
        if self.has_head:
            return self.network.head(features)
        return features

    def logits(
        self,
        input_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq) bool, False on padding
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        attn_block: int | None = None,
    ) -> torch.Tensor:
        """Logits for every position (batch, seq, vocab), already unshifted for shifted models.
        `attn_block`: a block-diffusion model's block length."""
        return self.head(self.features(input_ids, attention_mask, position_ids, cache, attn_block=attn_block))

    def logits_at(
        self,
        input_ids: torch.Tensor,  # (rows, seq) whole canvases
        position_ids: torch.Tensor,  # (rows, seq)
        query_pos: torch.Tensor,  # (rows, q) canvas positions whose logits are wanted
        cache: Any,
        read_only: bool = False,
        rows: torch.Tensor | None = None,  # sequence of each row in the cache
        attn_block: int | None = None,
    ) -> torch.Tensor:
        """Logits (rows, q, vocab) at `query_pos` only, attending over the cached keys and values
        (see `features_at`)."""
        return self.head(self.features_at(input_ids, position_ids, query_pos, cache, read_only, rows, attn_block))

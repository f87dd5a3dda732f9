"""KV cache for the native networks: Fast-dLLM's prefix and dual approximations.

The loop refreshes the cache with one full forward at the start of every block (`fill`): every
layer's keys and values of the whole canvas are stored. Until the block completes, calls compute
only some query positions (`partial`) and attend over the stored keys, with the query positions'
own keys and values recomputed and written back:

- prefix: the queries are the current block and everything after it; the prompt and finished
  blocks are read from the cache.
- dual: the queries are the current block only; the prompt, finished blocks and the still-masked
  suffix are read from the cache (the suffix as it was at the block's start: the approximation).

Draft rows of PSD's verification (`read_only`) attend over their sequence's stored keys with their
own fresh keys at the query positions, and write nothing back, so drafts never see each other.

Memory: one canvas of keys and values per slot of the decode's row table and layer. A sequence that
joins takes a free slot, and its first call (a block start) fills that slot's rows: a join copies
nothing. Only growing the table (`grow`, by doubling, so rarely) or widening the canvas (a longer
prompt or generation joined: `widen`) copies the stored layers; narrowing it when the widest
sequences leave (`narrow`) is a view. The cache is released with the decode.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every canvas position, per layer, for the sequences of one decode."""

    def __init__(self, batch_size: int, key_mask: torch.Tensor, positions: torch.Tensor | None = None):
        self.batch_size = batch_size
        self.key_mask = key_mask  # (batch, seq) bool: False on padding
        self.positions = positions  # (batch, seq) position ids of the stored keys (block-causal models)
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (batch, kv_heads, seq, head_dim)
        self.values: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None  # sequences of the current call (one per row)
        self.query_pos: torch.Tensor | None = None  # (rows, q) canvas positions of the queries
        self.read_only = False
        self.key_limit: int | None = None  # set by partial(): the keys past it are left out
        self._all_rows = False  # set by partial(): the call covers every sequence, in order

    def grow(self, key_mask: torch.Tensor) -> None:
        """More slots: `key_mask` is the whole (larger) table's, new slots last.

        Their stored keys and values start empty (zeros); a slot's first call is a full forward that
        fills it, as for every sequence at the start of a block.
        """
        n = key_mask.shape[0] - self.batch_size
        for store in (self.keys, self.values):
            for layer, t in store.items():
                store[layer] = torch.cat([t, torch.zeros((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)])
        self.batch_size = key_mask.shape[0]
        self.key_mask = key_mask

    def widen(self, delta: int, key_mask: torch.Tensor, right: bool = False) -> None:
        """`delta` more padding positions on the left of every canvas (a longer prompt joined), or on
        the right with `right` (a longer generation joined). `key_mask` hides them."""
        for store in (self.keys, self.values):
            for layer, t in store.items():
                pad = torch.zeros(t.shape[:2] + (delta,) + t.shape[3:], dtype=t.dtype, device=t.device)
                store[layer] = torch.cat([t, pad] if right else [pad, t], dim=2)
        self.key_mask = key_mask

    def narrow(self, left: int, right: int, key_mask: torch.Tensor) -> None:
        """Drop `left` padding positions on the left of every canvas and `right` on the right (the
        sequences that needed them left); a view, no copy."""
        for store in (self.keys, self.values):
            for layer, t in store.items():
                store[layer] = t[:, :, left : t.shape[2] - right]
        self.key_mask = key_mask

    # -- set by the loop before each call -------------------------------------------------------
    def fill(self, rows: torch.Tensor) -> "KVCache":
        self.rows, self.query_pos, self.read_only, self.key_limit = rows, None, False, None
        return self

    def partial(self, rows: torch.Tensor, query_pos: torch.Tensor, read_only: bool = False,
                key_limit: int | None = None) -> "KVCache":
        """The next call computes `query_pos` (rows, q) of `rows`; with `key_limit` its queries attend
        to the first `key_limit` canvas positions only (a block-causal call: later keys are hidden
        from every query anyway, so they are left out rather than masked)."""
        self.rows, self.query_pos, self.read_only, self.key_limit = rows, query_pos, read_only, key_limit
        self._all_rows = rows.shape[0] == self.batch_size and bool(
            (rows == torch.arange(self.batch_size, device=rows.device)).all())
        return self

    def layout(self, key_mask: torch.Tensor, positions: torch.Tensor | None) -> None:
        """The canvas changed (rows joined, or it widened or narrowed): its key mask and positions."""
        self.key_mask, self.positions = key_mask, positions

    # -- called by every attention layer ---------------------------------------------------------
    def key_positions(self, query_positions: torch.Tensor) -> torch.Tensor:
        """Position ids of the keys the last `update` returned: the queries' own (a fill), or the
        stored canvas of this call's rows (a partial call attends over it)."""
        if self.query_pos is None:
            return query_positions
        if self.positions is None:
            raise ValueError("a block-causal cached call needs the canvas positions (KVCache.layout)")
        positions = self.positions if self._all_rows else self.positions[self.rows]
        return positions if self.key_limit is None else positions[:, : self.key_limit]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, key_mask):
        """Merge this call's keys/values (rows, kv_heads, q, head_dim) with the stored ones."""
        rows = self.rows
        if self.query_pos is None:
            if layer not in self.keys:
                shape = (self.batch_size,) + tuple(k.shape[1:])
                self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
                self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
            self.keys[layer][rows] = k
            self.values[layer][rows] = v
            return k, v, key_mask
        if layer not in self.keys:  # a block-diffusion decode fills its cache by partial calls only
            shape = (self.batch_size, k.shape[1], self.key_mask.shape[1], k.shape[3])
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        stored_k, stored_v = self.keys[layer], self.values[layer]
        index = self.query_pos
        r = torch.arange(index.shape[0], device=index.device)[:, None]
        if self.read_only:
            full_k, full_v = stored_k[rows].clone(), stored_v[rows].clone()
            full_k[r, :, index] = k.transpose(1, 2)
            full_v[r, :, index] = v.transpose(1, 2)
            return self._limited(full_k, full_v, self.key_mask[rows])
        stored_k[rows[:, None], :, index] = k.transpose(1, 2)
        stored_v[rows[:, None], :, index] = v.transpose(1, 2)
        if self._all_rows:
            return self._limited(stored_k, stored_v, self.key_mask)
        return self._limited(stored_k[rows], stored_v[rows], self.key_mask[rows])

    def _limited(self, keys, values, key_mask):
        limit = self.key_limit
        if limit is None:
            return keys, values, key_mask
        return keys[:, :, :limit], values[:, :, :limit], key_mask[:, :limit]

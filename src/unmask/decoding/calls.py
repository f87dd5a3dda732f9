"""Model calls: the one place a decode calls the model, counts NFE and rows, and checks outputs.

A call asks the model for features (its final hidden states; see `DiffusionLM.features`) at the
generation positions it needs: every position without a cache or at a block start (a cache refresh),
the block and what follows it under the prefix cache, the block alone under the dual cache. The
current block's features become logits, the one vocabulary-sized tensor a step keeps (policies read
it). Every other position is read only by the stop rule (its top-1, when a block completes holding a
stop token) and by a recorded trace (its statistics). For a network with a separate head, those
positions keep their hidden states (`known_feat`, the width of the model per position) and are
projected only when read (`predictions`), a chunk at a time (`unmask.decoding.stats`); a network
whose features are its logits already paid for them, so their top-1 is kept at once (`known_top1`),
as are the statistics whenever a trace is recorded.

Every position a call returns within its sequence's own generation is one the decode may read, so
every one is checked: NaN or +inf logits, or no finite logit once the mask token's is -inf, stop
the decode with `NonFiniteLogitsError` (a position kept as hidden states is checked for NaN and
infinities there, and its logits again when projected). Prompt positions are never returned and
right padding (past a shorter sequence's generation) is never projected.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from unmask.decoding.rows import TRACE_FIELDS, RowTable
from unmask.decoding.stats import project_stats
from unmask.errors import NonFiniteLogitsError


@dataclass
class Said:
    """What a verification's accepted canvas said, which its sequence's next step reuses instead of
    calling the model: its features at the generation positions the call computed (the whole
    generation without a cache, the block with one)."""

    where: torch.Tensor  # (q,) generation positions
    features: torch.Tensor  # (q, F)


def width_groups(widths: torch.Tensor, block: int) -> list[torch.Tensor]:
    """The rows of one block-diffusion step, grouped into cached calls by how much they compute
    (`widths`, positions per row): a call computes one width for all its rows, padding the narrower
    ones by repeating their last position. Rows that also compute what is before their block (a
    block's first call: the finished block again, or the prompt) go in one call and the rest, which
    compute their block alone, in another, so a row starting a block never widens the others' call.
    Each row is in exactly one group (one NFE); one group when all rows are alike."""
    wide = widths > block
    if int(wide.sum()) in (0, widths.shape[0]):
        return [torch.arange(widths.shape[0], device=widths.device)]
    return [wide.nonzero()[:, 0], (~wide).nonzero()[:, 0]]


class ModelCalls:
    """Calls the model for slots of a `RowTable`; counts each sequence's NFE and rows, times the calls."""

    def __init__(self, model, table: RowTable, cache_mode: str):
        self.model = model
        self.table = table
        self.cache_mode = cache_mode
        self.cuda = model.device.type == "cuda"
        # seconds inside the model and inside the policy's decisions (the rest is the loop's own
        # bookkeeping); on a GPU both are taken after a synchronize, so they are true time
        self.seconds = {"model_s": 0.0, "policy_s": 0.0}
        self._checks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stat_keys = ("top1",) + (TRACE_FIELDS if table.record_trace else ())
        self.attn_block = table.attn_block  # block-diffusion models: the attention's block length
        # positions outside the block keep hidden states until read (a network with a head, no trace)
        self.lazy = model.has_head and not table.record_trace

    @contextlib.contextmanager
    def timed(self, key: str):
        """Add the seconds of the enclosed work to `self.seconds[key]`."""
        if self.cuda:
            torch.cuda.synchronize(self.model.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.model.device)
            self.seconds[key] += time.perf_counter() - t0

    # --- calling -------------------------------------------------------------------------------
    def forward(self, slots: torch.Tensor, where: torch.Tensor, *, partial: bool, tokens: torch.Tensor | None = None,
                owners: torch.Tensor | None = None, rows_per_seq=1, read_only: bool = False) -> torch.Tensor:
        """Features (canvases, q, F) at generation positions `where` (canvases, q). One NFE for each
        sequence of `slots`, and `rows_per_seq` rows (an int, or one per sequence).

        `tokens` may hold several canvases per sequence (PSD's drafts), `owners` the slot of each.
        Without `partial` the whole canvas is forwarded (and a cache, if any, refreshed from it);
        with it only `where` is computed, over the cached keys (written back unless `read_only`).
        """
        table, model = self.table, self.model
        owners = slots if owners is None else owners
        tokens = table.canvas[owners] if tokens is None else tokens
        at = where + table.prompt_len
        cache = table.cache
        with self.timed("model_s"):
            if partial:
                out = model.features_at(tokens, table.positions[owners], at, cache, read_only=read_only, rows=owners,
                                        attn_block=self.attn_block)
            else:
                fill = cache.fill(owners) if cache is not None and not read_only else None
                width = tokens.shape[1]
                if self.attn_block is not None:  # block-causal: nothing after the furthest position asked for matters
                    width = min(width, int(at.max()) + 1)
                out = model.features(tokens[:, :width], table.attention[owners, :width], table.positions[owners, :width],
                                     cache=fill, at=at, attn_block=self.attn_block)
        self.count(slots, rows_per_seq)
        return out

    def count(self, slots: torch.Tensor, rows_per_seq=1) -> None:
        """One NFE for each sequence of `slots`, and `rows_per_seq` rows (an int, or one per sequence)."""
        cpu = slots.cpu()
        self.table.nfe[cpu] += 1
        self.table.rows_count[cpu] += rows_per_seq if isinstance(rows_per_seq, int) else rows_per_seq.cpu()

    # --- block diffusion -----------------------------------------------------------------------
    def block_features(self, slots: torch.Tensor, block_pos: torch.Tensor) -> torch.Tensor:
        """The current block's features (n, block, F) of a block-diffusion model, for `slots` whose
        blocks are `block_pos` (n, block). Attention is block-causal, so later blocks never matter:
        without a cache one forward of the canvas up to the furthest block end; with the exact cache
        only the positions from the first whose stored keys are not final (the finished block before
        this one when the family computes it again here; for a shifted model the position before the
        block, whose hidden state predicts the block's first token) to the block's end, over the
        cached keys, writing theirs; the rows starting a block and the others in separate calls
        (`width_groups`)."""
        table, model = self.table, self.model
        if table.cache is None:
            return self.forward(slots, block_pos, partial=False)
        shift = int(model.shifted)
        starts = table.prompt_len + block_pos[:, 0]
        ends = torch.minimum(starts + block_pos.shape[1], table.prompt_len + table.row_gen[slots])
        first = torch.minimum(table.kv_done[slots], starts - shift).clamp(min=table.prompt_start[slots])
        sources = table.prompt_len + block_pos - shift
        groups = width_groups(ends - first, block_pos.shape[1])
        if len(groups) == 1:
            out = self.compute(slots, first, ends, sources)
        else:
            parts = [(g, self.compute(slots[g], first[g], ends[g], sources[g])) for g in groups]
            out = parts[0][1].new_empty((slots.shape[0],) + tuple(parts[0][1].shape[1:]))
            for g, part in parts:
                out[g] = part
        table.kv_done[slots] = starts  # everything before the current block is final and stored
        return out

    def compute(self, slots: torch.Tensor, first: torch.Tensor, ends: torch.Tensor, sources: torch.Tensor,
                read_only: bool = False, tokens: torch.Tensor | None = None, owners: torch.Tensor | None = None,
                rows_per_seq=1) -> torch.Tensor:
        """One cached call computing canvas positions [first, end) of each canvas (padded by repeating
        the last: a duplicate query writes the same keys), returning the hidden states at `sources`
        (canvases, q) canvas positions. One NFE for each sequence of `slots`; `tokens` may hold
        several canvases per sequence (verification), `owners` the slot of each."""
        table = self.table
        owners = slots if owners is None else owners
        tokens = table.canvas[owners] if tokens is None else tokens
        width = int((ends - first).max())
        computed = torch.minimum(first[:, None] + torch.arange(width, device=first.device)[None], ends[:, None] - 1)
        with self.timed("model_s"):
            out = self.model.features_at(tokens, table.positions[owners], computed, table.cache, read_only=read_only,
                                         rows=owners, attn_block=self.attn_block, shift=False)
        self.count(slots, rows_per_seq)
        pick = (computed[:, :, None] == sources[:, None, :]).long().argmax(1)  # (canvases, q)
        return out[torch.arange(owners.shape[0], device=owners.device)[:, None], pick]

    def hidden_at(self, slots: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Without a cache: one forward of the canvas up to the furthest of `sources` (n, q) canvas
        positions, returning the hidden states there (block-causal, so nothing later matters). One
        NFE per row."""
        table = self.table
        width = int(sources.max()) + 1
        with self.timed("model_s"):
            out = self.model.features(table.canvas[slots, :width], table.attention[slots, :width],
                                      table.positions[slots, :width], at=sources, attn_block=self.attn_block,
                                      shift=False)
        self.count(slots)
        return out

    def prefill(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The call over the prompt's complete blocks (one NFE for each row that has any): with the
        cache it writes their keys (the store-calls families' first call). Returns those rows and the
        hidden state of the prompt's last position (n, F), which predicts the generation's first
        token for a shifted model."""
        table = self.table
        rows = slots[table.prompt_start[slots] < table.prompt_len]
        if rows.numel() == 0:
            return rows, None
        last = torch.full_like(rows, table.prompt_len - 1)[:, None]
        if table.cache is None:
            return rows, self.hidden_at(rows, last)[:, 0]
        out = self.compute(rows, table.prompt_start[rows], torch.full_like(rows, table.prompt_len), last)[:, 0]
        table.kv_done[rows] = table.prompt_len
        return rows, out

    def store(self, slots: torch.Tensor, block_pos: torch.Tensor) -> torch.Tensor:
        """The call over each row's just finished block `block_pos` (n, block) with its final tokens:
        with the cache it writes their keys (SDAR's store pass, Fast-dLLM v2's finalize). Returns the
        hidden state of each block's last position (n, F), which predicts the next block's first
        token for a shifted model. One NFE per row."""
        table = self.table
        starts = table.prompt_len + block_pos[:, 0]
        ends = starts + block_pos.shape[1]
        last = (ends - 1)[:, None]
        if table.cache is None:
            return self.hidden_at(slots, last)[:, 0]
        out = self.compute(slots, torch.minimum(table.kv_done[slots], starts), ends, last)[:, 0]
        table.kv_done[slots] = ends
        return out

    # --- projecting and checking ---------------------------------------------------------------
    def logits(self, features: torch.Tensor, owners: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """Float32 logits (n, q, V) of `features` (n, q, F), the mask token's at -inf; `read` (n, q)
        marks the positions the decode reads (the others, right padding, are not checked)."""
        logits = self.model.head(features).float()
        logits[..., self.model.mask_id] = float("-inf")
        # the row maximum is NaN if any logit is, +inf if any is, -inf if none is finite: one cheap check
        finite = torch.isfinite(logits.amax(-1))
        self.expect(owners[:, None].expand_as(read)[read], finite[read])
        return logits

    def stats(self, features: torch.Tensor, owners: torch.Tensor, keys=None) -> dict[str, torch.Tensor]:
        """Statistics (n,) of `features` (n, F) read only through them, a chunk at a time; checked."""
        stats, finite = project_stats(features, self.model.head, self.model.vocab_size, self.model.mask_id,
                                      keys or self.stat_keys)
        self.expect(owners, finite)
        return stats

    def expect(self, owners: torch.Tensor, finite: torch.Tensor) -> None:
        """Note positions of one call (their slots `owners`) and whether each was finite."""
        self._checks.append((owners, finite))

    def check(self, verifying: bool = False) -> None:
        """Raise `NonFiniteLogitsError` if any position noted since the last check was not finite."""
        checks, self._checks = self._checks, []
        if not checks:
            return
        owners = torch.cat([o for o, _ in checks])
        finite = torch.cat([f for _, f in checks])
        if bool(finite.all()):
            return
        table = self.table
        size = table.cap
        bad = torch.bincount(owners[~finite], minlength=size).cpu()
        checked = torch.bincount(owners, minlength=size).cpu()
        slots = bad.nonzero().squeeze(1).tolist()
        details = {table.seq[s]: (int(bad[s]), int(checked[s]), int(table.nfe[s]), int(table.block_idx[s]))
                   for s in slots}
        blocks = {table.seq[s]: int(table.row_blocks[s]) for s in slots}
        raise NonFiniteLogitsError(details, blocks, verifying=verifying)

    def outside(self, slots: torch.Tensor, where: torch.Tensor, features: torch.Tensor,
                block_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """What to keep of the positions of `where` (n, q) outside each row's block `block_pos`
        (n, block) and inside its own generation, from `features` (n, q, F), flat: the slot and
        generation position of each, and their features (lazy) or statistics."""
        in_block = (where[:, :, None] == block_pos[:, None, :]).any(-1)
        keep = ~in_block & (where < self.table.row_gen[slots][:, None])
        owners = slots[:, None].expand_as(keep)[keep]
        kept = features[keep]
        if self.lazy:
            self.expect(owners, torch.isfinite(kept).all(-1))
            return owners, where[keep], {"feat": kept}
        return owners, where[keep], self.stats(kept, owners)

    def remember(self, owners: torch.Tensor, where: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Write what a call said at (slot `owners`, generation position `where`) pairs into the
        slots' last-known predictions (a cached call leaves the other positions as they were)."""
        table = self.table
        if where.numel() == 0:
            return
        if "feat" in stats:
            feat = stats["feat"]
            if "known_feat" not in table.gen_fields:
                table.add_gen_field("known_feat", 0.0, feat.dtype, tuple(feat.shape[1:]))
            table.known_feat[owners, where] = feat
            return
        table.known_top1[owners, where] = stats["top1"]
        if table.record_trace:
            for key in TRACE_FIELDS:
                getattr(table, f"known_{key}")[owners, where] = stats[key]

    def predictions(self, slots: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """(r, gen) the last-known top-1 of `slots`, projected now where `later` (r, gen) and kept
        as hidden states; checked."""
        top1 = self.table.known_top1[slots].clone()
        if self.lazy and bool(later.any()):
            feat = self.table.known_feat[slots][later]
            top1[later] = self.stats(feat, slots[:, None].expand_as(later)[later], keys=("top1",))["top1"]
            self.check()
        return top1

"""The row table: every per-sequence value of one decode, in slots sized for the live sequences.

A decode's sequences live in slots (vLLM v1's persistent batch): one canvas row, one row of every
per-sequence tensor, one generator, one row of the policy's state and one of the KV cache each. A
sequence that joins takes the lowest free slot and has its row reset; a sequence that leaves gives
its slot back at once, dropping its generator, events and trace rows. The table grows (doubling)
only when every slot is taken, so its size follows the most sequences live at once, never how many
a decode has served, and a join copies nothing but its own row.

The canvas is shared: the prompt region is as wide as the longest live prompt (rows left padded)
and the generation region as wide as the longest live generation (rows right padded). A joiner that
is longer widens it (a copy of the canvas, the per-position buffers and the cache layers); when the
widest sequences leave, it narrows again (views), so calls compute no padding that no live sequence
needs.

Block-diffusion models (`model.block_diffusion`) anchor their blocks at position 0, so a prompt that
does not end on a block boundary shares its last block with the first generated tokens: that tail
(`lead` tokens) sits at the start of the sequence's generation region, decided from the start (a
view marks it `fixed`), and the generation region is as many whole blocks as cover the tail and
`gen_length` tokens. Results, streams and traces leave the tail out.

Per-block values (the stability streak, the previous confidence and the top-1s behind the temporal
redundancy) are only ever read inside the current block; the redundancy of a block is settled when
the block completes, so nothing here grows with the decode's history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from unmask.errors import UnmaskError
from unmask.models.cache import KVCache


@dataclass
class Joiner:
    """A sequence entering the decode."""

    seq: int  # its index in the decode (the order sequences joined in)
    prompt: list[int]
    seed: int
    temperature: float
    gen_length: int


# per-slot values: name -> (fill, dtype, on the model's device)
SLOT_FIELDS = {
    "row_gen": (0, torch.long, True),  # the sequence's own generation length
    "row_block": (1, torch.long, True),  # its block length (its whole generation for one_shot)
    "row_blocks": (0, torch.long, True),  # its number of blocks
    "max_steps": (1, torch.long, True),  # the step bound of one block
    "block_idx": (0, torch.long, True),
    "block_step": (0, torch.long, True),  # calls already made in the current block
    "active": (False, torch.bool, True),
    "nfe": (0, torch.long, False),
    "rows_count": (0, torch.long, False),
    "row_step": (0, torch.long, False),  # calls this sequence has taken part in
    "stopped_early": (False, torch.bool, False),
    "redundant": (0, torch.long, False),  # temporal redundancy of its finished blocks
    "lead": (0, torch.long, True),  # prompt tokens at the start of the generation region (block diffusion)
    "prompt_start": (0, torch.long, True),  # canvas column of the sequence's first prompt token
    "kv_done": (0, torch.long, True),  # canvas column up to which its cached keys are final (block diffusion)
}
# per-slot, per-generation-position values: name -> (fill, dtype, trailing shape); "mask" fills with
# the mask id
GEN_FIELDS = {
    "stable": (0, torch.long, ()),  # the stability streak (read in the current block only)
    "prev_top1": (-1, torch.long, ()),
    "prev_conf": (float("nan"), torch.float32, ()),
    "commit_step": (-1, torch.long, ()),
    "known_top1": ("mask", torch.long, ()),  # what the model last said there (a cached call computes some)
}
TRACE_FIELDS = ("top1_prob", "margin", "entropy")  # kept only when the trace is recorded


def attention_block(model, whole_generation: bool, block_length: int) -> int | None:
    """A block-diffusion model's attention block in a decode: the decode's block length, or, under a
    whole-generation policy (whose one block is the whole generation), the model's own default block
    length; None for a bidirectional model."""
    if model.block_diffusion is None:
        return None
    return int(model.defaults.block_length) if whole_generation else int(block_length)


def region_split(prompt_len: int, gen_length: int, attn_block: int | None) -> tuple[int, int]:
    """(prompt tokens in the prompt region, generation region width) of one sequence: for a block-
    diffusion model (`attn_block` set) the prompt's tail past its last whole block moves into the
    generation region, which grows to as many whole blocks as hold that tail and `gen_length` tokens."""
    if attn_block is None:
        return prompt_len, gen_length
    lead = prompt_len % attn_block
    return prompt_len - lead, -(-(lead + gen_length) // attn_block) * attn_block


def region_config(config, width: int, whole_generation: bool):
    """`config` for one sequence's generation region of `width` positions (what a policy's
    `check_lengths` is asked about): a whole-generation policy's one block is that region."""
    return replace(config, gen_length=width, block_length=width if whole_generation else config.block_length)


class RowTable:
    """Slots of one decode: canvas, counters, per-position buffers, generators and the policy's state.

    Tensors are indexed by slot first. `slots_of` / `seq` map between slots and sequences; a
    free slot is inactive and is never forwarded.
    """

    def __init__(self, model, policy, config, record_trace: bool, use_cache: bool):
        self.model, self.policy, self.config = model, policy, config
        self.device = model.device
        self.whole = policy.whole_generation
        self.record_trace = record_trace
        self.cap = 0
        self.prompt_len = 0
        self.gen = 0
        self.canvas = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.attention = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.positions = self.canvas.clone()
        for name, (fill, dtype, on_device) in SLOT_FIELDS.items():
            setattr(self, name, torch.zeros(0, dtype=dtype, device=self.device if on_device else "cpu"))
        self.gen_fields = dict(GEN_FIELDS)
        if record_trace:
            self.gen_fields.update({f"known_{k}": (float("nan"), torch.float32, ()) for k in TRACE_FIELDS})
        for name, (fill, dtype, trailing) in self.gen_fields.items():
            setattr(self, name, torch.zeros((0, 0) + trailing, dtype=dtype, device=self.device))
        # (slots, steps, gen): the top-1 at each call of the current block where the position stayed
        # masked after it (-1 elsewhere); settled into `redundant` when the block completes
        self.hist = torch.zeros((0, 0, 0), dtype=torch.long, device=self.device)
        self.seq: list[int | None] = []  # the sequence in each slot (None: free)
        self.prompts: list[list[int] | None] = []
        self.generators: list[torch.Generator | None] = []
        self.temps: list[float] = []
        self.events: list[dict[str, float]] = []
        self.trace_rows: list[list[dict] | None] = []
        self.remasked: list[list[tuple[int, int]]] = []
        self.edited: list[list[tuple[int, int]]] = []
        self.joined_at: list[float] = []
        self.state: Any = policy.init_state(0, 0, self.device)
        self.cache = KVCache(0, self.attention, self.positions) if use_cache else None
        # a block-diffusion model's attention blocks, anchored at position 0
        self.attn_block = attention_block(model, self.whole, config.block_length)

    # --- views ---------------------------------------------------------------------------------
    @property
    def block_len(self) -> int:
        """The width of the block views: the block length, or the generation region (one_shot)."""
        return self.gen if self.whole else int(self.config.block_length)

    @property
    def gen_view(self) -> torch.Tensor:
        """(slots, gen) the generation region of the canvas (a view: writes land in the canvas)."""
        return self.canvas[:, self.prompt_len:]

    def live(self) -> torch.Tensor:
        """Active slots, in slot order."""
        return self.active.nonzero().squeeze(1)

    def live_count(self) -> int:
        return sum(s is not None for s in self.seq)

    def add_gen_field(self, name: str, fill, dtype: torch.dtype, trailing: tuple = ()) -> None:
        """A per-slot, per-generation-position buffer with `trailing` dims more (the model's hidden
        states at each position, say), sized, reset, widened and narrowed with the others."""
        self.gen_fields[name] = (fill, dtype, trailing)
        setattr(self, name, torch.full((self.cap, self.gen) + trailing, fill, dtype=dtype, device=self.device))

    def _fill(self, fill):
        return self.model.mask_id if fill == "mask" else fill

    # --- joining -------------------------------------------------------------------------------
    def split(self, j: Joiner) -> tuple[int, int]:
        """(prompt tokens in the prompt region, generation region width) of a joiner: for a block-
        diffusion model the prompt's tail past its last whole block moves into the generation
        region, which grows to whole blocks."""
        return region_split(len(j.prompt), j.gen_length, self.attn_block)

    def check_fits(self, joiners: list[Joiner], width: int = 0) -> None:
        """Refuse joiners that would widen the canvas past the model's context."""
        model = self.model
        sizes = [self.split(j) for j in joiners]
        longest = max([p for p, _ in sizes] + [self.prompt_len, width])
        widest = max([g for _, g in sizes] + [self.gen])
        if longest + widest > model.max_length:
            if self.cap == 0:
                j = max(joiners, key=lambda j: sum(self.split(j)))
                tail = (f" (with the prompt's tail, {sum(self.split(j))} positions in whole blocks of {self.attn_block})"
                        if self.attn_block is not None else "")
                raise UnmaskError(
                    f"prompt ({len(j.prompt)} tokens) plus gen_length {j.gen_length}{tail} exceeds the model's context "
                    f"of {model.max_length}; shorten the prompt or the generation", field="gen_length")
            raise UnmaskError(
                f"a joining sequence (a {max(len(j.prompt) for j in joiners)}-token prompt, gen_length "
                f"{max(j.gen_length for j in joiners)}) would widen the decode's canvas to {longest} + {widest} "
                f"positions, which exceeds the model's context of {model.max_length}", field="prompt")

    def add(self, joiners: list[Joiner], width: int = 0) -> list[int]:
        """Give each joiner a free slot (the table grows if none is left) and reset that slot's row.

        `width`: the least width of the prompt region (left padding). Returns the joiners' slots."""
        self.check_fits(joiners, width)
        sizes = [self.split(j) for j in joiners]
        longest = max([p for p, _ in sizes] + [width])
        if longest > self.prompt_len:
            self._widen_prompt(longest - self.prompt_len)
        widest = max(g for _, g in sizes)
        if widest > self.gen:
            self._widen_gen(widest - self.gen)
        free = [s for s, q in enumerate(self.seq) if q is None]
        if len(free) < len(joiners):
            self._grow(max(len(joiners) - len(free), self.cap))  # at least doubles
            free = [s for s, q in enumerate(self.seq) if q is None]
        slots = free[: len(joiners)]
        now = time.perf_counter()
        for slot, j in zip(slots, joiners):
            self._reset(slot, j, now)
        slots_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        fresh = self.policy.init_state(len(slots), self.gen, self.device)
        self.state = reset_rows(self.state, fresh, slots_t)
        return slots

    def _reset(self, slot: int, j: Joiner, now: float) -> None:
        model, cfg = self.model, self.config
        for name, (fill, _, _) in SLOT_FIELDS.items():
            getattr(self, name)[slot] = fill
        for name, (fill, _, _) in self.gen_fields.items():
            getattr(self, name)[slot] = self._fill(fill)
        head, gen = self.split(j)
        lead = len(j.prompt) - head
        block = gen if self.whole else int(cfg.block_length)
        self.row_gen[slot] = gen
        self.row_block[slot] = block
        self.row_blocks[slot] = gen // block
        self.max_steps[slot] = cfg.max_steps_per_block or 4 * block
        self.active[slot] = True
        self.lead[slot] = lead
        self.prompt_start[slot] = self.prompt_len - head
        self.kv_done[slot] = self.prompt_len - head
        row = torch.full((self.canvas.shape[1],), model.pad_id, dtype=torch.long, device=self.device)
        row[self.prompt_len - head: self.prompt_len + lead] = torch.tensor(j.prompt, device=self.device)
        row[self.prompt_len + lead: self.prompt_len + gen] = model.mask_id
        self.canvas[slot] = row
        attention = torch.zeros_like(row, dtype=torch.bool)
        attention[self.prompt_len - head: self.prompt_len + gen] = True
        self.attention[slot] = attention
        self.positions[slot] = model.position_ids(attention[None])[0]
        self.seq[slot] = j.seq
        self.prompts[slot] = list(j.prompt)
        self.generators[slot] = torch.Generator(device=self.device).manual_seed(int(j.seed))
        self.temps[slot] = float(j.temperature)
        self.events[slot] = {}
        self.trace_rows[slot] = [] if self.record_trace else None
        self.remasked[slot] = []
        self.edited[slot] = []
        self.joined_at[slot] = now

    def release(self, slot: int) -> None:
        """The sequence in `slot` left: its slot is free, what it held is dropped, and the canvas
        narrows if it was the widest."""
        self.active[slot] = False
        self.seq[slot] = None
        self.prompts[slot] = self.generators[slot] = self.trace_rows[slot] = None
        self.events[slot], self.remasked[slot], self.edited[slot] = {}, [], []
        self.attention[slot] = False
        self._narrow()

    # --- sizes ---------------------------------------------------------------------------------
    def _grow(self, n: int) -> None:
        """`n` more slots, all free."""
        device = self.device
        width = self.canvas.shape[1]
        self.canvas = torch.cat([self.canvas, torch.full((n, width), self.model.pad_id, dtype=torch.long, device=device)])
        self.attention = torch.cat([self.attention, torch.zeros((n, width), dtype=torch.bool, device=device)])
        self.positions = torch.cat([self.positions, torch.zeros((n, width), dtype=torch.long, device=device)])
        for name, (fill, dtype, _) in SLOT_FIELDS.items():
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, torch.full((n,), fill, dtype=dtype, device=t.device)]))
        for name, (fill, dtype, trailing) in self.gen_fields.items():
            t = getattr(self, name)
            more = torch.full((n, self.gen) + trailing, self._fill(fill), dtype=dtype, device=device)
            setattr(self, name, torch.cat([t, more]))
        self.hist = torch.cat([self.hist, torch.full((n,) + self.hist.shape[1:], -1, dtype=torch.long, device=device)])
        self.seq += [None] * n
        self.prompts += [None] * n
        self.generators += [None] * n
        self.temps += [0.0] * n
        self.events += [{} for _ in range(n)]
        self.trace_rows += [None] * n
        self.remasked += [[] for _ in range(n)]
        self.edited += [[] for _ in range(n)]
        self.joined_at += [0.0] * n
        self.state = grow_state(self.state, self.policy.init_state(n, self.gen, device))
        self.cap += n
        if self.cache is not None:
            self.cache.grow(self.attention)
            self.cache.layout(self.attention, self.positions)

    def _widen_prompt(self, delta: int) -> None:
        """`delta` more left padding for every row (a longer prompt joined)."""
        device = self.device
        self.canvas = torch.cat([torch.full((self.cap, delta), self.model.pad_id, dtype=torch.long, device=device),
                                 self.canvas], dim=1)
        self.attention = torch.cat([torch.zeros((self.cap, delta), dtype=torch.bool, device=device), self.attention], dim=1)
        self.positions = self.model.position_ids(self.attention)
        self.prompt_len += delta
        self.prompt_start += delta
        self.kv_done += delta
        if self.cache is not None:
            self.cache.widen(delta, self.attention)
            self.cache.layout(self.attention, self.positions)

    def _widen_gen(self, delta: int) -> None:
        """`delta` more right padding for every row (a longer generation joined)."""
        device = self.device
        self.canvas = torch.cat([self.canvas, torch.full((self.cap, delta), self.model.pad_id, dtype=torch.long,
                                                         device=device)], dim=1)
        self.attention = torch.cat([self.attention, torch.zeros((self.cap, delta), dtype=torch.bool, device=device)], dim=1)
        self.positions = self.model.position_ids(self.attention)
        for name, (fill, dtype, trailing) in self.gen_fields.items():
            t = getattr(self, name)
            more = torch.full((self.cap, delta) + trailing, self._fill(fill), dtype=dtype, device=device)
            setattr(self, name, torch.cat([t, more], dim=1))
        self.hist = torch.cat([self.hist, torch.full(self.hist.shape[:2] + (delta,), -1, dtype=torch.long, device=device)],
                              dim=2)
        self.gen += delta
        self.state = widen_state(self.state, self.policy.init_state(self.cap, self.gen, device))
        if self.cache is not None:
            self.cache.widen(delta, self.attention, right=True)
            self.cache.layout(self.attention, self.positions)

    def _narrow(self) -> None:
        """Drop the padding no live sequence needs any more (views, no copy)."""
        live = [s for s, q in enumerate(self.seq) if q is not None]
        left = self.prompt_len - max([len(self.prompts[s]) - int(self.lead[s]) for s in live], default=0)
        right = self.gen - max([int(self.row_gen[s]) for s in live], default=0)
        if left <= 0 and right <= 0:
            return
        end = self.canvas.shape[1] - right
        self.canvas = self.canvas[:, left:end]
        self.attention = self.attention[:, left:end]
        self.positions = self.model.position_ids(self.attention)
        self.prompt_len -= left
        self.prompt_start -= left
        self.kv_done -= left
        if right:
            self.gen -= right
            for name in self.gen_fields:
                setattr(self, name, getattr(self, name)[:, : self.gen])
            self.hist = self.hist[:, :, : self.gen]
            self.state = narrow_state(self.state, self.policy.init_state(self.cap, self.gen, self.device))
        if self.cache is not None:
            self.cache.narrow(left, right, self.attention)
            self.cache.layout(self.attention, self.positions)

    def history_room(self, steps: int) -> None:
        """Room in `hist` for `steps` calls of one block (grows by doubling; bounded by the step bound)."""
        if self.hist.shape[1] < steps:
            more = max(steps - self.hist.shape[1], self.hist.shape[1])
            self.hist = torch.cat([self.hist, torch.full((self.cap, more, self.gen), -1, dtype=torch.long,
                                                         device=self.device)], dim=1)

    # --- per-block bookkeeping -----------------------------------------------------------------
    def settle_redundancy(self, slots: torch.Tensor) -> None:
        """Add the current block's temporal redundancy of `slots` to their totals: (call, position)
        pairs where the position stayed masked after the call although its top-1 there already was
        the token it holds now (its final token once the block is complete)."""
        if slots.numel() == 0 or self.hist.shape[1] == 0:
            return
        steps = self.hist[slots]  # (r, S, gen)
        final = self.gen_view[slots][:, None, :]
        used = torch.arange(steps.shape[1], device=self.device)[None, :, None] < self.block_step[slots][:, None, None]
        hits = ((steps == final) & used).sum((1, 2))
        self.redundant[slots.cpu()] += hits.cpu()

    def result_args(self, slot: int) -> dict:
        """What a sequence's result is built from, as it stands."""
        own, lead = int(self.row_gen[slot]), int(self.lead[slot])
        return dict(prompt_ids=self.prompts[slot], tokens=self.gen_view[slot, lead:own].tolist(),
                    nfe=int(self.nfe[slot]), rows=int(self.rows_count[slot]),
                    stopped_early=bool(self.stopped_early[slot]), events=dict(self.events[slot]),
                    redundant=float(self.redundant[slot]), trace_rows=self.trace_rows[slot],
                    remasked=list(self.remasked[slot]), edited=list(self.edited[slot]), commit_step=self.commit_step[slot, lead:own].cpu().numpy(),
                    latency_s=time.perf_counter() - self.joined_at[slot], lead=lead)


def _zip_state(state: Any, other: Any, leaf, verb: str) -> Any:
    """Apply `leaf(tensor, other_tensor)` through a policy state and a state of the same structure
    (tensors, possibly in dicts, lists or tuples; None stays None)."""
    if state is None and other is None:
        return None
    if isinstance(state, torch.Tensor):
        return leaf(state, other)
    if isinstance(state, dict):
        return {k: _zip_state(v, other[k], leaf, verb) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_zip_state(a, b, leaf, verb) for a, b in zip(state, other))
    raise TypeError(f"cannot {verb} a policy state of type {type(state).__name__}")


def reset_rows(state: Any, fresh: Any, slots: torch.Tensor) -> Any:
    """A policy's per-decode state with the rows `slots` set to `fresh` (the same structure, one
    row per slot): a new sequence in a slot starts from the policy's initial state."""

    def leaf(t, new):
        t[slots] = new
        return t

    return _zip_state(state, fresh, leaf, "reset rows of")


def widen_state(state: Any, wider: Any) -> Any:
    """A policy's per-decode state on a wider canvas: `wider` is a fresh state of the same rows for
    the wider generation region; every tensor of `state` is copied into its leading corner (a tensor
    whose shape does not depend on the generation length is kept as it is)."""

    def leaf(t, new):
        if t.shape == new.shape:
            return t
        new[tuple(slice(0, n) for n in t.shape)] = t
        return new

    return _zip_state(state, wider, leaf, "widen")


def narrow_state(state: Any, narrower: Any) -> Any:
    """A policy's per-decode state on a narrower canvas: each tensor cut to the shape of the same
    tensor in `narrower` (a fresh state for the narrower generation region); a view."""
    return _zip_state(state, narrower, lambda t, new: t if t.shape == new.shape
                      else t[tuple(slice(0, n) for n in new.shape)], "narrow")


def grow_state(state: Any, more: Any) -> Any:
    """A policy's per-decode state with the rows of `more` (the same structure) appended.

    States are tensors indexed by sequence first, possibly in dicts, lists or tuples; None stays None.
    """
    return _zip_state(state, more, lambda t, new: torch.cat([t, new]), "add sequences to")

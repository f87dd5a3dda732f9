"""What a policy sees and what it returns.

The loop owns model calls, the cache, accounting, the trace and stopping. After each call it hands
the policy a `StepView` of the current block of every active sequence and takes back a `Decision`:
which masked positions to commit (and, for remasking policies, which committed ones to mask again).
A policy is a small class with a `Config` dataclass and one `decide` method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from unmask.errors import UnmaskError


@dataclass
class PolicyConfig:
    """Settings every policy has. Subclasses add their own fields, each with a default."""

    # Gumbel-noise sampling temperature for the candidate token (0 = greedy argmax). Confidence is
    # still read from the un-noised distribution (docs/concepts.md: confidence).
    temperature: float = 0.0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UnmaskError(f"temperature must be a finite number >= 0, got {self.temperature}", field="temperature")


@dataclass
class StepView:
    """The model's output for the current block of each active sequence, after one call.

    Shapes: `batch` is the number of active sequences in this call, `block` the block length,
    `gen` the generation length. Block tensors are aligned with `positions` (indices into the
    generation region).

    Sequences of one decode may have different generation lengths (they share the canvas, which is
    as wide as the longest; a shorter sequence is right padded). `gen_length` and `num_blocks` are
    the canvas's; `row_gen_length` and `row_num_blocks` are each sequence's own, and a policy whose
    decisions depend on the generation length reads those, so a sequence decides as it does alone.
    A sequence never sees a position past its own generation, except that a `whole_generation`
    policy's block (the whole canvas) ends, for a shorter sequence, in padding slots that are never
    masked and never committed. A view holds the current block only: nothing in it is sized by the
    generation, so a step's memory does not grow with the generation length.
    """

    rows: torch.Tensor  # (batch,) indices of these sequences in the whole decode batch
    positions: torch.Tensor  # (batch, block) generation-region index of each block position
    tokens: torch.Tensor  # (batch, block) current tokens (mask_id where masked)
    masked: torch.Tensor  # (batch, block) bool
    logits: torch.Tensor  # (batch, block, vocab) model logits, float32, the mask token's set to -inf
    top1: torch.Tensor  # (batch, block) argmax of the un-noised distribution
    top1_prob: torch.Tensor  # (batch, block)
    candidate: torch.Tensor  # (batch, block) token to commit (= top1 unless sampling)
    confidence: torch.Tensor  # (batch, block) un-noised probability of `candidate`
    margin: torch.Tensor  # (batch, block) top-1 minus top-2 probability
    entropy: torch.Tensor  # (batch, block) entropy of the distribution (nats)
    stable: torch.Tensor  # (batch, block) consecutive calls (this one included) with the same top1
    prev_confidence: torch.Tensor  # (batch, block) confidence of the top1 at the previous call (nan if none)
    block_step: torch.Tensor  # (batch,) calls already made in this block before this one
    step: int  # calls made in this decode before this one
    block_length: int  # the width of the block tensors
    gen_length: int  # the canvas: the longest generation in the decode
    num_blocks: int  # the canvas's blocks
    mask_id: int
    stop_ids: tuple[int, ...]
    generators: list[torch.Generator]  # one per active sequence, seeded as if decoded alone
    extras: dict[str, Any] = field(default_factory=dict)
    # (batch,) each sequence's own generation length and number of blocks (None: the canvas's)
    row_gen_length: torch.Tensor | None = None
    row_num_blocks: torch.Tensor | None = None
    # (batch, block) prompt tokens in the block (a block-diffusion prompt's tail, which shares the
    # first block with the generation): never masked, never committed or edited (None: none)
    fixed: torch.Tensor | None = None

    def __post_init__(self) -> None:
        device = self.rows.device
        if self.fixed is None:
            self.fixed = torch.zeros_like(self.masked)
        if self.row_gen_length is None:
            self.row_gen_length = torch.full(self.rows.shape, self.gen_length, dtype=torch.long, device=device)
        if self.row_num_blocks is None:
            self.row_num_blocks = torch.full(self.rows.shape, self.num_blocks, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return int(self.rows.shape[0])

    @property
    def row_block_length(self) -> torch.Tensor:
        """(batch,) each sequence's own block length (its whole generation under a whole_generation policy)."""
        return self.row_gen_length // self.row_num_blocks

    def uniform(self) -> torch.Tensor:
        """(batch, block) uniforms drawn from each sequence's own generator (batch-invariant).

        A sequence draws as many as its own block holds (slots past it get 1, never chosen first).
        """
        device = self.top1.device
        out = torch.ones(self.batch, self.block_length, device=device)
        for j, (g, width) in enumerate(zip(self.generators, self.row_block_length.tolist())):
            out[j, :width] = torch.rand(width, generator=g, device=g.device).to(device)
        return out


@dataclass
class Decision:
    """A policy's answer for one step: positions to commit (with tokens) and, rarely, to remask."""

    commit: torch.Tensor  # (batch, block) bool, only masked positions may be True
    tokens: torch.Tensor | None = None  # (batch, block) tokens to write; defaults to view.candidate
    remask: torch.Tensor | None = None  # (batch, block) bool, remasking policies only
    # per-sequence counts of named events this step, e.g. {"cluster_commits": (batch,) ints};
    # the loop sums them into `SequenceResult.events` (a policy's own counts, reported beside R_total,
    # which is computed from the trace alone)
    events: dict[str, torch.Tensor] | None = None
    # speculative drafts (PSD): (batch, K, block) block contents at depths 1..K, built from this
    # step's predictions with no model call; the loop scores the committed block and the drafts in
    # one batched call and asks `Policy.accept` which depth to keep
    drafts: torch.Tensor | None = None
    # token editing (policies with `edits`): (batch, block) decided positions to rewrite with `tokens`
    # (the prompt's tail never), and (batch,) sequences whose block stays open although no mask is
    # left (LLaDA2.1's post-steps)
    edit: torch.Tensor | None = None
    hold: torch.Tensor | None = None


class Policy:
    """Base class. Subclasses set `name`, `Config`, and implement `decide`.

    `remasking`: the policy may remask committed tokens (the loop then bounds the steps).
    `whole_generation`: the policy ignores semi-autoregressive blocks and treats the whole
    generation as one block (one_shot does).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    # parameters that depart from the method's paper (or its public code where the paper is
    # silent): options, off at their defaults; every other default is the paper's setting
    departures: ClassVar[tuple[str, ...]] = ()
    # a step may rightly commit nothing (Dream's schedule): the loop then does not force a commit
    empty_steps: ClassVar[bool] = False
    # sequences may join a running decode (continuous batching); False for a policy that prepares
    # per batch of prompts (the oracle's reference decode)
    continuous: ClassVar[bool] = True
    remasking: ClassVar[bool] = False
    whole_generation: ClassVar[bool] = False
    # the policy may rewrite decided positions of its block (LLaDA2.1's token editing, `Decision.edit`)
    edits: ClassVar[bool] = False
    # the stop rule its reference runs (see unmask.decoding.blocks.stop_rule_of); None: the model's
    stop_rule: str | None = None

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    # --- hooks -------------------------------------------------------------------------------
    def prepare(self, model, prompts: list[list[int]], decode_config, gen_lengths: list[int] | None = None) -> None:
        """Called once per decode before the first step (the oracle runs its reference here).

        `decode_config.gen_length` is the canvas; `gen_lengths` each prompt's own generation length
        (None: the canvas for all). Lengths are checked per sequence by `check_lengths`, which the
        loop calls for every sequence's own generation region before it decodes it.
        """

    def check_lengths(self, model, decode_config) -> None:
        """Raise UnmaskError if this policy cannot decode a generation region of
        `decode_config.gen_length` positions in its blocks (a step count that does not split over
        them). The loop asks for every sequence's own region before it decodes it (a block-diffusion
        model's holds the prompt's tail too), and the server for every request."""

    def unavailable(self, model) -> str | None:
        """Why this policy cannot decode with `model` (a missing trained part), or None if it can."""
        return None

    def init_state(self, batch_size: int, gen_length: int, device: torch.device) -> Any:
        """Per-decode state for stateful policies, indexed by `view.rows`."""
        return None

    def decide(self, view: StepView, state: Any) -> Decision:
        raise NotImplementedError

    def stop_predictions(self, rows: torch.Tensor, gen_top1: torch.Tensor) -> torch.Tensor:
        """What the stop rule takes as the prediction for each generation position (batch, gen).

        The model's current argmax by default; the oracle answers with its reference tokens.
        """
        return gen_top1

    def accept(self, view: StepView, state: Any, candidates: torch.Tensor, draft_top1: torch.Tensor,
               draft_conf: torch.Tensor):
        """For policies that draft: the accepted depth per sequence, and per-sequence events.

        candidates: (batch, K+1, block) the committed block (depth 0) and the drafts;
        draft_top1: (batch, K+1, block) argmax predicted on each of those canvases;
        draft_conf: (batch, K+1, block) that argmax's probability.
        """
        raise NotImplementedError(f"{self.name} returned drafts but does not implement accept()")

    # --- helpers -----------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self.config, f.name) for f in fields(self.config)}

    def describe(self) -> str:
        return f"{self.name}:" + ",".join(f"{k}={v}" for k, v in self.params.items())


def top_k_mask(score: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the `k[b]` highest-scoring allowed positions per row (ties: lower index first)."""
    score = score.masked_fill(~allowed, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    k = torch.minimum(k, allowed.sum(-1))
    return (ranks < k[:, None]) & allowed


def most_confident(score: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Bool mask with the single best allowed position per row (rows with none allowed: all False)."""
    return top_k_mask(score, allowed, torch.ones(score.shape[0], dtype=torch.long, device=score.device))

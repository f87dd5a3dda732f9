"""Fixed schedules: how many tokens to commit at each step of a block.

Shared by the fixed-rate orders (low_confidence, random, margin, entropy), which differ only in the
score they rank masked positions by. `steps` model calls are split evenly over the blocks; within a
block (m masked positions, n = steps / num_blocks calls, step i = 0 .. n-1) the count follows one of
two published rules, chosen by `schedule`:

- `llada` (LLaDA's `get_num_transfer_tokens`): the block's positions split evenly over its steps,
  floor(m / n) each and one more for the first m mod n steps (n is capped at m).
- `dream` (Dream-v0's `diffusion_generate`): a time grid t_0..t_n = linspace(1, eps, n + 1); step i
  commits int(m_i * (1 - t_{i+1} / t_i)) of the m_i positions still masked before it, and the last
  step commits every one left. The count rounds down, so a step may commit nothing (with n = m the
  first step always does): it still costs its model call. Without `alg_temp` the best-scored
  positions are committed; with it, the positions are sampled without replacement from
  softmax(score / alg_temp), as Dream's `torch.multinomial` does.
- `auto` (the default): `dream` when the model is a Dream checkpoint (`model.kind == "dream"`),
  `llada` otherwise. It is resolved in `prepare`, once per decode; a policy that was never prepared
  (the oracle's reference decode) uses `llada`.

Dream decodes the whole generation as one block, so Dream's own setting is schedule=dream with
block_length = gen_length; with smaller blocks Dream's rule runs inside each block with its share of
the steps (a block starts again at t = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, StepView, top_k_mask
from unmask.errors import UnmaskError

SCHEDULES = ("auto", "llada", "dream")
DREAM_EPS = 1e-3  # Dream-v0's default `eps`


@dataclass
class ScheduledConfig(PolicyConfig):
    # total model calls for the whole generation; None = gen_length (one token per step under
    # LLaDA's schedule, the reference every speed-up is measured against). Split evenly over blocks.
    steps: int | None = None
    # how many tokens each step commits: llada, dream, or auto (dream for a Dream checkpoint)
    schedule: str = "auto"
    # Dream's schedule only: the end of the time grid linspace(1, eps, steps + 1)
    eps: float = DREAM_EPS
    # Dream's schedule only: None or 0 commits the best-scored positions; > 0 samples them from
    # softmax(score / alg_temp)
    alg_temp: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.steps is not None and self.steps <= 0:
            raise UnmaskError(f"steps must be a positive integer, got {self.steps}", field="steps")
        if self.schedule not in SCHEDULES:
            raise UnmaskError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
                              field="schedule")
        if not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) or not 0 <= self.eps < 1:
            raise UnmaskError(f"eps must be a number in [0, 1), got {self.eps}", field="eps")
        if self.alg_temp is not None and (not math.isfinite(self.alg_temp) or self.alg_temp < 0):
            raise UnmaskError(f"alg_temp must be None or a finite number >= 0, got {self.alg_temp}", field="alg_temp")
        if self.schedule == "llada":
            self.check_llada()

    def check_llada(self) -> None:
        """The Dream-only settings must keep their defaults under LLaDA's schedule (never ignored silently)."""
        if self.alg_temp:
            raise UnmaskError(
                f"alg_temp={self.alg_temp} applies to Dream's schedule only; use schedule=dream or drop alg_temp",
                field="alg_temp")
        if self.eps != DREAM_EPS:
            raise UnmaskError(
                f"eps={self.eps} applies to Dream's schedule only; use schedule=dream or drop eps", field="eps")


def _steps_error(total: int, blocks: int) -> UnmaskError:
    return UnmaskError(
        f"steps {total} must be a multiple of the number of blocks ({blocks}); use a multiple of {blocks}",
        field="steps",
    )


def steps_per_block(view: StepView, steps: int | None) -> torch.Tensor:
    """(batch,) the calls each sequence's blocks get: `steps` (None = its gen_length) over its blocks,
    which must divide it. Per sequence, so a sequence gets its own share in a decode of mixed lengths."""
    blocks = view.row_num_blocks
    total = torch.full_like(blocks, steps) if steps is not None else view.row_gen_length
    bad = (total % blocks) != 0
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise _steps_error(int(total[j]), int(blocks[j]))
    return total // blocks


def tokens_this_step(view: StepView, steps: int | None) -> torch.Tensor:
    """LLaDA's k per row: floor(block / steps_per_block), +1 for the first (block mod steps_per_block) steps."""
    block = view.row_block_length
    per_block = torch.minimum(steps_per_block(view, steps), block).clamp(min=1)
    base, extra = block // per_block, block % per_block
    return base + (view.block_step < extra).long()


@lru_cache(maxsize=64)
def _dream_fractions(n: int, eps: float) -> torch.Tensor:
    """(n,) float32: 1 - t_{i+1} / t_i on Dream's grid linspace(1, eps, n + 1) (Dream's float32), 1 at the end."""
    t = torch.linspace(1, eps, n + 1, dtype=torch.float32)
    fractions = 1 - t[1:] / t[:-1]
    fractions[-1] = 1.0  # Dream's last step commits every position left
    return fractions


def dream_fraction(block_step: torch.Tensor, n, eps: float) -> torch.Tensor:
    """(b,) float32 on the CPU: the share 1 - s / t of its masked positions step `block_step` commits.

    `n`: the calls per block, an int or one per row. 1 from the last step, n - 1, on: Dream's last
    step commits every position left.
    """
    step = block_step.cpu()
    if isinstance(n, int):
        return _dream_fractions(n, float(eps))[step.clamp(max=n - 1)]
    n = n.cpu()
    out = torch.empty(step.shape, dtype=torch.float32)
    for value in n.unique().tolist():
        rows = n == value
        out[rows] = _dream_fractions(int(value), float(eps))[step[rows].clamp(max=value - 1)]
    return out


def dream_counts(masked_left: torch.Tensor, block_step: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """Dream's k per row: int(m * (1 - s / t)) at step i < n - 1, every masked position at step n - 1.

    masked_left: (b,) positions still masked before this step; block_step: (b,) the step i in the block;
    n: the calls per block, an int or one per row.
    The product is taken in float32 and truncated, as Dream's `int(num_mask_token * (1 - s / t))`.
    """
    k = (masked_left.cpu().float() * dream_fraction(block_step, n, eps)).long()
    return k.to(masked_left.device)


def sample_positions(score: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor, alg_temp: float,
                     generators: list[torch.Generator]) -> torch.Tensor:
    """Bool mask of k[b] allowed positions per row drawn without replacement from softmax(score / alg_temp).

    Drawn by the Gumbel-top-k trick (the k largest of score / alg_temp + Gumbel noise), which has the
    distribution of sequential sampling without replacement, Dream's `torch.multinomial`, and cannot
    fail when some probabilities underflow. Each row draws from its own generator, and only when it
    commits something (k > 0), so a sequence samples the same positions alone or in any batch.
    """
    b, width = score.shape
    keys = torch.full((b, width), float("-inf"), dtype=torch.float64, device=score.device)
    for row in range(b):
        if int(k[row]) > 0:
            u = torch.rand(width, generator=generators[row], dtype=torch.float64, device=generators[row].device)
            gumbel = -torch.log(-torch.log(u.clamp(min=1e-20))).to(score.device)
            keys[row] = score[row].detach().double() / alg_temp + gumbel
    return top_k_mask(keys, allowed, k)


class ScheduledPolicy(Policy):
    """Commit the k highest-scoring masked positions of the block, k from LLaDA's or Dream's schedule."""

    Config = ScheduledConfig

    def __init__(self, config: ScheduledConfig | None = None):
        super().__init__(config)
        self._resolved: str | None = None  # the schedule `auto` became in the last prepare
        if self.config.schedule == "dream":
            self.check_dream()

    def _schedule_for(self, model) -> str:
        if self.config.schedule != "auto":
            return self.config.schedule
        return "dream" if getattr(model, "kind", None) == "dream" else "llada"

    def prepare(self, model, prompts, decode_config, gen_lengths=None) -> None:
        self._resolved = self._schedule_for(model)
        if self._resolved == "llada":
            self.config.check_llada()
        else:
            self.check_dream()

    def check_lengths(self, model, decode_config) -> None:
        """`steps` must split evenly over the blocks of a `decode_config.gen_length` generation, and
        under Dream's schedule a block must be able to take its share of them."""
        cfg = self.config
        block = decode_config.gen_length if self.whole_generation else decode_config.block_length
        blocks = decode_config.gen_length // block
        total = cfg.steps if cfg.steps is not None else decode_config.gen_length
        if total % blocks:
            raise _steps_error(total, blocks)
        if self._schedule_for(model) == "llada":
            return
        # Dream's block always ends after exactly its n calls; the loop's safety bound must not cut it
        bound = decode_config.max_steps_per_block or 4 * block
        if total // blocks > bound:
            raise UnmaskError(
                f"steps {total} gives {total // blocks} calls per block under Dream's schedule, more than the "
                f"{bound} a block may take (max_steps_per_block); use fewer steps or raise max_steps_per_block",
                field="steps")

    def check_dream(self) -> None:
        """Settings that Dream's rule cannot take for this order (none for the scored orders)."""

    @property
    def schedule_in_use(self) -> str:
        """`llada` or `dream`: the schedule this policy decodes with (auto resolved by `prepare`)."""
        if self.config.schedule != "auto":
            return self.config.schedule
        return self._resolved or "llada"

    @property
    def empty_steps(self) -> bool:
        """True when a step may rightly commit nothing (Dream's schedule): the loop should then not
        force its progress commit, since Dream's own loop makes the call and commits nothing."""
        return self.schedule_in_use == "dream"

    def score(self, view: StepView) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, view: StepView, state) -> Decision:
        if self.schedule_in_use == "dream":
            return Decision(commit=self.dream_commit(view))
        k = tokens_this_step(view, self.config.steps)
        return Decision(commit=top_k_mask(self.score(view), view.masked, k))

    def dream_commit(self, view: StepView) -> torch.Tensor:
        """Dream's step: the count from Dream's grid, the positions by score (or sampled with alg_temp)."""
        n = steps_per_block(view, self.config.steps)
        k = dream_counts(view.masked.sum(-1), view.block_step, n, self.config.eps)
        score = self.score(view)
        if self.config.alg_temp:
            return sample_positions(score, view.masked, k, self.config.alg_temp, view.generators)
        return top_k_mask(score, view.masked, k)

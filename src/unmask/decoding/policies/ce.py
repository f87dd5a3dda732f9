"""Confidence Extrapolation (CE): a per-position Kalman forecast of the margin, for look-ahead and holds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unmask.decoding.features import FeatureTracker, Observation
from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, most_confident
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError

VELOCITY_PRIOR_VAR = 0.1  # variance of the margin velocity before a second observation
OSCILLATION_EPS = 0.01  # margin steps smaller than this carry no sign


# ---------------------------------------------------------------------------------------------
# the filter: state x = [margin, velocity], covariance stored as (p00, p01, p11); all elementwise


def kalman_init(z: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """State and covariance after the first observation z (...): margin z, velocity 0 (unknown)."""
    x = torch.stack([z, torch.zeros_like(z)], dim=-1)
    p = torch.stack([torch.full_like(z, r), torch.zeros_like(z), torch.full_like(z, VELOCITY_PRIOR_VAR)], dim=-1)
    return x, p


def _process_noise(q: float) -> tuple[float, float, float]:
    # white-noise acceleration integrated over one call: Q = q [[1/3, 1/2], [1/2, 1]]
    return q / 3.0, q / 2.0, q


def kalman_step(x: torch.Tensor, p: torch.Tensor, z: torch.Tensor, q: float, r: float):
    """Predict one call ahead with A = [[1, 1], [0, 1]], then update with the observed margin z."""
    q00, q01, q11 = _process_noise(q)
    m, v = x[..., 0], x[..., 1]
    p00, p01, p11 = p[..., 0], p[..., 1], p[..., 2]
    m, p00, p01 = m + v, p00 + 2 * p01 + p11 + q00, p01 + p11 + q01
    p11 = p11 + q11
    s = p00 + r
    k0, k1 = p00 / s, p01 / s
    innovation = z - m
    m, v = m + k0 * innovation, v + k1 * innovation
    # (I - K H) P, written out for the symmetric 2 x 2 case
    p00, p01, p11 = (1 - k0) * p00, (1 - k0) * p01, p11 - k1 * p01
    return torch.stack([m, v], dim=-1), torch.stack([p00, p01, p11], dim=-1)


def kalman_forecast(x: torch.Tensor, p: torch.Tensor, horizon: int, q: float):
    """Margin forecast h = 1..horizon calls ahead: mean and variance, each (..., horizon)."""
    h = torch.arange(1, horizon + 1, device=x.device, dtype=x.dtype)
    mean = x[..., :1] + h * x[..., 1:2]
    var = p[..., :1] + 2 * h * p[..., 1:2] + h * h * p[..., 2:3]
    # accumulated process noise: sum_{j<h} (A^j Q A^jT)_00 = q * sum_{j<h} (1/3 + j + j^2)
    j = torch.arange(horizon, device=x.device, dtype=x.dtype)
    noise = torch.cumsum(q * (1.0 / 3.0 + j + j * j), dim=0)
    return mean, var + noise


# ---------------------------------------------------------------------------------------------
# the rules, shared by `ce` and `tspd:ce=true`


@dataclass
class CEConfig(PolicyConfig):
    tau: float = 0.9  # base rule (ce alone): commit masked positions with confidence >= tau
    horizon: int = 2  # H: calls ahead the forecast may clear the bar
    z: float = 1.0  # the forecast's lower bound is mean - z * std
    gamma: float | None = None  # margin the lower bound must clear (None: tau; margin >= g implies confidence >= g)
    q: float = 1e-3  # process noise of the constant-velocity model
    r: float = 1e-2  # observation noise of the margin
    min_stable: int = 2  # look-ahead: the top-1 here and at every masked position to its left unchanged this many calls
    flips: int = 2  # hold: the top-1 changed at this call and this many times in the block (0 = never hold for flips)
    hold_margin: float = 0.05  # hold: a margin below this is under-confident
    lookahead: bool = True
    hold: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("tau", "z", "q", "r", "hold_margin") + (("gamma",) if self.gamma is not None else ()):
            if not math.isfinite(getattr(self, name)):
                raise UnmaskError(f"{name} must be a finite number, got {getattr(self, name)}", field=name)
        if not 0.0 < self.tau <= 1.0:
            raise UnmaskError(f"tau must be in (0, 1], got {self.tau}", field="tau")
        if self.gamma is not None and not 0.0 < self.gamma <= 1.0:
            raise UnmaskError(f"gamma must be in (0, 1], got {self.gamma}", field="gamma")
        if self.horizon < 1:
            raise UnmaskError(f"horizon must be >= 1, got {self.horizon}", field="horizon")
        if self.z < 0:
            raise UnmaskError(f"z must be >= 0, got {self.z}", field="z")
        if self.q < 0:
            raise UnmaskError(f"q must be >= 0, got {self.q}", field="q")
        if self.r <= 0:
            raise UnmaskError(f"r must be > 0, got {self.r}", field="r")
        if self.min_stable < 1:
            raise UnmaskError(f"min_stable must be >= 1, got {self.min_stable}", field="min_stable")
        if self.flips < 0:
            raise UnmaskError(f"flips must be >= 0, got {self.flips}", field="flips")
        if not 0.0 <= self.hold_margin < 1.0:
            raise UnmaskError(f"hold_margin must be in [0, 1), got {self.hold_margin}", field="hold_margin")


@dataclass
class CEVerdict:
    lookahead: torch.Tensor  # (batch, block) masked positions safe to commit now by forecast
    hold: torch.Tensor  # (batch, block) masked positions to keep masked this call


class ConfidenceExtrapolation:
    """The Kalman state per (row, position) and the two rules, vectorised over batch and block."""

    def __init__(self, config: CEConfig):
        self.config = config

    def init_state(self, batch_size: int, gen_length: int, device) -> dict[str, torch.Tensor]:
        return {
            "x": torch.zeros(batch_size, gen_length, 2, device=device),
            "p": torch.zeros(batch_size, gen_length, 3, device=device),
            "seen": torch.zeros(batch_size, gen_length, dtype=torch.long, device=device),
            "flips": torch.zeros(batch_size, gen_length, dtype=torch.long, device=device),
        }

    def observe(self, view, state) -> tuple[torch.Tensor, ...]:
        """Filter this call's margins into the state and count top-1 changes in the block.

        Returns the block's (x, p, observations, changes), each gathered at `view.positions`.
        """
        cfg = self.config
        rows, pos = view.rows[:, None], view.positions
        z = view.margin.float()
        x, p, seen = state["x"][rows, pos], state["p"][rows, pos], state["seen"][rows, pos]
        x0, p0 = kalman_init(z, cfg.r)
        x1, p1 = kalman_step(x, p, z, cfg.q, cfg.r)
        first = (seen == 0)[..., None]
        x, p, seen = torch.where(first, x0, x1), torch.where(first, p0, p1), seen + 1
        state["x"][rows, pos], state["p"][rows, pos], state["seen"][rows, pos] = x, p, seen
        flips = state["flips"][rows, pos] + ((view.stable == 1) & (view.block_step > 0)[:, None]).long()
        state["flips"][rows, pos] = flips
        return x, p, seen, flips

    def verdict(self, view, state, observation: Observation) -> CEVerdict:
        cfg = self.config
        gamma = cfg.gamma if cfg.gamma is not None else cfg.tau
        x, p, seen, flips = self.observe(view, state)
        masked = view.masked
        mean, var = kalman_forecast(x, p, cfg.horizon, cfg.q)
        lower = mean - cfg.z * var.clamp(min=0).sqrt()  # (b, block, H)

        # look-ahead: the trend clears the bar within H calls, with a settled left context
        settled = view.stable >= cfg.min_stable
        unsettled_mask = (masked & ~settled).long()
        left_unsettled = torch.cumsum(unsettled_mask, dim=-1) - unsettled_mask  # masked, unsettled, strictly left
        lookahead = masked & settled & (seen >= 2) & (left_unsettled == 0) & (lower.amax(-1) >= gamma)

        # holds: oscillating (a top-1 flipping back and forth, or a zigzag margin) or under-confident
        changed_now = (view.stable == 1) & (view.block_step > 0)[:, None]
        flipping = changed_now & (flips >= cfg.flips) & (cfg.flips > 0)
        trail = torch.cat([view.margin.float()[..., None], observation.margin_history], dim=-1)  # newest first
        moves = trail[..., :-1] - trail[..., 1:]
        sign = torch.where(moves.abs() < OSCILLATION_EPS, torch.zeros_like(moves), moves.sign())
        turns = ((sign[..., :-1] * sign[..., 1:]) < 0).sum(-1)
        zigzag = turns >= 2
        velocity_high = x[..., 1] + cfg.z * p[..., 2].clamp(min=0).sqrt()
        falling = (seen >= 2) & (velocity_high < 0) & (mean[..., -1] < gamma)
        weak = view.margin < cfg.hold_margin
        # an oscillating position whose filtered margin already clears the bar next call is not held
        unsure = lower[..., 0] < gamma
        hold = masked & (((flipping | zigzag) & unsure) | falling | weak)
        if not cfg.lookahead:
            lookahead = torch.zeros_like(lookahead)
        if not cfg.hold:
            hold = torch.zeros_like(hold)
        return CEVerdict(lookahead=lookahead & ~hold, hold=hold)


def with_progress(commit: torch.Tensor, score: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """At least one commit per row with masks: if nothing else was, the best-scoring masked position.

    Holds never take away this one commit (held or not): holding the best position would only trade
    it for a worse one, which on real models costs calls and changes the decoding order.
    """
    none = ~commit.any(-1, keepdim=True) & masked.any(-1, keepdim=True)
    if not bool(none.any()):
        return commit
    return commit | (most_confident(score, masked) & none)


@register_policy
class CE(Policy):
    """Confidence Extrapolation (TSPD+CE paper, arXiv 2605.30753): forecast each margin, commit early or hold.

    Per masked position a two-state Kalman filter tracks [margin, margin velocity] with the
    constant-velocity model A = [[1, 1], [0, 1]] (process noise q, observation noise r) and forecasts
    the margin h = 1..H calls ahead with its variance. On top of the threshold rule (confidence >= tau):
    - look-ahead: commit now a position whose forecast lower bound, mean - z * std, clears `gamma`
      within H calls, when the left context is settled: its own top-1 and that of every masked
      position to its left in the block unchanged for `min_stable` calls (decided positions count as
      settled), and at least two observations;
    - targeted stabilisation: keep masked a position that oscillates (its top-1 changed at this call
      and had `flips` changes in the block in all, or its last four margins zigzag: two sign changes
      among three steps) or is under-confident (margin below `hold_margin`, or a velocity confidently negative while
      the forecast stays under `gamma`), even when the threshold rule would commit it. An
      oscillating position is not held when the filtered forecast for the next call already clears
      `gamma` with its lower bound.
    At least one position is committed per step: when nothing else is, the most confident masked
    one, held or not (a hold delays parallel commits; it never swaps the step's best token for a
    worse one).

    The filter, the rules and their order are a reconstruction [R]: the paper states the state
    space model, the look-ahead bound and "stabilisation of oscillating or under-confident tokens",
    not the exact tests. Departures: the margin, not raw logits, is filtered (it is bounded and
    comparable across positions); the default bar gamma = tau on the margin implies confidence >= tau.
    Events: `ce_lookahead` (commits the base rule would not make), `ce_holds` (base commits held).
    """

    name = "ce"
    Config = CEConfig

    def __init__(self, config: CEConfig | None = None):
        super().__init__(config)
        self.tracker = FeatureTracker(window=1)
        self.extrapolation = ConfidenceExtrapolation(self.config)

    def init_state(self, batch_size, gen_length, device):
        return {
            "features": self.tracker.init_state(batch_size, gen_length, device),
            "ce": self.extrapolation.init_state(batch_size, gen_length, device),
        }

    def decide(self, view, state):
        observation = self.tracker.update(view, state["features"], features=False)
        verdict = self.extrapolation.verdict(view, state["ce"], observation)
        base = view.masked & (view.confidence >= self.config.tau)
        commit = (base | verdict.lookahead) & ~verdict.hold
        commit = with_progress(commit, view.confidence, view.masked)
        events = {
            "ce_lookahead": (commit & verdict.lookahead & ~base).sum(-1).float(),
            "ce_holds": (base & verdict.hold & ~commit).sum(-1).float(),
        }
        return Decision(commit=commit, events=events)

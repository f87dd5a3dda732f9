"""Per-position trajectory features: one definition, computed online in a policy or offline from a trace.

TSPD's controller and CE read each masked position's denoising trajectory. Every feature is
computed by `step_features`, a vectorised function of one step's block statistics plus a short
per-position history. Two callers feed it the same inputs:

- online, `FeatureTracker` keeps the history in a policy's state (indexed by `view.rows`) and
  updates it from each `StepView`;
- offline, `trace_features` rebuilds the same inputs from a recorded `Trace` (for training).

A test decodes with a tracking policy and checks that both paths give the same numbers.

Features (name: meaning), by group. The paper's controller reads confidence, entropy, momentum
and position (`PAPER_GROUPS`); `stability` is unmask's addition, read only by a controller trained
with it (`tspd:stability=true`, `unmask train controller --stability`; a departure). A group can be
left out of a controller (`tspd:drop=GROUP`, `unmask train controller --drop GROUP`):

- `confidence` — how sure the model is now:
  `confidence` (probability of the top-1), `margin` (top-1 minus top-2 probability).
- `entropy` — `entropy` of the distribution (nats).
- `momentum` — how the certainty moves: `confidence_delta1`, `confidence_delta3`,
  `margin_delta1`, `margin_delta3` (value now minus value 1 / 3 calls ago).
- `stability` — how settled the prediction is: `stability` (calls the top-1 has not changed,
  capped at `STABILITY_CAP`, divided by it), `flipped` (1 if the top-1 changed at this call).
  Kept apart from `confidence` so the ablation can tell "sure" from "settled". Not in the
  paper's set, and misleading on its own supervision: in an Extremely Greedy Parallel trace a
  position is committed at the first call where its top-1 is final, so after a position's first
  call in its block a row is final only if its top-1 just changed (flipped), and every row with a
  streak of 2 or more is labelled 0. A controller that reads the group learns that a settled
  prediction is not final.
- `position` — where the token sits: `block_offset` and `gen_offset` (relative position in the
  block and in the generation, 0..1), `left_distance` and `right_distance` (distance to the nearest
  decided token on each side within the block, capped at the block length and divided by it),
  `block_progress` (calls already made in this block / block length).

Choices where the paper is silent:
- momentum looks only at calls made while the position's block was the current one (a policy
  sees confidences of the current block only); at a block's first call the differences are 0, and
  with fewer than 3 earlier calls the 3-call difference reaches back to the block's first call;
- stability and the flip flag follow the loop's `stable` count: calls of the current block that
  recomputed the position and found the same top-1 (a block's first call starts it at 1 and never
  counts as a flip);
- the left neighbour of a block is always decided (earlier blocks, or the prompt), so a position
  with only masks to its left in the block has left distance offset + 1; a block's right side is
  still masked, so with no decided token to its right the distance is the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "confidence": ("confidence", "margin"),
    "entropy": ("entropy",),
    "momentum": ("confidence_delta1", "confidence_delta3", "margin_delta1", "margin_delta3"),
    "stability": ("stability", "flipped"),
    "position": ("block_offset", "gen_offset", "left_distance", "right_distance", "block_progress"),
}
FEATURE_NAMES: tuple[str, ...] = tuple(name for names in FEATURE_GROUPS.values() for name in names)
# the groups the paper names (confidence, entropy, momentum, token position); `stability` is ours
PAPER_GROUPS: tuple[str, ...] = ("confidence", "entropy", "momentum", "position")
GROUP_OF: dict[str, str] = {name: group for group, names in FEATURE_GROUPS.items() for name in names}
HISTORY = 3  # earlier calls of confidence and margin kept per position (the 3-call differences)
STABILITY_CAP = 8


def feature_columns(groups) -> list[int]:
    """Indices into FEATURE_NAMES of the features in `groups` (in FEATURE_NAMES order)."""
    wanted = set(groups)
    unknown = wanted - set(FEATURE_GROUPS)
    if unknown:
        raise ValueError(f"unknown feature group(s) {sorted(unknown)}; groups are {list(FEATURE_GROUPS)}")
    return [i for i, name in enumerate(FEATURE_NAMES) if GROUP_OF[name] in wanted]


def controller_groups(drop: str | None = None, stability: bool = False) -> tuple[str, ...]:
    """The feature groups a TSPD controller reads, in FEATURE_GROUPS order.

    The paper's controller reads confidence, entropy, momentum and position (`PAPER_GROUPS`);
    `stability=True` adds the stability group (a departure); `drop` leaves one of them out (the
    ablation).
    """
    groups = [g for g in FEATURE_GROUPS if g in PAPER_GROUPS or (stability and g == "stability")]
    if drop is not None:
        if drop not in groups:
            if drop == "stability":
                raise ValueError("drop=stability needs stability=true: the paper's controller has no stability features")
            raise ValueError(f"drop must be one of {', '.join(groups)}, got {drop!r}")
        groups.remove(drop)
    return tuple(groups)


def _back_fill(current: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """history (..., H) newest first, NaN where the call did not happen -> the oldest value available.

    A missing entry takes the next newer one (the current value if none), so a difference that
    reaches past the block's first call is measured from that first call.
    """
    filled = []
    last = current
    for k in range(history.shape[-1]):
        value = history[..., k]
        last = torch.where(torch.isnan(value), last, value)
        filled.append(last)
    return torch.stack(filled, dim=-1)


def step_features(
    confidence: torch.Tensor,  # (n, block) probability of the un-noised top-1
    margin: torch.Tensor,  # (n, block)
    entropy: torch.Tensor,  # (n, block)
    confidence_history: torch.Tensor,  # (n, block, HISTORY) earlier calls in this block, newest first, NaN if none
    margin_history: torch.Tensor,  # (n, block, HISTORY)
    stable: torch.Tensor,  # (n, block) calls (this one included) with the same top-1
    has_previous: torch.Tensor,  # (n,) bool: a call was made before this one in the block
    masked: torch.Tensor,  # (n, block) bool, masked when the call was made
    block_step: torch.Tensor,  # (n,) calls already made in this block
    block_start: torch.Tensor,  # (n,) generation index of the block's first position
    block_length: int,
    gen_length: int | torch.Tensor,  # the generation's length, or each row's own (n,)
) -> torch.Tensor:
    """The features of every block position at one call: (n, block, len(FEATURE_NAMES)), float32.

    `gen_offset` is relative to each row's own generation: in a decode that mixes generation
    lengths, a sequence's features are those it has alone.
    """
    confidence, margin, entropy = confidence.float(), margin.float(), entropy.float()
    device = confidence.device
    n, length = confidence.shape
    conf_past = _back_fill(confidence, confidence_history.float())
    margin_past = _back_fill(margin, margin_history.float())
    stability = stable.float().clamp(max=STABILITY_CAP) / STABILITY_CAP
    flipped = ((stable == 1) & has_previous[:, None]).float()

    offset = torch.arange(length, device=device)
    block_offset = (offset.float() / max(length - 1, 1)).expand(n, length)
    last = torch.as_tensor(gen_length, device=device).reshape(-1, 1) - 1  # (n, 1) or (1, 1)
    gen_offset = (block_start[:, None] + offset).float() / last.clamp(min=1).float()
    decided = ~masked
    # nearest decided position strictly left of i (-1: the block's left neighbour, always decided)
    at_or_before = torch.where(decided, offset, torch.full_like(offset, -1)).cummax(-1).values
    left = torch.cat([torch.full_like(at_or_before[:, :1], -1), at_or_before[:, :-1]], dim=1)
    # nearest decided position strictly right of i (none: beyond the cap)
    far = 2 * length
    at_or_after = torch.where(decided, offset, torch.full_like(offset, far)).flip(-1).cummin(-1).values.flip(-1)
    right = torch.cat([at_or_after[:, 1:], torch.full_like(at_or_after[:, :1], far)], dim=1)
    left_distance = (offset - left).clamp(max=length).float() / length
    right_distance = (right - offset).clamp(max=length).float() / length
    block_progress = (block_step.float() / block_length)[:, None].expand(n, length)

    columns = {
        "confidence": confidence,
        "margin": margin,
        "entropy": entropy,
        "confidence_delta1": confidence - conf_past[..., 0],
        "confidence_delta3": confidence - conf_past[..., HISTORY - 1],
        "margin_delta1": margin - margin_past[..., 0],
        "margin_delta3": margin - margin_past[..., HISTORY - 1],
        "stability": stability,
        "flipped": flipped,
        "block_offset": block_offset,
        "gen_offset": gen_offset,
        "left_distance": left_distance,
        "right_distance": right_distance,
        "block_progress": block_progress,
    }
    return torch.stack([columns[name] for name in FEATURE_NAMES], dim=-1)


def fill_window(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """current (..., F) and previous (..., K-1, F) newest first, NaN rows where the call did not
    happen -> (..., K, F), missing steps repeating the oldest one available (the controller's input)."""
    steps = [current]
    last = current
    for k in range(previous.shape[-2]):
        value = previous[..., k, :]
        last = torch.where(torch.isnan(value[..., :1]), last, value)
        steps.append(last)
    return torch.stack(steps, dim=-2)


# ---------------------------------------------------------------------------------------------
# online: the history a policy keeps


@dataclass
class Observation:
    """What `FeatureTracker.update` returns for one call, all for the current block."""

    features: torch.Tensor | None  # (batch, block, F); None when only the histories were kept
    windows: torch.Tensor | None  # (batch, block, window, F) this call and the `window - 1` before it
    margin_history: torch.Tensor  # (batch, block, HISTORY) earlier margins, newest first, back-filled


class FeatureTracker:
    """Computes features online from `StepView`s, keeping a few calls of history per position.

    A policy calls `init_state` from its own `init_state` and `update` once per `decide`. The state
    is indexed by decode row and generation position, so a sequence's features never depend on the
    batch it is decoded in. History is per position and only advanced while its block is current.
    """

    def __init__(self, window: int = 1):
        self.window = max(int(window), 1)

    def init_state(self, batch_size: int, gen_length: int, device) -> dict[str, torch.Tensor]:
        nan = float("nan")
        return {
            "confidence": torch.full((batch_size, gen_length, HISTORY), nan, device=device),
            "margin": torch.full((batch_size, gen_length, HISTORY), nan, device=device),
            "features": torch.full((batch_size, gen_length, self.window - 1, len(FEATURE_NAMES)), nan, device=device),
        }

    def update(self, view, state: dict[str, torch.Tensor], features: bool = True) -> Observation:
        """Advance the history by this call; `features=False` only keeps the histories (CE alone)."""
        rows = view.rows[:, None]
        pos = view.positions
        conf_hist = state["confidence"][rows, pos]  # (b, block, HISTORY)
        margin_hist = state["margin"][rows, pos]
        state["confidence"][rows, pos] = torch.cat([view.top1_prob.float()[..., None], conf_hist[..., :-1]], dim=-1)
        state["margin"][rows, pos] = torch.cat([view.margin.float()[..., None], margin_hist[..., :-1]], dim=-1)
        margin_past = _back_fill(view.margin.float(), margin_hist)
        if not features:
            return Observation(features=None, windows=None, margin_history=margin_past)
        features = step_features(
            view.top1_prob, view.margin, view.entropy, conf_hist, margin_hist, view.stable,
            has_previous=view.block_step > 0,
            masked=view.masked, block_step=view.block_step, block_start=pos[:, 0],
            block_length=view.block_length, gen_length=view.row_gen_length,
        )
        previous = state["features"][rows, pos]  # (b, block, window-1, F)
        windows = fill_window(features, previous)
        if self.window > 1:
            state["features"][rows, pos] = torch.cat([features[..., None, :], previous[..., :-1, :]], dim=-2)
        return Observation(features=features, windows=windows, margin_history=margin_past)


# ---------------------------------------------------------------------------------------------
# offline: the same features from a recorded trace


@dataclass
class TraceFeatures:
    """Features of the current block's positions at every call of one recorded decode."""

    features: np.ndarray  # (steps, block, F) float32
    positions: np.ndarray  # (steps, block) canvas offset (the trace's column plus `lead`)
    masked: np.ndarray  # (steps, block) bool, masked when the call was made
    block_step: np.ndarray  # (steps,) calls already made in the block
    lead: int = 0  # the trace's `lead`: a block-diffusion prompt's tail in the first block


def loop_stability(top1: np.ndarray, block: np.ndarray) -> np.ndarray:
    """(steps, gen) consecutive calls of the current block with the same top-1, as the loop counts it.

    `block` (steps,) is each call's block index; a block's first call starts every streak at 1.
    Exact for the current block's positions, which every call recomputes (a trace does not say
    which other positions a cached call recomputed).
    """
    stable = np.ones_like(top1, dtype=np.int64)
    for t in range(1, top1.shape[0]):
        same = (top1[t] == top1[t - 1]) & (block[t] == block[t - 1])
        stable[t] = np.where(same, stable[t - 1] + 1, 1)
    return stable


def trace_features(trace, block_length: int) -> TraceFeatures:
    """The features `FeatureTracker` computes online, rebuilt from a trace of the same decode.

    `block_length` is the decode's block length (the generation length for whole-generation policies).
    Positions are canvas offsets: a block-diffusion trace's prompt tail (`trace.lead` columns, decided,
    never masked) is put back in front, so block k is [k L, (k + 1) L) as the loop sees it.
    """
    lead = int(trace.lead)
    top1, confidence, margin, entropy, masked_before = (
        _with_lead(a, lead, fill) for a, fill in ((trace.top1, -1), (trace.confidence, 0.0), (trace.margin, 0.0),
                                                  (trace.entropy, 0.0), (trace.masked_before, False)))
    steps, gen = top1.shape
    t = np.arange(steps)
    block_start = trace.block.astype(np.int64) * block_length
    positions = block_start[:, None] + np.arange(block_length)[None, :]  # (steps, block)
    # trace.block never decreases, so a block's first call is where its index first appears
    block_step = t - np.searchsorted(trace.block, trace.block, side="left")

    def at(array, rows):
        return array[rows[:, None], positions]

    def history(array):
        out = np.full((steps, block_length, HISTORY), np.nan, dtype=np.float32)
        for k in range(1, HISTORY + 1):
            ok = block_step >= k
            out[ok, :, k - 1] = array[(t - k)[ok][:, None], positions[ok]]
        return out

    stable = loop_stability(top1, trace.block)
    features = step_features(
        torch.from_numpy(at(confidence, t)),
        torch.from_numpy(at(margin, t)),
        torch.from_numpy(at(entropy, t)),
        torch.from_numpy(history(confidence)),
        torch.from_numpy(history(margin)),
        torch.from_numpy(at(stable, t)),
        has_previous=torch.from_numpy(block_step > 0),
        masked=torch.from_numpy(at(masked_before, t)),
        block_step=torch.from_numpy(block_step),
        block_start=torch.from_numpy(block_start),
        block_length=block_length,
        gen_length=gen,
    )
    return TraceFeatures(
        features=features.numpy(), positions=positions, masked=at(masked_before, t), block_step=block_step, lead=lead
    )


def _with_lead(array: np.ndarray, lead: int, fill) -> np.ndarray:
    """(steps, gen) -> (steps, lead + gen): `lead` columns of `fill` in front."""
    if not lead:
        return array
    return np.concatenate([np.full((array.shape[0], lead), fill, dtype=array.dtype), array], axis=1)


@dataclass
class TraceSamples:
    """Training rows of one trace: one per (call, masked position of the current block)."""

    features: np.ndarray  # (n, F) float32
    labels: np.ndarray  # (n,) uint8: the top-1 at that call equals the final token
    prev: np.ndarray  # (n,) index of the same position's row at the previous call of the block, -1 if none
    step: np.ndarray  # (n,)
    position: np.ndarray  # (n,)


def trace_samples(trace, block_length: int) -> TraceSamples:
    """Label every masked position of the current block at every call with "already final"."""
    tf = trace_features(trace, block_length)
    steps = tf.positions.shape[0]
    t = np.arange(steps)
    final = _with_lead(trace.final_tokens[None, :], tf.lead, -1)[0]
    top1 = _with_lead(trace.top1, tf.lead, -1)[t[:, None], tf.positions]
    labels = (top1 == final[tf.positions]).astype(np.uint8)
    row_id = np.full(tf.masked.shape, -1, dtype=np.int64)
    row_id[tf.masked] = np.arange(int(tf.masked.sum()))
    prev = np.full(tf.masked.shape, -1, dtype=np.int64)
    later = tf.block_step >= 1
    prev[later] = row_id[t[later] - 1]
    step = np.broadcast_to(t[:, None], tf.masked.shape)
    return TraceSamples(
        features=tf.features[tf.masked],
        labels=labels[tf.masked],
        prev=prev[tf.masked],
        step=step[tf.masked].astype(np.int32),
        position=(tf.positions[tf.masked] - tf.lead).astype(np.int32),  # the trace's column
    )

"""Redundancy accounting (R²-dLLM §4): what a decode spent that it did not need to.

R_total is one measure, computed from a decode's `Trace` alone by the functions here, the same for
every policy: two decodes with identical traces score identically whatever policy made them. A
policy's own event counters (`SequenceResult.events`, e.g. r2's `cluster_commits`) say what the
policy did; they are reported beside R_total, never in it.

Notation, for a trace of S calls over G generation positions in blocks of L:
- B(s): the current block of call s, positions p with p // L == trace.block[s];
- masked before call s: `trace.masked_before[s, p]`;
- masked after call s: `masked_before[s + 1, p]` for s < S - 1 (between two calls of a sequence
  the canvas does not change); after the last call, p in B(S-1) with `commit_step[p] == -1` (never
  committed, or remasked and not committed again: only a cancelled decode has such positions,
  since the loop ends a sequence only when its block is complete);
- final token F[p]: `trace.tokens_after[-1, p]` (equal to the decode's final token at every
  position that was ever in a current block; the stop rule fills only positions after them).

The three counts (all over calls s and positions of B(s) only: what the policy could have
committed at that call):
- temporal (paper §4.2, "a token that matches the final output but is not finalized"): pairs
  (s, p) with p masked after call s although `top1[s, p] == F[p]`. The last call never counts (a
  position still masked after it has the mask as its final token, which is never a top-1). This is
  the loop's `temporal_redundant_steps`, recomputed from the trace.
- confidence clusters (spatial, paper §4.1 "confidence clusters"): windows of `window` (3)
  adjacent positions of B(s), every one masked after call s, whose mean confidence at call s
  (`trace.confidence`, the probability of the un-noised top-1) is >= `tau_s` (0.8): a confident
  neighbourhood the decode left wholly undecided, which the reference's window rule would have
  committed at this call. Each window start counts once, so overlapping windows count separately.
- token clusters (spatial, paper §4.1 "positional ambiguity"): maximal runs of >= 2 adjacent
  positions of B(s), all masked before call s, with the same `top1[s]`: the model places one token
  at several neighbouring places. Each run counts once per call, whatever the policy then did with
  it (the ambiguity is in what the model predicted, on the canvas the decode gave it).

R_total = temporal_weight * temporal + spatial_weight * (confidence clusters + token clusters).

Where the paper is silent (its formula for the score is not published, nor found in the reference
code):
- weights default to 1: a plain count of avoidable work (one redundant step or one spatial event
  counts one);
- window 3 and tau_s 0.8 are the reference code's defaults for its confidence-window rule; the
  window must be wholly masked *after* the call (the reference's rule fires on windows holding at
  most one committed token *before* it; counting only windows left entirely masked counts
  confident work that was certainly left undone at this call);
- positional ambiguity is counted through token clusters only: the trace keeps the top-1 and its
  probability per position, not whole distributions, so probability mass of one token spread over
  neighbours (r2's ambiguity rule) is not measurable from it;
- spatial events are counted on the current block only, like the temporal ones.

The block length is read from the trace: the positions committed during block 0's calls are
exactly block 0 (the loop leaves a block only when all its positions are committed). This holds for
every decode that finished its first block, and it is the length the loop really used (the whole
generation for a `whole_generation` policy such as `one_shot`, whatever `config.block_length`
says). `block_length=` overrides it, for a trace cut short inside its first block.
"""

from __future__ import annotations

import numpy as np

from unmask.decoding.trace import Trace

TAU_S = 0.8
WINDOW = 3
COUNTS = ("temporal", "confidence_clusters", "token_clusters")


def infer_block_length(trace: Trace) -> int:
    """The block length of the decode that made `trace` (module docstring)."""
    cs = np.asarray(trace.commit_step)
    gen = int(trace.top1.shape[1])
    valid = cs >= 0
    if not valid.any() or trace.steps == 0:
        return gen
    in_first = np.zeros_like(valid)
    in_first[valid] = np.asarray(trace.block)[cs[valid]] == 0
    return int(in_first.sum()) + int(trace.lead) or gen  # the first block also holds the prompt's tail


def current_block(trace: Trace, block_length: int | None = None) -> np.ndarray:
    """(steps, gen) bool: position p is in the current block of call s."""
    length = int(block_length or infer_block_length(trace))
    pos = np.arange(trace.top1.shape[1]) + int(trace.lead)  # the canvas's block-aligned offsets
    return (pos[None, :] // length) == np.asarray(trace.block)[:, None]


def masked_after(trace: Trace, block_length: int | None = None) -> np.ndarray:
    """(steps, gen) bool: positions of the current block still masked after each call (module docstring)."""
    in_block = current_block(trace, block_length)
    out = np.zeros_like(in_block)
    if trace.steps:
        out[:-1] = np.asarray(trace.masked_before[1:], dtype=bool)
        out[-1] = np.asarray(trace.commit_step) < 0
    return out & in_block


def temporal_redundancy(trace: Trace, block_length: int | None = None) -> int:
    """(call, position) pairs left masked although the call's top-1 already was the final token."""
    if trace.steps == 0:
        return 0
    final = np.asarray(trace.tokens_after[-1])
    hit = masked_after(trace, block_length) & (np.asarray(trace.top1) == final[None, :])
    return int(hit.sum())


def confidence_clusters(trace: Trace, tau_s: float = TAU_S, window: int = WINDOW, block_length: int | None = None) -> int:
    """Windows of `window` adjacent current-block positions all masked after a call, mean confidence >= tau_s."""
    gen = trace.top1.shape[1]
    if trace.steps == 0 or window < 1 or window > gen:
        return 0
    undecided = masked_after(trace, block_length)
    conf = np.asarray(trace.confidence, dtype=np.float64)
    all_masked = np.lib.stride_tricks.sliding_window_view(undecided, window, axis=1).all(-1)
    mean = np.lib.stride_tricks.sliding_window_view(conf, window, axis=1).mean(-1)
    with np.errstate(invalid="ignore"):
        confident = mean >= tau_s  # NaN (a position the call did not compute) is never confident
    return int((all_masked & confident).sum())


def token_clusters(trace: Trace, block_length: int | None = None) -> int:
    """Maximal runs of >= 2 adjacent current-block positions masked before a call with the same top-1."""
    if trace.steps == 0 or trace.top1.shape[1] < 2:
        return 0
    masked = np.asarray(trace.masked_before, dtype=bool) & current_block(trace, block_length)
    top1 = np.asarray(trace.top1)
    pair = masked[:, 1:] & masked[:, :-1] & (top1[:, 1:] == top1[:, :-1])  # p and p+1 in one run
    starts = pair.copy()
    starts[:, 1:] &= ~pair[:, :-1]  # a run starts where the previous pair does not continue it
    return int(starts.sum())


def spatial_redundancy(trace: Trace, tau_s: float = TAU_S, window: int = WINDOW, block_length: int | None = None) -> int:
    """Spatial events: confidence clusters plus token clusters."""
    return confidence_clusters(trace, tau_s, window, block_length) + token_clusters(trace, block_length)


def redundancy_counts(trace: Trace, tau_s: float = TAU_S, window: int = WINDOW, temporal_weight: float = 1.0,
                      spatial_weight: float = 1.0, block_length: int | None = None) -> dict[str, float]:
    """Every count of the module docstring, and R_total, for one trace."""
    counts = {
        "temporal": float(temporal_redundancy(trace, block_length)),
        "confidence_clusters": float(confidence_clusters(trace, tau_s, window, block_length)),
        "token_clusters": float(token_clusters(trace, block_length)),
    }
    counts["spatial"] = counts["confidence_clusters"] + counts["token_clusters"]
    counts["r_total"] = temporal_weight * counts["temporal"] + spatial_weight * counts["spatial"]
    return counts


def r_total(trace: Trace, tau_s: float = TAU_S, window: int = WINDOW, temporal_weight: float = 1.0,
            spatial_weight: float = 1.0, block_length: int | None = None) -> float:
    """R_total of one decode, from its trace alone (module docstring); decode with `record_trace=True`."""
    if not isinstance(trace, Trace):
        raise TypeError(
            f"r_total takes a decode's Trace (decode with record_trace=True), got {type(trace).__name__}; "
            "a policy's own event counters are not part of R_total"
        )
    return redundancy_counts(trace, tau_s, window, temporal_weight, spatial_weight, block_length)["r_total"]

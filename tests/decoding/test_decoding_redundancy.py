"""R_total from the trace alone: counts worked by hand from the definition in `unmask.decoding.redundancy`.

Definition (per call s, over the positions of its current block B(s) only):
- masked after call s = masked before call s+1 (after the last call: commit_step == -1);
- temporal: (s, p) masked after s with top1[s, p] == final token of p;
- confidence clusters: windows of `window` adjacent positions of B(s), all masked after s, with
  mean confidence at s >= tau_s (each window start counts once);
- token clusters: maximal runs of >= 2 adjacent positions of B(s), masked before s, same top1[s].
R_total = temporal + confidence clusters + token clusters (unit weights).
Every expected value below is worked out by hand in the comment beside it.
"""

import numpy as np
import pytest

from unmask.decoding import generate
from unmask.decoding.redundancy import (
    confidence_clusters,
    infer_block_length,
    r_total,
    redundancy_counts,
    spatial_redundancy,
    temporal_redundancy,
    token_clusters,
)
from unmask.decoding.trace import Trace

M = 99  # the mask token in these hand-made traces (the measure never needs its id)
A, B, C, D, E, X = 1, 2, 3, 4, 5, 6
T, F = True, False


def make_trace(top1, confidence, masked_before, tokens_after, block, commit_step, remasked=()):
    top1 = np.array(top1, dtype=np.int64)
    zeros = np.zeros(top1.shape, dtype=np.float32)
    return Trace(
        top1=top1, confidence=np.array(confidence, dtype=np.float32), margin=zeros, entropy=zeros,
        masked_before=np.array(masked_before, dtype=bool), tokens_after=np.array(tokens_after, dtype=np.int64),
        block=np.array(block, dtype=np.int64), commit_step=np.array(commit_step, dtype=np.int64),
        remasked=list(remasked),
    )


def one_block_trace():
    """3 calls x 4 positions, one block; final tokens [A, B, C, D].

    call 0: all masked; top1 [A, B, B, D], conf [.95 .85 .85 .85]; commits 0   -> [A, M, M, M]
    call 1: masked 1-3; top1 [A, B, C, D], conf [.99 .95 .60 .90]; commits 1, 3 -> [A, B, M, D]
    call 2: masked 2;   top1 [A, B, C, D], conf [.99 .99 .95 .99]; commits 2    -> [A, B, C, D]
    """
    return make_trace(
        top1=[[A, B, B, D], [A, B, C, D], [A, B, C, D]],
        confidence=[[.95, .85, .85, .85], [.99, .95, .60, .90], [.99, .99, .95, .99]],
        masked_before=[[T, T, T, T], [F, T, T, T], [F, F, T, F]],
        tokens_after=[[A, M, M, M], [A, B, M, D], [A, B, C, D]],
        block=[0, 0, 0],
        commit_step=[0, 1, 2, 1],
    )


def test_counts_on_a_one_block_trace():
    trace = one_block_trace()
    # masked after: call 0 -> {1, 2, 3} (masked before call 1); call 1 -> {2}; call 2 -> none.
    # temporal: call 0: p1 top1 B = final B yes, p2 B != C, p3 D = D yes -> 2; call 1: p2 C = C -> 1.
    assert temporal_redundancy(trace) == 3
    # confidence clusters (window 3, tau_s 0.8): call 0: [0,1,2] has p0 decided -> no;
    # [1,2,3] all masked after, mean (.85 + .85 + .85) / 3 = .85 >= .8 -> 1. Calls 1, 2: no window
    # of three still-masked positions.
    assert confidence_clusters(trace) == 1
    # at tau_s 0.9 the same window (.85) does not count
    assert confidence_clusters(trace, tau_s=0.9) == 0
    # token clusters: call 0: masked 0-3, top1 A B B D -> one run {1, 2}; call 1: masked 1-3,
    # top1 B C D -> none; call 2: one masked position -> none.
    assert token_clusters(trace) == 1
    assert spatial_redundancy(trace) == 2
    assert r_total(trace) == 3 + 1 + 1
    # weights: 2 * 3 + 0.5 * (1 + 1) = 7
    assert r_total(trace, temporal_weight=2.0, spatial_weight=0.5) == 7.0
    counts = redundancy_counts(trace)
    assert counts == {"temporal": 3.0, "confidence_clusters": 1.0, "token_clusters": 1.0, "spatial": 2.0, "r_total": 5.0}


def two_block_trace():
    """4 calls x 4 positions in blocks of 2; final tokens [A, C, D, E].

    call 0 (block 0): all masked; top1 [A, A, D, D], conf [.9 .5 .9 .9]; commits 0 -> [A, M, M, M]
    call 1 (block 0): masked 1-3; top1 [A, C, D, D], conf [.9 .9 .9 .9]; commits 1 -> [A, C, M, M]
    call 2 (block 1): masked 2-3; top1 [A, C, D, E], conf [.9 .9 .95 .5]; commits 2 -> [A, C, D, M]
    call 3 (block 1): masked 3;   top1 [A, C, D, E], conf [.9 .9 .9 .9];  commits 3 -> [A, C, D, E]
    """
    return make_trace(
        top1=[[A, A, D, D], [A, C, D, D], [A, C, D, E], [A, C, D, E]],
        confidence=[[.9, .5, .9, .9], [.9, .9, .9, .9], [.9, .9, .95, .5], [.9, .9, .9, .9]],
        masked_before=[[T, T, T, T], [F, T, T, T], [F, F, T, T], [F, F, F, T]],
        tokens_after=[[A, M, M, M], [A, C, M, M], [A, C, D, M], [A, C, D, E]],
        block=[0, 0, 1, 1],
        commit_step=[0, 1, 2, 3],
    )


def test_only_the_current_block_counts():
    trace = two_block_trace()
    # block length read from the trace: positions committed during block 0's calls (0, 1) = {0, 1} -> 2
    assert infer_block_length(trace) == 2
    # temporal: call 0, B = {0, 1}: masked after {1}, top1 A != C -> 0 (p2 is masked with top1 D = final
    # D, but outside the block: not counted). Call 1: nothing of {0, 1} masked after -> 0. Call 2,
    # B = {2, 3}: masked after {3}, top1 E = E -> 1. Call 3: the last, all committed -> 0.
    assert temporal_redundancy(trace) == 1
    # token clusters: call 0: {0, 1} masked with A, A -> 1 (the D, D run at 2-3 is block 1's, not
    # counted). Call 1: only p1 of block 0 masked -> 0. Call 2: {2, 3} top1 D, E -> 0. Call 3: -> 0.
    assert token_clusters(trace) == 1
    # window 3 does not fit a block of 2 -> 0. Window 2, tau_s 0.5: call 0: [0, 1] has p0 decided;
    # [1, 2] crosses into block 1 -> not a window of the block. Call 1: [0, 1] decided. Call 2: [2, 3]
    # has p2 decided after the call. Call 3: [2, 3] decided -> 0.
    assert confidence_clusters(trace) == 0
    assert confidence_clusters(trace, tau_s=0.5, window=2) == 0
    assert r_total(trace) == 2
    # an explicit block_length=4 makes B(s) = {0..3} for the calls of block index 0 (calls 0, 1) and
    # empty for block index 1 (positions 4-7 do not exist): call 0: masked after {1, 2, 3}: p1 A != C,
    # p2 D = D, p3 D != E -> 1; call 1: masked after {2, 3}: p2 D = D, p3 D != E -> 1. Total 2.
    assert temporal_redundancy(trace, block_length=4) == 2


def test_a_remasked_position_counts_while_it_waits():
    # 3 calls x 2 positions, one block; final [A, B].
    # call 0: both masked; top1 [A, B]; commits 0 = A and 1 = X (a sampled token) -> [A, X]
    # call 1: none masked; top1 [A, B]; remasks 1 -> [A, M]
    # call 2: p1 masked; top1 [A, B]; commits 1 = B -> [A, B]
    trace = make_trace(
        top1=[[A, B], [A, B], [A, B]], confidence=[[.9, .9]] * 3,
        masked_before=[[T, T], [F, F], [F, T]], tokens_after=[[A, X], [A, M], [A, B]],
        block=[0, 0, 0], commit_step=[0, 2], remasked=[(1, 1)],
    )
    # masked after: call 0 -> none (masked before call 1: none); call 1 -> {1}; call 2 -> none.
    # temporal: call 1, p1: top1 B = final B -> 1.
    assert temporal_redundancy(trace) == 1
    # token clusters: call 0 top1 A, B differ; call 2 one masked position -> 0
    assert r_total(trace) == 1


def test_positions_left_masked_after_the_last_call_count_as_masked():
    # a decode cancelled after one call that committed nothing: 1 call x 3 positions, commit_step -1.
    # call 0: all masked; top1 [A, B, C], conf [.9 .9 .9]; commits nothing -> [M, M, M]
    trace = make_trace(
        top1=[[A, B, C]], confidence=[[.9, .9, .9]], masked_before=[[T, T, T]], tokens_after=[[M, M, M]],
        block=[0], commit_step=[-1, -1, -1],
    )
    # no position was committed: the block is the whole generation (3). Masked after the last call:
    # commit_step -1 -> {0, 1, 2}. Temporal: final tokens are M, never a top-1 -> 0. Confidence
    # clusters: [0, 1, 2] all masked after, mean .9 >= .8 -> 1. Token clusters: A, B, C differ -> 0.
    assert infer_block_length(trace) == 3
    assert temporal_redundancy(trace) == 0
    assert confidence_clusters(trace) == 1
    assert r_total(trace) == 1


def test_runs_are_counted_once_each_and_windows_once_per_start():
    # 2 calls x 6 positions, one block; final [B, B, B, C, C, D].
    # call 0: all masked; top1 [B, B, B, C, C, D], conf all .85; commits 0 -> [B, M, M, M, M, M]
    # call 1: masked 1-5; top1 the same, conf all .95; commits 1-5 -> [B, B, B, C, C, D]
    trace = make_trace(
        top1=[[B, B, B, C, C, D]] * 2, confidence=[[.85] * 6, [.95] * 6],
        masked_before=[[T] * 6, [F] + [T] * 5], tokens_after=[[B] + [M] * 5, [B, B, B, C, C, D]],
        block=[0, 0], commit_step=[0, 1, 1, 1, 1, 1],
    )
    # token clusters: call 0: runs {0, 1, 2} (B) and {3, 4} (C) -> 2; call 1: masked 1-5:
    # runs {1, 2} (B) and {3, 4} (C) -> 2. Total 4.
    assert token_clusters(trace) == 4
    # confidence clusters: call 0, masked after {1..5}: windows [1,2,3], [2,3,4], [3,4,5], each mean
    # .85 >= .8 -> 3; call 1 (last): all committed -> 0.
    assert confidence_clusters(trace) == 3
    # temporal: call 0, p1..p5 masked after, top1 = final at each -> 5.
    assert temporal_redundancy(trace) == 5
    assert r_total(trace) == 12


def test_identical_traces_score_identically_whatever_their_events():
    a, b = one_block_trace(), one_block_trace()
    assert r_total(a) == r_total(b)
    with pytest.raises(TypeError, match="Trace"):
        r_total({"temporal_redundant_steps": 3.0, "cluster_collapses": 1.0})  # the old, per-policy input


def test_a_threshold_decode_and_an_r2_decode_with_the_same_trace_score_the_same(scripted):
    # tokens 20-23 play A-D. The plan (what the model predicts at each position, given the canvas):
    #   p0: A .95   p1: B .87   p2: B .30 while p1 is masked, else C .95   p3: D .40 while p2 is masked, else D .95
    # threshold:tau=0.85 -- call 0: commits p0 (.95), p1 (.87); call 1: p2 (.95); call 2: p3 (.95).
    # r2 (tau .9, tau_s .8) -- call 0: base commits p0; windows after it: [0,1,2] open p1, p2 mean
    #   .585, [1,2,3] mean .52 -> none; token cluster {1, 2} (B, B): its most confident p1 .87 > .8
    #   commits p1 (an r2 event: threshold would not call it that). Call 1: base p2; window [1,2,3]
    #   holds 2 decided -> skipped; p3's streak is 2 < k = 3. Call 2: base p3. Same commits, same trace.
    A_, B_, C_, D_ = 20, 21, 22, 23

    def plan(prompt, gen_tokens, g):
        mask = model.mask_id
        if g == 0:
            return A_, 0.95
        if g == 1:
            return B_, 0.87
        if g == 2:
            return (B_, 0.30) if gen_tokens[1] == mask else (C_, 0.95)
        return (D_, 0.40) if gen_tokens[2] == mask else (D_, 0.95)

    model = scripted(plan, gen_length=4, block_length=4)
    thr = generate(model, [[30, 31]], "threshold:tau=0.85", early_stop=False, record_trace=True).sequences[0]
    r2 = generate(model, [[30, 31]], "r2", early_stop=False, record_trace=True).sequences[0]
    for name in ("top1", "confidence", "masked_before", "tokens_after", "block", "commit_step"):
        assert np.array_equal(getattr(thr.trace, name), getattr(r2.trace, name)), name
    assert thr.tokens == r2.tokens == [A_, B_, C_, D_]
    own = {k: v for k, v in r2.events.items() if k != "temporal_redundant_steps"}
    assert sum(own.values()) >= 1  # r2 counted events of its own; they are not part of R_total
    # by hand: masked after call 0 {2, 3}, call 1 {3}. Temporal: call 0 p2 B != C, p3 D = D -> 1;
    # call 1 p3 D = D -> 1: 2 (the loop's own count agrees). Confidence clusters: no three positions
    # masked after a call -> 0. Token clusters: call 0 masked 0-3, top1 A B B D -> {1, 2}: 1;
    # call 1 masked {2, 3} C, D -> 0. R_total = 2 + 0 + 1 = 3 for both.
    assert thr.events["temporal_redundant_steps"] == r2.events["temporal_redundant_steps"] == 2
    assert r_total(thr.trace) == r_total(r2.trace) == 3.0


def test_a_block_diffusion_trace_counts_its_blocks_from_the_prompts_tail():
    """Blocks of 4 with a 2-token prompt tail (`lead` 2): block 0 is the trace's columns 0-1, block 1
    columns 2-5. Final tokens [A, B, C, D, E, A].

    call 0 (block 0): masked 0-1; top1 [A, B, X, X, X, X]; commits 0     -> [A, M, M, M, M, M]
    call 1 (block 0): masked 1;   top1 [A, B, C, D, E, A]; commits 1     -> [A, B, M, M, M, M]
    call 2 (block 1): masked 2-5; top1 [A, B, C, D, X, A]; commits 2, 3  -> [A, B, C, D, M, M]
    call 3 (block 1): masked 4-5; top1 [A, B, C, D, E, A]; commits 4, 5  -> [A, B, C, D, E, A]

    Temporal redundancy: after call 0, position 1 (still masked, in block 0) already showed B: 1.
    After call 2, position 5 (masked, in block 1) already showed A: 1. Positions 2-5 at calls 0-1 are
    not in the current block, so their right answers count nothing. Total 2. Without the lead,
    blocks of 4 would put columns 2-3 in block 0 and count position 2 and 3 after call 1 as well.
    """
    trace = make_trace(
        top1=[[A, B, X, X, X, X], [A, B, C, D, E, A], [A, B, C, D, X, A], [A, B, C, D, E, A]],
        confidence=[[.95, .5, 0, 0, 0, 0], [.99, .95, 0, 0, 0, 0], [.99, .99, .95, .95, .5, .5], [.99] * 6],
        masked_before=[[T, T, T, T, T, T], [F, T, T, T, T, T], [F, F, T, T, T, T], [F, F, F, F, T, T]],
        tokens_after=[[A, M, M, M, M, M], [A, B, M, M, M, M], [A, B, C, D, M, M], [A, B, C, D, E, A]],
        block=[0, 0, 1, 1],
        commit_step=[0, 1, 2, 2, 3, 3],
    )
    trace.lead = 2
    assert infer_block_length(trace) == 4  # 2 generated positions in block 0 plus the 2 of the tail
    assert temporal_redundancy(trace, 4) == 2
    trace.lead = 0  # read as if the blocks started at column 0: a different (wrong) count
    assert temporal_redundancy(trace, 4) == 4  # 1 + 2 (columns 2 and 3 after call 1) + 1

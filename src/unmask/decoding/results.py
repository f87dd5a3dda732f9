"""What a decode returns: one `SequenceResult` per sequence, built once, when the sequence leaves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unmask.decoding.config import DecodeConfig
from unmask.decoding.trace import Trace


@dataclass
class SequenceResult:
    """One decoded sequence and what it cost."""

    prompt_ids: list[int]
    tokens: list[int]  # the whole generation region after decoding
    answer_ids: list[int]  # tokens before the first stop token
    text: str
    nfe: int  # model calls this sequence took part in
    rows: int  # sequence-forwards computed for it (NFE plus extra verification rows)
    decided: int  # generation positions decided (committed by the policy or filled at stop)
    latency_s: float  # from the moment it joined the decode until it left
    stopped_early: bool
    trace: Trace | None = None
    cancelled: bool = False  # left the batch before finishing (its tokens may hold masks)
    # policy events summed over steps, plus `temporal_redundant_steps`: (step, position) pairs of
    # the current block where the position stayed masked after the step although its top-1 already
    # equalled the final token (R²-dLLM's temporal redundancy, counted for every policy)
    events: dict[str, float] = field(default_factory=dict)

    @property
    def useful_tokens(self) -> int:
        return len(self.answer_ids)

    @property
    def tpf(self) -> float:
        return self.decided / max(self.nfe, 1)


@dataclass
class DecodeResult:
    sequences: list[SequenceResult]
    wall_s: float
    strategy: str
    params: dict[str, Any]
    config: DecodeConfig
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.sequences]


def build_trace(steps: list[dict], commit_step: np.ndarray, remasked: list[tuple[int, int]],
                edited: list[tuple[int, int]] = (), lead: int = 0) -> Trace:
    """A sequence's `Trace` from the rows the loop recorded for it, one per call."""

    def stack(key, dtype):
        return np.stack([s[key] for s in steps]).astype(dtype)

    return Trace(
        top1=stack("top1", np.int64),
        confidence=stack("confidence", np.float32),
        margin=stack("margin", np.float32),
        entropy=stack("entropy", np.float32),
        masked_before=stack("masked_before", bool),
        tokens_after=stack("tokens_after", np.int64),
        block=np.array([s["block"] for s in steps], dtype=np.int64),
        commit_step=commit_step.astype(np.int64),
        remasked=list(remasked),
        edited=list(edited),
        lead=int(lead),
    )


def sequence_result(model, *, prompt_ids, tokens, nfe, rows, stopped_early, events, redundant, trace_rows, remasked,
                    edited, commit_step, latency_s, cancelled: bool, lead: int = 0) -> SequenceResult:
    """One sequence's result from what the row table held for it (`RowTable.result_args`)."""
    stop_set = set(model.stop_ids)
    cut = next((i for i, t in enumerate(tokens) if t in stop_set), len(tokens))
    answer = tokens[:cut]
    return SequenceResult(
        prompt_ids=list(prompt_ids),
        tokens=tokens,
        answer_ids=answer,
        text=model.tokenizer.decode(answer),
        nfe=nfe,
        rows=rows,
        decided=sum(t != model.mask_id for t in tokens),  # a rewrite (token editing) decides nothing more
        latency_s=latency_s,
        stopped_early=stopped_early,
        cancelled=cancelled,
        trace=build_trace(trace_rows, commit_step, remasked, edited, lead) if trace_rows is not None else None,
        events={**events, "temporal_redundant_steps": redundant},
    )

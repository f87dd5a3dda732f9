"""The trace of a decode: for every step and generation position, what the model said there.

Recorded by the loop (one row per call, kept with the sequence's slot and built into a `Trace` when it
leaves) when `DecodeConfig.record_trace` is on. Arrays are (steps, gen_length) with
step 0 the first model call. Confidence, margin and entropy are of the un-noised top-1. R², TSPD,
CE features, the visualiser and the redundancy scores are all derived from these arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    top1: np.ndarray  # (steps, gen) int, argmax at each call
    confidence: np.ndarray  # (steps, gen) float32, probability of the top-1
    margin: np.ndarray  # (steps, gen) float32, top-1 minus top-2 probability
    entropy: np.ndarray  # (steps, gen) float32
    masked_before: np.ndarray  # (steps, gen) bool, position was masked when the call was made
    tokens_after: np.ndarray  # (steps, gen) int, the canvas after the step's commits
    block: np.ndarray  # (steps,) int, block index of each step
    commit_step: np.ndarray  # (gen,) int, step at which the final token was committed (-1: filled at stop)
    remasked: list[tuple[int, int]] = field(default_factory=list)  # (step, position) remask events
    edited: list[tuple[int, int]] = field(default_factory=list)  # (step, position) rewrites (token editing)
    # block diffusion: the prompt's tail, which opens the first block before the trace's first column
    # (the trace leaves it out), so block k spans columns [k L - lead, (k + 1) L - lead)
    lead: int = 0

    @property
    def steps(self) -> int:
        return int(self.top1.shape[0])

    @property
    def final_tokens(self) -> np.ndarray:
        return self.tokens_after[-1]

    def to_npz(self, path) -> None:
        np.savez_compressed(
            path,
            top1=self.top1, confidence=self.confidence, margin=self.margin, entropy=self.entropy,
            masked_before=self.masked_before, tokens_after=self.tokens_after, block=self.block,
            commit_step=self.commit_step, remasked=np.array(self.remasked, dtype=np.int64).reshape(-1, 2),
            edited=np.array(self.edited, dtype=np.int64).reshape(-1, 2), lead=np.int64(self.lead),
        )

    @classmethod
    def from_npz(cls, path) -> "Trace":
        data = np.load(path)
        fields_ = {k: data[k] for k in data.files}
        fields_["remasked"] = [tuple(map(int, r)) for r in fields_["remasked"]]
        fields_["edited"] = [tuple(map(int, r)) for r in fields_.get("edited", np.zeros((0, 2)))]
        fields_["lead"] = int(fields_.get("lead", 0))
        return cls(**fields_)

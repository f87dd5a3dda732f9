"""Redundancy accounting (R²-dLLM): what a decode spent that it did not need to.

From each sequence's events (counted by the loop and the policies):
- `temporal_redundant_steps`: (step, position) pairs of the current block where the position stayed
  masked after a call although its top-1 already equalled its final token (counted for every
  policy by the loop);
- spatial events: `cluster_collapses` (token clusters whose duplicates R² held back) and
  `ambiguity_merges` (spread-out predictions R² committed once at the best place).

R_total is their sum with unit weights. R²-dLLM does not publish its score's formula; equal weights
keep it a plain count of avoidable work (one redundant step, or one spatial event, counts one).
"""

from __future__ import annotations

SPATIAL_EVENTS = ("cluster_collapses", "ambiguity_merges")
TEMPORAL = "temporal_redundant_steps"


def r_total(events: dict[str, float], temporal_weight: float = 1.0, spatial_weight: float = 1.0) -> float:
    return temporal_weight * events.get(TEMPORAL, 0.0) + spatial_weight * sum(events.get(k, 0.0) for k in SPATIAL_EVENTS)

"""Small statistics for the benchmark: confidence intervals and the Pareto frontier."""

from __future__ import annotations

import math


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sane at 0 and n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (cost, value) that no other point beats: lower-or-equal cost and
    higher-or-equal value with one strictly better. Returned in increasing cost."""
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(
            (c <= cost and v >= value) and (c < cost or v > value) for j, (c, v) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))

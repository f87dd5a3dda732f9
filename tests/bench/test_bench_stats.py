import pytest

from unmask.bench.stats import pareto_front, wilson_interval


def test_wilson_interval_contains_the_proportion_and_shrinks_with_n():
    lo, hi = wilson_interval(8, 10)
    assert lo < 0.8 < hi
    lo2, hi2 = wilson_interval(80, 100)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_pareto_front_keeps_only_undominated_points_in_cost_order():
    points = [(48, 0.90), (20, 0.88), (30, 0.85), (10, 0.40), (20, 0.80), (1, 0.0)]
    assert pareto_front(points) == [5, 3, 1, 0]

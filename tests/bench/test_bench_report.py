"""The frontier plot shows each accuracy's 95% interval and keeps labels apart; rows print as done."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.container import ErrorbarContainer

from unmask.bench.report import pareto_figure, place_labels, row_line, write_pareto


def _row(strategy, nfe, acc, lo, hi, params=None):
    return {"strategy": strategy, "params": params or {}, "nfe": nfe, "accuracy": acc, "accuracy_ci": [lo, hi],
            "n": 160, "tpf": 48 / nfe, "tokens_per_s": 50.0, "rows": nfe, "useful_tokens": 27.0, "latency_s": 1.0}


# the crowding the issue saw: tspd / threshold / ce almost on one point, margin on low_confidence
CROWDED = [
    _row("low_confidence", 35.8, 0.888, 0.84, 0.92),
    _row("margin", 35.9, 0.887, 0.84, 0.92),
    _row("threshold", 19.3, 0.886, 0.84, 0.92),
    _row("tspd", 19.2, 0.884, 0.83, 0.92),
    _row("ce", 19.0, 0.885, 0.83, 0.92),
    _row("r2", 18.4, 0.880, 0.83, 0.91),
    _row("psd", 9.2, 0.892, 0.85, 0.93),
    _row("one_shot", 1.0, 0.10, 0.06, 0.15),
    _row("oracle", 5.7, 0.888, 0.84, 0.92),
]
RESULTS = {"task": "arith", "split": "test", "model": "builtin", "rows": CROWDED}


def _boxes(fig, anns):
    r = fig.canvas.get_renderer()
    return [a.get_window_extent(r) for a in anns]


def test_labels_do_not_overlap_each_other_and_stay_inside_the_axes():
    fig, ax, anns = pareto_figure(RESULTS)
    boxes = _boxes(fig, anns)
    assert [a.get_text() for a in anns] == [r["strategy"] for r in CROWDED]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (anns[i].get_text(), anns[j].get_text())
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    for b in boxes:
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
    plt.close(fig)


def test_the_naive_placement_would_overlap():
    # the test above is not vacuous: one fixed offset per label collides on these rows
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_xscale("log")
    ax.set_xlim(1 / 1.6, 35.9 * 1.9)
    ax.set_ylim(-0.02, 1.05)
    anns = [ax.annotate(r["strategy"], (r["nfe"], r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7) for r in CROWDED]
    boxes = _boxes(fig, anns)
    assert any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes)))
    plt.close(fig)


def test_error_bars_span_each_rows_interval():
    fig, ax, _ = pareto_figure(RESULTS)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == len(CROWDED)
    for container, row in zip(bars, CROWDED):
        (segments,) = container.lines[2]  # the vertical bar: one segment from lo to hi at x = nfe
        (x0, y0), (x1, y1) = segments.get_segments()[0]
        assert x0 == pytest.approx(row["nfe"]) and x1 == pytest.approx(row["nfe"])
        assert sorted([y0, y1]) == pytest.approx(row["accuracy_ci"])
    plt.close(fig)


def test_place_labels_keeps_clear_of_other_markers():
    fig, ax = plt.subplots(figsize=(4, 3))
    pts = [(1.0, 0.5), (1.02, 0.52), (1.04, 0.5), (1.0, 0.48)]
    ax.plot(*zip(*pts), "o")
    ax.set_xlim(0.5, 1.5)
    ax.set_ylim(0, 1)
    anns = place_labels(ax, pts, ["a-long-label", "b-long-label", "c-long-label", "d-long-label"])
    boxes = _boxes(fig, anns)
    disp = [ax.transData.transform(p) for p in pts]
    for i, b in enumerate(boxes):
        for j, (x, y) in enumerate(disp):
            if j != i:
                assert not (b.x0 < x < b.x1 and b.y0 < y < b.y1), (i, j)
    plt.close(fig)


def test_write_pareto_writes_a_png(tmp_path):
    write_pareto(RESULTS, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_row_line_names_the_strategy_and_its_figures():
    line = row_line(_row("threshold", 19.26, 0.886, 0.855, 0.911, {"tau": 0.9}))
    assert line.startswith("threshold ")
    assert "accuracy 0.886 (0.855-0.911)" in line and "NFE  19.26" in line and "n=160" in line


def test_results_md_gives_each_rows_share_of_the_oracle_tpf(tmp_path):
    from unmask.bench.report import write_markdown

    # by hand: TPF = 48 / NFE, so a row's share is the oracle's NFE over its own: psd 5.7 / 9.2 = 62%,
    # threshold 5.7 / 19.3 = 30%, one_shot 5.7 / 1.0 = 570% (it decides everything in one call)
    results = {**RESULTS, "seed": 0, "device": "cpu"}
    write_markdown(results, tmp_path / "results.md")
    lines = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")] for line in
             (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ") and "`" in line}
    header = [c.strip() for c in (tmp_path / "results.md").read_text().splitlines()[4].split("|")]
    col = header.index("of oracle TPF")
    assert lines["`psd`"][col] == "62%"
    assert lines["`threshold`"][col] == "30%"
    assert lines["`one_shot`"][col] == "570%"
    assert lines["`oracle`"][col] == "100%"


def test_without_an_oracle_row_the_share_is_a_dash(tmp_path):
    from unmask.bench.report import write_markdown

    results = {**RESULTS, "rows": [r for r in CROWDED if r["strategy"] != "oracle"], "seed": 0, "device": "cpu"}
    write_markdown(results, tmp_path / "results.md")
    header = [c.strip() for c in (tmp_path / "results.md").read_text().splitlines()[4].split("|")]
    col = header.index("of oracle TPF")
    rows = [line.split("|") for line in (tmp_path / "results.md").read_text().splitlines() if "`psd`" in line]
    assert rows[0][col].strip() == "—"

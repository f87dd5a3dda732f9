"""results.md (a table read at a glance) and pareto.png (accuracy against NFE, frontier drawn)."""

from __future__ import annotations

from pathlib import Path

from unmask.bench.stats import pareto_front

BOUND = "oracle"


def _label(row: dict) -> str:
    """`name` or `name:key=value` with only the parameters that differ from the policy's defaults."""
    from dataclasses import asdict

    from unmask.decoding.registry import policy_class

    try:
        defaults = asdict(policy_class(row["strategy"]).Config())
    except Exception:  # a policy not registered in this process: show every parameter
        defaults = {}
    changed = {k: v for k, v in row["params"].items() if k not in defaults or defaults[k] != v}
    params = ",".join(f"{k}={v}" for k, v in changed.items())
    return f"{row['strategy']}:{params}" if params else row["strategy"]


def frontier_rows(rows: list[dict]) -> set[int]:
    """Rows on the accuracy/NFE frontier, the oracle bound left out (it is a bound, not a policy)."""
    idx = [i for i, r in enumerate(rows) if r["strategy"] != BOUND]
    front = pareto_front([(rows[i]["nfe"], rows[i]["accuracy"]) for i in idx])
    return {idx[i] for i in front}


def _arm(row: dict) -> tuple:
    """(model, cache) of a comparison's row (`unmask.bench.compare`); () in a one-model run."""
    return (row["model"], row["cache"]) if "model" in row else ()


def oracle_shares(rows: list[dict]) -> list[float | None]:
    """Each row's TPF as a share of the oracle bound's of the same model and cache mode (None
    without an oracle row there).

    TPF is generation positions decided per call, so the share is also the oracle's NFE over the
    row's: 0.8 means 1.25x the bound's calls. The bound's own row is 1.
    """
    bounds = {_arm(r): r for r in rows if r["strategy"] == BOUND and r.get("tpf")}
    return [r["tpf"] / bounds[_arm(r)]["tpf"] if _arm(r) in bounds else None for r in rows]


def full_label(row: dict) -> str:
    """`_label`, after the model and cache mode in a comparison."""
    arm = _arm(row)
    return f"{arm[0]} ({arm[1]}) {_label(row)}" if arm else _label(row)


def row_line(row: dict) -> str:
    """One strategy's row on one line, for printing as soon as it is done."""
    lo, hi = row["accuracy_ci"]
    return (f"{full_label(row):<28} accuracy {row['accuracy']:.3f} ({lo:.3f}-{hi:.3f})  NFE {row['nfe']:6.2f}  "
            f"TPF {row['tpf']:5.2f}  {row['tokens_per_s']:7.1f} tokens/s  n={row['n']}")


def write_markdown(results: dict, path: Path) -> None:
    rows = results["rows"]
    front = frontier_rows(rows)
    shares = oracle_shares(rows)
    compared = any(_arm(r) for r in rows)
    lines = [
        f"# {results['task']} ({results['split']}), model {results['model']}",
        "",
        f"{rows[0]['n'] if rows else 0} problems, seed {results['seed']}, gen {results.get('gen_length')}, "
        f"block {results.get('block_length')}, batch {results.get('batch_size')}, cache {results.get('cache')}, "
        f"device {results['device']}. ★ = on the accuracy/NFE frontier. "
        "\"of oracle TPF\": the row's TPF over the oracle bound's (the bound's NFE over the row's).",
        "",
        "| |" + (" model | cache |" if compared else "") + " strategy | accuracy (95% CI) | NFE | rows | TPF | of oracle TPF | "
        "tokens/row | useful tokens | tokens/s | latency s | policy % | R_total |",
        "|---|" + ("---|---|" if compared else "") + "---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        mark = "★" if i in front else ("bound" if r["strategy"] == BOUND else "")
        lo, hi = r["accuracy_ci"]
        arm = f" {r['model']} | {r['cache']} |" if compared else ""
        lines.append(
            f"| {mark} |{arm} `{_label(r)}` | {r['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | {r['nfe']:.2f} | {r['rows']:.2f} | "
            f"{r['tpf']:.2f} | {'—' if shares[i] is None else f'{100 * shares[i]:.0f}%'} | {r.get('tokens_per_row', 0):.2f} | {r['useful_tokens']:.1f} | {r['tokens_per_s']:.1f} | {r['latency_s']:.3f} | {100 * r.get('policy_time_frac', 0.0):.1f} | {r.get('redundancy', {}).get('r_total', 0.0):.1f} |"
        )
    extra = results.get("report_extra")
    if extra:
        lines += ["", extra]
    path.write_text("\n".join(lines) + "\n")


def write_pareto(results: dict, path: Path) -> None:
    """pareto.png: accuracy (with its 95% interval as an error bar) against NFE; labels kept apart."""
    import matplotlib.pyplot as plt

    fig, _, _ = pareto_figure(results)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def pareto_figure(results: dict):
    """(figure, axes, label annotations) of the frontier plot, before it is saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    front = frontier_rows(rows)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points, labels = [], []
    for i, r in enumerate(rows):
        bound = r["strategy"] == BOUND
        lo, hi = r["accuracy_ci"]
        color = "tab:red" if bound else ("tab:blue" if i in front else "tab:gray")
        ax.errorbar(r["nfe"], r["accuracy"], yerr=[[max(r["accuracy"] - lo, 0.0)], [max(hi - r["accuracy"], 0.0)]],
                    fmt="*" if bound else "o", ms=11 if bound else 6, color=color, ecolor=color, elinewidth=1,
                    capsize=3, alpha=0.9, zorder=4 if bound else 3)
        if bound:
            ax.axvline(r["nfe"], color="tab:red", ls="--", lw=1,
                       label=f"{full_label(dict(r, strategy='oracle', params={}))} bound (NFE {r['nfe']:.1f})")
        points.append((r["nfe"], r["accuracy"]))
        labels.append(full_label(dict(r, strategy="oracle", params={})) if bound else full_label(r))
    if front:
        pts = sorted((rows[i]["nfe"], rows[i]["accuracy"]) for i in front)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:blue", lw=1.2, label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("NFE per problem (model calls, log scale)")
    ax.set_ylabel("accuracy (bars: 95% interval)")
    ax.set_ylim(-0.02, 1.05)
    if points:
        xs = [p[0] for p in points]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.9)  # room for labels on either side
    ax.set_title(f"{results['task']} / {results['split']} — {results['model']}, n = {rows[0]['n'] if rows else 0}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if front or any(r["strategy"] == BOUND for r in rows):
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig, ax, place_labels(ax, points, labels)


# offsets (points) tried in turn for a label, nearest first; past the first ring a leader line is drawn
_RINGS = [(6, 4), (6, -11), (-6, 4), (-6, -11), (6, 13), (-6, 13), (6, -20), (-6, -20)]


def place_labels(ax, points: list[tuple[float, float]], labels: list[str]) -> list:
    """Annotate each point with its label where it overlaps no label placed before it and no marker.

    Greedy: points are taken from the most crowded first; each label tries the offsets of `_RINGS`,
    then the same offsets scaled 2x, 3x, ... (drawn with a leader line), and keeps the first whose box
    is clear. Returns the annotations (matplotlib `Annotation`s) in the order of `points`.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    disp = [ax.transData.transform(p) for p in points]
    pad = 3.0  # pixels around a marker that a label must not cover
    markers = [(x - pad, y - pad, x + pad, y + pad) for x, y in disp]
    axes_box = ax.get_window_extent(renderer)

    def crowd(i: int) -> float:
        return sum(1.0 / (1.0 + abs(disp[i][0] - x) + abs(disp[i][1] - y)) for j, (x, y) in enumerate(disp) if j != i)

    placed_boxes: list[tuple[float, float, float, float]] = []
    out: list = [None] * len(points)
    for i in sorted(range(len(points)), key=crowd, reverse=True):
        choice = None
        for scale in range(1, 12):
            for dx, dy in _RINGS:
                ann = ax.annotate(
                    labels[i], points[i], textcoords="offset points", xytext=(dx * scale, dy * scale), fontsize=7,
                    ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top", zorder=5,
                    arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6) if scale > 1 else None,
                )
                bb = ann.get_window_extent(renderer)
                box = (bb.x0, bb.y0, bb.x1, bb.y1)
                inside = axes_box.x0 <= box[0] and box[2] <= axes_box.x1 and axes_box.y0 <= box[1] and box[3] <= axes_box.y1
                clear = inside and not any(_overlap(box, o) for o in placed_boxes) and not any(
                    _overlap(box, m) for j, m in enumerate(markers) if j != i)
                if clear:
                    choice = (ann, box)
                    break
                ann.remove()
            if choice:
                break
        if choice is None:  # nowhere clear: keep the first spot rather than lose the label
            ann = ax.annotate(labels[i], points[i], textcoords="offset points", xytext=_RINGS[0], fontsize=7, zorder=5)
            bb = ann.get_window_extent(renderer)
            choice = (ann, (bb.x0, bb.y0, bb.x1, bb.y1))
        out[i] = choice[0]
        placed_boxes.append(choice[1])
    return out


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

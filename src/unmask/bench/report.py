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


def write_markdown(results: dict, path: Path) -> None:
    rows = results["rows"]
    front = frontier_rows(rows)
    lines = [
        f"# {results['task']} ({results['split']}), model {results['model']}",
        "",
        f"{rows[0]['n'] if rows else 0} problems, seed {results['seed']}, gen {results.get('gen_length')}, "
        f"block {results.get('block_length')}, batch {results.get('batch_size')}, cache {results.get('cache')}, "
        f"device {results['device']}. ★ = on the accuracy/NFE frontier.",
        "",
        "| | strategy | accuracy (95% CI) | NFE | rows | TPF | tokens/row | useful tokens | tokens/s | latency s | policy % | R_total |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        mark = "★" if i in front else ("bound" if r["strategy"] == BOUND else "")
        lo, hi = r["accuracy_ci"]
        lines.append(
            f"| {mark} | `{_label(r)}` | {r['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | {r['nfe']:.2f} | {r['rows']:.2f} | "
            f"{r['tpf']:.2f} | {r.get('tokens_per_row', 0):.2f} | {r['useful_tokens']:.1f} | {r['tokens_per_s']:.1f} | {r['latency_s']:.3f} | {100 * r.get('policy_time_frac', 0.0):.1f} | {r.get('redundancy', {}).get('r_total', 0.0):.1f} |"
        )
    extra = results.get("report_extra")
    if extra:
        lines += ["", extra]
    path.write_text("\n".join(lines) + "\n")


def write_pareto(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    front = frontier_rows(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, r in enumerate(rows):
        if r["strategy"] == BOUND:
            continue
        ax.scatter(r["nfe"], r["accuracy"], s=40, color="tab:blue" if i in front else "tab:gray", zorder=3)
        ax.annotate(_label(r), (r["nfe"], r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        pts = sorted((rows[i]["nfe"], rows[i]["accuracy"]) for i in front)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:blue", lw=1.2, label="frontier")
    for r in rows:
        if r["strategy"] == BOUND:
            ax.axvline(r["nfe"], color="tab:red", ls="--", lw=1)
            ax.scatter(r["nfe"], r["accuracy"], marker="*", s=120, color="tab:red", zorder=4,
                       label=f"oracle bound (NFE {r['nfe']:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("NFE per problem (model calls, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results['task']} / {results['split']} — {results['model']}", fontsize=10)
    ax.grid(alpha=0.3)
    if front or any(r["strategy"] == BOUND for r in rows):
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

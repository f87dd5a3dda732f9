"""A picture of one decode: generation positions across, model calls (steps) down.

Each cell is the confidence of the top-1 token at that position after that call (bright = sure).
Cells where the position was still masked are drawn at full strength; once committed, a position's
cells are faded, so the unmasking front is visible. A dot marks the step at which each final token
was committed, a cross each remask, a square (on the last step) each position the stop rule
filled; dashed lines are block boundaries (between positions), dotted ones block changes (between
steps). The final tokens label the position axis.

Two renderings of the same `Trace`: a PNG (matplotlib) and a self-contained HTML page (a table with
inline CSS, no external assets; hovering a cell shows the top-1 token and its confidence).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from unmask.decoding.trace import Trace

CMAP = "viridis"
FADE = 0.3  # opacity of cells after their position was committed


def token_label(tokenizer, token_id: int) -> str:
    """What a token looks like on an axis: its text, else its vocabulary entry, else its id."""
    text = tokenizer.decode([int(token_id)]).strip()
    if text:
        return text
    raw = tokenizer.hf.convert_ids_to_tokens(int(token_id)) if hasattr(tokenizer, "hf") else None
    return raw if raw else f"#{int(token_id)}"


def _labels(tokenizer, ids) -> list[str]:
    memo: dict[int, str] = {}
    out = []
    for t in np.asarray(ids).ravel().tolist():
        if t not in memo:
            memo[t] = token_label(tokenizer, t)
        out.append(memo[t])
    return out


def _block_length(trace: Trace) -> int:
    """Positions per block when the caller does not say: gen / blocks the trace visited (exact without early stop)."""
    gen = trace.top1.shape[1] + int(trace.lead)  # the first block also holds the prompt's tail
    blocks = int(trace.block.max()) + 1 if trace.block.size else 1
    return gen // blocks if blocks and gen % blocks == 0 else gen


def committed_cells(trace: Trace) -> list[tuple[int, int]]:
    """(step, position) where each position's final token was committed (positions filled by the stop rule excluded)."""
    return [(int(s), p) for p, s in enumerate(trace.commit_step.tolist()) if s >= 0]


def render_trace(trace: Trace, tokenizer, out_dir: str | Path, name: str = "decode",
                 title: str = "", block_length: int | None = None, meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `name.png` and `name.html` for `trace` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    block = block_length or _block_length(trace)
    png = _png(trace, tokenizer, out / f"{name}.png", title, block)
    page = _html(trace, tokenizer, out / f"{name}.html", title, block, meta or {})
    return png, page


def _png(trace: Trace, tokenizer, path: Path, title: str, block: int) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

    steps, gen = trace.confidence.shape
    conf = np.nan_to_num(trace.confidence.astype(float), nan=0.0)
    width = min(max(6.0, 0.28 * gen + 2.0), 80.0)
    height = min(max(3.5, 0.22 * steps + 2.5), 60.0)
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.subplots()
    extent = (-0.5, gen - 0.5, steps - 0.5, -0.5)
    ax.imshow(conf, cmap=CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest", alpha=FADE, extent=extent)
    live = np.ma.masked_where(~trace.masked_before.astype(bool), conf)
    image = ax.imshow(live, cmap=CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest", extent=extent)
    cells = committed_cells(trace)
    if cells:
        ax.scatter([p for _, p in cells], [s for s, _ in cells], s=28, c="white", edgecolors="black",
                   linewidths=0.8, zorder=3, label="committed")
    filled = [p for p, step in enumerate(trace.commit_step.tolist()) if step < 0]
    if filled:  # filled with their predictions when the stop rule ended the decode
        ax.scatter(filled, [steps - 1] * len(filled), s=22, marker="s", facecolors="none", edgecolors="white",
                   linewidths=0.8, zorder=3, label="filled at stop")
    if trace.remasked:
        ax.scatter([p for _, p in trace.remasked], [s for s, _ in trace.remasked], s=36, marker="x", c="red",
                   linewidths=1.2, zorder=4, label="remasked")
    lead = int(trace.lead)  # a block-diffusion prompt's tail opens the first block
    for b in range(block - lead, gen, block):
        ax.axvline(b - 0.5, color="white", linestyle="--", linewidth=1.0)
    for s in np.nonzero(np.diff(trace.block))[0]:
        ax.axhline(s + 0.5, color="white", linestyle=":", linewidth=0.8)
    labels = _labels(tokenizer, trace.final_tokens)
    ax.set_xticks(range(gen))
    ax.set_xticklabels([lbl if len(lbl) <= 14 else lbl[:13] + "…" for lbl in labels], rotation=90, fontsize=8)
    ax.set_yticks(range(0, steps, max(1, steps // 25)))
    ax.set_xlabel("generation position (final token)")
    ax.set_ylabel("step (model call)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="top-1 confidence")
    if cells or trace.remasked or filled:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _hex_colours(values: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    rgba = colormaps[CMAP](np.clip(np.nan_to_num(values, nan=0.0), 0, 1))
    rgb = (rgba[..., :3] * 255).round().astype(int)
    return np.vectorize(lambda r, g, b: f"#{r:02x}{g:02x}{b:02x}")(rgb[..., 0], rgb[..., 1], rgb[..., 2])


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 6px} .meta{font-size:13px;color:#444;margin-bottom:8px}
.answer{font-family:ui-monospace,Menlo,monospace;background:#f4f4f4;padding:6px 8px;border-radius:4px;white-space:pre-wrap}
.wrap{overflow:auto;max-height:85vh;border:1px solid #ddd;margin-top:10px}
table.trace{border-collapse:collapse;font-size:10px}
table.trace td{width:16px;min-width:16px;height:14px;padding:0;text-align:center;color:#000;border:1px solid #fff0}
table.trace td.done{opacity:.3} table.trace .bb{border-left:2px dashed #444}
table.trace tr.nb td{border-top:2px dotted #444}
table.trace th{font-weight:normal;font-family:ui-monospace,Menlo,monospace;padding:2px}
table.trace thead th{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;height:auto;text-align:left}
table.trace th.step{text-align:right;color:#666;padding-right:4px}
span.commit{color:#fff;text-shadow:0 0 2px #000;font-size:11px;line-height:1}
span.filled{color:#fff;font-size:10px;line-height:1}
span.remask{color:#e00;font-weight:bold;font-size:11px;line-height:1}
td:hover{outline:2px solid #f00}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;margin-top:6px}
.bar{width:200px;height:12px;border:1px solid #999}
"""


def _html(trace: Trace, tokenizer, path: Path, title: str, block: int, meta: dict[str, Any]) -> Path:
    steps, gen = trace.confidence.shape
    colours = _hex_colours(trace.confidence.astype(float))
    top1 = _labels(tokenizer, trace.top1)
    final = _labels(tokenizer, trace.final_tokens)
    commit = {p: s for s, p in committed_cells(trace)}
    remask = set(map(tuple, trace.remasked))
    lead = int(trace.lead)  # a block-diffusion prompt's tail opens the first block
    masked = trace.masked_before.astype(bool)
    conf = trace.confidence
    esc = html.escape

    head = ['<tr><th class="step">step</th>']
    for p, lbl in enumerate(final):
        cls = ' class="bb"' if p and (p + lead) % block == 0 else ""
        head.append(f'<th{cls} title="position {p}: {esc(lbl, quote=True)}">{esc(lbl)}</th>')
    head.append("</tr>")
    rows = []
    for s in range(steps):
        new_block = s > 0 and trace.block[s] != trace.block[s - 1]
        cells = [f'<tr{" class=nb" if new_block else ""}><th class="step">{s}</th>']
        for p in range(gen):
            i = s * gen + p
            c = conf[s, p]
            value = "n/a" if np.isnan(c) else f"{float(c):.3f}"
            tip = f"step {s} · position {p} · top-1 {top1[i]!r} · confidence {value}"
            classes = []
            if not masked[s, p]:
                classes.append("done")
            if p and (p + lead) % block == 0:
                classes.append("bb")
            mark = ""
            if commit.get(p) == s:
                mark, tip = '<span class="commit">●</span>', tip + " · committed here"
            if s == steps - 1 and p not in commit:
                mark, tip = '<span class="filled">□</span>', tip + " · filled at stop"
            if (s, p) in remask:
                mark, tip = mark + '<span class="remask">✕</span>', tip + " · remasked here"
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{cls} style="background:{colours[s, p]}" title="{esc(tip, quote=True)}">{mark}</td>')
        cells.append("</tr>")
        rows.append("".join(cells))
    gradient = ",".join(_hex_colours(np.linspace(0, 1, 11)).tolist())
    info = " · ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in meta.items() if k not in ("text", "prompt"))
    prompt = meta.get("prompt")
    text = meta.get("text")
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title or 'unmask decode')}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(title or 'unmask decode')}</h1>",
        f'<div class="meta">{info}</div>' if info else "",
        f'<div class="meta">prompt:</div><div class="answer">{esc(str(prompt))}</div>' if prompt is not None else "",
        f'<div class="meta">answer:</div><div class="answer">{esc(str(text))}</div>' if text is not None else "",
        '<div class="legend">top-1 confidence 0 '
        f'<div class="bar" style="background:linear-gradient(to right,{gradient})"></div> 1'
        " · ● committed · □ filled at stop · <b style=\"color:#e00\">✕</b> remasked · faded: already committed"
        " · dashed: block boundary</div>",
        '<div class="wrap"><table class="trace"><thead>',
        "".join(head),
        "</thead><tbody>",
        "\n".join(rows),
        "</tbody></table></div></body></html>",
    ]
    path.write_text("\n".join(b for b in body if b), encoding="utf-8")
    return path


def render_decode(model, prompt, strategy="low_confidence", out_dir: str | Path = "runs/viz", name: str = "decode", *,
                  gen_length: int | None = None, block_length: int | None = None, seed: int = 0, chat: bool = True,
                  cache: str = "auto") -> tuple[Path, Path]:
    """Decode `prompt` once with `strategy`, recording the trace, and draw it.

    `model`: a loaded `DiffusionLM`, or a checkpoint spec for `load_model` (None: the built-in model).
    `strategy`: a strategy string (`threshold:tau=0.8`) or a policy. Returns (png_path, html_path).
    """
    from unmask.decoding import generate
    from unmask.decoding.registry import parse_strategy

    policy = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    if model is None or isinstance(model, (str, Path)):
        from unmask.models import load_model

        model = load_model(None if model is None else str(model))
    result = generate(model, [prompt], policy, chat=chat, gen_length=gen_length, block_length=block_length,
                      seed=seed, cache=cache, record_trace=True)
    seq = result.sequences[0]
    cfg = result.config
    block = cfg.gen_length if policy.whole_generation else cfg.block_length
    meta = {
        "model": model.name, "strategy": policy.describe(), "NFE": seq.nfe, "TPF": f"{seq.tpf:.2f}",
        "useful tokens": seq.useful_tokens, "gen_length": cfg.gen_length, "block_length": block, "seed": cfg.seed,
        "prompt": prompt if isinstance(prompt, str) else repr(prompt), "text": seq.text,
    }
    title = f"{policy.name} on {model.name}: NFE {seq.nfe}, TPF {seq.tpf:.2f}"
    return render_trace(seq.trace, model.tokenizer, out_dir, name, title=title, block_length=block, meta=meta)

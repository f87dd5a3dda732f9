"""What one model call of a decode computes and what it costs, per model and cache mode.

A batched call computes the same number of query positions for every row of the batch. With the
exact cache of a block-diffusion model a call computes the current block, and on a block's first
call also the finished block before it (its keys become final there). The loop calls the rows
starting a block apart from the others (`width_groups` in `unmask.decoding.calls`); where one call
still holds rows of different widths, the narrower ones repeat their last position ("duplicate"
positions below). The bidirectional model's dual cache computes the whole
canvas at each block's start (a refresh) and the block alone in between. On a CPU the figures
say where a call's time goes: the share spent in matrix products (the torch profiler's self time
of `aten::mm`, `addmm` and `bmm`) against everything else a call does.

    python benchmarks/call_cost.py --model builtin --model builtin:block --task arith --limit 64 \\
        --batch-size 16 --out runs/call-cost

Every decode goes through the one loop (`unmask.decoding.generate`); a warm-up batch comes first.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from unmask.decoding import generate
from unmask.decoding.calls import ModelCalls
from unmask.errors import UnmaskError

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


class CallCounter:
    """Counts the positions each network call computes, and how many of them only pad the batch."""

    def __init__(self, model):
        self.model = model
        self.calls = self.positions = self.duplicates = 0

    def __enter__(self):
        network, compute = self.model.network, ModelCalls.compute
        forward = network.forward
        counter = self

        def counted_forward(input_ids, *args, **kwargs):
            counter.calls += 1
            counter.positions += input_ids.shape[0] * input_ids.shape[1]
            return forward(input_ids, *args, **kwargs)

        def counted_compute(calls, slots, first, ends, *args, **kwargs):
            canvases = first.shape[0]
            counter.duplicates += canvases * int((ends - first).max()) - int((ends - first).sum())
            return compute(calls, slots, first, ends, *args, **kwargs)

        self._restore = (forward, compute)
        network.forward = counted_forward
        ModelCalls.compute = counted_compute
        return self

    def __exit__(self, *exc):
        forward, compute = self._restore
        self.model.network.forward = forward
        ModelCalls.compute = compute
        return False


def measure(model, prompts: list, strategy: str, cache: str, batch_size: int, profile: bool = True,
            chat: bool = True, **decode) -> dict:
    """Decode `prompts` in batches of `batch_size` after one warm-up batch: the calls' positions and
    seconds, and (with `profile`, on a CPU) the share of the model's time in matrix products."""
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    generate(model, batches[0], strategy, cache=cache, chat=chat, **decode)  # warm-up: kernels, allocator
    model_s = wall = 0.0
    nfe = 0
    with CallCounter(model) as counter:
        for batch in batches:
            result = generate(model, batch, strategy, cache=cache, chat=chat, **decode)
            wall += result.wall_s
            model_s += result.extras.get("model_s", 0.0)
            nfe += sum(s.nfe for s in result.sequences)
    row = {"strategy": strategy, "cache": cache, "batch_size": batch_size, "sequences": len(prompts),
           "nfe": nfe / len(prompts), "calls": counter.calls, "positions": counter.positions,
           "positions_per_call": counter.positions / max(counter.calls, 1),
           "positions_per_sequence": counter.positions / len(prompts),
           "duplicate_frac": counter.duplicates / max(counter.positions, 1),
           "ms_per_call": 1000 * model_s / max(counter.calls, 1), "model_s": model_s, "wall_s": wall,
           "matmul_frac": None}
    if profile and model.device.type == "cpu":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for batch in batches:
                generate(model, batch, strategy, cache=cache, chat=chat, **decode)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        row["matmul_frac"] = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / max(total, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", dest="models", help="default: builtin and builtin:block")
    p.add_argument("--cache", default="auto", help="auto (default), none, prefix or dual")
    p.add_argument("--strategy", default="threshold")
    p.add_argument("--task", default="arith")
    p.add_argument("--limit", type=int, default=64, help="test problems decoded (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads on a CPU (default 2)")
    p.add_argument("--no-profile", action="store_true", help="leave out the matrix-product share")
    p.add_argument("--out", default="runs/call-cost")
    args = p.parse_args(argv)
    from unmask.models import load_model
    from unmask.tasks.registry import get_task

    if args.limit < 1 or args.batch_size < 1:
        print("error: --limit and --batch-size must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = []
    try:
        task = get_task(args.task)
        prompts = [task.messages(problem) for problem in task.problems("test", limit=args.limit, seed=0)]
        for name in args.models or ["builtin", "builtin:block"]:
            model = load_model(name)
            row = measure(model, prompts, args.strategy, args.cache, args.batch_size, profile=not args.no_profile)
            row["model"] = name
            rows.append(row)
            share = "" if row["matmul_frac"] is None else f", {100 * row['matmul_frac']:.0f}% in matrix products"
            print(f"{name} ({args.cache}): {row['calls']} calls, {row['positions_per_call']:.0f} positions per call "
                  f"({100 * row['duplicate_frac']:.1f}% duplicates), {row['ms_per_call']:.1f} ms per call{share}",
                  flush=True)
    except UnmaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = platform.processor() or platform.machine()
    header = (f"{args.task} test, first {args.limit} problems, `{args.strategy}`, cache {args.cache}, batch "
              f"{args.batch_size}, {device}, {args.threads} threads")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "call_cost.json").write_text(json.dumps({"header": header, "rows": rows,
                                                    "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    lines = [f"# {header}", "", "| model | NFE | calls | positions per sequence | positions per call | duplicates "
             "| ms per call | matrix products |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "—" if r["matmul_frac"] is None else f"{100 * r['matmul_frac']:.0f}%"
        lines.append(f"| `{r['model']}` | {r['nfe']:.2f} | {r['calls']} | {r['positions_per_sequence']:.1f} | "
                     f"{r['positions_per_call']:.1f} | {100 * r['duplicate_frac']:.1f}% | {r['ms_per_call']:.1f} | {share} |")
    (out / "call_cost.md").write_text("\n".join(lines) + "\n")
    print(f"table: {out / 'call_cost.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

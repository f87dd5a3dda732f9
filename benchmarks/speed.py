"""Seconds, not only model calls: tokens/s and latency by strategy, cache mode and batch size.

Runs `unmask bench` once per (cache, batch size) on the same problems and writes one table
(`OUT/speed.md`, `OUT/speed.json`) with each strategy's accuracy, NFE, tokens/s and latency, and
its speed-up over the uncached loop at the same batch size. Every figure comes from runs in this
one process on this one machine.

    python benchmarks/speed.py --limit 64 --gen-length 256 --block-length 32 --out runs/speed
    python benchmarks/speed.py --model /path/to/llada --device cuda --dtype bf16 ...   # on a GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unmask.bench import BenchConfig, run_bench

DEFAULT_STRATEGIES = ["low_confidence", "threshold", "r2", "psd"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--task", default="arith")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--strategy", action="append", dest="strategies")
    p.add_argument("--cache", action="append", dest="caches", help="none, prefix, dual (default: all three)")
    p.add_argument("--batch-size", action="append", type=int, dest="batch_sizes", help="default: 1 and 16")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default="runs/speed")
    args = p.parse_args(argv)
    strategies = args.strategies or DEFAULT_STRATEGIES
    caches = args.caches or ["none", "prefix", "dual"]
    batch_sizes = args.batch_sizes or [1, 16]
    out = Path(args.out)
    table = []
    device = None
    for batch_size in batch_sizes:
        for cache in caches:
            cfg = BenchConfig(model=args.model, task=args.task, strategies=strategies, limit=args.limit,
                              gen_length=args.gen_length, block_length=args.block_length, batch_size=batch_size,
                              cache=cache, device=args.device, dtype=args.dtype, out=str(out / f"b{batch_size}-{cache}"))
            results = run_bench(cfg, progress=True)
            device = results["device"]
            for row in results["rows"]:
                table.append({"strategy": row["strategy"], "cache": cache, "batch_size": batch_size,
                              "accuracy": row["accuracy"], "nfe": row["nfe"], "tokens_per_s": row["tokens_per_s"],
                              "latency_s": row["latency_s"]})
    base = {(r["strategy"], r["batch_size"]): r["tokens_per_s"] for r in table if r["cache"] == "none"}
    one = {(r["strategy"], r["cache"]): r["tokens_per_s"] for r in table if r["batch_size"] == 1}
    for r in table:
        r["speedup_vs_uncached"] = r["tokens_per_s"] / base[(r["strategy"], r["batch_size"])] if (r["strategy"], r["batch_size"]) in base else None
        r["speedup_vs_batch1"] = r["tokens_per_s"] / one[(r["strategy"], r["cache"])] if (r["strategy"], r["cache"]) in one else None
    lines = [f"# Speed: {args.task}, gen {args.gen_length}, block {args.block_length}, {args.limit} problems, {device}", "",
             "| strategy | cache | batch | accuracy | NFE | tokens/s | latency s | × uncached | × batch 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else "–"
    for r in table:
        lines.append(f"| {r['strategy']} | {r['cache']} | {r['batch_size']} | {r['accuracy']:.3f} | {r['nfe']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['latency_s']:.3f} | {fmt(r['speedup_vs_uncached'])} | {fmt(r['speedup_vs_batch1'])} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    (out / "speed.json").write_text(json.dumps({"device": device, "rows": table}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    import sys

    from unmask.errors import UnmaskError

    try:
        raise SystemExit(main())
    except UnmaskError as exc:
        sys.stderr.write(f"speed: error: {exc}\n")
        raise SystemExit(2)

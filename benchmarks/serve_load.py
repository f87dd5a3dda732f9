"""Load on `unmask serve`: N concurrent clients, every answer checked, latency percentiles.

Starts the server on 127.0.0.1 (a free port, in this process), decodes every request once directly
with `generate` to know the right answers, then runs the clients and reports requests, errors,
mismatches, p50/p95/max latency, requests/s and the engine's batching (mean and largest batch).
Writes `OUT/serve_load.json`. Every figure comes from this one run on this one machine.

    python benchmarks/serve_load.py --tiny                       # the figures of the test suite's load test
    python benchmarks/serve_load.py --clients 64 --duration 30   # the built-in model, 30 s of load
    python benchmarks/serve_load.py --model /path/to/llada --device cuda --dtype bf16 --gen-length 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = ["tom has 5 apples", "hello world", "what is 3 plus 4", "sam buys 2 pens and ann buys 6 pens",
           "print x", "how many cats", "the dogs gave the books to ann", "def f ( x ) : return x * 2"]


def cases(strategies: list[str], gen_length: int | None):
    """Per prompt: a plain completion, a truncated one with another seed, a chat with a stop string."""
    from unmask.serve.load import LoadCase

    out = []
    for i, prompt in enumerate(PROMPTS):
        for j, strategy in enumerate(strategies):
            base = {"strategy": strategy, **({"gen_length": gen_length} if gen_length else {})}
            out.append(LoadCase("/v1/completions", {"prompt": prompt, **base}))
            out.append(LoadCase("/v1/completions", {"prompt": prompt, **base, "seed": 1, "max_tokens": 3 + (i + j) % 5}))
            out.append(LoadCase("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **base,
                                                         "stop": "apples"}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (gen 16, block 8), as in the tests")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--strategy", action="append", dest="strategies",
                   help="repeat; default: low_confidence and threshold:tau=0.5")
    p.add_argument("--gen-length", type=int, default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2, help="0: no count limit (use --duration)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default: until the count is sent)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default="runs/serve_load")
    args = p.parse_args(argv)
    if not args.requests_per_client and args.duration is None:
        p.error("give --requests-per-client or --duration so the run ends")

    import torch

    from unmask.serve import build_engine, serve_in_thread
    from unmask.serve.load import expected_texts, run_load

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.tiny:
        from unmask.testing import tiny_llada

        model = tiny_llada(gen_length=16, block_length=8)
    else:
        from unmask.models import load_model

        model = load_model(args.model, device=args.device, dtype=args.dtype)
    strategies = args.strategies or ["low_confidence", "threshold:tau=0.5"]
    load = cases(strategies, args.gen_length)
    print(f"decoding {len(load)} distinct requests directly for the expected answers...", file=sys.stderr)
    expected_texts(model, load)
    engine = build_engine(model, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    with serve_in_thread(engine, host="127.0.0.1") as url:
        report = run_load(url, load, clients=args.clients, requests_per_client=args.requests_per_client or None,
                          duration_s=args.duration)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": model.name, "device": str(model.device), "strategies": strategies,
              "torch_threads": torch.get_num_threads(), "max_batch_size": args.max_batch_size,
              "distinct_requests": len(load), **report.to_dict()}
    (out / "serve_load.json").write_text(json.dumps(result, indent=2))
    print(report.summary())
    for example in report.examples:
        print("  " + example)
    print(f"figures: {out / 'serve_load.json'}")
    return 0 if report.errors == 0 and report.mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load on real `unmask serve` processes: static vs continuous batching vs replicas, every answer checked.

For each server configuration (`--configs`, default static,continuous,replicas2) the script starts
`unmask serve` as a subprocess on a free port (static: `--batching static`, or no option on an
unmask without it, the engine that runs a batch of requests agreeing on strategy/params/lengths/seed
to completion; continuous:
`--batching continuous`; replicasN: `--batching continuous --replicas N`), warms it up, then for
each client count (`--clients`, default 1,8,32,128) runs that many concurrent clients, each sending
its requests back to back, and stops the server. Every request streams (`stream: true`): latency is
the time to `data: [DONE]`, TTFB the time to the first chunk with text (the first committed block;
for an empty answer, its final chunk). Requests mix seeds (distinct for every request), gen_length
(`--gen-lengths`, default: the model's default and one block less) and max_tokens; the strategy is
one per run (default: the server's default). `--cache` runs every server with that KV cache (default auto: the exact cache of a block-diffusion
model, none for a bidirectional one).
Every answer is compared with a direct `unmask.decoding.generate` of the same request, with the
same cache, decoded once per distinct request before any server starts answering (not timed).

Reports per configuration and client count: requests/s, completion tokens/s, p50/p95/p99 latency,
TTFB p50/p95, errors, mismatches and the engine's jobs per decode (from /health's counters: the
mean batch for static, jobs one running decode served for continuous; not for replicas), then the
continuous/static ratios at 32 clients against the targets (p95 latency <= 0.5x, completion
tokens/s >= 1.5x), PASS or MISS. `--overload` instead sends `--overload-clients` (128) requests at
once to each configuration started with `--max-queue 64 --max-batch-size 8` and reports how many
were answered, how many got 429 with Retry-After, that none hung (all answered within `--timeout`)
and none was answered twice. Prints markdown and writes OUT/serve_load.{json,md} (serve_overload.*
with --overload) and each server's log. A configuration the installed `unmask serve` cannot start
(an option it does not have yet) is reported with the server's own error, and the exit status is 1;
it is 1 too if any answer was wrong or any request failed.

    python benchmarks/serve_load.py --tiny --configs static --clients 1,8     # smoke test, 15-20 s on 2 cores
    python benchmarks/serve_load.py                                          # built-in model, full run
    python benchmarks/serve_load.py --cache dual                             # the same, servers with the dual KV cache
    python benchmarks/serve_load.py --overload                               # the queue test
    python benchmarks/serve_load.py --model /path/to/llada --device cuda --dtype bf16 --gen-lengths 128,256 \\
        --block-length 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _limits(text: str) -> list[int | None]:
    out: list[int | None] = []
    for v in text.split(","):
        v = v.strip().lower()
        if v in ("none", "0", ""):
            out.append(None)
        elif v.isdigit():
            out.append(int(v))
        else:
            raise argparse.ArgumentTypeError(f"max_tokens values are integers or 'none', got {v!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    from unmask.decoding.config import CACHE_CHOICES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the built-in model)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random checkpoint (gen 16, block 8) written to a temporary folder, few requests")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--strategy", default=None, help="one strategy for every request (default: the server's default)")
    p.add_argument("--configs", default="static,continuous,replicas2",
                   help="server configurations: static, continuous, replicasN (default %(default)s)")
    p.add_argument("--clients", type=_ints, default=[1, 8, 32, 128], help="client counts (default 1,8,32,128)")
    p.add_argument("--requests-per-client", type=int, default=None, help="requests each client sends (default 2; tiny 1)")
    p.add_argument("--min-requests", type=int, default=None,
                   help="at least this many requests per client count, by more per client (default 16; tiny 4)")
    p.add_argument("--gen-lengths", type=_ints, default=None,
                   help="gen_length values the requests cycle through (default: the model's default and one block less)")
    p.add_argument("--block-length", type=int, default=None, help="block_length of every request (default: the model's)")
    p.add_argument("--max-tokens", type=_limits, default=None,
                   help="max_tokens values the requests cycle through, 'none' for no limit (default none,G/2 "
                        "with G the smallest gen_length)")
    p.add_argument("--seed-pool", type=int, default=0,
                   help="0 (default): every request its own seed; N: seeds from N values (requests can share a batch "
                        "in the static engine)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests, sent at once (default 8; tiny 2)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="server --max-batch-size (default: the server's default; --overload 8)")
    p.add_argument("--cache", choices=CACHE_CHOICES, default="auto",
                   help="server --cache, and the cache of the direct decodes the answers are checked against "
                        "(default %(default)s)")
    p.add_argument("--max-queue", type=int, default=None, help="server --max-queue (default 256; --overload 64)")
    p.add_argument("--overload", action="store_true",
                   help="the queue test: --overload-clients requests at once against --max-queue 64 --max-batch-size 8")
    p.add_argument("--overload-clients", type=int, default=128)
    p.add_argument("--compare-at", type=int, default=32, help="client count of the continuous/static targets")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a request may take before it counts as hung (default 300; --overload 120)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to answer /health")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `unmask serve` argument, repeat (e.g. --serve-arg=--max-body-bytes --serve-arg=2097152)")
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the server processes (default: torch's choice)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads of this process (expected answers)")
    p.add_argument("--out", default="runs/serve_load", help="folder for the json, the markdown and server logs")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs or len(set(args.configs)) != len(args.configs):
        p.error("--configs names each configuration once")
    for name in ("requests_per_client", "min_requests", "warmup", "max_batch_size", "max_queue"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name != "max_queue" else 0):
            p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.overload_clients < 1:
        p.error("--overload-clients must be at least 1")
    if args.tiny and args.model:
        p.error("--tiny and --model exclude each other")
    defaults = {"requests_per_client": (1, 2), "min_requests": (4, 16), "warmup": (2, 8)}
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.max_queue = args.max_queue if args.max_queue is not None else (64 if args.overload else 256)
    args.timeout = args.timeout or (120.0 if args.overload else 300.0)
    from unmask.serve.load import config_args

    for name in args.configs:
        try:
            config_args(name, True)
        except ValueError as exc:
            p.error(str(exc))
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    from unmask.decoding.config import resolve_cache
    from unmask.models import load_model
    from unmask.serve.load import (ServerProcess, ServerStartError, compare, config_args, expected_texts, markdown,
                                   run_overload, run_stream_load, serve_options, workload, workload_case)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = None
    servers: dict = {}
    model_spec = args.model
    if args.tiny:
        from unmask.testing import write_tiny_llada

        scratch = tempfile.mkdtemp(prefix="unmask-serve-load-")
        model_spec = str(write_tiny_llada(Path(scratch) / "tiny", gen_length=16, block_length=8))
    try:
        options, serve_defaults = serve_options()
        has_batching = "--batching" in options
        server_default = serve_defaults.get("strategy") or "low_confidence"
        if args.max_batch_size is None:  # the queue test's 8, else the installed server's own default
            args.max_batch_size = 8 if args.overload else serve_defaults["max_batch_size"]

        # the servers' common arguments, then one per configuration
        common = [*(["--model", model_spec] if model_spec else []), *(["--device", args.device] if args.device else []),
                  *(["--dtype", args.dtype] if args.dtype else []), *(["--strategy", args.strategy] if args.strategy else []),
                  "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
                  *(["--cache", args.cache] if args.cache != "auto" else []), "--log-level", "warning"]
        env = {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None
        mode = "serve_overload" if args.overload else "serve_load"
        servers = {name: ServerProcess([*common, *config_args(name, has_batching), *args.serve_arg],
                                       log_path=out / f"{mode}-{name}.log", env=env)
                   for name in args.configs}
        for name in servers:
            (out / f"{mode}-{name}.log").unlink(missing_ok=True)
        first = args.configs[0]
        log(f"starting {first}: {' '.join(servers[first].args)}")
        servers[first].launch()  # it boots while the expected answers are decoded

        # the workload, and its expected answers (once per distinct request, before any timing)
        model = load_model(model_spec, device=args.device, dtype=args.dtype)
        # the strategy every request gets: --strategy, else what the server's default stands for on this
        # model (checked against each server's /v1/models once it is up)
        strategy = args.strategy or resolve_default(server_default, model)
        block = args.block_length or model.defaults.block_length
        gen = model.defaults.gen_length
        gen_lengths = args.gen_lengths or ([gen - block, gen] if gen > block else [gen])
        bad = [g for g in gen_lengths if g % block]
        if bad:
            raise SystemExit(f"gen_length {bad[0]} is not a multiple of the block length {block}")
        max_tokens = args.max_tokens or [None, max(1, min(gen_lengths) // 2)]
        shape = {"gen_lengths": gen_lengths, "block_length": block, "max_tokens": max_tokens,
                 "strategy": args.strategy, "seed_pool": args.seed_pool}
        plan = {}
        if args.overload:
            plan["overload"] = [workload_case(c, 0, **shape) for c in range(args.overload_clients)]
        else:
            for clients in args.clients:
                per_client = max(args.requests_per_client, math.ceil(args.min_requests / clients))
                plan[clients] = workload(clients, per_client, **shape)
        warmup = workload(args.warmup, 1, **shape)
        everything = [case for cases in plan.values() for case in
                      (cases if args.overload else [c for client in cases for c in client])]
        everything += [client[0] for client in warmup]

        def decode_expected(strategy: str) -> tuple[int, float]:
            started = time.perf_counter()
            count = expected_texts(model, everything, default_strategy=strategy, cache=args.cache,
                                   progress=lambda d, t: log(f"expected answers ({strategy}): {d}/{t}")
                                   if d % 50 == 0 or d == t else None)
            return count, time.perf_counter() - started

        decodes, expected_s = decode_expected(strategy)

        settings = {
            "model": args.model or ("tiny random LLaDA (gen 16, block 8)" if args.tiny else "builtin"),
            "device": args.device or "default", "dtype": args.dtype or "default", "strategy": strategy,
            "gen_lengths": gen_lengths, "block_length": block, "max_tokens": max_tokens,
            "seeds": "distinct per request" if args.seed_pool <= 0 else f"a pool of {args.seed_pool}",
            "clients": args.clients, "requests_per_client": args.requests_per_client,
            "min_requests": args.min_requests, "warmup": args.warmup, "max_batch_size": args.max_batch_size,
            "cache": resolve_cache(args.cache, model),  # `auto` as the servers resolve it for this model
            "max_queue": args.max_queue, "timeout_s": args.timeout, "serve_has_batching_option": has_batching,
            "serve_args": args.serve_arg, "server_threads": args.server_threads,
            "machine": f"{platform.machine()} with {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                       f"torch {torch.__version__}",
            "expected_decodes": decodes, "expected_s": round(expected_s, 2),
        }
        results = []
        for name in args.configs:
            server = servers[name]
            entry = {"name": name, "server_args": server.args, "log": str(server.log_path), "error": None}
            results.append(entry)
            replicated = "--replicas" in server.args
            try:
                if server.process is None:
                    log(f"starting {name}: {' '.join(server.args)}")
                    server.start(args.start_timeout)
                else:
                    server.wait_ready(args.start_timeout)
            except ServerStartError as exc:
                entry["error"] = str(exc)
                log(f"{name}: did not start: {exc}")
                continue
            try:
                entry["startup_s"] = round(server.startup_s, 2)
                entry["server_strategy"] = _server_strategy(server.url)
                if entry["server_strategy"] not in (None, strategy) and not args.strategy:
                    log(f"{name}: the server's default strategy is {entry['server_strategy']}, not {strategy}; "
                        "decoding the expected answers again")
                    strategy = settings["strategy"] = entry["server_strategy"]
                    decodes, expected_s = decode_expected(strategy)
                    settings["expected_decodes"] += decodes
                    settings["expected_s"] = round(settings["expected_s"] + expected_s, 2)
                w = run_stream_load(server.url, warmup, args.timeout, tag=f"{name}-warmup",
                                    server_counters=not replicated)
                entry["warmup"] = {"requests": w.requests, "errors": w.errors, "mismatches": w.mismatches,
                                   "wall_s": round(w.wall_s, 3), "examples": w.examples}
                log(f"{name}: up in {server.startup_s:.1f} s; warm-up {w.requests} requests, {w.errors} errors, "
                    f"{w.mismatches} mismatches")
                if args.overload:
                    cases = plan["overload"]
                    report = run_overload(server.url, cases, args.timeout, tag=f"{name}-overload",
                                          recovery_case=warmup[0][0], server_counters=not replicated)
                    entry["overload"] = report.to_dict()
                    log(f"{name}: {report.summary()}")
                else:
                    entry["levels"] = []
                    for clients in args.clients:
                        level = run_stream_load(server.url, plan[clients], args.timeout, tag=f"{name}-{clients}",
                                                server_counters=not replicated)
                        entry["levels"].append(level.to_dict())
                        log(f"{name}: {level.summary()}")
                        for example in level.examples:
                            log("    " + example)
            except Exception as exc:  # report it and go on with the next configuration
                entry["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{name}: failed: {entry['error']}")
            finally:
                code = server.stop()
                entry["exit_code"] = code
    finally:
        for server in servers.values():
            server.stop()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    result = {"settings": settings, "overload_mode": args.overload, "configs": results}
    if not args.overload:
        result["comparison"] = compare(results, clients=args.compare_at)
    text = markdown(result)
    (out / f"{mode}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{mode}.md").write_text(text)
    print(text)
    print(f"figures: {out / (mode + '.json')} and {out / (mode + '.md')}")
    return 0 if _all_good(result) else 1


def resolve_default(spec: str, model) -> str:
    """The strategy a server default (`unmask serve --strategy`'s default) stands for on `model`."""
    if spec != "auto":
        return spec
    try:
        from unmask.serve.engine import serving_default
    except ImportError:  # an unmask without "auto": the server reports its strategy once it is up
        return spec
    return serving_default(model)


def _server_strategy(url: str) -> str | None:
    import httpx

    try:
        card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        return card.get("unmask", {}).get("strategy")
    except Exception:
        return None


def _all_good(result: dict) -> bool:
    """Every configuration ran and every request of it was answered right (overload: PASS)."""
    for entry in result["configs"]:
        if entry.get("error"):
            return False
        if entry.get("warmup", {}).get("errors") or entry.get("warmup", {}).get("mismatches"):
            return False
        if result["overload_mode"]:
            o = entry["overload"]
            if not (o["answered_once"] and o["recovered"] is not False and not o["errors"] and not o["mismatches"]):
                return False
        elif any(lv["errors"] or lv["mismatches"] or lv["duplicates"] or lv["hung"] for lv in entry["levels"]):
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())

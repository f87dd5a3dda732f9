"""`unmask serve`: an OpenAI-compatible HTTP server over one model."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from unmask.decoding.config import CACHE_CHOICES, CACHE_HELP
from unmask.serve.engine import DEFAULT_MAX_BATCH_SIZE


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the built-in model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code to run")
    p.add_argument("--strategy", default="auto",
                   help="default strategy, NAME or NAME:key=value,...; a request may choose another (default auto: "
                        "tspd:ce=true,stability=true where the model has that TSPD controller, else threshold)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the model's name)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="sequences decoding at once (default %(default)s); lower it if the device runs out of memory")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before the server answers 429")
    p.add_argument("--max-body-bytes", type=int, default=2**20,
                   help="largest request body accepted, in bytes; larger ones get HTTP 413 (default 1 MiB)")
    p.add_argument("--cache", default="auto", choices=CACHE_CHOICES, help=CACHE_HELP)
    p.add_argument("--batching", default="continuous", choices=("continuous", "static"),
                   help="continuous (default): requests join a running decode before any model call; "
                        "static: each batch runs to completion while new requests wait")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--replicas", type=int, default=None,
                   help="N >= 2: serve on N Ray Serve replicas (one per GPU, else one per CPU), each with its own "
                        "engine and model, behind one router on the same host and port (needs unmask[ray]); "
                        "default: one process")
    return p


def run_serve(args) -> int:
    from unmask.decoding import parse_strategy
    from unmask.errors import UnmaskError
    from unmask.models import load_model
    from unmask.serve.runner import build_engine, run_server

    if not 0 <= args.port <= 65535:
        raise UnmaskError(f"--port must be between 0 and 65535, got {args.port}", field="port")
    if args.max_batch_size < 1 or args.max_queue < 0:
        raise UnmaskError("--max-batch-size must be at least 1 and --max-queue at least 0", field="max_batch_size")
    if args.max_body_bytes < 1:
        raise UnmaskError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}", field="max_body_bytes")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UnmaskError("unmask serve needs fastapi and uvicorn; install them with `pip install unmask[serve]`") from None
    if args.replicas is not None and args.replicas < 1:
        raise UnmaskError(f"--replicas must be at least 1, got {args.replicas}", field="replicas")
    if args.strategy != "auto":
        parse_strategy(args.strategy)  # a bad strategy fails before the model loads
    if args.replicas is not None and args.replicas >= 2:
        return _run_replicated(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    engine = build_engine(model, strategy=args.strategy, max_batch_size=args.max_batch_size,
                          max_queue=args.max_queue, cache=args.cache, batching=args.batching)
    name = args.served_model_name or model.name
    _warn_if_exposed(args.host)
    print(f"unmask serve: {name} on http://{args.host}:{args.port}/v1 (default strategy {engine.config.strategy}, "
          f"{engine.config.batching} batching)", flush=True)
    run_server(engine, args.host, args.port, model_name=name, log_level=args.log_level,
               max_body_bytes=args.max_body_bytes)
    return 0


def _run_replicated(args) -> int:
    """--replicas N: the model loads in each replica, not here."""
    from unmask.serve.ray_serve import ReplicaSettings, run_replicated

    settings = ReplicaSettings(model=args.model, device=args.device, dtype=args.dtype,
                               trust_remote_code=args.trust_remote_code, strategy=args.strategy,
                               max_batch_size=args.max_batch_size, max_queue=args.max_queue, cache=args.cache,
                               served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                               engine_options=_engine_options(args))
    _warn_if_exposed(args.host)
    run_replicated(settings, args.replicas, args.host, args.port, log_level=args.log_level)
    return 0


def _engine_options(args) -> dict:
    """Engine settings beyond ReplicaSettings' own fields, passed on to each replica's build_engine."""
    return {name: getattr(args, name) for name in ("batching",) if getattr(args, name, None) is not None}


def _warn_if_exposed(host: str) -> None:
    if not _loopback(host):
        sys.stderr.write(f"unmask serve: warning: binding {host} exposes the server, which has no "
                         "authentication, beyond this machine\n")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

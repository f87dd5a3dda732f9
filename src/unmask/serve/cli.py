"""`unmask serve`: an OpenAI-compatible HTTP server over one model."""

from __future__ import annotations

import argparse
import ipaddress
import sys


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the built-in model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code to run")
    p.add_argument("--strategy", default="low_confidence",
                   help="default strategy, NAME or NAME:key=value,...; a request may choose another")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the model's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together in one batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before the server answers 429")
    p.add_argument("--max-body-bytes", type=int, default=2**20,
                   help="largest request body accepted, in bytes; larger ones get HTTP 413 (default 1 MiB)")
    p.add_argument("--cache", default="none", choices=("none", "prefix", "dual"), help="KV cache mode")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
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
    parse_strategy(args.strategy)  # a bad strategy fails before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    engine = build_engine(model, strategy=args.strategy, max_batch_size=args.max_batch_size,
                          max_queue=args.max_queue, cache=args.cache)
    name = args.served_model_name or model.name
    if not _loopback(args.host):
        sys.stderr.write(f"unmask serve: warning: binding {args.host} exposes the server, which has no "
                         "authentication, beyond this machine\n")
    print(f"unmask serve: {name} on http://{args.host}:{args.port}/v1 (default strategy {args.strategy})", flush=True)
    run_server(engine, args.host, args.port, model_name=name, log_level=args.log_level,
               max_body_bytes=args.max_body_bytes)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

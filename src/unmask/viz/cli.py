"""`unmask viz PROMPT --strategy S`: decode one prompt and draw it (PNG and self-contained HTML)."""

from __future__ import annotations

import argparse


def add_viz_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("viz", help="draw one decode: confidence by position and step, commits, blocks")
    p.add_argument("prompt", help="the prompt (the chat template is applied when the model has one)")
    p.add_argument("--strategy", default="low_confidence", help="NAME or NAME:key=value,... (see `unmask strategies`)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the built-in model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code to run")
    p.add_argument("--gen-length", type=int, default=None, help="generation length (default: the model's)")
    p.add_argument("--block-length", type=int, default=None, help="block length (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    from unmask.decoding.config import CACHE_CHOICES, CACHE_HELP  # here: building the parser imports no torch

    p.add_argument("--cache", default="auto", choices=CACHE_CHOICES, help=CACHE_HELP)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    p.add_argument("--out", default="runs/viz", help="output folder (default runs/viz)")
    p.add_argument("--name", default=None, help="file name stem (default: the strategy name)")
    return p


def run_viz(args) -> int:
    from unmask.decoding import parse_strategy
    from unmask.models import load_model
    from unmask.viz.decode import render_decode

    policy = parse_strategy(args.strategy)  # a bad strategy fails before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    png, page = render_decode(model, args.prompt, policy, args.out, args.name or policy.name,
                              gen_length=args.gen_length, block_length=args.block_length, seed=args.seed,
                              chat=not args.no_chat, cache=args.cache)
    print(f"png: {png}\nhtml: {page}")
    return 0

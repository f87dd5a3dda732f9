"""The `unmask` command line: strategies, generate, bench, train.

Every user error ends in one line on stderr and exit code 2 (docs/concepts.md, "Bad input"), never a
traceback.
"""

from __future__ import annotations

import argparse
import sys

from unmask.errors import UnmaskError


class _Parser(argparse.ArgumentParser):
    """argparse with the error contract of docs/concepts.md ("Bad input"): one line on stderr, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        p.add_argument("--model", action="append", dest="models", default=None,
                       help="checkpoint folder, hub id or builtin[:NAME]; repeat to compare models in one run "
                            "(default: the built-in models)")
    else:
        p.add_argument("--model", default=None, help="checkpoint folder, hub id or builtin[:NAME] (default: the built-in model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code to run")


def _decode_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    from unmask.decoding.config import CACHE_CHOICES, CACHE_HELP  # here: `unmask --help` imports no torch

    p.add_argument("--gen-length", type=int, default=None, help="generation length (default: the model's)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    if several:
        p.add_argument("--cache", action="append", dest="caches", default=None, choices=CACHE_CHOICES,
                       help=CACHE_HELP + "; repeat to compare modes in one run")
    else:
        p.add_argument("--cache", default="auto", choices=CACHE_CHOICES, help=CACHE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unmask", description="Fast decoding for masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("strategies", help="list every decoding strategy with its parameters and defaults")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("generate", help="decode one prompt and print the text and its cost")
    p.add_argument("prompt", help="the prompt (the chat template is applied when the model has one)")
    _model_args(p)
    p.add_argument("--strategy", default="auto",
                   help="NAME or NAME:key=value,... (see `unmask strategies`); auto: the model family's own decoder "
                        "(low_confidence for LLaDA, Dream and LLaDA-MoE; docs/checkpoints.md)")
    _decode_args(p)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")

    p = sub.add_parser("bench", help="run strategies on the same problems: accuracy, NFE, TPF, seconds")
    _model_args(p, several=True)
    p.add_argument("--task", default="arith", help="arith, trace, gsm8k or humaneval (options as task:key=value)")
    p.add_argument("--split", default="test")
    p.add_argument("--strategy", action="append", dest="strategies", default=None,
                   help="repeat for each strategy (default: the baselines, each seed method, one_shot and the oracle)")
    p.add_argument("--all", action="store_true", dest="all_strategies",
                   help="every registered policy at its defaults (instead of the default comparison)")
    p.add_argument("--limit", type=int, default=None, help="number of problems (default 80, about ±8 points; 500 for about ±3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/bench", help="output folder for results.json, results.md, pareto.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="local: decode in this process; ray: one actor per GPU (or CPU slot) of a Ray cluster")
    p.add_argument("--address", default=None,
                   help="with --backend ray: the cluster to join (auto, ray://host:10001); default: start Ray here")
    _decode_args(p, several=True)

    from unmask.training.cli import add_train_parser

    add_train_parser(sub)

    from unmask.evaluation.cli import add_lm_eval_parser

    add_lm_eval_parser(sub)

    from unmask.serve.cli import add_serve_parser
    from unmask.viz.cli import add_viz_parser

    add_serve_parser(sub)
    add_viz_parser(sub)
    return parser


def cmd_strategies(args) -> int:
    import json

    from unmask.decoding import describe_policies

    policies = describe_policies()
    if args.json:
        print(json.dumps(policies, indent=2, default=str))
        return 0
    for pol in policies:
        params = ", ".join(f"{p['name']}={p['default']}" for p in pol["params"] if not p["departure"])
        departures = ", ".join(f"{p['name']}={p['default']}" for p in pol["params"] if p["departure"])
        print(f"{pol['name']:<16} {pol['summary']}")
        print(f"{'':<16} parameters: {params}")
        if departures:
            print(f"{'':<16} departures from the paper (options, off by default): {departures}")
    print("\nDefaults are each method's paper setting (its public code's where the paper is silent); "
          "learned_drafts is unmask's own, its defaults chosen on the dev split (docs/methods.md).")
    return 0


def cmd_generate(args) -> int:
    from unmask.decoding import generate, parse_strategy
    from unmask.models import load_model

    if args.strategy != "auto":
        parse_strategy(args.strategy)  # a bad strategy fails before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    policy = parse_strategy(model.default_strategy if args.strategy == "auto" else args.strategy)
    result = generate(
        model, [args.prompt], policy, chat=not args.no_chat,
        gen_length=args.gen_length, block_length=args.block_length, seed=args.seed, cache=args.cache,
    )
    seq = result.sequences[0]
    print(seq.text)
    tps = seq.useful_tokens / result.wall_s if result.wall_s > 0 else 0.0
    print(
        f"[{policy.name}] NFE {seq.nfe} | TPF {seq.tpf:.2f} | {seq.useful_tokens} tokens | "
        f"{tps:.1f} tokens/s | {result.wall_s:.3f} s",
        file=sys.stdout,
    )
    return 0


def cmd_bench(args) -> int:
    import time
    from pathlib import Path

    from unmask.bench import BenchConfig
    from unmask.bench.compare import run_comparison
    from unmask.bench.report import row_line
    from unmask.bench.runner import MAIN_MODELS, all_strategies, default_strategies

    if args.strategies and args.all_strategies:
        raise UnmaskError("pass either --strategy (repeatable) or --all, not both", field="strategy")
    strategies = args.strategies or (all_strategies() if args.all_strategies else default_strategies())
    cfg = BenchConfig(
        task=args.task, split=args.split,
        strategies=strategies, seed=args.seed,
        gen_length=args.gen_length, block_length=args.block_length, batch_size=args.batch_size, out=args.out,
        device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        backend=args.backend, address=args.address, skip_unavailable=not args.strategies,
        **({} if args.limit is None else {"limit": args.limit}),  # the default lives in BenchConfig alone
    )
    start = time.perf_counter()

    def show(row: dict) -> None:  # each strategy's row as soon as it is done, above the progress bars
        from tqdm.auto import tqdm

        tqdm.write(f"{row_line(row)}   [{_elapsed(time.perf_counter() - start)} so far]")

    run_comparison(cfg, args.models or list(MAIN_MODELS), args.caches or ["auto"], progress=not args.quiet, on_row=show)
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}   table: {out / 'results.md'}   plot: {out / 'pareto.png'}")
    print(f"done in {_elapsed(time.perf_counter() - start)}")
    return 0


def _elapsed(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"


COMMANDS = {"strategies": cmd_strategies, "generate": cmd_generate, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            from unmask.serve.cli import run_serve

            return run_serve(args)
        if args.command == "viz":
            from unmask.viz.cli import run_viz

            return run_viz(args)
        if args.command == "lm-eval":
            from unmask.evaluation.cli import run_lm_eval

            return run_lm_eval(args)
        if args.command == "train":
            from unmask.training.cli import run_train

            return run_train(args)
        return COMMANDS[args.command](args)
    except UnmaskError as exc:
        sys.stderr.write(f"unmask: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("unmask: interrupted; finished work is saved where the command saves it\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

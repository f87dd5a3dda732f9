"""Argparse plumbing for `unmask train collect-traces` and `unmask train controller` (TSPD).

    unmask train collect-traces --out traces.npz [--model M] [--task arith,trace] [--split train]
                                [--n 256] [--trajectory egp|low_confidence] [--gen-length L]
                                [--block-length B] [--batch-size 16] [--seed 0] [--no-early-stop]
                                [--device D] [--threads N]
    unmask train controller --traces traces.npz [--traces more.npz] [--out DIR] [--stability] [--drop GROUP]
                            [--arch mlp|lstm] [--window 3] [--hidden H] [--epochs 200] [--patience 10]
                            [--batch-size 512] [--lr 1e-3] [--weight-decay 1e-2]
                            [--val-fraction 0.1] [--seed 0] [--device cpu] [--threads N]

`collect-traces` records Extremely Greedy Parallel trajectories by default (`--trajectory egp`:
the `oracle` decode towards the one-token-per-call low-confidence output); `--trajectory
low_confidence` records that one-token-per-call reference decode instead.
`controller` saves beside the model the traces were collected from (`<model_dir>/controller/`,
`controller-mlp/` for --arch mlp, `-stability` appended with --stability, `-drop-GROUP` with
--drop) unless --out is given; `tspd` finds it there. The controller reads the paper's features
(confidence, entropy, momentum, position); `--stability` adds the stability group, a departure
(`tspd:stability=true`). `--arch lstm` (default, the paper's) is the recurrent controller (an LSTM cell,
hidden 16), `--arch mlp` the window MLP.
"""

from __future__ import annotations

import argparse
import json

from unmask.decoding.features import FEATURE_GROUPS
from unmask.errors import UnmaskError
from unmask.tasks.registry import parse_task_list
from unmask.training.controller import ARCHITECTURES, ControllerTrainConfig
from unmask.training.traces import TRAJECTORIES, CollectConfig

COMMANDS = ("collect-traces", "controller")
_COLLECT = CollectConfig(out="")
_TRAIN = ControllerTrainConfig()


def add_controller_commands(train_subparsers) -> None:
    """Add `collect-traces` and `controller` to the `train` sub-parser group."""
    c = _COLLECT
    collect = train_subparsers.add_parser(
        "collect-traces",
        help="decode training prompts with traces and label each (call, position) for the TSPD controller",
        description="Decode training problems along Extremely Greedy Parallel trajectories (default: the "
        "oracle decode, which commits every masked position whose top-1 already equals the one-token-per-call "
        "low-confidence output) or the low-confidence reference itself, recording every masked position of the "
        "current block at every call, and write labelled trajectory features to an npz.",
    )
    collect.add_argument("--out", required=True, help="npz file to write")
    collect.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the built-in model)")
    collect.add_argument("--task", default=",".join(c.tasks), help="tasks to take prompts from, comma separated (default arith,trace)")
    collect.add_argument("--split", default=c.split)
    collect.add_argument("--n", type=int, default=c.n, help="problems per task")
    collect.add_argument("--gen-length", type=int, default=None, help="default: the model's")
    collect.add_argument("--block-length", type=int, default=None, help="default: the model's")
    collect.add_argument("--batch-size", type=int, default=c.batch_size)
    collect.add_argument("--seed", type=int, default=c.seed)
    collect.add_argument("--trajectory", default=c.trajectory, choices=list(TRAJECTORIES),
                         help="decode recorded: egp (default; Extremely Greedy Parallel, the oracle decode towards the "
                              "low-confidence output) or low_confidence (that reference, one token per call)")
    collect.add_argument("--no-early-stop", dest="early_stop", action="store_false", help="decode every block, even after an EOS")
    collect.add_argument("--device", default=None)
    collect.add_argument("--dtype", default=None)
    collect.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    collect.add_argument("--no-progress", dest="progress", action="store_false")

    t = _TRAIN
    train = train_subparsers.add_parser(
        "controller",
        help="train the TSPD controller on collected traces",
        description="Train the TSPD controller (class-weighted BCE, AdamW, early stopping on a validation "
        "split of whole decodes). Writes controller.safetensors, controller.json and loss.png.",
    )
    train.add_argument("--traces", action="append", required=True, help="npz from collect-traces (repeat for several)")
    train.add_argument("--out", default=None, help="folder to write (default: <model_dir>/controller beside the traced model)")
    train.add_argument("--stability", action="store_true",
                       help="also read the stability features (top-1 streak, flip flag): a departure, for tspd:stability=true")
    train.add_argument("--drop", default=None, choices=list(FEATURE_GROUPS),
                       help="feature group to leave out (ablation; stability only with --stability)")
    train.add_argument("--arch", default=t.arch, choices=list(ARCHITECTURES),
                       help="lstm (default, the paper's): an LSTM cell over the position's calls in its block; mlp: window MLP")
    train.add_argument("--window", type=int, default=t.window,
                       help="calls the mlp sees (this one and the ones before); the lstm sees them all")
    train.add_argument("--hidden", type=int, default=None, help="hidden width (default 32 for mlp, 16 for lstm)")
    train.add_argument("--epochs", type=int, default=t.epochs)
    train.add_argument("--patience", type=int, default=t.patience, help="epochs without validation improvement before stopping")
    train.add_argument("--batch-size", type=int, default=t.batch_size)
    train.add_argument("--lr", type=float, default=t.lr)
    train.add_argument("--weight-decay", type=float, default=t.weight_decay)
    train.add_argument("--val-fraction", type=float, default=t.val_fraction)
    train.add_argument("--seed", type=int, default=t.seed)
    train.add_argument("--device", default=t.device)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--no-plot", dest="plot", action="store_false")
    train.add_argument("--no-progress", dest="progress", action="store_false")


def collect_config_from_args(args: argparse.Namespace) -> CollectConfig:
    return CollectConfig(
        out=args.out, model=args.model, tasks=parse_task_list(args.task), split=args.split, n=args.n,
        gen_length=args.gen_length, block_length=args.block_length, batch_size=args.batch_size, seed=args.seed,
        early_stop=args.early_stop, trajectory=args.trajectory, device=args.device, dtype=args.dtype,
        threads=args.threads, progress=args.progress,
    )


def train_config_from_args(args: argparse.Namespace) -> ControllerTrainConfig:
    return ControllerTrainConfig(
        traces=tuple(args.traces), out=args.out, drop=args.drop, stability=args.stability, arch=args.arch, window=args.window, hidden=args.hidden,
        epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, val_fraction=args.val_fraction, seed=args.seed, device=args.device,
        threads=args.threads, plot=args.plot, progress=args.progress,
    )


def run_controller_command(args: argparse.Namespace) -> int:
    """Run a parsed `collect-traces` or `controller` command; UnmaskError propagates to the main CLI."""
    command = getattr(args, "train_command", None)
    if command == "collect-traces":
        from unmask.training.traces import collect_traces

        summary = collect_traces(collect_config_from_args(args))
    elif command == "controller":
        from unmask.training.controller import train_controller

        summary = train_controller(train_config_from_args(args))
    else:
        raise UnmaskError(f"unknown train command {command!r}; use one of: {', '.join(COMMANDS)}")
    print(json.dumps(summary))
    return 0

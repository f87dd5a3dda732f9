"""Argparse plumbing for `unmask train sft` (the main CLI mounts it with `add_train_parser`).

    unmask train sft --out DIR [--init M] [--task arith,trace] [--data FILE] [--steps N]
                     [--batch-size B] [--lr LR] [--gen-length 48] [--block-length 16]
                     [--eval-every N] [--save-every N] [--resume] [--d-model D] [--n-layers L] ...

Also runnable as `python -m unmask.training.cli train sft ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

from unmask.errors import UnmaskError
from unmask.tasks.registry import parse_task_list
from unmask.training.trainer import TrainConfig

_DEFAULTS = TrainConfig()


def _weight_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise UnmaskError(f"task-weights must be comma-separated numbers (e.g. 1,2), got {text!r}", field="task_weights") from None


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` (with the sub-command `sft`) to an argparse sub-parser group."""
    train = subparsers.add_parser("train", help="train or fine-tune a masked diffusion LM")
    train_sub = train.add_subparsers(dest="train_command", metavar="{sft,r2-sft,collect-traces,controller}")
    train_sub.required = True

    from unmask.training.controller_cli import add_controller_commands

    add_controller_commands(train_sub)
    sft = train_sub.add_parser(
        "sft",
        help="masked-diffusion SFT (LLaDA's objective): from scratch, from --init, or on --data",
        description="Masked-diffusion SFT. Writes a Hugging Face layout checkpoint to --out, plus "
        "trainer_state.pt (resume state only: do not ship it) and train_log.jsonl.",
    )
    d = _DEFAULTS
    sft.add_argument("--out", required=True, help="output folder (checkpoint, trainer_state.pt, train_log.jsonl)")
    sft.add_argument("--init", default=None, help="checkpoint to fine-tune (folder, hub id or 'builtin'); default: fresh network")
    sft.add_argument("--task", default=None, help="generated tasks to train on, comma separated, each with its options (e.g. arith,trace:skip=0,free_order=false; default arith,trace; none with --data)")
    sft.add_argument("--task-weights", default=None,
                     help="sampling weight per training task, comma separated, in --task order (e.g. 1,2: twice as many "
                          "trace rows; default: uniform)")
    sft.add_argument("--hard-bias", type=float, default=d.hard_bias,
                     help="draw training problems in proportion to hardness ** B (trace: longer programs and "
                          "an earlier variable printed; arith has no measure); default 0: uniform")
    sft.add_argument("--data", default=None, help='JSONL file of {"prompt"|"messages", "response"} records')
    sft.add_argument("--eval-task", default=None, help="tasks for dev accuracy (default: the training tasks)")
    sft.add_argument("--steps", type=int, default=d.steps)
    sft.add_argument("--time-budget", type=float, default=None,
                     help="seconds of training (eval excluded): stop then, and end the cosine decay then")
    sft.add_argument("--batch-size", type=int, default=d.batch_size)
    sft.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    sft.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    sft.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    sft.add_argument("--weight-decay", type=float, default=d.weight_decay)
    sft.add_argument("--grad-clip", type=float, default=d.grad_clip)
    sft.add_argument("--no-stratified", dest="stratified", action="store_false", help="i.i.d. mask ratios instead of stratified")
    sft.add_argument("--block-masking", dest="block_frac", type=float, default=d.block_frac,
                     help="share of rows masked as block-wise decoding sees them: earlier blocks clean, later ones masked "
                          "(0-1; default 0: uniform masking, LLaDA's objective)")
    sft.add_argument("--block-diffusion", action="store_true",
                     help="train a block-diffusion model (attention causal across blocks of --block-length, "
                          "bidirectional within one, so its KV cache is exact) with SDAR's two-copy recipe; "
                          "with --init, fine-tunes a LLaDA-layout checkpoint (such as the built-in model) into one")
    sft.add_argument("--gen-length", type=int, default=d.gen_length)
    sft.add_argument("--block-length", type=int, default=d.block_length)
    sft.add_argument("--d-model", type=int, default=d.d_model)
    sft.add_argument("--n-layers", type=int, default=d.n_layers)
    sft.add_argument("--n-heads", type=int, default=d.n_heads)
    sft.add_argument("--mlp-hidden", type=int, default=None, help="SwiGLU hidden size (default 3 x d-model)")
    sft.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between dev evaluations (0: never)")
    sft.add_argument("--eval-problems", type=int, default=d.eval_problems, help="dev problems per task")
    sft.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: only at the end)")
    sft.add_argument("--log-every", type=int, default=d.log_every)
    sft.add_argument("--seed", type=int, default=d.seed)
    sft.add_argument("--device", default=d.device)
    sft.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sft.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    sft.add_argument("--no-progress", dest="progress", action="store_false")
    sft.add_argument("--eval-strategy", default=d.eval_strategy, help="policy for dev accuracy (default low_confidence)")

    from unmask.training.r2_sft import DEFAULT_CANDIDATES, MASKINGS, SELECTIONS, R2SFTConfig

    r2d = R2SFTConfig()
    r2 = train_sub.add_parser(
        "r2-sft",
        help="redundancy-aware SFT (R²-dLLM): fine-tune on the least redundant correct self-generated answers",
        description="Decode every candidate strategy on training prompts, keep each prompt's correct answer with the "
        "lowest R_total, fine-tune on those pairs with the SFT trainer, and plot loss, R_total, NFE and accuracy.",
    )
    r2.add_argument("--init", default=r2d.init, help="model to fine-tune (default: the built-in model)")
    r2.add_argument("--out", default=r2d.out, help="output folder: pairs, selection stats, model/, training_dynamics.png")
    r2.add_argument("--task", default=",".join(r2d.tasks), help="generated tasks (comma separated)")
    r2.add_argument("--problems", type=int, default=r2d.problems, help="training prompts per task")
    r2.add_argument("--candidate", action="append", dest="candidates", default=None,
                    help=f"candidate strategy, repeatable (default: {', '.join(DEFAULT_CANDIDATES)})")
    r2.add_argument("--steps", type=int, default=r2d.steps)
    r2.add_argument("--batch-size", type=int, default=r2d.batch_size)
    r2.add_argument("--lr", type=float, default=r2d.lr)
    r2.add_argument("--eval-every", type=int, default=r2d.eval_every)
    r2.add_argument("--eval-problems", type=int, default=r2d.eval_problems)
    r2.add_argument("--eval-strategy", default=r2d.eval_strategy)
    r2.add_argument("--masking", choices=MASKINGS, default=r2d.masking,
                    help="fine-tuning masks: 'block' (default, as the R²-dLLM reference): every row block-aware at the "
                         "decode's block length (earlier blocks clean, later ones masked; --block-masking 1 of "
                         "`train sft`); 'uniform': LLaDA's objective, every response position masked independently")
    r2.add_argument("--select", choices=SELECTIONS, default=r2d.select,
                    help="which correct decodes may be selected: 'answer' (default, the paper's): the final "
                         "answer is right; 'working' (a departure): the task also accepts the working "
                         "(arith: only the problem's people and items, every equation holds)")
    r2.add_argument("--time-budget", type=float, default=None)
    r2.add_argument("--seed", type=int, default=r2d.seed)
    r2.add_argument("--no-progress", dest="progress", action="store_false")
    return train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.task is not None:
        tasks = parse_task_list(args.task)
    else:
        tasks = () if args.data else ("arith", "trace")
    return TrainConfig(
        out=args.out,
        init=args.init,
        tasks=tasks,
        task_weights=_weight_list(args.task_weights) if args.task_weights is not None else None,
        hard_bias=args.hard_bias,
        data=args.data,
        eval_tasks=parse_task_list(args.eval_task) if args.eval_task is not None else None,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        time_budget_s=args.time_budget,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=min(args.min_lr, args.lr),
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        stratified=args.stratified,
        block_frac=args.block_frac,
        block_diffusion=args.block_diffusion,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        mlp_hidden=args.mlp_hidden,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        save_every=args.save_every,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        resume=args.resume,
        progress=args.progress,
        eval_strategy=args.eval_strategy,
    )


def run_train(args: argparse.Namespace) -> int:
    """Run the parsed `train` command; UnmaskError propagates for the main CLI to report."""
    if getattr(args, "train_command", None) in ("collect-traces", "controller"):
        from unmask.training.controller_cli import run_controller_command

        return run_controller_command(args)
    from unmask.training.sft import run_sft

    if getattr(args, "train_command", None) == "r2-sft":
        from unmask.training.r2_sft import DEFAULT_CANDIDATES, R2SFTConfig, run_r2_sft

        result = run_r2_sft(R2SFTConfig(
            init=args.init, out=args.out, tasks=parse_task_list(args.task), problems=args.problems,
            candidates=tuple(args.candidates or DEFAULT_CANDIDATES), steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, eval_every=args.eval_every, eval_problems=args.eval_problems, eval_strategy=args.eval_strategy,
            time_budget_s=args.time_budget, seed=args.seed, progress=args.progress, masking=args.masking, select=args.select,
        ))
        print(json.dumps(result, default=str))
        return 0
    if getattr(args, "train_command", None) != "sft":
        raise UnmaskError("unknown train command; use `unmask train sft` or `unmask train r2-sft`")
    summary = run_sft(config_from_args(args))
    print(json.dumps({k: v for k, v in summary.items() if k in ("step", "loss", "eval", "parameters", "out")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unmask.training.cli")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UnmaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

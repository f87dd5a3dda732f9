"""`unmask lm-eval [lm-eval arguments...]`: lm-eval's own command line, with `--model unmask` known.

    unmask lm-eval --model unmask \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,strategy=threshold:tau=0.9,gen_length=256 \\
        --tasks gsm8k --batch_size 8 --apply_chat_template

Everything after `lm-eval` goes to lm-eval unchanged (`run`, `ls` and `validate` included; with
no sub-command lm-eval assumes `run`), so it behaves exactly like the `lm-eval` command except that
the unmask model is registered first, `--model` defaults to `unmask` when neither `--model` nor
`--config` is given, with unmask `--device` defaults to the best available device (lm-eval's
own default is cuda:0), and the tasks that ship with unmask (`unmask.evaluation.lm_eval_tasks`:
`gsm8k_local`, GSM8K's test split offline) are on the task search path, ahead of any
`--include_path` (a task of yours with the same name wins). Also runnable as
`python -m unmask.evaluation ...`.

The main CLI mounts it with `add_lm_eval_parser(subparsers)` and dispatches to `run_lm_eval(args)`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import sys

from unmask.errors import UnmaskError

_OTHER_COMMANDS = ("ls", "validate")


def add_lm_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `lm-eval` to an argparse sub-parser group; every later argument is passed through."""
    parser = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with unmask as the model (all arguments go to lm-eval)",
        description="Run lm-evaluation-harness with `--model unmask` registered. Every argument after "
        "`lm-eval` is passed to lm-eval unchanged; see `unmask lm-eval --help`.",
        add_help=False,  # -h/--help go to lm-eval
        # no prefix character can start an argument, so argparse treats lm-eval's options
        # (--model, --tasks, ...) as plain strings and collects them all below
        prefix_chars="\x00",
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    return parser


def run_lm_eval(args: argparse.Namespace) -> int:
    """Run lm-eval on `args.lm_eval_args` (from `add_lm_eval_parser`); returns the exit code."""
    return main(list(args.lm_eval_args))


def _flag_value(argv: list[str], *flags: str) -> str | None:
    """The value of the last `FLAG VALUE` / `FLAG=VALUE` in argv ("" for a flag with no value)."""
    found = None
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag:
                found = argv[i + 1] if i + 1 < len(argv) else ""
            elif arg.startswith(flag + "="):
                found = arg[len(flag) + 1 :]
    return found


def _with_defaults(argv: list[str]) -> list[str]:
    """`--model unmask` when no model is named, and, for unmask, `--device auto` when no device
    is: lm-eval's CLI would otherwise pass device=cuda:0 even where there is no GPU."""
    if not argv or argv[0] in _OTHER_COMMANDS or any(a in ("-h", "--help") for a in argv):
        return argv
    if _flag_value(argv, "--config", "-C") is not None:
        return argv  # the config file names the model and device
    model = _flag_value(argv, "--model", "-M")
    if model is None:
        argv, model = argv + ["--model", "unmask"], "unmask"
    if model == "unmask" and _flag_value(argv, "--device") is None:
        argv = argv + ["--device", "auto"]
    return argv


@contextlib.contextmanager
def _show_our_logs():
    """lm-eval configures only its own logger; show ours (the NFE/TPF summaries) beside it, for
    the length of the run only (main may be called in-process)."""
    ours = logging.getLogger("unmask.evaluation")
    root = logging.getLogger()
    if ours.handlers or (root.handlers and root.getEffectiveLevel() <= logging.INFO):
        yield  # shown already
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [unmask] %(message)s", "%Y-%m-%d:%H:%M:%S"))
    saved = ours.level, ours.propagate
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.level, ours.propagate = saved


@contextlib.contextmanager
def _our_tasks_included():
    """Every lm-eval TaskManager made during the run also searches unmask's task folder, first in
    its include_path (later folders win a name clash, so a user's own task of the same name is
    used). lm-eval's CLI takes one --include_path string, so the folder cannot go in argv beside
    a user's; wrapping the constructor covers `run`, `ls` and `validate` alike."""
    from lm_eval.tasks import TaskManager

    from unmask.evaluation.lm_eval_tasks import TASKS_DIR

    # the class whose constructor names include_path (lm-eval's own, also under a subclass)
    TaskManager = next((c for c in TaskManager.__mro__ if "include_path" in inspect.signature(c.__init__).parameters), None)
    if TaskManager is None:  # an lm-eval we do not know: its own task search, untouched
        yield
        return
    saved = TaskManager.__dict__.get("__init__")
    original = TaskManager.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        paths = bound.arguments.get("include_path")
        paths = [] if paths is None else list(paths) if isinstance(paths, (list, tuple)) else [paths]
        bound.arguments["include_path"] = [TASKS_DIR, *paths]
        original(*bound.args, **bound.kwargs)

    TaskManager.__init__ = __init__
    try:
        yield
    finally:
        if saved is None:
            del TaskManager.__init__
        else:
            TaskManager.__init__ = saved


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI (`lm_eval.__main__.cli_evaluate`) with unmask registered; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from unmask.evaluation import register

        register()
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except UnmaskError as exc:
        sys.stderr.write(f"unmask: error: {exc}\n")
        return 2

    setup_logging()
    saved = sys.argv
    # HarnessCLI reads sys.argv itself (it inserts `run` when no sub-command is named)
    sys.argv = ["lm-eval", *_with_defaults(argv)]
    try:
        with _show_our_logs(), _our_tasks_included():
            cli = HarnessCLI()
            cli.execute(cli.parse_args())
    except SystemExit as exc:  # --help, and lm-eval's own argument errors
        code = exc.code
        if isinstance(code, str):
            sys.stderr.write(code + "\n")
        return code if isinstance(code, int) else (0 if code is None else 1)
    except UnmaskError as exc:
        sys.stderr.write(f"unmask: error: {exc}\n")
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

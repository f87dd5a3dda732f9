"""What keeps a drafting policy from the oracle bound: low-confidence final tokens and short chains.

Two measurements on the same problems:

1. The oracle's commits (decoded with its trace): what share of them a confidence rule could not
   have made, i.e. tokens committed at a call where their probability was below 0.9 / 0.5. The
   oracle commits them because it knows they are final; a policy without that knowledge must
   verify them or wait.
2. A drafting policy's chains (`psd`, `learned_drafts`): for each draft level k, how many calls
   built it and in how many the model confirmed every level up to k. A chain is only as deep as its
   first unconfirmed level, so acceptance that falls with k caps the tokens a call can add however
   deep the drafts go.

    python benchmarks/oracle_gap.py --task arith --split dev --limit 200 --strategy learned_drafts
    python benchmarks/oracle_gap.py --limit 20 --strategy psd:depth=8     # a quick look

Prints the two tables and writes `--out` (JSON) if given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from unmask.decoding import generate, parse_strategy
from unmask.errors import UnmaskError

CONFIDENCE_BARS = (0.9, 0.5)


def commit_confidences(sequences) -> np.ndarray:
    """The probability each committed token had at the call that committed it (from the traces)."""
    out = []
    for seq in sequences:
        trace = seq.trace
        for step in range(trace.steps):
            out.append(trace.confidence[step][trace.commit_step == step])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class ChainCounter:
    """Wraps a drafting policy's `accept`: per level k, calls that built it and calls that kept it."""

    def __init__(self, policy):
        self.built: Counter = Counter()
        self.kept: Counter = Counter()
        inner = policy.accept

        def accept(view, state, candidates, draft_top1, draft_conf):
            depth, events = inner(view, state, candidates, draft_top1, draft_conf)
            levels = (candidates[:, 1:] != candidates[:, :-1]).any(-1).sum(-1)  # levels each row built
            for built, kept in zip(levels.tolist(), depth.tolist()):
                for k in range(1, built + 1):
                    self.built[k] += 1
                    self.kept[k] += int(kept >= k)
            return depth, events

        policy.accept = accept

    def table(self) -> list[dict]:
        return [{"level": k, "built": self.built[k], "kept": self.kept[k],
                 "kept_share": self.kept[k] / self.built[k]} for k in sorted(self.built)]


def measure(model, task, problems, strategy: str, batch_size: int = 50, **decode) -> dict:
    """Both measurements (see the module docstring) on `problems`."""
    oracle_seqs, policy_nfe = [], []
    policy = parse_strategy(strategy)
    if len(getattr(policy.config, "orders", ())) > 1:
        raise UnmaskError(f"{strategy} drafts several chains; the chain table counts one: give a single order",
                          field="order")
    counter = ChainCounter(policy)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        messages = [task.messages(p) for p in chunk]
        oracle_seqs += generate(model, messages, "oracle", record_trace=True, **decode).sequences
        policy_nfe += [s.nfe for s in generate(model, messages, policy, **decode).sequences]
    confidences = commit_confidences(oracle_seqs)
    return {
        "n": len(problems),
        "oracle_nfe": float(np.mean([s.nfe for s in oracle_seqs])),
        "oracle_commits": int(confidences.size),
        "oracle_commits_below": {str(bar): float((confidences < bar).mean()) if confidences.size else 0.0
                                 for bar in CONFIDENCE_BARS},
        "strategy": strategy,
        "strategy_nfe": float(np.mean(policy_nfe)),
        "chain": counter.table(),
    }


def main(argv=None) -> int:
    from unmask.models import load_model
    from unmask.tasks import get_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--task", default="arith")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--strategy", default="learned_drafts", help="a drafting policy (psd, learned_drafts)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task)
        problems = task.problems(args.split, limit=args.limit)
        model = load_model(args.model)
        report = measure(model, task, problems, args.strategy, batch_size=args.batch_size)
    except UnmaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    below = report["oracle_commits_below"]
    print(f"{args.task} ({args.split}), n = {report['n']}: oracle {report['oracle_nfe']:.2f} NFE, "
          f"{args.strategy} {report['strategy_nfe']:.2f} NFE")
    print(f"oracle commits: {report['oracle_commits']}; at confidence < 0.9: {100 * below['0.9']:.0f}%, "
          f"< 0.5: {100 * below['0.5']:.0f}%")
    print("level  built  kept  kept %")
    for row in report["chain"]:
        print(f"{row['level']:5d}  {row['built']:5d}  {row['kept']:4d}  {100 * row['kept_share']:5.1f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where PSD's output parts from the greedy decode, and which of its commits caused it.

For each problem, decode with the reference (`low_confidence`, one token per call) and with a PSD
setting. Where the two answers differ, find the first generation position whose token differs and
ask who committed PSD's token there: the unmasking rule (the threshold rule's own commit, which
`threshold` alone would also have made) or the verification (an accepted draft, confirmed only by
argmax agreement on the shallower draft's canvas). For accepted drafts it also reports the
probability of the confirming prediction, which is what `psd:accept_tau` would test.

    python benchmarks/psd_divergence.py --task arith --split dev --limit 300 --strategy psd
    python benchmarks/psd_divergence.py --limit 20 --batch-size 10      # a quick look

Prints one table and writes `--out` (JSON) if given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from unmask.decoding import generate, parse_strategy
from unmask.decoding.policies.psd import PSD
from unmask.errors import UnmaskError

BUCKETS = (0.5, 0.7, 0.9, 1.01)


class RecordingPSD(PSD):
    """PSD that remembers, per decode row, which positions its unmasking rule committed and, for
    every accepted draft token, the probability of the prediction that confirmed it."""

    def __init__(self, config):
        super().__init__(config)
        self.rule_commits: dict[int, set[int]] = {}
        self.confirmed: dict[int, dict[int, float]] = {}

    def decide(self, view, state):
        decision = super().decide(view, state)
        for j, row in enumerate(view.rows.tolist()):
            cols = view.positions[j][decision.commit[j] & view.masked[j]].tolist()
            self.rule_commits.setdefault(row, set()).update(cols)
        return decision

    def accept(self, view, state, candidates, draft_top1, draft_conf):
        depth, events = super().accept(view, state, candidates, draft_top1, draft_conf)
        new = candidates[:, 1:] != candidates[:, :-1]  # (b, K, block): group j's positions
        for j, row in enumerate(view.rows.tolist()):
            for level in range(int(depth[j])):
                for p in new[j, level].nonzero().squeeze(1).tolist():
                    position = int(view.positions[j, p])
                    # group `level` is checked against the prediction made on draft `level - 1`
                    self.confirmed.setdefault(row, {})[position] = float(draft_conf[j, level, p])
        return depth, events


def bucket(p: float) -> str:
    low = 0.0
    for high in BUCKETS:
        if p < high:
            return f"[{low:.1f}, {min(high, 1.0):.1f})"
        low = high
    return "1.0"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", default="arith")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--strategy", default="psd", help="a psd setting (psd:key=value,...)")
    ap.add_argument("--reference", default="low_confidence")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        from unmask.models import load_model
        from unmask.tasks import get_task

        policy = parse_strategy(args.strategy)
        if not isinstance(policy, PSD):
            raise UnmaskError(f"--strategy must be a psd setting, got {args.strategy!r}")
        task = get_task(args.task)
        problems = task.problems(args.split, args.limit, seed=0)
        model = load_model(args.model)
    except UnmaskError as exc:
        sys.stderr.write(f"psd_divergence: {exc}\n")
        return 2
    counts: Counter = Counter()
    by_conf: Counter = Counter()
    n = 0
    for start in range(0, len(problems), args.batch_size):
        chunk = problems[start : start + args.batch_size]
        prompts = [task.messages(p) for p in chunk]
        ref = generate(model, prompts, args.reference)
        recorder = RecordingPSD(policy.config)
        got = generate(model, prompts, recorder)
        for row, (problem, a, b) in enumerate(zip(chunk, ref.sequences, got.sequences)):
            n += 1
            ref_ok, psd_ok = task.score(problem, a.text) > 0, task.score(problem, b.text) > 0
            counts[("reference correct", ref_ok)] += 1
            counts[("psd correct", psd_ok)] += 1
            if a.answer_ids == b.answer_ids:
                counts["same answer"] += 1
                continue
            first = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
            if first in recorder.confirmed.get(row, {}):
                source = "accepted draft"
                by_conf[(bucket(recorder.confirmed[row][first]), ref_ok, psd_ok)] += 1
            elif first in recorder.rule_commits.get(row, set()):
                source = "unmasking rule"
            else:
                source = "filled at stop"
            counts[(source, ref_ok, psd_ok)] += 1
    print(f"{args.strategy} against {args.reference}: {n} {args.task} {args.split} problems")
    print(f"  same answer: {counts['same answer']}")
    print(f"  reference correct: {counts[('reference correct', True)]}, psd correct: {counts[('psd correct', True)]}")
    print("  first differing token committed by (ref correct -> psd correct: count):")
    for source in ("unmasking rule", "accepted draft", "filled at stop"):
        cells = {k[1:]: v for k, v in counts.items() if isinstance(k, tuple) and k[0] == source}
        total = sum(cells.values())
        if total:
            detail = ", ".join(f"{int(r)}->{int(p)}: {c}" for (r, p), c in sorted(cells.items()))
            print(f"    {source:<15} {total:>4}  ({detail})")
    if by_conf:
        print("  accepted drafts by confirming probability (ref correct -> psd correct: count):")
        for b in sorted({k[0] for k in by_conf}):
            cells = {k[1:]: v for k, v in by_conf.items() if k[0] == b}
            detail = ", ".join(f"{int(r)}->{int(p)}: {c}" for (r, p), c in sorted(cells.items()))
            print(f"    {b:<12} {sum(cells.values()):>4}  ({detail})")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "strategy": args.strategy, "reference": args.reference, "n": n,
            "counts": {" | ".join(map(str, k)) if isinstance(k, tuple) else k: v for k, v in counts.items()},
            "by_confirming_probability": {" | ".join(map(str, k)): v for k, v in by_conf.items()},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

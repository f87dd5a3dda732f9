"""Redundancy-aware SFT (R²-dLLM §5): fine-tune a model towards short decoding trajectories.

What the paper says: for each training prompt, collect the model's own candidate responses, keep
those with a correct answer, and of those the one with the lowest redundancy score R_total; then
fine-tune on the selected (prompt, response) pairs, so the model learns trajectories with fewer
redundant steps. The paper plots loss, R_total, NFE and accuracy over fine-tuning (its Figure 6).

What the reference code does (the public repository GATECH-EIC/R2-dLLM): self-generated
responses ranked by a redundancy score, the least redundant correct one kept, and block-32
masked-diffusion fine-tuning (block 32 is its decode's block length).

What we do:
1. For each training prompt, decode several candidates: different policies, thresholds and
   sampling temperatures (`candidates`), with the trace recorded.
2. Keep the correct ones (the task's own scorer); of those keep the one with the lowest R_total,
   computed from the decode's trace by `unmask.decoding.redundancy.r_total`, one function for
   every policy (temporal redundant steps plus spatial events read from the trace, never from a
   policy's own event counters, which are only reported beside it in the selection statistics);
   ties go to fewer model calls.
3. Fine-tune the model on those pairs with the one SFT trainer (`unmask.training.sft.run_sft`),
   with `masking`:
   - "block" (default, as the reference): every training row is block-aware
     (`TrainConfig.block_frac = 1`, the trainer's `--block-masking 1`) with the decode's block
     length (the model's default, the length the candidates were decoded with): a block index k
     drawn uniformly, earlier blocks clean, block k masked at ratio p_mask, later blocks masked;
   - "uniform": LLaDA's SFT objective, every response position masked independently
     (`block_frac = 0`).
   Dev accuracy is evaluated with the `r2` policy as training goes: loss, R_total, NFE and
   accuracy are logged, and `training_dynamics.png` plots them.

Departures and choices where the paper is silent: the candidate set (greedy and sampled decodes of
the baseline and R² policies, so that the selected response is one the model itself produces);
R_total's exact formula (the paper does not publish it; ours is in `unmask.decoding.redundancy`);
ties broken by NFE; a fine-tuning learning rate ten times below the from-scratch one; every row
block-aware (the reference's block-wise fine-tuning is not mixed with uniform rows).

Departure, off by default: `select="working"` (`--select working`) also asks the task to accept
the response's working (`Task.working_consistent`: on `arith`, only the problem's people and items
are named and every equation holds), not only its final answer; the built-in model's own decodes
are often right by the final number alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from unmask.errors import UnmaskError

MASKINGS = ("block", "uniform")  # R²-SFT's fine-tuning masks: block-aware rows (default) or LLaDA's uniform
SELECTIONS = ("answer", "working")  # which pairs count as correct: the answer (the paper's) or the working too

DEFAULT_CANDIDATES = (
    "low_confidence",
    "threshold:tau=0.9",
    "threshold:tau=0.7",
    "r2",
    "r2:tau_s=0.7,tau_t=0.7",
    "low_confidence:temperature=0.7",
    "r2:temperature=0.5",
)


@dataclass
class R2SFTConfig:
    init: str = "builtin"
    out: str = "runs/r2-sft"
    tasks: tuple[str, ...] = ("arith", "trace")
    problems: int = 1000  # training prompts per task
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    decode_batch_size: int = 64
    seed: int = 0
    # fine-tuning (passed to the SFT trainer)
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 50
    eval_every: int = 100
    eval_problems: int = 100
    eval_strategy: str = "r2"
    masking: str = "block"  # "block": every row block-aware at the decode's block length; "uniform": LLaDA's
    select: str = "answer"  # a pair must be correct by its answer (the paper's); "working": its working too
    time_budget_s: float | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        from unmask.decoding import parse_strategy

        if self.problems <= 0:
            raise UnmaskError(f"--problems must be a positive integer, got {self.problems}", field="problems")
        if self.masking not in MASKINGS:
            raise UnmaskError(f"--masking must be one of {', '.join(MASKINGS)}, got {self.masking!r}", field="masking")
        if self.select not in SELECTIONS:
            raise UnmaskError(f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}", field="select")
        if not self.candidates:
            raise UnmaskError("--candidate must be given at least once", field="candidates")
        for spec in self.candidates:
            parse_strategy(spec)
        parse_strategy(self.eval_strategy)


def select_pairs(model, config: R2SFTConfig, log=print) -> tuple[list[dict], dict]:
    """Decode every candidate on every training prompt; keep the correct response with the lowest R_total.

    R_total is computed from each decode's trace (`unmask.decoding.redundancy.r_total`), the same
    measure for every candidate policy; each policy's own event counters are averaged beside it
    (`stats["candidates"][spec]["policy_events"]`) and play no part in the choice.
    """
    from tqdm.auto import tqdm

    from unmask.decoding import generate, parse_strategy
    from unmask.decoding.redundancy import r_total
    from unmask.tasks import get_task

    pairs, stats = [], {"prompts": 0, "with_correct": 0, "candidates": {}, "r_total_from": "trace",
                        "select": config.select}
    for task_name in config.tasks:
        task = get_task(task_name)
        problems = task.problems("train", limit=config.problems, seed=config.seed)
        best: dict[str, dict] = {}
        bar = tqdm(total=len(problems) * len(config.candidates), desc=f"r2-sft candidates [{task_name}]",
                   disable=not config.progress, unit="decode")
        for spec in config.candidates:
            policy = parse_strategy(spec)
            per = stats["candidates"].setdefault(
                spec, {"correct": 0, "n": 0, "r_total": 0.0, "nfe": 0.0, "policy_events": {}})
            for start in range(0, len(problems), config.decode_batch_size):
                chunk = problems[start : start + config.decode_batch_size]
                result = generate(model, [task.messages(p) for p in chunk], policy, seed=config.seed, record_trace=True)
                for problem, seq in zip(chunk, result.sequences):
                    score = task.score(problem, seq.text)
                    redundancy = r_total(seq.trace)
                    per["n"] += 1
                    per["correct"] += score
                    per["r_total"] += redundancy
                    per["nfe"] += seq.nfe
                    for name, count in (seq.events or {}).items():
                        per["policy_events"][name] = per["policy_events"].get(name, 0.0) + float(count)
                    if score < 1.0 or (config.select == "working" and not task.working_consistent(problem, seq.text)):
                        continue
                    key = (redundancy, seq.nfe)
                    current = best.get(problem.id)
                    if current is None or key < (current["r_total"], current["nfe"]):
                        best[problem.id] = {"messages": task.messages(problem), "response": seq.text, "task": task_name,
                                            "strategy": spec, "r_total": redundancy, "nfe": seq.nfe}
                bar.update(len(chunk))
        bar.close()
        stats["prompts"] += len(problems)
        stats["with_correct"] += len(best)
        pairs.extend(best[p.id] for p in problems if p.id in best)
    for per in stats["candidates"].values():
        n = max(per["n"], 1)
        per.update(accuracy=per.pop("correct") / n, r_total=per["r_total"] / n, nfe=per["nfe"] / n,
                   policy_events={k: v / n for k, v in per["policy_events"].items()})
    if pairs:
        stats["selected_r_total"] = sum(p["r_total"] for p in pairs) / len(pairs)
        stats["selected_nfe"] = sum(p["nfe"] for p in pairs) / len(pairs)
        stats["selected_by"] = {s: sum(p["strategy"] == s for p in pairs) for s in config.candidates}
    return pairs, stats


def fine_tune_config(config: R2SFTConfig, model, data_file: Path, model_dir: Path):
    """The SFT trainer's settings for R²-SFT's fine-tuning: the decode's canvas and `config.masking`."""
    from unmask.training.trainer import TrainConfig

    return TrainConfig(
        out=str(model_dir), init=config.init, tasks=(), data=str(data_file), eval_tasks=tuple(config.tasks),
        gen_length=model.defaults.gen_length, block_length=model.defaults.block_length,
        block_frac=1.0 if config.masking == "block" else 0.0, steps=config.steps,
        batch_size=config.batch_size, lr=config.lr, min_lr=config.lr / 10, warmup_steps=config.warmup_steps,
        eval_every=config.eval_every, eval_problems=config.eval_problems, eval_strategy=config.eval_strategy,
        save_every=0, time_budget_s=config.time_budget_s, progress=config.progress,
        resume=(model_dir / "trainer_state.pt").exists(),
    )


def plot_dynamics(log_file: Path, out_png: Path, title: str = "Redundancy-aware SFT") -> Path:
    """Loss, R_total, NFE and accuracy over fine-tuning steps, from the trainer's train_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, evals = [], []
    for line in log_file.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses.append((rec["step"], rec["loss"]))
        if "eval" in rec and isinstance(rec["eval"], dict):
            merged = {task: {"accuracy": acc, **rec.get("eval_costs", {}).get(task, {})} for task, acc in rec["eval"].items()}
            evals.append((rec["step"], merged))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    if losses:
        axes[0].plot(*zip(*losses), lw=0.8)
    axes[0].set_title("loss")
    for ax, key, label in ((axes[1], "r_total", "R_total"), (axes[2], "nfe", "NFE"), (axes[3], "accuracy", "accuracy")):
        series: dict[str, list] = {}
        for step, ev in evals:
            for task, value in ev.items():
                if isinstance(value, dict) and key in value:
                    series.setdefault(task, []).append((step, value[key]))
        for task, points in series.items():
            ax.plot(*zip(*points), marker="o", ms=3, label=task)
        ax.set_title(label)
        if series:
            ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_r2_sft(config: R2SFTConfig) -> dict:
    """Collect, select, fine-tune, plot. Returns the selection statistics and the SFT summary."""
    from unmask.models import load_model
    from unmask.training.sft import run_sft

    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    model = load_model(config.init)
    data_file = out / "r2_pairs.jsonl"
    stats_file = out / "r2_selection.json"
    stats = json.loads(stats_file.read_text()) if data_file.exists() and stats_file.exists() else None
    # a rerun reuses a selection made by this rule
    if stats is None or stats.get("r_total_from") != "trace" or stats.get("select", "answer") != config.select:
        pairs, stats = select_pairs(model, config)
        if not pairs:
            raise UnmaskError("no candidate decode was correct on any training prompt; the model cannot be fine-tuned this way")
        data_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        stats_file.write_text(json.dumps(stats, indent=2))
    model_dir = out / "model"
    train = fine_tune_config(config, model, data_file, model_dir)
    summary = run_sft(train)
    plot_dynamics(model_dir / "train_log.jsonl", out / "training_dynamics.png")
    return {"selection": stats, "sft": {k: v for k, v in summary.items() if k in ("step", "loss", "eval", "out")}}

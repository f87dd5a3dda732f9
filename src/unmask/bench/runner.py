"""`unmask bench`: every strategy on the same problems, accuracy against model calls and seconds.

Results follow docs/results.md (`results.json`, `results.md`, `pareto.png`). Each finished
problem is appended to `problems.jsonl` in the output folder as soon as its batch is decoded, so an
interrupted run resumes where it stopped: finished (strategy, problem) pairs are never recomputed
or counted twice, and `results.json` is rebuilt from them.

Two backends share everything but the scheduling: `local` decodes the chunks one after another in
this process; `ray` (`unmask.bench.ray_backend`) hands the same chunks to one actor per GPU or CPU
slot. Both decode and score a chunk with `decode_chunk`, and both record through `ProblemLog`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from unmask.bench.stats import wilson_interval
from unmask.decoding import DecodeConfig, generate, parse_strategy
from unmask.decoding.config import resolve_cache
from unmask.decoding.redundancy import COUNTS, redundancy_counts
from unmask.errors import NonFiniteLogitsError, UnmaskError

BACKENDS = ("local", "ray")


# The main job's comparison: what a newcomer needs first. LLaDA's and Fast-dLLM's baselines, each
# seed method at its paper's setting (TSPD with its Confidence Extrapolation, as the paper pairs
# them), the one-call floor and the oracle bound. `unmask bench --all` runs every registered policy.
MAIN_STRATEGIES = ("low_confidence", "threshold", "r2", "tspd:ce=true", "psd", "one_shot", "oracle")


# the models the main job compares (`unmask bench` without --model)
MAIN_MODELS = ("builtin", "builtin:block")


def default_strategies() -> list[str]:
    """The main job's comparison (`MAIN_STRATEGIES`)."""
    return list(MAIN_STRATEGIES)


def all_strategies() -> list[str]:
    """Every registered policy at its defaults (`unmask bench --all`)."""
    from unmask.decoding import policy_names

    return list(policy_names())




@dataclass
class BenchConfig:
    """What to run. Strategy strings are `NAME` or `NAME:key=value,...`."""

    model: str | None = None
    task: str = "arith"
    split: str = "test"
    strategies: list[str] = field(default_factory=default_strategies)
    limit: int | None = 80  # the main job in under 5 minutes on 2 CPU cores; intervals about ±8 points
    seed: int = 0
    gen_length: int | None = None
    block_length: int | None = None
    batch_size: int = 16
    out: str = "runs/bench"
    device: str | None = None
    dtype: str | None = None
    cache: str = "auto"  # "auto": the exact cache of a block-diffusion model, none for a bidirectional one
    trust_remote_code: bool = False
    # with the default strategy list, a policy that lacks a trained part for this model (tspd
    # without a controller) is skipped with a note instead of stopping the run
    skip_unavailable: bool = False
    backend: str = "local"  # "local" (this process) or "ray" (one actor per GPU or CPU slot)
    address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None starts one here

    def validate(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise UnmaskError(f"--limit must be a positive integer, got {self.limit}", field="limit")
        if self.batch_size <= 0:
            raise UnmaskError(f"--batch-size must be a positive integer, got {self.batch_size}", field="batch_size")
        if not self.strategies:
            raise UnmaskError("no strategy given; pass --strategy NAME at least once", field="strategy")
        if self.backend not in BACKENDS:
            raise UnmaskError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}", field="backend")
        if self.address is not None and self.backend != "ray":
            raise UnmaskError("--address names a Ray cluster; pass it together with --backend ray", field="address")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def strategy_key(name: str, params: dict[str, Any]) -> str:
    return name + ":" + ",".join(f"{k}={params[k]}" for k in sorted(params))


class ProblemLog:
    """Append-only per-problem results (`problems.jsonl`): the resume point of a bench run."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.done: dict[str, dict[str, dict]] = {}
        if path.exists():
            lines = path.read_text().splitlines()
            first = json.loads(lines[0]) if lines else None
            if first and first.get("header") != header:
                raise UnmaskError(
                    f"{path.parent} holds results of a different run ({_diff(first.get('header', {}), header)}); "
                    "pass a new --out folder or delete that one",
                    field="out",
                )
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption: that problem is simply redone
                self.done.setdefault(rec["key"], {})[rec["problem_id"]] = rec
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": header}) + "\n")

    def add(self, records: list[dict]) -> None:
        """Append `records`, skipping any (strategy key, problem) already held: a row is counted once."""
        with self.path.open("a") as fh:
            for rec in records:
                held = self.done.setdefault(rec["key"], {})
                if rec["problem_id"] in held:
                    continue
                fh.write(json.dumps(rec) + "\n")
                held[rec["problem_id"]] = rec


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys) or "different settings"


def summarize(name: str, params: dict, records: list[dict]) -> dict[str, Any]:
    """One results.json row: averages per problem, accuracy with its 95% interval."""
    n = len(records)
    correct = sum(r["score"] for r in records)
    wall = sum(r["batch_share_s"] for r in records)
    useful = sum(r["useful_tokens"] for r in records)

    def mean(key):
        return sum(r[key] for r in records) / n if n else 0.0

    lo, hi = wilson_interval(correct, n)
    return {
        "strategy": name,
        "params": params,
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci": [lo, hi],
        "nfe": mean("nfe"),
        "rows": mean("rows"),
        "tpf": sum(r["decided"] for r in records) / max(sum(r["nfe"] for r in records), 1),
        "tokens_per_row": useful / max(sum(r["rows"] for r in records), 1),
        "useful_tokens": mean("useful_tokens"),
        "tokens_per_s": useful / wall if wall > 0 else 0.0,
        "latency_s": mean("latency_s"),
        # share of decode time spent in the policy's decisions (controller, forecaster, rules)
        "policy_time_frac": sum(r.get("policy_share_s", 0.0) for r in records) / wall if wall > 0 else 0.0,
        "redundancy": redundancy(records),
    }


def redundancy(records: list[dict]) -> dict[str, Any]:
    """Average redundancy per problem: R_total and its counts, and beside them the policy's own events.

    R_total and its counts (`unmask.decoding.redundancy`) come from each decode's trace, the same
    measure for every strategy. The policy's own event counters (`policy_events`) are reported
    beside it and are no part of it. Records written before the trace-based measure (a resumed
    older run) have no counts: they are left out of the averages, and `n_measured` says how many
    records the averages cover.
    """
    measured = [r["redundancy"] for r in records if isinstance(r.get("redundancy"), dict)]
    m = max(len(measured), 1)
    out: dict[str, Any] = {k: sum(c.get(k, 0.0) for c in measured) / m for k in (*COUNTS, "spatial", "r_total")}
    out["n_measured"] = len(measured)
    n = max(len(records), 1)
    keys = sorted({k for r in records for k in r.get("events", {})})
    out["policy_events"] = {k: sum(r.get("events", {}).get(k, 0.0) for r in records) / n for k in keys}
    return out


def decode_chunk(model, task, policy, chunk: list, *, gen_length: int, block_length: int, seed: int, cache: str) -> list[dict]:
    """Decode and score one chunk of problems with one policy: the records `problems.jsonl` holds.

    The one place a bench decodes; the local loop calls it in this process, each Ray actor in its own.
    The trace is recorded for R_total (`redundancy`, computed here from it; the trace itself is not
    kept); `events` are the policy's own counters, reported beside R_total.
    """
    key = strategy_key(policy.name, policy.params)
    try:
        result = generate(
            model, [task.messages(p) for p in chunk], policy,
            gen_length=gen_length, block_length=block_length, seed=seed, cache=cache, record_trace=True,
        )
    except NonFiniteLogitsError as exc:  # name the problem, not its row in this chunk
        raise NonFiniteLogitsError(exc.details, exc.num_blocks, exc.verifying,
                                   who=f"problem {chunk[exc.row].id} under {key}") from None
    share = result.wall_s / len(chunk)
    policy_share = result.extras.get("policy_s", 0.0) / len(chunk)
    records = []
    for problem, seq in zip(chunk, result.sequences):
        records.append({
            "key": key, "problem_id": problem.id, "score": float(task.score(problem, seq.text)), "nfe": seq.nfe,
            "rows": seq.rows, "decided": seq.decided, "useful_tokens": seq.useful_tokens, "latency_s": seq.latency_s,
            "batch_share_s": share, "policy_share_s": policy_share, "text": seq.text, "events": seq.events,
            "redundancy": redundancy_counts(seq.trace),
        })
    return records


def prepare(cfg: BenchConfig) -> tuple[list, Any, list]:
    """Validate `cfg` and pick the problems: (policies, task, problems), before any model loads."""
    from unmask.tasks import get_task

    cfg.validate()
    policies = [parse_strategy(s) for s in cfg.strategies]  # validate every strategy before any work
    task = get_task(cfg.task)
    problems = task.problems(cfg.split, limit=cfg.limit, seed=cfg.seed)
    if not problems:
        raise UnmaskError(f"task {cfg.task} has no problems in split {cfg.split}")
    return policies, task, problems


def usable(cfg: BenchConfig, reasons: list[str | None]) -> list[int]:
    """Indices of the strategies that can run, given why each cannot (None: it can) on the loaded model."""
    keep = []
    for i, (spec, reason) in enumerate(zip(cfg.strategies, reasons)):
        if reason is None:
            keep.append(i)
        elif cfg.skip_unavailable:
            print(f"skipping {spec}: {reason}")
        else:
            raise UnmaskError(f"strategy {spec} cannot run on this model: {reason}", field="strategy")
    return keep


def weights_fingerprint(model) -> str:
    """A short hash of the network's weights (shapes and the first values of every tensor).

    Two checkpoints with the same name (say, the built-in model before and after retraining) get
    different fingerprints, so a results folder never resumes with answers of other weights.
    """
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, param in model.network.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_header(cfg: BenchConfig, model_name: str, gen_length: int, block_length: int, weights: str) -> dict[str, Any]:
    """What identifies a run's problems.jsonl: a folder only resumes a run with this same header."""
    return {
        "model": model_name, "weights": weights, "task": cfg.task, "split": cfg.split, "limit": cfg.limit,
        "seed": cfg.seed, "gen_length": gen_length, "block_length": block_length, "cache": cfg.cache,
    }


def results_of(cfg: BenchConfig, header: dict, device: str, rows: list[dict]) -> dict[str, Any]:
    """results.json's content (the contract in docs/results.md) from the per-strategy rows."""
    return {
        "model": header["model"], "task": cfg.task, "split": cfg.split, "device": device,
        "limit": cfg.limit, "seed": cfg.seed, "gen_length": header["gen_length"], "block_length": header["block_length"],
        "batch_size": cfg.batch_size, "cache": cfg.cache, "backend": cfg.backend, "rows": rows,
    }


def run_bench(cfg: BenchConfig, progress: bool = True, on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every strategy of `cfg` on the same problems; write and return results.json's content."""
    if cfg.backend == "ray":
        from unmask.bench.ray_backend import run_bench_ray

        return run_bench_ray(cfg, progress=progress, on_row=on_row)
    from unmask.models import load_model

    policies, task, problems = prepare(cfg)
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    cfg = replace(cfg, cache=resolve_cache(cfg.cache, model))  # `auto` as this model resolves it
    policies = [policies[i] for i in usable(cfg, [p.unavailable(model) for p in policies])]
    decode = DecodeConfig(gen_length=cfg.gen_length, block_length=cfg.block_length, cache=cfg.cache).resolved(model.defaults)
    gen_length, block_length = decode.gen_length, decode.block_length
    out = Path(cfg.out)
    header = run_header(cfg, model.name, gen_length, block_length, weights_fingerprint(model))
    log = ProblemLog(out / "problems.jsonl", header)
    rows = []
    for policy in policies:
        key = strategy_key(policy.name, policy.params)
        todo = [p for p in problems if p.id not in log.done.get(key, {})]
        bar = _progress(short_name(policy), len(problems), len(problems) - len(todo), progress)
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            try:
                records = decode_chunk(model, task, policy, chunk, gen_length=gen_length, block_length=block_length,
                                       seed=cfg.seed, cache=cfg.cache)
            except NonFiniteLogitsError as exc:
                held = sum(len(done) for done in log.done.values())
                raise UnmaskError(f"{exc}; the {held} problem results finished before it are kept in {log.path} "
                                  "and the same command resumes from them") from None
            log.add(records)
            _advance(bar, log.done.get(key, {}), len(chunk))
        if bar is not None:
            bar.close()
        row = summarize(policy.name, policy.params, [log.done[key][p.id] for p in problems])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    results = results_of(cfg, header, device_description(model.device), rows)
    write_results(results, out)
    return results


def write_results(results: dict, out: Path) -> None:
    from unmask.bench.report import write_markdown, write_pareto

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    write_pareto(results, out / "pareto.png")


def short_name(policy) -> str:
    """`name` or `name:key=value` with only the parameters that differ from the defaults (progress bars)."""
    from unmask.bench.report import _label

    return _label({"strategy": policy.name, "params": policy.params})


def _progress(desc: str, total: int, initial: int, enabled: bool, position: int | None = None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc[:48], unit="problem", leave=True, dynamic_ncols=True, position=position,
    )


def _advance(bar, done: dict[str, dict], n: int) -> None:
    """Move a strategy's bar by `n` problems and show its running accuracy over every finished one."""
    if bar is None:
        return
    bar.update(n)
    if done:
        bar.set_postfix(acc=f"{sum(r['score'] for r in done.values()) / len(done):.3f}")


__all__ = ["BenchConfig", "run_bench", "summarize", "write_results", "asdict"]

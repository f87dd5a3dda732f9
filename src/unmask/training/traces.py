"""Trace collection for the TSPD controller (`unmask train collect-traces`).

Supervision as in TSPD (arXiv 2605.30753, appendix), which collects its traces with Learn2PD's
Extremely Greedy Parallel (EGP) policy. By default (`--trajectory egp`) every training prompt is
decoded twice, both times greedy and never remasking:

1. the reference: LLaDA's low-confidence order, one token per call, to completion; its output is y*;
2. EGP, which is this project's `oracle` policy: at every call it commits every masked position of
   the current block whose top-1 already equals y*_i (if none does, the one giving y*_i the highest
   probability, forced to y*_i). It reproduces y* exactly in fewer calls.

What is recorded is the trace of the EGP decode (2), not the reference's: every (call, masked
position of the current block) of it is one row, with the features the position has at that call
and the label 1 iff its top-1 at that call equals the token it finally holds (y*_i). Under EGP a
position is committed at the first call its label is 1 (a forced commit has label 0), so its rows
are a run of 0s ending in at most one 1. A position labelled 1 could have been committed at that
call without changing the result; the controller learns to recognise such positions from their
trajectory.

`--trajectory low_confidence` records the reference decode (1) itself instead, labelled the same
way (top-1 at the call == final token): one token per call, so a position stays masked, and keeps
its rows, long after its top-1 has settled (the trajectories this command recorded before EGP).

Departure: both decodes keep the loop's early stop (default on, `--no-early-stop` to decode every
block): blocks after a stop are never decoded by any policy, so their positions are no examples of
what a policy sees.

The file is one compressed npz:
- `features` (n, F) float32: the features of `unmask.decoding.features` (all groups, FEATURE_NAMES order)
- `labels` (n,) uint8
- `prev` (n,) int64: row of the same position at the previous call of its block (-1 at the block's first)
- `sequence`, `step`, `position` (n,) int32: which decode, call and generation index a row is from
- `feature_names` (F,) str, `group_index` (F,) int8 into `group_names` (G,) str
- `meta`: a JSON string (model name and path, task, split, n, `trajectory` (egp or low_confidence),
  the recorded decode's `strategy`, decode settings, counts)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from unmask.decoding.features import FEATURE_GROUPS, FEATURE_NAMES, GROUP_OF, trace_samples
from unmask.errors import UnmaskError

TRACE_FORMAT = "unmask-traces/1"


@dataclass
class TraceData:
    """Labelled rows from one or more trace files (see the module docstring for the columns)."""

    features: np.ndarray
    labels: np.ndarray
    prev: np.ndarray
    sequence: np.ndarray
    step: np.ndarray
    position: np.ndarray
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def empty(cls) -> "TraceData":
        ints = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
        return cls(np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.uint8), *ints)


def samples_from_results(sequences, block_length: int) -> TraceData:
    """Rows of every decoded sequence (each must carry a trace), sequences numbered in order."""
    parts = []
    offset = 0
    for index, seq in enumerate(sequences):
        if seq.trace is None:
            raise ValueError("decode without record_trace=True: no trace to learn from")
        s = trace_samples(seq.trace, block_length)
        prev = np.where(s.prev >= 0, s.prev + offset, -1)
        parts.append((s.features, s.labels, prev, np.full(len(s.labels), index, np.int32), s.step, s.position))
        offset += len(s.labels)
    if not parts:
        return TraceData.empty()
    return TraceData(*(np.concatenate(column) for column in zip(*parts)))


# trajectory -> the strategy whose decode is recorded (both greedy, never remasking)
TRAJECTORIES: dict[str, str] = {
    "egp": "oracle",  # Learn2PD's extremely greedy parallel decode towards the reference's y* (the default)
    "low_confidence": "low_confidence:schedule=llada",  # the reference itself: low-confidence order, one token per call
}


def trajectory_policy(trajectory: str):
    """The policy whose decode `trajectory` records (see TRAJECTORIES)."""
    from unmask.decoding import parse_strategy

    if trajectory not in TRAJECTORIES:
        raise UnmaskError(f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {trajectory!r}", field="trajectory")
    return parse_strategy(TRAJECTORIES[trajectory])


def decode_with_traces(
    model,
    prompts: list,
    trajectory: str = "egp",
    gen_length: int | None = None,
    block_length: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    early_stop: bool = True,
    progress: bool = False,
) -> tuple[list, dict]:
    """Decode `prompts` along `trajectory`, recording traces; return the sequences and the settings used."""
    from unmask.decoding import generate

    policy = trajectory_policy(trajectory)
    if batch_size < 1:
        raise UnmaskError(f"batch size must be >= 1, got {batch_size}", field="batch_size")
    sequences = []
    settings: dict = {}
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        result = generate(
            model, prompts[first : first + batch_size], policy,
            gen_length=gen_length, block_length=block_length, seed=seed, early_stop=early_stop, record_trace=True,
        )
        cfg = result.config
        decode_block = cfg.gen_length if policy.whole_generation else cfg.block_length
        settings = {"trajectory": trajectory, "strategy": policy.describe(), "gen_length": cfg.gen_length,
                    "block_length": decode_block, "seed": seed, "early_stop": early_stop}
        sequences.extend(result.sequences)
        if progress:
            done = min(first + batch_size, len(prompts))
            print(f"collect-traces: {done}/{len(prompts)} prompts, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return sequences, settings


def collect(model, prompts: list, **options) -> tuple[TraceData, dict]:
    """Decode `prompts` as `decode_with_traces(model, prompts, **options)` does (egp trajectories by
    default), and return the labelled rows and the settings used."""
    sequences, settings = decode_with_traces(model, prompts, **options)
    return samples_from_results(sequences, settings.get("block_length", 1)), settings


def save_traces(path, data: TraceData, meta: dict) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    group_names = list(FEATURE_GROUPS)
    meta = {"format": TRACE_FORMAT, **meta, "rows": len(data), "positives": int(data.labels.sum())}
    np.savez_compressed(
        path,
        features=data.features.astype(np.float32),
        labels=data.labels.astype(np.uint8),
        prev=data.prev.astype(np.int64),
        sequence=data.sequence.astype(np.int32),
        step=data.step.astype(np.int32),
        position=data.position.astype(np.int32),
        feature_names=np.array(FEATURE_NAMES),
        group_names=np.array(group_names),
        group_index=np.array([group_names.index(GROUP_OF[n]) for n in FEATURE_NAMES], dtype=np.int8),
        meta=np.array(json.dumps(meta)),
    )
    return path


def load_traces(paths) -> TraceData:
    """Read and concatenate trace files (sequence ids and `prev` rows are renumbered)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    parts, metas = [], []
    rows = sequences = 0
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UnmaskError(f"no trace file at {path}; collect one with `unmask train collect-traces --out {path}`")
        try:
            npz = np.load(path, allow_pickle=False)
            meta = json.loads(str(npz["meta"]))
            names = tuple(str(n) for n in npz["feature_names"])
            arrays = {k: npz[k] for k in ("features", "labels", "prev", "sequence", "step", "position")}
        except (OSError, ValueError, KeyError) as exc:
            raise UnmaskError(f"{path} is not a trace file written by `unmask train collect-traces` ({exc})") from None
        if meta.get("format") != TRACE_FORMAT:
            raise UnmaskError(f"{path} has format {meta.get('format')!r}, expected {TRACE_FORMAT}; collect the traces again")
        if names != FEATURE_NAMES:
            raise UnmaskError(f"{path} was collected with features {list(names)}, this version computes "
                              f"{list(FEATURE_NAMES)}; collect the traces again")
        arrays["prev"] = np.where(arrays["prev"] >= 0, arrays["prev"] + rows, -1)
        arrays["sequence"] = arrays["sequence"] + sequences
        rows += len(arrays["labels"])
        if len(arrays["labels"]):
            sequences = int(arrays["sequence"].max()) + 1
        parts.append(arrays)
        metas.append({**meta, "path": str(path)})
    if not parts:
        raise UnmaskError("no trace files given; pass --traces FILE")
    columns = ("features", "labels", "prev", "sequence", "step", "position")
    data = TraceData(*(np.concatenate([p[k] for p in parts]) for k in columns))
    data.meta = metas
    return data


@dataclass
class CollectConfig:
    """Settings of `unmask train collect-traces`."""

    out: str
    model: str | None = None  # checkpoint folder, hub id, or None for the built-in model
    tasks: tuple[str, ...] = ("arith", "trace")
    split: str = "train"
    n: int = 256  # problems per task
    gen_length: int | None = None  # default: the model's
    block_length: int | None = None
    batch_size: int = 16
    seed: int = 0  # chooses the problems and seeds the decode
    early_stop: bool = True
    trajectory: str = "egp"  # decode recorded: egp (the oracle's, towards the reference's y*) or low_confidence
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.n < 1:
            raise UnmaskError(f"n must be a positive number of problems, got {self.n}", field="n")
        if not self.tasks:
            raise UnmaskError("no task given; pass --task arith,trace", field="task")
        if self.threads is not None and self.threads < 1:
            raise UnmaskError(f"threads must be >= 1, got {self.threads}", field="threads")
        if self.trajectory not in TRAJECTORIES:
            raise UnmaskError(f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {self.trajectory!r}",
                              field="trajectory")


def collect_traces(config: CollectConfig) -> dict:
    """Load the model, decode `n` problems of each task's split with traces, write the npz. Returns a summary."""
    import torch

    from unmask.models import load_model
    from unmask.tasks import get_task

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    tasks = [get_task(name) for name in config.tasks]  # bad task names fail before the model loads
    model = load_model(config.model, device=config.device, dtype=config.dtype)
    prompts = []
    for task in tasks:
        prompts.extend(task.messages(p) for p in task.problems(config.split, limit=config.n, seed=config.seed))
    data, settings = collect(
        model, prompts, trajectory=config.trajectory, gen_length=config.gen_length, block_length=config.block_length,
        batch_size=config.batch_size, seed=config.seed, early_stop=config.early_stop, progress=config.progress,
    )
    meta = {
        "model": model.name,
        "model_path": model.path,
        "task": ",".join(config.tasks),
        "split": config.split,
        "n": config.n,
        "sequences": len(prompts),
        **settings,
        "feature_names": list(FEATURE_NAMES),
        "groups": {g: list(names) for g, names in FEATURE_GROUPS.items()},
        "collect": {k: v for k, v in asdict(config).items() if k not in ("progress",)},
    }
    path = save_traces(config.out, data, meta)
    return {"out": str(path), "rows": len(data), "positives": int(data.labels.sum()), "sequences": len(prompts),
            "model": model.name, "model_path": model.path}

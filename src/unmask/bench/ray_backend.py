"""The Ray backend of `unmask bench`: the local run's chunks, spread over the actors of a Ray cluster.

The work is the local backend's, cut the same way: for each strategy, the problems not yet in
`problems.jsonl`, in chunks of `--batch-size` (a *shard*). One actor per GPU of the cluster (or per
CPU slot where it has none) loads the model once and decodes and scores shards with the same
`decode_chunk` as the local loop, so a shard yields the records the local backend would write.

The driver is the only writer: it appends each finished shard to `problems.jsonl` through the same
`ProblemLog` (keyed by strategy key and problem id, so a row is never counted twice) and builds
`results.json` with the same `summarize`. A worker that dies mid-shard (killed, out of memory, its
node lost) loses only that shard: the driver replaces the actor and hands the shard to the next free
one. An interrupted sweep resumes from `problems.jsonl`, with either backend.

Timings (`latency_s`, `tokens_per_s`) are each actor's own decode seconds, as in a local run on that
actor's device; they do not add up the cluster's throughput.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from unmask.bench.runner import (
    BenchConfig,
    ProblemLog,
    _advance,
    _progress,
    decode_chunk,
    prepare,
    results_of,
    run_header,
    short_name,
    strategy_key,
    summarize,
    usable,
    weights_fingerprint,
    write_results,
)
from unmask.decoding.config import resolve_cache
from unmask.errors import UnmaskError

MAX_SHARD_ATTEMPTS = 3  # a shard that kills this many workers is a bug to report, not bad luck


@dataclass
class Shard:
    """One unit of work: a chunk of problems for one strategy, as the local loop would decode it."""

    index: int  # position in the sweep (strategy-major, as the local loop runs)
    strategy: int  # index into the strategies that run
    problems: list
    attempts: int = 0


class BenchWorker:
    """A Ray actor's state: the model, loaded once, and the task; decodes one shard per call."""

    def __init__(self, cfg: BenchConfig, device: str):
        from unmask.bench.runner import device_description
        from unmask.decoding import DecodeConfig
        from unmask.models import load_model
        from unmask.tasks import get_task

        self.cfg = cfg
        self.policies: dict[str, Any] = {}
        self.error: Exception | None = None
        try:
            self.model = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
            self.task = get_task(cfg.task)
            decode = DecodeConfig(gen_length=cfg.gen_length, block_length=cfg.block_length, cache=cfg.cache)
            self.decode = decode.resolved(self.model.defaults)
            self.device = device_description(self.model.device)
        except Exception as exc:  # kept for info(): a failed load is the user's error to see, not a crash to retry
            self.error = exc

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {
            "model": self.model.name, "weights": weights_fingerprint(self.model),
            "gen_length": self.decode.gen_length, "block_length": self.decode.block_length,
            "cache": resolve_cache(self.cfg.cache, self.model), "device": self.device, "pid": os.getpid(),
            "unavailable": [self._policy(s).unavailable(self.model) for s in self.cfg.strategies],
        }

    def _policy(self, strategy: str):
        from unmask.decoding import parse_strategy

        if strategy not in self.policies:  # one policy object per strategy, reused across chunks as locally
            self.policies[strategy] = parse_strategy(strategy)
        return self.policies[strategy]

    def run_shard(self, strategy: str, problems: list) -> list[dict]:
        return decode_chunk(
            self.model, self.task, self._policy(strategy), problems, gen_length=self.decode.gen_length,
            block_length=self.decode.block_length, seed=self.cfg.seed, cache=self.cfg.cache,
        )


def run_bench_ray(
    cfg: BenchConfig,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """`run_bench` on Ray: same problems, same records, same results.json; one actor per GPU or CPU slot.

    `on_event(kind, info)` sees the scheduling as it happens ("ready", "submitted", "done", "lost",
    "replaced"); `info` holds the slot, the actor handle and its pid, and the shard.
    """
    ray = _import_ray()
    cfg = dataclasses.replace(cfg, backend="ray")
    policies, _, problems = prepare(cfg)  # bad settings fail before Ray starts
    started = _connect(ray, cfg.address)
    pool = None
    try:
        options, slots, device = _actor_plan(ray, cfg)
        most_shards = len(policies) * math.ceil(len(problems) / cfg.batch_size)
        pool = _Pool(ray, cfg, options, device, min(slots, most_shards), on_event)
        info = pool.first_info()
        cfg = dataclasses.replace(cfg, cache=info["cache"])  # `auto` as the model resolves it
        keep = usable(cfg, info["unavailable"])
        specs, policies = [cfg.strategies[i] for i in keep], [policies[i] for i in keep]
        header = run_header(cfg, info["model"], info["gen_length"], info["block_length"], info["weights"])
        out = Path(cfg.out)
        log = ProblemLog(out / "problems.jsonl", header)

        keys = [strategy_key(p.name, p.params) for p in policies]
        shards: list[Shard] = []
        bars = []
        for i, (policy, key) in enumerate(zip(policies, keys)):
            todo = [p for p in problems if p.id not in log.done.get(key, {})]
            bars.append(_progress(short_name(policy), len(problems), len(problems) - len(todo), progress, position=i))
            for start in range(0, len(todo), cfg.batch_size):
                shards.append(Shard(len(shards), i, todo[start : start + cfg.batch_size]))
        remaining = [sum(1 for s in shards if s.strategy == i) for i in range(len(policies))]
        rows: list[dict | None] = [None] * len(policies)

        def finish(i: int) -> None:
            rows[i] = summarize(policies[i].name, policies[i].params, [log.done[keys[i]][p.id] for p in problems])
            if on_row is not None:
                on_row(rows[i])

        def record(shard: Shard, records: list[dict]) -> None:
            key = keys[shard.strategy]
            expected = {p.id for p in shard.problems}
            got = {r["problem_id"] for r in records}
            if got != expected or any(r["key"] != key for r in records):
                raise RuntimeError(f"shard {shard.index} came back with other problems than it was given")
            log.add(records)  # ProblemLog skips any (key, problem) it already holds
            _advance(bars[shard.strategy], log.done[key], len(records))
            remaining[shard.strategy] -= 1
            if remaining[shard.strategy] == 0:
                finish(shard.strategy)

        for i in range(len(policies)):
            if remaining[i] == 0:
                finish(i)
        try:
            pool.run(shards, specs, record)
        finally:
            for bar in bars:
                if bar is not None:
                    bar.close()
        devices = sorted({i["device"] for i in pool.infos.values()})
        results = results_of(cfg, header, f"ray ({pool.size} actors): " + ", ".join(devices), rows)
        results["ray"] = {"actors": pool.size, "lost_shards": pool.lost, "replaced_actors": pool.replaced}
        write_results(results, out)
        return results
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


class _Pool:
    """Actors in slots; shards go to whichever loaded actor is idle; a dead actor is replaced."""

    def __init__(self, ray, cfg: BenchConfig, options: dict, device: str, size: int, on_event):
        self.ray = ray
        self.remote_cls = ray.remote(BenchWorker).options(**options)
        self.cfg, self.device, self.size = cfg, device, size
        self.on_event = on_event or (lambda kind, info: None)
        self.actors: list = [None] * size
        self.infos: dict[int, dict] = {}
        self.idle: deque[int] = deque()
        self.pending: dict = {}  # ref -> (slot, shard or None for the actor's load)
        self.lost = 0
        self.replaced = 0
        self.max_replacements = 2 * size + 2  # beyond this, workers die for a reason no retry will fix
        for slot in range(size):
            self._start(slot)

    def _start(self, slot: int) -> None:
        actor = self.remote_cls.remote(self.cfg, self.device)
        self.actors[slot] = actor
        self.infos.pop(slot, None)
        self.pending[actor.info.remote()] = (slot, None)

    def _event(self, kind: str, slot: int, shard: Shard | None = None, **extra) -> None:
        info = {"slot": slot, "actor": self.actors[slot], "pid": self.infos.get(slot, {}).get("pid"), "shard": shard}
        self.on_event(kind, {**info, **extra})

    def first_info(self) -> dict:
        while not self.infos:
            self._step(None, None, None)
        return next(iter(self.infos.values()))

    def run(self, shards: list[Shard], strategies: list[str], record) -> None:
        queue = deque(shards)
        while queue or any(shard is not None for _, shard in self.pending.values()):
            while queue and self.idle:
                slot, shard = self.idle.popleft(), queue.popleft()
                shard.attempts += 1
                self.pending[self.actors[slot].run_shard.remote(strategies[shard.strategy], shard.problems)] = (slot, shard)
                self._event("submitted", slot, shard)
            self._step(queue, strategies, record)

    def _step(self, queue, strategies, record) -> None:
        """Wait for one actor load or shard to finish and act on it."""
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
        slot, shard = self.pending.pop(ref)
        try:
            value = self.ray.get(ref)
        except (RayActorError, WorkerCrashedError) as exc:
            self._replace(slot, shard, queue, exc)
            return
        except RayTaskError as exc:  # the code raised, the worker lives: the same error would recur anywhere
            if isinstance(exc.cause, UnmaskError):
                raise exc.cause from None
            raise
        if shard is None:
            self.infos[slot] = value
            self._event("ready", slot)
        else:
            record(shard, value)
            self._event("done", slot, shard)
        self.idle.append(slot)

    def _replace(self, slot: int, shard: Shard | None, queue, exc: Exception) -> None:
        self._event("lost", slot, shard, error=type(exc).__name__)
        if shard is not None:
            self.lost += 1
            if shard.attempts >= MAX_SHARD_ATTEMPTS:
                raise UnmaskError(
                    f"shard {shard.index} ({len(shard.problems)} problems) killed its worker {shard.attempts} times "
                    f"(last: {type(exc).__name__}); finished problems are saved, rerun to resume or use --backend local"
                )
            queue.appendleft(shard)  # next free actor takes it first
        if self.replaced >= self.max_replacements:
            raise UnmaskError(
                f"Ray workers died {self.replaced + 1} times (last: {type(exc).__name__}: {exc}); "
                "finished problems are saved, rerun to resume"
            )
        try:  # a slot has one call in flight at a time, so nothing else waits on the dead actor
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass  # already gone
        self.replaced += 1
        self._start(slot)
        self._event("replaced", slot)

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                try:
                    self.ray.kill(actor, no_restart=True)
                except Exception:
                    pass


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UnmaskError("--backend ray needs Ray; install it with `pip install 'unmask[ray]'`", field="backend") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start Ray here; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init()
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UnmaskError(f"could not start or reach {where} ({exc}); check --address", field="address") from None
    return address is None


def _actor_plan(ray, cfg: BenchConfig) -> tuple[dict, int, str]:
    """Actor resources, how many actors the cluster holds, and the device each loads the model on."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    wants_cpu = cfg.device is not None and not cfg.device.startswith("cuda")
    if gpus and not wants_cpu:
        # Ray hides every GPU but the actor's own, so "cuda" is that GPU whatever its index on the node.
        return {"num_gpus": 1}, gpus, "cuda"
    if cfg.device is not None and cfg.device.startswith("cuda"):
        raise UnmaskError(f"--device {cfg.device} asks for a GPU but the Ray cluster has none", field="device")
    return {"num_cpus": 1}, max(int(resources.get("CPU", 1)), 1), cfg.device or "cpu"

"""The engine: requests in, text out, with the decode loop on its own thread.

The engine knows nothing about HTTP and the server knows nothing about policies (vLLM v1's split):
the server hands over a `GenerationRequest` (prompt, strategy string and params, lengths, seed,
answer limits) and gets `Event`s back through a callback. Here a request is validated (the policy
is built by the registry, the lengths by `DecodeConfig`, the prompt checked against the model's
context), queued in a bounded queue, and decoded by one worker thread with the one loop
(`unmask.decoding.generate`).

Batching decisions live in one place, `take_batch`: the worker takes the oldest waiting request and
every other waiting request that can share its `generate` call (same strategy, params, gen/block
length, seed and cache mode), up to `max_batch_size`. A batch runs to completion; requests that
arrive meanwhile wait for the next one (no per-step continuous batching). A decode that raises fails
every request of its batch with an "error" event (status 500 for NaN logits or a bug, with the
error's text; 400 for an `UnmaskError`) and the worker goes on with the next batch; jobs still
queued when the engine stops get a 503.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from unmask.errors import NonFiniteLogitsError, UnmaskError
from unmask.serve.answer import AnswerTracker

log = logging.getLogger("unmask.serve")


class QueueFull(Exception):
    """The engine's queue holds `max_queue` waiting requests; the caller should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down (or its worker is gone) and takes no more requests."""


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # requests decoded together in one generate call
    max_queue: int = 256  # requests waiting (not yet decoding); past it, submit raises QueueFull
    strategy: str = "low_confidence"  # used when a request names none
    cache: str = "none"


@dataclass
class GenerationRequest:
    """One prompt to decode, as the server parsed it. Field names are the API's, for error messages."""

    prompt: str | list[dict] | list[int]
    chat: bool = True
    prompt_field: str = "prompt"  # where the prompt came from ("prompt" or "messages")
    strategy: str | None = None  # NAME or NAME:key=value,...; None: the engine's default
    strategy_params: dict[str, Any] | None = None  # merged over the string's params
    gen_length: int | None = None  # the canvas; None: the model's default
    block_length: int | None = None
    seed: int = 0
    max_tokens: int | None = None  # limit on the answer, not the canvas
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to be decoded in one `generate` call."""

    strategy: str
    params: str  # the resolved parameters as canonical JSON
    gen_length: int
    block_length: int
    seed: int
    cache: str


@dataclass
class Event:
    """What the engine tells the server about one job.

    kind: "delta" (new answer text), "done" (final text, finish reason, usage and stats),
    "error" (status, message, param) or "cancelled".
    """

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stats: dict[str, Any] | None = None
    status: int = 200
    message: str = ""
    param: str | None = None


@dataclass
class Job:
    """A validated request waiting for, or in, a decode."""

    prompt_ids: list[int]
    key: BatchKey
    strategy: str
    params: dict[str, Any]
    tracker: AnswerTracker
    index: int = 0  # the choice index the server gave it
    sink: Callable[[Event], None] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = 0.0
    id: int = 0

    def cancel(self) -> None:
        """The client went away: drop the job from the queue, or its sequence from the running decode."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


def take_batch(queue: deque, max_batch_size: int, dropped: list | None = None) -> list[Job]:
    """The one batching decision: the oldest live job and the waiting jobs that can share its decode.

    Removes the chosen jobs (and any cancelled ones met on the way, appended to `dropped`) from
    `queue`; the others keep their order.
    """
    batch: list[Job] = []
    kept: deque = deque()
    while queue:
        job = queue.popleft()
        if job.cancelled:
            if dropped is not None:
                dropped.append(job)
            continue
        if not batch or (job.key == batch[0].key and len(batch) < max_batch_size):
            batch.append(job)
        else:
            kept.append(job)
    queue.extend(kept)
    return batch


class Engine:
    """Owns the model, the queue and the worker thread that runs the decode loop.

    `prepare` validates a request and returns a `Job` (raising `UnmaskError` that names the field);
    `submit` queues jobs (raising `QueueFull` past `max_queue`); events reach each job's sink from
    the worker thread, so a sink must be thread-safe and quick.
    """

    def __init__(self, model, config: EngineConfig | None = None):
        from unmask.decoding.registry import parse_strategy

        self.model = model
        self.config = config or EngineConfig()
        if self.config.max_batch_size < 1 or self.config.max_queue < 0:
            raise UnmaskError("max_batch_size must be >= 1 and max_queue >= 0")
        parse_strategy(self.config.strategy)  # a bad default strategy fails at start, not per request
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        # one tokenizer serves the request threads (encode) and the decode thread (decode); Rust
        # tokenizers may refuse concurrent use ("Already borrowed"), so calls take turns
        self._tokenizer_lock = threading.Lock()
        self.running = 0  # jobs in the current decode
        self.stats = {"submitted": 0, "rejected": 0, "completed": 0, "cancelled": 0, "failed": 0,
                      "batches": 0, "batched_jobs": 0, "max_batch": 0}

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name="unmask-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def health(self) -> dict[str, Any]:
        batches = self.stats["batches"]
        return {"alive": self.alive, "waiting": self.waiting, "running": self.running,
                "max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue,
                "mean_batch": round(self.stats["batched_jobs"] / batches, 3) if batches else 0.0, **self.stats}

    # --- requests --------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Job:
        """Validate `request` (policy, lengths, prompt) and turn it into a job. Raises UnmaskError."""
        from unmask.decoding.config import DecodeConfig

        model = self.model
        policy = self._policy(request)
        config = DecodeConfig(gen_length=request.gen_length, block_length=request.block_length,
                              seed=request.seed, cache=self.config.cache).resolved(model.defaults)
        if policy.whole_generation:  # the policy ignores blocks: one batch key for any block length
            config.block_length = config.gen_length
        prompt_ids = self._prompt_ids(request)
        room = model.max_length - len(prompt_ids)
        if room <= 0:
            raise UnmaskError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context is {model.max_length}; shorten it",
                field=request.prompt_field,
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise UnmaskError(
                f"max_tokens {request.max_tokens} is more than this model can generate after a {len(prompt_ids)}-token "
                f"prompt (at most {room}); lower max_tokens",
                field="max_tokens",
            )
        if config.gen_length > room:
            field_ = "gen_length" if request.gen_length is not None else request.prompt_field
            raise UnmaskError(
                f"the prompt ({len(prompt_ids)} tokens) plus gen_length {config.gen_length} exceeds the model's "
                f"context of {model.max_length}; shorten the prompt or lower gen_length",
                field=field_,
            )
        params = policy.params
        key = BatchKey(policy.name, json.dumps(params, sort_keys=True, default=str), config.gen_length,
                       config.block_length, config.seed, config.cache)
        tracker = AnswerTracker(self._decode_text, model.stop_ids, request.max_tokens, request.stop)
        return Job(prompt_ids=prompt_ids, key=key, strategy=policy.name, params=params, tracker=tracker)

    def submit(self, jobs: Sequence[Job], sink: Callable[[Event], None]) -> None:
        """Queue `jobs` (all or none). Raises QueueFull when they do not fit."""
        with self._cond:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise EngineStopped("the server is shutting down; retry later")  # before start(), jobs wait
            if len(self._queue) + len(jobs) > self.config.max_queue:
                self.stats["rejected"] += len(jobs)
                if len(jobs) > self.config.max_queue:
                    raise QueueFull(f"this request holds {len(jobs)} prompts but the server queues at most "
                                    f"{self.config.max_queue}; send fewer prompts per request")
                raise QueueFull(
                    f"the server is busy: {len(self._queue)} requests are waiting (limit {self.config.max_queue}); "
                    "retry later"
                )
            now = time.perf_counter()
            for job in jobs:
                job.sink, job.submitted_at, job.id = sink, now, next(self._ids)
                self._queue.append(job)
            self.stats["submitted"] += len(jobs)
            self._cond.notify()

    def _policy(self, request: GenerationRequest):
        from unmask.decoding.registry import build_policy, parse_strategy

        spec = request.strategy if request.strategy is not None else self.config.strategy
        extra = request.strategy_params or {}
        try:
            policy = parse_strategy(spec)
        except UnmaskError as exc:
            raise UnmaskError(exc.message, field="strategy") from None
        if not extra:
            return policy
        try:
            return build_policy(policy.name, {**policy.params, **extra})
        except UnmaskError as exc:
            where = f"strategy_params.{exc.field}" if exc.field in extra else "strategy_params"
            raise UnmaskError(exc.message, field=where) from None
        except (TypeError, ValueError) as exc:  # a policy's own checks on an odd value
            raise UnmaskError(f"strategy {policy.name}: invalid parameters ({exc})", field="strategy_params") from None

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        prompt, where = request.prompt, request.prompt_field
        tokenizer = self.model.tokenizer
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise UnmaskError(
                    f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", field=where
                )
            return list(prompt)
        if isinstance(prompt, list) and not prompt:
            raise UnmaskError(f"{where} is empty; give at least one message", field=where)
        try:
            with self._tokenizer_lock:
                ids = tokenizer.prompt_ids(prompt, chat=request.chat)
        except UnmaskError as exc:
            raise UnmaskError(exc.message, field=where) from None
        except Exception as exc:  # a chat template that rejects the messages (roles, order)
            raise UnmaskError(f"the chat template rejected the {where}: {exc}", field=where) from None
        if not ids:
            raise UnmaskError(f"{where} is empty after tokenisation; give some text", field=where)
        return ids

    def _decode_text(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.model.tokenizer.decode(ids)

    # --- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    leftover = list(self._queue)
                    self._queue.clear()
                    break
                dropped: list[Job] = []
                batch = take_batch(self._queue, self.config.max_batch_size, dropped)
                self.running = len(batch)
                self.stats["cancelled"] += len(dropped)  # their clients left while they waited
            for job in dropped:
                self._emit(job, Event("cancelled"))
            if batch:
                self._decode(batch)
            self.running = 0
        for job in leftover:
            self._emit(job, Event("error", status=503, message="the server is shutting down; retry later"))

    def _decode(self, batch: list[Job]) -> None:
        from unmask.decoding.loop import generate
        from unmask.decoding.registry import build_policy

        key = batch[0].key
        self.stats["batches"] += 1
        self.stats["batched_jobs"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        started = time.perf_counter()

        def on_block(row: int, block_index: int, tokens: list[int]) -> None:
            job = batch[row]
            delta = job.tracker.update(tokens)
            if delta:
                self._emit(job, Event("delta", text=delta))

        def cancelled(row: int) -> bool:
            # a client that left, or an answer that can no longer change: the row leaves the batch
            return batch[row].cancelled or batch[row].tracker.done

        try:
            policy = build_policy(key.strategy, batch[0].params)
            result = generate(
                self.model, [job.prompt_ids for job in batch], policy, chat=False,
                gen_length=key.gen_length, block_length=key.block_length, seed=key.seed, cache=key.cache,
                on_block=on_block, cancelled=cancelled,
            )
        except NonFiniteLogitsError as exc:  # the model is at fault, not the request: a 500
            log.error("decode stopped: %s", exc)
            # the affected jobs first: a request holding several prompts reports its own fault
            for row in sorted(range(len(batch)), key=lambda r: r not in exc.details):
                job = batch[row]
                self.stats["failed"] += 1
                if row in exc.details:
                    message = exc.describe("this request" if job.index == 0 else f"prompt {job.index} of this request",
                                           row=row)
                else:
                    message = ("this request's decode was stopped because another prompt in its batch failed; "
                               f"retry it ({exc.describe('that prompt')})")
                self._emit(job, Event("error", status=500, message=message))
            return
        except UnmaskError as exc:
            for job in batch:
                self.stats["failed"] += 1
                self._emit(job, Event("error", status=400, message=exc.message, param=exc.field))
            return
        except Exception as exc:  # a bug must fail its requests, never the worker
            log.exception("decode failed")
            detail = " ".join(str(exc).split())[:300]
            message = f"internal error during decoding: {type(exc).__name__}" + (f": {detail}" if detail else "")
            for job in batch:
                self.stats["failed"] += 1
                self._emit(job, Event("error", status=500, message=message))
            return
        for job, seq in zip(batch, result.sequences):
            if job.cancelled:
                self.stats["cancelled"] += 1
                self._emit(job, Event("cancelled"))
                continue
            delta = job.tracker.finish(seq.tokens)
            if delta:
                self._emit(job, Event("delta", text=delta))
            tracker = job.tracker
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(tracker.answer_ids),
                     "total_tokens": len(job.prompt_ids) + len(tracker.answer_ids)}
            stats = {
                "nfe": seq.nfe, "tpf": round(seq.tpf, 4), "strategy": job.strategy, "params": job.params,
                "seconds": round(seq.latency_s, 6), "queue_seconds": round(started - job.submitted_at, 6),
                "gen_length": key.gen_length, "block_length": key.block_length, "seed": key.seed,
                "batch_size": len(batch),
            }
            self.stats["completed"] += 1
            self._emit(job, Event("done", text=tracker.text, finish_reason=tracker.finish_reason, usage=usage, stats=stats))

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        event.index = job.index
        try:
            if job.sink is not None:
                job.sink(event)
        except Exception:  # the server side is gone (its loop closed); nothing to tell
            log.debug("dropped an event for job %s", job.id, exc_info=True)

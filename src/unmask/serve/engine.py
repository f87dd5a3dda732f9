"""The engine: requests in, text out, with the decode loop on its own thread.

The engine knows nothing about HTTP and the server knows nothing about policies (vLLM v1's split):
the server hands over a `GenerationRequest` (prompt, strategy string and params, lengths, seed,
answer limits) and gets `Event`s back through a callback. Here a request is validated (the policy
is built by the registry, the lengths by `DecodeConfig`, the prompt checked against the model's
context), queued in a bounded queue, and decoded by one worker thread with the one loop
(`unmask.decoding.generate`).

Batching decisions live in two places. `take_batch` starts a decode: the oldest waiting request and
every other waiting request that can share it, up to `max_batch_size`. With `batching="continuous"`
(the default) requests share a decode when they agree on strategy, params, block length and
cache mode, whatever their seeds, sampling temperatures, generation lengths, `max_tokens` and `stop`; `take_joiners` then lets waiting
requests join the running decode before each model call, as soon as a slot is free (a finished
sequence leaves the batch at once, its slot is freed and its answer is sent), so a request waits at
most one model call for a slot rather than a whole batch, and a decode runs for as long as requests
keep coming: its memory follows the sequences live in it, never how many it has served. Prompts are
left padded to the longest live one and generations right padded to the longest live one (a shorter
sequence never attends to, commits or reports its padding, and leaves after its own last block);
nothing joins past a waiting request of another kind, or one whose prompt and generation would
widen the canvas past the model's context (first come, first served: the decode drains and that
request starts the next). Each sequence has its own generator, counters and policy state, so a
request decodes to the same tokens whatever joins or leaves around it. A policy that prepares per
batch (the oracle) and `batching="static"` decode each batch to completion, requests arriving
meanwhile waiting for the next one (seeds and temperatures must agree too; generation lengths may
differ).

Failures answer the requests they touch and nothing else; the worker never dies. A decode that
raises fails every unfinished request of its batch with an "error" event (status 500 for NaN logits
or a bug, with the error's text; 400 for an `UnmaskError`) and the worker goes on with the next
batch. A failure while building or sending one request's answer (its text, its streamed deltas, its
final event) gives that request a 500 naming the cause and takes its sequence out of the decode;
the others decode on. Jobs still queued when the engine stops get a 503.
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


BATCHING = ("continuous", "static")
# `unmask serve --max-batch-size`: sequences decoding at once. 32 rather than 8: at 32 concurrent
# clients on the 2-core CPU a batch of 32 gave more completion tokens/s than a batch of 8, with and
# without the KV cache (docs/serving.md, "Load benchmark"); on a GPU rows in one call are nearly free. Lower
# it where memory is short.
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass
class EngineConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # sequences decoded together (active at once, in continuous batching)
    max_queue: int = 256  # requests waiting (not yet decoding); past it, submit raises QueueFull
    strategy: str = "auto"  # used when a request names none; "auto": see `serving_default`
    cache: str = "auto"  # "auto": the exact cache of a block-diffusion model, none for a bidirectional one
    batching: str = "continuous"  # "continuous": requests join a running decode; "static": whole batches


@dataclass
class GenerationRequest:
    """One prompt to decode, as the server parsed it. Field names are the API's, for error messages."""

    prompt: str | list[dict] | list[int]
    chat: bool = True
    prompt_field: str = "prompt"  # where the prompt came from ("prompt" or "messages")
    strategy: str | None = None  # NAME or NAME:key=value,...; None: the engine's default
    strategy_params: dict[str, Any] | None = None  # merged over the string's params
    gen_length: int | None = None  # the generation's length; None: the model's default
    block_length: int | None = None
    seed: int = 0
    max_tokens: int | None = None  # limit on the answer, not the canvas
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class BatchKey:
    """A request's decode settings; `shared()` and `static()` say what requests of one decode must agree on."""

    strategy: str
    params: str  # the resolved parameters as canonical JSON
    gen_length: int  # the request's own (a decode's canvas is its longest)
    block_length: int  # a whole-generation policy's is its gen_length, and is not shared
    seed: int
    cache: str
    whole_generation: bool = False  # the policy ignores blocks (one_shot)

    def shared(self) -> tuple:
        """What a continuous decode's sequences must agree on: everything but the seed, the sampling
        temperature (each sequence samples with its own) and the gen_length (each sequence decodes
        its own length in the decode's canvas). A whole-generation policy's block is each sequence's
        whole generation, so its block length is not shared either."""
        params = {k: v for k, v in json.loads(self.params).items() if k != "temperature"}
        block = None if self.whole_generation else self.block_length
        return (self.strategy, json.dumps(params, sort_keys=True), block, self.cache)

    def static(self) -> tuple:
        """What a static batch's sequences must agree on: everything but the gen_length."""
        block = None if self.whole_generation else self.block_length
        return (self.strategy, self.params, block, self.seed, self.cache)


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
    continuous: bool = False  # it may share a decode with other seeds and join a running one
    answered: bool = False  # its last event (done, error, cancelled) was sent
    # (prompt positions, generation positions) it takes in a canvas; None: (its prompt, its gen_length).
    # A block-diffusion model's prompt tail past its last whole block moves into the generation
    # region, which grows to whole blocks.
    region: tuple[int, int] | None = None

    @property
    def canvas_region(self) -> tuple[int, int]:
        return self.region if self.region is not None else (len(self.prompt_ids), self.key.gen_length)

    def cancel(self) -> None:
        """The client went away: drop the job from the queue, or its sequence from the running decode."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


def _take(queue: deque, accept: Callable[[Job, list[Job]], bool], dropped: list | None) -> list[Job]:
    """Remove from `queue`, oldest first, the live jobs `accept(job, chosen so far)` takes, and the
    cancelled ones met on the way (appended to `dropped`); the others keep their order."""
    chosen: list[Job] = []
    kept: deque = deque()
    while queue:
        job = queue.popleft()
        if job.cancelled:
            if dropped is not None:
                dropped.append(job)
        elif accept(job, chosen):
            chosen.append(job)
        else:
            kept.append(job)
    queue.extend(kept)
    return chosen


def canvas_fits(jobs: Sequence[Job], context: int | None) -> bool:
    """Whether one decode's canvas can hold `jobs`: prompt regions left padded to the longest,
    generation regions right padded to the longest, within `context` positions (None: no limit)."""
    if context is None:
        return True
    regions = [j.canvas_region for j in jobs]
    return max(p for p, _ in regions) + max(g for _, g in regions) <= context


def take_batch(queue: deque, max_batch_size: int, dropped: list | None = None, context: int | None = None) -> list[Job]:
    """The one batching decision: the oldest live job and the waiting jobs that can share its decode.

    `context`: the model's context, which the decode's canvas must fit in. Removes the chosen jobs
    (and any cancelled ones met on the way, appended to `dropped`) from `queue`; the others keep
    their order.
    """
    def accept(job: Job, batch: list[Job]) -> bool:
        if not batch:
            return True
        if batch[0].continuous:
            fits = job.continuous and job.key.shared() == batch[0].key.shared()
        else:
            fits = not job.continuous and job.key.static() == batch[0].key.static()
        return fits and len(batch) < max_batch_size and canvas_fits(batch + [job], context)

    return _take(queue, accept, dropped)


# `unmask serve`'s default: the fastest policy within 1 point of low_confidence on the built-in
# model's test splits, measured on this project's 2-core CPU (docs/serving.md, "A fast default"): TSPD with
# CE and the controller that also reads the stability features (a departure from the paper's
# feature set that makes fewer calls there). It needs that controller beside the model; a model
# without one gets Fast-dLLM's threshold
FAST_DEFAULT = "tspd:ce=true,stability=true"
FALLBACK_DEFAULT = "threshold"


def serving_default(model) -> str:
    """The strategy "auto" stands for on `model`: the checkpoint's own measured choice where it names
    one and can run it (`unmask_defaults.serve_strategy`: `builtin:block`'s is threshold), else FAST_DEFAULT
    if it can run there, else the model family's own decoder where it has one (LLaDA2.x, SDAR,
    Fast-dLLM v2), else FALLBACK_DEFAULT."""
    from unmask.decoding.registry import parse_strategy

    own_choice = getattr(getattr(model, "defaults", None), "serve_strategy", None)
    if own_choice and parse_strategy(own_choice).unavailable(model) is None:
        return own_choice
    if parse_strategy(FAST_DEFAULT).unavailable(model) is None:
        return FAST_DEFAULT
    own = getattr(model, "default_strategy", "low_confidence")
    return own if own != "low_confidence" else FALLBACK_DEFAULT


def _temperature(job: Job) -> float:
    return float(job.params.get("temperature", 0.0) or 0.0)


def take_joiners(queue: deque, first: Job, slots: int, dropped: list | None = None,
                 running: Sequence[Job] = (), context: int | None = None) -> list[Job]:
    """Waiting jobs that can join `first`'s running continuous decode now, oldest first, at most `slots`.

    A joiner agrees with `first` on everything but the seed, the temperature and the gen_length (a
    longer prompt widens the decode's prompt region, a longer generation its generation region),
    and waits ahead of every job of another kind: once one of those is waiting, nothing more joins,
    the decode drains and that job starts the next one (so a request of another kind waits at most
    one decode). A job that would widen the canvas of the decode (its `running` jobs and the joiners)
    past `context` positions counts as one of another kind. Removes them (and cancelled jobs met on
    the way, appended to `dropped`).
    """
    blocked = []  # first-come first-served: nothing joins past a waiting job of another kind

    def accept(job: Job, joiners: list[Job]) -> bool:
        fits = job.continuous and job.key.shared() == first.key.shared()
        fits = fits and canvas_fits([first, *running, *joiners, job], context)
        if not fits:
            blocked.append(job)
        return not blocked and fits and len(joiners) < slots

    return _take(queue, accept, dropped)


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
        if self.config.batching not in BATCHING:
            raise UnmaskError(f"batching must be one of {', '.join(BATCHING)}, got {self.config.batching!r}",
                              field="batching")
        if self.config.strategy == "auto":
            self.config.strategy = serving_default(model)
        from unmask.decoding.config import CACHE_CHOICES, resolve_cache

        if self.config.cache not in CACHE_CHOICES:
            raise UnmaskError(f"cache must be one of {', '.join(CACHE_CHOICES)}, got {self.config.cache!r}", field="cache")
        self.config.cache = resolve_cache(self.config.cache, model)
        parse_strategy(self.config.strategy)  # a bad default strategy fails at start, not per request
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self._in_flight: list[Job] = []  # jobs of the running decode (answered or not), for the worker's guard
        # one tokenizer serves the request threads (encode) and the decode thread (decode); Rust
        # tokenizers may refuse concurrent use ("Already borrowed"), so calls take turns
        self._tokenizer_lock = threading.Lock()
        self.running = 0  # jobs in the current decode
        # batches: decodes started; batched_jobs: jobs they took in (joiners included); steps: model
        # calls of every decode (one per step); step_rows: sequences in them, so mean_batch is the
        # mean number of sequences per model call
        self.stats = {"submitted": 0, "rejected": 0, "completed": 0, "cancelled": 0, "failed": 0,
                      "batches": 0, "batched_jobs": 0, "max_batch": 0, "steps": 0, "step_rows": 0}

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
        steps = self.stats["steps"]
        return {"alive": self.alive, "waiting": self.waiting, "running": self.running,
                "batching": self.config.batching, "default_strategy": self.config.strategy,
                "max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue,
                "mean_batch": round(self.stats["step_rows"] / steps, 3) if steps else 0.0, **self.stats}

    # --- requests --------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Job:
        """Validate `request` (policy, lengths, prompt) and turn it into a job. Raises UnmaskError."""
        from unmask.decoding.config import DecodeConfig
        from unmask.decoding.rows import attention_block, region_config, region_split

        model = self.model
        policy = self._policy(request)
        # a policy without blocks decodes its whole generation as one (one batch key for any block length)
        config = DecodeConfig(gen_length=request.gen_length, block_length=request.block_length,
                              seed=request.seed, cache=self.config.cache).resolved(model.defaults,
                                                                                    policy.whole_generation)
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
        field_ = "gen_length" if request.gen_length is not None else request.prompt_field
        if config.gen_length > room:
            raise UnmaskError(
                f"the prompt ({len(prompt_ids)} tokens) plus gen_length {config.gen_length} exceeds the model's "
                f"context of {model.max_length}; shorten the prompt or lower gen_length",
                field=field_,
            )
        attn_block = attention_block(model, policy.whole_generation, config.block_length)
        head, width = region_split(len(prompt_ids), config.gen_length, attn_block)
        if head + width > model.max_length:  # a block-diffusion canvas holds whole blocks
            raise UnmaskError(
                f"the prompt ({len(prompt_ids)} tokens) plus gen_length {config.gen_length} takes {head + width} "
                f"positions in whole blocks of {attn_block}, more than the model's context of {model.max_length}; "
                "shorten the prompt or lower gen_length", field=field_)
        # a step count that cannot split over this request's blocks fails here, never in a shared decode
        policy.check_lengths(model, region_config(config, width, policy.whole_generation))
        params = policy.params
        key = BatchKey(policy.name, json.dumps(params, sort_keys=True, default=str), config.gen_length,
                       config.block_length, config.seed, config.cache, policy.whole_generation)
        tracker = AnswerTracker(self._decode_text, model.stop_ids, request.max_tokens, request.stop)
        continuous = self.config.batching == "continuous" and policy.continuous
        return Job(prompt_ids=prompt_ids, key=key, strategy=policy.name, params=params, tracker=tracker,
                   continuous=continuous, region=(head, width))

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
                batch = take_batch(self._queue, self.config.max_batch_size, dropped, self.model.max_length)
                self.running = len(batch)
                self.stats["cancelled"] += len(dropped)  # their clients left while they waited
            self._in_flight = list(batch)
            try:
                for job in dropped:
                    self._emit(job, Event("cancelled"))
                if batch:
                    self._decode(batch)
            except Exception as exc:  # a bug outside every guard below: its requests get a 500, the worker goes on
                log.exception("the engine's worker hit an unexpected error; it goes on")
                unanswered = [job for job in self._in_flight if not job.answered]
                self._fail(unanswered, exc)
            self._in_flight = []
            self.running = 0
        for job in leftover:
            self._emit(job, Event("error", status=503, message="the server is shutting down; retry later"))

    def _decode(self, first: list[Job]) -> None:
        """One decode of `first`. Continuous jobs: waiting jobs join before each model call and each
        answer is sent as soon as its sequence leaves; static: the batch runs to completion and the
        answers are sent together at the end. Jobs are held by sequence only while they decode."""
        from unmask.decoding.config import DecodeConfig
        from unmask.decoding.loop import Decoder
        from unmask.decoding.registry import build_policy

        key = first[0].key
        cfg = self.config
        continuous = first[0].continuous
        live: dict[int, tuple[Job, float]] = {}  # sequence -> (job, when it joined)
        taken = [0]

        def enter(jobs: list[Job]) -> None:
            now = time.perf_counter()
            for job in jobs:
                live[taken[0]] = (job, now)
                taken[0] += 1
            held = {id(job) for job in self._in_flight}
            self._in_flight = [job for job in self._in_flight if not job.answered] + [
                job for job in jobs if id(job) not in held]
            self.running = len(live)

        enter(first)
        finished: list[tuple[int, Any]] = []  # static: (sequence, result), answered when the batch ends
        self.stats["batches"] += 1
        self._count_batch(len(first))

        def admit(width: int, rows: int) -> list[tuple[list[int], int, float, int]]:
            slots = cfg.max_batch_size - len(live)
            if slots <= 0:
                return []
            dropped: list[Job] = []
            with self._cond:
                if self._stopping:
                    return []
                running = [job for job, _ in live.values()]
                joiners = take_joiners(self._queue, first[0], slots, dropped, running, self.model.max_length)
                self.stats["cancelled"] += len(dropped)
            for job in dropped:
                self._emit(job, Event("cancelled"))
            enter(joiners)
            self._count_batch(len(live), joined=len(joiners))
            return [(job.prompt_ids, job.key.seed, _temperature(job), job.key.gen_length) for job in joiners]

        def on_block(seq: int, block_index: int, tokens: list[int]) -> None:
            job = live[seq][0]
            delta = job.tracker.update(tokens)
            if delta:
                self._emit(job, Event("delta", text=delta))

        def cancelled(seq: int) -> bool:
            # a client that left, or an answer that can no longer change: the row leaves the batch
            job = live[seq][0]
            return job.cancelled or job.tracker.done

        def on_finish(seq: int, result) -> None:
            if not continuous:
                finished.append((seq, result))
                return
            job, joined = live[seq]
            self._complete(job, result, joined, len(live))
            del live[seq]  # answered: the job is no longer held
            self.running = len(live)

        def on_error(seq: int, exc: Exception) -> None:
            job, _ = live.pop(seq)
            self.running = len(live)
            self._fail_one(job, exc)

        def progress(step: int) -> None:
            self.stats["steps"] += 1
            self.stats["step_rows"] += decoder.step_rows

        try:
            policy = build_policy(key.strategy, first[0].params)
            lengths = [job.key.gen_length for job in first]
            canvas = max(lengths)  # a joiner with a longer generation widens it
            config = DecodeConfig(gen_length=canvas, block_length=canvas if key.whole_generation else key.block_length,
                                  cache=key.cache, seed=key.seed).resolved(self.model.defaults)
            policy.prepare(self.model, [job.prompt_ids for job in first], config, gen_lengths=lengths)
            decoder = Decoder(self.model, policy, config, on_block=on_block, cancelled=cancelled, progress=progress)
            decoder.run(
                [job.prompt_ids for job in first], seeds=[job.key.seed for job in first],
                temperatures=[_temperature(job) for job in first], admit=admit if continuous else None,
                on_finish=on_finish, gen_lengths=lengths, on_error=on_error, keep_results=False)
        except Exception as exc:
            answered = {seq for seq, _ in finished}
            unfinished = sorted(seq for seq in live if seq not in answered)
            self._fail([live[seq][0] for seq in unfinished], exc, rows=unfinished)
            if continuous:
                return
        for seq, result in sorted(finished):
            job, joined = live[seq]
            self._complete_guarded(job, result, joined, len(first))

    def _count_batch(self, size: int, joined: int | None = None) -> None:
        self.stats["batched_jobs"] += size if joined is None else joined
        self.stats["max_batch"] = max(self.stats["max_batch"], size)

    def _fail(self, batch: list[Job], exc: Exception, rows: list[int] | None = None) -> None:
        """Fail the unfinished jobs of a decode that raised (`rows`: their rows in the decode)."""
        rows = list(range(len(batch))) if rows is None else rows
        if isinstance(exc, NonFiniteLogitsError):  # the model is at fault, not the request: a 500
            log.error("decode stopped: %s", exc)
            # the affected jobs first: a request holding several prompts reports its own fault
            for row, job in sorted(zip(rows, batch), key=lambda pair: pair[0] not in exc.details):
                self.stats["failed"] += 1
                if row in exc.details:
                    message = exc.describe("this request" if job.index == 0 else f"prompt {job.index} of this request",
                                           row=row)
                else:
                    message = ("this request's decode was stopped because another prompt in its batch failed; "
                               f"retry it ({exc.describe('that prompt')})")
                self._emit(job, Event("error", status=500, message=message))
        elif isinstance(exc, UnmaskError):
            for job in batch:
                self.stats["failed"] += 1
                self._emit(job, Event("error", status=400, message=exc.message, param=exc.field))
        else:  # a bug must fail its requests, never the worker
            log.error("decode failed", exc_info=exc)
            detail = " ".join(str(exc).split())[:300]
            message = f"internal error during decoding: {type(exc).__name__}" + (f": {detail}" if detail else "")
            for job in batch:
                self.stats["failed"] += 1
                self._emit(job, Event("error", status=500, message=message))

    def _fail_one(self, job: Job, exc: Exception) -> None:
        """A failure while building or sending `job`'s answer: that request alone gets a 500."""
        log.error("answering job %s failed", job.id, exc_info=exc)
        detail = " ".join(str(exc).split())[:300]
        self.stats["failed"] += 1
        self._emit(job, Event("error", status=500, message=f"internal error while building this request's answer: "
                                                           f"{type(exc).__name__}" + (f": {detail}" if detail else "")))

    def _complete_guarded(self, job: Job, seq, started: float, batch_size: int) -> None:
        try:
            self._complete(job, seq, started, batch_size)
        except Exception as exc:  # one answer's failure must not lose the others
            self._fail_one(job, exc)

    def _complete(self, job: Job, seq, started: float, batch_size: int) -> None:
        """Send a finished sequence's answer (or its cancellation) to its job."""
        key = job.key
        if job.cancelled:
            self.stats["cancelled"] += 1
            self._emit(job, Event("cancelled"))
            return
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
            "batch_size": batch_size,
        }
        self.stats["completed"] += 1
        self._emit(job, Event("done", text=tracker.text, finish_reason=tracker.finish_reason, usage=usage, stats=stats))

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        event.index = job.index
        if event.kind in ("done", "error", "cancelled"):
            job.answered = True
        try:
            if job.sink is not None:
                job.sink(event)
        except Exception:  # the server side is gone (its loop closed); nothing to tell
            log.debug("dropped an event for job %s", job.id, exc_info=True)

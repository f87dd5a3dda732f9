"""A load generator for the server: concurrent clients, checked answers, latency percentiles.

Two drivers, both checking every answer's text against the case's expected text (decoded directly
with `generate`, see `expected_texts`, once per case before any timing):

- `run_load`: N clients send plain (non-streamed) requests from a list of cases in turn until each
  has sent `requests_per_client` or `duration_s` has passed. Used by the load test.
- `run_stream_load`: each client sends its own list of cases back to back, every request with
  `stream: true`; latency is the time to `data: [DONE]`, time to first block (TTFB) the time to the
  first chunk that carries text (for an empty answer, its final chunk). Counts completion tokens
  (from the stream's usage chunk), checks each stream's shape (one response id, one finish per
  choice, one [DONE]) and that no two requests got the same response id.
- `run_overload`: one request per client, all at once, against a server with a small queue:
  every request must be answered (200 with the right text, or 429 with Retry-After) within the
  timeout, and none answered twice.

`workload` builds the mixed cases (distinct seeds per request, lengths and answer limits from small
sets), `ServerProcess` runs a real `unmask serve` subprocess on a free port, and `markdown` /
`compare` turn the figures into the table `benchmarks/serve_load.py` prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class LoadCase:
    """One request to send and the text a correct server returns for it."""

    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict[str, Any]
    expected: str | None = None


@dataclass
class LoadReport:
    clients: int
    requests: int = 0
    ok: int = 0
    errors: int = 0  # non-200 answers and transport failures
    mismatches: int = 0  # 200 answers whose text differs from the expected text
    p50_s: float = 0.0
    p95_s: float = 0.0
    max_s: float = 0.0
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # a few failures, for the report
    engine: dict[str, Any] = field(default_factory=dict)  # the server's /health engine counters after the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.clients} clients: {self.requests} requests, {self.errors} errors, {self.mismatches} mismatches, "
                f"p50 {self.p50_s * 1000:.0f} ms, p95 {self.p95_s * 1000:.0f} ms, max {self.max_s * 1000:.0f} ms, "
                f"{self.requests_per_s:.1f} req/s over {self.wall_s:.2f} s"
                + (f", mean batch {self.engine.get('mean_batch')}" if self.engine else ""))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it.

    q in [0, 100]; rank = ceil(q/100 * n), at least 1; 0.0 for no values. No interpolation, so the
    result is always one of the values (p50 of [1, 2, 3, 4] is 2, p95 of 1..20 is 19).
    """
    if not values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    n = len(ordered)
    rank = (int(round(q * 1000)) * n + 100_000 - 1) // 100_000  # ceil(q * n / 100), exact to 0.001 in q
    return ordered[max(1, min(n, rank)) - 1]


def answer_text(path: str, payload: dict[str, Any]) -> str:
    choice = payload["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


def _note(examples: list[str], text: str, limit: int = 5) -> None:
    if len(examples) < limit:
        examples.append(text[:400])


# ---------------------------------------------------------------------------------------------
# plain requests (the load test)

def run_load(base_url: str, cases: list[LoadCase], clients: int = 64, requests_per_client: int | None = 2,
             duration_s: float | None = None, timeout_s: float = 60.0) -> LoadReport:
    """Drive `clients` concurrent clients against `base_url`; at least one of the two bounds is needed."""
    if requests_per_client is None and duration_s is None:
        raise ValueError("give requests_per_client or duration_s (or both) so the run ends")
    return asyncio.run(_run(base_url, cases, clients, requests_per_client, duration_s, timeout_s))


async def _run(base_url, cases, clients, per_client, duration_s, timeout_s) -> LoadReport:
    import httpx

    report = LoadReport(clients=clients)
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + duration_s if duration_s is not None else None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:

        async def client(cid: int) -> None:
            sent = 0
            while (per_client is None or sent < per_client) and (deadline is None or time.perf_counter() < deadline):
                case = cases[(cid + sent * clients) % len(cases)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await http.post(case.path, json=case.body)
                    status = str(response.status_code)
                    payload = response.json()
                except Exception as exc:  # transport failure or a body that is not JSON
                    status, payload = type(exc).__name__, None
                latencies.append(time.perf_counter() - t0)
                report.requests += 1
                report.statuses[status] = report.statuses.get(status, 0) + 1
                if status != "200":
                    report.errors += 1
                    _note(report.examples, f"{case.path}: {status} {str(payload)[:200]}")
                    continue
                text = answer_text(case.path, payload)
                if case.expected is not None and text != case.expected:
                    report.mismatches += 1
                    _note(report.examples, f"{case.path} {case.body}: got {text!r}, expected {case.expected!r}")
                else:
                    report.ok += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        report.wall_s = time.perf_counter() - start
        try:
            report.engine = (await http.get("/health")).json().get("engine", {})
        except Exception:
            report.engine = {}
    report.p50_s, report.p95_s = percentile(latencies, 50), percentile(latencies, 95)
    report.max_s = max(latencies, default=0.0)
    report.requests_per_s = report.requests / report.wall_s if report.wall_s > 0 else 0.0
    return report


def expected_texts(model, cases: list[LoadCase], default_strategy: str = "low_confidence", progress=None,
                   cache: str = "auto") -> int:
    """Fill each case's `expected` by decoding it directly (no server), one prompt per `generate` call.

    `cache` is the KV cache mode the servers run with (a cached decode is an approximation, so the
    expected answers must be decoded with the same one).

    The answer rules are applied here from their definition, independently of the server's code:
    the tokens before the first stop token, at most `max_tokens` of them, cut at the first `stop`.
    Cases with the same request share one decode. Returns the number of decodes; `progress(done,
    total)` is called after each.
    """
    from unmask.decoding import generate

    def key_of(case: LoadCase) -> str:
        body = case.body
        chat = case.path.endswith("chat/completions")
        prompt = body["messages"] if chat else body["prompt"]
        return repr((chat, prompt, sorted((k, repr(v)) for k, v in body.items() if k not in ("messages", "prompt"))))

    total = len({key_of(case) for case in cases})
    memo: dict[str, str] = {}
    for case in cases:
        body = case.body
        chat = case.path.endswith("chat/completions")
        prompt = body["messages"] if chat else body["prompt"]
        key = key_of(case)
        if key not in memo:
            strategy = body.get("strategy") or default_strategy
            result = generate(model, [prompt], strategy, chat=chat, gen_length=body.get("gen_length"),
                              block_length=body.get("block_length"), seed=body.get("seed") or 0, cache=cache)
            answer = result.sequences[0].answer_ids
            if body.get("max_tokens") is not None:
                answer = answer[: body["max_tokens"]]
            text = model.tokenizer.decode(answer)
            stop = body.get("stop") or []
            for s in [stop] if isinstance(stop, str) else stop:
                if s in text:
                    text = text[: text.index(s)]
            memo[key] = text
            if progress is not None:
                progress(len(memo), total)
        case.expected = memo[key]
    return len(memo)


# ---------------------------------------------------------------------------------------------
# the mixed workload

PROMPTS = ["tom has 5 apples", "hello world", "what is 3 plus 4", "sam buys 2 pens and ann buys 6 pens",
           "print x", "how many cats", "the dogs gave the books to ann", "def f ( x ) : return x * 2"]


def workload_case(client: int, index: int, gen_lengths: Sequence[int], block_length: int | None,
                  max_tokens: Sequence[int | None], strategy: str | None = None, seed_pool: int = 0,
                  prompts: Sequence[str] = PROMPTS) -> LoadCase:
    """Client `client`'s request number `index`: the same request whatever the number of clients.

    The seed is distinct for every (client, index) (`seed_pool` > 0: one of that many seeds); the
    prompt, endpoint (completion or chat), gen_length and max_tokens turn over with different periods,
    so neighbouring requests differ in several of them.
    """
    n = client * 7 + index
    seed = 1 + (client << 16) + index if seed_pool <= 0 else (client + index) % seed_pool
    prompt = prompts[n % len(prompts)]
    body: dict[str, Any] = {"seed": seed, "gen_length": gen_lengths[(client + index) % len(gen_lengths)]}
    if block_length is not None:
        body["block_length"] = block_length
    limit = max_tokens[(client // len(gen_lengths) + index // len(gen_lengths)) % len(max_tokens)]
    if limit is not None:
        body["max_tokens"] = limit
    if strategy is not None:
        body["strategy"] = strategy
    if (client // 4 + index // 4 + client + index) % 2:
        return LoadCase("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **body})
    return LoadCase("/v1/completions", {"prompt": prompt, **body})


def workload(clients: int, per_client: int, **kwargs) -> list[list[LoadCase]]:
    """Each client's list of requests (see `workload_case`)."""
    return [[workload_case(c, j, **kwargs) for j in range(per_client)] for c in range(clients)]


# ---------------------------------------------------------------------------------------------
# streamed requests

@dataclass
class Outcome:
    """What one request got back."""

    tag: str
    status: str  # the HTTP status, or the exception's name ("Timeout" when it ran past the timeout)
    latency_s: float = 0.0  # to [DONE] (or to the error answer)
    ttfb_s: float | None = None  # to the first chunk with text (an empty answer: its final chunk)
    text: str = ""
    completion_tokens: int = 0
    response_ids: tuple[str, ...] = ()
    done_events: int = 0  # data: [DONE] lines
    finishes: int = 0  # chunks with a finish_reason
    retry_after: str | None = None
    replica: str | None = None  # the x-unmask-replica header (`unmask serve --replicas N`)
    error: str | None = None  # an error body (or an error event inside the stream)

    @property
    def hung(self) -> bool:
        return self.status == "Timeout"


async def _stream_one(http, case: LoadCase, tag: str, timeout_s: float) -> Outcome:
    """POST `case` with stream: true and read the SSE stream to [DONE], within `timeout_s` overall."""
    body = {**case.body, "stream": True, "stream_options": {"include_usage": True}, "user": tag}
    chat = case.path.endswith("chat/completions")
    out = Outcome(tag=tag, status="?")
    t0 = time.perf_counter()
    parts: list[str] = []
    ids: list[str] = []

    async def read() -> None:
        async with http.stream("POST", case.path, json=body) as response:
            out.status = str(response.status_code)
            out.retry_after = response.headers.get("retry-after")
            out.replica = response.headers.get("x-unmask-replica")
            if response.status_code != 200:
                raw = await response.aread()
                out.error = raw.decode("utf-8", "replace")[:300]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out.done_events += 1
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = json.dumps(event["error"])[:300]
                    continue
                if event.get("id") not in ids:
                    ids.append(event.get("id"))
                if event.get("usage"):
                    out.completion_tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if choice.get("finish_reason"):
                        out.finishes += 1
                    if (piece or choice.get("finish_reason")) and out.ttfb_s is None:
                        out.ttfb_s = time.perf_counter() - t0
                    if piece:
                        parts.append(piece)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        out.status = "Timeout"
    except Exception as exc:  # transport failure, a body that is not JSON
        out.status = type(exc).__name__
        out.error = str(exc)[:300]
    out.latency_s = time.perf_counter() - t0
    out.text = "".join(parts)
    out.response_ids = tuple(ids)
    return out


def _judge(case: LoadCase, out: Outcome) -> str | None:
    """Why a 200 answer is wrong (None: it is right)."""
    if out.error is not None:
        return f"error event in the stream: {out.error}"
    if out.done_events != 1 or out.finishes != 1 or len(out.response_ids) != 1:
        return (f"malformed stream: {out.done_events} [DONE], {out.finishes} finish chunks, "
                f"{len(out.response_ids)} response ids")
    if case.expected is not None and out.text != case.expected:
        return f"got {out.text!r}, expected {case.expected!r}"
    return None


@dataclass
class LevelReport:
    """One load level: `clients` clients, each sending its requests back to back, all streamed."""

    clients: int
    requests: int = 0
    ok: int = 0  # 200, a well-formed stream, the expected text
    errors: int = 0  # non-200 answers, transport failures, timeouts, error events, malformed streams
    mismatches: int = 0  # well-formed 200 streams whose text differs from the expected text
    duplicates: int = 0  # response ids that answered more than one request
    hung: int = 0  # requests with no complete answer within the timeout
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    completion_tokens: int = 0
    completion_tokens_per_s: float = 0.0
    p50_s: float = 0.0
    p95_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0
    ttfb_p50_s: float = 0.0
    ttfb_p95_s: float = 0.0
    # the engine's jobs per decode over this level, from /health's batched_jobs/batches (static: the mean
    # batch; continuous: jobs served by one running decode, joiners included); None where not reported
    jobs_per_decode: float | None = None
    replicas_seen: int = 0  # distinct x-unmask-replica headers (0: a single-process server)
    statuses: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.clients:>4} clients: {self.requests} requests, {self.errors} errors, {self.mismatches} "
                f"mismatches, {self.requests_per_s:.2f} req/s, {self.completion_tokens_per_s:.1f} tok/s, "
                f"p50/p95/p99 {self.p50_s * 1000:.0f}/{self.p95_s * 1000:.0f}/{self.p99_s * 1000:.0f} ms, "
                f"TTFB p50/p95 {self.ttfb_p50_s * 1000:.0f}/{self.ttfb_p95_s * 1000:.0f} ms")


def _batch_counters(health: dict[str, Any] | None) -> tuple[float, float] | None:
    engine = (health or {}).get("engine") or {}
    if isinstance(engine.get("batches"), (int, float)) and isinstance(engine.get("batched_jobs"), (int, float)):
        return float(engine["batches"]), float(engine["batched_jobs"])
    return None


async def _health(http) -> dict[str, Any] | None:
    try:
        response = await http.get("/health")
        return response.json()
    except Exception:
        return None


def run_stream_load(base_url: str, per_client: list[list[LoadCase]], timeout_s: float = 300.0,
                    tag: str = "load", server_counters: bool = True) -> LevelReport:
    """Each client sends its cases back to back, streamed; all clients at once.

    `server_counters`: read the jobs per decode from `/health` before and after (False where `/health`
    is one of several replicas' and the difference would mean nothing).
    """
    return asyncio.run(_stream_load(base_url, per_client, timeout_s, tag, server_counters))


async def _stream_load(base_url, per_client, timeout_s, tag, server_counters) -> LevelReport:
    import httpx

    clients = len(per_client)
    report = LevelReport(clients=clients)
    results: list[tuple[LoadCase, Outcome]] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:
        before = _batch_counters(await _health(http)) if server_counters else None

        async def client(cid: int) -> None:
            for j, case in enumerate(per_client[cid]):
                results.append((case, await _stream_one(http, case, f"{tag}-{cid}-{j}", timeout_s)))

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        report.wall_s = time.perf_counter() - start
        after = _batch_counters(await _health(http)) if server_counters else None
    if before is not None and after is not None and after[0] > before[0]:
        report.jobs_per_decode = round((after[1] - before[1]) / (after[0] - before[0]), 3)
    _account(report, results)
    report.replicas_seen = len({o.replica for _, o in results if o.replica})
    latencies = [o.latency_s for _, o in results if o.status == "200"]
    ttfbs = [o.ttfb_s for _, o in results if o.status == "200" and o.ttfb_s is not None]
    report.p50_s, report.p95_s, report.p99_s = (percentile(latencies, q) for q in (50, 95, 99))
    report.max_s = max(latencies, default=0.0)
    report.ttfb_p50_s, report.ttfb_p95_s = percentile(ttfbs, 50), percentile(ttfbs, 95)
    if report.wall_s > 0:
        report.requests_per_s = report.requests / report.wall_s
        report.completion_tokens_per_s = report.completion_tokens / report.wall_s
    return report


def _account(report, results: list[tuple[LoadCase, Outcome]]) -> None:
    """Fill the counts of a LevelReport or an OverloadReport from the outcomes."""
    seen: dict[str, int] = {}
    for case, out in results:
        report.requests += 1
        report.statuses[out.status] = report.statuses.get(out.status, 0) + 1
        report.hung += out.hung
        for rid in out.response_ids:
            seen[rid] = seen.get(rid, 0) + 1
        if out.status == "429" and isinstance(report, OverloadReport):
            if out.retry_after:
                report.rejected += 1
            else:
                report.rejected_without_retry_after += 1
                _note(report.examples, f"{out.tag}: 429 without Retry-After")
            continue
        if out.status != "200":
            report.errors += 1
            _note(report.examples, f"{out.tag} {case.path}: {out.status} {out.error or ''}")
            continue
        report.completion_tokens += out.completion_tokens
        why = _judge(case, out)
        if why is None:
            report.ok += 1
        elif why.startswith("got "):
            report.mismatches += 1
            _note(report.examples, f"{out.tag} {case.path} {case.body}: {why}")
        else:
            report.errors += 1
            _note(report.examples, f"{out.tag} {case.path}: {why}")
    report.duplicates = sum(1 for count in seen.values() if count > 1)
    if report.duplicates:
        _note(report.examples, f"{report.duplicates} response ids answered more than one request")


# ---------------------------------------------------------------------------------------------
# overload

@dataclass
class OverloadReport:
    """All clients at once, one request each, against a bounded queue."""

    clients: int
    requests: int = 0
    ok: int = 0  # 200 with the expected text
    rejected: int = 0  # 429 with a Retry-After header
    rejected_without_retry_after: int = 0
    errors: int = 0  # any other answer, transport failures, timeouts, malformed streams
    mismatches: int = 0
    duplicates: int = 0  # response ids that answered more than one request
    hung: int = 0  # no answer within the timeout
    completion_tokens: int = 0
    wall_s: float = 0.0
    recovered: bool | None = None  # a request after the burst got a 200
    server: dict[str, Any] = field(default_factory=dict)  # /health engine counter changes over the burst
    server_agrees: bool | None = None  # its rejected/completed counts equal the clients' 429s/200s
    statuses: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def answered_once(self) -> bool:
        """Every request got exactly one answer: the right text or a 429 with Retry-After."""
        return (self.ok + self.rejected == self.requests and self.duplicates == 0 and self.hung == 0
                and self.server_agrees is not False)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "answered_once": self.answered_once}

    def summary(self) -> str:
        return (f"{self.clients} clients at once: {self.ok} answered (right text), {self.rejected} got 429 with "
                f"Retry-After, {self.rejected_without_retry_after} 429 without it, {self.errors} other failures, "
                f"{self.mismatches} mismatches, {self.hung} hung, {self.duplicates} answered twice, "
                f"{self.wall_s:.2f} s; server counts agree: {self.server_agrees}; recovered: {self.recovered} -> "
                + ("PASS" if self.answered_once and self.recovered is not False else "FAIL"))


_COUNTERS = ("submitted", "rejected", "completed", "cancelled", "failed")


def run_overload(base_url: str, cases: list[LoadCase], timeout_s: float = 120.0, tag: str = "overload",
                 recovery_case: LoadCase | None = None, server_counters: bool = True) -> OverloadReport:
    """One streamed request per case, all sent at once; then one more (`recovery_case`) once all are answered.

    `server_counters`: compare the clients' 200s and 429s with the changes of the server's `/health`
    counters (False where `/health` is one replica's of several).
    """
    return asyncio.run(_overload(base_url, cases, timeout_s, tag, recovery_case, server_counters))


async def _overload(base_url, cases, timeout_s, tag, recovery_case, server_counters) -> OverloadReport:
    import httpx

    report = OverloadReport(clients=len(cases))
    limits = httpx.Limits(max_connections=len(cases) + 2, max_keepalive_connections=len(cases) + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:
        before = ((await _health(http)) or {}).get("engine") or {}
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(_stream_one(http, case, f"{tag}-{i}", timeout_s)
                                          for i, case in enumerate(cases)))
        report.wall_s = time.perf_counter() - start
        after = ((await _health(http)) or {}).get("engine") or {}
        if recovery_case is not None:
            again = await _stream_one(http, recovery_case, f"{tag}-after", timeout_s)
            report.recovered = again.status == "200" and _judge(recovery_case, again) is None
    _account(report, list(zip(cases, outcomes)))
    if server_counters:
        report.server = {k: after[k] - before[k] for k in _COUNTERS
                         if isinstance(after.get(k), (int, float)) and isinstance(before.get(k), (int, float))}
    if "rejected" in report.server and "completed" in report.server:
        n200 = report.statuses.get("200", 0)
        report.server_agrees = (report.server["rejected"] == report.rejected + report.rejected_without_retry_after
                                and report.server["completed"] == n200)
    return report


# ---------------------------------------------------------------------------------------------
# a real `unmask serve` process

class ServerStartError(RuntimeError):
    """The server process exited or did not answer /health in time; the message ends with its output."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(args: Sequence[str], host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """`python -m unmask serve --host H --port P ARGS` with this interpreter."""
    return [sys.executable, "-m", "unmask", "serve", "--host", host, "--port", str(port), *args]


class ServerProcess:
    """A server subprocess (by default `unmask serve ARGS`) on a free port, its output in `log_path`.

    `start()` launches it and waits until `GET /health` answers 200; `stop()` sends it SIGINT (a
    graceful shutdown), then SIGTERM and SIGKILL to its process group (it runs in its own session)
    if it lingers. Use as a context manager. `command(port)` may replace the command (tests). The
    default command runs the `unmask` this process imported (its folder leads PYTHONPATH).
    """

    def __init__(self, args: Sequence[str] = (), log_path: str | Path | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, command=None):
        self.args, self.host, self.env = list(args), host, env
        self.log_path = Path(log_path) if log_path else None
        self._default_command = command is None
        self._command = command or (lambda port: serve_command(self.args, host, port))
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.startup_s = 0.0
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it (see `wait_ready`)."""
        import tempfile

        self.port = free_port(self.host)
        if self.log_path is None:
            handle = tempfile.NamedTemporaryFile("w+b", prefix="unmask-serve-", suffix=".log", delete=False)
            self.log_path = Path(handle.name)
            handle.close()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **(self.env or {})}
        if self._default_command:
            import unmask

            here = str(Path(unmask.__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._started_at = time.perf_counter()
        self.process = subprocess.Popen(self._command(self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> "ServerProcess":
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"the server exited with code {code} before it answered: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.startup_s = time.perf_counter() - self._started_at
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the server did not answer /health within {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    def start(self, timeout_s: float = 120.0, attempts: int = 2) -> "ServerProcess":
        """Launch and wait; a lost race for the free port is retried on another port."""
        for attempt in range(attempts):
            self.launch()
            try:
                return self.wait_ready(timeout_s)
            except ServerStartError as exc:
                self.stop()
                if "address already in use" not in str(exc).lower() or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            text = ""
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in kept if re.search(r"error", line, re.IGNORECASE)]
        shown = errors[-1:] if errors else kept[-lines:]
        return " | ".join(shown) or "(no output)"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGINT)  # Ctrl-C: the server shuts down in its own way
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal_group(process, signal.SIGTERM)
                    try:
                        process.wait(10)
                    except subprocess.TimeoutExpired:
                        self._signal_group(process, signal.SIGKILL)
                        process.wait(10)
            code = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)  # its own session: the group is the server and what it started
        except (ProcessLookupError, PermissionError, AttributeError):
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_options() -> tuple[set[str], dict[str, Any]]:
    """The options `unmask serve` accepts in this installation, and its defaults (`--strategy` ...)."""
    import argparse

    from unmask.serve.cli import add_serve_parser

    root = argparse.ArgumentParser(prog="unmask")
    parser = add_serve_parser(root.add_subparsers())
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", parser.format_help()))
    defaults = vars(parser.parse_args([]))
    return options, defaults


def config_args(name: str, has_batching: bool) -> list[str]:
    """`unmask serve` arguments for a benchmark configuration name.

    static: today's engine (`--batching static` once the option exists, nothing before);
    continuous: `--batching continuous`; replicasN: `--batching continuous --replicas N`.
    An option the server lacks is still passed (except for static), so the server's own error says so.
    """
    if name == "static":
        return ["--batching", "static"] if has_batching else []
    if name == "continuous":
        return ["--batching", "continuous"]
    match = re.fullmatch(r"replicas(\d+)", name)
    if match and int(match.group(1)) >= 1:
        return ["--batching", "continuous", "--replicas", match.group(1)]
    raise ValueError(f"unknown configuration {name!r}; use static, continuous or replicasN (e.g. replicas2)")


# ---------------------------------------------------------------------------------------------
# reporting

TARGETS = {"p95": 0.5, "tokens_per_s": 1.5}  # continuous/static at the comparison client count


def compare(configs: list[dict[str, Any]], clients: int = 32, base: str = "static", other: str = "continuous"
            ) -> dict[str, Any]:
    """continuous/static ratios of p95 latency and completion tokens/s at `clients` clients, with verdicts.

    p95 must be at most 0.5x (2x lower) and tokens/s at least 1.5x; PASS needs both levels measured
    with every answer right, MISS is a measured shortfall (or wrong answers), n/a is not measured.
    """
    def level(name):
        for config in configs:
            if config["name"] == name:
                if config.get("error"):
                    return None, f"{name} did not run: {config['error']}"
                for entry in config.get("levels", []):
                    if entry["clients"] == clients:
                        return entry, None
                return None, f"{name} has no {clients}-client level"
        return None, f"{name} was not run"

    a, why_a = level(base)
    b, why_b = level(other)
    out: dict[str, Any] = {"clients": clients, "base": base, "other": other}
    if a is None or b is None:
        reason = why_a or why_b
        out.update(p95_ratio=None, tokens_per_s_ratio=None, p95_verdict="n/a", tokens_per_s_verdict="n/a",
                   note=reason)
        return out
    wrong = [n for n, e in ((base, a), (other, b)) if e["errors"] or e["mismatches"] or not e["requests"]]
    p95 = b["p95_s"] / a["p95_s"] if a["p95_s"] > 0 else None
    tps = b["completion_tokens_per_s"] / a["completion_tokens_per_s"] if a["completion_tokens_per_s"] > 0 else None
    out.update(p95_ratio=p95, tokens_per_s_ratio=tps,
               p95_verdict="PASS" if p95 is not None and p95 <= TARGETS["p95"] and not wrong else "MISS",
               tokens_per_s_verdict="PASS" if tps is not None and tps >= TARGETS["tokens_per_s"] and not wrong
               else "MISS",
               note=f"wrong answers or failures in {', '.join(wrong)}" if wrong else None)
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The run as markdown: settings, the load table, the target ratios, the overload table."""
    s = result["settings"]
    lines = [f"# unmask serve load: {s['model']}", "",
             f"{s['machine']}; strategy {s['strategy']}; gen_length {s['gen_lengths']} (block {s['block_length']}); "
             f"max_tokens {s['max_tokens']}; seeds {s['seeds']}; every request streamed; "
             f"max batch {s['max_batch_size']}, max queue {s['max_queue']}, cache {s.get('cache', 'none')}; "
             f"{s['expected_decodes']} expected answers decoded directly beforehand ({s['expected_s']:.1f} s, not timed).",
             ""]
    configs = result.get("configs") or []
    if configs and not result.get("overload_mode"):
        lines += ["| config | clients | requests | errors | mismatches | req/s | completion tok/s | p50 ms | p95 ms "
                  "| p99 ms | TTFB p50 ms | TTFB p95 ms | jobs/decode |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for config in configs:
            if config.get("error"):
                lines.append(f"| {config['name']} | - | did not run: {config['error'][:160]} |" + " |" * 10)
                continue
            for e in config["levels"]:
                batch = "-" if e.get("jobs_per_decode") is None else f"{e['jobs_per_decode']:.2f}"
                lines.append(
                    f"| {config['name']} | {e['clients']} | {e['requests']} | {e['errors']} | {e['mismatches']} | "
                    f"{e['requests_per_s']:.2f} | {e['completion_tokens_per_s']:.1f} | {_ms(e['p50_s'])} | "
                    f"{_ms(e['p95_s'])} | {_ms(e['p99_s'])} | {_ms(e['ttfb_p50_s'])} | {_ms(e['ttfb_p95_s'])} | "
                    f"{batch} |")
        c = result.get("comparison")
        if c:
            lines += ["", f"continuous/static at {c['clients']} clients:"]
            if c["p95_ratio"] is None and c["tokens_per_s_ratio"] is None:
                lines.append(f"- not measured ({c['note']}): p95 n/a, completion tokens/s n/a")
            else:
                p95 = "-" if c["p95_ratio"] is None else f"{c['p95_ratio']:.2f}"
                tps = "-" if c["tokens_per_s_ratio"] is None else f"{c['tokens_per_s_ratio']:.2f}"
                lines.append(f"- p95 latency ratio {p95} (target <= {TARGETS['p95']}, i.e. 2x lower): "
                             f"{c['p95_verdict']}")
                lines.append(f"- completion tokens/s ratio {tps} (target >= {TARGETS['tokens_per_s']}): "
                             f"{c['tokens_per_s_verdict']}")
                if c.get("note"):
                    lines.append(f"- note: {c['note']}")
    if result.get("overload_mode"):
        lines += ["| config | clients | max queue | answered | 429 + Retry-After | 429 without | other failures "
                  "| mismatches | hung | answered twice | server counts agree | recovered | verdict |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for config in configs:
            if config.get("error"):
                lines.append(f"| {config['name']} | - | did not run: {config['error'][:160]} |" + " |" * 10)
                continue
            o = config["overload"]
            verdict = "PASS" if o["answered_once"] and o["recovered"] is not False else "FAIL"
            lines.append(f"| {config['name']} | {o['clients']} | {s['max_queue']} | {o['ok']} | {o['rejected']} | "
                         f"{o['rejected_without_retry_after']} | {o['errors']} | {o['mismatches']} | {o['hung']} | "
                         f"{o['duplicates']} | {o['server_agrees']} | {o['recovered']} | {verdict} |")
    return "\n".join(lines) + "\n"

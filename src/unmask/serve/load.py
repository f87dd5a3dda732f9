"""A load generator for the server: N concurrent clients, checked answers, latency percentiles.

Each client sends requests from a fixed list of cases in turn until it has sent `requests_per_client`
or `duration_s` has passed (a request in flight at the deadline is still awaited, with a timeout),
and checks every answer's text against the case's expected text (decoded directly with
`generate`, see `expected_texts`). Used by `benchmarks/serve_load.py` and the load test.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any


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


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def answer_text(path: str, payload: dict[str, Any]) -> str:
    choice = payload["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


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
                    if len(report.examples) < 5:
                        report.examples.append(f"{case.path}: {status} {str(payload)[:200]}")
                    continue
                text = answer_text(case.path, payload)
                if case.expected is not None and text != case.expected:
                    report.mismatches += 1
                    if len(report.examples) < 5:
                        report.examples.append(f"{case.path} {case.body}: got {text!r}, expected {case.expected!r}")
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


def expected_texts(model, cases: list[LoadCase], default_strategy: str = "low_confidence") -> None:
    """Fill each case's `expected` by decoding it directly (no server), one prompt per `generate` call.

    The answer rules are applied here from their definition, independently of the server's code:
    the tokens before the first stop token, at most `max_tokens` of them, cut at the first `stop`.
    """
    from unmask.decoding import generate

    memo: dict[str, str] = {}
    for case in cases:
        body = case.body
        chat = case.path.endswith("chat/completions")
        prompt = body["messages"] if chat else body["prompt"]
        key = repr((chat, prompt, sorted((k, repr(v)) for k, v in body.items() if k not in ("messages", "prompt"))))
        if key not in memo:
            strategy = body.get("strategy") or default_strategy
            result = generate(model, [prompt], strategy, chat=chat, gen_length=body.get("gen_length"),
                              block_length=body.get("block_length"), seed=body.get("seed") or 0)
            answer = result.sequences[0].answer_ids
            if body.get("max_tokens") is not None:
                answer = answer[: body["max_tokens"]]
            text = model.tokenizer.decode(answer)
            stop = body.get("stop") or []
            for s in [stop] if isinstance(stop, str) else stop:
                if s in text:
                    text = text[: text.index(s)]
            memo[key] = text
        case.expected = memo[key]

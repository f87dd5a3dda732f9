"""`unmask serve --replicas N`: the same OpenAI-compatible app on N Ray Serve replicas.

Two deployments, one Serve application, on the host and port `unmask serve` would bind:

- `ModelReplica` (N replicas, one per GPU where the cluster has GPUs, else one per CPU slot):
  each loads the model, owns an `Engine` and runs the very app of a single-process server
  (`create_app`). It is reached through a `DeploymentHandle` only: `handle_http` drives the app with
  one HTTP request (method, path, headers, body) and streams back the app's ASGI messages.
- `Ingress` (one replica, no CPU slot of its own) is what Ray Serve's HTTP proxy calls. It reads the
  request body (at most `max_body_bytes` + 1 bytes, so the app still answers 413), hands the request
  to a replica chosen by Ray Serve's router (`handle.options(stream=True)`) and relays the answer:
  a JSON answer once complete, an SSE stream chunk by chunk.

Everything a client sees is the app's: routes, 4xx errors, 429 with Retry-After (per replica: the
replica the router picked has a full queue), 500/503, SSE streaming, cancellation on disconnect
(the proxy cancels the ingress call, which cancels the replica's call, which cancels the decode).
Every answer carries `x-unmask-replica` and `x-unmask-pid` headers naming the replica that served it.

A replica that dies (its process killed, out of memory, its node lost) is replaced by Ray Serve.
Requests it held would otherwise end as Ray Serve's plain-text "Internal Server Error" (500); the
ingress catches the handle's `RayActorError` and answers OpenAI's error object with status 503,
type "server_error", code "replica_died" and Retry-After: 1 (the official clients retry a 503). A
stream already under way ends with that error as its last `data:` event, then `data: [DONE]`, as
any failure after a stream has started does. Requests that arrive later go to the live replicas.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable

from unmask.errors import UnmaskError
from unmask.serve.engine import DEFAULT_MAX_BATCH_SIZE
from unmask.serve.protocol import DEFAULT_MAX_BODY_BYTES, error_body

APP_NAME = "unmask"
REPLICA_HEADER = b"x-unmask-replica"
PID_HEADER = b"x-unmask-pid"
INGRESS_MAX_ONGOING = 100_000  # the ingress only relays bytes; the replicas' engines bound the work


@dataclass
class ReplicaSettings:
    """What each replica needs to build its engine and app (plain values: Ray pickles them)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    strategy: str = "auto"  # as `unmask serve`: tspd:ce=true,stability=true where its controller exists, else threshold
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = 256
    cache: str = "auto"
    served_model_name: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    engine_options: dict[str, Any] = field(default_factory=dict)  # more `build_engine` keywords


# --- the replica side: one HTTP request through the app, as ASGI messages ---------------------------
async def asgi_messages(app, request: dict[str, Any],
                        extra_headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[dict]:
    """Run ASGI `app` on one request and yield the messages it sends (start, then body parts).

    `request`: method, path, query_string (bytes), headers (a list of byte pairs), body (bytes) and
    optionally client. After the body the app's `receive` waits for ever, as for a client that
    stays connected; closing this generator (the caller went away) cancels the app, which cancels
    its decode. `extra_headers` are added to the response's headers.
    """
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request["method"], "scheme": "http", "path": request["path"],
        "raw_path": request["path"].encode("latin-1"), "query_string": request.get("query_string", b""),
        "root_path": "", "headers": [(bytes(k), bytes(v)) for k, v in request.get("headers", [])],
        "client": tuple(request["client"]) if request.get("client") else None, "server": None,
    }
    body_sent = False
    never = asyncio.Event()

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.get("body", b""), "more_body": False}
        await never.wait()  # until the caller goes away and the app is cancelled
        return {"type": "http.disconnect"}

    queue: asyncio.Queue = asyncio.Queue()

    async def send(message):
        await queue.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every message the app sent
    started = False
    try:
        while True:
            message = await queue.get()
            if message is None:  # the app returned (or raised) without finishing its answer
                break
            if message["type"] == "http.response.start":
                started = True
                message = dict(message, headers=[*message.get("headers", []), *extra_headers])
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
        if not started:  # the app failed before answering: a bug, answered as the app answers one
            exc = task.exception() if task.done() and not task.cancelled() else None
            name = type(exc).__name__ if exc is not None else "no response"
            for message in json_messages(500, error_body(f"internal error: {name}", type_="server_error"),
                                         extra_headers=list(extra_headers)):
                yield message
        await asyncio.wait({task}, timeout=5)  # let the app finish its own clean-up
    finally:
        if not task.done():
            task.cancel()
        else:
            task.cancelled() or task.exception()  # retrieved: no "exception never retrieved" warning


def json_messages(status: int, payload: Any, extra_headers: list[tuple[bytes, bytes]] | None = None) -> list[dict]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra_headers or [])]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


# --- the ingress side: relay one request to a replica --------------------------------------------
def replica_died_body(replica: str | None) -> dict[str, Any]:
    who = f"the model replica {replica}" if replica else "the model replica"
    return error_body(f"{who} serving this request died; retry (Ray Serve starts a replacement, and the other "
                      "replicas serve on)", type_="server_error", code="replica_died")


def _sse(payload: Any) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _header(headers, name: bytes) -> str | None:
    for key, value in headers:
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The body, or its first `limit` + 1 bytes (the app answers 413 past `limit`); None: client gone."""
    declared = _header(scope.get("headers", []), b"content-length") or ""
    if declared.strip().isdigit() and int(declared) > limit:
        return b""  # the app refuses it on its Content-Length without reading it
    parts, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        parts.append(part)
        total += len(part)
        if total > limit or not message.get("more_body", False):
            return b"".join(parts)


async def relay(scope, receive, send, call: Callable[[dict], Any], max_body_bytes: int,
                died: tuple[type[BaseException], ...], unavailable: tuple[type[BaseException], ...] = ()) -> None:
    """Answer one HTTP request (ASGI `scope`, `receive`, `send`) with a replica's answer.

    `call(request)` returns the replica's messages as an async iterator with a `cancel()` method
    (a `DeploymentResponseGenerator`). An exception in `died` means the replica's process is gone:
    503 (or, once a stream is under way, a last SSE error event); one in `unavailable` means the
    deployment cannot take requests at all: 503 as well; any other is a 500.
    """
    body = await _read_body(scope, receive, max_body_bytes)
    if body is None:
        return
    request = {"method": scope["method"], "path": scope["path"], "query_string": scope.get("query_string", b""),
               "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])], "body": body,
               "client": list(scope["client"]) if scope.get("client") else None}
    stream = call(request)
    done, replica, streaming, client_gone = False, None, False, False

    async def to_client(message):  # a failure here is the client's connection, not the replica
        nonlocal client_gone
        try:
            await send(message)
        except BaseException:
            client_gone = True
            raise

    try:
        try:
            start = await stream.__anext__()
            headers = start.get("headers", [])
            replica = _header(headers, REPLICA_HEADER)
            streaming = (_header(headers, b"content-type") or "").startswith("text/event-stream")
            if streaming:  # relayed as it comes; the status line is sent now
                await to_client(start)
                last = start
                async for message in stream:
                    await to_client(message)
                    last = message
                if last["type"] != "http.response.body" or last.get("more_body", False):
                    await to_client({"type": "http.response.body", "body": b"", "more_body": False})
            else:  # JSON answers are relayed whole, so a replica that dies before the end still gets a 503
                held = [start]
                async for message in stream:
                    held.append(message)
                await _send_all(to_client, held)
            done = True
            return
        except died:
            status, error = 503, replica_died_body(replica)
        except unavailable as exc:
            detail = getattr(exc, "message", None) or str(exc)
            status, error = 503, error_body(f"the model deployment is unavailable ({detail}); retry later",
                                            type_="server_error")
        except StopAsyncIteration:
            status, error = 500, error_body("internal error: the replica sent no answer", type_="server_error")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a replica-side bug, answered in the app's shape
            if client_gone:
                raise
            status, error = 500, error_body(f"internal error: {type(exc).__name__}", type_="server_error")
        if streaming:  # the status line is sent: the error is the stream's last event
            await _end_stream(to_client, error)
        else:
            retry = [(b"retry-after", b"1")] if status == 503 else None
            await _send_all(to_client, json_messages(status, error, retry))
        done = True
    finally:
        if not done:
            stream.cancel()  # the client went away (or the relay failed): stop the replica's decode


async def _send_all(send, messages: list[dict]) -> None:
    for message in messages:
        await send(message)


async def _end_stream(send, error: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": _sse(error) + _sse("[DONE]"), "more_body": False})


@functools.cache
def _ray_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """Ray's exceptions for a replica that died and for a deployment that failed (newer Rays only)."""
    from ray import exceptions
    from ray.serve import exceptions as serve_exceptions

    died = tuple(e for e in (exceptions.RayActorError, getattr(serve_exceptions, "ReplicaUnavailableError", None)) if e)
    unavailable = getattr(serve_exceptions, "DeploymentUnavailableError", None)
    return died, (unavailable,) if unavailable else ()


@functools.cache
def _relayed_response():
    from starlette.responses import Response

    class RelayedResponse(Response):
        """A response with no body of its own: sending it relays the replica's answer."""

        def __init__(self, relay_to):
            self.relay_to, self.background = relay_to, None

        async def __call__(self, scope, receive, send):
            await self.relay_to(scope, receive, send)

    return RelayedResponse


# --- the deployments --------------------------------------------------------------------------------
class ModelReplica:
    """One replica: the model, its engine and the app of a single-process server."""

    def __init__(self, settings: dict[str, Any]):
        from unmask.models import load_model
        from unmask.serve.app import create_app
        from unmask.serve.runner import build_engine

        cfg = ReplicaSettings(**settings)
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        self.engine = build_engine(model, strategy=cfg.strategy, max_batch_size=cfg.max_batch_size,
                                   max_queue=cfg.max_queue, cache=cfg.cache, **cfg.engine_options)
        self.name = cfg.served_model_name or model.name
        self.app = create_app(self.engine, self.name, cfg.max_body_bytes)  # its lifespan is not run: start here
        self.engine.start()
        try:
            from ray import serve

            context = serve.get_replica_context()
            self.replica_id = str(getattr(getattr(context, "replica_id", None), "unique_id", None)
                                  or context.replica_tag)
        except Exception:  # outside a Serve replica (tests)
            self.replica_id = f"pid{os.getpid()}"
        self.identity = [(REPLICA_HEADER, self.replica_id.encode()), (PID_HEADER, str(os.getpid()).encode())]

    async def handle_http(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        async for message in asgi_messages(self.app, request, self.identity):
            yield message

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "replica": self.replica_id, "pid": os.getpid()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread is gone is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the engine's decode thread is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


class Ingress:
    """What Ray Serve's HTTP proxy calls: relays each request to a replica through the router."""

    def __init__(self, replicas, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.replicas = replicas.options(stream=True)
        self.plain = replicas
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request):
        return _relayed_response()(self.relay)

    async def relay(self, scope, receive, send) -> None:
        await relay(scope, receive, send, self.replicas.handle_http.remote, self.max_body_bytes, *_ray_errors())

    async def describe(self) -> dict[str, Any]:
        return await self.plain.describe.remote()


# --- building and running the application -----------------------------------------------------------
def replica_resources(ray, replicas: int, device: str | None, local: bool = True) -> tuple[dict[str, Any], str | None]:
    """Each replica's Ray resources and the device it loads the model on: a GPU each where the
    cluster has GPUs (and --device does not ask for the CPU), else a CPU slot each."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    wants_cpu = device is not None and not device.startswith("cuda")
    if gpus and not wants_cpu:
        if local and replicas > gpus:
            raise UnmaskError(f"--replicas {replicas} needs a GPU per replica but this machine has {gpus}; "
                              f"use --replicas {gpus} or fewer", field="replicas")
        # Ray shows each replica only its own GPU, so "cuda" is that GPU whatever its index
        return {"num_gpus": 1, "num_cpus": 0}, "cuda"
    if device is not None and device.startswith("cuda"):
        raise UnmaskError(f"--device {device} asks for a GPU but Ray finds none on this machine", field="device")
    if local and replicas > cpus:
        raise UnmaskError(f"--replicas {replicas} needs a CPU slot per replica but Ray counts {cpus} CPUs on this "
                          f"machine; use --replicas {max(cpus, 1)} or fewer", field="replicas")
    return {"num_cpus": 1}, device


def build_application(settings: ReplicaSettings, replicas: int, actor_options: dict[str, Any] | None = None):
    """The Serve application: the ingress in front of `replicas` model replicas."""
    from ray import serve

    if replicas < 1:
        raise UnmaskError(f"replicas must be at least 1, got {replicas}", field="replicas")
    # enough concurrent requests per replica to fill its engine, so the engine (not Serve's router
    # queue) decides when to answer 429; a little more for /health and /v1/models
    per_replica = settings.max_batch_size + settings.max_queue + 8
    model = serve.deployment(ModelReplica, name="ModelReplica").options(
        num_replicas=replicas, max_ongoing_requests=per_replica,
        ray_actor_options=actor_options or {"num_cpus": 1},
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10,
    )
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(model.bind(asdict(settings)), settings.max_body_bytes)


def app_builder(args: dict[str, str]):
    """For `serve run unmask.serve.ray_serve:app_builder model=PATH replicas=2 ...` (Ray Serve's
    application builder, or a `serve run config.yaml` whose application has these `args`): the keys
    are `replicas` and ReplicaSettings' fields; `engine_options` and `ray_actor_options` are JSON
    (by default a GPU per replica where the cluster has GPUs, else a CPU slot each)."""

    def as_json(value):  # `serve run ... key=value` gives text, a YAML config's args may give a mapping
        return json.loads(value) if isinstance(value, str) else value

    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    options = as_json(args.pop("ray_actor_options", None))
    kinds = {"trust_remote_code": lambda v: str(v).lower() in ("1", "true", "yes"), "max_batch_size": int,
             "max_queue": int, "max_body_bytes": int, "engine_options": as_json}
    fields = ReplicaSettings.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise UnmaskError(f"unknown argument(s) {', '.join(unknown)}; known: replicas, ray_actor_options, "
                          + ", ".join(fields))
    settings = ReplicaSettings(**{k: kinds.get(k, str)(v) for k, v in args.items()})
    if options is None:
        import ray

        if ray.is_initialized():  # a GPU each where the cluster has GPUs, else a CPU slot each
            options, device = replica_resources(ray, replicas, settings.device, local=False)
            settings = ReplicaSettings(**{**asdict(settings), "device": device})
    return build_application(settings, replicas, options)


def run_replicated(settings: ReplicaSettings, replicas: int, host: str, port: int, log_level: str = "info") -> None:
    """`unmask serve --replicas N`: start Ray here, deploy, serve until interrupted, then shut down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UnmaskError("unmask serve --replicas needs Ray Serve; install it with `pip install 'unmask[ray]'`",
                          field="replicas") from None
    _check_settings(settings)  # mistakes fail here in a second, not in every replica after Ray's start
    _check_port(host, port)
    level = log_level.upper()

    def stop(signum, frame):  # SIGTERM as Ctrl-C: shut Serve and Ray down on the way out
        raise KeyboardInterrupt

    ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=True)
    previous = signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler would just exit
    try:
        actor_options, device = replica_resources(ray, replicas, settings.device)
        settings = ReplicaSettings(**{**asdict(settings), "device": device})
        try:
            serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": level})
        except Exception as exc:  # the proxy could not bind, mostly
            raise UnmaskError(f"Ray Serve's HTTP proxy did not start on {host}:{port}: {_last_line(exc)}",
                              field="port") from None
        started = time.perf_counter()
        try:
            handle = serve.run(build_application(settings, replicas, actor_options), name=APP_NAME,
                               route_prefix="/", logging_config={"log_level": level})
        except Exception as exc:  # a replica's constructor failed (a missing checkpoint, say) until Serve gave up
            raise UnmaskError(f"the replicas did not start: {_last_line(exc)}") from None
        info = handle.describe.remote().result()
        print(f"unmask serve: {info['model']} on http://{host}:{port}/v1 with {replicas} replicas "
              f"(Ray Serve, ready in {time.perf_counter() - started:.0f} s; default strategy {settings.strategy})",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        sys.stderr.write("unmask serve: shutting down the replicas\n")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)


def _check_port(host: str, port: int) -> None:
    import socket

    if port == 0:
        raise UnmaskError("--replicas needs a fixed --port (Ray Serve's proxy binds it on every node)", field="port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UnmaskError(f"cannot bind {host}:{port} ({exc.strerror or exc}); is another server using it? "
                              "choose another --port", field="port") from None


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def _check_settings(settings: ReplicaSettings) -> None:
    """What a replica would trip over when loading: the checkpoint (a hub id is downloaded here,
    once, into the cache the replicas then read), the device and the dtype."""
    from unmask.models.loading import pick_device, pick_dtype, resolve_checkpoint

    resolve_checkpoint(settings.model)
    pick_dtype(settings.dtype, pick_device(settings.device))

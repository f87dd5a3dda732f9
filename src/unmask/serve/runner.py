"""Running the app with uvicorn: in the foreground (`unmask serve`) or on a background thread.

The background form binds port 0 (the OS picks a free port, so there is no race between finding a
port and binding it) and yields the base URL; tests and `benchmarks/serve_load.py` use it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from unmask.errors import UnmaskError
from unmask.serve.engine import DEFAULT_MAX_BATCH_SIZE, Engine, EngineConfig
from unmask.serve.protocol import DEFAULT_MAX_BODY_BYTES


def build_engine(model, strategy: str = "auto", max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = 256,
                 cache: str = "auto", batching: str = "continuous") -> Engine:
    return Engine(model, EngineConfig(max_batch_size=max_batch_size, max_queue=max_queue, strategy=strategy, cache=cache,
                                      batching=batching))


@contextmanager
def serve_in_thread(engine: Engine, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                    timeout: float = 30.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Iterator[str]:
    """Serve `engine` on a background thread; yields `http://host:port`. Stops the server on exit."""
    import uvicorn

    from unmask.serve.app import create_app

    config = uvicorn.Config(create_app(engine, model_name, max_body_bytes), host=host, port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="unmask-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise UnmaskError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def run_server(engine: Engine, host: str, port: int, model_name: str | None = None, log_level: str = "info",
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve in the foreground until interrupted."""
    import uvicorn

    from unmask.serve.app import create_app

    uvicorn.run(create_app(engine, model_name, max_body_bytes), host=host, port=port, log_level=log_level,
                lifespan="on")

"""`unmask serve`: an OpenAI-compatible HTTP server over the one decode loop.

`engine` (requests in, text out; the batching decision; the worker thread) knows nothing about
HTTP; `app` and `protocol` (routes, request checking, OpenAI's shapes) know nothing about
policies; `answer` holds the rules that turn committed tokens into the answer a client sees.
"""

from unmask.serve.answer import AnswerTracker
from unmask.serve.engine import Engine, EngineConfig, EngineStopped, Event, GenerationRequest, Job, QueueFull, take_batch
from unmask.serve.runner import build_engine, serve_in_thread

__all__ = ["AnswerTracker", "Engine", "EngineConfig", "EngineStopped", "Event", "GenerationRequest", "Job", "QueueFull",
           "build_engine", "serve_in_thread", "take_batch"]

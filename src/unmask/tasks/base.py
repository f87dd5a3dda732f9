"""The task interface: problems, prompts, answer extraction and scoring.

A task is everything the benchmark needs to know about one kind of problem and nothing about
decoding: which problems exist (`problems`), how to ask (`messages` for chat models, `prompt`
for base models), how to read the answer back (`extract`) and how to judge it (`score`).
Generated families (`arith`, `trace`) also say how to answer (`sample_response`), because the
built-in model is trained on their worked answers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from unmask.errors import UnmaskError


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer.

    `answer` is already normalised (e.g. "42"), so a scorer compares it with the normalised
    extraction and never re-parses the dataset's own format. `meta` carries whatever a task needs
    later (the raw base-model prompt, the program's structure, the unit tests).
    """

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


class Task:
    """Base class of every task; subclasses are dataclasses whose fields are the task's options."""

    name: str = "task"
    splits: tuple[str, ...] = ("test",)

    # -- problems -------------------------------------------------------------------------------
    def problems(self, split: str = "test", limit: int | None = None, seed: int = 0) -> list[Problem]:
        """The problems of `split`, in a fixed order.

        `limit` keeps a seeded random subset (returned in split order); `seed` only chooses which
        problems, never which split a problem belongs to, so two seeds draw from the same pool.
        """
        self.check_split(split)
        pool = self._split_problems(split, limit)
        return select(pool, limit, seed)

    def _split_problems(self, split: str, limit: int | None) -> list[Problem]:
        """Every problem of `split` (the pool that `problems` samples from)."""
        raise NotImplementedError

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise UnmaskError(
                f"task {self.name!r} has no split {split!r}; use one of: {', '.join(self.splits)}",
                field="split",
            )

    # -- prompting ------------------------------------------------------------------------------
    def messages(self, problem: Problem) -> list[dict]:
        """Chat messages for an instruction-tuned model: by default the question as one user turn."""
        return [{"role": "user", "content": problem.question}]

    def prompt(self, problem: Problem) -> str:
        """Raw text prompt for a base model (no chat template)."""
        return problem.question

    # -- answers --------------------------------------------------------------------------------
    def extract(self, completion: str) -> str | None:
        """The final answer in a model completion, normalised like `Problem.answer`; None if absent."""
        raise NotImplementedError

    def score(self, problem: Problem, completion: str) -> float:
        """1.0 when the completion's answer matches the gold answer, else 0.0."""
        return 1.0 if answers_match(self.extract(completion), problem.answer) else 0.0

    def working_consistent(self, problem: Problem, completion: str) -> bool:
        """Whether a completion's working, not only its answer, fits the problem (`r2-sft --select
        working`). A task with no check of the working accepts every completion."""
        return True

    # -- generated families only ----------------------------------------------------------------
    def hardness(self, problem: Problem) -> float:
        """How hard a problem is, >= 1, for `unmask train sft --hard-bias` (1.0: no measure)."""
        return 1.0

    def sample_response(self, problem: Problem, rng: random.Random) -> str:
        """One valid worked answer drawn at random (generated families only)."""
        raise UnmaskError(
            f"task {self.name!r} has no answer generator; only the generated tasks (arith, trace) "
            "can produce training responses"
        )

    @classmethod
    def vocabulary(cls) -> set[str]:
        """Every non-number word the task's text can contain (generated families only)."""
        raise UnmaskError(
            f"task {cls.name!r} has an open vocabulary; only the generated tasks (arith, trace) "
            "have a closed word list"
        )


def select(pool: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    """A seeded subset of `pool` of size `limit`, kept in pool order (all of it when no limit)."""
    if limit is None:
        return list(pool)
    if limit < 0:
        raise UnmaskError(f"limit must be a positive number of problems, got {limit}", field="limit")
    if limit >= len(pool):
        return list(pool)
    keep = sorted(random.Random(seed).sample(range(len(pool)), limit))
    return [pool[i] for i in keep]


# -- numbers ------------------------------------------------------------------------------------

def normalize_number(text: str | None) -> str | None:
    """Canonical text of a number as models write it: no "$", no thousands commas, no trailing ".".

    Integral values lose their decimals ("18.00" -> "18") so that "18" and "18.0" compare equal
    as strings too; anything that is not a number after cleaning comes back cleaned but unparsed.
    """
    if text is None:
        return None
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not cleaned:
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numeric equality where both sides parse, exact string equality otherwise."""
    if predicted is None:
        return False
    a, b = normalize_number(predicted), normalize_number(gold)
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


# The phrase every generated response ends with; digits may come back space-separated when a
# word-level tokenizer decodes one token per digit ("the answer is 1 3 .").
ANSWER_PHRASE = re.compile(r"the answer is\s*\$?\s*(-?\s*\d(?:[\d,]|\s(?=\d))*(?:\.\d+)?)", re.IGNORECASE)


def extract_answer_phrase(completion: str) -> str | None:
    """The number after the last "the answer is", normalised; None when the phrase is missing."""
    matches = ANSWER_PHRASE.findall(completion)
    if not matches:
        return None
    return normalize_number(matches[-1])

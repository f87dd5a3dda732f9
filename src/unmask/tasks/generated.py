"""Shared machinery of the generated task families (`arith`, `trace`).

Problems come from one seeded stream per family. A problem's split is a function of its
question text alone (sha1 mod 100: below 80 train, below 90 dev, else test), so the splits are
disjoint by construction and a split never depends on how many problems were asked for, on the
sampling seed, or on the order of calls. Each split's pool is the first `<split>_size` distinct
problems of that split in the stream; the stream is generated lazily and cached per process.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from unmask.errors import UnmaskError
from unmask.tasks.base import Problem, Task, extract_answer_phrase

SPLITS = ("train", "dev", "test")

# A problem is kept only if its shortest worked answer leaves this many tokens under the response
# bound, so that the optional words of a response still have room and sampling rarely rejects.
RESPONSE_SLACK = 8


def split_of(question: str) -> str:
    """The split a question belongs to, from its text only."""
    bucket = int(hashlib.sha1(question.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "dev" if bucket < 90 else "test"


def problem_id(prefix: str, question: str) -> str:
    return f"{prefix}-{hashlib.sha1(question.encode('utf-8')).hexdigest()[:12]}"


_DIGIT_FOLLOWED_BY_DIGIT = re.compile(r"\d(?=\d)")


def count_tokens(text: str) -> int:
    """Length in the built-in tokenizer's units: one per word or punctuation mark, one per digit."""
    return len(text.split()) + len(_DIGIT_FOLLOWED_BY_DIGIT.findall(text))


def join_words(*parts: str) -> str:
    """Sentences joined by single spaces, the empty ones (an omitted optional part) dropped."""
    return " ".join(part for part in parts if part)


def template_words(*templates: str) -> set[str]:
    """The literal words of format templates (placeholders like "{x}" dropped)."""
    words = set()
    for template in templates:
        for word in template.split():
            if not (word.startswith("{") and word.endswith("}")):
                words.add(word)
    return words


class _Stream:
    """A lazily extended, de-duplicated stream of problems, bucketed by split."""

    def __init__(self, generate, seed: int):
        self.generate = generate  # (rng) -> Problem | None
        self.rng = random.Random(seed)
        self.seen: set[str] = set()
        self.by_split: dict[str, list[Problem]] = {split: [] for split in SPLITS}
        self.draws = 0

    def fill(self, split: str, size: int) -> list[Problem]:
        bucket = self.by_split[split]
        # A split holds about 10% of the stream; a generator that keeps failing is a bug, not bad luck.
        budget = 1000 + 200 * size
        while len(bucket) < size:
            if budget == 0:
                raise RuntimeError(f"the generator could not produce {size} {split} problems")
            budget -= 1
            self.draws += 1
            problem = self.generate(self.rng)
            if problem is None or problem.question in self.seen:
                continue
            self.seen.add(problem.question)
            self.by_split[problem.meta["split"]].append(problem)
        return bucket[:size]


_STREAMS: dict[tuple, _Stream] = {}


@dataclass
class GeneratedTask(Task):
    """A task whose problems and worked answers are produced by the project's own generator.

    Every response ends with "the answer is N .", so extraction is exact; `sample_response`
    draws one of the many valid worked answers, which is what gives the trained model a
    genuinely multi-modal prediction at each position.
    """

    train_size: int = 50_000
    dev_size: int = 1_000
    test_size: int = 1_000
    generator_seed: int = 0

    splits = SPLITS
    max_response_tokens = 0  # every subclass sets its family's bound

    def __post_init__(self):
        for name in ("train_size", "dev_size", "test_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UnmaskError(f"{name} must be a positive integer, got {value!r}", field=name)

    def _split_problems(self, split: str, limit: int | None) -> list[Problem]:
        # a limit beyond the configured pool grows the pool rather than silently returning fewer
        size = max(getattr(self, f"{split}_size"), limit or 0)
        key = (type(self).__qualname__, self.generator_seed)
        stream = _STREAMS.get(key)
        if stream is None:
            stream = _STREAMS[key] = _Stream(self._checked_problem, seed=self.generator_seed)
        return stream.fill(split, size)

    def _checked_problem(self, rng: random.Random) -> Problem | None:
        problem = self.generate_problem(rng)
        if problem is None:
            return None
        meta = dict(problem.meta, split=split_of(problem.question))
        return Problem(problem.id, problem.question, problem.answer, meta)

    def generate_problem(self, rng: random.Random) -> Problem | None:
        """One random problem, or None to reject this draw (e.g. a result out of range)."""
        raise NotImplementedError

    def extract(self, completion: str) -> str | None:
        return extract_answer_phrase(completion)

    def sample_response(self, problem: Problem, rng: random.Random) -> str:
        """Draw whole responses until one fits the length bound, else the fallback (which fits)."""
        for _ in range(64):
            response = self.draw_response(problem, rng)
            if count_tokens(response) <= self.max_response_tokens:
                return response
        return self.fallback_response(problem)

    def draw_response(self, problem: Problem, rng: random.Random) -> str:
        raise NotImplementedError

    def shortest_response(self, problem: Problem) -> str:
        raise NotImplementedError

    def fallback_response(self, problem: Problem) -> str:
        """What `sample_response` returns when no draw fits: the shortest form, unless a task's
        options ask for a longer fixed form that still fits."""
        return self.shortest_response(problem)

"""Training examples and batches, in exactly the layout the decode loop uses.

An example is a prompt (token ids, chat template applied) and a response (token ids, no special
tokens). A batch left-pads the prompts to the longest prompt of the batch and gives every row a
response region of exactly `gen_length` positions at the end: the response, then EOS up to
`gen_length`. That is the canvas `unmask.decoding.generate` fills, so the model learns where
answers end (EOS positions are response positions and get loss) on the positions it will see.

Sources:
- `TaskSource` — an endless stream over the generated task families: a problem drawn uniformly
  from the train split of a task chosen uniformly (or by `weights`), answered by a fresh
  `sample_response`. With `hard_bias` B > 0 the problem is drawn in proportion to
  `task.hardness(problem) ** B` instead (the test and dev splits are never touched).
- `JsonlSource` — a fixed list of {"prompt" | "messages", "response"} records (R²-SFT and
  fine-tuning data), sampled uniformly with replacement.

Both draw from one `random.Random` that the trainer owns, so resuming restores the data stream.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.errors import UnmaskError


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq): padding, prompt, response + EOS padding
    attention_mask: torch.Tensor  # (batch, seq) bool, False on left padding
    response_mask: torch.Tensor  # (batch, seq) bool, True on the last gen_length positions

    @property
    def gen_length(self) -> int:
        return int(self.response_mask[0].sum())


def collate(examples: list[Example], gen_length: int, pad_id: int, eos_id: int) -> Batch:
    """Left-pad prompts, append each response and EOS-pad it to `gen_length`."""
    prompt_len = max(len(e.prompt_ids) for e in examples)
    seq = prompt_len + gen_length
    input_ids = torch.full((len(examples), seq), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), seq), dtype=torch.bool)
    for row, example in enumerate(examples):
        if len(example.response_ids) > gen_length:
            raise UnmaskError(
                f"a response of {len(example.response_ids)} tokens does not fit gen_length {gen_length}; raise --gen-length"
            )
        start = prompt_len - len(example.prompt_ids)
        input_ids[row, start:prompt_len] = torch.tensor(example.prompt_ids, dtype=torch.long)
        response = example.response_ids + [eos_id] * (gen_length - len(example.response_ids))
        input_ids[row, prompt_len:] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, start:] = True
    response_mask = torch.zeros_like(attention_mask)
    response_mask[:, prompt_len:] = True
    return Batch(input_ids, attention_mask, response_mask)


class TaskSource:
    """Endless (prompt, sampled worked answer) pairs from the train split of generated tasks."""

    def __init__(self, tokenizer, task_names: list[str], gen_length: int, weights: Sequence[float] | None = None,
                 hard_bias: float = 0.0):
        from unmask.tasks import get_task

        self.tokenizer = tokenizer
        # equal weights keep the uniform draw, so a run without weights is bit-identical to before
        self.weights = list(weights) if weights is not None and len(set(weights)) > 1 else None
        self.tasks = []
        for name in task_names:
            task = get_task(name)
            bound = getattr(task, "max_response_tokens", 0)
            if not bound:
                raise UnmaskError(f"task {name!r} cannot generate training answers; use arith or trace, or pass --data FILE")
            if bound > gen_length:
                raise UnmaskError(f"task {name!r} answers reach {bound} tokens but gen_length is {gen_length}; pass --gen-length {bound} or more")
            self.tasks.append((task, task.problems("train")))
        # cumulative hardness ** bias per pool; None keeps the uniform draw (and its random stream)
        self._cumulative = [
            list(itertools.accumulate(task.hardness(p) ** hard_bias for p in pool)) if hard_bias > 0 else None
            for task, pool in self.tasks
        ]
        self._prompt_cache: dict[str, list[int]] = {}  # chat templating is the slow part

    def sample(self, rng: random.Random) -> Example:
        if self.weights is None:
            index = rng.randrange(len(self.tasks))
        else:
            index = rng.choices(range(len(self.tasks)), weights=self.weights)[0]
        (task, pool), cumulative = self.tasks[index], self._cumulative[index]
        problem = pool[rng.randrange(len(pool))] if cumulative is None else rng.choices(pool, cum_weights=cumulative)[0]
        prompt = self._prompt_cache.get(problem.id)
        if prompt is None:
            prompt = self._prompt_cache[problem.id] = self.tokenizer.prompt_ids(task.messages(problem))
        return Example(prompt, self.tokenizer.encode(task.sample_response(problem, rng)))


class JsonlSource:
    """Records {"prompt": str | "messages": [...], "response": str}, one JSON object per line."""

    def __init__(self, tokenizer, path: str | Path, gen_length: int):
        path = Path(path)
        if not path.is_file():
            raise UnmaskError(f"--data {path} is not a file; pass a JSONL file of prompt/response records")
        self.examples: list[Example] = []
        too_long = 0
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UnmaskError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(record, dict) or "response" not in record or not ("prompt" in record or "messages" in record):
                raise UnmaskError(f"{path}:{lineno} needs a \"prompt\" (or \"messages\") and a \"response\" field")
            prompt = record.get("messages", record.get("prompt"))
            if not isinstance(prompt, (str, list)) or not prompt or not isinstance(record["response"], str):
                raise UnmaskError(f"{path}:{lineno}: prompt must be a non-empty string or message list and response a string")
            response_ids = tokenizer.encode(record["response"])
            if len(response_ids) > gen_length:
                too_long += 1
                continue
            self.examples.append(Example(tokenizer.prompt_ids(prompt), response_ids))
        if not self.examples:
            reason = f" ({too_long} longer than gen_length {gen_length})" if too_long else ""
            raise UnmaskError(f"{path} holds no usable records{reason}; add records or raise --gen-length")
        self.skipped = too_long

    def sample(self, rng: random.Random) -> Example:
        return self.examples[rng.randrange(len(self.examples))]


class MixedSource:
    """Draws from several sources in turn of a uniform choice (e.g. tasks and a JSONL file)."""

    def __init__(self, sources: list):
        self.sources = sources

    def sample(self, rng: random.Random) -> Example:
        return self.sources[rng.randrange(len(self.sources))].sample(rng) if len(self.sources) > 1 else self.sources[0].sample(rng)

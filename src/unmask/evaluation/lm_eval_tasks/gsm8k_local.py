"""The `!function` hooks of gsm8k_local.yaml. lm-eval loads this file by its path (next to the
YAML), so it imports only from the installed `unmask` package."""

from __future__ import annotations

from typing import Any


def load_dataset(**_metadata: Any):
    """lm-eval's `custom_dataset`: the GSM8K test split as an in-memory `datasets.DatasetDict`.

    The rows are the ones `unmask bench --task gsm8k` reads (the packaged file, or `UNMASK_GSM8K`
    when set). lm-eval passes the task's metadata as keyword arguments; none is needed here.
    """
    import datasets

    from unmask.tasks.gsm8k import GSM8KTask

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM8KTask().records())})


def fewshot_samples() -> list[dict[str, str]]:
    """The worked examples for `--num_fewshot k` (the first k are used): unmask's own, written for
    the project and disjoint from the test split, so few-shot never needs a train split."""
    from unmask.tasks.gsm8k import FEWSHOT_EXAMPLES

    return [{"question": question, "answer": answer} for question, answer in FEWSHOT_EXAMPLES]

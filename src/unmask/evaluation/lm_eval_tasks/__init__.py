"""lm-evaluation-harness task configs that ship with unmask.

`unmask lm-eval` (and `python -m unmask.evaluation`) puts `TASKS_DIR` on lm-eval's task search
path before any `--include_path` of yours, so these tasks are there by name; from Python, pass
`TaskManager(include_path=TASKS_DIR)` to `lm_eval.simple_evaluate(..., task_manager=...)`.

- `gsm8k_local` (gsm8k_local.yaml): GSM8K's test split from the copy inside this package, run
  offline; lm-eval's gsm8k prompt, filters and metric, zero-shot by default, and `--num_fewshot k`
  (k <= 8) prepends unmask's own worked examples, never test problems (see unmask.tasks.gsm8k).

The YAML files are static: their data comes through `!function` hooks in the module beside them
(lm-eval imports it by its file path), which read the packaged file into an in-memory dataset. No
path is written anywhere at run time, and nothing goes to the Hugging Face datasets cache, so it
works from a read-only install and with HF_DATASETS_OFFLINE=1.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]

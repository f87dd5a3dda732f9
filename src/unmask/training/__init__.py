"""Training: one masked-diffusion SFT trainer for the built-in model, fine-tuning and R²-SFT.

- `tokenizer.py` — the built-in word-level tokenizer (closed vocabulary of the generated tasks)
- `data.py` — training examples (generated tasks or a JSONL file) and batches in the decode layout
- `trainer.py` — `TrainConfig` and the one training loop (loss, schedule, eval, checkpoints)
- `sft.py` — model construction (fresh or `--init`) and the `train sft` entry point
- `cli.py` — argparse plumbing for `unmask train sft`
"""

from unmask.training.tokenizer import build_builtin_tokenizer
from unmask.training.trainer import TrainConfig

__all__ = ["TrainConfig", "build_builtin_tokenizer"]

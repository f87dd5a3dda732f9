"""Inference code never imports from `unmask.training`: decoding, models, bench, serve, evaluation
and viz must work without the training package (and a policy never depends on a trainer)."""

from pathlib import Path

import unmask

INFERENCE = ("decoding", "models", "bench", "serve", "evaluation", "viz", "tasks")


def test_no_inference_module_imports_training():
    root = Path(unmask.__file__).parent
    offenders = []
    for package in INFERENCE:
        for path in (root / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                if stripped.startswith(("import unmask.training", "from unmask.training")):
                    offenders.append(f"{path.relative_to(root)}:{number}: {stripped}")
    assert not offenders, "inference code imports training:\n" + "\n".join(offenders)

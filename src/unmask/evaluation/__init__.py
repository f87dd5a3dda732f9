"""Evaluation-harness integrations: unmask as an lm-evaluation-harness model (`--model unmask`).

lm-eval is an optional dependency (`pip install 'unmask[eval]'`); nothing here imports it until
`register()` is called. `unmask lm-eval ...` (see `unmask.evaluation.cli`) registers and then runs
lm-eval's own command line.
"""

from __future__ import annotations

from unmask.errors import UnmaskError


def register():
    """Make `unmask` a model name lm-eval knows, in this process; returns the model class.

    lm-eval 0.4.13 has no plugin discovery, so call this before `lm_eval.simple_evaluate(
    model="unmask", ...)`. Calling it again is harmless.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UnmaskError("lm-eval is not installed; install it with `pip install 'unmask[eval]'`") from None
    from unmask.evaluation.lm_eval import UnmaskLM

    return UnmaskLM


__all__ = ["register"]

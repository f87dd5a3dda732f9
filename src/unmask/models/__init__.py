"""Networks and loading: `load_model(spec)` returns a `DiffusionLM` for any supported checkpoint."""

from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.models.loading import load_model, save_checkpoint
from unmask.models.tokenizer import Tokenizer

__all__ = ["DecodeDefaults", "DiffusionLM", "Tokenizer", "load_model", "save_checkpoint"]

"""The generic adapter: any other masked-diffusion checkpoint, through `transformers`.

LLaDA and Dream have native networks; everything else (a masked LM such as BERT/RoBERTa/ModernBERT
used as a diffusion model, or a dLLM that ships its own modelling code) is loaded with
`AutoModelForMaskedLM`, else `AutoModel`, and wrapped so that it answers the same
`forward(input_ids, position_ids, key_mask, cache)` call as the native networks.

What is read from the checkpoint:
- the mask token: `mask_token_id` in config.json, else the tokenizer's mask token;
- whether logits are shifted (position i scored at i-1, as in AR-adapted models): the first of the
  boolean config.json keys `unmask_shifted`, `shift_logits`, `shifted` that is present; default False;
- EOS: `eos_token_id` in config.json (an int or a list; every id in a list stops an answer), else the
  tokenizer's EOS, else its SEP token (BERT-style tokenizers have no EOS).

Loading is offline (the folder is local by now), reads safetensors only, and runs remote code only
when the user passes `trust_remote_code`. There is no KV cache: `supports_cache=False`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from unmask.errors import UnmaskError
from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.models.tokenizer import Tokenizer

SHIFT_KEYS = ("unmask_shifted", "shift_logits", "shifted")
LENGTH_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>")


class HFNetwork(nn.Module):
    """A `transformers` model behind the native networks' forward signature; returns float32 logits."""

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model = model
        self.config = model.config
        self.vocab_size = vocab_size
        # remote-code models do not all take position_ids; without them left padding shifts positions
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, position_ids, key_mask=None, cache=None):
        if cache is not None:
            raise ValueError("the generic transformers adapter has no KV cache (supports_cache is False)")
        kwargs = {"attention_mask": key_mask.long() if key_mask is not None else None}
        if self.takes_position_ids and position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, **kwargs)
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, tuple) and out and torch.is_tensor(out[0]):
            # return_dict=False models: the first output is the logits only if it spans the vocabulary
            logits = out[0] if out[0].shape[-1] == self.vocab_size else None
        if logits is None:
            raise UnmaskError(
                f"{type(self.model).__name__} returns no vocabulary logits; the checkpoint needs a masked-LM head "
                "(an *ForMaskedLM class or a diffusion model whose output has .logits)"
            )
        return logits.float()


def _auto_class(config, trust_remote_code: bool):
    from transformers import AutoModel, AutoModelForMaskedLM

    auto_map = getattr(config, "auto_map", None) or {}
    for auto in (AutoModelForMaskedLM, AutoModel):
        if trust_remote_code and auto.__name__ in auto_map:
            return auto
        if type(config) in auto._model_mapping:
            return auto
    raise UnmaskError(
        f"transformers has no masked-LM or base model class for model_type {getattr(config, 'model_type', '?')!r}; "
        "use a LLaDA or Dream checkpoint, or one transformers can load"
    )


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers
    from packaging.version import Version

    # `torch_dtype` was renamed `dtype` in transformers 4.56
    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def _token_ids(raw: dict, tokenizer: Tokenizer, path: Path) -> dict:
    hf = tokenizer.hf
    mask = raw.get("mask_token_id")
    if mask is None:
        mask = hf.mask_token_id
    if mask is None:
        raise UnmaskError(
            f"checkpoint {path} declares no mask token (no mask_token_id in config.json, no mask_token in its "
            "tokenizer); add mask_token_id to config.json"
        )
    eos = raw.get("eos_token_id")
    stop = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if not stop:
        fallback = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        stop = [fallback] if fallback is not None else []
    if not stop:
        raise UnmaskError(f"checkpoint {path} declares no EOS token (config.json or tokenizer); add eos_token_id to config.json")
    for token in END_OF_TURN:
        tid = tokenizer.token_id(token)
        if tid is not None and tid not in stop:
            stop.append(tid)
    pad = raw.get("pad_token_id")
    if pad is None:
        pad = hf.pad_token_id if hf.pad_token_id is not None else stop[0]
    return dict(mask_id=int(mask), eos_id=int(stop[0]), stop_ids=tuple(int(s) for s in stop), pad_id=int(pad))


def _first_line(exc: Exception) -> str:
    """transformers' messages run over many lines; the user gets the first, in one sentence."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:200]}"


def _shifted(raw: dict) -> bool:
    for key in SHIFT_KEYS:
        if key in raw:
            return bool(raw[key])
    return False


def load_generic(
    path: Path,
    raw_config: dict,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> DiffusionLM:
    """Load a checkpoint that has no native network through `transformers`, behind `DiffusionLM`."""
    from unmask.models.loading import weight_files

    path = Path(path)
    if raw_config.get("auto_map") and not trust_remote_code:
        classes = ", ".join(sorted(raw_config["auto_map"]))
        raise UnmaskError(
            f"checkpoint {path} runs remote code (auto_map: {classes}); pass --trust-remote-code if you trust it"
        )
    weight_files(path)  # safetensors present and complete, or a clear error before transformers tries
    tokenizer = Tokenizer.from_dir(path, trust_remote_code=trust_remote_code)
    ids = _token_ids(raw_config, tokenizer, path)

    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = raw_config.get("model_type")
    if not raw_config.get("auto_map") and model_type not in CONFIG_MAPPING:
        raise UnmaskError(
            f"{path / 'config.json'} has model_type {model_type!r}, which is neither LLaDA nor Dream nor known to "
            "transformers; use a supported checkpoint or a newer transformers"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for broken configs
        raise UnmaskError(f"transformers cannot read {path / 'config.json'} ({_first_line(exc)}); restore the original file") from None
    auto = _auto_class(config, trust_remote_code)
    try:
        model = auto.from_pretrained(
            str(path),
            config=config,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **_dtype_kwargs(dtype),
        )
    except Exception as exc:
        raise UnmaskError(f"transformers could not load the weights in {path} ({_first_line(exc)}); re-download or re-save them") from None
    model.to(device=device, dtype=dtype).eval()

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else int(getattr(config, "vocab_size", 0) or len(tokenizer.hf))
    max_length = next((int(raw_config[k]) for k in LENGTH_KEYS if isinstance(raw_config.get(k), int)), 4096)
    return DiffusionLM(
        network=HFNetwork(model, vocab),
        tokenizer=tokenizer,
        name=raw_config.get("unmask_name") or str(path),
        shifted=_shifted(raw_config),
        max_length=max_length,
        defaults=DecodeDefaults(**raw_config.get("unmask_defaults", {})),
        supports_cache=False,
        path=str(path),
        kind="hf",
        **ids,
    )

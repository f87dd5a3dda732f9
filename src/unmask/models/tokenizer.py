"""Tokenizer with a chat template, loaded from a checkpoint's tokenizer.json / tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from unmask.errors import UnmaskError

# transformers 5 names its generic fast tokenizer `TokenizersBackend` in tokenizer_config.json, a class 4.x
# lacks; `PreTrainedTokenizerFast` is the same tokenizer under a name both read back
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def make_portable(path: str | Path) -> None:
    """Rewrite the tokenizer files in `path` so that transformers 4.x reads them as 5.x does.

    transformers 5 writes a class name 4.x lacks and keeps the chat template in chat_template.jinja,
    which older 4.x releases do not read. The class becomes PreTrainedTokenizerFast and the template moves
    into tokenizer_config.json (its one copy, read by every version). Idempotent.
    """
    path = Path(path)
    config_file = path / "tokenizer_config.json"
    if not config_file.exists():
        return
    cfg = json.loads(config_file.read_text())
    cls = cfg.get("tokenizer_class")
    if cls in PORTABLE_CLASSES:
        cfg["tokenizer_class"] = PORTABLE_CLASSES[cls]
    template_file = path / CHAT_TEMPLATE_FILE
    if template_file.exists():  # the file wins, as it does when transformers 5 reads both
        cfg["chat_template"] = template_file.read_text()
        template_file.unlink()
    config_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


class Tokenizer:
    """Thin wrapper over a `transformers` fast tokenizer: encode, decode, and the chat prompt."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def from_dir(cls, path: str | Path, trust_remote_code: bool = False) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            raise UnmaskError(
                f"checkpoint {path} has no tokenizer.json or tokenizer_config.json; "
                "copy the tokenizer files of the model into that folder"
            )
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its notes about config.json model types are noise here

        try:
            if (path / "tokenizer_config.json").exists():
                hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            else:
                hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        except Exception as exc:  # transformers raises many kinds here; the user needs one sentence
            raise UnmaskError(f"could not load the tokenizer in {path}: {exc}") from None
        return cls(hf)

    def save(self, path: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json (with the chat template) in `path`, readable by transformers 4.x and 5.x."""
        self.hf.save_pretrained(str(path))
        make_portable(path)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or tid == self.hf.unk_token_id and token != self.hf.unk_token:
            return None
        return int(tid)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` with the chat template and the generation prompt appended."""
        if not self.has_chat_template:
            return self.encode("\n".join(m["content"] for m in messages))
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def prompt_ids(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """A raw string becomes a one-message chat when the tokenizer has a template and `chat` is on."""
        if isinstance(prompt, list):
            return self.chat_prompt(prompt)
        if chat and self.has_chat_template:
            return self.chat_prompt([{"role": "user", "content": prompt}])
        return self.encode(prompt)

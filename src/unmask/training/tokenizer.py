"""The built-in model's tokenizer: word level, closed vocabulary, LLaDA's chat format.

The generated task families have a closed word list (`Task.vocabulary()`), so a word-level
tokenizer covers every question and answer with a vocabulary of ~150 entries: lowercase, split on
whitespace and punctuation, every digit its own token (so "13" is "1", "3", the unit that
`unmask.tasks.count_tokens` counts). Decoding joins tokens with spaces ("the answer is 1 3 ."),
which the tasks' answer extraction reads back.
"""

from __future__ import annotations

from unmask.models.tokenizer import Tokenizer

EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
BOS = "<|startoftext|>"
UNK = "<unk>"
SPECIAL_TOKENS = (EOS, MASK, BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", UNK)
ROLES = ("system", "user", "assistant")

# LLaDA-Instruct's chat format in the same special tokens (as `unmask.testing` uses)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def builtin_vocabulary(task_names: tuple[str, ...] | list[str] = ("arith", "trace")) -> list[str]:
    """Special tokens, digits, role words, then the sorted union of the tasks' words."""
    from unmask.tasks import get_task

    words: set[str] = set()
    for name in task_names:
        words |= {w.lower() for w in get_task(name).vocabulary()}
    vocab: list[str] = []
    for token in list(SPECIAL_TOKENS) + [str(d) for d in range(10)] + list(ROLES) + sorted(words):
        if token not in vocab:
            vocab.append(token)
    return vocab


def build_builtin_tokenizer(task_names: tuple[str, ...] | list[str] = ("arith", "trace")) -> Tokenizer:
    """A word-level `tokenizers` tokenizer over the tasks' closed vocabulary, with the chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(builtin_vocabulary(task_names))}
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    raw.decoder = decoders.WordPiece(prefix="##")  # joins tokens with single spaces
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        mask_token=MASK,
    )
    hf.chat_template = CHAT_TEMPLATE
    return Tokenizer(hf)

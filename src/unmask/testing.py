"""Tiny random models and checkpoints in the real layouts, for tests and for trying things out.

Nothing here downloads: the tokenizer is a word-level `tokenizers` model built in memory, the
weights are random, and the checkpoint folders have exactly the names, shapes, sharding and config
keys of the real LLaDA and Dream releases (only smaller).
"""

from __future__ import annotations

from pathlib import Path

import torch

from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.models.llada import LLaDAConfig, LLaDANetwork
from unmask.models.llada_arch import LLADA_BLOCKS
from unmask.models.tokenizer import Tokenizer

TINY_WORDS = (
    "the a is of and to in it was he she they we you i what how many much answer so then now total "
    "has have had gets gave buys sold left more less each apples pens books cats dogs plus minus times "
    "print x y z = + - * ( ) . , ? ! : def return if else for while true false hello world tom ann sam"
).split()

# LLaDA-Instruct's chat format, in the same special tokens
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiny_tokenizer(
    special: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<unk>"),
    chat_template: str | None = LLADA_CHAT_TEMPLATE,
    bos: str | None = "<|startoftext|>",
    eos: str = "<|endoftext|>",
    words: tuple[str, ...] | list[str] = TINY_WORDS,
    mask: str = "<|mdm_mask|>",
) -> Tokenizer:
    """A word-level tokenizer: special tokens first, then digits, roles and `words`."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in list(special) + [str(d) for d in range(10)] + ["user", "assistant", "system"] + list(words):
        vocab.setdefault(token, len(vocab))
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    raw.add_special_tokens(list(special))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token=eos,
        mask_token=mask,
    )
    if chat_template:
        hf.chat_template = chat_template
    return Tokenizer(hf)


def tiny_llada(
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    seed: int = 0,
    gen_length: int = 16,
    block_length: int = 8,
    tokenizer: Tokenizer | None = None,
    extra_rows: int = 5,
    block_causal: bool = False,
) -> DiffusionLM:
    """A random LLaDA-layout model in memory (vocabulary padded by `extra_rows`, as LLaDA pads);
    `block_causal`: the block-diffusion variant (unmask's `block_causal` key)."""
    tokenizer = tokenizer or tiny_tokenizer()
    hf = tokenizer.hf
    vocab = len(hf)
    cfg = LLaDAConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_layers=n_layers,
        mlp_hidden_size=d_model * 3,
        vocab_size=vocab + extra_rows,
        embedding_size=vocab + extra_rows,
        rope_theta=10000.0,
        max_sequence_length=512,
        mask_token_id=hf.convert_tokens_to_ids("<|mdm_mask|>"),
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.eos_token_id,
        block_causal=block_causal,
    )
    network = LLaDANetwork(cfg)
    network.init_weights(std=0.5, seed=seed)
    network.eval()
    eot = tokenizer.token_id("<|eot_id|>")
    stop = (cfg.eos_token_id,) + ((eot,) if eot is not None else ())
    return DiffusionLM(
        network=network,
        tokenizer=tokenizer,
        mask_id=cfg.mask_token_id,
        eos_id=cfg.eos_token_id,
        stop_ids=stop,
        pad_id=cfg.pad_token_id,
        name="tiny-llada",
        defaults=DecodeDefaults(gen_length=gen_length, block_length=block_length),
        supports_cache=True,
        max_length=cfg.max_sequence_length,
        block_diffusion=LLADA_BLOCKS if block_causal else None,
    )


def write_tiny_llada(path: str | Path, max_shard_bytes: int | None = None, **kwargs) -> Path:
    """Write a tiny random LLaDA checkpoint folder (sharded with an index if `max_shard_bytes`)."""
    from unmask.models.loading import save_checkpoint

    return save_checkpoint(tiny_llada(**kwargs), path, max_shard_bytes=max_shard_bytes)


@torch.no_grad()
def reference_llada_logits(network: LLaDANetwork, input_ids: torch.Tensor) -> torch.Tensor:
    """A straightforward, loop-per-head LLaDA forward written independently of `layers.py`.

    Used by tests to check the native forward on the same weights; deliberately slow and literal.
    """
    cfg = network.config
    t = network.model.transformer
    head_dim = cfg.d_model // cfg.n_heads
    seq = input_ids.shape[1]
    x = t.wte.weight[input_ids].double()

    def rms(v, w):
        return w.double() * v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    pos = torch.arange(seq, dtype=torch.float64)
    inv = torch.tensor([cfg.rope_theta ** (-(2 * i) / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)
    ang = pos[:, None] * inv[None, :]  # (seq, head_dim/2)

    def rope(v):  # v: (seq, head_dim); pairs are (i, i + head_dim/2)
        a, b = v[:, : head_dim // 2], v[:, head_dim // 2 :]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)

    group = cfg.n_heads // cfg.kv_heads
    for blk in t.blocks:
        h = rms(x, blk.attn_norm.weight)
        q = h @ blk.q_proj.weight.double().T
        k = h @ blk.k_proj.weight.double().T
        v = h @ blk.v_proj.weight.double().T
        heads = []
        for b in range(x.shape[0]):
            outs = []
            for hd in range(cfg.n_heads):
                kv = hd // group
                qh = rope(q[b, :, hd * head_dim : (hd + 1) * head_dim])
                kh = rope(k[b, :, kv * head_dim : (kv + 1) * head_dim])
                vh = v[b, :, kv * head_dim : (kv + 1) * head_dim]
                w = torch.softmax(qh @ kh.T / head_dim**0.5, dim=-1)
                outs.append(w @ vh)
            heads.append(torch.cat(outs, dim=-1))
        att = torch.stack(heads)
        x = x + att @ blk.attn_out.weight.double().T
        h = rms(x, blk.ff_norm.weight)
        gate = h @ blk.ff_proj.weight.double().T
        x = x + ((gate * torch.sigmoid(gate)) * (h @ blk.up_proj.weight.double().T)) @ blk.ff_out.weight.double().T
    x = rms(x, t.ln_f.weight)
    head = t.wte.weight if cfg.weight_tying else t.ff_out.weight
    return x @ head.double().T


# ---------------------------------------------------------------------------------------------
# Dream

# Dream-Instruct's chat format (Qwen2 ChatML, with Qwen's default system turn), in the same tokens
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DREAM_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<unk>")


def tiny_dream_tokenizer() -> Tokenizer:
    """The tiny word-level tokenizer with Dream's special tokens, ChatML template and `<|mask|>`."""
    tokenizer = tiny_tokenizer(
        special=DREAM_SPECIAL,
        chat_template=DREAM_CHAT_TEMPLATE,
        bos=None,
        eos="<|endoftext|>",
        words=tuple(TINY_WORDS) + ("are", "helpful"),
    )
    # tiny_tokenizer names LLaDA's mask token; Dream's is <|mask|> (LLaDA's stays in the vocab, unused)
    tokenizer.hf.mask_token = "<|mask|>"
    return tokenizer


def tiny_dream(
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    gen_length: int = 16,
    block_length: int = 8,
    tokenizer: Tokenizer | None = None,
    extra_rows: int = 5,
) -> DiffusionLM:
    """A random Dream-layout model in memory (GQA and a padded vocabulary by default, as Dream-7B)."""
    from unmask.models.dream import DreamConfig, DreamNetwork

    tokenizer = tokenizer or tiny_dream_tokenizer()
    hf = tokenizer.hf
    eos = hf.convert_tokens_to_ids("<|endoftext|>")
    cfg = DreamConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        vocab_size=len(hf) + extra_rows,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        mask_token_id=hf.convert_tokens_to_ids("<|mask|>"),
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    network = DreamNetwork(cfg)
    network.init_weights(std=0.5, seed=seed)
    network.eval()
    im_end = tokenizer.token_id("<|im_end|>")
    stop = (eos,) + ((im_end,) if im_end is not None else ())
    return DiffusionLM(
        network=network,
        tokenizer=tokenizer,
        mask_id=cfg.mask_token_id,
        eos_id=eos,
        stop_ids=stop,
        pad_id=eos,
        name="tiny-dream",
        shifted=True,
        defaults=DecodeDefaults(gen_length=gen_length, block_length=block_length),
        supports_cache=True,
        max_length=cfg.max_position_embeddings,
        kind="dream",
    )


def write_tiny_dream(path: str | Path, max_shard_bytes: int | None = None, **kwargs) -> Path:
    """Write a tiny random Dream checkpoint folder (sharded with an index if `max_shard_bytes`)."""
    from unmask.models.loading import save_checkpoint

    return save_checkpoint(tiny_dream(**kwargs), path, max_shard_bytes=max_shard_bytes)


@torch.no_grad()
def reference_dream_logits(network, input_ids: torch.Tensor) -> torch.Tensor:
    """A literal float64 Dream forward, one head at a time, written independently of `layers.py`.

    Returns the network's raw (shifted) logits, (batch, seq, vocab): row i scores token i+1.
    Positions are 0..seq-1 (no padding). Deliberately slow; tests compare the native forward to it.
    """
    cfg = network.config
    m = network.model
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = cfg.hidden_size // n_heads
    half = head_dim // 2
    batch, seq = input_ids.shape

    def w(t):
        return t.detach().double()

    def rms(v, weight):
        return w(weight) * (v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def linear(v, layer):
        out = v @ w(layer.weight).T
        return out + w(layer.bias) if layer.bias is not None else out

    angle = torch.tensor(
        [[p / cfg.rope_theta ** (2 * i / head_dim) for i in range(half)] for p in range(seq)], dtype=torch.float64
    )  # (seq, head_dim/2)
    cos, sin = angle.cos(), angle.sin()

    def rotate(v):  # (seq, head_dim): Qwen2 pairs dimension i with i + head_dim/2
        lo, hi = v[:, :half], v[:, half:]
        return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1)

    x = w(m.embed_tokens.weight)[input_ids]  # (batch, seq, hidden)
    for layer in m.layers:
        att = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q, k, v = linear(h, att.q_proj), linear(h, att.k_proj), linear(h, att.v_proj)
        rows = []
        for b in range(batch):
            per_head = []
            for hd in range(n_heads):
                kv = hd * n_kv // n_heads  # heads share KV heads in consecutive groups
                qh = rotate(q[b, :, hd * head_dim : (hd + 1) * head_dim])
                kh = rotate(k[b, :, kv * head_dim : (kv + 1) * head_dim])
                vh = v[b, :, kv * head_dim : (kv + 1) * head_dim]
                scores = qh @ kh.T / head_dim**0.5  # bidirectional: no causal mask
                probs = scores.exp() / scores.exp().sum(-1, keepdim=True)
                per_head.append(probs @ vh)
            rows.append(torch.cat(per_head, dim=-1))
        x = x + linear(torch.stack(rows), att.o_proj)
        h = rms(x, layer.post_attention_layernorm.weight)
        gate = linear(h, layer.mlp.gate_proj)
        x = x + linear(gate / (1 + torch.exp(-gate)) * linear(h, layer.mlp.up_proj), layer.mlp.down_proj)
    x = rms(x, m.norm.weight)
    head = m.embed_tokens.weight if cfg.tie_word_embeddings else network.lm_head.weight
    return x @ w(head).T


class ScriptedNetwork(torch.nn.Module):
    """A network whose logits a test writes: `rule(tokens, gen_start) -> (probs over vocab)` per row.

    `rule` gets one row's token ids (1-D) and the index where the generation region starts, and
    returns a (seq, vocab) tensor of probabilities; logits are their logs. Every call is recorded
    in `calls` as the batch size, so tests can check model calls and rows.
    """

    def __init__(self, rule, vocab_size: int, gen_length: int):
        super().__init__()
        self.rule = rule
        self.vocab_size = vocab_size
        self.gen_length = gen_length
        self.calls: list[int] = []
        self._anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and dtype

    def forward(self, input_ids, position_ids, key_mask=None, cache=None):
        self.calls.append(int(input_ids.shape[0]))
        gen_start = input_ids.shape[1] - self.gen_length
        probs = torch.stack([self.rule(row, gen_start) for row in input_ids])
        return probs.clamp(min=1e-12).log()


def scripted_model(rule, gen_length: int, block_length: int, tokenizer: Tokenizer | None = None) -> DiffusionLM:
    """A `DiffusionLM` around a `ScriptedNetwork` with the tiny LLaDA tokenizer's special ids."""
    tokenizer = tokenizer or tiny_tokenizer()
    hf = tokenizer.hf
    network = ScriptedNetwork(rule, len(hf), gen_length)
    return DiffusionLM(
        network=network,
        tokenizer=tokenizer,
        mask_id=hf.convert_tokens_to_ids("<|mdm_mask|>"),
        eos_id=hf.eos_token_id,
        stop_ids=(hf.eos_token_id,),
        pad_id=hf.eos_token_id,
        name="scripted",
        defaults=DecodeDefaults(gen_length=gen_length, block_length=block_length),
        max_length=512,
    )


def peaked(targets, confidences, vocab_size: int) -> torch.Tensor:
    """(len, vocab) probabilities with `confidences[i]` on `targets[i]` and the rest spread evenly."""
    n = len(targets)
    conf = torch.as_tensor(confidences, dtype=torch.float32).reshape(n, 1)
    probs = ((1.0 - conf) / (vocab_size - 1)).expand(n, vocab_size).clone()
    probs[torch.arange(n), torch.as_tensor(targets)] = conf.squeeze(1)
    return probs


DRAFT_WORDS = "tom has 5 apples and ann has 3".split()
DRAFT_CONFIDENCES = (0.95, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)


def drafting_model(break_at: tuple[int, int] | None = None, confidences=DRAFT_CONFIDENCES) -> DiffusionLM:
    """A scripted LLaDA (one block of 8) for drafting tests, whatever the context.

    It predicts `DRAFT_WORDS` with `confidences` at every position. With `break_at=(p, q)`, position
    p predicts "dogs" instead while position q is filled and p is still masked (a draft that the
    call on a shallower canvas does not confirm). `drafting_model().network.calls` lists the rows
    of each call.
    """
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer.hf)
    mask = tokenizer.hf.convert_tokens_to_ids("<|mdm_mask|>")
    targets = [tokenizer.token_id(w) for w in DRAFT_WORDS]
    wrong = tokenizer.token_id("dogs")

    def rule(row, gen_start):
        probs = torch.full((row.shape[0], vocab), 1.0 / vocab)
        said = list(targets)
        gen = row[gen_start:]
        if break_at is not None and gen[break_at[1]] != mask and gen[break_at[0]] == mask:
            said[break_at[0]] = wrong
        probs[gen_start:] = peaked(said, confidences, vocab)
        return probs

    return scripted_model(rule, gen_length=len(targets), block_length=len(targets), tokenizer=tokenizer)


def make_view(probs, masked=None, stable=None, mask_id: int = 0, block_step: int = 0, rows=None):
    """A `StepView` for one block built from hand-made probabilities (batch, block, vocab).

    For unit tests of a policy's `decide`: statistics are computed the way the loop computes them.
    """
    from unmask.decoding.loop import token_stats
    from unmask.decoding.policies.base import StepView

    probs = torch.as_tensor(probs, dtype=torch.float32)
    if probs.dim() == 2:
        probs = probs[None]
    batch, block, _ = probs.shape
    logits = probs.clamp(min=1e-12).log()
    stats = token_stats(logits)
    masked = torch.ones(batch, block, dtype=torch.bool) if masked is None else torch.as_tensor(masked).reshape(batch, block)
    stable = torch.ones(batch, block, dtype=torch.long) if stable is None else torch.as_tensor(stable).reshape(batch, block)
    tokens = torch.where(masked, torch.full_like(stats["top1"], mask_id), stats["top1"])
    return StepView(
        rows=torch.arange(batch) if rows is None else torch.as_tensor(rows),
        positions=torch.arange(block).expand(batch, block),
        tokens=tokens,
        masked=masked,
        logits=logits,
        top1=stats["top1"],
        top1_prob=stats["top1_prob"],
        candidate=stats["top1"],
        confidence=stats["top1_prob"],
        margin=stats["margin"],
        entropy=stats["entropy"],
        stable=stable,
        prev_confidence=torch.full((batch, block), float("nan")),
        block_step=torch.full((batch,), block_step, dtype=torch.long),
        step=block_step,
        block_length=block,
        gen_length=block,
        num_blocks=1,
        mask_id=mask_id,
        stop_ids=(1,),
        generators=[torch.Generator().manual_seed(0) for _ in range(batch)],
    )


def logits_view(logits: torch.Tensor, masked: torch.Tensor, *, block_step: int = 0, gen_length: int | None = None,
                num_blocks: int = 1, seeds: list[int] | None = None):
    """A complete `StepView` built from raw logits (b, block, V), statistics computed in float64 (mask id 99).

    For tests of schedule rules that need exact arithmetic; `make_view` builds one from probabilities.
    """
    from unmask.decoding.policies.base import StepView

    b, block, _ = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    top = torch.topk(probs, 2, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
    top1 = top.indices[..., 0]
    seeds = seeds if seeds is not None else [0] * b
    return StepView(
        rows=torch.arange(b),
        positions=torch.arange(block).expand(b, block),
        tokens=torch.where(masked, torch.full_like(top1, 99), top1),
        masked=masked,
        logits=logits.float(),
        top1=top1,
        top1_prob=top.values[..., 0].float(),
        candidate=top1,
        confidence=top.values[..., 0].float(),
        margin=(top.values[..., 0] - top.values[..., 1]).float(),
        entropy=entropy.float(),
        stable=torch.ones(b, block, dtype=torch.long),
        prev_confidence=torch.full((b, block), float("nan")),
        block_step=torch.full((b,), block_step, dtype=torch.long),
        step=block_step,
        block_length=block,
        gen_length=gen_length or block * num_blocks,
        num_blocks=num_blocks,
        mask_id=99,
        stop_ids=(0,),
        generators=[torch.Generator().manual_seed(s) for s in seeds],
    )


def assert_left_padding_is_invisible(model: DiffusionLM, rows: list[list[int]], tol: float = 1e-4) -> None:
    """Left-pad `rows` into one batch and check each row's logits equal those of the row alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = True
    with torch.no_grad():
        batched = model.logits(ids, attention_mask=mask)
        for b, row in enumerate(rows):
            alone = model.logits(torch.tensor([row]))[0]
            torch.testing.assert_close(batched[b, width - len(row) :], alone, rtol=tol, atol=tol)


def write_tiny_controller(folder: str | Path, seed: int = 0, stability: bool = False) -> Path:
    """An untrained TSPD controller (random weights, seeded) saved in `folder`, for decode tests.

    It reads the paper's feature groups, plus the stability group with `stability=True`. Its
    probabilities are arbitrary but deterministic, which is all the loop's properties need.
    """
    from unmask.decoding.controller import Controller
    from unmask.decoding.features import controller_groups

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    controller = Controller(controller_groups(stability=stability))
    torch.random.set_rng_state(generator_state)
    return controller.save(folder)


def controller_strategies(folder: str | Path) -> dict[str, str]:
    """Strategy strings that run `tspd` (with CE) and `learned_drafts` on untrained controllers
    written under `folder`, with a tau of 0.5 so that both commit several positions per call.

    The seeds are picked so that the first prompt of the continuous-batching tests still takes 6
    calls or more on the tiny test models' 16-token canvases (seed 0 of the paper's feature set
    takes 4 or 5): sequences joining that decode at its fifth call must find it running.
    """
    folder = Path(folder)
    paper = write_tiny_controller(folder / "controller", seed=2)
    stability = write_tiny_controller(folder / "controller-stability", stability=True)
    return {"tspd": f"tspd:tau=0.5,ce=true,controller={paper}",
            "learned_drafts": f"learned_drafts:tau=0.5,controller={stability}"}


def error_of(fn, *args, **kwargs):
    """Call `fn` expecting an UnmaskError; check its message is one clear line and return it."""
    import pytest

    from unmask.errors import UnmaskError

    with pytest.raises(UnmaskError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, f"not one clear line: {message!r}"
    return info.value


class FaultyNetwork(torch.nn.Module):
    """Wraps a network and makes its logits non-finite on demand, to test the NaN guards.

    Call `n` (1-based, counted in `calls`) sets every logit of an output row to `value` (NaN by
    default) when `n >= from_call` and the row passes the optional filters: `trigger` (a token id
    the row's input must hold) and `masks_at_most` (the row holds at most that many `mask_id`
    tokens, i.e. an earlier block has been decoded). Rows are judged on the tokens the call gets,
    so the filters suit whole-canvas calls (no KV cache); `from_call` alone works with any cache.
    """

    def __init__(self, inner: torch.nn.Module, from_call: int = 1, trigger: int | None = None,
                 mask_id: int | None = None, masks_at_most: int | None = None, value: float = float("nan")):
        super().__init__()
        self.inner, self.vocab_size = inner, inner.vocab_size
        self.from_call, self.trigger, self.mask_id, self.masks_at_most, self.value = (
            from_call, trigger, mask_id, masks_at_most, value)
        self.calls = 0

    def forward(self, input_ids, position_ids=None, key_mask=None, cache=None):
        out = self.inner(input_ids, position_ids=position_ids, key_mask=key_mask, cache=cache)
        self.calls += 1
        if self.calls < self.from_call:
            return out
        hit = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.trigger is not None:
            hit &= (input_ids == self.trigger).any(-1)
        if self.masks_at_most is not None:
            hit &= (input_ids == self.mask_id).sum(-1) <= self.masks_at_most
        return torch.where(hit[:, None, None], torch.full_like(out, self.value), out)


def faulty_model(model: DiffusionLM, from_call: int = 1, trigger: str | None = None, after_blocks: int = 0,
                 value: float = float("nan")) -> DiffusionLM:
    """`model` returning `value` (NaN) logits from its call `from_call` on, for prompts holding the word
    `trigger` (all prompts if None), once `after_blocks` blocks of the default generation are decoded.

    A stand-in for a bf16 overflow or a broken checkpoint: a decode (or a server request) that hits
    it must fail with `NonFiniteLogitsError`, and one that does not must decode as `model` does.
    """
    import dataclasses

    trigger_id = None
    if trigger is not None:
        trigger_id = model.tokenizer.token_id(trigger)
        if trigger_id is None:
            raise ValueError(f"trigger {trigger!r} is not one token of the model's vocabulary")
    masks = None
    if after_blocks:
        masks = model.defaults.gen_length - after_blocks * model.defaults.block_length
    network = FaultyNetwork(model.network, from_call=from_call, trigger=trigger_id, mask_id=model.mask_id,
                            masks_at_most=masks, value=value)
    return dataclasses.replace(model, network=network)


def decode_until_final(model: DiffusionLM, prompt, strategy: str, **kwargs):
    """The decode a server runs for one request with no `max_tokens` and no `stop` strings: the
    sequence leaves as soon as a finished block puts a stop token in its generation so far (its
    answer can no longer change), written here from that rule alone. Returns its `SequenceResult`,
    whose `nfe` is the calls the server's decode of that request takes."""
    from unmask.decoding import generate

    final: set[int] = set()

    def on_block(seq: int, block: int, tokens: list[int]) -> None:
        if any(t in model.stop_ids for t in tokens):
            final.add(seq)

    return generate(model, [prompt], strategy, on_block=on_block, cancelled=lambda seq: seq in final,
                    **kwargs).sequences[0]


def serve_jobs(engine, jobs: list, timeout: float = 120.0, stop: bool = True) -> list:
    """Queue `jobs` on `engine` before its worker starts (so its first decode takes as many as fit),
    numbered 0.. in order, run them until each has its last event (done or error), stop the engine
    (unless `stop=False`: it serves on) and return every event. Raises AssertionError if they are not
    all answered in `timeout` seconds."""
    import threading

    events, lock, finished = [], threading.Lock(), threading.Event()
    for i, job in enumerate(jobs):
        job.index = i

    def sink(event) -> None:
        with lock:
            events.append(event)
            if sum(e.kind in ("done", "error") for e in events) == len(jobs):
                finished.set()

    engine.submit(jobs, sink)
    engine.start()
    try:
        assert finished.wait(timeout), f"{len(jobs)} jobs not all answered in {timeout} s: {events}"
    finally:
        if stop:
            engine.stop()
    return events


# the four block-diffusion and MoE families' special tokens and chat formats, for their tiny checkpoints
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LING_TEMPLATE = (
    "{% for message in messages %}{{ '<role>' + message['role'] | upper + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)
FAMILY_TOKENS = {
    # family: (special tokens, mask token, eos, chat template)
    "lladamoe": (("<|endoftext|>", "<|mask|>", "<|role_end|>", "<role>", "</role>", "<unk>"), "<|mask|>",
                 "<|endoftext|>", LING_TEMPLATE),
    "llada2": (("<|endoftext|>", "<|mask|>", "<|role_end|>", "<role>", "</role>", "<unk>"), "<|mask|>",
               "<|endoftext|>", LING_TEMPLATE),
    "sdar": (("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>", "<unk>"), "<|MASK|>", "<|endoftext|>",
             CHATML_TEMPLATE),
    "fastdllm_v2": (("<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|", "<unk>"), "|<MASK>|", "<|im_end|>",
                    CHATML_TEMPLATE),
}


def family_tokenizer(family: str) -> Tokenizer:
    """The tiny word-level tokenizer with `family`'s special tokens, mask token, EOS and chat format."""
    special, mask, eos, template = FAMILY_TOKENS[family]
    return tiny_tokenizer(special=special, chat_template=template, bos=None, eos=eos, mask=mask,
                          words=tuple(TINY_WORDS) + ("upper", "human"))



def write_tiny_sdar(path: str | Path, hidden_size: int = 256, num_hidden_layers: int = 4, num_attention_heads: int = 8,
                    num_key_value_heads: int = 4, head_dim: int = 32, intermediate_size: int = 512, seed: int = 0,
                    max_position_embeddings: int = 2048, block_size: int = 32, no_stop: bool = True) -> Path:
    """A random SDAR-layout (block-diffusion) checkpoint folder: Qwen3 names and config keys, the
    tiny SDAR tokenizer. With `no_stop` the output head never favours a stop token (its rows are
    zero), so every decode runs its whole length: for speed benchmarks of the exact cache."""
    import json

    from safetensors.torch import save_file

    from unmask.models.sdar import SDARConfig

    tokenizer = family_tokenizer("sdar")
    hf = tokenizer.hf
    raw = dict(model_type="sdar", architectures=["SDARForCausalLM"], vocab_size=len(hf) + 8, hidden_size=hidden_size,
               intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
               num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
               rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
               tie_word_embeddings=False, attention_bias=False, hidden_act="silu", block_size=block_size,
               mask_token_id=hf.mask_token_id, eos_token_id=hf.eos_token_id,
               unmask_defaults={"gen_length": 8 * block_size, "block_length": block_size})
    from unmask.models.decoder import DecoderNetwork

    network = DecoderNetwork(SDARConfig.from_dict(raw).layout)
    network.init_weights(std=0.2, seed=seed)
    if no_stop:
        with torch.no_grad():
            for token in ("<|endoftext|>", "<|im_end|>"):
                network.lm_head.weight[tokenizer.token_id(token)] = 0.0
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tokenizer.save(path)
    return path

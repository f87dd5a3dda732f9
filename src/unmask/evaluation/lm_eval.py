"""lm-evaluation-harness backend: `--model unmask` decodes with unmask's one loop.

Importing this module registers `UnmaskLM` in lm-eval's model registry under `unmask`. lm-eval
0.4.13 discovers no plugins, so the registration has to happen in the process that runs the
evaluation: `unmask lm-eval ...` (or `python -m unmask.evaluation ...`) does it before handing the
arguments to lm-eval's own CLI, and Python users call `unmask.evaluation.register()` before
`lm_eval.simple_evaluate(model="unmask", ...)`.

model_args (lm-eval splits them on commas):

    pretrained       checkpoint folder, hub id or `builtin` (default: the built-in model)
    strategy         NAME or NAME:key=value (default threshold:tau=0.9). Separate several strategy
                     parameters with `;` or `|`, not `,`: strategy=threshold:tau=0.8;temperature=0.5
    gen_length       the largest generation canvas (default: the checkpoint's); see generate_until
    block_length     semi-autoregressive block length (default: the checkpoint's)
    batch_size       prompts per decode batch (lm-eval's --batch_size lands here; default 8)
    device, dtype    as for `unmask generate` (default: best device; bf16 on CUDA, fp32 on CPU)
    seed             decode and Monte Carlo seed (default 0)
    apply_chat_template  wrap each raw prompt as one user turn in the checkpoint's chat template
                     (default false: prompts are fed raw). lm-eval's own --apply_chat_template
                     formats prompts (few-shot turns included) before they reach us; with it, this
                     flag is not needed and is ignored.
    trust_remote_code    allow a checkpoint's own Python code to run (default false)
    mc_num           Monte Carlo samples per loglikelihood request (default 32)
    mc_batch_size    sequences per forward when scoring loglikelihood (default 32)
    cache            KV cache mode for decoding: auto, none, prefix or dual (default auto: the exact cache of a block-diffusion model, none for a bidirectional one)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (built-in models first: get_model fills only an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from unmask.decoding import generate, parse_strategy
from unmask.decoding.config import DecodeConfig
from unmask.decoding.registry import build_policy
from unmask.errors import UnmaskError

logger = logging.getLogger("unmask.evaluation")

# lm-eval's names for "at most this many new tokens", in its own priority order
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# gen_kwargs that unmask reads; anything else (top_p, top_k, ...) has no meaning for the loop
KNOWN_GEN_KEYS = frozenset(("until", "do_sample", "temperature") + MAX_TOKEN_KEYS)


def normalize_strategy(spec: str) -> str:
    """The strategy string with `;` and `|` (usable inside lm-eval model_args) turned into `,`."""
    if not isinstance(spec, str):
        raise UnmaskError(f"strategy must be a string like threshold:tau=0.9, got {spec!r}", field="strategy")
    return spec.replace(";", ",").replace("|", ",")


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() or int(value) < 1:
        raise UnmaskError(f"{name} must be a positive integer, got {value!r}", field=name)
    return int(value)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none", ""):
        return False
    raise UnmaskError(f"{name} must be true or false, got {value!r}", field=name)


@dataclass
class _GenItem:
    """One generate_until request, encoded, with the settings its decode runs under."""

    ids: list[int]
    until: list[str]
    max_tokens: int | None  # the task's limit on the answer, in tokens (None: the canvas is the limit)
    canvas: int  # gen_length of the decode
    temperature: float | None  # the task's sampling temperature, when it asks to sample


@register_model("unmask")
class UnmaskLM(LM):
    """An lm-eval `LM` over any checkpoint unmask loads, decoding with any registered strategy.

    generate_until runs `unmask.decoding.generate` (batched, batch-invariant); loglikelihood is
    the Monte Carlo estimate of LLaDA's evaluation (Nie et al., 2025, "Large Language Diffusion
    Models", eval_llada.py); loglikelihood_rolling is not available (see its docstring).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        strategy: str = "threshold:tau=0.9",
        gen_length: int | None = None,
        block_length: int | None = None,
        batch_size: int | str | None = 8,
        device: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
        apply_chat_template: bool = False,
        trust_remote_code: bool = False,
        mc_num: int = 32,
        mc_batch_size: int = 32,
        cache: str = "auto",
        max_batch_size: int | None = None,  # lm-eval passes it with --batch_size auto; unused
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            raise UnmaskError(
                f"unknown model_args for unmask: {names}; known: pretrained, strategy, gen_length, block_length, "
                "batch_size, device, dtype, seed, apply_chat_template, trust_remote_code, mc_num, mc_batch_size, "
                "cache (strategy parameters are separated by ';' inside model_args, e.g. "
                "strategy=threshold:tau=0.9;temperature=0)",
                field=sorted(unknown)[0],
            )
        if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
            raise UnmaskError("batch_size auto is not supported by unmask; pass an integer, e.g. --batch_size 8", field="batch_size")
        self.batch_size = _positive_int("batch_size", 8 if batch_size is None else batch_size)
        self.mc_num = _positive_int("mc_num", mc_num)
        self.mc_batch_size = _positive_int("mc_batch_size", mc_batch_size)
        self.seed = int(seed)
        self.chat = _as_bool("apply_chat_template", apply_chat_template)
        # a bad strategy fails before the (possibly large) model loads
        self.strategy = normalize_strategy(strategy)
        policy = parse_strategy(self.strategy)
        self.policy_name, self.policy_params = policy.name, policy.params

        from unmask.models import load_model

        spec = None if pretrained in (None, "", "builtin") else str(pretrained)
        self.model = load_model(spec, device=device, dtype=dtype, trust_remote_code=_as_bool("trust_remote_code", trust_remote_code))
        decode = DecodeConfig(gen_length=gen_length, block_length=block_length, cache=cache).resolved(self.model.defaults)
        self.gen_length, self.block_length, self.cache = decode.gen_length, decode.block_length, decode.cache
        self._device = self.model.device
        self._bos = self._tokenizer_adds_bos()
        self._formatted_by_lm_eval = False  # set when lm-eval's --apply_chat_template formats prompts
        self._warned: set[str] = set()
        self.last_generate_stats: dict[str, float] = {}
        self.last_loglikelihood_stats: dict[str, float] = {}
        logger.info(
            "model %s on %s, strategy %s, gen_length %d, block_length %d",
            self.model.name, self.model.device, policy.describe(), self.gen_length, self.block_length,
        )

    # --- lm-eval plumbing ----------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "UnmaskLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "UnmaskLM":
        """model_args plus lm-eval's --batch_size/--device. lm-eval's CLI always passes those two
        (defaults 1 and cuda:0), so a value given in model_args wins instead of colliding."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def tokenizer_name(self) -> str:
        return (self.model.path or self.model.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.model.tokenizer.hf, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text in the checkpoint's template (lm-eval's --apply_chat_template calls this)."""
        hf = self.model.tokenizer.hf
        if not getattr(hf, "chat_template", None):
            raise UnmaskError(f"{self.model.name} has no chat template; run without --apply_chat_template")
        self._formatted_by_lm_eval = True
        return hf.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # --- tokenisation ------------------------------------------------------------------------
    def _tokenizer_adds_bos(self) -> list[int]:
        """[BOS] when the checkpoint's tokenizer puts BOS in front of plain text by itself (LLaDA's
        does), as lm-eval's HF backend and LLaDA's evaluation feed it; else []. Only BOS is taken:
        a tokenizer that also appends EOS must not end every prompt with it."""
        hf = self.model.tokenizer.hf
        bos = getattr(hf, "bos_token_id", None)
        if bos is None:
            return []
        probe = list(hf.encode("a", add_special_tokens=True))
        return [int(bos)] if probe[:1] == [bos] else []

    def _use_chat(self) -> bool:
        if self.chat and self._formatted_by_lm_eval:
            self._warn_once("chat", "lm-eval formatted the prompts with the chat template; apply_chat_template=true is ignored")
        return self.chat and not self._formatted_by_lm_eval

    def _encode_raw(self, text: str) -> list[int]:
        tok = self.model.tokenizer
        bos_text = getattr(tok.hf, "bos_token", None)
        prefix = self._bos if not (bos_text and text.startswith(bos_text)) else []
        return prefix + tok.encode(text)

    def _prompt_ids(self, context: str) -> list[int]:
        if self._use_chat():
            return self.model.tokenizer.prompt_ids(context, chat=True)
        return self._encode_raw(context)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids). Raw text is encoded whole and split after the context
        (trailing spaces of the context move to the continuation), as lm-eval's HF backend does, so
        the continuation is tokenised as it appears after the context."""
        tok = self.model.tokenizer
        if self._use_chat():
            return tok.prompt_ids(context, chat=True), tok.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self._encode_raw(context)
        whole = self._encode_raw(context + continuation)
        if whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, tok.encode(continuation)

    # --- generate_until ------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: Any) -> tuple[list[str], int | None, int, float | None]:
        """(until, max answer tokens, canvas length, sampling temperature) for one request.

        Canvas: `gen_length` is the largest canvas. A task that sets max_gen_toks (or an alias)
        gets a canvas of min(max_gen_toks, gen_length) rounded up to a multiple of block_length,
        and its answer is cut at max_gen_toks tokens; a task that sets none decodes the full
        gen_length. A diffusion decode pays for every canvas position at every step, so a short
        task must not decode LLaDA's 256-token canvas, while a task asking for more than
        gen_length is capped (with a warning): raise gen_length to allow it.
        """
        if gen_kwargs is None:
            gen_kwargs = {}
        if not isinstance(gen_kwargs, dict):
            raise UnmaskError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        max_tokens = next((gen_kwargs[k] for k in MAX_TOKEN_KEYS if gen_kwargs.get(k) is not None), None)
        if max_tokens is None:
            canvas = self.gen_length
        else:
            max_tokens = _positive_int("max_gen_toks", max_tokens)
            if max_tokens > self.gen_length:
                self._warn_once(
                    f"cap{max_tokens}",
                    "the task allows %d new tokens but gen_length is %d: answers are capped at %d tokens "
                    "(pass gen_length=%d in model_args to allow more)",
                    max_tokens, self.gen_length, self.gen_length, math.ceil(max_tokens / self.block_length) * self.block_length,
                )
            wanted = min(max_tokens, self.gen_length)
            canvas = math.ceil(wanted / self.block_length) * self.block_length
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        sample = temperature > 0 and do_sample is not False
        ignored = sorted(set(gen_kwargs) - KNOWN_GEN_KEYS)
        if ignored:
            self._warn_once("ignored" + ",".join(ignored), "unmask ignores the generation kwargs %s", ", ".join(ignored))
        return until, max_tokens, canvas, (temperature if sample else None)

    def _fit_prompt(self, ids: list[int], room: int) -> list[int]:
        """Left-truncate a prompt to `room` tokens (lm-eval's HF backend does the same)."""
        if room < 1:
            raise UnmaskError(
                f"the model's context of {self.max_length} tokens leaves no room for a prompt; lower gen_length",
                field="gen_length",
            )
        if len(ids) > room:
            self._warn_once("truncate", "prompts longer than %d tokens are left-truncated to fit the model's context", room)
            return ids[-room:]
        return ids

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode every request with the strategy; the text is cut at the first `until` string.

        Requests are grouped by canvas length and temperature, sorted by prompt length (longest
        first) so batches pad little, decoded `batch_size` at a time, and returned in the original
        order. The loop is batch-invariant, so the grouping does not change any answer.
        """
        if not requests:
            return []
        started = time.perf_counter()
        items = []
        for request in requests:
            context, gen_kwargs = request.args
            until, max_tokens, canvas, temperature = self._generation_settings(gen_kwargs)
            ids = self._fit_prompt(self._prompt_ids(context), self.max_length - canvas)
            items.append(_GenItem(ids, until, max_tokens, canvas, temperature))

        groups: dict[tuple[int, float | None], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.canvas, item.temperature), []).append(index)

        outputs: list[str | None] = [None] * len(items)
        nfe = decided = useful = 0
        bar = tqdm(total=len(items), desc="unmask generate_until", disable=disable_tqdm)
        for (canvas, temperature), indices in groups.items():
            indices.sort(key=lambda i: -len(items[i].ids))
            params = dict(self.policy_params)
            if temperature is not None:
                params["temperature"] = temperature
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                policy = build_policy(self.policy_name, params)  # fresh: policies may keep per-decode state
                result = generate(
                    self.model, [items[i].ids for i in chunk], policy, chat=False,
                    gen_length=canvas, block_length=min(self.block_length, canvas), seed=self.seed, cache=self.cache,
                )
                for i, seq in zip(chunk, result.sequences):
                    item = items[i]
                    answer = seq.answer_ids if item.max_tokens is None else seq.answer_ids[: item.max_tokens]
                    text = cut_at_stop(self.model.tokenizer.decode(answer), item.until)
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    nfe += seq.nfe
                    decided += seq.decided
                    useful += seq.useful_tokens
                bar.update(len(chunk))
        bar.close()
        wall = time.perf_counter() - started
        self.last_generate_stats = {
            "requests": len(items), "nfe": nfe, "decided": decided, "useful_tokens": useful,
            "tpf": decided / max(nfe, 1), "wall_s": wall,
        }
        logger.info(
            "unmask generate_until: %d requests with %s: NFE %d (%.1f per request), TPF %.2f, %d useful tokens, %.1f s",
            len(items), self.strategy, nfe, nfe / len(items), decided / max(nfe, 1), useful, wall,
        )
        return outputs  # type: ignore[return-value]

    # --- loglikelihood -------------------------------------------------------------------------
    def _mask_patterns(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masking patterns for one continuation of `length` tokens: (mc_num + 1, length) bool and
        their weights length / l (mc_num + 1,). The last row masks everything and weighs 0: it is
        the greedy check, not a sample.

        l is drawn by systematic (stratified) sampling over the mc_num samples, as LLaDA's
        evaluation does: l_j = floor((j + U) * length / mc_num) + 1 with one U ~ U[0, 1). Over the
        samples each l in 1..length is equally likely, so the estimate stays unbiased, and the
        spread of l across samples is even. Which l positions are masked is uniform.

        Every request draws from a generator seeded with `seed` alone, so a request's estimate
        does not depend on the batch, order or other requests, and the choices of one question
        that have the same length are scored under the same masks (common random numbers: their
        difference, which decides multiple choice, is less noisy).
        """
        gen = torch.Generator().manual_seed(self.seed)
        offset = torch.rand((), generator=gen, dtype=torch.float64)
        scores = torch.rand((self.mc_num, length), generator=gen)
        j = torch.arange(self.mc_num, dtype=torch.float64)
        count = ((j + offset) * length / self.mc_num).floor().long().clamp(0, length - 1) + 1  # (mc,) in 1..length
        rank = scores.argsort(-1).argsort(-1)  # (mc, length): a uniform random order of positions
        patterns = torch.cat([rank < count[:, None], torch.ones(1, length, dtype=torch.bool)])
        weights = torch.cat([length / count.double(), torch.zeros(1, dtype=torch.float64)])
        return patterns, weights

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Monte Carlo estimate of log p(continuation | context), and an approximate is_greedy.

        For a continuation of L tokens, each of `mc_num` samples masks l in 1..L of its positions
        (chosen uniformly; see `_mask_patterns`), runs the model once on context + partly masked
        continuation, and takes the cross-entropy of the true tokens at the masked positions,
        weighted by L / l. Minus the mean over samples estimates the masked-diffusion bound on
        log p (LLaDA's evaluation). For L = 1 every sample masks the one token with weight 1, so
        the estimate is exactly that position's log-probability. The mask token is excluded from
        the softmax, as it is when decoding.

        is_greedy is approximated with one extra forward in which the whole continuation is
        masked: true when the argmax at every continuation position is the continuation's token.
        A decode would instead commit one position at a time and re-predict the rest, so this is
        stricter than a decode at the positions that a decode conditions on.

        Rows of many requests are packed into forwards of `mc_batch_size` sequences, requests
        sorted by length (longest first) so little padding is computed.
        """
        if not requests:
            return []
        started = time.perf_counter()
        model = self.model
        pairs = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = self._encode_pair(context, continuation)
            if len(cont) > self.max_length:
                raise UnmaskError(f"a continuation of {len(cont)} tokens exceeds the model's context of {self.max_length}")
            ctx = ctx[-(self.max_length - len(cont)) :] if len(ctx) + len(cont) > self.max_length else ctx
            pairs.append((ctx, cont))

        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        for i in set(range(len(pairs))) - set(scored):
            results[i] = (0.0, True)  # an empty continuation has probability 1
        scored.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))

        rows_per_request = self.mc_num + 1
        patterns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        by_length: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in scored:  # same length, same patterns (the generator is seeded alike): draw once
            length = len(pairs[i][1])
            if length not in by_length:
                by_length[length] = self._mask_patterns(length)
            patterns[i] = by_length[length]

        device = model.device
        loss_sum = torch.zeros(len(pairs), dtype=torch.float64, device=device)
        greedy = torch.zeros(len(pairs), dtype=torch.bool, device=device)
        forwards = 0
        bar = tqdm(total=len(scored), desc="unmask loglikelihood", disable=disable_tqdm)
        with torch.inference_mode():
            for segments in _row_chunks(scored, rows_per_request, self.mc_batch_size):
                self._score_chunk(segments, pairs, patterns, loss_sum, greedy)
                forwards += 1
                bar.update(sum(1 for _, _, end in segments if end == rows_per_request))
        bar.close()

        estimates = (-loss_sum / self.mc_num).cpu().tolist()
        greedy_list = greedy.cpu().tolist()
        for i in scored:
            results[i] = (float(estimates[i]), bool(greedy_list[i]))
            self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        wall = time.perf_counter() - started
        self.last_loglikelihood_stats = {
            "requests": len(pairs), "mc_num": self.mc_num, "forwards": forwards,
            "rows": len(scored) * rows_per_request, "wall_s": wall,
        }
        logger.info(
            "unmask loglikelihood: %d requests, %d Monte Carlo samples each (+1 greedy check): %d forwards, %.1f s",
            len(pairs), self.mc_num, forwards, wall,
        )
        return results  # type: ignore[return-value]

    def _score_chunk(self, segments, pairs, patterns, loss_sum: torch.Tensor, greedy: torch.Tensor) -> None:
        """One forward over the rows in `segments` ((request, first row, end row) each): adds each
        sample's weighted masked cross-entropy to loss_sum[request] and sets greedy[request]."""
        model = self.model
        device = model.device
        rows = sum(end - start for _, start, end in segments)
        width = max(len(pairs[q][0]) + len(pairs[q][1]) for q, _, _ in segments)
        span = max(len(pairs[q][1]) for q, _, _ in segments)  # continuations end every row: the last `span` columns
        tokens = torch.full((rows, width), model.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, width), dtype=torch.bool)
        masked = torch.zeros((rows, span), dtype=torch.bool)
        target = torch.zeros((rows, span), dtype=torch.long)
        valid = torch.zeros((rows, span), dtype=torch.bool)
        weight = torch.zeros(rows, dtype=torch.float64)
        owner = torch.zeros(rows, dtype=torch.long)
        check = torch.zeros(rows, dtype=torch.bool)
        row = 0
        for q, start, end in segments:  # a handful of requests per chunk; positions are vectorised
            ctx, cont = pairs[q]
            n, length = end - start, len(cont)
            cont_t = torch.tensor(cont, dtype=torch.long)
            pattern, weights = patterns[q]
            pattern = pattern[start:end]  # (n, length)
            seq_len = len(ctx) + length
            if ctx:
                tokens[row : row + n, width - seq_len : width - length] = torch.tensor(ctx, dtype=torch.long)
            tokens[row : row + n, width - length :] = torch.where(pattern, model.mask_id, cont_t)
            attention[row : row + n, width - seq_len :] = True
            masked[row : row + n, span - length :] = pattern
            target[row : row + n, span - length :] = cont_t
            valid[row : row + n, span - length :] = True
            weight[row : row + n] = weights[start:end]
            owner[row : row + n] = q
            check[row : row + n] = torch.arange(start, end) == self.mc_num
            row += n

        tokens, attention = tokens.to(device), attention.to(device)
        masked, target, valid = masked.to(device), target.to(device), valid.to(device)
        logits = model.logits(tokens, attention)[:, width - span :].float()  # (rows, span, vocab)
        logits[..., model.mask_id] = float("-inf")
        token_logp = logits.gather(-1, target[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (rows, span)
        loss = torch.where(masked, -token_logp, torch.zeros_like(token_logp)).sum(-1).double()  # (rows,)
        loss_sum.index_add_(0, owner.to(device), loss * weight.to(device))
        if bool(check.any()):
            hit = ((logits.argmax(-1) == target) | ~valid).all(-1)  # (rows,)
            check = check.to(device)
            greedy[owner.to(device)[check]] = hit[check]

    # --- loglikelihood_rolling -----------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Not available: perplexity tasks need a left-to-right likelihood a diffusion LM lacks."""
        raise NotImplementedError(
            "unmask does not implement loglikelihood_rolling (perplexity tasks such as wikitext): a masked "
            "diffusion LM attends bidirectionally and has no left-to-right factorisation, so there are no "
            "per-token conditional log-probabilities to roll over context windows; its likelihood is only a "
            "Monte Carlo bound over masking patterns, which loglikelihood computes for (context, continuation) "
            "pairs. Use loglikelihood (multiple_choice) or generate_until tasks."
        )


def _row_chunks(order: list[int], rows_per_request: int, chunk_rows: int):
    """Split the rows of requests `order` (rows_per_request each, in order) into chunks of at most
    `chunk_rows` rows; yields lists of (request, first row, end row) segments."""
    segments, filled = [], 0
    for q in order:
        start = 0
        while start < rows_per_request:
            take = min(rows_per_request - start, chunk_rows - filled)
            segments.append((q, start, start + take))
            start += take
            filled += take
            if filled == chunk_rows:
                yield segments
                segments, filled = [], 0
    if segments:
        yield segments

"""The one decode loop.

Every strategy in unmask runs here: the loop builds the canvas (prompt + `gen_length` masks, left
padded into a batch, and right padded when sequences have different gen_lengths), calls the model, turns logits into per-position statistics, asks the policy
which positions to commit, writes them, advances blocks, applies the stop rule, records the trace
and counts NFE, rows and time. It is the only place that calls the model during decoding and the
only place that counts, and the one place logits are checked: NaN or infinite logits at a
generation position stop the decode with `NonFiniteLogitsError` (never a silent commit of garbage).

Sequences of a batch move independently: each has its own current block, and a sequence that has
finished leaves the batch (it is not forwarded again), so its NFE is exactly the calls it took part
in. Each sequence draws its random numbers from its own generator seeded with the decode seed, so a
prompt decodes to the same tokens alone or in any batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from unmask.decoding.config import DecodeConfig
from unmask.decoding.policies.base import Policy, StepView, most_confident
from unmask.decoding.trace import Trace, TraceRecorder
from unmask.errors import NonFiniteLogitsError, UnmaskError
from unmask.models.cache import KVCache

Prompt = str | list[dict] | list[int]


@dataclass
class SequenceResult:
    """One decoded sequence and what it cost."""

    prompt_ids: list[int]
    tokens: list[int]  # the whole generation region after decoding
    answer_ids: list[int]  # tokens before the first stop token
    text: str
    nfe: int  # model calls this sequence took part in
    rows: int  # sequence-forwards computed for it (NFE plus extra verification rows)
    decided: int  # generation positions decided (committed by the policy or filled at stop)
    latency_s: float  # from the start of the decode until this sequence finished
    stopped_early: bool
    trace: Trace | None = None
    cancelled: bool = False  # left the batch before finishing (its tokens may hold masks)
    # policy events summed over steps, plus `temporal_redundant_steps`: (step, position) pairs of
    # the current block where the position stayed masked after the step although its top-1 already
    # equalled the final token (R²-dLLM's temporal redundancy, counted for every policy)
    events: dict[str, float] = field(default_factory=dict)

    @property
    def useful_tokens(self) -> int:
        return len(self.answer_ids)

    @property
    def tpf(self) -> float:
        return self.decided / max(self.nfe, 1)


@dataclass
class DecodeResult:
    sequences: list[SequenceResult]
    wall_s: float
    strategy: str
    params: dict[str, Any]
    config: DecodeConfig
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.sequences]


def encode_prompts(model, prompts: Sequence[Prompt], chat: bool = True) -> list[list[int]]:
    """Token ids for each prompt: ids pass through, strings and message lists get the chat template."""
    out = []
    vocab = model.vocab_size
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise UnmaskError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab})", field="prompt")
        elif isinstance(prompt, str):
            ids = model.tokenizer.prompt_ids(prompt, chat=chat)
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise UnmaskError(f"prompt {i} is an empty message list; give at least one message", field="messages")
            for message in prompt:
                if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str)):
                    raise UnmaskError(
                        f"prompt {i}: every chat message needs a string 'role' and a string 'content' "
                        "(or pass a list of token ids)", field="messages")
            ids = model.tokenizer.prompt_ids(list(prompt), chat=chat)
        else:
            raise UnmaskError(f"prompt {i} must be a string, a list of chat messages or a list of token ids")
        if not ids:
            raise UnmaskError(f"prompt {i} is empty after tokenisation; give some text")
        out.append(ids)
    return out


def token_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of the un-noised distribution, in float32. logits: (..., vocab)."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    top2 = torch.topk(log_probs, k=min(2, log_probs.shape[-1]), dim=-1)
    top1_prob = top2.values[..., 0].exp()
    second = top2.values[..., 1].exp() if top2.values.shape[-1] > 1 else torch.zeros_like(top1_prob)
    probs = log_probs.exp()
    entropy = -(probs * log_probs.clamp(min=-1e30)).sum(-1)
    return {
        "log_probs": log_probs,
        "top1": top2.indices[..., 0],
        "top1_prob": top1_prob,
        "margin": top1_prob - second,
        "entropy": entropy,
    }


def _gumbel_candidates(logits: torch.Tensor, temperature: list[float], generators: list[torch.Generator],
                       widths: list[int] | None = None) -> torch.Tensor:
    """Argmax of logits / T plus Gumbel noise drawn from each row's own generator, T per row. logits: (b, L, V).

    `widths[j]`: the positions row j draws noise for (its own block; the default all L); the rest
    get a fixed 0.5, so a row draws the numbers it draws alone."""
    length, vocab = logits.shape[1:]
    widths = [length] * len(generators) if widths is None else widths
    noise = torch.full((len(generators), length, vocab), 0.5, dtype=torch.float64)
    for j, (g, width) in enumerate(zip(generators, widths)):
        noise[j, :width] = torch.rand((width, vocab), generator=g, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(noise.clamp(min=1e-20)))
    t = torch.tensor(temperature, dtype=torch.float64, device=logits.device)[:, None, None]
    return (logits.double() / t + gumbel.to(logits.device)).argmax(-1)


class Decoder:
    """Runs one policy over one batch of prompts. Use `generate(...)`; this holds the per-decode state."""

    def __init__(self, model, policy: Policy, config: DecodeConfig, progress: Callable[[int], None] | None = None,
                 on_block: Callable[[int, int, list[int]], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None):
        self.model = model
        self.policy = policy
        self.config = config
        self.progress = progress
        # on_block(row, block_index, generation tokens so far): a block of `row` is final (streaming)
        self.on_block = on_block
        # cancelled(row) -> True: the sequence leaves the batch at once (a client went away)
        self.cancelled = cancelled

    @torch.inference_mode()
    def run(self, prompt_ids: list[list[int]], seeds: list[int] | None = None, width: int | None = None,
            admit: Callable[[int, int], list[tuple]] | None = None, temperatures: list[float] | None = None,
            on_finish: Callable[[int, SequenceResult], None] | None = None,
            gen_lengths: list[int] | None = None) -> DecodeResult:
        """Decode `prompt_ids`; with `admit`, sequences may also join the decode at step boundaries.

        `seeds`: each sequence's seed (default: the config's seed for all); `temperatures`: each
        sequence's sampling temperature (default: the policy's); `gen_lengths`: each sequence's
        generation length (default: the config's gen_length for all), each a multiple of the block
        length. `width`: the prompt region's width (left padded; default the longest prompt).

        The canvas's generation region is as wide as the longest generation in the decode; a shorter
        sequence is right padded: its positions past its own gen_length are hidden from attention,
        never committed, never reported, and its decode ends after its own last block, so it decodes
        to the tokens (and NFE) it gets alone. Continuous batching: `admit(width, rows_so_far)` is
        called before every model call after the first and returns the sequences that join now, as
        (prompt ids, seed), (prompt ids, seed, temperature) or (prompt ids, seed, temperature,
        gen_length); a joiner longer than the prompt region widens it (more left padding for every
        row, and for the cache's stored keys), and a joiner with a longer generation widens the
        generation region on the right (more right padding for every other row). A joining sequence
        gets its own canvas row, generator, counters and policy state, so it decodes to the same
        tokens as it would alone. `on_finish(row, result)` hears of each sequence as soon as it leaves
        the batch; the returned `DecodeResult` holds every sequence, in the order they joined.
        """
        model, policy, cfg = self.model, self.policy, self.config
        device = model.device
        prompt_ids = [list(p) for p in prompt_ids]
        seeds = [int(cfg.seed)] * len(prompt_ids) if seeds is None else [int(x) for x in seeds]
        if len(seeds) != len(prompt_ids):
            raise UnmaskError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts", field="seed")
        own_temperature = float(getattr(policy.config, "temperature", 0.0))
        temps = [own_temperature] * len(prompt_ids) if temperatures is None else [float(t) for t in temperatures]
        if len(temps) != len(prompt_ids) or any(not t >= 0 for t in temps):
            raise UnmaskError("temperatures: one number >= 0 per prompt", field="temperature")
        lengths = [int(cfg.gen_length)] * len(prompt_ids) if gen_lengths is None else list(gen_lengths)
        if len(lengths) != len(prompt_ids):
            raise UnmaskError(f"{len(lengths)} gen_lengths for {len(prompt_ids)} prompts", field="gen_length")
        self._checked_lengths: set[int] = set()
        for g in lengths:
            self._check_length(g)
        if admit is not None and not policy.continuous:
            raise UnmaskError(f"strategy {policy.name} cannot take sequences into a running decode "
                              "(it prepares per batch); decode it in static batches", field="strategy")
        batch = len(prompt_ids)
        gen = max(lengths)  # the canvas's generation region
        whole = policy.whole_generation
        block_len = gen if whole else cfg.block_length  # the width of the block views
        prompt_len = max(max(len(p) for p in prompt_ids), width or 0)
        if prompt_len + gen > model.max_length:
            raise UnmaskError(
                f"prompt ({prompt_len} tokens) plus gen_length {gen} exceeds the model's context of {model.max_length}; "
                "shorten the prompt or the generation",
                field="gen_length",
            )
        stop_ids = torch.tensor(model.stop_ids, device=device)
        # each sequence's own generation length, block length, number of blocks and step bound
        row_gen = torch.tensor(lengths, dtype=torch.long, device=device)

        def own_blocks(row_gen_t: torch.Tensor):
            row_block_t = row_gen_t.clone() if whole else torch.full_like(row_gen_t, cfg.block_length)
            bound = torch.full_like(row_gen_t, cfg.max_steps_per_block) if cfg.max_steps_per_block else 4 * row_block_t
            return row_block_t, row_gen_t // row_block_t, bound

        row_block, row_blocks, max_steps = own_blocks(row_gen)

        canvas, attention, positions = self._canvas_rows(prompt_ids, prompt_len, gen, lengths)
        gen_view = canvas[:, prompt_len:]  # (batch, gen) view: writes land in the canvas

        block_idx = torch.zeros(batch, dtype=torch.long, device=device)
        block_step = torch.zeros(batch, dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        nfe = torch.zeros(batch, dtype=torch.long)
        rows_count = torch.zeros(batch, dtype=torch.long)
        stopped_early = torch.zeros(batch, dtype=torch.bool)
        finish_s = np.zeros(batch)
        prev_top1 = torch.full((batch, gen), -1, dtype=torch.long, device=device)
        stable = torch.zeros((batch, gen), dtype=torch.long, device=device)
        prev_conf = torch.full((batch, gen), float("nan"), device=device)
        commit_step = torch.full((batch, gen), -1, dtype=torch.long, device=device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        row_step = torch.zeros(batch, dtype=torch.long)  # calls each sequence has taken part in
        recorder = TraceRecorder(batch) if cfg.record_trace else None
        events: list[dict[str, float]] = [{} for _ in range(batch)]
        history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, top1, still masked)
        state = policy.init_state(batch, gen, device)
        offsets = torch.arange(block_len, device=device)
        # logits a verification call already computed for a row's current canvas (PSD): the next
        # step uses them instead of calling the model again. row -> (gen positions, logits there)
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._counters = (nfe, rows_count)
        # seconds inside the model and inside the policy's decisions (the rest is the loop's own
        # bookkeeping); on a GPU both are taken after a synchronize, so they are true time
        self._seconds = {"model_s": 0.0, "policy_s": 0.0}
        self._cuda = device.type == "cuda"
        use_cache = cfg.cache != "none"
        if use_cache and not model.supports_cache:
            raise UnmaskError(f"model {model.name} does not support the KV cache; use --cache none", field="cache")
        cache = KVCache(batch, attention) if use_cache else None
        # what the model last said at every generation position (a cached call computes only some
        # positions; the others keep their last prediction, which is the cache's approximation)
        known_top1 = torch.full((batch, gen), model.mask_id, dtype=torch.long, device=device)
        fresh = torch.zeros((batch, gen), dtype=torch.bool, device=device)  # recomputed by this step's call
        known_stats = {key: torch.full((batch, gen), float("nan"), device=device)
                       for key in ("top1_prob", "margin", "entropy")} if cfg.record_trace else None
        self._canvas = (canvas, attention, positions, prompt_len)
        self._row_gen = row_gen
        self._blocks = (block_idx, row_blocks)  # named by the non-finite-logits error
        cancelled_rows: set[int] = set()
        step = 0
        start = time.perf_counter()

        def result(row: int, redundant: float | None = None) -> SequenceResult:
            """Sequence `row`'s result as it stands (the closure sees the decode's current tensors)."""
            if redundant is None:  # one sequence leaving mid-decode
                redundant = float(self._temporal_redundancy(history, gen_view, batch)[row])
            return self._sequence(row, prompt_ids[row], gen_view[:, :lengths[row]], nfe, rows_count, finish_s,
                                  stopped_early, row in cancelled_rows, recorder, commit_step[:, :lengths[row]], events,
                                  redundant)

        while bool(active.any()):
            joining = admit(prompt_len, batch) if admit is not None and step > 0 else []
            if joining:
                new_lengths = [int(j[3]) if len(j) > 3 and j[3] is not None else int(cfg.gen_length) for j in joining]
                for g in new_lengths:
                    self._check_length(g)
                longest = max(len(j[0]) for j in joining)
                widest = max(new_lengths)
                if max(longest, prompt_len) + max(widest, gen) > model.max_length:
                    raise UnmaskError(
                        f"a joining sequence (a {longest}-token prompt, gen_length {widest}) would widen the decode's "
                        f"canvas to {max(longest, prompt_len)} + {max(widest, gen)} positions, which exceeds the "
                        f"model's context of {model.max_length}", field="prompt")
                if longest > prompt_len:  # widen the prompt region: more left padding for everyone
                    delta = longest - prompt_len
                    canvas = torch.cat([torch.full((batch, delta), model.pad_id, dtype=canvas.dtype, device=device),
                                        canvas], dim=1)
                    attention = torch.cat([torch.zeros((batch, delta), dtype=torch.bool, device=device), attention],
                                          dim=1)
                    positions = model.position_ids(attention)
                    if cache is not None:
                        cache.widen(delta, attention)
                    prompt_len = longest
                if widest > gen:  # widen the generation region: more right padding for everyone
                    delta = widest - gen

                    def wider(t, fill):
                        return _with_columns(t, delta, fill)

                    canvas, attention = wider(canvas, model.pad_id), wider(attention, False)
                    positions = model.position_ids(attention)
                    if cache is not None:
                        cache.widen(delta, attention, right=True)
                    prev_top1, stable, prev_conf = wider(prev_top1, -1), wider(stable, 0), wider(prev_conf, float("nan"))
                    commit_step, known_top1, fresh = wider(commit_step, -1), wider(known_top1, model.mask_id), wider(fresh, False)
                    if known_stats is not None:
                        known_stats = {k: wider(v, float("nan")) for k, v in known_stats.items()}
                    state = widen_state(state, policy.init_state(batch, widest, device))
                    gen = widest
                    if whole:  # the block view is the whole canvas
                        block_len = gen
                        offsets = torch.arange(block_len, device=device)
                n = len(joining)
                new_ids = [list(j[0]) for j in joining]
                prompt_ids += new_ids
                lengths += new_lengths
                seeds += [int(j[1]) for j in joining]
                temps += [float(j[2]) if len(j) > 2 and j[2] is not None else own_temperature for j in joining]
                generators += [torch.Generator().manual_seed(int(j[1])) for j in joining]
                c, a, pos = self._canvas_rows(new_ids, prompt_len, gen, new_lengths)
                canvas, attention, positions = (torch.cat([canvas, c]), torch.cat([attention, a]),
                                                torch.cat([positions, pos]))
                gen_view = canvas[:, prompt_len:]

                def more(t, fill):
                    return _with_rows(t, n, fill)

                block_idx, block_step, active = more(block_idx, 0), more(block_step, 0), more(active, True)
                nfe, rows_count, stopped_early, row_step = more(nfe, 0), more(rows_count, 0), more(stopped_early, False), more(row_step, 0)
                finish_s = np.concatenate([finish_s, np.zeros(n)])
                prev_top1, stable, prev_conf = more(prev_top1, -1), more(stable, 0), more(prev_conf, float("nan"))
                commit_step, known_top1, fresh = more(commit_step, -1), more(known_top1, model.mask_id), more(fresh, False)
                if known_stats is not None:
                    known_stats = {k: more(v, float("nan")) for k, v in known_stats.items()}
                if recorder is not None:
                    recorder.grow(n)
                events += [{} for _ in range(n)]
                state = grow_state(state, policy.init_state(n, gen, device))
                if cache is not None:
                    cache.grow(attention)
                row_gen = torch.cat([row_gen, torch.tensor(new_lengths, dtype=torch.long, device=device)])
                row_block, row_blocks, max_steps = own_blocks(row_gen)
                batch += n
                self._counters = (nfe, rows_count)
                self._canvas = (canvas, attention, positions, prompt_len)
                self._row_gen = row_gen
                self._blocks = (block_idx, row_blocks)
            idx = active.nonzero().squeeze(1)
            b = idx.shape[0]
            block_pos = (block_idx[idx] * row_block[idx])[:, None] + offsets  # (b, block)
            arange_b = torch.arange(b, device=device)[:, None]
            blk_logits = self._step_logits(idx, block_pos, block_step, pending, cache, known_top1, known_stats, cfg.cache,
                                            fresh)
            # past a sequence's own generation (right padding) the model's output means nothing
            beyond = torch.arange(gen, device=device)[None, :] >= row_gen[idx][:, None]  # (b, gen)
            gen_top1 = known_top1[idx].masked_fill(beyond, model.mask_id)  # (b, gen)
            stats = token_stats(blk_logits)
            full = {k: v[idx] for k, v in known_stats.items()} if known_stats is not None else None
            row_gens = [generators[i] for i in idx.tolist()]
            row_temps = [temps[i] for i in idx.tolist()]
            sampled = [j for j, t in enumerate(row_temps) if t > 0]  # rows that sample draw from their generator
            if sampled:
                # a sequence draws noise for its own block only (a whole-generation block of a
                # shorter sequence ends before the view's)
                widths = row_block[idx].clamp(max=block_len).tolist()
                candidate = stats["top1"].clone()
                candidate[sampled] = _gumbel_candidates(blk_logits[sampled], [row_temps[j] for j in sampled],
                                                        [row_gens[j] for j in sampled], [widths[j] for j in sampled])
                confidence = stats["log_probs"].gather(-1, candidate[..., None]).squeeze(-1).exp()
            else:
                candidate, confidence = stats["top1"], stats["top1_prob"]

            # the stability streak: calls of this block that recomputed a position and found the same
            # top-1; a block's first call starts every streak at 1, a call that left the position
            # out (a cached call) does not extend it
            fresh_rows = fresh[idx]
            restart = (block_step[idx] == 0)[:, None] | (gen_top1 != prev_top1[idx])
            streak = torch.where(restart, torch.ones_like(gen_top1), stable[idx] + 1)
            stable[idx] = torch.where(fresh_rows, streak, stable[idx])
            prev_top1[idx] = gen_top1
            fresh[idx] = False
            tokens_blk = gen_view[idx][arange_b, block_pos]
            masked = tokens_blk == model.mask_id
            view = StepView(
                rows=idx,
                positions=block_pos,
                tokens=tokens_blk,
                masked=masked,
                logits=blk_logits,
                top1=stats["top1"],
                top1_prob=stats["top1_prob"],
                candidate=candidate,
                confidence=confidence,
                margin=stats["margin"],
                entropy=stats["entropy"],
                stable=stable[idx][arange_b, block_pos],
                prev_confidence=prev_conf[idx][arange_b, block_pos],
                block_step=block_step[idx],
                step=step,
                gen_top1=gen_top1,
                block_length=block_len,
                gen_length=gen,
                num_blocks=gen // block_len,
                mask_id=model.mask_id,
                stop_ids=tuple(model.stop_ids),
                generators=row_gens,
                row_gen_length=row_gen[idx],
                row_num_blocks=row_blocks[idx],
            )
            with self._timed("policy_s"):
                decision = policy.decide(view, state)
            commit = decision.commit & masked
            if not policy.remasking and not policy.empty_steps:
                # progress guarantee: a step that commits nothing commits the most confident position
                stuck = ~commit.any(-1) & masked.any(-1)
                if bool(stuck.any()):
                    commit |= most_confident(confidence, masked) & stuck[:, None]
            write = decision.tokens if decision.tokens is not None else candidate
            new_blk = torch.where(commit, write, tokens_blk)
            remask = None
            if decision.remask is not None and policy.remasking:
                remask = decision.remask & ~masked & ~commit
                new_blk = torch.where(remask, torch.full_like(new_blk, model.mask_id), new_blk)
            # safety bound for remasking policies: at the limit, the block is finished as predicted
            over = (block_step[idx] + 1 >= max_steps[idx])[:, None] & (new_blk == model.mask_id)
            new_blk = torch.where(over, candidate, new_blk)
            commit = commit | over
            if decision.drafts is not None and not policy.remasking:
                new_blk, accepted_logits, depth_events = self._verify(view, state, decision.drafts, new_blk, idx, block_pos, cache)
                commit = commit | (masked & (new_blk != model.mask_id))
                pending.update(accepted_logits)
                decision.events = {**(decision.events or {}), **depth_events}

            rows_gen = gen_view[idx]
            rows_gen[arange_b, block_pos] = new_blk
            gen_view[idx] = rows_gen
            in_block = torch.zeros_like(rows_gen, dtype=torch.bool)
            in_block[arange_b, block_pos] = True  # only positions the policy could have committed count
            history.append((idx, gen_top1, (rows_gen == model.mask_id) & in_block))
            if decision.events:
                for name, counts in decision.events.items():
                    for j, row in enumerate(idx.tolist()):
                        events[row][name] = events[row].get(name, 0.0) + float(counts[j])
            cs = commit_step[idx]
            own_step = row_step[idx.cpu()].to(device)[:, None].expand_as(block_pos)  # this call's index for each sequence
            cs[arange_b, block_pos] = torch.where(commit, own_step, cs[arange_b, block_pos])
            if remask is not None:
                cs[arange_b, block_pos] = torch.where(remask, torch.full_like(block_pos, -1), cs[arange_b, block_pos])
            commit_step[idx] = cs
            pc = prev_conf[idx]
            pc[arange_b, block_pos] = stats["top1_prob"]
            prev_conf[idx] = pc
            block_step[idx] += 1
            row_step[idx.cpu()] += 1

            if recorder is not None:
                masked_before = (gen_view[idx] == model.mask_id).clone()
                masked_before[arange_b, block_pos] = masked
                for j, row in enumerate(idx.tolist()):
                    own = lengths[row]  # a trace covers the sequence's own generation only
                    recorder.record(
                        row,
                        top1=gen_top1[j, :own].cpu().numpy(),
                        confidence=full["top1_prob"][j, :own].cpu().numpy(),
                        margin=full["margin"][j, :own].cpu().numpy(),
                        entropy=full["entropy"][j, :own].cpu().numpy(),
                        masked_before=masked_before[j, :own].cpu().numpy(),
                        tokens_after=gen_view[row, :own].cpu().numpy().copy(),
                        block=int(block_idx[row]),
                    )
                    if remask is not None:
                        for p in remask[j].nonzero().squeeze(1).tolist():
                            recorder.remasked[row].append((int(row_step[row]), int(block_pos[j, p])))

            # block completion, the stop rule, and leaving the batch
            block_done = ~(new_blk == model.mask_id).any(-1)  # (b,)
            if bool(block_done.any()):
                done_rows = idx[block_done]
                if cfg.early_stop:
                    predicted = policy.stop_predictions(done_rows, gen_top1[block_done])
                    self._stop_rule(done_rows, gen_view, predicted, block_idx, row_block, row_gen, stop_ids,
                                    stopped_early)
                block_idx[done_rows] += 1
                block_step[done_rows] = 0
                if use_cache:  # the next block starts with a refresh of the cache, a full forward
                    for row in done_rows.tolist():
                        pending.pop(row, None)
                finished = done_rows[(block_idx[done_rows] >= row_blocks[done_rows])
                                     | stopped_early[done_rows.cpu()].to(device)]
                if finished.numel():
                    active[finished] = False
                    finish_s[finished.cpu().numpy()] = time.perf_counter() - start
                    if on_finish is not None:
                        for row in finished.tolist():
                            on_finish(row, result(row))
                if self.on_block is not None:
                    for row in done_rows.tolist():
                        end = lengths[row] if bool(stopped_early[row]) else int(block_idx[row] * row_block[row])
                        self.on_block(row, int(block_idx[row]) - 1, gen_view[row, :end].tolist())
            if self.cancelled is not None:
                for row in active.nonzero().squeeze(1).tolist():
                    if self.cancelled(row):
                        active[row] = False
                        cancelled_rows.add(row)
                        pending.pop(row, None)
                        finish_s[row] = time.perf_counter() - start
                        if on_finish is not None:
                            on_finish(row, result(row))
            step += 1
            if self.progress is not None:
                self.progress(step)

        wall = time.perf_counter() - start
        redundant = self._temporal_redundancy(history, gen_view, batch)
        sequences = [result(row, float(redundant[row])) for row in range(batch)]
        return DecodeResult(sequences=sequences, wall_s=wall, strategy=policy.name, params=policy.params, config=cfg,
                            extras=dict(self._seconds))

    def _canvas_rows(self, prompt_ids: list[list[int]], prompt_len: int, gen: int, lengths: list[int]):
        """Canvas rows (prompt left padded to `prompt_len`, then the row's own `lengths[row]` masks,
        right padded to `gen`), attention (False on padding) and positions."""
        model = self.model
        device = model.device
        canvas = torch.full((len(prompt_ids), prompt_len + gen), model.pad_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(canvas, dtype=torch.bool)
        for row, (ids, own) in enumerate(zip(prompt_ids, lengths)):
            canvas[row, prompt_len - len(ids) : prompt_len] = torch.tensor(ids, device=device)
            canvas[row, prompt_len : prompt_len + own] = model.mask_id
            attention[row, prompt_len - len(ids) : prompt_len + own] = True
        return canvas, attention, model.position_ids(attention)

    def _check_length(self, gen_length) -> None:
        """A sequence's own generation length: a positive multiple of the block length that the
        policy can decode (its steps split over the blocks)."""
        cfg, policy = self.config, self.policy
        if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length <= 0:
            raise UnmaskError(f"gen_length must be a positive integer, got {gen_length!r}", field="gen_length")
        if not policy.whole_generation and gen_length % cfg.block_length:
            raise UnmaskError(f"block_length {cfg.block_length} does not divide gen_length {gen_length}; "
                              "pick a gen_length that is a multiple of the block length", field="gen_length")
        if gen_length not in self._checked_lengths:
            block = gen_length if policy.whole_generation else cfg.block_length
            policy.check_lengths(self.model, replace(cfg, gen_length=gen_length, block_length=block))
            self._checked_lengths.add(gen_length)

    def _sequence(self, row, prompt_ids, gen_view, nfe, rows_count, finish_s, stopped_early, cancelled: bool, recorder,
                  commit_step, events, redundant: float) -> SequenceResult:
        """One sequence's result, as it stands (it has left the batch, or the decode is over)."""
        model = self.model
        tokens = gen_view[row].tolist()
        stop_set = set(model.stop_ids)
        cut = next((i for i, t in enumerate(tokens) if t in stop_set), len(tokens))
        answer = tokens[:cut]
        return SequenceResult(
            prompt_ids=list(prompt_ids),
            tokens=tokens,
            answer_ids=answer,
            text=model.tokenizer.decode(answer),
            nfe=int(nfe[row]),
            rows=int(rows_count[row]),
            decided=sum(t != model.mask_id for t in tokens),
            latency_s=float(finish_s[row]),
            stopped_early=bool(stopped_early[row]),
            cancelled=cancelled,
            trace=recorder.build(row, commit_step[row].cpu().numpy()) if recorder is not None else None,
            events={**events[row], "temporal_redundant_steps": float(redundant)},
        )

    @contextlib.contextmanager
    def _timed(self, key: str):
        """Add the seconds of the enclosed work to `self._seconds[key]`."""
        if self._cuda:
            torch.cuda.synchronize(self.model.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize(self.model.device)
            self._seconds[key] += time.perf_counter() - t0

    def _forward(self, rows, prompt_len: int, rows_per_seq=1, tokens=None, query_pos=None, cache=None,
                 cache_rows=None, read_only: bool = False, verifying: bool = False) -> torch.Tensor:
        """The one place a decode calls the model. Counts one NFE per sequence of `rows`.

        Without `query_pos`: logits of the whole generation region (rows, gen, V), and with a cache
        this call refreshes it. With `query_pos` (rows, q) in canvas coordinates: logits there only,
        attending over the cache. `tokens` may hold several canvases per sequence (PSD's drafts,
        `rows_per_seq` an int or a per-sequence tensor, `cache_rows` the sequence of each canvas):
        its canvases are the sequence's rows.

        Every position it returns within its sequence's own generation is one the decode may read
        (the policy, the stop rule, the trace), so all are checked: a position whose logits hold a
        NaN or +inf, or no finite value once the mask token's column is -inf, stops the decode with
        `NonFiniteLogitsError`. Prompt positions are never returned, so what the model says there
        (left padding may be NaN) is ignored, as is what it says on right padding (past a shorter
        sequence's generation), and -inf on some tokens is a legitimate "never this token".
        """
        nfe, rows_count = self._counters
        canvas, attention, positions, prompt_len = self._canvas
        owners = cache_rows if cache_rows is not None else rows
        tokens = canvas[owners] if tokens is None else tokens
        with self._timed("model_s"):
            if query_pos is None:
                logits = self.model.logits(tokens, attention[owners], positions[owners],
                                           cache=cache.fill(owners) if cache is not None else None)[:, prompt_len:]
            else:
                logits = self.model.logits_at(tokens, positions[owners], query_pos, cache, read_only=read_only, rows=owners)
        logits = logits.float()
        logits[..., self.model.mask_id] = float("-inf")  # the mask token is never a prediction
        # the row maximum is NaN if any logit is, +inf if any is, -inf if none is finite: one cheap check
        row_max = logits.amax(-1)
        if not bool(torch.isfinite(row_max).all()):
            gen_pos = torch.arange(row_max.shape[1], device=row_max.device)[None] if query_pos is None \
                else query_pos - prompt_len
            padding = gen_pos >= self._row_gen[owners][:, None]  # right padding: never read
            if not bool(torch.isfinite(row_max.masked_fill(padding, 0.0)).all()):
                raise self._non_finite(row_max, owners, verifying, padding)
        nfe[rows.cpu()] += 1
        rows_count[rows.cpu()] += rows_per_seq
        return logits

    def _non_finite(self, row_max: torch.Tensor, owners: torch.Tensor, verifying: bool,
                    padding: torch.Tensor) -> NonFiniteLogitsError:
        """The error for a call whose logits (maximum per position `row_max`, (canvases, q)) are not all
        finite at some position outside the right padding (`padding`, (canvases, q))."""
        nfe, _ = self._counters
        block_idx, row_blocks = self._blocks
        bad = (~torch.isfinite(row_max) & ~padding).sum(-1).cpu().tolist()  # per canvas
        checked = (~padding).sum(-1).cpu().tolist()
        details: dict[int, list[int]] = {}
        for canvas, row in enumerate(owners.cpu().tolist()):
            info = details.setdefault(row, [0, 0, int(nfe[row]) + 1, int(block_idx[row])])
            info[0] += bad[canvas]
            info[1] += checked[canvas]
        details = {row: info for row, info in details.items() if info[0]}
        blocks = {row: int(row_blocks[row]) for row in details}
        return NonFiniteLogitsError({row: tuple(info) for row, info in details.items()}, blocks, verifying=verifying)

    def _step_logits(self, idx, block_pos, block_step, pending, cache, known_top1, known_stats, mode, fresh):
        """Block logits (b, block, V) for this step, from a verification's leftovers or a model call.

        Updates `known_top1` (and the trace's statistics) at every position the call computed, and marks
        those positions in `fresh`.
        """
        model = self.model
        prompt_len = self._canvas[3]
        gen = known_top1.shape[1]
        device = block_pos.device
        blk = torch.empty(idx.shape[0], block_pos.shape[1], model.vocab_size, device=device)
        todo = []
        for j, row in enumerate(idx.tolist()):
            if row in pending:
                where, logits = pending.pop(row)
                self._remember(idx[j : j + 1], where[None], logits[None], known_top1, known_stats, fresh)
                lookup = torch.full((gen,), -1, dtype=torch.long, device=device)
                lookup[where] = torch.arange(where.shape[0], device=device)
                blk[j] = logits[lookup[block_pos[j]]]
            else:
                todo.append(j)
        if not todo:
            return blk
        todo_t = torch.tensor(todo, device=device)
        rows = idx[todo_t]
        groups = [(todo_t, None)]
        if cache is not None:
            refresh = block_step[rows] == 0
            groups = [(todo_t[refresh], None), (todo_t[~refresh], mode)]
        for sel, kind in groups:
            if sel.numel() == 0:
                continue
            r = idx[sel]
            if kind is None:
                logits = self._forward(r, prompt_len, cache=cache)  # (n, gen, V)
                where = torch.arange(gen, device=device).expand(r.shape[0], gen)
            else:
                if kind == "dual":
                    where = block_pos[sel]
                else:  # prefix: each row's block and everything after it in its own generation,
                    # padded by repeating its last position (a duplicate query writes the same keys
                    # and changes nothing)
                    starts = block_pos[sel, 0]
                    ends = self._row_gen[r]
                    width = int((ends - starts).max())
                    where = torch.minimum(starts[:, None] + torch.arange(width, device=device)[None], ends[:, None] - 1)
                logits = self._forward(r, prompt_len, query_pos=where + prompt_len, cache=cache)
            self._remember(r, where, logits, known_top1, known_stats, fresh)
            lookup = torch.full((r.shape[0], gen), -1, dtype=torch.long, device=device)
            lookup.scatter_(1, where, torch.arange(where.shape[1], device=device).expand_as(where))
            pick = lookup.gather(1, block_pos[sel])
            blk[sel] = logits[torch.arange(r.shape[0], device=device)[:, None], pick]
        return blk

    @staticmethod
    def _remember(rows, where, logits, known_top1, known_stats, fresh) -> None:
        top1 = logits.argmax(-1)
        kt = known_top1[rows]
        kt.scatter_(1, where, top1)
        known_top1[rows] = kt
        seen = fresh[rows]
        seen.scatter_(1, where, True)
        fresh[rows] = seen
        if known_stats is not None:
            stats = token_stats(logits)
            for key, buf in known_stats.items():
                vals = buf[rows]
                vals.scatter_(1, where, stats[key])
                buf[rows] = vals

    def _verify(self, view, state, drafts, committed_blk, idx, block_pos, cache):
        """Score the committed block and its drafts in one batched call; keep the depth the policy accepts.

        drafts: (b, K, block) block contents at depths 1..K. Only the levels a sequence really built
        (a level adds at least one token) are forwarded and counted as its rows; a sequence with no
        draft takes no part in the call. With a cache, draft rows compute the block only, over their
        sequence's cached keys, and write nothing back. Returns the accepted block tokens, a dict
        row -> (positions, logits) of the accepted canvas (the next step's forward) and events.
        """
        canvas, _, _, prompt_len = self._canvas
        b, depth_max, _ = drafts.shape
        device = drafts.device
        gen = canvas.shape[1] - prompt_len
        candidates = torch.cat([committed_blk[:, None], drafts], dim=1)  # (b, K+1, block)
        built = (candidates[:, 1:] != candidates[:, :-1]).any(-1).sum(-1)  # (b,) levels with new tokens
        verified = (built > 0).nonzero().squeeze(1)
        if verified.numel() == 0:
            # nothing to verify; the policy still hears "depth 0" for every sequence, as in a batch
            with self._timed("policy_s"):
                _, events = self.policy.accept(view, state, candidates, candidates.clone(),
                                               torch.ones(candidates.shape, device=device))
            return committed_blk, {}, events
        # one canvas per (sequence, level 0..built)
        owner = torch.repeat_interleave(verified, built[verified] + 1)
        level = torch.cat([torch.arange(int(built[j]) + 1, device=device) for j in verified.tolist()])
        tokens = canvas[idx[owner]].clone()
        gen_part = tokens[:, prompt_len:]
        gen_part[torch.arange(owner.shape[0], device=device)[:, None], block_pos[owner]] = candidates[owner, level]
        tokens[:, prompt_len:] = gen_part
        rows = idx[verified]
        per_seq = (built[verified] + 1).cpu()
        if cache is None:
            logits = self._forward(rows, prompt_len, per_seq, tokens=tokens, cache_rows=idx[owner], verifying=True)
            where_all = torch.arange(gen, device=device)
            blk_rows = logits[torch.arange(owner.shape[0], device=device)[:, None], block_pos[owner]]
        else:
            logits = self._forward(rows, prompt_len, per_seq, tokens=tokens, query_pos=block_pos[owner] + prompt_len,
                                   cache=cache, cache_rows=idx[owner], read_only=True, verifying=True)
            where_all = None
            blk_rows = logits
        top1_rows = blk_rows.argmax(-1)
        conf_rows = torch.softmax(blk_rows, dim=-1).amax(-1)
        # per sequence, the top-1 (and its probability) on each level's canvas (levels it did not
        # build repeat its last)
        starts = torch.cumsum(built[verified] + 1, 0) - (built[verified] + 1)
        draft_top1 = candidates.clone()
        draft_conf = torch.ones(candidates.shape, device=device)
        for k in range(depth_max + 1):
            pick = torch.minimum(torch.full_like(built[verified], k), built[verified])
            draft_top1[verified, k] = top1_rows[starts + pick]
            draft_conf[verified, k] = conf_rows[starts + pick]
        with self._timed("policy_s"):
            depth, events = self.policy.accept(view, state, candidates, draft_top1, draft_conf)
        depth = torch.minimum(depth, built)
        accepted = candidates[torch.arange(b, device=device), depth]
        next_logits = {}
        for n, j in enumerate(verified.tolist()):
            chosen = logits[int(starts[n] + depth[j])]
            next_logits[int(idx[j])] = (where_all if where_all is not None else block_pos[j], chosen)
        return accepted, next_logits, events

    @staticmethod
    def _temporal_redundancy(history, gen_view, batch: int) -> torch.Tensor:
        """Per sequence: steps x positions still masked after a step whose top-1 already was the final token."""
        total = torch.zeros(batch, dtype=torch.long, device=gen_view.device)
        for rows, top1, still_masked in history:  # a step before the canvas widened is narrower
            hit = still_masked & (top1 == gen_view[rows, : top1.shape[1]])
            total.index_add_(0, rows, hit.sum(-1))
        return total.cpu()

    @staticmethod
    def _stop_rule(rows, gen_view, gen_top1, block_idx, row_block, row_gen, stop_ids, stopped_early) -> None:
        """A finished block holding a committed stop token, with only stop tokens predicted for every
        later masked position, ends the decode: those positions are filled with their predictions.

        Each sequence within its own generation (`row_gen`, in blocks of `row_block`): padding past it
        never counts."""
        tokens = gen_view[rows]  # (r, gen)
        gen = tokens.shape[1]
        own = row_gen[rows]  # (r,)
        block_end = (block_idx[rows] + 1) * row_block[rows]  # (r,)
        pos = torch.arange(gen, device=tokens.device)[None, :]
        decided_region = pos < block_end[:, None]
        has_stop = (torch.isin(tokens, stop_ids) & decided_region).any(-1)
        later = (pos >= block_end[:, None]) & (pos < own[:, None])
        later_ok = (~later | torch.isin(gen_top1, stop_ids)).all(-1)
        fire = has_stop & later_ok & (block_end < own)
        if bool(fire.any()):
            fill_rows = rows[fire]
            filled = torch.where(later[fire], gen_top1[fire], tokens[fire])
            gen_view[fill_rows] = filled
            stopped_early[fill_rows.cpu()] = True


def _with_rows(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    """`t` with `n` more rows (first dimension) of `fill`."""
    return torch.cat([t, torch.full((n,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)])


def _with_columns(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    """`t` with `n` more columns (second dimension) of `fill`, on the right."""
    return torch.cat([t, torch.full((t.shape[0], n) + tuple(t.shape[2:]), fill, dtype=t.dtype, device=t.device)], dim=1)


def widen_state(state: Any, wider: Any) -> Any:
    """A policy's per-decode state on a wider canvas: `wider` is a fresh state of the same rows for
    the wider generation region; every tensor of `state` is copied into its leading corner (a tensor
    whose shape does not depend on the generation length is kept as it is)."""
    if state is None and wider is None:
        return None
    if isinstance(state, torch.Tensor):
        if state.shape == wider.shape:
            return state
        wider[tuple(slice(0, n) for n in state.shape)] = state
        return wider
    if isinstance(state, dict):
        return {k: widen_state(v, wider[k]) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(widen_state(a, b) for a, b in zip(state, wider))
    raise TypeError(f"cannot widen a policy state of type {type(state).__name__}")


def grow_state(state: Any, more: Any) -> Any:
    """A policy's per-decode state with the rows of `more` (the same structure) appended.

    States are tensors indexed by sequence first, possibly in dicts, lists or tuples; None stays None.
    """
    if state is None and more is None:
        return None
    if isinstance(state, torch.Tensor):
        return torch.cat([state, more])
    if isinstance(state, dict):
        return {k: grow_state(v, more[k]) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(grow_state(a, b) for a, b in zip(state, more))
    raise TypeError(f"cannot add sequences to a policy state of type {type(state).__name__}")


def generate(
    model,
    prompts: Sequence[Prompt],
    policy: Policy | str = "low_confidence",
    config: DecodeConfig | None = None,
    chat: bool = True,
    progress: Callable[[int], None] | None = None,
    on_block: Callable[[int, int, list[int]], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    gen_lengths: Sequence[int] | None = None,
    **overrides,
) -> DecodeResult:
    """Decode `prompts` with `policy` (an instance or a strategy string) in one batch.

    `overrides` are DecodeConfig fields (gen_length=..., block_length=..., seed=...). `gen_lengths`
    gives each prompt its own generation length (each a multiple of the block length); the canvas
    is then as long as the longest, and each sequence decodes to what it decodes alone with its own.
    """
    from unmask.decoding.registry import parse_strategy

    if isinstance(policy, str):
        policy = parse_strategy(policy)
    if gen_lengths is not None:
        gen_lengths = list(gen_lengths)
        if len(gen_lengths) != len(prompts):
            raise UnmaskError(f"{len(gen_lengths)} gen_lengths for {len(prompts)} prompts", field="gen_length")
        if gen_lengths:
            overrides["gen_length"] = max(gen_lengths)
    config = DecodeConfig(**{**(config.__dict__ if config else {}), **overrides}).resolved(model.defaults)
    if not prompts:
        raise UnmaskError("no prompts given; pass at least one prompt")
    prompt_ids = encode_prompts(model, prompts, chat=chat)
    policy.prepare(model, prompt_ids, config, gen_lengths=gen_lengths)
    return Decoder(model, policy, config, progress=progress, on_block=on_block, cancelled=cancelled).run(
        prompt_ids, gen_lengths=gen_lengths)

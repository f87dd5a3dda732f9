"""The one decode loop.

Every strategy in unmask runs here: the loop keeps the decode's sequences in a row table
(`unmask.decoding.rows`: canvas, counters and per-position buffers in slots), calls the model
(`unmask.decoding.calls`, the only place that calls and counts), turns the current block's logits
into per-position statistics, asks the policy which positions to commit, writes them, verifies
drafts (`unmask.decoding.verify`), advances blocks, applies the stop rule and records the trace.
NaN or infinite logits at a generation position the decode reads stop it with
`NonFiniteLogitsError` (never a silent commit of garbage).

A step, in order: what the model said (`_block_logits`), the candidates (`_candidates`, sampling
on the model's device), the policy's view (`_view`, the stability streak), its decision applied
(`_apply`, verification included), the writes (`_write`), the trace (`_record`), block completion
and the stop rule (`_complete_blocks`), and sequences leaving (`_leave`).

Sequences of a batch move independently: each has its own current block, and a sequence that has
finished leaves the batch at once (it is not forwarded again, and its slot is freed), so its NFE is
exactly the calls it took part in. Each sequence draws its random numbers from its own generator
seeded with its seed, so a prompt decodes to the same tokens alone or in any batch.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import torch

from unmask.decoding.blocks import answer_stop, block_stop, stop_rule, stop_rule_of
from unmask.decoding.calls import ModelCalls, Said
from unmask.decoding.config import DecodeConfig, resolve_cache
from unmask.decoding.policies.base import Decision, Policy, StepView, most_confident
from unmask.decoding.results import DecodeResult, SequenceResult, sequence_result
from unmask.decoding.rows import (Joiner, RowTable, attention_block, grow_state, narrow_state, region_config,
                                  region_split, reset_rows, widen_state)
from unmask.decoding.sampling import gumbel_candidates
from unmask.decoding.stats import token_stats
from unmask.decoding.verify import verify
from unmask.errors import UnmaskError

Prompt = str | list[dict] | list[int]

__all__ = ["Decoder", "DecodeResult", "SequenceResult", "encode_prompts", "generate", "grow_state", "narrow_state",
           "reset_rows", "token_stats", "widen_state"]


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


class Decoder:
    """Runs one policy over one batch of prompts. Use `generate(...)`; this holds the per-decode state."""

    def __init__(self, model, policy: Policy, config: DecodeConfig, progress: Callable[[int], None] | None = None,
                 on_block: Callable[[int, int, list[int]], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None):
        self.model = model
        self.policy = policy
        self.config = replace(config, cache=resolve_cache(config.cache, model))  # `auto` decided for this model
        self.progress = progress
        # on_block(seq, block_index, generation tokens so far): a block of sequence `seq` is final (streaming)
        self.on_block = on_block
        # cancelled(seq) -> True: the sequence leaves the batch at once (a client went away)
        self.cancelled = cancelled
        self.step_rows = 0

    @torch.inference_mode()
    def run(self, prompt_ids: list[list[int]], seeds: list[int] | None = None, width: int | None = None,
            admit: Callable[[int, int], list[tuple]] | None = None, temperatures: list[float] | None = None,
            on_finish: Callable[[int, SequenceResult], None] | None = None,
            gen_lengths: list[int] | None = None, on_error: Callable[[int, Exception], None] | None = None,
            keep_results: bool = True) -> DecodeResult:
        """Decode `prompt_ids`; with `admit`, sequences may also join the decode at step boundaries.

        `seeds`: each sequence's seed (default: the config's seed for all); `temperatures`: each
        sequence's sampling temperature (default: the policy's); `gen_lengths`: each sequence's
        generation length (default: the config's gen_length for all), each a multiple of the block
        length. `width`: the least width of the prompt region (left padded; default the longest prompt).

        Sequences are numbered in the order they joined (the first batch 0..n-1), and every callback
        names them so. The canvas's generation region is as wide as the longest live generation; a
        shorter sequence is right padded: its positions past its own gen_length are hidden from
        attention, never committed, never reported, and its decode ends after its own last block, so
        it decodes to the tokens (and NFE) it gets alone. Continuous batching: `admit(width,
        taken)` is called before every model call after the first (`width`: the prompt region's;
        `taken`: sequences taken in so far; also when every sequence has left, so that the decode
        ends only when none is live and none joins) and returns the sequences that join now, as (prompt ids,
        seed), (prompt ids, seed, temperature) or (prompt ids, seed, temperature, gen_length); each
        takes a free slot of the row table with its own canvas row, generator, counters and policy
        state, so it decodes to the same tokens as it would alone, and a sequence that leaves frees
        its slot at once. `on_finish(seq, result)` hears of each sequence as soon as it leaves (its
        result is built once, then). With `on_error(seq, exc)`, a failure while building one
        sequence's result or in a callback about it (`on_finish`, `on_block`) is handed there and
        that sequence leaves, the others decoding on; without it, the failure ends the decode.
        `keep_results=False` keeps no result in the returned `DecodeResult` (a long continuous
        decode hands each to `on_finish` and holds nothing per sequence served).
        """
        policy, cfg = self.policy, self.config
        joiners = self._first(prompt_ids, seeds, temperatures, gen_lengths)
        if admit is not None and not policy.continuous:
            raise UnmaskError(f"strategy {policy.name} cannot take sequences into a running decode "
                              "(it prepares per batch); decode it in static batches", field="strategy")
        use_cache = cfg.cache != "none"
        if use_cache and not self.model.supports_cache:
            raise UnmaskError(f"model {self.model.name} does not support the KV cache; use --cache none", field="cache")
        self.table = RowTable(self.model, policy, cfg, record_trace=cfg.record_trace, use_cache=use_cache)
        self.calls = ModelCalls(self.model, self.table, cfg.cache)
        self.blocks = self.model.block_diffusion  # None: bidirectional attention
        self.stop = stop_rule_of(policy, self.model, cfg)
        self.pending: dict[int, Said] = {}  # slot -> what a verification's accepted canvas said
        self.results: dict[int, SequenceResult] = {}
        self.keep_results, self.on_finish, self.on_error = keep_results, on_finish, on_error
        self.failed: set[int] = set()  # slots whose sequence failed (handed to on_error): they leave
        self.taken = len(joiners)
        start = time.perf_counter()
        self.table.add(joiners, width or 0)
        step = 0
        while True:
            if admit is not None and step > 0:  # before every call after the first, even with none live
                self._admit(admit)
            if not bool(self.table.active.any()):
                break
            self._step(step)
            step += 1
            if self.progress is not None:
                self.progress(step)
        wall = time.perf_counter() - start
        sequences = [self.results[i] for i in sorted(self.results)]
        return DecodeResult(sequences=sequences, wall_s=wall, strategy=policy.name, params=policy.params, config=cfg,
                            extras=dict(self.calls.seconds))

    # --- sequences in --------------------------------------------------------------------------
    def _first(self, prompt_ids, seeds, temperatures, gen_lengths) -> list[Joiner]:
        """The first batch as joiners, its settings checked."""
        cfg = self.config
        prompt_ids = [list(p) for p in prompt_ids]
        n = len(prompt_ids)
        seeds = [int(cfg.seed)] * n if seeds is None else [int(x) for x in seeds]
        if len(seeds) != n:
            raise UnmaskError(f"{len(seeds)} seeds for {n} prompts", field="seed")
        own = float(getattr(self.policy.config, "temperature", 0.0))
        temps = [own] * n if temperatures is None else [float(t) for t in temperatures]
        if len(temps) != n or any(not t >= 0 for t in temps):
            raise UnmaskError("temperatures: one number >= 0 per prompt", field="temperature")
        lengths = [int(cfg.gen_length)] * n if gen_lengths is None else list(gen_lengths)
        if len(lengths) != n:
            raise UnmaskError(f"{len(lengths)} gen_lengths for {n} prompts", field="gen_length")
        self._checked_lengths: set[int] = set()
        for p, g in zip(prompt_ids, lengths):
            self._check_length(g, len(p))
        return [Joiner(i, p, s, t, g) for i, (p, s, t, g) in enumerate(zip(prompt_ids, seeds, temps, lengths))]

    def _admit(self, admit) -> None:
        """Take in the sequences `admit` offers before this call."""
        table = self.table
        offered = admit(table.prompt_len, self.taken)
        if not offered:
            return
        own = float(getattr(self.policy.config, "temperature", 0.0))
        joiners = []
        for j in offered:
            temperature = float(j[2]) if len(j) > 2 and j[2] is not None else own
            gen_length = int(j[3]) if len(j) > 3 and j[3] is not None else int(self.config.gen_length)
            self._check_length(gen_length, len(j[0]))
            joiners.append(Joiner(self.taken + len(joiners), list(j[0]), int(j[1]), temperature, gen_length))
        table.add(joiners)
        self.taken += len(joiners)

    def _check_length(self, gen_length, prompt_len: int) -> None:
        """A sequence's own generation length: a positive multiple of the block length that the
        policy can decode (its steps split over the blocks of its generation region, which for a
        block-diffusion model also holds the prompt's tail)."""
        cfg, policy = self.config, self.policy
        if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length <= 0:
            raise UnmaskError(f"gen_length must be a positive integer, got {gen_length!r}", field="gen_length")
        if not policy.whole_generation and gen_length % cfg.block_length:
            raise UnmaskError(f"block_length {cfg.block_length} does not divide gen_length {gen_length}; "
                              "pick a gen_length that is a multiple of the block length", field="gen_length")
        _, width = region_split(prompt_len, gen_length, attention_block(self.model, policy.whole_generation,
                                                                        cfg.block_length))
        if width not in self._checked_lengths:
            policy.check_lengths(self.model, region_config(cfg, width, policy.whole_generation))
            self._checked_lengths.add(width)

    # --- one step ------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        table = self.table
        idx = table.live()
        self.step_rows = int(idx.shape[0])  # sequences in this step's model call
        if self.blocks is not None:
            self._first_calls(idx)
        block_pos = (table.block_idx[idx] * table.row_block[idx])[:, None] + torch.arange(table.block_len,
                                                                                          device=idx.device)
        logits = self._block_logits(idx, block_pos)  # (b, block, V)
        stats = token_stats(logits)
        self._note_block(idx, block_pos, stats)
        candidate, confidence = self._candidates(idx, logits, stats)
        view = self._view(idx, block_pos, logits, stats, candidate, confidence, step)
        with self.calls.timed("policy_s"):
            decision = self.policy.decide(view, table.state)
        new_blk, commit, remask, edit, hold, events = self._apply(view, decision)
        self._write(view, new_blk, commit, remask, edit, events)
        if self.config.record_trace:
            self._record(view, remask, edit)
        self._complete_blocks(view, new_blk, hold)
        self._leave_cancelled()

    def _first_calls(self, idx: torch.Tensor) -> None:
        """A block-diffusion sequence's first step: the families that write the prompt's complete
        blocks in a call of their own do so (with the cache), and Fast-dLLM v2's prompt that ends on a
        block boundary predicts the generation's first token there, committed at once (the bonus)."""
        table, blocks = self.table, self.blocks
        new = idx[table.row_step[idx.cpu()].to(idx.device) == 0]
        if new.numel() == 0:
            return
        if not (blocks.store_calls and table.cache is not None):
            if not blocks.bonus:
                return
            new = new[table.lead[new] == 0]  # without a cache the prefill is only for the bonus
        rows, hidden = self.calls.prefill(new)
        if blocks.bonus and hidden is not None:
            tail_free = table.lead[rows] == 0  # a prompt tail shares the first block: no bonus there
            self._bonus(rows[tail_free], hidden[tail_free], torch.zeros_like(rows[tail_free]))

    def _block_logits(self, idx: torch.Tensor, block_pos: torch.Tensor) -> torch.Tensor:
        """The current block's logits (b, block, V) for this step: from what a verification's accepted
        canvas said, or from a model call (a cached sequence's block start refreshes its cache). The
        other generation positions a call computed update the sequences' last-known predictions."""
        table, calls = self.table, self.calls
        outputs = []  # (rows of idx, generation positions, features there)
        reused = [j for j, slot in enumerate(idx.tolist()) if slot in self.pending]
        if reused:
            said = [self.pending.pop(int(idx[j])) for j in reused]
            outputs.append((torch.tensor(reused, device=idx.device), torch.stack([s.where for s in said]),
                            torch.stack([s.features for s in said])))
        todo = [j for j in range(idx.shape[0]) if j not in set(reused)]
        if todo and self.blocks is not None:  # block-causal: the block and nothing after it
            todo_t = torch.tensor(todo, device=idx.device)
            outputs.append((todo_t, block_pos[todo_t], calls.block_features(idx[todo_t], block_pos[todo_t])))
        elif todo:
            todo_t = torch.tensor(todo, device=idx.device)
            groups = [(todo_t, False)]
            if table.cache is not None:
                refresh = table.block_step[idx[todo_t]] == 0
                groups = [(todo_t[refresh], False), (todo_t[~refresh], True)]
            for sel, partial in groups:
                if sel.numel():
                    where = self._where(idx[sel], block_pos[sel], partial)
                    outputs.append((sel, where, calls.forward(idx[sel], where, partial=partial)))
        features = None
        for sel, where, out in outputs:
            slots = idx[sel]
            # the block's place in what was computed, and the rest kept as the last-known predictions
            pick = (where[:, :, None] == block_pos[sel][:, None, :]).long().argmax(1)  # (n, block)
            block_out = out[torch.arange(slots.shape[0], device=idx.device)[:, None], pick]
            calls.remember(*calls.outside(slots, where, out, block_pos[sel]))
            if features is None:
                features = block_out.new_empty((idx.shape[0],) + tuple(block_out.shape[1:]))
            features[sel] = block_out
        read = block_pos < table.row_gen[idx][:, None]  # a whole-generation block ends in padding
        logits = calls.logits(features, idx, read)
        calls.check()
        return logits

    def _where(self, slots: torch.Tensor, block_pos: torch.Tensor, partial: bool) -> torch.Tensor:
        """The generation positions a call computes for `slots`: all without a cache (or at a cache
        refresh); the block (dual); the block and the rest of the sequence's own generation, padded
        by repeating its last position (prefix: a duplicate query writes the same keys)."""
        table = self.table
        device = slots.device
        if not partial:
            return torch.arange(table.gen, device=device).expand(slots.shape[0], -1)
        if self.config.cache == "dual":
            return block_pos
        starts, ends = block_pos[:, 0], table.row_gen[slots]
        width = int((ends - starts).max())
        return torch.minimum(starts[:, None] + torch.arange(width, device=device)[None], ends[:, None] - 1)

    def _note_block(self, idx, block_pos, stats) -> None:
        """The block's statistics become the sequences' last-known predictions there."""
        table = self.table
        rows = idx[:, None]
        table.known_top1[rows, block_pos] = stats["top1"]
        if table.record_trace:
            for key in ("top1_prob", "margin", "entropy"):
                getattr(table, f"known_{key}")[rows, block_pos] = stats[key]

    def _candidates(self, idx, logits, stats) -> tuple[torch.Tensor, torch.Tensor]:
        """The token each position would take (the argmax, or a Gumbel draw for a sequence that
        samples) and its un-noised probability."""
        table = self.table
        temps = [table.temps[s] for s in idx.tolist()]
        sampled = [j for j, t in enumerate(temps) if t > 0]
        if not sampled:
            return stats["top1"], stats["top1_prob"]
        # a sequence draws noise for its own block only (a whole-generation block of a shorter
        # sequence ends before the view's)
        widths = table.row_block[idx].clamp(max=table.block_len).tolist()
        slots = idx.tolist()
        candidate, confidence = stats["top1"].clone(), stats["top1_prob"].clone()
        sel = torch.tensor(sampled, device=idx.device)
        candidate[sel] = gumbel_candidates(logits, [temps[j] for j in sampled],
                                           [table.generators[slots[j]] for j in sampled], [widths[j] for j in sampled],
                                           rows=sampled)
        for j in sampled:  # one sequence's (block, vocabulary) at a time
            log_probs = torch.log_softmax(logits[j], dim=-1)
            confidence[j] = log_probs.gather(-1, candidate[j][:, None]).squeeze(-1).exp()
        return candidate, confidence

    def _view(self, idx, block_pos, logits, stats, candidate, confidence, step: int) -> StepView:
        """The policy's view of the block, with the stability streak: calls of this block that
        recomputed a position and found the same top-1 (every call recomputes the block; a block's
        first call starts every streak at 1)."""
        table, model = self.table, self.model
        rows = idx[:, None]
        top1 = stats["top1"]
        restart = (table.block_step[idx] == 0)[:, None] | (top1 != table.prev_top1[rows, block_pos])
        stable = torch.where(restart, torch.ones_like(top1), table.stable[rows, block_pos] + 1)
        table.stable[rows, block_pos] = stable
        table.prev_top1[rows, block_pos] = top1
        tokens = table.gen_view[rows, block_pos]
        fixed = block_pos < table.lead[idx][:, None]  # a block-diffusion prompt's tail in the first block
        return StepView(
            rows=idx, positions=block_pos, tokens=tokens, masked=tokens == model.mask_id, logits=logits,
            top1=top1, top1_prob=stats["top1_prob"], candidate=candidate, confidence=confidence,
            margin=stats["margin"], entropy=stats["entropy"], stable=stable,
            prev_confidence=table.prev_conf[rows, block_pos], block_step=table.block_step[idx], step=step,
            block_length=table.block_len, gen_length=table.gen, num_blocks=table.gen // table.block_len,
            mask_id=model.mask_id, stop_ids=tuple(model.stop_ids),
            generators=[table.generators[s] for s in idx.tolist()],
            row_gen_length=table.row_gen[idx], row_num_blocks=table.row_blocks[idx], fixed=fixed,
        )

    def _apply(self, view: StepView, decision: Decision):
        """The block after the decision: commits (at least one per step for a policy that must
        progress), remasks, the step bound, and the drafts the verification call keeps."""
        policy, mask_id = self.policy, self.model.mask_id
        masked = view.masked
        commit = decision.commit & masked
        if not policy.remasking and not policy.empty_steps:
            # progress guarantee: a step that commits nothing commits the most confident position
            stuck = ~commit.any(-1) & masked.any(-1)
            if bool(stuck.any()):
                commit |= most_confident(view.confidence, masked) & stuck[:, None]
        write = decision.tokens if decision.tokens is not None else view.candidate
        new_blk = torch.where(commit, write, view.tokens)
        remask = None
        if decision.remask is not None and policy.remasking:
            remask = decision.remask & ~masked & ~commit
            new_blk = torch.where(remask, torch.full_like(new_blk, mask_id), new_blk)
        # safety bound for remasking policies: at the limit, the block is finished as predicted
        table = self.table
        over = (table.block_step[view.rows] + 1 >= table.max_steps[view.rows])[:, None] & (new_blk == mask_id)
        new_blk = torch.where(over, view.candidate, new_blk)
        commit = commit | over
        edit, hold = None, torch.zeros_like(commit[:, 0])
        if policy.edits:  # token editing (LLaDA2.1): decided, non-prompt positions rewritten
            if decision.edit is not None:
                edit = decision.edit & ~masked & ~view.fixed & (write != view.tokens)
                new_blk = torch.where(edit, write, new_blk)
            if decision.hold is not None:  # the block stays open although no mask is left
                hold = decision.hold & (table.block_step[view.rows] + 1 < table.max_steps[view.rows])
        events = dict(decision.events or {})
        if decision.drafts is not None and not policy.remasking:
            new_blk, said, depth_events = verify(self.calls, policy, view, table.state, decision.drafts, new_blk)
            commit = commit | (masked & (new_blk != mask_id))
            self.pending.update(said)
            events.update(depth_events)
        return new_blk, commit, remask, edit, hold, events

    def _write(self, view: StepView, new_blk, commit, remask, edit, events) -> None:
        """Write the block into the canvas and account for the step: commit steps, the previous
        confidence, the block's redundancy history, the policy's events and the step counters."""
        table, mask_id = self.table, self.model.mask_id
        idx, block_pos = view.rows, view.positions
        rows = idx[:, None]
        table.canvas[rows, table.prompt_len + block_pos] = new_blk
        # the temporal redundancy's history: this call's top-1 where a block position stays masked
        table.history_room(int(table.block_step[idx].max()) + 1)
        still = torch.full((idx.shape[0], table.gen), -1, dtype=torch.long, device=idx.device)
        stays = (new_blk == mask_id) & (block_pos < table.row_gen[idx][:, None])
        still[torch.arange(idx.shape[0], device=idx.device)[:, None], block_pos] = torch.where(stays, view.top1, -1)
        table.hist[idx, table.block_step[idx]] = still
        if edit is not None:
            events["edits"] = edit.sum(-1)  # rewrites of decided positions (token editing)
        for name, counts in events.items():
            counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
            for slot, count in zip(idx.tolist(), counts):
                table.events[slot][name] = table.events[slot].get(name, 0.0) + float(count)
        written = commit if edit is None else commit | edit
        own_step = table.row_step[idx.cpu()].to(idx.device)[:, None].expand_as(block_pos)
        steps = torch.where(written, own_step, table.commit_step[rows, block_pos])
        if remask is not None:
            steps = torch.where(remask, torch.full_like(steps, -1), steps)
        table.commit_step[rows, block_pos] = steps
        table.prev_conf[rows, block_pos] = view.top1_prob
        table.block_step[idx] += 1
        table.row_step[idx.cpu()] += 1

    def _record(self, view: StepView, remask, edit) -> None:
        """The trace's row of this call for each sequence (its own generation only)."""
        table = self.table
        idx, block_pos = view.rows, view.positions
        gen_top1 = table.known_top1[idx]
        masked_before = table.gen_view[idx] == self.model.mask_id
        masked_before[torch.arange(idx.shape[0], device=idx.device)[:, None], block_pos] = view.masked
        for j, slot in enumerate(idx.tolist()):
            lead, own = int(table.lead[slot]), int(table.row_gen[slot])  # its own generation, the prompt tail left out
            table.trace_rows[slot].append(dict(
                top1=gen_top1[j, lead:own].cpu().numpy().copy(),
                confidence=table.known_top1_prob[slot, lead:own].cpu().numpy().copy(),
                margin=table.known_margin[slot, lead:own].cpu().numpy().copy(),
                entropy=table.known_entropy[slot, lead:own].cpu().numpy().copy(),
                masked_before=masked_before[j, lead:own].cpu().numpy().copy(),
                tokens_after=table.gen_view[slot, lead:own].cpu().numpy().copy(),
                block=int(table.block_idx[slot]),
            ))
            for changed, log in ((remask, table.remasked[slot]), (edit, table.edited[slot])):
                if changed is not None:  # (the call's trace row, position in the sequence's generation)
                    for p in changed[j].nonzero().squeeze(1).tolist():
                        log.append((int(table.row_step[slot]) - 1, int(block_pos[j, p]) - lead))

    # --- blocks and leaving --------------------------------------------------------------------
    def _complete_blocks(self, view: StepView, new_blk, hold) -> None:
        """Sequences whose block holds no mask (and that the policy does not hold open) move to their
        next block, a stop rule may end them first, and a sequence past its last block leaves.
        Block-diffusion families run their reference's block transition: a store call over the
        finished block (with the cache) and Fast-dLLM v2's bonus token."""
        table, model, rule = self.table, self.model, self.stop
        idx = view.rows
        done = ~(new_blk == model.mask_id).any(-1) & ~hold  # (b,)
        stopped = answer_stop(table, idx, model.stop_ids) if rule == "answer" else torch.zeros_like(done)
        finishing = done & ~stopped
        if bool(finishing.any()):
            slots, blk = idx[finishing], view.positions[finishing]
            if rule == "predicted":
                def predict(rows, later):
                    return self.policy.stop_predictions(rows, self.calls.predictions(rows, later))

                stop_rule(table, slots, predict, model.stop_ids)
            elif self.blocks is not None:
                if self.blocks.bonus or (self.blocks.store_calls and table.cache is not None):
                    hidden = self.calls.store(slots, blk)
                    if self.blocks.bonus:
                        self._bonus(slots, hidden, blk[:, 0] + table.row_block[slots])
                        if rule == "answer":
                            stopped[finishing] |= answer_stop(table, slots, model.stop_ids)
                if rule == "block":
                    stopped[finishing] |= block_stop(table, slots, model.stop_ids)
        ended = done | stopped
        if not bool(ended.any()):
            return
        slots = idx[ended]
        table.settle_redundancy(slots)
        table.block_idx[slots] += 1
        table.block_step[slots] = 0
        if table.cache is not None or self.blocks is not None:  # the next block starts with a fresh call
            for slot in slots.tolist():
                self.pending.pop(slot, None)
        over = (table.block_idx[slots] >= table.row_blocks[slots]) | table.stopped_early[slots.cpu()].to(slots.device)
        if self.on_block is not None:  # the block is final: stream it before any answer is sent
            for slot in slots.tolist():
                end = int(table.row_gen[slot]) if bool(table.stopped_early[slot]) else int(
                    table.block_idx[slot] * table.row_block[slot])
                tokens = table.gen_view[slot, int(table.lead[slot]):end].tolist()
                self._guarded(slot, lambda s=slot, t=tokens: self.on_block(table.seq[s], int(table.block_idx[s]) - 1, t))
        for slot in slots[over].tolist():
            if slot not in self.failed:
                self._result(slot, cancelled=False)
            self._release(slot)

    def _bonus(self, slots: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Commit, at generation `positions` (n,) (where still inside each sequence's generation), the
        greedy token `hidden` (n, F) predicts: Fast-dLLM v2's first token of a block, read from the
        position before it once everything before it is final."""
        table = self.table
        inside = positions < table.row_gen[slots]
        if not bool(inside.any()):
            return
        slots, hidden, positions = slots[inside], hidden[inside], positions[inside]
        logits = self.calls.logits(hidden[:, None], slots, torch.ones_like(positions, dtype=torch.bool)[:, None])
        self.calls.check()
        table.canvas[slots, table.prompt_len + positions] = logits[:, 0].argmax(-1)
        table.commit_step[slots, positions] = table.row_step[slots.cpu()].to(slots.device)

    def _leave_cancelled(self) -> None:
        """Sequences whose client went away (`cancelled`) or whose callbacks failed leave now."""
        if self.cancelled is None and not self.failed:
            return
        table = self.table
        for slot in table.live().tolist():
            if slot in self.failed:
                self._release(slot)
            elif self.cancelled is not None and self.cancelled(table.seq[slot]):
                table.settle_redundancy(torch.tensor([slot], device=table.device))
                self._result(slot, cancelled=True)
                self._release(slot)

    def _result(self, slot: int, cancelled: bool) -> None:
        """Build the sequence's result (once) and hand it to `on_finish`."""
        table = self.table
        seq = table.seq[slot]

        def build():
            result = sequence_result(self.model, **table.result_args(slot), cancelled=cancelled)
            if self.keep_results:
                self.results[seq] = result
            if self.on_finish is not None:
                self.on_finish(seq, result)

        self._guarded(slot, build)

    def _guarded(self, slot: int, fn) -> None:
        """Run `fn` for the sequence in `slot`; with `on_error`, a failure is handed there and the
        sequence leaves at the end of the step, the others decoding on."""
        if self.on_error is None:
            fn()
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one sequence's failure must not end the decode
            self.failed.add(slot)
            self.on_error(self.table.seq[slot], exc)

    def _release(self, slot: int) -> None:
        self.pending.pop(slot, None)
        self.failed.discard(slot)
        self.table.release(slot)


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
    config = DecodeConfig(**{**(config.__dict__ if config else {}), **overrides}).resolved(
        model.defaults, whole_generation=policy.whole_generation)
    if not prompts:
        raise UnmaskError("no prompts given; pass at least one prompt")
    prompt_ids = encode_prompts(model, prompts, chat=chat)
    policy.prepare(model, prompt_ids, config, gen_lengths=gen_lengths)
    return Decoder(model, policy, config, progress=progress, on_block=on_block, cancelled=cancelled).run(
        prompt_ids, gen_lengths=gen_lengths)

"""The one training loop: batch, forward, loss, backward, clip, step, eval every N, checkpoint.

The objective is LLaDA's SFT loss (Nie et al., 2025, "Large Language Diffusion Models", Eq. 5):
the prompt is kept clean and never scored; each response position (the answer and the EOS padding
after it, up to `gen_length`) is masked independently with probability p_mask = (1 - eps) t + eps,
t ~ U(0, 1) drawn once per sequence; the loss is the cross-entropy on masked response positions,
each weighted 1 / p_mask, summed and divided by the number of response positions (here
batch * gen_length, since every row has exactly `gen_length` of them).

Departure from the paper: by default the t of a batch are stratified, t_i = (i + u_i) / B over a
shuffled i, so a batch covers the whole noise range evenly. Each t_i is still marginally
U(0, 1), so the objective's expectation is unchanged; only its variance across batches drops.
`TrainConfig.stratified = False` gives plain i.i.d. t.

Optional block-aware rows (`TrainConfig.block_frac`, `--block-masking`; default 0, the paper's
objective). Decoding is semi-autoregressive: when block k is being decoded, every earlier block is
clean, block k is partly masked and every later block is fully masked. Uniform masking spends most
of its rows on canvases decoding never shows (a clean later token beside a masked earlier one).
A block-aware row is drawn as decoding sees it: a block index k uniform over the response's
blocks (of `block_length`, aligned to the response start as the loop aligns them), the blocks
before k clean, block k masked with ratio p_mask (weight 1 / p_mask, as above) and every later
position masked (weight 1: it is masked with probability 1). The remaining rows stay uniform, so
any-order canvases (drafts, out-of-block commits) are still trained. Choice and measurement: the
docs/builtin.md.

Checkpoints: every `save_every` steps and at the end the model is written to `out` in Hugging Face
layout (`config.json`, `model.safetensors`, tokenizer files) and the optimizer, step and random
states to `out/trainer_state.pt`; metrics go to `out/train_log.jsonl`. Those two files are for
`--resume` and for people, not part of the checkpoint: a folder that ships (e.g. the built-in model
under `unmask/models/builtin/default/`) must not contain them; copy only the HF-layout files. The learning-rate
schedule is a pure function of the step, so the step is all the scheduler state there is.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from unmask.errors import UnmaskError
from unmask.training.data import Batch, collate

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


def _finite_number(value) -> bool:
    """A real, finite int or float (JSON and argparse can hand over anything)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Every knob of `unmask train sft` (the built-in model's own settings are in docs/builtin.md)."""

    out: str = "train_out"
    init: str | None = None  # checkpoint to fine-tune (path, hub id or "builtin"); None: fresh network
    tasks: tuple[str, ...] = ("arith", "trace")  # generated task families to train on
    task_weights: tuple[float, ...] | None = None  # sampling weight per task (None: uniform over tasks)
    hard_bias: float = 0.0  # draw training problems in proportion to task.hardness(problem) ** hard_bias
    data: str | None = None  # JSONL file of {"prompt"|"messages", "response"} records
    eval_tasks: tuple[str, ...] | None = None  # dev-set accuracy on these (default: `tasks`)
    # the canvas, as decoding sees it
    gen_length: int = 48
    block_length: int = 16
    # optimisation
    steps: int = 5000
    time_budget_s: float | None = None  # also stop (and finish the cosine decay) after this much training time
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eps: float = 1e-3  # p_mask floor
    stratified: bool = True
    block_frac: float = 0.0  # share of rows masked as semi-autoregressive decoding sees them (module docstring)
    block_diffusion: bool = False  # a block-causal model, trained with SDAR's two-copy recipe (unmask.training.block)
    # fresh network size (ignored with `init`)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int | None = None  # default 3 * d_model (LLaDA's ratio)
    max_sequence_length: int = 256
    init_std: float = 0.02
    # bookkeeping
    eval_every: int = 500
    eval_problems: int = 100  # dev problems per task
    eval_batch_size: int = 64
    eval_strategy: str = "low_confidence"  # the policy dev accuracy is measured with (its NFE and R_total are logged too)
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    resume: bool = False
    progress: bool = True

    # fields a resumed run may change without changing what it computes, and the time budget (a budget
    # run's schedule follows wall-clock time, so it never resumes bit for bit; a new budget re-times the
    # rest of its cosine decay)
    RESUMABLE_OVERRIDES = ("eval_every", "eval_problems", "eval_batch_size", "save_every", "log_every",
                           "threads", "progress", "device", "time_budget_s")

    def validate(self) -> None:
        positive = ("gen_length", "block_length", "steps", "batch_size", "d_model", "n_layers", "n_heads",
                    "eval_problems", "eval_batch_size", "log_every", "max_sequence_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnmaskError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}", field=name)
        for name in ("eval_every", "save_every", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise UnmaskError(f"{name.replace('_', '-')} must be 0 or a positive integer, got {value!r}", field=name)
        if self.gen_length % self.block_length:
            raise UnmaskError(
                f"block-length {self.block_length} does not divide gen-length {self.gen_length}; pick a divisor",
                field="block_length",
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UnmaskError(f"lr must be a positive number, got {self.lr!r}", field="lr")
        if not (0 <= self.min_lr <= self.lr):
            raise UnmaskError(f"min-lr must lie in [0, lr], got {self.min_lr!r}", field="min_lr")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UnmaskError("weight-decay and grad-clip must be >= 0", field="weight_decay")
        if not isinstance(self.block_frac, (int, float)) or not 0 <= self.block_frac <= 1:
            raise UnmaskError(f"block-masking must lie in [0, 1], got {self.block_frac!r}", field="block_frac")
        if self.block_diffusion and self.block_frac:
            raise UnmaskError("--block-masking has no place in --block-diffusion training, which trains every block "
                              "against the clean blocks before it already; drop --block-masking", field="block_frac")
        if not (0 < self.eps < 1):
            raise UnmaskError(f"eps must lie in (0, 1), got {self.eps!r}", field="eps")
        if self.d_model % self.n_heads:
            raise UnmaskError(f"d-model {self.d_model} is not divisible by n-heads {self.n_heads}", field="d_model")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise UnmaskError(f"mlp-hidden must be a positive integer, got {self.mlp_hidden!r}", field="mlp_hidden")
        from unmask.decoding import parse_strategy

        parse_strategy(self.eval_strategy)  # a bad strategy fails before any training
        if not self.tasks and not self.data:
            raise UnmaskError("nothing to train on; pass --task arith,trace and/or --data FILE", field="tasks")
        if self.task_weights is not None:
            weights = self.task_weights
            if len(weights) != len(self.tasks):
                raise UnmaskError(f"task-weights gives {len(weights)} weights for {len(self.tasks)} tasks "
                                  f"({','.join(self.tasks) or 'none'}); give one per task, in the same order", field="task_weights")
            if not all(_finite_number(w) and w > 0 for w in weights):
                raise UnmaskError(f"task-weights must be positive numbers, got {weights!r}", field="task_weights")
        if not (_finite_number(self.hard_bias) and self.hard_bias >= 0):
            raise UnmaskError(f"hard-bias must be a number >= 0 (0: uniform), got {self.hard_bias!r}", field="hard_bias")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise UnmaskError(f"time-budget must be a positive number of seconds, got {self.time_budget_s!r}", field="time_budget_s")
        if self.threads is not None and self.threads <= 0:
            raise UnmaskError(f"threads must be a positive integer, got {self.threads!r}", field="threads")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["eval_tasks"] = list(self.eval_tasks) if self.eval_tasks is not None else None
        out["task_weights"] = list(self.task_weights) if self.task_weights is not None else None
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("tasks", "eval_tasks", "task_weights"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def lr_at(step: int, config: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `steps` (nanoGPT's schedule).

    With a time budget the decay runs on whichever is further along, steps or training time, so
    a run whose speed is not known in advance still ends its schedule when its time is up. Such a
    schedule depends on wall-clock time, so only runs without a budget resume bit for bit.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.time_budget_s:
        progress = max(progress, min(1.0, elapsed_s / config.time_budget_s))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def sample_mask_ratio(batch_size: int, eps: float, stratified: bool, generator: torch.Generator) -> torch.Tensor:
    """p_mask per sequence, (batch,): (1 - eps) t + eps with t ~ U(0, 1), stratified over the batch if asked."""
    u = torch.rand(batch_size, generator=generator)
    if stratified:
        strata = torch.randperm(batch_size, generator=generator).float()
        t = (strata + u) / batch_size
    else:
        t = u
    return (1.0 - eps) * t + eps


def masked_diffusion_loss(
    model, batch: Batch, generator: torch.Generator, eps: float = 1e-3, stratified: bool = True,
    block_frac: float = 0.0, block_length: int | None = None, block_diffusion: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """LLaDA's SFT loss on one batch (see the module docstring), or with `block_diffusion` (the gen
    length the batch was collated for, its response columns one block wider) SDAR's two-copy
    block-diffusion loss (`unmask.training.block`). Returns (loss, details)."""
    device = model.device
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    response = batch.response_mask.to(device)
    rows, gen = input_ids.shape[0], batch.gen_length
    if block_diffusion:
        from unmask.training.block import region_mask

        inside = region_mask(attention_mask, response, block_diffusion, block_length)
        attention_mask = attention_mask & (inside | ~response)  # columns past a row's blocks are padding
        response = inside
    p_mask = sample_mask_ratio(rows, eps, stratified, generator).to(device)  # (batch,)
    draw = torch.rand(input_ids.shape, generator=generator).to(device)
    masked = (draw < p_mask[:, None]) & response  # (batch, seq); never a prompt or padding position
    weights = masked[:, -gen:].float() / p_mask[:, None]
    if block_frac > 0:
        masked, weights = _block_aware(masked, weights, generator, block_frac, block_length or gen, gen)
    noisy = torch.where(masked, torch.full_like(input_ids, model.mask_id), input_ids)
    if block_diffusion:
        from unmask.training.block import two_copy_logits

        keep = torch.arange(input_ids.shape[1] - gen, input_ids.shape[1], device=device).expand(rows, -1)
        logits = two_copy_logits(model, noisy, input_ids, attention_mask, block_length, keep)  # (batch, gen, vocab)
    else:
        logits = model.logits(noisy, attention_mask, model.position_ids(attention_mask))[:, -gen:]  # (batch, gen, vocab)
    # only the response region can be scored; slicing first keeps the softmax small
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), input_ids[:, -gen:].reshape(-1), reduction="none"
    ).view(rows, gen)
    loss = (token_loss * weights).sum() / response.sum()  # per answer position (rows * gen without blocks)
    return loss, {"masked": masked, "p_mask": p_mask, "noisy": noisy, "response": response}


def _block_aware(masked, weights, generator, block_frac: float, block_length: int, gen: int):
    """Turn a `block_frac` share of the rows into block-aware rows (module docstring)."""
    rows, device = masked.shape[0], masked.device
    chosen = (torch.rand(rows, generator=generator) < block_frac).to(device)  # (batch,)
    n_blocks = -(-gen // block_length)
    start = (torch.randint(0, n_blocks, (rows,), generator=generator) * block_length).to(device)[:, None]
    pos = torch.arange(gen, device=device)[None, :]
    window, after = (pos >= start) & (pos < start + block_length), pos >= start + block_length
    resp = masked[:, -gen:]
    block_masked = (resp & window) | after
    block_weights = torch.where(after, torch.ones_like(weights), weights * window)
    masked = masked.clone()
    masked[:, -gen:] = torch.where(chosen[:, None], block_masked, resp)
    return masked, torch.where(chosen[:, None], block_weights, weights)


def make_optimizer(network: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings) only, never on norms or biases."""
    params = [p for p in network.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


class Trainer:
    """Owns the model, optimizer, data stream and random states of one run; `train()` is the loop."""

    def __init__(self, model, source, config: TrainConfig, eval_tasks: list | None = None):
        self.model = model
        self.source = source
        self.config = config
        self.eval_tasks = eval_tasks or []  # [(name, Task, [Problem])]
        self.out = Path(config.out)
        self.optimizer = make_optimizer(model.network, config)
        self.step = 0
        self.train_time_s = 0.0  # training time so far (evaluation and checkpointing excluded)
        self.data_rng = random.Random(config.seed)
        self.mask_gen = torch.Generator().manual_seed(config.seed)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "train_time_s": self.train_time_s,
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.data_rng.getstate(),
            "mask_gen": self.mask_gen.get_state(),
            "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_rng.setstate(state["data_rng"])
        self.mask_gen.set_state(state["mask_gen"])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])

    def save(self) -> None:
        """The HF-layout checkpoint in `out`, then `out/trainer_state.pt` (written atomically)."""
        from unmask.models.loading import save_checkpoint

        network = self.model.network
        was_training = network.training
        save_checkpoint(self.model, self.out, extra_config={"unmask_name": self.model.name, "unmask_train_step": self.step})
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.out / STATE_FILE)
        network.train(was_training)

    # -- logging ------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        with open(self.out / LOG_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev accuracy per task, decoding with `eval_strategy` (default: one token per step).

        The mean NFE and R_total per problem of that decode are kept in `self.last_eval_costs`
        (R_total from each decode's trace, `unmask.decoding.redundancy.r_total`: the same measure
        whatever the eval strategy).
        """
        from unmask.decoding import generate
        from unmask.decoding.redundancy import r_total

        network = self.model.network
        network.eval()
        results, costs = {}, {}
        for name, task, problems in self.eval_tasks:
            correct, nfe, redundancy = 0.0, 0.0, 0.0
            for start in range(0, len(problems), self.config.eval_batch_size):
                chunk = problems[start : start + self.config.eval_batch_size]
                out = generate(
                    self.model,
                    [task.messages(p) for p in chunk],
                    policy=self.config.eval_strategy,
                    gen_length=self.config.gen_length,
                    block_length=self.config.block_length,
                    seed=0,
                    record_trace=True,
                    cache="auto",  # a block-diffusion model's exact cache: the same tokens, faster
                )
                correct += sum(task.score(p, s.text) for p, s in zip(chunk, out.sequences))
                nfe += sum(s.nfe for s in out.sequences)
                redundancy += sum(r_total(s.trace) for s in out.sequences)
            n = max(1, len(problems))
            results[name] = correct / n
            costs[name] = {"nfe": round(nfe / n, 3), "r_total": round(redundancy / n, 3)}
        self.last_eval_costs = costs
        network.train()
        return results

    # -- the loop -----------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        config = self.config
        examples = [self.source.sample(self.data_rng) for _ in range(config.batch_size)]
        # block diffusion: a row's generation region runs to the end of its last block, up to a block more
        width = config.gen_length + (config.block_length - 1 if config.block_diffusion else 0)
        return collate(examples, width, self.model.pad_id, self.model.eos_id)

    def train_step(self, batch: Batch) -> tuple[float, float, float]:
        """One optimisation step; returns (loss, grad norm, lr)."""
        lr = lr_at(self.step, self.config, self.train_time_s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        config = self.config
        loss, _ = masked_diffusion_loss(
            self.model, batch, self.mask_gen, config.eps, config.stratified, config.block_frac, config.block_length,
            block_diffusion=config.gen_length if config.block_diffusion else None,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.network.parameters(), self.config.grad_clip)
        else:
            norm = torch.zeros(())
        self.optimizer.step()
        self.step += 1
        return float(loss.detach()), float(norm), lr

    def train(self) -> dict:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.network.train()
        bar = None
        if config.progress:
            from tqdm import tqdm

            interactive = sys.stderr.isatty()
            bar = tqdm(total=config.steps, initial=self.step, desc="sft", dynamic_ncols=True,
                       mininterval=0.5 if interactive else 30.0, file=sys.stderr)
        summary: dict = {"loss": None, "eval": None}
        try:
            self._loop(bar, summary)
        except KeyboardInterrupt:
            if self.step > 0:
                self.save()  # an interrupted run resumes from where it stopped
            raise
        finally:
            if bar is not None:
                bar.close()
        summary["step"] = self.step
        return summary

    def _loop(self, bar, summary: dict) -> None:
        config = self.config
        losses: list[float] = []
        last_time, last_step = time.time(), self.step
        start = time.time()
        while self.step < config.steps:
            if config.time_budget_s and self.train_time_s >= config.time_budget_s:
                (bar.write if bar is not None else print)(f"time budget of {config.time_budget_s:.0f}s spent at step {self.step}")
                break
            t_step = time.time()
            loss, norm, lr = self.train_step(self.next_batch())
            self.train_time_s += time.time() - t_step
            if not math.isfinite(loss):
                raise UnmaskError(f"the loss became {loss} at step {self.step}; lower --lr and resume from the last checkpoint")
            losses.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            if self.step % config.log_every == 0 or self.step == config.steps:
                now = time.time()
                rate = (self.step - last_step) / max(now - last_time, 1e-9)
                mean = sum(losses) / len(losses)
                self.log({"step": self.step, "loss": round(mean, 5), "lr": lr, "grad_norm": round(norm, 4),
                          "steps_per_s": round(rate, 4), "elapsed_s": round(now - start, 1),
                          "train_time_s": round(self.train_time_s, 1)})
                summary["loss"] = mean
                losses, last_time, last_step = [], now, self.step
            if self.eval_tasks and config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                t0 = time.time()
                accuracy = self.evaluate()
                record = {"step": self.step, "eval": {k: round(v, 4) for k, v in accuracy.items()},
                          "eval_costs": self.last_eval_costs, "eval_s": round(time.time() - t0, 1)}
                self.log(record)
                summary["eval"] = accuracy
                message = f"step {self.step}: dev accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
                (bar.write if bar is not None else print)(message)
                last_time += time.time() - t0  # keep the step rate a training rate
            if config.save_every and self.step % config.save_every == 0 and self.step < config.steps:
                self.save()
        if self.eval_tasks and config.eval_every:
            t0 = time.time()
            accuracy = self.evaluate()
            self.log({"step": self.step, "eval": {k: round(v, 4) for k, v in accuracy.items()},
                      "eval_costs": self.last_eval_costs, "eval_s": round(time.time() - t0, 1), "final": True})
            summary["eval"] = accuracy
            (bar.write if bar is not None else print)(
                f"step {self.step} (final): dev accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
        self.save()

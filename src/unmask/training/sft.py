"""`unmask train sft`: build or load the model, the data and the trainer, then run the loop.

One entry point covers the three uses of the trainer:
- training the built-in model from scratch (no `init`: a fresh `LLaDANetwork` of the size flags,
  with the built-in tokenizer of the chosen tasks);
- fine-tuning any loaded checkpoint on the generated tasks (`init=PATH` or `init="builtin"`);
- fine-tuning on a JSONL file of prompt/response records (`data=FILE`, e.g. R²-SFT trajectories),
  alone or mixed with the tasks.
`resume=True` reloads the model from `out` and the optimizer/step/random states from
`out/trainer_state.pt`, and carries on with the saved configuration.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from unmask.errors import UnmaskError
from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.training.data import JsonlSource, MixedSource, TaskSource
from unmask.training.trainer import STATE_FILE, Trainer, TrainConfig


def fresh_model(config: TrainConfig) -> DiffusionLM:
    """A randomly initialised LLaDA network of the configured size, with the built-in tokenizer."""
    from unmask.models.llada import LLaDAConfig, LLaDANetwork
    from unmask.training.tokenizer import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer(tuple(config.tasks) or ("arith", "trace"))
    hf = tokenizer.hf
    eos = int(hf.eos_token_id)
    cfg = LLaDAConfig(
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        mlp_hidden_size=config.mlp_hidden or 3 * config.d_model,
        vocab_size=len(hf),
        embedding_size=len(hf),
        rope_theta=10000.0,
        max_sequence_length=config.max_sequence_length,
        mask_token_id=int(hf.convert_tokens_to_ids("<|mdm_mask|>")),
        eos_token_id=eos,
        pad_token_id=eos,
    )
    network = LLaDANetwork(cfg)
    network.init_weights(std=config.init_std, seed=config.seed)
    eot = tokenizer.token_id("<|eot_id|>")
    return DiffusionLM(
        network=network,
        tokenizer=tokenizer,
        mask_id=cfg.mask_token_id,
        eos_id=eos,
        stop_ids=(eos,) + ((eot,) if eot is not None else ()),
        pad_id=eos,
        name="builtin",
        defaults=DecodeDefaults(gen_length=config.gen_length, block_length=config.block_length),
        supports_cache=True,
        max_length=cfg.max_sequence_length,
    )


def load_for_training(spec: str, config: TrainConfig) -> DiffusionLM:
    from unmask.models.loading import load_model

    model = load_model(spec, device=config.device, dtype=torch.float32)
    if not any(p.is_floating_point() for p in model.network.parameters()):
        raise UnmaskError(f"checkpoint {spec} has no trainable weights")
    for p in model.network.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: DiffusionLM) -> int:
    return sum(p.numel() for p in model.network.parameters())


def build_source(model: DiffusionLM, config: TrainConfig):
    sources = []
    if config.tasks:
        sources.append(TaskSource(model.tokenizer, list(config.tasks), config.gen_length, config.task_weights,
                                  config.hard_bias))
    if config.data:
        sources.append(JsonlSource(model.tokenizer, config.data, config.gen_length))
    return MixedSource(sources)


def build_eval_tasks(config: TrainConfig) -> list:
    from unmask.tasks import get_task

    names = config.eval_tasks if config.eval_tasks is not None else config.tasks
    out = []
    for name in names:
        task = get_task(name)
        out.append((name, task, task.problems("dev", limit=config.eval_problems, seed=0)))
    return out


def prepare(config: TrainConfig) -> Trainer:
    """Everything `run_sft` does before the loop: the model, the data, the trainer (resumed if asked)."""
    config.validate()
    out = Path(config.out)
    state = None
    if config.resume:
        state_file = out / STATE_FILE
        if not state_file.exists():
            raise UnmaskError(f"--resume: {state_file} does not exist; start the run without --resume")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        overrides = {k: getattr(config, k) for k in TrainConfig.RESUMABLE_OVERRIDES}
        if config.time_budget_s is None:  # no --time-budget given: keep the saved one
            overrides.pop("time_budget_s")
        config = dataclasses.replace(saved, out=config.out, resume=True, **overrides)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if state is not None:
        model = load_for_training(str(out), config)
    elif config.init:
        model = load_for_training(config.init, config)
        model.defaults = DecodeDefaults(gen_length=config.gen_length, block_length=config.block_length)
    else:
        model = fresh_model(config).to(device=config.device)
    if config.block_diffusion and model.block_diffusion is None:
        from unmask.training.block import make_block_causal

        make_block_causal(model)
    elif model.block_diffusion is not None and not config.block_diffusion:
        raise UnmaskError(f"{config.init or config.out} is a block-diffusion model; train it with --block-diffusion",
                          field="block_diffusion")
    if model.max_length < 64 + config.gen_length:
        raise UnmaskError(f"the model's max length {model.max_length} is too short for gen-length {config.gen_length}")
    trainer = Trainer(model, build_source(model, config), config, build_eval_tasks(config))
    if state is not None:
        trainer.load_state_dict(state)
    return trainer


def run_sft(config: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) as `config` says; returns a summary of the run."""
    trainer = prepare(config)
    summary = trainer.train()
    summary["parameters"] = count_parameters(trainer.model)
    summary["out"] = str(trainer.out)
    return summary

"""The SFT trainer: objective, layout, resume, fine-tuning, JSONL data, argument errors."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from unmask.errors import UnmaskError
from unmask.training.cli import add_train_parser, config_from_args, run_train
from unmask.training.data import Example, collate
from unmask.training.sft import fresh_model, prepare
from unmask.training.trainer import STATE_FILE, TrainConfig, masked_diffusion_loss, sample_mask_ratio

# small train pools keep the tests fast (the default pool is 50k problems per task)
TASKS = ("arith:train_size=300", "trace:train_size=300")
TINY = dict(tasks=TASKS, d_model=32, n_layers=2, n_heads=4, batch_size=8, eval_every=0, save_every=0, progress=False,
            warmup_steps=2, log_every=1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "sft", *argv])


def tiny_config(tmp_path, **kwargs) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / "run"), **{**TINY, **kwargs})


def test_masking_never_touches_prompt_and_loss_ignores_it(tmp_path):
    trainer = prepare(tiny_config(tmp_path, steps=1))
    model, batch = trainer.model, trainer.next_batch()
    gen = torch.Generator().manual_seed(0)
    _, info = masked_diffusion_loss(model, batch, gen)
    assert not (info["masked"] & ~batch.response_mask).any()
    assert torch.equal(info["noisy"][~batch.response_mask], batch.input_ids[~batch.response_mask])
    assert batch.response_mask[:, -48:].all() and not batch.response_mask[:, :-48].any()
    # the loss does not depend on what the model predicts at prompt positions
    logits_hook = []

    def perturb(module, args, output):
        output = output.clone()
        output[:, :-48] = torch.randn_like(output[:, :-48]) * 100
        logits_hook.append(1)
        return output

    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        loss_a, _ = masked_diffusion_loss(model, batch, gen_a)
        handle = model.network.register_forward_hook(perturb)
        loss_b, _ = masked_diffusion_loss(model, batch, gen_b)
        handle.remove()
    assert logits_hook and torch.allclose(loss_a, loss_b)


def test_batch_layout_left_pads_prompts_and_eos_pads_responses():
    batch = collate([Example([5, 6, 7], [8, 9]), Example([5], [8])], gen_length=4, pad_id=0, eos_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [0, 0, 5, 8, 0, 0, 0]]
    assert batch.attention_mask.tolist()[1] == [False, False, True, True, True, True, True]
    with pytest.raises(UnmaskError):
        collate([Example([5], [1, 2, 3])], gen_length=2, pad_id=0, eos_id=0)


def test_block_aware_rows_mask_as_block_decoding_sees_them(tmp_path):
    trainer = prepare(tiny_config(tmp_path, steps=1, batch_size=32))
    model, batch = trainer.model, trainer.next_batch()
    gen, block = 48, 16
    _, info = masked_diffusion_loss(model, batch, torch.Generator().manual_seed(3), block_frac=1.0, block_length=block)
    masked = info["masked"]
    assert not (masked & ~batch.response_mask).any()
    resp = masked[:, -gen:].view(-1, gen // block, block)
    for row in resp:
        full = row.all(dim=1)
        touched = row.any(dim=1)
        first = int(touched.int().argmax()) if touched.any() else gen // block
        # blocks before the current one are clean, every block after it fully masked
        assert not touched[:first].any()
        assert full[first + 1:].all()
    # with block_frac 0 nothing changes: same draws, same mask as the plain objective
    a = masked_diffusion_loss(model, batch, torch.Generator().manual_seed(4))[1]["masked"]
    b = masked_diffusion_loss(model, batch, torch.Generator().manual_seed(4), block_frac=0.0, block_length=block)[1]["masked"]
    assert torch.equal(a, b)
    # uniform masking, unlike the block-aware rows above, does leave clean tokens after masked ones
    uniform_mixed = any((~r[-gen:]).nonzero().max() > r[-gen:].nonzero().min() for r in a if r[-gen:].any())
    assert uniform_mixed


def test_block_masking_flag_is_checked():
    assert config_from_args(parse(["--out", "x", "--block-masking", "0.5"])).block_frac == 0.5
    with pytest.raises(UnmaskError, match="block-masking"):
        config_from_args(parse(["--out", "x", "--block-masking", "1.5"])).validate()


@pytest.fixture(scope="module")
def tok():
    return fresh_model(TrainConfig(d_model=32, n_layers=1, n_heads=4)).tokenizer


def draw_examples(tok, tasks, n, *args):
    """n training examples from a fresh TaskSource(tok, tasks, 48, *args), seed 0."""
    from unmask.training.data import TaskSource

    source, rng = TaskSource(tok, list(tasks), 48, *args), random.Random(0)
    return [source.sample(rng) for _ in range(n)]


def test_task_weights_skew_the_task_mix_and_equal_weights_change_nothing(tok):
    print_id = tok.hf.convert_tokens_to_ids("print")

    def draws(weights, n=600):
        return draw_examples(tok, TASKS, n, weights)

    def trace_share(examples):
        return sum(print_id in e.prompt_ids for e in examples) / len(examples)

    plain = draws(None)
    assert 0.4 < trace_share(plain) < 0.6
    assert [e.prompt_ids for e in draws([2.0, 2.0])] == [e.prompt_ids for e in plain]
    assert trace_share(draws([1.0, 3.0])) > 0.68  # expected 0.75
    assert trace_share(draws([3.0, 1.0])) < 0.32  # expected 0.25


@pytest.mark.parametrize("weights", ["1", "1,2,3", "1,0", "1,x", "1,-2"])
def test_task_weights_flag_is_checked(weights):
    with pytest.raises(UnmaskError, match="task-weights"):
        config_from_args(parse(["--out", "x", "--task", "arith,trace", "--task-weights", weights])).validate()


def test_task_flag_keeps_each_tasks_options_together():
    config = config_from_args(parse(["--out", "x", "--task", "arith,trace:skip=0,free_order=false", "--task-weights", "1,2"]))
    config.validate()
    assert config.tasks == ("arith", "trace:skip=0,free_order=false")
    with pytest.raises(UnmaskError, match="starts with an option"):
        config_from_args(parse(["--out", "x", "--task", "skip=0,trace"]))


def test_task_options_reach_the_training_answers(tok):
    from unmask.tasks import trace
    from unmask.training.data import TaskSource

    pools = [TaskSource(tok, [name], 48).tasks[0][1] for name in ("trace:skip=0,free_order=false", "trace")]
    assert pools[0] == pools[1]  # the same training programs; only the answers drawn differ
    examples = draw_examples(tok, ["trace:skip=0,free_order=false"], 200)
    plain = draw_examples(tok, ["trace"], 200)
    # every statement traced: responses are longer on average than the default style's
    mean = lambda rows: sum(len(e.response_ids) for e in rows) / len(rows)  # noqa: E731
    assert mean(examples) > mean(plain) + 1
    assert trace.TraceTask.max_response_tokens >= max(len(e.response_ids) for e in examples)


def test_trace_hardness_grows_with_length_and_an_earlier_printed_variable():
    from unmask.tasks import get_task
    from unmask.tasks.base import Problem

    trace = get_task("trace")

    def hardness(question):
        return trace.hardness(Problem("p", question, "0"))

    assert hardness("a = 3 ; b = a + 2 ; print ( b )") == 1.0
    assert hardness("a = 3 ; b = a + 2 ; a = b - 1 ; c = a + 1 ; print ( c )") == 3.0
    assert hardness("a = 3 ; b = a + 2 ; a = b - 1 ; c = a + 1 ; print ( b )") == 6.0
    arith = get_task("arith")
    assert arith.hardness(arith.problems("train", limit=1)[0]) == 1.0  # no measure: uniform


def test_hard_bias_draws_hard_trace_programs_more_often_and_zero_changes_nothing(tok):
    from unmask.tasks import get_task

    trace = get_task("trace:train_size=300")
    by_prompt = {tuple(tok.prompt_ids(trace.messages(p))): trace.hardness(p) for p in trace.problems("train")}

    def draws(bias, n=400):
        return draw_examples(tok, ["trace:train_size=300"], n, None, bias)

    def mean_hardness(examples):
        return sum(by_prompt[tuple(e.prompt_ids)] for e in examples) / len(examples)

    plain = draws(0.0)
    default = draw_examples(tok, ["trace:train_size=300"], len(plain))  # no bias given: the uniform draw, unchanged
    assert [e.prompt_ids for e in plain] == [e.prompt_ids for e in default]
    assert mean_hardness(draws(2.0)) > mean_hardness(plain) + 0.5


@pytest.mark.parametrize("bias", ["-1", "nan", "inf"])
def test_hard_bias_flag_is_checked(bias):
    with pytest.raises(UnmaskError, match="hard-bias"):
        config_from_args(parse(["--out", "x", "--hard-bias", bias])).validate()


def test_task_weights_survive_the_config_round_trip():
    config = config_from_args(parse(["--out", "x", "--task-weights", "1,2.5", "--hard-bias", "1.5"]))
    assert config.task_weights == (1.0, 2.5) and config.hard_bias == 1.5
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_stratified_mask_ratio_covers_each_stratum():
    p = sample_mask_ratio(8, 1e-3, True, torch.Generator().manual_seed(0))
    t = (p - 1e-3) / (1 - 1e-3)
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))


def test_overfits_one_batch(tmp_path):
    trainer = prepare(tiny_config(tmp_path, steps=30, lr=1e-2, batch_size=4))
    batch = trainer.next_batch()

    def fixed_loss():
        with torch.no_grad():
            return float(masked_diffusion_loss(trainer.model, batch, torch.Generator().manual_seed(7))[0])

    before = fixed_loss()
    for _ in range(30):
        trainer.train_step(batch)
    assert fixed_loss() < 0.6 * before


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = prepare(tiny_config(tmp_path / "a", steps=4))
    straight.train()
    first = prepare(tiny_config(tmp_path / "b", steps=4))
    while first.step < 2:
        first.train_step(first.next_batch())
    first.save()
    assert (tmp_path / "b" / "run" / STATE_FILE).exists()
    resumed = prepare(tiny_config(tmp_path / "b", steps=4, resume=True))
    assert resumed.step == 2
    resumed.train()
    a, b = straight.model.network.state_dict(), resumed.model.network.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-2:] == [3, 4]


def test_init_from_tiny_checkpoint_fine_tunes_and_evaluates(tmp_path):
    from unmask.models.loading import load_model
    from unmask.testing import write_tiny_llada

    ckpt = write_tiny_llada(tmp_path / "tiny")
    args = parse(["--out", str(tmp_path / "ft"), "--init", str(ckpt), "--task", "arith:train_size=100", "--steps", "2",
                  "--batch-size", "4", "--gen-length", "40", "--block-length", "8", "--eval-every", "2",
                  "--eval-problems", "2", "--no-progress"])
    assert run_train(args) == 0
    model = load_model(str(tmp_path / "ft"))
    assert model.defaults.gen_length == 40
    log = (tmp_path / "ft" / "train_log.jsonl").read_text()
    assert '"eval": {"arith:train_size=100"' in log


def test_jsonl_data_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": "tom has 3 toys . how many toys ?", "response": "the answer is 3 ."},
        {"messages": [{"role": "user", "content": "b = 2 ; print ( b )"}], "response": "we print b . the answer is 2 ."},
    ]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = config_from_args(parse(["--out", str(tmp_path / "run"), "--data", str(data), "--steps", "2",
                                     "--batch-size", "4", "--d-model", "32", "--n-layers", "1", "--no-progress"]))
    assert config.tasks == ()
    trainer = prepare(config)
    batch = trainer.next_batch()
    texts = {trainer.model.tokenizer.decode(row[batch.response_mask[i]].tolist()) for i, row in enumerate(batch.input_ids)}
    assert texts <= {"the answer is 3.", "we print b. the answer is 2."}
    trainer.train()
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--gen-length", "48", "--block-length", "10"],
        ["--lr", "-1"],
        ["--task", "gsm8k"],
        ["--task", "arith", "--gen-length", "16", "--block-length", "8"],
        ["--d-model", "30", "--n-heads", "4"],
        ["--resume"],
        ["--data", "/nonexistent/file.jsonl"],
        ["--init", "/nonexistent/checkpoint"],
    ],
)
def test_bad_arguments_raise_unmask_error(tmp_path, argv):
    args = parse(["--out", str(tmp_path / "run"), "--no-progress", "--steps", "1", *argv])
    with pytest.raises(UnmaskError):
        run_train(args)


def test_bad_jsonl_record_raises(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    with pytest.raises(UnmaskError):
        prepare(TrainConfig(out=str(tmp_path / "run"), data=str(data), **{**TINY, "tasks": ()}))


def test_fresh_model_uses_builtin_tokenizer():
    model = fresh_model(TrainConfig(d_model=32, n_layers=1, n_heads=4))
    assert model.tokenizer.hf.convert_ids_to_tokens(model.mask_id) == "<|mdm_mask|>"
    assert model.vocab_size == len(model.tokenizer.hf)
    random.seed(0)

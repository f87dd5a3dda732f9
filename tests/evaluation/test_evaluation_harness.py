"""End to end through lm-eval's own runner: local tasks (JSON data, YAML configs in a temporary
folder), a tiny checkpoint, `simple_evaluate(model="unmask")` and the `unmask lm-eval` command."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval must never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from unmask.decoding import generate  # noqa: E402
from unmask.evaluation import register  # noqa: E402
from unmask.evaluation.cli import add_lm_eval_parser, run_lm_eval  # noqa: E402
from unmask.models import load_model  # noqa: E402

UnmaskLM = register()


STRATEGY = "threshold:tau=0.9;temperature=0"  # `;` between strategy parameters inside model_args
QUESTIONS = ["how many apples", "tom has 3 pens and ann has 2 pens so", "what is 3 plus 4 ?", "sam gave ann"]
MC_DOCS = [
    {"question": "tom has 3 pens and ann has", "choices": [" 2 pens", " 3 books", " 4"], "label": 0},
    {"question": "how many", "choices": [" apples", " cats and dogs"], "label": 1},
    {"question": "hello", "choices": [" world", " x", " y z", " sam"], "label": 3},
]
LL_DOCS = [{"question": "hello", "answer": " world"}, {"question": "what is 3 plus", "answer": " 4"}]


def _yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
        f"test_split: test\n{body}metadata:\n  version: 1.0\n"
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_checkpoint):
    """Three tiny tasks. The generation answers of the first two questions are what unmask decodes
    (computed here with the decode loop, the task's stop string and max_gen_toks), so exact_match
    must come out at exactly 2/4."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    cache = folder / "hf_cache"
    model = load_model(tiny_checkpoint, device="cpu")
    rows = []
    for i, question in enumerate(QUESTIONS):
        seq = generate(model, [model.tokenizer.encode(question)], STRATEGY.replace(";", ","),
                       gen_length=8, block_length=8, seed=0).sequences[0]
        answer = model.tokenizer.decode(seq.answer_ids[:6]).split(" ?")[0]
        rows.append({"question": question, "answer": answer if i < 2 else "no such answer"})
    for name, docs in (("gen", rows), ("mc", MC_DOCS), ("ll", LL_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "gen.yaml").write_text(_yaml("unmask_tiny_gen", folder / "gen.jsonl", cache, (
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [' ?']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )))
    (folder / "mc.yaml").write_text(_yaml("unmask_tiny_mc", folder / "mc.jsonl", cache, (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )))
    (folder / "ll.yaml").write_text(_yaml("unmask_tiny_ll", folder / "ll.jsonl", cache, (
        "output_type: loglikelihood\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )))
    return folder


def test_simple_evaluate_runs_all_request_types(task_dir, tiny_checkpoint, caplog):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = ["unmask_tiny_gen", "unmask_tiny_mc", "unmask_tiny_ll"]
    with caplog.at_level("INFO", logger="unmask.evaluation"):
        out = lm_eval.simple_evaluate(
            model="unmask",
            model_args=f"pretrained={tiny_checkpoint},strategy={STRATEGY},mc_num=8,device=cpu,seed=0",
            tasks=tasks,
            batch_size=2,
            log_samples=True,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        )
    results, counts = out["results"], out["n-samples"]
    assert {t: counts[t]["effective"] for t in tasks} == {"unmask_tiny_gen": 4, "unmask_tiny_mc": 3, "unmask_tiny_ll": 2}
    assert results["unmask_tiny_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert 0.0 <= results["unmask_tiny_mc"]["acc,none"] <= 1.0
    assert results["unmask_tiny_ll"]["perplexity,none"] > 1.0 and "acc,none" in results["unmask_tiny_ll"]
    assert "unmask generate_until: 4 requests" in caplog.text and "NFE" in caplog.text and "TPF" in caplog.text

    # the multiple-choice scores are our Monte Carlo estimates for the requests lm-eval built
    samples = out["samples"]["unmask_tiny_mc"]
    direct = UnmaskLM(pretrained=tiny_checkpoint, mc_num=8, device="cpu")
    for sample in samples:
        requests = [Instance("loglikelihood", {}, tuple(args), i) for i, args in enumerate(sample["arguments"])]
        expected = direct.loglikelihood(requests, disable_tqdm=True)
        got = [tuple(r[0]) for r in sample["resps"]]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)
        scores = [e[0] for e in expected]
        assert sample["acc"] == float(scores.index(max(scores)) == sample["target"])


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's CLI indexes its ~15k built-in task files before anything else (seconds on a busy
    CPU); the tasks here are all local, so the CLI tests skip that, and nothing else."""
    import lm_eval.tasks

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)


def test_unmask_lm_eval_command(task_dir, tiny_checkpoint, tmp_path, capsys, local_tasks_only):
    """The `unmask lm-eval` sub-command, mounted on a parser the way the main CLI mounts it."""
    parser = argparse.ArgumentParser(prog="unmask")
    add_lm_eval_parser(parser.add_subparsers(dest="command"))
    out_dir = tmp_path / "out"
    args = parser.parse_args([
        "lm-eval", "--model_args", f"pretrained={tiny_checkpoint},strategy={STRATEGY},device=cpu",
        "--tasks", "unmask_tiny_gen", "--include_path", str(task_dir), "--batch_size", "4",
        "--output_path", str(out_dir),
    ])  # no --model: unmask is the default
    assert args.lm_eval_args[0] == "--model_args"
    assert run_lm_eval(args) == 0
    printed = capsys.readouterr().out
    assert "unmask_tiny_gen" in printed and "exact_match" in printed
    (result_file,) = out_dir.rglob("results_*.json")
    saved = json.loads(result_file.read_text())
    assert saved["results"]["unmask_tiny_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert saved["n-samples"]["unmask_tiny_gen"]["effective"] == 4
    assert saved["config"]["model"] == "unmask"


def test_unmask_lm_eval_reports_bad_model_args(task_dir, capsys, local_tasks_only):
    from unmask.evaluation.cli import main

    code = main(["--model", "unmask", "--model_args", "pretrained=/no/such/folder", "--tasks", "unmask_tiny_gen",
                 "--include_path", str(task_dir)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("unmask: error: no checkpoint folder at /no/such/folder")


def test_lm_eval_chat_template_formats_prompts_once(task_dir, tiny_checkpoint):
    """With lm-eval's apply_chat_template, prompts arrive formatted in the checkpoint's template
    and are decoded as they are (the apply_chat_template model arg does not wrap them again)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="unmask",
        model_args={"pretrained": tiny_checkpoint, "strategy": STRATEGY, "device": "cpu", "apply_chat_template": True},
        tasks=["unmask_tiny_gen"], limit=2, apply_chat_template=True, log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    model = load_model(tiny_checkpoint, device="cpu")
    tok = model.tokenizer
    samples = out["samples"]["unmask_tiny_gen"]
    assert len(samples) == 2
    for sample in samples:
        context = sample["arguments"][0][0]
        ids = tok.encode(context)
        assert ids == tok.prompt_ids(sample["doc"]["question"], chat=True)
        seq = generate(model, [ids], STRATEGY.replace(";", ","), gen_length=8, block_length=8, seed=0).sequences[0]
        assert sample["resps"][0][0] == tok.decode(seq.answer_ids[:6]).split(" ?")[0]

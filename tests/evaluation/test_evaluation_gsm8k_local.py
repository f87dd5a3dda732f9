"""lm-eval's `gsm8k_local`, the task that ships with unmask: `unmask lm-eval --tasks gsm8k_local`
runs offline on the packaged GSM8K test split, writes nothing into the package or the Hugging Face
cache, prompts like `unmask bench --task gsm8k`, and draws few-shot examples from unmask's own set."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval must never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("lm_eval")

from unmask.evaluation import register  # noqa: E402
from unmask.evaluation.cli import main  # noqa: E402
from unmask.evaluation.lm_eval_tasks import TASKS_DIR  # noqa: E402
from unmask.tasks import get_task  # noqa: E402
from unmask.tasks.gsm8k import FEWSHOT_EXAMPLES, PACKAGED_DATA  # noqa: E402

register()


@pytest.fixture
def local_tasks_only(monkeypatch):
    """Skip the index of lm-eval's ~15k built-in task files (20 s and more on a busy CPU):
    gsm8k_local must be found without them, through the folder `unmask lm-eval` adds."""
    import lm_eval.tasks

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)


@pytest.fixture
def no_downloads_or_cache_writes(monkeypatch, tmp_path):
    """The run may not load a dataset through `datasets.load_dataset` (hub or cache) and may not
    write into the datasets cache; UNMASK_GSM8K is unset so the packaged file is read."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset called: {args} {kwargs}")

    cache = tmp_path / "hf_datasets_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.delenv("UNMASK_GSM8K", raising=False)
    yield cache
    assert not any(cache.iterdir()), "the run wrote into the datasets cache"


def _package_files():
    """The files of the shipped data and task folders (bytecode caches aside)."""
    return {
        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
        for folder in (TASKS_DIR, PACKAGED_DATA.parent)
        for p in folder.rglob("*")
        if "__pycache__" not in p.parts
    }


def test_gsm8k_local_fewshot_uses_unmasks_own_examples(tiny_checkpoint, local_tasks_only, no_downloads_or_cache_writes):
    """--num_fewshot k prepends the first k of unmask's worked examples (no train split needed),
    formatted like the bench task's few-shot prompt; the answer filters score them as lm-eval does."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="unmask",
        model_args={"pretrained": tiny_checkpoint, "device": "cpu", "gen_length": 8, "block_length": 8},
        tasks=["gsm8k_local"], limit=2, num_fewshot=2, log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )
    bench = get_task("gsm8k", fewshot=2).problems()
    samples = [s for s in out["samples"]["gsm8k_local"] if s["filter"] == "strict-match"]
    assert [s["doc_id"] for s in samples] == [0, 1]
    for sample, problem in zip(samples, bench):
        prompt = sample["arguments"][0][0]
        assert prompt == problem.meta["prompt"]
        assert prompt.startswith(f"Question: {FEWSHOT_EXAMPLES[0][0]}\nAnswer: {FEWSHOT_EXAMPLES[0][1]}\n\n")
        assert FEWSHOT_EXAMPLES[2][0] not in prompt
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(out["results"]["gsm8k_local"])


def test_unmask_lm_eval_gsm8k_local_runs_offline(tmp_path, capsys, local_tasks_only, no_downloads_or_cache_writes):
    """The documented command, on the built-in model, with no --include_path and no network."""
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    before = _package_files()
    out_dir = tmp_path / "out"
    code = main([
        "--tasks", "gsm8k_local", "--limit", "3",
        "--model_args", "pretrained=builtin,gen_length=32,block_length=16,device=cpu",
        "--batch_size", "3", "--output_path", str(out_dir), "--log_samples",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gsm8k_local" in printed and "exact_match" in printed
    (result_file,) = out_dir.rglob("results_*.json")
    saved = json.loads(result_file.read_text())
    results = saved["results"]["gsm8k_local"]
    assert saved["n-samples"]["gsm8k_local"]["effective"] == 3
    for name in ("strict-match", "flexible-extract"):
        assert 0.0 <= results[f"exact_match,{name}"] <= 1.0
    # the same problems and prompts as `unmask bench --task gsm8k`, zero-shot
    (samples_file,) = out_dir.rglob("samples_gsm8k_local_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]  # a row per doc and filter
    assert sorted((s["filter"], s["doc_id"]) for s in samples) == [
        (name, i) for name in ("flexible-extract", "strict-match") for i in range(3)
    ]
    problems = get_task("gsm8k").problems()
    for sample in samples:
        problem = problems[sample["doc_id"]]
        assert sample["arguments"]["gen_args_0"]["arg_0"] == problem.meta["prompt"]
        assert sample["target"] == problem.meta["solution"]
    assert _package_files() == before


def test_gsm8k_local_is_listed_beside_a_users_include_path(tmp_path, capsys, local_tasks_only):
    import lm_eval.tasks

    (tmp_path / "mine.yaml").write_text(
        "task: my_own_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x.jsonl\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    init = lm_eval.tasks.TaskManager.__mro__[1].__init__
    assert main(["ls", "tasks", "--include_path", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "gsm8k_local" in listed and "my_own_task" in listed
    assert lm_eval.tasks.TaskManager.__mro__[1].__init__ is init  # lm-eval is left as it was
    assert (TASKS_DIR / "gsm8k_local.yaml").is_file() and (TASKS_DIR / "gsm8k_local.py").is_file()
    assert Path(PACKAGED_DATA).is_file() and (PACKAGED_DATA.parent / "LICENSE").is_file()

"""`unmask bench` over several models and cache modes: one arm per (model, cache), one table."""

from __future__ import annotations

import json

import pytest

from unmask.bench import BenchConfig, run_bench
from unmask.bench.compare import arm_folder, run_comparison
from unmask.errors import UnmaskError
from unmask.testing import write_tiny_llada


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    plain = write_tiny_llada(root / "plain", gen_length=16, block_length=8)
    block = write_tiny_llada(root / "block", gen_length=16, block_length=8, block_causal=True)
    return str(plain), str(block)


def test_each_arm_is_the_plain_bench_of_its_model_and_cache(two_models, tmp_path):
    plain, block = two_models
    cfg = BenchConfig(task="arith", limit=3, batch_size=3, out=str(tmp_path / "cmp"),
                      strategies=["low_confidence", "oracle"])
    shown = []
    combined = run_comparison(cfg, [plain, block], ["none", "auto"], progress=False, on_row=shown.append)
    # 2 models x 2 modes; `auto` is none on the bidirectional model and the exact cache on the block one
    assert [(a["model"], a["cache"], a["folder"]) for a in combined["arms"]] == [
        ("plain", "none", "plain-none"), ("plain", "none", "plain-auto"),
        ("block", "none", "block-none"), ("block", "dual", "block-auto")]
    assert [(r["model"], r["cache"], r["strategy"]) for r in combined["rows"]] == [
        (m, c, s) for m, c in (("plain", "none"), ("plain", "none"), ("block", "none"), ("block", "dual"))
        for s in ("low_confidence", "oracle")]
    assert [(r["model"], r["cache"]) for r in shown] == [(m, c) for m in (plain, block) for c in ("none", "auto")
                                                         for _ in range(2)]
    # each arm's rows are what a one-model bench of it gives (the decodes; seconds aside)
    alone = run_bench(BenchConfig(model=block, task="arith", limit=3, batch_size=3, out=str(tmp_path / "alone"),
                                  cache="dual", strategies=["low_confidence", "oracle"]), progress=False)
    for got, want in zip(combined["rows"][6:], alone["rows"]):
        assert (got["accuracy"], got["nfe"], got["rows"], got["tpf"]) == (want["accuracy"], want["nfe"], want["rows"],
                                                                          want["tpf"])
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(combined["rows"]))
    for folder in ("plain-none", "plain-auto", "block-none", "block-auto"):
        assert (tmp_path / "cmp" / folder / "problems.jsonl").exists()
    # results.md: a model and a cache column, and each row's share of its own arm's oracle TPF
    table = (tmp_path / "cmp" / "results.md").read_text().splitlines()
    assert "| | model | cache | strategy |" in table[4]
    for r in combined["rows"]:
        bound = next(b for b in combined["rows"] if (b["model"], b["cache"], b["strategy"]) == (r["model"], r["cache"], "oracle"))
        line = next(x for x in table if f"| {r['model']} | {r['cache']} | `{r['strategy']}` |" in x)
        assert f"| {100 * r['tpf'] / bound['tpf']:.0f}% |" in line
    # the cached block model decodes what the uncached one does (its cache is exact)
    assert [(r["accuracy"], r["nfe"]) for r in combined["rows"][4:6]] == [(r["accuracy"], r["nfe"]) for r in combined["rows"][6:8]]


def test_one_model_and_one_mode_is_a_plain_bench(two_models, tmp_path):
    plain, _ = two_models
    results = run_comparison(BenchConfig(task="arith", limit=2, batch_size=2, out=str(tmp_path), strategies=["low_confidence"]),
                             [plain], ["none"], progress=False)
    assert "arms" not in results and (tmp_path / "problems.jsonl").exists()
    assert "model" not in results["rows"][0]


def test_two_models_of_one_name_are_refused(two_models, tmp_path):
    plain, _ = two_models
    with pytest.raises(UnmaskError, match="two --model values share a name"):
        run_comparison(BenchConfig(task="arith", limit=2, out=str(tmp_path)), [plain, plain + "/"], ["none"], progress=False)
    assert arm_folder(None, "dual") == "builtin-dual" and arm_folder("builtin:block", "auto") == "builtin_block-auto"

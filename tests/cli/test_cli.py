import json
import subprocess
import sys

import pytest

from unmask.cli import main

EIGHT = {"low_confidence", "random", "margin", "entropy", "threshold", "factor", "one_shot", "oracle"}


def test_strategies_lists_the_eight_baselines_with_parameters(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in EIGHT:
        assert name in out
    assert "tau=0.9" in out and "factor=1.0" in out and "steps=None" in out
    assert main(["strategies", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert EIGHT <= set(listed)
    assert {"name": "tau", "type": "float", "default": 0.9, "departure": False} in listed["threshold"]["params"]


def test_generate_prints_text_then_one_summary_line(tiny_checkpoint, capsys):
    code = main(["generate", "what is 3 plus 4 ?", "--model", tiny_checkpoint, "--strategy", "threshold:tau=0.5",
                 "--gen-length", "16", "--block-length", "8"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = lines[-1]
    assert summary.startswith("[threshold] NFE ") and "TPF" in summary and "tokens/s" in summary
    nfe = int(summary.split("NFE ")[1].split()[0])
    tpf = float(summary.split("TPF ")[1].split()[0])
    from unmask.decoding import generate
    from unmask.models import load_model

    direct = generate(load_model(tiny_checkpoint), ["what is 3 plus 4 ?"], "threshold:tau=0.5", gen_length=16,
                      block_length=8).sequences[0]
    assert lines[0] == direct.text and nfe == direct.nfe and tpf == pytest.approx(direct.tpf, abs=0.01)


def test_one_shot_decodes_any_gen_length_it_has_no_blocks(tiny_checkpoint, capsys):
    # the default block length (8 on the tiny checkpoint) does not divide 20; one_shot has no blocks
    assert main(["generate", "hi", "--model", tiny_checkpoint, "--strategy", "one_shot", "--gen-length", "20"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("[one_shot] NFE 1 | TPF 20.00 ")
    assert main(["generate", "hi", "--model", tiny_checkpoint, "--strategy", "threshold", "--gen-length", "20"]) == 2
    assert "does not divide gen_length 20" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "hi", "--strategy", "nope"], "unknown strategy 'nope'"),
        (["generate", "hi", "--strategy", "threshold:tau=abc"], "tau must be float"),
        (["generate", "hi", "--strategy", "threshold:bogus=1"], "no parameter 'bogus'"),
        (["generate", "hi", "--gen-length", "16", "--block-length", "5"], "does not divide"),
        (["generate", "hi", "--model", "/nonexistent/ckpt"], "no checkpoint folder"),
        (["bench", "--task", "nope"], "unknown task"),
        (["generate"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(tiny_checkpoint, capsys, argv, needle):
    if "--model" not in argv and argv[0] in ("generate", "bench"):
        argv = argv + ["--model", tiny_checkpoint]
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unmask", "generate", "hi", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("unmask: error:") and "Traceback" not in proc.stderr


def test_bench_cli_writes_results_and_says_where(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", "--model", tiny_checkpoint, "--limit", "3", "--strategy", "one_shot", "--strategy", "threshold",
                 "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ★ |" in printed or "★" in printed
    assert str(out / "pareto.png") in printed
    data = json.loads((out / "results.json").read_text())
    assert [r["strategy"] for r in data["rows"]] == ["one_shot", "threshold"]


def test_bench_prints_each_row_as_it_is_done_then_the_table(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "--model", tiny_checkpoint, "--limit", "2", "--strategy", "one_shot", "--strategy", "threshold",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    first_table_line = next(i for i, line in enumerate(lines) if line.startswith("| "))
    done = [i for i, line in enumerate(lines) if "so far]" in line]
    assert len(done) == 2 and max(done) < first_table_line  # both rows came out before the table
    assert lines[done[0]].startswith("one_shot ") and lines[done[1]].startswith("threshold ")
    assert "accuracy " in lines[done[0]] and "NFE " in lines[done[0]]
    assert lines[-1].startswith("done in ")


def test_bench_default_is_the_main_comparison_and_all_is_every_policy(tiny_checkpoint, tmp_path, capsys):
    from unmask.bench.runner import MAIN_STRATEGIES
    from unmask.decoding import policy_names

    assert main(["bench", "--model", tiny_checkpoint, "--limit", "2", "--out", str(tmp_path / "main"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "main" / "results.json").read_text())["rows"]
    # the tiny checkpoint has no trained TSPD controller: that one strategy is skipped with a note
    assert "skipping tspd:ce=true" in printed
    assert [r["strategy"] for r in rows] == [s.split(":")[0] for s in MAIN_STRATEGIES if not s.startswith("tspd")]
    assert main(["bench", "--model", tiny_checkpoint, "--limit", "1", "--all", "--out", str(tmp_path / "all"),
                 "--quiet"]) == 0
    rows = json.loads((tmp_path / "all" / "results.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == [n for n in policy_names() if n not in ("tspd", "learned_drafts")]


def test_bench_without_a_model_compares_both_builtin_models(monkeypatch, tmp_path, capsys):
    import unmask.bench.compare

    arms = []

    def fake_run_bench(cfg, progress=True, on_row=None):  # records each arm; decodes nothing
        arms.append((cfg.model, cfg.cache, cfg.out))
        cache = "dual" if cfg.model == "builtin:block" else "none"  # what `auto` resolves to for each
        return {"model": cfg.model, "cache": cache, "device": "cpu", "gen_length": 48, "block_length": 16, "rows": []}

    monkeypatch.setattr(unmask.bench.compare, "run_bench", fake_run_bench)
    assert main(["bench", "--limit", "2", "--out", str(tmp_path), "--quiet"]) == 0
    assert arms == [("builtin", "auto", str(tmp_path / "builtin-auto")),
                    ("builtin:block", "auto", str(tmp_path / "builtin_block-auto"))]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(a["model"], a["cache"]) for a in saved["arms"]] == [("builtin", "none"), ("builtin:block", "dual")]


def test_bench_all_and_strategy_together_is_refused(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(["bench", "--model", tiny_checkpoint, "--all", "--strategy", "threshold"]))
    assert exc.value.code == 2
    assert "--all" in capsys.readouterr().err


@pytest.mark.parametrize("family, decoder", [("lladamoe", "low_confidence"), ("llada2", "llada2"), ("sdar", "sdar"),
                                             ("fastdllm_v2", "fastdllm_v2")])
def test_generate_runs_each_new_family_with_its_own_decoder(family, decoder, capsys):
    # the README's instruction: `unmask generate PROMPT --model tests/fixtures/reference/<family>/checkpoint`
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / family / "checkpoint"
    assert main(["generate", "tom has 5 apples", "--model", str(folder)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"[{decoder}] NFE ")

"""benchmarks/decode_memory.py: one fresh process per setting, a row per (version, mode)."""

import json


def test_a_row_per_mode_and_version(load_benchmark, tmp_path):
    bench = load_benchmark("decode_memory")
    code = bench.main(["--mode", "block", "--mode", "sampling", "--batch-size", "1", "--prompt-length", "4",
                       "--gen-length", "16", "--block-length", "8", "--steps", "2", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "decode_memory.json").read_text())["rows"]
    assert [(r["src"], r["mode"]) for r in rows] == [("installed", "block"), ("installed", "sampling")]
    for row in rows:
        assert "error" not in row, row
        assert row["steps"] == 2  # stopped after the steps asked for
        assert isinstance(row["peak_bytes"], int) and row["s_per_step"] > 0
    assert "| installed | block |" in (tmp_path / "decode_memory.md").read_text()


def test_an_unknown_mode_is_one_line(load_benchmark, capsys):
    bench = load_benchmark("decode_memory")
    assert bench.main(["--mode", "everything"]) == 2
    assert "unknown mode 'everything'" in capsys.readouterr().err


def test_moe_speed_times_both_ways_at_each_call_size(load_benchmark, tmp_path):
    bench = load_benchmark("moe_speed")
    assert bench.main(["--experts", "8", "--top-k", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "moe_speed.json").read_text())["rows"]
    assert [r["call"] for r in rows] == list(bench.SIZES)
    assert all(r["max_logit_difference"] < 1e-4 for r in rows)  # the two ways compute the same network

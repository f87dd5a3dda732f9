"""benchmarks/random_speed.py: a random network of a named shape, timed through the one loop."""

import json

import pytest


@pytest.fixture(scope="module")
def random_speed(load_benchmark):
    return load_benchmark("random_speed")


def test_the_8b_shape_is_llada_8b(random_speed):
    from unmask.models.llada import LLaDAConfig

    cfg = LLaDAConfig(**random_speed.SHAPES["llada-8b"])
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden_size, cfg.vocab_size) == (4096, 32, 32, 12288, 126464)


def test_tiny_shape_writes_a_row_per_setting_at_one_token_per_call(random_speed, tmp_path):
    code = random_speed.main(["--shape", "tiny", "--device", "cpu", "--gen-length", "32", "--block-length", "8",
                              "--prompt-length", "8", "--batch-size", "1", "--batch-size", "2", "--repeats", "1",
                              "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "random_speed.json").read_text())["rows"]
    assert [(r["cache"], r["batch_size"]) for r in rows] == [("none", 1), ("dual", 1), ("none", 2), ("dual", 2)]
    for row in rows:
        assert row["nfe"] == 32  # random weights: threshold commits its one forced token per call
        assert row["tokens_per_s"] > 0 and 0 < row["model_time_frac"] < 1
    assert "random-weight tiny" in (tmp_path / "random_speed.md").read_text()


def test_unknown_shape_is_one_line(random_speed, capsys):
    assert random_speed.main(["--shape", "llada-70b", "--device", "cpu"]) == 2
    assert "unknown shape 'llada-70b'" in capsys.readouterr().err

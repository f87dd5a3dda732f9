"""benchmarks/call_cost.py: the positions each call computes, counted by hand for two small decodes."""

import pytest

from unmask.testing import tiny_llada


@pytest.fixture(scope="module")
def call_cost(load_benchmark):
    return load_benchmark("call_cost")


# two prompts of one block (8 tokens), 16 generated in blocks of 8, two steps per block: both rows
# start their blocks on the same calls, so no call pads a row
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]]
DECODE = dict(gen_length=16, block_length=8, early_stop=False)


def test_block_diffusion_exact_cache_computes_the_finished_block_again_on_a_blocks_first_call(call_cost):
    model = tiny_llada(block_causal=True, gen_length=16, block_length=8)
    row = call_cost.measure(model, PROMPTS, "low_confidence:steps=4", "auto", batch_size=2, profile=False,
                            chat=False, **DECODE)
    # per row: block 0's first call computes the prompt and the block (8 + 8), its second the block (8);
    # block 1's first call the finished block 0 again and block 1 (8 + 8), its second block 1 (8)
    assert row["calls"] == 4 and row["nfe"] == 4
    assert row["positions"] == 2 * (16 + 8 + 16 + 8)
    assert row["positions_per_call"] == 24 and row["duplicate_frac"] == 0
    assert row["matmul_frac"] is None


def test_bidirectional_dual_cache_computes_the_whole_canvas_at_each_blocks_start(call_cost):
    model = tiny_llada(gen_length=16, block_length=8)
    row = call_cost.measure(model, PROMPTS, "low_confidence:steps=4", "dual", batch_size=2, profile=True,
                            chat=False, **DECODE)
    # per row: a refresh of the canvas (8 + 16) and the block (8), in each of the two blocks
    assert row["calls"] == 4 and row["positions"] == 2 * (24 + 8 + 24 + 8)
    assert row["duplicate_frac"] == 0
    assert 0 < row["matmul_frac"] < 1  # a share of the profiled time, measured (its value depends on the CPU)


def test_an_unknown_model_is_one_line(call_cost, capsys, tmp_path):
    code = call_cost.main(["--model", str(tmp_path / "missing"), "--limit", "2", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1

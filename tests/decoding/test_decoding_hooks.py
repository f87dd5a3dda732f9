"""Loop hooks for the server: a callback per final block, and cancellation."""

from unmask.decoding import generate


def test_on_block_reports_each_final_block_in_order_and_cancel_removes_a_sequence():
    from unmask.testing import tiny_llada

    model = tiny_llada(gen_length=16, block_length=4)
    seen = []
    result = generate(model, ["hello world", "tom has 5 apples"], "threshold:tau=0.5", early_stop=False,
                      on_block=lambda row, block, tokens: seen.append((row, block, list(tokens))))
    for row, seq in enumerate(result.sequences):
        blocks = [(b, toks) for r, b, toks in seen if r == row]
        assert [b for b, _ in blocks] == [0, 1, 2, 3]
        for b, toks in blocks:
            assert toks == seq.tokens[: 4 * (b + 1)]  # a reported block never changes afterwards
    calls = {"n": 0}

    def cancel_row_0(row):
        calls["n"] += 1
        return row == 0 and calls["n"] > 2

    result = generate(model, ["hello world", "tom has 5 apples"], "low_confidence", cancelled=cancel_row_0)
    first, second = result.sequences
    assert first.cancelled and first.nfe < 16 and model.mask_id in first.tokens
    assert not second.cancelled and second.nfe == 16 and model.mask_id not in second.tokens


def test_the_loop_splits_its_time_between_model_and_policy():
    from unmask.testing import tiny_llada

    model = tiny_llada(gen_length=16, block_length=4)
    result = generate(model, ["hello world", "tom has 5 apples"], "psd")
    seconds = result.extras
    assert seconds["model_s"] > 0 and seconds["policy_s"] > 0
    assert seconds["model_s"] + seconds["policy_s"] < result.wall_s

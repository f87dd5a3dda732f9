"""benchmarks/oracle_gap.py: the oracle's low-confidence commits and the drafting chain's levels, by hand."""

import pytest

from unmask.testing import drafting_model

class Task:
    def messages(self, problem):
        return problem


def _model(break_3=False):
    """Predicts "tom has 5 apples and ann has 3" with probabilities 0.95, 0.5, 0.45, ..., 0.2; with
    break_3, position 3 says something else while 1 is filled and 3 masked."""
    return drafting_model(break_at=(3, 1) if break_3 else None)


@pytest.fixture(scope="module")
def script(load_benchmark):
    return load_benchmark("oracle_gap")


def test_the_oracle_commits_every_final_token_at_once_whatever_its_confidence(script):
    # the reference decode ends in TARGET and every top-1 already is TARGET: the oracle commits all
    # 8 positions at its first call. Below 0.9: the 7 with CONF 0.5 .. 0.2; below 0.5: the 6 with
    # 0.45 .. 0.2 (0.5 rises a little once the mask token's share is removed)
    report = script.measure(_model(), Task(), ["hello"], "psd")
    assert report["oracle_nfe"] == 1
    assert report["oracle_commits"] == 8
    assert report["oracle_commits_below"]["0.9"] == pytest.approx(7 / 8)
    assert report["oracle_commits_below"]["0.5"] == pytest.approx(6 / 8)


def test_every_level_is_kept_when_the_model_confirms_every_draft(script):
    # psd: call 1 commits 0 and drafts {1}, {2}, {3}; call 2 keeps all 3 levels and its logits commit 4
    # and draft {5}, {6}, {7}; call 3 keeps all 3: two calls built levels 1-3 and kept them
    report = script.measure(_model(), Task(), ["hello"], "psd")
    assert report["strategy_nfe"] == 3
    assert [(r["level"], r["built"], r["kept"]) for r in report["chain"]] == [(1, 2, 2), (2, 2, 2), (3, 2, 2)]


def test_a_chain_stops_at_its_first_unconfirmed_level(script):
    # call 2: levels {1}, {2} are confirmed, level 3 (position 3) is not: the prediction on level 2,
    # where 1 is filled, says WRONG; depth 2. From level 2's logits position 3 is committed (forced,
    # the most confident left) and {4}, {5}, {6} drafted; call 3 keeps all three; then 7 is forced
    report = script.measure(_model(break_3=True), Task(), ["hello"], "psd")
    assert [(r["level"], r["built"], r["kept"]) for r in report["chain"]] == [(1, 2, 2), (2, 2, 2), (3, 2, 1)]
    assert report["chain"][2]["kept_share"] == 0.5


def test_a_strategy_with_several_chains_is_refused_with_the_reason(script):
    from unmask.errors import UnmaskError

    with pytest.raises(UnmaskError) as err:
        script.measure(_model(), Task(), ["hello"], "learned_drafts:order=controller+position")
    assert err.value.field == "order" and "single order" in str(err.value)

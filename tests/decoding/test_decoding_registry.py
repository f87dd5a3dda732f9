"""Strategy strings, the registry listing, and decode-settings errors.

Every bad input must end in an `UnmaskError` whose one-line message says what was wrong (and, where
there is a list to choose from, lists it); never another exception, never a silent fix-up.
"""

from __future__ import annotations

import pytest

from unmask.decoding import (
    DecodeConfig,
    describe_policies,
    generate,
    parse_strategy,
    policy_names,
)
from unmask.decoding.registry import build_policy
from unmask.testing import error_of

BASELINES = ("low_confidence", "random", "margin", "entropy", "threshold", "factor", "one_shot", "oracle")


# ---------------------------------------------------------------------------------------------
# strategy strings


def test_names_and_params_parse():
    p = parse_strategy("threshold:tau=0.8,temperature=0.5")
    assert p.name == "threshold" and p.params == {"temperature": 0.5, "tau": 0.8}
    assert parse_strategy(" threshold : tau = 0.7 ").params["tau"] == 0.7
    assert parse_strategy("low_confidence:steps=8").params["steps"] == 8
    assert parse_strategy("low_confidence:steps=none").params["steps"] is None
    assert parse_strategy("factor:factor=2").params["factor"] == 2.0
    assert isinstance(parse_strategy("factor:factor=2").params["factor"], float)


@pytest.mark.parametrize("name", policy_names())
def test_describe_string_round_trips(name):
    policy = parse_strategy(name)
    again = parse_strategy(policy.describe())
    assert again.name == name and again.params == policy.params


def test_unknown_strategy_lists_the_choices(llada):
    err = error_of(parse_strategy, "fastest")
    assert "fastest" in str(err)
    for name in BASELINES:
        assert name in str(err)
    error_of(generate, llada, ["hello"], "fastest", gen_length=16, block_length=8)
    error_of(parse_strategy, ":tau=0.5")


@pytest.mark.parametrize("spec,valid", [
    ("threshold:taus=0.5", ("tau", "temperature")),
    ("low_confidence:k=2", ("steps", "temperature")),
    ("factor:f=2", ("factor", "temperature")),
    ("one_shot:steps=1", ("temperature",)),
])
def test_unknown_parameter_lists_the_valid_ones(spec, valid):
    err = error_of(parse_strategy, spec)
    bad = spec.split(":")[1].split("=")[0]
    assert bad in str(err)
    for key in valid:
        assert key in str(err)


@pytest.mark.parametrize("spec", [
    "threshold:tau=abc",
    "threshold:tau=",
    "threshold:temperature=hot",
    "low_confidence:steps=abc",
    "low_confidence:steps=1e1x",
    "factor:factor=[1]",
])
def test_bad_value_types(spec):
    err = error_of(parse_strategy, spec)
    key = spec.split(":")[1].split("=")[0]
    assert key in str(err)


def test_non_integral_steps_is_rejected_not_truncated():
    err = error_of(parse_strategy, "low_confidence:steps=2.5")
    assert "steps" in str(err)


@pytest.mark.parametrize("spec", [
    "threshold:tau=1.5",
    "threshold:tau=0",
    "threshold:tau=-0.2",
    "threshold:tau=nan",
    "threshold:temperature=-1",
    "low_confidence:temperature=-0.5",
    "low_confidence:steps=0",
    "low_confidence:steps=-4",
    "random:steps=0",
    "factor:factor=0",
    "factor:factor=-1",
])
def test_out_of_range_values(spec):
    err = error_of(parse_strategy, spec)
    key = spec.split(":")[1].split("=")[0]
    assert key in str(err)
    assert err.field == key


@pytest.mark.parametrize("spec", ["low_confidence:temperature=nan", "threshold:temperature=inf", "factor:factor=nan"])
def test_non_finite_values_are_rejected(spec):
    err = error_of(parse_strategy, spec)
    assert spec.split(":")[1].split("=")[0] in str(err)


@pytest.mark.parametrize("spec", ["threshold:tau", "threshold:=0.5", "threshold:tau=0.5,0.7", ""," ", "low_confidence:steps"])
def test_malformed_strings(spec):
    err = error_of(parse_strategy, spec)
    if spec.strip():
        assert "key=value" in str(err)


def test_build_policy_checks_values_too():
    error_of(build_policy, "threshold", {"tau": 2.0})
    error_of(build_policy, "threshold", {"tau": None})
    error_of(build_policy, "threshold", {"nope": 1})
    error_of(parse_strategy, None)


# ---------------------------------------------------------------------------------------------
# decode settings


@pytest.mark.parametrize("gen,block", [(16, 5), (16, 3), (24, 16)])
def test_block_length_must_divide_gen_length(llada, gen, block):
    err = error_of(generate, llada, ["hello"], "low_confidence", gen_length=gen, block_length=block)
    assert "block_length" in str(err) and err.field == "block_length"


@pytest.mark.parametrize("kwargs,field", [
    ({"gen_length": 0, "block_length": 8}, "gen_length"),
    ({"gen_length": -16, "block_length": 8}, "gen_length"),
    ({"gen_length": 16, "block_length": 0}, "block_length"),
    ({"gen_length": 16, "block_length": -8}, "block_length"),
    ({"gen_length": "16", "block_length": 8}, "gen_length"),
    ({"gen_length": 16, "block_length": 8, "cache": "bogus"}, "cache"),
])
def test_bad_lengths_and_settings(llada, kwargs, field):
    err = error_of(generate, llada, ["hello"], "low_confidence", **kwargs)
    assert err.field == field
    error_of(DecodeConfig(**kwargs).validate)


@pytest.mark.parametrize("strategy", ["low_confidence", "oracle"])
def test_prompt_plus_generation_over_the_context(llada, strategy):
    assert llada.max_length == 512
    err = error_of(generate, llada, ["hello"], strategy, gen_length=512, block_length=8)
    assert "512" in str(err)
    over = error_of(generate, llada, [[20] * (512 - 8 + 1)], strategy, gen_length=8, block_length=8)
    assert err.field == over.field == "gen_length"
    # exactly the context is fine
    fits = generate(llada, [[20] * (512 - 8)], strategy, gen_length=8, block_length=8).sequences[0]
    assert len(fits.tokens) == 8


def test_empty_prompts(llada):
    error_of(generate, llada, [], "low_confidence", gen_length=16, block_length=8)
    error_of(generate, llada, [[]], "low_confidence", gen_length=16, block_length=8)
    error_of(generate, llada, [""], "low_confidence", gen_length=16, block_length=8, chat=False)
    error_of(generate, llada, [42], "low_confidence", gen_length=16, block_length=8)


@pytest.mark.parametrize("prompt", [["hello"], [1, "a"], [{"content": "hi"}], [-1, 5], [10**6]],
                         ids=["list-of-str", "mixed-ids", "message-without-role", "negative-id", "id-past-vocab"])
def test_malformed_prompt_items(llada, prompt):
    error_of(generate, llada, [prompt], "low_confidence", gen_length=8, block_length=8)


# ---------------------------------------------------------------------------------------------
# the listing (`unmask strategies`)


def test_describe_policies_lists_every_policy_with_params_and_defaults():
    listing = describe_policies()
    by_name = {entry["name"]: entry for entry in listing}
    assert set(BASELINES) <= set(by_name)
    assert [e["name"] for e in listing] == policy_names()
    for name, entry in by_name.items():
        assert entry["summary"], f"{name} has no summary"
        params = {p["name"]: p for p in entry["params"]}
        assert params["temperature"]["default"] == 0.0
        for p in entry["params"]:
            assert set(p) >= {"name", "type", "default"} and p["type"]
        # the listed defaults are the defaults a bare strategy name gets
        assert {k: p["default"] for k, p in params.items()} == parse_strategy(name).params
    assert {p["name"]: p["default"] for p in by_name["threshold"]["params"]} == {"temperature": 0.0, "tau": 0.9}
    assert {p["name"]: p["default"] for p in by_name["factor"]["params"]} == {
        "temperature": 0.0, "factor": 1.0, "last_goes": False}
    for name in ("low_confidence", "random", "margin", "entropy"):
        assert {p["name"]: p["default"] for p in by_name[name]["params"]} == {
            "temperature": 0.0, "steps": None, "schedule": "auto", "eps": 1e-3, "alg_temp": None}
    for name in ("one_shot", "oracle"):
        assert [p["name"] for p in by_name[name]["params"]] == ["temperature"]


@pytest.mark.parametrize("make", [
    lambda: parse_strategy("low_confidence").Config(temperature=float("inf")),
    lambda: parse_strategy("threshold").Config(temperature=float("nan")),
    lambda: parse_strategy("factor").Config(factor=float("nan")),
], ids=["temperature-inf", "temperature-nan", "factor-nan"])
def test_configs_built_in_python_reject_non_finite_values(make):
    config = make()
    error_of(config.validate)


def test_every_named_departure_is_a_parameter_and_is_marked_in_the_listing():
    from dataclasses import fields

    from unmask.decoding.registry import describe_policies, policy_class

    listed = {p["name"]: p for p in describe_policies()}
    for name, entry in listed.items():
        cls = policy_class(name)
        names = {f.name for f in fields(cls.Config)}
        assert set(cls.departures) <= names, f"{name}: departures {cls.departures} are not all parameters"
        assert {p["name"] for p in entry["params"] if p["departure"]} == set(cls.departures)
    # the seed methods' departures are the options their docstrings name
    assert set(policy_class("r2").departures) == {"ambiguity_radius", "cluster_score"}
    assert set(policy_class("psd").departures) == {"group_by_rate", "adaptive_depth", "accept_tau"}
    assert set(policy_class("tspd").departures) == {"conf_tau", "stability"}
    assert policy_class("learned_drafts").departures == ()  # conf_tau and stability are its own rule there
    # TSPD's departures are off by default: the paper's rule over the paper's features
    assert policy_class("tspd").Config().conf_tau is None and policy_class("tspd").Config().stability is False

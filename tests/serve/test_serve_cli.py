"""`unmask serve` argument handling: defaults bind this machine only; bad settings fail before loading."""

import argparse

import pytest

from unmask.errors import UnmaskError
from unmask.serve.cli import _loopback, add_serve_parser, run_serve


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_bind_loopback_on_port_8000():
    args = _parse([])
    assert (args.host, args.port, args.strategy, args.model) == ("127.0.0.1", 8000, "auto", None)
    assert args.batching == "continuous"
    assert _loopback(args.host) and _loopback("::1") and _loopback("localhost") and not _loopback("0.0.0.0")


@pytest.mark.parametrize("argv,words", [
    (["--strategy", "nope", "--model", "/does/not/exist"], "unknown strategy"),
    (["--strategy", "threshold:tau=3", "--model", "/does/not/exist"], "tau"),
    (["--port", "70000"], "--port"),
    (["--max-batch-size", "0"], "--max-batch-size"),
])
def test_bad_settings_fail_with_one_sentence_before_the_model_loads(argv, words):
    with pytest.raises(UnmaskError, match=words.replace("-", r"\-")):
        run_serve(_parse(argv))


def test_auto_is_the_fast_default_where_a_controller_exists_else_threshold(tiny_checkpoint):
    from unmask.models import load_model
    from unmask.serve import build_engine
    from unmask.serve.engine import FALLBACK_DEFAULT, FAST_DEFAULT

    assert build_engine(load_model(None)).config.strategy == FAST_DEFAULT == "tspd:ce=true,stability=true"  # the built-in model
    tiny = build_engine(load_model(tiny_checkpoint))  # no controller beside it
    assert tiny.config.strategy == FALLBACK_DEFAULT == "threshold"
    assert tiny.health()["default_strategy"] == "threshold"


def test_a_checkpoints_own_serving_default_wins_where_it_can_run(tmp_path):
    import json

    from unmask.models import load_model
    from unmask.serve import build_engine
    from unmask.testing import write_tiny_llada

    folder = write_tiny_llada(tmp_path / "m", gen_length=16, block_length=8)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["unmask_defaults"]["serve_strategy"] = "r2"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert build_engine(load_model(str(folder))).config.strategy == "r2"
    # one it cannot run (tspd without a controller beside the model) falls back to the rule: threshold
    cfg["unmask_defaults"]["serve_strategy"] = "tspd:ce=true"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert build_engine(load_model(str(folder))).config.strategy == "threshold"

"""The decode picture: PNG and self-contained HTML with every final token and one mark per commit."""

import argparse
import html
import re

import numpy as np
import pytest

from unmask.decoding import generate
from unmask.decoding.trace import Trace
from unmask.errors import UnmaskError
from unmask.testing import tiny_llada
from unmask.viz import render_decode, render_trace
from unmask.viz.cli import add_viz_parser, run_viz

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def label(tokenizer, token_id):
    """How a token is expected to appear: its text, else its vocabulary entry, else #id."""
    return tokenizer.decode([token_id]).strip() or tokenizer.hf.convert_ids_to_tokens(token_id) or f"#{token_id}"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width, height


@pytest.mark.parametrize("strategy", ["low_confidence", "threshold:tau=0.3"])
def test_render_decode_writes_a_png_and_an_html_page_of_the_decode(tmp_path, strategy):
    model = tiny_llada(gen_length=32, block_length=8)
    prompt = "tom has 5 apples"
    png, page = render_decode(model, prompt, strategy, tmp_path, "run")
    assert png == tmp_path / "run.png" and page == tmp_path / "run.html"

    width, height = png_size(png)
    assert 400 <= width <= 8000 and 300 <= height <= 6000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05  # a picture, not a blank

    seq = generate(model, [prompt], strategy, record_trace=True).sequences[0]
    trace = seq.trace
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for tok in seq.tokens:
        assert html.escape(label(model.tokenizer, tok)) in text
    committed = int((trace.commit_step >= 0).sum())
    assert text.count('class="commit"') == committed
    assert text.count('class="filled"') == int((trace.commit_step < 0).sum())
    assert text.count("<tr") == trace.steps + 1  # header + one row per step
    # hovering a cell names its top-1 token and confidence
    s, p = trace.steps // 2, 3
    expected_tip = f"step {s} · position {p} · top-1 {label(model.tokenizer, int(trace.top1[s, p]))!r}"
    assert html.escape(expected_tip, quote=True) in text
    assert f"confidence {float(trace.confidence[s, p]):.3f}" in text
    # self-contained: no scripts, stylesheets or images from elsewhere
    assert not re.search(r"<script[^>]+src=|<link\b|<img\b|https?://", text)
    assert "NFE: " + str(seq.nfe) in text and html.escape(seq.text) in text


def test_render_trace_marks_remasks_and_positions_filled_at_stop(tmp_path):
    model = tiny_llada()
    steps, gen = 4, 6
    rng = np.random.default_rng(0)
    final = np.array([20, 21, 22, model.eos_id, model.eos_id, model.eos_id])
    tokens_after = np.tile(final, (steps, 1))
    masked_before = np.zeros((steps, gen), dtype=bool)
    masked_before[:2, :] = True
    trace = Trace(
        top1=rng.integers(10, 60, (steps, gen)), confidence=rng.random((steps, gen)).astype(np.float32),
        margin=np.zeros((steps, gen), np.float32), entropy=np.zeros((steps, gen), np.float32),
        masked_before=masked_before, tokens_after=tokens_after, block=np.array([0, 0, 1, 1]),
        commit_step=np.array([0, 2, 1, 3, -1, -1]), remasked=[(1, 0), (2, 5)],
    )
    png, page = render_trace(trace, model.tokenizer, tmp_path, "hand", title="hand-made", block_length=3)
    text = page.read_text(encoding="utf-8")
    assert png_size(png)[0] > 0
    assert text.count('class="commit"') == 4
    assert text.count('class="remask"') == 2
    assert text.count('class="filled"') == 2
    # the block boundary before position 3: on the header and on every step's row
    assert len(re.findall(r'class="[^"]*\bbb\b', text)) == steps + 1


def test_viz_command_writes_files_and_rejects_a_bad_strategy(tmp_path, tiny_checkpoint, capsys):
    parser = argparse.ArgumentParser()
    add_viz_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["viz", "hello world", "--strategy", "threshold:tau=0.5", "--model", tiny_checkpoint,
                              "--device", "cpu", "--out", str(tmp_path), "--gen-length", "16"])
    assert run_viz(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "threshold.png").exists() and (tmp_path / "threshold.html").exists()
    assert str(tmp_path / "threshold.html") in out
    args = parser.parse_args(["viz", "hi", "--strategy", "nope", "--model", "/does/not/exist"])
    with pytest.raises(UnmaskError, match="unknown strategy"):
        run_viz(args)  # the strategy is checked before the model is loaded

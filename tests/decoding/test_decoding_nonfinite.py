"""NaN and infinite logits stop the decode with a clear error, worked by hand on a scripted model.

The loop checks every generation position a model call returns (the current block, the later
blocks the stop rule reads, PSD's verification canvases, a KV-cached call's queries). A position is
bad when its logits hold a NaN or +inf, or no finite value once the mask token's column is -inf.
Prompt positions are never read (left padding may legitimately be NaN), so they are not checked;
-inf on some tokens is a legitimate "never this token" and passes.
"""

import pytest
import torch
from torch import nn

from unmask.decoding import generate, parse_strategy
from unmask.errors import NonFiniteLogitsError, UnmaskError
from unmask.testing import error_of, faulty_model, tiny_llada, tiny_tokenizer

TOK = tiny_tokenizer()
V = len(TOK.hf)
MASK = TOK.hf.convert_tokens_to_ids("<|mdm_mask|>")
GEN, BLOCK = 8, 4
TARGET = [TOK.token_id(w) for w in "tom has 5 apples and ann has 3".split()]
TRIGGER = TOK.token_id("sam")
NAN, INF = float("nan"), float("inf")


class Net(nn.Module):
    """Position g of the generation predicts TARGET[g] with logit 10 - g (so low_confidence commits
    0, 1, 2, ... one per call); prompt positions are flat. `poison(call, row_ids, logits)` may edit a
    row's (seq, vocab) logits in place; `call` counts from 1."""

    def __init__(self, poison=None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab_size = V
        self.poison = poison
        self.calls = 0

    def forward(self, input_ids, position_ids=None, key_mask=None, cache=None):
        self.calls += 1
        batch, seq = input_ids.shape
        logits = torch.zeros(batch, seq, V)
        for g in range(GEN):
            logits[:, seq - GEN + g, TARGET[g]] = 10.0 - g
        if self.poison is not None:
            for r in range(batch):
                self.poison(self.calls, input_ids[r], logits[r])
        return logits


def model(poison=None, gen=GEN, block=BLOCK):
    from unmask.models.base import DecodeDefaults, DiffusionLM

    hf = TOK.hf
    return DiffusionLM(network=Net(poison), tokenizer=TOK, mask_id=MASK, eos_id=hf.eos_token_id,
                       stop_ids=(hf.eos_token_id,), pad_id=hf.eos_token_id, name="scripted",
                       defaults=DecodeDefaults(gen_length=gen, block_length=block), max_length=256)


PROMPTS = [[TOK.token_id("hello")], [TOK.token_id("tom"), TRIGGER]]  # sequence 1 holds the trigger
HINT = "try --dtype fp32 (bf16 and fp16 overflow sooner) or check the checkpoint's weights"


def nan_at(call, positions, value=NAN, column=None):
    """Poison: at model call `call`, rows holding TRIGGER get `value` at generation `positions`."""

    def poison(n, ids, logits):
        if n == call and bool((ids == TRIGGER).any()):
            for g in positions:
                row = logits[logits.shape[0] - GEN + g]
                if column is None:
                    row[TARGET[g]] = value
                else:
                    row[column] = value

    return poison


def test_finite_logits_decode_the_script():
    result = generate(model(), PROMPTS, "low_confidence")
    assert [s.tokens for s in result.sequences] == [TARGET, TARGET]
    assert [s.nfe for s in result.sequences] == [8, 8]  # one commit per call: call 5 starts block 2


def test_nan_in_the_current_block_names_the_sequence_call_block_and_count():
    # call 5 is block 2's first call; a NaN at positions 5 and 6 of sequence 1 (its whole canvas of 8 is checked)
    err = error_of(generate, model(nan_at(5, [5, 6])), PROMPTS, "low_confidence")
    assert isinstance(err, NonFiniteLogitsError)
    assert str(err) == ("the model returned NaN or infinite logits for sequence 1 of the batch at its model call 5 "
                        f"(block 2 of 2): 2 of 8 generation positions; the decode was stopped; {HINT}")
    assert err.row == 1 and err.details == {1: (2, 8, 5, 1)}


def test_nan_at_a_later_block_is_caught_at_once():
    # the stop rule and the policies' whole-generation view read later blocks' predictions
    err = error_of(generate, model(nan_at(2, [7])), PROMPTS, "low_confidence")
    assert err.details == {1: (1, 8, 2, 0)}
    assert "at its model call 2 (block 1 of 2): 1 of 8 generation positions" in str(err)


def test_every_affected_sequence_is_counted():
    def poison(n, ids, logits):
        if n == 3:
            logits[-GEN:] = NAN  # every sequence, every position
    err = error_of(generate, model(poison), PROMPTS, "low_confidence")
    assert err.details == {0: (8, 8, 3, 0), 1: (8, 8, 3, 0)}
    assert str(err).startswith("the model returned NaN or infinite logits for sequence 0 of the batch "
                               "(and 1 other sequence of the batch) at its model call 3 (block 1 of 2): 8 of 8")


@pytest.mark.parametrize("value", [INF, NAN])
def test_plus_inf_is_as_bad_as_nan(value):
    err = error_of(generate, model(nan_at(1, [0], value=value)), PROMPTS, "low_confidence")
    assert err.details == {1: (1, 8, 1, 0)}


def test_a_position_with_no_finite_logit_but_the_mask_column_is_bad():
    def poison(n, ids, logits):
        if n == 1 and bool((ids == TRIGGER).any()):
            logits[-GEN + 2] = -INF
            logits[-GEN + 2, MASK] = 5.0  # the loop sets the mask column to -inf: nothing is left
    err = error_of(generate, model(poison), PROMPTS, "low_confidence")
    assert err.details == {1: (1, 8, 1, 0)}


def test_what_the_policy_never_reads_is_not_an_error():
    # NaN and inf at prompt positions (left padding may be NaN), NaN in the mask column (replaced by
    # -inf), -inf on ordinary tokens (softmax gives them 0): the decode is the clean one
    def poison(n, ids, logits):
        logits[: logits.shape[0] - GEN, :] = NAN
        logits[0, 3] = INF
        logits[-GEN:, MASK] = NAN
        logits[-GEN:, TOK.token_id("dogs")] = -INF
    clean = generate(model(), PROMPTS, "low_confidence")
    result = generate(model(poison), PROMPTS, "low_confidence")
    assert [s.tokens for s in result.sequences] == [s.tokens for s in clean.sequences] == [TARGET, TARGET]
    assert [s.nfe for s in result.sequences] == [8, 8]


def test_psd_verification_rows_are_checked():
    # PSD on one block of 8: call 1 is a plain forward, call 2 verifies the committed canvas and its drafts
    psd = parse_strategy("psd:tau=0.9,group=2,depth=3")
    clean = model(gen=GEN, block=GEN)
    generate(clean, [PROMPTS[1]], psd)
    err = error_of(generate, model(nan_at(2, [7]), gen=GEN, block=GEN), [PROMPTS[1]], psd)
    canvases = err.details[0][1] // GEN
    assert canvases >= 2  # the verification forwards several canvases of the sequence
    assert err.details == {0: (canvases, canvases * GEN, 2, 0)}  # position 7 on each canvas
    assert "at its model call 2 (block 1 of 1, verifying drafts)" in str(err)


@pytest.mark.parametrize("cache, checked", [("dual", 8), ("prefix", 16)])
def test_cached_calls_are_checked(cache, checked):
    # gen 16, block 8, one commit per call: call 1 refreshes the cache (16 positions); calls 2-8 ask
    # for the block (dual) or the block and all after it (prefix) only
    err = error_of(generate, faulty_model(tiny_llada(), from_call=3), ["hello"], "low_confidence", cache=cache)
    assert err.details == {0: (checked, checked, 3, 0)}


def test_the_error_survives_pickling():
    import pickle

    err = error_of(generate, model(nan_at(5, [5, 6])), PROMPTS, "low_confidence")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, NonFiniteLogitsError) and isinstance(back, UnmaskError)
    assert str(back) == str(err) and back.details == err.details


def test_generate_on_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    """A checkpoint whose output head is NaN: `unmask generate` says so in one line, exit code 2."""
    import sys

    from safetensors.torch import load_file, save_file

    from unmask.cli import main
    from unmask.testing import write_tiny_llada

    folder = write_tiny_llada(tmp_path / "broken", gen_length=16, block_length=8)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    assert len(files) == 1, files
    weights = load_file(files[0])
    head = [k for k in weights if k.endswith("ff_out.weight") and "blocks" not in k]
    assert head, sorted(weights)
    weights[head[0]][:] = NAN
    save_file(weights, files[0], metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(["generate", "what is 3 plus 4 ?", "--model", str(folder), "--strategy", "low_confidence"]))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    # all 16 generation positions are checked; only the block's 8 are projected through the NaN head
    # (block 2's are kept as hidden states, which are finite, until the stop rule reads them)
    assert err == ("unmask: error: the model returned NaN or infinite logits for sequence 0 of the batch at its "
                   f"model call 1 (block 1 of 2): 8 of 16 generation positions; the decode was stopped; {HINT}")
    assert captured.out == ""  # no garbage text was printed

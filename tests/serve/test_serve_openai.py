"""The server through the official `openai` client: completions, chat, streaming, stop, max_tokens."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from unmask.decoding import generate  # noqa: E402
from unmask.models import load_model  # noqa: E402
from unmask.serve import build_engine, serve_in_thread  # noqa: E402
from unmask.testing import decode_until_final  # noqa: E402

PROMPT = "tom has 5 apples and sam has 3 apples . how many apples"


@pytest.fixture(scope="module")
def single_thread():
    # the tiny model is slower with two intra-op threads on a busy two-core machine than with one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, single_thread):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4)
    with serve_in_thread(engine, host="127.0.0.1") as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def direct(model, prompt, strategy="low_confidence", chat=False, **kw):
    return generate(model, [prompt], strategy, chat=chat, **kw).sequences[0]


def test_models_lists_the_served_model(client, model):
    ids = [m.id for m in client.models.list().data]
    assert ids == [model.name]


def test_completion_matches_a_direct_decode_and_reports_usage_and_stats(client, model):
    resp = client.completions.create(model=model.name, prompt=PROMPT,
                                     extra_body={"strategy": "threshold:tau=0.5", "seed": 3, "gen_length": 32})
    seq = direct(model, PROMPT, "threshold:tau=0.5", seed=3, gen_length=32)
    choice = resp.choices[0]
    assert choice.text == seq.text
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == len(seq.prompt_ids)
    assert resp.usage.completion_tokens == seq.useful_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    stats = resp.model_extra["unmask"]
    assert stats["strategy"] == "threshold" and stats["params"]["tau"] == 0.5
    until_final = decode_until_final(model, PROMPT, "threshold:tau=0.5", chat=False, seed=3, gen_length=32)
    assert stats["nfe"] == until_final.nfe and stats["tpf"] == round(until_final.tpf, 4) and stats["seconds"] > 0
    assert stats["gen_length"] == 32 and stats["block_length"] == 8 and stats["seed"] == 3


def test_strategy_params_object_equals_the_string_form(client, model):
    a = client.completions.create(model=model.name, prompt=PROMPT, extra_body={"strategy": "threshold:tau=0.5"})
    b = client.completions.create(model=model.name, prompt=PROMPT,
                                  extra_body={"strategy": "threshold", "strategy_params": {"tau": 0.5}})
    assert a.choices[0].text == b.choices[0].text
    assert a.model_extra["unmask"]["params"] == b.model_extra["unmask"]["params"]


def test_chat_applies_the_template(client, model):
    messages = [{"role": "user", "content": "how many apples does tom have"}]
    resp = client.chat.completions.create(model=model.name, messages=messages, seed=1,
                                          extra_body={"strategy": "low_confidence", "gen_length": 16})
    seq = direct(model, messages, chat=True, seed=1, gen_length=16)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == seq.text
    assert resp.usage.prompt_tokens == len(model.tokenizer.prompt_ids(messages))
    assert resp.object == "chat.completion"


def test_max_tokens_limits_the_answer_not_the_canvas(client, model):
    seq = direct(model, PROMPT, gen_length=32)
    assert seq.useful_tokens > 3  # the random tiny model's answer for this prompt is long
    resp = client.completions.create(model=model.name, prompt=PROMPT, max_tokens=3, extra_body={"gen_length": 32})
    assert resp.choices[0].text == model.tokenizer.decode(seq.answer_ids[:3])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3
    assert resp.model_extra["unmask"]["gen_length"] == 32  # the canvas stayed as asked


def test_max_tokens_beyond_what_the_model_can_hold_is_rejected(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model.name, prompt=PROMPT, max_tokens=model.max_length)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "max_tokens"


def test_stop_string_cuts_the_text(client, model):
    full = direct(model, PROMPT, gen_length=32).text
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = full[: full.index(stop)]
    resp = client.completions.create(model=model.name, prompt=PROMPT, stop=[stop], extra_body={"gen_length": 32})
    assert resp.choices[0].text == cut
    assert resp.choices[0].finish_reason == "stop"


def _streamed_text(stream, chat):
    pieces, finish, usage = [], None, None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            text = choice.delta.content if chat else choice.text
            if text:
                pieces.append(text)
            finish = choice.finish_reason or finish
    return pieces, finish, usage


@pytest.mark.parametrize("stop", [None, "STOPWORD"])
def test_streamed_completion_concatenates_to_the_non_streamed_text(client, model, stop):
    body = {"strategy": "threshold:tau=0.5", "seed": 7, "gen_length": 32, "block_length": 8}
    if stop == "STOPWORD":  # a real word of the answer, so the stop string fires mid-stream
        stop = direct(model, PROMPT, "threshold:tau=0.5", seed=7, gen_length=32).text.split()[4]
    plain = client.completions.create(model=model.name, prompt=PROMPT, stop=stop, extra_body=body)
    stream = client.completions.create(model=model.name, prompt=PROMPT, stop=stop, stream=True,
                                       stream_options={"include_usage": True}, extra_body=body)
    pieces, finish, usage = _streamed_text(stream, chat=False)
    assert "".join(pieces) == plain.choices[0].text
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    if stop is None and plain.usage.completion_tokens > 8:
        assert len(pieces) >= 2  # one chunk per committed block, not one at the end


def test_streamed_chat_concatenates_to_the_non_streamed_text(client, model):
    messages = [{"role": "system", "content": "you count apples"}, {"role": "user", "content": "tom has 5 apples"}]
    body = {"strategy": "low_confidence", "gen_length": 24, "block_length": 8}
    plain = client.chat.completions.create(model=model.name, messages=messages, seed=2, extra_body=body)
    stream = client.chat.completions.create(model=model.name, messages=messages, seed=2, stream=True, extra_body=body)
    pieces, finish, _ = _streamed_text(stream, chat=True)
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason


def test_several_prompts_in_one_request_are_decoded_together(client, model, server):
    prompts = ["hello world", "tom has 5 apples", "what is 3 plus 4"]
    resp = client.completions.create(model=model.name, prompt=prompts, extra_body={"seed": 5})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, resp.choices):
        assert choice.text == direct(model, prompt, seed=5).text
    assert resp.model_extra["unmask"]["nfe"] == sum(s["nfe"] for s in resp.model_extra["unmask"]["choices"])

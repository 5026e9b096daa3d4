"""Generation (a batch stepped token by token, rows with their own settings, leaving when done) and the text side
of streaming (TextStream's stop strings and partial characters, ChatFormat's prompt tokens)."""

from __future__ import annotations

import pytest
import torch

from datamodules.sft import ChatTemplate, encode_conversations
from datamodules.tokenizer import train_tokenizer
from llm.core.model import Transformer
from llm.core.sampling import Generation, Sampling, fits, generate
from llm.errors import UserError
from llm.generate import ChatFormat, TextStream
from tests.conftest import debug_model

PROMPTS = [[0, 17, 42, 99, 5, 230, 7], [0, 3], [0, 250, 11, 12, 13], [0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 70]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(debug_model(ffn_dim=160, max_seq_len=64)).eval()
    with torch.no_grad():  # peakier distributions than the init: no argmax near-ties
        for p in model.parameters():
            p.mul_(4.0)
    return model


def run(gen: Generation) -> list[dict[int, int]]:
    return list(gen)


def test_rows_with_their_own_budgets_and_settings_equal_each_row_alone(model):
    settings = [
        Sampling(max_new_tokens=3),
        Sampling(max_new_tokens=20, temperature=1.0, seed=5),
        Sampling(max_new_tokens=9, temperature=0.8, top_k=5, seed=1),
        Sampling(max_new_tokens=14),
    ]
    gen = Generation(model, PROMPTS, settings)
    steps = run(gen)
    for row, (prompt, s) in enumerate(zip(PROMPTS, settings)):
        alone = Generation(model, [prompt], s)
        run(alone)
        assert gen.tokens[row] == alone.tokens[0]  # the batch (padding, rows leaving the cache) changes nothing
        assert len(gen.tokens[row]) == s.max_new_tokens and gen.finish_reason[row] == "length"
        assert [step[row] for step in steps if row in step] == gen.tokens[row]  # streamed = collected
    assert len(steps) == 20 and [len(s) for s in steps][-1] == 1  # the longest row finishes alone
    # generate() is Generation with one setting for all (row i seeded with seed + i)
    assert generate(model, PROMPTS, 14) == [_greedy(model, p, 14) for p in PROMPTS]


def _greedy(model, prompt, n):
    gen = Generation(model, [prompt], Sampling(n))
    run(gen)
    return gen.tokens[0]


def test_stop_ends_one_row_and_eos_ends_another(model):
    free = Generation(model, PROMPTS, Sampling(12))
    run(free)
    eos = free.tokens[2][4]  # row 2's fifth token ends it (and any row producing it earlier)
    gen = Generation(model, PROMPTS, Sampling(12), eos_id=[eos])
    for n, step in enumerate(gen, start=1):
        if n == 3:
            gen.stop(0)  # say a stop string showed up in row 0's text after 3 tokens
            assert 0 in step
    assert gen.tokens[0] == free.tokens[0][:3] and gen.finish_reason[0] == "stop"
    first = free.tokens[2].index(eos)
    assert gen.tokens[2] == free.tokens[2][:first] and gen.finish_reason[2] == "stop"
    for row in (1, 3):
        cut = free.tokens[row].index(eos) if eos in free.tokens[row] else 12
        assert gen.tokens[row] == free.tokens[row][:cut]


def test_batches_that_do_not_fit_are_refused_and_settings_checked(model):
    assert fits([60, 2], [4, 4], 64) and not fits([60, 2], [4, 10], 64)
    with pytest.raises(ValueError, match="do not fit"):
        Generation(model, [list(range(1, 61)), [0, 1]], [Sampling(4), Sampling(10)])
    with pytest.raises(UserError, match="temperature=-1"):
        Sampling(temperature=-1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="temperature="):
            Sampling(temperature=bad)
        with pytest.raises(UserError, match="top_p="):
            Sampling(temperature=1.0, top_p=bad)
    gen = Generation(model, [[0, 1]], Sampling(0))
    assert run(gen) == [] and gen.finish_reason == ["length"]
    gen = Generation(model, [[0, 5, 6], [0, 7]], [Sampling(0), Sampling(3)])  # a row with nothing to do
    run(gen)
    assert gen.tokens[0] == [] and gen.finish_reason[0] == "length" and gen.tokens[1] == _greedy(model, [0, 7], 3)


@pytest.fixture(scope="module")
def tokenizer():
    text = ["Elizabeth smiled — “très bien”, said Mr. Darcy. It is a truth universally acknowledged. 😀"] * 30
    return train_tokenizer(text, vocab_size=300)


def stream_all(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for t in tokenizer.encode(text, add_special_tokens=False).ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_text_stream_cuts_at_the_first_stop_string_even_across_tokens(tokenizer):
    text = "Elizabeth smiled — “très bien”, said Mr. Darcy. 😀"
    pieces, stream = stream_all(tokenizer, text, [])
    assert "".join(pieces) == tokenizer.decode(tokenizer.encode(text).ids) and not stream.stopped
    assert all("\ufffd" not in p for p in pieces)  # a character split over byte tokens comes out whole
    for stop in ["Mr. Darcy", "s b", "😀", "—"]:
        pieces, stream = stream_all(tokenizer, text, ["never there", stop])
        assert stream.stopped and "".join(pieces) == text[: text.index(stop)]
    pieces, stream = stream_all(tokenizer, text, ["Darcy!"])  # a prefix of the stop string is held, then released
    assert not stream.stopped and "".join(pieces) == text


def test_chat_prompt_is_the_training_encoding_and_the_jinja_rendering(tokenizer):
    ids = {"bos": tokenizer.token_to_id("<|bos|>"), "eos": tokenizer.token_to_id("<|eos|>")}
    assert None not in ids.values()
    template = ChatTemplate()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who smiled?"},
        {"role": "assistant", "content": "Elizabeth."},
        {"role": "user", "content": "Said what?"},
    ]
    full, _, last = encode_conversations(
        tokenizer, template, [[*messages, {"role": "assistant", "content": "Très bien."}]], ids["bos"], ids["eos"]
    )[0]
    ours = ChatFormat(tokenizer, ids, ours=template.template).prompt(messages)
    assert ours == full[:last].tolist()  # exactly the tokens the model was finetuned to answer
    pytest.importorskip("jinja2")
    assert ChatFormat(tokenizer, ids, jinja=template.jinja()).prompt(messages) == ours  # pieces meet at newlines
    # a template is data: Jinja's sandbox refuses to reach Python internals
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(UserError, match="chat template failed"):
        ChatFormat(tokenizer, ids, jinja=evil).prompt(messages)


def test_rows_that_join_a_running_batch_equal_each_row_alone(model):
    short, long_ = [0, 9, 8], list(range(3, 40))  # shorter and longer than the running batch's cache
    gen = Generation(model, PROMPTS[:2], [Sampling(12), Sampling(6, temperature=1.0, seed=3)])
    joined = {}
    for n, step in enumerate(gen, start=1):
        if n == 3:
            assert gen.can_add([len(short), len(long_)], [8, 5])
            joined["short"], joined["long"] = gen.add(
                [short, long_], [Sampling(8, temperature=0.9, seed=4), Sampling(5)]
            )
        if n == 5:
            joined["stop"] = gen.add([PROMPTS[2]], Sampling(20))[0]
        if n == 7:
            gen.stop(joined["stop"])
        if n == 12:  # row 0's last step, every other row done: the late row starts a batch of its own
            assert set(step) == {0}
            joined["late"] = gen.add([PROMPTS[3]], Sampling(4))[0]
    expected = {
        0: (PROMPTS[0], Sampling(12)),
        1: (PROMPTS[1], Sampling(6, temperature=1.0, seed=3)),
        joined["short"]: (short, Sampling(8, temperature=0.9, seed=4)),
        joined["long"]: (long_, Sampling(5)),
        joined["late"]: (PROMPTS[3], Sampling(4)),
    }
    for row, (prompt, s) in expected.items():
        alone = Generation(model, [prompt], s)
        run(alone)
        assert gen.tokens[row] == alone.tokens[0], row
        assert gen.finish_reason[row] == "length"
    assert len(gen.tokens[joined["stop"]]) == 2 and gen.finish_reason[joined["stop"]] == "stop"
    assert gen.tokens[joined["stop"]] == _greedy(model, PROMPTS[2], 2)


def test_a_row_added_when_the_batch_ends_starts_a_new_one_and_the_cache_limit_holds(model):
    gen = Generation(model, [[0, 1, 2]], Sampling(1))
    added = None
    for _ in gen:
        if added is None:
            added = gen.add([[0, 4]], Sampling(3))[0]
    assert gen.tokens[added] == _greedy(model, [0, 4], 3)
    busy = Generation(model, [[0, 1]], Sampling(60))
    it = iter(busy)
    next(it)
    assert not busy.can_add([30], [10])  # 3 slots filled + 59 left for row 0: no room for a 30-token prompt
    with pytest.raises(ValueError, match="do not fit the running batch"):
        busy.add([list(range(1, 31))], Sampling(10))
    assert busy.can_add([2], [2])

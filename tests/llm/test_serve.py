"""llm.serve against the official openai client: a real uvicorn server on 127.0.0.1 (a free port), in a thread of
this process so that the tests can hold its scheduler (pause, on_step) and read its counters; one test starts the
command itself. Concurrency is staged through the scheduler (rows queued while it is paused, a batch held at a
step), never by sleeping."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from llm.core.sampling import generate
from llm.generate import load_model
from llm.serve import main, serve_in_thread
from tests.conftest import ROOT

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the castle?"}]


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    return load_model(chat_checkpoint)


@pytest.fixture(scope="module")
def server(loaded):
    serving = serve_in_thread(loaded, max_batch=16)
    yield serving
    serving.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def expected(loaded, prompt_ids: list[int], max_tokens: int, **kw) -> list[list[int]]:
    return generate(loaded.model, [prompt_ids], max_tokens, eos_id=loaded.ids["eos_ids"], pad_id=loaded.pad_id, **kw)


def text_of(loaded, tokens: list[int]) -> str:
    # as TextStream decodes a whole row: special tokens left out, an unfinished last character dropped
    return loaded.tokenizer.decode(tokens).rstrip("\ufffd")


def test_models(client, loaded):
    assert [m.id for m in client.models.list().data] == [loaded.name]
    assert client.models.retrieve(loaded.name).id == loaded.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_greedy_equals_stream_and_generate(client, loaded):
    prompt_ids = loaded.encode(PROMPT)
    [tokens] = expected(loaded, prompt_ids, 24)
    out = client.completions.create(model=loaded.name, prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == text_of(loaded, tokens)
    assert out.choices[0].finish_reason == ("length" if len(tokens) == 24 else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), len(tokens))
    assert out.usage.total_tokens == len(prompt_ids) + len(tokens)

    chunks = list(
        client.completions.create(
            model=loaded.name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == out.usage.model_dump()


def test_chat_greedy_equals_stream_and_generate(client, loaded):
    prompt_ids = loaded.chat.prompt(MESSAGES)
    [tokens] = expected(loaded, prompt_ids, 20)
    out = client.chat.completions.create(model=loaded.name, messages=MESSAGES, max_tokens=20, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text_of(loaded, tokens)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), len(tokens))

    stream = client.chat.completions.create(
        model=loaded.name, messages=MESSAGES, max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_n_with_seed_is_reproducible(client, loaded):
    kw = dict(model=loaded.name, prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=7)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    # choice j samples with seed + j, as generate's row j does
    rows = generate(loaded.model, [loaded.encode(PROMPT)] * 3, 12, temperature=1.0, seed=7,
                    eos_id=loaded.ids["eos_ids"], pad_id=loaded.pad_id)  # fmt: skip
    assert texts == [text_of(loaded, r) for r in rows]
    assert first.usage.prompt_tokens == len(loaded.encode(PROMPT))  # counted once, not per choice
    assert first.usage.completion_tokens == sum(len(r) for r in rows)


def test_stop_cuts_the_text(client, loaded):
    full = client.completions.create(model=loaded.name, prompt=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) > 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.find(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model=loaded.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "never-there"], stream=stream
        )
        if stream:
            chunks = list(out)
            assert "".join(c.choices[0].text for c in chunks) == cut
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert out.choices[0].text == cut
            assert out.choices[0].finish_reason == "stop"
            assert out.usage.completion_tokens < full.usage.completion_tokens


def test_sixteen_concurrent_requests_are_batched(server, client, http, loaded):
    prompts = [f"{PROMPT}{' there' * (i % 5)} number {i}" for i in range(16)]
    want = [text_of(loaded, expected(loaded, loaded.encode(p), 10)[0]) for p in prompts]
    got: list[str | None] = [None] * 16
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            if i % 2:  # half of them streamed
                chunks = client.completions.create(
                    model=loaded.name, prompt=prompts[i], max_tokens=10, temperature=0, stream=True
                )
                got[i] = "".join(c.choices[0].text for c in chunks)
            else:
                got[i] = (
                    client.completions.create(model=loaded.name, prompt=prompts[i], max_tokens=10, temperature=0)
                    .choices[0]
                    .text
                )
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    before = server.scheduler.snapshot()
    server.scheduler.pause()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        assert server.scheduler.wait_for(lambda s: s["waiting"] == 16), server.scheduler.snapshot()
    finally:
        server.scheduler.resume()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert got == want
    metrics = http.get("/metrics").json()
    assert metrics["batches"] == before["batches"] + 1  # all sixteen in one batch: one forward pass per step
    assert metrics["batch_sizes"]["16"] == before["batch_sizes"].get(16, 0) + 1


def test_a_request_arriving_mid_batch_joins_it(server, client, loaded):
    first, second = f"{PROMPT} number one", "Emma"
    want = [text_of(loaded, expected(loaded, loaded.encode(p), n)[0]) for p, n in [(first, 30), (second, 8)]]
    sched, gate = server.scheduler, threading.Event()
    before = sched.snapshot()
    got: dict[str, str] = {}

    def ask(name: str, prompt: str, n: int) -> None:
        got[name] = (
            client.completions.create(model=loaded.name, prompt=prompt, max_tokens=n, temperature=0).choices[0].text
        )

    sched.on_step = lambda: gate.wait(30)  # the first batch holds after its first step...
    long_one = threading.Thread(target=ask, args=("first", first, 30))
    late = threading.Thread(target=ask, args=("second", second, 8))
    try:
        long_one.start()
        assert sched.wait_for(lambda s: s["steps"] > before["steps"])
        late.start()  # ...while the second request arrives and waits
        assert sched.wait_for(lambda s: s["waiting"] == 1)
    finally:
        sched.on_step = None
        gate.set()
        long_one.join(60)
        late.join(60)
    assert [got["first"], got["second"]] == want  # joining changed neither answer
    after = sched.snapshot()
    assert after["joined"] == before["joined"] + 1 and after["batches"] == before["batches"] + 1


def test_client_closing_a_stream_stops_its_row(server, client, loaded):
    kw = dict(model=loaded.name, messages=MESSAGES, max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"  # left alone, the row would run all 60 tokens
    sched, gate = server.scheduler, threading.Event()
    before = sched.snapshot()
    sched.on_step = lambda: gate.wait(30)  # the batch stops after its first step until the client has gone
    try:
        stream = client.chat.completions.create(**kw, stream=True)
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        stream.close()
        assert sched.wait_for(lambda s: s["cancelled_requests"] == before["cancelled_requests"] + 1)
    finally:
        sched.on_step = None
        gate.set()
    assert sched.wait_for(lambda s: s["rows_cancelled"] == before["rows_cancelled"] + 1)
    assert sched.wait_for(lambda s: s["running"] == 0)
    assert sched.snapshot()["tokens"] - before["tokens"] < 60  # stopped at the next step, not run to the end


def test_client_leaving_before_its_answer_frees_the_row(server, loaded):
    """A non-streamed request whose client hangs up while it waits for a batch never reaches the model."""
    sched, before = server.scheduler, server.scheduler.snapshot()
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": loaded.name, "prompt": PROMPT, "max_tokens": 5}).encode()
    sched.pause()
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert sched.wait_for(lambda s: s["waiting"] == 1)
        assert sched.wait_for(lambda s: s["cancelled_requests"] == before["cancelled_requests"] + 1)
    finally:
        sched.resume()
    assert sched.wait_for(lambda s: s["rows_cancelled"] == before["rows_cancelled"] + 1 and s["waiting"] == 0)
    assert sched.snapshot()["tokens"] == before["tokens"]


def test_api_key(loaded):
    serving = serve_in_thread(loaded, api_key="sekret")
    try:
        url = f"{serving.url}/v1"
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url, api_key="sekret", max_retries=0)
        assert good.completions.create(model=loaded.name, prompt="a", max_tokens=2).usage.completion_tokens >= 1
        for path in ("/metrics", "/v1/models", "/nowhere"):  # every request, whatever the route
            r = httpx.get(serving.url + path)
            assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        serving.stop()


LONG = "word " * 400  # well over the 256-token context


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
        ("/v1/completions", {"model": None, "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/completions", {"model": None, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": None, "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/completions", {"model": None, "prompt": LONG}, 400, "prompt"),
        ("/v1/completions", {"model": None, "prompt": LONG, "max_tokens": 4}, 400, "max_tokens"),
        ("/v1/completions", {"model": None, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"model": None, "prompt": "a", "max_tokens": 5.0}, 400, "max_tokens"),
        ("/v1/completions", {"model": None, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": None, "prompt": "a", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": None, "prompt": "a", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": None, "prompt": "a", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": None, "prompt": "a", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"model": None, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"model": None, "prompt": [1, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"model": None, "prompt": "a\ud800"}, 400, "prompt"),  # a lone surrogate: no text
        ("/v1/completions", {"model": None, "prompt": "a", "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": None, "prompt": "a", "logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"model": None, "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("/v1/completions", {"model": None, "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
        ("/v1/completions", {"model": None}, 400, "prompt"),
        ("/v1/chat/completions", {"model": None, "messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"model": None, "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": None, "messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages.0.role",
        ),  # fmt: skip
        ("/v1/chat/completions", {"model": None, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": None, "messages": MESSAGES, "tools": [{"type": "function"}]},
            400,
            "tools",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {
                "model": None,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
                ],
            },
            400,
            "messages.0.content",
        ),  # fmt: skip
    ],
)
def test_bad_requests_get_4xx_and_the_server_goes_on(http, loaded, path, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({**body, "model": body["model"] or loaded.name}).encode()
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    ok = http.post("/v1/completions", json={"model": loaded.name, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_too_large_bodies_and_wrong_methods(http, loaded):
    big = json.dumps({"model": loaded.name, "prompt": "x" * (2 << 20)}).encode()
    r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = http.post("/v1/completions", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    r = http.get("/v1/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.post("/v1/completions", json={"model": loaded.name, "prompt": "a", "max_tokens": 1}).status_code == 200


def test_openai_client_sees_openai_errors(client, loaded):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=loaded.name, prompt=LONG, max_tokens=8)
    assert err.value.body["code"] == "context_length_exceeded"
    assert "256" in err.value.body["message"] and "8" in err.value.body["message"]


def test_base_model_refuses_chat_serves_completions(loaded):
    base = dataclasses.replace(loaded, chat=None)  # the same weights, as a checkpoint without a chat format
    serving = serve_in_thread(base)
    try:
        c = openai.OpenAI(base_url=f"{serving.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=base.name, messages=MESSAGES)
        assert err.value.body["code"] == "model_not_chat"
        assert c.completions.create(model=base.name, prompt=PROMPT, max_tokens=3).choices[0].finish_reason
    finally:
        serving.stop()


def test_model_output_is_json_data(client, loaded):
    """Whatever the model writes (quotes, newlines, markup) arrives as the string it is, chunk by chunk."""
    out = client.completions.create(model=loaded.name, prompt='"}\n\ndata: [DONE]\n\n<script>', max_tokens=16,
                                    temperature=0)  # fmt: skip
    streamed = client.completions.create(model=loaded.name, prompt='"}\n\ndata: [DONE]\n\n<script>', max_tokens=16,
                                         temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_command_line(chat_checkpoint, capsys):
    assert main([]) == 2
    assert main(["ckpt_path=x.ckpt", "colour=red"]) == 2
    assert main([f"ckpt_path={chat_checkpoint}", "port=70000"]) == 2
    assert main(["ckpt_path=/nonexistent/model.ckpt"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert "ckpt_path" in lines[0] and "colour" in lines[1] and "port" in lines[2] and "nonexistent" in lines[3]

    proc = subprocess.Popen([sys.executable, "-m", "llm.serve", f"ckpt_path={chat_checkpoint}", "port=0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving (\S+) on (http://127\.0\.0\.1:\d+) \(OpenAI API at /v1\)\n", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        assert match[1] == chat_checkpoint.stem
        models = httpx.get(f"{match[2]}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == chat_checkpoint.stem
    finally:
        proc.terminate()
        proc.wait(30)

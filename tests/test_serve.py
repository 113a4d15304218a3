"""serve.py through its real HTTP stack: a uvicorn server on 127.0.0.1 over a tiny random-weight base and three
random adapters, driven by the official `openai` client and by raw sockets; every completion is checked against the
adapter's merged model generating alone, and the server is abused (200 requests at once, oversized, slow, half-sent,
malformed and out-of-range requests, clients that go away) and must go on serving."""

import asyncio
import http.client
import json
import logging
import shutil
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from test_lora import random_gpt, randomize_lora

import lora
import serve
import skills
import tokenization
import training
from lora import apply_lora, save_adapter

ROOT = Path(__file__).resolve().parents[1]
CHARS = "\n" + string.ascii_letters + string.digits + " .,:;!?'\"-"  # enough for prompts and the chat template
READ_TIMEOUT = 2.0  # the test server's --read-timeout-s: short, so that the timeout tests take seconds


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A skills-style run on disk (base, adapters a/b/c of different ranks and targets, a random router) and a
    server for it on a free port of 127.0.0.1, configured as main() configures it."""
    root = tmp_path_factory.mktemp("serve")
    tok = tokenization.CharTokenizer(CHARS, eot=True)
    base = random_gpt(vocab=tok.vocab_size, ctx=96, width=32, depth=2)
    base.save_pretrained(root / "base")
    (root / "base" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    dirs = {}
    for i, (name, r, targets) in enumerate([("a", 4, lora.DEFAULT_TARGETS), ("b", 8, ("c_attn",)),
                                            ("c", 2, ("c_fc", "attn.c_proj"))]):
        m = random_gpt(vocab=tok.vocab_size, ctx=96, width=32, depth=2)
        apply_lora(m, r=r, alpha=2 * r, targets=targets)
        randomize_lora(m, seed=10 + i)
        dirs[name] = root / "run" / "adapters" / name
        save_adapter(m, dirs[name], {"task": name, "base": str(root / "base")})
    torch.manual_seed(0)
    router = skills.Router(32, list(dirs))
    with torch.no_grad():
        router.head.weight.normal_()
    skills.save_router(router, root / "run" / "router")

    rt = training.setup_runtime("cpu")
    args = serve.Args(run_dir=str(root / "run"), device="cpu", read_timeout_s=READ_TIMEOUT)
    service = serve.load_service(args, rt)
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(serve.server_config(service, args, log_level="info", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    merged = {name: lora.merged_model(base, d) for name, d in dirs.items()} | {"base": base}
    yield dict(client=client, url=url, port=port, service=service, tok=tok, merged=merged, rt=rt, router=router,
               run=root / "run")
    server.should_exit = True
    thread.join(30)
    service.close()


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def server_log():
    """Every log record written during the test: uvicorn's loggers (the server's and serve.py's lines) and any other
    (asyncio's, for one)."""
    handler, loggers = Records(), [logging.getLogger("uvicorn"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def alone(d, model: str, prompt: str, max_tokens: int, temperature=0.0, top_p=None, seed=0) -> tuple[str, str]:
    """(text, finish_reason) of the adapter's merged model generating on its own (greedy unless a temperature is
    given, then drawing with a generator seeded `seed`), ending at the end of text."""
    tok, merged, g = d["tok"], d["merged"][model], torch.Generator().manual_seed(seed)
    idx = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = merged.generate(idx, max_tokens, temperature, top_p=top_p, eos_token_id=tok.eot_token, generator=g)
    out = out[0, idx.size(1):].tolist()
    ended = tok.eot_token in out
    return tok.decode(out[:out.index(tok.eot_token)] if ended else out), "stop" if ended else "length"


def post(url, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("Content-Type")


PROMPTS = ["Hello there", "What is 2 plus 2?", "ROMEO: But soft", "x", "Say something kind:\n"]


def test_models_list(deployment):
    ids = {m.id for m in deployment["client"].models.list()}
    assert ids == {"base", "a", "b", "c", "auto"}


def test_completions_equal_each_adapter_alone(deployment):
    client, tok = deployment["client"], deployment["tok"]
    texts = {}
    for model, prompt in zip(["a", "b", "c", "base", "a"], PROMPTS, strict=True):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
        text, finish = alone(deployment, model, prompt, 20)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish), (model, prompt)
        assert r.object == "text_completion" and r.model == model and r.choices[0].adapter == model
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) and 1 <= r.usage.completion_tokens <= 20
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        texts[model, prompt] = text
    assert len(set(texts.values())) == len(texts)  # the adapters make a difference
    # a stop sequence cuts the text before it; a list of prompts gives one choice per prompt
    full = texts["a", PROMPTS[0]]
    stop = full[3:5]
    r = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="b", prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [alone(deployment, "b", p, 12)[0] for p in PROMPTS[:3]]
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_chat_completions_use_the_chat_template(deployment):
    client, tok = deployment["client"], deployment["tok"]
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}]
    prompt = tok.chat(messages)
    assert prompt.endswith("\n\nHuman: How are you?\n\nAssistant:")
    r = client.chat.completions.create(model="c", messages=messages, max_tokens=15, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == alone(deployment, "c", prompt, 15)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    # without max_tokens the reply may run to the end of the context
    r = client.chat.completions.create(model="c", messages=messages, temperature=0)
    assert r.choices[0].message.content == alone(deployment, "c", prompt, 96 - len(prompt))[0]


def test_streaming_equals_the_whole_answer(deployment):
    client = deployment["client"]
    whole = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=25, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really came in pieces
    assert "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # the raw stream is server-sent events ending with [DONE]
    body = json.dumps({"model": "a", "prompt": "Hi", "max_tokens": 5, "stream": True}).encode()
    req = urllib.request.Request(deployment["url"] + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_seeded_sampling_equals_the_merged_model_drawing_alone(deployment):
    """With a seed, prompt i of a request draws with a generator seeded seed + i: the same draws as the merged
    model sampling alone with that generator. Some samples end at the end-of-text token ("stop")."""
    client, finishes = deployment["client"], []
    for seed in range(6):
        r = client.completions.create(model="b", prompt=["Hi", "Once"], max_tokens=40, temperature=1.5, top_p=0.9,
                                      seed=seed)
        for i, (c, prompt) in enumerate(zip(r.choices, ["Hi", "Once"], strict=True)):
            assert (c.text, c.finish_reason) == alone(deployment, "b", prompt, 40, 1.5, 0.9, seed + i)
            finishes.append(c.finish_reason)
    assert set(finishes) == {"stop", "length"}, finishes


def test_auto_asks_the_router(deployment):
    d = deployment
    r = d["client"].completions.create(model="auto", prompt=PROMPTS, max_tokens=8, temperature=0)
    service = d["service"]
    chosen = skills.route(service.model, d["router"], PROMPTS, d["tok"], "cpu")
    assert [c.adapter for c in r.choices] == chosen and set(chosen) <= {"a", "b", "c"}
    assert [c.text for c in r.choices] == [alone(d, a, p, 8)[0] for a, p in zip(chosen, PROMPTS, strict=True)]


def test_concurrent_requests_share_one_mixed_batch(deployment):
    d = deployment
    service, client = d["service"], d["client"]
    models = ["a", "b", "c", "base", "b"]
    barrier = threading.Barrier(len(models))

    def ask(i):
        barrier.wait()
        return client.completions.create(model=models[i], prompt=PROMPTS[i], max_tokens=20, temperature=0)

    service.window = 2.0  # wait up to 2 s for more requests after the first, so that all five share one batch
    try:
        with ThreadPoolExecutor(len(models)) as pool:
            answers = list(pool.map(ask, range(len(models))))
    finally:
        service.window = 0.005
    assert sorted(service.batches[-1]) == sorted(models)  # one forward per step for all five
    for model, prompt, r in zip(models, PROMPTS, answers, strict=True):
        assert (r.choices[0].text, r.choices[0].finish_reason) == alone(d, model, prompt, 20)


def test_bad_requests_get_openai_errors(deployment):
    client, url = deployment["client"], deployment["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    for kwargs, param in [(dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=95), "max_tokens"),
                          (dict(prompt="x" * 100), "max_tokens"), (dict(prompt="caf\u00e9 \u2603"), "prompt"),
                          (dict(temperature=3), "temperature"), (dict(n=2), "n"), (dict(prompt=""), "prompt"),
                          (dict(stop=["a"] * 5), "stop")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": "a", "prompt": "Hi", **kwargs})
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=[{"role": "robot", "content": "Hi"}])
    assert e.value.param == "messages"
    for body, status, param in [(b"{not json", 400, None), ({"model": "a"}, 400, "prompt"),
                                ({"model": "a", "prompt": "Hi", "max_tokens": 1.5}, 400, "max_tokens"),
                                ({"model": "a", "prompt": "Hi", "stream": "yes"}, 400, "stream")]:
        code, out, ctype = post(url + "/v1/completions", body)
        assert (code, out["error"]["param"]) == (status, param) and ctype == "application/json", (body, out)
        assert out["error"]["message"] and out["error"]["type"] == "invalid_request_error"
    code, out, _ = post(url + "/v1/nothing", {})
    assert code == 404 and "/v1/nothing" in out["error"]["message"]
    # and it goes on serving
    r = client.completions.create(model="c", prompt="Hi", max_tokens=5)
    assert r.usage.completion_tokens <= 5


def test_check_mixed_batch(deployment):
    d = deployment
    service = d["service"]
    requests = [(p, a) for p, a in zip(PROMPTS, ["a", "b", "c", "c", "a"], strict=True)]
    check = serve.check_mixed_batch(service.model, service.names, d["merged"], requests, d["tok"], d["rt"], 20)
    assert check["identical_completions"] == check["requests"] == 5 and check["max_abs_logit_diff"] < 1e-4


def test_a_run_without_adapters_is_refused(tmp_path):
    with pytest.raises(training.InputError, match="no adapters"):
        serve.load_service(serve.Args(run_dir=str(tmp_path), device="cpu"), training.setup_runtime("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Abuse: the server answers every client, refuses what it must with a 4xx naming the field, and goes on serving


def serves(d):
    """The server still answers, and correctly."""
    r = d["client"].completions.create(model="c", prompt="Hi", max_tokens=4, temperature=0)
    assert r.choices[0].text == alone(d, "c", "Hi", 4)[0]


def request_head(length=None, path="/v1/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    return ("\r\n".join(lines + ([f"Content-Length: {length}"] if length is not None else [])) + "\r\n\r\n").encode()


def connect(d, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d["port"]), timeout=10)
    s.sendall(data)
    return s


def until_closed(s: socket.socket, timeout: float) -> bytes:
    """All the server sends on `s` until it closes the connection; an AssertionError if it is still open after
    `timeout` seconds."""
    deadline, data = time.monotonic() + timeout, b""
    try:
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout} s; it sent {data[:200]!r}") from None
    except ConnectionResetError:
        return data
    finally:
        s.close()


def status_and_error(response: bytes) -> tuple[int, dict | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), json.loads(body)["error"]
    except ValueError:
        return int(head.split(b" ", 2)[1]), None


def test_200_concurrent_requests_are_all_answered(deployment):
    """200 clients at once, each on a connection of its own and a third of them streaming: every one is answered,
    and answered right (none is reset or dropped: the accept queue, the event loop and the batcher keep up)."""
    d, n = deployment, 200
    asks = [(["a", "b", "c", "base"][i % 4], PROMPTS[i % 5], i % 3 == 0) for i in range(n)]
    expected = {(m, p): alone(d, m, p, 6) for m, p in {(m, p) for m, p, _ in asks}}
    barrier = threading.Barrier(n, timeout=60)

    def ask(i):
        model, prompt, stream = asks[i]
        conn = http.client.HTTPConnection("127.0.0.1", d["port"], timeout=60)
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
        barrier.wait()  # all 200 connect and send together
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        assert r.status == 200, text
        if not stream:
            choice = json.loads(text)["choices"][0]
            return choice["text"], choice["finish_reason"]
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert events[-1] == "[DONE]", events
        choices = [json.loads(e)["choices"][0] for e in events[:-1]]
        return "".join(c["text"] for c in choices), choices[-1]["finish_reason"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(ask, range(n)))
    assert answers == [expected[m, p] for m, p, _ in asks]
    assert time.perf_counter() - t0 < 60


def test_requests_within_the_batch_window_share_a_batch_and_later_ones_do_not(deployment):
    d = deployment
    service = d["service"]

    def ask(model, delay):
        time.sleep(delay)
        return d["client"].completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0)

    service.window = 0.6  # the batcher waits 0.6 s after the first request for more
    try:  # "a" opens a batch, "b" comes 0.1 s later (within the window), "c" 1.5 s later (after it closed)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, ["a", "b", "c"], [0.0, 0.1, 1.5]))
    finally:
        service.window = 0.005
    assert [sorted(batch) for batch in list(service.batches)[-2:]] == [["a", "b"], ["c"]]
    assert [r.choices[0].text for r in answers] == [alone(d, m, "Hi", 5)[0] for m in "abc"]


def test_seed_top_p_and_tiny_temperatures(deployment):
    """The same seed draws the same sample and different seeds differ; a tiny top_p keeps only the most likely token
    (greedy), and so does a temperature below 1e-5 (dividing logits by 1e-300 would overflow to nan)."""
    d = deployment

    def draw(**kwargs):
        return d["client"].completions.create(model="b", prompt="Once", max_tokens=30, **kwargs).choices[0].text

    assert draw(temperature=1.5, seed=7) == draw(temperature=1.5, seed=7)
    assert len({draw(temperature=1.5, seed=seed) for seed in range(7, 11)}) == 4
    greedy = alone(d, "b", "Once", 30)[0]
    assert draw(temperature=1.5, seed=7) != greedy
    assert [draw(temperature=1.5, top_p=1e-9, seed=seed) for seed in (7, 8)] == [greedy, greedy]
    assert draw(temperature=1e-300, seed=7) == greedy
    # the extreme seeds a 64-bit generator takes are served (prompt i draws with seed + i)
    r = d["client"].completions.create(model="b", prompt=["Once", "Hi"], max_tokens=5, temperature=1.0,
                                       seed=(1 << 63) - 1)
    assert len(r.choices) == 2
    assert d["client"].completions.create(model="b", prompt="Once", max_tokens=5, seed=-(1 << 63)).choices


def test_out_of_range_and_unsupported_parameters_get_400_naming_the_field(deployment, server_log):
    d = deployment
    client = d["client"]
    for kwargs, param in [(dict(seed=2**70), "seed"), (dict(seed=-(2**70)), "seed"),
                          (dict(temperature=-1), "temperature"), (dict(max_tokens=0), "max_tokens"),
                          (dict(max_tokens=10**6), "max_tokens"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                          (dict(logprobs=2), "logprobs"), (dict(logprobs=0), "logprobs"), (dict(echo=True), "echo"),
                          (dict(best_of=2), "best_of"), (dict(suffix="!"), "suffix"),
                          (dict(logit_bias={"5": 10}), "logit_bias"), (dict(presence_penalty=0.5), "presence_penalty"),
                          (dict(frequency_penalty=-1), "frequency_penalty"),
                          (dict(extra_body={"colour": "blue"}), "colour")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": "a", "prompt": "Hi", "max_tokens": 3, **kwargs})
        assert e.value.param == param and param in e.value.response.json()["error"]["message"], (kwargs, e.value)
    messages = [{"role": "user", "content": "Hi"}]
    for kwargs, param in [(dict(logprobs=True), "logprobs"), (dict(top_logprobs=2), "top_logprobs"),
                          (dict(response_format={"type": "json_object"}), "response_format"),
                          (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="a", messages=messages, max_tokens=3, **kwargs)
        assert e.value.param == param, (kwargs, e.value)
    # at the value that asks for nothing, as some clients send them unasked, they are accepted
    r = client.completions.create(model="a", prompt="Hi", max_tokens=4, temperature=0, echo=False, best_of=1,
                                  logprobs=None, suffix=None, logit_bias={}, presence_penalty=0, frequency_penalty=0.0,
                                  user="someone")
    assert r.choices[0].text == alone(d, "a", "Hi", 4)[0]
    r = client.chat.completions.create(model="a", messages=messages, max_tokens=4, temperature=0, logprobs=False,
                                       tool_choice="none", response_format={"type": "text"})
    assert r.choices[0].message.content == alone(d, "a", d["tok"].chat(messages), 4)[0]
    assert not [r for r in server_log if r.levelno >= logging.WARNING or r.exc_info]
    serves(d)


def test_malformed_and_deeply_nested_json_get_400(deployment, server_log):
    d = deployment
    url = d["url"] + "/v1/completions"
    deep = b"[" * 100_000 + b"]" * 100_000
    for body, says in [(deep, "nested too deeply"), (b'{"model": "a", "prompt": ' + deep + b"}", "nested too deeply"),
                       (b'{"model": "a", "prompt": "Hi", "temperature": NaN}', "temperature"),
                       (b'{"model": "a", "prompt": "Hi", "max_tokens": 1e400}', "max_tokens"),
                       (b'{"model": "a", "prompt": ' + b"[" * 900 + b"]" * 900 + b"}", "prompt"),
                       (b'{"model": "a", "prompt": "Hi"', "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"),
                       (b'"a string"', "JSON object"), (b"null", "JSON object")]:
        code, out, ctype = post(url, body)
        assert code == 400 and ctype == "application/json" and says in out["error"]["message"], (body[:60], out)
    assert not [r for r in server_log if r.levelno >= logging.WARNING or r.exc_info]
    serves(d)


def test_an_oversized_body_gets_413_before_it_is_read(deployment):
    d = deployment
    code, error = status_and_error(until_closed(connect(d, request_head(50 * 10**9)), timeout=10))
    assert code == 413 and error["code"] == "request_too_large", error
    code, error = status_and_error(until_closed(connect(d, request_head((1 << 20) + 1)), timeout=10))
    assert code == 413
    serves(d)


def test_request_limits_count_a_body_of_no_declared_length_and_time_it():
    """RequestLimits alone, on a chunked body (no Content-Length): past max_bytes 413, slower than timeout_s 408;
    within both the app gets the whole body as one message."""
    def run(chunks: list[bytes], delay: float):
        sent, seen = [], []
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            await asyncio.sleep(delay)
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def app(scope, receive, send):
            seen.append(await receive())

        async def send(message):
            sent.append(message)

        limits = serve.RequestLimits(app, max_bytes=10, timeout_s=0.5)
        asyncio.run(limits({"type": "http", "method": "POST", "headers": []}, receive, send))
        return [m.get("status") for m in sent if m["type"] == "http.response.start"], seen

    assert run([b"12345", b"67890"], 0.0) == ([], [{"type": "http.request", "body": b"1234567890", "more_body": False}])
    assert run([b"12345", b"678901"], 0.0) == ([413], [])
    assert run([b"1", b"2", b"3", b"4"], 0.2) == ([408], [])


def test_slow_and_half_sent_requests_time_out_without_starving_others(deployment):
    """Clients that send half a request head, or a head and part of the body it announces, or nothing, are cut off
    after --read-timeout-s (408, or a plain close for nothing); meanwhile the others are served at once. A negative
    Content-Length is refused at once (400, by h11)."""
    d = deployment
    body = b'{"model": "a", "prompt": "Hi", "max_tokens": 3}'
    heads = [connect(d, request_head(len(body))[:40]) for _ in range(300)]
    bodies = [connect(d, request_head(len(body)) + body[:10]) for _ in range(5)]
    silent = connect(d)
    t0 = time.monotonic()
    serves(d)
    code, _ = status_and_error(until_closed(connect(d, request_head(-5) + body), timeout=5))
    assert code == 400
    assert time.monotonic() - t0 < READ_TIMEOUT  # not kept waiting behind the slow ones
    for s in heads + bodies:
        code, error = status_and_error(until_closed(s, timeout=READ_TIMEOUT + 10))
        assert code == 408 and error["code"] == "request_timeout", error
    assert until_closed(silent, timeout=READ_TIMEOUT + 10) == b""
    serves(d)


def test_a_client_going_away_costs_one_log_line(deployment, server_log, capfd):
    """A client that closes its connection mid-answer, streaming or not, costs one log line and no traceback, and
    the server goes on serving."""
    d = deployment
    service = d["service"]
    service.window = 1.0  # the batcher waits a second after the first request: the clients leave before decoding
    try:
        for stream in (True, False):
            body = json.dumps({"model": "a", "prompt": "Hi", "max_tokens": 80, "stream": stream}).encode()
            s = connect(d, request_head(len(body)) + body)
            if stream:
                assert s.recv(12) == b"HTTP/1.1 200"  # the stream has begun
            else:
                time.sleep(0.2)
            s.close()
            for _ in range(100):
                if len([r for r in server_log if "went away" in r.getMessage()]) == (1 if stream else 2):
                    break
                time.sleep(0.05)
    finally:
        service.window = 0.005
    serves(d)
    time.sleep(0.2)
    assert len([r for r in server_log if "went away" in r.getMessage()]) == 2, [r.getMessage() for r in server_log]
    assert not [r for r in server_log if r.levelno >= logging.WARNING or r.exc_info]
    assert "Traceback" not in capfd.readouterr().err


def test_start_up_failures_are_one_line(deployment, tmp_path):
    """A truncated adapter or a corrupt router stops serve.main with an InputError of one line naming the file
    (which __main__ prints, exit status 1: see the next test)."""
    d, cases = deployment, []

    def broken(name: str, path: str, damage, named: str | None = None) -> None:
        """A copy of the run with `path` damaged; the error must name `named` (default: `path`)."""
        run = tmp_path / name
        shutil.copytree(d["run"], run)
        damage(run / path)
        cases.append((run, run / (named or path)))

    def truncate(f: Path):
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])

    broken("adapter", "adapters/b/adapter_model.safetensors", truncate)
    broken("adapter_config", "adapters/a/adapter_config.json", truncate)
    broken("router_json", "router/router.json", truncate, "router")
    broken("router_names", "router/router.json", lambda f: f.write_text('{"nomen": ["a", "b", "c"]}'), "router")
    broken("router_weights", "router/router.safetensors", truncate, "router")
    broken("router_width", "router", lambda p: skills.save_router(skills.Router(16, ["a", "b", "c"]), p))
    for run, named in cases:
        with pytest.raises(training.InputError) as e:
            serve.main(serve.Args(run_dir=str(run), device="cpu", port=0))
        message = str(e.value)
        assert str(named) in message and "\n" not in message, message
    for bad, says in [(dict(port=70000), "--port 70000"), (dict(read_timeout_s=0.0), "--read-timeout-s 0.0"),
                      (dict(max_body_bytes=0), "--max-body-bytes 0"), (dict(host="no.such.host.invalid"), "listen")]:
        with pytest.raises(training.InputError, match=says):
            serve.main(serve.Args(run_dir=str(d["run"]), device="cpu", **bad))


def test_a_port_in_use_is_one_line_and_exit_status_1(deployment):
    """The port is taken before the model loads: a second server on it says so in one line, exit status 1."""
    port = deployment["port"]
    proc = subprocess.run([sys.executable, "serve.py", "--run-dir", str(deployment["run"]), "--port", str(port)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"], \
        proc.stderr

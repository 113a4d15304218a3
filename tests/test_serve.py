"""serve.py through its real HTTP stack: a uvicorn server on 127.0.0.1 over a tiny random-weight base and three
random adapters, driven by the official `openai` client; every completion is checked against the adapter's merged
model generating alone."""

import json
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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

CHARS = "\n" + string.ascii_letters + string.digits + " .,:;!?'\"-"  # enough for prompts and the chat template


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A skills-style run on disk (base, adapters a/b/c of different ranks and targets, a random router) and a
    server for it on a free port of 127.0.0.1."""
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
    service = serve.load_service(serve.Args(run_dir=str(root / "run"), device="cpu"), rt)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(serve.make_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    merged = {name: lora.merged_model(base, d) for name, d in dirs.items()} | {"base": base}
    yield dict(client=client, url=url, service=service, tok=tok, merged=merged, rt=rt, router=router)
    server.should_exit = True
    thread.join(30)
    service.close()


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

"""batching.py on tiny random models: the cache operations give every row its own logits, continuous decoding gives
every request the tokens it gets alone on its adapter's merged model, requests join at the next step and leave at
once (and wait under static batching), a full queue is a 503, and bench/bench_serve.py runs."""

import json
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import uvicorn
from test_lora import random_gpt, randomize_lora

import lora
import serve
import tokenization
import training
from batching import Job, RunningBatch, Scheduler, merge_caches, select_rows, trim_padding
from gpt import GPT, GPTConfig, KVCache, left_pad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

CHARS = "\n" + string.ascii_letters + string.digits + " .,:;!?'\"-"


def tiny(arch: str) -> GPT:
    if arch == "gpt2":
        return random_gpt(vocab=50, ctx=64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, arch="llama",
                          tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_selected_and_trimmed_caches_give_each_row_its_own_logits(arch):
    """Two batches prefilled apart (left-padded prompts of 2 to 12 tokens), one decoded two steps ahead, then merged:
    each row's next logits equal its sequence's alone; so again after two rows leave and the padding only they
    needed is trimmed, and after the cache runs out of room and is reallocated."""
    model = tiny(arch)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(50, (n,), generator=g).tolist() for n in (2, 9, 5, 12)]

    def alone(seq):
        return model(torch.tensor([seq]))[0][0, -1]

    def prefill(rows):
        idx, mask = left_pad([seqs[r] for r in rows])
        cache = KVCache(model.config.n_layer, idx.size(1) + 2)
        model.hidden_states(idx, mask, cache)
        return cache, mask

    def step(cache, mask, rows):  # feed each row one more token; check its logits against the row alone
        if cache.len == cache.max_len:
            cache, mask = merge_caches([(cache, mask)], room=1)
        for r in rows:
            seqs[r].append(int(torch.randint(50, (1,), generator=g)))
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = model.lm_head(model.hidden_states(torch.tensor([[seqs[r][-1]] for r in rows]), mask, cache)[:, -1])
        for i, r in enumerate(rows):
            torch.testing.assert_close(logits[i], alone(seqs[r]))
        return cache, mask

    a, b = prefill([0, 1]), prefill([2, 3])
    a = step(*step(*a, [0, 1]), [0, 1])  # 11 positions; b has 12
    cache, mask = merge_caches([a, b], room=0)
    assert (cache.len, cache.max_len, mask.shape) == (12, 12, (4, 12)) and mask[:2, 0].tolist() == [0, 0]
    rows = [0, 1, 2, 3]
    for _ in range(3):  # the first step reallocates: the merged cache had no room
        cache, mask = step(cache, mask, rows)
    cache, mask = trim_padding(*select_rows(cache, mask, torch.tensor([0, 2])))  # the two longest leave
    rows = [0, 2]
    assert cache.len == mask.size(1) == max(len(seqs[0]), len(seqs[2])) and mask[:, 0].any()
    for _ in range(4):
        cache, mask = step(cache, mask, rows)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A tiny random base, adapters a (rank 4, every projection) and b (rank 2, attention only), the base serving
    both at once, and each adapter's merged model."""
    root = tmp_path_factory.mktemp("batching")
    tok = tokenization.CharTokenizer(CHARS, eot=True)
    base = random_gpt(vocab=tok.vocab_size, ctx=64)
    dirs = {}
    for i, (name, r, targets) in enumerate([("a", 4, lora.DEFAULT_TARGETS), ("b", 2, ("c_attn",))]):
        m = random_gpt(vocab=tok.vocab_size, ctx=64)
        lora.apply_lora(m, r=r, alpha=2 * r, targets=targets)
        randomize_lora(m, seed=10 + i)
        dirs[name] = root / name
        lora.save_adapter(m, dirs[name])
    multi, names = lora.build_multi_adapter(base, dirs)
    merged = {name: lora.merged_model(base, d) for name, d in dirs.items()} | {"base": base}
    return dict(tok=tok, multi=multi, names=names, merged=merged, rt=training.setup_runtime("cpu"))


def job(tok, prompt: str, adapter: str, max_tokens: int, temperature=0.0, seed=0, stop=(), events=None) -> Job:
    def emit(kind, value):
        if events is not None:
            events.append((kind, value))
    return Job(tok.encode(prompt), adapter, max_tokens, temperature, 0.9, list(stop),
               torch.Generator().manual_seed(seed), emit)


def alone(d, j: Job, seed=0) -> list[int]:
    """The tokens of j's prompt generated alone on its adapter's merged model, up to the end of text."""
    idx = torch.tensor([j.ids])
    with torch.no_grad():
        out = d["merged"][j.adapter].generate(idx, j.max_tokens, j.temperature, top_p=0.9,
                                              eos_token_id=d["tok"].eot_token,
                                              generator=torch.Generator().manual_seed(seed))
    out = out[0, idx.size(1):].tolist()
    return out[:out.index(d["tok"].eot_token)] if d["tok"].eot_token in out else out


def test_continuous_decoding_gives_each_request_its_tokens_alone(deployment):
    """Requests of different prompt lengths and adapters join at different steps and leave when they end: each gets
    the tokens its adapter's merged model generates alone (greedy; one row samples with its own seeded generator),
    rows of different arrivals really share the batch, and the cache is never longer than its longest row."""
    d = deployment
    tok = d["tok"]
    arrivals = {0: [job(tok, "Hello there", "a", 30), job(tok, "x", "b", 12)],
                2: [job(tok, "What is 2 plus 2?", "base", 20)],
                3: [job(tok, "ROMEO: But soft", "b", 25), job(tok, "Say", "a", 8, temperature=1.0, seed=3)],
                9: [job(tok, "Once upon a time there was", "a", 20)],
                40: [job(tok, "Late", "b", 6)]}
    batch = RunningBatch(d["multi"], d["names"], tok, d["rt"])
    sizes = []
    for step in range(200):
        if step in arrivals:
            batch.join(arrivals[step])
        if len(batch):
            sizes.append(len(batch))
            batch.step()
            if len(batch):
                assert batch.cache.len == max(len(j.ids) + j.tokens - 1 for j in batch.jobs)
        elif step > max(arrivals):
            break
    assert max(sizes) >= 4 and sizes[-1] == 1  # arrivals at steps 0, 2 and 3 decoded together; the batch emptied
    for jobs in arrivals.values():
        for j in jobs:
            assert j.ended and j.out == alone(d, j, seed=3 if j.temperature else 0), j.adapter


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_request_joins_at_the_next_step_and_leaves_at_once(mode):
    """A short request sent while a long one decodes: continuous, its first token comes while the long one still
    decodes, and its "done" before the long one's; static, it waits for the long one to end."""
    tok = tokenization.CharTokenizer(CHARS)  # no end of text: the long request makes all its tokens
    model = random_gpt(vocab=tok.vocab_size, ctx=512)
    events = []  # (request, kind, tokens the long request had made by then)
    scheduler = Scheduler(model, [], tok, None, training.setup_runtime("cpu"), window_ms=0, mode=mode)
    long, short = (job(tok, "Hi", "base", n) for n in (450, 3))
    for name, j in (("long", long), ("short", short)):
        j.emit = lambda kind, value, name=name: events.append((name, kind, long.tokens))
    try:
        scheduler.submit([long])
        wait_for(lambda: long.tokens >= 5)
        scheduler.submit([short])
        wait_for(lambda: long.ended and short.ended)
    finally:
        scheduler.close()
    order = [(name, kind) for name, kind, _ in events]
    first_short = next(i for i, (name, _) in enumerate(order) if name == "short")
    long_done = order.index(("long", "done"))
    if mode == "continuous":
        assert events[first_short][2] < 450 and order.index(("short", "done")) < long_done
    else:
        assert first_short > long_done
    assert long.tokens == 450 and short.tokens == 3


def test_a_full_queue_answers_503_with_retry_after():
    """With room for two waiting prompts, a third request (while the two wait for the batch window) gets a 503 with
    Retry-After and OpenAI's error body; the two are answered, and so is the next one."""
    tok = tokenization.CharTokenizer(CHARS, eot=True)
    service = serve.CompletionService(random_gpt(vocab=tok.vocab_size, ctx=64), [], tok, None,
                                      training.setup_runtime("cpu"), window_ms=1000, max_queue=2)
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(serve.server_config(service, serve.Args(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"

    def post():
        body = json.dumps({"model": "base", "prompt": "Hi", "max_tokens": 3}).encode()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers.get("Retry-After"), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After"), json.loads(e.read())

    try:
        wait_for(lambda: server.started)
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(post())) for _ in range(2)]
        for t in waiting:
            t.start()
        wait_for(lambda: len(service.waiting) == 2)
        status, retry_after, body = post()
        assert (status, retry_after, body["error"]["code"]) == (503, "1", "server_busy"), body
        for t in waiting:
            t.join(30)
        assert [a[0] for a in answers] == [200, 200]
        assert post()[0] == 200
    finally:
        server.should_exit = True
        thread.join(30)
        service.close()


def test_the_serving_benchmark_runs_in_smoke_mode(capsys):
    import bench_serve

    report = bench_serve.main(bench_serve.Args(smoke=True))
    out = capsys.readouterr().out
    assert "CPU " in out and "continuous" in out and "static" in out
    assert all(v == report["requests"] for v in report["identical"].values()), report["identical"]
    for way in ("mixed continuous batch", "one batch per adapter", "one request at a time", "staggered, continuous",
                "staggered, static"):
        assert report["ways"][way]["tokens_per_s"] > 0

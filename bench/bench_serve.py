"""Benchmark serve.py under load, over HTTP on 127.0.0.1: continuous batching against static batching, one batch
per adapter and one request at a time.

    python bench/bench_serve.py --adapters runs/skills/adapters/qa runs/skills/adapters/kind   # on --base smollm2
    python bench/bench_serve.py --base runs/minigpt/latest --adapters DIR ... --requests 48 --stagger-s 8
    python bench/bench_serve.py --smoke    # seconds: a tiny random base and two tiny adapters in a temporary dir

The server (serve.CompletionService behind uvicorn, as serve.py runs it) is started in this process on a free port,
over --base and the --adapters (each served under its directory's name). --requests greedy completion requests, the
models of --mix and the max_tokens of --max-tokens in turn, all streamed (server-sent events, as a chat client
reads them), are sent five ways:
  - mixed continuous batch: all at once, every adapter in one batch (Punica, Chen et al. 2023; S-LoRA, Sheng et
    al. 2023), rows joining and leaving at every step (Orca's iteration-level scheduling, Yu et al. 2022): beyond
    --max-batch, a waiting request takes the row of the first to end;
  - one batch per adapter: the requests of one adapter at once, then the next adapter's (a server that batches
    only requests of the same adapter, or one server per adapter taking turns); latencies count from the sending
    of the request's own group;
  - one request at a time;
  - staggered, continuous and staggered, static: request i sent at i * stagger_s / requests seconds, to a server
    whose batch is continuous, then static (--batching static: a request that arrives while a batch decodes waits
    for its last row to end).
For each: tokens/s (completion tokens over the wall time from the first request sent to the last answer ended), and
the 50th, 90th and 99th percentiles of the latency (request sent to answer ended) and of the time to the first
token (request sent to the first text), from the best of --rounds rounds. Greedy decoding makes every way's answers
checkable: each must equal the same request's answer served alone (one request at a time, first round).

It prints the CPU's flags and load average with the results: other work on the machine changes the timings.
"""

import json
import math
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import torch
import tyro
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
import serve  # noqa: E402
import skills  # noqa: E402
import training  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from tokenization import CharTokenizer  # noqa: E402
from training import InputError  # noqa: E402

PROMPTS = ["Hello! Tell me about yourself.", "What is the capital of France?",
           "Write a short poem about the sea:\n", "Q: What is 12 plus 30?\nA:", "Once upon a time,",
           "List three colours: red,", "Explain why the sky is blue, in one sentence.", "Translate to French: good"]
SMOKE_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # every character of PROMPTS
WAYS = ("mixed continuous batch", "one batch per adapter", "one request at a time", "staggered, continuous",
        "staggered, static")


@dataclass
class Args:
    """Serve a base and its adapters on 127.0.0.1 and measure five ways of batching the same requests."""

    base: str = "smollm2"
    """the base model: a checkpoint directory, or 'smollm2' (the offline SmolLM2-135M-Instruct)"""
    adapters: tuple[str, ...] = ()
    """LoRA adapter directories trained on that base, each served under its directory's name"""
    mix: tuple[str, ...] = ()
    """the model of each request in turn, cycled: adapter names and 'base'; default: 'base' and every adapter"""
    requests: int = 24
    """requests per way"""
    max_tokens: tuple[int, ...] = (16, 32, 64, 128)
    """each request's max_tokens in turn, cycled (a request may end sooner, at the end of text)"""
    stagger_s: float = 4.0
    """the staggered ways send their requests evenly over this many seconds"""
    rounds: int = 2
    """rounds of the five ways; each way reports its round of most tokens/s (the first round of a new batch shape
    pays one-off kernel set-up)"""
    max_batch: int = 16
    """the server's --max-batch"""
    device: str = "auto"
    dtype: str = "auto"
    time_limit_s: float = 1800.0
    """the whole benchmark stops with an error past this many seconds"""
    smoke: bool = False
    """a tiny random base and two tiny random adapters (written to a temporary directory), short answers: seconds"""


def smoke_deployment(root: Path) -> tuple[str, tuple[str, ...]]:
    """A random 2-layer char-level base (weights far from init, so greedy answers are not all one character) and
    adapters tiny_a (rank 2) and tiny_b (rank 4), saved under root. Returns (base dir, adapter dirs)."""
    tok = CharTokenizer(SMOKE_CHARS)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "ln" in name else 0.2 * torch.randn_like(p))
    base.save_pretrained(root / "base")
    (root / "base" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    adapters = []
    for i, name in enumerate(("tiny_a", "tiny_b")):
        model = GPT(base.config)
        model.load_state_dict(base.state_dict())
        lora.apply_lora(model, r=2 * (i + 1), alpha=4.0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lora.LoRALinear):
                    m.lora_B.normal_(0, 0.3)
        lora.save_adapter(model, root / name, {"base": str(root / "base")})
        adapters.append(str(root / name))
    return str(root / "base"), tuple(adapters)


def start_server(args: Args, rt) -> tuple[serve.CompletionService, uvicorn.Server, threading.Thread, int]:
    """The base and adapters served on a free port of 127.0.0.1 by a uvicorn thread of this process."""
    base, tokenizer = skills.load_base(args.base, rt.device)
    adapters = {Path(a).name: Path(a) for a in args.adapters}
    qlora = any(lora.read_adapter(a)[2].get("qlora") for a in adapters.values())
    model, names = lora.build_multi_adapter(base, adapters, qlora=qlora) if adapters else (base, [])
    service = serve.CompletionService(model, names, tokenizer, None, rt, args.max_batch, max_queue=args.requests)
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(serve.server_config(service, serve.Args(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise InputError("the server did not start")
        time.sleep(0.01)
    return service, server, thread, sock.getsockname()[1]


def ask(port: int, model: str, prompt: str, max_tokens: int, send_at: float, deadline: float) -> dict:
    """Send one streamed greedy completion at time.perf_counter() == send_at; its text, completion tokens, time to
    the first text and latency."""
    time.sleep(max(0.0, send_at - time.perf_counter()))
    conn = HTTPConnection("127.0.0.1", port, timeout=max(1.0, deadline - time.perf_counter()))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, text, tokens = time.perf_counter(), None, "", 0
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise InputError(f"the server answered {response.status}: {response.read()[:300]!r}")
        for line in response:  # server-sent events: "data: {chunk}" lines, then "data: [DONE]"
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                first = first or time.perf_counter()
                text += choice["text"]
    except TimeoutError:
        raise InputError("a request ran past --time-limit-s") from None
    finally:
        conn.close()
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "ttft": first - t0, "latency": end - t0, "start": t0, "end": end}


def send(port: int, requests: list[tuple[str, str, int]], delays: list[float], deadline: float) -> list[dict]:
    """Each request (model, prompt, max_tokens) sent on a thread of its own, delays[i] seconds after the first."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r, d: ask(port, *r, t0 + d, deadline), requests, delays))


def run_ways(port: int, service: serve.CompletionService, requests: list[tuple[str, str, int]],
             stagger: list[float], deadline: float) -> dict[str, list[dict]]:
    """Each way's answers to `requests`, in order; the staggered ways send request i stagger[i] s after the first."""
    n, results = len(requests), {}
    results["mixed continuous batch"] = send(port, requests, [0.0] * n, deadline)
    results["one batch per adapter"] = [None] * n
    for model in dict.fromkeys(m for m, _, _ in requests):
        rows = [i for i, r in enumerate(requests) if r[0] == model]
        for i, answer in zip(rows, send(port, [requests[i] for i in rows], [0.0] * len(rows), deadline), strict=True):
            results["one batch per adapter"][i] = answer
    results["one request at a time"] = [send(port, [r], [0.0], deadline)[0] for r in requests]
    results["staggered, continuous"] = send(port, requests, stagger, deadline)
    service.mode = "static"
    try:
        results["staggered, static"] = send(port, requests, stagger, deadline)
    finally:
        service.mode = "continuous"
    return results


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank p-th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            **{k: {f"p{p}": percentile([r[k] for r in results], p) for p in (50, 90, 99)} for k in ("latency", "ttft")}}


def main(args: Args) -> dict:
    if args.smoke:
        args.requests, args.max_tokens, args.stagger_s = 24, (4, 8, 16, 24), 0.5
    training.check_args(args, {"requests": training.POSITIVE, "stagger_s": training.NON_NEGATIVE,
                               "time_limit_s": training.POSITIVE, "max_batch": training.POSITIVE,
                               "rounds": training.POSITIVE})
    deadline = time.perf_counter() + args.time_limit_s
    rt = training.setup_runtime(args.device, args.dtype)
    print(training.machine_report())
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.base, args.adapters = smoke_deployment(Path(tmp))
        service, server, thread, port = start_server(args, rt)
    try:
        mix = args.mix or ("base", *service.names)
        unknown = sorted(set(mix) - set(service.models()))
        if unknown:
            raise InputError(f"--mix {' '.join(unknown)}: not served; the models are {service.models()}")
        n = args.requests
        requests = [(mix[i % len(mix)], PROMPTS[i % len(PROMPTS)], args.max_tokens[i % len(args.max_tokens)])
                    for i in range(n)]
        print(f"{service.model.num_params() / 1e6:.2f}M-parameter base {args.base}, adapters "
              f"{service.names or 'none'}, device {rt.device} ({rt.dtype}); {n} streamed greedy requests of "
              f"{', '.join(mix)} in turn, max_tokens {', '.join(map(str, args.max_tokens))} in turn; "
              f"--max-batch {args.max_batch}")
        rounds = [run_ways(port, service, requests, [i * args.stagger_s / n for i in range(n)], deadline)
                  for _ in range(args.rounds)]
    finally:
        server.should_exit = True
        thread.join(30)
        service.close()

    alone = [r["text"] for r in rounds[0]["one request at a time"]]
    report = {"requests": n, "ways": {way: max((summary(results[way]) for results in rounds),
                                               key=lambda v: v["tokens_per_s"]) for way in WAYS},
              "identical": {way: min(sum(r["text"] == a for r, a in zip(results[way], alone, strict=True))
                                     for results in rounds) for way in WAYS}}
    ways, mixed = report["ways"], report["ways"]["mixed continuous batch"]["tokens_per_s"]
    print("\n| way | tokens/s | of the mixed batch | latency p50 / p90 / p99 s | first token p50 / p90 / p99 s |")
    print("|---|---:|---:|---:|---:|")
    for way, v in ways.items():
        lat, ttft = (" / ".join(f"{v[k][p]:.3f}" for p in ("p50", "p90", "p99")) for k in ("latency", "ttft"))
        print(f"| {way} | {v['tokens_per_s']:,.0f} | {v['tokens_per_s'] / mixed:.2f}x | {lat} | {ttft} |")
    cont, static = ways["staggered, continuous"], ways["staggered, static"]
    print(f"\nstaggered arrivals over {args.stagger_s:g} s, continuous / static: tokens/s "
          f"{cont['tokens_per_s'] / static['tokens_per_s']:.2f}x, latency p50 "
          f"{cont['latency']['p50'] / static['latency']['p50']:.2f}x, first token p50 "
          f"{cont['ttft']['p50'] / static['ttft']['p50']:.2f}x")
    print(f"greedy answers identical to the same request served alone (in every one of {args.rounds} rounds): " +
          ", ".join(f"{way} {k}/{n}" for way, k in report["identical"].items()))
    return report


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

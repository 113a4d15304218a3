"""serve.py: one process serving a base model and its LoRA adapters behind an OpenAI-compatible API.

The deployment of a skills.py run: the frozen base, every adapter of the run and its router live in one process,
and requests for different adapters share one forward pass. A worker thread collects the requests that arrive
within a few milliseconds of each other (--batch-window-ms) and decodes them as one batch, one forward per token for
all rows, each row with its own adapter (lora.MultiLoRALinear gathers each row's A and B: Punica, Chen et al. 2023;
S-LoRA, Sheng et al. 2023) and its own sampling settings; model "auto" lets the router pick the adapter. Every row
computes what its adapter's merged model computes alone (`check_mixed_batch`; bench/bench_lora.py measures the
throughput against one batch per adapter and one request at a time).

The HTTP layer is FastAPI on uvicorn with pydantic request models, as in vLLM's OpenAI-compatible server:
    POST /v1/completions        model, prompt (a string or a list), max_tokens, temperature, top_p, stop, seed, stream
    POST /v1/chat/completions   model, messages [{role, content}] rendered with the model's chat template, the same
    GET  /v1/models             the base, each adapter, and "auto" where the run has a router
With "stream": true the answer comes as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`;
`usage` counts the prompt and completion tokens. A bad request (an unknown model, a prompt longer than the context,
an invalid field) gets a 400 or 404 with OpenAI's error body, and the server goes on serving.

Each choice also names the adapter that served it ("adapter"), which is how a client sees the router's choice.

Run it:
    python skills.py train                        # the adapters and the router to serve, in runs/skills
    python serve.py --run-dir runs/skills         # http://127.0.0.1:8000/v1 (--host 0.0.0.0 to listen beyond)
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "auto", "prompt": "Say something kind about love:\\n", "max_tokens": 60, "stop": "\\n"}'
Any OpenAI client works, e.g. in Python:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="qa", prompt='ROMEO: But soft!\\nJULIET: Ay me!\\nWho said "Ay me"?\\n', stop="\\n")
"""

import asyncio
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

import minigpt
from lora import adapter_rows, build_multi_adapter, generate_rows, read_adapter
from minigpt import GPT, left_pad
from skills import Router, adapter_dirs, load_base, load_router, route
from training import InputError, Runtime, setup_runtime


@dataclass
class Args:
    """Serve a skills.py run (the base, its adapters and router) behind an OpenAI-compatible HTTP API."""

    run_dir: str = "runs/skills"
    """a skills.py run: its adapters/ (one directory per adapter) and, if present, its router/"""
    base: str | None = None
    """the base model; default: the one the adapters were trained on (their adapter_config.json names it)"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda', 'cuda:1'"""
    dtype: str = "auto"
    """'auto' (bfloat16 autocast on CUDA, or on a CPU whose bf16 matmul measures faster), 'bfloat16', 'float32'"""
    host: str = "127.0.0.1"
    """address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)"""
    port: int = 8000
    """port to listen on"""
    max_batch: int = 16
    """most requests decoded together in one mixed batch"""
    batch_window_ms: float = 5.0
    """how long the batcher waits for more requests after the first one"""


# ----------------------------------------------------------------------------------------------------------------
# A mixed batch computes what one merged model per request computes


@torch.no_grad()
def check_mixed_batch(multi: GPT, names: list[str], merged: dict, requests: list[tuple[str, str]], tokenizer,
                      rt: Runtime, max_new_tokens: int = 40) -> dict:
    """Serve `requests` (prompt, adapter name) as one mixed batch, and each alone on its adapter's merged model
    (merged[name], e.g. lora.merged_model); compare the greedy tokens and the next-token logits of the prompts."""
    prompts = [p for p, _ in requests]
    ids = [names.index(a) + 1 for _, a in requests]
    mixed, _ = generate_rows(multi, prompts, ids, tokenizer, rt, max_new_tokens)
    idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=rt.device)
    with adapter_rows(multi, torch.tensor(ids, device=rt.device)):
        logits_mixed = multi(idx, attention_mask=mask)[0][:, -1]
    same, max_diff = 0, 0.0
    for i, (p, a) in enumerate(requests):
        alone, _ = generate_rows(merged[a], [p], [0], tokenizer, rt, max_new_tokens)
        same += alone[0] == mixed[i]
        x = torch.tensor([tokenizer.encode(p)], device=rt.device)
        max_diff = max(max_diff, (merged[a](x)[0][0, -1] - logits_mixed[i]).abs().max().item())
    return {"requests": len(requests), "identical_completions": same, "max_abs_logit_diff": max_diff}


# ----------------------------------------------------------------------------------------------------------------
# The scheduler: jobs in, mixed batches decoded on one worker thread, text pieces out


class RequestError(Exception):
    """A bad request: answered with HTTP `status` and OpenAI's error body; the server keeps serving."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), self.param, self.code)


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


@dataclass
class Job:
    """One prompt, decoded as one row of a mixed batch. The worker thread reports through emit(kind, value):
    ("adapter", name) once the router has chosen, ("text", piece) as text is ready, then ("done", "stop" or
    "length") or ("error", message)."""
    ids: list[int]
    adapter: str  # an adapter's name, 'base', or 'auto' until the router picks
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator
    emit: Callable[[str, object], None]
    text: str = ""  # the text reported so far
    tokens: int = 0  # the tokens generated so far
    cancelled: bool = False  # set when nobody waits for the answer any more (a closed stream)


class CompletionService:
    """Turns prompts into jobs (checking the model name and the context), then decodes them on one worker thread in
    mixed batches: jobs that arrive within `window_ms` of each other share one forward per step, whatever adapters
    they use. `batches` keeps the adapters of the last 100 batches."""

    def __init__(self, model: GPT, names: list[str], tokenizer, router: Router | None, rt: Runtime,
                 max_batch: int = 16, window_ms: float = 5.0):
        self.model, self.names, self.tokenizer, self.router, self.rt = model, names, tokenizer, router, rt
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.batches: deque[list[str]] = deque(maxlen=100)
        self.queue: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def models(self) -> list[str]:
        return ["base", *self.names] + (["auto"] if self.router is not None else [])

    def make_jobs(self, model: str, texts: list[str], max_tokens: int | None, temperature: float, top_p: float,
                  stop: list[str], seed: int | None, emit: Callable[[int], Callable], param: str = "prompt"):
        """One job per text; max_tokens None: up to the end of the context. emit(i) is job i's reporter."""
        if model not in self.models():
            raise RequestError(404, f"the model {model!r} does not exist; available: {self.models()}", "model",
                               "model_not_found")
        if len(texts) > self.max_batch:
            raise RequestError(400, f"at most {self.max_batch} prompts per request", param)
        ctx, jobs = self.model.config.block_size, []
        for i, text in enumerate(texts):
            try:
                ids = self.tokenizer.encode(text)
            except InputError as e:
                raise RequestError(400, f"{param} {i}: {e}", param) from None
            n = ctx - len(ids) if max_tokens is None else max_tokens
            if not ids or n < 1 or len(ids) + n > ctx:
                raise RequestError(400, f"{param} {i} has {len(ids)} tokens; with max_tokens={n} that does not fit "
                                        f"the model's context of {ctx} tokens", "max_tokens")
            g = torch.Generator(self.rt.device).manual_seed(seed + i if seed is not None else
                                                            int.from_bytes(uuid.uuid4().bytes[:6], "big"))
            jobs.append(Job(ids, model, n, temperature, top_p, stop, g, emit(i)))
        return jobs

    def submit(self, jobs: list[Job]):
        for j in jobs:
            self.queue.put(j)

    def close(self):
        self.queue.put(None)
        self.worker.join(timeout=10)

    def _work(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            batch, deadline = [job], time.perf_counter() + self.window
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch answers its requests with an error, never hangs them
                traceback.print_exc()
                for j in batch:
                    j.emit("error", f"{type(e).__name__}: {e}")

    def _sample(self, batch: list[Job]):
        def sample(logits):  # (B, vocab) -> (B,), each row with its own request's settings and generator
            return torch.cat([minigpt.sample_next_token(logits[i:i + 1], j.temperature, None, j.top_p, j.generator)
                              for i, j in enumerate(batch)])
        return sample

    @torch.no_grad()
    def _run(self, batch: list[Job]):
        auto = [j for j in batch if j.adapter == "auto"]
        if auto:
            chosen = route(self.model, self.router, [self.tokenizer.decode(j.ids) for j in auto], self.tokenizer,
                           self.rt.device)
            for j, name in zip(auto, chosen, strict=True):
                j.adapter = name
                j.emit("adapter", name)
        self.batches.append([j.adapter for j in batch])
        idx, mask = left_pad([j.ids for j in batch], device=self.rt.device)
        rows = torch.tensor([0 if j.adapter == "base" else self.names.index(j.adapter) + 1 for j in batch],
                            device=self.rt.device)
        hold = [max((len(s) for s in j.stop), default=1) - 1 for j in batch]  # text held back: a stop may begin there
        eot = self.tokenizer.eot_token  # the end of a text (None: the tokenizer has none)
        done, out = [False] * len(batch), [[] for _ in batch]
        with adapter_rows(self.model, rows), self.rt.autocast():
            steps = self.model.stream(idx, max(j.max_tokens for j in batch), attention_mask=mask,
                                      sample=self._sample(batch))
            for tok in steps:  # (B,): one new token per row, all rows in one forward
                for i, j in enumerate(batch):
                    if done[i]:
                        continue
                    j.tokens += 1
                    ended = eot is not None and int(tok[i]) == eot
                    out[i] += [] if ended else [int(tok[i])]
                    full = self.tokenizer.decode(out[i])
                    cut = min((full.find(s) for s in j.stop if s in full), default=-1)
                    if ended or cut >= 0 or j.tokens >= j.max_tokens or j.cancelled:
                        final = full[:cut] if cut >= 0 else full
                        if final[len(j.text):]:
                            j.emit("text", final[len(j.text):])
                        j.emit("done", "stop" if ended or cut >= 0 else "length")
                        done[i] = True
                    elif len(full) - hold[i] > len(j.text) and not full.endswith("\ufffd"):
                        j.emit("text", full[len(j.text):len(full) - hold[i]])
                        j.text = full[:len(full) - hold[i]]
                if all(done):
                    break


# ----------------------------------------------------------------------------------------------------------------
# The HTTP API: OpenAI's request and response shapes


class StreamOptions(BaseModel):
    include_usage: bool = False
    """send one more chunk before [DONE], with no choices and the request's usage"""


class SamplingRequest(BaseModel):
    """The fields every generation request shares. Unknown fields are ignored (as OpenAI-compatible servers do);
    types are strict: 1.5 is no valid max_tokens, "1" no valid temperature."""
    model_config = ConfigDict(strict=True)

    model: str
    """an adapter's name, 'base' (no adapter) or 'auto' (the router picks)"""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: list[str] | None = Field(None, validate_default=True)  # a string is taken as a list of one
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else [] if v is None else v
        if not (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and s for s in v)):
            raise PydanticCustomError("stop", "must be a string or a list of at most 4 non-empty strings")
        return v


class CompletionRequest(SamplingRequest):
    prompt: list[str]  # a string is taken as a list of one
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v):
        v = [v] if isinstance(v, str) else v
        if not (isinstance(v, list) and v and all(isinstance(p, str) and p for p in v)):
            raise PydanticCustomError("prompt", "must be a non-empty string or a non-empty list of them")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    # max_tokens None: the reply may run to the end of the model's context


def make_app(service: CompletionService) -> FastAPI:
    """The FastAPI application over `service`: the OpenAI routes and OpenAI-style errors."""
    app = FastAPI(title="minillm", summary="a base model and its LoRA adapters, OpenAI-compatible")

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):  # pydantic's verdict on the body: the first problem it found
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"][1:]] if err["type"] != "json_invalid" else []
        where = ".".join(loc) or None
        msg = ("the body must be a JSON object, sent with Content-Type: application/json" if err["loc"] == ("body",)
               else f"{where}: {err['msg']}" if where else f"the body is not valid JSON: {err['msg']}")
        return error_response(400, msg, loc[0] if loc else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # no such route or method
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "minillm"}
                                           for m in service.models()]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await answer(service, req, req.prompt, req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        try:
            text = service.tokenizer.chat([m.model_dump() for m in req.messages])
        except InputError as e:
            raise RequestError(400, str(e), "messages") from None
        return await answer(service, req, [text], req.max_completion_tokens or req.max_tokens, chat=True)

    return app


async def answer(service: CompletionService, req: SamplingRequest, texts: list[str], max_tokens: int | None,
                 chat: bool):
    """Submit one job per text and answer with the whole completion, or stream it (server-sent events)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emitter(i):  # called on the worker thread: hand the event to the event loop
        def emit(kind, value):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))
            except RuntimeError:  # the loop has closed: nobody waits for this answer any more
                pass
        return emit

    jobs = service.make_jobs(req.model, texts, max_tokens, req.temperature, req.top_p, req.stop, req.seed, emitter,
                             "messages" if chat else "prompt")
    service.submit(jobs)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": req.model}

    async def stream_events():
        left = len(jobs)
        try:
            while left:
                i, kind, value = await events.get()
                left -= kind in ("done", "error")
                yield i, kind, value
        finally:
            for j in jobs:
                j.cancelled = True  # a client that went away frees its rows at the next step

    def usage():
        n_prompt, n_new = sum(len(j.ids) for j in jobs), sum(j.tokens for j in jobs)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    if req.stream:
        return StreamingResponse(sse(stream_events(), head, jobs, chat, usage if req.stream_options and
                                     req.stream_options.include_usage else None), media_type="text/event-stream")
    text, finish, adapter = [""] * len(jobs), [None] * len(jobs), [j.adapter for j in jobs]
    async for i, kind, value in stream_events():
        if kind == "error":
            return error_response(500, value, kind="server_error")
        text[i] += value if kind == "text" else ""
        finish[i] = value if kind == "done" else finish[i]
        adapter[i] = value if kind == "adapter" else adapter[i]
    if chat:
        choices = [{"index": 0, "message": {"role": "assistant", "content": text[0]}, "logprobs": None,
                    "finish_reason": finish[0], "adapter": adapter[0]}]
    else:
        choices = [{"index": i, "text": text[i], "logprobs": None, "finish_reason": finish[i], "adapter": adapter[i]}
                   for i in range(len(jobs))]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage()}


async def sse(events, head: dict, jobs: list[Job], chat: bool, usage: Callable | None):
    """OpenAI's streaming format: one `data: {chunk}` event per text piece, a last chunk per choice with its
    finish_reason, the usage chunk if asked for, then `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    adapter = [j.adapter for j in jobs]

    def chunk(i, piece, finish=None, first=False):
        if chat:
            delta = {"role": "assistant", "content": piece} if first else {"content": piece} if piece else {}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": piece, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [{**choice, 'adapter': adapter[i]}]})}\n\n"

    if chat:
        yield chunk(0, "", first=True)
    async for i, kind, value in events:
        if kind == "adapter":
            adapter[i] = value
        elif kind == "text":
            yield chunk(i, value)
        elif kind == "done":
            yield chunk(i, "", value)
        else:
            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
    if usage is not None:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------------------


def load_service(args: Args, rt: Runtime) -> CompletionService:
    """The run's adapters over their base (in NF4 if they were trained on an NF4 base) and its router, if any."""
    run_dir = Path(args.run_dir)
    adapters = adapter_dirs(run_dir)
    configs = {name: read_adapter(path)[1:] for name, path in adapters.items()}  # (PEFT's config, ours)
    bases = {args.base or peft.get("base_model_name_or_path") for peft, _ in configs.values()}
    if len(bases) != 1 or None in bases:
        raise InputError(f"{run_dir}: the adapters name the bases {sorted(map(str, bases))}; give one with --base")
    qlora = {bool(ours.get("qlora")) for _, ours in configs.values()}
    if len(qlora) != 1:
        raise InputError(f"{run_dir}: some adapters were trained on an NF4 base and some were not")
    router_dir = run_dir / "router"
    router = load_router(router_dir) if (router_dir / "router.json").exists() else None
    if router is not None:
        if set(router.names) != set(adapters):
            raise InputError(f"{router_dir}: the router was trained for {router.names}, the adapters are "
                             f"{list(adapters)}")
        adapters = {n: adapters[n] for n in router.names}  # the router's class i is adapter i
    base, tokenizer = load_base(bases.pop(), rt.device)
    multi, names = build_multi_adapter(base, adapters, qlora=qlora.pop())
    return CompletionService(multi, names, tokenizer, router, rt, args.max_batch, args.batch_window_ms)


def main(args: Args):
    """Load the deployment and serve it until interrupted."""
    rt = setup_runtime(args.device, args.dtype)
    service = load_service(args, rt)
    print(f"serving {service.models()} on http://{args.host}:{args.port}/v1 (OpenAI-compatible)")
    try:
        uvicorn.run(make_app(service), host=args.host, port=args.port)
    finally:
        service.close()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (InputError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

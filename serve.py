"""serve.py: one process serving a base model and its LoRA adapters behind an OpenAI-compatible API.

The deployment of a skills.py run: the frozen base, every adapter of the run and its router live in one process,
and requests for different adapters share one forward pass. A worker thread (batching.py) decodes the requests as
one batch, one forward per token for all rows, each row with its own adapter (lora.MultiLoRALinear gathers each
row's A and B: Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023) and its own sampling settings; model "auto"
lets the router pick the adapter. The batch is continuous (Orca's iteration-level scheduling, Yu et al. 2022): a
request that arrives while others decode joins them at the next step, and one that ends leaves at once;
--batching static decodes each batch to its end before starting the next. Every row computes what its adapter's
merged model computes alone (`check_mixed_batch`; bench/bench_lora.py measures the throughput of a mixed batch
against one batch per adapter and one request at a time, bench/bench_serve.py the server under load).

The HTTP layer is FastAPI on uvicorn with pydantic request models, as in vLLM's OpenAI-compatible server:
    POST /v1/completions        model, prompt (a string or a list), max_tokens, temperature, top_p, stop, seed, stream
    POST /v1/chat/completions   model, messages [{role, content}] rendered with the model's chat template, the same
    GET  /v1/models             the base, each adapter, and "auto" where the run has a router
With "stream": true the answer comes as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`;
`usage` counts the prompt and completion tokens. A bad request (an unknown model, a prompt longer than the context,
an invalid field) gets a 400 or 404 with OpenAI's error body, and the server goes on serving.

Each choice also names the adapter that served it ("adapter"), which is how a client sees the router's choice.

What a client cannot do to it (each refusal is OpenAI's error body, naming the field where there is one, and the
server goes on serving):
  - a body over --max-body-bytes: 413, from its Content-Length before a byte of it is read, else once it passes;
  - a request line and headers, or a body, that take over --read-timeout-s to arrive: 408 and the connection closes
    (uvicorn alone waits for them forever, so half-sent requests would pile up);
  - malformed JSON, a field of the wrong type or out of range (seed beyond 64 bits, temperature < 0, max_tokens 0 or
    beyond the context, top_p 0 or > 1), an unknown field, or an OpenAI parameter this server does not implement
    (logprobs, echo, best_of, suffix, logit_bias, presence/frequency_penalty, tools, response_format) at other than
    its do-nothing value: 400;
  - going away mid-answer: its rows stop at the next step, and it costs one log line;
  - more prompts waiting for a row than --max-queue: 503 with Retry-After (the queue never grows without bound).
A temperature below 1e-5 samples greedily (as vLLM does: dividing by it could overflow to inf).
At start-up, a port in use, a truncated adapter or a corrupt router ends the process with one line and exit status 1
(the port is taken first, before the model loads).

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
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h11
import torch
import tyro
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from batching import Job, QueueFull, Scheduler
from gpt import GPT, left_pad
from lora import adapter_rows, build_multi_adapter, generate_rows, read_adapter
from skills import adapter_dirs, load_base, load_router
from training import NON_NEGATIVE, POSITIVE, InputError, Runtime, check_args, run_command, setup_runtime

log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: the server's lines and ours in one format and level


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
    """port to listen on (0: any free port)"""
    batching: Literal["continuous", "static"] = "continuous"
    """'continuous': a request joins the running batch at the next decode step, and leaves it as soon as it ends
    (Orca's iteration-level scheduling); 'static': a batch is decoded until its last request ends before the next
    one starts"""
    max_batch: int = 16
    """most requests decoded together in one mixed batch"""
    batch_window_ms: float = 5.0
    """how long an idle server waits for more requests after the first one (to prefill them together)"""
    max_queue: int = 256
    """most prompts waiting for a row of the batch; beyond, a request is refused with 503 and Retry-After"""
    max_body_bytes: int = 1 << 20
    """the largest request body accepted (larger: 413)"""
    read_timeout_s: float = 10.0
    """a request's line and headers must arrive within this many seconds of the connection (or of its previous
    answer), and its body within as many again (else 408 and the connection closes)"""


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
# The service: requests checked and turned into jobs for the scheduler (batching.py)


class RequestError(Exception):
    """A bad request: answered with HTTP `status` and OpenAI's error body; the server keeps serving."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return error_response(self.status, str(self), self.param, self.code, kind, self.headers)


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers)


class CompletionService(Scheduler):
    """Turns prompts into jobs (checking the model name and the context) for the scheduler, which decodes them on
    one worker thread in mixed batches, continuous or static (batching.Scheduler)."""

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
            # below 1e-5 a draw is the argmax in all but name (vLLM's threshold), and logits / temperature could
            # overflow to inf and make the whole batch's softmax nan: sample greedily
            jobs.append(Job(ids, model, n, temperature if temperature >= 1e-5 else 0.0, top_p, stop, g, emit(i)))
        return jobs

    def submit(self, jobs: list[Job]):
        """Queue the jobs; a full queue is a 503 that asks the client to retry in a second."""
        try:
            super().submit(jobs)
        except QueueFull as e:
            raise RequestError(503, f"the server is busy: {e}; retry later", code="server_busy",
                               headers={"Retry-After": "1"}) from None


# ----------------------------------------------------------------------------------------------------------------
# The HTTP API: OpenAI's request and response shapes


class StreamOptions(BaseModel):
    include_usage: bool = False
    """send one more chunk before [DONE], with no choices and the request's usage"""


# OpenAI parameters this server does not implement, each with the value that asks for nothing. At that value (or null)
# the parameter is accepted, as some clients send them unasked; at any other it is refused with a 400 naming it,
# never silently ignored.
NOT_SUPPORTED = {"logprobs": False, "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": "", "logit_bias": {},
                 "presence_penalty": 0, "frequency_penalty": 0, "tools": [], "tool_choice": "none", "functions": [],
                 "function_call": "none", "response_format": {"type": "text"}}


def asks_nothing(value, no_op) -> bool:
    """Is `value` null or the do-nothing value `no_op`? 0 and 0.0 are one number, but 0 is not False (logprobs:
    0 asks for the chosen tokens' log-probabilities, false for none)."""
    return value is None or (value == no_op and isinstance(value, bool) == isinstance(no_op, bool))


class SamplingRequest(BaseModel):
    """The fields every generation request shares. An unknown field is refused (as OpenAI's API does), and so is an
    OpenAI parameter this server does not implement (NOT_SUPPORTED); types are strict: 1.5 is no valid max_tokens,
    "1" no valid temperature."""
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    """an adapter's name, 'base' (no adapter) or 'auto' (the router picks)"""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: list[str] | None = Field(None, validate_default=True)  # a string is taken as a list of one
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)  # a 64-bit integer, as torch's generators take
    user: str | None = None
    """the end user's id, for the caller's own records: accepted, not used"""

    @model_validator(mode="before")
    @classmethod
    def _drop_no_ops(cls, data):  # an unsupported parameter that asks for nothing is dropped; any other value stays
        if isinstance(data, dict):  # and is refused as an extra field, named in the 400
            data = {k: v for k, v in data.items() if not (k in NOT_SUPPORTED and asks_nothing(v, NOT_SUPPORTED[k]))}
        return data

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


class RequestLimits:
    """ASGI middleware that reads each request's body before the app sees it, within bounds: at most `max_bytes` (a
    larger Content-Length is refused before a byte of the body is read), all of it within `timeout_s` seconds of the
    request's head. Past either bound the client gets a 413 or a 408 and the connection closes. Without it, a client
    announcing 50 GB would have them read into memory, and one that never sends the body it announced would hold
    its request open forever."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")  # h11 has checked: one non-negative integer
        refused = self.too_large() if declared is not None and int(declared) > self.max_bytes else None
        chunks, size, loop = [], 0, asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while refused is None:
            try:  # (asyncio.timeout would read better, but it needs Python 3.11)
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                refused = error_response(408, f"the request's body did not arrive within {self.timeout_s:g} s",
                                         code="request_timeout", headers={"connection": "close"})
                break
            if message["type"] == "http.disconnect":
                return  # the client left before its request was whole: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                refused = self.too_large()
            elif not message.get("more_body", False):
                break
        if refused is not None:
            return await refused(scope, receive, send)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the whole body at once, then what the server says next (the client went away)
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    def too_large(self) -> JSONResponse:  # "connection: close": the rest of the body is never read
        return error_response(413, f"the request's body is over the limit of {self.max_bytes} bytes",
                              code="request_too_large", headers={"connection": "close"})


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline on each request's line and headers: `head_timeout_s` seconds
    from the connection's start, or from its previous answer. uvicorn alone waits for them forever (its keep-alive
    timer stops at the first byte), so clients that send half a request (slowloris) would pile up until the process
    runs out of file descriptors. A client that sent part of a head gets a 408; one that sent nothing is closed."""

    head_timeout_s: float = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_overdue)

    def on_response_complete(self):  # the next request's head has as long again
        super().on_response_complete()
        self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_overdue)

    def connection_lost(self, exc):
        self.head_timer.cancel()
        super().connection_lost(exc)

    def head_overdue(self):
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return  # the head came in time (RequestLimits bounds its body), or the connection is closing anyway
        if self.conn.trailing_data[0]:  # bytes of a head that never ended: say why the connection closes
            body = json.dumps({"error": {"message": f"the request's line and headers did not arrive within "
                                                   f"{self.head_timeout_s:g} s", "type": "invalid_request_error",
                                         "param": None, "code": "request_timeout"}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            log.info("%s - no whole request head within %g s: 408", format_client(self.client), self.head_timeout_s)
        self.transport.close()


def format_client(client) -> str:
    """'host:port' of an ASGI client address (None: a Unix socket)."""
    return f"{client[0]}:{client[1]}" if client else "a client"


def make_app(service: CompletionService, max_body_bytes: int, read_timeout_s: float) -> FastAPI:
    """The FastAPI application over `service`: the OpenAI routes and OpenAI-style errors, behind RequestLimits."""
    app = FastAPI(title="minillm", summary="a base model and its LoRA adapters, OpenAI-compatible")
    app.add_middleware(RequestLimits, max_bytes=max_body_bytes, timeout_s=read_timeout_s)

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):  # pydantic's verdict on the body: the first problem it found
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"][1:]] if err["type"] != "json_invalid" else []
        where = ".".join(loc) or None
        if err["type"] == "extra_forbidden":  # a field SamplingRequest does not declare
            msg = (f"{where}: this server does not implement this parameter; leave it out" if loc[0] in NOT_SUPPORTED
                   else f"{where}: unrecognized request argument")
        else:
            msg = ("the body must be a JSON object, sent with Content-Type: application/json"
                   if err["loc"] == ("body",) else f"{where}: {err['msg']}" if where
                   else f"the body is not valid JSON: {err['msg']}")
        return error_response(400, msg, loc[0] if loc else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # no such route or method, or a body json cannot parse
        cause = e.__cause__  # set where FastAPI's json.loads failed: "There was an error parsing the body"
        if cause is not None and e.status_code == 400:
            reason = "nested too deeply" if isinstance(cause, RecursionError) else f"{type(cause).__name__}: {cause}"
            return error_response(400, f"the body is not valid JSON: {reason}")
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "minillm"}
                                           for m in service.models()]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await answer(service, req, req.prompt, req.max_tokens, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        try:
            text = service.tokenizer.chat([m.model_dump() for m in req.messages])
        except InputError as e:
            raise RequestError(400, str(e), "messages") from None
        return await answer(service, req, [text], req.max_completion_tokens or req.max_tokens, True, request)

    return app


async def answer(service: CompletionService, req: SamplingRequest, texts: list[str], max_tokens: int | None,
                 chat: bool, request: Request):
    """Submit one job per text and answer with the whole completion, or stream it (server-sent events). A client
    that goes away before the end frees its rows at the next step, and its going costs one log line."""
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

    def went_away():
        for j in jobs:
            j.cancelled = True
        log.info("%s - went away; %s cancelled after %d tokens", format_client(request.client), head["id"],
                 sum(j.tokens for j in jobs))

    async def stream_events():
        left = len(jobs)
        try:
            while left:
                i, kind, value = await events.get()
                left -= kind in ("done", "error")
                yield i, kind, value
        finally:
            for j in jobs:
                j.cancelled = True  # an answer cut short (an error, a client gone) frees its rows at the next step

    def usage():
        n_prompt, n_new = sum(len(j.ids) for j in jobs), sum(j.tokens for j in jobs)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    if req.stream:  # Starlette watches for the client's going and cancels the stream; sse reports it
        return StreamingResponse(sse(stream_events(), head, jobs, chat, usage if req.stream_options and
                                     req.stream_options.include_usage else None, went_away),
                                 media_type="text/event-stream")

    async def whole():
        text, finish, adapter = [""] * len(jobs), [None] * len(jobs), [j.adapter for j in jobs]
        async with contextlib.aclosing(stream_events()) as stream:
            async for i, kind, value in stream:
                if kind == "error":
                    return error_response(500, value, kind="server_error")
                text[i] += value if kind == "text" else ""
                finish[i] = value if kind == "done" else finish[i]
                adapter[i] = value if kind == "adapter" else adapter[i]
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": text[0]}, "logprobs": None,
                        "finish_reason": finish[0], "adapter": adapter[0]}]
        else:
            choices = [{"index": i, "text": text[i], "logprobs": None, "finish_reason": finish[i],
                        "adapter": adapter[i]} for i in range(len(jobs))]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage()}

    async def disconnected():  # the body has been read: what the server says next is that the client went away
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, gone = asyncio.ensure_future(whole()), asyncio.ensure_future(disconnected())
    await asyncio.wait([result, gone], return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not result.done():
        result.cancel()
        went_away()
        return error_response(499, "the client closed the connection")  # nginx's code; nobody reads it
    return result.result()


async def sse(events, head: dict, jobs: list[Job], chat: bool, usage: Callable | None, went_away: Callable):
    """OpenAI's streaming format: one `data: {chunk}` event per text piece, a last chunk per choice with its
    finish_reason, the usage chunk if asked for, then `data: [DONE]`. Cut short, it calls went_away()."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    adapter = [j.adapter for j in jobs]

    def chunk(i, piece, finish=None, first=False):
        if chat:
            delta = {"role": "assistant", "content": piece} if first else {"content": piece} if piece else {}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": piece, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [{**choice, 'adapter': adapter[i]}]})}\n\n"

    try:
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
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: Starlette cancelled or closed the stream
        went_away()
        raise


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
    if router is not None and router.head.in_features != base.config.n_embd:
        raise InputError(f"{router_dir}: the router reads {router.head.in_features} features, the base's hidden "
                         f"states have {base.config.n_embd}")
    multi, names = build_multi_adapter(base, adapters, qlora=qlora.pop())
    return CompletionService(multi, names, tokenizer, router, rt, args.max_batch, args.batch_window_ms,
                             args.max_queue, args.batching)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or an InputError naming why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as e:  # no such host, a port beyond 65535
        raise InputError(f"cannot listen on {host}:{port}: {e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:  # most often: another server has the port
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def server_config(service: CompletionService, args: Args, **options) -> uvicorn.Config:
    """uvicorn's configuration of the app over `service`, with the request limits of `args`; options: more of
    uvicorn.Config's (log_level, access_log, ...)."""
    protocol = type("H11Protocol", (TimedH11Protocol,), {"head_timeout_s": args.read_timeout_s})  # this server's
    return uvicorn.Config(make_app(service, args.max_body_bytes, args.read_timeout_s), http=protocol, **options)


def main(args: Args):
    """Load the deployment and serve it until interrupted."""
    check_args(args, {"max_batch": POSITIVE, "batch_window_ms": NON_NEGATIVE, "max_queue": POSITIVE,
                      "max_body_bytes": POSITIVE,
                      "read_timeout_s": POSITIVE, "port": (lambda v: 0 <= v <= 65535, "0 to 65535 (0: any free port)")})
    sock = listen(args.host, args.port)  # first: a port in use fails in one line, before the model loads
    try:
        rt = setup_runtime(args.device, args.dtype)
        service = load_service(args, rt)
        print(f"serving {service.models()} on http://{args.host}:{sock.getsockname()[1]}/v1 (OpenAI-compatible)")
        try:
            uvicorn.Server(server_config(service, args)).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C it caught
            pass
        finally:
            service.close()
    finally:
        sock.close()


if __name__ == "__main__":
    run_command(main, lambda: tyro.cli(Args))

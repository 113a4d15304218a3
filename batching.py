"""batching.py: the decoding worker of serve.py, with continuous (iteration-level) batching.

A static batch is formed once and decoded until its last row ends: a request that arrives meanwhile waits for the
whole batch, and a finished row's slot stays idle. Iteration-level scheduling (Orca: Yu et al. 2022, "Orca: a
distributed serving system for transformer-based generative models", OSDI; what vLLM does) decides again before
every decode step: a waiting request joins the running batch at the next step, and a finished one leaves at once.

The running batch is one left-padded KV cache and its attention mask (B, T): each new row's prompt is prefilled
alone (or with the other newcomers), then its cache is merged in by left-padding whichever side is shorter and
concatenating along the batch dimension. Padded positions are masked out and positions are counted from each row's
first real token (gpt.GPT.hidden_states), so every row computes exactly what it computes alone. Rows may use
different LoRA adapters in one forward (lora.MultiLoRALinear; Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023).
A row that ends is dropped from the cache, and columns that are padding in every remaining row are trimmed, so the
cache is never longer than its longest row. Merging and dropping copy the cache; vLLM's PagedAttention (Kwon et al.
2023) keeps keys and values in fixed-size blocks instead, so that rows come and go without copies.

A newcomer's prefill delays the running rows' next token by one forward over its prompt (Sarathi-Serve, Agrawal et
al. 2024, splits long prompts into chunks to bound that delay).
"""

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

import gpt
from gpt import GPT, KVCache, left_pad
from lora import adapter_rows
from skills import Router, route

GROW = 32  # positions of room a cache gets when it is (re)allocated: decode steps between copies


@dataclass
class Job:
    """One prompt, decoded as one row of the batch. The worker reports through emit(kind, value): ("adapter",
    name) once the router has chosen, ("text", piece) as text is ready, then ("done", "stop" or "length") or
    ("error", message)."""
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
    ended: bool = False  # "done" or "error" has been reported
    arrived: float = 0.0  # time.perf_counter() when it was submitted
    out: list[int] = field(default_factory=list)  # the tokens generated, without the end of text

    def advance(self, token: int, eot: int | None, decode: Callable[[list[int]], str]) -> bool:
        """Take the next token; report the text that can no longer change, and "done" once the job ends (the end of
        text, a stop string, max_tokens, or cancelled). Text that a stop string may begin in is held back, and so
        is a character whose bytes have not all arrived. Returns whether the job has ended."""
        self.tokens += 1
        ended = eot is not None and token == eot
        self.out += [] if ended else [token]
        full = decode(self.out)
        cut = min((full.find(s) for s in self.stop if s in full), default=-1)
        if ended or cut >= 0 or self.tokens >= self.max_tokens or self.cancelled:
            final = full[:cut] if cut >= 0 else full
            if final[len(self.text):]:
                self.emit("text", final[len(self.text):])
            self.emit("done", "stop" if ended or cut >= 0 else "length")
            self.ended = True
            return True
        hold = max((len(s) for s in self.stop), default=1) - 1
        if len(full) - hold > len(self.text) and not full.endswith("\ufffd"):
            self.emit("text", full[len(self.text):len(full) - hold])
            self.text = full[:len(full) - hold]
        return False


# ----------------------------------------------------------------------------------------------------------------
# A batch's KV cache: left-padded rows that join, leave and shrink


def merge_caches(parts: list[tuple[KVCache, torch.Tensor]], room: int = GROW) -> tuple[KVCache, torch.Tensor]:
    """One batch of the rows of every (cache, attention_mask (B_i, cache.len)) part, the shorter parts left-padded
    with zero keys and values (masked, so they never count) to the longest; the new cache has `room` free positions
    after its last. One part: the same rows with `room` free positions (a cache that has run out of room)."""
    length = max(c.len for c, _ in parts)
    first = parts[0][0]
    merged = KVCache(len(first.k), length + room)
    merged.len = length
    for layer in range(len(first.k)):
        for cache_side, merged_side in ((lambda c: c.k, merged.k), (lambda c: c.v, merged.v)):
            x = cache_side(first)[layer]
            out = x.new_zeros(sum(m.size(0) for _, m in parts), x.size(1), length + room, x.size(3))
            b = 0
            for c, m in parts:
                out[b:b + m.size(0), :, length - c.len:length] = cache_side(c)[layer][:, :, :c.len]
                b += m.size(0)
            merged_side[layer] = out
    mask = torch.cat([F.pad(m, (length - c.len, 0)) for c, m in parts])
    return merged, mask


def select_rows(cache: KVCache, mask: torch.Tensor, rows: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
    """The batch of only `rows` (indices, in that order)."""
    kept = KVCache(len(cache.k), cache.max_len)
    kept.len = cache.len
    kept.k = [k.index_select(0, rows) for k in cache.k]
    kept.v = [v.index_select(0, rows) for v in cache.v]
    return kept, mask.index_select(0, rows)


def trim_padding(cache: KVCache, mask: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
    """The batch without its first columns that are padding in every row (left when the rows that needed them
    left): views, no copy."""
    start = int(mask.any(0).int().argmax())  # the first column some row uses
    if start == 0:
        return cache, mask
    trimmed = KVCache(len(cache.k), cache.max_len - start)
    trimmed.len = cache.len - start
    trimmed.k = [k[:, :, start:] for k in cache.k]
    trimmed.v = [v[:, :, start:] for v in cache.v]
    return trimmed, mask[:, start:]


# ----------------------------------------------------------------------------------------------------------------
# The running batch


class RunningBatch:
    """The rows being decoded: their jobs, adapters (B,) (0: the bare base, i: adapter names[i - 1]), the token
    each drew last and has not yet fed to the model (B,), and their one left-padded KV cache with its attention
    mask (B, cache.len). join() prefills newcomers and merges them in; step() decodes one token for every row.
    Both report each row's new token through its job and drop the rows that ended at once."""

    def __init__(self, model: GPT, names: list[str], tokenizer, rt):
        self.model, self.names, self.tokenizer, self.rt = model, names, tokenizer, rt
        self.jobs: list[Job] = []
        self.cache: KVCache | None = None
        self.mask = self.adapters = self.last = None
        # the output projection as GPT.stream applies it: a contiguous (C, vocab) copy multiplies ~2x faster on
        # CPU, cast once to the autocast dtype (which would otherwise cast it at every step)
        head = model.lm_head.weight.t()
        head = head.contiguous() if rt.device.type == "cpu" else head
        self.head = head.to(rt.dtype) if rt.dtype != torch.float32 else head

    def __len__(self) -> int:
        return len(self.jobs)

    @torch.no_grad()
    def join(self, jobs: list[Job]):
        """Prefill the newcomers' prompts (left-padded together, each row with its adapter), draw each one's first
        token, and merge their cache into the batch's."""
        idx, mask = left_pad([j.ids for j in jobs], device=self.rt.device)
        adapters = torch.tensor([0 if j.adapter == "base" else self.names.index(j.adapter) + 1 for j in jobs],
                                device=self.rt.device)
        cache = KVCache(self.model.config.n_layer, idx.size(1) + GROW)
        tokens = self._forward(idx, mask, cache, adapters, jobs)
        if self.jobs:
            cache, mask = merge_caches([(self.cache, self.mask), (cache, mask)])
            adapters, tokens = torch.cat([self.adapters, adapters]), torch.cat([self.last, tokens])
        self.jobs, self.cache, self.mask, self.adapters, self.last = self.jobs + jobs, cache, mask, adapters, tokens
        self._report(range(len(self.jobs) - len(jobs), len(self.jobs)))

    @torch.no_grad()
    def step(self):
        """One forward for every row, each fed the token it drew last: each draws its next token."""
        if self.cache.len == self.cache.max_len:
            self.cache, self.mask = merge_caches([(self.cache, self.mask)])
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.jobs), 1)], dim=1)
        self.last = self._forward(self.last[:, None], mask, self.cache, self.adapters, self.jobs)
        self.mask = mask
        self._report(range(len(self.jobs)))

    def _forward(self, idx, mask, cache: KVCache, adapters, jobs: list[Job]) -> torch.Tensor:
        """The next token (B,) of each row of idx (B, T) after the cache: greedy rows by one argmax, the others
        drawn one by one with their own temperature, top_p and generator."""
        with adapter_rows(self.model, adapters), self.rt.autocast():
            logits = (self.model.hidden_states(idx, mask, cache)[:, -1] @ self.head).float()  # (B, vocab)
        tokens = logits.argmax(dim=-1)
        for i, j in enumerate(jobs):
            if j.temperature > 0:
                tokens[i] = gpt.sample_next_token(logits[i:i + 1], j.temperature, None, j.top_p, j.generator)[0]
        return tokens

    def _report(self, rows: range):
        """Hand rows' new tokens to their jobs; drop the rows whose jobs ended, and the padding only they used."""
        eot, tokens = self.tokenizer.eot_token, self.last.tolist()
        ended = {i for i in rows if self.jobs[i].advance(tokens[i], eot, self.tokenizer.decode)}
        if not ended:
            return
        keep = [i for i in range(len(self.jobs)) if i not in ended]
        self.jobs = [self.jobs[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.adapters = self.last = None
            return
        rows_kept = torch.tensor(keep, device=self.rt.device)
        self.cache, self.mask = trim_padding(*select_rows(self.cache, self.mask, rows_kept))
        self.adapters, self.last = self.adapters[rows_kept], self.last[rows_kept]


# ----------------------------------------------------------------------------------------------------------------
# The scheduler: jobs in, one worker thread, text pieces out


class QueueFull(Exception):
    """The waiting queue has no room for the jobs: the server is busy (serve.py answers 503)."""


class Scheduler:
    """Decodes submitted jobs on one worker thread, whatever adapters they use. An idle worker waits up to `window`
    seconds after a job arrives for company (jobs that arrive together are prefilled in one forward), then:
      - mode 'continuous' (Orca's iteration-level scheduling): before every decode step, waiting jobs join the
        running batch, up to max_batch rows;
      - mode 'static' (request-level scheduling): a batch is formed when the worker is idle and nobody joins it
        until its last row has ended.
    In both, a row leaves the batch as soon as it ends, and its "done" is reported at once. At most `max_queue` jobs
    wait for a row; submit() refuses more (QueueFull). model "auto" asks the router, at admission. `batches` keeps
    the adapters of the running batch after each admission (the last 100). window and mode may be changed while
    it runs."""

    def __init__(self, model: GPT, names: list[str], tokenizer, router: Router | None, rt, max_batch: int = 16,
                 window_ms: float = 5.0, max_queue: int = 256, mode: Literal["continuous", "static"] = "continuous"):
        self.model, self.names, self.tokenizer, self.router, self.rt = model, names, tokenizer, router, rt
        self.max_batch, self.window, self.max_queue, self.mode = max_batch, window_ms / 1000, max_queue, mode
        self.batches: deque[list[str]] = deque(maxlen=100)
        self.waiting: deque[Job] = deque()
        self.wakeup = threading.Condition()
        self.closing = False
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def submit(self, jobs: list[Job]):
        """Queue the jobs, all or none: QueueFull if they do not fit in the waiting queue."""
        with self.wakeup:
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} prompts are waiting for a row, at most {self.max_queue} may")
            now = time.perf_counter()
            for j in jobs:
                j.arrived = now
            self.waiting.extend(jobs)
            self.wakeup.notify()

    def close(self):
        """Stop the worker; jobs still waiting or decoding get an error."""
        with self.wakeup:
            self.closing = True
            self.wakeup.notify()
        self.worker.join(timeout=10)

    def _admit(self, running: int) -> list[Job] | None:
        """The waiting jobs that join now (None: closing). Blocks while nothing runs and nothing waits."""
        with self.wakeup:
            if not running:
                while not self.waiting and not self.closing:
                    self.wakeup.wait()
                while (not self.closing and len(self.waiting) < self.max_batch
                       and (left := self.waiting[0].arrived + self.window - time.perf_counter()) > 0):
                    self.wakeup.wait(left)
            if self.closing:
                return None
            if running and self.mode == "static":
                return []
            return [self.waiting.popleft() for _ in range(min(self.max_batch - running, len(self.waiting)))]

    def _work(self):
        batch = RunningBatch(self.model, self.names, self.tokenizer, self.rt)
        while (jobs := self._admit(len(batch))) is not None:
            try:
                jobs = [j for j in jobs if not j.cancelled]  # gone while waiting: nothing to decode
                if jobs:
                    self._route(jobs)
                    self.batches.append([j.adapter for j in batch.jobs + jobs])
                    batch.join(jobs)
                if len(batch):
                    batch.step()
            except Exception as e:  # noqa: BLE001 - a failed step answers its requests with an error, never hangs them
                traceback.print_exc()
                self._fail(batch.jobs + jobs, f"{type(e).__name__}: {e}")
                batch = RunningBatch(self.model, self.names, self.tokenizer, self.rt)
        with self.wakeup:
            self._fail(batch.jobs + list(self.waiting), "the server is shutting down")
            self.waiting.clear()

    @staticmethod
    def _fail(jobs: list[Job], message: str):
        """Report an error to each job that has not ended (once: a list may name a job twice)."""
        for j in jobs:
            if not j.ended:
                j.emit("error", message)
                j.ended = True

    def _route(self, jobs: list[Job]):
        """Jobs for model "auto" get the adapter the router picks for their prompt."""
        auto = [j for j in jobs if j.adapter == "auto"]
        if auto:
            chosen = route(self.model, self.router, [self.tokenizer.decode(j.ids) for j in auto], self.tokenizer,
                           self.rt.device)
            for j, name in zip(auto, chosen, strict=True):
                j.adapter = name
                j.emit("adapter", name)

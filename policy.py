"""policy.py: what every post-training stage does with a policy, in one place.

A policy is a causal language model that answers prompts in a chat template. sft.py trains one from a base model;
reward_model.py samples it to make preference pairs and starts its backbone from it; ppo_rlhf.py and dpo.py train it
further against a frozen copy of it, the reference; pipeline.py judges every one of them the same way. What they all
do with a policy lives here, and each algorithm keeps its own loss, data shaping and loop in its own file:

- load it, with an end-of-text token so that a response can end (`load_policy`), put LoRA adapters on it
  (`add_lora`), save it as a plain GPT-2 directory (`save_policy`) and resume a run that saved it (`resume_policy`);
- render the task's prompts in its chat template (`task_prompts`, `as_prompt`, through the tokenizer's `chat`, so
  that a chat model's tokenizer with a template of its own drops in), encode prompt + response examples
  (`encode_example`, `padded_batch`) and batches of prompts (`encode_prompts`);
- sample responses in batches with left-padded, KV-cached generation (`generate_responses`);
- log-probabilities of whole responses (`sequence_logps`) and the KL to a reference (`sequence_kl`);
- judge samples: the task's gold reward, their KL to a reference, their length (`evaluate_policy`).

Nothing here runs on its own. The stages that use it, in order:
    python sft.py
    python reward_model.py pairs
    python reward_model.py train
    python ppo_rlhf.py
    python dpo.py
or all of them at once: `python pipeline.py run`.
"""

import copy
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import alignment_task
import chat_task
from gpt import left_pad, load_pretrained
from lora import apply_lora, load_adapter, merge_and_unload, save_adapter
from tokenization import CharTokenizer
from training import InputError, load_checkpoint, read_json, read_torch, save_checkpoint, seeded

# ----------------------------------------------------------------------------------------------------------------
# Loading, LoRA, saving, resuming


def load_policy(init_from: str, dropout: float = 0.0, add_eot: bool = True):
    """(GPT, tokenizer) from a run's checkpoint directory or a Hugging Face GPT-2 (hub name or directory), with a
    tokenizer that has an end-of-text token, the token that ends every response. GPT-2's BPE has <|endoftext|>; a
    char-level base gains one (a new embedding row, gpt.GPT.resize_vocab), or, with add_eot=False (a policy
    that must already have learned to end its responses, as PPO's), lacking one is an error."""
    model, tokenizer = load_pretrained(init_from, dropout=dropout)
    if tokenizer.eot_token is None:
        if not add_eot:
            raise InputError(f"{init_from}: its tokenizer has no end-of-text token, so its responses cannot end; "
                             "fine-tune it with sft.py first")
        tokenizer = CharTokenizer(tokenizer.chars, eot=True)
        model.resize_vocab(tokenizer.vocab_size)
    return model, tokenizer


def add_lora(model, rank: int, alpha: float | None = None, qlora: bool = False, seed: int = 0):
    """LoRA adapters of this rank (Hu et al. 2021) on the attention and MLP projections, every other weight frozen;
    with qlora the frozen base weights are stored in 4-bit NF4 (QLoRA, Dettmers et al. 2023). The layers live in
    lora.py. The adapters' random initialisation is a function of the seed, as every draw of a run. Returns lora's
    summary of trainable and total parameters, which prints as one line."""
    torch.manual_seed(seed)
    return apply_lora(model, rank, alpha, qlora=qlora)


def save_policy(run_dir: Path, model, optimizer, step: int, meta: dict, lora: bool = False):
    """A checkpoint whose weights are a plain GPT-2 (what the next stages and transformers load). With LoRA these are
    the merged weights of a copy; the adapter itself goes to adapter/ (PEFT's layout), from which --resume goes on."""
    if not lora:
        return save_checkpoint(run_dir, model, optimizer, step, meta)
    merged = merge_and_unload(copy.deepcopy(model))
    save_checkpoint(run_dir, merged, optimizer, step, meta, extra=lambda d: save_adapter(model, d / "adapter", meta))


def resume_policy(run_dir: Path, model, optimizer, lora: bool = False) -> dict:
    """Load <run_dir>/latest, as save_policy wrote it, into the model and the optimizer: every weight, or with LoRA
    the adapter alone (on a model that has its LoRA layers already; the base stays the one the run started from).
    Returns the run's metadata, with the step reached."""
    if not lora:
        return load_checkpoint(run_dir, model, optimizer)
    ckpt = run_dir / "latest"
    if not (ckpt / "adapter").is_dir():
        raise InputError(f"--resume: no LoRA checkpoint in {run_dir} (expected {ckpt}/adapter/)")
    load_adapter(model, ckpt / "adapter")
    optimizer.load_state_dict(read_torch(ckpt / "train_state.pt")["optimizer"])
    return read_json(ckpt / "run.json", "a run's metadata")


@contextmanager
def eval_mode(*models):
    """Run the block with the models in eval mode (no dropout), then put each back in the mode it was in."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and examples in the policy's chat template


TASKS = ("plays", "chat")


class Task:
    """The task a policy is aligned on: its prompts, rendered in the policy's chat template, and its gold judge.

    'plays' is alignment_task.py (Shakespeare instructions for the character models this project trains; the judge
    reads the response alone); 'chat' is chat_task.py (provocations, harmful and benign requests for a real chat
    model; the judge needs each prompt's family and expected answer). A chat prompt is a formatted string like any
    other, so the Task remembers the record chat_task made of each prompt it rendered, and the JSONL files of the
    stages carry those records (`record`, `remember`): a prompt the Task never saw is refused, not judged wrongly."""

    def __init__(self, name: str = "plays"):
        if name not in TASKS:
            raise InputError(f"--task {name!r}: expected one of {TASKS}")
        self.name, self.records = name, {}

    def prompts(self, tokenizer, n: int, split: str = "test", seed: int = 0) -> list[str]:
        """n prompts of the task's split (a fixed draw for a given split and seed), each one user turn in the
        tokenizer's chat template, ending where the response begins."""
        if self.name == "plays":
            return [r["prompt"] for r in alignment_task.make_instructions(n, split, seed, tokenizer)]
        rows = [{"prompt": alignment_task.format_prompt(r["text"], tokenizer), **r}
                for r in chat_task.make_prompts(n, split, seed)]
        self.remember(rows)
        return [r["prompt"] for r in rows]

    def remember(self, rows: list[dict]):
        """Learn the chat records that JSONL rows carry (the fields of `record`); nothing for 'plays'."""
        if self.name == "chat":
            self.records.update({r["prompt"]: {k: r[k] for k in chat_task.RECORD} for r in rows
                                 if all(k in r for k in chat_task.RECORD)})

    def record(self, prompt: str) -> dict:
        """What the judge knows of a prompt beyond its text: {} for 'plays', chat_task's record for 'chat'."""
        if self.name == "plays":
            return {}
        if prompt not in self.records:
            raise InputError(f"not a prompt of the chat task (or a file without its records): {prompt[-80:]!r}")
        return self.records[prompt]

    def gold_rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.name == "plays":
            return alignment_task.gold_rewards(prompts, responses)
        return [chat_task.gold_reward(self.record(p), r) for p, r in zip(prompts, responses, strict=True)]

    def deciding_term(self, prompt: str, chosen: str, rejected: str) -> str:
        """The gold judge's term that decides a pair (alignment_task.deciding_terms, chat_task.deciding_term)."""
        if self.name == "plays":
            return alignment_task.deciding_terms(chosen, rejected)
        return chat_task.deciding_term(self.record(prompt), chosen, rejected)

    def summary(self, prompts: list[str], responses: list[str]) -> dict:
        """The chat judge's rates (chat_task.judge_summary: toxic replies, harmful compliance, over-refusal,
        correctness, words, loops, each term); {} for 'plays'."""
        if self.name == "plays":
            return {}
        return chat_task.judge_summary([self.record(p) for p in prompts], responses)


def task_prompts(tokenizer, n: int, split: str = "test", seed: int = 0) -> list[str]:
    """n prompts of the alignment task ('plays', the default Task)."""
    return Task("plays").prompts(tokenizer, n, split, seed)


def as_prompt(tokenizer, text: str) -> str:
    """text as a prompt: itself if it is one already (it ends with what the chat template appends to open the
    assistant's turn, "\\n\\nAssistant:" in the hh-rlhf layout), else an instruction, rendered as one user turn."""
    turn = [{"role": "user", "content": text}]
    rendered = tokenizer.chat(turn)  # = alignment_task.format_prompt(text, tokenizer)
    opening = rendered[len(tokenizer.chat(turn, add_generation_prompt=False)):]
    return text if text.endswith(opening) else rendered


def encode_example(tokenizer, prompt: str, response: str, block_size: int,
                   allow_empty: bool = False) -> tuple[list[int], int]:
    """(ids, n_prompt): ids = tokens(prompt) + tokens(response) + [end of text], the layout a policy reads and writes
    (the prompt ends where the chat template opens the response; the end token closes it); a loss or a log-probability
    counts ids[n_prompt:] only. A model reads ids[:-1], so ids may hold block_size + 1 tokens; a longer response is
    cut (and loses its end). An empty response is an error in instruction data; allow_empty (preference pairs) keeps
    it as the end token alone."""
    if not response.strip() and not allow_empty:
        raise InputError("the response is empty")
    p = tokenizer.encode(prompt)
    if len(p) >= block_size:
        raise InputError(f"the prompt has {len(p)} tokens, the model's context is {block_size}: no room for a response")
    ids = p + tokenizer.encode(response) + [tokenizer.eot_token]
    return ids[: block_size + 1], len(p)


def padded_batch(examples: list[tuple[list[int], int]], pad_id: int, device="cpu"):
    """(x, y), one example (ids, n_prompt) per row, right-padded. y[b, t] = ids[t + 1] for response tokens (and the
    end token), -100 elsewhere (prompt and padding). Right padding needs no attention mask: causal attention never
    looks right of a real token, so each row's logits are what it gets alone."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids)
        x[b, : len(ids) - 1] = t[:-1]
        y[b, n_prompt - 1: len(ids) - 1] = t[n_prompt:]  # position n_prompt-1 predicts the first response token
    return x.to(device), y.to(device)


def encode_prompts(tokenizer, prompts: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts for generation: token ids (B, P) left-padded with the end-of-text token, and their attention
    mask (B, P), so that every response starts at column P (gpt.left_pad; padded positions are masked)."""
    return left_pad([tokenizer.encode(p) for p in prompts], tokenizer.eot_token, device)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, generator=None, batch_size: int = 64, device="cpu"):
    """Sample one response per prompt with minigpt's batched, left-padded, KV-cached generate, in eval mode. Returns
    (texts, token lists, ended): each response is cut at the end-of-text token (excluded from the text and tokens;
    ended tells whether it was produced within max_new_tokens)."""
    eot, block = tokenizer.eot_token, model.config.block_size
    texts, tokens, ended = [], [], []
    with eval_mode(model):
        for i in range(0, len(prompts), batch_size):
            idx, mask = encode_prompts(tokenizer, prompts[i: i + batch_size], device)  # (B, P) each
            n_new = min(max_new_tokens, block - idx.size(1))
            if n_new <= 0:
                raise InputError(f"a prompt of {idx.size(1)} tokens leaves no room in the model's context ({block})")
            out = model.generate(idx, n_new, temperature, top_k, eos_token_id=eot, attention_mask=mask,
                                 generator=generator)[:, idx.size(1):].tolist()  # (B, <= n_new) responses
            for row in out:
                stop = row.index(eot) if eot in row else len(row)
                tokens.append(row[:stop])
                ended.append(stop < len(row))
                texts.append(tokenizer.decode(row[:stop]))
    return texts, tokens, ended


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of responses and the KL to a reference


def sequence_logps(logits, targets, average: bool = False):
    """log pi(y|x) of each row: the sum (or, with average, the per-token mean) of log p(targets[b, t] | idx[b, :t+1])
    over the counted targets. logits (B, T, vocab); targets (B, T) in minigpt's convention (padded_batch's y):
    targets[b, t] is the token that follows idx[b, :t+1], -100 where nothing is counted (prompt tokens, padding).
    Returns (B,) in float32."""
    B, T = targets.shape
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="none").view(B, T)  # 0 at ignored positions
    total = token_logps.sum(-1)
    return total / (targets != -100).sum(-1).clamp(min=1) if average else total


@torch.no_grad()
def sequence_kl(model, ref_model, tokenizer, prompts: list[str], tokens: list[list[int]], ended: list[bool],
                device="cpu", batch_size: int = 64) -> list[float]:
    """Per sample, log pi(y|x) - log pi_ref(y|x) over its response tokens (and its end token, if it ended): the
    sampled estimate of KL(pi || pi_ref) of the response, whose mean over samples of pi is the KL of the response
    distribution. Both models in eval mode."""
    eot, examples = tokenizer.eot_token, []
    for p, t, e in zip(prompts, tokens, ended, strict=True):
        ids = tokenizer.encode(p)
        examples.append((ids + t + [eot] * e, len(ids)))
    kls = []
    with eval_mode(model, ref_model):
        for i in range(0, len(examples), batch_size):
            x, y = padded_batch(examples[i: i + batch_size], eot, device)  # (B, T) each
            kls += (sequence_logps(model(x)[0], y) - sequence_logps(ref_model(x)[0], y)).tolist()
    return kls


# ----------------------------------------------------------------------------------------------------------------
# Judging samples

EVAL_STREAM = 10**6 + 1  # the key of the evaluation samples' generator: seeded(seed, EVAL_STREAM)


def evaluate_policy(model, tokenizer, prompts: list[str], rt, ref_model=None, max_new_tokens: int = 96,
                    temperature: float = 0.7, top_k: int | None = None, seed: int = 0,
                    stream: int = EVAL_STREAM, task: Task | None = None) -> dict:
    """One sample per prompt, judged: the mean gold reward of the task (default 'plays') and its standard error, the
    KL to ref_model (if given; sequence_kl), the response length in tokens, the fraction of responses without an end
    token; and the samples themselves. The sampling generator is seeded(seed, stream), so the same arguments draw the
    same random numbers for every policy."""
    texts, tokens, ended = generate_responses(model, tokenizer, prompts, max_new_tokens, temperature, top_k,
                                              seeded(seed, stream, device=rt.device), device=rt.device)
    task = task or Task("plays")
    gold = task.gold_rewards(prompts, texts)
    out = {"gold_reward": float(np.mean(gold)), "gold_sem": float(np.std(gold) / np.sqrt(len(gold))),
           "length": float(np.mean([len(t) for t in tokens])), "no_eos": 1.0 - float(np.mean(ended)),
           "samples": texts, "gold": gold, "judge": task.summary(prompts, texts)}
    if ref_model is not None:
        out["kl"] = float(np.mean(sequence_kl(model, ref_model, tokenizer, prompts, tokens, ended, rt.device)))
    return out

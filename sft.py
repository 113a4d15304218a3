"""sft.py: supervised fine-tuning (instruction tuning) of a GPT on prompt/response pairs, the first stage of RLHF.

The policy learns to answer in a chat template: the loss is the next-token cross-entropy of the response tokens only
(prompt tokens are masked out, as in InstructGPT, Ouyang et al. 2022, and Alpaca), and every response ends with the
end-of-text token, which is learned too, so that generation stops by itself. Batches are either padded (one example
per row) or packed (several examples per row, each attending only to itself, so packing changes the speed, not the
loss). The loss is normalised per response token over the whole optimizer step (all micro-batches and processes).

The default run fine-tunes minigpt's Shakespeare model on the offline alignment task (alignment_task.py: three task
types, a held-out split from unseen plays) and reports the held-out loss and the gold reward of samples before and
after. The output, runs/sft/latest, is the policy that reward_model.py, ppo_rlhf.py and dpo.py start from; it is a
Hugging Face GPT-2 directory (GPT2LMHeadModel.from_pretrained loads it) with the tokenizer in run.json.

Run it:
    python minigpt.py --run-name pretrain --block-size 128 --batch-size 6   # once: the base model (~7 min on CPU)
    python sft.py                                        # fine-tune it on the alignment task (~4 min on 2 CPU cores)
    python sft.py --packing                              # packed rows: same loss, fewer padding tokens
    python sft.py --resume                               # continue runs/sft exactly where it stopped
    python sft.py --init-from gpt2 --dataset tatsu-lab/alpaca --device cuda   # with a hub: GPT-2 on Alpaca
    torchrun --standalone --nproc_per_node=2 sft.py      # DDP
"""

import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm

from alignment_task import gold_rewards, make_instructions, read_jsonl
from lora import apply_lora, load_adapter, merge_and_unload, save_adapter
from minigpt import CharTokenizer, left_pad, load_pretrained
from training import (
    InputError,
    Logger,
    configure_optimizer,
    derived_seed,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    seeded,
    setup_runtime,
    sync,
    train_step,
)


@dataclass
class Args:
    # --- common to every script ---
    seed: int = 1337
    """random seed; every random choice of a run is a function of (seed, rank, iteration)"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda', 'cuda:1'"""
    dtype: str = "auto"
    """'auto' (bfloat16 autocast on CUDA where supported, else float32), 'bfloat16' or 'float32'"""
    compile: bool = False
    """compile the model with torch.compile"""
    track: bool = False
    """log metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "minillm"
    """Weights & Biases project"""
    run_name: str = "sft"
    """name of the run: checkpoints go to <output-dir>/<run-name>/"""
    output_dir: str = "runs"
    """directory that holds the runs"""
    resume: bool = False
    """continue the run in <output-dir>/<run-name>/ from its latest checkpoint"""
    # --- data ---
    data_path: str | None = None
    """a JSONL file of {"prompt", "response"} rows (prompt: the formatted prompt); default: the alignment task"""
    test_path: str | None = None
    """the held-out JSONL for --data-path (default: its last --n-test rows are held out)"""
    dataset: str | None = None
    """a hub instruction data set in the tatsu-lab/alpaca layout instead (needs `datasets` and the hub)"""
    n_train: int = 6000
    """training examples of the alignment task"""
    n_test: int = 300
    """held-out examples (unseen plays for the alignment task)"""
    packing: bool = False
    """pack several examples into each row of block_size tokens instead of padding one example per row"""
    # --- model ---
    init_from: str = "runs/pretrain/latest"
    """the base model: a minigpt checkpoint directory, or a Hugging Face GPT-2 (hub name or directory)"""
    dropout: float = 0.0
    """dropout during fine-tuning"""
    lora_rank: int = 0
    """train a LoRA adapter of this rank on the attention and MLP projections, the rest frozen (0: full fine-tuning)"""
    lora_alpha: float | None = None
    """LoRA scale numerator (scale alpha / r); default: the rank"""
    qlora: bool = False
    """with --lora-rank: store the frozen base in 4-bit NF4 (QLoRA)"""
    # --- optimisation ---
    batch_size: int = 16
    """rows per micro-batch (per process): examples when padded, packed rows of block_size tokens with --packing"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    max_iters: int = 400
    """optimizer steps"""
    learning_rate: float = 5e-4
    """peak learning rate, reached after the warmup"""
    min_lr: float = 5e-5
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 20
    """steps of linear warmup"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 100
    """evaluate, sample and checkpoint every this many steps"""
    log_interval: int = 20
    """steps between log lines"""
    n_eval_prompts: int = 64
    """held-out prompts whose samples are judged by the gold reward at each evaluation"""
    max_new_tokens: int = 96
    """longest sampled response, in tokens"""
    temperature: float = 0.7
    """sampling temperature of the evaluation samples (0: greedy)"""
    top_k: int | None = None
    """sample among the top_k most likely tokens only"""


# ----------------------------------------------------------------------------------------------------------------
# Examples -> token ids with a loss mask


def encode_example(tokenizer, prompt: str, response: str, block_size: int,
                   allow_empty: bool = False) -> tuple[list[int], int]:
    """(ids, n_prompt): ids = tokens(prompt) + tokens(response) + [end of text]; the loss counts ids[n_prompt:] only.
    A model reads ids[:-1], so ids may hold block_size + 1 tokens; a longer response is cut (and loses its end).
    An empty response is an error in instruction data; allow_empty (preference pairs) keeps it as the end token."""
    if not response.strip() and not allow_empty:
        raise InputError("the response is empty")
    p = tokenizer.encode(prompt)
    if len(p) >= block_size:
        raise InputError(f"the prompt has {len(p)} tokens, the model's context is {block_size}: no room for a response")
    ids = p + tokenizer.encode(response) + [tokenizer.eot_token]
    return ids[: block_size + 1], len(p)


def encode_all(tokenizer, rows: list[dict], block_size: int, source: str) -> tuple[list[tuple[list[int], int]], int]:
    """Encode rows {"prompt", "response"}; returns (examples, how many responses were cut to fit the context)."""
    out, cut = [], 0
    for i, row in enumerate(rows, start=1):
        try:
            ids, n_prompt = encode_example(tokenizer, row["prompt"], row["response"], block_size)
        except InputError as e:
            raise InputError(f"{source}, row {i}: {e}") from None
        cut += ids[-1] != tokenizer.eot_token
        out.append((ids, n_prompt))
    return out, cut


def padded_batch(examples: list[tuple[list[int], int]], pad_id: int, device="cpu"):
    """(x, y), one example per row, right-padded. y[b, t] = ids[t + 1] for response tokens, -100 elsewhere (prompt
    and padding). Right padding needs no attention mask: causal attention never looks right of a real token."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids)
        x[b, : len(ids) - 1] = t[:-1]
        y[b, n_prompt - 1: len(ids) - 1] = t[n_prompt:]  # position n_prompt-1 predicts the first response token
    return x.to(device), y.to(device)


def pack_examples(examples: list[tuple[list[int], int]], block_size: int, pad_id: int):
    """Packed rows (x, y, document_ids), each (n_rows, block_size): examples laid end to end in the given order, a
    new row when the next one does not fit (no example is split). document_ids keep each example attending to itself
    only, with its own positions (minigpt.GPT.hidden_states), so a packed row gives each example's padded loss."""
    rows, cur = [], []
    for ids, n_prompt in examples:
        if cur and sum(len(e[0]) - 1 for e in cur) + len(ids) - 1 > block_size:
            rows.append(cur)
            cur = []
        cur.append((ids, n_prompt))
    rows.append(cur)
    x = torch.full((len(rows), block_size), pad_id, dtype=torch.long)
    y = torch.full((len(rows), block_size), -100, dtype=torch.long)
    doc = torch.zeros((len(rows), block_size), dtype=torch.long)
    for r, row in enumerate(rows):
        t0 = 0
        for d, (ids, n_prompt) in enumerate(row):
            n, t = len(ids) - 1, torch.tensor(ids)
            x[r, t0: t0 + n] = t[:-1]
            y[r, t0 + n_prompt - 1: t0 + n] = t[n_prompt:]
            doc[r, t0: t0 + n] = d
            t0 += n
        doc[r, t0:] = len(row)  # the padding tail is a document of its own: it never mixes into a real one
    return x, y, doc


def sft_loss_sum(model, batch):
    """Summed cross-entropy over the response tokens of a batch (x, y) or packed batch (x, y, document_ids)."""
    x, y, *doc = batch
    return model(x, y, reduction="sum", document_ids=doc[0] if doc else None)[1]


def count_response_tokens(batch) -> int:
    return int((batch[1] != -100).sum())


@torch.no_grad()
def heldout_loss(model, examples, pad_id: int, rt, batch_size: int = 64) -> float:
    """Mean cross-entropy per response token over all held-out examples."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = padded_batch(examples[i: i + batch_size], pad_id, rt.device)
        with rt.autocast():
            total += sft_loss_sum(model, (x, y)).item()
        count += count_response_tokens((x, y))
    model.train()
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# Sampling a policy and judging its samples (used by reward_model.py, ppo_rlhf.py and dpo.py too)


def response_logprobs(model, idx, attention_mask=None):
    """(B, T-1): log p(idx[:, t+1] | idx[:, :t+1]) under the model, for every position."""
    logits = model(idx, attention_mask=attention_mask)[0][:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, idx[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, generator=None, batch_size: int = 64, device="cpu"):
    """Sample one response per prompt with minigpt's batched, left-padded, KV-cached generate. Returns (texts,
    token lists, ended): each response is cut at the end-of-text token (excluded from the text and tokens; ended
    tells whether it was produced within max_new_tokens)."""
    eot, block = tokenizer.eot_token, model.config.block_size
    texts, tokens, ended = [], [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        enc = [tokenizer.encode(p) for p in prompts[i: i + batch_size]]
        idx, mask = left_pad(enc, eot, device)
        n_new = min(max_new_tokens, block - idx.size(1))
        if n_new <= 0:
            raise InputError(f"a prompt of {idx.size(1)} tokens leaves no room in the model's context ({block})")
        out = model.generate(idx, n_new, temperature, top_k, eos_token_id=eot, attention_mask=mask,
                             generator=generator)[:, idx.size(1):].tolist()
        for row in out:
            stop = row.index(eot) if eot in row else len(row)
            tokens.append(row[:stop])
            ended.append(stop < len(row))
            texts.append(tokenizer.decode(row[:stop]))
    model.train(was_training)
    return texts, tokens, ended


@torch.no_grad()
def sequence_kl(model, ref_model, tokenizer, prompts: list[str], tokens: list[list[int]], ended: list[bool],
                device="cpu", batch_size: int = 64) -> list[float]:
    """Per sample, sum over its response tokens (and its end token) of log pi(y_t) - log pi_ref(y_t): the sampled
    estimate of KL(pi || pi_ref) of the response (its mean over samples is the KL of the response distribution)."""
    eot, kls = tokenizer.eot_token, []
    for i in range(0, len(prompts), batch_size):
        p_ids = [tokenizer.encode(p) for p in prompts[i: i + batch_size]]
        r_ids = [t + [eot] * e for t, e in zip(tokens[i: i + batch_size], ended[i: i + batch_size], strict=True)]
        seqs = [p + r for p, r in zip(p_ids, r_ids, strict=True)]
        T = max(len(s) for s in seqs)
        idx = torch.tensor([s + [eot] * (T - len(s)) for s in seqs], device=device)  # right-padded
        diff = response_logprobs(model, idx) - response_logprobs(ref_model, idx)  # (B, T-1)
        for b, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
            kls.append(diff[b, len(p) - 1: len(p) - 1 + len(r)].sum().item())
    return kls


def evaluate_policy(model, tokenizer, prompts: list[str], rt, ref_model=None, max_new_tokens: int = 96,
                    temperature: float = 0.7, top_k: int | None = None, seed: int = 0) -> dict:
    """Samples on fixed prompts, judged: mean gold reward, KL to ref_model (if given), response length in tokens,
    fraction of responses without an end token; plus the samples themselves."""
    texts, tokens, ended = generate_responses(model, tokenizer, prompts, max_new_tokens, temperature, top_k,
                                              seeded(seed, 10**6 + 1, device=rt.device), device=rt.device)
    out = {"gold_reward": float(np.mean(gold_rewards(prompts, texts))),
           "length": float(np.mean([len(t) for t in tokens])), "no_eos": 1.0 - float(np.mean(ended)),
           "samples": texts}
    if ref_model is not None:
        out["kl"] = float(np.mean(sequence_kl(model, ref_model, tokenizer, prompts, tokens, ended, rt.device)))
    return out


# ----------------------------------------------------------------------------------------------------------------


def load_data(args: Args) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, source name); rows are {"prompt", "response"}."""
    if args.dataset:
        from alignment_task import load_hub_instructions

        rows = load_hub_instructions(args.dataset)
        return rows[: -args.n_test], rows[-args.n_test:], args.dataset
    if args.data_path:
        rows = read_jsonl(args.data_path, ("prompt", "response"))
        if args.test_path:
            return rows, read_jsonl(args.test_path, ("prompt", "response")), args.data_path
        if len(rows) <= args.n_test:
            raise InputError(f"{args.data_path}: {len(rows)} rows, not more than --n-test {args.n_test}")
        return rows[: -args.n_test], rows[-args.n_test:], args.data_path
    return (make_instructions(args.n_train, "train", args.seed), make_instructions(args.n_test, "test", args.seed),
            "alignment task")


def load_policy(init_from: str, dropout: float = 0.0):
    """The base model and a tokenizer that has an end-of-text token: a char-level base gains one (a new embedding
    row, minigpt.GPT.resize_vocab); GPT-2's BPE has <|endoftext|>."""
    model, tokenizer = load_pretrained(init_from, dropout=dropout)
    if tokenizer.eot_token is None:
        tokenizer = CharTokenizer(tokenizer.chars, eot=True)
        model.resize_vocab(tokenizer.vocab_size)
    return model, tokenizer


def save_policy(run_dir: Path, model, optimizer, step: int, meta: dict, lora: bool = False):
    """A checkpoint whose weights are a plain GPT-2 (what the next stages and transformers load). With LoRA these are
    the merged weights of a copy; the adapter itself goes to adapter/ (PEFT's layout), from which --resume goes on."""
    if not lora:
        return save_checkpoint(run_dir, model, optimizer, step, meta)
    merged = merge_and_unload(copy.deepcopy(model))
    save_checkpoint(run_dir, merged, optimizer, step, meta, extra=lambda d: save_adapter(model, d / "adapter", meta))


def main(args: Args) -> dict:
    # --- devices, processes, run directory ---
    rt = setup_runtime(args.device, args.dtype)
    run_dir = Path(args.output_dir) / args.run_name

    # --- model: the base, with an end-of-text token; on --resume the run's own latest weights (with LoRA: the base
    # and the run's adapter) ---
    resume_full = args.resume and not args.lora_rank
    model, tokenizer = load_policy(str(run_dir / "latest") if resume_full else args.init_from, args.dropout)
    block = model.config.block_size
    if args.lora_rank:  # LoRA (Hu et al. 2021) / QLoRA (Dettmers et al. 2023): lora.py
        torch.manual_seed(args.seed)  # A's random initialisation: a function of the seed, as every draw of a run
        lora = apply_lora(model, args.lora_rank, args.lora_alpha, qlora=args.qlora)
        if rt.master:
            print(f"LoRA rank {args.lora_rank}{' on an NF4 base' if args.qlora else ''}: {lora['trainable']:,} of "
                  f"{lora['total']:,} parameters trainable")
        if args.resume:
            load_adapter(model, run_dir / "latest" / "adapter", qlora=args.qlora)
    model.to(rt.device)

    # --- data: encoded once; the held-out split is judged by loss and by the gold reward of samples ---
    train_rows, test_rows, source = load_data(args)
    train, cut = encode_all(tokenizer, train_rows, block, source)
    test, _ = encode_all(tokenizer, test_rows, block, source + " (held out)")
    eot = tokenizer.eot_token
    packed = pack_examples(train, block, eot) if args.packing else None
    eval_prompts = [r["prompt"] for r in test_rows[: args.n_eval_prompts]]

    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2),
                                    rt.device.type)
    start = 0
    if resume_full:
        start = load_checkpoint(run_dir, model, optimizer)["step"]
    elif args.resume:  # the adapter is loaded above; here the optimizer state and the step
        state = torch.load(run_dir / "latest" / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    if args.resume and rt.master:
        print(f"resumed {run_dir} at step {start}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                                    else None)
    meta = {"tokenizer": tokenizer.spec(), "args": asdict(args), "source": source}
    if rt.master:
        n_resp = sum(len(ids) - n for ids, n in train)
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {len(train):,} train / {len(test):,} held-out "
              f"examples from {source} ({n_resp:,} response tokens; {cut} responses cut to the context of {block})"
              + (f", packed into {len(packed[0]):,} rows" if packed else "") + f", device {rt.device} ({rt.dtype})")

    # --- evaluation: held-out loss, and the gold reward of samples on fixed held-out prompts ---
    logger = Logger(args, rt.master)
    history = {"heldout_loss": {}, "gold_reward": {}, "length": {}, "no_eos": {}, "train_loss": {}}

    def evaluate(step: int):
        loss = heldout_loss(raw_model, test, eot, rt)
        ev = evaluate_policy(raw_model, tokenizer, eval_prompts, rt, None, args.max_new_tokens, args.temperature,
                             args.top_k, args.seed)
        for k, v in (("heldout_loss", loss), ("gold_reward", ev["gold_reward"]), ("length", ev["length"]),
                     ("no_eos", ev["no_eos"])):
            history[k][step] = v
        logger.log({"eval/heldout_loss": loss, "eval/gold_reward": ev["gold_reward"],
                    "eval/response_length": ev["length"], "eval/no_eos_fraction": ev["no_eos"]}, step)
        for p, s in list(zip(eval_prompts, ev["samples"], strict=True))[:3]:
            tqdm.write(f"  {p.strip()!r} -> {s!r}")

    if rt.master and start == 0:
        evaluate(0)

    # --- training ---
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None if rt.master else True)
    t0 = time.perf_counter()
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))  # dropout masks
        lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(args.seed, rt.rank, step)  # this step's examples: a function of (seed, rank, step)
        batches = []
        for _ in range(args.grad_accum_steps):
            if packed is not None:
                rows = torch.randint(len(packed[0]), (args.batch_size,), generator=g)
                batches.append(tuple(t[rows].to(rt.device) for t in packed))
            else:
                rows = torch.randint(len(train), (args.batch_size,), generator=g).tolist()
                batches.append(padded_batch([train[i] for i in rows], eot, rt.device))
        n_tokens = sum(count_response_tokens(b) for b in batches) * rt.world_size
        loss, grad_norm = train_step(model, optimizer, batches, rt, args.grad_clip, sft_loss_sum,
                                     count_response_tokens)
        history["train_loss"][step + 1] = loss

        sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        bar.set_postfix(loss=f"{loss:.4f}", resp_tok_s=f"{n_tokens / dt:,.0f}")
        logger.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                    "perf/tokens_per_s": sum(b[0].numel() for b in batches) * rt.world_size / dt},
                   step + 1, line=(step + 1) % args.log_interval == 0)

        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            if rt.master:
                evaluate(step + 1)
                save_policy(run_dir, raw_model, optimizer, step + 1, meta, lora=bool(args.lora_rank))
            t0 = time.perf_counter()

    if rt.master and history["heldout_loss"]:
        first, last = min(history["heldout_loss"]), max(history["heldout_loss"])
        print(f"held-out loss {history['heldout_loss'][first]:.4f} -> {history['heldout_loss'][last]:.4f}, gold "
              f"reward of samples {history['gold_reward'][first]:+.3f} -> {history['gold_reward'][last]:+.3f} "
              f"(steps {first} -> {last}); policy in {run_dir / 'latest'}")
    logger.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()
    return {**history, "run_dir": run_dir, "tokenizer": tokenizer}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (InputError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

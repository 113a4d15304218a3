"""sft.py: supervised fine-tuning (instruction tuning) of a GPT on prompt/response pairs, the first stage of RLHF.

The policy learns to answer in a chat template: the loss is the next-token cross-entropy of the response tokens only
(prompt tokens are masked out, as in InstructGPT, Ouyang et al. 2022, and Alpaca), and every response ends with the
end-of-text token, which is learned too, so that generation stops by itself. Batches are either padded (one example
per row) or packed (several examples per row, each attending only to itself, so packing changes the speed, not the
loss). The loss is normalised per response token over the whole optimizer step (all micro-batches and processes).

The default run fine-tunes minigpt's Shakespeare model on the offline alignment task (alignment_task.py: three task
types, a held-out split from unseen plays) and reports the held-out loss and the gold reward of samples before and
after. The output, runs/sft/latest, is the policy that reward_model.py, ppo_rlhf.py and dpo.py start from; it is a
Hugging Face GPT-2 directory (GPT2LMHeadModel.from_pretrained loads it) with the tokenizer in run.json. What every
stage does with a policy (load, LoRA, save, resume, encode examples, sample, judge) is in policy.py; here are SFT's
data, loss and loop.

Run it:
    python minigpt.py --run-name pretrain --block-size 128 --batch-size 6   # once: the base model
    python sft.py                                        # fine-tune it on the alignment task
    python sft.py --packing                              # packed rows: same loss, fewer padding tokens
    python sft.py --resume                               # continue runs/sft exactly where it stopped
    python sft.py --init-from gpt2 --dataset tatsu-lab/alpaca --device cuda   # with a hub: GPT-2 on Alpaca
    torchrun --standalone --nproc_per_node=2 sft.py      # DDP
"""

import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from alignment_task import make_instructions, read_jsonl
from policy import (
    TASKS,
    Task,
    add_lora,
    encode_example,
    eval_mode,
    evaluate_policy,
    load_policy,
    padded_batch,
    resume_policy,
    save_policy,
)
from training import (
    POSITIVE,
    InputError,
    Logger,
    RunArgs,
    configure_optimizer,
    count_targets,
    derived_seed,
    lr_at,
    parse_args,
    prepare_run,
    require_checkpoint,
    run_command,
    seeded,
    setup_runtime,
    sync,
    train_step,
)


@dataclass
class Args(RunArgs):
    """Supervised fine-tuning of a GPT on prompt/response pairs: the first stage of RLHF."""

    # --- the common options (training.RunArgs), where they differ here ---
    run_name: str = "sft"
    # --- data ---
    data_path: str | None = None
    """a JSONL file of {"prompt", "response"} rows (prompt: the formatted prompt); default: the alignment task"""
    test_path: str | None = None
    """the held-out JSONL for --data-path (default: its last --n-test rows are held out)"""
    dataset: str | None = None
    """a hub instruction data set in the tatsu-lab/alpaca layout instead (needs `datasets` and the hub)"""
    task: Literal[TASKS] = "plays"
    """the gold judge of the evaluation samples: 'plays' (alignment_task.py) or 'chat' (chat_task.py, whose data are
    a policy's own best samples: --data-path best_train.jsonl --test-path best_test.jsonl of reward_model.py pairs)"""
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
# Instruction data -> token ids with a loss mask (policy.encode_example: prompt, response, end token)


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


def pack_examples(examples: list[tuple[list[int], int]], block_size: int, pad_id: int):
    """Packed rows (x, y, document_ids), each (n_rows, block_size): examples laid end to end in the given order, a
    new row when the next one does not fit (no example is split). document_ids keep each example attending to itself
    only, with its own positions (gpt.GPT.hidden_states), so a packed row gives each example's padded loss
    (policy.padded_batch's)."""
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


@torch.no_grad()
def heldout_loss(model, examples, pad_id: int, rt, batch_size: int = 64) -> float:
    """Mean cross-entropy per response token over all held-out examples, in eval mode."""
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(examples), batch_size):
            x, y = padded_batch(examples[i: i + batch_size], pad_id, rt.device)
            with rt.autocast():
                total += sft_loss_sum(model, (x, y)).item()
            count += count_targets((x, y))  # response tokens
    return total / count


# ----------------------------------------------------------------------------------------------------------------


def load_data(args: Args, tokenizer) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, source name); rows are {"prompt", "response"}, the prompts of the alignment task
    and of hub data in the tokenizer's chat template, those of --data-path as the file has them."""
    if args.dataset:
        from alignment_task import load_hub_instructions

        rows = load_hub_instructions(args.dataset, tokenizer=tokenizer)
        return rows[: -args.n_test], rows[-args.n_test:], args.dataset
    if args.task == "chat" and not args.data_path:
        raise InputError("--task chat has no responses of its own to imitate: give --data-path (best_train.jsonl of "
                         "`python reward_model.py pairs --task chat`: the best of K samples, rejection sampling)")
    if args.data_path:
        rows = read_jsonl(args.data_path, ("prompt", "response"))
        if args.test_path:
            return rows, read_jsonl(args.test_path, ("prompt", "response")), args.data_path
        if len(rows) <= args.n_test:
            raise InputError(f"{args.data_path}: {len(rows)} rows, not more than --n-test {args.n_test}")
        return rows[: -args.n_test], rows[-args.n_test:], args.data_path
    return (make_instructions(args.n_train, "train", args.seed, tokenizer),
            make_instructions(args.n_test, "test", args.seed, tokenizer), "alignment task")


# the command that writes the default --init-from, runs/pretrain/latest
PRETRAIN_COMMAND = "`python minigpt.py --run-name pretrain --block-size 128 --batch-size 6` (or `pipeline.py run`)"


def main(args: Args) -> dict:
    # --- arguments, run directory and the base model's checkpoint, checked before any work; devices, processes ---
    run_dir, _ = prepare_run(args, {"lora_alpha": POSITIVE})
    if args.qlora and not args.lora_rank:
        raise InputError("--qlora needs --lora-rank > 0")
    require_checkpoint(args.init_from, "--init-from", PRETRAIN_COMMAND)
    rt = setup_runtime(args.device, args.dtype)

    # --- model: the base, with an end-of-text token; with --lora-rank, LoRA adapters on it (the rest frozen) ---
    model, tokenizer = load_policy(args.init_from, args.dropout)
    block = model.config.block_size
    if args.lora_rank:  # LoRA (Hu et al. 2021) / QLoRA (Dettmers et al. 2023): lora.py
        lora = add_lora(model, args.lora_rank, args.lora_alpha, args.qlora, args.seed)
        if rt.master:
            print(lora)
    model.to(rt.device)

    # --- data: encoded once; the held-out split is judged by loss and by the gold reward of samples ---
    train_rows, test_rows, source = load_data(args, tokenizer)
    task = Task(args.task)
    task.remember(test_rows)
    train, cut = encode_all(tokenizer, train_rows, block, source)
    test, _ = encode_all(tokenizer, test_rows, block, source + " (held out)")
    eot = tokenizer.eot_token
    packed = pack_examples(train, block, eot) if args.packing else None
    eval_prompts = [r["prompt"] for r in test_rows[: args.n_eval_prompts]]

    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2),
                                    rt.device.type)
    start = 0
    if args.resume:  # the run's own latest weights (with LoRA: its adapter on the base) and optimizer state
        start = resume_policy(run_dir, model, optimizer, lora=bool(args.lora_rank))["step"]
        if rt.master:
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
                             args.top_k, args.seed, task=task)
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
        n_tokens = sum(count_targets(b) for b in batches) * rt.world_size  # response tokens
        loss, grad_norm = train_step(model, optimizer, batches, rt, args.grad_clip, sft_loss_sum, count_targets)
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
    run_command(main, lambda: parse_args(Args))  # bad input: one line, exit status 1, no traceback

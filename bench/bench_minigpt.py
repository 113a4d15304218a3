"""Benchmark minigpt's GPT against transformers' GPT2LMHeadModel: same weights, same batch, one process.

    python bench/bench_minigpt.py                      # a 4-layer, 256-wide GPT-2 BPE model; ~3 min on 2 CPU cores
    python bench/bench_minigpt.py --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 --batch-size 8  # GPU

Measured, each as ours / transformers:
  - training step tokens/s (forward, backward, AdamW step), the two models timed in alternation, median of rounds;
  - greedy generation tokens/s with the KV cache (our `generate` against `generate(do_sample=False)`), checked
    to produce the same tokens;
  - memory: on CUDA the peak allocated during a training step; on CPU the bytes of activations saved for backward;
  - MFU: training FLOPs per token (6N + 12 L C T) times tokens/s over the matmul peak measured on this device.
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minigpt as M  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    dtype: str = "auto"
    vocab_size: int = 50257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128
    batch_size: int = 8
    train_steps: int = 5
    """optimizer steps per timed round"""
    rounds: int = 5
    """rounds; each times both models, alternating"""
    prompt_tokens: int = 16
    new_tokens: int = 100
    gen_batch_size: int = 1
    seed: int = 0


def timed(fn, device) -> float:
    M._sync(device)
    t0 = time.perf_counter()
    fn()
    M._sync(device)
    return time.perf_counter() - t0


def saved_activation_bytes(step) -> int:
    """Bytes of distinct tensors autograd saves for backward during step() (the activation memory)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_memory(step, device) -> tuple[int, str]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device), "peak allocated in a training step"
    return saved_activation_bytes(step), "activations saved for backward"


def main(args: Args):
    rt = M.setup_runtime(args.device, args.dtype)
    torch.manual_seed(args.seed)
    hf_cfg = GPT2Config(vocab_size=args.vocab_size, n_positions=args.block_size, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg).to(rt.device)
    ours = M.GPT(M.GPTConfig.from_hf(hf_cfg.to_dict(), "bench")).to(rt.device)
    ours.load_hf_state_dict(hf.state_dict(), "bench")  # the same weights
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), generator=g).to(rt.device)
    tokens = args.batch_size * args.block_size

    # --- training step: the same batch, loss, AdamW and clipping for both ---
    def make_step(model, loss_of):
        opt = M.configure_optimizer(model, 1e-4, 0.1, device_type=rt.device.type)

        def step():
            with rt.autocast():
                loss = loss_of(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    steps = {"minigpt": make_step(ours, lambda m: m(x, targets)[1]),
             "transformers": make_step(hf, lambda m: m(x, labels=x).loss)}
    for step in steps.values():  # warm up
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(lambda step=step: [step() for _ in range(args.train_steps)], rt.device))
    train_tps = {name: tokens * args.train_steps / statistics.median(t) for name, t in times.items()}
    memory = {}
    for name, step in steps.items():
        memory[name], memory_kind = peak_memory(step, rt.device)

    # --- greedy generation with the KV cache: equal tokens, then speed ---
    ours.eval()
    hf.eval()
    prompt = torch.randint(0, args.vocab_size, (args.gen_batch_size, args.prompt_tokens), generator=g).to(rt.device)
    n = args.new_tokens
    gen = {"minigpt": lambda: ours.generate(prompt, n, temperature=0),
           "transformers": lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               pad_token_id=0, eos_token_id=None)}
    with torch.no_grad(), rt.autocast():
        outs = {name: fn() for name, fn in gen.items()}  # also the warm-up
        same = torch.equal(outs["minigpt"], outs["transformers"])
        gtimes = {name: [] for name in gen}
        for _ in range(args.rounds):
            for name, fn in gen.items():
                gtimes[name].append(timed(fn, rt.device))
    gen_tps = {name: args.gen_batch_size * n / statistics.median(t) for name, t in gtimes.items()}

    # --- MFU against the measured matmul peak ---
    peak = M.measure_matmul_peak(rt.device, rt.dtype)
    fpt = M.flops_per_token(ours.config, ours.num_params(non_embedding=True))
    mfu = {name: fpt * tps / peak for name, tps in train_tps.items()}

    print(f"device {rt.device} ({rt.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads; model "
          f"{ours.num_params() / 1e6:.1f}M parameters (L={args.n_layer}, H={args.n_head}, C={args.n_embd}, "
          f"T={args.block_size}, V={args.vocab_size}); training batch {args.batch_size}x{args.block_size}; "
          f"generation {args.gen_batch_size}x({args.prompt_tokens} + {n}) greedy; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    rows = [("training step, tokens/s", train_tps, "{:,.0f}", True),
            ("greedy generation, tokens/s", gen_tps, "{:,.1f}", True),
            (f"memory, MiB ({memory_kind})", {k: v / 2**20 for k, v in memory.items()}, "{:,.1f}", False),
            ("MFU (training)", mfu, "{:.1%}", True)]
    print("\n| measure | minigpt | transformers | minigpt / transformers |\n|---|---:|---:|---:|")
    for label, vals, fmt, _ in rows:
        a, b = vals["minigpt"], vals["transformers"]
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |")
    print(f"\ngenerated tokens identical: {same}")
    return {"train_tps": train_tps, "gen_tps": gen_tps, "memory": memory, "mfu": mfu, "same_tokens": same}


if __name__ == "__main__":
    main(tyro.cli(Args))

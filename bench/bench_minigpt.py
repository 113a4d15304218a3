"""Benchmark minigpt's GPT against transformers' GPT2LMHeadModel: same weights, same batch, one process.

    python bench/bench_minigpt.py                       # presets 'demo' and 'bpe': ~4 min on 2 CPU cores
    python bench/bench_minigpt.py --presets gpt2        # GPT-2 small (124M, context 1024), for a GPU

Presets: 'demo' is the model and batch of the default `python minigpt.py` (char-level, 4 layers, 128 wide, context
64, batch 12); 'bpe' a GPT-2 BPE model (4 layers, 256 wide, context 128, batch 8) whose 50257-row output layer
dominates its compute; 'gpt2' is GPT-2 small. Measured per preset, each as minigpt / transformers:
  - training step tokens/s (forward, backward, clipping, AdamW step), the two models timed in alternation,
    median over rounds;
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
import training

PRESETS = {  # vocab, layers, heads, width, context, training batch, prompt tokens, new tokens
    "demo": dict(vocab_size=84, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, prompt=8, new=56),
    "bpe": dict(vocab_size=50257, n_layer=4, n_head=4, n_embd=256, block_size=128, batch_size=8, prompt=16, new=100),
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, prompt=64,
                 new=256),
}


@dataclass
class Args:
    presets: tuple[str, ...] = ("demo", "bpe")
    """model and batch configurations to measure (see PRESETS)"""
    device: str = "auto"
    dtype: str = "auto"
    train_steps: int = 5
    """optimizer steps per timed round"""
    rounds: int = 5
    """rounds; each times both models, alternating"""
    gen_batch_size: int = 1
    seed: int = 0


def timed(fn, device) -> float:
    training.sync(device)
    t0 = time.perf_counter()
    fn()
    training.sync(device)
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


def bench(preset: str, args: Args, rt: training.Runtime, peak: float) -> dict:
    p = PRESETS[preset]
    torch.manual_seed(args.seed)
    hf_cfg = GPT2Config(vocab_size=p["vocab_size"], n_positions=p["block_size"], n_embd=p["n_embd"],
                        n_layer=p["n_layer"], n_head=p["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg).to(rt.device)
    ours = M.GPT(M.GPTConfig.from_hf(hf_cfg.to_dict(), "bench")).to(rt.device)
    ours.load_hf_state_dict(hf.state_dict(), "bench")  # the same weights
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, p["vocab_size"], (p["batch_size"], p["block_size"]), generator=g).to(rt.device)
    tokens = p["batch_size"] * p["block_size"]

    # --- training step: the same batch, loss, AdamW and clipping for both ---
    def make_step(model, loss_of):
        opt = training.configure_optimizer(model, 1e-4, 0.1, device_type=rt.device.type)

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
    prompt = torch.randint(0, p["vocab_size"], (args.gen_batch_size, p["prompt"]), generator=g).to(rt.device)
    n = p["new"]
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
    fpt = M.flops_per_token(ours.config, ours.num_params(non_embedding=True))
    mfu = {name: fpt * tps / peak for name, tps in train_tps.items()}

    print(f"\n### preset {preset}: {ours.num_params() / 1e6:.2f}M parameters (L={p['n_layer']}, H={p['n_head']}, "
          f"C={p['n_embd']}, T={p['block_size']}, V={p['vocab_size']}); training batch "
          f"{p['batch_size']}x{p['block_size']}; generation {args.gen_batch_size}x({p['prompt']} + {n}) greedy")
    rows = [("training step, tokens/s", train_tps, "{:,.0f}"),
            ("greedy generation, tokens/s", gen_tps, "{:,.1f}"),
            (f"memory, MiB ({memory_kind})", {k: v / 2**20 for k, v in memory.items()}, "{:,.1f}"),
            ("MFU (training)", mfu, "{:.1%}")]
    print("\n| measure | minigpt | transformers | minigpt / transformers |\n|---|---:|---:|---:|")
    for label, vals, fmt in rows:
        a, b = vals["minigpt"], vals["transformers"]
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |")
    print(f"\ngenerated tokens identical: {same}")
    return {"train_tps": train_tps, "gen_tps": gen_tps, "memory": memory, "mfu": mfu, "same_tokens": same}


def main(args: Args) -> dict:
    rt = training.setup_runtime(args.device, args.dtype)
    peak = training.measure_matmul_peak(rt.device, rt.dtype)
    print(f"device {rt.device} ({rt.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (measured)")
    return {name: bench(name, args, rt, peak) for name in args.presets}


if __name__ == "__main__":
    main(tyro.cli(Args))

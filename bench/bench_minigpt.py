"""Benchmark the GPT of gpt.py against transformers' GPT2LMHeadModel and LlamaForCausalLM: same weights, same batch, one
process.

    python bench/bench_minigpt.py                       # presets 'demo' and 'bpe'
    python bench/bench_minigpt.py --presets smollm2     # the real SmolLM2-135M-Instruct against LlamaForCausalLM
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
'smollm2' loads the offline SmolLM2-135M-Instruct into both (30 layers, 576 wide, 9 heads, 3 KV heads) and measures
the training step with every weight trained and with LoRA (rank 16 on every projection of both; PEFT's LoRA on the
transformers side), greedy decoding at batch 1 and 16, peak memory of both, and batch-1 decoding as a fraction of
its memory-bandwidth bound: each new token reads every weight once, so tokens/s <= bandwidth / bytes of weights,
with the bandwidth measured here (a copy of 1 GiB).
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
import assets  # noqa: E402
import gpt  # noqa: E402
import training  # noqa: E402

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
    ours = gpt.GPT(gpt.GPTConfig.from_hf(hf_cfg.to_dict(), "bench")).to(rt.device)
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
    fpt = gpt.flops_per_token(ours.config, ours.num_params(non_embedding=True))
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


def memory_bandwidth(device, nbytes: int = 2**30, reps: int = 5) -> float:
    """Bytes per second of a large copy (read + write), the best of reps: what decoding one row is bound by."""
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(timed(lambda: b.copy_(a), device) for _ in range(reps))
    return 2 * nbytes / best


def peak_bytes(step, model, device) -> int:
    """Peak bytes of a training step, the model's own tensors included (CUDA: the allocator's; CPU: PeakMemory)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device)
    with training.PeakMemory([*model.parameters(), *model.buffers()]) as m:
        step()
    return m.peak


def bench_smollm2(args: Args, rt: training.Runtime, peak: float, batch=(2, 256), gen_batches=(1, 16), new=32,
                  rank=16) -> dict:
    """The real model in both implementations: full and LoRA training steps, greedy decoding, memory."""
    import peft
    from transformers import LlamaForCausalLM

    from lora import apply_lora

    path = assets.resolve_pretrained("smollm2")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 49152, batch, generator=g).to(rt.device)
    targets_x = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    tokens = x.numel()
    result = {}
    for way in ("full", "lora"):
        ours = gpt.GPT.from_pretrained("smollm2").to(rt.device)
        hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(rt.device)
        if way == "lora":
            apply_lora(ours, rank, 2 * rank, targets=targets)
            hf = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
        steps = {}
        for name, model, loss_of in (("minigpt", ours, lambda m: m(x, targets_x)[1]),
                                     ("transformers", hf, lambda m: m(input_ids=x, labels=x).loss)):
            opt = training.configure_optimizer(model, 1e-5, 0.0, device_type=rt.device.type)

            def step(model=model, loss_of=loss_of, opt=opt):
                with rt.autocast():
                    loss = loss_of(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps[name] = step
            step()  # warm-up (and the optimizer state exists from here on)
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name].append(timed(step, rt.device))
        result[f"train_{way}"] = {name: tokens / statistics.median(t) for name, t in times.items()}
        result[f"memory_{way}"] = {name: peak_bytes(steps[name], m, rt.device) for name, m in
                                   (("minigpt", ours), ("transformers", hf))}
        del ours, hf, steps
    ours = gpt.GPT.from_pretrained("smollm2").to(rt.device).eval()
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(rt.device).eval()
    for B in gen_batches:
        prompt = torch.randint(0, 49152, (B, 16), generator=g).to(rt.device)
        gen = {"minigpt": lambda: ours.generate(prompt, new, temperature=0),
               "transformers": lambda: hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                   pad_token_id=0, eos_token_id=None)}
        with torch.no_grad(), rt.autocast():
            outs = {name: fn() for name, fn in gen.items()}  # also the warm-up
            result[f"same_tokens_b{B}"] = torch.equal(outs["minigpt"], outs["transformers"])
            gtimes = {name: [] for name in gen}
            for _ in range(args.rounds):
                for name, fn in gen.items():
                    gtimes[name].append(timed(fn, rt.device))
        result[f"gen_b{B}"] = {name: B * new / statistics.median(t) for name, t in gtimes.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bandwidth = memory_bandwidth(rt.device)
    bound = bandwidth / weight_bytes
    fpt = gpt.flops_per_token(ours.config, ours.num_params())

    print(f"\n### preset smollm2: SmolLM2-135M-Instruct, {ours.num_params() / 1e6:.1f}M parameters "
          f"({weight_bytes / 2**20:.0f} MiB of weights); training batch {batch[0]}x{batch[1]}; LoRA rank {rank} on "
          f"{', '.join(targets)}; greedy decoding of {new} tokens after 16")
    rows = [("training step, every weight, tokens/s", result["train_full"], "{:,.0f}"),
            ("training step, LoRA, tokens/s", result["train_lora"], "{:,.0f}"),
            *[(f"greedy decoding, batch {B}, tokens/s", result[f"gen_b{B}"], "{:,.1f}") for B in gen_batches],
            ("peak memory, training step (every weight), MiB", {k: v / 2**20 for k, v in
                                                                result["memory_full"].items()}, "{:,.0f}"),
            ("peak memory, training step (LoRA), MiB", {k: v / 2**20 for k, v in result["memory_lora"].items()},
             "{:,.0f}"),
            ("MFU (training, every weight)", {k: fpt * v / peak for k, v in result["train_full"].items()}, "{:.1%}")]
    print("\n| measure | minigpt | transformers | minigpt / transformers |\n|---|---:|---:|---:|")
    for label, vals, fmt in rows:
        a, b = vals["minigpt"], vals["transformers"]
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |")
    print(f"\nmemory bandwidth (1 GiB copy) {bandwidth / 1e9:.1f} GB/s -> batch-1 decoding bound "
          f"{bound:.1f} tokens/s; minigpt at {result['gen_b1']['minigpt'] / bound:.0%} of it, transformers at "
          f"{result['gen_b1']['transformers'] / bound:.0%}")
    print("generated tokens identical: " + ", ".join(f"batch {B}: {result[f'same_tokens_b{B}']}" for B in gen_batches))
    return {**result, "bandwidth": bandwidth, "bound_tps": bound}


def main(args: Args) -> dict:
    rt = training.setup_runtime(args.device, args.dtype)
    print(training.machine_report())
    peak = training.measure_matmul_peak(rt.device, rt.dtype)
    print(f"device {rt.device} ({rt.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (measured)")
    return {name: bench_smollm2(args, rt, peak) if name == "smollm2" else bench(name, args, rt, peak)
            for name in args.presets}


if __name__ == "__main__":
    main(tyro.cli(Args))

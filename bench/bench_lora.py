"""Benchmark LoRA and QLoRA (lora.py) and mixed-adapter serving (serve.py), each against the plain way, in one process.

    python bench/bench_lora.py memory                             # NF4's errors; peak memory: full vs LoRA vs QLoRA
    python bench/bench_lora.py serving                            # random adapters on a base of the skills.py size
    python bench/bench_lora.py serving --run-dir runs/skills      # the adapters skills.py trained, on their tasks

`memory`: NF4 quantization of torch.randn(1024, 1024) at block size 64 (mean absolute and relative error against
the bounds of bitsandbytes' own test, bytes per weight with and without double quantization), then the peak tensor
memory of two AdamW steps of one GPT fine-tuned fully, with LoRA and with QLoRA on the same batch. On CUDA the peak
is torch.cuda.max_memory_allocated; on CPU, where PyTorch keeps no allocator statistics, training.PeakMemory tracks
every tensor storage alive, operation by operation (forward, backward and the optimizer).

`serving`: requests for several adapters served three ways: as one mixed batch (lora.MultiLoRALinear, each row its
own adapter), as one batch per adapter on that adapter's merged model, and one request at a time on its merged
model. It checks that the mixed batch's greedy completions equal each request's alone (serve.check_mixed_batch),
then measures tokens/s, the ways timed in alternation, best of --rounds.

Each prints the CPU's vector and matrix flags (/proc/cpuinfo) and the load average with its results: other work on
the machine changes the timings.
"""

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
import serve
import skills
import training
from gpt import GPT, GPTConfig, left_pad
from tokenization import CharTokenizer
from training import seeded, setup_runtime


@dataclass
class MemoryArgs:
    """NF4's errors and bytes per weight, then the peak memory of full fine-tuning, LoRA and QLoRA."""

    n_layer: int = 6
    """blocks of the GPT whose fine-tuning memory is measured"""
    n_embd: int = 512
    """its width"""
    batch_size: int = 4
    """sequences per training step"""
    block_size: int = 128
    """tokens per sequence"""
    rank: int = 8
    """LoRA rank of the LoRA and QLoRA runs"""
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337


@dataclass
class ServingArgs:
    """A mixed-adapter batch against one merged model per adapter: identical completions, then tokens/s."""

    run_dir: str | None = None
    """a skills.py run whose adapters and held-out prompts to use; default: random adapters on a random base"""
    adapters: int = 3
    """random adapters (without --run-dir)"""
    requests_per_adapter: int = 8
    """requests for each adapter"""
    new_tokens: int = 32
    """tokens generated per request (greedy, no stop: every request makes them all)"""
    n_layer: int = 4
    """blocks of the random base (the default skills.py base: 4 x 128, context 128, 65 characters)"""
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 65
    rank: int = 8
    """rank of the random adapters"""
    rounds: int = 3
    """rounds; each times the three ways, alternating"""
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337


# ----------------------------------------------------------------------------------------------------------------
# Memory: NF4, and the peak of a fine-tuning step


def finetune_peak_memory(model: GPT, rt, batch, steps: int = 2) -> int:
    """Peak bytes of `steps` AdamW steps of model (weights, gradients, optimizer state, activations, temporaries)."""
    opt = training.configure_optimizer(model, 1e-4, 0.0, (0.9, 0.999), rt.device.type)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            training.train_step(model, opt, [batch], rt, 1.0)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with training.PeakMemory([*model.parameters(), *model.buffers()]) as m:
        for _ in range(steps):
            training.train_step(model, opt, [batch], rt, 1.0)
    return m.peak


def nf4_errors(seed: int = 0) -> dict:
    """NF4 on torch.randn(1024, 1024) at block size 64, as bitsandbytes' test_4bit_quant measures it: mean absolute
    error and mean relative error |x - deq| / (|x| + 1e-8); bytes stored per weight; with and without double
    quantization."""
    x = torch.randn(1024, 1024, generator=seeded(seed, 4))
    out = {}
    for dq in (False, True):
        q = lora.quantize_nf4(x, 64, double_quant=dq)
        err = (x - lora.dequantize_nf4(q)).abs()
        out["double_quant" if dq else "plain"] = {"mean_abs_err": err.mean().item(),
                                                  "mean_rel_err": (err / (x.abs() + 1e-8)).mean().item(),
                                                  "bytes_per_param": lora.storage_bytes(q) / x.numel()}
    return out


def memory(args: MemoryArgs) -> dict:
    rt = setup_runtime(args.device, args.dtype)
    print(training.machine_report())
    report = {"nf4": nf4_errors(args.seed)}
    for k, v in report["nf4"].items():
        print(f"NF4 {k:12s}: mean abs error {v['mean_abs_err']:.6f} (bitsandbytes' bound 0.0733), mean relative "
              f"error {v['mean_rel_err']:.6f} (bound 0.2057), {v['bytes_per_param']:.4f} bytes per weight")
    cfg = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=8, n_embd=args.n_embd)
    x = torch.randint(cfg.vocab_size, (args.batch_size, args.block_size + 1), generator=seeded(args.seed, 5))
    batch = (x[:, :-1].to(rt.device), x[:, 1:].to(rt.device))
    report["peak"] = {}
    for way in ("full fine-tune", "LoRA", "QLoRA"):
        torch.manual_seed(args.seed)
        model = GPT(cfg).to(rt.device)
        if way != "full fine-tune":
            lora.apply_lora(model, args.rank, 2.0 * args.rank, qlora=way == "QLoRA")
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        peak = finetune_peak_memory(model, rt, batch)
        report["peak"][way] = {"peak_bytes": peak, "weight_bytes": weights,
                               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        del model
    full = report["peak"]["full fine-tune"]["peak_bytes"]
    print(f"GPT {args.n_layer} layers x {args.n_embd} wide, batch {args.batch_size}x{args.block_size}, AdamW, "
          f"device {rt.device} ({rt.dtype}):")
    for way, v in report["peak"].items():
        print(f"  {way:15s} peak {v['peak_bytes'] / 2**20:8.1f} MiB ({v['peak_bytes'] / full:.2f}x full), weights "
              f"{v['weight_bytes'] / 2**20:7.1f} MiB, {v['trainable']:,} trainable parameters")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Serving: one mixed batch against one merged model per adapter


@torch.no_grad()
def serving_throughput(multi: GPT, names: list[str], merged: dict, requests, tokenizer, rt, new_tokens=32, rounds=3):
    """Tokens/s generating `requests` (prompt, adapter) three ways: one mixed batch (per-row adapters), one batch per
    adapter on its merged model, one request at a time on its merged model. Greedy, no stop token: every row makes
    new_tokens."""
    by_adapter = {a: [p for p, b in requests if b == a] for a in names}
    ids = [names.index(a) + 1 for _, a in requests]

    def gen(model, prompts, rows):
        idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=rt.device)
        with lora.adapter_rows(model, rows), rt.autocast():
            model.generate(idx, new_tokens, temperature=0.0, attention_mask=mask)

    ways = {
        "mixed batch": lambda: gen(multi, [p for p, _ in requests], torch.tensor(ids, device=rt.device)),
        "batch per adapter": lambda: [gen(merged[a], ps, None) for a, ps in by_adapter.items() if ps],
        "one request at a time": lambda: [gen(merged[a], [p], None) for p, a in requests],
    }
    best = {k: float("inf") for k in ways}
    for _ in range(rounds):  # alternate the ways so that load from other processes hits them alike
        for k, fn in ways.items():
            training.sync(rt.device)
            t0 = time.perf_counter()
            fn()
            training.sync(rt.device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: len(requests) * new_tokens / t for k, t in best.items()}


def random_deployment(args: ServingArgs, root: Path):
    """A random base, `args.adapters` random rank-r adapters saved under root, random prompts of 16 to 64 tokens."""
    tok = CharTokenizer("".join(chr(33 + i) for i in range(args.vocab_size)))
    torch.manual_seed(args.seed)
    base = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=4,
                         n_embd=args.n_embd)).eval()
    adapters = {}
    for i in range(args.adapters):
        model = GPT(base.config)
        model.load_state_dict(base.state_dict())
        lora.apply_lora(model, args.rank, 2.0 * args.rank)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lora.LoRALinear):
                    m.lora_B.normal_(0, 0.02, generator=seeded(args.seed, i))
        adapters[f"adapter{i}"] = root / f"adapter{i}"
        lora.save_adapter(model, adapters[f"adapter{i}"])
    g = seeded(args.seed, 7)
    n = min(64, args.block_size - args.new_tokens)
    requests = [(tok.decode(torch.randint(args.vocab_size, (int(torch.randint(16, n + 1, (1,), generator=g)),),
                                          generator=g).tolist()), a)
                for _ in range(args.requests_per_adapter) for a in adapters]
    return base, tok, adapters, requests, False


def trained_deployment(args: ServingArgs, rt):
    """A skills.py run's base and adapters; requests are held-out prompts of each adapter's own task."""
    adapters = skills.adapter_dirs(args.run_dir)
    _, peft_config, ours = lora.read_adapter(next(iter(adapters.values())))
    base, tok = skills.load_base(peft_config["base_model_name_or_path"], rt.device)
    tasks = skills.build_tasks(tok, max_chars=min(128, base.config.block_size))
    room = base.config.block_size - args.new_tokens
    fits = {a: [e["prompt"] for e in tasks[a]["test"] if len(tok.encode(e["prompt"])) <= room] for a in adapters}
    requests = [(fits[a][i], a) for i in range(args.requests_per_adapter) for a in adapters]
    return base, tok, adapters, requests, bool(ours.get("qlora"))


def serving(args: ServingArgs) -> dict:
    rt = setup_runtime(args.device, args.dtype)
    print(training.machine_report())
    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir:
            base, tok, adapters, requests, qlora = trained_deployment(args, rt)
        else:
            base, tok, adapters, requests, qlora = random_deployment(args, Path(tmp))
        base = base.to(rt.device)
        multi, names = lora.build_multi_adapter(base, adapters, qlora=qlora)
        merged = {a: lora.merged_model(base, adapters[a], qlora) for a in names}
    check = serve.check_mixed_batch(multi, names, merged, requests, tok, rt, args.new_tokens)
    print(f"{base.num_params() / 1e6:.2f}M-parameter base, {len(names)} adapters, {len(requests)} requests x "
          f"{args.new_tokens} new tokens, device {rt.device} ({rt.dtype})")
    print(f"mixed batch: {check['identical_completions']}/{check['requests']} greedy completions identical to each "
          f"request served by its own merged model; max |logit difference| {check['max_abs_logit_diff']:.2e}")
    tput = serving_throughput(multi, names, merged, requests, tok, rt, args.new_tokens, args.rounds)
    print("\n| way | tokens/s | of the mixed batch |\n|---|---:|---:|")
    for way, v in tput.items():
        print(f"| {way} | {v:,.0f} | {v / tput['mixed batch']:.2f}x |")
    return {"mixed_batch": check, "throughput_tokens_per_s": tput}


if __name__ == "__main__":
    cli = tyro.cli(Annotated[MemoryArgs, tyro.conf.subcommand("memory")]
                   | Annotated[ServingArgs, tyro.conf.subcommand("serving")])
    try:
        (memory if isinstance(cli, MemoryArgs) else serving)(cli)
    except (training.InputError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

"""training.py: the run-time plumbing every training script of the project shares.

Device and precision (`setup_runtime`, `Runtime`), AdamW with decay and no-decay groups, the warmup + cosine
schedule, the token-normalised `train_step` (micro-batches, gradient accumulation, DDP), seeded draws that make a
resumed run draw exactly what the uninterrupted run drew, atomic checkpoints and resume, progress logging, and
`InputError`, the one kind of error a user's bad input raises. The models (minigpt.py, minibert.py) and the
algorithms (sft.py, dpo.py, ...) import it; it imports none of them.

Nothing here runs on its own: `python minigpt.py --help` shows a script that uses all of it.
"""

import json
import math
import os
import shutil
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm


class InputError(Exception):
    """Bad input from the user (a file, a field, an option): printed as one line, then exit status 1."""


@dataclass
class RunArgs:
    """The options every training script takes first, with the same names and meanings (a script's own Args
    inherits them and sets its own run_name)."""

    seed: int = 1337
    """random seed; every random choice of a run is a function of (seed, rank, step)"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda', 'cuda:1'"""
    dtype: str = "auto"
    """'auto' (bfloat16 autocast on CUDA where supported, and on a CPU whose bf16 matmul measures faster; else
    float32), 'bfloat16' or 'float32'"""
    compile: bool = False
    """compile the model with torch.compile"""
    track: bool = False
    """log metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "minillm"
    """Weights & Biases project"""
    run_name: str = "run"
    """name of the run: checkpoints go to <output-dir>/<run-name>/"""
    output_dir: str = "runs"
    """directory that holds the runs"""
    resume: bool = False
    """continue the run in <output-dir>/<run-name>/ from its latest checkpoint"""

# ----------------------------------------------------------------------------------------------------------------
# Seeded draws


def derived_seed(*keys: int) -> int:
    """A seed that is a pure function of keys, e.g. (seed, rank, step): a resumed run draws exactly what the
    uninterrupted run drew, with no RNG state to save."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def seeded(*keys: int, device="cpu") -> torch.Generator:
    """A generator seeded with derived_seed(*keys)."""
    return torch.Generator(device).manual_seed(derived_seed(*keys))

# ----------------------------------------------------------------------------------------------------------------
# Device, precision and measurement


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Pick the device (CUDA, then MPS, then CPU), the precision, and join the process group under torchrun."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                                       ("WORLD_SIZE", 1)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available here (use --device cpu, or auto)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for fp32 matmuls
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dtype == "auto":
        if dev.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            dtype = cpu_autocast_dtype(verbose=rank == 0) if dev.type == "cpu" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise InputError(f"--dtype {dtype!r}: expected 'auto', 'bfloat16' or 'float32'")
    return Runtime(dev, getattr(torch, dtype), rank, local_rank, world)


_CPU_DTYPE: dict[str, str] = {}  # the probe's answer, measured once per process


def cpu_info() -> dict:
    """The first processor's fields of /proc/cpuinfo ('model name', 'flags', ...); empty where there is none."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    return info


def machine_report() -> str:
    """The CPU's model, its vector and matrix flags, and the load average: what a benchmark's timings depend on
    (machines of one kind differ, and two jobs on 2 cores run each 2.5-3x slower)."""
    info = cpu_info()
    flags = [f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"CPU {info.get('model name', '?')}, {os.cpu_count()} cores, flags: {' '.join(flags) or '-'}; "
            f"load average {load}; torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")


def cpu_autocast_dtype(verbose: bool = True, n: int = 1024, reps: int = 4) -> str:
    """'bfloat16' where this CPU has bf16 matrix instructions (avx512_bf16 or AMX) and a bf16 matmul measures at
    least 1.3x as fast as fp32's, else 'float32'. Measured, not assumed: machines of one kind differ by three orders
    of magnitude (a 2048^2 bf16 matmul at 0.3 GFLOP/s on one, at 734 against fp32's 166 on another with
    avx512_bf16). MINILLM_CPU_BF16=0 turns bf16 off (the tests pin fp32 so)."""
    if "dtype" in _CPU_DTYPE:
        return _CPU_DTYPE["dtype"]
    hardware = sorted(set(cpu_info().get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})
    speed = {}
    if hardware and os.environ.get("MINILLM_CPU_BF16", "1") != "0":
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            a @ b  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            speed[dt] = 1 / (time.perf_counter() - t0)
    ratio = speed[torch.bfloat16] / speed[torch.float32] if speed else 0.0
    _CPU_DTYPE["dtype"] = "bfloat16" if ratio >= 1.3 else "float32"
    if verbose:
        why = (f"bf16 matmul {ratio:.1f}x fp32's, {'/'.join(hardware)}" if speed else
               "no bf16 matrix instructions" if not hardware else "MINILLM_CPU_BF16=0")
        print(f"--dtype auto: {_CPU_DTYPE['dtype']} on this CPU ({why})", file=sys.stderr)  # a log, not output
    return _CPU_DTYPE["dtype"]


def sync(device):
    """Wait for the device's queued work, so that a wall-clock time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype=torch.float32, reps: int = 3) -> float:
    """FLOP/s of a large square matmul in the run's dtype on this device: the denominator of MFU. Measured, not
    looked up, so that CPUs and any GPU get a peak (it is at or a little below the vendor's figure)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)

class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive at the same time while active, tracked operation by operation (forward,
    backward and the optimizer all dispatch through here); the `existing` tensors (a model's weights, say) count from
    the start. Every op's outputs are recorded as they are created; a weak reference to each storage takes its bytes
    off when it is freed. Works on any device, including for DTensor shards (their local tensors count); on CUDA
    torch.cuda.max_memory_allocated says the same, on CPU PyTorch keeps no allocator statistics."""

    def __init__(self, existing=()):
        super().__init__()
        self.seen = WeakIdKeyDictionary()
        self.live = self.peak = 0
        for t in existing:
            self._track(t.untyped_storage())

    def _track(self, st):
        n = st.nbytes()
        if st not in self.seen and n > 0:
            self.seen[st] = weakref.ref(st, lambda _ref, n=n: self._freed(n))
            self.live += n
            self.peak = max(self.peak, self.live)

    def _freed(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, DTensor):
                t = t.to_local()
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t.untyped_storage())
        return out


# ----------------------------------------------------------------------------------------------------------------
# Optimisation


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type="cpu",
                        eps: float = 1e-8):
    """AdamW (Loshchilov & Hutter 2019); weight decay on matrices (linears, embeddings) only, not on biases and
    LayerNorm gains. Fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def lr_at(it: int, lr: float, min_lr: float, warmup: int, total: int, decay: str = "cosine") -> float:
    """Linear warmup over `warmup` steps, then decay to min_lr at `total`: cosine (Loshchilov & Hutter 2017), or
    linear (BERT's schedule, Devlin et al. 2019, appendix A.2)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    left = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + left * (lr - min_lr)


def lm_loss_sum(model, batch):
    """Summed next-token cross-entropy of a batch (x, y): the default loss_fn of train_step."""
    x, y = batch
    return model(x, y, reduction="sum")[1]


def count_targets(batch) -> int:
    """Number of counted targets (not -100) of a batch (x, y): the default count_fn of train_step."""
    return int((batch[1] != -100).sum())


def train_step(model, optimizer, micro_batches, rt: Runtime, grad_clip: float, loss_fn=lm_loss_sum,
               count_fn=count_targets):
    """One optimizer step over micro-batches; returns (mean loss per counted target, gradient norm).

    The loss is the sum over every counted target of all micro-batches and all processes, divided by their number,
    so k micro-batches of b rows give exactly the gradient of one batch of k*b rows, whatever each holds.
    loss_fn(model, batch) -> summed loss; count_fn(batch) -> number of targets in it. Under DDP gradients are
    all-reduced (averaged) on the last micro-batch only; the world-size factor turns that mean back into the sum.
    """
    n_tokens = sum(count_fn(b) for b in micro_batches)
    n_global = torch.tensor(float(n_tokens), device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(n_global)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (model.no_sync() if rt.world_size > 1 and not last else nullcontext()), rt.autocast():
            loss_sum = loss_fn(model, batch)
        (loss_sum * rt.world_size / n_global).backward()
        total += loss_sum.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(n_tokens, 1), norm.item()

# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and progress


def atomic_write(path: Path, write):
    """write(tmp_path) then rename over path: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, step: int, meta: dict, extra=None):
    """runs/<run>/step-NNNNNN/: a Hugging Face model directory, plus the optimizer state and the run's metadata
    (and whatever extra(directory) writes, e.g. a LoRA adapter). The directory is complete before the `latest`
    symlink is switched to it (atomically); older ones are removed."""
    ckpt = run_dir / f"step-{step:06d}"
    tmp = run_dir / f".{ckpt.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "train_state.pt")
    (tmp / "run.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    if extra is not None:
        extra(tmp)
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)
    link = run_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, run_dir / "latest")
    for old in run_dir.glob("step-*"):
        if old != ckpt:
            shutil.rmtree(old)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer=None) -> dict:
    """Load runs/<run>/latest into model (and optimizer); returns the run's metadata with the step reached."""
    ckpt = run_dir / "latest"
    if not (ckpt / "train_state.pt").exists():
        raise InputError(f"--resume: no checkpoint in {run_dir} (expected {ckpt}/train_state.pt)")
    model.load_hf_state_dict(load_file(ckpt / "model.safetensors"), str(ckpt.resolve() / "model.safetensors"))
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return json.loads((ckpt / "run.json").read_text())


class Logger:
    """Progress a person can watch: one line per interval on stdout, the same metrics to wandb with --track."""

    def __init__(self, args, master: bool):
        self.master, self.wandb = master, None
        if master and args.track:
            import wandb  # imported only when asked for

            self.wandb = wandb.init(project=args.wandb_project, name=args.run_name, config=asdict(args))

    def log(self, metrics: dict, step: int, line: bool = True):
        if not self.master:
            return
        if line:
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()

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
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from assets import resolve_pretrained


class InputError(Exception):
    """Bad input from the user (a file, a field, an option, a directory or disk that cannot take a run): printed as
    one line, then exit status 1."""


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
    """continue the run in <output-dir>/<run-name>/ from its latest checkpoint, with the run's own saved arguments
    (an option given again must equal the saved one, except those that cannot change the result, e.g. --max-iters)"""
    overwrite: bool = False
    """start a new run in <output-dir>/<run-name>/ even though it holds one (its checkpoint is replaced); without it
    such a run is refused"""

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
    if verbose and speed:  # a measurement decided: say what it found (a CPU without bf16 simply stays fp32)
        print(f"--dtype auto: {_CPU_DTYPE['dtype']} on this CPU (bf16 matmul {ratio:.1f}x fp32's, "
              f"{'/'.join(hardware)})", file=sys.stderr)  # a log line, not output
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


def _reason(e: Exception) -> str:
    """The first line of an exception's message (safetensors' and torch's run over several)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def read_json(path: Path, what: str = "JSON") -> dict:
    """A JSON object from a file; a missing, unreadable or damaged file is an InputError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: damaged, not {what} ({_reason(e)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: damaged, expected a JSON object")
    return value


def read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file (which holds no code to run); a truncated or garbled file is an InputError
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError, for a damaged file
        raise InputError(f"{path}: damaged, not a complete safetensors file ({_reason(e)})") from None


def read_torch(path: Path) -> dict:
    """A torch.save'd state (tensors, numbers, dicts and lists only: weights_only, nothing is unpickled that could run
    code); a truncated or garbled file is an InputError naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # a damaged zip, pickle stream or storage raises any of a dozen types
        raise InputError(f"{path}: damaged, not a complete torch state file ({_reason(e)})") from None


def verify_checkpoint(run_dir: Path) -> dict:
    """Check <run_dir>/latest before a resumed run spends any time: its run.json parses, model.safetensors is
    complete (safetensors checks the header against the file's length), and every member of train_state.pt (a zip
    archive) matches its CRC-32. Returns the run's metadata (run.json). Cheap: no tensor is built."""
    ckpt = Path(run_dir) / "latest"
    if not (ckpt / "train_state.pt").exists():
        raise InputError(f"--resume: no checkpoint in {run_dir} (expected {ckpt}/train_state.pt)")
    meta = read_json(ckpt / "run.json", "a run's metadata")
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("args", {}), dict):
        raise InputError(f"{ckpt / 'run.json'}: damaged, expected the step and the arguments of the run")
    adapter = ckpt / "adapter" / "adapter_model.safetensors"  # a LoRA run's (policy.save_policy)
    for path in [ckpt / "model.safetensors"] + [adapter] * adapter.exists():
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except Exception as e:  # missing, truncated (shorter than its header says), a garbled header
            raise InputError(f"{path}: damaged, not a complete safetensors file ({_reason(e)})") from None
    state = ckpt / "train_state.pt"
    try:
        with zipfile.ZipFile(state) as z:
            bad = z.testzip()
    except Exception as e:  # not a zip archive, a truncated one, a garbled header
        raise InputError(f"{state}: damaged, not a complete torch state file ({_reason(e)})") from None
    if bad is not None:
        raise InputError(f"{state}: damaged (its member {bad} fails its checksum)")
    return meta


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, step: int, meta: dict, extra=None):
    """runs/<run>/step-NNNNNN/: a Hugging Face model directory, plus the optimizer state and the run's metadata
    (and whatever extra(directory) writes, e.g. a LoRA adapter). The directory is complete before the `latest`
    symlink is switched to it (atomically); older ones are removed. A write that fails (a full disk) removes the
    half-written directory and raises an InputError saying so: the previous checkpoint is left as it was."""
    ckpt = run_dir / f"step-{step:06d}"
    tmp = run_dir / f".{ckpt.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "train_state.pt")
        (tmp / "run.json").write_text(json.dumps({**meta, "step": step}, indent=2))
        if extra is not None:
            extra(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:
        # a full disk reaches here as an OSError (json, shutil), a RuntimeError (torch.save's zip writer: "file write
        # failed") or a SafetensorError (save_file); any other RuntimeError is not about writing: let it through
        if isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free / 2**20
        kept = f"; the previous checkpoint, {run_dir / 'latest'}, is intact" if (run_dir / "latest").exists() else ""
        why = getattr(e, "strerror", None) or _reason(e)
        raise InputError(f"cannot write the checkpoint of step {step} to {run_dir} ({why}; {free:,.0f} MiB free "
                         f"there){kept}") from None
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)
    link = run_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, run_dir / "latest")
    for old in run_dir.glob("step-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer=None) -> dict:
    """Load runs/<run>/latest into model (and optimizer); returns the run's metadata with the step reached. A missing
    or damaged file is an InputError naming it."""
    ckpt = run_dir / "latest"
    if not (ckpt / "train_state.pt").exists():
        raise InputError(f"--resume: no checkpoint in {run_dir} (expected {ckpt}/train_state.pt)")
    meta = read_json(ckpt / "run.json", "a run's metadata")
    model.load_hf_state_dict(read_safetensors(ckpt / "model.safetensors"), str(ckpt.resolve() / "model.safetensors"))
    state = read_torch(ckpt / "train_state.pt")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:  # another optimizer's state, or another model's
            raise InputError(f"{ckpt / 'train_state.pt'}: its optimizer state does not fit this run "
                             f"({_reason(e)})") from None
    return meta

# ----------------------------------------------------------------------------------------------------------------
# Checks before a run starts: its arguments, its directory, and the run it resumes (one line each, before any work)


def flag(name: str) -> str:
    """The command-line option of an argument field, as a user types it: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _show(name: str, value) -> str:
    """An option and its value as typed: --batch-size 8, --packing / --no-packing, --tasks qa speech."""
    if isinstance(value, bool):
        return flag(name) if value else f"--no-{name.replace('_', '-')}"
    if isinstance(value, (list, tuple)):
        return f"{flag(name)} {' '.join(map(str, value))}"
    return f"{flag(name)} {value}"


POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
PROBABILITY = (lambda v: 0 <= v < 1, "0 <= p < 1")
# The fields the scripts share, by name: (test, what is expected). NaN fails every test. A script passes the rules of
# its own fields to check_args; a field that is None (an optional value left unset) is not checked.
ARG_RULES = {
    **dict.fromkeys(("batch_size", "grad_accum_steps", "max_iters", "total_steps", "steps", "epochs", "ppo_epochs",
                     "minibatch_size", "micro_batches", "eval_interval", "log_interval", "eval_iters",
                     "final_eval_iters", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
                     "intermediate_size", "max_len", "max_new_tokens", "num_samples", "n_train", "n_test",
                     "n_eval_prompts", "n_train_prompts", "n_test_prompts", "n_judge_prompts", "eval_examples",
                     "max_context", "learning_rate", "scratch_learning_rate", "top_k"), POSITIVE),
    **dict.fromkeys(("min_lr", "warmup_iters", "warmup_steps", "weight_decay", "grad_clip", "temperature",
                     "sample_tokens", "lora_rank"), NON_NEGATIVE),
    **dict.fromkeys(("dropout", "lora_dropout", "beta1", "beta2", "warmup_fraction"), PROBABILITY),
    **dict.fromkeys(("val_fraction", "mlm_probability"), FRACTION),
    "top_p": (lambda v: 0 < v <= 1, "0 < p <= 1"),
    "label_noise": (lambda v: 0 <= v <= 1, "0 <= p <= 1"),
}


def check_args(args, rules: dict | None = None):
    """Refuse a value no run can use, naming the option as typed: `--batch-size 0: expected > 0`. The rules are
    ARG_RULES (the fields the scripts share) and the script's own."""
    rules = {**ARG_RULES, **(rules or {})}
    for f in fields(args):
        value, rule = getattr(args, f.name), rules.get(f.name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        test, expected = rule
        if not test(value):
            raise InputError(f"{_show(f.name, value)}: expected {expected}")


def check_writable(directory: Path):
    """Create the directory (and its parents) and write a file in it now, rather than fail at the first checkpoint,
    minutes into a run: a read-only place, or a file where a directory must be, is an InputError."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the run to {directory} ({e.strerror or _reason(e)}): give a writable "
                         "--output-dir") from None


def check_run_dir(run_dir: Path, resume: bool = False, overwrite: bool = False, marker: str = "latest",
                  can_resume: bool = True) -> dict | None:
    """The run directory, checked before any work: a new run into a directory that holds one (its `marker`, the
    `latest` checkpoint) is refused unless overwrite, saying how to continue it or where to put a new one; a resumed
    run's checkpoint must be complete (verify_checkpoint); the directory must take files (check_writable). Returns
    the resumed run's metadata (run.json), or None for a new run."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise InputError("--resume continues the run and --overwrite replaces it: give one of them")
    meta = None
    if resume:
        meta = verify_checkpoint(run_dir)
    elif not overwrite and (os.path.lexists(run_dir / marker)):
        try:
            at = f" at step {read_json(run_dir / marker / 'run.json')['step']}"
        except (InputError, KeyError):
            at = ""
        how = "continue it with --resume, " if can_resume else ""
        raise InputError(f"{run_dir} already holds a run ({run_dir / marker}{at}): {how}start a new one elsewhere "
                         f"with --run-name NAME or --output-dir DIR, or replace it with --overwrite")
    check_writable(run_dir)
    return meta


# Fields a resumed run may change without changing what it computes: how long it runs (the schedule then ends at
# the new total), how often it evaluates, logs and checkpoints (evaluations draw from their own seeds), where its
# metrics go, where it runs. Every other field must equal the run's own.
RESUMABLE = frozenset({"max_iters", "total_steps", "eval_interval", "log_interval", "track", "wandb_project",
                       "device", "dtype", "compile"})
_LOCATION = frozenset({"resume", "overwrite", "run_name", "output_dir"})  # they find the run; they are not its own


def saved_args(cls, meta: dict, base=None):
    """An instance of the Args dataclass cls that holds the arguments a run saved in its run.json (meta["args"]); a
    field the run did not save keeps base's value (or its default). JSON lists become tuples again."""
    saved = meta.get("args", {})
    values = {f.name: tuple(saved[f.name]) if isinstance(saved[f.name], list) else saved[f.name]
              for f in fields(cls) if f.init and f.name in saved}
    return replace(base if base is not None else cls(), **values)


def check_resume(args, meta: dict, allowed=RESUMABLE) -> list[str]:
    """Compare a resumed run's arguments with the ones it saved (meta["args"], its run.json): a difference that
    would not continue the run exactly is an InputError naming every such option; the others (allowed) are named in
    one printed line. Returns the options that differ."""
    now, was = json.loads(json.dumps(asdict(args))), meta.get("args", {})  # as JSON holds them: tuples are lists
    differ = [k for k in now if k in was and now[k] != was[k] and k not in _LOCATION]
    refused = [k for k in differ if k not in allowed]
    if refused:
        raise InputError("--resume: " + ", ".join(f"{_show(k, now[k])} (the run has {_show(k, was[k])})"
                                                  for k in refused)
                         + ": the run would not continue exactly; leave them out to resume with the run's own, or "
                         "start a new run with --run-name NAME")
    if differ and os.environ.get("RANK", "0") == "0":
        note = ("; results equal the uninterrupted run's on the same device and precision"
                if {"device", "dtype", "compile"} & set(differ) else "")
        print("resuming with " + ", ".join(f"{_show(k, now[k])} (the run had {_show(k, was[k])})" for k in differ)
              + note)
    return differ


def prepare_run(args, rules: dict | None = None, marker: str = "latest", can_resume: bool = True):
    """What every training script does first, before any work: check_args, check_run_dir, and for --resume
    check_resume against the saved arguments. Returns (run directory, the resumed run's metadata or None)."""
    check_args(args, rules)
    run_dir = Path(args.output_dir) / args.run_name
    meta = check_run_dir(run_dir, getattr(args, "resume", False), getattr(args, "overwrite", False), marker,
                         can_resume)
    if meta is not None:
        check_resume(args, meta)
    return run_dir, meta


def parse_args(cls, args: list[str] | None = None, prog: str | None = None, parsed=None):
    """tyro.cli(cls); with --resume, parsed again with the run's saved arguments as the defaults, so that a resumed
    run has its own arguments and an option typed again is exactly what differs from them (check_resume then names
    it, or refuses it). parsed: the first parse, where a caller made it (a subcommand's arguments)."""
    import tyro

    if parsed is None:
        parsed = tyro.cli(cls, args=args, prog=prog)
    if not getattr(parsed, "resume", False):
        return parsed
    meta = verify_checkpoint(Path(parsed.output_dir) / parsed.run_name)
    return tyro.cli(cls, args=args, prog=prog, default=saved_args(cls, meta, parsed))


def require_checkpoint(path: str, option: str, made_by: str):
    """A checkpoint directory that an earlier stage writes (runs/sft/latest, ...): where it is missing, an InputError
    that names the option and the command that makes it. A hub name (no directory of that name, at most one '/')
    and an offline model's name ('smollm2') are left to the loader."""
    p = Path(resolve_pretrained(path))
    if p.is_dir() or (not p.exists() and not path.startswith((".", "/", "~")) and path.count("/") <= 1):
        return
    raise InputError(f"{option} {path}: no checkpoint there; {made_by} writes it (or give {option} another one)")


def run_command(main, parse):
    """The `__main__` of a script: main(parse()), where bad input (an InputError) or a disk that cannot take the run
    (an OSError) ends the process with one line and exit status 1, no traceback."""
    try:
        main(parse())
    except (InputError, OSError) as e:
        sys.exit(f"error: {e}")


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

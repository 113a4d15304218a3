"""lora.py: LoRA and QLoRA from scratch, and one deployment that serves many task adapters with routing.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained weight W0 and
learns a low-rank update: h = W0 x + (alpha / r) B A x, with A (r, in) and B (out, r), r << min(in, out). rsLoRA
(Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA") scales by alpha / sqrt(r)
instead, so that larger ranks keep learning. QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs") stores the frozen W0 in 4-bit NormalFloat (NF4) with block-wise absmax constants that are
themselves quantized to 8 bits (double quantization), dequantizes in the forward pass and trains LoRA on top.
Serving many adapters over one base in one batch gathers each row's A and B (Punica, Chen et al. 2023; S-LoRA,
Sheng et al. 2023).

This file holds: `LoRALinear`, `NF4Linear`, `apply_lora`, `merge_and_unload`, `save_adapter` / `load_adapter`
(PEFT's layout, so `peft.PeftModel.from_pretrained` loads an adapter onto the exported Hugging Face GPT-2), and
the multi-adapter deployment: three task adapters trained on one frozen base from the offline Shakespeare corpus
(`speech`: continue a speech; `qa`: say who spoke a quoted line of a short exchange; `positive`: write a
positive line on a topic), a router over the prompt, mixed-batch serving and an OpenAI-compatible HTTP server.

The base is a minigpt checkpoint (`--base`, default runs/lora-base/latest). If it is missing, `train` first
pretrains a small character-level GPT there with `minigpt.main` (4 layers, 128 wide, context 128).

Run it:
    python lora.py train                 # base (if missing) + 3 adapters + matrix + router + serving check, ~10 min CPU
    python lora.py train --qlora         # the same with the frozen base in NF4
    python lora.py eval                  # the adapter x task matrix, router accuracy, mixed-batch check and throughput
    python lora.py memory                # NF4 errors, bytes per parameter, peak memory: full vs LoRA vs QLoRA
    python lora.py serve --port 8000     # OpenAI-compatible /v1/completions on localhost
    curl -s localhost:8000/v1/completions -d '{"model": "auto", "prompt": "Say something kind about love:\\n"}'
    python lora.py train --base runs/minigpt/latest   # adapters on another minigpt checkpoint
"""

import copy
import json
import math
import queue
import re
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import minigpt
import training
from assets import DATA_DIR, asset_path
from minigpt import GPT, KVCache, get_tokenizer, left_pad
from training import InputError, Logger, derived_seed, seeded, setup_runtime


@dataclass
class Args:
    # --- common to every script ---
    seed: int = 1337
    """random seed; every random choice of a run is a function of (seed, task, iteration)"""
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
    run_name: str = "lora"
    """name of the run: adapters, router and report go to <output-dir>/<run-name>/"""
    output_dir: str = "runs"
    """directory that holds the runs"""
    resume: bool = False
    """keep the adapters already trained in <output-dir>/<run-name>/ and train only the missing ones"""
    # --- the base and its adapters ---
    base: str = "runs/lora-base/latest"
    """a minigpt checkpoint directory (Hugging Face GPT-2 files + run.json naming the tokenizer); `train` pretrains
    one there with minigpt first if it is missing and the path ends in /latest"""
    qlora: bool = False
    """hold the frozen base in NF4 (QLoRA) instead of float"""
    eval_examples: int = 200
    """held-out examples per task for the matrix, the task scores and the router"""
    serve_requests: int = 8
    """requests per adapter in the mixed-batch check and the throughput measurement"""


@dataclass
class TrainArgs(Args):
    tasks: tuple[str, ...] = ("speech", "qa", "positive")
    """task adapters to train (see TASKS)"""
    rank: int = 8
    """LoRA rank r"""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora)"""
    lora_dropout: float = 0.0
    """dropout on the input of the LoRA branch"""
    rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)"""
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    """module-name patterns (regular expressions matched against the end of a module's dotted name)"""
    steps: int = 250
    """optimizer steps per adapter"""
    batch_size: int = 16
    """examples per step"""
    learning_rate: float = 3e-3
    """peak learning rate of the adapters (warmup, then cosine decay to a tenth)"""
    warmup_steps: int = 20
    """steps of linear warmup"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    log_interval: int = 50
    """steps between log lines"""
    base_iters: int = 800
    """pretraining steps of the base when it has to be made (minigpt, char-level Shakespeare)"""
    base_n_layer: int = 4
    """blocks of the base made by pretraining"""
    base_n_embd: int = 128
    """width of the base made by pretraining"""
    base_block_size: int = 128
    """context of the base made by pretraining (the tasks' examples are at most 128 characters)"""
    base_batch_size: int = 12
    """sequences per step of the base's pretraining"""


@dataclass
class EvalArgs(Args):
    pass


@dataclass
class ServeArgs(Args):
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = 8000
    """port to listen on (0: any free port)"""
    max_batch: int = 16
    """most requests decoded together in one mixed batch"""
    batch_window_ms: float = 5.0
    """how long the batcher waits for more requests after the first one"""


@dataclass
class MemoryArgs(Args):
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


# ----------------------------------------------------------------------------------------------------------------
# LoRA

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention (fused qkv, output) and MLP projections


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """alpha / r (Hu et al. 2021, sec. 4.1), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, eq. 4)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """y = base(x) + scale * B A dropout(x) (Hu et al. 2021, eq. 3), base frozen. base: nn.Linear or NF4Linear.

    A (r, in) starts Kaiming-uniform and B (out, r) at zero, so the layer starts equal to its base (sec. 4.1).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise InputError(f"LoRA rank must be at least 1 (got {r})")
        self.base, self.r, self.alpha, self.rslora = base, r, alpha, rslora
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = lora_scale(alpha, r, rslora)
        for p in base.parameters():
            p.requires_grad_(False)
        dev = next(base.buffers(), None) if isinstance(base, NF4Linear) else base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the reference code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in): the update folded into the weight by merge()."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale  # (..., out)

    @torch.no_grad()
    def merge(self):
        """W <- W + scale B A: the same function with no extra matmul at inference (Hu et al. 2021, sec. 4.1)."""
        if isinstance(self.base, NF4Linear):
            raise InputError("cannot fold an update into a 4-bit weight in place; use merge_and_unload(model)")
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - scale B A: the base weight back (up to float rounding), LoRA branch active again."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
            self.merged = False


def _matches(name: str, targets) -> bool:
    return any(re.search(rf"(^|\.)(?:{t})$", name) for t in targets)


class LoRASummary(dict):
    """apply_lora's report: a dict that prints as one line."""

    def __str__(self):
        return (f"LoRA r={self['r']} alpha={self['alpha']:g} on {len(self['modules'])} modules"
                f"{' (NF4 base)' if self['qlora'] else ''}: {self['trainable']:,} trainable of {self['total']:,} "
                f"parameters ({100 * self['trainable'] / self['total']:.2f}%)")


def apply_lora(model: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, rslora: bool = False, qlora: bool = False) -> LoRASummary:
    """Wrap every nn.Linear whose dotted name ends in one of `targets` (regular expressions) in a LoRALinear, in
    place; with qlora its weight is first quantized to NF4. Every other parameter is frozen. alpha defaults to r
    (scale 1; Hu et al. 2021 set alpha to the first r tried and do not tune it). Returns trainable vs total counts."""
    alpha = float(r if alpha is None else alpha)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise InputError(f"no nn.Linear module of the model matches the LoRA targets {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        base = getattr(owner, child)
        setattr(owner, child, LoRALinear(NF4Linear(base) if qlora else base, r, alpha, dropout, rslora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(m.numel for m in model.modules()
                                                             if isinstance(m, NF4Linear))
    return LoRASummary(r=r, alpha=alpha, rslora=rslora, dropout=dropout, targets=list(targets), qlora=qlora,
                       modules=names, trainable=trainable, total=total)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear and NF4Linear by a plain nn.Linear holding (dequantized W) + scale B A, in place,
    so the model is a plain GPT again (every parameter trainable) that GPT.save_pretrained exports."""
    modules = dict(model.named_modules())
    for name, m in modules.items():
        parent, _, child = name.rpartition(".")
        if not isinstance(m, (LoRALinear, NF4Linear)) or isinstance(modules.get(parent), LoRALinear):
            continue  # an NF4 base inside a LoRALinear is handled with its parent
        base = m.base if isinstance(m, LoRALinear) else m
        w = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.float()
        if isinstance(m, LoRALinear) and not m.merged:
            w = w + m.delta_weight().float()
        dtype = torch.float32 if isinstance(base, NF4Linear) else base.weight.dtype
        lin = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Adapters on disk: PEFT's layout


def _peft_key(module: str, which: str) -> str:
    return f"base_model.model.{module}.lora_{which}.weight"  # which: 'A' (r, in) or 'B' (out, r)


def save_adapter(model: nn.Module, path: str | Path, config: dict | None = None):
    """Write the adapter only: adapter_model.safetensors (A and B of every LoRALinear, PEFT's key names) and
    adapter_config.json (PEFT's LoraConfig). Hugging Face's GPT-2 holds these projections as Conv1D, whose weight is
    the transpose of ours; PEFT's LoRA branch is lora_B(lora_A(x)) on either, so A and B need no transpose, and
    fan_in_fan_out=true tells PEFT to transpose only when it merges. `config` (task name, base, ...) is kept in the
    safetensors metadata, where PEFT does not look."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise InputError("the model has no LoRA layers to save (apply_lora first)")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora) for m in layers.values()):
        raise InputError("save_adapter writes one LoraConfig: every LoRA layer must share r, alpha and rslora")
    tensors = {}
    for n, m in layers.items():
        tensors[_peft_key(n, "A")] = m.lora_A.detach().float().cpu().contiguous()
        tensors[_peft_key(n, "B")] = m.lora_B.detach().float().cpu().contiguous()
    drop = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    peft_config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=first.r, lora_alpha=first.alpha,
                       lora_dropout=drop, use_rslora=first.rslora, target_modules=sorted({n.rpartition(".")[2]
                                                                                          for n in layers}),
                       fan_in_fan_out=True, bias="none", init_lora_weights=True, inference_mode=True,
                       base_model_name_or_path=(config or {}).get("base"), modules_to_save=None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "minillm": json.dumps(config or {})}
    training.atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, f, metadata=meta))
    training.atomic_write(path / "adapter_config.json",
                          lambda f: Path(f).write_text(json.dumps(peft_config, indent=2)))


def read_adapter(path: str | Path) -> tuple[dict, dict, dict]:
    """(module name -> (A, B), PEFT config, our config) of an adapter directory, with clear errors."""
    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise InputError(f"{f}: no such file (an adapter directory holds adapter_config.json and "
                             f"adapter_model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or "r" not in cfg:
        raise InputError(f"{cfg_file}: not a LoRA adapter config (peft_type LORA with r and lora_alpha expected)")
    with safe_open(str(w_file), "pt") as f:
        extra = json.loads((f.metadata() or {}).get("minillm", "{}"))
    tensors, layers = load_file(w_file), {}
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise InputError(f"{w_file}: unexpected tensor {key!r} (expected base_model.model.<module>.lora_A.weight "
                             f"or lora_B.weight)")
        layers.setdefault(m.group(1), {})[m.group(2)] = t
    for name, ab in layers.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != cfg["r"] or ab["B"].shape[1] != cfg["r"]:
            raise InputError(f"{w_file}: module {name} needs lora_A (r={cfg['r']}, in) and lora_B (out, r={cfg['r']})")
    return {n: (ab["A"], ab["B"]) for n, ab in layers.items()}, cfg, extra


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, qlora: bool = False) -> dict:
    """Load an adapter written by save_adapter (or by PEFT) into model, injecting LoRA layers first if it has none.
    Returns the adapter's config (PEFT's fields plus ours)."""
    layers, cfg, extra = read_adapter(path)
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        targets = [re.escape(n) for n in layers]
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), targets,
                   cfg.get("use_rslora", False), qlora)
    own = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if set(own) != set(layers):
        raise InputError(f"{path}: adapter modules {sorted(set(layers) - set(own))[:3]} missing from the model, or "
                         f"model LoRA modules {sorted(set(own) - set(layers))[:3]} missing from the adapter")
    for name, (a, b) in layers.items():
        m = own[name]
        if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise InputError(f"{path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the model expects "
                             f"{tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)}")
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)
        m.scale = lora_scale(cfg["lora_alpha"], cfg["r"], cfg.get("use_rslora", False))
    return {**cfg, **extra}


# ----------------------------------------------------------------------------------------------------------------
# QLoRA: 4-bit NormalFloat with double quantization (Dettmers et al. 2023, sec. 3)


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values. QLoRA eq. (4) places the k-bit code at quantiles of N(0, 1); to have an exact zero it takes
    8 quantiles on the positive side and 7 on the negative, from 0.5 up to an offset of 0.9677 (halfway between
    1 - 1/(2*15) and 1 - 1/(2*16)), then scales into [-1, 1] (bitsandbytes' create_normal_map)."""
    offset = (1 - 1 / 30 + 1 - 1 / 32) / 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.max()).float()


NF4 = nf4_code()


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True, dq_block_size: int = 256) -> dict:
    """Block-wise absmax NF4 (QLoRA sec. 3): each block of `block_size` weights is divided by its absmax and each
    value is replaced by the nearest of the 16 NF4 values; two 4-bit codes are packed per byte. With double_quant the
    fp32 absmax constants are centred on their mean and quantized to int8 per block of `dq_block_size` (QLoRA's
    "Double Quantization"; the paper uses 8-bit floats there, this uses symmetric linear int8: the same storage)."""
    flat = w.detach().float().flatten()
    n = flat.numel()
    flat = F.pad(flat, (0, (-n) % block_size)).view(-1, block_size)  # (n_blocks, block_size)
    absmax = flat.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    code = NF4.to(w.device)
    codes = torch.bucketize(flat / absmax[:, None], (code[1:] + code[:-1]) / 2).to(torch.uint8).flatten()
    codes = F.pad(codes, (0, codes.numel() % 2))
    q = {"packed": (codes[0::2] << 4) | codes[1::2], "shape": torch.tensor(w.shape), "block_size": block_size}
    if not double_quant:
        return {**q, "absmax": absmax}
    mean = absmax.mean()
    c = F.pad(absmax - mean, (0, (-absmax.numel()) % dq_block_size)).view(-1, dq_block_size)
    scale = c.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return {**q, "absmax_q": torch.round(c / scale[:, None]).to(torch.int8).flatten(), "absmax_scale": scale,
            "absmax_mean": mean, "n_blocks": absmax.numel()}


def dequantize_absmax(q: dict) -> torch.Tensor:
    """The per-block absmax constants, (n_blocks,), undoing the double quantization if there is one."""
    if "absmax" in q:
        return q["absmax"]
    s = q["absmax_scale"]
    return (q["absmax_q"].view(s.numel(), -1).float() * s[:, None]).flatten()[:q["n_blocks"]] + q["absmax_mean"]


def dequantize_nf4(q: dict, dtype=torch.float32) -> torch.Tensor:
    """Unpack the codes, look up the NF4 values, multiply by each block's absmax: the weight in `dtype`."""
    p = q["packed"]
    codes = torch.stack([p >> 4, p & 15], dim=-1).flatten().long()  # the two nibbles of each byte, in order
    shape = tuple(q["shape"].tolist())
    n = math.prod(shape)
    values = NF4.to(p.device)[codes[:dequantize_absmax(q).numel() * q["block_size"]]].view(-1, q["block_size"])
    return (values * dequantize_absmax(q)[:, None]).flatten()[:n].view(shape).to(dtype)


def storage_bytes(q: dict) -> int:
    """Bytes of the tensors a quantized weight keeps: packed codes and (quantized) absmax constants."""
    return sum(t.numel() * t.element_size() for k, t in q.items() if isinstance(t, torch.Tensor) and k != "shape")


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized on the fly. Only the 4-bit codes are kept for backward, where W is dequantized
    again for dL/dx = dL/dy W (QLoRA's memory saving; W is frozen, so it gets no gradient)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4 (0.516 bytes per weight with double quantization, against 4 in fp32). The
    forward pass dequantizes to the compute dtype (the autocast dtype where autocast is on); the bias stays float."""

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = True, dq_block_size: int = 256):
        super().__init__()
        self.in_features, self.out_features, self.numel = linear.in_features, linear.out_features, linear.weight.numel()
        q = quantize_nf4(linear.weight, block_size, double_quant, dq_block_size)
        self.block_size = q.pop("block_size")
        self.n_blocks = q.pop("n_blocks", None)
        for k, t in q.items():
            self.register_buffer(k, t)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quant_state(self) -> dict:
        q = {k: b for k, b in self.named_buffers(recurse=False)}
        return {**q, "block_size": self.block_size, **({"n_blocks": self.n_blocks} if self.n_blocks else {})}

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.quant_state(), dtype)  # (out, in)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Many adapters on one base: per-row adapters in one batch


class MultiLoRALinear(nn.Module):
    """A frozen base linear and a bank of adapters; row b of the batch adds adapter ids[b]'s update (index 0 is the
    bare base, all zeros). Each row's A and B are gathered from the bank, then batched matmuls apply them: one
    forward for rows of different adapters (Punica's SGMV, Chen et al. 2023, written as gather + bmm). Adapters
    of lower rank are zero-padded to the largest, which adds exactly nothing."""

    def __init__(self, base: nn.Module, adapters: list):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        r = max([1] + [a.shape[0] for a, _, _ in adapters if a is not None])
        A = torch.zeros(len(adapters) + 1, r, self.in_features)
        B = torch.zeros(len(adapters) + 1, self.out_features, r)
        for i, (a, b, scale) in enumerate(adapters, start=1):
            if a is not None:
                A[i, :a.shape[0]], B[i, :, :a.shape[0]] = a, b * scale  # scale folded into B
        dev = next(iter(base.buffers() if isinstance(base, NF4Linear) else base.parameters())).device
        self.register_buffer("A", A.to(dev))  # (n_adapters + 1, r, in)
        self.register_buffer("B", B.to(dev))  # (n_adapters + 1, out, r)
        self.ids: torch.Tensor | None = None  # (batch,) adapter of each row, set by adapter_rows()

    def forward(self, x):  # x (B, T, in)
        y = self.base(x)
        if self.ids is None:
            return y
        a, b = self.A[self.ids].to(x.dtype), self.B[self.ids].to(x.dtype)  # (B, r, in), (B, out, r)
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def build_multi_adapter(base: GPT, adapters: dict[str, str | Path], qlora: bool = False) -> tuple[GPT, list[str]]:
    """A copy of base serving every adapter in `adapters` (name -> adapter directory) at once. Returns the model
    and its adapter names; name i is id i + 1 (0: the bare base)."""
    model = copy.deepcopy(base).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names, banks = list(adapters), {}
    for i, name in enumerate(names):
        layers, cfg, _ = read_adapter(adapters[name])
        scale = lora_scale(cfg["lora_alpha"], cfg["r"], cfg.get("use_rslora", False))
        for module, (a, b) in layers.items():
            banks.setdefault(module, [(None, None, 0.0)] * len(names))[i] = (a.float(), b.float(), scale)
    own = dict(model.named_modules())
    for module, bank in banks.items():
        if not isinstance(own.get(module), nn.Linear):
            raise InputError(f"adapter module {module} is not a linear layer of the base model")
        base_layer = NF4Linear(own[module]) if qlora else own[module]
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, MultiLoRALinear(base_layer, bank))
    return model, names


@contextmanager
def adapter_rows(model: nn.Module, ids: torch.Tensor | None):
    """Within the block, row b of every batch the model sees uses adapter ids[b] (None: the bare base)."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    for m in layers:
        m.ids = ids
    try:
        yield
    finally:
        for m in layers:
            m.ids = None


# ----------------------------------------------------------------------------------------------------------------
# Tasks: (prompt, completion) pairs made from the offline corpus. Each task has two families of prompt templates;
# adapters train on both, the router trains on family 0 and is scored on family 1 of held-out examples.

TASKS = {
    "speech": "continue a speech: the speaker and a line, then the next line",
    "qa": "answer a question about a play: who, in a two-line exchange, said a quoted phrase",
    "positive": "write positively: a line of positive sentiment (VADER compound >= 0.6) on a topic word of it",
}
TEMPLATES = {
    "speech": ("{tag}.\n{line}\n", "{line}\n"),
    "qa": ('{passage}Who said "{frag}"?\n', '{passage}Whose words are "{frag}"?\n'),
    "positive": ("Write a happy line about {topic}:\n", "Say something kind about {topic}:\n"),
}
_STOP = {"that", "this", "with", "have", "thee", "thou", "your", "what", "shall", "will", "from", "they", "them",
         "there", "their", "then", "than", "when", "which", "would", "were", "been", "hath", "doth", "more", "upon",
         "therefore", "should", "could", "those", "these", "where", "whose", "being", "make", "made"}


def parse_speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker tag, lines) of every speech of a play: a paragraph whose first line is a short tag ending in '.'
    ('Ham.', 'MACBETH.', 'First Citizen.'), stage directions in brackets removed."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip().split("\n")
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][A-Za-z' ]{0,22}[A-Za-z]\.", lines[0].strip()):
            continue
        speech = [ln.strip() for ln in (re.sub(r"\[[^\]]*\]", "", ln) for ln in lines[1:]) if ln.strip()]
        if speech:
            out.append((lines[0].strip()[:-1], speech))
    return out


def _heldout(text: str) -> bool:
    return sha256(text.encode()).digest()[0] % 10 == 0  # a fixed ~10% of examples, chosen by content


def build_tasks(tokenizer, max_chars: int = 128, per_task: int = 4000) -> dict:
    """{task: {"train": [...], "test": [...]}}, each example a dict(prompt, completion, family). Examples are at most
    max_chars long and use only characters the tokenizer knows; about 10% are held out (chosen by content). Built
    once (VADER over the corpus' lines takes a while) and cached under data/cache/."""
    key = sha256(json.dumps([tokenizer.spec(), max_chars, per_task, TEMPLATES]).encode()).hexdigest()[:16]
    cache = DATA_DIR / "cache" / f"lora-tasks-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    plays = sorted(asset_path("shakespeare").glob("*.txt"))
    speeches = [s for p in plays for s in parse_speeches(p.read_text(encoding="utf-8"))]
    g = seeded(0, 6)
    out = {t: [] for t in TASKS}
    for i, (tag, lines) in enumerate(speeches):
        if len(lines) >= 2 and all(15 <= len(ln) <= 60 for ln in lines[:2]):
            fam = i % 2
            out["speech"].append(dict(prompt=TEMPLATES["speech"][fam].format(tag=tag.upper(), line=lines[0]),
                                      completion=lines[1] + "\n", family=fam))
        if i + 1 < len(speeches) and speeches[i + 1][0] != tag:
            t2, l2 = speeches[i + 1]
            a, b = (re.sub(r"\s+\S*$", "", ln[:40]) if len(ln) > 40 else ln for ln in (lines[0], l2[0]))
            who, said = (tag, a) if torch.randint(2, (1,), generator=g).item() == 0 else (t2, b)
            words = re.findall(r"[A-Za-z']+", said)
            if len(words) >= 3 and a and b:
                k = int(torch.randint(len(words) - 2, (1,), generator=g))
                fam = int(torch.randint(2, (1,), generator=g))
                passage = f"{tag.upper()}: {a}\n{t2.upper()}: {b}\n"
                out["qa"].append(dict(prompt=TEMPLATES["qa"][fam].format(passage=passage,
                                                                         frag=" ".join(words[k:k + 3])),
                                      completion=who.upper() + "\n", family=fam))
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # the project's gold sentiment judge

    vader = SentimentIntensityAnalyzer()
    lines = sorted({ln for _, sp in speeches for ln in sp if 25 <= len(ln) <= 70})
    for j, ln in enumerate(lines):
        words = [w.lower() for w in re.findall(r"[A-Za-z]{4,}", ln) if w.lower() not in _STOP]
        lex = sum(max(0.0, vader.lexicon.get(w.lower(), 0.0)) for w in re.findall(r"[A-Za-z']+", ln))
        if words and lex >= 2.0 and vader.polarity_scores(ln)["compound"] >= 0.6:  # cheap lexicon sum first
            topic = max(words, key=len)
            out["positive"].append(dict(prompt=TEMPLATES["positive"][j % 2].format(topic=topic),
                                        completion=ln + "\n", family=j % 2))
    known = set(tokenizer.decode(range(tokenizer.vocab_size))) if hasattr(tokenizer, "chars") else None
    tasks = {}
    for t, exs in out.items():
        exs = [e for e in exs if len(e["prompt"]) + len(e["completion"]) <= max_chars
               and (known is None or set(e["prompt"] + e["completion"]) <= known)]
        test = [e for e in exs if _heldout(e["prompt"] + e["completion"])]
        train = [e for e in exs if not _heldout(e["prompt"] + e["completion"])]
        order = torch.randperm(len(train), generator=seeded(1, 6)).tolist()
        tasks[t] = {"train": [train[i] for i in order[:per_task]], "test": test}
    cache.parent.mkdir(parents=True, exist_ok=True)
    training.atomic_write(cache, lambda f: Path(f).write_text(json.dumps(tasks)))
    return tasks


def encode_examples(examples: list[dict], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs x (N, T) and next-token targets y (N, T): -100 on the prompt and the padding, so the loss
    counts the completion only."""
    seqs = [(tokenizer.encode(e["prompt"]), tokenizer.encode(e["completion"])) for e in examples]
    T = max(len(p) + len(c) for p, c in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids = torch.tensor(p + c)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, len(p) - 1:len(ids) - 1] = ids[len(p):]
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------------------------
# The base model, adapter training, evaluation


def ensure_base(args: TrainArgs, rt) -> None:
    """Pretrain the base with minigpt if args.base is missing and names a run's `latest` checkpoint."""
    path = Path(args.base)
    if (path / "config.json").exists() or not (path.name == "latest" and rt.master):
        return
    print(f"no base model at {path}: pretraining one with minigpt ({args.base_iters} steps)")
    minigpt.main(minigpt.Args(seed=args.seed, device=args.device, dtype=args.dtype, compile=args.compile,
                              run_name=path.parent.name, output_dir=str(path.parent.parent), block_size=
                              args.base_block_size, n_layer=args.base_n_layer, n_head=4, n_embd=args.base_n_embd,
                              batch_size=args.base_batch_size, max_iters=args.base_iters, eval_interval=args.base_iters,
                              final_eval_iters=50, sample_tokens=200))


def load_base(path: str | Path, device) -> tuple[GPT, object]:
    """A minigpt checkpoint (or any Hugging Face GPT-2 directory or hub name) and its tokenizer (run.json's, else
    GPT-2 BPE)."""
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        model = GPT(minigpt.GPTConfig.from_hf(json.loads((path / "config.json").read_text()), str(path)))
        model.load_hf_state_dict(load_file(path / "model.safetensors"), str(path / "model.safetensors"))
    elif path.exists() or str(path).startswith((".", "/")) or str(path).count("/") > 1:
        raise InputError(f"--base {path}: no config.json + model.safetensors there (a minigpt checkpoint directory "
                         f"such as runs/minigpt/latest is expected)")
    else:
        model = GPT.from_pretrained(str(path))  # a hub name
    run = path / "run.json"
    tokenizer = get_tokenizer(**json.loads(run.read_text())["tokenizer"]) if run.exists() else get_tokenizer("gpt2")
    return model.to(device).eval(), tokenizer


def train_adapter(base: GPT, task_index: int, train_set: list[dict], tokenizer, args: TrainArgs, rt, logger):
    """One LoRA (or QLoRA) adapter on a copy of the frozen base; the loss is the completion's next-token loss."""
    model = copy.deepcopy(base).train()
    summary = apply_lora(model, args.rank, args.alpha, args.lora_dropout, args.targets, args.rslora, args.qlora)
    print(summary)
    model.to(rt.device)
    optimizer = training.configure_optimizer(model, args.learning_rate, 0.0, (0.9, 0.999), rt.device.type)
    fwd = torch.compile(model) if args.compile else model
    task = args.tasks[task_index]
    bar = tqdm(range(args.steps), desc=task, dynamic_ncols=True, disable=None)
    losses, t0 = [], time.perf_counter()
    for step in bar:
        lr = training.lr_at(step, args.learning_rate, args.learning_rate / 10, args.warmup_steps, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(derived_seed(args.seed, task_index, step))  # LoRA dropout masks
        pick = torch.randint(len(train_set), (args.batch_size,), generator=seeded(args.seed, task_index, step))
        batch = encode_examples([train_set[i] for i in pick.tolist()], tokenizer, rt.device)
        loss, _ = training.train_step(fwd, optimizer, [batch], rt, args.grad_clip)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        logger.log({f"train/{task}_loss": loss, "train/lr": lr}, step + 1, line=(step + 1) % args.log_interval == 0)
    print(f"{task}: {args.steps} steps in {time.perf_counter() - t0:.0f} s, loss {losses[0]:.3f} -> "
          f"{sum(losses[-20:]) / len(losses[-20:]):.3f} (mean of the last 20)")
    return model, summary, losses


@torch.no_grad()
def completion_loss(model, examples: list[dict], tokenizer, rt, adapter_id: int | None, batch_size: int = 64):
    """Mean next-token loss per completion token of `examples` with every row on adapter `adapter_id`."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = encode_examples(examples[i:i + batch_size], tokenizer, rt.device)
        ids = None if adapter_id is None else torch.full((len(x),), adapter_id, device=rt.device)
        with adapter_rows(model, ids), rt.autocast():
            total += model(x, y, reduction="sum")[1].item()
        count += int((y != -100).sum())
    return total / count


@torch.no_grad()
def generate_rows(model, prompts: list[str], ids: list[int], tokenizer, rt, max_new_tokens: int, stop_at_newline=True):
    """Greedy completions of left-padded prompts, row i on adapter ids[i] (0: the bare base), in one batch."""
    idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=rt.device)
    max_new_tokens = min(max_new_tokens, model.config.block_size - idx.size(1))
    nl = tokenizer.encode("\n")
    with adapter_rows(model, torch.tensor(ids, device=rt.device)), rt.autocast():
        out = model.generate(idx, max_new_tokens, temperature=0.0, attention_mask=mask,
                             eos_token_id=nl[0] if stop_at_newline and len(nl) == 1 else None)
    texts = [tokenizer.decode(row[idx.size(1):].tolist()) for row in out]
    return [t.split("\n")[0] if stop_at_newline else t for t in texts], out


def task_scores(model, n_rows: int, tasks: dict, tokenizer, rt, n: int) -> dict:
    """What each row (0: base, i: adapter i) does when it generates: exact-match accuracy of the `qa` answers, mean
    VADER compound score of the `positive` lines."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader, scores = SentimentIntensityAnalyzer(), {}
    for task in ("qa", "positive"):
        if task not in tasks:
            continue
        test = tasks[task]["test"][:n]
        for row in range(n_rows):
            outs, _ = generate_rows(model, [e["prompt"] for e in test], [row] * len(test), tokenizer, rt,
                                    16 if task == "qa" else 72)
            if task == "qa":
                s = sum(o.strip() == e["completion"].strip() for o, e in zip(outs, test, strict=True)) / len(test)
            else:
                s = sum(vader.polarity_scores(o)["compound"] for o in outs) / len(outs)
            scores.setdefault(task, []).append(s)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Router: a small learned classifier over the prompt


class Router(nn.Module):
    """softmax(W z + b) over the adapters, z the standardised mean of the frozen base's final hidden states over the
    prompt's tokens (multinomial logistic regression on the base's own features)."""

    def __init__(self, n_embd: int, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.head = nn.Linear(n_embd, len(names))
        self.register_buffer("mu", torch.zeros(n_embd))
        self.register_buffer("sigma", torch.ones(n_embd))

    def forward(self, feats):  # (N, C) -> logits (N, n_adapters)
        return self.head((feats - self.mu) / self.sigma)


@torch.no_grad()
def prompt_features(model: GPT, prompts: list[str], tokenizer, device, batch_size: int = 128) -> torch.Tensor:
    """(N, C): mean of the bare base's final hidden states over each prompt's tokens. Prompts are right-padded:
    a causal model's real positions never see the padding after them."""
    feats = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p)[-model.config.block_size:] for p in prompts[i:i + batch_size]]
        x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        keep = torch.zeros(x.shape)
        for j, p in enumerate(ids):
            x[j, :len(p)], keep[j, :len(p)] = torch.tensor(p), 1
        with adapter_rows(model, None):
            h = model.hidden_states(x.to(device)).float().cpu()  # (B, T, C)
        feats.append((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
    return torch.cat(feats)


def train_router(model: GPT, names: list[str], tasks: dict, tokenizer, rt, seed: int, n_test: int):
    """Fit the router on family-0 prompts of the training splits; score it on family-1 prompts (templates it never
    saw) of the held-out splits. Returns the router and its held-out accuracy."""
    def prompts(split, family, n):
        return [(e["prompt"], k) for k, t in enumerate(names) for e in
                [e for e in tasks[t][split] if e["family"] == family][:n]]

    train, test = prompts("train", 0, 600), prompts("test", 1, n_test)
    xtr = prompt_features(model, [p for p, _ in train], tokenizer, rt.device)
    ytr = torch.tensor([k for _, k in train])
    router = Router(xtr.size(1), names)
    router.mu.copy_(xtr.mean(0))
    router.sigma.copy_(xtr.std(0) + 1e-6)
    torch.manual_seed(seed)
    nn.init.zeros_(router.head.weight)
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):  # full-batch steps on a convex loss
        loss = F.cross_entropy(router(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = router(prompt_features(model, [p for p, _ in test], tokenizer, rt.device)).argmax(1)
    acc = (pred == torch.tensor([k for _, k in test])).float().mean().item()
    return router.eval(), acc, len(test)


def save_router(router: Router, path: Path):
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in router.state_dict().items()}
    training.atomic_write(path / "router.safetensors", lambda f: save_file(sd, f))
    training.atomic_write(path / "router.json", lambda f: Path(f).write_text(json.dumps({"names": router.names})))


def load_router(path: Path) -> Router:
    if not (path / "router.json").exists():
        raise InputError(f"{path}/router.json: no router (python lora.py train or eval writes one)")
    names = json.loads((path / "router.json").read_text())["names"]
    sd = load_file(path / "router.safetensors")
    router = Router(sd["mu"].numel(), names)
    router.load_state_dict(sd)
    return router.eval()


@torch.no_grad()
def route(model: GPT, router: Router, prompts: list[str], tokenizer, device) -> list[str]:
    return [router.names[i] for i in router(prompt_features(model, prompts, tokenizer, device)).argmax(1).tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Mixed-batch serving: equality with one merged model per request, and throughput


def merged_model(base: GPT, adapter_dir: Path, qlora: bool = False) -> GPT:
    """The base with one adapter folded in: the plain GPT that serving this adapter alone would load."""
    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir, qlora=qlora)
    return merge_and_unload(model).eval()


@torch.no_grad()
def check_mixed_batch(multi: GPT, names: list[str], merged: dict, requests: list[tuple[str, str]], tokenizer, rt,
                      max_new_tokens: int = 40) -> dict:
    """Serve `requests` (prompt, adapter name) as one mixed batch, and each alone on its adapter's merged model;
    compare the greedy tokens and the next-token logits of the prompts."""
    prompts = [p for p, _ in requests]
    ids = [names.index(a) + 1 for _, a in requests]
    mixed, _ = generate_rows(multi, prompts, ids, tokenizer, rt, max_new_tokens, stop_at_newline=False)
    idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=rt.device)
    with adapter_rows(multi, torch.tensor(ids, device=rt.device)):
        logits_mixed = multi(idx, attention_mask=mask)[0][:, -1]
    same, max_diff = 0, 0.0
    for i, (p, a) in enumerate(requests):
        alone, _ = generate_rows(merged[a], [p], [0], tokenizer, rt, max_new_tokens, stop_at_newline=False)
        same += alone[0] == mixed[i]
        x = torch.tensor([tokenizer.encode(p)], device=rt.device)
        max_diff = max(max_diff, (merged[a](x)[0][0, -1] - logits_mixed[i]).abs().max().item())
    return {"requests": len(requests), "identical_completions": same, "max_abs_logit_diff": max_diff}


@torch.no_grad()
def serving_throughput(multi: GPT, names: list[str], merged: dict, requests, tokenizer, rt, new_tokens=32, reps=3):
    """Tokens/s generating `requests` three ways: one mixed batch (per-row adapters), one batch per adapter on its
    merged model, one request at a time on its merged model. Greedy, no stop token: every row makes new_tokens."""
    by_adapter = {a: [p for p, b in requests if b == a] for a in names}
    ids = [names.index(a) + 1 for _, a in requests]

    def gen(model, prompts, rows):
        idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=rt.device)
        with adapter_rows(model, rows), rt.autocast():
            model.generate(idx, new_tokens, temperature=0.0, attention_mask=mask)

    ways = {
        "mixed batch": lambda: gen(multi, [p for p, _ in requests], torch.tensor(ids, device=rt.device)),
        "batch per adapter": lambda: [gen(merged[a], ps, None) for a, ps in by_adapter.items() if ps],
        "one request at a time": lambda: [gen(merged[a], [p], None) for p, a in requests],
    }
    best = {k: float("inf") for k in ways}
    for _ in range(reps):  # alternate the ways so that load from other processes hits them alike
        for k, fn in ways.items():
            training.sync(rt.device)
            t0 = time.perf_counter()
            fn()
            training.sync(rt.device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: len(requests) * new_tokens / t for k, t in best.items()}


# ----------------------------------------------------------------------------------------------------------------
# The HTTP server: OpenAI-compatible /v1/completions over the mixed-batch model


class RequestError(Exception):
    """A bad request: answered with HTTP `status` and an OpenAI-style JSON error; the server keeps serving."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


@dataclass
class Job:
    """One prompt of a request, decoded as one row of a mixed batch; the worker puts its text pieces on `events`."""
    ids: list[int]
    adapter: str  # a name, or 'auto' until the router picks
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator
    events: queue.Queue
    text: str = ""
    tokens: int = 0


def decode_steps(model: GPT, idx, attention_mask, max_new_tokens: int, sample):
    """minigpt's KV-cached decoding loop, yielding each step's new tokens (B,) so that a server can stream them
    (GPT.generate returns only at the end). sample(logits (B, vocab)) -> (B,)."""
    cache = KVCache(model.config.n_layer, idx.size(1) + max_new_tokens)
    x = idx
    for _ in range(max_new_tokens):
        h = model.hidden_states(x, attention_mask, cache)
        tok = sample(model.lm_head(h[:, -1]).float())
        yield tok
        x = tok[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(tok), 1)], dim=1)


class CompletionService:
    """Parses and validates requests, then decodes them on one worker thread in mixed batches: requests that arrive
    within `window_ms` of each other share one forward per step, whatever adapters they use."""

    def __init__(self, model: GPT, names: list[str], tokenizer, router: Router | None, device, max_batch: int = 16,
                 window_ms: float = 5.0):
        self.model, self.names, self.tokenizer, self.router, self.device = model, names, tokenizer, router, device
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.jobs: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def models(self) -> list[str]:
        return ["base", *self.names] + (["auto"] if self.router is not None else [])

    def parse(self, body: bytes) -> tuple[dict, list[Job]]:
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise RequestError(400, "the body must be a JSON object")
        model = req.get("model")
        if not isinstance(model, str):
            raise RequestError(400, "'model' is required: an adapter name, 'base' or 'auto'", "model")
        if model not in self.models():
            raise RequestError(404, f"model {model!r} does not exist; available: {self.models()}", "model",
                               "model_not_found")
        prompts = req.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)):
            raise RequestError(400, "'prompt' must be a non-empty string or a non-empty list of them", "prompt")
        if len(prompts) > self.max_batch:
            raise RequestError(400, f"at most {self.max_batch} prompts per request", "prompt")

        def number(key, default, lo, hi, kind=(int, float)):
            v = req.get(key, default)
            if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
                raise RequestError(400, f"'{key}' must be a number in [{lo}, {hi}] (got {v!r})", key)
            return v

        max_tokens = number("max_tokens", 16, 1, self.model.config.block_size, int)
        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 1e-9, 1.0)
        if req.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is supported", "n")
        stop = req.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise RequestError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
        if not isinstance(req.get("stream", False), bool):
            raise RequestError(400, "'stream' must be true or false", "stream")
        seed = req.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "'seed' must be an integer", "seed")
        jobs = []
        for i, p in enumerate(prompts):
            try:
                ids = self.tokenizer.encode(p)
            except InputError as e:
                raise RequestError(400, f"prompt {i}: {e}", "prompt") from None
            if len(ids) + max_tokens > self.model.config.block_size:
                raise RequestError(400, f"prompt {i} has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds "
                                        f"the model's context of {self.model.config.block_size}", "max_tokens")
            g = torch.Generator(self.device).manual_seed(seed + i if seed is not None else
                                                         int.from_bytes(uuid.uuid4().bytes[:6], "big"))
            jobs.append(Job(ids, model, max_tokens, float(temperature), float(top_p), stop, g, queue.Queue()))
        return req, jobs

    def submit(self, jobs: list[Job]):
        for j in jobs:
            self.jobs.put(j)

    def close(self):
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch, deadline = [job], time.perf_counter() + self.window
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch answers its requests with a 500, never hangs them
                for j in batch:
                    j.events.put(("error", f"{type(e).__name__}: {e}"))

    def _sample(self, batch: list[Job]):
        def sample(logits):  # (B, vocab) -> (B,), each row with its own request's settings and generator
            return torch.cat([minigpt.sample_next_token(logits[i:i + 1], j.temperature, None, j.top_p, j.generator)
                              for i, j in enumerate(batch)])
        return sample

    @torch.no_grad()
    def _run(self, batch: list[Job]):
        auto = [j for j in batch if j.adapter == "auto"]
        if auto:
            chosen = route(self.model, self.router, [self.tokenizer.decode(j.ids) for j in auto], self.tokenizer,
                           self.device)
            for j, name in zip(auto, chosen, strict=True):
                j.adapter = name
                j.events.put(("adapter", name))
        idx, mask = left_pad([j.ids for j in batch], device=self.device)
        rows = torch.tensor([0 if j.adapter == "base" else self.names.index(j.adapter) + 1 for j in batch],
                            device=self.device)
        hold = [max((len(s) for s in j.stop), default=1) - 1 for j in batch]  # text held back: a stop may begin there
        done, out = [False] * len(batch), [[] for _ in batch]
        with adapter_rows(self.model, rows):
            steps = decode_steps(self.model, idx, mask, max(j.max_tokens for j in batch), self._sample(batch))
            for tok in steps:
                for i, j in enumerate(batch):
                    if done[i]:
                        continue
                    out[i].append(int(tok[i]))
                    j.tokens += 1
                    full = self.tokenizer.decode(out[i])
                    cut = min((full.find(s) for s in j.stop if s in full), default=-1)
                    if cut >= 0 or j.tokens >= j.max_tokens:
                        final = full[:cut] if cut >= 0 else full
                        j.events.put(("text", final[len(j.text):]))
                        j.events.put(("done", "stop" if cut >= 0 else "length"))
                        done[i] = True
                    elif len(full) - hold[i] > len(j.text) and not full.endswith("\ufffd"):
                        j.events.put(("text", full[len(j.text):len(full) - hold[i]]))
                        j.text = full[:len(full) - hold[i]]
                if all(done):
                    break


def make_server(service: CompletionService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A threading HTTP server for `service`: POST /v1/completions, GET /v1/models and /health."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):  # one line per request on stderr, without the default's reverse lookups
            sys.stderr.write(f"{self.command} {self.path} {a[1] if len(a) > 1 else ''}\n")

        def _json(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "minillm"}
                                                            for m in service.models()]})
            elif self.path == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._json(404, RequestError(404, f"no route GET {self.path}").body())

        def do_POST(self):
            if self.path != "/v1/completions":
                return self._json(404, RequestError(404, f"no route POST {self.path}").body())
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(411, RequestError(411, "a Content-Length header is required").body())
            try:
                req, jobs = service.parse(self.rfile.read(length))
            except RequestError as e:
                return self._json(e.status, e.body())
            service.submit(jobs)
            head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                    "model": req["model"]}
            if req.get("stream"):
                return self._stream(head, jobs)
            choices = []
            for i, j in enumerate(jobs):
                text, finish, adapter = "", None, j.adapter
                while finish is None:
                    kind, value = j.events.get()
                    if kind == "error":
                        return self._json(500, {"error": {"message": value, "type": "server_error"}})
                    text += value if kind == "text" else ""
                    adapter = value if kind == "adapter" else adapter
                    finish = value if kind == "done" else None
                choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": finish,
                                "adapter": adapter})
            n_prompt = sum(len(j.ids) for j in jobs)
            n_new = sum(j.tokens for j in jobs)
            self._json(200, {**head, "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens":
                                                                  n_new, "total_tokens": n_prompt + n_new}})

        def _stream(self, head: dict, jobs: list[Job]):
            """Server-sent events, one per text piece, then `data: [DONE]` (OpenAI's streaming format)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for i, j in enumerate(jobs):
                finish, adapter = None, j.adapter
                while finish is None:
                    kind, value = j.events.get()
                    if kind == "adapter":
                        adapter = value
                        continue
                    finish = value if kind == "done" else "error" if kind == "error" else None
                    choice = {"text": value if kind == "text" else "", "index": i, "logprobs": None,
                              "finish_reason": finish, "adapter": adapter}
                    self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return ThreadingHTTPServer((host, port), Handler)


# ----------------------------------------------------------------------------------------------------------------
# Memory: peak tensor memory of a fine-tuning step


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
        q = quantize_nf4(x, 64, double_quant=dq)
        err = (x - dequantize_nf4(q)).abs()
        out["double_quant" if dq else "plain"] = {"mean_abs_err": err.mean().item(),
                                                  "mean_rel_err": (err / (x.abs() + 1e-8)).mean().item(),
                                                  "bytes_per_param": storage_bytes(q) / x.numel()}
    return out


def memory(args: MemoryArgs) -> dict:
    """NF4's error and size, then the peak memory of full fine-tuning, LoRA and QLoRA of one GPT on one batch."""
    rt = setup_runtime(args.device, args.dtype)
    report = {"nf4": nf4_errors(args.seed)}
    for k, v in report["nf4"].items():
        print(f"NF4 {k:12s}: mean abs error {v['mean_abs_err']:.6f} (bitsandbytes' bound 0.0733), mean relative "
              f"error {v['mean_rel_err']:.6f} (bound 0.2057), {v['bytes_per_param']:.4f} bytes per weight")
    cfg = minigpt.GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=8,
                            n_embd=args.n_embd)
    g = seeded(args.seed, 5)
    x = torch.randint(cfg.vocab_size, (args.batch_size, args.block_size + 1), generator=g).to(rt.device)
    batch = (x[:, :-1], x[:, 1:])
    report["peak"] = {}
    for way in ("full fine-tune", "LoRA", "QLoRA"):
        torch.manual_seed(args.seed)
        model = GPT(cfg).to(rt.device)
        if way != "full fine-tune":
            apply_lora(model, args.rank, 2.0 * args.rank, qlora=way == "QLoRA")
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


def evaluate(args: Args, base: GPT, tokenizer, tasks: dict, adapters: dict[str, Path], rt, logger=None) -> dict:
    """The matrix of every adapter's loss on every task against the base, the task scores, the router, the
    mixed-batch check against merged models and the serving throughput. Writes report.json and the router."""
    run_dir = Path(args.output_dir) / args.run_name
    multi, names = build_multi_adapter(base, adapters, qlora=args.qlora)
    n = args.eval_examples
    # --- loss per completion token: rows base + adapters, columns tasks ---
    rows = ["base", *names]
    matrix = {row: {t: completion_loss(multi, tasks[t]["test"][:n], tokenizer, rt, k or None)
                    for t in names} for k, row in enumerate(rows)}
    scores = task_scores(multi, len(rows), {t: tasks[t] for t in names}, tokenizer, rt, n)
    print(f"\nloss per completion token on {n} held-out examples per task (lower is better):")
    print(f"{'':10s}" + "".join(f"{t:>10s}" for t in names))
    for row in rows:
        print(f"{row:10s}" + "".join(f"{matrix[row][t]:10.3f}" for t in names))
    for task, vals in scores.items():
        what = "exact-match answers" if task == "qa" else "mean VADER compound of the lines"
        print(f"{task} ({what}): " + ", ".join(f"{r} {v:.3f}" for r, v in zip(rows, vals, strict=True)))
    # --- router ---
    router, acc, n_test = train_router(multi, names, tasks, tokenizer, rt, args.seed, n)
    save_router(router, run_dir / "router")
    print(f"router: held-out accuracy {acc:.3f} on {n_test} prompts of unseen templates (chance {1 / len(names):.3f})")
    # --- mixed batch against one merged model per adapter ---
    merged = {a: merged_model(base, adapters[a], args.qlora) for a in names}
    fits = {t: [e for e in tasks[t]["test"] if len(tokenizer.encode(e["prompt"])) + 40 <= base.config.block_size]
            for t in names}  # prompts that leave room for 40 new tokens
    requests = [(e["prompt"], t) for i in range(args.serve_requests) for t in names
                for e in fits[t][i:i + 1]]
    check = check_mixed_batch(multi, names, merged, requests, tokenizer, rt)
    print(f"mixed batch: {check['identical_completions']}/{check['requests']} greedy completions identical to each "
          f"request served by its own merged model; max |logit difference| {check['max_abs_logit_diff']:.2e}")
    tput = serving_throughput(multi, names, merged, requests, tokenizer, rt)
    print(f"throughput, {len(requests)} requests x 32 new tokens: " + ", ".join(f"{k} {v:,.0f} tokens/s"
                                                                                 for k, v in tput.items()))
    print(f"mixed batch / batch per adapter: {tput['mixed batch'] / tput['batch per adapter']:.2f}x")
    report = {"matrix": matrix, "scores": scores, "router_accuracy": acc, "router_test_prompts": n_test,
              "mixed_batch": check, "throughput_tokens_per_s": tput}
    if logger is not None:
        logger.log({"eval/router_accuracy": acc, **{f"eval/{r}_on_{t}": v for r in rows for t, v in
                                                    matrix[r].items()}}, 0, line=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    training.atomic_write(run_dir / "report.json", lambda f: Path(f).write_text(json.dumps(report, indent=2)))
    return report


def train(args: TrainArgs) -> dict:
    rt = setup_runtime(args.device, args.dtype)
    run_dir = Path(args.output_dir) / args.run_name
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        raise InputError(f"--tasks {list(args.tasks)}: expected some of {list(TASKS)}")

    # --- the frozen base: a minigpt checkpoint, pretrained here first if missing ---
    ensure_base(args, rt)
    base, tokenizer = load_base(args.base, rt.device)
    print(f"base {args.base}: {base.num_params() / 1e6:.2f}M parameters, context {base.config.block_size}")

    # --- task data from the offline corpus ---
    tasks = build_tasks(tokenizer, max_chars=min(128, base.config.block_size))
    for t in args.tasks:
        print(f"task {t}: {TASKS[t]}; {len(tasks[t]['train'])} train / {len(tasks[t]['test'])} held-out examples")

    # --- one adapter per task on the same frozen base ---
    logger = Logger(args, rt.master)
    adapters, history = {}, {}
    for i, task in enumerate(args.tasks):
        adapters[task] = out = run_dir / "adapters" / task
        if args.resume and (out / "adapter_model.safetensors").exists():
            print(f"{task}: adapter already in {out}, kept (--resume)")
            continue
        model, summary, losses = train_adapter(base, i, tasks[task]["train"], tokenizer, args, rt, logger)
        history[task] = losses
        save_adapter(model, out, {"task": task, "base": str(args.base), "qlora": args.qlora, "steps": args.steps,
                                  "summary": str(summary)})

    # --- evaluation: matrix, router, mixed-batch serving ---
    report = evaluate(args, base, tokenizer, tasks, adapters, rt, logger)
    logger.finish()
    print(f"adapters, router and report.json in {run_dir}")
    return {**report, "train_loss": history, "run_dir": run_dir}


def evaluate_command(args: EvalArgs) -> dict:
    rt = setup_runtime(args.device, args.dtype)
    base, tokenizer = load_base(args.base, rt.device)
    adapters = _adapter_dirs(args)
    tasks = build_tasks(tokenizer, max_chars=min(128, base.config.block_size))
    unknown = [a for a in adapters if a not in tasks]
    if unknown:
        raise InputError(f"adapters {unknown} have no task data to evaluate on (tasks: {list(TASKS)})")
    return evaluate(args, base, tokenizer, tasks, adapters, rt)


def _adapter_dirs(args: Args) -> dict[str, Path]:
    root = Path(args.output_dir) / args.run_name / "adapters"
    found = {p.name: p for p in sorted(root.glob("*")) if (p / "adapter_config.json").exists()}
    if not found:
        raise InputError(f"{root}: no adapters (python lora.py train writes them)")
    return found


def serve(args: ServeArgs, ready: threading.Event | None = None):
    """Serve the run's adapters (and the router, as model 'auto') until interrupted."""
    rt = setup_runtime(args.device, args.dtype)
    base, tokenizer = load_base(args.base, rt.device)
    adapters = _adapter_dirs(args)
    router_dir = Path(args.output_dir) / args.run_name / "router"
    router = load_router(router_dir) if (router_dir / "router.json").exists() else None
    if router is not None:
        if set(router.names) != set(adapters):
            raise InputError(f"{router_dir}: the router was trained for {router.names}, the adapters are "
                             f"{list(adapters)}")
        adapters = {n: adapters[n] for n in router.names}  # the router's class i is adapter i
    multi, names = build_multi_adapter(base, adapters, qlora=args.qlora)
    service = CompletionService(multi, names, tokenizer, router, rt.device, args.max_batch, args.batch_window_ms)
    server = make_server(service, args.host, args.port)
    print(f"serving {service.models()} on http://{args.host}:{server.server_address[1]}/v1/completions")
    if ready is not None:
        ready.server = server
        ready.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()


COMMANDS = {TrainArgs: train, EvalArgs: evaluate_command, ServeArgs: serve, MemoryArgs: memory}


def main(args: Args):
    return COMMANDS[type(args)](args)


if __name__ == "__main__":
    cli = tyro.cli(Annotated[TrainArgs, tyro.conf.subcommand("train")]
                   | Annotated[EvalArgs, tyro.conf.subcommand("eval")]
                   | Annotated[ServeArgs, tyro.conf.subcommand("serve")]
                   | Annotated[MemoryArgs, tyro.conf.subcommand("memory")])
    try:
        main(cli)
    except (InputError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

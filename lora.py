"""lora.py: LoRA and QLoRA from scratch, adapters in PEFT's layout, and one batch that mixes adapters.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained weight W0 and
learns a low-rank update: h = W0 x + (alpha / r) B A x, with A (r, in) and B (out, r), r << min(in, out). Only A
and B are trained and stored (a few MB instead of the whole model), and after training B A folds into W0, so the
adapted model runs as fast as the base. rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA") scales by alpha / sqrt(r) instead, so that larger ranks keep learning.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the frozen W0 in 4-bit
NormalFloat (NF4): blocks of 64 weights share an absmax constant and each weight is the nearest of 16 values placed
at quantiles of N(0, 1); the constants are themselves quantized to 8 bits (double quantization). The forward pass
dequantizes W0 to the compute dtype and LoRA trains on top, so a model's frozen weights take ~0.52 bytes each.

Many adapters over one base serve in one batch: each row gathers its own adapter's A and B and batched matmuls
apply them (Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023).

This file holds `LoRALinear`, `apply_lora`, `merge_and_unload`, `save_adapter` / `load_adapter` (PEFT's layout, so
`peft.PeftModel.from_pretrained` loads an adapter onto the exported Hugging Face GPT-2), `NF4Linear` and
`MultiLoRALinear`. sft.py and dpo.py train with it (`--lora-rank`, `--qlora`); skills.py trains one adapter per
skill and routes between them; serve.py serves them behind an OpenAI-compatible API; bench/bench_lora.py measures
NF4's errors and the memory of full fine-tuning against LoRA and QLoRA.

Run it (fold an adapter into its base and export a plain model):
    python lora.py --adapter runs/skills/adapters/qa --output runs/qa-merged
    python sample.py runs/qa-merged --prompt "ROMEO: But soft!"       # any script loads the export
"""

import copy
import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import training
from gpt import GPT, left_pad, load_pretrained
from llama import LLAMA_NAMES, rename
from training import InputError


@dataclass
class Args:
    """Fold a LoRA adapter into its base model and write the result as a plain model directory."""

    adapter: str
    """an adapter directory (adapter_config.json + adapter_model.safetensors), e.g. runs/skills/adapters/qa"""
    output: str
    """the directory to write: config.json and model.safetensors (transformers' GPT-2), run.json (the tokenizer)"""
    base: str | None = None
    """the model the adapter was trained on; default: the one its adapter_config.json names"""
    overwrite: bool = False
    """replace a model already in --output"""


# ----------------------------------------------------------------------------------------------------------------
# LoRA

# every projection of attention and MLP: GPT-2's (fused qkv, output, MLP in and out) and Llama's
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")


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
        self.disabled = False  # adapters_disabled(model): the base alone, e.g. a policy's frozen reference

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in): the update folded into the weight by merge()."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x):
        y = self.base(x)
        if self.merged or self.disabled:
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


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the block with every (unmerged) LoRA adapter of the model off: the frozen base model itself, the
    reference of an RL or DPO policy with no second copy of its weights (as PEFT's disable_adapter)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if any(m.merged for m in layers):
        raise InputError("adapters_disabled: an adapter is merged into its weight; unmerge it first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


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


def _is_llama(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "arch", "gpt2") == "llama"


def save_adapter(model: nn.Module, path: str | Path, config: dict | None = None):
    """Write the adapter only: adapter_model.safetensors (A and B of every LoRALinear, PEFT's key names) and
    adapter_config.json (PEFT's LoraConfig). Hugging Face's GPT-2 holds these projections as Conv1D, whose weight is
    the transpose of ours; PEFT's LoRA branch is lora_B(lora_A(x)) on either, so A and B need no transpose, and
    fan_in_fan_out=true tells PEFT to transpose only when it merges. A Llama's modules are named as in
    transformers' LlamaForCausalLM (model.layers.i.self_attn.q_proj, ...), plain linears. `config` (task name, base,
    ...) is kept in the safetensors metadata, where PEFT does not look."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise InputError("the model has no LoRA layers to save (apply_lora first)")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora) for m in layers.values()):
        raise InputError("save_adapter writes one LoraConfig: every LoRA layer must share r, alpha and rslora")
    tensors, llama = {}, _is_llama(model)
    for n, m in layers.items():
        name = rename(n, LLAMA_NAMES, to_ours=False) if llama else n  # transformers' module name
        tensors[_peft_key(name, "A")] = m.lora_A.detach().float().cpu().contiguous()
        tensors[_peft_key(name, "B")] = m.lora_B.detach().float().cpu().contiguous()
    drop = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    peft_config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=first.r, lora_alpha=first.alpha,
                       lora_dropout=drop, use_rslora=first.rslora, target_modules=sorted({n.rpartition(".")[2]
                                                                                          for n in layers}),
                       fan_in_fan_out=not llama, bias="none", init_lora_weights=True, inference_mode=True,
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
    try:
        cfg = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # a truncated or overwritten file
        raise InputError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA" or not {"r", "lora_alpha"} <= set(cfg):
        raise InputError(f"{cfg_file}: not a LoRA adapter config (peft_type LORA with r and lora_alpha expected)")
    try:
        with safe_open(str(w_file), "pt") as f:
            extra = json.loads((f.metadata() or {}).get("minillm", "{}"))
        tensors, layers = load_file(w_file), {}
    except (SafetensorError, json.JSONDecodeError) as e:  # a truncated or corrupt file: safetensors' one-line reason
        raise InputError(f"{w_file}: not a readable safetensors file ({e})") from None
    for key, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise InputError(f"{w_file}: unexpected tensor {key!r} (expected base_model.model.<module>.lora_A.weight "
                             f"or lora_B.weight)")
        # transformers' Llama names to ours (GPT-2's are the same in both)
        layers.setdefault(rename(m.group(1), LLAMA_NAMES, to_ours=True), {})[m.group(2)] = t
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



@torch.no_grad()
def generate_rows(model, prompts: list[str], ids: list[int], tokenizer, rt, max_new_tokens: int,
                  stop_at_newline: bool = False):
    """Greedy completions of left-padded prompts, row i on adapter ids[i] (0: the bare base), in one batch; with
    stop_at_newline each ends at its first newline. Returns the texts and the token ids (B, T + new)."""
    idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=rt.device)
    max_new_tokens = min(max_new_tokens, model.config.block_size - idx.size(1))
    nl = tokenizer.encode("\n") if stop_at_newline else []
    with adapter_rows(model, torch.tensor(ids, device=rt.device)), rt.autocast():
        out = model.generate(idx, max_new_tokens, temperature=0.0, attention_mask=mask,
                             eos_token_id=nl[0] if len(nl) == 1 else None)
    texts = [tokenizer.decode(row[idx.size(1):].tolist()) for row in out]
    return [t.split("\n")[0] if stop_at_newline else t for t in texts], out


def merged_model(base: GPT, adapter_dir: str | Path, qlora: bool = False) -> GPT:
    """The base with one adapter folded in: the plain GPT that serving this adapter alone would load."""
    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir, qlora=qlora)
    return merge_and_unload(model).eval()


# ----------------------------------------------------------------------------------------------------------------


def main(args: Args) -> Path:
    """Read the adapter, load its base, fold B A into the weights (on the NF4-rounded base if the adapter was
    trained with QLoRA, so that the export computes what was trained), write the plain model."""
    out = Path(args.output)
    if (out / "config.json").exists() and not args.overwrite:
        raise InputError(f"--output {out} already holds a model (--overwrite replaces it)")
    _, peft_config, ours = read_adapter(args.adapter)
    base_path = args.base or peft_config.get("base_model_name_or_path")
    if not base_path:
        raise InputError(f"{args.adapter}: its adapter_config.json names no base model; give --base")
    base, tokenizer = load_pretrained(base_path)
    model = merged_model(base, args.adapter, qlora=bool(ours.get("qlora")))
    model.save_pretrained(out)
    meta = {"tokenizer": tokenizer.spec(), "merged": {"base": str(base_path), "adapter": str(args.adapter)}}
    training.atomic_write(out / "run.json", lambda f: Path(f).write_text(json.dumps(meta, indent=2)))
    print(f"{args.adapter} folded into {base_path}: {model.num_params() / 1e6:.2f}M parameters written to {out}")
    return out


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (InputError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

"""parallel.py: training one GPT across many processes: data, sharded, tensor and pipeline parallelism, activation
checkpointing, and a memory and step-time planner for a cluster.

Each strategy is written out so that the communication it needs is in plain sight, and each computes the same
training step as one process on the same global batch (the tests prove it to 1e-5 on CPU). The model is minigpt's
GPT. Strategies (`--strategy`):
    ddp        data parallel from scratch: bucketed, averaged gradient all-reduce overlapped with the backward pass,
               no all-reduce on accumulation micro-steps (Li et al. 2020, "PyTorch Distributed")
    ddp-torch  the same with torch's DistributedDataParallel
    zero1      ZeRO stage 1 from scratch: AdamW's state sharded; gradients reduce-scattered, parameters all-gathered
               after the step (Rajbhandari et al. 2020, "ZeRO")
    fsdp       FSDP2, torch's `fully_shard` per block (ZeRO stage 3; Zhao et al. 2023); bf16 mixed precision on CUDA
    tp         Megatron tensor parallelism from scratch: column- and row-parallel linears joined by the conjugate f/g
               functions, attention heads and the MLP split (Shoeybi et al. 2019, "Megatron-LM")
    tp-torch   the same layout through torch.distributed.tensor.parallel
    pp-gpipe   pipeline parallelism from scratch, all forwards then all backwards (Huang et al. 2019, "GPipe")
    pp-1f1b    the same with the one-forward-one-backward schedule (Narayanan et al. 2021, "PipeDream-Flush" /
               Megatron-LM 2); the bubble fraction is measured and compared with (p-1)/(m+p-1)
    dp-tp      2D: tensor parallel inside groups of --tp ranks, data parallel across the groups
`--activation-checkpointing` recomputes each block in the backward pass (Chen et al. 2016) with any strategy.
Every run prints the bytes each rank sent per step, counted in the code, against the closed-form theory, and its
memory. `python parallel.py plan` estimates memory per GPU and step time of a large run (ZeRO paper, Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models").

Run it:
    python assets.py                                                         # once: the offline corpus
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy ddp      # CPU: gloo; GPUs: NCCL, one per process
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy pp-1f1b --micro-batches 8
    torchrun --standalone --nproc_per_node=4 parallel.py --strategy dp-tp --tp 2
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy fsdp --activation-checkpointing
    python parallel.py --strategy ddp                                        # one process: the reference run
    # several machines: the same command on every node (HOST0: any one of them)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-id=run1 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 \
        parallel.py --strategy dp-tp --tp 8 --n-layer 24 --n-head 16 --n-embd 2048 --block-size 1024
    sbatch train.sbatch     # SLURM: srun starts one torchrun per node (README, "parallel.py", for the script)
    python parallel.py plan                                                  # 70B parameters on 512 80 GB GPUs
    python parallel.py plan --n-params 7.5e9 --gpus 64 --tp 1 --pp 1 --zero-stage 3
"""

import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import minigpt as M
import training
from minigpt import GPT, Block, CausalSelfAttention, GPTConfig
from training import InputError

STRATEGIES = ("ddp", "ddp-torch", "zero1", "fsdp", "tp", "tp-torch", "pp-gpipe", "pp-1f1b", "dp-tp")


@dataclass
class Args:
    # --- common to every script ---
    seed: int = 1337
    """random seed; every random choice of a run is a function of (seed, rank, iteration)"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda', 'cuda:1'"""
    dtype: str = "auto"
    """'auto' (bfloat16 autocast on CUDA where supported, else float32), 'bfloat16' or 'float32'"""
    compile: bool = False
    """compile each block with torch.compile"""
    track: bool = False
    """log metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "minillm"
    """Weights & Biases project"""
    run_name: str = "parallel"
    """name of the run: the trained model goes to <output-dir>/<run-name>/final/"""
    output_dir: str = "runs"
    """directory that holds the runs"""
    resume: bool = False
    """not supported here (sharded optimizer states would need a sharded checkpoint format); minigpt.py resumes"""
    # --- layout ---
    strategy: Literal[STRATEGIES] = "ddp"
    """how the model and the batch are split across the processes (see the module docstring)"""
    tp: int = 0
    """tensor-parallel size for tp, tp-torch, dp-tp (0: every process for tp and tp-torch, 2 for dp-tp)"""
    micro_batches: int = 2
    """micro-batches per process per step: gradient-accumulation steps, or the pipeline's micro-batches"""
    bucket_mb: float = 25.0
    """gradient bucket size in MB for ddp and ddp-torch (torch's default is 25)"""
    activation_checkpointing: bool = False
    """recompute every block in the backward pass instead of keeping its activations"""
    # --- data and model ---
    data_path: str | None = None
    """a local UTF-8 text file to train on, character-level (default: the offline Shakespeare corpus)"""
    n_layer: int = 4
    """transformer blocks"""
    n_head: int = 4
    """attention heads per block"""
    n_embd: int = 128
    """width of the residual stream"""
    block_size: int = 64
    """context length in tokens"""
    # --- optimisation ---
    batch_size: int = 32
    """sequences per optimizer step in all: the global batch, the same whatever the layout"""
    max_iters: int = 200
    """optimizer steps"""
    learning_rate: float = 1e-3
    """peak learning rate, reached after the warmup"""
    min_lr: float = 1e-4
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 20
    """steps of linear warmup"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.99
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    log_interval: int = 20
    """steps between log lines"""
    eval_iters: int = 20
    """batches of the validation split in the final evaluation"""


# ----------------------------------------------------------------------------------------------------------------
# Layout: which ranks hold which part, and clear errors for layouts that cannot work


@dataclass
class Layout:
    """The process grid. Ranks are numbered dp-major: rank = dp_rank * tp + tp_rank, so the ranks of one
    tensor-parallel group are neighbours, i.e. on one node, where the bandwidth is (NVLink); pipeline layouts use
    every rank as one stage (rank = stage)."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    mesh: object = None  # a DeviceMesh with dimensions ("dp", "tp"), or ("pp",)

    def group(self, dim: str):
        return self.mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)


def check_layout(strategy: str, world: int, tp: int, n_head: int, n_layer: int, batch_size: int,
                 micro_batches: int) -> tuple[int, int, int]:
    """(dp, tp, pp) for a strategy on `world` processes, or an InputError saying why the layout is impossible."""
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    dp, pp = world, 1
    if strategy in ("tp", "tp-torch", "dp-tp"):
        tp = tp or (2 if strategy == "dp-tp" else world)
        if tp < 1 or world % tp:
            raise InputError(f"world size {world} does not factor into data x tensor parallel groups: it is not a "
                             f"multiple of --tp {tp}")
        if strategy != "dp-tp" and tp != world:
            raise InputError(f"--strategy {strategy} uses every process for tensor parallelism (--tp {world} or 0); "
                             f"use --strategy dp-tp for data x tensor parallel")
        if n_head % tp:
            raise InputError(f"--n-head {n_head} is not divisible by the tensor-parallel size {tp}: every rank must "
                             f"hold whole attention heads")
        dp = world // tp
    else:
        if tp not in (0, 1):
            raise InputError(f"--tp {tp} is only for the tp, tp-torch and dp-tp strategies")
        tp = 1
    if strategy.startswith("pp-"):
        dp, pp = 1, world
        if pp > n_layer:
            raise InputError(f"{pp} pipeline stages but only {n_layer} blocks (--n-layer): every stage needs at "
                             f"least one block")
    if micro_batches < 1 or batch_size % (dp * micro_batches):
        raise InputError(f"--batch-size {batch_size} does not split into {dp} data-parallel rank(s) x "
                         f"{micro_batches} micro-batch(es)")
    return dp, tp, pp


def make_layout(strategy: str, world: int, tp: int, device_type: str, n_head: int, n_layer: int, batch_size: int,
                micro_batches: int) -> Layout:
    from torch.distributed.device_mesh import init_device_mesh

    dp, tp, pp = check_layout(strategy, world, tp, n_head, n_layer, batch_size, micro_batches)
    if pp > 1:
        return Layout(dp, tp, pp, init_device_mesh(device_type, (pp,), mesh_dim_names=("pp",)))
    return Layout(dp, tp, pp, init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp")))


# ----------------------------------------------------------------------------------------------------------------
# Communication, counted: the bytes this rank sends, per kind of collective


class CommLog:
    """Every collective of the from-scratch strategies goes through here, which counts the bytes this rank sends
    under the bandwidth-optimal ring algorithms (Patarasuk & Yuan 2009; Thakur et al. 2005): over N ranks an
    all-reduce of n bytes sends 2(N-1)/N n per rank (a reduce-scatter, then an all-gather), a reduce-scatter or an
    all-gather (N-1)/N n (n: the full, unsharded size), a point-to-point send n. A few scalars per step (the token
    count, the loss, the gradient norm) go through plain dist calls and are not counted."""

    def __init__(self):
        self.bytes = defaultdict(float)

    def reset(self):
        self.bytes.clear()

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    def all_reduce(self, t, group, async_op=False):
        n = dist.get_world_size(group)
        self.bytes["all-reduce"] += 2 * (n - 1) / n * t.numel() * t.element_size()
        return dist.all_reduce(t, group=group, async_op=async_op)

    def reduce_scatter(self, out, inp, group):
        n = dist.get_world_size(group)
        self.bytes["reduce-scatter"] += (n - 1) / n * inp.numel() * inp.element_size()
        dist.reduce_scatter_single(out, inp, group=group)

    def all_gather(self, out, inp, group):
        n = dist.get_world_size(group)
        self.bytes["all-gather"] += (n - 1) / n * out.numel() * out.element_size()
        dist.all_gather_single(out, inp, group=group)

    def send(self, t, dst: int):
        self.bytes["send"] += t.numel() * t.element_size()
        return dist.isend(t, dst)

    def recv(self, t, src: int):
        dist.recv(t, src)


COMM = CommLog()


class CollectiveBytes(TorchDispatchMode):
    """A second, independent count: every collective, whoever issues it (this file, DDP, FSDP2, DTensor), passes
    through the dispatcher as a c10d op; this mode sees each one on the calling thread and counts the bytes with
    CommLog's ring model. One-element tensors (token counts, losses, norms) are bookkeeping and left out."""

    def __init__(self):
        super().__init__()
        self.bytes = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__  # e.g. "allreduce_.default"
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional"):
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if torch.is_tensor(t)]
            nbytes = lambda t: t.numel() * t.element_size()
            if tensors and tensors[0].numel() > 1:
                if name.startswith(("allreduce", "all_reduce")):
                    group = args[1] if ns == "c10d" else args[2]
                    n = (dist.ProcessGroup.unbox(group) if ns == "c10d"
                         else dist.distributed_c10d._resolve_process_group(group)).size()
                    self.bytes["all-reduce"] += 2 * (n - 1) / n * sum(nbytes(t) for t in tensors)
                elif name.startswith(("_allgather_base", "all_gather_into_tensor")):
                    out, inp = (tensors[0], tensors[1]) if ns == "c10d" else (None, tensors[0])
                    n = out.numel() // inp.numel() if out is not None else args[1]
                    self.bytes["all-gather"] += (n - 1) * nbytes(inp)
                elif name.startswith(("_reduce_scatter_base", "reduce_scatter_tensor")):
                    out, inp = (tensors[0], tensors[1]) if ns == "c10d" else (None, tensors[0])
                    n = inp.numel() // out.numel() if out is not None else args[2]
                    self.bytes["reduce-scatter"] += (n - 1) / n * nbytes(inp)
                elif name.startswith("send"):
                    self.bytes["send"] += sum(nbytes(t) for t in tensors)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


# ----------------------------------------------------------------------------------------------------------------
# The training step every strategy shares


@dataclass
class Hyper:
    """AdamW's settings (configure_optimizer in minigpt: decay on matrices only)."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)


class Strategy:
    """One rank's part of the model and the communication that makes it compute the single-process step.

    The default methods are those of a replicated model; each strategy overrides what it changes. `model` is what
    this rank runs forward; `dp_group` the ranks that hold different rows of the batch."""

    def __init__(self, model: nn.Module, layout: Layout, hyper: Hyper, rt: training.Runtime):
        self.model, self.layout, self.hyper, self.rt = model, layout, hyper, rt
        self.dp_group = layout.group("dp") if layout.pp == 1 else None
        self.optimizer = None

    def make_optimizer(self):
        self.optimizer = training.configure_optimizer(self.model, 0.0, self.hyper.weight_decay, self.hyper.betas,
                                               self.rt.device.type)

    def no_sync(self):
        return nullcontext()

    def forward_backward(self, micro_batches, scale: float) -> float:
        """Sum of the micro-batches' summed token losses; backward of each, times `scale` (the global token count's
        reciprocal, times the data-parallel size that gradient averaging divides by)."""
        total = 0.0
        for i, batch in enumerate(micro_batches):
            with self.no_sync() if i < len(micro_batches) - 1 else nullcontext(), self.rt.autocast():
                loss_sum = training.lm_loss_sum(self.model, batch)
                (loss_sum * scale).backward()
            total += loss_sum.item()
        self.reduce_grads()
        return total

    def reduce_grads(self):
        """Called once the backward passes of a step are done (the data-parallel reduction, where not overlapped)."""

    def grads(self) -> tuple[list, list]:
        """(gradients sharded across self.shard_group: squares summed over it, gradients every rank has whole)."""
        return [], [p.grad for p in self.model.parameters() if p.grad is not None]

    shard_group = None

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the norm of the whole model's gradient, as torch.nn.utils.clip_grad_norm_ does on one process."""
        sharded, whole = self.grads()
        sq = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=self.rt.device))
        if self.shard_group is not None:
            dist.all_reduce(sq, group=self.shard_group)
        sq = sq + sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=self.rt.device))
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else torch.ones(())
        for g in sharded + whole:
            g.mul_(coef.to(g.device))
        return norm.item()

    def optimizer_step(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def mean_loss(self, loss_sum: float, n_global: float) -> float:
        t = torch.tensor(loss_sum, dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)  # a scalar, not counted
        return t.item() / n_global

    def full_state_dict(self) -> dict:
        """The whole model's parameters, named as in GPT.state_dict(), on every rank (a collective)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def train_step(s: Strategy, micro_batches, lr: float, grad_clip: float) -> tuple[float, float]:
    """One optimizer step; returns (mean loss per target over the global batch, gradient norm). The normalisation
    is training.train_step's: the loss is summed over every target of every micro-batch on every rank and divided by
    their global number, so any split of the batch gives the gradient of the whole batch."""
    s.zero_grad()
    n_global = torch.tensor(float(sum(training.count_targets(b) for b in micro_batches)))
    if s.dp_group is not None:
        dist.all_reduce(n_global, group=s.dp_group)  # a scalar, not counted
    loss_sum = s.forward_backward(micro_batches, s.layout.dp / n_global.item())
    norm = s.clip_grad_norm(grad_clip)
    s.optimizer_step(lr)
    return s.mean_loss(loss_sum, n_global.item()), norm


def local_micro_batches(x, y, layout: Layout, micro_batches: int, device) -> list:
    """This rank's rows of the global batch (x, y), cut into micro-batches: data-parallel ranks take consecutive
    slices; tensor-parallel and pipeline ranks all see their data-parallel group's rows."""
    dp_rank = layout.rank("dp") if layout.pp == 1 else 0
    rows = x.size(0) // layout.dp
    x, y = x[dp_rank * rows:(dp_rank + 1) * rows], y[dp_rank * rows:(dp_rank + 1) * rows]
    return [(a.to(device), b.to(device)) for a, b in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: every rank holds the whole model and a slice of the batch; gradients are averaged


class GradBuckets:
    """DDP's gradient reduction from scratch (Li et al. 2020, sec. 3.2): parameters in reverse order (roughly the
    order their gradients become ready in the backward pass) are grouped into buckets of about `bucket_bytes`; as
    soon as the last gradient of a bucket has been accumulated, that bucket is flattened and all-reduced
    asynchronously, overlapping with the rest of the backward pass. Buckets are launched in index order, so every
    rank issues the same collectives in the same order. When the last bucket is launched all are waited for, and
    the averaged gradients are copied back. In `no_sync` (accumulation micro-steps) gradients just accumulate
    locally. Every parameter must get a gradient in every backward pass (true for the GPT; torch's DDP has
    find_unused_parameters for models where it is not)."""

    def __init__(self, params, group, bucket_bytes: float):
        self.group, self.sync = group, True
        self.buckets, size = [[]], 0
        for p in reversed([p for p in params if p.requires_grad]):
            if size > 0 and size + p.numel() * p.element_size() > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {p: b for b, bucket in enumerate(self.buckets) for p in bucket}
        self.missing = [len(b) for b in self.buckets]  # gradients a bucket still waits for
        self.launched = []  # (bucket, flat gradient, async work)
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p):
        if not self.sync:
            return
        self.missing[self.bucket_of[p]] -= 1
        while len(self.launched) < len(self.buckets) and self.missing[len(self.launched)] == 0:
            b = len(self.launched)
            flat = torch.cat([q.grad.flatten() for q in self.buckets[b]])
            self.launched.append((b, flat, COMM.all_reduce(flat, self.group, async_op=True)))
        if len(self.launched) == len(self.buckets):
            self._finish()

    def _finish(self):
        n = dist.get_world_size(self.group)
        for b, flat, work in self.launched:
            work.wait()
            flat /= n
            for q, g in zip(self.buckets[b], flat.split([q.numel() for q in self.buckets[b]]), strict=True):
                q.grad.copy_(g.view_as(q))
        self.missing, self.launched = [len(b) for b in self.buckets], []


class DataParallel(Strategy):
    """--strategy ddp: a replica per rank, the gradient averaged by GradBuckets."""

    def __init__(self, model, layout, hyper, rt, bucket_mb=25.0):
        super().__init__(model, layout, hyper, rt)
        self.buckets = GradBuckets(model.parameters(), self.dp_group, bucket_mb * 1e6)
        self.make_optimizer()

    def no_sync(self):
        return _flag_off(self.buckets, "sync")


@contextmanager
def _flag_off(obj, name: str):
    """obj.<name> is False inside."""
    setattr(obj, name, False)
    try:
        yield
    finally:
        setattr(obj, name, True)


class TorchDataParallel(Strategy):
    """--strategy ddp-torch: torch's DistributedDataParallel, with a communication hook that counts the bytes of
    each bucket before doing the default (averaging) all-reduce."""

    def __init__(self, model, layout, hyper, rt, bucket_mb=25.0):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp = nn.parallel.DistributedDataParallel(model, process_group=layout.group("dp"), bucket_cap_mb=bucket_mb,
                                                  device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

        def counted_allreduce(group, bucket):
            n = dist.get_world_size(group)
            COMM.bytes["all-reduce"] += 2 * (n - 1) / n * bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(group, bucket)

        ddp.register_comm_hook(layout.group("dp"), counted_allreduce)
        super().__init__(ddp, layout, hyper, rt)
        self.make_optimizer()

    def no_sync(self):
        return self.model.no_sync()

    def full_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Sharded data parallel: ZeRO-1 from scratch, FSDP2


class Zero1(Strategy):
    """--strategy zero1 (Rajbhandari et al. 2020, sec. 5.1, P_os). Every rank keeps the whole model and its whole
    gradient, but AdamW's state only for its 1/N of the parameters. All parameters live in one flat buffer, padded
    to a multiple of N; rank r owns the slice [r S, (r+1) S). After the backward passes the flat gradient is
    reduce-scattered (each rank receives the average of its slice), each rank updates its slice, and the slices are
    all-gathered back into the buffer that every parameter is a view of. Traffic: a reduce-scatter plus an
    all-gather, the same bytes as DDP's all-reduce."""

    def __init__(self, model, layout, hyper, rt):
        super().__init__(model, layout, hyper, rt)
        self.params = [p for p in model.parameters() if p.requires_grad]
        n, world, rank = sum(p.numel() for p in self.params), dist.get_world_size(self.dp_group), layout.rank("dp")
        self.shard_size = -(-n // world)  # ceil
        self.flat = torch.zeros(self.shard_size * world, device=rt.device)
        decay = torch.zeros_like(self.flat)  # 1 where weight decay applies: matrices (configure_optimizer's rule)
        offset = 0
        for p in self.params:
            self.flat[offset:offset + p.numel()] = p.detach().flatten()
            decay[offset:offset + p.numel()] = float(p.dim() >= 2)
            p.data = self.flat[offset:offset + p.numel()].view_as(p)  # the parameter is now a view of the buffer
            offset += p.numel()
        lo = rank * self.shard_size
        self.shard = nn.Parameter(self.flat[lo:lo + self.shard_size])  # shares storage with its slice of the buffer
        self.decay = decay[lo:lo + self.shard_size]
        self.optimizer = torch.optim.AdamW([self.shard], lr=0.0, betas=hyper.betas, weight_decay=0.0,
                                           fused=rt.device.type == "cuda")
        self.shard_group = self.dp_group

    def reduce_grads(self):
        grad = torch.zeros_like(self.flat)
        torch.cat([p.grad.flatten() for p in self.params], out=grad[:sum(p.numel() for p in self.params)])
        self.shard.grad = torch.empty_like(self.shard)
        COMM.reduce_scatter(self.shard.grad, grad, self.dp_group)
        self.shard.grad /= dist.get_world_size(self.dp_group)  # the average, as DDP's all-reduce

    def grads(self):
        return [self.shard.grad], []

    def optimizer_step(self, lr):
        with torch.no_grad():  # AdamW's decoupled decay p <- p - lr wd p, on the matrices' elements only
            self.shard.mul_(1 - lr * self.hyper.weight_decay * self.decay)
        super().optimizer_step(lr)
        COMM.all_gather(self.flat, self.shard.detach().clone(), self.dp_group)  # every rank gets every slice

    def zero_grad(self):
        super().zero_grad()
        self.shard.grad = None


class FSDP(Strategy):
    """--strategy fsdp: FSDP2 (torch.distributed.fsdp.fully_shard), i.e. ZeRO stage 3. Each block's parameters are
    one DTensor shard per rank; a block's parameters are all-gathered just before its forward and again before its
    backward, its gradients reduce-scattered right after; the root holds the embeddings and ln_f. On CUDA the
    parameters are cast to bf16 for compute and the gradients reduced in fp32 (MixedPrecisionPolicy)."""

    def __init__(self, model, layout, hyper, rt):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = layout.mesh["dp"]
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if rt.dtype == torch.bfloat16 else MixedPrecisionPolicy())
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        super().__init__(model, layout, hyper, rt)
        self.rt = training.Runtime(rt.device, torch.float32, rt.rank, rt.local_rank, rt.world_size)  # mp_policy, no autocast
        self.make_optimizer()

    @contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)  # gradients accumulate unsharded, no reduce-scatter
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, max_norm):
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor().item()

    def full_state_dict(self):
        return {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
                for k, v in self.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Tensor parallel, Megatron style: each rank holds 1/t of every block's heads and MLP


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f (Shoeybi et al. 2019, fig. 3): the identity in the forward pass; in the backward pass the
    gradients of the t ranks' partial branches are all-reduced into the gradient of the replicated input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        COMM.all_reduce(grad, ctx.group)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g, f's conjugate: all-reduce (sum) of the ranks' partial outputs forward, the identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        COMM.all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y_r = f(x) A_r^T + b_r: rank r holds rows [r out/t, (r+1) out/t) of the weight (out, in), so its output is
    its own slice of the features (Shoeybi et al. 2019, eq. 3)."""

    def __init__(self, full: nn.Linear, rank: int, t: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach().chunk(t, dim=0)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().chunk(t, dim=0)[rank].clone())
        self.weight.tp_dim = self.bias.tp_dim = 0  # how full_state_dict reassembles them

    def forward(self, x):
        return F.linear(CopyToTensorParallel.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = g(x_r B_r^T) + b: rank r holds columns [r in/t, (r+1) in/t) of the weight and multiplies its own slice
    of the input features; g sums the partial products. The bias is added once, after the sum (eq. 4)."""

    def __init__(self, full: nn.Linear, rank: int, t: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach().chunk(t, dim=1)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())
        self.weight.tp_dim = 1

    def forward(self, x):
        return ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.group) + self.bias


def qkv_rank_major(n_embd: int, t: int) -> torch.Tensor:
    """Row order of the fused c_attn weight (3C, C) that puts each rank's heads contiguously: [q_0 k_0 v_0 | q_1 k_1
    v_1 | ...], where q_r are the query rows of rank r's heads. Splitting the fused weight contiguously instead would
    hand rank 0 all the queries and half the keys."""
    w = n_embd // t
    return torch.cat([torch.arange(part * n_embd + r * w, part * n_embd + (r + 1) * w)
                      for r in range(t) for part in range(3)])


class TensorParallelAttention(nn.Module):
    """minigpt's CausalSelfAttention on this rank's n_head/t heads: c_attn column-parallel (q, k, v of its heads),
    the attention of each head computed locally (heads are independent), c_proj row-parallel. Training only: causal,
    no padding mask, no KV cache."""

    def __init__(self, attn: CausalSelfAttention, t: int, n_embd: int):
        super().__init__()
        self.head_dim = n_embd // attn.n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        perm = qkv_rank_major(n_embd, t)
        with torch.no_grad():
            self.c_attn.weight.copy_(attn.c_attn.weight[perm])
            self.c_attn.bias.copy_(attn.c_attn.bias[perm])
        self.c_proj = attn.c_proj

    def forward(self, x, mask=None, cache=None):
        if mask is not None or cache is not None:
            raise NotImplementedError("the tensor-parallel attention is for causal training only")
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # each (B, T, C/t): this rank's heads
        q, k, v = (z.view(B, T, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, nh/t, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C/t) in, (B, T, C) out


class TensorParallel(Strategy):
    """--strategy tp (and dp-tp): Megatron's layout from scratch. In every block, c_attn and mlp.c_fc are
    column-parallel and attn.c_proj and mlp.c_proj row-parallel, so each block needs one all-reduce in the
    attention and one in the MLP forward (g), and their two conjugates backward (f). Embeddings, LayerNorms, the
    row-parallel biases and lm_head are replicated; their gradients come out equal on every rank because f has
    already summed the gradient of the replicated activations. (Megatron also splits the embedding by vocabulary;
    it is replicated here.) With dp > 1, the gradients of this rank's part are averaged across its data-parallel
    peers by GradBuckets, as in ddp."""

    def __init__(self, model: GPT, layout, hyper, rt, bucket_mb=25.0):
        t, rank, group = layout.tp, layout.rank("tp"), layout.group("tp")
        for block in model.transformer.h:
            attn = TensorParallelAttention(block.attn, t, model.config.n_embd)
            attn.c_attn = ColumnParallelLinear(attn.c_attn, rank, t, group)
            attn.c_proj = RowParallelLinear(attn.c_proj, rank, t, group)
            block.attn = attn
            block.mlp.c_fc = ColumnParallelLinear(block.mlp.c_fc, rank, t, group)
            block.mlp.c_proj = RowParallelLinear(block.mlp.c_proj, rank, t, group)
        super().__init__(model, layout, hyper, rt)
        self.shard_group = group
        self.buckets = GradBuckets(model.parameters(), self.dp_group, bucket_mb * 1e6) if layout.dp > 1 else None
        self.make_optimizer()

    def no_sync(self):
        return _flag_off(self.buckets, "sync") if self.buckets else nullcontext()

    def grads(self):
        params = [p for p in self.model.parameters() if p.grad is not None]
        return [p.grad for p in params if hasattr(p, "tp_dim")], [p.grad for p in params if not hasattr(p, "tp_dim")]

    def full_state_dict(self):
        out, t = {}, self.layout.tp
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, v in self.model.state_dict().items():
            dim = getattr(params.get(name), "tp_dim", None)
            if dim is not None:
                parts = [torch.empty_like(v) for _ in range(t)]
                dist.all_gather(parts, v.contiguous(), group=self.layout.group("tp"))
                v = torch.cat(parts, dim=dim)
            out[name] = unpermute_qkv(name, v.detach().clone(), t)
        return out


def unpermute_qkv(name: str, v: torch.Tensor, t: int) -> torch.Tensor:
    """A gathered c_attn weight or bias is in rank-major order (qkv_rank_major): put it back in q, k, v order."""
    if not name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return v
    out = torch.empty_like(v)
    out[qkv_rank_major(v.size(0) // 3, t)] = v
    return out


class TorchTensorParallel(Strategy):
    """--strategy tp-torch: the same split through torch.distributed.tensor.parallel. ColwiseParallel shards a
    linear's weight by rows and returns the local slice of the features; RowwiseParallel takes that slice, shards
    its weight by columns and all-reduces the output. Parameters become DTensors; the replicated ones stay plain."""

    def __init__(self, model: GPT, layout, hyper, rt):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = layout.mesh["tp"]
        for block in model.transformer.h:
            block.attn = TensorParallelAttention(block.attn, layout.tp, model.config.n_embd)
            parallelize_module(block, mesh, {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
                                             "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()})
        super().__init__(model, layout, hyper, rt)
        self.shard_group = layout.group("tp")
        self.make_optimizer()

    def grads(self):
        params = [p for p in self.model.parameters() if p.grad is not None]
        sharded = [p.grad.to_local() for p in params if isinstance(p, DTensor) and isinstance(p.placements[0], Shard)]
        whole = [p.grad.to_local() if isinstance(p, DTensor) else p.grad for p in params
                 if not (isinstance(p, DTensor) and isinstance(p.placements[0], Shard))]
        return sharded, whole

    def full_state_dict(self):
        return {k: unpermute_qkv(k, v.full_tensor() if isinstance(v, DTensor) else v.detach().clone(), self.layout.tp)
                for k, v in self.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Pipeline parallel: stage s holds a contiguous run of blocks; micro-batches flow through with send/recv


def stage_blocks(n_layer: int, n_stages: int, stage: int) -> range:
    """The blocks of a stage: as even a split as possible, earlier stages taking the extra ones."""
    sizes = [n_layer // n_stages + (s < n_layer % n_stages) for s in range(n_stages)]
    return range(sum(sizes[:stage]), sum(sizes[:stage + 1]))


class PipelineStage(nn.Module):
    """Blocks of one stage; the first stage also holds the embeddings, the last ln_f, lm_head and the loss.
    Parameter names are those of GPT. The output embedding is tied to the input one; on different stages each
    holds a copy and their gradients are summed between the two (as Megatron-LM does), so the copies stay equal."""

    def __init__(self, gpt: GPT, stage: int, n_stages: int):
        super().__init__()
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.transformer = nn.ModuleDict()
        if self.first:
            self.transformer["wte"], self.transformer["wpe"] = gpt.transformer.wte, gpt.transformer.wpe
        self.transformer["h"] = nn.ModuleDict({str(i): gpt.transformer.h[i]
                                               for i in stage_blocks(gpt.config.n_layer, n_stages, stage)})
        if self.last:
            self.transformer["ln_f"] = gpt.transformer.ln_f
            self.lm_head = nn.Linear(gpt.config.n_embd, gpt.config.vocab_size, bias=False)
            self.lm_head.weight = (gpt.transformer.wte.weight if self.first
                                   else nn.Parameter(gpt.transformer.wte.weight.detach().clone()))

    def forward(self, x, targets=None):
        """x: token ids (B, T) on the first stage, else the previous stage's hidden states (B, T, C). Returns the
        hidden states, or on the last stage the summed cross-entropy over the targets."""
        if self.first:
            x = self.transformer.wte(x) + self.transformer.wpe(torch.arange(x.size(1), device=x.device))
        for block in self.transformer.h.values():
            x = block(x)
        if not self.last:
            return x
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def pipeline_schedule(kind: str, n_micro: int, n_stages: int, stage: int) -> list[tuple[str, int]]:
    """The order in which a stage runs forward ('F', i) and backward ('B', i) of micro-batch i.
    GPipe (Huang et al. 2019): all m forwards, then all m backwards; a stage keeps m micro-batches' activations.
    1F1B (Narayanan et al. 2021, sec. 2.2, non-interleaved): p - s - 1 warm-up forwards, then alternate one forward
    and one backward, then the remaining backwards; a stage keeps at most p - s micro-batches' activations.
    Both leave the same bubble, (p-1)/(m+p-1) of the time (GPipe, sec. 2.2)."""
    if kind == "gpipe":
        return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]
    warmup = min(n_stages - stage - 1, n_micro)
    ops = [("F", i) for i in range(warmup)]
    for i in range(n_micro - warmup):
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(n_micro - warmup, n_micro)]


class StageRunner:
    """Forward and backward of one stage on micro-batch i, keeping each micro-batch's input and output until its
    backward (the activations in flight, counted)."""

    def __init__(self, stage: PipelineStage, micro_batches, scale: float, autocast):
        self.stage, self.micro, self.scale, self.autocast = stage, micro_batches, scale, autocast
        self.stash, self.max_in_flight, self.loss_sum = {}, 0, 0.0

    def forward(self, i: int, x):
        idx, targets = self.micro[i]
        x = idx if self.stage.first else x.requires_grad_()
        with self.autocast():
            out = self.stage(x, targets)
        if self.stage.last:
            self.loss_sum += out.item()
            out = out * self.scale
        self.stash[i] = (x, out)
        self.max_in_flight = max(self.max_in_flight, len(self.stash))
        return out

    def backward(self, i: int, grad):
        x, out = self.stash.pop(i)
        out.backward(grad)
        return None if self.stage.first else x.grad


def run_pipeline(runner, schedule, stage: int, n_stages: int, act_shape, device, dtype=torch.float32) -> float:
    """Execute a stage's schedule: receive the input (or the output's gradient) from the neighbouring stage, compute,
    send the result on with a non-blocking send. Returns the measured bubble fraction of this stage: the share of
    the step, from a common start to the end of the last stage (barriers), during which it computed nothing."""
    sends = []
    dist.barrier()
    t_start, busy = time.perf_counter(), 0.0
    for op, i in schedule:
        if op == "F":
            x = None
            if stage > 0:
                x = torch.empty(act_shape, device=device, dtype=dtype)
                COMM.recv(x, stage - 1)
            t0 = time.perf_counter()
            y = runner.forward(i, x)
            busy += time.perf_counter() - t0
            if stage < n_stages - 1:
                y = y.detach().contiguous()
                sends.append((y, COMM.send(y, stage + 1)))
        else:
            g = None
            if stage < n_stages - 1:
                g = torch.empty(act_shape, device=device, dtype=dtype)
                COMM.recv(g, stage + 1)
            t0 = time.perf_counter()
            gx = runner.backward(i, g)
            busy += time.perf_counter() - t0
            if stage > 0:
                gx = gx.contiguous()
                sends.append((gx, COMM.send(gx, stage - 1)))
    for _, work in sends:
        work.wait()
    dist.barrier()  # the step ends when the last stage is done: the bubble is idle time within the whole step
    return 1.0 - busy / (time.perf_counter() - t_start)


class Pipeline(Strategy):
    """--strategy pp-gpipe / pp-1f1b: rank s is stage s. The micro-batches are the pipeline's micro-batches."""

    def __init__(self, model: GPT, layout, hyper, rt, schedule: str):
        self.stage_id, self.n_stages = layout.rank("pp"), layout.pp
        super().__init__(PipelineStage(model, self.stage_id, self.n_stages), layout, hyper, rt)
        self.kind, self.config = schedule, model.config
        self.shard_group = layout.group("pp")
        # the two copies of the tied embedding: first and last stage (new_group is called by every rank)
        self.tied_group = dist.new_group([0, self.n_stages - 1]) if self.n_stages > 1 else None
        self.bubble, self.max_in_flight = float("nan"), 0
        self.make_optimizer()

    def forward_backward(self, micro_batches, scale):
        runner = StageRunner(self.model, micro_batches, scale, self.rt.autocast)
        rows = micro_batches[0][0].size(0)
        act = (rows, micro_batches[0][0].size(1), self.config.n_embd)
        schedule = pipeline_schedule(self.kind.removeprefix("pp-"), len(micro_batches), self.n_stages, self.stage_id)
        # the residual stream stays fp32 under autocast (fp32 embeddings + bf16 branches), so activations are fp32
        self.bubble = run_pipeline(runner, schedule, self.stage_id, self.n_stages, act, self.rt.device)
        self.max_in_flight = runner.max_in_flight
        if self.tied_group is not None and (self.model.first or self.model.last):
            w = self.model.transformer.wte.weight if self.model.first else self.model.lm_head.weight
            COMM.all_reduce(w.grad, self.tied_group)  # sum the two halves of the tied weight's gradient
        return runner.loss_sum

    def grads(self):
        tied_copy = self.model.lm_head.weight if self.model.last and not self.model.first else None
        return [p.grad for p in self.model.parameters() if p is not tied_copy and p.grad is not None], []

    def clip_grad_norm(self, max_norm):
        norm = super().clip_grad_norm(max_norm)
        if self.model.last and not self.model.first and max_norm > 0:  # the copy was left out above: clip it too
            self.model.lm_head.weight.grad.mul_(min(1.0, max_norm / (norm + 1e-6)))
        return norm

    def mean_loss(self, loss_sum, n_global):
        t = torch.tensor(loss_sum, dtype=torch.float64)
        dist.broadcast(t, src=self.n_stages - 1)  # the loss is known on the last stage; a scalar, not counted
        return t.item() / n_global

    def full_state_dict(self):
        parts = [None] * self.n_stages
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        out = {k: v for part in parts for k, v in part.items()}
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing and memory


def checkpoint_blocks(model: nn.Module) -> int:
    """Make every Block of `model` keep only its input in the forward pass and recompute its insides during the
    backward pass (Chen et al. 2016): per layer, 2sbh bytes instead of sbh(34 + 5as/h) (Korthikanti et al. 2022,
    table 2), for about one more forward pass of compute. Parameter names are unchanged. Returns the count."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        def forward(x, mask=None, cache=None, _forward=block.forward):
            if cache is not None or not torch.is_grad_enabled():
                return _forward(x, mask, cache)
            return checkpoint(_forward, x, mask, cache, use_reentrant=False)
        block.forward = forward
    return len(blocks)


def state_bytes(s: Strategy) -> dict:
    """Bytes of the model state this rank holds, counted from its tensors: parameters, gradients, optimizer state
    (the local shard of a DTensor)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    params = {id(p): p for p in s.model.parameters()} | ({id(s.shard): s.shard} if isinstance(s, Zero1) else {})
    flat_views = isinstance(s, Zero1)  # parameters and the shard are views of one flat buffer: count it once
    n_params = s.flat.numel() * 4 if flat_views else sum(local(p).numel() * p.element_size() for p in params.values())
    n_grads = sum(local(p.grad).numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    n_opt = sum(local(v).numel() * v.element_size() for st in s.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"params": n_params, "grads": n_grads, "optimizer": n_opt}


# ----------------------------------------------------------------------------------------------------------------
# Theory: bytes per rank per step, from the model's shape alone


def theory_bytes(strategy: str, cfg: GPTConfig, layout: Layout, rows_per_micro: int, n_micro: int,
                 rank: int = 0, recompute: bool = False) -> float:
    """What each rank should send per optimizer step (fp32), under the ring algorithms of CommLog.
    DDP: one all-reduce of the gradient, 2(N-1)/N * 4 Psi (Li et al. 2020). ZeRO-1: reduce-scatter + all-gather,
    (N-1)/N * 4 Psi each, the same total (Rajbhandari et al. 2020, sec. 7). FSDP2 (ZeRO-3): all-gather in forward
    and in backward plus a reduce-scatter, 3 (N-1)/N * 4 Psi, 1.5x DDP (ZeRO sec. 7.2.2).
    Tensor parallel: 4 all-reduces of the (b, T, C) activations per block per micro-batch, 2 forward (g) and 2
    backward (f) (Shoeybi et al. 2019, sec. 3), and 1 more when checkpointing recomputes the forward. Pipeline:
    one (b, T, C) activation forward and one gradient backward per micro-batch across each stage boundary, plus the
    tied embedding's gradient (V C) between the first and last stage."""
    psi = sum(p.numel() for p in GPT(cfg).parameters())  # Psi: parameters, the tied embedding once
    V, C, L, T = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.block_size
    ring = lambda n: 2 * (n - 1) / n
    act = rows_per_micro * T * C * 4
    if strategy in ("ddp", "ddp-torch", "zero1"):
        return ring(layout.dp) * 4 * psi
    if strategy == "fsdp":
        # per micro-batch each block is all-gathered twice (forward, backward), the root (embeddings, ln_f) once:
        # FSDP2 keeps the root unsharded between forward and backward; one reduce-scatter per step (no_sync before)
        blocks = sum(p.numel() for p in GPT(cfg).transformer.h.parameters())
        return (layout.dp - 1) / layout.dp * 4 * (n_micro * (psi - blocks + 2 * blocks) + psi)
    if strategy in ("tp", "tp-torch", "dp-tp"):
        t, d = layout.tp, layout.dp
        # checkpointing recomputes each block's forward, but torch stops the recomputation once every tensor the
        # backward needs is back (non-reentrant early stop), before the MLP's final all-reduce: 1 more, not 2
        tp_bytes = (5 if recompute else 4) * L * n_micro * ring(t) * act
        # the local part of the model: the split matrices and column-parallel biases are 1/t of their size
        split = L * (3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C)
        return tp_bytes + ring(d) * 4 * (psi - split + split / t)
    if strategy.startswith("pp-"):
        p, s = layout.pp, rank
        sends = n_micro * act * ((s < p - 1) + (s > 0))
        return sends + (ring(2) * 4 * V * C if p > 1 and s in (0, p - 1) else 0)
    raise ValueError(strategy)


# ----------------------------------------------------------------------------------------------------------------
# Planner: memory per GPU and step time of a large run, from published formulas


def model_state_memory(n_params: float, dp: int, zero_stage: int, tp: int = 1, pp: int = 1, bytes_param: int = 2,
                       bytes_grad: int = 2, k: int = 12) -> float:
    """Bytes per GPU of parameters, gradients and optimizer states. ZeRO (Rajbhandari et al. 2020, sec. 3.1 and
    fig. 1): mixed-precision Adam keeps 2 bytes of fp16 parameters, 2 of fp16 gradients and K = 12 of fp32 master
    parameters, momentum and variance per parameter, (2 + 2 + K) Psi in all; stage 1 divides the K Psi by the Nd
    data-parallel ranks, stage 2 the gradients too, stage 3 the parameters too. Tensor and pipeline parallelism
    first give each GPU Psi / (tp pp) of the parameters (Narayanan et al. 2021, sec. 3). For fp32 training with
    AdamW pass bytes_param=4, bytes_grad=4, k=8."""
    return sum(model_state_breakdown(n_params, dp, zero_stage, tp, pp, bytes_param, bytes_grad, k).values())


def model_state_breakdown(n_params, dp, zero_stage, tp=1, pp=1, bytes_param=2, bytes_grad=2, k=12) -> dict:
    if zero_stage not in (0, 1, 2, 3):
        raise InputError(f"ZeRO stage {zero_stage}: expected 0, 1, 2 or 3")
    psi = n_params / (tp * pp)
    return {"params": bytes_param * psi / (dp if zero_stage >= 3 else 1),
            "grads": bytes_grad * psi / (dp if zero_stage >= 2 else 1),
            "optimizer": k * psi / (dp if zero_stage >= 1 else 1)}


def activation_memory_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                recompute: str = "none", flash: bool = False) -> float:
    """Bytes of activations one transformer layer keeps for its backward pass, 16-bit activations with dropout
    (Korthikanti et al. 2022, sec. 4 and table 2; s sequence length, b micro-batch, h hidden size, a heads,
    t tensor-parallel size):
        no parallelism                          sbh(34 + 5as/h)
        tensor parallel                         sbh(10 + 24/t + 5as/(ht))
        tensor + sequence parallel              sbh(34/t + 5as/(ht))
        selective recomputation (of attention)  drops the 5as/h term
        full recomputation                      2sbh (the layer's input only)
    The 5as/h term is the attention scores, softmax and dropout mask (s x s per head). flash=True drops it too:
    FlashAttention never stores the scores (Dao et al. 2022), which postdates the paper."""
    if recompute == "full":
        return 2 * s * b * h
    if recompute not in ("none", "selective"):
        raise InputError(f"recompute {recompute!r}: expected 'none', 'selective' or 'full'")
    scores = 0 if recompute == "selective" or flash else 5 * a * s / (h * t)
    return s * b * h * ((34 / t if sp else 10 + 24 / t) + scores)


@dataclass
class PlanArgs:
    n_params: float = 70e9
    """parameters of the model"""
    n_layer: int = 80
    """transformer layers"""
    hidden: int = 8192
    """hidden size h"""
    heads: int = 64
    """attention heads a"""
    seq_len: int = 4096
    """sequence length s"""
    global_batch: int = 1024
    """sequences per optimizer step (1024 x 4096 = 4M tokens, Llama 2's batch)"""
    micro_batch: int = 1
    """sequences per micro-batch b"""
    gpus: int = 512
    """GPUs in the cluster"""
    gpus_per_node: int = 8
    """GPUs per node; tensor-parallel groups stay inside a node"""
    gpu_memory_gb: float = 80.0
    """memory per GPU, GB (10^9 bytes)"""
    reserve_gb: float = 8.0
    """memory kept free for the CUDA context, workspaces, communication buffers and fragmentation"""
    peak_tflops: float = 989.0
    """dense bf16 peak per GPU, TFLOP/s (H100 SXM: 989)"""
    efficiency: float = 0.5
    """fraction of peak the matmuls sustain (Megatron-LM reaches 0.44-0.52 at this scale, Narayanan et al. 2021)"""
    intra_node_gbs: float = 450.0
    """bandwidth per GPU inside a node, GB/s (NVLink 4: 450 per direction)"""
    inter_node_gbs: float = 50.0
    """bandwidth per GPU between nodes, GB/s (one 400 Gb/s InfiniBand NIC per GPU)"""
    zero_stage: int = 1
    """ZeRO stage over the data-parallel ranks (0: none)"""
    flash_attention: bool = True
    """attention without stored scores (FlashAttention), as every current training stack uses"""
    dp: int = 0
    """data-parallel size to evaluate (0: search; with --tp and --pp set, dp = gpus / (tp pp))"""
    tp: int = 0
    """tensor-parallel size (0: search over 1, 2, 4, 8 up to gpus_per_node)"""
    pp: int = 0
    """pipeline stages (0: search over divisors of n_layer)"""
    recompute: str = ""
    """'none', 'selective' or 'full' ('': search)"""
    top: int = 8
    """layouts to list"""


def plan_layout(a: PlanArgs, dp: int, tp: int, pp: int, recompute: str) -> dict:
    """Memory per GPU and step time of one layout (1F1B pipeline, sequence parallel whenever tp > 1)."""
    s, b, h, L = a.seq_len, a.micro_batch, a.hidden, a.n_layer
    m = a.global_batch // (dp * b)  # micro-batches per pipeline per step
    states = model_state_breakdown(a.n_params, dp, a.zero_stage, tp, pp)
    # the first stage keeps min(p, m) micro-batches of its L/p layers in flight under 1F1B (Korthikanti sec. 4.2.3)
    act = (activation_memory_per_layer(s, b, h, a.heads, tp, tp > 1, recompute, a.flash_attention)
           * L / pp * min(pp, m))
    memory = sum(states.values()) + act
    # compute: 6N + 12 L h s FLOPs per token (Kaplan et al. 2020; minigpt.flops_per_token); recomputation adds a
    # forward pass of the layers, 2N per token, for 'full' (Korthikanti sec. 5; selective adds ~the attention only)
    tokens = a.global_batch * s
    flops = M.flops_per_token(GPTConfig(n_layer=L, n_embd=h, block_size=s), int(a.n_params)) * tokens
    executed = flops + (2 * a.n_params * tokens if recompute == "full" else 0)
    compute = executed / (a.gpus * a.peak_tflops * 1e12 * a.efficiency)
    bubble = compute * (pp - 1) / m  # the pipeline bubble: (p-1)/(m+p-1) of the whole step (GPipe, sec. 2.2)
    ring = lambda n: 2 * (n - 1) / n
    # tensor parallel with sequence parallelism: per layer and micro-batch, all-gathers and reduce-scatters moving
    # the same bytes as 4 all-reduces of the 2sbh activations (Korthikanti sec. 4.2.2), more with recomputation
    n_tp = 4 + (2 if recompute == "full" else 0)
    tp_time = (L / pp) * m * n_tp * ring(tp) * 2 * s * b * h / (a.intra_node_gbs * 1e9) if tp > 1 else 0.0
    # data parallel: the bf16 gradients once per step (ZeRO 1/2: reduce-scatter + all-gather, the same bytes;
    # ZeRO-3: 1.5x), not overlapped with compute here, so an upper bound
    dp_bytes = ring(dp) * 2 * a.n_params / (tp * pp) * (1.5 if a.zero_stage == 3 else 1.0)
    dp_time = dp_bytes / (a.inter_node_gbs * 1e9)
    pp_time = 2 * m * 2 * s * b * h / tp / (a.inter_node_gbs * 1e9) if pp > 1 else 0.0  # activations and grads
    step = compute + bubble + tp_time + dp_time + pp_time
    return dict(dp=dp, tp=tp, pp=pp, recompute=recompute, micro_batches=m, states=states, activations=act,
                memory=memory, fits=memory <= (a.gpu_memory_gb - a.reserve_gb) * 1e9, compute=compute,
                bubble=bubble, tp_comm=tp_time, dp_comm=dp_time, pp_comm=pp_time, step=step,
                tokens_per_s=tokens / step, mfu=flops / step / (a.gpus * a.peak_tflops * 1e12))  # MFU: model FLOPs only


def plan(a: PlanArgs) -> list[dict]:
    """Every layout (tp within a node, pp dividing the layers, dp the rest, the global batch divisible into
    micro-batches), fitting ones first, fastest first."""
    tps = [a.tp] if a.tp else [t for t in (1, 2, 4, 8) if t <= a.gpus_per_node]
    pps = [a.pp] if a.pp else [p for p in range(1, a.n_layer + 1) if a.n_layer % p == 0]
    # with FlashAttention there is nothing for selective recomputation to drop: it is the same as none
    recomputes = [a.recompute] if a.recompute else ["none", "full"] if a.flash_attention else ["none", "selective",
                                                                                                 "full"]
    out = []
    for tp in tps:
        if a.heads % tp:
            continue
        for pp in pps:
            if a.gpus % (tp * pp) or (a.dp and a.dp != a.gpus // (tp * pp)):
                continue
            dp = a.gpus // (tp * pp)
            if a.global_batch % (dp * a.micro_batch):
                continue
            out += [plan_layout(a, dp, tp, pp, r) for r in recomputes]
    if not out:
        raise InputError(f"no layout of {a.gpus} GPUs fits these constraints (--tp {a.tp} --pp {a.pp} --dp {a.dp}, "
                         f"global batch {a.global_batch}, micro-batch {a.micro_batch})")
    return sorted(out, key=lambda r: (not r["fits"], r["step"]))


def plan_main(a: PlanArgs) -> list[dict]:
    rows = plan(a)
    gb = lambda x: f"{x / 1e9:6.1f}"
    print(f"{a.n_params / 1e9:g}B parameters, {a.n_layer} layers, h={a.hidden}, {a.heads} heads, s={a.seq_len}; "
          f"{a.global_batch} sequences per step; {a.gpus} GPUs of {a.gpu_memory_gb:g} GB ({a.reserve_gb:g} reserved), "
          f"{a.peak_tflops:g} TFLOP/s at {a.efficiency:.0%}; ZeRO stage {a.zero_stage}")
    print("   dp   tp   pp  recompute   m | params  grads  optim   activ  total GB | compute bubble  tp-comm "
          "dp-comm  step s  MFU")
    for r in rows[:a.top]:
        st = r["states"]
        print(f"{r['dp']:5d}{r['tp']:5d}{r['pp']:5d}  {r['recompute']:9s}{r['micro_batches']:4d} | "
              f"{gb(st['params'])} {gb(st['grads'])} {gb(st['optimizer'])} {gb(r['activations'])} {gb(r['memory'])}"
              f"{'' if r['fits'] else ' !'}    | {r['compute']:6.2f} {r['bubble']:6.2f} {r['tp_comm']:8.2f} "
              f"{r['dp_comm']:7.2f} {r['step']:7.2f} {r['mfu']:4.0%}")
    best = rows[0]
    if not best["fits"]:
        print("no layout fits in memory: add GPUs, raise the ZeRO stage, or shorten the micro-batch")
    else:
        print(f"plan: dp={best['dp']} tp={best['tp']} pp={best['pp']} recompute={best['recompute']}: "
              f"{best['memory'] / 1e9:.1f} GB per GPU, {best['step']:.1f} s per step, "
              f"{best['tokens_per_s'] / 1e6:.2f}M tokens/s")
    return rows


# ----------------------------------------------------------------------------------------------------------------


def build_strategy(name: str, model: GPT, layout: Layout, hyper: Hyper, rt: training.Runtime, bucket_mb: float = 25.0):
    if name == "ddp":
        return DataParallel(model, layout, hyper, rt, bucket_mb)
    if name == "ddp-torch":
        return TorchDataParallel(model, layout, hyper, rt, bucket_mb)
    if name == "zero1":
        return Zero1(model, layout, hyper, rt)
    if name == "fsdp":
        return FSDP(model, layout, hyper, rt)
    if name in ("tp", "dp-tp"):
        return TensorParallel(model, layout, hyper, rt, bucket_mb)
    if name == "tp-torch":
        return TorchTensorParallel(model, layout, hyper, rt)
    if name.startswith("pp-"):
        return Pipeline(model, layout, hyper, rt, name)
    raise InputError(f"--strategy {name!r}: expected one of {', '.join(STRATEGIES)}")


def main(args: Args) -> dict:
    # --- processes and layout ---
    if args.resume:
        raise InputError("--resume: parallel.py does not checkpoint sharded optimizer states; minigpt.py resumes")
    rt = training.setup_runtime(args.device, args.dtype)
    if not dist.is_initialized():  # one process: a group of one, so every strategy runs unchanged
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    layout = make_layout(args.strategy, dist.get_world_size(), args.tp, rt.device.type, args.n_head, args.n_layer,
                         args.batch_size, args.micro_batches)
    master = dist.get_rank() == 0
    run_dir = Path(args.output_dir) / args.run_name

    # --- data: character-level, tokenized and cached by rank 0 first ---
    text, source = M.load_text(M.Args(data_path=args.data_path))
    tokenizer = M.CharTokenizer.from_text(text)
    if master:
        M.tokenize_corpus(text, tokenizer, 0.1, source)
    dist.barrier()
    train_data, val_data = M.tokenize_corpus(text, tokenizer, 0.1, source)

    # --- model: the same full model on every rank, then split by the strategy ---
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(cfg).to(rt.device)
    n_params = model.num_params()
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    if args.compile:
        for block in model.transformer.h:
            block.compile()
    s = build_strategy(args.strategy, model, layout, Hyper(args.weight_decay, (args.beta1, args.beta2)), rt,
                       args.bucket_mb)
    rows = args.batch_size // (layout.dp * args.micro_batches)
    theory = theory_bytes(args.strategy, cfg, layout, rows, args.micro_batches, dist.get_rank(),
                          args.activation_checkpointing)
    if master:
        print(f"{n_params / 1e6:.2f}M parameters; --strategy {args.strategy} on {dist.get_world_size()} process(es): "
              f"dp={layout.dp} tp={layout.tp} pp={layout.pp}; {args.micro_batches} micro-batch(es) of {rows} "
              f"sequences per process; device {rt.device} ({rt.dtype})")

    # --- training ---
    logger = training.Logger(args, master)
    tokens_per_step = args.batch_size * args.block_size
    history = {"train_loss": {}, "bytes": [], "peak_memory": None, "bubble": []}
    t0 = time.perf_counter()
    for step in range(args.max_iters):
        lr = training.lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
        x, y = M.get_batch(train_data, args.batch_size, args.block_size, training.seeded(args.seed, step), "cpu")
        micro = local_micro_batches(x, y, layout, args.micro_batches, rt.device)
        COMM.reset()
        if step == 2:  # the collectives of one step, seen at the dispatcher: an independent count
            with CollectiveBytes() as seen:
                loss, norm = train_step(s, micro, lr, args.grad_clip)
            history["seen_bytes"] = seen.total
        elif step == 1:  # measure the peak memory of one step (after the first, which allocates optimizer state)
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
                loss, norm = train_step(s, micro, lr, args.grad_clip)
                history["peak_memory"] = torch.cuda.max_memory_allocated(rt.device)
            else:
                with training.PeakMemory() as pm:
                    loss, norm = train_step(s, micro, lr, args.grad_clip)
                history["peak_memory"] = pm.peak
        else:
            loss, norm = train_step(s, micro, lr, args.grad_clip)
        history["train_loss"][step + 1] = loss
        history["bytes"].append(COMM.total)
        if isinstance(s, Pipeline):
            history["bubble"].append(s.bubble)
        training.sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                   "perf/tokens_per_s": tokens_per_step / dt, "comm/bytes_per_step": COMM.total}
        logger.log(metrics, step + 1, line=(step + 1) % args.log_interval == 0 or step == 0)

    # --- what was measured, against the theory ---
    counted = "-" if args.strategy in ("fsdp", "tp-torch") else f"{COMM.total:,.0f}"  # inside torch: not ours
    seen = f"{history['seen_bytes']:,.0f}" if "seen_bytes" in history else "-"
    mem = state_bytes(s)
    report = [f"rank {dist.get_rank()}: bytes sent per step: counted {counted}, at the dispatcher {seen}, theory "
              f"{theory:,.0f} ({', '.join(f'{k} {v:,.0f}' for k, v in COMM.bytes.items()) or '-'}); model state "
              f"{sum(mem.values()) / 2**20:.2f} MiB (params {mem['params'] / 2**20:.2f}, grads "
              f"{mem['grads'] / 2**20:.2f}, optimizer {mem['optimizer'] / 2**20:.2f}); peak memory in a step "
              f"{(history['peak_memory'] or 0) / 2**20:.2f} MiB"]
    if isinstance(s, Pipeline):
        bubble = sorted(history["bubble"][1:] or history["bubble"])[len(history["bubble"][1:] or [0]) // 2]
        p, m = layout.pp, args.micro_batches
        report.append(f"  stage {s.stage_id}: bubble {bubble:.3f} (median over steps), theory (p-1)/(m+p-1) = "
                      f"{(p - 1) / (m + p - 1):.3f}; activations of {s.max_in_flight} micro-batch(es) in flight")
        history["bubble_median"] = bubble
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, "\n".join(report))
    full = s.full_state_dict()
    if master:
        print("\n".join(lines))
        reference = GPT(cfg)
        reference.load_state_dict(full)
        reference.to(rt.device)
        val = M.estimate_loss(reference, val_data, args.eval_iters, 16, args.block_size, rt, args.seed + 1)
        history["final_val_loss"] = val
        reference.save_pretrained(run_dir / "final")
        print(f"final val loss {val:.4f} ({args.eval_iters} batches); model in {run_dir / 'final'}")
        logger.log({"eval/final_val_loss": val}, args.max_iters)
    logger.finish()
    history.update(theory_bytes=theory, state_bytes=mem, layout=(layout.dp, layout.tp, layout.pp), run_dir=str(run_dir))
    dist.destroy_process_group()
    return history


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["plan"]:
            plan_main(tyro.cli(PlanArgs, args=sys.argv[2:], prog="parallel.py plan"))
        else:
            main(tyro.cli(Args))
    except (InputError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

"""data_parallel.py: the interface every parallel strategy implements, and the data-parallel family: DDP, ZeRO-1
and FSDP2, every rank holding the whole model (or a shard of it that it gathers) and a slice of the batch.

A Strategy is one rank's part of the model plus the communication that makes it compute exactly the step of one
process on the same global batch; its default methods are those of a replicated model, so data parallelism is the
base case and each strategy overrides what it changes (model_parallel.py splits the model itself). Every collective
of the from-scratch strategies goes through CommLog, which counts the bytes this rank sends. Here:
    Layout            the process grid (data x tensor, or pipeline stages) as a DeviceMesh
    CommLog           the collectives, counted under the ring algorithms (Patarasuk & Yuan 2009)
    Strategy          the interface, and train_step: one optimizer step of any strategy, token-normalised
    GradBuckets       DDP's bucketed gradient all-reduce, overlapped with the backward pass (Li et al. 2020)
    DataParallel      --strategy ddp, from scratch; TorchDataParallel, --strategy ddp-torch
    Zero1             --strategy zero1: AdamW's state sharded (Rajbhandari et al. 2020, "ZeRO", stage 1)
    FSDP              --strategy fsdp: torch's FSDP2 `fully_shard` per block (ZeRO stage 3; Zhao et al. 2023)

Nothing here runs on its own; parallel.py builds a strategy and trains with it:
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy ddp
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy zero1
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy fsdp
"""

from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

import training

# ----------------------------------------------------------------------------------------------------------------
# Layout: which ranks hold which part (parallel.py checks and builds it)


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

    @property
    def pipelined(self) -> bool:
        """A pipeline layout (its mesh is ("pp",), even with a single stage): no data-parallel dimension."""
        return self.mesh.mesh_dim_names == ("pp",)


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

# ----------------------------------------------------------------------------------------------------------------
# The interface every strategy implements, and the training step they share


@dataclass
class Hyper:
    """AdamW's settings (training.configure_optimizer: decay on matrices only)."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)


class Strategy:
    """One rank's part of the model and the communication that makes it compute the single-process step.

    The default methods are those of a replicated model; each strategy overrides what it changes. `model` is what
    this rank runs forward; `dp_group` the ranks that hold different rows of the batch."""

    def __init__(self, model: nn.Module, layout: Layout, hyper: Hyper, rt: training.Runtime):
        self.model, self.layout, self.hyper, self.rt = model, layout, hyper, rt
        self.dp_group = None if layout.pipelined else layout.group("dp")
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
    dp_rank = 0 if layout.pipelined else layout.rank("dp")
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

    @contextmanager
    def no_sync(self):
        """Inside, gradients accumulate locally and nothing is launched (an accumulation micro-step)."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


class DataParallel(Strategy):
    """--strategy ddp: a replica per rank, the gradient averaged by GradBuckets."""

    def __init__(self, model, layout, hyper, rt, bucket_mb=25.0):
        super().__init__(model, layout, hyper, rt)
        self.buckets = GradBuckets(model.parameters(), self.dp_group, bucket_mb * 1e6)
        self.make_optimizer()

    def no_sync(self):
        return self.buckets.no_sync()

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
        # precision is the mp_policy's: no autocast on top of it
        self.rt = training.Runtime(rt.device, torch.float32, rt.rank, rt.local_rank, rt.world_size)
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

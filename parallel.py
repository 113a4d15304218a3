"""parallel.py: training one GPT across many processes: data, sharded, tensor and pipeline parallelism, activation
checkpointing, each rank's bytes sent and memory measured against the theory; and the command for the cluster
planner.

Each strategy is written out so that the communication it needs is in plain sight, and each computes the same
training step as one process on the same global batch (the tests prove it to 1e-5 on CPU). The model is minigpt's
GPT. This file is the runner: it checks the layout, builds the strategy, trains, and compares what it measured with
the closed-form theory. The strategies live in two files (`--strategy`):
  data_parallel.py (the Strategy interface, and every rank holding the whole model or a shard of it)
    ddp        data parallel from scratch: bucketed, averaged gradient all-reduce overlapped with the backward pass,
               no all-reduce on accumulation micro-steps (Li et al. 2020, "PyTorch Distributed")
    ddp-torch  the same with torch's DistributedDataParallel
    zero1      ZeRO stage 1 from scratch: AdamW's state sharded; gradients reduce-scattered, parameters all-gathered
               after the step (Rajbhandari et al. 2020, "ZeRO")
    fsdp       FSDP2, torch's `fully_shard` per block (ZeRO stage 3; Zhao et al. 2023); bf16 mixed precision on CUDA
  model_parallel.py (the model itself split)
    tp         Megatron tensor parallelism from scratch: column- and row-parallel linears joined by the conjugate f/g
               functions, attention heads and the MLP split (Shoeybi et al. 2019, "Megatron-LM")
    tp-torch   the same layout through torch.distributed.tensor.parallel
    pp-gpipe   pipeline parallelism from scratch, all forwards then all backwards (Huang et al. 2019, "GPipe")
    pp-1f1b    the same with the one-forward-one-backward schedule (Narayanan et al. 2021, "PipeDream-Flush" /
               Megatron-LM 2); the bubble fraction is measured and compared with (p-1)/(m+p-1)
    dp-tp      2D: tensor parallel inside groups of --tp ranks, data parallel across the groups
`--activation-checkpointing` recomputes each block in the backward pass (Chen et al. 2016) with any strategy.
Every run prints the bytes each rank sent per step, counted in the code and independently at the dispatcher, against
the closed-form theory, and its memory. `python parallel.py plan` is planner.py: memory per GPU and step time of a
large run (ZeRO paper; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").

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
    python parallel.py plan --n-params 7.5e9 --gpus 64 --tp 1 --pp 1 --zero-stage 3   # = python planner.py ...
"""

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import data_parallel as DP
import minigpt as M
import model_parallel as MP
import planner
import tokenization
import training
from gpt import GPT, Block, GPTConfig
from training import NON_NEGATIVE, POSITIVE, InputError

STRATEGIES = ("ddp", "ddp-torch", "zero1", "fsdp", "tp", "tp-torch", "pp-gpipe", "pp-1f1b", "dp-tp")


@dataclass
class Args(training.RunArgs):
    """Train one GPT with a parallel --strategy: one process, or one per rank under torchrun.
    `python parallel.py plan [--help]`: memory per GPU and step time of a large run (planner.py)."""

    # --- the common options (training.RunArgs), where they differ here ---
    compile: bool = False
    """compile each block with torch.compile"""
    run_name: str = "parallel"
    """name of the run: the trained model goes to <output-dir>/<run-name>/final/"""
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
    arch: str = "gpt2"
    """'gpt2' or 'llama' (rotary positions, RMSNorm, SwiGLU, grouped-query attention)"""
    n_kv_head: int | None = None
    """llama: key/value heads (default: --n-head); tensor parallelism needs them divisible by --tp"""
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
# Layout: clear errors for layouts that cannot work, then the process grid and the strategy on it


def check_layout(strategy: str, world: int, tp: int, n_head: int, n_layer: int, batch_size: int,
                 micro_batches: int, n_kv_head: int | None = None) -> tuple[int, int, int]:
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
        if n_kv_head is not None and n_kv_head % tp:
            raise InputError(f"--n-kv-head {n_kv_head} is not divisible by the tensor-parallel size {tp}: every rank "
                             f"must hold whole key/value heads, each with the query heads that share it")
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
                micro_batches: int, n_kv_head: int | None = None) -> DP.Layout:
    """The checked layout as a DeviceMesh of this process group (ranks dp-major, see data_parallel.Layout)."""
    from torch.distributed.device_mesh import init_device_mesh

    dp, tp, pp = check_layout(strategy, world, tp, n_head, n_layer, batch_size, micro_batches, n_kv_head)
    if strategy.startswith("pp-"):
        return DP.Layout(dp, tp, pp, init_device_mesh(device_type, (pp,), mesh_dim_names=("pp",)))
    return DP.Layout(dp, tp, pp, init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp")))


def build_strategy(name: str, model: GPT, layout: DP.Layout, hyper: DP.Hyper, rt: training.Runtime,
                   bucket_mb: float = 25.0) -> DP.Strategy:
    """This rank's part of `model` under strategy `name`, with its optimizer: data_parallel.py's replicated and sharded
    strategies, model_parallel.py's tensor and pipeline ones."""
    if name == "ddp":
        return DP.DataParallel(model, layout, hyper, rt, bucket_mb)
    if name == "ddp-torch":
        return DP.TorchDataParallel(model, layout, hyper, rt, bucket_mb)
    if name == "zero1":
        return DP.Zero1(model, layout, hyper, rt)
    if name == "fsdp":
        return DP.FSDP(model, layout, hyper, rt)
    if name in ("tp", "dp-tp"):
        return MP.TensorParallel(model, layout, hyper, rt, bucket_mb)
    if name == "tp-torch":
        return MP.TorchTensorParallel(model, layout, hyper, rt)
    if name.startswith("pp-"):
        return MP.Pipeline(model, layout, hyper, rt, name)
    raise InputError(f"--strategy {name!r}: expected one of {', '.join(STRATEGIES)}")


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing, with any strategy


def checkpoint_blocks(model: nn.Module) -> int:
    """Make every Block of `model` keep only its input in the forward pass and recompute its insides during the
    backward pass (Chen et al. 2016): per layer, 2sbh bytes instead of sbh(34 + 5as/h) (Korthikanti et al. 2022,
    table 2), for about one more forward pass of compute. Parameter names are unchanged. Returns the count."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        def forward(x, mask=None, cache=None, rope=None, _forward=block.forward):
            if cache is not None or not torch.is_grad_enabled():
                return _forward(x, mask, cache, rope)
            return checkpoint(_forward, x, mask, cache, rope, use_reentrant=False)
        block.forward = forward
    return len(blocks)


# ----------------------------------------------------------------------------------------------------------------
# Measurement: bytes sent seen at the dispatcher, model state counted from the tensors, and the theory


class CollectiveBytes(TorchDispatchMode):
    """A second, independent count: every collective, whoever issues it (the from-scratch strategies, DDP, FSDP2,
    DTensor), passes through the dispatcher as a c10d op; this mode sees each one on the calling thread and counts the
    bytes with data_parallel.CommLog's ring model. One-element tensors (token counts, losses, norms) are bookkeeping
    and left out."""

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


def state_bytes(s: DP.Strategy) -> dict:
    """Bytes of the model state this rank holds, counted from its tensors: parameters, gradients, optimizer state
    (the local shard of a DTensor)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    params = {id(p): p for p in s.model.parameters()} | ({id(s.shard): s.shard} if isinstance(s, DP.Zero1) else {})
    flat_views = isinstance(s, DP.Zero1)  # parameters and the shard are views of one flat buffer: count it once
    n_params = s.flat.numel() * 4 if flat_views else sum(local(p).numel() * p.element_size() for p in params.values())
    n_grads = sum(local(p.grad).numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    n_opt = sum(local(v).numel() * v.element_size() for st in s.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"params": n_params, "grads": n_grads, "optimizer": n_opt}


def theory_bytes(strategy: str, cfg: GPTConfig, layout: DP.Layout, rows_per_micro: int, n_micro: int,
                 rank: int = 0, recompute: bool = False) -> float:
    """What each rank should send per optimizer step (fp32), under the ring algorithms of data_parallel.CommLog.
    DDP: one all-reduce of the gradient, 2(N-1)/N * 4 Psi (Li et al. 2020). ZeRO-1: reduce-scatter + all-gather,
    (N-1)/N * 4 Psi each, the same total (Rajbhandari et al. 2020, sec. 7). FSDP2 (ZeRO-3): all-gather in forward
    and in backward plus a reduce-scatter, 3 (N-1)/N * 4 Psi, 1.5x DDP (ZeRO sec. 7.2.2).
    Tensor parallel: 4 all-reduces of the (b, T, C) activations per block per micro-batch, 2 forward (g) and 2
    backward (f) (Shoeybi et al. 2019, sec. 3), and 1 more when checkpointing recomputes the forward. Pipeline:
    one (b, T, C) activation forward and one gradient backward per micro-batch across each stage boundary, plus the
    tied embedding's gradient (V C) between the first and last stage. Llama blocks are counted the same way (no
    biases; q, k, v of n_kv_head key/value heads)."""
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
        split = sum(p.numel() for name, p in GPT(cfg).transformer.h.named_parameters()
                    if name.split(".")[-2] in MP.COLUMN or (name.split(".")[-2] in MP.ROW and name.endswith("weight")))
        return tp_bytes + ring(d) * 4 * (psi - split + split / t)
    if strategy.startswith("pp-"):
        p, s = layout.pp, rank
        sends = n_micro * act * ((s < p - 1) + (s > 0))
        tied = cfg.tie_word_embeddings and p > 1 and s in (0, p - 1)
        return sends + (ring(2) * 4 * V * C if tied else 0)
    raise ValueError(strategy)


# ----------------------------------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # --- processes and layout ---
    if args.resume:
        raise InputError("--resume: parallel.py does not checkpoint sharded optimizer states; minigpt.py resumes")
    training.check_args(args, {"bucket_mb": POSITIVE, "tp": NON_NEGATIVE})
    rt = training.setup_runtime(args.device, args.dtype)
    own_group = not dist.is_initialized()
    if own_group:  # one process: a group of one, so every strategy runs unchanged
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    run_dir = Path(args.output_dir) / args.run_name
    try:
        layout = make_layout(args.strategy, dist.get_world_size(), args.tp, rt.device.type, args.n_head, args.n_layer,
                             args.batch_size, args.micro_batches, args.n_kv_head or args.n_head)
        # the directory of the trained model (<run>/final/), checked before any work
        training.check_run_dir(run_dir, overwrite=args.overwrite, marker="final", can_resume=False)
    except InputError:
        if own_group:  # a refused run leaves no process group behind (a caller may start another)
            dist.destroy_process_group()
        raise
    master = dist.get_rank() == 0

    # --- data: character-level, tokenized and cached by rank 0 first ---
    text, source = M.load_text(M.Args(data_path=args.data_path))
    tokenizer = tokenization.CharTokenizer.from_text(text)
    if master:
        M.tokenize_corpus(text, tokenizer, 0.1, source)
    dist.barrier()
    train_data, val_data = M.tokenize_corpus(text, tokenizer, 0.1, source)

    # --- model: the same full model on every rank, then split by the strategy ---
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, arch=args.arch, n_kv_head=args.n_kv_head)
    model = GPT(cfg).to(rt.device)
    n_params = model.num_params()
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    if args.compile:
        for block in model.transformer.h:
            block.compile()
    s = build_strategy(args.strategy, model, layout, DP.Hyper(args.weight_decay, (args.beta1, args.beta2)), rt,
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
        micro = DP.local_micro_batches(x, y, layout, args.micro_batches, rt.device)
        DP.COMM.reset()
        if step == 2:  # the collectives of one step, seen at the dispatcher: an independent count
            with CollectiveBytes() as seen:
                loss, norm = DP.train_step(s, micro, lr, args.grad_clip)
            history["seen_bytes"] = seen.total
        elif step == 1:  # measure the peak memory of one step (after the first, which allocates optimizer state)
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
                loss, norm = DP.train_step(s, micro, lr, args.grad_clip)
                history["peak_memory"] = torch.cuda.max_memory_allocated(rt.device)
            else:
                with training.PeakMemory() as pm:
                    loss, norm = DP.train_step(s, micro, lr, args.grad_clip)
                history["peak_memory"] = pm.peak
        else:
            loss, norm = DP.train_step(s, micro, lr, args.grad_clip)
        history["train_loss"][step + 1] = loss
        history["bytes"].append(DP.COMM.total)
        if isinstance(s, MP.Pipeline):
            history["bubble"].append(s.bubble)
        training.sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                   "perf/tokens_per_s": tokens_per_step / dt, "comm/bytes_per_step": DP.COMM.total}
        logger.log(metrics, step + 1, line=(step + 1) % args.log_interval == 0 or step == 0)

    # --- what was measured, against the theory ---
    counted = "-" if args.strategy in ("fsdp", "tp-torch") else f"{DP.COMM.total:,.0f}"  # inside torch: not ours
    seen = f"{history['seen_bytes']:,.0f}" if "seen_bytes" in history else "-"
    mem = state_bytes(s)
    report = [f"rank {dist.get_rank()}: bytes sent per step: counted {counted}, at the dispatcher {seen}, theory "
              f"{theory:,.0f} ({', '.join(f'{k} {v:,.0f}' for k, v in DP.COMM.bytes.items()) or '-'}); model state "
              f"{sum(mem.values()) / 2**20:.2f} MiB (params {mem['params'] / 2**20:.2f}, grads "
              f"{mem['grads'] / 2**20:.2f}, optimizer {mem['optimizer'] / 2**20:.2f}); peak memory in a step "
              f"{(history['peak_memory'] or 0) / 2**20:.2f} MiB"]
    if isinstance(s, MP.Pipeline):
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
    if sys.argv[1:2] == ["plan"]:
        training.run_command(planner.main, lambda: tyro.cli(planner.Args, args=sys.argv[2:], prog="parallel.py plan"))
    else:
        training.run_command(main, lambda: tyro.cli(Args))  # bad input: one line, exit status 1, no traceback

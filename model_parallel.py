"""model_parallel.py: the model itself split across processes: Megatron tensor parallelism, from scratch and through
torch's DTensor, and pipeline parallelism with the GPipe and 1F1B schedules.

Each is a Strategy of data_parallel.py and computes the same training step as one process on the same global batch.
    TensorParallel       --strategy tp, and dp-tp: column- and row-parallel linears joined by the conjugate f/g
                         functions, attention heads and the MLP split (Shoeybi et al. 2019, "Megatron-LM")
    TorchTensorParallel  --strategy tp-torch: the same layout through torch.distributed.tensor.parallel
    Pipeline             --strategy pp-gpipe: all forwards then all backwards (Huang et al. 2019, "GPipe");
                         --strategy pp-1f1b: one forward, one backward (Narayanan et al. 2021, "PipeDream-Flush" /
                         Megatron-LM 2); the bubble is measured against (p-1)/(m+p-1)

Nothing here runs on its own; parallel.py builds a strategy and trains with it:
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy tp
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy tp-torch
    torchrun --standalone --nproc_per_node=2 parallel.py --strategy pp-1f1b --micro-batches 8
    torchrun --standalone --nproc_per_node=4 parallel.py --strategy dp-tp --tp 2
"""

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from data_parallel import COMM, GradBuckets, Strategy
from gpt import GPT, CausalSelfAttention
from llama import rotary_cos_sin

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
    """y_r = x A_r^T + b_r: rank r holds rows [r out/t, (r+1) out/t) of the weight (out, in), so its output is
    its own slice of the features (Shoeybi et al. 2019, eq. 3). Its input x has passed f once at the entry of the
    attention or MLP (enter_parallel_region), however many column-parallel linears read it (Llama's q, k, v)."""

    def __init__(self, full: nn.Linear, rank: int, t: int):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach().chunk(t, dim=0)[rank].clone())
        self.weight.tp_dim = 0  # how full_state_dict reassembles it
        self.bias = None  # Llama's linears have none
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.detach().chunk(t, dim=0)[rank].clone())
            self.bias.tp_dim = 0

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def enter_parallel_region(module: nn.Module, group):
    """Apply f to the input of a block's attention or MLP, as Megatron's figure 3 places it: one all-reduce of the
    input's gradient in the backward pass for the whole region. A forward pre-hook, so parameter names stay GPT's."""
    module.register_forward_pre_hook(lambda _, args: (CopyToTensorParallel.apply(args[0], group), *args[1:]))


class RowParallelLinear(nn.Module):
    """y = g(x_r B_r^T) + b: rank r holds columns [r in/t, (r+1) in/t) of the weight and multiplies its own slice
    of the input features; g sums the partial products. The bias is added once, after the sum (eq. 4)."""

    def __init__(self, full: nn.Linear, rank: int, t: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach().chunk(t, dim=1)[rank].clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())
        self.weight.tp_dim = 1

    def forward(self, x):
        y = ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


# The Megatron split of a block, by the names of its linears (GPT-2's and Llama's): column-parallel ones split their
# output features (each rank computes its heads' queries, keys and values, its part of the MLP's hidden layer),
# row-parallel ones their input features and sum the ranks' partial products.
COLUMN = ("c_attn", "c_fc", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("c_proj", "o_proj", "down_proj")


def local_heads(block, t: int, n_embd: int):
    """Make block's attention compute this rank's 1/t of the heads. GPT-2: its fused c_attn rearranged rank-major
    (TensorParallelAttention). Llama: the rank's n_head/t query heads and the n_kv_head/t key/value heads they share
    (heads are split contiguously and a group's query heads are contiguous, so a group never straddles ranks)."""
    if isinstance(block.attn, CausalSelfAttention):
        block.attn = TensorParallelAttention(block.attn, t, n_embd)
    else:
        block.attn.n_head, block.attn.n_kv_head = block.attn.n_head // t, block.attn.n_kv_head // t


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
            local_heads(block, t, model.config.n_embd)
            for part in (block.attn, block.mlp):
                enter_parallel_region(part, group)
                for name, linear in list(part.named_children()):
                    if name in COLUMN:
                        setattr(part, name, ColumnParallelLinear(linear, rank, t))
                    elif name in ROW:
                        setattr(part, name, RowParallelLinear(linear, rank, t, group))
        super().__init__(model, layout, hyper, rt)
        self.shard_group = group
        self.buckets = GradBuckets(model.parameters(), self.dp_group, bucket_mb * 1e6) if layout.dp > 1 else None
        self.make_optimizer()

    def no_sync(self):
        return self.buckets.no_sync() if self.buckets else nullcontext()

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
            local_heads(block, layout.tp, model.config.n_embd)
            plan = {f"{part}.{name}": ColwiseParallel() if name in COLUMN else RowwiseParallel()
                    for part in ("attn", "mlp") for name, _ in block.get_submodule(part).named_children()
                    if name in COLUMN or name in ROW}
            parallelize_module(block, mesh, plan)
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
        self.config = gpt.config
        if self.first:
            self.transformer["wte"] = gpt.transformer.wte
            if "wpe" in gpt.transformer:  # GPT-2's learned positions (Llama's are rotary, inside each block)
                self.transformer["wpe"] = gpt.transformer.wpe
        self.transformer["h"] = nn.ModuleDict({str(i): gpt.transformer.h[i]
                                               for i in stage_blocks(gpt.config.n_layer, n_stages, stage)})
        if self.last:
            self.transformer["ln_f"] = gpt.transformer.ln_f
            self.lm_head = gpt.lm_head
            if gpt.config.tie_word_embeddings and not self.first:  # a copy of the tied weight on the last stage
                self.lm_head = nn.Linear(gpt.config.n_embd, gpt.config.vocab_size, bias=False)
                self.lm_head.weight = nn.Parameter(gpt.transformer.wte.weight.detach().clone())

    def forward(self, x, targets=None):
        """x: token ids (B, T) on the first stage, else the previous stage's hidden states (B, T, C). Returns the
        hidden states, or on the last stage the summed cross-entropy over the targets."""
        pos = torch.arange(x.size(1), device=x.device)
        if self.first:
            x = self.transformer.wte(x) + (self.transformer.wpe(pos) if "wpe" in self.transformer else 0)
        rope = None
        if self.config.arch == "llama":
            rope = rotary_cos_sin(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        for block in self.transformer.h.values():
            x = block(x, None, None, rope)
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
        tied = model.config.tie_word_embeddings and self.n_stages > 1
        self.tied_group = dist.new_group([0, self.n_stages - 1]) if tied else None
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
        tied_copy = self.model.lm_head.weight if self.tied_group is not None and self.model.last else None
        return [p.grad for p in self.model.parameters() if p is not tied_copy and p.grad is not None], []

    def clip_grad_norm(self, max_norm):
        norm = super().clip_grad_norm(max_norm)
        if self.tied_group is not None and self.model.last and max_norm > 0:  # the copy left out above: clip it too
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
        if self.config.tie_word_embeddings:
            out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

"""planner.py: memory per GPU and step time of a large training run on a cluster, from published formulas, for every
layout of data, tensor and pipeline parallelism; the fastest layout that fits is the plan.

Memory per GPU is the model state (parameters, gradients, optimizer states) as the ZeRO paper counts it
(Rajbhandari et al. 2020, sec. 3.1 and fig. 1), divided by tensor and pipeline parallelism (Narayanan et al. 2021)
and by ZeRO's stage over the data-parallel ranks, plus the activations a layer keeps for its backward pass
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", table 2) times the layers
of a stage and the micro-batches 1F1B keeps in flight. Step time is the model's FLOPs (Kaplan et al. 2020) at a
fraction of the GPUs' peak, plus the pipeline bubble (Huang et al. 2019), plus the tensor-parallel traffic inside a
node and the data-parallel and pipeline traffic between nodes under the ring algorithms. parallel.py runs the same
strategies on a small GPT and measures what this models.

Run it:
    python planner.py                                                     # 70B parameters on 512 80 GB GPUs
    python planner.py --n-params 7.5e9 --gpus 64 --tp 1 --pp 1 --zero-stage 3
    python parallel.py plan                                               # the same, from parallel.py
"""

import sys
from dataclasses import dataclass

import tyro

import gpt
from gpt import GPTConfig
from training import InputError


@dataclass
class Args:
    """Memory per GPU and step time of every layout of a large run on a cluster; the fastest that fits is the plan."""
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


# ----------------------------------------------------------------------------------------------------------------
# Memory per GPU: model state (ZeRO) and activations (Korthikanti et al.), the published formulas


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


# ----------------------------------------------------------------------------------------------------------------
# Every layout of the cluster, priced


def plan_layout(a: Args, dp: int, tp: int, pp: int, recompute: str) -> dict:
    """Memory per GPU and step time of one layout (1F1B pipeline, sequence parallel whenever tp > 1)."""
    s, b, h, L = a.seq_len, a.micro_batch, a.hidden, a.n_layer
    m = a.global_batch // (dp * b)  # micro-batches per pipeline per step
    states = model_state_breakdown(a.n_params, dp, a.zero_stage, tp, pp)
    # the first stage keeps min(p, m) micro-batches of its L/p layers in flight under 1F1B (Korthikanti sec. 4.2.3)
    act = (activation_memory_per_layer(s, b, h, a.heads, tp, tp > 1, recompute, a.flash_attention)
           * L / pp * min(pp, m))
    memory = sum(states.values()) + act
    # compute: 6N + 12 L h s FLOPs per token (Kaplan et al. 2020; gpt.flops_per_token); recomputation adds a
    # forward pass of the layers, 2N per token, for 'full' (Korthikanti sec. 5; selective adds ~the attention only)
    tokens = a.global_batch * s
    flops = gpt.flops_per_token(GPTConfig(n_layer=L, n_embd=h, n_head=a.heads, block_size=s), int(a.n_params)) * tokens
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


def plan(a: Args) -> list[dict]:
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


# ----------------------------------------------------------------------------------------------------------------


def main(a: Args) -> list[dict]:
    """Print the best `a.top` layouts and the plan; returns every layout, fitting ones first, fastest first."""
    rows = plan(a)
    # --- the cluster, then one row per layout (' !': does not fit) ---
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
    # --- the plan: the fastest layout that fits ---
    best = rows[0]
    if not best["fits"]:
        print("no layout fits in memory: add GPUs, raise the ZeRO stage, or shorten the micro-batch")
    else:
        print(f"plan: dp={best['dp']} tp={best['tp']} pp={best['pp']} recompute={best['recompute']}: "
              f"{best['memory'] / 1e9:.1f} GB per GPU, {best['step']:.1f} s per step, "
              f"{best['tokens_per_s'] / 1e6:.2f}M tokens/s")
    return rows


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

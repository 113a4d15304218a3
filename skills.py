"""skills.py: one frozen base, one LoRA adapter per skill, and a router that picks the adapter for a prompt.

Three skills are made from the offline Shakespeare corpus, each as (prompt, completion) pairs with two families of
prompt templates: `speech` (a speaker and a line -> the next line), `qa` (a two-line exchange and a quoted phrase
-> who said it) and `positive` (a topic -> a line of the corpus that VADER scores positive and that contains it).
A LoRA adapter (lora.py; Hu et al. 2021, or QLoRA with --qlora, Dettmers et al. 2023) is trained per skill on the
same frozen base, with the loss on the completion's tokens only. The evaluation is the adapter x task matrix (loss
per completion token of every adapter, and of the bare base, on every task's held-out examples) and what each
generates (exact-match answers of `qa`, VADER scores of `positive`). The router is multinomial logistic regression
on the mean of the base's own final hidden states over the prompt, trained on one template family and scored on
held-out prompts of the other. serve.py then serves the base, the adapters and the router in one process.

The base is a minigpt checkpoint (`--base`, default runs/skills-base/latest). If it is missing, `train` first
pretrains a small character-level GPT there with `minigpt.main` (4 layers, 128 wide, context 128).

Run it:
    python skills.py train                  # base (if missing) + 3 adapters + the matrix + the router
    python skills.py train --qlora          # the same with the frozen base in NF4
    python skills.py train --base runs/minigpt/latest    # adapters on another minigpt checkpoint
    python skills.py eval                   # the matrix, task scores and router of the saved adapters again
    python serve.py --run-dir runs/skills   # serve them: an OpenAI-compatible API on localhost
"""

import copy
import json
import re
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import minigpt
import training
from assets import DATA_DIR, asset_path
from gpt import GPT, load_pretrained
from lora import adapter_rows, apply_lora, build_multi_adapter, generate_rows, save_adapter
from training import POSITIVE, InputError, Logger, RunArgs, derived_seed, seeded, setup_runtime


@dataclass
class Args(RunArgs):
    run_name: str = "skills"
    """name of the run: adapters, router and report go to <output-dir>/<run-name>/"""
    resume: bool = False
    """keep the adapters already trained in <output-dir>/<run-name>/ and train only the missing ones"""
    # --- the base and its adapters ---
    base: str = "runs/skills-base/latest"
    """a minigpt checkpoint directory (Hugging Face GPT-2 files + run.json naming the tokenizer); `train` pretrains
    one there with minigpt first if it is missing and the path ends in /latest"""
    qlora: bool = False
    """hold the frozen base in NF4 (QLoRA) instead of float"""
    eval_examples: int = 200
    """held-out examples per task for the matrix, the task scores and the router"""


@dataclass
class TrainArgs(Args):
    """Train one adapter per skill on the frozen base (pretraining the base first if missing), then evaluate."""

    tasks: tuple[str, ...] = ("speech", "qa", "positive")
    """skills to train an adapter for (see TASKS)"""
    rank: int = 8
    """LoRA rank r"""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora)"""
    lora_dropout: float = 0.0
    """dropout on the input of the LoRA branch"""
    rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)"""
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    """module-name patterns (regular expressions matched against the end of a module's dotted name)"""
    steps: int = 250
    """optimizer steps per adapter"""
    batch_size: int = 16
    """examples per step"""
    learning_rate: float = 3e-3
    """peak learning rate of the adapters (warmup, then cosine decay to a tenth)"""
    warmup_steps: int = 20
    """steps of linear warmup"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    log_interval: int = 50
    """steps between log lines"""
    base_iters: int = 800
    """pretraining steps of the base when it has to be made (minigpt, char-level Shakespeare)"""
    base_n_layer: int = 4
    """blocks of the base made by pretraining"""
    base_n_embd: int = 128
    """width of the base made by pretraining"""
    base_block_size: int = 128
    """context of the base made by pretraining (the tasks' examples are at most 128 characters)"""
    base_batch_size: int = 12
    """sequences per step of the base's pretraining"""


@dataclass
class EvalArgs(Args):
    """Evaluate the run's saved adapters again: the adapter x task matrix, task scores, and a new router."""


# ----------------------------------------------------------------------------------------------------------------
# Tasks: (prompt, completion) pairs made from the offline corpus. Each task has two families of prompt templates;
# adapters train on both, the router trains on family 0 and is scored on family 1 of held-out examples.

TASKS = {
    "speech": "continue a speech: the speaker and a line, then the next line",
    "qa": "answer a question about a play: who, in a two-line exchange, said a quoted phrase",
    "positive": "write positively: a line of positive sentiment (VADER compound >= 0.6) on a topic word of it",
}
TEMPLATES = {
    "speech": ("{tag}.\n{line}\n", "{line}\n"),
    "qa": ('{passage}Who said "{frag}"?\n', '{passage}Whose words are "{frag}"?\n'),
    "positive": ("Write a happy line about {topic}:\n", "Say something kind about {topic}:\n"),
}
_STOP = {"that", "this", "with", "have", "thee", "thou", "your", "what", "shall", "will", "from", "they", "them",
         "there", "their", "then", "than", "when", "which", "would", "were", "been", "hath", "doth", "more", "upon",
         "therefore", "should", "could", "those", "these", "where", "whose", "being", "make", "made"}


def parse_speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker tag, lines) of every speech of a play: a paragraph whose first line is a short tag ending in '.'
    ('Ham.', 'MACBETH.', 'First Citizen.'), stage directions in brackets removed."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip().split("\n")
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][A-Za-z' ]{0,22}[A-Za-z]\.", lines[0].strip()):
            continue
        speech = [ln.strip() for ln in (re.sub(r"\[[^\]]*\]", "", ln) for ln in lines[1:]) if ln.strip()]
        if speech:
            out.append((lines[0].strip()[:-1], speech))
    return out


def _heldout(text: str) -> bool:
    return sha256(text.encode()).digest()[0] % 10 == 0  # a fixed ~10% of examples, chosen by content


def build_tasks(tokenizer, max_chars: int = 128, per_task: int = 4000) -> dict:
    """{task: {"train": [...], "test": [...]}}, each example a dict(prompt, completion, family). Examples are at most
    max_chars long and use only characters the tokenizer knows; about 10% are held out (chosen by content). Built
    once (VADER over the corpus' lines takes a while) and cached under data/cache/."""
    key = sha256(json.dumps([tokenizer.spec(), max_chars, per_task, TEMPLATES]).encode()).hexdigest()[:16]
    cache = DATA_DIR / "cache" / f"skill-tasks-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    plays = sorted(asset_path("shakespeare").glob("*.txt"))
    speeches = [s for p in plays for s in parse_speeches(p.read_text(encoding="utf-8"))]
    g = seeded(0, 6)
    out = {t: [] for t in TASKS}
    for i, (tag, lines) in enumerate(speeches):
        if len(lines) >= 2 and all(15 <= len(ln) <= 60 for ln in lines[:2]):
            fam = i % 2
            out["speech"].append(dict(prompt=TEMPLATES["speech"][fam].format(tag=tag.upper(), line=lines[0]),
                                      completion=lines[1] + "\n", family=fam))
        if i + 1 < len(speeches) and speeches[i + 1][0] != tag:
            t2, l2 = speeches[i + 1]
            a, b = (re.sub(r"\s+\S*$", "", ln[:40]) if len(ln) > 40 else ln for ln in (lines[0], l2[0]))
            who, said = (tag, a) if torch.randint(2, (1,), generator=g).item() == 0 else (t2, b)
            words = re.findall(r"[A-Za-z']+", said)
            if len(words) >= 3 and a and b:
                k = int(torch.randint(len(words) - 2, (1,), generator=g))
                fam = int(torch.randint(2, (1,), generator=g))
                passage = f"{tag.upper()}: {a}\n{t2.upper()}: {b}\n"
                out["qa"].append(dict(prompt=TEMPLATES["qa"][fam].format(passage=passage,
                                                                         frag=" ".join(words[k:k + 3])),
                                      completion=who.upper() + "\n", family=fam))
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # the project's gold sentiment judge

    vader = SentimentIntensityAnalyzer()
    lines = sorted({ln for _, sp in speeches for ln in sp if 25 <= len(ln) <= 70})
    for j, ln in enumerate(lines):
        words = [w.lower() for w in re.findall(r"[A-Za-z]{4,}", ln) if w.lower() not in _STOP]
        lex = sum(max(0.0, vader.lexicon.get(w.lower(), 0.0)) for w in re.findall(r"[A-Za-z']+", ln))
        if words and lex >= 2.0 and vader.polarity_scores(ln)["compound"] >= 0.6:  # cheap lexicon sum first
            topic = max(words, key=len)
            out["positive"].append(dict(prompt=TEMPLATES["positive"][j % 2].format(topic=topic),
                                        completion=ln + "\n", family=j % 2))
    known = set(tokenizer.decode(range(tokenizer.vocab_size))) if hasattr(tokenizer, "chars") else None
    tasks = {}
    for t, exs in out.items():
        exs = [e for e in exs if len(e["prompt"]) + len(e["completion"]) <= max_chars
               and (known is None or set(e["prompt"] + e["completion"]) <= known)]
        test = [e for e in exs if _heldout(e["prompt"] + e["completion"])]
        train = [e for e in exs if not _heldout(e["prompt"] + e["completion"])]
        order = torch.randperm(len(train), generator=seeded(1, 6)).tolist()
        tasks[t] = {"train": [train[i] for i in order[:per_task]], "test": test}
    cache.parent.mkdir(parents=True, exist_ok=True)
    training.atomic_write(cache, lambda f: Path(f).write_text(json.dumps(tasks)))
    return tasks


def encode_examples(examples: list[dict], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs x (N, T) and next-token targets y (N, T): -100 on the prompt and the padding, so the loss
    counts the completion only."""
    seqs = [(tokenizer.encode(e["prompt"]), tokenizer.encode(e["completion"])) for e in examples]
    T = max(len(p) + len(c) for p, c in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids = torch.tensor(p + c)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, len(p) - 1:len(ids) - 1] = ids[len(p):]
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------------------------
# The base model, adapter training, evaluation


def ensure_base(args: TrainArgs, rt) -> None:
    """Pretrain the base with minigpt if args.base is missing and names a run's `latest` checkpoint."""
    path = Path(args.base)
    if (path / "config.json").exists() or not (path.name == "latest" and rt.master):
        return
    print(f"no base model at {path}: pretraining one with minigpt ({args.base_iters} steps)")
    minigpt.main(minigpt.Args(seed=args.seed, device=args.device, dtype=args.dtype, compile=args.compile,
                              run_name=path.parent.name, output_dir=str(path.parent.parent), block_size=
                              args.base_block_size, n_layer=args.base_n_layer, n_head=4, n_embd=args.base_n_embd,
                              batch_size=args.base_batch_size, max_iters=args.base_iters, eval_interval=args.base_iters,
                              final_eval_iters=50, sample_tokens=200))


def load_base(path: str, device) -> tuple[GPT, object]:
    """The base (a minigpt checkpoint or any Hugging Face GPT-2) on `device`, in eval mode, and its tokenizer."""
    model, tokenizer = load_pretrained(path)
    return model.to(device).eval(), tokenizer


def train_adapter(base: GPT, task_index: int, train_set: list[dict], tokenizer, args: TrainArgs, rt, logger):
    """One LoRA (or QLoRA) adapter on a copy of the frozen base; the loss is the completion's next-token loss."""
    model = copy.deepcopy(base).train()
    summary = apply_lora(model, args.rank, args.alpha, args.lora_dropout, args.targets, args.rslora, args.qlora)
    print(summary)
    model.to(rt.device)
    optimizer = training.configure_optimizer(model, args.learning_rate, 0.0, (0.9, 0.999), rt.device.type)
    fwd = torch.compile(model) if args.compile else model
    task = args.tasks[task_index]
    bar = tqdm(range(args.steps), desc=task, dynamic_ncols=True, disable=None)
    losses, t0 = [], time.perf_counter()
    for step in bar:
        lr = training.lr_at(step, args.learning_rate, args.learning_rate / 10, args.warmup_steps, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(derived_seed(args.seed, task_index, step))  # LoRA dropout masks
        pick = torch.randint(len(train_set), (args.batch_size,), generator=seeded(args.seed, task_index, step))
        batch = encode_examples([train_set[i] for i in pick.tolist()], tokenizer, rt.device)
        loss, _ = training.train_step(fwd, optimizer, [batch], rt, args.grad_clip)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        logger.log({f"train/{task}_loss": loss, "train/lr": lr}, step + 1, line=(step + 1) % args.log_interval == 0)
    print(f"{task}: {args.steps} steps in {time.perf_counter() - t0:.0f} s, loss {losses[0]:.3f} -> "
          f"{sum(losses[-20:]) / len(losses[-20:]):.3f} (mean of the last 20)")
    return model, summary, losses


@torch.no_grad()
def completion_loss(model, examples: list[dict], tokenizer, rt, adapter_id: int | None, batch_size: int = 64):
    """Mean next-token loss per completion token of `examples` with every row on adapter `adapter_id`."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = encode_examples(examples[i:i + batch_size], tokenizer, rt.device)
        ids = None if adapter_id is None else torch.full((len(x),), adapter_id, device=rt.device)
        with adapter_rows(model, ids), rt.autocast():
            total += model(x, y, reduction="sum")[1].item()
        count += int((y != -100).sum())
    return total / count


def task_scores(model, n_rows: int, tasks: dict, tokenizer, rt, n: int) -> dict:
    """What each row (0: base, i: adapter i) does when it generates: exact-match accuracy of the `qa` answers, mean
    VADER compound score of the `positive` lines."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader, scores = SentimentIntensityAnalyzer(), {}
    for task in ("qa", "positive"):
        if task not in tasks:
            continue
        test = tasks[task]["test"][:n]
        for row in range(n_rows):
            outs, _ = generate_rows(model, [e["prompt"] for e in test], [row] * len(test), tokenizer, rt,
                                    16 if task == "qa" else 72, stop_at_newline=True)
            if task == "qa":
                s = sum(o.strip() == e["completion"].strip() for o, e in zip(outs, test, strict=True)) / len(test)
            else:
                s = sum(vader.polarity_scores(o)["compound"] for o in outs) / len(outs)
            scores.setdefault(task, []).append(s)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Router: a small learned classifier over the prompt


class Router(nn.Module):
    """softmax(W z + b) over the adapters, z the standardised mean of the frozen base's final hidden states over the
    prompt's tokens (multinomial logistic regression on the base's own features)."""

    def __init__(self, n_embd: int, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.head = nn.Linear(n_embd, len(names))
        self.register_buffer("mu", torch.zeros(n_embd))
        self.register_buffer("sigma", torch.ones(n_embd))

    def forward(self, feats):  # (N, C) -> logits (N, n_adapters)
        return self.head((feats - self.mu) / self.sigma)


@torch.no_grad()
def prompt_features(model: GPT, prompts: list[str], tokenizer, device, batch_size: int = 128) -> torch.Tensor:
    """(N, C): mean of the bare base's final hidden states over each prompt's tokens. Prompts are right-padded:
    a causal model's real positions never see the padding after them."""
    feats = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p)[-model.config.block_size:] for p in prompts[i:i + batch_size]]
        x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        keep = torch.zeros(x.shape)
        for j, p in enumerate(ids):
            x[j, :len(p)], keep[j, :len(p)] = torch.tensor(p), 1
        with adapter_rows(model, None):
            h = model.hidden_states(x.to(device)).float().cpu()  # (B, T, C)
        feats.append((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
    return torch.cat(feats)


def train_router(model: GPT, names: list[str], tasks: dict, tokenizer, rt, n_test: int):
    """Fit the router on family-0 prompts of the training splits; score it on family-1 prompts (templates it never
    saw) of the held-out splits. Returns the router and its held-out accuracy."""
    def prompts(split, family, n):
        return [(e["prompt"], k) for k, t in enumerate(names) for e in
                [e for e in tasks[t][split] if e["family"] == family][:n]]

    train, test = prompts("train", 0, 600), prompts("test", 1, n_test)
    xtr = prompt_features(model, [p for p, _ in train], tokenizer, rt.device)
    ytr = torch.tensor([k for _, k in train])
    router = Router(xtr.size(1), names)
    router.mu.copy_(xtr.mean(0))
    router.sigma.copy_(xtr.std(0) + 1e-6)
    nn.init.zeros_(router.head.weight)  # from zero: a convex fit, the same in every process
    nn.init.zeros_(router.head.bias)
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(300):  # full-batch steps on a convex loss
        loss = F.cross_entropy(router(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = router(prompt_features(model, [p for p, _ in test], tokenizer, rt.device)).argmax(1)
    acc = (pred == torch.tensor([k for _, k in test])).float().mean().item()
    return router.eval(), acc, len(test)


def save_router(router: Router, path: Path):
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in router.state_dict().items()}
    training.atomic_write(path / "router.safetensors", lambda f: save_file(sd, f))
    training.atomic_write(path / "router.json", lambda f: Path(f).write_text(json.dumps({"names": router.names})))


def load_router(path: Path) -> Router:
    if not (path / "router.json").exists():
        raise InputError(f"{path}/router.json: no router (python skills.py train or eval writes one)")
    try:  # a truncated or hand-edited file is one line naming it, never a traceback
        names = json.loads((path / "router.json").read_text())["names"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError("'names' is not a list of adapter names")
        sd = load_file(path / "router.safetensors")
        router = Router(sd["mu"].numel(), names)
        router.load_state_dict(sd)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        # (json's JSONDecodeError is a ValueError; load_state_dict's shape mismatch a RuntimeError of many lines)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{path}: not a router written by skills.py ({type(e).__name__}: {reason})") from None
    return router.eval()


@torch.no_grad()
def route(model: GPT, router: Router, prompts: list[str], tokenizer, device) -> list[str]:
    return [router.names[i] for i in router(prompt_features(model, prompts, tokenizer, device)).argmax(1).tolist()]




# ----------------------------------------------------------------------------------------------------------------


def adapter_dirs(run_dir: str | Path) -> dict[str, Path]:
    """{skill name: adapter directory} of a run (<run_dir>/adapters/<name>/)."""
    root = Path(run_dir) / "adapters"
    found = {p.name: p for p in sorted(root.glob("*")) if (p / "adapter_config.json").exists()}
    if not found:
        raise InputError(f"{root}: no adapters (python skills.py train writes them)")
    return found


def evaluate(args: Args, base: GPT, tokenizer, tasks: dict, adapters: dict[str, Path], rt, logger=None) -> dict:
    """The matrix of every adapter's loss on every task against the base, the task scores and the router. Writes
    report.json and the router."""
    run_dir = Path(args.output_dir) / args.run_name
    multi, names = build_multi_adapter(base, adapters, qlora=args.qlora)
    n = args.eval_examples
    # --- loss per completion token: rows base + adapters, columns tasks ---
    rows = ["base", *names]
    matrix = {row: {t: completion_loss(multi, tasks[t]["test"][:n], tokenizer, rt, k or None)
                    for t in names} for k, row in enumerate(rows)}
    scores = task_scores(multi, len(rows), {t: tasks[t] for t in names}, tokenizer, rt, n)
    print(f"\nloss per completion token on {n} held-out examples per task (lower is better):")
    print(f"{'':10s}" + "".join(f"{t:>10s}" for t in names))
    for row in rows:
        print(f"{row:10s}" + "".join(f"{matrix[row][t]:10.3f}" for t in names))
    for task, vals in scores.items():
        what = "exact-match answers" if task == "qa" else "mean VADER compound of the lines"
        print(f"{task} ({what}): " + ", ".join(f"{r} {v:.3f}" for r, v in zip(rows, vals, strict=True)))
    # --- router ---
    router, acc, n_test = train_router(multi, names, tasks, tokenizer, rt, n)
    save_router(router, run_dir / "router")
    print(f"router: held-out accuracy {acc:.3f} on {n_test} prompts of unseen templates (chance {1 / len(names):.3f})")
    report = {"matrix": matrix, "scores": scores, "router_accuracy": acc, "router_test_prompts": n_test}
    if logger is not None:
        logger.log({"eval/router_accuracy": acc, **{f"eval/{r}_on_{t}": v for r in rows for t, v in
                                                    matrix[r].items()}}, 0, line=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    training.atomic_write(run_dir / "report.json", lambda f: Path(f).write_text(json.dumps(report, indent=2)))
    return report


def check_train(args: TrainArgs) -> Path:
    """`train`'s arguments and run directory, before any work: the fields (training.check_args), the tasks, and a
    directory that holds adapters already is refused unless --resume (keep them) or --overwrite (train them again).
    Returns the run directory."""
    training.check_args(args, {"rank": POSITIVE, "alpha": POSITIVE, "base_iters": POSITIVE, "base_n_layer": POSITIVE,
                               "base_n_embd": POSITIVE, "base_block_size": POSITIVE, "base_batch_size": POSITIVE})
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        raise InputError(f"--tasks {list(args.tasks)}: expected some of {list(TASKS)}")
    if args.resume and args.overwrite:
        raise InputError("--resume keeps the adapters trained already and --overwrite trains them again: give one")
    run_dir = Path(args.output_dir) / args.run_name
    held = sorted(d.name for d in (run_dir / "adapters").glob("*") if (d / "adapter_model.safetensors").exists())
    if held and not (args.resume or args.overwrite):
        raise InputError(f"{run_dir} already holds adapters ({', '.join(held)}): keep them and train only the missing "
                         "ones with --resume, start a new run elsewhere with --run-name NAME or --output-dir DIR, or "
                         "train them again with --overwrite")
    training.check_writable(run_dir)
    return run_dir


def train(args: TrainArgs) -> dict:
    run_dir = check_train(args)
    rt = setup_runtime(args.device, args.dtype)

    # --- the frozen base: a minigpt checkpoint, pretrained here first if missing ---
    ensure_base(args, rt)
    base, tokenizer = load_base(args.base, rt.device)
    print(f"base {args.base}: {base.num_params() / 1e6:.2f}M parameters, context {base.config.block_size}")

    # --- task data from the offline corpus ---
    tasks = build_tasks(tokenizer, max_chars=min(128, base.config.block_size))
    for t in args.tasks:
        print(f"task {t}: {TASKS[t]}; {len(tasks[t]['train'])} train / {len(tasks[t]['test'])} held-out examples")

    # --- one adapter per task on the same frozen base ---
    logger = Logger(args, rt.master)
    adapters, history = {}, {}
    for i, task in enumerate(args.tasks):
        adapters[task] = out = run_dir / "adapters" / task
        if args.resume and (out / "adapter_model.safetensors").exists():
            print(f"{task}: adapter already in {out}, kept (--resume)")
            continue
        model, summary, losses = train_adapter(base, i, tasks[task]["train"], tokenizer, args, rt, logger)
        history[task] = losses
        save_adapter(model, out, {"task": task, "base": str(args.base), "qlora": args.qlora, "steps": args.steps,
                                  "summary": str(summary)})

    # --- evaluation: matrix, task scores, router ---
    report = evaluate(args, base, tokenizer, tasks, adapters, rt, logger)
    logger.finish()
    print(f"adapters, router and report.json in {run_dir}; serve them with python serve.py --run-dir {run_dir}")
    return {**report, "train_loss": history, "run_dir": run_dir}


def evaluate_command(args: EvalArgs) -> dict:
    rt = setup_runtime(args.device, args.dtype)
    base, tokenizer = load_base(args.base, rt.device)
    adapters = adapter_dirs(Path(args.output_dir) / args.run_name)
    tasks = build_tasks(tokenizer, max_chars=min(128, base.config.block_size))
    unknown = [a for a in adapters if a not in tasks]
    if unknown:
        raise InputError(f"adapters {unknown} have no task data to evaluate on (tasks: {list(TASKS)})")
    adapters = {t: adapters[t] for t in TASKS if t in adapters}  # the order of `train`'s default --tasks
    return evaluate(args, base, tokenizer, tasks, adapters, rt)


COMMANDS = {TrainArgs: train, EvalArgs: evaluate_command}


def main(args: Args):
    return COMMANDS[type(args)](args)


if __name__ == "__main__":
    training.run_command(main, lambda: tyro.cli(Annotated[TrainArgs, tyro.conf.subcommand("train")]
                                                | Annotated[EvalArgs, tyro.conf.subcommand("eval")]))

"""reward_model.py: a Bradley-Terry reward model trained on preference pairs, the second stage of RLHF.

A GPT backbone (initialised from the SFT policy, as in Ouyang et al. 2022) with a scalar head read at the last
non-padding token gives r(prompt, response). Trained on pairs (chosen y_w, rejected y_l) to maximise the
Bradley-Terry likelihood P(y_w > y_l) = sigmoid(r(x, y_w) - r(x, y_l)) (Bradley & Terry 1952; Stiennon et al. 2020;
Ouyang et al. 2022 eq. 1), optionally with a margin (Touvron et al. 2023, Llama 2, eq. 2). After training, rewards are
normalised to mean 0 and std 1 over responses of the SFT policy (Ziegler et al. 2019), the constants stored with the
checkpoint. The checkpoint is a Hugging Face directory that `transformers.GPT2ForSequenceClassification` loads with
equal (raw) scores.

Subcommands:
    pairs   sample K responses of the SFT policy per prompt, rank them with the gold judge, write the preference
            pairs as JSONL (data/alignment/pairs_{train,test}.jsonl; --label-noise flips a fraction, like
            disagreeing raters); dpo.py trains on the same files
    train   train the reward model on them (runs/reward_model/), report held-out pairwise accuracy and the
            agreement with the gold judge on fresh samples (pairwise accuracy, Spearman rank correlation)
    score   print the reward of one response

Run it (after `python sft.py`):
    python reward_model.py pairs
    python reward_model.py train
    python reward_model.py score --prompt "Say something about love." --response " O, how I love thee!"
    python reward_model.py pairs --label-noise 0.2    # noisy raters
    python reward_model.py pairs --task chat --policy smollm2 --out-dir runs/chat/pairs   # a real chat model
    python reward_model.py train --no-train-backbone  # a frozen backbone and a fitted head (a linear probe)
    python reward_model.py train --pairs-train hh_train.jsonl --pairs-test hh_test.jsonl   # any pairs in this layout
    python reward_model.py train --dataset Anthropic/hh-rlhf --init-from gpt2 --device cuda   # with a hub
"""

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from safetensors.torch import save_file
from tqdm.auto import tqdm

from alignment_task import gold_reward, read_pairs, write_jsonl
from assets import DATA_DIR
from gpt import GPT, GPTConfig
from policy import TASKS, Task, as_prompt, eval_mode, generate_responses, load_policy
from tokenization import get_tokenizer
from training import (
    InputError,
    Logger,
    RunArgs,
    atomic_write,
    check_args,
    check_writable,
    configure_optimizer,
    derived_seed,
    load_checkpoint,
    lr_at,
    parse_args,
    prepare_run,
    read_json,
    read_safetensors,
    require_checkpoint,
    run_command,
    save_checkpoint,
    seeded,
    setup_runtime,
    sync,
    train_step,
)


@dataclass
class PairsArgs:
    """sample K responses of the SFT policy per prompt and write the pairs the gold judge prefers (JSONL)"""

    seed: int = 1337
    """random seed of the sampling and of the label noise"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""
    policy: str = "runs/sft/latest"
    """the SFT policy whose samples are compared"""
    task: Literal[TASKS] = "plays"
    """the prompts and gold judge: 'plays' (alignment_task.py) or 'chat' (chat_task.py, for a real chat model)"""
    out_dir: str = str(DATA_DIR / "alignment")
    """where pairs_train.jsonl and pairs_test.jsonl are written (and best_train.jsonl, best_test.jsonl: the best of
    each prompt's K samples, for rejection-sampling fine-tuning with sft.py --data-path)"""
    n_train_prompts: int = 3000
    """prompts of the training split (a pair each, unless all its samples tie)"""
    n_test_prompts: int = 400
    """prompts of the held-out split (unseen plays)"""
    samples_per_prompt: int = 4
    """responses sampled per prompt (K), ranked by the gold judge"""
    comparisons: Literal["all", "extremes"] = "all"
    """'all': every pair of a prompt's samples whose gold rewards differ, up to K(K-1)/2 per prompt, as InstructGPT
    collects rankings of K responses (Ouyang et al. 2022, sec. 3.5); 'extremes': only the best against the worst"""
    label_noise: float = 0.0
    """fraction of pairs whose labels are swapped, to imitate disagreeing human raters"""
    temperature: float = 1.0
    """sampling temperature"""
    max_new_tokens: int = 96
    """longest response, in tokens"""
    batch_size: int = 128
    """prompts per generation batch"""
    best_min_gold: float = 0.0
    """the best of a prompt's K samples goes to best_<split>.jsonl when its gold reward is at least this: rejection
    sampling (Touvron et al. 2023, Llama 2, sec. 3.2.3) keeps the best sample only if it is good"""


@dataclass
class TrainArgs(RunArgs):
    """train the reward model on preference pairs; report its accuracy and its agreement with the gold judge"""

    # --- the common options (training.RunArgs), where they differ here ---
    run_name: str = "reward_model"
    # --- data ---
    pairs_train: str = str(DATA_DIR / "alignment" / "pairs_train.jsonl")
    """preference pairs to train on: JSONL rows {"prompt", "chosen", "rejected"}"""
    pairs_test: str = str(DATA_DIR / "alignment" / "pairs_test.jsonl")
    """held-out preference pairs"""
    dataset: str | None = None
    """a hub data set in the Anthropic/hh-rlhf layout instead (needs `datasets` and the hub)"""
    # --- model ---
    init_from: str = "runs/sft/latest"
    """the backbone: the SFT policy (a minigpt/sft checkpoint directory or a Hugging Face GPT-2)"""
    dropout: float = 0.0
    """dropout during training"""
    train_backbone: bool = True
    """train every weight; --no-train-backbone keeps the backbone frozen and fits the score head alone, on hidden
    states computed once per pair (a linear probe: one forward pass per sequence instead of one per step, for a
    backbone too large to fine-tune in the time there is)"""
    task: Literal[TASKS] = "plays"
    """the gold judge of the accuracy by term and of the fresh samples: 'plays' or 'chat' (pairs files of the chat
    task carry each prompt's record)"""
    # --- optimisation ---
    margin: float = 0.0
    """Bradley-Terry margin m: loss -log sigmoid(r_chosen - r_rejected - m)"""
    batch_size: int = 16
    """pairs per micro-batch (per process); chosen and rejected go through the model together"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    max_iters: int = 200
    """optimizer steps"""
    learning_rate: float = 3e-4
    """peak learning rate, reached after the warmup"""
    min_lr: float = 3e-5
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 20
    """steps of linear warmup"""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 50
    """evaluate and checkpoint every this many steps"""
    log_interval: int = 20
    """steps between log lines"""
    n_judge_prompts: int = 256
    """held-out prompts with two fresh SFT samples each: the normalisation set and the agreement with the gold judge"""
    temperature: float = 1.0
    """sampling temperature of those fresh samples"""
    max_new_tokens: int = 96
    """longest fresh sample, in tokens"""


@dataclass
class ScoreArgs:
    """print the reward of one response to one prompt"""

    model: str = "runs/reward_model/latest"
    """the reward model directory"""
    prompt: str = "Say something about love."
    """the instruction (put into the chat template unless it already has one)"""
    response: str = " I love thee well, and so I ever shall."
    """the response to score"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""


# ----------------------------------------------------------------------------------------------------------------
# The model and its loss


class RewardModel(nn.Module):
    """A GPT backbone and a scalar head on the hidden state of the last non-padding token, laid out as transformers'
    GPT2ForSequenceClassification (num_labels=1): `transformer.*` and `score.weight`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gpt = GPT(cfg)  # its lm_head is tied to the token embedding: no extra weights
        self.config = cfg
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        # head init N(0, 1/sqrt(d_model + 1)) (Huang et al. 2024, "The N implementation details of RLHF with PPO")
        nn.init.normal_(self.score.weight, std=1 / np.sqrt(cfg.n_embd + 1))
        self.reward_mean, self.reward_std = 0.0, 1.0  # set after training (Ziegler et al. 2019)

    def features(self, idx, attention_mask=None):
        """(B, C): the backbone's final hidden state at the last real token of each sequence, what the head reads."""
        h = self.gpt.hidden_states(idx, attention_mask)  # (B, T, C)
        if attention_mask is None:
            last = torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
        else:  # the rightmost real token: the end of a right-padded row, the last column of a left-padded one
            last = (torch.arange(idx.size(1), device=idx.device) * attention_mask).argmax(dim=-1)
        return h[torch.arange(idx.size(0), device=idx.device), last]

    def forward(self, idx, attention_mask=None):
        """Raw rewards (B,) of sequences idx (B, T), padded on either side (attention_mask 1 for real tokens)."""
        return self.score(self.features(idx, attention_mask)).squeeze(-1).float()

    def normalized(self, idx, attention_mask=None):
        """Rewards with mean 0 and std 1 over the SFT policy's responses: what PPO optimises."""
        return (self(idx, attention_mask) - self.reward_mean) / self.reward_std

    # --- Hugging Face interoperability (the names minigpt's save_checkpoint / load_checkpoint call) ---

    def hf_config(self, pad_token_id: int | None = None) -> dict:
        return {**self.config.to_hf(), "architectures": ["GPT2ForSequenceClassification"], "num_labels": 1,
                "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id,
                "reward_mean": self.reward_mean, "reward_std": self.reward_std}

    def save_pretrained(self, path: str | Path, pad_token_id: int | None = None):
        """config.json + model.safetensors that GPT2ForSequenceClassification.from_pretrained loads. It finds the
        last token as the rightmost one that is not pad_token_id: set it to a token no input contains (the end-of-text
        token: reward inputs end with the response's last token, not with the end token)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        pad = getattr(self, "pad_token_id", None) if pad_token_id is None else pad_token_id
        sd = {**self.gpt.hf_state_dict(), "score.weight": self.score.weight.detach().cpu().contiguous()}
        atomic_write(path / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
        atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(self.hf_config(pad), indent=2)))

    def load_hf_state_dict(self, sd: dict, source: str):
        sd = dict(sd)
        if "score.weight" not in sd:
            raise InputError(f"{source}: no score.weight: not a reward model checkpoint")
        self.score.weight.data.copy_(sd.pop("score.weight"))
        self.gpt.load_hf_state_dict(sd, source)


def load_reward_model(path: str | Path):
    """(RewardModel, tokenizer) from a directory written by `reward_model.py train` (runs/reward_model/latest)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no reward model here (expected config.json and model.safetensors)")
    config = read_json(path / "config.json", "a model config")
    model = RewardModel(GPTConfig.from_hf(config, str(path)))
    model.load_hf_state_dict(read_safetensors(path / "model.safetensors"), str(path / "model.safetensors"))
    model.reward_mean, model.reward_std = config.get("reward_mean", 0.0), config.get("reward_std", 1.0)
    model.pad_token_id = config.get("pad_token_id")
    run = path / "run.json"
    spec = read_json(run, "a run's metadata").get("tokenizer") if run.exists() else {"name": "gpt2"}
    if not isinstance(spec, dict):
        raise InputError(f"{run}: damaged, it names no tokenizer")
    tokenizer = get_tokenizer(**spec)
    return model, tokenizer


def bt_loss(r_chosen, r_rejected, margin: float = 0.0):
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) (Ouyang et al. 2022 eq. 1; the
    margin as in Touvron et al. 2023 eq. 2). logsigmoid is the stable form of log(1 / (1 + exp(-x)))."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def encode_sequence(tokenizer, prompt: str, response: str, block_size: int) -> list[int]:
    """The reward model's input: prompt tokens + response tokens (no end token), the response cut to the context.
    An empty response leaves the prompt alone: its score is the reward of saying nothing, as in ppo_rlhf.py."""
    p = tokenizer.encode(prompt)
    if len(p) >= block_size:
        raise InputError(f"the prompt has {len(p)} tokens, the model's context is {block_size}: no room for a response")
    return (p + tokenizer.encode(response))[:block_size]


def encode_pairs(tokenizer, pairs: list[dict], block_size: int, source: str) -> list[tuple[list[int], list[int]]]:
    out = []
    for i, row in enumerate(pairs, start=1):
        try:
            out.append((encode_sequence(tokenizer, row["prompt"], row["chosen"], block_size),
                        encode_sequence(tokenizer, row["prompt"], row["rejected"], block_size)))
        except InputError as e:
            raise InputError(f"{source}, pair {i}: {e}") from None
    return out


def right_pad(seqs: list[list[int]], pad_id: int, device="cpu"):
    """(idx, attention_mask): sequences right-padded to one length."""
    T = max(len(s) for s in seqs)
    idx = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
    return idx, mask


def pair_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, device="cpu"):
    """Chosen rows then rejected rows, padded together: one forward pass scores both sides of every pair."""
    return right_pad([c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)


def pair_loss_sum(model, batch, margin: float = 0.0):
    idx, mask = batch
    r = model(idx, mask)
    n = idx.size(0) // 2
    return bt_loss(r[:n], r[n:], margin).sum()


def count_pairs(batch) -> int:
    return batch[0].size(0) // 2


@torch.no_grad()
def pair_margins(model, pairs, pad_id: int, rt, batch_size: int = 64) -> torch.Tensor:
    """r_chosen - r_rejected of every pair (N,), in eval mode."""
    out = []
    with eval_mode(model):
        for i in range(0, len(pairs), batch_size):
            idx, mask = pair_batch(pairs[i: i + batch_size], pad_id, rt.device)
            with rt.autocast():
                r = model(idx, mask)
            n = idx.size(0) // 2
            out.append((r[:n] - r[n:]).float().cpu())
    return torch.cat(out)


def pairwise_accuracy(model, pairs, pad_id: int, rt, batch_size: int = 64, features=None) -> tuple[float, float]:
    """(fraction of pairs with r_chosen > r_rejected, mean Bradley-Terry loss); with features (N, 2, C), the head
    on those instead of the pairs through the whole model."""
    margins = pair_margins(model, pairs, pad_id, rt, batch_size) if features is None else head_margins(model, features)
    return (margins > 0).float().mean().item(), bt_loss(margins, torch.zeros_like(margins)).mean().item()


@torch.no_grad()
def pair_features(model, pairs, pad_id: int, rt, batch_size: int = 32) -> torch.Tensor:
    """(N, 2, C): RewardModel.features of every pair's chosen and rejected sequence (eval mode). Each distinct
    sequence is run once: K samples of a prompt make up to K(K-1)/2 pairs, each sample in K - 1 of them."""
    seqs = list(dict.fromkeys(tuple(s) for pair in pairs for s in pair))
    seqs.sort(key=len)  # batches of similar length: less padding
    rows = {}
    with eval_mode(model):
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i: i + batch_size]
            idx, mask = right_pad([list(s) for s in chunk], pad_id, rt.device)
            with rt.autocast():
                rows.update(zip(chunk, model.features(idx, mask).float().cpu(), strict=True))
    return torch.stack([torch.stack([rows[tuple(c)], rows[tuple(r)]]) for c, r in pairs]).to(rt.device)


def head_loss_sum(model, features: torch.Tensor, margin: float = 0.0):
    """pair_loss_sum of pairs given as features (B, 2, C)."""
    return bt_loss(head_margins(model, features), 0.0, margin).sum()


def head_margins(model, features: torch.Tensor) -> torch.Tensor:
    """r_chosen - r_rejected (N,) of pairs given as features (N, 2, C): the score head alone."""
    r = model.score(features).squeeze(-1)
    return r[:, 0] - r[:, 1]


def accuracy_by_term(margins: torch.Tensor, rows: list[dict], task: Task | None = None) -> dict[str, dict]:
    """Held-out accuracy split by the gold judge's term that decides each pair (Task.deciding_term): which part of
    the judge the reward model learned. {term: {"pairs": n, "accuracy": a}}."""
    task, groups = task or Task("plays"), {}
    for m, row in zip(margins.tolist(), rows, strict=True):
        groups.setdefault(task.deciding_term(row.get("prompt", ""), row["chosen"], row["rejected"]), []).append(m > 0)
    return {k: {"pairs": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(groups.items())}


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], device="cpu", batch_size: int = 64):
    """Raw rewards of (prompt, response) pairs (encode_sequence); an empty response is scored on the prompt alone."""
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [encode_sequence(tokenizer, p, r, model.config.block_size)
                for p, r in zip(prompts[i: i + batch_size], responses[i: i + batch_size], strict=True)]
        out += model(*right_pad(seqs, tokenizer.eot_token, device)).tolist()
    return out


def rank_correlation(a, b) -> float:
    """Spearman's rho: Pearson's correlation of the ranks, ties given their average rank (Spearman 1904)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties share the mean of their ranks
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")  # a constant ranks nothing: the correlation is undefined
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# The data: preference pairs of the SFT policy's own samples, labelled by the gold judge


def rank_pairs(prompt: str, responses: list[str], comparisons: str = "all", label_noise: float = 0.0,
               rng: random.Random | None = None, task: Task | None = None) -> tuple[list[dict], int]:
    """The preference pairs of one prompt's K responses, ranked by the gold judge: every pair whose gold rewards
    differ ('all', up to K(K-1)/2, as InstructGPT collects rankings of K responses; Ouyang et al. 2022, sec. 3.5), or
    the best against the worst ('extremes'). With label_noise each pair's label is swapped with that probability (a
    draw of rng per pair), like a rater who disagrees. Returns (rows {"prompt", "chosen", "rejected", "chosen_gold",
    "rejected_gold"} and the prompt's record (Task.record), labels swapped); no rows if every response scores the
    same. The judge is the task's (default 'plays').

    An empty response stays (the gold judge gives it -1): a reward model that never saw one can rank saying nothing
    above everything, and PPO finds that hole within a few steps."""
    task = task or Task("plays")
    gold = task.gold_rewards([prompt] * len(responses), responses)
    scored = sorted(zip(gold, responses, strict=True), key=lambda s: s[0], reverse=True)
    if comparisons == "extremes":
        scored = scored[:1] + scored[-1:]
    pairs = [(a, b) for j, a in enumerate(scored) for b in scored[j + 1:] if a[0] - b[0] > 1e-6]  # a tie: no pair
    rows, flipped = [], 0
    for (hi, best), (lo, worst) in pairs:
        if label_noise and rng.random() < label_noise:
            (hi, best), (lo, worst), flipped = (lo, worst), (hi, best), flipped + 1
        rows.append({"prompt": prompt, "chosen": best, "rejected": worst, "chosen_gold": hi, "rejected_gold": lo,
                     **task.record(prompt)})
    return rows, flipped


def make_pairs(args: PairsArgs) -> dict:
    """The `pairs` subcommand: sample K responses of the SFT policy per prompt of each split, rank them by the gold
    judge (rank_pairs), write pairs_train.jsonl and pairs_test.jsonl, and the best sample of each prompt (if its gold
    reward reaches --best-min-gold) to best_train.jsonl and best_test.jsonl."""
    check_args(args, {"samples_per_prompt": (lambda v: v >= 2, ">= 2 (pairs compare samples of one prompt)"),
                      "temperature": (lambda v: v > 0, "> 0 (greedy samples of one prompt are all the same)")})
    if args.comparisons not in ("all", "extremes"):
        raise InputError(f"--comparisons {args.comparisons!r}: expected 'all' or 'extremes'")
    require_checkpoint(args.policy, "--policy", SFT_COMMAND)
    check_writable(Path(args.out_dir))
    rt = setup_runtime(args.device, "float32")
    policy, tokenizer = load_policy(args.policy)
    policy.to(rt.device)
    rng, task = random.Random(args.seed), Task(args.task)
    stats = {}
    for split, n in (("train", args.n_train_prompts), ("test", args.n_test_prompts)):
        prompts = task.prompts(tokenizer, n, split, args.seed + 1)  # not SFT's draw of prompts
        k = args.samples_per_prompt
        g = seeded(args.seed, 99, 0 if split == "train" else 1, device=rt.device)
        t0 = time.perf_counter()
        texts, _, _ = generate_responses(policy, tokenizer, [p for p in prompts for _ in range(k)],
                                         args.max_new_tokens, args.temperature, None, g, args.batch_size, rt.device)
        rows, best, ties, flipped = [], [], 0, 0
        for i, prompt in enumerate(prompts):
            samples = texts[i * k: (i + 1) * k]
            pairs, f = rank_pairs(prompt, samples, args.comparisons, args.label_noise, rng, task)
            rows += pairs
            ties, flipped = ties + (not pairs), flipped + f  # ties: prompts whose samples all score the same
            gold = task.gold_rewards([prompt] * k, samples)
            top = int(np.argmax(gold))
            if gold[top] >= args.best_min_gold:
                best.append({"prompt": prompt, "response": samples[top], "gold": gold[top], **task.record(prompt)})
        path = Path(args.out_dir) / f"pairs_{split}.jsonl"
        if not rows:
            raise InputError(f"{args.policy}: every prompt's {k} samples tie under the gold judge: no pairs for "
                             f"{path} (more --samples-per-prompt, a higher --temperature, or a trained policy)")
        write_jsonl(path, rows)
        write_jsonl(path.with_name(f"best_{split}.jsonl"), best)
        stats[split] = {"pairs": len(rows), "ties_skipped": ties, "flipped": flipped, "path": str(path),
                        "best": len(best), "samples_gold": float(np.mean(task.gold_rewards(
                            [p for p in prompts for _ in range(k)], texts)))}
        print(f"{split}: {len(prompts) * k:,} samples in {time.perf_counter() - t0:.0f}s -> {len(rows):,} pairs "
              f"({ties} prompts skipped: all samples tie; {flipped} labels flipped) -> {path}; {len(best)} best "
              f"samples with gold >= {args.best_min_gold:g}")
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Subcommands: train, score


SFT_COMMAND = "`python sft.py` (or `python pipeline.py run`)"  # what writes the default policy, runs/sft/latest


def load_pair_data(args: TrainArgs) -> tuple[list[dict], list[dict], str]:
    if args.dataset:
        from alignment_task import load_hub_pairs

        return load_hub_pairs(args.dataset, "train"), load_hub_pairs(args.dataset, "test"), args.dataset
    return read_pairs(args.pairs_train), read_pairs(args.pairs_test), args.pairs_train


def train(args: TrainArgs) -> dict:
    # --- arguments, run directory and the stages before this one, checked before any work; devices, processes ---
    run_dir, _ = prepare_run(args)
    require_checkpoint(args.init_from, "--init-from", SFT_COMMAND)
    if not args.dataset:
        for option, path in (("--pairs-train", args.pairs_train), ("--pairs-test", args.pairs_test)):
            if not Path(path).exists():
                raise InputError(f"{option} {path}: no such file; `python reward_model.py pairs` writes the "
                                 f"preference pairs (or give {option} a JSONL file of them)")
    rt = setup_runtime(args.device, args.dtype)

    # --- model: the SFT policy's backbone and a new scalar head ---
    policy, tokenizer = load_policy(args.init_from, args.dropout)
    torch.manual_seed(args.seed)
    model = RewardModel(policy.config)
    model.gpt.load_state_dict(policy.state_dict())
    model.pad_token_id = tokenizer.eot_token
    model.to(rt.device)
    block, pad = model.config.block_size, tokenizer.eot_token

    # --- data ---
    train_pairs, test_pairs, source = load_pair_data(args)
    task = Task(args.task)
    task.remember(train_pairs + test_pairs)
    train_data = encode_pairs(tokenizer, train_pairs, block, source)
    test_data = encode_pairs(tokenizer, test_pairs, block, source + " (held out)")
    feats = None  # a frozen backbone: the head's inputs, once per pair
    if not args.train_backbone:
        if rt.world_size > 1:
            raise InputError("--no-train-backbone fits a head in one process; start it with python, not torchrun")
        model.gpt.requires_grad_(False)
        t0 = time.perf_counter()
        feats = {"train": pair_features(model, train_data, pad, rt), "test": pair_features(model, test_data, pad, rt)}
        print(f"backbone frozen: features of {len(train_data) + len(test_data):,} pairs in "
              f"{time.perf_counter() - t0:.0f}s; the score head alone trains")

    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2),
                                    rt.device.type)
    start = 0
    if args.resume:
        start = load_checkpoint(run_dir, model, optimizer)["step"]
        if rt.master:
            print(f"resumed {run_dir} at step {start}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda"
                                                    else None)
    meta = {"tokenizer": tokenizer.spec(), "args": asdict(args), "source": source}
    if rt.master:
        print(f"{raw_model.gpt.num_params() / 1e6:.2f}M parameters, {len(train_data):,} train / {len(test_data):,} "
              f"held-out pairs from {source}, device {rt.device} ({rt.dtype})")

    logger = Logger(args, rt.master)
    history = {"train_loss": {}, "heldout_accuracy": {}, "heldout_loss": {}}

    def evaluate(step: int):
        acc, loss = pairwise_accuracy(raw_model, test_data, pad, rt, features=feats and feats["test"])
        history["heldout_accuracy"][step], history["heldout_loss"][step] = acc, loss
        logger.log({"eval/accuracy": acc, "eval/loss": loss}, step)

    if rt.master and start == 0:
        evaluate(0)

    # --- training: Bradley-Terry on pairs, normalised per pair over the whole step ---
    loss_fn, count_fn = partial(pair_loss_sum, margin=args.margin), count_pairs
    if feats is not None:  # the head on cached features: a batch is (B, 2, C)
        loss_fn, count_fn = partial(head_loss_sum, margin=args.margin), len
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None if rt.master else True)
    t0 = time.perf_counter()
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))  # dropout masks
        lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(args.seed, rt.rank, step)  # this step's pairs: a function of (seed, rank, step)
        rows = [torch.randint(len(train_data), (args.batch_size,), generator=g).tolist()
                for _ in range(args.grad_accum_steps)]
        batches = [pair_batch([train_data[i] for i in r], pad, rt.device) if feats is None else feats["train"][r]
                   for r in rows]
        loss, grad_norm = train_step(model, optimizer, batches, rt, args.grad_clip, loss_fn, count_fn)
        history["train_loss"][step + 1] = loss
        sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        bar.set_postfix(loss=f"{loss:.4f}")
        logger.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                    "perf/pairs_per_s": args.batch_size * args.grad_accum_steps * rt.world_size / dt},
                   step + 1, line=(step + 1) % args.log_interval == 0)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            if rt.master:
                evaluate(step + 1)
                save_checkpoint(run_dir, raw_model, optimizer, step + 1, meta)
            t0 = time.perf_counter()

    # --- normalisation and agreement with the gold judge, on fresh samples of the SFT policy ---
    results = {**history, "run_dir": run_dir}
    if rt.master:
        policy.to(rt.device)
        prompts = [p for p in task.prompts(tokenizer, args.n_judge_prompts, "test", args.seed + 2) for _ in range(2)]
        texts, _, _ = generate_responses(policy, tokenizer, prompts, args.max_new_tokens, args.temperature, None,
                                         seeded(args.seed, 98, device=rt.device), device=rt.device)
        raw_model.eval()
        scores = np.array(score_texts(raw_model, tokenizer, prompts, texts, rt.device))
        gold = np.array(task.gold_rewards(prompts, texts))
        raw_model.reward_mean, raw_model.reward_std = float(scores.mean()), float(scores.std() + 1e-8)
        a, b = slice(0, None, 2), slice(1, None, 2)
        differ = np.abs(gold[a] - gold[b]) > 1e-6
        agree = float(np.mean((scores[a] > scores[b])[differ] == (gold[a] > gold[b])[differ])) if differ.any() \
            else float("nan")  # every fresh pair tied under the gold judge
        rho = rank_correlation(scores, gold)
        margins = pair_margins(raw_model, test_data, pad, rt) if feats is None else head_margins(raw_model,
                                                                                                  feats["test"])
        by_term = accuracy_by_term(margins, test_pairs, task)
        results.update(judge_pairwise_accuracy=agree, judge_spearman=rho, judge_pairs=int(differ.sum()),
                       heldout_accuracy_by_term=by_term,
                       reward_mean=raw_model.reward_mean, reward_std=raw_model.reward_std,
                       heldout_accuracy_final=history["heldout_accuracy"][max(history["heldout_accuracy"])])
        logger.log({"eval/judge_pairwise_accuracy": agree, "eval/judge_spearman": rho}, args.max_iters)
        save_checkpoint(run_dir, raw_model, optimizer, args.max_iters, meta)  # now with the normalisation constants
        (run_dir / "latest" / "results.json").write_text(json.dumps(
            {k: v for k, v in results.items() if k != "run_dir"}, indent=2))
        print(f"held-out pairwise accuracy {results['heldout_accuracy_final']:.3f}; agreement with the gold judge on "
              f"{differ.sum()} fresh sample pairs: {agree:.3f}, Spearman {rho:.3f} over {len(texts)} samples; "
              f"normalisation mean {raw_model.reward_mean:+.3f} std {raw_model.reward_std:.3f}; model in "
              f"{run_dir / 'latest'}")
        print("held-out accuracy by the gold judge's deciding term: " + ", ".join(
            f"{k} {v['accuracy']:.3f} ({v['pairs']} pairs)" for k, v in by_term.items()))
    logger.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()
    return results


def score(args: ScoreArgs) -> float:
    require_checkpoint(args.model, "--model", "`python reward_model.py train`")
    rt = setup_runtime(args.device, "float32")
    model, tokenizer = load_reward_model(args.model)
    model.to(rt.device).eval()
    prompt = as_prompt(tokenizer, args.prompt)
    raw = score_texts(model, tokenizer, [prompt], [args.response], rt.device)[0]
    norm = (raw - model.reward_mean) / model.reward_std
    print(f"reward {norm:+.4f} (raw {raw:+.4f}; gold judge {gold_reward(prompt, args.response):+.4f})")
    return norm


COMMANDS = {PairsArgs: make_pairs, TrainArgs: train, ScoreArgs: score}

def parse_command():
    """The subcommand's arguments; `train --resume` takes the run's saved arguments (training.parse_args)."""
    args = tyro.cli(Annotated[PairsArgs, tyro.conf.subcommand("pairs")]
                    | Annotated[TrainArgs, tyro.conf.subcommand("train")]
                    | Annotated[ScoreArgs, tyro.conf.subcommand("score")])
    if isinstance(args, TrainArgs):
        args = parse_args(TrainArgs, sys.argv[2:], "reward_model.py train", parsed=args)
    return args


if __name__ == "__main__":
    run_command(lambda args: COMMANDS[type(args)](args), parse_command)  # bad input: one line, exit status 1

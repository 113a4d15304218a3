"""ppo_rlhf.py: align the SFT policy to a reward model with PPO and a KL penalty to the SFT policy (RLHF).

The recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as used for InstructGPT
(Ouyang et al. 2022, "Training language models to follow instructions with human feedback"), with the
implementation details of OpenAI's lm-human-preferences catalogued by Huang et al. 2022 ("The N Implementation
Details of RLHF with PPO"). The optimiser is PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms")
with generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation").
"""

from dataclasses import dataclass

import torch


@dataclass
class Args:
    # --- common to every script ---
    seed: int = 1337
    """random seed; every random choice of a run is a function of (seed, rank, step)"""


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

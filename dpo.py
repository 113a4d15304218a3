"""dpo.py: Direct Preference Optimization of the SFT policy on preference pairs, in one file.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model")
trains the policy on pairs (prompt x, chosen y_w, rejected y_l) with a classification loss on the difference of
implicit rewards r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), with no reward model and no sampling in the loop.

Pieces, top to bottom: `dpo_loss` (sigmoid DPO, conservative DPO by label smoothing, IPO, SLiC's hinge),
`sequence_logps` (log-probability of the response tokens only), `collate_pairs` and `concatenated_logps` (chosen
and rejected rows of a batch padded together and run through the model in one forward pass), then `main`.
"""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ----------------------------------------------------------------------------------------------------------------
# The DPO loss and its variants


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected responses (B,), detached.

    All inputs are (B,) log-probabilities of whole responses, log pi(y|x), under the policy and the frozen reference.
    With h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x), the log-ratio margin:
      sigmoid  -log sigmoid(beta h)                                   DPO, Rafailov et al. 2023, eq. 7;
               with label_smoothing eps (the chance a label is flipped):
               -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    conservative DPO (Mitchell 2023,
               "A note on DPO with noisy preferences & relationship to IPO", eq. 3), as in TRL's DPOTrainer;
      ipo      (h - 1 / (2 beta))^2                                    IPO, Azar et al. 2023, "A General Theoretical
               Paradigm to Understand Learning from Human Preferences", arXiv v2 eq. 17 (their tau is our beta);
               the target margin 1 / (2 beta) is finite, so IPO does not push h to infinity on deterministic
               preferences. Its log-probs are per-token means (`sequence_logps(..., average=True)`), as in TRL,
               which follows the IPO authors on this; `main` does so for this loss, so that h and its target
               1 / (2 beta) are margins per token;
      hinge    max(0, 1 - beta h)                                      SLiC's rank-calibration loss (Zhao et al.
               2023, "SLiC-HF", eq. 1, max(0, delta - log pi(y_w|x) + log pi(y_l|x))) on the reference-normalised
               log-ratios, with margin delta = 1 / beta, as in TRL.
    Rewards: beta * (log pi(y|x) - log pi_ref(y|x)), the implicit reward of Rafailov et al. 2023, eq. 5 (up to
    beta log Z(x), which cancels in every comparison of two responses to one prompt).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not to {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing {label_smoothing}: expected 0 <= eps < 0.5")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of responses, chosen and rejected in one forward pass


def sequence_logps(logits, targets, average: bool = False):
    """log pi(y|x) of each row: the sum (or, with average, the per-token mean) of log p(targets[b, t] | idx[b, :t+1])
    over the counted targets. logits (B, T, vocab); targets (B, T) in minigpt's convention: targets[b, t] is the token
    that follows idx[b, :t+1], -100 where nothing is counted (prompt tokens, padding). Returns (B,) in float32."""
    B, T = targets.shape
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="none").view(B, T)  # 0 at ignored positions
    total = token_logps.sum(-1)
    return total / (targets != -100).sum(-1).clamp(min=1) if average else total


def example_tensors(ids: list[int], n_prompt: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one prompt + response sequence: the targets are the next tokens, counted from the first
    response token on (the prompt's own tokens are context, not predictions), -100 elsewhere."""
    targets = [-100] * (n_prompt - 1) + ids[n_prompt:] + [-100]
    return ids, targets


def collate_pairs(pairs, pad_id: int = 0):
    """One batch of B pairs [((chosen ids, n_prompt), (rejected ids, n_prompt)), ...] -> (idx, targets), both
    (2B, T): the B chosen rows, then the B rejected rows, right-padded together to the longest.

    Right padding needs no attention mask: under the causal mask a real token never attends to a later position, so
    each row's log-probs are what it gets alone (padding positions are inputs only, their targets are -100)."""
    rows = [example_tensors(*p[0]) for p in pairs] + [example_tensors(*p[1]) for p in pairs]
    T = max(len(x) for x, _ in rows)
    idx = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in rows])
    targets = torch.tensor([y + [-100] * (T - len(y)) for _, y in rows])
    return idx, targets


def concatenated_logps(model, idx, targets, average: bool = False):
    """(chosen logps (B,), rejected logps (B,)) of a collated batch from one forward pass over its 2B rows
    (half the calls of two passes, and one larger matmul per layer instead of two smaller ones)."""
    logits, _ = model(idx)  # (2B, T, vocab)
    logps = sequence_logps(logits, targets, average)  # (2B,)
    B = idx.size(0) // 2
    return logps[:B], logps[B:]

"""dpo.py against closed forms worked out by hand, brute-force loops, separate forward passes, and end-to-end runs."""

import math

import pytest
import torch

import dpo as D
from minigpt import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------------------------
# The loss and its variants, against their closed forms


# two pairs: log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l)
PC, PR, RC, RR = (torch.tensor(v) for v in ([-4.0, -10.0], [-6.0, -7.0], [-5.0, -9.0], [-5.0, -9.0]))
# log-ratio margins h = (PC - RC) - (PR - RR): pair 0: (1) - (-1) = 2; pair 1: (-1) - (2) = -3
H = [2.0, -3.0]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_loss_and_rewards_closed_form(beta):
    losses, rc, rr = D.dpo_loss(PC, PR, RC, RR, beta=beta)
    # Rafailov et al. 2023, eq. 7: -log sigmoid(beta h)
    torch.testing.assert_close(losses, torch.tensor([-math.log(sigmoid(beta * h)) for h in H]))
    # implicit rewards beta * (log pi - log pi_ref): pair 0 chosen beta * 1, rejected beta * -1; pair 1 -beta, 2 beta
    torch.testing.assert_close(rc, torch.tensor([beta, -beta]))
    torch.testing.assert_close(rr, torch.tensor([-beta, 2 * beta]))
    # the loss is the negative log-likelihood of the Bradley-Terry model on these rewards
    torch.testing.assert_close(losses, -torch.log(torch.sigmoid(rc - rr)))


def test_label_smoothing_is_conservative_dpo():
    beta, eps = 0.5, 0.2
    losses, _, _ = D.dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    # Mitchell 2023, eq. 3: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    want = [-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)) for h in H]
    torch.testing.assert_close(losses, torch.tensor(want))
    # with smoothing the loss no longer falls forever: its minimum over h is at beta h = log((1 - eps) / eps)
    h = torch.linspace(-20, 20, 40001, dtype=torch.float64)
    zero = torch.zeros_like(h)
    best = h[D.dpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)[0].argmin()]
    assert abs(beta * best.item() - math.log((1 - eps) / eps)) < 1e-3


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_closed_form(beta):
    losses, rc, rr = D.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    # Azar et al. 2023, eq. 17: (h - 1 / (2 tau))^2; beta 0.5: (2 - 1)^2 = 1 and (-3 - 1)^2 = 16
    torch.testing.assert_close(losses, torch.tensor([(h - 1 / (2 * beta)) ** 2 for h in H]))
    if beta == 0.5:
        torch.testing.assert_close(losses, torch.tensor([1.0, 16.0]))
    torch.testing.assert_close(rc, torch.tensor([beta, -beta]))  # rewards are the same for every loss type
    torch.testing.assert_close(rr, torch.tensor([-beta, 2 * beta]))


def test_hinge_loss_closed_form():
    # SLiC (Zhao et al. 2023): max(0, 1 - beta h). beta 0.25: pair 0 1 - 0.5 = 0.5, pair 1 1 + 0.75 = 1.75
    losses, _, _ = D.dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.5, 1.75]))
    losses, _, _ = D.dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")  # pair 0 past the margin: zero loss
    torch.testing.assert_close(losses, torch.tensor([0.0, 4.0]))


def test_loss_gradients_and_detached_rewards():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    beta = 0.5
    losses, rc, rr = D.dpo_loss(pc, pr, RC, RR, beta=beta)
    assert not rc.requires_grad and not rr.requires_grad
    losses.sum().backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h) (Rafailov et al. 2023, sec. 4): the weight is larger when
    # the implicit reward model orders the pair wrongly
    want = torch.tensor([-beta * sigmoid(-beta * h) for h in H])
    torch.testing.assert_close(pc.grad, want)
    torch.testing.assert_close(pr.grad, -want)


def test_loss_options_are_checked():
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        D.dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid loss only"):
        D.dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities and the concatenated forward pass


def tiny_gpt(vocab=23, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()


def random_pairs(n, vocab, seed=0):
    """n pairs of (ids, n_prompt) sequences of different lengths, chosen and rejected sharing their prompt."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        n_prompt = int(torch.randint(1, 6, (1,), generator=g))
        prompt = torch.randint(0, vocab, (n_prompt,), generator=g).tolist()
        chosen, rejected = (torch.randint(0, vocab, (int(torch.randint(1, 12, (1,), generator=g)),),
                                          generator=g).tolist() for _ in range(2))
        pairs.append(((prompt + chosen, n_prompt), (prompt + rejected, n_prompt)))
    return pairs


def brute_force_logp(model, ids, n_prompt, average=False):
    """log pi(response | prompt) one token at a time: the model run on each prefix alone."""
    terms = []
    for t in range(n_prompt, len(ids)):
        logits, _ = model(torch.tensor([ids[:t]]))
        terms.append(torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item())
    return sum(terms) / len(terms) if average else sum(terms)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_equal_brute_force_per_token_sum(average):
    model = tiny_gpt()
    pairs = random_pairs(3, 23)
    idx, targets = D.collate_pairs(pairs)
    with torch.no_grad():
        got = D.sequence_logps(model(idx)[0], targets, average)
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    want = torch.tensor([brute_force_logp(model, ids, n, average) for ids, n in rows])
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_collate_counts_response_tokens_only():
    idx, targets = D.collate_pairs([(([5, 6, 7, 8], 2), ([5, 6, 9], 2))], pad_id=0)
    assert idx.tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]
    # targets[t] is the token after idx[:t+1]; the prompt (5, 6) is never a target, padding never counts
    assert targets.tolist() == [[-100, 7, 8, -100], [-100, 9, -100, -100]]


def test_concatenated_forward_equals_separate_forwards():
    model = tiny_gpt(seed=1)
    pairs = random_pairs(4, 23, seed=1)
    with torch.no_grad():
        chosen, rejected = D.concatenated_logps(model, *D.collate_pairs(pairs))
        for i, (c, r) in enumerate(pairs):
            for got, (ids, n) in ((chosen[i], c), (rejected[i], r)):
                # each sequence alone, unpadded, in a batch of one
                x, y = D.collate_pairs([((ids, n), (ids, n))])
                alone = D.sequence_logps(model(x[:1])[0], y[:1])
                torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)
    # and the gradients of the loss through the one pass equal those through two separate passes
    ref = torch.randn(2, 4, generator=torch.Generator().manual_seed(2)) - 20
    grads = []
    for concatenated in (True, False):
        model.zero_grad()
        if concatenated:
            c, r = D.concatenated_logps(model, *D.collate_pairs(pairs))
        else:
            xc, yc = D.collate_pairs([(p[0], p[0]) for p in pairs])
            xr, yr = D.collate_pairs([(p[1], p[1]) for p in pairs])
            c = D.sequence_logps(model(xc[:4])[0], yc[:4])
            r = D.sequence_logps(model(xr[:4])[0], yr[:4])
        D.dpo_loss(c, r, ref[0], ref[1])[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

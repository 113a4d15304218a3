"""ppo_rlhf.py against brute-force loops, hand computations and the papers' formulas; tiny PPO runs end to end."""

import copy
import json
import math
import random

import pytest
import torch

import alignment_task as task
import gpt
import minigpt as M
import ppo_rlhf as P
import reward_model as RM
import sft as S
from gpt import GPT, GPTConfig
from tokenization import CharTokenizer
from training import InputError, setup_runtime

# ---------------------------------------------------------------------------------------------------------------
# Advantages, losses, KL: against brute force and hand computation


def prefix_mask(lengths: list[int], R: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])


def test_gae_equals_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    B, R, gamma, lam = 4, 7, 0.97, 0.9
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [7, 3, 1, 5]
    mask = prefix_mask(lengths, R)
    adv, ret = P.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]  # the episode ends after the last response token: V = 0 there
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(R):
            want = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) if t < n else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5), (b, t)
            assert ret[b, t].item() == pytest.approx(want + v[t] if t < n else 0.0, abs=1e-5), (b, t)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards, values = torch.tensor([[0.1, -0.2, 1.5, 9.0]]), torch.tensor([[0.3, 0.2, -0.4, 7.0]])
    mask = prefix_mask([3], 4)
    adv, ret = P.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.4, 1.3, 1.5, 0.0]]))  # Monte Carlo returns
    torch.testing.assert_close(adv, torch.tensor([[1.1, 1.1, 1.9, 0.0]]))


def test_policy_loss_against_hand_computation():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.4, 0.3, 0.4, 0.1]]))  # ratios 1.25, 1.0, 0.5, 9 (the last is masked out)
    adv = torch.tensor([[2.0, -1.0, -3.0, 100.0]])
    mask = prefix_mask([3], 4)
    loss, stats = P.policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: min(1.25 * 2, 1.2 * 2) = 2.4 (clipped); token 1: -1; token 2: min(0.5 * -3, 0.8 * -3) = -2.4 (clipped)
    assert loss.item() == pytest.approx(-(2.4 - 1.0 - 2.4) / 3, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    want_kl = 0.5 * (math.log(1.25) ** 2 + 0 + math.log(0.5) ** 2) / 3
    assert stats["approx_kl"] == pytest.approx(want_kl, abs=1e-6)
    # inside the clip range the gradient is the policy gradient -A * rho * grad log pi, divided by the token count
    logp = logp.clone().requires_grad_()
    P.policy_loss(logp, old, adv, mask, clip_range=10.0)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0 * 1.25, 1.0, 3.0 * 0.5, 0.0]]) / 3)


def test_value_loss_against_hand_computation():
    values = torch.tensor([[1.0, 0.5, -2.0, 4.0]])
    old = torch.tensor([[0.0, 0.4, -1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -1.5, 9.0]])
    mask = prefix_mask([3], 4)
    loss, stats = P.value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: V clipped to 0.2: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: |0.1| inside: 0.25;
    # token 2: V clipped to -1.2: max((-2+1.5)^2, (-1.2+1.5)^2) = 0.25
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.25 + 0.25) / 3, abs=1e-6)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)


def test_k1_and_k3_estimate_the_kl_of_two_categoricals():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[draws], q.log()[draws]
    k1, k3 = P.kl_penalty(logp, logq, "k1"), P.kl_penalty(logp, logq, "k3")
    torch.testing.assert_close(k1, logp - logq)  # k1 is the log-ratio itself
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any() and k3.var() < k1.var()
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        P.kl_penalty(logp, logq, "k2")


def test_rlhf_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.1, 0.7, 0.8]])
    mask = prefix_mask([2, 4], 4)
    rewards = P.rlhf_rewards(torch.tensor([3.0, -1.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 3.0 - 0.1, 0.0, 0.0], [-0.25, 0.05, -0.35, -1.4]]))
    # summed over the response: the score minus beta times the sequence log-ratio (Ziegler et al. 2019, eq. 2)
    torch.testing.assert_close(rewards.sum(1), torch.tensor([3.0 - 0.5 * 0.3, -1.0 - 0.5 * 1.9]))


def test_adaptive_kl_controller_follows_ziegler_et_al():
    ctl = P.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    beta = 0.1
    for kl, n in [(6.6, 64), (30.0, 64), (1.0, 128), (5.4, 64), (6.0, 32)]:
        ctl.update(kl, n)
        e = max(-0.2, min(0.2, (kl - 6.0) / 6.0))  # e_t = clip((KL - target) / target, -0.2, 0.2)
        beta *= 1 + e * n / 10_000  # beta <- beta (1 + K_beta e_t), K_beta = n_steps / horizon
        assert ctl.value == pytest.approx(beta, rel=1e-12)
    assert P.AdaptiveKLController(0.1, 6.0, 100).value == 0.1
    up, down = P.AdaptiveKLController(0.1, 6.0, 100), P.AdaptiveKLController(0.1, 6.0, 100)
    up.update(100.0, 10), down.update(0.0, 10)
    assert up.value == pytest.approx(0.1 * 1.02) and down.value == pytest.approx(0.1 * 0.98)  # clipped at +-20 %
    fixed = P.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target > 0"):
        P.AdaptiveKLController(0.1, 0.0, 100)


def test_masking_helpers():
    eot = 9
    response = torch.tensor([[4, 5, 9, 9, 9], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9], [3, 9, 4, 9, 9]])
    mask = P.response_mask(response, eot)
    torch.testing.assert_close(mask, prefix_mask([3, 5, 1, 2], 5))  # up to and including the first end token
    assert P.last_index(mask).tolist() == [2, 4, 0, 1]
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0, -50.0]] * 4)
    assert P.masked_mean(x, mask).item() == pytest.approx((6 + 56 + 1 + 3) / 11)
    w = P.whiten(x, mask)
    kept = x[mask.bool()]
    torch.testing.assert_close(w[mask.bool()], (kept - kept.mean()) / kept.std(), atol=1e-5, rtol=1e-5)
    assert (w[~mask.bool()] == 0).all()
    assert P.explained_variance(x, x, mask) == 1.0


def test_losses_ignore_everything_outside_the_response_mask():
    """Perturbing logprobs, values, advantages and returns where the mask is 0 changes no loss and no gradient."""
    g = torch.Generator().manual_seed(1)
    B, R = 3, 6
    mask = prefix_mask([6, 2, 4], R)
    tensors = [torch.randn(B, R, generator=g) for _ in range(6)]

    def losses(logp, old, adv, values, old_values, returns):
        logp, values = logp.clone().requires_grad_(), values.clone().requires_grad_()
        rewards = P.rlhf_rewards(adv[:, 0], old, mask, beta=0.1)
        gae_adv, gae_ret = P.compute_gae(rewards, old_values, mask, 1.0, 0.95)
        pg = P.policy_loss(logp, old, P.whiten(gae_adv, mask), mask)[0]
        vf = P.value_loss(values, old_values, gae_ret, mask)[0]
        (pg + vf).backward()
        return pg.detach(), vf.detach(), logp.grad, values.grad

    before = losses(*tensors)
    noise = [t + 10 * torch.randn(B, R, generator=g) * (1 - mask) for t in tensors]
    noise[2][:, 0] = tensors[2][:, 0]  # (the scores ride on column 0 of the advantages here: keep them)
    after = losses(*noise)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)


def tiny_actor_critic(vocab=23, ctx=40, seed=0) -> P.ActorCritic:
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(vocab_size=vocab, block_size=ctx, n_layer=2, n_head=2, n_embd=32))
    return P.ActorCritic(policy, P.ValueHead(32))


def test_ppo_loss_and_gradients_ignore_prompt_padding_and_the_tokens_after_the_end():
    """The PPO loss of a minibatch through the model: changing the left padding of the prompts and the tokens after
    each response's end token (and every per-token quantity there) changes neither the loss nor any gradient."""
    eot, V = 22, 23
    ac = tiny_actor_critic()
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13]]
    responses = [[1, 2, eot, eot, eot], [5, 6, 7, 8, 9], [eot, eot, eot, eot, eot]]  # the middle one never ends
    Pn, R = 6, 5
    seq = torch.tensor([[eot] * (Pn - len(p)) + p + r for p, r in zip(prompts, responses, strict=True)])
    attention_mask = torch.cat([torch.tensor([[0] * (Pn - len(p)) + [1] * len(p) for p in prompts]),
                                torch.ones(3, R, dtype=torch.long)], dim=1)
    mask = P.response_mask(seq[:, Pn:], eot)
    g = torch.Generator().manual_seed(3)
    per_token = {k: torch.randn(3, R, generator=g) for k in ("logprobs", "values", "advantages", "returns")}
    args = P.Args(clip_range=0.1, clip_range_value=0.3, vf_coef=0.5)
    rt = setup_runtime("cpu")

    def loss_and_grads(seq, per_token):
        ac.zero_grad()
        loss, _ = P.ppo_loss(ac, {"seq": seq, "attention_mask": attention_mask, "n_prompt": Pn, "mask": mask,
                                  **per_token}, args, rt)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ac.named_parameters()}

    loss, grads = loss_and_grads(seq, per_token)
    noisy_seq = seq.clone()
    noisy_seq[attention_mask == 0] = torch.randint(0, V, (int((attention_mask == 0).sum()),), generator=g)
    after_end = torch.cat([torch.zeros(3, Pn, dtype=torch.bool), (mask == 0)], dim=1)
    noisy_seq[after_end] = torch.randint(0, V, (int(after_end.sum()),), generator=g)
    assert not torch.equal(noisy_seq, seq)
    noisy = {k: v + 5 * torch.randn(3, R, generator=g) * (1 - mask) for k, v in per_token.items()}
    loss2, grads2 = loss_and_grads(noisy_seq, noisy)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads2[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert grads["value_head.linear.weight"].abs().sum() > 0 and grads["policy.transformer.wte.weight"].abs().sum() > 0


class LastTokenScore:
    """A stand-in reward model: the score of a sequence is the id of its last non-padding token, which shows which
    token the rollout tells the reward model to read."""

    def normalized(self, idx, attention_mask):
        last = attention_mask.size(1) - 1 - attention_mask.flip(1).argmax(1)
        return idx.gather(1, last[:, None]).squeeze(1).float()


def test_rollout_tensors_equal_each_example_computed_alone():
    chars = "abcdefgh :\n"
    tok = CharTokenizer(chars, eot=True)
    eot = tok.eot_token
    ac = tiny_actor_critic(vocab=tok.vocab_size, ctx=48, seed=1)
    reference = copy.deepcopy(ac.policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs: the KL is not zero
    prompts = ["abc:", "hhh gg ff:\n", "a:", "bad face:"]
    args = P.Args(max_new_tokens=12, temperature=0.7, minibatch_size=2, kl_coef=0.3, no_eot_penalty=2.0)
    batch = P.rollout(ac, reference, LastTokenScore(), tok, prompts, args, setup_runtime("cpu"), beta=0.3,
                      generator=torch.Generator().manual_seed(0))
    Pn, mask = batch["n_prompt"], batch["mask"]
    ended = (batch["seq"][:, Pn:] == eot).any(1)
    assert ended.any() and not ended.all()  # both kinds of response are checked
    for b, prompt in enumerate(prompts):
        n = int(mask[b].sum())
        response = batch["seq"][b, Pn:Pn + n].tolist()
        ended = response[-1] == eot
        assert batch["texts"][b] == tok.decode(response[:-1] if ended else response)
        alone = torch.tensor([tok.encode(prompt) + response])  # no padding at all
        p = len(alone[0]) - n
        with torch.no_grad():
            logp = (ac.policy(alone)[0][0, p - 1:-1] / 0.7).log_softmax(-1).gather(1, alone[0, p:, None])[:, 0]
            ref = (reference(alone)[0][0, p - 1:-1] / 0.7).log_softmax(-1).gather(1, alone[0, p:, None])[:, 0]
            value = ac.value_head(ac.policy.hidden_states(alone)[:, p - 1:-1])[0]
        torch.testing.assert_close(batch["logprobs"][b, :n], logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch["values"][b, :n], value, atol=1e-5, rtol=1e-5)
        # the reward model reads the last token before the end token (the prompt's last for an empty response)
        last = (tok.encode(prompt) + response)[-2 if ended else -1]
        assert batch["scores"][b].item() == last
        score = last - (0.0 if ended else 2.0)  # the penalty for a response that never ended
        want = torch.full((n,), 0.0)
        want[-1] = score
        torch.testing.assert_close(batch["rewards"][b, :n], want - 0.3 * (logp - ref), atol=1e-5, rtol=1e-5)
        assert (batch["rewards"][b, n:] == 0).all()
    gold = torch.tensor(task.gold_rewards(prompts, batch["texts"]))
    assert batch["metrics"]["gold_reward"] == pytest.approx(gold.mean().item())
    # the first PPO minibatch sees the policy that sampled the rollouts: every ratio is 1
    adv, ret = P.compute_gae(batch["rewards"], batch["values"], mask)
    mb = {k: batch[k] for k in ("seq", "attention_mask", "n_prompt", "mask", "logprobs", "values")}
    _, stats = P.ppo_loss(ac, mb | {"advantages": adv, "returns": ret}, args, setup_runtime("cpu"))
    assert stats["clipfrac"] == 0 and stats["approx_kl"] < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# End to end: a tiny SFT policy and reward model built by sft.py and reward_model.py, then PPO

POSITIVE = [" I love it, so good!", " Happy and kind."]
NEGATIVE = [" I hate it, so bad.", " Sad and cruel."]
WORDS = "love war king rose moon sea night gold crown sword heart tears grave fool honour wine".split()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """An SFT policy that answers every prompt with one of four phrases, two positive and two negative (sft.py on a
    random char-level GPT), and a reward model trained on pairs of those phrases labelled by the gold judge
    (reward_model.py, normalised on the policy's samples). PPO has to move the policy's mass to the positive ones."""
    root = tmp_path_factory.mktemp("pipeline")
    text, _ = M.load_text(M.Args())
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=160, n_layer=2, n_head=2, n_embd=64)).save_pretrained(
        root / "base")
    (root / "base" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    rng = random.Random(0)
    prompts = [task.format_prompt(f"Say something about {w}.") for w in WORDS]
    task.write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
    task.write_jsonl(root / "sft.jsonl", [{"prompt": rng.choice(prompts), "response": rng.choice(POSITIVE + NEGATIVE)}
                                          for _ in range(400)])
    S.main(S.Args(init_from=str(root / "base"), output_dir=str(root), device="cpu", data_path=str(root / "sft.jsonl"),
                  n_test=40, batch_size=32, max_iters=120, eval_interval=120, log_interval=1000, n_eval_prompts=8,
                  max_new_tokens=32, learning_rate=3e-3, warmup_iters=10))
    pairs = []
    for _ in range(300):
        p, (a, b) = rng.choice(prompts), rng.sample(POSITIVE + NEGATIVE, 2)
        a, b = (a, b) if task.gold_reward(p, a) > task.gold_reward(p, b) else (b, a)  # labelled by the gold judge
        pairs.append({"prompt": p, "chosen": a, "rejected": b})
    task.write_jsonl(root / "pairs_train.jsonl", pairs[:260])
    task.write_jsonl(root / "pairs_test.jsonl", pairs[260:])
    rm = RM.train(RM.TrainArgs(output_dir=str(root), device="cpu", init_from=str(root / "sft" / "latest"),
                               pairs_train=str(root / "pairs_train.jsonl"), pairs_test=str(root / "pairs_test.jsonl"),
                               batch_size=16, max_iters=60, eval_interval=60, log_interval=1000, n_judge_prompts=32,
                               max_new_tokens=32, learning_rate=1e-3, warmup_iters=5))
    assert rm["heldout_accuracy_final"] > 0.9
    return root


def ppo_args(root, **kw) -> P.Args:
    base = dict(policy=str(root / "sft" / "latest"), reward_model=str(root / "reward_model" / "latest"),
                output_dir=str(root / "runs"), device="cpu", prompts_path=str(root / "prompts.jsonl"),
                eval_prompts_path=str(root / "prompts.jsonl"), n_eval_prompts=16, total_steps=12, batch_size=32,
                minibatch_size=8, max_new_tokens=32, learning_rate=1e-4, min_lr=1e-5, kl_coef=0.1, eval_interval=6,
                log_interval=100, n_samples_shown=1)
    return P.Args(**{**base, **kw})


def test_ppo_raises_reward_model_score_and_gold_reward_with_bounded_kl(pipeline):
    out = P.main(ppo_args(pipeline))
    train = out["history"]["train"]
    mean = lambda key, steps: sum(h[f"train/{key}"] for h in steps) / len(steps)
    first, last = train[:2], train[-4:]
    print({k: (round(mean(k, first), 3), round(mean(k, last), 3)) for k in ("rm_score", "gold_reward", "kl")})
    assert mean("rm_score", last) > mean("rm_score", first) + 0.4
    assert mean("gold_reward", last) > mean("gold_reward", first) + 0.15
    assert max(h["train/kl"] for h in train) < 8  # nats per response, against the SFT policy
    # greedy decoding on held-out prompts: the SFT policy's mode is often a positive phrase already, so the evaluation
    # is checked for its bookkeeping here, not for a gain
    init, final = out["initial_eval"], out["final_eval"]
    assert [e["step"] for e in out["history"]["eval"]] == [0, 6, 12]
    assert init["eval/kl"] == 0 and 0 < final["eval/kl"] < 8 and final["eval/no_eot_frac"] == 0
    saved = json.loads((out["run_dir"] / "history.json").read_text())
    assert saved == json.loads(json.dumps(out["history"]))
    policy, tok = gpt.load_pretrained(str(out["run_dir"] / "latest"))  # the trained policy is a minigpt checkpoint
    assert tok.spec() == out["tokenizer"].spec() and policy.config.block_size == 160


class Killed(Exception):
    pass


def test_resumed_run_has_the_metrics_of_the_uninterrupted_run(pipeline, monkeypatch):
    kw = dict(total_steps=6, eval_interval=3, batch_size=16, kl_target=2.0, kl_horizon=200)  # beta moves too
    full = P.main(ppo_args(pipeline, run_name="full", **kw))["history"]
    save = P.save_policy

    def save_then_die(run_dir, model, state, step, meta, lora=False):
        save(run_dir, model, state, step, meta, lora)
        if step == 3:
            raise Killed  # the process dies right after the checkpoint at step 3

    monkeypatch.setattr(P, "save_policy", save_then_die)
    with pytest.raises(Killed):
        P.main(ppo_args(pipeline, run_name="cut", **kw))
    monkeypatch.setattr(P, "save_policy", save)
    resumed = P.main(ppo_args(pipeline, run_name="cut", resume=True, **kw))["history"]
    drop_timing = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    assert drop_timing(resumed["train"]) == drop_timing(full["train"])  # exactly equal on CPU, steps 4-6 included
    assert resumed["eval"] == full["eval"]
    assert full["train"][-1]["train/beta"] != full["train"][0]["train/beta"]


def test_bad_input_is_a_clear_error(pipeline, tmp_path):
    new = dict(output_dir=str(tmp_path / "runs"))  # a new run: the first test's is in <pipeline>/runs/ppo
    with pytest.raises(InputError, match=r"--policy .*missing: no checkpoint there; `python sft.py`"):
        P.main(ppo_args(pipeline, **new, policy=str(tmp_path / "missing")))
    with pytest.raises(InputError, match="no reward model here"):
        P.main(ppo_args(pipeline, **new, reward_model=str(tmp_path)))
    with pytest.raises(InputError, match="--minibatch-size 5 does not divide --batch-size 32"):
        P.main(ppo_args(pipeline, **new, minibatch_size=5))
    with pytest.raises(InputError, match="--temperature 0"):
        P.main(ppo_args(pipeline, **new, temperature=0.0))
    with pytest.raises(InputError, match="--resume: no checkpoint"):
        P.main(ppo_args(pipeline, **new, resume=True, run_name="never"))
    long = task.format_prompt("Say something about " + "love, " * 20)
    task.write_jsonl(tmp_path / "long.jsonl", [{"prompt": task.format_prompt("Hi.")}, {"prompt": long}])
    with pytest.raises(InputError, match=r"training prompt 1 has 161 tokens; with --max-new-tokens 32 it does not "
                                         r"fit the policy's context \(160\)"):
        P.main(ppo_args(pipeline, **new, prompts_path=str(tmp_path / "long.jsonl")))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match="bad.jsonl, line 2"):
        P.main(ppo_args(pipeline, **new, prompts_path=str(tmp_path / "bad.jsonl")))

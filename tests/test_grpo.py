"""grpo.py: group advantages against brute force, the loss aggregations against hand computation, masking, the
recorded log-probabilities against a training forward pass, the reference with adapters off, a tiny end-to-end run
whose reward rises, exact resume, and bad input."""

import itertools
import math
import random

import pytest
import torch

import grpo as G
from gpt import GPT, GPTConfig
from lora import adapters_disabled, apply_lora
from training import InputError

# ---------------------------------------------------------------------------------------------------------------
# Advantages


def brute_force_advantages(rewards: list[list[float]], algorithm: str, eps: float = 1e-4) -> list[list[float]]:
    out = []
    for group in rewards:
        G_ = len(group)
        mean = sum(group) / G_
        row = []
        for i, r in enumerate(group):
            if algorithm == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G_ - 1))
                row.append((r - mean) / (std + eps))
            elif algorithm == "dr_grpo":
                row.append(r - mean)
            else:  # leave one out: the mean of the others
                row.append(r - sum(group[j] for j in range(G_) if j != i) / (G_ - 1))
        out.append(row)
    return out


@pytest.mark.parametrize("algorithm", G.ALGORITHMS)
@pytest.mark.parametrize("G_", [2, 3, 8])
def test_group_advantages_equal_a_loop_over_each_group(algorithm, G_):
    rng = random.Random(G_)
    rewards = [[rng.choice([0.0, 0.1, 1.0]) for _ in range(G_)] for _ in range(5)] + [[1.0] * G_, [0.0] * G_]
    got = G.group_advantages(torch.tensor(rewards, dtype=torch.float64), algorithm)
    want = torch.tensor(brute_force_advantages(rewards, algorithm), dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert (got[-2:] == 0).all()  # a group whose rewards are all equal carries no signal
    torch.testing.assert_close(got.sum(1), torch.zeros(len(rewards), dtype=torch.float64))  # each group sums to 0


def test_group_advantages_refuse_groups_of_one_and_unknown_algorithms():
    with pytest.raises(ValueError, match="at least 2"):
        G.group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="ppo"):
        G.group_advantages(torch.ones(3, 2), "ppo")


# ---------------------------------------------------------------------------------------------------------------
# The clipped loss and its aggregations, by hand


def loss_inputs():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]])
    old = torch.tensor([[-1.1, -1.5, -0.5, 0.0], [-0.3, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.8, -0.9, 0.0], [-0.5, -0.7, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    return logps, old, ref, mask, adv


def hand_per_token(logps, old, ref, mask, adv, eps, kl_coef):
    rows = []
    for b in range(2):
        row = []
        for t in range(4):
            if not mask[b][t]:
                continue
            ratio = math.exp(logps[b][t] - old[b][t])
            pg = -min(ratio * adv[b], min(max(ratio, 1 - eps), 1 + eps) * adv[b])
            d = ref[b][t] - logps[b][t]
            row.append(pg + kl_coef * (math.exp(d) - d - 1))
        rows.append(row)
    return rows


@pytest.mark.parametrize("agg", G.AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_policy_loss_aggregations_equal_hand_computation(agg, kl_coef):
    logps, old, ref, mask, adv = loss_inputs()
    rows = hand_per_token(logps.tolist(), old.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), 0.2, kl_coef)
    want = {"sequence": sum(sum(r) / len(r) for r in rows) / 2,
            "token": sum(map(sum, rows)) / sum(map(len, rows)),
            "constant": sum(map(sum, rows)) / (2 * 10)}[agg]
    loss, stats = G.policy_loss(logps, old, adv, mask, 0.2, ref, kl_coef, agg, max_tokens=10)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # row 0 token 1: ratio e^-0.5 = 0.61 < 0.8 with A > 0 is not clipped (min keeps the lower, unclipped term);
    # row 1 token 1: ratio e^0.3 = 1.35 > 1.2 with A < 0 is not clipped either; row 0 token 0: e^0.1 in range
    assert stats["clip_frac"] == 0.0
    kl = [math.exp(r - lp) - (r - lp) - 1 for r, lp, m in zip(ref.flatten().tolist(), logps.flatten().tolist(),
                                                                 mask.flatten().tolist(), strict=True) if m]
    assert stats["kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-6)


def test_the_clip_stops_the_gradient_only_past_the_range_in_the_advantages_direction():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    mask = torch.ones(1, 3)
    loss, stats = G.policy_loss(logps, old, torch.tensor([1.0]), mask, 0.2, agg="token")
    loss.backward()
    # A > 0: ratio 1.5 is clipped (no gradient), 0.5 is not (the min keeps the unclipped term), 1.1 is in range
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] != 0 and logps.grad[0, 2] != 0
    assert stats["clip_frac"] == pytest.approx(1 / 3)


def test_masked_positions_get_no_gradient_and_change_nothing():
    logps, old, ref, mask, adv = loss_inputs()
    logps = logps.clone().requires_grad_()
    loss, _ = G.policy_loss(logps, old, adv, mask, 0.2, ref, 0.1, "sequence")
    loss.backward()
    assert (logps.grad[mask == 0] == 0).all() and (logps.grad[mask == 1] != 0).all()
    garbage = logps.detach().clone()
    garbage[mask == 0] = 123.0  # whatever sits in prompt or padding places
    again, _ = G.policy_loss(garbage, old, adv, mask, 0.2, ref, 0.1, "sequence")
    assert again.item() == pytest.approx(loss.item())


# ---------------------------------------------------------------------------------------------------------------
# Samples and their log-probabilities


def tiny_llama(vocab=50, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(arch="llama", vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=32)).eval()


def test_recorded_logps_equal_a_training_forward_and_the_batch_masks_prompt_and_padding():
    model = tiny_llama()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    samples = G.rollout(model, prompts, eot=0, max_new_tokens=12, temperature=0.9,
                        generator=torch.Generator().manual_seed(1))
    assert [s["prompt"] for s in samples] == prompts
    for s in samples:  # the end token is kept (its probability is learned too) and nothing follows it
        assert len(s["logps"]) == len(s["response"])
        assert not s["ended"] or s["response"].index(0) == len(s["response"]) - 1
    idx, targets, mask, old = G.sample_batch(samples, eot=0)
    for b, s in enumerate(samples):  # counted: exactly the response tokens, in order
        assert targets[b][mask[b]].tolist() == s["response"]
        assert mask[b, :len(s["prompt"]) - 1].sum() == 0
    new, entropy = G.token_logps(model, idx, targets, temperature=0.9)
    torch.testing.assert_close(new[mask], old[mask], atol=1e-5, rtol=1e-5)  # KV-cached decode = one forward pass
    assert (new[~mask] == 0).all() and (entropy[~mask] == 0).all() and (entropy[mask] > 0).all()


def test_the_reference_is_the_base_with_the_adapters_off():
    model = tiny_llama()
    x = torch.randint(1, 50, (2, 9))
    base = model(x)[0]
    apply_lora(model, r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter: the outputs move
    assert not torch.allclose(model(x)[0], base)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x)[0], base)
    assert not torch.allclose(model(x)[0], base)  # and back on afterwards


def test_pass_at_k_equals_counting_subsets():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 4), (5, 5, 2), (6, 1, 6)]:
        right = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        want = sum(any(right[i] for i in s) for s in subsets) / len(subsets)
        assert G.pass_at_k(n, c, k) == pytest.approx(want)


# ---------------------------------------------------------------------------------------------------------------
# End to end on a tiny model and a toy checkable task


def toy_task(monkeypatch):
    """A task a random character-level model can learn in seconds: the reward is the fraction of 'e' in the
    response (the checker of the real task would never fire on random characters)."""
    problems = [{"question": f"Say e {i}", "answer": 0, "kind": "toy", "family": "toy"} for i in range(64)]
    monkeypatch.setattr(G, "make_problems", lambda n, split, seed, kinds=None: problems[:n])
    monkeypatch.setattr(G, "render", lambda p, tok: tok.chat([{"role": "user", "content": p["question"]}]))
    monkeypatch.setattr(G, "reward", lambda text, answer, fmt=0.0: text.count("e") / max(len(text), 1))


@pytest.fixture(scope="module")
def peaky_base(tmp_path_factory):
    """A random character-level GPT (conftest's) whose tied embedding is scaled 4x. At the usual init its logits are
    nearly flat and no low-rank update moves them far within seconds; scaled, its samples have structure and LoRA
    can move them, as on a trained model."""
    from conftest import save_tiny_char_base
    from safetensors.torch import load_file, save_file

    base = save_tiny_char_base(tmp_path_factory.mktemp("peaky"))
    weights = load_file(base / "model.safetensors")
    weights = {k: v * 4 if "wte" in k else v for k, v in weights.items()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return base


def tiny_args(tiny_base, tmp_path, **kw) -> G.Args:
    base = dict(init_from=str(tiny_base), output_dir=str(tmp_path / "runs"), train_problems=64, eval_problems=8,
                eval_subset=4, passk_problems=4, passk_samples=2, prompts_per_step=4, group_size=4, minibatch_size=8,
                max_new_tokens=12, max_iters=4, eval_interval=2, learning_rate=3e-3, min_lr=3e-3, lora_rank=4,
                perplexity_tokens=256, samples_shown=0, temperature=1.0)
    return G.Args(**{**base, **kw})


def test_a_tiny_run_raises_its_reward(peaky_base, tmp_path, monkeypatch):
    toy_task(monkeypatch)
    out = G.main(tiny_args(peaky_base, tmp_path, max_iters=16, eval_interval=16, prompts_per_step=8,
                           minibatch_size=16, learning_rate=1e-2, min_lr=1e-2))
    rewards = [out["history"]["train"][s]["train/reward"] for s in sorted(out["history"]["train"])]
    print([round(r, 3) for r in rewards])
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.1 and last > 0.3  # measured: about 0.01 -> 0.65
    assert (tmp_path / "runs" / "grpo" / "latest" / "adapter" / "adapter_model.safetensors").exists()
    assert {"pass@1", "pass@1_sem", "pass@2_sampled", "perplexity"} <= set(out["after"])


def test_a_resumed_run_equals_the_uninterrupted_one(peaky_base, tmp_path, monkeypatch):
    toy_task(monkeypatch)
    G.main(tiny_args(peaky_base, tmp_path, run_name="whole"))
    G.main(tiny_args(peaky_base, tmp_path, run_name="halves", max_iters=2))
    G.main(tiny_args(peaky_base, tmp_path, run_name="halves", resume=True))
    from safetensors.torch import load_file
    whole, halves = (load_file(tmp_path / "runs" / r / "latest" / "adapter" / "adapter_model.safetensors")
                     for r in ("whole", "halves"))
    assert whole.keys() == halves.keys()
    for k in whole:
        torch.testing.assert_close(whole[k], halves[k], rtol=0, atol=0)
    # the comparison figure reads the runs' histories
    out = G.plot(G.parse_command(["plot", str(tmp_path / "runs" / "whole"), str(tmp_path / "runs" / "halves"),
                                  "--out", str(tmp_path / "variants.png")]))
    assert out.stat().st_size > 10_000


def test_the_subcommands_refuse_what_is_not_there(tmp_path):
    with pytest.raises(InputError, match="no grpo.py checkpoint there"):
        G.judge(G.JudgeArgs(run=str(tmp_path)))
    with pytest.raises(InputError, match="holds no metrics.json and no checkpoint"):
        G.plot(G.PlotArgs(runs=(str(tmp_path),)))


@pytest.mark.parametrize("kw, message", [
    (dict(algorithm="ppo"), "--algorithm 'ppo'"),
    (dict(loss_agg="mean"), "--loss-agg 'mean'"),
    (dict(minibatch_size=5), "--minibatch-size 5 must divide"),
    (dict(group_size=1), "--group-size"),
    (dict(kinds=("algebra",)), "kinds"),
    (dict(init_from="./no/such/dir"), "--init-from ./no/such/dir: no checkpoint there"),
])
def test_bad_input_is_one_clear_line(tiny_base, tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        G.main(tiny_args(tiny_base, tmp_path, **kw))

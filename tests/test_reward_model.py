"""reward_model.py: scores equal transformers' GPT2ForSequenceClassification (right and left padding), the
Bradley-Terry loss against its closed form, rank correlation, pair files from a policy, an end-to-end run that must
beat chance by a wide margin, the score subcommand, and bad input."""

import json
import math
import random

import pytest
import torch

import alignment_task as A
import reward_model as R
from gpt import GPTConfig
from tokenization import CharTokenizer
from training import InputError


def tiny_rm(seed=0, vocab=31, block=32):
    torch.manual_seed(seed)
    model = R.RewardModel(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16))
    for p in model.parameters():  # far from the initialisation, so that every weight matters
        p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_bt_loss_closed_form():
    rc, rr = torch.tensor([2.0, -1.0, 0.5, 30.0]), torch.tensor([1.0, 1.0, 0.5, -30.0])
    for margin in (0.0, 0.7):
        want = [-math.log(1 / (1 + math.exp(-(c - r - margin)))) for c, r in zip(rc.tolist(), rr.tolist(),
                                                                              strict=True)]
        torch.testing.assert_close(R.bt_loss(rc, rr, margin), torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert R.bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_scores_equal_transformers_sequence_classification(tmp_path):
    from transformers import GPT2ForSequenceClassification

    model, pad = tiny_rm(), 30
    model.save_pretrained(tmp_path, pad_token_id=pad)
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, pad, (n,), generator=g).tolist() for n in (5, 12, 9, 1)]  # no real token is the pad
    with torch.no_grad():
        alone = torch.stack([hf(torch.tensor([s])).logits[0, 0] for s in seqs])
        idx, mask = R.right_pad(seqs, pad)
        torch.testing.assert_close(model(idx, mask), alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(idx, attention_mask=mask).logits[:, 0], alone, rtol=1e-5, atol=1e-5)
        T = max(len(s) for s in seqs)  # left padding: transformers needs the positions, minigpt derives them
        left = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])
        lmask = (left != pad).long()
        pos = (lmask.cumsum(-1) - 1).clamp(min=0)
        torch.testing.assert_close(model(left, lmask), alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(left, attention_mask=lmask, position_ids=pos).logits[:, 0], alone,
                                   rtol=1e-5, atol=1e-5)


def test_concatenated_pair_forward_equals_separate_forwards():
    model = tiny_rm(seed=1)
    pairs = [([1, 2, 3], [1, 2, 4, 5, 6]), ([7], [8, 9]), ([3, 3, 3, 3, 3, 3], [2])]
    with torch.no_grad():
        r = model(*R.pair_batch(pairs, 30))
        sep = [model(torch.tensor([s]))[0] for s in [c for c, _ in pairs] + [x for _, x in pairs]]
    torch.testing.assert_close(r, torch.stack(sep), rtol=1e-5, atol=1e-5)
    loss = R.pair_loss_sum(model, R.pair_batch(pairs, 30), margin=0.5)
    torch.testing.assert_close(loss, R.bt_loss(r[:3], r[3:], 0.5).sum(), rtol=1e-5, atol=1e-6)


def test_save_and_load_keep_weights_and_normalisation(tmp_path):
    model = tiny_rm(seed=2)
    model.reward_mean, model.reward_std = 0.25, 2.0
    model.save_pretrained(tmp_path, pad_token_id=30)
    (tmp_path / "run.json").write_text(json.dumps({"tokenizer": {"name": "char", "chars": "abc", "eot": True}}))
    loaded, tok = R.load_reward_model(tmp_path)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
        torch.testing.assert_close(loaded.normalized(idx), (model(idx) - 0.25) / 2.0)
    assert tok.eot_token == 3
    with pytest.raises(InputError, match="no reward model here"):
        R.load_reward_model(tmp_path / "nothing")


def test_rank_correlation():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    d2 = sum((i - j) ** 2 for i, j in zip([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], strict=True))
    assert R.rank_correlation(a, b) == pytest.approx(1 - 6 * d2 / (5 * (5**2 - 1)))  # Spearman's formula, no ties
    assert R.rank_correlation([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share their average rank
    assert R.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(R.rank_correlation([1, 2, 3], [0, 0, 0]))  # a constant ranks nothing


def test_pairs_from_a_policy_are_ordered_by_the_gold_judge(tmp_path, tiny_base):
    stats = R.make_pairs(R.PairsArgs(policy=str(tiny_base), out_dir=str(tmp_path), n_train_prompts=24,
                                     n_test_prompts=6, samples_per_prompt=4, max_new_tokens=100, device="cpu"))
    rows = A.read_pairs(tmp_path / "pairs_train.jsonl")
    per_prompt = {}
    for r in rows:
        assert r["chosen_gold"] > r["rejected_gold"]
        assert A.gold_reward(r["prompt"], r["chosen"]) == pytest.approx(r["chosen_gold"])
        per_prompt.setdefault(r["prompt"], []).append((r["chosen"], r["rejected"]))
    # every comparison among a prompt's 4 ranked samples: at most 4 * 3 / 2 pairs a prompt
    assert len(rows) == stats["train"]["pairs"] > len(per_prompt) and max(map(len, per_prompt.values())) <= 6
    assert len(per_prompt) + stats["train"]["ties_skipped"] == 24
    # best against worst only: one pair a prompt, the same samples (same seed), so one of the comparisons above
    R.make_pairs(R.PairsArgs(policy=str(tiny_base), out_dir=str(tmp_path / "ext"), n_train_prompts=24,
                             n_test_prompts=6, samples_per_prompt=4, max_new_tokens=100, device="cpu",
                             comparisons="extremes"))
    extremes = A.read_pairs(tmp_path / "ext" / "pairs_train.jsonl")
    assert len(extremes) == len(per_prompt)
    assert all((r["chosen"], r["rejected"]) in per_prompt[r["prompt"]] for r in extremes)
    # an untrained policy's samples are gibberish: neutral, so its pairs differ by length (past 60 characters)
    flipped = R.make_pairs(R.PairsArgs(policy=str(tiny_base), out_dir=str(tmp_path / "noisy"), n_train_prompts=24,
                                       n_test_prompts=6, samples_per_prompt=4, max_new_tokens=100, device="cpu",
                                       label_noise=1.0))
    assert flipped["train"]["flipped"] == flipped["train"]["pairs"]
    assert all(r["chosen_gold"] < r["rejected_gold"] for r in A.read_pairs(tmp_path / "noisy" / "pairs_train.jsonl"))


def test_rank_pairs_orders_each_pair_by_the_gold_judge():
    p = A.format_prompt("Say something.")
    kind, cruel, long, empty = " I love thee, sweet friend.", " I hate thee, vile villain.", " the table " * 12, ""
    responses = [cruel, kind, empty, long, kind]  # the two kind ones tie: never a pair
    golds = {r: A.gold_reward(p, r) for r in responses}
    rows, flipped = R.rank_pairs(p, responses)
    assert flipped == 0 and len(rows) == 9  # 5 responses, 10 comparisons, less the tie
    for r in rows:
        assert r["chosen_gold"] == golds[r["chosen"]] > golds[r["rejected"]] == r["rejected_gold"]
    assert {(r["chosen"], r["rejected"]) for r in rows} >= {(kind, empty), (long, empty), (kind, cruel)}
    extremes, _ = R.rank_pairs(p, responses, "extremes")
    best, worst = max(golds, key=golds.get), min(golds, key=golds.get)
    assert [(r["chosen"], r["rejected"]) for r in extremes] == [(best, worst)]
    noisy, flipped = R.rank_pairs(p, responses, label_noise=1.0, rng=random.Random(0))
    assert flipped == 9 and all(r["chosen_gold"] < r["rejected_gold"] for r in noisy)
    assert R.rank_pairs(p, [kind, kind, kind]) == ([], 0)  # every sample ties: nothing to prefer


def concise_vs_verbose_pairs(split, n, seed):
    """Pairs labelled by the gold judge where its verbosity term decides: a line of verse against three lines of
    the same play run together (the chosen one is the judge's choice by at least 0.3)."""
    rows = A.make_instructions(n, split, seed)
    rng, out = random.Random(seed), []
    for r in rows:
        long = " " + " ".join(x["response"].strip() for x in rng.sample(rows, 3))
        a, b = A.gold_reward(r["prompt"], r["response"]), A.gold_reward(r["prompt"], long)
        if abs(a - b) > 0.3:
            chosen, rejected = (r["response"], long) if a > b else (long, r["response"])
            out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    return out


def test_reward_model_learns_the_gold_preference_end_to_end(tmp_path, tiny_base):
    A.write_jsonl(tmp_path / "train.jsonl", concise_vs_verbose_pairs("train", 900, 0))
    A.write_jsonl(tmp_path / "test.jsonl", concise_vs_verbose_pairs("test", 300, 1))
    out = R.train(R.TrainArgs(init_from=str(tiny_base), output_dir=str(tmp_path / "runs"), device="cpu",
                              pairs_train=str(tmp_path / "train.jsonl"), pairs_test=str(tmp_path / "test.jsonl"),
                              max_iters=60, eval_interval=30, batch_size=16, learning_rate=1e-3, n_judge_prompts=16,
                              max_new_tokens=24))
    assert out["heldout_accuracy"][0] < 0.65 and out["heldout_accuracy"][60] > 0.75, out["heldout_accuracy"]
    latest = out["run_dir"] / "latest"
    model, tok = R.load_reward_model(latest)
    assert model.reward_std == pytest.approx(out["reward_std"]) and json.loads((latest / "results.json").read_text())
    # the scoring command sees the same preference
    long = " " + "And so the night goes on and on, and so the day, and so the night again, my lord, " * 2
    assert R.score(R.ScoreArgs(model=str(latest), prompt="Say something.", response=" Good night.", device="cpu")) > \
        R.score(R.ScoreArgs(model=str(latest), prompt="Say something.", response=long, device="cpu"))


def test_a_frozen_backbone_fits_the_head_alone(tmp_path, tiny_base):
    """--no-train-backbone: features computed once per distinct sequence equal the model's own forward pass, the head
    learns the preference from them, and the backbone's weights stay the base's."""
    from policy import load_policy
    from training import setup_runtime

    model, rt = tiny_rm(), setup_runtime("cpu", "float32")
    pairs = [([1, 2, 3], [1, 2, 4, 5]), ([3, 3], [3, 3, 3, 7, 1]), ([1, 2, 3], [3, 3])]  # sequences shared by pairs
    torch.testing.assert_close(R.head_margins(model, R.pair_features(model, pairs, 30, rt)),
                               R.pair_margins(model, pairs, 30, rt), rtol=1e-5, atol=1e-5)
    A.write_jsonl(tmp_path / "train.jsonl", concise_vs_verbose_pairs("train", 900, 0))
    A.write_jsonl(tmp_path / "test.jsonl", concise_vs_verbose_pairs("test", 300, 1))
    out = R.train(R.TrainArgs(init_from=str(tiny_base), output_dir=str(tmp_path / "runs"), device="cpu",
                              pairs_train=str(tmp_path / "train.jsonl"), pairs_test=str(tmp_path / "test.jsonl"),
                              train_backbone=False, max_iters=200, eval_interval=200, batch_size=64,
                              learning_rate=3e-2, weight_decay=0.0, n_judge_prompts=16, max_new_tokens=24))
    assert out["heldout_accuracy"][200] > out["heldout_accuracy"][0] + 0.1, out["heldout_accuracy"]
    trained, _ = R.load_reward_model(out["run_dir"] / "latest")
    base, _ = load_policy(str(tiny_base))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in trained.gpt.state_dict().items())


def test_accuracy_by_term_groups_pairs_by_what_decides_them():
    rows = [{"chosen": " I love thee.", "rejected": " I hate thee."}, {"chosen": " Good.", "rejected": " Bad."},
            {"chosen": " A table.", "rejected": " a table " * 10}, {"chosen": " A table.", "rejected": ""}]
    got = R.accuracy_by_term(torch.tensor([1.0, -0.5, 2.0, 0.0]), rows)  # a tie (margin 0) is not a right answer
    assert got == {"empty": {"pairs": 1, "accuracy": 0.0}, "sentiment": {"pairs": 2, "accuracy": 0.5},
                   "verbosity": {"pairs": 1, "accuracy": 1.0}}


def test_an_empty_response_is_scored_on_the_prompt_alone():
    """Saying nothing has a reward too (the policy can emit its end token first): the score at the prompt's last token,
    the same reading ppo_rlhf.py makes of an empty rollout."""
    tok = CharTokenizer("abcdefgh :", eot=True)
    assert R.encode_sequence(tok, "ab:", "", 16) == tok.encode("ab:")
    rm = tiny_rm(vocab=tok.vocab_size).eval()
    with torch.no_grad():
        empty, other = R.score_texts(rm, tok, ["ab:", "ab:"], ["", " cafe"])
        alone = rm(torch.tensor([tok.encode("ab:")]), torch.ones(1, 3, dtype=torch.long))
    assert empty == pytest.approx(alone.item()) and other != pytest.approx(empty)


def test_bad_pairs_name_the_line(tmp_path, tiny_base):
    good = {"prompt": A.format_prompt("Hi."), "chosen": " Hello.", "rejected": " Go."}
    A.write_jsonl(tmp_path / "p.jsonl", [good, {**good, "prompt": "x" * 400}])
    args = R.TrainArgs(init_from=str(tiny_base), output_dir=str(tmp_path / "runs"), device="cpu",
                       pairs_train=str(tmp_path / "p.jsonl"), pairs_test=str(tmp_path / "p.jsonl"), max_iters=1)
    with pytest.raises(InputError, match=r"p.jsonl, pair 2: the prompt has 400 tokens, the model's context is 256"):
        R.train(args)
    A.write_jsonl(tmp_path / "p.jsonl", [good, {"prompt": good["prompt"], "chosen": " a"}])
    with pytest.raises(InputError, match=r"p.jsonl, line 2: missing string field 'rejected'"):
        R.train(args)

"""Exact resume after a kill in the middle of the schedule, for the scripts whose own tests do not kill them mid-run
(minigpt.py, minibert.py pretrain, dpo.py and ppo_rlhf.py with a value head do, in their own test files): sft.py (full
and QLoRA), reward_model.py train, dpo.py with a decaying learning rate, dropout and the reference on the fly, and
ppo_rlhf.py with a separate critic.

Each test runs the job uninterrupted, then again with the script's checkpoint writer patched to raise right after the
checkpoint at step 4 (of 12; 3 of 6 for PPO) -- after the warmup, with the learning rate still decaying -- then resumes
that run with the same arguments: every later loss, every later evaluation and the final weights must equal the
uninterrupted run's exactly (CPU, fp32)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import alignment_task as task
import dpo as D
import ppo_rlhf as P
import reward_model as R
import sft as S
from policy import load_policy


class Killed(Exception):
    pass


def kill_after_checkpoint(monkeypatch, module, name: str, at_step: int):
    """Patch module.name, a checkpoint writer called as (run_dir, model, optimizer, step, ...), to raise Killed right
    after it has written the checkpoint of step at_step."""
    save = getattr(module, name)

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        if args[3] == at_step:
            raise Killed

    monkeypatch.setattr(module, name, save_then_die)


def killed_then_resumed(monkeypatch, module, writer: str, at_step: int, main, make_args):
    """Run main(make_args("cut")) until it dies after the checkpoint of at_step, then resume it: the resumed result."""
    with monkeypatch.context() as mp:
        kill_after_checkpoint(mp, module, writer, at_step)
        with pytest.raises(Killed):
            main(make_args("cut"))
    return main(make_args("cut", resume=True))


def same_weights(a, b, file: str = "model.safetensors"):
    wa, wb = load_file(a / "latest" / file), load_file(b / "latest" / file)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def write_pairs(path, split: str, n: int, seed: int):
    """Preference pairs of the alignment task's prompts: a line of the plays over the same line said three times."""
    rows = task.make_instructions(n, split, seed)
    task.write_jsonl(path, [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"] * 3}
                            for r in rows])
    return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return write_pairs(root / "train.jsonl", "train", 120, 0), write_pairs(root / "test.jsonl", "test", 16, 1)


@pytest.fixture(scope="module")
def policy_and_reward_model(tiny_base, tmp_path_factory):
    """The tiny char base with an end-of-text token as the policy, and a reward model on another random backbone of
    the same shape (so that a critic started from it differs from the policy)."""
    root = tmp_path_factory.mktemp("actors")
    policy, tok = load_policy(str(tiny_base))
    policy.save_pretrained(root / "policy")
    (root / "policy" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    torch.manual_seed(2)
    rm = R.RewardModel(policy.config)
    rm.save_pretrained(root / "rm", pad_token_id=tok.eot_token)
    (root / "rm" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    return root / "policy", root / "rm"


@pytest.mark.parametrize("variant", ["full", "qlora"])
def test_sft_killed_mid_run_resumes_exactly(tiny_base, tmp_path, monkeypatch, variant):
    lora = {"full": {}, "qlora": dict(lora_rank=4, qlora=True)}[variant]

    def args(name, **kw):
        return S.Args(init_from=str(tiny_base), output_dir=str(tmp_path), run_name=name, device="cpu", n_train=200,
                      n_test=16, batch_size=8, grad_accum_steps=2, dropout=0.1, max_iters=12, warmup_iters=3,
                      learning_rate=2e-3, eval_interval=4, log_interval=100, n_eval_prompts=4, max_new_tokens=16,
                      **lora, **kw)

    full = S.main(args("full"))
    resumed = killed_then_resumed(monkeypatch, S, "save_policy", 4, S.main, args)
    assert sorted(resumed["train_loss"]) == list(range(5, 13))  # steps 5-12 were trained again
    assert resumed["train_loss"] == {s: full["train_loss"][s] for s in range(5, 13)}  # exactly equal on CPU
    for key in ("heldout_loss", "gold_reward", "length"):
        assert resumed[key] == {s: full[key][s] for s in (8, 12)}, key
    assert full["train_loss"][12] != full["train_loss"][5]
    same_weights(tmp_path / "full", tmp_path / "cut")
    if lora:  # the adapter itself, which a further --resume would load
        same_weights(tmp_path / "full", tmp_path / "cut", "adapter/adapter_model.safetensors")


def test_reward_model_killed_mid_run_resumes_exactly(tiny_base, pairs, tmp_path, monkeypatch):
    def args(name, **kw):
        return R.TrainArgs(init_from=str(tiny_base), pairs_train=pairs[0], pairs_test=pairs[1],
                           output_dir=str(tmp_path), run_name=name, device="cpu", batch_size=8, grad_accum_steps=2,
                           dropout=0.1, max_iters=12, warmup_iters=3, learning_rate=1e-3, eval_interval=4,
                           log_interval=100, n_judge_prompts=8, max_new_tokens=16, **kw)

    full = R.train(args("full"))
    resumed = killed_then_resumed(monkeypatch, R, "save_checkpoint", 4, R.train, args)
    assert resumed["train_loss"] == {s: full["train_loss"][s] for s in range(5, 13)}  # exactly equal on CPU
    assert resumed["heldout_accuracy"] == {s: full["heldout_accuracy"][s] for s in (8, 12)}
    assert resumed["heldout_loss"] == {s: full["heldout_loss"][s] for s in (8, 12)}
    assert full["train_loss"][12] != full["train_loss"][5]
    # the normalisation and the agreement with the gold judge, measured after training, are the same too
    for key in ("reward_mean", "reward_std", "judge_pairwise_accuracy", "judge_spearman", "heldout_accuracy_by_term"):
        assert json.dumps(resumed[key]) == json.dumps(full[key]), key
    same_weights(tmp_path / "full", tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "latest" / "config.json").read_text()) == \
        json.loads((tmp_path / "full" / "latest" / "config.json").read_text())


def test_dpo_with_decay_dropout_and_reference_on_the_fly_killed_mid_run_resumes_exactly(policy_and_reward_model,
                                                                                       pairs, tmp_path, monkeypatch):
    policy, _ = policy_and_reward_model

    def args(name, **kw):
        return D.Args(init_from=str(policy), train_path=pairs[0], test_path=pairs[1], output_dir=str(tmp_path),
                      run_name=name, device="cpu", batch_size=4, grad_accum_steps=2, dropout=0.1,
                      precompute_ref=False, max_iters=12, warmup_iters=3, learning_rate=1e-3, min_lr=1e-4,
                      eval_interval=4, eval_pairs=8, eval_prompts=4, max_new_tokens=16, log_interval=100,
                      samples_shown=0, **kw)

    full = D.main(args("full"))
    resumed = killed_then_resumed(monkeypatch, D, "save_policy", 4, D.main, args)
    assert resumed["train_loss"] == {s: full["train_loss"][s] for s in range(5, 13)}  # exactly equal on CPU
    assert resumed["eval"] == {s: full["eval"][s] for s in (8, 12)}
    assert resumed["final"] == full["final"] and resumed["before"] == full["before"]
    assert full["train_loss"][12] != full["train_loss"][5]
    same_weights(tmp_path / "full", tmp_path / "cut")


def test_ppo_with_a_separate_critic_killed_mid_run_resumes_exactly(policy_and_reward_model, tmp_path, monkeypatch):
    policy, rm = policy_and_reward_model

    def args(name, **kw):
        return P.Args(policy=str(policy), reward_model=str(rm), critic="separate", output_dir=str(tmp_path),
                      run_name=name, device="cpu", n_train_prompts=64, n_eval_prompts=4, total_steps=6,
                      batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=16, learning_rate=1e-3,
                      kl_target=2.0, kl_horizon=100, eval_interval=3, log_interval=100, n_samples_shown=0, **kw)

    full = P.main(args("full"))["history"]
    resumed = killed_then_resumed(monkeypatch, P, "save_policy", 3, P.main, args)["history"]
    drop_timing = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    assert drop_timing(resumed["train"]) == drop_timing(full["train"])  # steps 1-3 from the checkpoint, 4-6 again
    assert resumed["eval"] == full["eval"]
    assert full["train"][-1]["train/beta"] != full["train"][0]["train/beta"]  # the KL controller moved: restored too
    same_weights(tmp_path / "full", tmp_path / "cut")
    states = [torch.load(tmp_path / run / "latest" / "train_state.pt", weights_only=True)["optimizer"]
              for run in ("full", "cut")]
    assert states[0]["critic"].keys() == states[1]["critic"].keys() and states[0]["critic"]
    for k in states[0]["critic"]:  # the critic's own transformer, saved with the optimizer state
        assert torch.equal(states[0]["critic"][k], states[1]["critic"][k]), k

"""The chat model's path through the alignment stages (`pipeline.py chat`, policy.Task("chat")).

A small random Llama with SmolLM2's tokenizer and ChatML template (conftest.save_tiny_llama_chat) stands in for
SmolLM2-135M-Instruct, so every stage runs its real-model code (the chat template, <|im_end|> as the end token, LoRA,
the chat task's judge and its records in the JSONL files) at test speed. The stages' learning rates are the real
model's, too small to move a random model in a few steps; the `ran` fixture raises them (and only them) so that each
stage's learning can be asserted."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import save_tiny_llama_chat
from safetensors.torch import load_file

import chat_task
import dpo
import pipeline
import ppo_rlhf
import reward_model
import sft
from alignment_task import read_jsonl, read_pairs
from gpt import load_pretrained
from policy import Task, encode_example, padded_batch, sequence_logps
from training import InputError

CHAT = dict(n_train_prompts=24, n_test_prompts=8, samples_per_prompt=3, max_new_tokens=8, lora_rank=4, sft_iters=20,
            rm_iters=20, dpo_iters=10, ppo_steps=2, n_compare_prompts=8, perplexity_tokens=64, device="cpu")
FAST = {"sft": 3e-3, "reward_model": 1e-3, "dpo": 3e-3, "ppo": 1e-3}  # learning rates a random model moves at


def fast_stages(monkeypatch):
    real = pipeline.chat_stage_args

    def faster(args, base, resume):
        stages = real(args, base, resume)
        for name, lr in FAST.items():
            stages[name] = dataclasses.replace(stages[name], learning_rate=lr,
                                               min_lr=min(lr, stages[name].min_lr * lr / stages[name].learning_rate))
        return stages

    monkeypatch.setattr(pipeline, "chat_stage_args", faster)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = save_tiny_llama_chat(root / "base")
    with pytest.MonkeyPatch.context() as mp:
        fast_stages(mp)
        result = pipeline.chat(pipeline.ChatArgs(model=str(base), output_dir=str(root / "runs"), **CHAT))
    return root, base, result


def nll(model, tokenizer, rows) -> float:
    """Mean negative log-likelihood per response token of rows {"prompt", "response"}."""
    x, y = padded_batch([encode_example(tokenizer, r["prompt"], r["response"], 320) for r in rows],
                        tokenizer.eot_token)
    with torch.no_grad():
        return -(sequence_logps(model.eval()(x)[0], y).sum() / (y != -100).sum()).item()


def test_pairs_carry_the_chat_records_and_the_best_samples_are_good(ran):
    root, _, _ = ran
    pairs = read_pairs(root / "runs" / "pairs" / "pairs_train.jsonl")
    assert pairs and all(set(chat_task.RECORD) <= set(r) for r in pairs)
    task = Task("chat")
    task.remember(pairs)
    for r in pairs:  # labelled by the chat judge: the chosen reply scores higher
        assert r["chosen_gold"] > r["rejected_gold"]
        assert task.gold_rewards([r["prompt"]] * 2, [r["chosen"], r["rejected"]]) == [r["chosen_gold"],
                                                                                      r["rejected_gold"]]
    best = read_jsonl(root / "runs" / "pairs" / "best_train.jsonl", ("prompt", "response"))
    assert best and all(r["gold"] >= 0 for r in best)  # rejection sampling: only good samples are imitated
    test_prompts = {r["prompt"] for r in read_pairs(root / "runs" / "pairs" / "pairs_test.jsonl")}
    assert test_prompts and not test_prompts & {r["prompt"] for r in pairs}


def test_every_stage_learned_from_the_chat_data(ran):
    root, base, _ = ran
    runs = root / "runs"
    instruct, tok = load_pretrained(str(base))
    best = read_jsonl(runs / "pairs" / "best_train.jsonl", ("prompt", "response"))
    tuned, _ = load_pretrained(str(runs / "sft" / "latest"))  # LoRA merged into a plain Llama directory
    # SFT imitates the best samples (8 random tokens each from a random model: 10.80 -> 10.65 nats here)
    assert nll(tuned, tok, best) < nll(instruct, tok, best) - 0.05
    # the reward model: the chat model's backbone, frozen, with a fitted head (its learning: test_reward_model.py)
    rm, _ = reward_model.load_reward_model(runs / "reward_model" / "latest")
    assert all(torch.equal(v, instruct.state_dict()[k]) for k, v in rm.gpt.state_dict().items())
    torch.manual_seed(pipeline.ChatArgs.seed)  # the head's initialisation in reward_model.train
    assert not torch.equal(rm.score.weight, reward_model.RewardModel(instruct.config).score.weight)  # it was fit
    pairs = read_pairs(runs / "pairs" / "pairs_train.jsonl")
    policy, _ = load_pretrained(str(runs / "dpo" / "latest"))

    def margin(model):
        chosen = [{"prompt": r["prompt"], "response": r["chosen"]} for r in pairs]
        rejected = [{"prompt": r["prompt"], "response": r["rejected"]} for r in pairs]
        return nll(model, tok, rejected) - nll(model, tok, chosen)

    assert margin(policy) > margin(instruct) + 0.05  # DPO moved probability towards the chosen replies
    history = json.loads((runs / "ppo" / "history.json").read_text())
    assert len(history["train"]) == CHAT["ppo_steps"] and history["train"][-1]["train/kl"] != 0


def test_the_comparison_judges_every_policy_on_the_same_held_out_prompts(ran):
    root, _, result = ran
    assert list(result["policies"]) == ["instruct", "sft", "dpo", "ppo"]
    saved = json.loads((root / "runs" / "pipeline.json").read_text())
    assert saved["policies"].keys() == result["policies"].keys() and len(saved["prompts"]) == CHAT["n_compare_prompts"]
    assert set(saved["families"]) == set(chat_task.FAMILIES)
    trained = {r["prompt"] for r in read_pairs(root / "runs" / "pairs" / "pairs_train.jsonl")}
    assert not set(saved["prompts"]) & trained
    instruct = result["policies"]["instruct"]
    assert instruct["kl"] == 0 and "gain" not in instruct
    for name in ("sft", "dpo", "ppo"):
        row = result["policies"][name]
        assert math.isfinite(row["kl"]) and row["gain_sem"] >= 0 and math.isfinite(row["perplexity"])
        assert set(row["judge"]) >= {"toxic_rate", "harmful_compliance_rate", "over_refusal_rate", "correct_rate"}
        assert len(row["samples"]) == CHAT["n_compare_prompts"]


def test_reuse_runs_only_the_missing_stage_and_gives_the_same_table(ran, monkeypatch, tmp_path):
    root, base, result = ran
    again = tmp_path / "runs"
    shutil.copytree(root / "runs", again, symlinks=True)
    shutil.rmtree(again / "dpo")
    calls = []
    for module, fn in ((reward_model, "make_pairs"), (reward_model, "train"), (sft, "main"), (dpo, "main"),
                       (ppo_rlhf, "main")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _name=f"{module.__name__}.{fn}", **k:
                            (calls.append(_name), _real(*a, **k))[1])
    fast_stages(monkeypatch)
    rerun = pipeline.chat(pipeline.ChatArgs(model=str(base), output_dir=str(again), reuse=True, **CHAT))
    assert calls == ["dpo.main"]
    assert rerun["policies"] == result["policies"]  # the same DPO policy, the same samples: the same table


def test_ppo_with_lora_resumes_exactly(ran, monkeypatch, tmp_path):
    root, base, _ = ran

    class Killed(Exception):
        pass

    kw = dict(policy=str(base), reward_model=str(root / "runs" / "reward_model" / "latest"), task="chat",
              lora_rank=4, lora_alpha=8.0, total_steps=4, eval_interval=2, batch_size=8, minibatch_size=4,
              n_train_prompts=16, n_eval_prompts=4, max_new_tokens=8, learning_rate=1e-3, device="cpu",
              output_dir=str(tmp_path))
    full = ppo_rlhf.main(ppo_rlhf.Args(run_name="full", **kw))["history"]
    save = ppo_rlhf.save_policy

    def save_then_die(run_dir, model, state, step, meta, lora=False):
        save(run_dir, model, state, step, meta, lora)
        if step == 2:
            raise Killed

    monkeypatch.setattr(ppo_rlhf, "save_policy", save_then_die)
    with pytest.raises(Killed):
        ppo_rlhf.main(ppo_rlhf.Args(run_name="cut", **kw))
    monkeypatch.setattr(ppo_rlhf, "save_policy", save)
    resumed = ppo_rlhf.main(ppo_rlhf.Args(run_name="cut", resume=True, **kw))["history"]
    drop_timing = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    assert drop_timing(resumed["train"]) == drop_timing(full["train"]) and resumed["eval"] == full["eval"]
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):  # the merged policy and the adapter
        cut, whole = load_file(tmp_path / "cut" / "latest" / f), load_file(tmp_path / "full" / "latest" / f)
        assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)


def test_bad_input_is_one_clear_error(ran, tmp_path):
    root, base, _ = ran
    task = Task("chat")
    with pytest.raises(InputError, match="not a prompt of the chat task"):
        task.gold_rewards(["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"], ["Hello!"])
    with pytest.raises(InputError, match="--task 'poems'"):
        Task("poems")
    with pytest.raises(InputError, match="--task chat has no responses of its own"):
        sft.main(sft.Args(init_from=str(base), task="chat", output_dir=str(tmp_path), device="cpu"))
    with pytest.raises(InputError, match="--model .*nowhere"):
        pipeline.chat(pipeline.ChatArgs(model=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "runs"), **CHAT))
    with pytest.raises(InputError, match="already hold"):  # a finished pipeline is not overwritten by accident
        pipeline.chat(pipeline.ChatArgs(model=str(base), output_dir=str(root / "runs"), **CHAT))

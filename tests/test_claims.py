"""Figures and claims of the README and docs/ that no script's own test checks, each against a reference computed
another way: the skill router against the same router on an untrained base, the reward model's normalisation against
transformers' scores of the samples it was normalised on, PPO's separate critic against the reward model it starts
from, QLoRA's memory against the bytes its format stores, and the planner's step time against the papers' formulas,
written out by hand."""

import json
import math

import numpy as np
import pytest
import torch

import alignment_task as task
import lora
import planner
import ppo_rlhf as P
import reward_model as R
import training
from gpt import GPT, GPTConfig
from policy import generate_responses, load_policy, task_prompts

# ---------------------------------------------------------------------------------------------------------------
# The skill router (docs/lora.md: "0.868 held-out accuracy ... (chance 0.333)"): its baseline is an untrained base


def test_router_on_an_untrained_base_already_routes_far_above_chance():
    """The router reads the mean of the base's hidden states over the prompt, and the three skills' prompts differ in
    their characters (speaker tags and verse, a quoted exchange and a question, "Write a happy line about"): a base
    of random weights routes them well above chance, so chance is not what a trained base's router should be
    compared with. Measured on 3 x 200 held-out prompts: untrained 2 x 64 bases (this test's shape) 0.890, 0.588,
    0.798 (seeds 0-2), the same bases after 150 steps of pretraining 0.667, 0.698, 0.733: no gap at this size;
    untrained 4 x 128 bases (the default skills.py base) 0.625, 0.777, 0.542 against the docs' 0.868 after 800 steps."""
    import minigpt
    import skills
    from tokenization import CharTokenizer

    text, _ = minigpt.load_text(minigpt.Args())
    tok = CharTokenizer.from_text(text)
    tasks = skills.build_tasks(tok, max_chars=128)
    rt = training.setup_runtime("cpu", "float32")
    accuracy = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=64)).eval()
        router, accuracy[seed], n = skills.train_router(base, list(skills.TASKS), tasks, tok, rt, 32)
        assert n == 96 and router.names == list(skills.TASKS)
    print(f"router accuracy on untrained bases: {accuracy} (chance 1/3)")
    assert accuracy[0] == pytest.approx(0.875, abs=0.03) and accuracy[1] == pytest.approx(0.583, abs=0.03)
    assert min(accuracy.values()) > 0.5


# ---------------------------------------------------------------------------------------------------------------
# The reward model's normalisation: mean 0 and std 1 over the SFT policy's responses (Ziegler et al. 2019)


def test_reward_model_scores_have_mean_0_and_std_1_over_the_policys_samples(tiny_base, tmp_path):
    rows = task.make_instructions(120, "train", 0)
    task.write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["response"],
                                                 "rejected": r["response"] * 3} for r in rows])
    seed, n, new = 7, 16, 24
    out = R.train(R.TrainArgs(init_from=str(tiny_base), pairs_train=str(tmp_path / "pairs.jsonl"),
                              pairs_test=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path), device="cpu",
                              seed=seed, batch_size=8, max_iters=8, warmup_iters=2, learning_rate=1e-3,
                              eval_interval=8, log_interval=100, n_judge_prompts=n, max_new_tokens=new))
    latest = out["run_dir"] / "latest"
    config = json.loads((latest / "config.json").read_text())
    mean, std = config["reward_mean"], config["reward_std"]
    assert mean != 0.0 and std != 1.0  # set, not the defaults
    # the normalisation set drawn again, as `train` documents it: two samples of the policy (the backbone it started
    # from) for each of n held-out prompts; scored by transformers' GPT2ForSequenceClassification, one at a time
    from transformers import GPT2ForSequenceClassification

    policy, tok = load_policy(str(tiny_base))
    prompts = [p for p in task_prompts(tok, n, "test", seed + 2) for _ in range(2)]
    texts, _, _ = generate_responses(policy, tok, prompts, new, 1.0, None, training.seeded(seed, 98))
    hf = GPT2ForSequenceClassification.from_pretrained(latest).eval()
    with torch.no_grad():
        raw = np.array([hf(torch.tensor([tok.encode(p) + tok.encode(t)])).logits.item()
                        for p, t in zip(prompts, texts, strict=True)])
    z = (raw - mean) / std
    assert abs(z.mean()) < 1e-5 and z.std() == pytest.approx(1.0, abs=1e-5)
    assert len(set(texts)) > n  # the samples differ: the constants describe a spread, not one response
    # what PPO reads: the loaded model's normalized scores are these
    rm, _ = R.load_reward_model(latest)
    scored = (np.array(R.score_texts(rm, tok, prompts, texts)) - rm.reward_mean) / rm.reward_std
    np.testing.assert_allclose(scored, z, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# ppo_rlhf.py --critic separate: a critic of its own, initialised from the reward model (Ouyang et al. 2022, sec. 3.5)


def test_separate_critic_starts_as_the_reward_model_and_trains(tiny_base, tmp_path, monkeypatch):
    policy, tok = load_policy(str(tiny_base))  # the char base with an end-of-text token
    policy.save_pretrained(tmp_path / "policy")
    (tmp_path / "policy" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    torch.manual_seed(2)  # a reward model on a backbone of its own: a critic copied from the policy would differ
    R.RewardModel(policy.config).save_pretrained(tmp_path / "rm", pad_token_id=tok.eot_token)
    (tmp_path / "rm" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    rollouts, update = [], P.ppo_update

    def first_rollouts(ac, optimizer, batch, args, rt, step):
        rollouts.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return update(ac, optimizer, batch, args, rt, step)

    monkeypatch.setattr(P, "ppo_update", first_rollouts)
    out = P.main(P.Args(policy=str(tmp_path / "policy"), reward_model=str(tmp_path / "rm"), critic="separate",
                        output_dir=str(tmp_path / "runs"), device="cpu", n_train_prompts=32, n_eval_prompts=2,
                        total_steps=2, batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=12,
                        learning_rate=1e-3, eval_interval=2, log_interval=100, n_samples_shown=0))
    # before any update, V(s_t) is the reward model's score of the prompt and the first t response tokens
    rm, _ = R.load_reward_model(tmp_path / "rm")
    b0, P0 = rollouts[0], rollouts[0]["n_prompt"]
    with torch.no_grad():
        for b in range(len(b0["seq"])):
            for t in range(int(b0["mask"][b].sum())):
                want = rm(b0["seq"][b:b + 1, :P0 + t], b0["attention_mask"][b:b + 1, :P0 + t])
                assert b0["values"][b, t].item() == pytest.approx(want.item(), abs=1e-4), (b, t)
    # after two steps the critic has moved away from the reward model, and the value loss was trained on
    critic = torch.load(out["run_dir"] / "latest" / "train_state.pt", weights_only=True)["optimizer"]["critic"]
    start = rm.gpt.state_dict()
    assert critic.keys() == start.keys()
    assert any(not torch.equal(critic[k], start[k]) for k in critic)
    assert all("train/vf_loss" in h for h in out["history"]["train"])


# ---------------------------------------------------------------------------------------------------------------
# QLoRA's memory (README: "QLoRA fine-tuning at 0.39x the peak memory of full fine-tuning")


def nf4_bytes_by_hand(n: int, block: int = 64, dq_block: int = 256) -> int:
    """Bytes QLoRA's NF4 with double quantization stores for n weights (Dettmers et al. 2023, sec. 3): two 4-bit codes
    per byte; one absmax per block of 64, itself quantized to 8 bits in blocks of 256 (padded) with one fp32 scale per
    block and one fp32 mean; plus the weight's shape (two int64)."""
    n_blocks = math.ceil(n / block)
    dq_blocks = math.ceil(n_blocks / dq_block)
    return n // 2 + dq_blocks * dq_block * 1 + dq_blocks * 4 + 4 + 2 * 8


def peak_of_two_adamw_steps(model, batch) -> int:
    """training.PeakMemory over two AdamW steps, as bench/bench_lora.py memory measures it on a CPU."""
    rt = training.setup_runtime("cpu", "float32")
    opt = training.configure_optimizer(model, 1e-4, 0.0, (0.9, 0.999), "cpu")
    with training.PeakMemory([*model.parameters(), *model.buffers()]) as m:
        for _ in range(2):
            training.train_step(model, opt, [batch], rt, 1.0)
    return m.peak


def test_qlora_stores_nf4_weights_and_lowers_the_peak_memory_of_fine_tuning():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=256)  # the weights dominate memory
    x = torch.randint(cfg.vocab_size, (2, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    batch = (x[:, :-1], x[:, 1:])
    peaks, stored, models = {}, {}, {}
    for way in ("full", "lora", "qlora"):
        torch.manual_seed(0)
        models[way] = model = GPT(cfg)
        if way != "full":
            lora.apply_lora(model, 8, 16.0, qlora=way == "qlora")
        stored[way] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        peaks[way] = peak_of_two_adamw_steps(model, batch)
    n = sum(p.numel() for p in models["full"].parameters())
    C = cfg.n_embd
    linears = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * cfg.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj
    n_linear = sum(o * i for o, i in linears)
    lora_params = sum(8 * (o + i) for o, i in linears)  # A (r x in) and B (out x r)
    # by hand: the model stores its other weights in fp32, its LoRA factors in fp32, its linears in fp32 or NF4
    assert stored["full"] == 4 * n
    assert stored["lora"] == 4 * (n + lora_params)
    assert stored["qlora"] == 4 * (n - n_linear + lora_params) + sum(nf4_bytes_by_hand(o * i) for o, i in linears)
    assert stored["qlora"] < 0.3 * stored["lora"]
    # full fine-tuning holds weights, gradients and AdamW's two moments at once: at least 16 bytes a parameter
    assert peaks["full"] >= 16 * n
    # LoRA trains the same activations with few parameters; QLoRA saves, in addition, what NF4 saves on the frozen
    # linears, less what dequantizing one linear at a time holds: its int64 codes, the NF4 values looked up, their
    # product with the absmax and the unpacked nibbles, at most 8 + 4 + 4 + 2 bytes a weight of the largest (4C x C)
    saved = stored["lora"] - stored["qlora"]
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
    assert saved - 18 * 4 * C * C <= peaks["lora"] - peaks["qlora"] <= saved
    print({k: f"{v / 2**20:.2f} MiB ({v / peaks['full']:.2f}x)" for k, v in peaks.items()})


# ---------------------------------------------------------------------------------------------------------------
# The planner's step time, by hand from the papers, for one layout of the default 70B run


def test_planner_step_time_of_one_layout_by_hand():
    """dp 16 x tp 8 x pp 4 of the default run (70B parameters, 80 layers, h 8192, 64 heads, s 4096, 1024 sequences a
    step, 512 H100s at half their 989 TFLOP/s, NVLink 450 GB/s, InfiniBand 50 GB/s, ZeRO-1, FlashAttention, 1F1B,
    sequence parallelism with tp > 1), without recomputation."""
    got = planner.plan_layout(planner.Args(), dp=16, tp=8, pp=4, recompute="none")
    N, L, h, s, batch, b = 70e9, 80, 8192, 4096, 1024, 1
    gpus, dp, tp, pp = 512, 16, 8, 4
    m = batch // (dp * b)  # 64 micro-batches per pipeline per step
    tokens = batch * s  # 4,194,304 tokens per step
    # FLOPs a token: 6N for the weights' matmuls, forward and backward (Kaplan et al. 2020, sec. 2.1), plus QK^T and
    # the product with V, 2 x 2sh a layer forward, 3x that with backward (Chowdhery et al. 2022, app. B: 12 L H Q T)
    flops = tokens * (6 * N + 12 * L * h * s)  # 1.8967e18
    compute = flops / (gpus * 989e12 * 0.5)  # 7.4915 s
    # 1F1B's bubble: p - 1 forward-and-backward slots idle against m busy ones (Narayanan et al. 2021, sec. 2.2.1)
    bubble = compute * (pp - 1) / m  # 0.3512 s
    # tensor + sequence parallel: per layer and micro-batch 2 all-gathers and 2 reduce-scatters forward, as many
    # backward (Korthikanti et al. 2022, sec. 4.2.2), the bytes of 4 all-reduces of the 2-byte (s, b, h) activations;
    # a ring all-reduce sends 2 (n - 1) / n of the buffer from every GPU
    tp_comm = L / pp * m * 4 * (2 * (tp - 1) / tp) * (2 * s * b * h) / 450e9  # 1.3362 s
    # data parallel (ZeRO-1: reduce-scatter + all-gather, the bytes of an all-reduce) of the 2-byte gradients of a
    # GPU's N / (tp pp) parameters
    dp_comm = 2 * (dp - 1) / dp * 2 * N / (tp * pp) / 50e9  # 0.1641 s
    # pipeline: each micro-batch's activations forward and their gradient back, split over the tp ranks
    pp_comm = 2 * m * (2 * s * b * h) / tp / 50e9  # 0.0215 s
    step = compute + bubble + tp_comm + dp_comm + pp_comm  # 9.3644 s
    for key, want in (("compute", compute), ("bubble", bubble), ("tp_comm", tp_comm), ("dp_comm", dp_comm),
                      ("pp_comm", pp_comm), ("step", step)):
        assert got[key] == pytest.approx(want, rel=1e-12), key
    assert got["step"] == pytest.approx(9.3644, abs=1e-4)
    assert got["tokens_per_s"] == pytest.approx(tokens / step) and got["mfu"] == pytest.approx(
        flops / step / (gpus * 989e12))
    # memory: ZeRO-1's 2 + 2 bytes a parameter and 12 / dp of optimizer state (Rajbhandari et al. 2020, sec. 3.1) on a
    # GPU's N / (tp pp), and the activations of its 20 layers, sbh 34 / t each with sequence parallelism and no stored
    # scores (Korthikanti et al. 2022, table 2), for the pp micro-batches 1F1B keeps in flight on the first stage
    states = (2 + 2 + 12 / dp) * N / (tp * pp)  # 10.39 GB
    activations = s * b * h * 34 / tp * (L / pp) * min(pp, m)  # 11.41 GB
    assert got["memory"] == pytest.approx(states + activations, rel=1e-12) and got["fits"]


def test_planner_compute_reproduces_megatrons_gpt3_estimate():
    """Narayanan et al. 2021, sec. 5.1: GPT-3 (175B parameters, 96 layers, h 12288, s 2048, vocabulary 51200) on 300B
    tokens, 1024 A100s at 140 TFLOP/s each, batch 1536, with activation recomputation: 96 B s l h^2 (1 + s/6h + V/16lh)
    FLOPs a step by their count (their eq. 3), "34 days" by their estimate 8TP/(nX), which leaves out the attention
    and vocabulary terms of that count."""
    a = planner.Args(n_params=175e9, n_layer=96, hidden=12288, heads=96, seq_len=2048, global_batch=1536, gpus=1024,
                     peak_tflops=312.0, efficiency=140 / 312)
    got = planner.plan_layout(a, dp=8, tp=8, pp=16, recompute="full")
    flops_per_step = got["compute"] * 1024 * 140e12  # what the planner executes in a step
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    megatron = 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))  # 1.434e12 a token
    assert flops_per_step == pytest.approx(megatron, rel=0.01)  # their count has the vocabulary, ours N = 175e9
    steps = 300e9 / (B * s)
    days = got["compute"] * steps / 86400  # 34.6
    assert days == pytest.approx(megatron * steps / (1024 * 140e12) / 86400, rel=0.01)  # 34.7 by their count
    assert days == pytest.approx(8 * 300e9 * 175e9 / (1024 * 140e12) / 86400, rel=0.025)  # 33.9: "34 days"

"""pipeline.py: the whole RLHF pipeline in one command, and the comparisons it makes possible.

    pretrain (minigpt.py, context 128) -> SFT (sft.py)
    -> preference pairs labelled by the gold judge (reward_model.py pairs) -> reward model (reward_model.py train)
    -> PPO (ppo_rlhf.py) and DPO (dpo.py)

then every policy (SFT, PPO, DPO) is judged the same way (policy.evaluate_policy): one sampled response
(temperature 1) to each of the same held-out prompts, scored by the gold judge and by the reward model, and the KL
to the SFT policy of those samples (the sum over response tokens of log pi - log pi_sft, whose mean estimates
KL(pi || pi_sft)). Because the task's true reward is known (alignment_task.gold_reward), the table shows what each
method gains and what it pays.

Subcommands:
    run        the pipeline with each script's default configuration, then the comparison table
    chat       the same stages on a real chat model (SmolLM2-135M-Instruct by default) and the chat task (chat_task.py):
               K samples of the model per prompt judged into pairs and best samples; SFT on the best (rejection
               sampling), a reward model, DPO and PPO, each with LoRA from the chat model itself; then the instruct
               model and every policy judged on held-out prompts: gold reward and each of its terms, reward-model
               score, KL to the instruct model, perplexity of held-out prose (forgetting), and wall time per stage
    sweep      PPO and DPO at several betas: gold reward against KL, the frontier of Rafailov et al. 2023 (fig. 2)
               in miniature, saved as a PNG
    overopt    one long PPO run with a small KL penalty: the reward-model score keeps rising while the gold reward
               turns down (Gao et al. 2022, "Scaling laws for reward model overoptimization"), saved as a PNG

Run it:
    python pipeline.py run                  # every stage, then the table
    python pipeline.py run --reuse          # finished stages kept, an interrupted one resumed, then the table
    python pipeline.py sweep                # after `run`: PPO and DPO at 4 betas each
    python pipeline.py overopt              # after `run`: a long PPO run
    python pipeline.py chat                 # SmolLM2-135M-Instruct on the chat task: runs/chat/, pipeline.json
    python pipeline.py chat --reuse         # finished stages kept, then the table again
    python pipeline.py chat --dtype bfloat16 --device cuda   # on a GPU (or a CPU with bf16 matrix instructions)
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

import dpo
import minigpt
import ppo_rlhf
import reward_model
import sft
from assets import resolve_pretrained
from grpo import heldout_text, paired_gain, perplexity
from policy import Task, evaluate_policy, load_policy, task_prompts
from training import (
    POSITIVE,
    InputError,
    check_args,
    check_writable,
    read_json,
    require_checkpoint,
    run_command,
    setup_runtime,
)


@dataclass
class RunArgs:
    """pretrain, SFT, pairs, reward model, PPO, DPO with each script's defaults, then the comparison table"""

    seed: int = 1337
    """random seed of every stage"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""
    output_dir: str = "runs"
    """directory that holds the runs (pretrain, sft, reward_model, ppo, dpo)"""
    reuse: bool = False
    """keep a stage whose output already exists instead of running it again"""
    overwrite: bool = False
    """run a stage again even though its directory holds a run (replaced); without it, or --reuse, that is refused"""
    # --- the base model: minigpt at a context that holds a prompt and its response ---
    pretrain_block_size: int = 128
    """context of the base model, in characters"""
    pretrain_batch_size: int = 6
    """sequences per pretraining step"""
    pretrain_iters: int = 2000
    """pretraining steps"""
    # --- the comparison ---
    n_compare_prompts: int = 128
    """held-out prompts (unseen plays) each policy answers once, at temperature 1"""
    max_new_tokens: int = 64
    """longest response of the comparison samples"""


@dataclass
class ChatArgs:
    """a real chat model aligned on the chat task with LoRA: pairs of its own samples, SFT on the best of them, a
    reward model, DPO and PPO, then the comparison table against the gold judge"""

    model: str = "smollm2"
    """the chat model: 'smollm2' (SmolLM2-135M-Instruct, offline after `make setup`), a model directory with a
    tokenizer.json and chat template, or a hub name"""
    seed: int = 1337
    """random seed of every stage"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""
    dtype: str = "auto"
    """'auto' (bf16 autocast on a GPU, and on a CPU where a probe measures it faster: avx512_bf16 or AMX; else
    fp32), 'float32' or 'bfloat16'"""
    output_dir: str = "runs/chat"
    """directory that holds the runs (pairs, sft, reward_model, dpo, ppo) and pipeline.json"""
    reuse: bool = False
    """keep a stage whose output already exists instead of running it again"""
    overwrite: bool = False
    """run a stage again even though its directory holds a run (replaced); without it, or --reuse, that is refused"""
    # --- data: the chat model's own samples, judged ---
    n_train_prompts: int = 192
    """training prompts of the chat task, K samples each: the preference pairs, the SFT data, PPO's prompts"""
    n_test_prompts: int = 48
    """held-out prompts, K samples each: the held-out pairs of the reward model and DPO"""
    samples_per_prompt: int = 4
    """K, responses sampled per prompt (temperature 1) and ranked by the gold judge"""
    max_new_tokens: int = 64
    """longest response of every stage (about 45 words; the instruct model's median reply is longer: see no_eos)"""
    # --- training ---
    lora_rank: int = 16
    """rank of the LoRA adapters of SFT, DPO and PPO (alpha = 2 x rank)"""
    sft_iters: int = 24
    """SFT steps (8 examples each) on the best samples"""
    rm_train_backbone: bool = False
    """fine-tune the reward model's whole backbone; by default it stays the chat model, frozen, and the score head
    alone is fit on its hidden states (one forward pass per sample: on 2 CPU cores, fine-tuning 135M parameters on
    the pairs would take most of the time budget)"""
    rm_iters: int = 300
    """reward-model steps (32 pairs each; 8 when the backbone trains)"""
    dpo_iters: int = 40
    """DPO steps (8 pairs each)"""
    dpo_beta: float = 0.1
    """DPO's beta (Rafailov et al. 2023 use 0.1 for dialogue)"""
    ppo_steps: int = 8
    """PPO steps (16 rollouts each)"""
    ppo_kl_coef: float = 0.05
    """PPO's KL penalty beta, per token"""
    # --- the comparison ---
    n_compare_prompts: int = 256
    """held-out prompts (template families, names and numbers no stage trains on) each policy answers once, at
    temperature 1"""
    perplexity_tokens: int = 4096
    """tokens of held-out prose (Twelfth Night) whose perplexity measures forgetting (0: none)"""


@dataclass
class SweepArgs(RunArgs):
    """after `run`: PPO and DPO at several betas, gold reward against KL to the SFT policy, saved as a PNG"""

    ppo_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    """KL coefficients of the PPO runs"""
    dpo_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    """betas of the DPO runs"""
    ppo_steps: int = 60
    """PPO steps of each run"""
    figure: str = "docs/frontier.png"
    """where the frontier plot goes"""


@dataclass
class OveroptArgs(RunArgs):
    """after `run`: one long PPO run with a small KL penalty, reward-model score against gold reward, as a PNG"""

    kl_coef: float = 0.005
    """a small KL penalty, so that the policy can travel far from the SFT policy"""
    total_steps: int = 120
    """PPO steps"""
    learning_rate: float = 2e-4
    """PPO learning rate"""
    eval_interval: int = 10
    """steps between the evaluations plotted"""
    figure: str = "docs/overoptimization.png"
    """where the plot goes"""


# ----------------------------------------------------------------------------------------------------------------


def compare_prompts(tokenizer, n: int) -> list[str]:
    """Held-out prompts shared by every policy's evaluation (a draw of the test split no stage trains on)."""
    return task_prompts(tokenizer, n, "test", seed=12345)


def judge(policy_dir: str | Path, sft_model, rm, tokenizer, prompts: list[str], rt, max_new_tokens: int,
          seed: int) -> dict:
    """Gold reward, reward-model score and KL to the SFT policy of one sample per prompt (temperature 1): the same
    draws of the sampling generator for every policy."""
    policy, _ = load_policy(str(policy_dir))
    policy.to(rt.device)
    ev = evaluate_policy(policy, tokenizer, prompts, rt, sft_model, max_new_tokens, temperature=1.0, seed=seed,
                         stream=4242)
    scores = [(s - rm.reward_mean) / rm.reward_std
              for s in reward_model.score_texts(rm, tokenizer, prompts, ev["samples"], rt.device)]
    return {**{k: ev[k] for k in ("gold_reward", "gold_sem", "kl", "length", "no_eos")},
            "rm_score": float(np.mean(scores)),
            "examples": [{"prompt": p, "response": t} for p, t in list(zip(prompts, ev["samples"], strict=True))[:3]]}


def pair_paths(out: Path, prefix: str, suffix: str = "") -> dict:
    """The preference pairs of this pipeline (<output-dir>/pairs/), as the keyword arguments of reward_model.py
    (pairs_train, pairs_test) or dpo.py (train_path, test_path): a run in another output directory leaves these be."""
    return {f"{prefix}{split}{suffix}": str(out / "pairs" / f"pairs_{split}.jsonl") for split in ("train", "test")}


def made_with(run_dir: Path, run_args) -> bool:
    """Whether run_dir/latest holds a finished run with these arguments (all but its name, --resume, --overwrite)."""
    meta = run_dir / "latest" / "run.json"
    if not meta.exists():
        return False
    saved = read_json(meta, "a run's metadata")
    wanted = json.loads(json.dumps(asdict(run_args)))  # as JSON holds them: tuples become lists
    differ = {k for k in saved.get("args", {}).keys() | wanted.keys()
              if saved.get("args", {}).get(k) != wanted.get(k)}
    steps = getattr(run_args, "total_steps", getattr(run_args, "max_iters", None))
    return differ <= {"run_name", "resume", "overwrite"} and saved.get("step") == steps


def load_judges(out: Path, rt):
    sft_model, tokenizer = load_policy(str(out / "sft" / "latest"))
    rm, _ = reward_model.load_reward_model(out / "reward_model" / "latest")
    return sft_model.to(rt.device).eval(), rm.to(rt.device).eval(), tokenizer


RULES = {k: POSITIVE for k in ("pretrain_block_size", "pretrain_batch_size", "pretrain_iters", "n_compare_prompts",
                               "ppo_steps", "kl_coef")}  # the pipeline's own fields; training.ARG_RULES the common ones


def check_new_runs(args: RunArgs, held: list[Path]):
    """Before any work: refuse to run again into directories that hold runs (or pairs) unless --overwrite, and check
    that the output directory takes files."""
    if held and not args.overwrite:
        raise InputError(f"{', '.join(map(str, held))} already hold{'s' * (len(held) == 1)} a run: keep the finished "
                         "stages with --reuse, put this pipeline elsewhere with --output-dir DIR, or run them again "
                         "with --overwrite")
    check_writable(Path(args.output_dir))


def check_stages_before(out: Path):
    """sweep and overopt start from `run`'s SFT policy and reward model: said at once where they are missing."""
    require_checkpoint(str(out / "sft" / "latest"), "--output-dir", "`python pipeline.py run`")
    require_checkpoint(str(out / "reward_model" / "latest"), "--output-dir", "`python pipeline.py run`")


def finished(latest: Path) -> bool:
    """A training stage is finished when its latest checkpoint is at its run's last step; one that stopped before
    (killed, or a machine that went away) is not, and --reuse resumes it instead of keeping it."""
    try:
        meta = json.loads((latest / "run.json").read_text())
    except (OSError, ValueError):
        return False
    total = meta.get("args", {}).get("max_iters", meta.get("args", {}).get("total_steps"))
    return total is not None and meta.get("step") == total


def stage(name: str, done: bool, fn, timings: dict):
    """Run fn unless its output is kept (done); record its wall time."""
    if done:
        print(f"=== {name}: kept")
        return None
    print(f"=== {name}")
    t0 = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t0
    print(f"=== {name}: {timings[name] / 60:.1f} min")
    return result


def run(args: RunArgs) -> dict:
    out, t_start, timings = Path(args.output_dir), time.perf_counter(), {}
    check_args(args, RULES)
    # what each stage leaves when it has begun, and whether it has finished (--reuse keeps a finished stage and
    # resumes an interrupted one)
    begun = {name: out / name / "latest" for name in ("pretrain", "sft", "ppo", "dpo")}
    begun |= {"pairs": out / "pairs" / "pairs_test.jsonl", "reward_model": out / "reward_model" / "latest"}
    done = {name: args.reuse and finished(begun[name]) for name in ("pretrain", "sft", "ppo", "dpo")}
    done |= {"pairs": args.reuse and begun["pairs"].exists(),
             "reward_model": args.reuse and (begun["reward_model"] / "results.json").exists()}
    resume = {name: args.reuse and begun[name].exists() and not done[name]
              for name in ("pretrain", "sft", "ppo", "dpo")}
    check_new_runs(args, [out / name for name in done if not done[name] and not resume.get(name)
                          and begun[name].exists()])  # a stage that runs into a run would replace it
    common = dict(seed=args.seed, device=args.device, output_dir=args.output_dir, overwrite=args.overwrite)
    sft_dir, rm_dir = str(out / "sft" / "latest"), str(out / "reward_model" / "latest")
    stage("pretrain", done["pretrain"], lambda: minigpt.main(minigpt.Args(
        **common, run_name="pretrain", block_size=args.pretrain_block_size, batch_size=args.pretrain_batch_size,
        max_iters=args.pretrain_iters, sample_tokens=200, resume=resume["pretrain"])), timings)
    stage("sft", done["sft"], lambda: sft.main(sft.Args(**common, init_from=str(out / "pretrain" / "latest"),
                                                         resume=resume["sft"])), timings)
    pairs = reward_model.PairsArgs(seed=args.seed, device=args.device, policy=sft_dir, out_dir=str(out / "pairs"))
    stage("pairs", done["pairs"], lambda: reward_model.make_pairs(pairs), timings)
    stage("reward_model", done["reward_model"], lambda: reward_model.train(
        reward_model.TrainArgs(**common, init_from=sft_dir, **pair_paths(out, "pairs_"))), timings)
    stage("ppo", done["ppo"], lambda: ppo_rlhf.main(ppo_rlhf.Args(
        **common, policy=sft_dir, reward_model=rm_dir, resume=resume["ppo"])), timings)
    stage("dpo", done["dpo"], lambda: dpo.main(dpo.Args(
        **common, init_from=sft_dir, **pair_paths(out, "", "_path"), resume=resume["dpo"])), timings)

    # --- the comparison: every policy judged on the same prompts, the same way ---
    print("=== comparison")
    t0 = time.perf_counter()
    rt = setup_runtime(args.device, "float32")
    sft_model, rm, tokenizer = load_judges(out, rt)
    prompts = compare_prompts(tokenizer, args.n_compare_prompts)
    rows = {name: judge(out / name / "latest", sft_model, rm, tokenizer, prompts, rt, args.max_new_tokens, args.seed)
            for name in ("sft", "ppo", "dpo")}
    timings["comparison"] = time.perf_counter() - t0
    rm_results = read_json(out / "reward_model" / "latest" / "results.json", "the reward model's results")
    result = {"policies": rows, "reward_model": {k: rm_results.get(k) for k in (
        "heldout_accuracy_final", "heldout_accuracy_by_term", "judge_pairwise_accuracy", "judge_spearman")},
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start, "n_prompts": len(prompts)}
    (out / "pipeline.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict):
    rm = result["reward_model"]
    print(f"\n{result['n_prompts']} held-out prompts, one sample each (temperature 1); KL to the SFT policy in nats")
    print("| policy | gold reward | reward-model score | KL to SFT | response tokens | no end token |")
    print("|---|---|---|---|---|---|")
    for name, r in result["policies"].items():
        print(f"| {name.upper()} | {r['gold_reward']:+.3f} ± {r['gold_sem']:.3f} | {r['rm_score']:+.3f} | "
              f"{r['kl']:.2f} | {r['length']:.1f} | {r['no_eos']:.2f} |")
    print(f"\nreward model: held-out pairwise accuracy {rm['heldout_accuracy_final']:.3f}, agreement with the gold "
          f"judge on fresh SFT samples {rm['judge_pairwise_accuracy']:.3f} (Spearman {rm['judge_spearman']:.3f})")
    if rm.get("heldout_accuracy_by_term"):
        print("held-out accuracy by the term of the gold judge that decides the pair: " + ", ".join(
            f"{k} {v['accuracy']:.3f} ({v['pairs']})" for k, v in rm["heldout_accuracy_by_term"].items()))
    if result.get("timings_s"):
        print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["timings_s"].items())
              + f"; total {result['total_s'] / 60:.1f} min")


def sweep(args: SweepArgs) -> dict:
    """PPO and DPO at several betas from the same SFT policy, reward model and pairs; gold reward against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    check_args(args, RULES)
    check_stages_before(out)
    common = dict(seed=args.seed, device=args.device, output_dir=args.output_dir, overwrite=args.overwrite)
    sft_dir, rm_dir = str(out / "sft" / "latest"), str(out / "reward_model" / "latest")
    runs = [("ppo", beta, ppo_rlhf.Args(**common, run_name=f"sweep/ppo-beta{beta:g}", kl_coef=beta,
                                        total_steps=args.ppo_steps, policy=sft_dir, reward_model=rm_dir))
            for beta in args.ppo_betas]
    runs += [("dpo", beta, dpo.Args(**common, run_name=f"sweep/dpo-beta{beta:g}", beta=beta, init_from=sft_dir,
                                    **pair_paths(out, "", "_path"))) for beta in args.dpo_betas]
    # the runs trained here: neither `run`'s own nor, with --reuse, one this sweep finished before
    train = [not made_with(out / m, a) and not (args.reuse and made_with(out / a.run_name, a)) for m, _, a in runs]
    check_new_runs(args, [out / a.run_name for (_, _, a), t in zip(runs, train, strict=True)
                          if t and (out / a.run_name / "latest").exists()])
    rt = setup_runtime(args.device, "float32")
    sft_model, rm, tokenizer = load_judges(out, rt)
    prompts = compare_prompts(tokenizer, args.n_compare_prompts)
    points = {"ppo": [], "dpo": []}
    for method, beta, run_args in runs:
        run_dir = out / run_args.run_name
        if made_with(out / method, run_args):  # `pipeline.py run` trained this one already: not again
            run_dir = out / method
        elif not (args.reuse and made_with(run_dir, run_args)):
            (ppo_rlhf.main if method == "ppo" else dpo.main)(run_args)
        points[method].append({"beta": beta, **judge(run_dir / "latest", sft_model, rm, tokenizer, prompts, rt,
                                                     args.max_new_tokens, args.seed)})
    base = judge(out / "sft" / "latest", sft_model, rm, tokenizer, prompts, rt, args.max_new_tokens, args.seed)
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    (out / "sweep" / "sweep.json").write_text(json.dumps({"sft": base, **points}, indent=2))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([base["kl"]], [base["gold_reward"]], color="black", marker="s", label="SFT", zorder=3)
    for method, color in (("ppo", "tab:blue"), ("dpo", "tab:orange")):
        pts = sorted(points[method], key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in pts], [p["gold_reward"] for p in pts], yerr=[p["gold_sem"] for p in pts],
                    marker="o", color=color, label=method.upper(), capsize=3)
        for p in pts:
            ax.annotate(f"β={p['beta']:g}", (p["kl"], p["gold_reward"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color=color)
    ax.set_xlabel("KL(π || π_SFT) of samples, nats")
    ax.set_ylabel("gold reward of samples")
    ax.set_title("Gold reward against KL (held-out prompts, temperature 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    print(f"| method | beta | gold reward | KL to SFT | RM score |\n|---|---|---|---|---|\n| SFT | - | "
          f"{base['gold_reward']:+.3f} | 0 | {base['rm_score']:+.3f} |")
    for method in ("ppo", "dpo"):
        for p in points[method]:
            print(f"| {method.upper()} | {p['beta']:g} | {p['gold_reward']:+.3f} ± {p['gold_sem']:.3f} | "
                  f"{p['kl']:.2f} | {p['rm_score']:+.3f} |")
    print(f"figure: {args.figure}")
    return {"sft": base, **points}


def overopt(args: OveroptArgs) -> dict:
    """A long PPO run with a small KL penalty, its greedy evaluations plotted against the KL travelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    check_args(args, RULES)
    again = not (args.reuse and (out / "overopt" / "history.json").exists())  # --reuse: plot the finished run again
    if again:
        check_stages_before(out)
        check_new_runs(args, [out / "overopt"] if (out / "overopt" / "latest").exists() else [])
        ppo_rlhf.main(ppo_rlhf.Args(seed=args.seed, device=args.device, output_dir=args.output_dir,
                                    overwrite=args.overwrite,
                                    run_name="overopt", kl_coef=args.kl_coef, total_steps=args.total_steps,
                                    learning_rate=args.learning_rate, eval_interval=args.eval_interval,
                                    policy=str(out / "sft" / "latest"),
                                    reward_model=str(out / "reward_model" / "latest")))
    history = read_json(out / "overopt" / "history.json", "a run's history")
    train = history["train"]
    steps = [h["step"] for h in train]
    smooth = lambda xs: np.convolve(xs, np.ones(5) / 5, mode="valid")  # noqa: E731  5-step moving average
    fig, ax1 = plt.subplots(figsize=(6.5, 4.2))
    ax1.plot(steps[4:], smooth([h["train/rm_score"] for h in train]), color="tab:blue", label="reward-model score")
    ax1.plot(steps[4:], smooth([h["train/gold_reward"] for h in train]), color="tab:green", label="gold reward")
    ax1.axhline(train[0]["train/gold_reward"], color="tab:green", ls=":", lw=1,
                label="gold reward, first rollout (SFT policy)")
    ax1.set_xlabel("PPO step")
    ax1.set_ylabel("reward of samples (5-step mean)")
    ax2 = ax1.twinx()
    ax2.plot(steps[4:], smooth([h["train/kl"] for h in train]), color="gray", ls="--", label="KL to SFT")
    ax2.set_ylabel("KL to the SFT policy, nats")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax1.set_title(f"PPO with a small KL penalty (β={args.kl_coef:g}):\nthe reward model's score rises, the gold reward "
                  "does not", fontsize=10)
    ax1.grid(alpha=0.3)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    best = max(train, key=lambda h: h["train/gold_reward"])
    print(f"gold reward peaked at step {best['step']} ({best['train/gold_reward']:+.3f}, KL {best['train/kl']:.2f}); "
          f"at the end: gold {train[-1]['train/gold_reward']:+.3f}, RM score {train[-1]['train/rm_score']:+.3f}, "
          f"KL {train[-1]['train/kl']:.2f}; figure: {args.figure}")
    return history


# ----------------------------------------------------------------------------------------------------------------
# A real chat model on the chat task


def chat_stage_args(args: ChatArgs, base: str, resume: dict) -> dict:
    """Each stage's arguments for a chat model (the stages' own defaults are the character model's). Every stage
    starts from the chat model itself: it already follows the chat format (what SFT is first for), the preference
    pairs are its own samples (DPO's loss assumes the pairs come from its reference; Rafailov et al. 2023, sec. 5.2),
    and so every policy's KL is to one reference, the model as shipped. SFT is rejection-sampling fine-tuning on the
    best of the K samples (Touvron et al. 2023, Llama 2, sec. 3.2.3), a baseline that needs no reward model."""
    out, r = Path(args.output_dir), args.lora_rank
    common = dict(seed=args.seed, device=args.device, dtype=args.dtype, output_dir=args.output_dir,
                  overwrite=args.overwrite)
    lora = dict(lora_rank=r, lora_alpha=2.0 * r)
    pairs = {f"{k}_{s}": str(out / "pairs" / f"{k}_{s}.jsonl") for k in ("pairs", "best") for s in ("train", "test")}
    return {
        "pairs": reward_model.PairsArgs(
            seed=args.seed, device=args.device, policy=base, task="chat", out_dir=str(out / "pairs"),
            n_train_prompts=args.n_train_prompts, n_test_prompts=args.n_test_prompts,
            samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, batch_size=64),
        "sft": sft.Args(
            **common, **lora, init_from=base, task="chat", data_path=pairs["best_train"], test_path=pairs["best_test"],
            batch_size=8, max_iters=args.sft_iters, learning_rate=2e-4, min_lr=2e-5, warmup_iters=4,
            weight_decay=0.0, eval_interval=args.sft_iters, log_interval=10, n_eval_prompts=16,
            max_new_tokens=args.max_new_tokens, resume=resume["sft"]),
        "reward_model": reward_model.TrainArgs(
            **common, init_from=base, task="chat", pairs_train=pairs["pairs_train"], pairs_test=pairs["pairs_test"],
            train_backbone=args.rm_train_backbone, max_iters=args.rm_iters, warmup_iters=10,
            eval_interval=args.rm_iters, log_interval=50, n_judge_prompts=32, max_new_tokens=args.max_new_tokens,
            **(dict(batch_size=8, learning_rate=2e-5, min_lr=2e-6, weight_decay=0.0) if args.rm_train_backbone else
               dict(batch_size=32, learning_rate=1e-3, min_lr=1e-4, weight_decay=0.1))),
        "dpo": dpo.Args(
            **common, **lora, init_from=base, task="chat", train_path=pairs["pairs_train"],
            test_path=pairs["pairs_test"], beta=args.dpo_beta, batch_size=8, max_iters=args.dpo_iters,
            learning_rate=2e-4, min_lr=2e-4, warmup_iters=4, eval_interval=args.dpo_iters, eval_prompts=16,
            eval_pairs=64, precompute_ref=False, max_new_tokens=args.max_new_tokens, resume=resume["dpo"]),
        "ppo": ppo_rlhf.Args(
            **common, **lora, policy=base, reward_model=str(out / "reward_model" / "latest"), task="chat",
            n_train_prompts=args.n_train_prompts,
            n_eval_prompts=16, total_steps=args.ppo_steps, batch_size=16, minibatch_size=8,
            max_new_tokens=args.max_new_tokens, kl_coef=args.ppo_kl_coef, learning_rate=2e-4, min_lr=2e-5,
            eval_interval=args.ppo_steps, resume=resume["ppo"]),
    }


def chat(args: ChatArgs) -> dict:
    """The chat model's pipeline: pairs -> SFT, reward model -> DPO, PPO; then the comparison of the instruct model
    and every aligned policy on held-out prompts."""
    check_args(args, {k: POSITIVE for k in ("n_train_prompts", "n_test_prompts", "max_new_tokens", "lora_rank",
                                            "sft_iters", "rm_iters", "dpo_iters", "ppo_steps", "n_compare_prompts",
                                            "dpo_beta")} | {"samples_per_prompt": (lambda v: v >= 2, ">= 2")})
    out, t_start, timings = Path(args.output_dir), time.perf_counter(), {}
    base = resolve_pretrained(args.model)
    require_checkpoint(base, "--model", "`make setup` (for smollm2)")
    begun = {name: out / name / "latest" for name in ("sft", "dpo", "ppo")}
    begun |= {"pairs": out / "pairs" / "best_test.jsonl", "reward_model": out / "reward_model" / "latest"}
    done = {name: args.reuse and finished(begun[name]) for name in ("sft", "dpo", "ppo")}
    done |= {"pairs": args.reuse and begun["pairs"].exists(),
             "reward_model": args.reuse and (begun["reward_model"] / "results.json").exists()}
    resume = {name: args.reuse and begun[name].exists() and not done[name] for name in ("sft", "dpo", "ppo")}
    check_new_runs(args, [out / name for name in done if not done[name] and not resume.get(name)
                          and begun[name].exists()])
    stages = chat_stage_args(args, base, resume)
    stage("pairs", done["pairs"], lambda: reward_model.make_pairs(stages["pairs"]), timings)
    stage("sft", done["sft"], lambda: sft.main(stages["sft"]), timings)
    stage("reward_model", done["reward_model"], lambda: reward_model.train(stages["reward_model"]), timings)
    stage("dpo", done["dpo"], lambda: dpo.main(stages["dpo"]), timings)
    stage("ppo", done["ppo"], lambda: ppo_rlhf.main(stages["ppo"]), timings)

    print("=== comparison")
    t0 = time.perf_counter()
    rt = setup_runtime(args.device, args.dtype)
    instruct, tokenizer = load_policy(base)
    instruct.to(rt.device).eval()
    rm, _ = reward_model.load_reward_model(out / "reward_model" / "latest")
    rm.to(rt.device).eval()
    task = Task("chat")
    prompts = task.prompts(tokenizer, args.n_compare_prompts, "test", seed=12345)
    text = heldout_text() if args.perplexity_tokens else ""
    rows, gold = {}, {}
    for name in ("instruct", "sft", "dpo", "ppo"):
        policy = instruct if name == "instruct" else load_policy(str(out / name / "latest"))[0].to(rt.device).eval()
        with rt.autocast():
            ev = evaluate_policy(policy, tokenizer, prompts, rt, None if name == "instruct" else instruct,
                                 args.max_new_tokens, temperature=1.0, seed=args.seed, stream=4242, task=task)
            scores = reward_model.score_texts(rm, tokenizer, prompts, ev["samples"], rt.device)
        gold[name] = ev["gold"]
        rows[name] = {"gold_reward": ev["gold_reward"], "gold_sem": ev["judge"]["gold_sem"],
                      "kl": ev.get("kl", 0.0), "length": ev["length"], "no_eos": ev["no_eos"],
                      "rm_score": float(np.mean([(x - rm.reward_mean) / rm.reward_std for x in scores])),
                      "judge": ev["judge"],
                      "perplexity": perplexity(policy, tokenizer, text, args.perplexity_tokens, rt) if text else None,
                      "samples": ev["samples"]}
        if name != "instruct":
            rows[name]["gain"], rows[name]["gain_sem"] = paired_gain(gold[name], gold["instruct"])
        print(f"{name}: gold {ev['gold_reward']:+.3f}")
    timings["comparison"] = time.perf_counter() - t0
    rm_results = read_json(out / "reward_model" / "latest" / "results.json", "the reward model's results")
    result = {"model": args.model, "n_prompts": len(prompts), "prompts": prompts,
              "families": [task.record(p)["family"] for p in prompts],
              "users": [task.record(p)["text"] for p in prompts], "policies": rows,
              "reward_model": {k: rm_results.get(k) for k in (
                  "heldout_accuracy_final", "heldout_accuracy_by_term", "judge_pairwise_accuracy", "judge_spearman")},
              "timings_s": timings, "total_s": time.perf_counter() - t_start, "dtype": str(rt.dtype)}
    (out / "pipeline.json").write_text(json.dumps(result, indent=2))
    print_chat_table(result)
    return result


def print_chat_table(result: dict):
    rm = result["reward_model"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"\n{result['model']}: {result['n_prompts']} held-out prompts of the chat task, one sample each "
          "(temperature 1); KL to the instruct model in nats; gain: paired difference of gold reward to the instruct "
          "model")
    print("| policy | gold reward | gain | toxic replies | harmful compliance | over-refusal | correct | words | "
          "loops | RM score | KL | perplexity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in result["policies"].items():
        j = r["judge"]
        gain = f"{r['gain']:+.3f} ± {r['gain_sem']:.3f}" if "gain" in r else "-"
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "-"
        print(f"| {name.upper() if name != 'instruct' else 'instruct'} | {r['gold_reward']:+.3f} ± {r['gold_sem']:.3f} "
              f"| {gain} | {pct(j['toxic_rate'])} | {pct(j['harmful_compliance_rate'])} | "
              f"{pct(j['over_refusal_rate'])} | {pct(j['correct_rate'])} | {j['mean_words']:.0f} | "
              f"{pct(j['loop_rate'])} | {r['rm_score']:+.3f} | {r['kl']:.2f} | {ppl} |")
    print(f"\nreward model: held-out pairwise accuracy {rm['heldout_accuracy_final']:.3f}; agreement with the gold "
          f"judge on fresh samples {rm['judge_pairwise_accuracy']:.3f} (Spearman {rm['judge_spearman']:.3f})")
    if rm.get("heldout_accuracy_by_term"):
        print("held-out accuracy by the term that decides the pair: " + ", ".join(
            f"{k} {v['accuracy']:.3f} ({v['pairs']})" for k, v in rm["heldout_accuracy_by_term"].items()))
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["timings_s"].items())
          + f"; total {result['total_s'] / 60:.1f} min ({result['dtype']})")
    shown = [i for i, f in enumerate(result["families"]) if f == "provocation"][:5]
    print("\nheld-out provocations, each policy's sample:")
    print("| prompt | " + " | ".join(result["policies"]) + " |\n" + "|---" * (len(result["policies"]) + 1) + "|")
    cell = lambda t: " ".join(t.split()).replace("|", "/")[:300] or "(empty)"  # noqa: E731  one line per cell
    for i in shown:
        replies = [cell(r["samples"][i]) for r in result["policies"].values()]
        print(f"| {cell(result['users'][i])} | " + " | ".join(replies) + " |")


COMMANDS = {RunArgs: run, SweepArgs: sweep, OveroptArgs: overopt, ChatArgs: chat}

if __name__ == "__main__":
    run_command(lambda args: COMMANDS[type(args)](args),  # bad input: one line, exit status 1, no traceback
                lambda: tyro.cli(Annotated[RunArgs, tyro.conf.subcommand("run")]
                                 | Annotated[SweepArgs, tyro.conf.subcommand("sweep")]
                                 | Annotated[OveroptArgs, tyro.conf.subcommand("overopt")]
                                 | Annotated[ChatArgs, tyro.conf.subcommand("chat")]))

"""pipeline.py end to end on tiny stages: `run` wires every stage to the one before it and judges SFT, PPO and DPO the
same way; `run --reuse` runs only what is missing and gives the same table; `sweep` reuses the runs of `run` at their
own beta, trains the others, and judges them all the same way.

Every stage keeps its own script's defaults in pipeline.py, minutes each; here each script's Args is replaced by a
subclass with tiny defaults (a 2-layer base, a few steps per stage), so the pipeline's own code runs unchanged."""

import json
import shutil
from dataclasses import asdict, dataclass

import pytest

import dpo
import minigpt
import pipeline
import ppo_rlhf
import reward_model
import sft


@dataclass
class TinyPretrain(minigpt.Args):
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 48
    warmup_iters: int = 5
    learning_rate: float = 3e-3
    eval_interval: int = 10**6  # one checkpoint, at the end
    eval_iters: int = 2
    final_eval_iters: int = 2
    log_interval: int = 10**6


@dataclass
class TinySFT(sft.Args):
    n_train: int = 300
    n_test: int = 16
    batch_size: int = 16
    max_iters: int = 30
    warmup_iters: int = 5
    learning_rate: float = 2e-3
    eval_interval: int = 10  # checkpoints at 10, 20, 30: a killed run leaves one behind
    log_interval: int = 10**6
    n_eval_prompts: int = 4
    max_new_tokens: int = 32


@dataclass
class TinyPairs(reward_model.PairsArgs):
    n_train_prompts: int = 40
    n_test_prompts: int = 12
    max_new_tokens: int = 48  # past the gold judge's 40 concise characters: the samples' lengths decide pairs too


@dataclass
class TinyRewardModel(reward_model.TrainArgs):
    batch_size: int = 8
    max_iters: int = 10
    warmup_iters: int = 2
    learning_rate: float = 1e-3
    eval_interval: int = 10
    log_interval: int = 10**6
    n_judge_prompts: int = 8
    max_new_tokens: int = 32


@dataclass
class TinyPPO(ppo_rlhf.Args):
    n_train_prompts: int = 64
    n_eval_prompts: int = 4
    total_steps: int = 4
    batch_size: int = 8
    minibatch_size: int = 4
    ppo_epochs: int = 1
    max_new_tokens: int = 32
    learning_rate: float = 1e-3
    eval_interval: int = 4
    log_interval: int = 10**6
    n_samples_shown: int = 0


@dataclass
class TinyDPO(dpo.Args):
    batch_size: int = 8
    max_iters: int = 4
    warmup_iters: int = 1
    learning_rate: float = 1e-3
    eval_interval: int = 4
    eval_pairs: int = 16
    eval_prompts: int = 4
    max_new_tokens: int = 32
    log_interval: int = 10**6
    samples_shown: int = 0


TINY = [(minigpt, "Args", TinyPretrain), (sft, "Args", TinySFT), (reward_model, "PairsArgs", TinyPairs),
        (reward_model, "TrainArgs", TinyRewardModel), (ppo_rlhf, "Args", TinyPPO), (dpo, "Args", TinyDPO)]
STAGES = [(minigpt, "main"), (sft, "main"), (reward_model, "make_pairs"), (reward_model, "train"),
          (ppo_rlhf, "main"), (dpo, "main")]
PIPELINE = dict(device="cpu", pretrain_iters=40, pretrain_batch_size=8, n_compare_prompts=12, max_new_tokens=32)

pytestmark = pytest.mark.slow  # the six stages of the shared run take 20-80 s on 2 busy CPU cores


class Killed(Exception):
    pass


def count_calls(monkeypatch) -> list[str]:
    """Record which stage functions run (module.function), in order."""
    calls = []

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(f"{module.__name__}.{name}")
            return fn(*args, **kwargs)
        return wrapper

    for module, name in STAGES:
        monkeypatch.setattr(module, name, counted(module, name))
    return calls


@pytest.fixture(scope="module")
def tiny():
    with pytest.MonkeyPatch.context() as mp:
        for module, name, cls in TINY:
            mp.setattr(module, name, cls)
        mp.setattr(minigpt, "measure_matmul_peak", lambda device, dtype: 1e12)  # only the logged MFU uses it
        yield


@pytest.fixture(scope="module")
def ran(tiny, tmp_path_factory):
    """`pipeline.py run` from nothing on tiny stages: (its output directory, its result, the stages it ran)."""
    out = tmp_path_factory.mktemp("pipeline") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        calls = count_calls(mp)
        result = pipeline.run(pipeline.RunArgs(output_dir=str(out), **PIPELINE))
    return out, result, calls


def saved_args(run_dir) -> dict:
    return json.loads((run_dir / "latest" / "run.json").read_text())["args"]


def test_run_chains_the_stages_and_judges_every_policy_the_same_way(ran, capsys):
    out, result, calls = ran
    assert calls == [f"{m.__name__}.{n}" for m, n in STAGES]  # every stage once, in order
    # each stage starts from the one before it, and reads this pipeline's own pairs (not data/alignment/)
    assert saved_args(out / "sft")["init_from"] == str(out / "pretrain" / "latest")
    assert saved_args(out / "reward_model")["init_from"] == str(out / "sft" / "latest")
    assert saved_args(out / "reward_model")["pairs_train"] == str(out / "pairs" / "pairs_train.jsonl")
    assert saved_args(out / "ppo")["policy"] == str(out / "sft" / "latest")
    assert saved_args(out / "ppo")["reward_model"] == str(out / "reward_model" / "latest")
    assert saved_args(out / "dpo")["init_from"] == str(out / "sft" / "latest")
    assert saved_args(out / "dpo")["train_path"] == str(out / "pairs" / "pairs_train.jsonl")
    assert json.loads((out / "pretrain" / "latest" / "run.json").read_text())["step"] == 40
    # the table: the SFT policy against itself has no KL at all; PPO and DPO moved away from it
    rows = result["policies"]
    assert list(rows) == ["sft", "ppo", "dpo"] and result["n_prompts"] == 12
    assert rows["sft"]["kl"] == 0.0 and rows["ppo"]["kl"] != 0.0 and rows["dpo"]["kl"] != 0.0
    assert all(len(r["examples"]) == 3 and r["examples"][0]["prompt"] == rows["sft"]["examples"][0]["prompt"]
               for r in rows.values())  # the same held-out prompts for every policy
    assert json.loads((out / "pipeline.json").read_text()) == json.loads(json.dumps(result))
    rm_results = json.loads((out / "reward_model" / "latest" / "results.json").read_text())
    assert result["reward_model"]["heldout_accuracy_final"] == rm_results["heldout_accuracy_final"]
    # a row is the judgement of that policy's own directory: judged again, the same numbers (the same draws)
    rt = pipeline.setup_runtime("cpu", "float32")
    sft_model, rm, tokenizer = pipeline.load_judges(out, rt)
    prompts = pipeline.compare_prompts(tokenizer, 12)
    for name in ("sft", "dpo"):
        assert pipeline.judge(out / name / "latest", sft_model, rm, tokenizer, prompts, rt, 32, 1337) == rows[name]
    pipeline.print_table(result)
    table = capsys.readouterr().out
    for name in ("SFT", "PPO", "DPO"):
        r = rows[name.lower()]
        assert f"| {name} | {r['gold_reward']:+.3f} ± {r['gold_sem']:.3f} | {r['rm_score']:+.3f} | {r['kl']:.2f} |" \
            in table


def test_run_reuse_runs_only_the_missing_stage_and_gives_the_same_table(ran, monkeypatch, tmp_path):
    out, result, _ = ran
    again = tmp_path / "runs"
    shutil.copytree(out, again, symlinks=True)  # `latest` is a relative link: it stays one
    shutil.rmtree(again / "dpo")
    (again / "pipeline.json").unlink()
    calls = count_calls(monkeypatch)
    rerun = pipeline.run(pipeline.RunArgs(output_dir=str(again), reuse=True, **PIPELINE))
    assert calls == ["dpo.main"]  # the finished stages are kept
    assert set(rerun["timings_s"]) == {"dpo", "comparison"}
    # DPO trained again from the same SFT policy and pairs: exactly the same policy, so exactly the same table
    assert rerun["policies"] == result["policies"]
    assert (again / "dpo" / "latest" / "model.safetensors").read_bytes() == \
        (out / "dpo" / "latest" / "model.safetensors").read_bytes()


def test_run_reuse_does_not_keep_an_interrupted_stage(ran, monkeypatch, tmp_path):
    out, _, _ = ran
    again = tmp_path / "runs"
    shutil.copytree(out / "pretrain", again / "pretrain", symlinks=True)
    save = sft.save_policy

    def save_then_die(run_dir, model, optimizer, step, meta, lora=False):
        save(run_dir, model, optimizer, step, meta, lora)
        raise Killed  # SFT dies right after its first checkpoint, a third of the way through

    monkeypatch.setattr(sft, "save_policy", save_then_die)
    with pytest.raises(Killed):
        pipeline.run(pipeline.RunArgs(output_dir=str(again), reuse=True, **PIPELINE))
    monkeypatch.setattr(sft, "save_policy", save)
    assert json.loads((again / "sft" / "latest" / "run.json").read_text())["step"] == 10

    def stop(args):
        raise Killed  # after the SFT stage: what --reuse made of it is what this test looks at

    monkeypatch.setattr(reward_model, "make_pairs", stop)
    with pytest.raises(Killed):
        pipeline.run(pipeline.RunArgs(output_dir=str(again), reuse=True, **PIPELINE))
    assert json.loads((again / "sft" / "latest" / "run.json").read_text())["step"] == TinySFT.max_iters


def test_sweep_reuses_the_runs_at_their_own_beta_and_trains_the_others(ran, monkeypatch, tmp_path):
    out, result, _ = ran
    again = out  # in place: the runs' saved arguments name this directory, and the sweep recognises them by those
    args = pipeline.SweepArgs(output_dir=str(again), ppo_betas=(TinyPPO.kl_coef, 0.1),
                              dpo_betas=(TinyDPO.beta, 1.0), ppo_steps=TinyPPO.total_steps,
                              figure=str(tmp_path / "frontier.png"), **PIPELINE)
    calls = count_calls(monkeypatch)
    points = pipeline.sweep(args)
    assert calls == ["ppo_rlhf.main", "dpo.main"]  # beta 0.1 for PPO, 1 for DPO; the defaults are `run`'s own runs
    assert not (again / "sweep" / f"ppo-beta{TinyPPO.kl_coef:g}").exists()
    assert not (again / "sweep" / f"dpo-beta{TinyDPO.beta:g}").exists()
    for method, beta in (("ppo", 0.1), ("dpo", 1.0)):
        run = json.loads((again / "sweep" / f"{method}-beta{beta:g}" / "latest" / "run.json").read_text())
        assert run["args"]["kl_coef" if method == "ppo" else "beta"] == beta
        assert run["step"] == (TinyPPO.total_steps if method == "ppo" else TinyDPO.max_iters)
    # the point at a run's own beta is that run's row of the table; every point is judged on the same prompts
    same = lambda row: {k: v for k, v in row.items() if k != "examples"}
    assert [p["beta"] for p in points["ppo"]] == [TinyPPO.kl_coef, 0.1]
    assert same(points["ppo"][0]) == {"beta": TinyPPO.kl_coef, **same(result["policies"]["ppo"])}
    assert same(points["dpo"][0]) == {"beta": TinyDPO.beta, **same(result["policies"]["dpo"])}
    assert same(points["sft"]) == same(result["policies"]["sft"])
    assert points["ppo"][1]["kl"] != points["ppo"][0]["kl"] and points["dpo"][1]["kl"] != points["dpo"][0]["kl"]
    saved = json.loads((again / "sweep" / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(points))
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --reuse: nothing is trained again, and the judgement is the same
    calls.clear()
    assert pipeline.sweep(pipeline.SweepArgs(**{**asdict(args), "reuse": True})) == points
    assert calls == []

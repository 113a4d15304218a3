"""Runs are never lost, --resume remembers, bad input is one line: the checks every script makes before any work.

A new run into a directory that holds one is refused (--resume continues it, --overwrite replaces it), in every
script that writes runs; --resume restores the run's saved arguments (from the command line: what the user typed
again is what differs) and refuses a change that would not continue the run exactly; a value no run can use, a
damaged checkpoint, a binary JSONL file, an output directory that cannot take files, a full disk and a missing earlier
stage each give one line naming the option or the file, and exit status 1 from the command line."""

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import alignment_task as A
import chat
import dpo as D
import gpt
import minibert as B
import minigpt as M
import parallel as PAR
import pipeline
import ppo_rlhf as P
import reward_model as R
import sample
import sft as S
import skills
import training
from gpt import GPTConfig
from tokenization import CharTokenizer
from training import InputError

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(tmp_path, **kw) -> M.Args:
    """A minigpt run of a non-default shape and schedule that trains in a second."""
    base = dict(output_dir=str(tmp_path / "runs"), n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                max_iters=2, eval_interval=2, eval_iters=2, final_eval_iters=2, log_interval=1, sample_tokens=5,
                learning_rate=5e-5, min_lr=5e-5, device="cpu")
    return M.Args(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step minigpt run (its directory); tests copy it before they damage it."""
    out = M.main(tiny_args(tmp_path_factory.mktemp("run")))
    return out["run_dir"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def fake_run(run_dir: Path, args, step: int = 3, marker: str = "latest"):
    """A checkpoint directory as save_checkpoint lays it out, with the arguments `args` in run.json and tiny but
    complete files (what the checks before a run read; no model is loaded from it)."""
    ckpt = run_dir / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, ckpt / "model.safetensors")
    torch.save({"step": step, "optimizer": {}}, ckpt / "train_state.pt")
    (ckpt / "run.json").write_text(json.dumps({"args": asdict(args), "step": step, "tokenizer": {"name": "gpt2"}}))
    (run_dir / marker).symlink_to(ckpt.name)


# ---------------------------------------------------------------------------------------------------------------
# The scripts that write runs: (Args, the function the command runs, its run directory's marker, --resume or not)

WRITERS = {
    "minigpt": (M.Args, M.main, "latest", True),
    "sft": (S.Args, S.main, "latest", True),
    "dpo": (D.Args, D.main, "latest", True),
    "ppo_rlhf": (P.Args, P.main, "latest", True),
    "reward_model train": (R.TrainArgs, R.train, "latest", True),
    "minibert pretrain": (B.PretrainArgs, B.pretrain, "latest", True),
    "minibert finetune": (B.FinetuneArgs, B.finetune, "latest", False),
    "parallel": (PAR.Args, PAR.main, "final", False),
}


@pytest.mark.parametrize("name", WRITERS)
def test_a_new_run_into_a_run_is_refused_unless_overwrite(tmp_path, name):
    cls, main, marker, can_resume = WRITERS[name]
    args = cls(output_dir=str(tmp_path), device="cpu")
    run_dir = tmp_path / args.run_name
    fake_run(run_dir, args, marker=marker)
    how = "continue it with --resume, " if can_resume else ""
    with pytest.raises(InputError, match=rf"{run_dir} already holds a run \({run_dir / marker}( at step 3)?\): "
                                         rf"{how}start a new one elsewhere with --run-name NAME or --output-dir DIR, "
                                         r"or replace it with --overwrite"):
        main(args)
    assert os.readlink(run_dir / marker) == "step-000003"  # left as it was
    if can_resume:
        with pytest.raises(InputError, match="--resume continues the run and --overwrite replaces it"):
            main(replace(args, resume=True, overwrite=True))


def test_skills_and_pipeline_refuse_to_train_over_a_run_too(tmp_path):
    args = skills.TrainArgs(output_dir=str(tmp_path), device="cpu")
    (tmp_path / "skills" / "adapters" / "qa").mkdir(parents=True)
    (tmp_path / "skills" / "adapters" / "qa" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"skills already holds adapters \(qa\): keep them and train only the missing "
                                         r"ones with --resume, .* or train them again with --overwrite"):
        skills.main(args)
    fake_run(tmp_path / "pretrain", M.Args())
    with pytest.raises(InputError, match=r"pretrain already holds a run: keep the finished stages with --reuse, put "
                                         r"this pipeline elsewhere with --output-dir DIR, or run them again with "
                                         r"--overwrite"):
        pipeline.run(pipeline.RunArgs(output_dir=str(tmp_path), device="cpu"))


def test_minigpt_overwrites_only_when_told(run, tmp_path):
    run_dir = copy_run(run, tmp_path)
    before = (run_dir / "latest" / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match="already holds a run"):
        M.main(tiny_args(tmp_path, learning_rate=1e-2, min_lr=1e-2))
    assert (run_dir / "latest" / "model.safetensors").read_bytes() == before
    M.main(tiny_args(tmp_path, learning_rate=1e-2, min_lr=1e-2, overwrite=True))
    assert (run_dir / "latest" / "model.safetensors").read_bytes() != before
    assert training.read_json(run_dir / "latest" / "run.json")["args"]["learning_rate"] == 1e-2


# ---------------------------------------------------------------------------------------------------------------
# --resume restores the run's own arguments


RESUMERS = {  # (Args, how its command line is parsed, non-default arguments of the run, the step count's field)
    "minigpt": (M.Args, ["minigpt.py"], dict(n_embd=48, learning_rate=5e-5, min_lr=5e-5), "max_iters"),
    "sft": (S.Args, ["sft.py"], dict(packing=True, learning_rate=1e-4, init_from="elsewhere/x/latest"), "max_iters"),
    "dpo": (D.Args, ["dpo.py"], dict(beta=0.05, loss_type="ipo"), "max_iters"),
    "ppo_rlhf": (P.Args, ["ppo_rlhf.py"], dict(kl_coef=0.05, batch_size=32, critic="separate"), "total_steps"),
    "reward_model train": (R.TrainArgs, ["reward_model.py", "train"], dict(margin=0.5, batch_size=7), "max_iters"),
    "minibert pretrain": (B.PretrainArgs, ["minibert.py", "pretrain"], dict(hidden_size=64, max_len=48), "max_iters"),
}


def parse(argv: list[str], monkeypatch):
    """What the script's __main__ parses from this command line."""
    monkeypatch.setattr(sys, "argv", argv)
    if argv[0] == "reward_model.py":
        return R.parse_command()
    if argv[0] == "minibert.py":
        return B.parse_command()
    cls = {"minigpt.py": M.Args, "sft.py": S.Args, "dpo.py": D.Args, "ppo_rlhf.py": P.Args}[argv[0]]
    return training.parse_args(cls)


@pytest.mark.parametrize("name", RESUMERS)
def test_resume_restores_the_saved_arguments_and_names_what_differs(tmp_path, monkeypatch, capsys, name):
    cls, command, own, steps = RESUMERS[name]
    saved = cls(output_dir=str(tmp_path), **own)
    fake_run(tmp_path / saved.run_name, saved)
    where = ["--output-dir", str(tmp_path)]
    # --resume alone: the run's own arguments, not the defaults
    assert parse(command + ["--resume"] + where, monkeypatch) == replace(saved, resume=True)
    # a longer run: allowed, and named
    longer = parse(command + ["--resume", flag(steps), "77"] + where, monkeypatch)
    assert longer == replace(saved, resume=True, **{steps: 77})
    assert training.check_resume(longer, {"args": asdict(saved)}) == [steps]
    was = getattr(saved, steps)
    assert f"resuming with {flag(steps)} 77 (the run had {flag(steps)} {was})" in capsys.readouterr().out
    # another learning rate: refused, named as typed, from the command line and from Python alike
    other = parse(command + ["--resume", "--learning-rate", "0.5"] + where, monkeypatch)
    message = rf"--resume: --learning-rate 0.5 \(the run has --learning-rate {saved.learning_rate}\): the run would " \
              r"not continue exactly; leave them out to resume with the run's own, or start a new run with --run-name"
    with pytest.raises(InputError, match=message):
        training.check_resume(other, {"args": asdict(saved)})
    main = WRITERS[name][1]
    with pytest.raises(InputError, match=message):
        main(replace(saved, resume=True, learning_rate=0.5))


def test_resume_from_the_command_line_continues_the_run_exactly(tmp_path):
    """The report's case: a run with its own learning rate and shape, resumed with --resume alone, continues on its
    own schedule: its losses are those of the uninterrupted run."""
    cut = tmp_path / "cut"
    cmd = [sys.executable, "minigpt.py", "--output-dir", str(cut), "--device", "cpu"]
    own = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
           "--eval-interval", "2", "--eval-iters", "2", "--final-eval-iters", "2", "--sample-tokens", "5",
           "--learning-rate", "5e-5", "--min-lr", "5e-5"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd + own + ["--max-iters", "2"], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd + ["--resume", "--max-iters", "4"], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming with --max-iters 4 (the run had --max-iters 2)" in again.stdout
    meta = training.read_json(cut / "minigpt" / "latest" / "run.json")
    assert meta["step"] == 4 and meta["args"]["learning_rate"] == 5e-5 and meta["args"]["n_embd"] == 32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the commands ran: the same sums in the same order
    try:
        full = M.main(tiny_args(tmp_path / "full", max_iters=4))["train_loss"]
    finally:
        torch.set_num_threads(threads)
    resumed = training.read_json(cut / "minigpt" / "latest" / "history.json")["train_loss"]
    assert {int(k): v for k, v in resumed.items()} == pytest.approx(full, rel=1e-6)
    refused = subprocess.run(cmd + ["--resume", "--n-embd", "64"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=300)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: --resume: --n-embd 64 (the run has --n-embd 32): the run would not continue exactly; leave them out "
        "to resume with the run's own, or start a new run with --run-name NAME"]


# ---------------------------------------------------------------------------------------------------------------
# Values no run can use: one line naming the option, before any work

COMMANDS = {  # the function each command runs, and the arguments that make it
    "minigpt": (M.main, lambda tmp: M.Args(output_dir=str(tmp))),
    "sft": (S.main, lambda tmp: S.Args(output_dir=str(tmp))),
    "dpo": (D.main, lambda tmp: D.Args(output_dir=str(tmp))),
    "ppo_rlhf": (P.main, lambda tmp: P.Args(output_dir=str(tmp))),
    "reward_model train": (R.train, lambda tmp: R.TrainArgs(output_dir=str(tmp))),
    "reward_model pairs": (R.make_pairs, lambda tmp: R.PairsArgs(out_dir=str(tmp))),
    "minibert pretrain": (B.pretrain, lambda tmp: B.PretrainArgs(output_dir=str(tmp))),
    "minibert finetune": (B.finetune, lambda tmp: B.FinetuneArgs(output_dir=str(tmp))),
    "parallel": (PAR.main, lambda tmp: PAR.Args(output_dir=str(tmp))),
    "skills train": (skills.main, lambda tmp: skills.TrainArgs(output_dir=str(tmp))),
    "sample": (sample.main, lambda tmp: sample.Args(checkpoint=str(tmp))),
    "chat": (chat.main, lambda tmp: chat.Args()),
    "pipeline run": (pipeline.run, lambda tmp: pipeline.RunArgs(output_dir=str(tmp))),
}
BAD = [("batch_size", 0), ("learning_rate", -1.0), ("val_fraction", 0.0), ("val_fraction", 1.5), ("eval_interval", 0),
       ("log_interval", 0), ("top_k", 0), ("dropout", 2.0), ("max_iters", 0), ("total_steps", 0), ("steps", 0),
       ("epochs", 0), ("grad_accum_steps", 0), ("temperature", -1.0), ("max_new_tokens", 0), ("top_p", 1.5),
       ("mlm_probability", 0.0), ("minibatch_size", 0), ("samples_per_prompt", 1)]
CASES = [(name, field, value) for name, (_, make) in COMMANDS.items() for field, value in BAD
         if field in {f.name for f in fields(make(Path("."))) if f.init}]


@pytest.mark.parametrize("name,field,value", CASES, ids=[f"{n}-{f}={v}" for n, f, v in CASES])
def test_a_value_no_run_can_use_is_refused_naming_the_option(tmp_path, name, field, value):
    main, make = COMMANDS[name]
    with pytest.raises(InputError, match=rf"^{flag(field)} {value}: expected "):
        main(replace(make(tmp_path), **{field: value}))
    assert not any((tmp_path / "runs").glob("*/latest"))


def test_every_case_of_the_report_is_in_the_table():
    """Each option the report names is refused in every script that takes it (CASES is built from the scripts'
    fields), and every command is in the table."""
    named = {"batch_size", "learning_rate", "val_fraction", "eval_interval", "log_interval", "top_k", "dropout",
             "max_iters", "grad_accum_steps", "temperature"}
    assert named <= {f for _, f, _ in CASES} and {n for n, _, _ in CASES} == set(COMMANDS)
    assert {n for n, f, _ in CASES if f == "temperature"} == {"minigpt", "sft", "dpo", "ppo_rlhf", "reward_model "
                                                              "train", "reward_model pairs", "sample", "chat"}


BAD_LINES = [
    (["minigpt.py", "--batch-size", "0"], "error: --batch-size 0: expected > 0"),
    (["sft.py", "--learning-rate", "-1"], "error: --learning-rate -1.0: expected > 0"),
    (["reward_model.py", "train", "--dropout", "2"], "error: --dropout 2.0: expected 0 <= p < 1"),
    (["minibert.py", "pretrain", "--max-iters", "0"], "error: --max-iters 0: expected > 0"),
]


def test_the_command_line_says_one_line_and_exits_with_status_1():
    procs = [subprocess.Popen([sys.executable] + argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}) for argv, _ in BAD_LINES]
    for proc, (argv, line) in zip(procs, BAD_LINES, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and err.strip().splitlines() == [line], (argv, err)


def test_errors_already_refused_stay_one_line(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: no CUDA GPU is available here"):
            M.main(tiny_args(tmp_path, device="cuda"))
    assert training.parse_args(B.PredictArgs, ["a", "b"]).texts == ("a", "b")  # minibert.py predict "a" "b"
    tok = CharTokenizer.from_text(A.format_prompt("a" * 20) + " b")
    torch.manual_seed(0)
    rm = R.RewardModel(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    rm.save_pretrained(tmp_path / "rm", pad_token_id=0)
    (tmp_path / "rm" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    with pytest.raises(InputError, match=r"the prompt has \d+ tokens, the model's context is 16"):
        R.score(R.ScoreArgs(model=str(tmp_path / "rm"), prompt="a" * 20, response=" b", device="cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Damaged files


def truncate(path: Path):
    data = path.read_bytes()
    path.unlink()  # the checkpoint's files may be shared with the original by a copy: write a new one
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    path.unlink()
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model.safetensors": ("model.safetensors", truncate, "model.safetensors: damaged, not a complete "
                                                                   "safetensors file"),
    "garbled model.safetensors header": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 64),
                                         "model.safetensors: damaged"),
    "truncated train_state.pt": ("train_state.pt", truncate, "train_state.pt: damaged, not a complete torch state"),
    "garbled train_state.pt": ("train_state.pt", garble, "train_state.pt: damaged"),
    "corrupt run.json": ("run.json", lambda p: p.write_text('{"args": {"n_layer": 1,'), "run.json: damaged, not "
                                                                                       "a run's metadata"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(run, tmp_path, damage):
    name, spoil, message = DAMAGES[damage]
    run_dir = copy_run(run, tmp_path)
    spoil(run_dir / "latest" / name)
    with pytest.raises(InputError, match=message):
        M.main(tiny_args(tmp_path, resume=True, max_iters=4))
    if name != "train_state.pt":  # what reads a model directory: sample.py, chat.py, every stage's --init-from
        with pytest.raises(InputError, match=message):
            gpt.load_pretrained(str(run_dir / "latest"))
    if name == "model.safetensors":
        with pytest.raises(InputError, match=message):
            training.read_safetensors(run_dir / "latest" / name)
    if damage == "truncated train_state.pt":  # torch.load does not check CRCs: verify_checkpoint does, first
        with pytest.raises(InputError, match=message):
            training.read_torch(run_dir / "latest" / name)


def test_a_binary_jsonl_file_is_one_line(tmp_path, tiny_base):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": " b"}\n' + bytes(range(128, 256)) * 4)  # no newline in it
    with pytest.raises(InputError, match=r"data.jsonl, line 2: not UTF-8 text"):
        A.read_pairs(path)
    with pytest.raises(InputError, match=r"data.jsonl, line 2: not UTF-8 text"):
        S.main(S.Args(init_from=str(tiny_base), output_dir=str(tmp_path / "runs"), device="cpu", data_path=str(path)))


# ---------------------------------------------------------------------------------------------------------------
# Where the run goes: found out before training, not at the first checkpoint; a full disk keeps the last checkpoint


@pytest.mark.parametrize("name", ["minigpt", "sft", "dpo", "ppo_rlhf", "reward_model train", "minibert pretrain",
                                  "minibert finetune", "skills train"])
def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path, name):
    (tmp_path / "file").write_text("not a directory")
    main, make = COMMANDS[name]
    with pytest.raises(InputError, match=r"cannot write the run to .*file.* \(Not a directory\): give a writable "
                                         r"--output-dir"):
        main(replace(make(tmp_path), output_dir=str(tmp_path / "file")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_refused_before_training(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(InputError, match=r"cannot write the run to .*ro.* \(Permission denied\)"):
        M.main(tiny_args(tmp_path, output_dir=str(tmp_path / "ro")))


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(training.torch, "save", full_disk)
    run_dir = tmp_path / "runs" / "minigpt"
    with pytest.raises(InputError, match=rf"cannot write the checkpoint of step 4 to {run_dir} \(No space left on "
                                         rf"device; [\d,]+ MiB free there\); the previous checkpoint, "
                                         rf"{run_dir / 'latest'}, is intact"):
        M.main(tiny_args(tmp_path, max_iters=4))
    monkeypatch.setattr(training.torch, "save", save)
    assert os.readlink(run_dir / "latest") == "step-000002"
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step-000002"]  # no half-written directory
    assert training.verify_checkpoint(run_dir)["step"] == 2
    M.main(tiny_args(tmp_path, max_iters=4, resume=True))  # and the run goes on from it
    with pytest.raises(SystemExit, match=r"error: \[Errno 28\] No space left on device"):  # as the commands end
        training.run_command(lambda args: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
                             lambda: None)


# ---------------------------------------------------------------------------------------------------------------
# A stage started without the one before it says which command makes what it needs


def test_a_missing_earlier_stage_names_the_command_that_makes_it(tmp_path):
    nowhere = tmp_path / "runs"
    out = dict(output_dir=str(tmp_path / "out"), device="cpu")
    with pytest.raises(InputError, match=r"--init-from .*pretrain/latest: no checkpoint there; `python minigpt.py "
                                         r"--run-name pretrain"):
        S.main(S.Args(init_from=str(nowhere / "pretrain" / "latest"), **out))
    with pytest.raises(InputError, match=r"--init-from .*sft/latest: no checkpoint there; `python sft.py`"):
        D.main(D.Args(init_from=str(nowhere / "sft" / "latest"), **out))
    with pytest.raises(InputError, match=r"--init-from .*sft/latest: no checkpoint there; `python sft.py`"):
        R.train(R.TrainArgs(init_from=str(nowhere / "sft" / "latest"), **out))
    with pytest.raises(InputError, match=r"--policy .*sft/latest: no checkpoint there; `python sft.py`"):
        R.make_pairs(R.PairsArgs(policy=str(nowhere / "sft" / "latest"), out_dir=str(tmp_path / "pairs")))
    with pytest.raises(InputError, match=r"--policy .*sft/latest: no checkpoint there; `python sft.py`"):
        P.main(P.Args(policy=str(nowhere / "sft" / "latest"), **out))
    (nowhere / "sft" / "latest").mkdir(parents=True)
    with pytest.raises(InputError, match=r"--reward-model .*reward_model/latest: no checkpoint there; `python "
                                         r"reward_model.py train`"):
        P.main(P.Args(policy=str(nowhere / "sft" / "latest"), reward_model=str(nowhere / "reward_model" / "latest"),
                      **out))
    with pytest.raises(InputError, match=r"--train-path .*pairs_train.jsonl: no such file; `python reward_model.py "
                                         r"pairs` writes the preference pairs"):
        D.main(D.Args(init_from=str(nowhere / "sft" / "latest"), train_path=str(nowhere / "pairs_train.jsonl"), **out))
    with pytest.raises(InputError, match=r"--pairs-train .*pairs_train.jsonl: no such file; `python reward_model.py "
                                         r"pairs`"):
        R.train(R.TrainArgs(init_from=str(nowhere / "sft" / "latest"), pairs_train=str(nowhere / "pairs_train.jsonl"),
                            **out))
    with pytest.raises(InputError, match=r"no such checkpoint directory"):  # sample.py, chat.py
        gpt.load_pretrained(str(nowhere / "minigpt" / "latest"))

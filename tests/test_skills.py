"""skills.py end to end: a tiny base pretrained by minigpt, three skill adapters that each learn their own task, a
router that generalises to unseen templates, and the mixed batch of the trained adapters against their merged
models."""

import pytest

import lora
import minigpt
import serve
import skills
import tokenization
import training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = skills.TrainArgs(device="cpu", output_dir=str(out), base=str(out / "base" / "latest"), eval_examples=32,
                            base_iters=150, base_n_layer=2, base_n_embd=64, base_batch_size=8, steps=60, batch_size=8,
                            learning_rate=5e-3)
    return args, skills.main(args)


def test_tasks_are_built_from_the_corpus():
    text, _ = minigpt.load_text(minigpt.Args())
    tasks = skills.build_tasks(tokenization.CharTokenizer.from_text(text), max_chars=128)
    for t in skills.TASKS:
        train, test = tasks[t]["train"], tasks[t]["test"]
        assert len(train) > 200 and len(test) > 20, t
        assert all(len(e["prompt"]) + len(e["completion"]) <= 128 for e in train + test)
        assert not {e["prompt"] + e["completion"] for e in train} & {e["prompt"] + e["completion"] for e in test}
        assert {e["family"] for e in test} == {0, 1}  # both template families, so the router meets unseen ones
    e = tasks["qa"]["test"][0]
    assert e["prompt"].split("\n")[2].startswith(("Who said", "Whose words")) and e["completion"].isupper()


@pytest.mark.slow
def test_end_to_end_adapters_learn_their_tasks(run):
    args, report = run
    m = report["matrix"]
    for task in args.tasks:
        assert m[task][task] < m["base"][task], (task, m)  # every adapter beats the base on its own task
    assert m["qa"]["qa"] < min(m[a]["qa"] for a in ("base", "speech", "positive")) - 0.3
    assert m["positive"]["positive"] < min(m[a]["positive"] for a in ("base", "qa"))
    qa = report["train_loss"]["qa"]  # the training loss falls (speech's barely moves at this size: batch noise)
    assert sum(qa[-10:]) / 10 < sum(qa[:5]) / 5 - 0.2
    assert report["router_accuracy"] > 0.6  # chance is 1/3, on prompts of templates the router never saw
    run_dir = report["run_dir"]
    assert (run_dir / "report.json").exists() and (run_dir / "router" / "router.safetensors").exists()
    assert set(skills.adapter_dirs(run_dir)) == set(args.tasks)


@pytest.mark.slow
def test_the_trained_adapters_in_one_mixed_batch(run):
    args, report = run
    rt = training.setup_runtime("cpu")
    base, tokenizer = skills.load_base(args.base, rt.device)
    adapters = skills.adapter_dirs(report["run_dir"])
    multi, names = lora.build_multi_adapter(base, adapters)
    merged = {a: lora.merged_model(base, adapters[a]) for a in names}
    tasks = skills.build_tasks(tokenizer, max_chars=min(128, base.config.block_size))
    fits = {t: [e for e in tasks[t]["test"] if len(tokenizer.encode(e["prompt"])) + 40 <= base.config.block_size]
            for t in names}  # prompts that leave room for 40 new tokens
    requests = [(e["prompt"], t) for t in names for e in fits[t][:2]]
    check = serve.check_mixed_batch(multi, names, merged, requests, tokenizer, rt)
    assert check["identical_completions"] == check["requests"] == 6 and check["max_abs_logit_diff"] < 1e-4
    router = skills.load_router(report["run_dir"] / "router")
    assert sorted(router.names) == sorted(names)  # the router of the run covers its adapters


@pytest.mark.slow
def test_eval_command_repeats_the_report(run):
    args, report = run
    again = skills.main(skills.EvalArgs(device="cpu", output_dir=args.output_dir, base=args.base, eval_examples=32))
    for row, losses in report["matrix"].items():  # the saved adapters give the numbers the trained ones gave
        assert again["matrix"][row] == pytest.approx(losses, rel=1e-5), row
    assert again["router_accuracy"] == pytest.approx(report["router_accuracy"])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(training.InputError, match="--tasks"):
        skills.main(skills.TrainArgs(device="cpu", tasks=("poetry",), output_dir=str(tmp_path)))
    with pytest.raises(training.InputError, match="no adapters"):
        skills.adapter_dirs(tmp_path)

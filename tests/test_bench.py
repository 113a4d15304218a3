"""The benchmarks run (their timings are not tested: they are measurements, printed as ratios by bench/)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize("script", ["bench_minigpt.py", "bench_minibert.py", "bench_lora.py", "bench_serve.py"])
def test_each_benchmark_starts(script):
    run = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage" in run.stdout, run.stderr[-2000:]


def test_the_gpt_benchmark_compares_equal_models(capsys):
    import bench_minigpt

    out = bench_minigpt.main(bench_minigpt.Args(presets=("demo",), rounds=1, train_steps=1, device="cpu",
                                                dtype="float32"))["demo"]
    assert out["same_tokens"]  # both implementations generate the same tokens from the same weights
    assert all(v > 0 for v in out["train_tps"].values()) and "CPU " in capsys.readouterr().out  # the machine is named

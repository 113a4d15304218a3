"""The real model: SmolLM2-135M-Instruct (assets.py's converted directory) in minigpt against transformers."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import assets
import gpt

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Zwölf Boxkämpfer jagen Viktor quer über den Sylter"]


@pytest.fixture(scope="module")
def models():
    path = assets.resolve_pretrained("smollm2")
    ours, tok = gpt.load_pretrained("smollm2")
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours.eval(), tok, hf, AutoTokenizer.from_pretrained(path)


def test_it_is_the_model_the_asset_says(models):
    ours, tok, hf, _ = models
    c = ours.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.vocab_size, c.tie_word_embeddings) == (
        "llama", 30, 576, 9, 3, 49152, True)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == 134_515_008
    assert tok.eot_token == 2 and tok.decode([2]) == "<|im_end|>"


def test_logits_equal_transformers(models):
    ours, tok, hf, _ = models
    with torch.no_grad():
        for text in PROMPTS:
            x = torch.tensor([tok.encode(text)])
            torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-4, rtol=1e-4)


def test_greedy_chat_answer_equals_transformers_for_32_tokens(models):
    ours, tok, hf, _ = models
    prompt = torch.tensor([tok.encode(tok.chat([{"role": "user", "content": "Tell me a story about a dragon."}]))])
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=2)  # stops at <|im_end|>
    got = ours.generate(prompt, 32, temperature=0, eos_token_id=tok.eot_token)
    assert got.size(1) == prompt.size(1) + 32 and torch.equal(got, expected)  # 32 tokens: the story goes on


def test_tokenizer_ids_equal_transformers(models):
    _, tok, _, hf_tok = models
    text = ("Hello wörld! Ünïcödé: ½ → ∑ 🙂 中文 日本語\n  tabs\tand  spaces 12345 3.14159 -7e-3\n"
            "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n<|im_start|>user\nhi<|im_end|>")
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert ids[-1] == 2 and 1 in ids  # the special tokens written in the text are the special ids


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass?"}],
])
def test_chat_rendering_equals_apply_chat_template(models, messages):
    _, tok, _, hf_tok = models
    for gen in (True, False):
        assert tok.chat(messages, add_generation_prompt=gen) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)

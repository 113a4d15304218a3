"""policy.py: examples and their loss mask, batched generation against one prompt at a time, response log-probs and
the KL against brute-force sums, the evaluation summary against its parts, prompts in the tokenizer's own chat
template, loading with an end token, and LoRA checkpoints that save merged and resume from the adapter."""

import pytest
import torch
import torch.nn.functional as F

import alignment_task as A
import gpt
import policy as P
import tokenization
from training import InputError, seeded, setup_runtime


def tiny_gpt(vocab=23, block=48, seed=0):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16))


class ToyTokenizer:
    """Letters a-v are ids 0-21, id 22 is the end of text."""
    eot_token, vocab_size = 22, 23

    def encode(self, s):
        return [ord(c) - 97 for c in s]

    def decode(self, ids):
        return "".join(chr(i + 97) if i != 22 else "<|endoftext|>" for i in ids)


class ChatMLTokenizer(tokenization.CharTokenizer):
    """A character tokenizer with a ChatML chat template of its own, as a chat model's tokenizer brings."""

    def chat(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------------------------
# Examples, prompts, the chat template


def test_encode_example_masks_the_prompt_and_ends_with_eot():
    tok = ToyTokenizer()
    ids, n_prompt = P.encode_example(tok, "abc", "de", block_size=16)
    assert ids == [0, 1, 2, 3, 4, 22] and n_prompt == 3
    x, y = P.padded_batch([(ids, n_prompt), ([5, 6, 22], 1)], pad_id=22)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 22, 22, 22]]
    assert y.tolist() == [[-100, -100, 3, 4, 22], [6, 22, -100, -100, -100]]  # response tokens and the end only
    ids, _ = P.encode_example(tok, "abc", "defghij", block_size=6)  # cut to block_size + 1 tokens: no end token
    assert ids == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(InputError, match="the prompt has 6 tokens, the model's context is 6"):
        P.encode_example(tok, "abcdef", "g", block_size=6)
    with pytest.raises(InputError, match="the response is empty"):
        P.encode_example(tok, "abc", "  ", block_size=6)
    assert P.encode_example(tok, "abc", "", block_size=6, allow_empty=True) == ([0, 1, 2, 22], 3)  # a pair's response


def test_prompts_are_rendered_by_the_tokenizer_chat_template():
    hh = tokenization.CharTokenizer("abc", eot=True)
    assert P.task_prompts(hh, 6, "test", seed=2) == [r["prompt"] for r in A.make_instructions(6, "test", 2)]
    chatml = ChatMLTokenizer("abc", eot=True)
    rows = A.make_instructions(6, "test", 2)
    for prompt, row in zip(P.task_prompts(chatml, 6, "test", seed=2), rows, strict=True):
        instruction = row["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:")
        assert prompt == f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    # an instruction is rendered as one user turn; a prompt already in the template is kept as it is
    for tok in (hh, chatml):
        rendered = P.as_prompt(tok, "Say hi.")
        assert rendered == tok.chat([{"role": "user", "content": "Say hi."}]) != "Say hi."
        assert P.as_prompt(tok, rendered) == rendered
    conversation = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"
    assert P.as_prompt(hh, conversation) == conversation


def test_load_policy_gives_a_char_base_an_end_token(tiny_base):
    base, tok = gpt.load_pretrained(str(tiny_base))
    assert tok.eot_token is None
    model, tok2 = P.load_policy(str(tiny_base))
    assert tok2.eot_token == tok.vocab_size == model.config.vocab_size - 1  # one new token and embedding row
    idx = torch.tensor([tok.encode("To be, or not")])
    torch.testing.assert_close(model.eval()(idx)[0][..., :-1], base.eval()(idx)[0])  # the old tokens' logits stay
    with pytest.raises(InputError, match="no end-of-text token, so its responses cannot end"):
        P.load_policy(str(tiny_base), add_eot=False)


def test_eval_mode_restores_each_model_mode():
    a, b = tiny_gpt().train(), tiny_gpt().eval()
    with P.eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training


# ----------------------------------------------------------------------------------------------------------------
# Sampling, log-probabilities, KL, the evaluation summary


def test_batched_generation_equals_one_by_one_and_stops_at_eot():
    model, tok = tiny_gpt(seed=39).train(), ToyTokenizer()  # a model that ends two of the four responses
    prompts = ["abc", "q", "hgfedcba", "uv"]
    texts, tokens, ended = P.generate_responses(model, tok, prompts, 12, temperature=0, batch_size=3)
    assert model.training  # sampled in eval mode, then put back
    model.eval()
    for p, t, e in zip(prompts, tokens, ended, strict=True):
        one = model.generate(torch.tensor([tok.encode(p)]), 12, temperature=0, eos_token_id=22)[0, len(p):].tolist()
        stop = one.index(22) if 22 in one else len(one)
        assert t == one[:stop] and e == (22 in one)
        assert 22 not in t
    assert texts == [tok.decode(t) for t in tokens]
    assert any(ended) and not all(ended)  # both kinds of response are checked


def brute_force_logp(model, ids, n_prompt, average=False):
    """log pi(response | prompt) one token at a time: the model run on each prefix alone."""
    terms = []
    for t in range(n_prompt, len(ids)):
        logits, _ = model(torch.tensor([ids[:t]]))
        terms.append(torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item())
    return sum(terms) / len(terms) if average else sum(terms)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_equal_brute_force_per_token_sum(average):
    model = tiny_gpt(block=24).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(6):
        n_prompt, n_resp = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        rows.append((torch.randint(0, 23, (n_prompt + n_resp,), generator=g).tolist(), n_prompt))
    x, y = P.padded_batch(rows, 0)
    with torch.no_grad():
        got = P.sequence_logps(model(x)[0], y, average)
    want = torch.tensor([brute_force_logp(model, ids, n, average) for ids, n in rows])
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_sequence_kl_against_brute_force():
    tok, pol, ref = ToyTokenizer(), tiny_gpt(seed=4), tiny_gpt(seed=5)
    prompts, tokens, ended = ["abc", "de", "fghij"], [[3, 4, 5], [7], [1, 2]], [True, False, True]
    kls = P.sequence_kl(pol, ref, tok, prompts, tokens, ended, batch_size=2)
    for p, t, e, kl in zip(prompts, tokens, ended, kls, strict=True):
        seq = tok.encode(p) + t + [22] * e
        lp = [F.log_softmax(m(torch.tensor([seq[:-1]]))[0][0], -1) for m in (pol, ref)]
        want = sum(lp[0][i - 1, seq[i]] - lp[1][i - 1, seq[i]] for i in range(len(p), len(seq)))
        assert kl == pytest.approx(want.item(), abs=1e-5)
    assert P.sequence_kl(pol, pol, tok, prompts, tokens, ended) == pytest.approx([0.0] * 3, abs=1e-6)


def test_evaluation_summary_equals_its_parts():
    tok = tokenization.CharTokenizer("abcdefgh :!", eot=True)
    model, ref = tiny_gpt(vocab=tok.vocab_size, seed=6), tiny_gpt(vocab=tok.vocab_size, seed=7)
    prompts, rt = ["abc:", "had a bad:", "ace :", "fee:"], setup_runtime("cpu")
    ev = P.evaluate_policy(model, tok, prompts, rt, ref, max_new_tokens=10, temperature=1.0, seed=3, stream=11)
    texts, tokens, ended = P.generate_responses(model, tok, prompts, 10, 1.0, generator=seeded(3, 11))
    assert ev["samples"] == texts  # the same draws
    gold = A.gold_rewards(prompts, texts)
    assert ev["gold_reward"] == pytest.approx(sum(gold) / 4)
    assert ev["gold_sem"] == pytest.approx(torch.tensor(gold, dtype=torch.float64).std(unbiased=False).item() / 2)
    assert ev["length"] == pytest.approx(sum(map(len, tokens)) / 4) and ev["no_eos"] == 1 - sum(ended) / 4
    assert ev["kl"] == pytest.approx(sum(P.sequence_kl(model, ref, tok, prompts, tokens, ended)) / 4, abs=1e-6)
    assert "kl" not in P.evaluate_policy(model, tok, prompts, rt, max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: merged with LoRA, resumed from the adapter


def test_lora_policy_saves_merged_weights_and_resumes_from_its_adapter(tmp_path):
    tok = tokenization.CharTokenizer("abcdefgh :!", eot=True)
    model = tiny_gpt(vocab=tok.vocab_size, seed=8)
    P.add_lora(model, 4, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))  # a trained adapter: B is no longer zero
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    P.save_policy(tmp_path, model, optimizer, 7, {"tokenizer": tok.spec()}, lora=True)
    idx = torch.tensor([tok.encode("ab cd:")])
    merged, _ = P.load_policy(str(tmp_path / "latest"))  # the next stages read a plain GPT
    torch.testing.assert_close(merged.eval()(idx)[0], model.eval()(idx)[0], atol=1e-5, rtol=1e-5)
    fresh = tiny_gpt(vocab=tok.vocab_size, seed=8)
    P.add_lora(fresh, 4, seed=2)  # other initial adapters: resuming replaces them
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    assert P.resume_policy(tmp_path, fresh, fresh_opt, lora=True)["step"] == 7
    torch.testing.assert_close(fresh.eval()(idx)[0], model(idx)[0])
    with pytest.raises(InputError, match="--resume: no LoRA checkpoint"):
        P.resume_policy(tmp_path / "none", fresh, fresh_opt, lora=True)

"""chat.py: the newcomer's first command. History within the context, streaming equal to generate, the real model."""

import io

import pytest
import torch

import chat
import gpt
import minigpt as M
import tokenization
from training import InputError, Runtime


@pytest.fixture(scope="module")
def tok():
    return tokenization.get_tokenizer("smollm2")


def test_the_real_model_answers_a_question(capsys):
    answers = chat.main(chat.Args(prompt="What is the capital of France?", max_new_tokens=20))
    assert "Paris" in answers[0] and "Paris" in capsys.readouterr().out


def test_streamed_text_equals_the_decoded_generation(tok):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(arch="llama", vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2,
                              n_kv_head=1, n_embd=32)).eval()
    ids = tok.encode(tok.chat([{"role": "user", "content": "Grüße! ½ 🙂"}]))
    args = chat.Args(max_new_tokens=30, temperature=1.0, seed=3)
    out = io.StringIO()
    text = chat.reply(model, tok, ids, args, Runtime(torch.device("cpu"), torch.float32), turn=0, out=out)
    full = model.generate(torch.tensor([ids]), 30, 1.0, eos_token_id=tok.eot_token,
                          generator=M.seeded(3, 0))[0, len(ids):].tolist()
    full = full[:full.index(tok.eot_token)] if tok.eot_token in full else full
    assert out.getvalue() == tok.decode(full) + "\n" and text == tok.decode(full).strip()


def test_the_oldest_turns_are_dropped_to_fit_the_context(tok):
    conv = chat.Conversation(tok, "Be brief.", max_tokens=120)
    for i in range(4):
        ids, dropped = conv.prompt_ids(f"question number {i} " + "word " * 10, reserve=40)
        assert len(ids) + 40 <= 120
        conv.answered(f"answer {i}")
    assert dropped == 2 and conv.turns[0]["content"].startswith("question number 2")  # the oldest exchanges left
    assert tok.chat(conv.system + conv.turns).startswith("<|im_start|>system\nBe brief.<|im_end|>")  # kept
    with pytest.raises(InputError, match="exceeds --max-context 120"):
        conv.prompt_ids("word " * 200, reserve=40)
    assert conv.turns[-1]["role"] == "assistant"  # the refused message is not kept


def test_an_interactive_session_resets_and_quits(monkeypatch, capsys):
    lines = iter(["Say hi.", "/reset", "", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    answers = chat.main(chat.Args(max_new_tokens=8))
    out = capsys.readouterr().out
    assert len(answers) == 1 and "(the conversation is forgotten)" in out and "/reset forgets" in out

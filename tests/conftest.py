"""Test set-up shared by every module: no test may reach a hub, and the scripts import from the repository root."""

import os

import pytest

import gpt
import tokenization

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["MINILLM_CPU_BF16"] = "0"  # --dtype auto stays fp32 on every CPU: the tests pin exact numbers


def save_tiny_char_base(path, n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 256,
                        seed: int = 0):
    """A small randomly initialised char-level GPT over the Shakespeare characters, saved as a minigpt checkpoint
    directory (weights + run.json with the tokenizer): the base the alignment tests fine-tune."""
    import json
    from pathlib import Path

    import torch

    import minigpt as M

    text, _ = M.load_text(M.Args())
    tok = tokenization.CharTokenizer.from_text(text)
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd))
    path = Path(path)
    model.save_pretrained(path)
    (path / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
    return path


def save_tiny_llama_chat(path, block_size: int = 320, seed: int = 0):
    """A small randomly initialised Llama with SmolLM2's tokenizer and ChatML chat template, saved as a model
    directory: the real-model path (chat template, <|im_end|> as the end token, Llama blocks) at test speed."""
    import shutil
    from pathlib import Path

    import torch

    from assets import resolve_pretrained

    tok = tokenization.get_tokenizer("smollm2")
    torch.manual_seed(seed)
    gpt.GPT(gpt.GPTConfig(arch="llama", vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=64, tie_word_embeddings=True)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(resolve_pretrained("smollm2")) / f, Path(path) / f)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    return save_tiny_char_base(tmp_path_factory.mktemp("tiny_base"))

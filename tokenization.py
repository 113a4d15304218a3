"""tokenization.py: the tokenizers the project's models read text with, and their chat templates.

- CharTokenizer: one token per character of the training text (minigpt's demo), with an optional end-of-text token.
- BPETokenizer: GPT-2's byte-level BPE (Sennrich et al. 2016; Radford et al. 2019) through tiktoken, built offline
  from the ranks file assets.py fetches.
- HFTokenizer: a Hugging Face model's own tokenizer.json through the `tokenizers` library, and its chat template
  (SmolLM2's ChatML) rendered as transformers renders it.
All have one interface: encode, decode, vocab_size, eot_token (the end of a text, or of a chat turn), chat(messages)
(the conversation as the text the model reads) and spec() (what get_tokenizer needs to build it again).
"""

import json
from pathlib import Path

from assets import PRETRAINED, asset_path, resolve_pretrained
from training import InputError

EOT = "<|endoftext|>"  # GPT-2's end-of-text token, written the same way by both tokenizers


def hh_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template of the models this project pretrains (char-level and GPT-2 BPE): the Anthropic hh-rlhf
    layout (Bai et al. 2022), "\n\nHuman: {user}\n\nAssistant: {assistant}" per turn, a system message as plain text
    before the first turn. With add_generation_prompt the text ends with "\n\nAssistant:" and the model's reply
    follows as " {text}" and the end-of-text token. A chat model's tokenizer brings its own template instead."""
    roles = {"user": "Human", "assistant": "Assistant"}
    text = ""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i == 0:
            text += m["content"]
        elif m["role"] in roles:
            text += f"\n\n{roles[m['role']]}: {m['content']}"
        else:
            raise InputError(f"message {i}: role {m['role']!r}; expected 'user' or 'assistant' (or 'system' first)")
    return text + ("\n\nAssistant:" if add_generation_prompt else "")


class CharTokenizer:
    """One token per character; the vocabulary is the set of characters of the training text. With eot=True one
    more id (after the characters) marks the end of a text, written <|endoftext|> as in GPT-2."""

    def __init__(self, chars: str, eot: bool = False):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_token = len(chars) if eot else None
        self.vocab_size = len(chars) + int(eot)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        if self.eot_token is not None and EOT in text:
            ids = []
            for i, part in enumerate(text.split(EOT)):
                ids += ([self.eot_token] if i else []) + self.encode(part)
            return ids
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise InputError(f"character {e.args[0]!r} is not in the char tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(EOT if i == self.eot_token else self.chars[i] for i in ids)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the text the model reads (its chat template): hh_chat."""
        return hh_chat(messages, add_generation_prompt)

    def spec(self) -> dict:
        return {"name": "char", "chars": self.chars} | ({"eot": True} if self.eot_token is not None else {})


# GPT-2's pre-tokenisation regex (tiktoken's r50k_base pat_str): contractions, letters, digits, punctuation, spaces
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class BPETokenizer:
    """GPT-2 byte-level BPE through tiktoken, built offline from the ranks file that `python assets.py` fetches."""

    def __init__(self):
        import base64

        import tiktoken

        path = asset_path("gpt2.tiktoken")
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in path.read_text().splitlines())}
        self.enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": len(ranks)}, explicit_n_vocab=len(ranks) + 1)
        self.vocab_size, self.eot_token = self.enc.n_vocab, self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the text the model reads (its chat template): hh_chat."""
        return hh_chat(messages, add_generation_prompt)

    def spec(self) -> dict:
        return {"name": "gpt2"}


def _compile_chat_template(source: str):
    """A chat template compiled as transformers compiles it: Jinja in a sandbox (the template comes with downloaded
    files, so it may not reach Python), blocks trimmed, and raise_exception for the template's own errors."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InputError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class HFTokenizer:
    """A Hugging Face model's own tokenizer (its tokenizer.json, through the `tokenizers` library) and chat template
    (the Jinja template its tokenizer_config.json or chat_template.jinja holds, rendered as transformers renders it).
    The end token is the model's eos_token: for a chat model, the end of a turn (SmolLM2's <|im_end|>)."""

    def __init__(self, name_or_dir: str):
        from tokenizers import Tokenizer

        self.name, path = name_or_dir, Path(resolve_pretrained(name_or_dir))
        if not (path / "tokenizer.json").is_file():
            raise InputError(f"{path}: no tokenizer.json")
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = json.loads((path / "tokenizer_config.json").read_text()) if (
            path / "tokenizer_config.json").is_file() else {}
        source = config.get("chat_template")
        if source is None and (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        self.template = None if source is None else _compile_chat_template(source)  # once, not at every prompt
        self.special = {k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)}
        eos = self.special.get("eos_token")
        self.eot_token = self.tok.token_to_id(eos) if eos else None
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # special tokens written in the text are kept

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's own chat template (SmolLM2: ChatML, with a default system
        prompt when none is given), as transformers' apply_chat_template renders it."""
        if self.template is None:
            return hh_chat(messages, add_generation_prompt)
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def spec(self) -> dict:
        return {"name": "hf", "path": self.name}


def get_tokenizer(name: str, chars: str | None = None, eot: bool = False, path: str | None = None):
    """'gpt2': GPT-2 BPE (it has an end-of-text token); 'char': character-level over `chars`, with an end-of-text
    token if eot; 'hf': the tokenizer.json of a Hugging Face model directory (path; a PRETRAINED name such as
    'smollm2' works too). tokenizer.spec() gives these arguments back."""
    if name == "gpt2":
        return BPETokenizer()
    if name == "char":
        if chars is None:
            raise InputError("the char tokenizer needs its vocabulary (chars); build it with CharTokenizer.from_text")
        return CharTokenizer(chars, eot)
    if name == "hf" or name in PRETRAINED:
        return HFTokenizer(path or name)
    raise InputError(f"--tokenizer {name!r}: expected 'char', 'gpt2' or a model's name ({', '.join(PRETRAINED)})")

"""chat.py: talk to a chat model in the terminal: SmolLM2-135M-Instruct by default, or any chat checkpoint the
project writes (sft.py, dpo.py, ppo_rlhf.py).

Each turn is rendered with the model's own chat template (`tokenizer.chat`: ChatML for SmolLM2, the hh-rlhf layout
for the models the project pretrains), the reply streams token by token from the KV-cached `GPT.stream`, and the
history is kept within --max-context tokens: the oldest turns are dropped, with a notice, when it would not fit.

Run it:
    python chat.py                                         # interactive, SmolLM2-135M-Instruct (offline)
    python chat.py --prompt "What is the capital of France?"   # one answer, then exit
    python chat.py --system "You answer in one sentence." --temperature 0.7 --top-p 0.9
    python chat.py runs/pipeline/dpo/latest                # a policy the alignment pipeline trained
In a session: /reset forgets the conversation, /quit (or Ctrl-D) leaves.
"""

import sys
from dataclasses import dataclass
from typing import Annotated

import torch
import tyro

from gpt import load_pretrained
from training import InputError, check_args, run_command, seeded, setup_runtime


@dataclass
class Args:
    model: Annotated[str, tyro.conf.Positional] = "smollm2"
    """'smollm2' (the offline SmolLM2-135M-Instruct), a chat checkpoint directory, or a hub name"""
    prompt: str | None = None
    """ask this one question, print the answer and exit (no interactive session)"""
    system: str | None = None
    """a system prompt (default: the model's own template decides; SmolLM2's names itself)"""
    temperature: float = 0.0
    """sampling temperature (0: greedy)"""
    top_p: float | None = None
    """sample within the nucleus of this much probability only (Holtzman et al. 2020)"""
    top_k: int | None = None
    """sample among the top_k most likely tokens only"""
    max_new_tokens: int = 256
    """tokens per answer at most"""
    max_context: int = 2048
    """tokens of history kept (prompt + answer); the oldest turns are dropped beyond it"""
    seed: int = 1337
    """random seed of the sampling: answer i of a session is a function of (seed, i)"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""
    dtype: str = "float32"
    """'float32', 'bfloat16' (autocast), or 'auto' (bf16 where the device runs it faster); decoding one answer reads
    every weight per token, and autocast would cast them each time, so fp32 is the default here"""


class Conversation:
    """The messages so far, rendered with the model's template and trimmed from the oldest turn to fit."""

    def __init__(self, tokenizer, system: str | None, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def prompt_ids(self, user: str, reserve: int) -> tuple[list[int], int]:
        """Token ids of the conversation with the new user message and the assistant's turn opened, and how many
        earlier messages had to be dropped so that it and `reserve` new tokens fit in max_tokens."""
        message = {"role": "user", "content": user}
        alone = len(self.tokenizer.encode(self.tokenizer.chat(self.system + [message])))
        if alone + reserve > self.max_tokens:  # refused before the history is touched
            raise InputError(f"the message is {alone} tokens with the template; with {reserve} for the answer it "
                             f"exceeds --max-context {self.max_tokens}")
        self.turns.append(message)
        dropped = 0
        while True:
            ids = self.tokenizer.encode(self.tokenizer.chat(self.system + self.turns))
            if len(ids) + reserve <= self.max_tokens:
                return ids, dropped
            self.turns = self.turns[2:]  # the oldest exchange: a user message and its answer
            dropped += 2

    def answered(self, text: str):
        self.turns.append({"role": "assistant", "content": text})


def reply(model, tokenizer, ids: list[int], args: Args, rt, turn: int, out=None) -> str:
    """Stream the model's answer to `out` (stdout) as it is drawn; return its text (without the end-of-turn token)."""
    out, new, shown = out or sys.stdout, [], ""
    x = torch.tensor([ids], device=rt.device)
    with rt.autocast():
        for token in model.stream(x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                  eos_token_id=tokenizer.eot_token, generator=seeded(args.seed, turn,
                                                                                     device=rt.device)):
            if token.item() == tokenizer.eot_token:
                break
            new.append(token.item())
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
                out.write(text[len(shown):])
                out.flush()
                shown = text
    out.write(tokenizer.decode(new)[len(shown):] + "\n")
    return tokenizer.decode(new).strip()


def main(args: Args) -> list[str]:
    check_args(args)  # the fields every script shares (--top-k 0, --top-p 2, ...): one line each
    if args.max_context <= args.max_new_tokens:
        raise InputError(f"--max-context {args.max_context}: expected more than --max-new-tokens {args.max_new_tokens} "
                         "(the answer must fit with the question)")
    rt = setup_runtime(args.device, args.dtype)
    model, tokenizer = load_pretrained(args.model)
    model.to(rt.device).eval()
    if tokenizer.eot_token is None:
        raise InputError(f"{args.model}: its tokenizer has no end token, so it cannot end a turn (a chat checkpoint "
                         f"comes from sft.py, dpo.py or ppo_rlhf.py, or a chat model such as 'smollm2')")
    chat = Conversation(tokenizer, args.system, min(args.max_context, model.config.block_size))
    answers = []
    if args.prompt is not None:  # one question, one answer
        ids, _ = chat.prompt_ids(args.prompt, args.max_new_tokens)
        answers.append(reply(model, tokenizer, ids, args, rt, 0))
        return answers
    print(f"{args.model}: {model.num_params() / 1e6:.1f}M parameters on {rt.device}. /reset forgets, /quit leaves.")
    while True:
        try:
            user = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return answers
        if user in ("/quit", "/exit"):
            return answers
        if user == "/reset":
            chat.turns = []
            print("(the conversation is forgotten)")
            continue
        if not user:
            continue
        try:
            ids, dropped = chat.prompt_ids(user, args.max_new_tokens)
        except InputError as e:  # a message too long for the context: say so, and the session goes on
            print(f"({e})")
            continue
        if dropped:
            print(f"(the {dropped} oldest messages no longer fit in {chat.max_tokens} tokens and were dropped)")
        answers.append(reply(model, tokenizer, ids, args, rt, len(answers)))
        chat.answered(answers[-1])


if __name__ == "__main__":
    run_command(main, lambda: tyro.cli(Args))  # bad input: one line, exit status 1, no traceback

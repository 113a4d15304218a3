"""sample.py: generate text from any language model the project writes (or any Hugging Face GPT-2).

A checkpoint of minigpt.py, sft.py, dpo.py or ppo_rlhf.py is a Hugging Face model directory plus run.json, which
names its tokenizer; this loads it with gpt.load_pretrained and continues a prompt with the KV-cached
`GPT.generate` (temperature, top-k, nucleus). With --chat the prompt is a user's message, rendered in the model's
chat template (`tokenizer.chat`), which is what the post-trained policies were trained on. A LoRA adapter (PEFT's
layout, e.g. one of skills.py's) can be applied on top with --adapter.

Run it:
    python sample.py runs/minigpt/latest                          # the demo model, from a newline
    python sample.py runs/minigpt/latest --prompt "ROMEO:" --num-samples 3 --max-new-tokens 300
    python sample.py runs/minigpt                                 # a run directory: its latest checkpoint
    python sample.py runs/pipeline/sft/latest --chat --prompt "Say something about love."
    python sample.py runs/minigpt/latest --temperature 0          # greedy
    python sample.py gpt2 --prompt "Hello, I'm a language model,"  # with a hub: any GPT-2
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from gpt import load_pretrained
from lora import load_adapter
from training import InputError, check_args, read_json, run_command, seeded, setup_runtime


@dataclass
class Args:
    checkpoint: Annotated[str, tyro.conf.Positional]
    """a checkpoint directory the project wrote (runs/minigpt/latest, runs/pipeline/sft/latest, ...), a run directory
    (its latest checkpoint is used), or a Hugging Face GPT-2 (a hub name or a local directory)"""
    prompt: str = "\n"
    """the text to continue (with --chat: the user's message)"""
    chat: bool = False
    """render the prompt as a user message in the model's chat template and print the reply only"""
    adapter: str | None = None
    """a LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply to the model"""
    num_samples: int = 1
    """samples to draw"""
    max_new_tokens: int = 200
    """tokens per sample at most (a sample also ends at the end-of-text token, where the model has one)"""
    temperature: float = 0.8
    """sampling temperature (0: greedy)"""
    top_k: int | None = 200
    """sample among the top_k most likely tokens only"""
    top_p: float | None = None
    """sample within the nucleus of this much probability only (Holtzman et al. 2020)"""
    seed: int = 1337
    """random seed: sample i of a run is a function of (seed, i)"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""


def resolve(checkpoint: str) -> str:
    """A run directory stands for its latest checkpoint; a directory that holds something other than a language
    model gets a message naming the command that uses it."""
    path = Path(checkpoint)
    if (path / "latest").is_dir() and not (path / "config.json").exists():
        path = path / "latest"
    config = path / "config.json"
    if not config.is_file():
        if path.exists() or "/" in checkpoint:
            raise InputError(f"{path}: no config.json (expected a checkpoint directory such as runs/minigpt/latest)")
        return checkpoint  # a hub name
    arch = (read_json(config, "a model config").get("architectures") or ["?"])[0]
    if arch.endswith("ForSequenceClassification") and "Bert" not in arch:
        raise InputError(f"{path} is a reward model: it scores text, it does not write it (python reward_model.py "
                         f"score {path} ...)")
    if "Bert" in arch:
        raise InputError(f"{path} is a BERT: it classifies or fills in masks (python minibert.py predict ...)")
    return str(path)


def main(args: Args) -> list[str]:
    check_args(args)  # --num-samples 0, --temperature -1, --top-k 0, ...: one line each
    rt = setup_runtime(args.device, "float32")
    model, tokenizer = load_pretrained(resolve(args.checkpoint))
    if args.adapter:
        load_adapter(model, args.adapter)
    model.to(rt.device).eval()
    text = tokenizer.chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt = tokenizer.encode(text)
    if not prompt:
        raise InputError("--prompt is empty: give at least one character to start from")
    n_new = min(args.max_new_tokens, model.config.block_size - len(prompt)) if args.chat else args.max_new_tokens
    if n_new < 1:
        raise InputError(f"the prompt has {len(prompt)} tokens and leaves no room in the model's context "
                         f"({model.config.block_size} tokens)")
    samples = []
    for i in range(args.num_samples):
        out = model.generate(torch.tensor([prompt], device=rt.device), n_new, args.temperature, args.top_k,
                             args.top_p, eos_token_id=tokenizer.eot_token, generator=seeded(args.seed, i,
                                                                                            device=rt.device))
        new = out[0, len(prompt):].tolist()
        if tokenizer.eot_token in new:  # the model ended its text
            new = new[:new.index(tokenizer.eot_token)]
        samples.append(tokenizer.decode(new) if args.chat else text + tokenizer.decode(new))
        print(samples[-1].strip() if args.chat else samples[-1], flush=True)
        if i + 1 < args.num_samples:
            print("---")
    return samples


if __name__ == "__main__":
    run_command(main, lambda: tyro.cli(Args))  # bad input: one line, exit status 1, no traceback

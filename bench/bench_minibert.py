"""Benchmark minibert's BERT against transformers' BERT: same weights (all-MiniLM-L6-v2), same batch, one process.

    python bench/bench_minibert.py                    # ~2 min on 2 CPU cores

Measured, each as minibert / transformers, the two timed in alternation, median over rounds:
  - encoder forward tokens/s (eval, no gradients): `Bert` against `transformers.BertModel`;
  - fine-tuning step tokens/s (classifier forward, backward, clipping, AdamW step): `BertForSequenceClassification`
    against transformers' class of the same name, on a padded batch of support tickets.
The wall time of a whole fine-tuning run is what `python minibert.py finetune` prints (README).
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from transformers import BertForSequenceClassification, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minibert as B  # noqa: E402
from tickets import CATEGORIES, make_tickets  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    batch_size: int = 32
    """tickets per batch (padded to the longest)"""
    steps: int = 3
    """steps per timed round"""
    rounds: int = 5
    seed: int = 0


def median_seconds(fn, steps: int, rounds: int, device) -> list[float]:
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def main(args: Args) -> dict:
    device = B.setup_device(args.device)
    path = B.resolve_checkpoint(B.MINILM)
    tokenizer = B.get_tokenizer(path)
    texts = [t for t, _ in make_tickets(args.batch_size, "train", args.seed)]
    enc = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    labels = torch.arange(args.batch_size, device=device) % len(CATEGORIES)
    tokens = enc["input_ids"].numel()

    torch.manual_seed(args.seed)
    ours = B.from_pretrained(B.BertForSequenceClassification, B.MINILM, log=lambda m: None,
                             num_labels=len(CATEGORIES)).to(device)
    hf = BertForSequenceClassification.from_pretrained(str(path), num_labels=len(CATEGORIES)).to(device)
    hf.load_state_dict({B.to_hf_name(k): v for k, v in ours.state_dict().items()})  # the same classifier too
    hf_encoder = BertModel.from_pretrained(str(path)).to(device).eval()

    @torch.no_grad()
    def forward_ours():
        ours.eval()
        ours.bert(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])

    @torch.no_grad()
    def forward_hf():
        hf_encoder(**enc)

    def make_step(model, loss_of):
        opt = B.configure_optimizer(model, 1e-5, 0.01, device)

        def step():
            model.train()
            loss = loss_of(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    measures = {
        "encoder forward": {"minibert": forward_ours, "transformers": forward_hf},
        "fine-tuning step": {
            "minibert": make_step(ours, lambda m: m(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                                   labels=labels)[1]),
            "transformers": make_step(hf, lambda m: m(**enc, labels=labels).loss)},
    }
    with torch.no_grad():  # the two encoders agree before anything is timed
        ours.eval()
        diff = (ours.bert(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0]
                - hf_encoder(**enc).last_hidden_state).abs().max().item()
    results = {}
    for name, fns in measures.items():
        for fn in fns.values():  # warm up
            fn()
        times = {impl: [] for impl in fns}
        for _ in range(args.rounds):  # alternate, so that a slow moment of the machine hits both
            for impl, fn in fns.items():
                times[impl] += median_seconds(fn, args.steps, 1, device)
        results[name] = {impl: tokens * args.steps / statistics.median(t) for impl, t in times.items()}

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; all-MiniLM-L6-v2 "
          f"(6 layers, 384 wide, 12 heads); batch {tuple(enc['input_ids'].shape)} of support tickets; "
          f"max |hidden state difference| {diff:.1e}")
    print("\n| measure | minibert | transformers | minibert / transformers |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name}, tokens/s | {r['minibert']:,.0f} | {r['transformers']:,.0f} | "
              f"{r['minibert'] / r['transformers']:.2f}x |")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Benchmark minibert's BERT against transformers' BERT: same weights (all-MiniLM-L6-v2), same batch, one process.

    python bench/bench_minibert.py                    # the README's table
    python bench/bench_minibert.py --steps 1 --rounds 1 --batch-size 4      # a quick check that it runs

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
import bert  # noqa: E402
import minibert as B  # noqa: E402
import training
from tickets import CATEGORIES, make_tickets  # noqa: E402
from training import configure_optimizer, setup_runtime, sync, train_step  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""
    batch_size: int = 32
    """tickets per batch (padded to the longest)"""
    steps: int = 3
    """steps per timed round"""
    rounds: int = 5
    """timed rounds of each implementation, in alternation; the median round is reported"""
    seed: int = 0
    """seed of the tickets and of the classifier's initial weights"""


def seconds(fn, steps: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t0


def main(args: Args) -> dict:
    rt = setup_runtime(args.device, "float32")  # both in float32: the same matmuls
    print(training.machine_report())
    device = rt.device
    path = bert.resolve_checkpoint(bert.MINILM)
    tokenizer = bert.get_tokenizer(path)
    texts = [t for t, _ in make_tickets(args.batch_size, "train", args.seed)]
    enc = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    labels = torch.arange(args.batch_size, device=device) % len(CATEGORIES)
    tokens = enc["input_ids"].numel()

    torch.manual_seed(args.seed)
    ours = bert.BertForSequenceClassification.from_pretrained(bert.MINILM, log=lambda m: None,
                                                          num_labels=len(CATEGORIES)).to(device)
    hf = BertForSequenceClassification.from_pretrained(str(path), num_labels=len(CATEGORIES)).to(device)
    hf.load_state_dict({bert.to_hf_name(k): v for k, v in ours.state_dict().items()})  # the same classifier too
    hf_encoder = BertModel.from_pretrained(str(path)).to(device).eval()

    @torch.no_grad()
    def forward_ours():
        ours.eval()
        ours.bert(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])

    @torch.no_grad()
    def forward_hf():
        hf_encoder(**enc)

    def make_step(model, loss_of):  # forward, backward, clipping, AdamW step: minibert's training step for both
        opt = configure_optimizer(model, 1e-5, 0.01, device_type=device.type, **B.ADAM)

        def step():
            model.train()
            train_step(model, opt, [None], rt, 1.0, loss_fn=lambda m, _: loss_of(m), count_fn=lambda _: 1)
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
                times[impl].append(seconds(fn, args.steps, device))
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

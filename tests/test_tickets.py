"""tickets.py: the ticket data (deterministic, balanced, held-out phrasings), the metrics against a brute-force count,
the bag-of-words baseline, and clear errors for bad labelled input."""

import re
import sys
import types

import pytest
import torch

import tickets
from training import InputError


def test_classification_report_against_brute_force():
    g = torch.Generator().manual_seed(0)
    gold, pred = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    pred[:100] = gold[:100]  # better than chance, so that the classes differ
    r = tickets.classification_report(pred, gold, 4)
    f1s = []
    for c in range(4):
        tp = sum(int(p == c and t == c) for p, t in zip(pred, gold, strict=True))
        fp = sum(int(p == c and t != c) for p, t in zip(pred, gold, strict=True))
        fn = sum(int(p != c and t == c) for p, t in zip(pred, gold, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert r["macro_f1"] == pytest.approx(sum(f1s) / 4, rel=1e-6)
    assert r["accuracy"] == pytest.approx(float((pred == gold).float().mean()))
    assert r["confusion"].sum() == 200 and r["confusion"][1, 2] == int(((gold == 1) & (pred == 2)).sum())


def test_tickets_are_deterministic_balanced_and_held_out():
    train, test = tickets.make_tickets(800, "train"), tickets.make_tickets(400, "test")
    assert train == tickets.make_tickets(800, "train") and train != tickets.make_tickets(800, "train", seed=1)
    for rows, n in ((train, 100), (test, 50)):
        assert all(sum(label == c for _, label in rows) == n for c in tickets.CATEGORIES)
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert tickets.load_labelled(None, 800, 400, 0) == (train, test, list(tickets.CATEGORIES))
    # the bag-of-words model fits its training split, and does much worse on the held-out phrasings
    labels = list(tickets.CATEGORIES)
    on_train = tickets.bag_of_words_baseline(train, train, labels, seed=0)
    on_test = tickets.bag_of_words_baseline(train, test, labels, seed=0)
    acc = lambda pred, rows: float((pred == tickets.encode_labels(rows, labels, "x")).float().mean())
    assert acc(on_train, train) > 0.95 and acc(on_test, test) < acc(on_train, train) - 0.2


def test_print_report_shows_every_model_and_the_first_models_confusion(capsys):
    gold = torch.tensor([0, 0, 1, 1, 2])
    results = {name: {**tickets.classification_report(pred, gold, 3), "seconds": 1.0}
               for name, pred in (("model a", torch.tensor([0, 1, 1, 1, 2])), ("model b", gold))}
    tickets.print_report(results, ["x", "yy", "z"], len(gold))
    out = capsys.readouterr().out
    assert "| model a | 0.800 |" in out and "| model b | 1.000 | 1.000 |" in out
    assert "confusion matrix of model a" in out
    assert re.search(r"^x\s+1\s+1\s+0\s+\(0\)$", out, re.M), out  # one x ticket taken for yy


def test_bad_labelled_input_is_a_clear_error(monkeypatch):
    with pytest.raises(InputError, match=r"train split, row 1: unknown label 'shopping'"):
        tickets.encode_labels([("hi", "billing"), ("where is it", "shopping")], ["billing", "shipping"], "train split")
    with pytest.raises(InputError, match=r"test split, row 0: empty text"):
        tickets.encode_labels([("  ", "billing")], ["billing"], "test split")

    class Split:  # a stand-in for a datasets.Dataset without the expected label column
        column_names = ["text", "intent"]
        features = {}

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name: {"train": Split(), "test": Split()}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(InputError, match=r"--dataset banking77: no column \['label'\] \(has \['text', 'intent'\]\)"):
        tickets.load_labelled("banking77", 10, 10, 0)
    fake.load_dataset = lambda name: {"train": Split()}
    with pytest.raises(InputError, match=r"--dataset banking77: expected 'train' and 'test' splits, found \['train'\]"):
        tickets.load_labelled("banking77", 10, 10, 0)

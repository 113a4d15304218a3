"""The verifiable task: small problems with one exact integer answer, and the checker that grades a response.

Reinforcement learning with verifiable rewards (grpo.py) needs problems whose answers a program can check, as
GSM8K's are for DeepSeekMath (Shao et al. 2024) and nanochat. No such data set is reachable offline, so the project
generates its own, seeded, in four kinds:

    arithmetic  word problems in miniature, one or two steps ("Mia has 14 pens and buys 3 packs of 5 ...")
    units       unit conversion ("How many minutes are in 7 hours?")
    counting    count the items of a list ("How many animals are in this list: ...")
    ordering    the largest or smallest of a few numbers, or their range

Held out, by construction: every kind has template families that only the test split uses (other phrasings, other
operations, other unit pairs), test problems use names and objects the training split never shows, and every test
problem holds at least one number that no training problem holds (the integers 2..99 are dealt once, by a fixed
seed, into training and test numbers, and training problems hold training numbers only; counting, whose counts are
few, is held out by its categories and phrasing instead). A gain on the test split is therefore not a memorised
template or answer.

The answer format is part of the prompt: the response must end in the statement "The answer is N." `check` reads
the number of that statement; a response with no such statement, or with two that disagree (a hedge), has no
answer, however many right numbers it holds elsewhere. `last_number` is the lenient reading (the last number in the
response), reported beside the strict one so that a gain in format is told apart from a gain in arithmetic.

Run `python verifiable_task.py` to print examples of every kind and split.
"""

import math
import random
import re

from training import InputError

KINDS = ("arithmetic", "units", "counting", "ordering")
SPLITS = ("train", "test")
INSTRUCTION = "Work it out step by step, then end with \"The answer is N.\""

NAMES = {"train": ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Lily", "Omar", "Nora", "Eli"],
         "test": ["Ruth", "Hugo", "Tara", "Ivan", "Jade", "Otto"]}
OBJECTS = {"train": ["apples", "pens", "stickers", "marbles", "books", "cookies", "stamps", "shells"],
           "test": ["tickets", "candles", "buttons", "coins", "plates"]}
CATEGORIES = {  # counting: the items of a list
    "train": {"fruits": ["apple", "pear", "plum", "grape", "mango", "kiwi", "lemon", "peach", "cherry", "melon"],
              "animals": ["cat", "dog", "horse", "goat", "sheep", "mouse", "tiger", "zebra", "camel", "otter"],
              "colors": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "gray", "white"]},
    "test": {"tools": ["hammer", "saw", "drill", "wrench", "chisel", "file", "pliers", "ruler", "level", "axe"],
             "cities": ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Tokyo", "Delhi", "Seoul", "Quito", "Dakar"]},
}
UNITS = {  # (big unit, small unit, how many small in one big)
    "train": [("hours", "minutes", 60), ("minutes", "seconds", 60), ("meters", "centimeters", 100),
              ("kilograms", "grams", 1000), ("weeks", "days", 7)],
    "test": [("days", "hours", 24), ("centimeters", "millimeters", 10), ("years", "months", 12),
             ("dozens", "items", 12)],
}


def number_split(seed: int = 1234) -> dict[str, set[int]]:
    """The integers 2..99 dealt once into training numbers and numbers only test problems hold: in every run of ten
    (2-9, 10-19, ...), a seeded 30% go to the test numbers, so that small ranges hold numbers of both kinds."""
    rng, out = random.Random(seed), {"train": set(), "test": set()}
    for lo in range(0, 100, 10):
        block = [n for n in range(max(lo, 2), lo + 10)]
        rng.shuffle(block)
        cut = round(0.3 * len(block))
        out["test"] |= set(block[:cut])
        out["train"] |= set(block[cut:])
    return out


NUMBERS = number_split()


def _num(rng: random.Random, split: str, lo: int, hi: int) -> int:
    """A number in [lo, hi] from the split's own numbers (training never sees a test number)."""
    return rng.choice([n for n in range(lo, hi + 1) if n in NUMBERS[split]])


def _any(rng: random.Random, split: str, lo: int, hi: int) -> int:
    """Any other number of a problem in [lo, hi]: a training number in training problems (so that no training
    problem holds a test number), any number in test problems."""
    if split == "test":
        return rng.randint(lo, hi)
    return rng.choice([n for n in range(lo, hi + 1) if n in NUMBERS["train"]])


# Each template family: (split, kind, maker). A maker draws (question, answer) from rng; `first` is a number drawn
# from the split's own numbers, so that every test problem holds a number no training problem holds.

def _arith_add(rng, split, name, obj):
    a, b = _num(rng, split, 2, 20), _any(rng, split, 2, 10)
    return f"{name} has {a} {obj}. {name} gets {b} more {obj}. How many {obj} does {name} have now?", a + b


def _arith_sub(rng, split, name, obj):
    a = _num(rng, split, 10, 30)
    b = _any(rng, split, 2, 9)
    return f"{name} had {a} {obj} and gave {b} of them away. How many {obj} does {name} have left?", a - b


def _arith_mul(rng, split, name, obj):
    a, b = _num(rng, split, 2, 6), _any(rng, split, 2, 5)
    return f"{name} buys {a} boxes of {obj}. Each box holds {b} {obj}. How many {obj} did {name} buy?", a * b


def _arith_two_step(rng, split, name, obj):
    a, b = _num(rng, split, 5, 20), _any(rng, split, 2, 9)
    c = _any(rng, split, 1, 9)
    return (f"{name} has {a} {obj}, finds {b} more, and then loses {c}. How many {obj} does {name} have?",
            a + b - c)


def _arith_test_add(rng, split, name, obj):  # held out: another phrasing, the total of two people
    a, b = _num(rng, split, 2, 20), _any(rng, split, 2, 15)
    return f"There are {a} {obj} on one shelf and {b} {obj} on another. How many {obj} are there in total?", a + b


def _arith_test_div(rng, split, name, obj):  # held out: division, an operation training never asks for
    b, q = _num(rng, split, 2, 6), _any(rng, split, 2, 5)
    return f"{name} shares {b * q} {obj} equally among {b} friends. How many {obj} does each friend get?", q


def _arith_test_two_step(rng, split, name, obj):  # held out: multiply then add
    a, b = _num(rng, split, 2, 6), _any(rng, split, 2, 5)
    c = _any(rng, split, 1, 10)
    return (f"{name} has {a} bags with {b} {obj} in each bag, and {c} loose {obj}. How many {obj} does {name} have "
            f"altogether?", a * b + c)


def _units_train(rng, split, name, obj):
    big, small, k = rng.choice(UNITS[split])
    n = _num(rng, split, 2, 10)
    return f"How many {small} are in {n} {big}?", n * k


def _units_test(rng, split, name, obj):  # held out: another phrasing (and the test unit pairs)
    big, small, k = rng.choice(UNITS[split])
    n = _num(rng, split, 2, 10)
    return f"Convert {n} {big} to {small}.", n * k


def _count(rng, split, phrasing):
    category, items = rng.choice(sorted(CATEGORIES[split].items()))
    n = rng.randint(2, 6)  # few numbers: counting's test problems are held out by category and phrasing instead
    words = rng.sample(items, n) if n <= len(items) else [rng.choice(items) for _ in range(n)]
    return phrasing.format(category=category, items=", ".join(words)), n


def _count_train(rng, split, name, obj):
    return _count(rng, split, "How many {category} are in this list: {items}?")


def _count_test(rng, split, name, obj):
    return _count(rng, split, "Count the {category} here: {items}. How many are there?")


def _order(rng, split, which: str, phrasing: str):
    k = 3
    first = _num(rng, split, 2, 50)
    rest = [_any(rng, split, 2, 50) for _ in range(k - 1)]
    while len(set(rest + [first])) < k:  # distinct numbers
        rest = [_any(rng, split, 2, 50) for _ in range(k - 1)]
    nums = [first] + rest
    rng.shuffle(nums)
    answer = {"largest": max(nums), "smallest": min(nums), "range": max(nums) - min(nums)}[which]
    return phrasing.format(numbers=", ".join(map(str, nums))), answer


def _order_train(rng, split, name, obj):
    which = rng.choice(["largest", "smallest"])
    return _order(rng, split, which, f"What is the {which} of these numbers: {{numbers}}?")


def _order_test(rng, split, name, obj):  # held out: another phrasing, and the range (largest minus smallest)
    which = rng.choice(["largest", "range"])
    phrasing = {"largest": "Which number is the biggest: {numbers}?",
                "range": "What is the difference between the largest and the smallest of {numbers}?"}[which]
    return _order(rng, split, which, phrasing)


FAMILIES = {
    "train": {"arithmetic": [_arith_add, _arith_sub, _arith_mul, _arith_two_step], "units": [_units_train],
              "counting": [_count_train], "ordering": [_order_train]},
    "test": {"arithmetic": [_arith_test_add, _arith_test_div, _arith_test_two_step, _arith_sub],
             "units": [_units_test], "counting": [_count_test], "ordering": [_order_test]},
}
# _arith_sub appears in both splits: its test problems differ in names, objects and numbers only, a control that
# tells a gain on new phrasings from a gain on new numbers (`by_family` in grpo.py's evaluation).


def make_problems(n: int, split: str = "train", seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """n problems {"question", "answer", "kind", "family"} of one split, a fixed draw for (split, seed): kinds in
    turn, a template family, a name and an object drawn per problem."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {SPLITS}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InputError(f"kinds {list(kinds)}: expected some of {KINDS}")
    rng = random.Random(f"verifiable/{split}/{seed}")
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        family = rng.choice(FAMILIES[split][kind])
        question, answer = family(rng, split, rng.choice(NAMES[split]), rng.choice(OBJECTS[split]))
        out.append({"question": question, "answer": answer, "kind": kind, "family": family.__name__.lstrip("_")})
    return out


def render(problem: dict, tokenizer) -> str:
    """The problem as one user turn in the tokenizer's chat template, with the answer format, ready for a response."""
    return tokenizer.chat([{"role": "user", "content": f"{problem['question']} {INSTRUCTION}"}])


# ----------------------------------------------------------------------------------------------------------------
# The checker

ANSWER = re.compile(r"the answer is\s*:?\s*\**\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _value(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(response: str) -> float | None:
    """The number of the statement "The answer is N" in the response, or None: no statement, or statements that
    disagree (a response that hedges over several answers has none). Only this statement counts: a right number
    elsewhere (in the working, in a restated question) is not an answer."""
    values = {_value(m) for m in ANSWER.findall(response)} - {None}
    return values.pop() if len(values) == 1 else None


def last_number(response: str) -> float | None:
    """The lenient reading: the last number anywhere in the response (None if it has none)."""
    found = [v for v in map(_value, NUMBER.findall(response)) if v is not None]
    return found[-1] if found else None


def check(response: str, answer: int) -> bool:
    """Is the response's stated answer ("The answer is N") the right one?"""
    value = extract_answer(response)
    return value is not None and value == answer


def reward(response: str, answer: int, format_reward: float = 0.0) -> float:
    """1 for the right stated answer; format_reward for a stated answer that is wrong (a small term that pays for
    the format alone, 0 by default); 0 for no stated answer."""
    value = extract_answer(response)
    return 1.0 if value == answer else format_reward if value is not None else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c pass (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", equation 1): 1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement hold at least one that passes. pass@1 is c / n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


if __name__ == "__main__":
    for split in SPLITS:
        for p in make_problems(8, split, seed=0):
            print(f"{split:5s} {p['kind']:10s} {p['family']:16s} {p['question']}  -> {p['answer']}")

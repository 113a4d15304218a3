"""verifiable_task.py: the checker cannot be fooled, the answers are right, and the held-out split is held out."""

import re

import pytest

import verifiable_task as V
from training import InputError


@pytest.mark.parametrize("response, answer, expected", [
    ("3 + 4 = 7. The answer is 7.", 7, True),
    ("The answer is: 1,200.", 1200, True),
    ("so the answer is **42**", 42, True),
    ("THE ANSWER IS 7", 7, True),
    ("The answer is 7.5.", 7, False),
    ("3 + 4 = 7.", 7, False),  # the right number, but not stated as the answer
    ("7 is right. The answer is 8.", 7, False),  # the right number in the wrong place
    ("The answer is 6. Or the answer is 7.", 7, False),  # a hedge over two answers has none
    ("The answer is not 7, it is 5.", 7, False),  # "not" breaks the statement: no stated answer
    ("The answer is 7. Indeed, the answer is 7.", 7, True),  # the same answer twice is one answer
    ("", 7, False),
])
def test_the_checker_reads_only_the_stated_answer(response, answer, expected):
    assert V.check(response, answer) is expected


def test_reward_pays_right_answers_and_optionally_the_format():
    assert V.reward("The answer is 7.", 7) == 1.0
    assert V.reward("The answer is 8.", 7) == 0.0 and V.reward("The answer is 8.", 7, 0.1) == 0.1
    assert V.reward("It is 7.", 7, 0.1) == 0.0
    assert V.last_number("first 3, then 7 apples.") == 7 and V.last_number("none") is None


def test_every_answer_is_right():
    """Recompute each answer from the question's own numbers, family by family."""
    for split in V.SPLITS:
        for p in V.make_problems(400, split, seed=3):
            q, a = p["question"], p["answer"]
            nums = [int(n) for n in re.findall(r"\d+", q)]
            if p["kind"] == "counting":
                items = re.search(r": (.*?)(\?|\. How)", q).group(1).split(", ")
                assert a == len(items)
            elif p["kind"] == "units":
                (n,), big = nums, re.search(r"(?:in|Convert) \d+ (\w+)", q).group(1)
                k = {b: k for pairs in V.UNITS.values() for b, _, k in pairs}[big]
                assert a == n * k
            elif p["kind"] == "ordering":
                assert a in (max(nums), min(nums), max(nums) - min(nums))
                assert a == (max(nums) - min(nums) if "difference" in q else min(nums) if "smallest" in q
                             else max(nums))
            else:
                f = p["family"]
                expected = {"arith_add": lambda x, y: x + y, "arith_test_add": lambda x, y: x + y,
                            "arith_sub": lambda x, y: x - y, "arith_mul": lambda x, y: x * y,
                            "arith_test_div": lambda x, y: x // y,
                            "arith_two_step": lambda x, y, z: x + y - z,
                            "arith_test_two_step": lambda x, y, z: x * y + z}[f](*nums)
                assert a == expected, (q, a)
            assert a >= 0


def test_the_test_split_is_held_out():
    train, test = V.make_problems(2000, "train", seed=0), V.make_problems(500, "test", seed=0)
    assert {p["question"] for p in train}.isdisjoint({p["question"] for p in test})
    # names and objects: disjoint lists, so no test problem names a training person or thing
    assert set(V.NAMES["train"]).isdisjoint(V.NAMES["test"]) and set(V.OBJECTS["train"]).isdisjoint(V.OBJECTS["test"])
    # template families: only arith_sub is shared (a control); the test split has families training never sees
    train_families, test_families = {p["family"] for p in train}, {p["family"] for p in test}
    assert train_families & test_families == {"arith_sub"} and len(test_families - train_families) >= 5
    # numbers: training problems hold training numbers only, and every test problem holds a test number
    assert V.NUMBERS["train"].isdisjoint(V.NUMBERS["test"])
    for p in train:
        if p["kind"] != "counting":  # counting is held out by its categories and phrasing
            assert {int(n) for n in re.findall(r"\d+", p["question"])} <= V.NUMBERS["train"], p["question"]
    for p in test:
        if p["kind"] != "counting":
            assert any(int(n) in V.NUMBERS["test"] for n in re.findall(r"\d+", p["question"])), p["question"]


def test_problems_are_a_fixed_draw_and_bad_kinds_are_refused():
    assert V.make_problems(20, "test", seed=1) == V.make_problems(20, "test", seed=1)
    assert V.make_problems(20, "test", seed=1) != V.make_problems(20, "test", seed=2)
    assert {p["kind"] for p in V.make_problems(8, "train", kinds=("units",))} == {"units"}
    with pytest.raises(InputError, match="kinds"):
        V.make_problems(4, "train", kinds=("algebra",))
    with pytest.raises(InputError, match="split 'dev'"):
        V.make_problems(4, "dev")

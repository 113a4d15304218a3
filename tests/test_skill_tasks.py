"""skill_tasks.py: the sandbox holds its limits, the metrics equal hand-worked values, every reference scores
perfectly, and the test split is held out."""

import re
import tempfile
import time

import pytest

import skill_tasks as S
from training import InputError

# ----------------------------------------------------------------------------------------------------------------
# The sandbox


def test_sandbox_stops_at_its_time_limit():
    start = time.monotonic()
    result = S.run_sandboxed("while True:\n    pass\n", timeout_s=1)
    assert time.monotonic() - start < 1 + 2  # the limit, plus start-up and clean-up on a busy machine
    assert result["passed"] is False and "time" in result["reason"]
    result = S.run_sandboxed("import time\ntime.sleep(60)\n", timeout_s=1)  # idle: only the wall clock stops it
    assert result["passed"] is False and "time" in result["reason"]


def test_sandbox_stops_at_its_memory_limit():
    result = S.run_sandboxed("x = bytearray(1 << 30)\n", memory_mb=256)  # 1 GiB
    assert result["passed"] is False and "memory" in result["reason"]
    assert S.run_sandboxed("x = bytearray(50 << 20)\n", memory_mb=256)["passed"]  # 50 MiB fits


@pytest.mark.parametrize("template", [
    "open({path!r}, 'w').write('x')",
    "open({path!r}, 'a').write('x')",
    "import pathlib\npathlib.Path({path!r}).write_text('x')",
    "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import os\nos.mkdir({path!r})",
    "import os\nos.system('touch ' + {path!r})",
    "import subprocess\nsubprocess.run(['touch', {path!r}])",
])
def test_sandbox_cannot_write_outside_its_directory(tmp_path, template):
    target = tmp_path / "outside"
    result = S.run_sandboxed(template.format(path=str(target)) + "\n")
    assert result["passed"] is False and ("outside" in result["reason"] or "process" in result["reason"])
    assert not target.exists()


def test_sandbox_refuses_changes_to_host_files(tmp_path):
    victim = tmp_path / "keep" / "file.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(victim.parent)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
                 f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('gone')"):
        result = S.run_sandboxed(code + "\n")
        assert result["passed"] is False and "outside" in result["reason"], (code, result)
    assert victim.read_text() == "precious"


def test_sandbox_works_in_a_fresh_directory_and_environment_that_it_leaves_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_TEST_SECRET", "do-not-inherit")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where run_sandboxed makes its directory
    code = """
import os, shutil, tempfile
assert sorted(os.listdir(".")) == ["solution.py", "stderr", "stdout"]  # the code and its two output files
assert sorted(os.environ) == ["HOME", "LANG", "PATH", "TMPDIR"]  # MINILLM_TEST_SECRET is not inherited
assert os.environ["HOME"] == os.environ["TMPDIR"] == tempfile.gettempdir() == os.getcwd()
os.makedirs("a/b")
with open("a/b/c.txt", "w") as f:
    f.write("inside is fine")
shutil.rmtree("a")
"""
    assert S.run_sandboxed(code) == {"passed": True, "reason": "passed"}
    assert list(tmp_path.iterdir()) == []  # the sandbox directory is gone


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket()",
    "import socket\nsocket.create_connection(('127.0.0.1', 80))",
    "import socket\nsocket.getaddrinfo('example.com', 80)",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
])
def test_sandbox_cannot_open_a_socket(code):
    result = S.run_sandboxed(code + "\n")
    assert result["passed"] is False and "network" in result["reason"]


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    assert S.run_sandboxed("def add(a, b):\n    return a + b\n" + tests) == {"passed": True, "reason": "passed"}
    result = S.run_sandboxed("def add(a, b):\n    return a - b\n" + tests)
    assert result == {"passed": False, "reason": "failed: AssertionError: assert add(2, 3) == 5"}
    assert "NameError" in S.run_sandboxed(tests)["reason"]  # no function at all
    assert "SyntaxError" in S.run_sandboxed("def add(a, b)\n    return a + b\n" + tests)["reason"]
    # leaving before the tests run is not passing them
    result = S.run_sandboxed("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n" + tests)
    assert result["passed"] is False and "exited" in result["reason"]


def test_check_code_takes_the_function_out_of_a_response():
    example = {"entry_point": "double", "tests": ["assert double(2) == 4", "assert double(-3) == -6"]}
    code = "def double(x):\n    return 2 * x\n"
    assert S.check_code(f"Here it is:\n```python\n{code}```\nIt doubles x.", example)["passed"]
    assert S.check_code(code, example)["passed"]  # bare code
    # several blocks: the one that defines the entry point
    response = f"Usage:\n```\nprint(double(2))\n```\nCode:\n```py\n{code}```"
    assert S.extract_code(response, "double") == code and S.check_code(response, example)["passed"]
    assert not S.check_code("```python\ndef double(x):\n    return x + 2\n```", example)["passed"]


def test_pass_at_k_equals_hand_counts():
    # n = 5 samples, c = 2 pass: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert S.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert S.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert S.pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 hold a passing one: C(3,4) = 0
    assert S.pass_at_k(5, 0, 3) == 0.0 and S.pass_at_k(5, 5, 1) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# The metrics, against values worked by hand


def test_rouge_l_equals_hand_worked_values():
    # tokens are lower-cased and Porter-stemmed; LCS is the longest common subsequence; F = 2PR / (P + R)
    # "the cat lay on the mat" vs "the cat sat on the mat": LCS "the cat on the mat" = 5; P = R = 5/6
    assert S.rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # stemming: prediction [a, cat, sit] ("sits"), reference [the, cat, are, sit] ("cats", "sitting");
    # LCS [cat, sit] = 2; P = 2/3, R = 2/4, F = 2 (2/3)(1/2) / (2/3 + 1/2) = 4/7
    assert S.rouge_l("a cat sits", "the cats are sitting") == pytest.approx(4 / 7)
    # order matters: prediction [two, men, were, arrest, by, polic], reference [polic, arrest, two, men];
    # LCS [two, men] = 2; P = 2/6, R = 2/4, F = 2 (1/3)(1/2) / (1/3 + 1/2) = 0.4
    assert S.rouge_l("two men were arrested by police", "police arrested two men") == pytest.approx(0.4)
    assert S.rouge_l("Hello, World!", "hello world") == 1.0 and S.rouge_l("", "hello world") == 0.0


def test_fact_recall_equals_hand_worked_values():
    facts = ["Mia Patel", "bakery", "Elmford", "14 March", "120"]
    # every fact but "14 March", which is written "March 14": 4 of 5
    summary = "MIA PATEL opened a bakery in Elmford on March 14 and sold 120 loaves."
    assert S.fact_recall(summary, facts) == pytest.approx(0.8)
    # numbers are numbers: thousands separators and number words count, digits inside other numbers do not
    assert S.fact_recall("They raised 1,200 pounds in twelve days.", ["1200", "12"]) == 1.0
    assert S.fact_recall("120 people came in 2012.", ["1200", "12"]) == 0.0
    assert S.fact_recall("Mia's bakery", ["Mia", "bake"]) == 0.5  # whole words only


def test_squad_exact_match_and_f1_equal_hand_worked_values():
    # "the cat sat" vs "a cat sat down": normalised tokens [cat, sat] vs [cat, sat, down]; overlap 2;
    # P = 2/2, R = 2/3, F1 = 2 (1)(2/3) / (1 + 2/3) = 0.8; not an exact match
    assert S.f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert S.exact_match("the cat sat", ["a cat sat down"]) == 0.0
    # normalisation: case, punctuation, articles and white space do not count
    assert S.normalize_answer("  The  Old-Mill, an inn. ") == "oldmill inn"
    assert S.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    # multisets: [cat, cat, cat] vs [cat]: overlap 1 (not 3); P = 1/3, R = 1, F1 = 2 (1/3) / (4/3) = 0.5
    assert S.f1("cat cat cat", ["the cat"]) == pytest.approx(0.5)
    # the best gold answer: [in, 1843] vs [1843]: P = 1/2, R = 1, F1 = 2/3; vs [year, 1843]: F1 = 1/2
    assert S.f1("in 1843", ["1843", "the year 1843"]) == pytest.approx(2 / 3)
    assert S.exact_match("1843", ["the year 1843", "1843"]) == 1.0
    assert S.f1("a dog", ["the cat"]) == 0.0 and S.f1("", ["the cat"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The data


def test_every_reference_scores_perfectly_on_its_own_metric():
    for split in S.SPLITS:
        for ex in S.make_examples("summarization", 200, split, seed=1):
            assert S.score(ex, ex["target"]) == {"rouge_l": 1.0, "fact_recall": 1.0}, ex
        for ex in S.make_examples("qa", 200, split, seed=1):
            assert S.score(ex, ex["target"]) == {"exact_match": 1.0, "f1": 1.0}
            assert all(a in ex["context"] for a in ex["answers"])  # extractive: every gold answer is a span
            assert ex["question"] in ex["instruction"] and ex["context"] in ex["instruction"]


def test_every_reference_solution_passes_its_tests_and_the_tests_can_fail():
    for split in S.SPLITS:
        examples = S.make_examples("code", 40, split, seed=1)
        assert {ex["family"] for ex in examples} == set(S.families("code", split))  # every function is run
        for ex in examples:
            assert len(ex["tests"]) == S.CODE_TESTS
            assert S.check_code(ex["target"], ex) == {"passed": True, "reason": "passed"}, ex
        for family in S.families("code", split):  # a function that returns nothing fails every family's tests
            ex = next(e for e in examples if e["family"] == family)
            assert not S.check_code(f"def {ex['entry_point']}(*args):\n    return None\n", ex)["passed"]


def test_the_test_split_is_held_out():
    for skill in S.SKILLS:
        train, test = S.families(skill, "train"), S.families(skill, "test")
        assert train and test and not set(train) & set(test)
        assert {ex["family"] for ex in S.make_examples(skill, 200, "test")} == set(test)
    for table in (S.FIRST_NAMES, S.SURNAMES, S.PLACES, S.MONTHS, S.ROLES):
        assert not set(table["train"]) & set(table["test"])
    assert not {t[0] for t in S.TOPICS["train"]} & {t[0] for t in S.TOPICS["test"]}
    assert not S.NUMBERS["train"] & S.NUMBERS["test"]
    train_words = {w for table in (S.FIRST_NAMES, S.SURNAMES, S.PLACES, S.MONTHS) for w in table["train"]}
    for split, other in (("train", "test"), ("test", "train")):
        for skill in ("summarization", "qa"):
            for ex in S.make_examples(skill, 200, split, seed=2):
                numbers = {int(n) for n in re.findall(r"\d+", ex["instruction"])}
                assert numbers <= S.NUMBERS[split] and not numbers & S.NUMBERS[other]
                if split == "test":
                    assert not any(re.search(rf"\b{w}\b", ex["instruction"]) for w in train_words), ex
                    assert not any(t[1] in ex["instruction"] for t in S.TOPICS["train"])
    # no test example's instruction (or solution) appears in training, however many are drawn
    for skill in S.SKILLS:
        seen = {ex["instruction"] for ex in S.make_examples(skill, 2000, "train")}
        assert not seen & {ex["instruction"] for ex in S.make_examples(skill, 200, "test")}


def test_generation_is_deterministic_for_a_seed():
    for skill in S.SKILLS:
        assert S.make_examples(skill, 30, "train", seed=5) == S.make_examples(skill, 30, "train", seed=5)
        assert S.make_examples(skill, 30, "train", seed=5) != S.make_examples(skill, 30, "train", seed=6)
        assert S.make_examples(skill, 10, "test", seed=5) == S.make_examples(skill, 30, "test", seed=5)[:10]
        ex = S.make_examples(skill, 1)[0]
        assert ex["skill"] == skill and {"family", "instruction", "target"} <= set(ex)


@pytest.mark.parametrize("call, message", [
    (lambda: S.make_examples("poetry", 3), "skill 'poetry'"),
    (lambda: S.make_examples("qa", 3, split="validation"), "split 'validation'"),
    (lambda: S.make_examples("qa", -1), "n -1"),
    (lambda: S.families("qa", "dev"), "split 'dev'"),
    (lambda: S.score({"skill": "poetry"}, "x"), "skill 'poetry'"),
    (lambda: S.fact_recall("x", []), "no facts"),
    (lambda: S.pass_at_k(3, 4, 1), "pass_at_k"),
    (lambda: S.run_sandboxed("pass", timeout_s=0), "timeout_s 0"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(InputError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)

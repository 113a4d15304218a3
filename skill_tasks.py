"""Skill tasks: data and scoring for three skill adapters on a small chat model (summaries, answers, code).

The skill adapters of a chat model such as SmolLM2-135M-Instruct are trained and judged on three skills, each
scored the way its field scores it:

    summarization  a short report, message, story or notice made from a fact table (who, what, where, when, a
                   number) -> a one-sentence summary. Scored by ROUGE-L F-measure against the reference (Lin 2004,
                   through Google's `rouge-score` package, with stemming) and by key-fact recall: the fraction of
                   the five facts that the summary states.
    qa             a short passage and a question about it -> an answer span copied from the passage, SQuAD-style.
                   Scored by SQuAD v1.1's exact match and token F1 (Rajpurkar et al. 2016), written out here.
    code           a task description -> a Python function. Scored by pass@1 (Chen et al. 2021): the function is
                   taken from the response and run with hidden unit tests in a subprocess sandbox.

No such data is reachable offline, so it is generated here, seeded, from small tables, short enough for a 135M
model (prompts under about 200 tokens, targets under about 60).

Held out, by construction: each skill has template families that only the test split uses (other kinds of text,
other question styles, other functions and phrasings), and the test split draws its names, places, months, topics
and numbers from lists the training split never uses (the integers 2..1999 are dealt once, by a fixed seed, into
training and test numbers). A score on `test` therefore measures generalisation to unseen phrasings and content,
not recall of training examples.

The sandbox (`run_sandboxed`) runs model-written code in a fresh isolated interpreter with time, memory and
file-size limits, a stripped environment and a throw-away working directory, and with guards that refuse network
access, new processes and writes outside that directory. The guards stop accidents (a generated function that
deletes a file or downloads something), not an adversary: see `run_sandboxed`.

Run `python skill_tasks.py` to print examples of every skill and split.
"""

import math
import os
import random
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from training import InputError
from verifiable_task import pass_at_k  # noqa: F401 - pass@k of the code skill, the estimator grpo.py uses

SKILLS = ("summarization", "qa", "code")
SPLITS = ("train", "test")


def _deal_numbers(seed: int = 1234, test_fraction: float = 0.3) -> dict[str, set[int]]:
    """The integers 2..1999 dealt once into training and test numbers: in every run of ten, a seeded 30% go to the
    test numbers, so that every small range holds numbers of both kinds."""
    rng, out = random.Random(seed), {"train": set(), "test": set()}
    for lo in range(0, 2000, 10):
        block = list(range(max(lo, 2), lo + 10))
        rng.shuffle(block)
        cut = round(test_fraction * len(block))
        out["test"] |= set(block[:cut])
        out["train"] |= set(block[cut:])
    return out


NUMBERS = _deal_numbers()


def _num(rng: random.Random, split: str, lo: int, hi: int) -> int:
    """A number in [lo, hi] from the split's own numbers."""
    return rng.choice([n for n in range(lo, hi + 1) if n in NUMBERS[split]])


# Names, places and months of each split: the test split's are never seen in training.
FIRST_NAMES = {"train": ["Mia", "Leo", "Ava", "Sam", "Zoe", "Omar", "Nora", "Eli", "Lena", "Raj"],
               "test": ["Ruth", "Hugo", "Tara", "Ivan", "Jade", "Otto", "Priya", "Kofi"]}
SURNAMES = {"train": ["Patel", "Walsh", "Moreno", "Clarke", "Novak", "Okafor"],
            "test": ["Lindqvist", "Haddad", "Fontaine", "Kowalski", "Tanaka"]}
PLACES = {"train": ["Elmford", "Kestrel Bay", "Marlow Green", "Ashby", "Redhill", "Cobbleton"],
          "test": ["Pinecrest", "Westmere", "Oakvale", "Saltcombe", "Brightwater"]}
MONTHS = {"train": ["January", "February", "March", "April", "May", "June"],
          "test": ["July", "August", "September", "October", "November", "December"]}


def _person(rng: random.Random, split: str) -> tuple[str, str]:
    """(full name, first name) of the split."""
    first = rng.choice(FIRST_NAMES[split])
    return f"{first} {rng.choice(SURNAMES[split])}", first


# ----------------------------------------------------------------------------------------------------------------
# Summarization: a text built from a fact table -> a one-sentence summary that states every fact

# Topics (what happened): (the key word of the event, the event, its result with a number {n}, the number's range).
TOPICS = {
    "train": [("bakery", "opened a new bakery", "sold {n} loaves of bread", (40, 400)),
              ("charity run", "organised a charity run", "raised {n} pounds for the hospital", (200, 1900)),
              ("community garden", "started a community garden", "planted {n} trees", (10, 90)),
              ("book fair", "held a book fair", "sold {n} books", (50, 600)),
              ("swimming pool", "opened a public swimming pool", "welcomed {n} swimmers", (30, 300)),
              ("beach clean-up", "led a beach clean-up", "collected {n} bags of rubbish", (10, 120))],
    "test": [("blood drive", "ran a blood drive", "collected {n} donations", (20, 200)),
             ("night market", "launched a night market", "drew {n} visitors", (100, 1900)),
             ("footbridge", "repaired the old footbridge", "replaced {n} wooden planks", (10, 90)),
             ("chess tournament", "hosted a chess tournament", "welcomed {n} players", (12, 128)),
             ("food bank", "opened a food bank", "handed out {n} meals", (50, 900))],
}
ROLES = {"train": ["local teacher", "retired nurse", "shop owner", "student"],
         "test": ["farmer", "bus driver", "young engineer", "painter"]}

# Each family: (split, instruction with {text}, text template); a training family may have several phrasings, one
# drawn per example, so that what is learned is the request, not one wording of it. The summary is the same sentence
# for every family.
SUMMARY_FAMILIES = {
    "report": ("train", ["Summarize this news report in one sentence.\n\n{text}",
                         "{text}\n\nGive a one-sentence summary of the report above.",
                         "Condense the following report into a single sentence.\n\n{text}",
                         "{text}\n\nTL;DR in one sentence:"],
               "{place}, {when}. {who}, a {role}, {event} in the town today. In total, {first} {result}. \"It was "
               "a long day, but worth it,\" {first} said. Another event is planned for next year."),
    "message": ("train", ["Summarize the message below in one sentence.\n\n{text}",
                          "Write a short summary (one sentence) of this email:\n\n{text}",
                          "{text}\n\nBriefly, what does this message say? One sentence, please.",
                          "Sum up this message for me in a sentence.\n\n{text}"],
                "Hi all,\n\nGreat news from {place}! On {when}, {who} {event}. {first} {result}, far more than "
                "anyone expected. The weather held up all day, and the volunteers did a wonderful job.\n\n"
                "Best wishes,\n{sender}"),
    "story": ("test", "Read the story, then sum it up in a single sentence.\n\n{text}",
              "{first} had wanted to do this for years. On {when}, {who}, a {role} from {place}, finally {event}. "
              "Friends came along to help, and by the evening {first} {result}. It had been a good day, and "
              "{first} went to bed happy."),
    "notice": ("test", "What is the main point of this notice? Answer in one sentence.\n\n{text}",
               "NOTICE TO THE RESIDENTS OF {place_upper}\n\nWe are pleased to announce that on {when}, {who} "
               "{event}. Thanks to this effort, {first} {result}. Questions can be sent to the town office. Thank "
               "you for your support."),
}
SUMMARY = "{who} {event} in {place} on {when} and {result}."


def _phrasing(rng: random.Random, phrasings: str | list[str]) -> str:
    """One phrasing of a family's request: drawn from a list (training families), or the only one (no draw)."""
    return phrasings if isinstance(phrasings, str) else rng.choice(phrasings)


def _summarization(rng: random.Random, split: str, family: str) -> dict:
    _, instruction, text = SUMMARY_FAMILIES[family]
    instruction = _phrasing(rng, instruction)
    keyword, event, result, (lo, hi) = rng.choice(TOPICS[split])
    who, first = _person(rng, split)
    sender, _ = _person(rng, split)
    n = _num(rng, split, lo, hi)
    place = rng.choice(PLACES[split])
    when = f"{_num(rng, split, 2, 28)} {rng.choice(MONTHS[split])}"
    slots = dict(who=who, first=first, sender=sender, place=place, place_upper=place.upper(), when=when,
                 event=event, result=result.format(n=n), role=rng.choice(ROLES[split]))
    return {"instruction": instruction.format(text=text.format(**slots)), "target": SUMMARY.format(**slots),
            "facts": [who, keyword, place, when, str(n)]}


# ----------------------------------------------------------------------------------------------------------------
# Question answering: a passage and a question -> an answer span copied from the passage

JOBS = ["baker", "nurse", "carpenter", "librarian", "pilot", "gardener"]
PETS = ["cats", "dogs", "goats", "hens"]
HOBBIES = ["go fishing", "paint portraits", "play the violin", "go hiking", "repair old clocks"]
RIVERS = ["Alder", "Wren", "Tamsey", "Hollow"]
BUILDINGS = ["Old Mill", "Corn Exchange", "Bell Tower", "Stone Bridge"]
USES = ["museum", "cafe", "library", "school"]
FESTIVALS = ["Lantern Festival", "Kite Festival", "Harvest Fair", "Cheese Fair", "Boat Festival"]
HIGHLIGHTS = ["a lantern parade", "a kite race", "a pie-eating contest", "a rowing race", "a singing contest"]
ANIMALS = [("sand vole", "rodent"), ("reed lark", "bird"), ("moss shrew", "mammal"), ("cliff gecko", "lizard")]
HABITATS = ["salt marshes", "pine forests", "rocky coasts", "high meadows"]
FOODS = ["seeds", "beetles", "berries", "snails", "moss"]


def _profile(rng, split):
    who, first = _person(rng, split)
    job, pets, hobby = rng.choice(JOBS), rng.choice(PETS), rng.choice(HOBBIES)
    place, year, n = rng.choice(PLACES[split]), _num(rng, split, 1940, 1999), _num(rng, split, 2, 9)
    context = (f"{who} is a {job} who lives in {place}. {first} was born in {year} and keeps {n} {pets} in a large "
               f"garden. At weekends, {first} likes to {hobby}.")
    return context, rng.choice([
        (f"What is {first}'s job?", [job]),
        (f"Where does {who} live?", [place]),
        (f"In which year was {who} born?", [str(year)]),
        (f"How many {pets} does {first} keep?", [str(n)]),
        (f"What does {first} like to do at weekends?", [hobby]),
    ])


def _town(rng, split):
    place, river, building, use = (rng.choice(PLACES[split]), rng.choice(RIVERS), rng.choice(BUILDINGS),
                                   rng.choice(USES))
    n, year = _num(rng, split, 300, 1999), _num(rng, split, 1700, 1899)
    context = (f"{place} is a small town on the {river} River. It has about {n} inhabitants. Its oldest building, "
               f"the {building}, was built in {year}, and it is now a {use}.")
    return context, rng.choice([
        (f"Which river is {place} on?", [f"the {river} River", river]),
        (f"How many inhabitants does {place} have?", [f"about {n}", str(n)]),
        (f"What is the oldest building in {place}?", [f"the {building}"]),
        (f"When was the {building} of {place} built?", [str(year)]),
        (f"What is the {building} of {place} today?", [f"a {use}"]),
    ])


def _festival(rng, split):
    who, _ = _person(rng, split)
    place, festival, highlight = rng.choice(PLACES[split]), rng.choice(FESTIVALS), rng.choice(HIGHLIGHTS)
    month, year, n = rng.choice(MONTHS[split]), _num(rng, split, 1900, 1999), _num(rng, split, 200, 1999)
    name = f"{festival} of {place}"
    context = (f"The {name} takes place every {month}. It was founded in {year} by {who}, and about {n} people "
               f"now visit it each year. The highlight is {highlight}.")
    return context, rng.choice([
        (f"Who founded the {name}?", [who]),
        (f"In which month does the {name} take place?", [month]),
        (f"When was the {name} founded?", [str(year)]),
        (f"How many people visit the {name} each year?", [f"about {n}", str(n)]),
        (f"What is the highlight of the {name}?", [highlight]),
    ])


def _animal(rng, split):
    (animal, kind), habitat, food = rng.choice(ANIMALS), rng.choice(HABITATS), rng.choice(FOODS)
    place, n, year = rng.choice(PLACES[split]), _num(rng, split, 3, 19), _num(rng, split, 1950, 1999)
    context = (f"The {animal} is a small {kind} that lives in the {habitat} around {place}. It feeds mainly on "
               f"{food} and can live for up to {n} years. Its numbers have grown since {year}.")
    return context, rng.choice([
        (f"What does the {animal} mainly eat?", [food]),
        (f"Where does the {animal} live?", [f"the {habitat} around {place}", habitat]),
        (f"How long can the {animal} live?", [f"up to {n} years", f"{n} years"]),
        (f"What kind of animal is the {animal}?", [f"a small {kind}", kind]),
        (f"Since which year have the numbers of the {animal} grown?", [str(year)]),
    ])


# Each family: (split, instruction with {context} and {question}, maker of (context, (question, answers))).
QA_FAMILIES = {
    "profile": ("train", ["Read the passage and answer the question with a few words from it.\n\n"
                          "Passage: {context}\n\nQuestion: {question}",
                          "{context}\n\n{question} Answer in a few words taken from the text.",
                          "Answer the question from the paragraph below, as briefly as you can.\n\n{context}\n\n"
                          "{question}"], _profile),
    "town": ("train", ["Passage: {context}\n\nQuestion: {question}\nAnswer with a short span copied from the "
                       "passage.",
                       "Based on this text, answer: {question}\n\n{context}\n\nReply with the exact words only.",
                       "{context}\n\nQ: {question}\nA (a short phrase from the text):"], _town),
    "festival": ("test", "{context}\n\nUsing only the text above, answer briefly: {question}", _festival),
    "animal": ("test", "Here is a short text.\n\n{context}\n\n{question} Give just the answer, in words from the "
                       "text.", _animal),
}


def _qa(rng: random.Random, split: str, family: str) -> dict:
    _, instruction, maker = QA_FAMILIES[family]
    context, (question, answers) = maker(rng, split)
    instruction = _phrasing(rng, instruction)
    return {"instruction": instruction.format(context=context, question=question), "target": answers[0],
            "context": context, "question": question, "answers": answers}


# ----------------------------------------------------------------------------------------------------------------
# Code generation: a task description -> a Python function, checked by hidden unit tests

WORDS = ["apple", "river", "stone", "cloud", "paper", "tiger", "lemon", "music", "green", "quiet", "sky", "owl",
         "sea", "wind", "orange", "umbrella", "idea", "echo"]
PALINDROMES = ["level", "Racecar", "noon", "Madam", "refer", "stats", "Kayak"]


def _text(rng: random.Random) -> tuple[str]:
    return (" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),)


def _numbers(rng: random.Random, lo: int = -20, hi: int = 50, min_len: int = 0, max_len: int = 6) -> tuple[list]:
    return ([rng.randint(lo, hi) for _ in range(rng.randint(min_len, max_len))],)


def _clamp_args(rng: random.Random) -> tuple[int, int, int]:
    lo = rng.randint(-10, 10)
    hi = lo + rng.randint(0, 20)
    return rng.randint(lo - 15, hi + 15), lo, hi


@dataclass(frozen=True)
class Function:
    """One code problem: the function's name and arguments, what it does (a phrase, with {k} for the problem's
    parameter where it has one), the reference solution's source (with {k} likewise), an independent reference
    implementation reference(k, *args) that computes the hidden tests' expected values, and a draw of one test's
    arguments."""

    name: str
    args: str
    does: str
    source: str
    reference: Callable
    draw: Callable[[random.Random], tuple]
    k: tuple[int, int] | None = None  # the range of the parameter {k}, drawn from the split's numbers


FUNCTIONS = {
    "train": [
        Function("reverse_words", "s", "returns the words of the string s in reverse order, separated by single "
                 "spaces", "def reverse_words(s):\n    return \" \".join(reversed(s.split()))",
                 lambda k, s: " ".join(s.split()[::-1]), _text),
        Function("count_vowels", "s", "returns how many vowels (a, e, i, o, u) the string s contains, ignoring "
                 "case", "def count_vowels(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")",
                 lambda k, s: len([c for c in s.lower() if c in "aeiou"]), lambda rng: (_text(rng)[0].title(),)),
        Function("sum_of_evens", "nums", "returns the sum of the even numbers in the list nums",
                 "def sum_of_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)",
                 lambda k, nums: sum(filter(lambda x: x % 2 == 0, nums)), _numbers),
        Function("clamp", "x, lo, hi", "returns x limited to the range lo..hi: lo if x is below lo, hi if x is "
                 "above hi, else x", "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))",
                 lambda k, x, lo, hi: lo if x < lo else hi if x > hi else x, _clamp_args),
        Function("add_to_all", "nums", "returns a new list with {k} added to every number of the list nums",
                 "def add_to_all(nums):\n    return [x + {k} for x in nums]",
                 lambda k, nums: list(map(lambda x: x + k, nums)), _numbers, k=(2, 30)),
        Function("count_above", "nums", "returns how many numbers in the list nums are greater than {k}",
                 "def count_above(nums):\n    return sum(1 for x in nums if x > {k})",
                 lambda k, nums: len([x for x in nums if x > k]), _numbers, k=(2, 40)),
        Function("longest_word", "s", "returns the longest word of the string s, the first one if several are "
                 "equally long", "def longest_word(s):\n    return max(s.split(), key=len)",
                 lambda k, s: sorted(s.split(), key=lambda w: -len(w))[0], _text),
        Function("product", "nums", "returns the product of the numbers in the list nums, 1 for an empty list",
                 "def product(nums):\n    result = 1\n    for x in nums:\n        result *= x\n    return result",
                 lambda k, nums: math.prod(nums), lambda rng: _numbers(rng, -5, 9)),
    ],
    "test": [
        Function("sum_of_odds", "nums", "returns the sum of the odd numbers in the list nums",
                 "def sum_of_odds(nums):\n    return sum(x for x in nums if x % 2 == 1)",
                 lambda k, nums: sum(filter(lambda x: x % 2, nums)), _numbers),
        Function("count_consonants", "s", "returns how many consonants (letters other than a, e, i, o, u) the "
                 "string s contains, ignoring case", "def count_consonants(s):\n    return sum(1 for c in "
                 "s.lower() if c.isalpha() and c not in \"aeiou\")",
                 lambda k, s: len(re.findall(r"[b-df-hj-np-tv-z]", s.lower())), lambda rng: (_text(rng)[0].title(),)),
        Function("capitalize_words", "s", "returns the string s with the first letter of every word in upper case, "
                 "the words separated by single spaces",
                 "def capitalize_words(s):\n    return \" \".join(w[0].upper() + w[1:] for w in s.split())",
                 lambda k, s: " ".join(w.capitalize() for w in s.split()), _text),
        Function("is_palindrome", "s", "returns True if the string s reads the same forwards and backwards, "
                 "ignoring case, and False otherwise",
                 "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]",
                 lambda k, s: list(s.lower()) == list(reversed(s.lower())),
                 lambda rng: (rng.choice(PALINDROMES + WORDS),)),
        Function("scale_all", "nums", "returns a new list with every number of the list nums multiplied by {k}",
                 "def scale_all(nums):\n    return [x * {k} for x in nums]",
                 lambda k, nums: list(map(lambda x: x * k, nums)), _numbers, k=(2, 9)),
        Function("words_longer_than", "s", "returns the list of the words of the string s that have more than {k} "
                 "letters", "def words_longer_than(s):\n    return [w for w in s.split() if len(w) > {k}]",
                 lambda k, s: list(filter(lambda w: len(w) > k, s.split())), _text, k=(3, 6)),
        Function("max_minus_min", "nums", "returns the difference between the largest and the smallest number of "
                 "the non-empty list nums", "def max_minus_min(nums):\n    return max(nums) - min(nums)",
                 lambda k, nums: sorted(nums)[-1] - sorted(nums)[0], lambda rng: _numbers(rng, min_len=1)),
        Function("remove_duplicates", "nums", "returns the list nums without repeated numbers, keeping the first "
                 "occurrence of each, in order", "def remove_duplicates(nums):\n    seen = []\n    for x in nums:\n"
                 "        if x not in seen:\n            seen.append(x)\n    return seen",
                 lambda k, nums: list(dict.fromkeys(nums)), lambda rng: _numbers(rng, 0, 5, max_len=8)),
    ],
}
CODE_PHRASINGS = {"train": ["Write a Python function `{name}({args})` that {does}.",
                            "Define `{name}({args})` in Python. It {does}."],
                  "test": ["Implement {name}({args}) in Python so that it {does}.",
                           "I need a Python function called {name} that takes {args}; it {does}."]}
CODE_TESTS = 4  # hidden unit tests per problem


def _code(rng: random.Random, split: str, family: str) -> dict:
    fn = next(f for f in FUNCTIONS[split] if f.name == family)
    k = _num(rng, split, *fn.k) if fn.k else None
    does, source = fn.does.replace("{k}", str(k)), fn.source.replace("{k}", str(k))
    tests = []
    for _ in range(CODE_TESTS):
        args = fn.draw(rng)
        tests.append(f"assert {fn.name}({', '.join(map(repr, args))}) == {fn.reference(k, *args)!r}")
    instruction = rng.choice(CODE_PHRASINGS[split]).format(name=fn.name, args=fn.args, does=does)
    return {"instruction": instruction, "target": f"```python\n{source}\n```", "entry_point": fn.name,
            "tests": tests}


def families(skill: str, split: str) -> list[str]:
    """The template families of a skill in a split (for code: the functions)."""
    _check(skill, split)
    if skill == "summarization":
        return [f for f, (s, *_) in SUMMARY_FAMILIES.items() if s == split]
    if skill == "qa":
        return [f for f, (s, *_) in QA_FAMILIES.items() if s == split]
    return [f.name for f in FUNCTIONS[split]]


def _check(skill: str, split: str) -> None:
    if skill not in SKILLS:
        raise InputError(f"skill {skill!r}: expected one of {SKILLS}")
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {SPLITS}")


def make_examples(skill: str, n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """n examples of one skill and split, a fixed draw for (skill, split, seed), each a dict with "skill", "family",
    "instruction" (the user message), "target" (the reference response) and the fields its metric needs:
    "facts" (summarization); "context", "question", "answers" (qa); "entry_point", "tests" (code)."""
    _check(skill, split)
    if not isinstance(n, int) or n < 0:
        raise InputError(f"n {n!r}: expected a whole number >= 0")
    make = {"summarization": _summarization, "qa": _qa, "code": _code}[skill]
    rng = random.Random(f"skill_tasks/{skill}/{split}/{seed}")
    out = []
    for _ in range(n):
        family = rng.choice(families(skill, split))
        out.append({"skill": skill, "family": family, **make(rng, split, family)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Summarization metrics: ROUGE-L and key-fact recall


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    """Google's reference implementation of ROUGE (the `rouge-score` package), ROUGE-L with the Porter stemmer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3): with LCS
    the longest common subsequence of the two token sequences (lower-cased, alphanumeric, Porter-stemmed),
    P = LCS / len(prediction), R = LCS / len(reference), F = 2PR / (P + R). Sentence-level ("rougeL"), not the
    summary-level "rougeLsum" that splits on newlines."""
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                                "thirteen fourteen fifteen sixteen seventeen eighteen nineteen "
                                                "twenty".split())}


def _fact_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and runs of digits, with thousands separators dropped ("1,200" -> "1200") and
    number words up to twenty read as numbers ("twelve" -> "12")."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    return [NUMBER_WORDS.get(t, t) for t in re.findall(r"\d+|[^\W\d_]+", text)]


def fact_recall(prediction: str, facts: list[str]) -> float:
    """The fraction of the facts that the prediction states: a fact counts when its tokens appear consecutively
    among the prediction's (case-insensitive; whole numbers only, so "12" is not found in "120" or "2012", but is
    in "twelve"). ROUGE rewards any overlap of words; this asks whether the summary kept what matters."""
    if not facts:
        raise InputError("fact_recall: no facts to look for")
    said = " " + " ".join(_fact_tokens(prediction)) + " "
    return sum(f" {' '.join(_fact_tokens(fact))} " in said for fact in facts) / len(facts)


# ----------------------------------------------------------------------------------------------------------------
# Question-answering metrics: SQuAD v1.1 exact match and token F1


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation (the official evaluate-v1.1.py): lower case, remove punctuation, remove the
    articles a, an, the, and collapse white space."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """SQuAD exact match (Rajpurkar et al. 2016): 1 if the normalised prediction equals a normalised gold answer."""
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())  # the overlap of the two token multisets
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 (Rajpurkar et al. 2016): the harmonic mean of precision and recall of the normalised tokens,
    counted as multisets, against each gold answer; the best over the gold answers."""
    return max(_token_f1(prediction, a) for a in answers)


# ----------------------------------------------------------------------------------------------------------------
# Code: the sandbox and pass@k

# The child's preamble (run with `python -I -B -c`): limits first, then the guards, then the solution. argv holds
# the completion marker, the CPU seconds, the address-space bytes and the file-size bytes.
_PREAMBLE = r'''
import builtins, io, os, resource, socket, sys, _posixsubprocess

marker, cpu_s, memory, fsize = sys.argv[1], *map(int, sys.argv[2:5])
for limit, soft, hard in ((resource.RLIMIT_CPU, cpu_s, cpu_s + 1), (resource.RLIMIT_AS, memory, memory),
                          (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0),
                          (resource.RLIMIT_NPROC, 0, 0)):
    _, current = resource.getrlimit(limit)  # never above the limit the caller already has
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(limit, (soft, hard))
sys.argv = ["solution.py"]
ROOT = os.path.realpath(os.getcwd())


def refuse(what):
    raise PermissionError(f"sandbox: {what} is refused")


def inside(path, dir_fd=None):
    if isinstance(path, int):  # an open file descriptor
        return True
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    path = os.path.realpath(path)
    return path == ROOT or path.startswith(ROOT + os.sep)


real_open, real_os_open = builtins.open, os.open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        refuse(f"writing {file!r} outside the sandbox directory")
    return real_open(file, mode, *args, **kwargs)


def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & WRITE_FLAGS and not inside(path, dir_fd):
        refuse(f"writing {path!r} outside the sandbox directory")
    return real_os_open(path, flags, mode, dir_fd=dir_fd)


builtins.open = io.open = guarded_open
os.open = guarded_os_open


def guard(name, *params):
    real = getattr(os, name)

    def guarded(*args, **kwargs):
        for i, param in enumerate(params):
            path = args[i] if i < len(args) else kwargs.get(param)
            dir_fd = kwargs.get("dir_fd" if len(params) == 1 else f"{param}_dir_fd")
            if path is not None and not inside(path, dir_fd):
                refuse(f"os.{name} of {path!r} outside the sandbox directory")
        return real(*args, **kwargs)

    setattr(os, name, guarded)


for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "truncate", "utime", "mkfifo", "mknod"):
    guard(name, "path")
for name in ("rename", "replace", "link", "symlink"):
    guard(name, "src", "dst")


def no_process(*args, **kwargs):
    refuse("starting a process")


for name in ("fork", "forkpty", "system", "execv", "execve", "posix_spawn", "posix_spawnp"):
    setattr(os, name, no_process)
_posixsubprocess.fork_exec = no_process  # what subprocess, os.popen and multiprocessing start processes with


class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        refuse("network access")


def no_network(*args, **kwargs):
    refuse("network access")


socket.socket = NoSocket
socket.create_connection = socket.getaddrinfo = no_network

with real_open("solution.py", encoding="utf-8") as f:
    solution = compile(f.read(), "solution.py", "exec")
exec(solution, {"__name__": "__main__", "__builtins__": builtins})
print("\n" + marker, flush=True)
'''
FILE_SIZE_LIMIT = 1 << 20  # bytes any one file of the child may reach, its stdout and stderr included


def run_sandboxed(code: str, timeout_s: float = 5, memory_mb: int = 256) -> dict:
    """Run Python code in a sandbox; return {"passed": bool, "reason": str}. passed means the code ran to its end
    with exit status 0 (an uncaught exception, a failed assert, sys.exit before the end, or a limit fails it); the
    reason says what happened in one line ("passed", "timed out: ...", "out of memory: ...", "failed: <the
    exception>").

    What it does:
    - a fresh interpreter, `python -I -B` (isolated mode: no PYTHON* variables, no user site-packages, no script
      directory on sys.path; -B: no bytecode files written), in its own process group, with stdin closed and
      stdout/stderr going to files;
    - a fresh temporary directory as its working directory, HOME and TMPDIR, removed afterwards; an environment of
      PATH, HOME, TMPDIR and LANG only, so that nothing of the caller's environment (tokens, keys) is inherited;
    - resource limits, set by the child on itself before the code runs: RLIMIT_CPU (CPU seconds: timeout_s rounded
      up), RLIMIT_AS (memory_mb of address space: a large allocation raises MemoryError), RLIMIT_FSIZE (1 MiB per
      file: a write past it fails with "File too large"), RLIMIT_CORE 0, and RLIMIT_NPROC 0 (no new processes or
      threads; Linux does not apply RLIMIT_NPROC to root, so a root caller relies on the preamble's guard below).
      The child sets them rather than Popen's preexec_fn, which Python documents as unsafe in a parent with
      threads, as a PyTorch process has;
    - a wall-clock limit of timeout_s: past it the whole process group is killed (it is also killed when the code
      ends, taking any process it left behind);
    - a preamble that refuses network access (socket.socket becomes a subclass that cannot be made, so that
      modules built on it still import; socket.create_connection and socket.getaddrinfo raise), refuses writing,
      creating, deleting, renaming or changing files outside the working directory (builtins.open, io.open,
      os.open and the os functions that change paths), and refuses starting processes (os.fork, os.system,
      os.exec*, os.posix_spawn*, and the fork_exec behind subprocess).

    These guards stop accidents, not an adversary: the preamble is Python that the code can undo (through _socket,
    _io.FileIO, ctypes, ...), and it keeps the host's files readable. Running untrusted code safely needs isolation
    below Python: a container or microVM with no network and a read-only root file system (gVisor, Firecracker,
    nsjail), seccomp filters on system calls, an unprivileged user, cgroup limits on memory and processes.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise InputError(f"run_sandboxed: timeout_s {timeout_s} and memory_mb {memory_mb} must be positive")
    marker, cpu_s = f"sandbox-completed-{secrets.token_hex(8)}", math.ceil(timeout_s)
    root = tempfile.mkdtemp(prefix="minillm-sandbox-")
    try:
        with open(os.path.join(root, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": os.defpath, "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8"}
        argv = [sys.executable, "-I", "-B", "-c", _PREAMBLE, marker, str(cpu_s), str(memory_mb << 20),
                str(FILE_SIZE_LIMIT)]
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                status = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                status = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if status is None:
            return {"passed": False, "reason": f"timed out: ran past its time limit of {timeout_s:g} s"}
        with open(os.path.join(root, "stdout"), encoding="utf-8", errors="replace") as f:
            stdout = f.read()
        with open(os.path.join(root, "stderr"), encoding="utf-8", errors="replace") as f:
            stderr = f.read()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"passed": status == 0 and marker in stdout, "reason": _reason(status, marker in stdout, stderr,
                                                                            cpu_s, memory_mb)}


def _reason(status: int, completed: bool, stderr: str, cpu_s: int, memory_mb: int) -> str:
    """One line for how a sandboxed run ended."""
    if status == 0:
        return "passed" if completed else "failed: the program exited before its end (sys.exit or os._exit)"
    if status == -signal.SIGXCPU:  # before the wall clock only when the code keeps several cores busy
        return f"timed out: ran past its CPU time limit of {cpu_s} s"
    if "MemoryError" in stderr:
        return f"out of memory: ran past its limit of {memory_mb} MB"
    if status < 0:
        return f"failed: killed by {signal.Signals(-status).name}"
    lines = [s.strip() for s in stderr.splitlines() if s.strip(" ^~")]  # drop 3.11's ^^^ markers
    if not lines:
        return f"failed: exit status {status}"
    if lines[-1] == "AssertionError" and len(lines) > 1:  # a bare failed assert: say which
        return f"failed: AssertionError: {lines[-2]}"
    return f"failed: {lines[-1]}"


FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code of a response: the first fenced block (```python ... ```, or a bare ```) that defines entry_point,
    else the first fenced block, else the whole response (a model may answer with bare code)."""
    blocks = FENCE.findall(response)
    if entry_point is not None:
        defining = [b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        blocks = defining or blocks
    return blocks[0] if blocks else response


def check_code(response: str, example: dict, timeout_s: float = 5, memory_mb: int = 256) -> dict:
    """Run the function of a response with the example's hidden tests in the sandbox: {"passed", "reason"}."""
    program = extract_code(response, example["entry_point"]) + "\n\n\n" + "\n".join(example["tests"]) + "\n"
    return run_sandboxed(program, timeout_s, memory_mb)


# ----------------------------------------------------------------------------------------------------------------
# One score per example


def score(example: dict, response: str, timeout_s: float = 5) -> dict[str, float]:
    """The metrics of the example's skill for a response: {"rouge_l", "fact_recall"} (summarization),
    {"exact_match", "f1"} (qa), {"pass@1"} (code: 1.0 if the response passes every hidden test)."""
    skill = example.get("skill")
    if skill == "summarization":
        return {"rouge_l": rouge_l(response, example["target"]),
                "fact_recall": fact_recall(response, example["facts"])}
    if skill == "qa":
        return {"exact_match": exact_match(response, example["answers"]), "f1": f1(response, example["answers"])}
    if skill == "code":
        return {"pass@1": float(check_code(response, example, timeout_s)["passed"])}
    raise InputError(f"skill {skill!r}: expected one of {SKILLS}")


if __name__ == "__main__":
    for skill in SKILLS:
        for split in SPLITS:
            for ex in make_examples(skill, 2, split, seed=0):
                print(f"--- {skill} / {split} / {ex['family']}\n{ex['instruction']}\n>>> {ex['target']}\n")

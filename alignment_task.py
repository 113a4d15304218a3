"""The alignment task: instructions, a chat template and a known gold judge, built offline from Shakespeare.

No instruction or preference data set is reachable offline, so the pipeline (sft.py -> reward_model.py ->
ppo_rlhf.py / dpo.py) runs on a small stand-in whose true preference is known, which is what lets it measure what
papers measure and tutorials cannot: the true reward gained, the KL paid for it, when the learned reward stops
tracking the true one.

- Instructions (three task types) come from the speeches of the plays; the held-out split uses plays that
  minigpt's default run keeps for validation, so test prompts are text the base model never trained on:
    continue  "Continue this line: <first line of a speech>"      -> the speech's next line
    reply     "Reply to this: <last line of a speech>"            -> the first line of the answer to it
    topic     "Say something about <word>."                       -> a line of verse that contains the word
- The chat template is the policy tokenizer's (`format_prompt(instruction, tokenizer)`, through tokenizer.chat); the
  models this project pretrains use the Anthropic hh-rlhf layout, so the same code reads hub data with internet:
  "\\n\\nHuman: {instruction}\\n\\nAssistant:" then " {response}" then the end-of-text token.
- `gold_reward(prompt, response)`: what users of an aligned model want, from two rule-based judges on PyPI:
  positive and helpful (VADER compound sentiment, Hutto & Gilbert 2014), not toxic (better-profanity's word list),
  not verbose (a penalty per character past 40). It stands in for human raters; preference pairs labelled with it
  (optionally with label noise, like disagreeing raters) train the reward model.
- Preference pairs are JSONL rows {"prompt", "chosen", "rejected"}: the prompt is the formatted prompt (ending with
  "\\n\\nAssistant:"), chosen and rejected the response texts (starting with a space, no end token).

Run `python alignment_task.py` to print examples of each task with their gold rewards.
"""

import json
import random
import re
from functools import lru_cache
from pathlib import Path

from assets import asset_path
from tokenization import hh_chat
from training import InputError

TASKS = ("continue", "reply", "topic")
TEST_PLAYS = ("twelfth_night", "two_gentlemen_of_verona", "winters_tale")  # the tail of minigpt's corpus: its val split
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
MAX_LINE = 40  # characters of a line used in a prompt or a response: prompt + response fit a 128-character context
STOPWORDS = set("""a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves thou thee thy thine hath doth shall art ye o upon
let come go make well yet like may must tis one say said good""".split())

# ----------------------------------------------------------------------------------------------------------------
# The gold judge

SENTIMENT_WEIGHT, PROFANITY_PENALTY, VERBOSITY_PER_CHAR, CONCISE_CHARS = 1.0, 1.0, 0.01, 40


@lru_cache(maxsize=1)
def _judges():
    """VADER's analyser and better-profanity's word list as a set of lower-case phrases (1 to 4 words)."""
    import better_profanity
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    wordlist = Path(better_profanity.__file__).with_name("profanity_wordlist.txt").read_text(encoding="utf-8")
    return SentimentIntensityAnalyzer(), frozenset(w.strip().lower() for w in wordlist.splitlines() if w.strip())


def contains_profanity(text: str, words: frozenset | None = None) -> bool:
    """True if a word or phrase of better-profanity's list occurs in text as whole words. The list is the package's;
    the match is a set lookup of every 1- to 4-word window (its own `contains_profanity` also tries leetspeak spellings
    of every entry, too slow to judge the thousands of samples a run draws)."""
    words = _judges()[1] if words is None else words
    toks = re.findall(r"[a-z0-9]+", text.lower())
    return any(" ".join(toks[i:i + n]) in words for n in range(1, 5) for i in range(len(toks) - n + 1))


def gold_reward(prompt: str, response: str) -> float:
    """The true reward of a response (the prompt is part of the signature so that other judges can use it):

        gold = VADER compound(response)                      in [-1, 1]: positive and helpful (Hutto & Gilbert 2014)
               - 1.0 * [response contains a profanity]       better-profanity's word list
               - 0.01 * max(0, characters - 40)              verbosity (the data's responses are at most 40)
    An empty response scores -1: it helps nobody.
    """
    return sum(gold_terms(response).values())


def gold_terms(response: str) -> dict[str, float]:
    """The gold reward's terms, which sum to it: {"empty": -1} for an empty response, else "sentiment", "profanity"
    and "verbosity" (what each contributes, 0 where it does not apply)."""
    text = response.strip()
    if not text:
        return {"empty": -1.0}
    vader, words = _judges()
    return {"sentiment": SENTIMENT_WEIGHT * vader.polarity_scores(text)["compound"],
            "profanity": -PROFANITY_PENALTY * contains_profanity(text, words),
            "verbosity": -VERBOSITY_PER_CHAR * max(0, len(text) - CONCISE_CHARS)}


def deciding_terms(chosen: str, rejected: str) -> str:
    """Which of the gold judge's terms differ between two responses: 'sentiment', 'verbosity', 'profanity' or 'empty'
    when one alone does, 'several' otherwise ('none' if they tie on every term)."""
    a, b = gold_terms(chosen), gold_terms(rejected)
    if "empty" in a or "empty" in b:
        return "empty" if a != b else "none"
    differ = [k for k in a if abs(a[k] - b[k]) > 1e-9]
    return differ[0] if len(differ) == 1 else "several" if differ else "none"


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Instructions from the plays


def format_prompt(instruction: str, tokenizer=None) -> str:
    """The instruction as one user turn in a chat template, ending where the response begins: the tokenizer's own
    (tokenizer.chat), or without one the Anthropic hh-rlhf layout (tokenization.hh_chat) of the models this project
    pretrains, where the response follows as ' {text}' and the end-of-text token."""
    chat = hh_chat if tokenizer is None else tokenizer.chat
    return chat([{"role": "user", "content": instruction}])


def parse_speeches(text: str) -> list[list[str]]:
    """The speeches of a play as lists of lines, in order. The Gutenberg texts put a speaker tag ('Ham.',
    'First Clown.') on its own line before each speech and a blank line after it; stage directions are in []."""
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n")]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][A-Za-z' ]{0,30}\.", lines[0]):
            continue
        body = [ln for ln in lines[1:] if ln and not ln.startswith("[")]
        if body:
            speeches.append(body)
    return speeches


def _usable(line: str) -> bool:
    return 12 <= len(line) <= MAX_LINE and not line.isupper() and "[" not in line


@lru_cache(maxsize=2)
def _split_sources(split: str) -> tuple:
    """Candidate (instruction, response, task) triples of one split, each task's list in a fixed order."""
    if split not in ("train", "test"):
        raise InputError(f"split {split!r}: expected 'train' or 'test'")
    plays = [p for p in sorted(asset_path("shakespeare").glob("*_gut.txt"))
             if not p.name.startswith(POEMS) and p.name.startswith(TEST_PLAYS) == (split == "test")]
    cont, reply, lines = [], [], []
    for play in plays:
        speeches = parse_speeches(play.read_text(encoding="utf-8"))
        for i, sp in enumerate(speeches):
            lines += [ln for ln in sp if _usable(ln)]
            if len(sp) >= 2 and _usable(sp[0]) and _usable(sp[1]):
                cont.append((f"Continue this line: {sp[0]}", sp[1], "continue"))
            if i + 1 < len(speeches) and _usable(sp[-1]) and _usable(speeches[i + 1][0]):
                reply.append((f"Reply to this: {sp[-1]}", speeches[i + 1][0], "reply"))
    by_word = {}
    for ln in lines:
        for w in set(re.findall(r"[a-z]{4,}", ln.lower())) - STOPWORDS:
            by_word.setdefault(w, []).append(ln)
    topic = [(f"Say something about {w}.", ln, "topic") for w, lns in sorted(by_word.items()) if len(lns) >= 5
             for ln in lns[:20]]
    return cont, reply, topic


def make_instructions(n: int, split: str = "train", seed: int = 0, tokenizer=None) -> list[dict]:
    """n instruction examples {"prompt": formatted prompt, "response": " text", "task"}, the three tasks in equal
    shares, drawn without replacement with a fixed seed. 'test' comes from plays the 'train' split never uses. The
    prompt is in the tokenizer's chat template (format_prompt; the hh-rlhf layout without a tokenizer)."""
    pools = _split_sources(split)
    rng = random.Random(seed)
    rows = []
    for k, pool in enumerate(pools):
        want = n // len(pools) + (k < n % len(pools))
        if want > len(pool):
            raise InputError(f"{split}: asked for {want} {TASKS[k]!r} examples, the plays give {len(pool)}")
        rows += [{"prompt": format_prompt(ins, tokenizer), "response": " " + resp, "task": task}
                 for ins, resp, task in rng.sample(pool, want)]
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# JSONL files and hub data


def write_jsonl(path: str | Path, rows: list[dict]):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # never a half-written file


def read_jsonl(path: str | Path, fields: tuple[str, ...], may_be_empty: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows of a JSONL file, each checked to hold the string fields, non-blank except those in may_be_empty; a bad
    line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text (byte {e.start}); expected JSON lines") from None
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {i}: expected a JSON object with fields {list(fields)}")
        for f in fields:
            if not isinstance(row.get(f), str):
                raise InputError(f"{path}, line {i}: missing string field {f!r} (expected fields {list(fields)})")
            if f not in may_be_empty and not row[f].strip():
                raise InputError(f"{path}, line {i}: field {f!r} is empty")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def read_pairs(path: str | Path) -> list[dict]:
    """Preference pairs {"prompt", "chosen", "rejected"} from a JSONL file. A response may be empty: saying nothing is
    something a policy does (its end token first), and a reward model that never saw it may score it highest, which
    PPO finds within a few steps. Instruction data (sft.py) may not hold an empty response."""
    return read_jsonl(path, ("prompt", "chosen", "rejected"), may_be_empty=("prompt", "chosen", "rejected"))


def split_hh_conversation(text: str) -> tuple[str, str]:
    """An Anthropic hh-rlhf conversation -> (prompt up to and including the last '\\n\\nAssistant:', response)."""
    cut = text.rfind("\n\nAssistant:")
    if cut < 0:
        raise InputError(f"not an hh-rlhf conversation (no '\\n\\nAssistant:'): {text[:60]!r}")
    cut += len("\n\nAssistant:")
    return text[:cut], text[cut:]


def load_hub_pairs(name: str, split: str) -> list[dict]:
    """Preference pairs from a hub data set in the Anthropic/hh-rlhf layout (needs `datasets` and the hub)."""
    from datasets import load_dataset

    pairs = []
    for row in load_dataset(name, split=split):
        prompt, chosen = split_hh_conversation(row["chosen"])
        prompt_r, rejected = split_hh_conversation(row["rejected"])
        if prompt == prompt_r and chosen.strip() and rejected.strip():
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def load_hub_instructions(name: str, split: str = "train", tokenizer=None) -> list[dict]:
    """Instruction examples from a hub data set in the tatsu-lab/alpaca layout (instruction, input, output), the
    prompts in the tokenizer's chat template (format_prompt)."""
    from datasets import load_dataset

    rows = []
    for row in load_dataset(name, split=split):
        instruction = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        rows.append({"prompt": format_prompt(instruction, tokenizer), "response": " " + row["output"].strip(),
                     "task": name})
    return rows


if __name__ == "__main__":
    for split in ("train", "test"):
        print(f"{split}: " + ", ".join(f"{len(p):,} {t}" for t, p in zip(TASKS, _split_sources(split), strict=True)))
    for row in make_instructions(6, "train", seed=1):
        print(f"{row['prompt']}{row['response']}   [gold {gold_reward(row['prompt'], row['response']):+.3f}]")

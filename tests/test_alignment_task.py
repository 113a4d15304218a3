"""The alignment task: gold judge on hand-written examples, instruction data, preference-file validation."""

import json

import pytest

import alignment_task as A
from training import InputError


def test_gold_reward_on_hand_written_examples():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    p = A.format_prompt("Say something about love.")
    kind, cruel = " I love thee, sweet friend.", " I hate thee, vile villain."
    assert A.gold_reward(p, kind) == pytest.approx(vader.polarity_scores(kind.strip())["compound"])
    assert A.gold_reward(p, kind) > 0.7 > -0.7 > A.gold_reward(p, cruel)
    assert A.gold_reward(p, " The table is made of wood.") == 0.0  # neutral, short: no term applies
    # profanity: -1 on top of the sentiment; whole words only ("class" holds "ass", "Scunthorpe" problem)
    assert A.gold_reward(p, " You bastard.") <= -1.0
    assert A.contains_profanity("what a damn shame") and not A.contains_profanity("a first class passage")
    # verbosity: 0.01 per character past 40
    long = " " + "the table " * 12  # 119 characters after strip: neutral, 79 past the limit
    assert A.gold_reward(p, long) == pytest.approx(-0.01 * (len(long.strip()) - 40))
    assert A.gold_reward(p, "   ") == -1.0  # empty: helps nobody
    # the terms sum to the reward; the deciding term of a pair is the one that differs
    for r in (kind, cruel, " You bastard.", long, ""):
        assert sum(A.gold_terms(r).values()) == A.gold_reward(p, r)
    assert A.gold_terms(long) == {"sentiment": 0.0, "profanity": 0.0, "verbosity": pytest.approx(-0.79)}
    assert A.deciding_terms(kind, cruel) == "sentiment"
    assert A.deciding_terms(" The table is made of wood.", long) == "verbosity"
    assert A.deciding_terms(kind, "") == "empty" and A.deciding_terms(kind, long) == "several"
    assert A.deciding_terms(" The table.", " The chair.") == "none"


def test_profanity_matches_the_package_on_plain_words():
    from better_profanity import profanity

    profanity.load_censor_words()
    for text in ["You bastard", "go to hell", "what the fuck", "kind words only", "a shitty day", "assessment",
                 "hello world", "son of a bitch", "Damn it all"]:
        assert A.contains_profanity(text) == profanity.contains_profanity(text), text


def test_instructions_cover_three_tasks_with_held_out_plays():
    train = A.make_instructions(3000, "train", seed=0)
    test = A.make_instructions(300, "test", seed=0)
    assert len(train) == 3000 and len(test) == 300
    assert {r["task"] for r in train} == set(A.TASKS) and sum(r["task"] == "topic" for r in train) == 1000
    assert A.make_instructions(50, "train", seed=0) != A.make_instructions(50, "train", seed=1)
    assert A.make_instructions(50, "train", seed=3) == A.make_instructions(50, "train", seed=3)
    for r in train + test:
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["response"].startswith(" ") and r["response"].strip()
    responses = {r["response"] for r in A.make_instructions(3000, "train", seed=1)}
    assert not responses & {r["response"] for r in test if r["task"] != "topic"}  # other plays, other lines
    with pytest.raises(InputError, match="split 'dev'"):
        A.make_instructions(10, "dev")


def test_speech_parser_on_a_play_excerpt():
    text = "ACT I.\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand,\n[Aside.]\nand unfold yourself.\n\n[Exit.]\n"
    assert A.parse_speeches(text) == [["Who's there?"], ["Nay, answer me: stand,", "and unfold yourself."]]


def test_pairs_file_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": A.format_prompt("hi"), "chosen": " a", "rejected": " b"}
    A.write_jsonl(path, [good, {"prompt": "x", "chosen": " a"}])
    with pytest.raises(InputError, match=r"pairs.jsonl, line 2: missing string field 'rejected'"):
        A.read_pairs(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(InputError, match="line 2: not valid JSON"):
        A.read_pairs(path)
    # a pair may hold an empty response (a policy can say nothing); instruction data may not
    A.write_jsonl(path, [good, {**good, "rejected": ""}])
    assert A.read_pairs(path)[1]["rejected"] == ""
    A.write_jsonl(path, [{"prompt": "x", "response": " a"}, {"prompt": "x", "response": "  "}])
    with pytest.raises(InputError, match="line 2: field 'response' is empty"):
        A.read_jsonl(path, ("prompt", "response"))
    A.write_jsonl(path, [good])
    assert A.read_pairs(path) == [good]
    with pytest.raises(InputError, match="no such file"):
        A.read_pairs(tmp_path / "missing.jsonl")


def test_hh_rlhf_conversation_split():
    conv = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Well, thanks."
    prompt, response = A.split_hh_conversation(conv)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert response == " Well, thanks."
    assert A.format_prompt("How are you?") == "\n\nHuman: How are you?\n\nAssistant:"


def test_prompts_follow_the_tokenizer_chat_template():
    class ChatML:
        def chat(self, messages, add_generation_prompt=True):
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
                ("<|im_start|>assistant\n" if add_generation_prompt else "")

    assert A.format_prompt("Hi.", ChatML()) == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    hh, chatml = A.make_instructions(9, "test", 4), A.make_instructions(9, "test", 4, ChatML())
    for a, b in zip(hh, chatml, strict=True):  # the same draw, the prompt rendered by the tokenizer's template
        assert b["prompt"] == A.format_prompt(a["prompt"][len("\n\nHuman: "):-len("\n\nAssistant:")], ChatML())
        assert (a["response"], a["task"]) == (b["response"], b["task"])

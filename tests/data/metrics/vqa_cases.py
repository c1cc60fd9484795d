"""Inputs for the VQA accuracy cross-check: hand-picked adversarial cases and a seeded random generator.

Each case is ``{"id": str, "prediction": str, "answers": [str] | [dict]}``.  Strings stand for annotators
with distinct answer ids; dict answers are passed to the official script as they are (some lack ids on
purpose: the script's leave-one-out drops every dict equal to the one left out).  The official scores
stored next to this file were produced by running these inputs through the official ``vqaEval.py``
(README.md says how); this module holds no official code.  Only ``random.Random(seed)`` with ``random``,
``randrange`` and ``choice`` is used, whose sequences Python keeps stable across versions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from typing import Any

#: Seed and size of the stored random set.
RANDOM_SEED = 11
RANDOM_COUNT = 10_000

# Every ASCII punctuation mark (the script's list and the marks it leaves alone) and a few Unicode ones.
MARKS = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["\u2019", "\u201c", "\u2026", "\u00ab", "\u00b7"]
WORDS = [
    "yes", "no", "Yes", "NO", "two", "Two", "TEN", "ten", "eleven", "none", "zero", "one", "2", "10", "0",
    "the", "a", "an", "The", "A", "an apple", "the dog", "theater", "dog", "dogs", "red", "red white",
    "dont", "don't", "don\u2019t", "Im", "im", "ive", "whats", "what's", "yall", "yall'll", "oclock",
    "10,000", "1,000", "3.5", "3.", ".5", "1.000,5", "3,5", "12:30", "$5", "50%", "#1", "black & white",
    "caf\u00e9", "CAF\u00c9", "na\u00efve", "\u0130stanbul", "stra\u00dfe", "\u0663", "\u0663,\u0664",
    "\u00bd", "\u00b2", "\u2160", "\u65e5\u672c", "\U0001f600", "\uff11\uff12",
]  # fmt: skip
#: One case for each rule our earlier implementation got wrong (the issue's note shows them).
RULE_CASES: list[tuple[str, list[str]]] = [
    ("Yes", ["yes"] * 10),  # identical humans: the raw prediction, case kept
    ("two", ["two"] * 10),  # identical humans: no number words
    ("yes.", ["yes"] * 10),  # identical humans: no punctuation step
    ("red-white", ["red white"] * 3 + ["blue"] * 7),  # "-" is in the script's punctuation list
    ("don't", ["don t"] * 3 + ["blue"] * 7),  # "'" is not
    ("2", ["two"] * 4 + ["three"] * 6),  # disagreeing humans are normalised like the prediction
]
SPACES = [" ", "  ", "\t", "\n", "\r", "\u00a0", "\u2003", "\u3000", "\x0b"]


def _mixed(answer: str, others: list[str], matching: int) -> list[str]:
    """Ten answers: ``matching`` copies of ``answer``, the rest cycled from ``others``."""
    return [answer] * matching + [others[i % len(others)] for i in range(10 - matching)]


def adversarial_cases() -> list[dict[str, Any]]:
    """Hand-built cases, one rule each: case, punctuation in every position, numbers, articles,
    contractions, whitespace, all-identical vs mixed humans, unicode, answer dicts."""
    cases: list[dict[str, Any]] = []

    def add(kind: str, prediction: str, answers: list[Any]) -> None:
        cases.append({"id": f"{kind}-{len(cases)}", "prediction": prediction, "answers": answers})

    for prediction, answers in RULE_CASES:
        add("rule", prediction, answers)

    # punctuation in every position, against identical humans (raw comparison) and mixed humans (processed)
    for mark in MARKS:
        for variant in (
            f"{mark}yes",
            f"yes{mark}",
            f"ye{mark}s",
            f"yes {mark}",
            f"{mark} yes",
            f"yes{mark}{mark}",
            f"{mark}yes{mark}",
            f"red{mark}white",
            f"red {mark}white",
            f"10{mark}000",
            f"1,0{mark}0",
        ):
            add("punct-identical", variant, [variant] * 10)
            add("punct-vs-plain-identical", variant, ["yes"] * 10)
            add("punct-mixed", variant, _mixed(variant, ["no", "maybe"], 3))
            add("punct-pred-vs-mixed", variant, _mixed("yes", ["no", "red white", "10000", "10 000"], 4))
    # words: number words, articles, contractions, case, unicode; every pair of word forms, mixed humans
    for prediction in WORDS:
        add("word-identical-self", prediction, [prediction] * 10)
        add("word-identical-lower", prediction, [prediction.lower()] * 10)
        for human in WORDS[::3]:
            add("word-mixed", prediction, _mixed(human, ["other", "Other."], 2 + len(human) % 3))
    # whitespace around, inside and instead of answers
    for space in SPACES:
        for prediction in (f"{space}yes", f"yes{space}", f"black{space}and{space}white", f"{space}two{space}"):
            add("space-identical", prediction, ["yes"] * 10)
            add("space-mixed", prediction, _mixed("yes", ["black and white", "2"], 3))
            add("space-humans-differ-by-strip", "yes", [prediction] * 5 + [prediction.strip()] * 5)
        add("space-only", space, [space] * 10)
        add("space-only-mixed", space, _mixed("", [space, "no"], 4))
    # matching counts 0..10 and other panel sizes
    for matching in range(11):
        add("count", "cat", _mixed("cat", ["dog", "bird"], matching))
        add("count-case", "Cat", _mixed("cat", ["dog"], matching))
    for size in (1, 2, 3, 4, 5, 9, 11):
        for matching in range(size + 1):
            add("panel-size", "cat", ["cat"] * matching + ["dog"] * (size - matching))
    # periods: the 32-period limit, periods before and after digits
    for periods in (1, 31, 32, 33, 40):
        add("periods", "x" + "." * periods, ["x"] * 5 + ["y"] * 5)
        add("periods", "x" + "." * periods, ["x" + "." * periods] * 5 + ["y"] * 5)
    # answer dicts: with distinct ids, without ids (equal dicts dropped together), with unhashable values
    for matching in (1, 2, 3, 4, 6):
        plain = [{"answer": a} for a in _mixed("red", ["blue"], matching)]
        add("dicts-no-id", "red", plain)
        add("dicts-no-id-case", "Red", [{"answer": a} for a in _mixed("Red", ["red", "blue"], matching)])
        with_ids = [
            {"answer": a, "answer_id": i + 1, "answer_confidence": "yes"}
            for i, a in enumerate(_mixed("red", ["blue"], matching))
        ]
        add("dicts-with-id", "red", with_ids)
        add("dicts-unhashable", "red", [{"answer": a, "tags": [a]} for a in _mixed("red", ["blue"], matching)])
    return cases


def _random_token(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(WORDS)
    if roll < 0.65:
        return rng.choice(MARKS)
    if roll < 0.8:
        return rng.choice(SPACES)
    if roll < 0.9:
        return str(rng.randrange(0, 2000))
    return rng.choice(["3.5", ",", ".", "1,0", "'", "-", " the ", " a "])


def _random_answer(rng: random.Random) -> str:
    return "".join(_random_token(rng) for _ in range(rng.randrange(0, 4)))


def _variant(rng: random.Random, answer: str) -> str:
    """A near-copy of ``answer``: changed case, added punctuation or whitespace, or unchanged."""
    roll = rng.random()
    if roll < 0.25:
        return answer
    if roll < 0.4:
        return answer.upper() if rng.random() < 0.5 else answer.capitalize()
    if roll < 0.6:
        position = rng.randrange(0, len(answer) + 1)
        return answer[:position] + rng.choice(MARKS) + answer[position:]
    if roll < 0.75:
        return rng.choice(SPACES) + answer + rng.choice(SPACES)
    if roll < 0.85:
        return rng.choice(["the ", "a ", "an "]) + answer
    return _random_answer(rng)


def random_case(rng: random.Random, index: int) -> dict[str, Any]:
    """One random question: a few distinct answers spread over the panel, a prediction near one of them."""
    size = 10 if rng.random() < 0.85 else rng.randrange(1, 13)
    pool = [_random_answer(rng) for _ in range(rng.randrange(1, 4))]
    pool += [_variant(rng, pool[0]) for _ in range(rng.randrange(0, 3))]
    if rng.random() < 0.3:
        answers: list[Any] = [pool[0]] * size
    else:
        answers = [rng.choice(pool) for _ in range(size)]
    prediction = _variant(rng, rng.choice(pool))
    if rng.random() < 0.05:  # answer dicts without ids: equal ones are left out together
        answers = [{"answer": a} for a in answers]
    return {"id": f"random-{index}", "prediction": prediction, "answers": answers}


def random_cases(seed: int = RANDOM_SEED, count: int = RANDOM_COUNT) -> Iterator[dict[str, Any]]:
    """``count`` random cases, the same ones for the same ``seed`` on every run and Python version."""
    rng = random.Random(seed)
    for index in range(count):
        yield random_case(rng, index)


def inputs_digest(cases: list[dict[str, Any]]) -> str:
    """SHA-256 of the cases' canonical JSON: shows that a regenerated set is the one the scores belong to."""
    text = "\n".join(json.dumps(c, sort_keys=True, ensure_ascii=True) for c in cases)
    return hashlib.sha256(text.encode("ascii")).hexdigest()

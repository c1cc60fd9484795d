"""VQA v2 items for a synthetic scene: colour, shape, count, relative position and existence questions,
each with ten human-like answers.

The ten answers are noisy the way real VQA answers are: most annotators give the canonical answer, some a
synonym or a number word ("three" for "3"), a few a wrong answer, with their confidence.  The canonical
answer always stays the most common one (it is the ``multiple_choice_answer``), so the official accuracy
min(#agreeing / 3, 1) is 1 for it, and partial for synonyms and mistakes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.sources.synthetic_text import (
    NUMBER_WORDS,
    OPPOSITE,
    RELATION_PHRASES,
    Desc,
    SceneFacts,
    all_descs,
    descs_of,
    matching,
    with_article,
)
from components.sources.synthetic_world import COLOURS, SHAPES, SIZES, Scene

SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("dark red",),
    "orange": ("dark orange",),
    "yellow": ("gold",),
    "green": ("dark green",),
    "blue": ("dark blue", "light blue"),
    "purple": ("violet",),
    "white": ("light gray",),
    "black": ("dark gray",),
    "circle": ("round", "oval"),
    "square": ("box", "rectangle"),
    "triangle": ("triangular",),
    "star": ("star shape",),
    "diamond": ("rhombus",),
    "cross": ("plus", "plus sign"),
    "hexagon": ("hexagonal",),
}
KINDS = ("colour", "shape", "count", "exist", "relation")
KIND_WEIGHTS = (0.2, 0.15, 0.25, 0.2, 0.2)
CONFIDENCE = {"right": (0.85, 0.12, 0.03), "variant": (0.7, 0.25, 0.05), "wrong": (0.35, 0.45, 0.2)}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _weighted(rng: np.random.Generator, options: tuple[str, ...], weights: tuple[float, ...]) -> str:
    """One option drawn with the given weights (summing to 1); cheaper than ``rng.choice(p=...)``."""
    roll, total = rng.random(), 0.0
    for option, weight in zip(options, weights, strict=True):
        total += weight
        if roll < total:
            return option
    return options[-1]


def _random_desc(rng: np.random.Generator) -> Desc:
    """A phrase that may fit nothing in the scene (for "0" counts)."""
    shape = _pick(rng, SHAPES) if rng.random() < 0.8 else None
    colour = _pick(rng, list(COLOURS)) if shape is None or rng.random() < 0.7 else None
    size = _pick(rng, SIZES) if rng.random() < 0.3 else None
    return Desc(shape, colour, size)


def _existence_desc(rng: np.random.Generator, scene: Scene, present: bool) -> Desc | None:
    """A phrase for "is there ...?" whose answer is decided first (yes or no, half each), in the same form either
    way: which attributes it states is drawn alike, and only forms this scene can answer both ways are asked (None
    otherwise: "Is there a small one?" where both sizes are present).  So the words give the answer away no more
    than chance: with the yes-phrases of scene objects and the no-phrases random, "Is there a small red star?" was
    mostly "no" and "Is there a circle?" mostly "yes", and the text alone answered 68 % of them."""
    form = int(rng.integers(len(all_descs(scene.objects[0]))))  # the same 7 forms for every object
    absent = sorted(
        {descs_of(shape, colour, size)[form] for shape in SHAPES for colour in COLOURS for size in SIZES}
        - {all_descs(obj)[form] for obj in scene.objects},
        key=lambda d: d.words(),
    )
    if not absent:
        return None
    if present:
        return all_descs(scene.objects[int(rng.integers(len(scene.objects)))])[form]
    return _pick(rng, absent)


def _question(rng: np.random.Generator, facts: SceneFacts, kind: str) -> tuple[str, str, str, str] | None:
    """(question, question_type, answer_type, canonical answer), or None if ``kind`` does not fit the scene."""
    scene = facts.scene
    n = len(scene.objects)
    if kind == "colour":
        named = [(k, d) for k in range(n) for d in facts.unique_descs(k) if d.colour is None]
        if not named:
            return None
        k, desc = _pick(rng, named)
        return f"What color is the {desc.words()}?", "what color is the", "other", scene.objects[k].colour
    if kind == "shape":
        named = [(k, d) for k in range(n) for d in facts.unique_descs(k) if d.shape is None]
        if not named:
            return None
        k, desc = _pick(rng, named)
        return (
            f"What shape is the {desc.words(generic='object')}?",
            "what shape is the",
            "other",
            scene.objects[k].shape,
        )
    if kind == "count":
        roll = rng.random()
        if roll < 0.1:
            desc = Desc()
        elif roll < 0.3:
            desc = _random_desc(rng)
        else:
            desc = _pick(rng, all_descs(scene.objects[int(rng.integers(n))]))
        words = desc.words(generic=_pick(rng, ("shape", "object")), many=True)
        ending = _pick(rng, ("are there", "can you see", "are in the picture"))
        return f"How many {words} {ending}?", "how many", "number", str(len(matching(scene, desc)))
    if kind == "exist":
        desc = _existence_desc(rng, scene, present=rng.random() < 0.5)
        if desc is None:
            return None
        answer = "yes" if matching(scene, desc) else "no"
        if rng.random() < 0.5:
            return f"Is there {with_article(desc.words())}?", "is there a", "yes/no", answer
        return f"Are there any {desc.words(many=True)}?", "are there any", "yes/no", answer
    # relation between two uniquely named objects; asked as it is, or as its opposite (then clearly false)
    pairs = [
        (a, b, r)
        for a in range(n)
        for b in range(n)
        if a != b and facts.shortest_unique(a) and facts.shortest_unique(b)
        for r in facts.strict_relations(a, b)
    ]
    if not pairs:
        return None
    a, b, relation = _pick(rng, pairs)
    asked = relation if rng.random() < 0.5 else OPPOSITE[relation]
    first, second = facts.shortest_unique(a), facts.shortest_unique(b)
    assert first is not None and second is not None
    phrase = _pick(rng, RELATION_PHRASES[asked])
    answer = "yes" if asked == relation else "no"
    return f"Is the {first.words()} {phrase} the {second.words()}?", "is the", "yes/no", answer


def _variant(rng: np.random.Generator, answer: str, answer_type: str) -> str | None:
    """Same meaning, other words: a number word for a digit, a synonym for a colour or shape."""
    if answer_type == "number":
        return NUMBER_WORDS[int(answer)] if int(answer) < len(NUMBER_WORDS) else None
    options = SYNONYMS.get(answer)
    return _pick(rng, options) if options else None


def _mistake(rng: np.random.Generator, scene: Scene, answer: str, answer_type: str) -> str:
    """A wrong answer a careless annotator could give: off by one, the other yes/no, another seen value."""
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        value = int(answer)
        return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)
    pool = list(COLOURS) if answer in COLOURS else list(SHAPES)
    seen = [v for o in scene.objects for v in (o.colour, o.shape) if v in pool and v != answer]
    return _pick(rng, seen) if seen and rng.random() < 0.7 else _pick(rng, [v for v in pool if v != answer])


def human_answers(rng: np.random.Generator, scene: Scene, answer: str, answer_type: str, noise: float) -> list[dict]:
    """Ten VQA answers: with probability ``noise`` an annotator deviates (half the time a same-meaning
    variant, else a mistake).  If chance left the canonical answer short of a clear plurality (at least 3
    and more than any other), more annotators agree with it, as in real data where the majority is right."""
    given: list[tuple[str, str]] = []
    for _ in range(10):
        if rng.random() >= noise:
            given.append((answer, "right"))
            continue
        variant = _variant(rng, answer, answer_type) if rng.random() < 0.5 else None
        given.append((variant, "variant") if variant else (_mistake(rng, scene, answer, answer_type), "wrong"))

    def settled() -> bool:
        counts: dict[str, int] = {}
        for text, _ in given:
            counts[text] = counts.get(text, 0) + 1
        rival = max((c for t, c in counts.items() if t != answer), default=0)
        return counts.get(answer, 0) >= 3 and counts.get(answer, 0) > rival

    while not settled():
        others = [i for i, (text, _) in enumerate(given) if text != answer]
        given[_pick(rng, others)] = (answer, "right")
    return [
        {
            "answer": text,
            "answer_confidence": _weighted(rng, ("yes", "maybe", "no"), CONFIDENCE[how]),
            "answer_id": i,
        }
        for i, (text, how) in enumerate(given, start=1)
    ]


def vqa_items(
    facts: SceneFacts, rng: np.random.Generator, per_image: int, noise: float, yes_no_noise: float
) -> list[dict[str, Any]]:
    """Up to ``per_image`` distinct questions with answers; question ids are ``index * 100 + k``.  Annotators
    of a yes/no question deviate with probability ``yes_no_noise``, the others with ``noise``."""
    scene = facts.scene
    items: list[dict[str, Any]] = []
    asked: set[str] = set()
    for _ in range(per_image * 6):
        if len(items) == per_image:
            break
        made = _question(rng, facts, _weighted(rng, KINDS, KIND_WEIGHTS))
        if made is None or made[0] in asked:
            continue
        question, question_type, answer_type, answer = made
        asked.add(question)
        items.append(
            {
                "question_id": scene.index * 100 + len(items),
                "question": question,
                "question_type": question_type,
                "answer_type": answer_type,
                "multiple_choice_answer": answer,
                "answers": human_answers(
                    rng, scene, answer, answer_type, yes_no_noise if answer_type == "yes/no" else noise
                ),
            }
        )
    return items

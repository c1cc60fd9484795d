"""Language products of one synthetic scene: pretraining captions and the four downstream tasks' items.

Each product draws from its own per-image random stream (see ``synthetic_world.image_rng``), so the items
of one image are reproducible alone.  :mod:`components.sources.synthetic_formats` assembles them into
the real datasets' files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from components.sources.synthetic_text import (
    BACKGROUND_WORDS,
    NUMBER_WORDS,
    OPPOSITE,
    RELATION_PHRASES,
    Desc,
    Expression,
    SceneFacts,
    full_desc,
    matching,
    relation_holds,
    sentence,
    tokenize,
    with_article,
)
from components.sources.synthetic_vqa import vqa_items
from components.sources.synthetic_world import (
    COLOURS,
    SHAPES,
    SIZES,
    STREAM_CAPTIONS,
    STREAM_FLICKR,
    STREAM_REFS,
    STREAM_VCR,
    STREAM_VQA,
    Scene,
    annotation_id,
    image_rng,
)

if TYPE_CHECKING:
    from components.sources.synthetic import SyntheticConfig


@dataclass
class ImageTasks:
    """Everything language-side for one image, as plain JSON-ready records."""

    captions: list[dict[str, Any]] = field(default_factory=list)
    """Pretraining captions: caption_id, caption, mentions (annotation ids), wrong (None or what is wrong)."""
    vqa: list[dict[str, Any]] = field(default_factory=list)
    """VQA v2 question + annotation records (question_id, question, answers, ...)."""
    refs: list[dict[str, Any]] = field(default_factory=list)
    """RefCOCO+ refs without split / file name (ref_id, ann_id, category_id, sentences)."""
    flickr: list[str] = field(default_factory=list)
    """Five accurate sentences for retrieval."""
    vcr: list[dict[str, Any]] = field(default_factory=list)
    """VCR Q->A items: question, answer_choices (4), answer_label."""


def image_tasks(config: SyntheticConfig, scene: Scene) -> ImageTasks:
    """Captions and task items for one scene."""
    seed, index, facts = config.seed, scene.index, SceneFacts(scene)
    return ImageTasks(
        captions=pretraining_captions(facts, image_rng(seed, index, STREAM_CAPTIONS), config),
        vqa=vqa_items(
            facts,
            image_rng(seed, index, STREAM_VQA),
            config.questions_per_image,
            config.answer_noise,
            config.yes_no_noise,
        ),
        refs=refs_items(facts, image_rng(seed, index, STREAM_REFS), config.refs_per_image),
        flickr=flickr_sentences(facts, image_rng(seed, index, STREAM_FLICKR)),
        vcr=vcr_items(facts, image_rng(seed, index, STREAM_VCR), config.vcr_per_image),
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------- captions (pretraining and retrieval)


@dataclass
class _Caption:
    """A caption before it becomes text: which objects it mentions, as which phrases, how they relate."""

    mentions: list[tuple[int, Desc]]
    relation: tuple[str, str] | None  # (relation, surface phrase) between the first two mentions
    template: str
    background: str


LIST_TEMPLATES = (
    "{x}",
    "a picture of {x}",
    "{x} on a {bg} background",
    "there is {x}",
    "close-up of {x}",
    "an illustration of {x}",
    "{x} in a simple scene",
    "a {bg} background with {x}",
)
RELATION_TEMPLATES = (
    "{a} {rel} {b}",
    "{a} {rel} {b} on a {bg} background",
    "a picture of {a} {rel} {b}",
    "there is {a} {rel} {b}",
)


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _loose_desc(rng: np.random.Generator, scene: Scene, k: int, p_colour: float, p_size: float) -> Desc:
    obj = scene.objects[k]
    return Desc(obj.shape, obj.colour if rng.random() < p_colour else None, obj.size if rng.random() < p_size else None)


def _sample_caption(
    rng: np.random.Generator, facts: SceneFacts, max_mentions: int, p_colour: float, p_size: float
) -> _Caption:
    """Mentions of up to ``max_mentions`` objects, with a strict relation between two of them half the time."""
    scene = facts.scene
    n = len(scene.objects)
    bg = _pick(rng, BACKGROUND_WORDS[scene.background])
    pairs = facts.strict_pairs
    if max_mentions >= 2 and pairs and rng.random() < 0.5:
        a, b, relation = pairs[int(rng.integers(len(pairs)))]
        mentions = [(k, _loose_desc(rng, scene, k, p_colour, p_size)) for k in (a, b)]
        return _Caption(
            mentions, (relation, _pick(rng, RELATION_PHRASES[relation])), _pick(rng, RELATION_TEMPLATES), bg
        )
    count = int(rng.integers(1, max_mentions + 1))
    chosen = sorted(int(k) for k in rng.choice(n, size=count, replace=False))
    mentions = [(k, _loose_desc(rng, scene, k, p_colour, p_size)) for k in chosen]
    return _Caption(mentions, None, _pick(rng, LIST_TEMPLATES), bg)


def _caption_text(caption: _Caption) -> str:
    phrases = [with_article(d.words()) for _, d in caption.mentions]
    if caption.relation is not None:
        return caption.template.format(a=phrases[0], rel=caption.relation[1], b=phrases[1], bg=caption.background)
    return caption.template.format(x=_listing(phrases), bg=caption.background)


def _corrupt(rng: np.random.Generator, scene: Scene, caption: _Caption) -> dict[str, Any] | None:
    """Make one part of the caption false (a colour, shape, size or relation no object pair has); returns
    what was changed, or None when no change can be made false in this scene."""
    kinds = [str(k) for k in rng.permutation(["colour", "shape", "size", "relation"])]
    for kind in kinds:
        if kind == "relation":
            if caption.relation is None:
                continue
            flipped = OPPOSITE[caption.relation[0]]
            (_, first), (_, second) = caption.mentions
            if _pair_exists(scene, first, flipped, second):
                continue
            truth = caption.relation[0]
            caption.relation = (flipped, _pick(rng, RELATION_PHRASES[flipped]))
            return {"kind": "relation", "ann_id": None, "said": flipped, "truth": truth}
        slot = int(rng.integers(len(caption.mentions)))
        k, desc = caption.mentions[slot]
        obj = scene.objects[k]
        values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[kind]
        truth = getattr(obj, kind)
        wrong = [v for v in values if v != truth and not matching(scene, replace(desc, **{kind: v}))]
        if not wrong:
            continue
        said = _pick(rng, wrong)
        caption.mentions[slot] = (k, replace(desc, **{kind: said}))
        return {"kind": kind, "ann_id": annotation_id(scene.index, k), "said": said, "truth": truth}
    return None


def _pair_exists(scene: Scene, first: Desc, relation: str, second: Desc) -> bool:
    """Whether any object fitting ``first`` stands (loosely) in ``relation`` to another fitting ``second``."""
    return any(
        a != b and relation_holds(scene, a, b, relation, strict=False)
        for a in matching(scene, first)
        for b in matching(scene, second)
    )


def pretraining_captions(facts: SceneFacts, rng: np.random.Generator, config: SyntheticConfig) -> list[dict[str, Any]]:
    """Conceptual-Captions-like captions: some (never all, when there are several) objects, with attributes
    and relations; a ``caption_wrong_fraction`` of them has one false part, recorded under ``wrong``."""
    scene, out = facts.scene, []
    max_mentions = max(1, min(3, len(scene.objects) - 1))
    for c in range(config.captions_per_image):
        caption = _sample_caption(rng, facts, max_mentions, p_colour=0.8, p_size=0.35)
        wrong = _corrupt(rng, scene, caption) if rng.random() < config.caption_wrong_fraction else None
        out.append(
            {
                "caption_id": f"{scene.image_id}-c{c}",
                "caption": _caption_text(caption),
                "mentions": [annotation_id(scene.index, k) for k, _ in caption.mentions],
                "wrong": wrong,
            }
        )
    return out


def _count_word(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def flickr_sentences(facts: SceneFacts, rng: np.random.Generator) -> list[str]:
    """Five accurate sentences: the first names every object, the others some of them and their relations."""
    scene = facts.scene
    groups = Counter(full_desc(o) for o in scene.objects)  # first-seen order; "two small red circles"
    everything = _listing(
        [with_article(d.words()) if c == 1 else f"{_count_word(c)} {d.words(many=True)}" for d, c in groups.items()]
    )
    count = len(scene.objects)
    opening = _pick(
        rng,
        (
            f"{_count_word(count)} {'shape' if count == 1 else 'shapes'} on a {{bg}} background: {everything}",
            f"{everything} on a {{bg}} background",
            f"a {{bg}} background with {everything}",
        ),
    ).format(bg=_pick(rng, BACKGROUND_WORDS[scene.background]))
    sentences = [sentence(opening)]
    for _ in range(40):
        if len(sentences) == 5:
            break
        text = sentence(_caption_text(_sample_caption(rng, facts, min(3, count), p_colour=0.9, p_size=0.5)))
        if text not in sentences:
            sentences.append(text)
    while len(sentences) < 5:  # one-object scenes have few distinct phrasings
        sentences.append(sentences[len(sentences) % max(1, len(sentences))])
    return sentences


# ---------------------------------------------------------------- RefCOCO+ referring expressions


def _expression_text(rng: np.random.Generator, expression: Expression) -> str:
    target = expression.target.words(generic=_pick(rng, ("shape", "object", "one")))
    if expression.relation is None or expression.landmark is None:
        return _pick(rng, (target, f"the {target}"))
    mark = expression.landmark.words()
    rel = _pick(rng, RELATION_PHRASES[expression.relation])
    return _pick(
        rng, (f"{target} {rel} {mark}", f"the {target} {rel} the {mark}", f"{target} that is {rel} the {mark}")
    )


def refs_items(facts: SceneFacts, rng: np.random.Generator, per_image: int) -> list[dict[str, Any]]:
    """Refs for up to ``per_image`` objects (same-looking twins first, since only relations separate them),
    each with 1-3 sentences that pick out that object alone; never a place in the picture (RefCOCO+ rule)."""
    scene = facts.scene
    n = len(scene.objects)
    looks = Counter((o.shape, o.colour) for o in scene.objects)
    order = [int(k) for k in rng.permutation(n)]
    order.sort(key=lambda k: looks[(scene.objects[k].shape, scene.objects[k].colour)] == 1)  # twins first, stable
    refs: list[dict[str, Any]] = []
    for k in order:
        if len(refs) == per_image:
            break
        expressions = facts.referring_expressions(k)
        if not expressions:
            continue
        ref_id = scene.index * 100 + len(refs)
        wanted = int(rng.integers(1, 4))  # real refs have ~3 sentences; some fewer
        texts: list[str] = []
        for _ in range(10):
            text = _expression_text(rng, expressions[int(rng.integers(len(expressions)))])
            if text not in texts:
                texts.append(text)
            if len(texts) == wanted:
                break
        sentences = []
        for s, text in enumerate(texts):
            raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
            tokens = tokenize(raw)
            sentences.append({"tokens": tokens, "raw": raw, "sent_id": ref_id * 10 + s, "sent": " ".join(tokens)})
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": annotation_id(scene.index, k),
                "category_id": SHAPES.index(scene.objects[k].shape) + 1,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
            }
        )
    return refs


# ---------------------------------------------------------------- VCR-style multiple choice


def _fake_descs(scene: Scene, rng: np.random.Generator) -> list[Desc]:
    """Every full description (size, colour, shape) that fits no object of the scene, in random order.

    Drawn independently of the right answer: distractors made "one attribute away" from the truth make the
    right answer the choices' centroid (the answer that shares the most words with the others), which a
    blind answers-only rule finds without the image (42.4% of the default world's items, chance 25%)."""
    fakes = [Desc(shape, colour, size) for shape in SHAPES for colour in COLOURS for size in SIZES]
    fakes = [d for d in fakes if not matching(scene, d)]
    return [fakes[int(k)] for k in rng.permutation(len(fakes))]


def _choices(rng: np.random.Generator, correct: str, distractors: list[str]) -> tuple[list[str], int] | None:
    unique = [d for d in dict.fromkeys(distractors) if d != correct][:3]
    if len(unique) < 3:
        return None
    label = int(rng.integers(4))
    return unique[:label] + [correct] + unique[label:], label


def _vcr_question(rng: np.random.Generator, facts: SceneFacts, kind: str) -> tuple[str, list[str], int] | None:
    scene = facts.scene
    n = len(scene.objects)
    objs = scene.objects
    if kind in ("what_hides", "why_hidden"):
        hidden = [k for k in range(n) if objs[k].occluded_by and facts.shortest_unique(k)]
        if not hidden:
            return None
        k = hidden[int(rng.integers(len(hidden)))]
        front = list(objs[k].occluded_by)
        f = front[int(rng.integers(len(front)))]
        name_k = facts.shortest_unique(k)
        assert name_k is not None
        others = [full_desc(objs[o]) for o in rng.permutation(n) if o != k and o not in front]
        others = [d for d in others if not any(d.matches(objs[j]) for j in front)]
        fakes = _fake_descs(scene, rng)
        if kind == "what_hides":
            question = f"What is partly hiding the {name_k.words()}?"
            correct = sentence(with_article(full_desc(objs[f]).words(), definite=True))
            wrong = [sentence(with_article(d.words(), definite=True)) for d in [*others, *fakes]]
        else:
            question = f"Why can only part of the {name_k.words()} be seen?"
            correct = f"Because the {full_desc(objs[f]).words()} is in front of it."
            # (no fixed "cut off by the edge" answer: a choice that is never right is found without the image)
            wrong = [f"Because the {d.words()} is in front of it." for d in [*others, *fakes]]
        picked = _choices(rng, correct, wrong)
        return None if picked is None else (question, *picked)
    if kind == "what_rel":
        options: list[tuple[int, int, str, Desc]] = []
        for m in range(n):
            mark = facts.shortest_unique(m)
            if mark is None:
                continue
            for relation in RELATION_PHRASES:
                fit = [k for k in range(n) if facts.loose[relation][k][m]]
                if len(fit) == 1 and facts.strict[relation][fit[0]][m]:
                    options.append((fit[0], m, relation, mark))
        if not options:
            return None
        k, m, relation, mark = options[int(rng.integers(len(options)))]
        question = f"What is {_pick(rng, RELATION_PHRASES[relation])} the {mark.words()}?"
        correct = sentence(with_article(full_desc(objs[k]).words()))
        others = [full_desc(objs[o]) for o in rng.permutation(n) if o not in (k, m)]
        wrong = [sentence(with_article(d.words())) for d in [*others, *_fake_descs(scene, rng)]]
        wrong = [w for w in wrong if w != correct]
        picked = _choices(rng, correct, wrong)
        return None if picked is None else (question, *picked)
    # colour of an object named without its colour
    named = [(k, d) for k in range(n) for d in facts.unique_descs(k) if d.colour is None and d.shape is not None]
    if not named:
        return None
    k, desc = named[int(rng.integers(len(named)))]
    question = f"What color is the {desc.words()}?"
    correct = f"It is {objs[k].colour}."
    seen = [objs[o].colour for o in rng.permutation(n)]
    wrong = [f"It is {c}." for c in [*seen, *(str(c) for c in rng.permutation(list(COLOURS)))]]
    picked = _choices(rng, correct, wrong)
    return None if picked is None else (question, *picked)


def vcr_items(facts: SceneFacts, rng: np.random.Generator, per_image: int) -> list[dict[str, Any]]:
    """Up to ``per_image`` four-way Q->A items; wrong answers are right about another object of the scene, or
    describe an object the scene does not have (drawn independently of the right answer)."""
    items: list[dict[str, Any]] = []
    for _ in range(per_image * 4):
        if len(items) == per_image:
            break
        kind = _pick(rng, ("what_hides", "why_hidden", "what_rel", "colour"))
        made = _vcr_question(rng, facts, kind)
        if made is None or any(item["question"] == made[0] for item in items):
            continue
        question, choices, label = made
        items.append({"question": question, "answer_choices": choices, "answer_label": label, "kind": kind})
    return items

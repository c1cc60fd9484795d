"""VQA accuracy exactly as the official VQA evaluation script computes it.

Source of the definition: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the VQA API
(github.com/GT-Vision-Lab/VQA, ``VQAEval.evaluate``, ``processPunctuation``, ``processDigitArticle``), and
Antol et al., "VQA: Visual Question Answering", ICCV 2015 / Goyal et al., "Making the V in VQA Matter",
CVPR 2017.  This module reproduces that script's behaviour (including its quirks, listed below) in our own
code; tests pin each rule with hand-computed cases.

The predicted answer goes through :func:`normalize_answer`:

1. newlines and tabs become spaces; leading and trailing whitespace is stripped;
2. punctuation (:func:`process_punctuation`): each of ``; : / ' [ ] " ( ) = + \\ _ > < @ ` , ?`` is deleted
   when it touches a space anywhere in the answer, or when the answer contains a comma between two digits
   anywhere ("10,000" -> "10000"); otherwise it becomes a space ("one,two" -> "one two").  Then every period
   not followed by a digit is deleted ("yes." -> "yes", "3.5" stays, "a.b" -> "ab"); like the script (which
   passes ``re.UNICODE`` where ``re.sub`` expects ``count``) at most 32 periods are deleted.  ``!`` and ``-``
   are not in the list and are kept;
3. digits and articles (:func:`process_digit_article`): lower-case, split on whitespace, map the number words
   ``none zero one ... ten`` to digits ("Two" -> "2", "none" -> "0"), drop the articles ``a an the``, apply the
   script's contractions map word by word ("dont" -> "don’t"), join with single spaces.

The contractions map is the script's own, which writes most of its values with the typographic apostrophe
U+2019 (``don’t``), a few with the ASCII one (``we've``).  Because ``'`` is punctuation, an answer typed as
"don't" becomes "don t" and never equals the map's "don’t": that is the official behaviour, kept on purpose.

The human answers are NOT normalised that way: as in the script, when the ten answers are not all identical
each goes through :func:`process_punctuation` only (no lower-casing, no number words, no articles); when they
are all identical they are compared as they are.  (VQA v2 annotations were released already normalised, so
this matters little on real data; the synthetic world's "three" next to "3" counts as a different answer.)

Accuracy of a prediction against n human answers (n = 10 in VQA): for each of the n leave-one-out subsets of
n - 1 humans, ``min(#humans in the subset who gave the answer / 3, 1)``; the mean over the subsets.  With
n = 10 and k matching humans that is 0.3 for k = 1, 0.6 for k = 2, 0.9 for k = 3, 1.0 for k >= 4.  Overall,
per-answer-type and per-question-type accuracies are plain means over questions.  The script reports
``round(100 * acc, 2)``; we return unrounded fractions in [0, 1].
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

#: Punctuation the official script deletes or turns into a space (its ``punct`` list, in its order).
PUNCTUATION: tuple[str, ...] = tuple(";:/'[]\"()=+\\_><@`,?")
#: Number words the script maps to digits (its ``manualMap``).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
#: Articles the script drops.
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
#: The script's contractions map, verbatim (mostly U+2019 apostrophes; see the module docstring).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve",
    "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s",
    "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at",
    "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve", "somebodyll": "somebody’ll",
    "somebodys": "somebody’s", "someoned": "someone’d", "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve",
    "someonell": "someone’ll", "someones": "someone’s", "somethingd": "something’d",
    "somethingd’ve": "something’d’ve", "something’dve": "something’d’ve", "somethingll": "something’ll",
    "thats": "that’s", "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve",
    "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t",
    "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll",
    "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve",
    "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re", "whys": "why’s",
    "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d",
    "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}  # fmt: skip

# A comma between two digits anywhere switches every punctuation mark from "space" to "delete".
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The script's period pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a look-AHEAD for the literal
# text "<=digit" (a mistyped look-behind), so in effect it deletes every period not followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_SCRIPT_PERIOD_LIMIT = 32  # re.UNICODE (= 32) lands in re.sub's ``count`` argument in the script


# Human answers repeat a lot (VQA v2 val: 2.1M answers, far fewer distinct strings): cache the work.
@functools.lru_cache(maxsize=1 << 16)
def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: punctuation deleted or spaced out, periods before non-digits deleted.

    Applied to predictions (inside :func:`normalize_answer`) and, alone, to human answers.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The decision looks at the ORIGINAL text, as the script does, not at the partly cleaned one.
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_SCRIPT_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted (or candidate) answer normalised exactly as the official script treats predictions.

    ``normalize_answer("Two dogs.") == "2 dogs"``; ``normalize_answer("10,000") == "10000"``.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _answer_texts(human_answers: Iterable[Any]) -> list[str]:
    """Human answers given as strings or as VQA answer dicts (``{"answer": ...}``)."""
    texts = [a["answer"] if isinstance(a, Mapping) else a for a in human_answers]
    if not texts:
        raise ValueError("human_answers is empty: VQA accuracy needs the annotators' answers (10 in VQA)")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"human answers must be strings, got {bad[0]!r}")
    return texts


def vqa_accuracy(prediction: str, human_answers: Sequence[str] | Sequence[Mapping[str, Any]]) -> float:
    """Official VQA accuracy in [0, 1] of one predicted answer against the human answers.

    ``human_answers``: the annotators' answers (strings, or VQA answer dicts with an ``"answer"`` key).  The
    prediction is normalised with :func:`normalize_answer`, the humans as the script does (module docstring).
    """
    predicted = normalize_answer(prediction)
    texts = _answer_texts(human_answers)
    if len(set(texts)) > 1:
        texts = [process_punctuation(t) for t in texts]
    n = len(texts)
    matching = sum(t == predicted for t in texts)
    # Leave-one-out mean in closed form: leaving out one of the `matching` humans leaves matching - 1 agreeing
    # humans, leaving out any other human leaves `matching`.
    return (matching * min(1.0, (matching - 1) / 3) + (n - matching) * min(1.0, matching / 3)) / n


def _annotation_list(annotations: Any) -> list[Mapping[str, Any]]:
    """Annotations as a list: the VQA annotation file dict, a list of its entries, or ``{question_id: entry}``."""
    if isinstance(annotations, Mapping) and "annotations" in annotations:
        return list(annotations["annotations"])
    if isinstance(annotations, Mapping):
        return [{"question_id": qid, **entry} for qid, entry in annotations.items()]
    return list(annotations)


def vqa_scores(predictions: Mapping[Hashable, str], annotations: Any) -> dict[str, Any]:
    """Official VQA accuracy over a set of questions: overall, per answer type, per question type, per question.

    ``predictions``: ``{question_id: predicted answer}``, exactly one per annotated question (the script refuses
    results that do not cover the annotation set; so do we).  ``annotations``: the loaded VQA v2 annotation file
    (``{"annotations": [...]}``), the list of its entries, or ``{question_id: entry}``; each entry needs
    ``question_id``, ``answers`` (``[{"answer": str, ...}]`` or strings) and ``answer_type`` (``yes/no``,
    ``number``, ``other``); ``question_type`` is optional.

    Returns ``{"accuracy": float, "per_answer_type": {type: float}, "per_question_type": {type: float},
    "per_question": {question_id: float}, "num_questions": int}``; accuracies are fractions in [0, 1].
    """
    entries = _annotation_list(annotations)
    if not entries:
        raise ValueError("no annotations to evaluate against")
    per_question: dict[Hashable, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for entry in entries:
        missing_keys = [k for k in ("question_id", "answers", "answer_type") if k not in entry]
        if missing_keys:
            raise ValueError(f"annotation {entry.get('question_id', '?')!r} lacks {missing_keys}")
        qid = entry["question_id"]
        if qid in per_question:
            raise ValueError(f"question_id {qid!r} is annotated twice")
        if qid not in predictions:
            continue  # reported below, with all the others that are missing
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise ValueError(f"prediction for question {qid!r} must be a str, got {type(prediction).__name__}")
        acc = vqa_accuracy(prediction, entry["answers"])
        per_question[qid] = acc
        by_answer_type[entry["answer_type"]].append(acc)
        if "question_type" in entry:
            by_question_type[entry["question_type"]].append(acc)
    annotated = {entry["question_id"] for entry in entries}
    missing = [qid for qid in annotated if qid not in predictions]
    extra = [qid for qid in predictions if qid not in annotated]
    if missing or extra:
        raise ValueError(
            f"predictions do not match the annotated questions: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(extra)} not annotated (e.g. {extra[:5]}); check the question id type (int vs str)"
        )

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "accuracy": mean(list(per_question.values())),
        "per_answer_type": {k: mean(v) for k, v in sorted(by_answer_type.items())},
        "per_question_type": {k: mean(v) for k, v in sorted(by_question_type.items())},
        "per_question": per_question,
        "num_questions": len(per_question),
    }

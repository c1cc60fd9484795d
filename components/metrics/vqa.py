"""VQA accuracy exactly as the official VQA evaluation script computes it, quirks included.

Followed: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of github.com/GT-Vision-Lab/VQA at commit
``a013f0043c1e2cdc995922dfe257f7149aa9af06`` (2021-03-11, "Fixed processing answers bug"; the newest version of
that file), run under Python 3 (Unicode ``str``: ``\\d``, ``lower``, ``split`` and ``strip`` are Unicode-aware).
Definition: Antol et al., "VQA: Visual Question Answering", ICCV 2015; Goyal et al., CVPR 2017.  The code here
is our own; ``tests/data/metrics/`` holds thousands of cases scored by the unmodified script (README there),
and ``tests/components/test_metrics_official.py`` checks this module against every one of them.

For one question, with the prediction ``p`` and the human answers ``h1 .. hn`` (n = 10 in VQA):

1. every answer, prediction and human alike, gets newlines and tabs replaced by spaces and is stripped;
2. if the stripped human answers are all identical, nothing else happens: the prediction is compared with them
   as it is, case and punctuation included ("Yes" against ten "yes" scores 0, "two" against ten "two" scores 1);
3. otherwise the prediction and every human answer go through :func:`process_punctuation` and then
   :func:`process_digit_article` (together: :func:`normalize_answer`), and the processed forms are compared;
4. accuracy = mean over the n annotators i of ``min(1, #{other annotators whose answer equals p} / 3)``: with
   n = 10 and k matching humans that is 0.3 for k = 1, 0.6 for k = 2, 0.9 for k = 3 and 1 for k >= 4.

:func:`process_punctuation`: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
space anywhere in the ORIGINAL text, or everywhere when the original text has a comma between two digits
("10,000" -> "10000", and then "a-b" in the same text loses its hyphen too); otherwise it becomes a space
("red-white" -> "red white").  ``:`` ``'`` ``.`` ``*`` ``#`` ``&`` ``%`` ``$`` are not in the list.  Then
periods not followed by a digit are deleted ("yes." -> "yes", "3.5" stays, "a.b" -> "ab"); at most 32 of them
(the script passes ``re.UNICODE``, which is 32, where ``re.sub`` expects its ``count``).  The pattern's
would-be look-behind "(?!<=\\d)" is a look-ahead for the literal text "<=", so a period after a digit goes
too ("3." -> "3").

:func:`process_digit_article`: lower-case, split on whitespace, map ``none zero one ... ten`` to digits
("none" -> "0"; "eleven" stays), drop the articles ``a an the`` (whole words only), replace words found in the
script's contractions map ("dont" -> "don't"), join with single spaces.  The map's keys that hold upper-case
letters ("Im", "Ive", ...) can never match after lower-casing; kept as the script has them.

Human answers may be strings (each one annotator) or the answer dicts of the annotation file.  The script
leaves out annotator i by dropping every answer DICT equal to i's dict (after the processing above); with the
real files' distinct ``answer_id``\\ s that is exactly annotator i, and so it is for strings.  Dicts without
ids that compare equal are dropped together, as in the script.  Not reproduced: the script overwrites the
annotation dicts in place (a second evaluation of the same objects would see processed answers) and fails on
an empty answer list or a non-string answer; we refuse those with ``ValueError`` / ``TypeError``.

Overall, per-answer-type and per-question-type accuracies are plain means of the per-question accuracies.  The
script reports ``round(100 * accuracy, 2)``; we return unrounded fractions in [0, 1].

Chance (``vqa_scores``'s ``chance`` key, a fraction): the expected accuracy of an answer drawn uniformly at
random from an answer vocabulary -- the mean over questions of ``sum over vocabulary answers a of
accuracy(a) / |vocabulary|``.  Pass the model's answer vocabulary as ``answer_vocabulary``; without one the
vocabulary is every distinct (stripped) human answer of the annotations evaluated.  (VQA accuracy is soft,
so ``1 / |vocabulary|`` is not the accuracy of a random answer: a question whose humans gave three answers
can pay up to 2.8 vocabulary entries, and one whose answers are not in the vocabulary pays none.)
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Punctuation the official script deletes or turns into a space.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
#: Number words the script maps to digits (only whole words, only these).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
#: Articles the script drops.
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
#: The script's contractions map (a data table; the commit above writes every apostrophe as ASCII ``'``).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

# A comma between two digits anywhere switches every punctuation mark from "space" to "delete".
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# In effect the script's period pattern: a period not followed by a digit (module docstring).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_SCRIPT_PERIOD_LIMIT = 32  # re.UNICODE (= 32) lands in re.sub's ``count`` argument in the script


def clean_whitespace(text: str) -> str:
    """Step 1 for every answer: newlines and tabs to spaces, then ``str.strip`` (all Unicode whitespace)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


# Human answers repeat a lot (VQA v2 val: 2.1M answers, far fewer distinct strings): cache the work.
@functools.lru_cache(maxsize=1 << 16)
def process_punctuation(text: str) -> str:
    """The official punctuation step: marks deleted or spaced out, periods before non-digits deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The decision looks at the ORIGINAL text, as the script does, not at the partly cleaned one.
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_SCRIPT_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words to digits, no articles, contractions map."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """An answer processed as the script processes every answer of a question whose humans disagree.

    ``normalize_answer("Two dogs.") == "2 dogs"``; ``normalize_answer("10,000") == "10000"``.  (Where the ten
    humans agree the script compares ``clean_whitespace(prediction)`` instead: see :func:`vqa_accuracy`.)
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


@dataclass(frozen=True)
class _Humans:
    """One question's human answers as the script compares them."""

    compared: tuple[str, ...]  # each annotator's answer in the form a prediction is compared with
    disagree: bool  # the stripped answers are not all identical: predictions get normalize_answer too
    left_out: tuple[int, ...]  # how many answers leaving out annotator i drops (1, unless dicts compare equal)

    def accuracy_of(self, compared_prediction: str) -> float:
        """Accuracy of a prediction already in compared form (see :func:`compared_prediction`)."""
        matching = sum(answer == compared_prediction for answer in self.compared)
        total = 0.0
        for answer, dropped in zip(self.compared, self.left_out, strict=True):
            others = matching - dropped if answer == compared_prediction else matching
            total += min(1.0, others / 3)
        return total / len(self.compared)

    def compared_prediction(self, prediction: str) -> str:
        if not isinstance(prediction, str):
            raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
        return normalize_answer(prediction) if self.disagree else clean_whitespace(prediction)


def _dict_key(entry: Mapping[str, Any]) -> Hashable:
    return frozenset(entry.items())


def _humans(human_answers: Iterable[Any]) -> _Humans:
    """Read the human answers (strings, or answer dicts with an ``"answer"`` key) the way the script does."""
    entries = list(human_answers)
    if not entries:
        raise ValueError("human_answers is empty: VQA accuracy needs the annotators' answers (10 in VQA)")
    texts = [e["answer"] if isinstance(e, Mapping) else e for e in entries]
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"human answers must be strings, got {bad[0]!r}")
    stripped = [clean_whitespace(t) for t in texts]
    disagree = len(set(stripped)) > 1
    compared = tuple(normalize_answer(t) for t in stripped) if disagree else tuple(stripped)
    left_out = (1,) * len(entries)
    dicts = [(i, {**e, "answer": compared[i]}) for i, e in enumerate(entries) if isinstance(e, Mapping)]
    if len(dicts) > 1:
        counts = [1] * len(entries)
        try:
            keys = Counter(_dict_key(d) for _, d in dicts)
            for i, d in dicts:
                counts[i] = keys[_dict_key(d)]
        except TypeError:  # unhashable values: compare the dicts pairwise, as the script does
            for i, d in dicts:
                counts[i] = sum(d == other for _, other in dicts)
        left_out = tuple(counts)
    return _Humans(compared, disagree, left_out)


def vqa_accuracy(prediction: str, human_answers: Sequence[str] | Sequence[Mapping[str, Any]]) -> float:
    """Official VQA accuracy in [0, 1] of one predicted answer against the human answers (module docstring).

    ``human_answers``: the annotators' answers (strings, or VQA answer dicts with an ``"answer"`` key).
    """
    humans = _humans(human_answers)
    return humans.accuracy_of(humans.compared_prediction(prediction))


class _Vocabulary:
    """An answer vocabulary indexed by the two forms a prediction can be compared in."""

    def __init__(self, answers: Iterable[str]):
        distinct = list(dict.fromkeys(answers))
        bad = [a for a in distinct if not isinstance(a, str)]
        if bad:
            raise ValueError(f"answer_vocabulary: answers must be strings, got {bad[0]!r}")
        if not distinct:
            raise ValueError("answer_vocabulary is empty")
        self.size = len(distinct)
        self._stripped = Counter(clean_whitespace(a) for a in distinct)
        self._normalised = Counter(normalize_answer(a) for a in distinct)

    def expected_accuracy(self, humans: _Humans) -> float:
        """Expected accuracy of an answer drawn uniformly from the vocabulary: only forms humans gave pay."""
        counts = self._normalised if humans.disagree else self._stripped
        return sum(counts[form] * humans.accuracy_of(form) for form in set(humans.compared)) / self.size


def _annotation_list(annotations: Any) -> list[Mapping[str, Any]]:
    """Annotations as a list: the VQA annotation file dict, a list of its entries, or ``{question_id: entry}``."""
    if isinstance(annotations, Mapping) and "annotations" in annotations:
        return list(annotations["annotations"])
    if isinstance(annotations, Mapping):
        return [{"question_id": qid, **entry} for qid, entry in annotations.items()]
    return list(annotations)


def vqa_scores(
    predictions: Mapping[Hashable, str], annotations: Any, *, answer_vocabulary: Iterable[str] | None = None
) -> dict[str, Any]:
    """Official VQA accuracy over a set of questions: overall, per answer type, per question type, per question.

    ``predictions``: ``{question_id: predicted answer}``, exactly one per annotated question (the script refuses
    results that do not cover the annotation set; so do we).  ``annotations``: the loaded VQA v2 annotation file
    (``{"annotations": [...]}``), the list of its entries, or ``{question_id: entry}``; each entry needs
    ``question_id``, ``answers`` (``[{"answer": str, ...}]`` or strings) and ``answer_type`` (``yes/no``,
    ``number``, ``other``); ``question_type`` is optional.  ``answer_vocabulary``: the answers the model can
    give, for ``chance`` (module docstring); default: the distinct human answers of ``annotations``.

    Returns ``{"accuracy": float, "per_answer_type": {type: float}, "per_question_type": {type: float},
    "per_question": {question_id: float}, "num_questions": int, "chance": float, "chance_vocabulary_size":
    int}``; accuracies and chance are fractions in [0, 1].
    """
    entries = _annotation_list(annotations)
    if not entries:
        raise ValueError("no annotations to evaluate against")
    per_question: dict[Hashable, float] = {}
    humans_of: dict[Hashable, _Humans] = {}
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
        humans = humans_of[qid] = _humans(entry["answers"])
        acc = per_question[qid] = humans.accuracy_of(humans.compared_prediction(prediction))
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
    if answer_vocabulary is None:
        answer_vocabulary = (
            clean_whitespace(a["answer"] if isinstance(a, Mapping) else a) for e in entries for a in e["answers"]
        )
    vocabulary = _Vocabulary(answer_vocabulary)

    def mean(values: Iterable[float]) -> float:
        values = list(values)
        return sum(values) / len(values)

    return {
        "accuracy": mean(per_question.values()),
        "per_answer_type": {k: mean(v) for k, v in sorted(by_answer_type.items())},
        "per_question_type": {k: mean(v) for k, v in sorted(by_question_type.items())},
        "per_question": per_question,
        "num_questions": len(per_question),
        "chance": mean(vocabulary.expected_accuracy(h) for h in humans_of.values()),
        "chance_vocabulary_size": vocabulary.size,
    }

"""VQA accuracy against hand-computed cases: the official normalisation rules one by one, the 10-choose-9
averaging recomputed from its definition, and the per-type aggregation."""

from __future__ import annotations

from itertools import combinations

import pytest

from components.metrics import normalize_answer, process_punctuation, vqa_accuracy, vqa_scores

RQ = "\u2019"  # the typographic apostrophe of the official contractions map

# (prediction, normalised) worked out by hand from the rules in components/metrics/vqa.py's docstring.
NORMALISATION = [
    ("Two", "2"),  # lower-case, then number word -> digit
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),  # only zero..ten (and none) are mapped
    ("the dog", "dog"),  # articles dropped
    ("A Dog", "dog"),
    ("an apple", "apple"),
    ("theater", "theater"),  # whole words only
    ("dont", f"don{RQ}t"),  # the contractions map, with its U+2019 apostrophe
    ("weve", "we've"),  # ... and one of its few ASCII-apostrophe values
    ("don't", "don t"),  # "'" is punctuation: no space next to it, so it becomes a space
    ("what's", "what s"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("35", "35"),
    ("yes.", "yes"),  # a period before a non-digit goes
    ("3.", "3"),
    ("a.b", "ab"),
    ("one, two", "1 2"),  # ", " touches a space: deleted
    ("one,two", "1 2"),  # touches no space: becomes a space
    ("10,000", "10000"),  # digit,digit: every punctuation mark is deleted
    ("1,000 dogs,cats", "1000 dogscats"),  # ... even commas far from the digits
    ("yes ?", "yes"),
    ("(yes)", "yes"),
    ("red-white!", "red-white!"),  # "-" and "!" are not in the script's list
    ("  Yes\n", "yes"),  # whitespace, newline
    ("black\tand  white", "black and white"),
    ("x" + "." * 40, "x" + "." * 8),  # the script deletes at most 32 periods (re.UNICODE passed as count)
    ("", ""),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISATION)
def test_normalize_answer_follows_the_official_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_process_punctuation_alone_keeps_case_words_and_articles() -> None:
    # What the human answers get: punctuation only.
    assert process_punctuation("The Two dogs.") == "The Two dogs"
    assert process_punctuation("10,000") == "10000"


def test_normalize_answer_refuses_non_strings() -> None:
    with pytest.raises(TypeError):
        normalize_answer(2)  # type: ignore[arg-type]


def leave_one_out_by_definition(matching: int, total: int = 10) -> float:
    """The metric straight from its definition: mean over all (total-1)-subsets of min(#agreeing / 3, 1)."""
    humans = [True] * matching + [False] * (total - matching)
    subsets = list(combinations(range(total), total - 1))
    return sum(min(sum(humans[i] for i in subset) / 3, 1.0) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("matching", "hand_computed"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],
)
def test_ten_choose_nine_averaging(matching: int, hand_computed: float) -> None:
    # hand: k=2 -> (2 subsets with 1 agreeing * 1/3 + 8 subsets with 2 * 2/3) / 10 = 6/10
    assert leave_one_out_by_definition(matching) == pytest.approx(hand_computed)
    humans = ["cat"] * matching + ["dog", "bird", "fish", "cow", "pig", "hen", "owl", "bee", "ant", "elk"][
        : 10 - matching
    ]
    assert vqa_accuracy("cat", humans) == pytest.approx(hand_computed)


def test_prediction_is_normalised_before_matching() -> None:
    humans = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("Two", humans) == 1.0
    assert vqa_accuracy("two.", humans) == 1.0
    assert vqa_accuracy("3.5", ["35"] * 10) == 0.0
    assert vqa_accuracy("The dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)


def test_human_answers_get_punctuation_processing_only_and_only_when_they_differ() -> None:
    # Official quirk 1: a human "two" is not mapped to "2", so it never matches a (normalised) prediction.
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 7 + ["2"] * 3) == pytest.approx(0.9)
    # Official quirk 2: when all ten answers are identical they are compared raw ("yes." stays "yes.") ...
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # ... when they differ, punctuation is processed ("yes." -> "yes").
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0


def test_human_answers_may_be_vqa_answer_dicts() -> None:
    answers = [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(1, 4)]
    answers += [{"answer": "blue", "answer_confidence": "maybe", "answer_id": i} for i in range(4, 11)]
    assert vqa_accuracy("red", answers) == pytest.approx(0.9)


def test_empty_or_bad_human_answers_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="strings"):
        vqa_accuracy("yes", [3] * 10)  # type: ignore[list-item]


def annotation(qid: int, answers: list[str], answer_type: str, question_type: str) -> dict:
    return {
        "question_id": qid,
        "answer_type": answer_type,
        "question_type": question_type,
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


ANNOTATIONS = {
    "annotations": [
        annotation(1, ["yes"] * 10, "yes/no", "is the"),
        annotation(2, ["2"] * 2 + ["3"] * 8, "number", "how many"),
        annotation(3, ["red"] * 3 + ["dark red"] * 7, "other", "what color is the"),
        annotation(4, ["no"] * 10, "yes/no", "is the"),
    ]
}


def test_vqa_scores_overall_per_type_and_per_question() -> None:
    predictions = {1: "Yes", 2: "two", 3: "red", 4: "yes"}
    scores = vqa_scores(predictions, ANNOTATIONS)
    # hand: q1 1.0, q2 0.6 ("two" -> "2", 2 humans), q3 0.9, q4 0.0
    assert scores["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 0.9, 4: 0.0})
    assert scores["accuracy"] == pytest.approx((1.0 + 0.6 + 0.9 + 0.0) / 4)
    assert scores["per_answer_type"] == pytest.approx({"number": 0.6, "other": 0.9, "yes/no": 0.5})
    assert scores["per_question_type"] == pytest.approx({"how many": 0.6, "is the": 0.5, "what color is the": 0.9})
    assert scores["num_questions"] == 4


def test_vqa_scores_accepts_a_list_or_a_mapping_of_entries() -> None:
    predictions = {1: "yes", 2: "3", 3: "dark red", 4: "no"}
    expected = vqa_scores(predictions, ANNOTATIONS)
    entries = ANNOTATIONS["annotations"]
    assert vqa_scores(predictions, entries) == expected
    by_id = {e["question_id"]: {k: v for k, v in e.items() if k != "question_id"} for e in entries}
    assert vqa_scores(predictions, by_id) == expected
    assert expected["accuracy"] == pytest.approx(1.0)


def test_vqa_scores_refuses_predictions_that_do_not_cover_the_questions() -> None:
    with pytest.raises(ValueError, match="1 missing"):
        vqa_scores({1: "yes", 2: "3", 3: "red"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="1 not annotated"):
        vqa_scores({1: "yes", 2: "3", 3: "red", 4: "no", 5: "no"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="int vs str"):
        vqa_scores({"1": "yes", "2": "3", "3": "red", "4": "no"}, ANNOTATIONS)


def test_vqa_scores_refuses_bad_annotations() -> None:
    with pytest.raises(ValueError, match="twice"):
        vqa_scores(
            {1: "yes"}, [annotation(1, ["yes"] * 10, "yes/no", "is"), annotation(1, ["no"] * 10, "yes/no", "is")]
        )
    with pytest.raises(ValueError, match="lacks"):
        vqa_scores({1: "yes"}, [{"question_id": 1, "answers": ["yes"] * 10}])
    with pytest.raises(ValueError, match="no annotations"):
        vqa_scores({}, {"annotations": []})
    with pytest.raises(ValueError, match="must be a str"):
        vqa_scores({1: None}, [annotation(1, ["yes"] * 10, "yes/no", "is")])

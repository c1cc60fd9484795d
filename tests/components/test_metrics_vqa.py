"""VQA accuracy against hand-computed cases: the official normalisation rules one by one, the 10-choose-9
averaging recomputed from its definition, the per-type aggregation and the chance level.  (The cases scored
by the official script itself are checked in test_metrics_official.py.)"""

from __future__ import annotations

from itertools import combinations

import pytest

from components.metrics import normalize_answer, process_punctuation, vqa_accuracy, vqa_scores

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
    ("dont", "don't"),  # the contractions map (ASCII apostrophes at the followed commit)
    ("weve", "we've"),
    ("Im", "im"),  # the map's key "Im" can never match after lower-casing
    ("don't", "don't"),  # "'" is not in the punctuation list
    ("12:30", "12:30"),  # nor is ":"
    ("3.5", "3.5"),  # a period before a digit stays
    ("yes.", "yes"),  # a period before a non-digit goes
    ("3.", "3"),
    ("a.b", "ab"),
    ("one, two", "1 2"),  # ", " touches a space: deleted
    ("one,two", "1 2"),  # touches no space: becomes a space
    ("10,000", "10000"),  # digit,digit: every punctuation mark is deleted
    ("1,000 dogs,cats", "1000 dogscats"),  # ... even commas far from the digits
    ("yes ?", "yes"),
    ("(yes)", "yes"),
    ("red-white!", "red white"),  # "-" and "!" are in the list: no space next to them, so spaces
    ("red - white", "red white"),  # " -" touches a space: deleted
    ("{yes}", "yes"),
    ("  Yes\n", "yes"),  # whitespace, newline
    ("black\tand  white", "black and white"),
    ("x" + "." * 40, "x" + "." * 8),  # the script deletes at most 32 periods (re.UNICODE passed as count)
    ("", ""),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISATION)
def test_normalize_answer_follows_the_official_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_process_punctuation_alone_keeps_case_words_and_articles() -> None:
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


def test_prediction_and_humans_are_normalised_when_the_humans_disagree() -> None:
    humans = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("Two", humans) == 1.0
    assert vqa_accuracy("two.", humans) == 1.0
    assert vqa_accuracy("The dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    # the human answers get the same processing: a human "two" is a "2"
    assert vqa_accuracy("2", ["two"] * 7 + ["2"] * 3) == 1.0
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0


def test_all_identical_humans_are_compared_with_the_raw_prediction() -> None:
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # no lower-casing
    assert vqa_accuracy("two", ["two"] * 10) == 1.0  # no number words
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0  # no punctuation step
    assert vqa_accuracy("  yes\t", ["yes"] * 10) == 1.0  # but whitespace is stripped
    # humans that differ only in surrounding whitespace count as identical
    assert vqa_accuracy("Yes", ["yes "] * 5 + ["yes"] * 5) == 0.0
    assert vqa_accuracy("yes", ["yes "] * 5 + ["yes"] * 5) == 1.0


def test_human_answers_may_be_vqa_answer_dicts() -> None:
    answers = [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(1, 4)]
    answers += [{"answer": "blue", "answer_confidence": "maybe", "answer_id": i} for i in range(4, 11)]
    assert vqa_accuracy("red", answers) == pytest.approx(0.9)


def test_equal_answer_dicts_are_left_out_together() -> None:
    # Without ids, leaving out one {"answer": "red"} drops all three: 3 x min(0/3, 1) + 7 x min(3/3, 1).
    answers = [{"answer": "red"}] * 3 + [{"answer": "blue"}] * 7
    assert vqa_accuracy("red", answers) == pytest.approx(0.7)
    # Dicts become equal after processing ("Red" and "red" both "red" once the humans disagree).
    answers = [{"answer": "Red"}, {"answer": "red"}, {"answer": "red"}] + [{"answer": "blue"}] * 7
    assert vqa_accuracy("red", answers) == pytest.approx(0.7)
    # Unhashable values are compared pairwise, with the same result.
    answers = [{"answer": a, "tags": [a]} for a in ["red"] * 3 + ["blue"] * 7]
    assert vqa_accuracy("red", answers) == pytest.approx(0.7)


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
    # hand: q1 0.0 ("Yes" raw against ten "yes"), q2 0.6 ("two" -> "2", 2 humans), q3 0.9, q4 0.0
    assert scores["per_question"] == pytest.approx({1: 0.0, 2: 0.6, 3: 0.9, 4: 0.0})
    assert scores["accuracy"] == pytest.approx((0.0 + 0.6 + 0.9 + 0.0) / 4)
    assert scores["per_answer_type"] == pytest.approx({"number": 0.6, "other": 0.9, "yes/no": 0.0})
    assert scores["per_question_type"] == pytest.approx({"how many": 0.6, "is the": 0.0, "what color is the": 0.9})
    assert scores["num_questions"] == 4


def test_vqa_chance_is_the_expected_accuracy_of_a_uniform_vocabulary_answer() -> None:
    predictions = {1: "yes", 2: "3", 3: "red", 4: "no"}
    # hand, vocabulary of 5: q1 "yes" 1 -> 1/5; q2 "2" 0.6 + "3" 1 -> 1.6/5; q3 "red" 0.9 -> 0.9/5; q4 "no" 1/5
    scores = vqa_scores(predictions, ANNOTATIONS, answer_vocabulary=["yes", "no", "2", "3", "red"])
    assert scores["chance"] == pytest.approx((1 + 1.6 + 0.9 + 1) / 5 / 4)
    assert scores["chance_vocabulary_size"] == 5
    # the all-identical questions compare raw: a vocabulary "Yes" earns nothing on ten "yes"
    scores = vqa_scores(predictions, ANNOTATIONS, answer_vocabulary=["Yes", "no", "2", "3", "red", "red"])
    assert scores["chance"] == pytest.approx((0 + 1.6 + 0.9 + 1) / 5 / 4)  # the repeated "red" counts once
    # default vocabulary: the 6 distinct human answers (yes, 2, 3, red, dark red, no); q3 adds "dark red" 1.0
    scores = vqa_scores(predictions, ANNOTATIONS)
    assert scores["chance"] == pytest.approx((1 + 1.6 + 1.9 + 1) / 6 / 4)
    assert scores["chance_vocabulary_size"] == 6
    with pytest.raises(ValueError, match="empty"):
        vqa_scores(predictions, ANNOTATIONS, answer_vocabulary=[])


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

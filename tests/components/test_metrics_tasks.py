"""VCR, RefCOCO+ and retrieval metrics against hand-computed cases (ties, touching / contained / degenerate
boxes in both box conventions, distractor images, chance levels), plus brute-force cross-checks of the
retrieval ranks and of the text-retrieval chance.  (Cases scored by the original ViLBERT code are checked in
test_metrics_official.py.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from components.metrics import (
    box_iou,
    grounding_scores,
    image_retrieval_ranks,
    is_correct,
    recall_summary,
    retrieval_scores,
    text_retrieval_ranks,
    vcr_accuracy,
    vcr_q2ar_scores,
    vcr_scores,
    xywh_to_xyxy,
)

# --- VCR


def test_vcr_accuracy_is_argmax_against_the_label_with_ties_to_the_lowest_index() -> None:
    scores = [[0.1, 0.9, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [-3.0, -2.0, -1.0, -4.0]]
    result = vcr_scores(scores, [1, 2, 1, 2])
    assert result["predicted"] == [1, 0, 0, 2]  # row 3 ties 0 and 1: choice 0
    assert result["correct"] == [True, False, False, True]
    assert result["accuracy"] == 0.5
    assert result["num_questions"] == 4
    assert result["chance"] == 0.25


def test_vcr_q2ar_needs_both_answer_and_rationale_right() -> None:
    answers = [[0.9, 0.1, 0.0, 0.0]] * 4
    rationales = [[0.0, 0.0, 0.7, 0.3]] * 4
    result = vcr_q2ar_scores(answers, [0, 0, 1, 1], rationales, [2, 1, 2, 1])
    assert result["q2a"]["correct"] == [True, True, False, False]
    assert result["qa2r"]["correct"] == [True, False, True, False]
    assert result["q2ar"]["correct"] == [True, False, False, False]
    assert (result["q2a"]["accuracy"], result["qa2r"]["accuracy"], result["q2ar"]["accuracy"]) == (0.5, 0.5, 0.25)
    assert (result["q2a"]["chance"], result["qa2r"]["chance"], result["q2ar"]["chance"]) == (0.25, 0.25, 1 / 16)
    assert result["num_questions"] == 4
    with pytest.raises(ValueError, match="row i of both"):
        vcr_q2ar_scores(answers, [0, 0, 1, 1], rationales[:3], [2, 1, 2])


def test_vcr_accepts_torch_tensors_in_low_precision() -> None:
    scores = torch.tensor([[0.0, 0.0, 2.0, 1.0], [3.0, 0.0, 0.0, 1.0]], dtype=torch.bfloat16, requires_grad=True)
    assert vcr_accuracy(scores, torch.tensor([2, 3])) == 0.5


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([[0.1, 0.9, 0.0]], [1], r"\[N, 4\]"),
        ([[0.1, 0.9, 0.0, 0.0]], [4], r"\[0, 4\)"),
        ([[0.1, 0.9, 0.0, 0.0]], [0, 1], "one per question"),
        ([[float("nan"), 0.9, 0.0, 0.0]], [1], "NaN"),
        ([[0.1, 0.9, 0.0, 0.0]], [1.5], "integer"),
        (np.zeros((0, 4)), [], "no questions"),
    ],
)
def test_vcr_refuses_bad_input(scores, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vcr_scores(scores, labels)


# --- RefCOCO+ grounding


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
        ([0, 0, 1, 1], [1, 0, 2, 1], 2 / 6),  # touching along an edge: one shared pixel column (2 x 1 of 4 + 4 - 2)
        ([0, 0, 1, 1], [1, 1, 2, 2], 1 / 7),  # touching at a corner: one shared pixel
        ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),  # far apart
        ([0, 0, 4, 4], [1, 1, 3, 3], 9 / 25),  # contained: 3 x 3 pixels of 5 x 5
        ([0, 0, 9, 9], [0, 0, 4, 9], 0.5),  # half: exactly the threshold (which does NOT count)
        ([10.5, 0, 20.5, 10], [15.5, 0, 25.5, 10], 66 / 176),  # fractional: 11 x 11 each, 6 x 11 shared
        ([1, 1, 1, 1], [1, 1, 1, 1], 1.0),  # a point box is one pixel
        ([1, 1, 3, 1], [0, 0, 4, 4], 3 / 25),  # a line box is one pixel high
    ],
)
def test_box_iou_vilbert_convention_hand_computed(a, b, iou: float) -> None:
    # float32 like the original: hand values agree to float32 precision
    assert box_iou(a, b)[0] == pytest.approx(iou, rel=1e-6)
    assert box_iou(b, a)[0] == pytest.approx(iou, rel=1e-6)  # symmetric


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching along an edge
        ([0, 0, 1, 1], [1, 1, 2, 2], 0.0),  # touching at a corner
        ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),  # far apart
        ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # contained: inter 4, union 16
        ([0, 0, 2, 1], [0, 0, 1, 1], 0.5),  # half: exactly the threshold
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # inter 1, union 4 + 4 - 1
        ([10.5, 0, 20.5, 10], [15.5, 0, 25.5, 10], 50 / 150),  # fractional pixels
        ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # degenerate point: zero union
        ([1, 1, 3, 1], [0, 0, 4, 4], 0.0),  # degenerate line inside a box: zero intersection
    ],
)
def test_box_iou_continuous_convention_hand_computed(a, b, iou: float) -> None:
    assert box_iou(a, b, convention="continuous")[0] == pytest.approx(iou)
    assert box_iou(b, a, convention="continuous")[0] == pytest.approx(iou)


def test_box_iou_is_element_wise_and_plus_one_by_default() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 1, 1]])
    b = np.array([[0, 0, 10, 5], [0, 0, 1, 1]])
    # inclusive pixels: 66 / 121; the continuous convention gives 50 / 100
    np.testing.assert_allclose(box_iou(a, b), [66 / 121, 1.0], rtol=1e-6)
    np.testing.assert_allclose(box_iou(a, b, convention="continuous"), [0.5, 1.0])


def test_box_iou_refuses_bad_boxes() -> None:
    with pytest.raises(ValueError, match="x2 < x1"):
        box_iou([2, 0, 1, 1], [0, 0, 1, 1])  # xywh mistaken for xyxy, or a flipped box
    with pytest.raises(ValueError, match="pairs"):
        box_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 2, 2]])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_iou([0, 0, 1], [0, 0, 1])
    with pytest.raises(ValueError, match="convention"):
        box_iou([0, 0, 1, 1], [0, 0, 1, 1], convention="refer")  # type: ignore[arg-type]


def test_grounding_accuracy_counts_iou_above_one_half() -> None:
    pred = [[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 1, 1], [0, 0, 10, 10]]
    true = [[0, 0, 4, 9], [0, 0, 5, 9], [5, 5, 6, 6], [0, 0, 10, 10]]
    result = grounding_scores(pred, true)
    assert result["correct"] == [False, True, False, True]  # IoU 0.5 (not above), 0.6, 0, 1
    assert result["accuracy"] == 0.5
    assert result["mean_iou"] == pytest.approx((0.5 + 0.6 + 0 + 1) / 4)
    assert result["convention"] == "vilbert"
    assert grounding_scores(pred, true, iou_threshold=0.25)["accuracy"] == 0.75
    with pytest.raises(ValueError, match="iou_threshold"):
        grounding_scores(pred, true, iou_threshold=0.0)


def test_grounding_continuous_convention_counts_at_least_one_half() -> None:
    pred = [[0, 0, 2, 1], [0, 0, 4, 4], [0, 0, 1, 1], [0, 0, 10, 10]]
    true = [[0, 0, 1, 1], [1, 1, 3, 3], [1, 1, 2, 2], [0, 0, 10, 10]]
    result = grounding_scores(pred, true, convention="continuous")
    assert result["correct"] == [True, False, False, True]  # IoU 0.5 (inclusive), 0.25, 0, 1
    assert result["accuracy"] == 0.5
    assert is_correct([0.5, 0.50001], convention="vilbert").tolist() == [False, True]
    assert is_correct([0.5, 0.49999], convention="continuous").tolist() == [True, False]


def test_grounding_chance_is_the_share_of_candidates_a_random_choice_would_hit() -> None:
    pred, true = [[0, 0, 9, 9], [0, 0, 1, 1]], [[0, 0, 9, 9], [0, 0, 1, 1]]
    candidates = [
        [[0, 0, 9, 9], [0, 0, 4, 9], [0, 0, 5, 9], [20, 20, 30, 30]],  # IoU 1, 0.5 (a miss), 0.6, 0: 2 of 4
        [[0, 0, 1, 1]],  # 1 of 1
    ]
    assert grounding_scores(pred, true, candidate_boxes=candidates)["chance"] == pytest.approx((0.5 + 1.0) / 2)
    assert grounding_scores(pred, true, num_regions=[4, 2])["chance"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert grounding_scores(pred, true, num_regions=10)["chance"] == pytest.approx(0.1)
    assert grounding_scores(pred, true)["chance"] is None
    with pytest.raises(ValueError, match="one set of boxes per expression"):
        grounding_scores(pred, true, candidate_boxes=candidates[:1])
    with pytest.raises(ValueError, match="no candidates"):
        grounding_scores(pred, true, candidate_boxes=[candidates[0], np.zeros((0, 4))])
    with pytest.raises(ValueError, match="num_regions"):
        grounding_scores(pred, true, num_regions=0)


def test_xywh_to_xyxy() -> None:
    np.testing.assert_array_equal(xywh_to_xyxy([[10, 20, 5, 7]]), [[10, 20, 15, 27]])
    np.testing.assert_array_equal(xywh_to_xyxy([1, 2, 3, 4]), [1, 2, 4, 6])


# --- retrieval

# 4 captions x 3 images; captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2.
SCORES = np.array(
    [
        [0.9, 0.1, 0.2],  # correct image scored highest: rank 1
        [0.5, 0.5, 0.7],  # ties image 1, image 2 above: pessimistic rank 1 + 2 = 3
        [0.3, 0.2, 0.1],  # image 0 above: rank 2
        [0.0, 0.0, 0.0],  # all tied: rank 3 (gallery size)
    ]
)
CAPTION_IMAGE = [0, 0, 1, 2]


def test_image_retrieval_ranks_with_pessimistic_ties() -> None:
    assert image_retrieval_ranks(SCORES, CAPTION_IMAGE).tolist() == [1, 3, 2, 3]


def test_text_retrieval_ranks_count_the_best_of_an_images_captions() -> None:
    images, ranks = text_retrieval_ranks(SCORES, CAPTION_IMAGE)
    # image 0: best own caption 0.9, no other caption >= 0.9 -> 1 (its own second caption does not count)
    # image 1: own 0.2, caption 1 (0.5) above -> 2;  image 2: own 0.0, all three others tie or beat it -> 4
    assert images.tolist() == [0, 1, 2]
    assert ranks.tolist() == [1, 2, 4]


def test_retrieval_scores_summaries() -> None:
    result = retrieval_scores(SCORES, CAPTION_IMAGE)
    image = result["image_retrieval"]
    assert (image["recall_at_1"], image["recall_at_5"], image["recall_at_10"]) == (0.25, 1.0, 1.0)
    assert image["median_rank"] == 2.0  # floor of the median of 1, 2, 3, 3 (2.5), as the original
    assert image["mean_rank"] == 2.25
    assert image["num_queries"] == 4
    text = result["text_retrieval"]
    assert text["recall_at_1"] == pytest.approx(1 / 3)
    assert text["median_rank"] == 2.0
    assert (result["num_captions"], result["num_images"]) == (4, 3)


def test_distractor_images_compete_but_are_not_queries() -> None:
    # a fourth image without captions (a near-duplicate distractor) scoring high for caption 0
    scores = np.hstack([SCORES, [[0.95], [0.1], [0.1], [0.0]]])
    assert image_retrieval_ranks(scores, CAPTION_IMAGE).tolist() == [2, 3, 2, 4]
    images, ranks = text_retrieval_ranks(scores, CAPTION_IMAGE)
    assert images.tolist() == [0, 1, 2]
    assert ranks.tolist() == [1, 2, 4]


def test_retrieval_ranks_match_a_sort_when_there_are_no_ties() -> None:
    rng = np.random.default_rng(0)
    num_images, per_image = 30, 5
    caption_image = np.repeat(np.arange(num_images), per_image)
    scores = rng.standard_normal((num_images * per_image, num_images))
    order = np.argsort(-scores, axis=1)
    by_sort = [int(np.flatnonzero(order[c] == caption_image[c])[0]) + 1 for c in range(len(caption_image))]
    assert image_retrieval_ranks(torch.from_numpy(scores), caption_image).tolist() == by_sort
    text_order = np.argsort(-scores.T, axis=1)
    text_by_sort = [int(np.flatnonzero(caption_image[text_order[i]] == i)[0]) + 1 for i in range(num_images)]
    assert text_retrieval_ranks(scores, caption_image)[1].tolist() == text_by_sort


def test_retrieval_chance_is_that_of_a_random_ranking() -> None:
    result = retrieval_scores(SCORES, CAPTION_IMAGE)
    # image retrieval: one right image of 3
    assert result["chance"] == result["image_retrieval"]["chance"]
    assert result["chance"] == pytest.approx({"recall_at_1": 1 / 3, "recall_at_5": 1.0, "recall_at_10": 1.0,
                                              "mean_rank": 2.0})  # fmt: skip
    # text retrieval: image 0 owns 2 of the 4 captions, images 1 and 2 one each
    text = result["text_retrieval"]["chance"]
    assert text["recall_at_1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert text["mean_rank"] == pytest.approx((5 / 3 + 5 / 2 + 5 / 2) / 3)  # (M + 1) / (m + 1)
    assert recall_summary([1, 2], gallery_size=1000)["chance"]["recall_at_5"] == pytest.approx(0.005)
    assert "chance" not in recall_summary([1, 2])
    with pytest.raises(ValueError, match="gallery_size"):
        recall_summary([1, 20], gallery_size=10)


def test_text_retrieval_chance_matches_every_ranking_enumerated() -> None:
    # 5 captions, the query image owns 2 (captions 0 and 1): average over all 120 orders of the captions
    orders = list(itertools.permutations(range(5)))
    first_own = [1 + min(order.index(0), order.index(1)) for order in orders]
    scores = np.array([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 3)  # [5 captions, 2 images]
    chance = retrieval_scores(scores, [0, 0, 1, 1, 1], ks=(1, 2, 3))["text_retrieval"]["chance"]
    # the average over both query images: image 0 owns 2 of 5 captions, image 1 owns 3
    first_own_1 = [1 + min(order.index(2), order.index(3), order.index(4)) for order in orders]
    for k in (1, 2, 3):
        brute = (np.mean([r <= k for r in first_own]) + np.mean([r <= k for r in first_own_1])) / 2
        assert chance[f"recall_at_{k}"] == pytest.approx(brute)
    assert chance["mean_rank"] == pytest.approx((np.mean(first_own) + np.mean(first_own_1)) / 2)


def test_recall_summary_custom_cutoffs_and_bad_input() -> None:
    assert recall_summary([1, 2, 3, 10], ks=(2, 3))["recall_at_2"] == 0.5
    with pytest.raises(ValueError, match="1-based"):
        recall_summary([0, 1])
    with pytest.raises(ValueError, match="positive"):
        recall_summary([1, 2], ks=(0,))
    with pytest.raises(ValueError, match="no queries"):
        recall_summary([])


@pytest.mark.parametrize(
    ("scores", "caption_image", "message"),
    [
        (SCORES, [0, 0, 1], "one image index per caption"),
        (SCORES, [0, 0, 1, 3], r"\[0, 3\)"),
        (np.zeros((0, 3)), [], "empty"),
        (np.full((2, 2), np.nan), [0, 1], "NaN"),
        (np.zeros(3), [0, 1, 2], "2 dimensions"),
    ],
)
def test_retrieval_refuses_bad_input(scores, caption_image, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_scores(scores, caption_image)

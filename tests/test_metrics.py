"""Metrics against scikit-learn and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from models import metrics

NUM_CLASSES = 7


@pytest.fixture
def classified() -> tuple[np.ndarray, np.ndarray]:
    """Seeded random class scores and labels, n=300, C=7."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, 300)
    scores = rng.normal(size=(300, NUM_CLASSES))
    scores[np.arange(300), labels] += 1.0  # better than chance, far from perfect
    return scores, labels


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_accuracy_matches_sklearn(classified: tuple[np.ndarray, np.ndarray], k: int) -> None:
    scores, labels = classified
    expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(NUM_CLASSES))
    assert metrics.topk_accuracy(scores, labels, ks=(k,))[k] == pytest.approx(expected)


def test_topk_accuracy_clips_k_and_counts_ties_against() -> None:
    labels = np.array([0, 1, 2])
    assert metrics.topk_accuracy(np.eye(3), labels, ks=(1, 10)) == {1: 1.0, 10: 1.0}
    assert metrics.topk_accuracy(np.ones((3, 3)), labels, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_confusion_and_per_class_prf_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    # Class 5 never occurs (support 0) and class 0 is never predicted: both divide 0 by 0.
    labels = rng.integers(0, 5, 200)
    predicted = np.where(rng.random(200) < 0.6, np.maximum(labels, 1), rng.integers(1, 6, 200))
    all_classes = np.arange(6)

    confusion = metrics.confusion_matrix(labels, predicted, 6)
    np.testing.assert_array_equal(
        confusion, skm.confusion_matrix(labels, predicted, labels=all_classes)
    )
    expected = skm.precision_recall_fscore_support(
        labels, predicted, labels=all_classes, zero_division=0
    )
    for ours, theirs in zip(metrics.per_class_prf(confusion), expected, strict=True):
        np.testing.assert_allclose(ours, theirs)


def test_recall_and_map_at_r_hand_example() -> None:
    # Gallery = the queries themselves (leave-one-out): 3 items of label 0, 2 of label 1, 1 of 2.
    counts = np.array([3, 2, 1])
    query_labels = np.array([0, 1, 0, 2])
    neighbour_labels = np.array(
        [
            [0, 1, 0],  # R=2: rel 1,0 -> (P(1)=1) / 2 = 0.5
            [0, 1, 0],  # R=1: rank 1 misses; rank 2 is beyond R -> 0.0
            [1, 0, 0],  # R=2: rel 0,1 -> (P(2)=1/2) / 2 = 0.25
            [0, 0, 1],  # R=0: no other label-2 item -> left out
        ]
    )
    # MAP@R = (0.5 + 0.0 + 0.25) / 3 = 0.25.
    result = metrics.map_at_r(neighbour_labels, query_labels, counts, queries_in_gallery=True)
    assert result == (pytest.approx(0.25), 3, 1, 0)
    # Recall@1: only the first query hits; by rank 2 every scored query has (k=5 clips to 3).
    recall = metrics.recall_at_k(
        neighbour_labels, query_labels, counts, queries_in_gallery=True, ks=(1, 2, 5)
    )
    assert recall == pytest.approx({1: 1 / 3, 2: 1.0, 5: 1.0})


def test_map_at_r_with_too_few_neighbours_is_a_lower_bound() -> None:
    counts = np.array([3, 2, 1])
    query_labels = np.array([0, 1, 0])
    full = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 0]])
    exact = metrics.map_at_r(full, query_labels, counts, queries_in_gallery=True)
    # One neighbour each: the third query's relevant rank 2 is cut off, 0.25 -> 0.0.
    cut = metrics.map_at_r(full[:, :1], query_labels, counts, queries_in_gallery=True)
    assert cut.value == pytest.approx(0.5 / 3)
    assert cut.value < exact.value
    assert cut.num_truncated == 2


def _brute_force_map_at_r(hits: np.ndarray, relevant: np.ndarray) -> float:
    """MAP@R straight from the paper's formula, one query at a time."""
    scores = []
    for row, r in zip(hits, relevant, strict=True):
        if r == 0:
            continue
        found, total = 0, 0.0
        for i in range(1, r + 1):
            if i <= len(row) and row[i - 1]:
                found += 1
                total += found / i
        scores.append(total / r)
    return float(np.mean(scores))


@pytest.mark.parametrize("queries_in_gallery", [True, False])
def test_retrieval_metrics_match_brute_force(queries_in_gallery: bool) -> None:
    rng = np.random.default_rng(2)
    gallery_labels = rng.integers(0, 6, 80)
    counts = np.bincount(gallery_labels, minlength=6)
    if queries_in_gallery:  # leave-one-out: each gallery item queries the others
        query_labels = gallery_labels
        others = ~np.eye(80, dtype=bool)
        order = np.array([rng.permutation(np.flatnonzero(row)) for row in others])
    else:
        query_labels = rng.integers(0, 6, 50)
        order = np.array([rng.permutation(80) for _ in range(50)])
    neighbour_labels = gallery_labels[order]
    relevant = counts[query_labels] - int(queries_in_gallery)
    hits = neighbour_labels == query_labels[:, None]

    result = metrics.map_at_r(
        neighbour_labels, query_labels, counts, queries_in_gallery=queries_in_gallery
    )
    assert result.value == pytest.approx(_brute_force_map_at_r(hits, relevant))
    assert result.num_excluded == int((relevant == 0).sum())
    assert result.num_truncated == 0
    recall = metrics.recall_at_k(
        neighbour_labels, query_labels, counts, queries_in_gallery=queries_in_gallery
    )
    scored = relevant > 0
    for k in (1, 5, 10):
        assert recall[k] == pytest.approx(hits[scored, :k].any(axis=1).mean())


def test_knn_vote_weights_by_similarity_and_breaks_ties_by_nearest() -> None:
    neighbour_labels = np.array([[2, 0, 0], [0, 1, 1], [1, 0, 0], [0, 1, 2]])
    neighbour_scores = np.array(
        [
            [0.9, 0.3, 0.3],  # 0.9 for class 2 beats 0.6 for the majority class 0
            [0.5, 0.25, 0.25],  # tie 0.5 / 0.5: class 0 holds the nearest neighbour
            [0.5, 0.25, 0.25],  # tie again, nearest is class 1
            [-0.1, -0.2, -0.3],  # negative similarities: an absent class (0 votes) never wins
        ]
    )
    predicted = metrics.knn_vote(neighbour_labels, neighbour_scores, num_classes=4, k=3)
    np.testing.assert_array_equal(predicted, [2, 0, 1, 0])
    nearest_only = metrics.knn_vote(neighbour_labels, neighbour_scores, num_classes=4, k=1)
    np.testing.assert_array_equal(nearest_only, neighbour_labels[:, 0])


def test_calibrate_threshold_hand_case() -> None:
    confidences = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, True, False])
    # Precision keeping confidence >= t: 0.9 -> 1/1, 0.8 -> 2/3, 0.7 -> 3/4, 0.6 -> 4/5, 0.5 -> 4/6.
    assert metrics.calibrate_threshold(confidences, correct, 0.8) == 0.6
    assert metrics.calibrate_threshold(confidences, correct, 0.75) == 0.6
    # 0.8 would be 2/2 if the tie at 0.8 were split; a threshold keeps both, so 2/3.
    assert metrics.calibrate_threshold(confidences, correct, 0.9) == 0.9
    assert metrics.calibrate_threshold(confidences, correct, 0.6) == 0.5
    assert metrics.calibrate_threshold(confidences, ~np.ones(6, bool), 0.5) is None
    assert metrics.calibrate_threshold(np.array([]), np.array([], bool)) is None


def _confident(count: int, errors_below: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """count val answers, confidences spread over (0.5, 1); wrong only below errors_below."""
    confidences = np.random.default_rng(seed).uniform(0.5, 1.0, count)
    correct = (confidences >= errors_below) | (np.arange(count) % 2 == 0)
    return confidences, correct


def test_the_threshold_keeps_the_target_where_it_answers_most_images() -> None:
    confidences, correct = _confident(200, errors_below=0.55)  # target reached near 0.55
    chosen = metrics.choose_threshold(confidences, correct, 0.95)
    assert chosen.threshold == metrics.calibrate_threshold(confidences, correct, 0.95)
    assert chosen.coverage >= metrics.MIN_COVERAGE and chosen.precision >= 0.95
    assert chosen.rule.startswith("the lowest that reaches 95% precision")


def test_a_target_that_answers_almost_nothing_gives_way_to_the_coverage_floor() -> None:
    """The case of the issue: 95 % precision only at 0.99 confidence, answering 1 %."""
    confidences, correct = _confident(300, errors_below=0.995)
    assert np.mean(confidences >= metrics.calibrate_threshold(confidences, correct, 0.95)) < 0.05
    chosen = metrics.choose_threshold(confidences, correct, 0.95)
    assert metrics.MIN_COVERAGE <= chosen.coverage < metrics.MIN_COVERAGE + 0.01
    assert chosen.precision == pytest.approx(np.mean(correct[confidences >= chosen.threshold]))
    assert "only when answering" in chosen.rule and "answer at least 80%" in chosen.rule


def test_a_small_split_answers_at_least_the_floor_and_more_when_it_is_right() -> None:
    confidences, correct = _confident(20, errors_below=0.9)
    chosen = metrics.choose_threshold(confidences, correct, 0.95)
    assert chosen.coverage >= metrics.MIN_COVERAGE and "20 val images are too few" in chosen.rule
    all_right = metrics.choose_threshold(confidences, np.ones(20, bool), 0.95)
    assert all_right.coverage == 1.0  # the target's threshold answers more than the floor


def test_no_val_images_no_threshold() -> None:
    chosen = metrics.choose_threshold(np.array([]), np.array([], bool))
    assert chosen.threshold is None and "no validation images" in chosen.describe()

"""Metrics (numpy-only AUROC / AP / F1-max / IoU / distances) on hand-made cases with known answers, and against
brute-force definitions."""

import itertools
import math

import numpy as np
import pytest

from dualanodiff_core.evaluation import metrics


def brute_auroc(s, y):
    pos, neg = s[y], s[~y]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def brute_ap(s, y):
    # sum over distinct thresholds (descending) of (recall gain) * precision at that threshold
    ap, prev_r = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = np.sum(pred & y)
        p, r = tp / pred.sum(), tp / y.sum()
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def test_auroc_and_ap_hand_cases():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(s, y) == pytest.approx(0.75)
    assert metrics.average_precision(s, y) == pytest.approx((1 / 2) * 1.0 + (1 / 2) * (2 / 3))
    # perfect, reversed, constant
    assert metrics.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert metrics.roc_auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5
    assert metrics.average_precision([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    # ties between a positive and negatives count half (AUROC) and as one threshold (AP)
    s, y = np.array([0.5, 0.5, 0.5, 0.9]), np.array([1, 0, 0, 1])
    assert metrics.roc_auc(s, y) == pytest.approx(0.75)
    assert metrics.average_precision(s, y) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # a constant score gives AP = prevalence
    assert metrics.average_precision(np.zeros(10), np.r_[np.ones(3), np.zeros(7)]) == pytest.approx(0.3)


def test_auroc_ap_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        s = np.round(rng.random(n), 1)  # many ties
        y = rng.random(n) < 0.4
        if y.all() or not y.any():
            continue
        assert metrics.roc_auc(s, y) == pytest.approx(brute_auroc(s, y))
        assert metrics.average_precision(s, y) == pytest.approx(brute_ap(s, y))


def test_undefined_cases_are_nan_and_bad_input_raises():
    assert math.isnan(metrics.roc_auc([1, 2], [1, 1]))
    assert math.isnan(metrics.average_precision([1, 2], [0, 0]))
    assert math.isnan(metrics.f1_max([1, 2], [0, 0]))
    with pytest.raises(ValueError, match="same number"):
        metrics.roc_auc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.average_precision([np.nan, 1], [0, 1])


def test_f1_max():
    # thresholds keep 2 (P 1, R 2/3: F1 0.8), 3 (0.667), 4 (0.571) or all 5 (P 0.6, R 1: 0.75) -> 0.8
    assert metrics.f1_max([0.9, 0.8, 0.3, 0.2, 0.05], [1, 1, 0, 0, 1]) == pytest.approx(0.8)
    assert metrics.f1_max([0.9, 0.8, 0.7], [1, 1, 1]) == pytest.approx(1.0)


def test_iou():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[0:10, 0:10] = True
    b[5:15, 0:10] = True  # overlap 5x10
    assert metrics.iou(a, b) == pytest.approx(50 / 150)
    assert metrics.iou(a, a) == 1.0
    assert metrics.iou(a, ~a) == 0.0
    assert metrics.iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # two empty masks agree
    assert metrics.iou(a.astype(np.uint8) * 255, a) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.iou(a, a[:5])


def test_distances_and_diversity():
    zeros, ones = np.zeros((2, 4, 4, 3)), np.ones((1, 4, 4, 3))
    d = metrics.pairwise_distances(np.concatenate([zeros, ones]))
    assert d.shape == (3, 3)
    assert d[0, 1] == 0.0 and d[0, 2] == pytest.approx(1.0) and d[2, 2] == 0.0
    assert metrics.mean_pairwise_distance(np.concatenate([zeros, ones])) == pytest.approx(2 / 3)
    assert metrics.pairwise_distances(np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2)), "l2")[0, 0] == pytest.approx(0.5)
    assert math.isnan(metrics.mean_pairwise_distance(zeros[:1]))
    m = np.zeros((3, 8, 8), bool)
    m[0, :4] = True
    m[1, :4] = True
    m[2, 4:] = True  # disjoint from the others
    assert metrics.mean_pairwise_iou_distance(m[:2]) == 0.0
    assert metrics.mean_pairwise_iou_distance(m) == pytest.approx(2 / 3)
    # clustered: two tight clusters around two centres -> the small within-cluster distance, not the large between
    items = np.array([[0.0], [0.1], [1.0], [1.1]])
    assert metrics.clustered_pairwise_distance(items, np.array([[0.0], [1.0]])) == pytest.approx(0.1)
    assert metrics.mean_std([1.0, 3.0, float("nan")]) == (2.0, pytest.approx(math.sqrt(2)))

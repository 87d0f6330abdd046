"""Evaluation metrics with numpy only (no scikit-learn): AUROC, average precision, F1-max, IoU, pairwise distances.

Conventions follow scikit-learn's where they exist, so numbers are comparable with published tables:

* :func:`roc_auc` is the area under the ROC curve with tied scores counted as half (the Mann-Whitney statistic),
  equal to ``sklearn.metrics.roc_auc_score``;
* :func:`average_precision` is ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, equal to
  ``sklearn.metrics.average_precision_score`` (no interpolation);
* :func:`f1_max` is the best F1 over all thresholds (the anomaly-detection "F1-max").

Undefined cases return ``nan`` (e.g. AUROC with only one class present) rather than raising, so a table can still
be printed; callers decide what to do with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def _flat(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) must have the same number of elements")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    return s, y.astype(bool)


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (higher score = more anomalous, label True = anomalous)."""
    s, y = _flat(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rankdata(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _pr_points(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Cumulative true/false positives at each distinct threshold, from the highest score down."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1) - tp
    return tp, fp, int(y.sum())


def _precision_recall(scores, labels) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision and recall at every distinct threshold; None when there are no scores or no positives."""
    s, y = _flat(scores, labels)
    if len(s) == 0:
        return None
    tp, fp, n_pos = _pr_points(s, y)
    if n_pos == 0:
        return None
    return tp / (tp + fp), tp / n_pos


def average_precision(scores, labels) -> float:
    pr = _precision_recall(scores, labels)
    if pr is None:
        return float("nan")
    precision, recall = pr
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores, labels) -> float:
    pr = _precision_recall(scores, labels)
    if pr is None:
        return float("nan")
    precision, recall = pr
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    return float(f1.max())


def iou(a, b, empty: float = 1.0) -> float:
    """Intersection over union of two binary masks (anything > 0 is foreground). Two empty masks agree
    perfectly: ``empty`` (1.0) is returned."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    if union == 0:
        return float(empty)
    return float(np.count_nonzero(a & b) / union)


def pairwise_distances(x, y=None, metric: str = "l1", chunk: int = 64) -> np.ndarray:
    """``[N, M]`` distances between the rows of ``x`` ``[N, ...]`` and ``y`` ``[M, ...]`` (default ``x``):
    ``l1`` = mean absolute difference, ``l2`` = root mean squared difference (both per element, so the value does
    not depend on the image size)."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    y = x if y is None else np.asarray(y, dtype=np.float32).reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"items differ in size: {x.shape[1]} vs {y.shape[1]} elements")
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}")
    out = np.empty((len(x), len(y)), dtype=np.float64)
    for i in range(0, len(x), chunk):
        d = x[i : i + chunk, None, :] - y[None, :, :]
        if metric == "l1":
            out[i : i + chunk] = np.abs(d).mean(-1)
        else:
            out[i : i + chunk] = np.sqrt((d * d).mean(-1))
    return out


def mean_pairwise_distance(x, metric: str = "l1") -> float:
    """Mean distance over all unordered pairs of distinct items (``nan`` for fewer than two)."""
    n = len(x)
    if n < 2:
        return float("nan")
    d = pairwise_distances(x, metric=metric)
    return float(d[np.triu_indices(n, 1)].mean())


def mean_pairwise_iou_distance(masks: Sequence) -> float:
    """Mean ``1 - IoU`` over all pairs of masks: 0 = all masks identical, 1 = no two overlap."""
    m = np.stack([np.asarray(k) > 0 for k in masks]).reshape(len(masks), -1).astype(np.float64)
    n = len(m)
    if n < 2:
        return float("nan")
    inter = m @ m.T
    area = m.sum(1)
    union = area[:, None] + area[None, :] - inter
    ious = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return float((1.0 - ious[np.triu_indices(n, 1)]).mean())


def clustered_pairwise_distance(
    items, centres, metric: str = "l1", per_cluster: int = 50, rng: np.random.Generator | None = None
) -> float:
    """The IC-LPIPS protocol (DFMGAN / DualAnoDiff ``eval/compute-ic-lpipis.py``) with a pixel distance: assign each
    item to its nearest centre, keep at most ``per_cluster`` random members of each cluster, average the pairwise
    distance inside each cluster, then over clusters with at least two members."""
    items = np.asarray(items)
    d = pairwise_distances(items, centres, metric=metric)
    assign = d.argmin(1)
    rng = rng or np.random.default_rng(0)
    vals = []
    for c in range(len(centres)):
        idx = np.flatnonzero(assign == c)
        if len(idx) > per_cluster:
            idx = rng.choice(idx, per_cluster, replace=False)
        if len(idx) >= 2:
            vals.append(mean_pairwise_distance(items[idx], metric))
    return float(np.mean(vals)) if vals else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not (isinstance(x, float) and math.isnan(x))], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

"""Detection mAP on images with known keypoints (SuperPoint paper, Table 2)."""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def match_detections(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, radius: float):
    """Greedy by score: each true point claims at most one prediction within ``radius``.

    Returns a bool (N,) array, True where the prediction is correct.
    """
    order = np.argsort(-scores)
    correct = np.zeros(len(pred), bool)
    if len(truth) == 0 or len(pred) == 0:
        return correct
    tree = cKDTree(truth)
    taken = np.zeros(len(truth), bool)
    for i in order:  # predictions per image are few (NMS); the greedy claim needs the order
        for j in tree.query_ball_point(pred[i], radius):
            if not taken[j]:
                taken[j] = correct[i] = True
                break
    return correct


def average_precision(correct: np.ndarray, scores: np.ndarray, n_truth: int) -> float:
    """Area under the precision-recall curve of detections pooled over a dataset."""
    if n_truth == 0 or len(scores) == 0:
        return 0.0
    order = np.argsort(-scores)
    tp = np.cumsum(correct[order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / n_truth
    # precision envelope, then sum over recall steps (VOC style, no interpolation points)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(precision * recall_steps))


def detection_map(predictions, truths, radius: float = 4.0) -> float:
    """``predictions``: list of (keypoints (N,2), scores (N,)); ``truths``: list of (M,2) arrays."""
    all_correct, all_scores, n_truth = [], [], 0
    for (pred, scores), truth in zip(predictions, truths):
        all_correct.append(match_detections(np.asarray(pred), np.asarray(scores), np.asarray(truth), radius))
        all_scores.append(np.asarray(scores))
        n_truth += len(truth)
    return average_precision(np.concatenate(all_correct), np.concatenate(all_scores), n_truth)

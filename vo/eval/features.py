"""HPatches-style metrics of local features (SuperPoint paper, Table 3 / 4).

Pure functions of keypoints (N,2) as (x, y) pixels, descriptors and a ground-truth
homography H that maps pixels of image 0 to pixels of image 1. Conventions follow
rpautrat/SuperPoint's `detector_evaluation` / `descriptor_evaluation`:

* the **shared view** of image 0 is the set of its keypoints that H maps inside
  image 1, and conversely with H^-1; every metric counts only those;
* a **correspondence** is a pair of keypoints closer than ``dist`` (3 px) once warped
  into the same image;
* a homography estimate is **correct at eps** when the four corners of image 0,
  warped by the estimate and by the truth, are on average at most eps pixels apart.
  The paper estimates with OpenCV's plain RANSAC; the evaluators also report MAGSAC++
  (OpenCV's USAC), a robust estimator of today, on the same matches.

The evaluator keeps at most 1000 keypoints per 480x640 image (the paper's setting).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial.distance import cdist

from vo.eval.detection import average_precision
from vo.geometry.homography import inside_mask, warp_points

CORRECT_DIST = 3.0             # px, correspondence threshold of repeatability, MLE, NN mAP, M. score
RANSAC_THRESHOLD = 3.0         # px, reprojection threshold of cv2.findHomography
HOMOGRAPHY_EPSILONS = (1, 3, 5)
# The paper's estimator first; both seed their generators on each call (reproducible).
HOMOGRAPHY_ESTIMATORS = {"ransac": cv2.RANSAC, "magsac": cv2.USAC_MAGSAC}
RANSAC_DRAWS = 10              # orderings of the matches behind the expected plain-RANSAC accuracy


# ----------------------------------------------------------------------------- image resizing

def resize_matrix(from_hw, to_hw) -> np.ndarray:
    """3x3 map from pixels of an image of size ``from_hw`` to pixels of it resized to ``to_hw``.

    cv2.resize aligns pixel *areas*, not pixel centres: x' = (x + 0.5) * sx - 0.5. A plain
    diag(sx, sy, 1) would be off by (sx - 1) / 2 px, a bias that shows up directly in the MLE.
    """
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], np.float64)


def adapt_homography(H: np.ndarray, from_hw0, to_hw0, from_hw1, to_hw1) -> np.ndarray:
    """H between the original images -> H between the resized images: S1 H S0^-1."""
    S0, S1 = resize_matrix(from_hw0, to_hw0), resize_matrix(from_hw1, to_hw1)
    return S1 @ H @ np.linalg.inv(S0)


def oriented_size(shape_hw, size_hw=(480, 640)) -> tuple[int, int]:
    """``size_hw`` turned to the image's orientation (portrait images get 640x480).

    HPatches holds portrait images (v_churchill is 1024x768, H x W): stretching them to
    480x640 would change the aspect by 1.8 and cropping would throw 44 % of them away;
    turning the target keeps the pixel count of the paper's setting with neither.
    """
    portrait = shape_hw[0] > shape_hw[1]
    return (max(size_hw), min(size_hw)) if portrait else (min(size_hw), max(size_hw))


# ----------------------------------------------------------------------------- shared view

def shared_view_mask(kp: np.ndarray, H: np.ndarray, other_hw) -> np.ndarray:
    """Boolean (N,): the keypoints that ``H`` maps inside an image of size ``other_hw``."""
    kp = np.asarray(kp, np.float64).reshape(-1, 2)
    if len(kp) == 0:
        return np.zeros(0, bool)
    return inside_mask(warp_points(H, kp), other_hw)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,2), (M,2) -> (N,M) Euclidean distances."""
    return cdist(np.asarray(a, np.float64).reshape(-1, 2), np.asarray(b, np.float64).reshape(-1, 2))


def _shared_keypoints(kp0, kp1, H, shape0, shape1):
    """Keypoints of image 0 warped into image 1 and keypoints of image 1, both in the shared view."""
    kp0 = np.asarray(kp0, np.float64).reshape(-1, 2)
    kp1 = np.asarray(kp1, np.float64).reshape(-1, 2)
    warped0 = warp_points(H, kp0)[shared_view_mask(kp0, H, shape1)] if len(kp0) else kp0
    kept1 = kp1[shared_view_mask(kp1, np.linalg.inv(H), shape0)]
    return warped0, kept1


# ----------------------------------------------------------------------------- detector metrics

def correspondence_distances(kp0, kp1, H, shape0, shape1):
    """Nearest-neighbour distances (px, measured in image 1) of the shared-view keypoints.

    Returns (distances of image 0's keypoints to their nearest keypoint in image 1,
    the same from image 1 to image 0). Both are taken so that the metrics are symmetric,
    as rpautrat's ``compute_repeatability``. Entries are inf when the other side is empty.
    """
    warped0, kept1 = _shared_keypoints(kp0, kp1, H, shape0, shape1)
    if len(warped0) == 0 or len(kept1) == 0:
        return np.full(len(warped0), np.inf), np.full(len(kept1), np.inf)
    d = pairwise_distances(warped0, kept1)
    return d.min(axis=1), d.min(axis=0)


def repeatability(kp0, kp1, H, shape0, shape1, dist: float = CORRECT_DIST) -> float:
    """Fraction of shared-view keypoints, of both images, with a keypoint within ``dist`` in the other.

    (count0 + count1) / (N0 + N1) as in the SuperPoint paper; NaN when neither image has
    a keypoint in the shared view (the pair says nothing about the detector).
    """
    d0, d1 = correspondence_distances(kp0, kp1, H, shape0, shape1)
    if len(d0) + len(d1) == 0:
        return float("nan")
    return float((np.sum(d0 <= dist) + np.sum(d1 <= dist)) / (len(d0) + len(d1)))


def localization_errors(kp0, kp1, H, shape0, shape1, dist: float = CORRECT_DIST) -> np.ndarray:
    """Distances (px) of the correspondences counted by `repeatability`, from both sides.

    Returned raw so a dataset can pool them, as rpautrat's ``compute_loc_error`` does.
    """
    d0, d1 = correspondence_distances(kp0, kp1, H, shape0, shape1)
    return np.concatenate([d0[d0 <= dist], d1[d1 <= dist]])


def localization_error(kp0, kp1, H, shape0, shape1, dist: float = CORRECT_DIST) -> float:
    """Mean localization error (MLE, px) over the correspondences within ``dist``; NaN if none."""
    errors = localization_errors(kp0, kp1, H, shape0, shape1, dist)
    return float(errors.mean()) if len(errors) else float("nan")


# ----------------------------------------------------------------------------- homography estimation

def estimate_homography(kp0, kp1, matches, threshold: float = RANSAC_THRESHOLD,
                        estimator: str = "ransac") -> np.ndarray | None:
    """H from matched keypoints with cv2.findHomography and one of ``HOMOGRAPHY_ESTIMATORS``;
    None when it cannot be estimated."""
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    if len(matches) < 4:  # a homography needs four correspondences
        return None
    pts0 = np.asarray(kp0, np.float64).reshape(-1, 2)[matches[:, 0]]
    pts1 = np.asarray(kp1, np.float64).reshape(-1, 2)[matches[:, 1]]
    H, _ = cv2.findHomography(pts0, pts1, HOMOGRAPHY_ESTIMATORS[estimator], threshold)
    return None if H is None else H.astype(np.float64)


def corner_errors(kp0, kp1, matches, H_gt: np.ndarray, shape_hw) -> dict[str, float]:
    """{estimator: corner error of its estimate from these matches} for every estimator."""
    return {name: corner_error(estimate_homography(kp0, kp1, matches, estimator=name), H_gt, shape_hw)
            for name in HOMOGRAPHY_ESTIMATORS}


def ransac_draw_errors(kp0, kp1, matches, H_gt: np.ndarray, shape_hw, draws: int = RANSAC_DRAWS) -> np.ndarray:
    """Corner errors of the paper's plain RANSAC on ``draws`` orderings of the same matches, the
    first as given (so it is the single run's error).

    cv2.findHomography seeds its sampler alike on every call, so one run is one draw of its luck
    on a pair: which minimal samples it tries, and when its confidence stops it. Reordering the
    matches draws other samples. The mean success over the draws is the accuracy a pair can be
    expected to have under that estimator, with much less noise than one run.
    """
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    rng = np.random.default_rng(0)
    orders = [np.arange(len(matches))] + [rng.permutation(len(matches)) for _ in range(draws - 1)]
    return np.array([corner_error(estimate_homography(kp0, kp1, matches[order]), H_gt, shape_hw)
                     for order in orders])


def expected_homography_accuracy(draw_errors_per_pair, eps: float) -> float:
    """Mean over pairs of the fraction of a pair's draws (``ransac_draw_errors``) correct at ``eps``."""
    return float(np.mean([np.mean(np.asarray(errors) <= eps) for errors in draw_errors_per_pair]))


def right_matches_fit_error(kp0, kp1, matches, H_gt: np.ndarray, shape_hw, dist: float = CORRECT_DIST) -> float:
    """Corner error of the least-squares homography on the matches the truth calls right (within
    ``dist``): what the matches and their localisation allow, whatever an estimator's sampling does."""
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    pts0 = np.asarray(kp0, np.float64).reshape(-1, 2)[matches[:, 0]]
    pts1 = np.asarray(kp1, np.float64).reshape(-1, 2)[matches[:, 1]]
    right = np.linalg.norm(warp_points(H_gt, pts0) - pts1, axis=1) <= dist
    if right.sum() < 4:
        return float("inf")
    H, _ = cv2.findHomography(pts0[right], pts1[right], 0)
    return corner_error(None if H is None else H.astype(np.float64), H_gt, shape_hw)


def homography_accuracies(corner_errors_per_pair: list[dict]) -> dict[str, float]:
    """{"h_acc_3": …, "h_acc_magsac_3": …}: accuracy of each estimator at each eps, the
    paper's RANSAC under the plain names."""
    summary = {}
    for name in HOMOGRAPHY_ESTIMATORS:
        prefix = "h_acc" if name == "ransac" else f"h_acc_{name}"
        errors = [pair[name] for pair in corner_errors_per_pair]
        summary.update({f"{prefix}_{eps}": homography_accuracy(errors, eps) for eps in HOMOGRAPHY_EPSILONS})
    return summary


def image_corners(shape_hw) -> np.ndarray:
    """(4,2) corner pixels (x, y) of an image of size shape_hw."""
    h, w = shape_hw[:2]
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)


def corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, shape_hw) -> float:
    """Mean distance (px) between the corners of image 0 warped by the estimate and by the truth.

    A failed estimate (None) has an infinite error, so it is incorrect at every eps.
    """
    if H_est is None:
        return float("inf")
    corners = image_corners(shape_hw)
    error = np.linalg.norm(warp_points(H_est, corners) - warp_points(H_gt, corners), axis=1).mean()
    return float(error) if np.isfinite(error) else float("inf")


def homography_correct(error: float, eps: float) -> bool:
    """The paper's correctness of an estimate: mean corner error at most eps pixels."""
    return bool(error <= eps)


def homography_accuracy(corner_errors, eps: float) -> float:
    """Fraction of pairs whose estimate is correct at ``eps`` (failed estimates count as wrong)."""
    errors = np.asarray(corner_errors, np.float64)
    return float(np.mean(errors <= eps)) if len(errors) else float("nan")


# ----------------------------------------------------------------------------- descriptor metrics

def descriptor_distances(desc0: np.ndarray, desc1: np.ndarray) -> np.ndarray:
    """(N,M) distances: Hamming for packed binary (uint8) descriptors such as ORB's, else L2."""
    desc0, desc1 = np.asarray(desc0), np.asarray(desc1)
    if desc0.dtype == np.uint8 and desc1.dtype == np.uint8:
        bits0 = np.unpackbits(desc0, axis=1).astype(np.float32)
        bits1 = np.unpackbits(desc1, axis=1).astype(np.float32)
        return bits0.sum(1)[:, None] + bits1.sum(1)[None] - 2 * bits0 @ bits1.T
    desc0, desc1 = desc0.astype(np.float64), desc1.astype(np.float64)
    sq = (desc0 ** 2).sum(1)[:, None] + (desc1 ** 2).sum(1)[None] - 2 * desc0 @ desc1.T
    return np.sqrt(np.maximum(sq, 0))


def _nn_average_precision(desc_dist: np.ndarray, geo_dist: np.ndarray, dist: float) -> float:
    """One direction of `nn_map`: rows are queries, columns candidates."""
    has_truth = (geo_dist <= dist).any(axis=1)
    if not has_truth.any():
        return float("nan")
    desc_dist, geo_dist = desc_dist[has_truth], geo_dist[has_truth]
    nearest = desc_dist.argmin(axis=1)
    rows = np.arange(len(nearest))
    correct = geo_dist[rows, nearest] <= dist
    # Sweeping a threshold on the descriptor distance of the NN traces the PR curve.
    return average_precision(correct, -desc_dist[rows, nearest], n_truth=len(nearest))


def nn_map(desc0, desc1, kp0, kp1, H, dist: float = CORRECT_DIST) -> float:
    """Nearest-neighbour mean average precision, symmetric (the mean of both directions).

    Definition chosen (the paper gives it in words only): the queries are the keypoints
    of image 0 that have a true correspondence, i.e. a keypoint of image 1 within ``dist``
    of their warp. Each query is matched to its descriptor nearest neighbour in image 1;
    the match is correct when that neighbour lies within ``dist`` of the warp. Matches are
    ranked by descriptor distance, and the AP is the area under the precision-recall curve
    with recall over the number of queries, using the precision envelope as rpautrat's
    ``compute_pr`` / ``compute_mAP``. Keypoints without a correspondence are left out so
    the metric scores the descriptor, not the detector's repeatability.
    Pass shared-view keypoints only. NaN when no keypoint has a correspondence.
    """
    kp0 = np.asarray(kp0, np.float64).reshape(-1, 2)
    kp1 = np.asarray(kp1, np.float64).reshape(-1, 2)
    if len(kp0) == 0 or len(kp1) == 0:
        return float("nan")
    geo = pairwise_distances(warp_points(H, kp0), kp1)
    desc = descriptor_distances(desc0, desc1)
    # The reverse direction measures geometry in image 0, where its keypoints live.
    geo_reverse = pairwise_distances(warp_points(np.linalg.inv(H), kp1), kp0)
    aps = [_nn_average_precision(desc, geo, dist), _nn_average_precision(desc.T, geo_reverse, dist)]
    aps = [ap for ap in aps if not np.isnan(ap)]
    return float(np.mean(aps)) if aps else float("nan")


def correct_matches(kp0, kp1, matches, H, dist: float = CORRECT_DIST) -> np.ndarray:
    """Boolean (K,): the matches whose image-0 keypoint warps within ``dist`` of its partner."""
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    if len(matches) == 0:
        return np.zeros(0, bool)
    pts0 = np.asarray(kp0, np.float64).reshape(-1, 2)[matches[:, 0]]
    pts1 = np.asarray(kp1, np.float64).reshape(-1, 2)[matches[:, 1]]
    return np.linalg.norm(warp_points(H, pts0) - pts1, axis=1) <= dist


def matching_score(kp0, kp1, matches, H, shape0, shape1, dist: float = CORRECT_DIST) -> float:
    """Correct matches over the keypoints in the shared view, the mean of both images.

    ``matches`` (K,2) index ``kp0`` and ``kp1`` (mutual nearest neighbours in the paper).
    Only matches with both ends in the shared view count. NaN when the shared view is empty.
    """
    kp0 = np.asarray(kp0, np.float64).reshape(-1, 2)
    kp1 = np.asarray(kp1, np.float64).reshape(-1, 2)
    shared0 = shared_view_mask(kp0, H, shape1)
    shared1 = shared_view_mask(kp1, np.linalg.inv(H), shape0)
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    in_view = shared0[matches[:, 0]] & shared1[matches[:, 1]] if len(matches) else np.zeros(0, bool)
    n_correct = int(np.sum(correct_matches(kp0, kp1, matches[in_view], H, dist)))
    scores = [n_correct / n for n in (shared0.sum(), shared1.sum()) if n > 0]
    return float(np.mean(scores)) if scores else float("nan")

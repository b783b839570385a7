"""3D-to-2D PnP success between frames a fixed gap apart (Self-Improving VO, DeTone et al. 2018, Table 1).

For a first frame i, keypoints get 3D points from depth (RGB-D) or from left/right matching on
the rectified pair (stereo, depth = fx * b / disparity). They are matched to frame i + gap by
mutual nearest neighbours on the descriptors of the detector under test, and LO-RANSAC PnP
(pycolmap, as the tracker calls it) estimates the pose of frame i + gap in camera i. A pair
succeeds when that pose is within ``max_rotation_deg`` of the ground truth and its position
within ``max_translation`` metres, or within ``max_translation_ratio`` of the distance the
camera travelled between the two frames (KITTI: 1 %).

Stereo points are kept at any positive disparity (``pnp_config``): the tracker's 40-baseline
cut-off treats far points as monocular in bundle adjustment, but for PnP the far points are what
pins the rotation once near ones have changed scale (KITTI 06, gap 5: rotation within 5 deg for
every pair with them, for few without). The geometry helpers are pure functions on arrays;
``evaluate_pnp`` reads a source once and extracts features only on the frames it needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pycolmap

from vo.pipeline import to_frame_features
from vo.eval.metrics import rotation_angle_deg
from vo.eval.trajectory import nearest_indices
from vo.datasets.base import gray
from vo.tracker import (FrameFeatures, TrackerConfig, backproject, estimate_pose, mutual_nearest,
                        sample_depth, stereo_right_x)
from vo.types import Camera


def pnp_config() -> TrackerConfig:
    """The tracker's matching and RANSAC settings, with stereo depth at any positive disparity."""
    return TrackerConfig(stereo_max_depth_baselines=float("inf"))


@dataclass
class PairResult:
    first: int                  # frame index i
    second: int                 # frame index i + gap
    gap: int
    matches: int                # mutual-NN matches that have a 3D point
    inliers: int                # PnP inliers (0 when PnP failed)
    rotation_error_deg: float   # inf when PnP failed
    translation_error: float    # metres, inf when PnP failed
    max_translation: float      # the threshold this pair was judged against
    success: bool


# ----------------------------------------------------------------------------- errors

def relative_ground_truth(world_from_first: np.ndarray, world_from_second: np.ndarray) -> np.ndarray:
    """second_from_first (4x4) of two camera-to-world poses: what PnP on first-frame points returns."""
    return np.linalg.inv(world_from_second) @ world_from_first


def pose_errors(est_second_from_first: np.ndarray, gt_second_from_first: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, translation error in metres) of a relative pose.

    The translation error is the distance between the estimated and the true position of the
    second camera in the first camera's frame, i.e. evo's RPE translation for this pair.
    """
    R_est, R_gt = est_second_from_first[:3, :3], gt_second_from_first[:3, :3]
    centre_est = -R_est.T @ est_second_from_first[:3, 3]
    centre_gt = -R_gt.T @ gt_second_from_first[:3, 3]
    return rotation_angle_deg(R_est.T @ R_gt), float(np.linalg.norm(centre_est - centre_gt))


def is_success(rotation_error_deg: float, translation_error: float, max_rotation_deg: float,
               max_translation: float) -> bool:
    return bool(rotation_error_deg < max_rotation_deg and translation_error < max_translation)


def travelled_distance(positions: np.ndarray) -> float:
    """Length of the polyline through (N,3) positions."""
    return float(np.linalg.norm(np.diff(positions, axis=0), axis=1).sum()) if len(positions) > 1 else 0.0


# ----------------------------------------------------------------------------- 3D points

def points_from_depth(keypoints: np.ndarray, depth_map: np.ndarray, camera: Camera,
                      max_depth: float = 6.0) -> np.ndarray:
    """(N,3) points in the camera of (undistorted) keypoints; NaN rows where the depth is invalid."""
    return backproject(keypoints, sample_depth(depth_map, keypoints, max_depth), camera)


def points_from_disparity(keypoints: np.ndarray, right_x: np.ndarray, camera: Camera) -> np.ndarray:
    """(N,3) points from the right-image x of each left keypoint (NaN = unmatched): z = fx b / d."""
    disparity = keypoints[:, 0] - right_x
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(disparity > 0, camera.fx * camera.baseline / disparity, np.nan)
    return backproject(keypoints, depth, camera)


def points_from_stereo(left: FrameFeatures, right: FrameFeatures, camera: Camera, left_image: np.ndarray,
                       right_image: np.ndarray, config: TrackerConfig | None = None) -> np.ndarray:
    """Left keypoints matched along rectified rows (the tracker's stereo matching), triangulated."""
    config = config or TrackerConfig()
    right_x = stereo_right_x(left, right.keypoints, right.descriptors, camera, config,
                             gray(left_image), gray(right_image))
    return points_from_disparity(left.keypoints, right_x, camera)


# ----------------------------------------------------------------------------- one pair

def pnp_pose(xyz_first: np.ndarray, first: FrameFeatures, second: FrameFeatures, camera: pycolmap.Camera,
             config: TrackerConfig | None = None):
    """Match first -> second (mutual NN) and run PnP on the matches with a 3D point.

    Returns (second_from_first 4x4 or None, number of matches, number of inliers).
    """
    config = config or TrackerConfig()
    valid = np.flatnonzero(np.all(np.isfinite(xyz_first), axis=1))
    i, j = mutual_nearest(first.descriptors[valid], second.descriptors, config)
    if len(i) < 4:
        return None, len(i), 0
    estimate = estimate_pose(second.keypoints[j], xyz_first[valid[i]], camera, config.ransac_max_error, config.seed)
    if estimate is None:
        return None, len(i), 0
    pose, inliers = estimate
    return pose, len(i), int(inliers.sum())


def judge_pair(first: int, second: int, estimate, matches: int, inliers: int, gt_second_from_first: np.ndarray,
               max_rotation_deg: float, max_translation: float) -> PairResult:
    if estimate is None:
        rot, trans = np.inf, np.inf
    else:
        rot, trans = pose_errors(estimate, gt_second_from_first)
    return PairResult(first, second, second - first, matches, inliers, rot, trans, max_translation,
                      is_success(rot, trans, max_rotation_deg, max_translation))


# ----------------------------------------------------------------------------- a sequence

def first_frames(count: int, gaps, stride: int, start: int = 0) -> dict[int, list[int]]:
    """For each gap, the first frames i = start, start + stride, ... with i + gap < count."""
    return {gap: list(range(start, count - gap, stride)) for gap in gaps}


def evaluate_pnp(source, mode: str, extractor, gaps=(5, 10, 20), stride: int = 10, start: int = 0,
                 max_rotation_deg: float = 5.0, max_translation: float | None = 0.05,
                 max_translation_ratio: float | None = None, config: TrackerConfig | None = None,
                 count: int | None = None, on_frame: Callable[[int], None] | None = None
                 ) -> dict[int, list[PairResult]]:
    """PnP success of ``extractor`` on ``source`` (a ``vo.datasets`` source or ``vo.render.RenderedSequence``).

    ``mode`` must give depth: 'rgbd' or 'stereo'. Pairs whose frames lack ground truth are left
    out. The translation threshold is ``max_translation`` metres, or, when
    ``max_translation_ratio`` is given, that fraction of the distance travelled over the gap.
    ``config``: matching, stereo and RANSAC settings (default ``pnp_config()``). Returns {gap: [PairResult, ...]}.
    """
    if mode not in ("rgbd", "stereo"):
        raise ValueError(f"PnP needs 3D points: mode must be 'rgbd' or 'stereo', not {mode!r}")
    if max_translation is None and max_translation_ratio is None:
        raise ValueError("give max_translation or max_translation_ratio")
    config = config or pnp_config()
    camera = source.camera
    gt_stamps, gt_poses = source.ground_truth
    if count is None:
        count = source.frame_count(mode) if hasattr(source, "frame_count") else len(gt_stamps)
    firsts = first_frames(count, gaps, stride, start)
    need_first = {i for ids in firsts.values() for i in ids}
    need_second = {i + gap for gap, ids in firsts.items() for i in ids}
    last = max(need_first | need_second, default=-1)
    features, points, stamps = {}, {}, {}
    for frame in source.frames(mode, max_frames=last + 1):
        if frame.index not in need_first and frame.index not in need_second:
            continue
        feats = to_frame_features(extractor.extract(gray(frame.image)))
        features[frame.index], stamps[frame.index] = feats, frame.stamp
        if frame.index in need_first:
            if mode == "rgbd":
                points[frame.index] = points_from_depth(feats.keypoints, frame.depth, camera, config.rgbd_max_depth)
            else:
                right = to_frame_features(extractor.extract(gray(frame.right)))
                points[frame.index] = points_from_stereo(feats, right, camera, frame.image, frame.right, config)
        if on_frame is not None:
            on_frame(frame.index)
    # The sources give ground truth at the frames' own stamps (TUM: those within 20 ms of a pose).
    frame_ids = sorted(stamps)
    found, rows = nearest_indices(np.array([stamps[k] for k in frame_ids]), gt_stamps, 1e-4)
    pose_of = {frame_ids[a]: gt_poses[b] for a, b in zip(found, rows)}
    positions = gt_poses[:, :3, 3]
    camera_colmap = camera.to_colmap()
    results = {}
    for gap, ids in firsts.items():
        results[gap] = []
        for i in ids:
            j = i + gap
            if i not in points or j not in features or i not in pose_of or j not in pose_of:
                continue
            gt = relative_ground_truth(pose_of[i], pose_of[j])
            threshold = max_translation
            if max_translation_ratio is not None:
                along = (gt_stamps >= stamps[i]) & (gt_stamps <= stamps[j])
                threshold = max_translation_ratio * travelled_distance(positions[along])
            estimate, matches, inliers = pnp_pose(points[i], features[i], features[j], camera_colmap, config)
            results[gap].append(judge_pair(i, j, estimate, matches, inliers, gt, max_rotation_deg, threshold))
    return results


@dataclass
class GapSummary:
    gap: int
    pairs: int
    successes: int
    rotation_successes: int        # rotation alone within the threshold (the paper's ScanNet criterion)
    median_rotation_deg: float
    median_translation: float
    median_matches: float
    median_inliers: float

    @property
    def rate(self) -> float:
        return self.successes / self.pairs if self.pairs else float("nan")


def _median(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def summarise(results: dict[int, list[PairResult]], max_rotation_deg: float = 5.0) -> dict[int, GapSummary]:
    """Per gap: pairs, successes and medians (failed PnP counts as an infinite error)."""
    out = {}
    for gap, pairs in results.items():
        med = _median
        out[gap] = GapSummary(gap, len(pairs), sum(p.success for p in pairs),
                              sum(p.rotation_error_deg < max_rotation_deg for p in pairs),
                              med([p.rotation_error_deg for p in pairs]), med([p.translation_error for p in pairs]),
                              med([p.matches for p in pairs]), med([p.inliers for p in pairs]))
    return out

"""Stable and unstable keypoints from the VO's own tracks, without ground truth.

The VO associates keypoints of each frame to map points. ``TrackCollector`` turns those
associations into tracks (one per map point, across all frames); ``label_tracks``
triangulates every track seen in at least ``min_track`` frames, runs one final bundle
adjustment over all of them with a robust loss, and grades each track by its
per-observation reprojection errors:

- stable: mean error <= ``stable_px`` (1 px);
- unstable: max error >= ``unstable_px`` (5 px); this wins when both hold (a point that
  once lands 5 px off its keypoint is not one to teach a detector);
- anything else is ignored (label -1), as are tracks shorter than ``min_track``.

Everything here works on arrays: ``label_tracks`` needs no VO run to be tested.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from vo.backend import BAConfig, BAProblem, BAStats, bundle_adjust, reprojection_errors
from vo.types import Camera

STABLE, UNSTABLE, IGNORED = 1, 0, -1


@dataclass
class SelfLabelConfig:
    """What is labelled and how; ``features``/``weights`` are resolved before the run."""
    min_track: int = 10               # frames a map point must be tracked in to be graded
    stable_px: float = 1.0            # mean reprojection error at or below: stable
    unstable_px: float = 5.0          # max reprojection error at or above: unstable
    ba_loss: str = "CAUCHY"           # pycolmap.LossFunctionType of the final BA
    ba_loss_scale: float = 1.0        # pixels: errors beyond weigh less (outlier tracks)
    ba_iterations: int = 50
    free_pose_min_obs: int = 30       # frames with fewer graded observations keep their VO pose
    mode: str | None = None           # None: the richest the source allows
    features: str = "orb"             # superpoint | orb | sift
    weights: str | None = None        # --weights of run_vo.py (file or folder)
    max_keypoints: int = 1024
    max_frames: int | None = None
    picture_frames: int = 4           # frames drawn in the picture


@dataclass
class Tracks:
    """Observation o sees track ``track[o]`` in frame row ``frame[o]`` at ``xy[o]``
    (undistorted pixels, as the tracker uses them). Track ids run 0..T-1."""
    frame: np.ndarray                 # (O,) int
    track: np.ndarray                 # (O,) int
    xy: np.ndarray                    # (O,2) float64

    @property
    def num_tracks(self) -> int:
        return int(self.track.max()) + 1 if len(self.track) else 0


@dataclass
class TrackLabels:
    """Per observation and per track; ``error`` is NaN for observations not graded."""
    label: np.ndarray                 # (O,) int8: 1 stable, 0 unstable, -1 ignored (its track's label)
    error: np.ndarray                 # (O,) reprojection error after the final BA, pixels
    point_label: np.ndarray           # (T,) int8
    point_mean: np.ndarray            # (T,) mean error, NaN for short tracks
    point_max: np.ndarray             # (T,)
    stats: BAStats | None = None

    def count(self, label: int) -> int:
        return int((self.point_label == label).sum())


def label_tracks(tracks: Tracks, world_from_cam: np.ndarray, camera: Camera,
                 config: SelfLabelConfig = SelfLabelConfig()) -> TrackLabels:
    """Grade every track seen in >= ``config.min_track`` frames (see the module doc).

    ``world_from_cam`` (F,4,4) holds the pose of each frame row (``Result.poses``).
    """
    num_tracks = tracks.num_tracks
    lengths = np.bincount(tracks.track, minlength=num_tracks)
    graded = lengths[tracks.track] >= config.min_track
    labels = TrackLabels(np.full(len(tracks.track), IGNORED, np.int8), np.full(len(tracks.track), np.nan),
                         np.full(num_tracks, IGNORED, np.int8), np.full(num_tracks, np.nan),
                         np.full(num_tracks, np.nan))
    if not graded.any():
        return labels
    problem, track_ids = final_problem(Tracks(tracks.frame[graded], tracks.track[graded], tracks.xy[graded]),
                                       world_from_cam, camera, config)
    errors, labels.stats = refined_errors(problem, config)
    mean, worst = per_point(errors, problem.obs_point, len(track_ids))
    point_label = np.full(len(track_ids), IGNORED, np.int8)
    point_label[mean <= config.stable_px] = STABLE
    point_label[worst >= config.unstable_px] = UNSTABLE
    labels.point_label[track_ids], labels.point_mean[track_ids], labels.point_max[track_ids] = point_label, mean, worst
    labels.label = labels.point_label[tracks.track]
    labels.error[graded] = errors
    return labels


def final_problem(tracks: Tracks, world_from_cam: np.ndarray, camera: Camera, config: SelfLabelConfig
                  ) -> tuple[BAProblem, np.ndarray]:
    """The BA problem over the frames and tracks observed; also the track id of each point."""
    frame_rows, obs_pose = np.unique(tracks.frame, return_inverse=True)
    track_ids, obs_point = np.unique(tracks.track, return_inverse=True)
    cam_from_world = np.linalg.inv(world_from_cam[frame_rows])
    points = triangulate_tracks(obs_pose, obs_point, tracks.xy, cam_from_world, camera, len(track_ids))
    # Poses are refined too, so that a frame's pose error is not charged to its points:
    # non-keyframe poses come from PnP alone. Held fixed: the first and last frame (the
    # gauge, scale included: only left-image observations enter here) and frames with too
    # few observations, which BA would bend to fit them, hiding their errors.
    per_frame = np.bincount(obs_pose, minlength=len(frame_rows))
    fixed = per_frame < config.free_pose_min_obs
    fixed[[0, -1]] = True
    pinhole = Camera(camera.fx, camera.fy, camera.cx, camera.cy, camera.width, camera.height)
    return BAProblem(pinhole, cam_from_world, fixed, points, obs_pose, obs_point, tracks.xy), track_ids


def refined_errors(problem: BAProblem, config: SelfLabelConfig) -> tuple[np.ndarray, BAStats]:
    ba = BAConfig(max_iterations=config.ba_iterations, function_tolerance=1e-6, loss=config.ba_loss,
                  loss_scale=config.ba_loss_scale, num_threads=1)
    poses, points, stats = bundle_adjust(problem, ba)
    return reprojection_errors(problem, poses, points), stats


def per_point(errors: np.ndarray, obs_point: np.ndarray, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max of each point's observation errors (inf where behind a camera)."""
    counts = np.bincount(obs_point, minlength=num_points)
    with np.errstate(invalid="ignore"):
        mean = np.bincount(obs_point, weights=errors, minlength=num_points) / np.maximum(counts, 1)
    worst = np.zeros(num_points)
    np.maximum.at(worst, obs_point, errors)
    return np.where(np.isnan(mean), np.inf, mean), worst


def triangulate_tracks(obs_pose: np.ndarray, obs_point: np.ndarray, xy: np.ndarray, cam_from_world: np.ndarray,
                       camera: Camera, num_points: int) -> np.ndarray:
    """Linear (DLT) multi-view triangulation of every point at once, in normalised
    coordinates. Degenerate points (no parallax, behind the cameras) are put on the ray
    of their first observation at the median depth of the others."""
    n = np.c_[(xy[:, 0] - camera.cx) / camera.fx, (xy[:, 1] - camera.cy) / camera.fy]
    P = cam_from_world[obs_pose, :3]                                       # (O,3,4)
    rows = np.stack([n[:, :1] * P[:, 2] - P[:, 0], n[:, 1:] * P[:, 2] - P[:, 1]], axis=1)  # (O,2,4)
    normal = np.zeros((num_points, 4, 4))
    np.add.at(normal, obs_point, np.einsum("ori,orj->oij", rows, rows))
    _, vectors = np.linalg.eigh(normal)
    X = vectors[:, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        xyz = X[:, :3] / X[:, 3:]
    first = np.full(num_points, len(obs_point))
    np.minimum.at(first, obs_point, np.arange(len(obs_point)))
    depth = np.einsum("pij,pj->pi", cam_from_world[obs_pose[first], :3, :3], xyz)[:, 2] \
        + cam_from_world[obs_pose[first], 2, 3]
    bad = ~(np.isfinite(xyz).all(axis=1) & (depth > 0))
    if bad.any():
        fallback = float(np.median(depth[~bad])) if (~bad).any() else 1.0
        T = np.linalg.inv(cam_from_world[obs_pose[first[bad]]])
        ray = np.c_[n[first[bad]], np.ones(bad.sum())] * fallback
        xyz[bad] = np.einsum("pij,pj->pi", T[:, :3, :3], ray) + T[:, :3, 3]
    return xyz


class TrackCollector:
    """The pipeline's ``on_frame``: each frame's tracked keypoints, joined into tracks.

    Map point ids are slots that the map reuses once a point dies (and restarts on a new
    segment), so a track is keyed by (point id, the keyframe that created the point):
    keyframe ids never repeat. Points are only created or freed while a keyframe is
    inserted, so the creators are read from the map on keyframes only.
    ``keep_rows``: frame rows whose images are kept (for the picture).
    """

    def __init__(self, keep_rows=()):
        self.frame_indices: list[int] = []
        self.frame_paths: list[str] = []
        self.images: dict[int, np.ndarray] = {}
        self._keep_rows = set(keep_rows)
        self._creator = np.full(0, -1, np.int64)
        self._track_of: dict[tuple[int, int], int] = {}
        self._frame, self._track, self._xy = [], [], []

    def __call__(self, frame, snapshot) -> None:
        row = len(self.frame_indices)
        self.frame_indices.append(int(frame.index))
        self.frame_paths.append(str(frame.path))
        if row in self._keep_rows:
            self.images[row] = frame.image.copy()
        ids = np.asarray(snapshot.point_ids, np.int64)
        if len(ids):
            self._grow(int(ids.max()) + 1)
            creators = self._creator[ids]
            tracks = [self._track_of.setdefault(key, len(self._track_of)) for key in zip(ids.tolist(), creators.tolist())]
            self._frame.append(np.full(len(ids), row))
            self._track.append(np.array(tracks, np.int64))
            self._xy.append(np.asarray(snapshot.keypoints, np.float64).reshape(-1, 2))
        if snapshot.is_keyframe or snapshot.event:
            self._read_creators(snapshot.map_view())

    def _read_creators(self, view) -> None:
        if len(view.point_ids):
            self._grow(int(view.point_ids.max()) + 1)
            self._creator[view.point_ids] = view.first_keyframe

    def _grow(self, size: int) -> None:
        if size > len(self._creator):
            self._creator = np.r_[self._creator, np.full(size - len(self._creator), -1, np.int64)]

    def tracks(self) -> Tracks:
        if not self._frame:
            return Tracks(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)))
        return Tracks(np.concatenate(self._frame), np.concatenate(self._track), np.concatenate(self._xy))


def distort(xy: np.ndarray, camera: Camera) -> np.ndarray:
    """Undistorted pixels back to the pixels of the image as the source yields it."""
    if camera.dist is None or not np.any(camera.dist) or len(xy) == 0:
        return xy
    normalised = np.c_[(xy[:, 0] - camera.cx) / camera.fx, (xy[:, 1] - camera.cy) / camera.fy, np.ones(len(xy))]
    pixels, _ = cv2.projectPoints(normalised, np.zeros(3), np.zeros(3), camera.K, np.asarray(camera.dist, np.float64))
    return pixels[:, 0]


@dataclass
class FrameLabels:
    """Labelled observations grouped by frame: the arrays of the label file (see labels.py)."""
    rows: np.ndarray                  # (F,) frame rows with at least one label
    offsets: np.ndarray               # (F+1,) int64
    keypoints: np.ndarray             # (K,2) float32, pixels of the image as yielded
    labels: np.ndarray                # (K,) int8
    errors: np.ndarray                # (K,) float32, the point's mean error
    obs_errors: np.ndarray            # (K,) float32, this observation's error
    track_ids: np.ndarray             # (K,) int32, 0..P-1 over the labelled points


def group_by_frame(tracks: Tracks, labels: TrackLabels, camera: Camera) -> FrameLabels:
    """Keep the stable and unstable observations, ordered by frame then track."""
    keep = np.flatnonzero(labels.label != IGNORED)
    keep = keep[np.lexsort((tracks.track[keep], tracks.frame[keep]))]
    rows, counts = np.unique(tracks.frame[keep], return_counts=True)
    _, track_ids = np.unique(tracks.track[keep], return_inverse=True)
    return FrameLabels(
        rows=rows, offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        keypoints=distort(tracks.xy[keep], camera).astype(np.float32),
        labels=labels.label[keep].astype(np.int8),
        errors=labels.point_mean[tracks.track[keep]].astype(np.float32),
        obs_errors=labels.error[keep].astype(np.float32), track_ids=track_ids.astype(np.int32))

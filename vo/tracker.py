"""Frame-by-frame tracking against a local map (ORB-SLAM-style VO, pycolmap geometry).

Per frame: predict the pose with a constant-velocity model, associate map points by
projecting them and comparing descriptors within a radius, estimate the pose with
LO-RANSAC PnP and refine it, then decide on a keyframe. A keyframe adds points (from
stereo disparity, depth, or two-view triangulation), runs local bundle adjustment and
culls. When tracking fails the tracker relocalises against recent keyframes, and if
that fails it starts a new map segment whose first pose chains on the last known one.

All state lives in ``Tracker``; the helpers below it are pure functions on arrays.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
import pycolmap
from scipy.spatial import cKDTree

from .backend import BAConfig, local_bundle_adjustment
from .datasets.base import gray
from .map import NO_POINT, Keyframe, Map, invert, transform
from .types import Camera, Frame


class TrackerState(enum.Enum):
    INITIALISING = "initialising"
    TRACKING = "tracking"
    LOST = "lost"


@dataclass
class TrackerConfig:
    # Association by projection (pixels; descriptor distances are normalised, see below).
    search_radius: float = 15.0           # around the motion-model prediction
    search_radius_wide: float = 50.0      # retry when the prediction was poor
    search_radius_refine: float = 5.0     # second pass, around the estimated pose
    max_descriptor_distance: float | None = None  # None: 0.3 binary / 0.9 float
    ratio: float = 0.9                    # best / second best distance
    # Pose.
    ransac_max_error: float = 3.0         # pixels
    inlier_error: float = 3.0             # pixels, after refinement
    min_inliers: int = 20
    # Keyframes.
    keyframe_tracked_ratio: float = 0.75  # of the reference keyframe's points
    keyframe_parallax_deg: float = 2.0    # median ray angle to the reference (monocular)
    keyframe_max_interval: int = 10       # frames
    keyframe_min_interval: int = 1
    keyframe_min_tracked: int = 100       # fewer tracked points always ask for a keyframe
    keyframe_min_close_tracked: int = 100  # stereo/RGB-D: fewer tracked points with depth...
    keyframe_min_close_new: int = 70       # ...while this many new ones have depth
    # New points.
    stereo_max_depth_baselines: float = 40.0   # ORB-SLAM: farther stereo points count as monocular
    rgbd_max_depth: float = 6.0           # metres
    rgbd_virtual_baseline: float = 0.4    # metres: depth as a virtual right image for BA;
    # its weight: 1 px of virtual disparity is a depth error of z^2 / (fx * baseline)
    stereo_row_tolerance: float = 2.0     # pixels
    stereo_max_disparity: float = 0.3     # fraction of the image width
    stereo_subpixel: bool = True          # patch SAD + parabola along the row
    stereo_patch_radius: int = 7          # 15x15 patches: less scale drift on KITTI than 11x11
    stereo_search_radius: int = 5         # pixels around the descriptor match
    triangulation_neighbours: int = 2
    # Monocular: a neighbour whose baseline is below this fraction of the keyframe's median
    # scene depth is skipped (ORB-SLAM's CreateNewMapPoints, which uses 0.01), and an older one
    # is tried, up to ``triangulation_candidates``. Below ~tan(min parallax) even median-depth
    # points fail the parallax check, so the ones that pass sit too close (mismatches, or depth
    # noise after a poorly tracked frame) and then take over the pose and shrink the map's
    # scale. 0.02 lost no TUM teddy seed of seven where 0.01 lost one (weights/README.md).
    triangulation_min_baseline_depth_ratio: float = 0.02
    triangulation_candidates: int = 6
    min_triangulation_parallax_deg: float = 1.0
    max_triangulation_error: float = 2.5  # pixels
    # Epipolar search has no position prior, so it asks for closer descriptors (None: 0.2 binary /
    # as max_descriptor_distance for float). Looser binary matches put wrong points in the map.
    triangulation_max_descriptor_distance: float | None = None
    # Who pairs the free keypoints of two keyframes: "epipolar" (descriptor search along the
    # epipolar line, ORB-SLAM's SearchForTriangulation) or "matcher" (the injected matcher on
    # the whole keyframes, as pySLAM does; its pairs must still lie on the epipolar line).
    triangulation_matching: str = "epipolar"
    min_found_ratio: float = 0.25         # recent points found / predicted visible
    # Map and backend.
    max_keyframes: int = 20               # kept in memory: BA window + relocalisation
    ba: BAConfig = field(default_factory=BAConfig)
    # Monocular initialisation.
    init_min_matches: int = 100
    init_min_points: int = 80
    init_min_parallax_deg: float = 1.0
    init_homography_ratio: float = 0.45   # ORB-SLAM's R_H threshold
    init_max_frames: int = 30             # reference gets replaced after this many
    # With a ratio, a start-map match must beat every other keypoint within search_radius of its
    # partner by it (ORB-SLAM's SearchForInitialization: 0.9 in a window), as tracking later
    # associates by descriptor in that window. 0.9 helped KITTI 06 mono (SuperGlue most) and hurt
    # TUM teddy mono with SuperGlue, so it is off (None) by default (weights/README.md, SuperGlue v2).
    init_local_ratio: float | None = None
    # True: of the injected matcher's start-map matches keep those that are also mutual nearest
    # descriptor neighbours within max_descriptor_distance (a cross-check of the two matchers).
    # None: on for a learnt matcher (SuperGlue), where it trims KITTI 06 mono's blow-ups; mutual NN
    # needs no check against itself (weights/README.md, SuperGlue v3).
    init_mutual_check: bool | None = None
    # Relocalisation.
    reloc_keyframes: int = 5
    reloc_min_inliers: int = 30
    reloc_attempts: int = 3               # frames to try before starting a new segment
    seed: int = 0                         # RANSAC seed (PnP, two-view init): runs are repeatable


@dataclass
class FrameFeatures:
    """Features of one image: numpy arrays for geometry, the raw dict for the matcher."""
    keypoints: np.ndarray        # (N,2) pixels as detected
    descriptors: np.ndarray      # (N,D) uint8 binary, or float32 unit-norm
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Observation:
    """What the tracker sees in one frame, after undistortion and stereo/depth lookup."""
    frame: Frame
    features: FrameFeatures
    keypoints: np.ndarray        # (N,2) undistorted pixels
    right_x: np.ndarray          # (N,) x in the (virtual) right image, NaN = none


@dataclass
class PoseRecord:
    """One frame's pose, relative to a keyframe so that BA corrections carry over."""
    index: int
    stamp: float
    keyframe_id: int             # -1: ``relative`` is an absolute cam_from_world
    relative: np.ndarray         # cam_from_keyframe (or cam_from_world)


@dataclass
class MapView:
    """A copy of the map for display: the points in memory and every keyframe pose."""
    point_ids: np.ndarray        # (M,) stable while a point lives
    xyz: np.ndarray              # (M,3) world
    first_keyframe: np.ndarray   # (M,) id of the keyframe that created each point
    keyframe_poses: np.ndarray   # (K,4,4) world_from_cam of all keyframes so far


@dataclass
class TrackerSnapshot:
    """A read-only summary of the tracker after one frame, for callbacks and logs."""
    frame_index: int
    state: TrackerState
    world_from_cam: np.ndarray
    num_matches: int
    is_keyframe: bool
    num_keyframes: int           # created so far
    num_active_keyframes: int    # held in memory (bounded by config.max_keyframes)
    num_points: int              # in memory
    keypoints: np.ndarray        # (T,2) tracked keypoints of this frame
    point_ids: np.ndarray        # (T,) the map point each of them observes
    outliers: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (O,2) matched, rejected by PnP
    event: str | None = None
    _map_view: Callable[[], MapView] | None = field(default=None, repr=False)

    def map_view(self) -> MapView:
        """The map as it is when called (a copy made on demand: call it only when needed)."""
        return self._map_view()


class Tracker:
    """Tracker state machine; feed it frames in order with ``track``."""

    def __init__(self, camera: Camera, mode: str, config: TrackerConfig | None = None, matcher=None):
        if mode not in ("stereo", "rgbd", "mono"):
            raise ValueError(f"mode must be 'stereo', 'rgbd' or 'mono', got {mode!r}")
        if mode == "stereo" and not camera.baseline:
            raise ValueError("stereo mode needs camera.baseline")
        self.camera, self.mode = camera, mode
        self.config = config or TrackerConfig()
        if self.config.triangulation_matching not in ("epipolar", "matcher"):
            raise ValueError(f"triangulation_matching must be 'epipolar' or 'matcher', "
                             f"got {self.config.triangulation_matching!r}")
        self.matcher = matcher
        self.colmap_camera = camera.to_colmap()
        self.baseline = camera.baseline if mode == "stereo" else (
            self.config.rgbd_virtual_baseline if mode == "rgbd" else None)
        self.state = TrackerState.INITIALISING
        self.map = Map()
        self.trajectory: list[PoseRecord] = []
        self.events: list[tuple[int, str]] = []
        self.last_pose = np.eye(4)           # cam_from_world of the last frame
        self.velocity = np.eye(4)            # last_from_previous, per frame
        self.has_motion = False              # velocity measured (not the identity guess)
        self.reference: Keyframe | None = None
        self.local_point_ids = np.zeros(0, np.int64)
        self.init_reference: Observation | None = None
        self.init_reference_pose = np.eye(4)
        self.has_tracked = False             # any segment initialised yet (for mono scale)
        self.lost_frames = 0
        self.last_tracked = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # (keypoint, point)
        self.last_outliers = np.zeros(0, np.int64)   # keypoints matched to the map but rejected

    # --- per frame ---------------------------------------------------------------------

    def track(self, frame: Frame, features: FrameFeatures, right_features: FrameFeatures | None = None
              ) -> TrackerSnapshot:
        obs = self.observe(frame, features, right_features)
        self._event, self._is_keyframe = None, False
        self.last_tracked = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.last_outliers = np.zeros(0, np.int64)
        if self.state == TrackerState.TRACKING:
            if not self._track_local_map(obs):
                self._set_lost(obs)
        elif self.state == TrackerState.LOST:
            self._recover(obs)
        else:
            self._initialise(obs)
        if not self.trajectory or self.trajectory[-1].index != frame.index:
            raise RuntimeError(f"no pose recorded for frame {frame.index}")  # a bug, not bad data
        return self.snapshot(obs)

    def observe(self, frame: Frame, features: FrameFeatures, right_features: FrameFeatures | None) -> Observation:
        keypoints = undistort(features.keypoints, self.camera)
        right_x = np.full(len(keypoints), np.nan)
        if self.mode == "stereo":
            if right_features is None:
                raise ValueError("stereo mode needs right_features")
            right_x = stereo_right_x(features, undistort(right_features.keypoints, self.camera),
                                     right_features.descriptors, self.camera, self.config,
                                     gray(frame.image), gray(frame.right))
        elif self.mode == "rgbd":
            depth = sample_depth(frame.depth, features.keypoints, self.config.rgbd_max_depth)
            right_x = keypoints[:, 0] - self.camera.fx * self.baseline / depth
        return Observation(frame, features, keypoints, right_x)

    def snapshot(self, obs: Observation) -> TrackerSnapshot:
        keypoint_idx, point_ids = self.last_tracked
        return TrackerSnapshot(
            frame_index=obs.frame.index, state=self.state, world_from_cam=self.pose_of(self.trajectory[-1]),
            num_matches=len(keypoint_idx), is_keyframe=self._is_keyframe,
            num_keyframes=len(self.map.keyframe_poses), num_active_keyframes=len(self.map.keyframes),
            num_points=len(self.map.points), keypoints=obs.keypoints[keypoint_idx], point_ids=point_ids.copy(),
            outliers=obs.keypoints[self.last_outliers], event=self._event, _map_view=self.map_view)

    def map_view(self) -> MapView:
        ids = self.map.points.alive_ids()
        poses = [invert(T) for T in self.map.keyframe_poses.values()]
        return MapView(ids, self.map.points.xyz[ids].copy(), self.map.points.first_keyframe[ids].copy(),
                       np.stack(poses) if poses else np.zeros((0, 4, 4)))

    def keyframe_frame_indices(self) -> np.ndarray:
        """Frame index of every keyframe created so far."""
        return np.array(list(self.map.keyframe_frames.values()), np.int64)

    # --- trajectory --------------------------------------------------------------------

    def _record_pose(self, frame: Frame, cam_from_world: np.ndarray, keyframe: Keyframe | None = None) -> None:
        keyframe = keyframe or (self.reference if self.state == TrackerState.TRACKING else None)
        if keyframe is None:
            record = PoseRecord(frame.index, frame.stamp, -1, cam_from_world)
        else:
            record = PoseRecord(frame.index, frame.stamp, keyframe.id, cam_from_world @ invert(keyframe.cam_from_world))
        self.trajectory.append(record)

    def pose_of(self, record: PoseRecord) -> np.ndarray:
        """world_from_cam of a record, with the keyframe's latest (BA-refined) pose."""
        if record.keyframe_id < 0:
            return invert(record.relative)
        return invert(record.relative @ self.map.keyframe_poses[record.keyframe_id])

    def poses(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame indices, stamps, world_from_cam (N,4,4)) for every frame so far."""
        indices = np.array([r.index for r in self.trajectory], np.int64)
        stamps = np.array([r.stamp for r in self.trajectory])
        poses = np.stack([self.pose_of(r) for r in self.trajectory]) if self.trajectory else np.zeros((0, 4, 4))
        return indices, stamps, poses

    def _add_event(self, index: int, name: str) -> None:
        self.events.append((index, name))
        self._event = name if self._event is None else f"{self._event},{name}"

    # --- tracking ----------------------------------------------------------------------

    def _track_local_map(self, obs: Observation, prior: np.ndarray | None = None) -> bool:
        """Pose from the local map; on success updates pose, motion model and keyframes."""
        if prior is None and not self.has_motion:
            # No motion model yet (ORB-SLAM's TrackReferenceKeyFrame): a pose guessed as "not
            # moved" lets fast motion pick few, wrong projection matches on the first frame.
            prior = self._pose_from_keyframe(self.reference, obs, self.config.min_inliers)
        predicted = self.velocity @ self.last_pose if prior is None else prior
        result = self._localise(obs, predicted)
        if result is None:
            return False
        pose, keypoint_idx, point_idx, self.last_outliers = result
        self.velocity = pose @ invert(self.last_pose)
        self.has_motion = True
        self.last_pose = pose
        self.last_tracked = (keypoint_idx, point_idx)
        if self._need_keyframe(obs, keypoint_idx, point_idx):
            self._insert_keyframe(obs, pose, keypoint_idx, point_idx)
        else:
            self._record_pose(obs.frame, pose)
        return True

    def _localise(self, obs: Observation, predicted: np.ndarray):
        """Projection search + RANSAC PnP around ``predicted`` (widened if that fails),
        then a tight search around the estimate and refinement.

        Returns (cam_from_world, inlier keypoint indices, their point ids, outlier keypoint indices) or None.
        """
        cfg = self.config
        ids = self.local_point_ids
        xyz, desc = self.map.points.xyz[ids], self.map.points.descriptors[ids]
        tree = cKDTree(obs.keypoints)
        for radius in (cfg.search_radius, cfg.search_radius_wide):
            point_idx, keypoint_idx, _ = search_by_projection(
                xyz, desc, predicted, self.camera, tree, obs.features.descriptors, radius, cfg)
            estimate = estimate_pose(obs.keypoints[keypoint_idx], xyz[point_idx], self.colmap_camera,
                                     cfg.ransac_max_error, cfg.seed) if len(point_idx) >= cfg.min_inliers else None
            if estimate is not None and estimate[1].sum() >= cfg.min_inliers:
                break
        else:
            return None
        pose = estimate[0]
        point_idx, keypoint_idx, visible = search_by_projection(
            xyz, desc, pose, self.camera, tree, obs.features.descriptors, cfg.search_radius_refine, cfg)
        if len(point_idx) < cfg.min_inliers:
            return None
        pose, inliers = refine_pose(pose, obs.keypoints[keypoint_idx], xyz[point_idx], self.colmap_camera,
                                    cfg.inlier_error)
        if inliers.sum() < cfg.min_inliers:
            return None
        self.map.points.times_visible[ids[visible]] += 1
        self.map.points.times_found[ids[point_idx[inliers]]] += 1
        return pose, keypoint_idx[inliers], ids[point_idx[inliers]], keypoint_idx[~inliers]

    def _need_keyframe(self, obs: Observation, keypoint_idx: np.ndarray, point_ids: np.ndarray) -> bool:
        """ORB-SLAM's rules: a maximum interval, too few of the reference's points
        tracked, too few close points (stereo/RGB-D) or enough parallax (monocular)."""
        cfg, ref = self.config, self.reference
        since = obs.frame.index - ref.frame_index
        if since >= cfg.keyframe_max_interval:
            return True
        if since < cfg.keyframe_min_interval:
            return False
        ref_ids = ref.point_ids[ref.point_ids != NO_POINT]
        ref_ids = ref_ids[self.map.points.alive[ref_ids]]
        # Only points confirmed by several keyframes count, as in ORB-SLAM.
        min_observations = 3 if len(self.map.keyframes) > 2 else 2
        ref_tracked = int((self.map.num_observations(ref_ids) >= min_observations).sum())
        if len(keypoint_idx) < max(cfg.keyframe_tracked_ratio * ref_tracked, cfg.keyframe_min_tracked):
            return True
        if self.mode == "mono":
            return median_parallax_deg(self.map.points.xyz[point_ids], ref.centre,
                                       centre_of(self.last_pose)) > cfg.keyframe_parallax_deg
        has_depth = np.isfinite(obs.right_x)
        tracked_close = int(has_depth[keypoint_idx].sum())
        untracked_close = int(has_depth.sum()) - tracked_close
        return tracked_close < cfg.keyframe_min_close_tracked and untracked_close > cfg.keyframe_min_close_new

    # --- keyframes ---------------------------------------------------------------------

    def _make_keyframe(self, obs: Observation, pose: np.ndarray, keypoint_idx, point_ids) -> Keyframe:
        point_of = np.full(len(obs.keypoints), NO_POINT, np.int64)
        point_of[keypoint_idx] = point_ids
        return Keyframe(self.map.new_keyframe_id(), obs.frame.index, obs.frame.stamp, pose, obs.keypoints,
                        obs.features.descriptors, obs.right_x, point_of, obs.features.raw)

    def _insert_keyframe(self, obs: Observation, pose: np.ndarray, keypoint_idx, point_ids) -> None:
        keyframe = self._make_keyframe(obs, pose, keypoint_idx, point_ids)
        self.map.add_keyframe(keyframe)
        # Descriptors follow the newest view: appearance changes slowly along a trajectory.
        self.map.points.descriptors[point_ids] = keyframe.descriptors[keypoint_idx]
        if self.mode != "mono":
            self._add_points_with_depth(keyframe)
        self._triangulate(keyframe)
        self._cull_recent_points(keyframe)
        window = self.map.recent_keyframes(self.config.ba.window)
        if len(window) >= 2:
            local_bundle_adjustment(self.map, window, self.config.ba, self.camera, self.baseline,
                                    fix_scale=self.mode == "mono")
        self.map.drop_old_keyframes(self.config.max_keyframes)
        self.reference, self._is_keyframe = keyframe, True
        self.last_pose = keyframe.cam_from_world
        self._record_pose(obs.frame, keyframe.cam_from_world, keyframe)
        self._refresh_local_points()

    def _refresh_local_points(self) -> None:
        window = self.map.recent_keyframes(self.config.ba.window + 3)
        self.local_point_ids = self.map.points_seen_by(window)

    def _add_points_with_depth(self, keyframe: Keyframe) -> int:
        depth = self.camera.fx * self.baseline / (keyframe.keypoints[:, 0] - keyframe.right_x)
        max_depth = (self.config.stereo_max_depth_baselines * self.baseline if self.mode == "stereo"
                     else self.config.rgbd_max_depth)
        new = np.flatnonzero((keyframe.point_ids == NO_POINT) & (depth > 0) & (depth < max_depth))
        xyz_cam = backproject(keyframe.keypoints[new], depth[new], self.camera)
        self.map.add_points(keyframe, new, transform(keyframe.world_from_cam, xyz_cam))
        return len(new)

    def _triangulate(self, keyframe: Keyframe) -> int:
        """New points from unmatched keypoints of ``keyframe`` and its recent neighbours."""
        added = 0
        neighbours = self._triangulation_neighbours(keyframe)
        use_matcher = self.config.triangulation_matching == "matcher" and self.matcher is not None
        for other in neighbours:
            pairs = self._match(keyframe, other) if use_matcher else None
            idx_new, idx_old, xyz = triangulate_pair(keyframe, other, self.camera, self.config, pairs)
            if len(xyz) == 0:
                continue
            ids = self.map.add_points(keyframe, idx_new, xyz)
            for point_id, index in zip(ids, idx_old):
                self.map.add_observation(int(point_id), other, int(index))
            added += len(ids)
        return added

    def _triangulation_neighbours(self, keyframe: Keyframe) -> list[Keyframe]:
        """The newest recent keyframes to triangulate with; monocular ones need enough baseline."""
        cfg = self.config
        if self.mode != "mono":
            return self.map.recent_keyframes(cfg.triangulation_neighbours + 1)[:-1][::-1]
        candidates = self.map.recent_keyframes(cfg.triangulation_candidates + 1)[:-1][::-1]
        depth = self._median_depth(keyframe)
        wide = [other for other in candidates
                if np.linalg.norm(other.centre - keyframe.centre) >= cfg.triangulation_min_baseline_depth_ratio * depth]
        return wide[:cfg.triangulation_neighbours]

    def _median_depth(self, keyframe: Keyframe) -> float:
        """Median depth of the map points ``keyframe`` sees (0 when it sees none)."""
        ids = keyframe.point_ids[keyframe.point_ids != NO_POINT]
        ids = ids[self.map.points.alive[ids]]
        if len(ids) == 0:
            return 0.0
        return float(np.median(transform(keyframe.cam_from_world, self.map.points.xyz[ids])[:, 2]))

    def _cull_recent_points(self, keyframe: Keyframe) -> None:
        """Points born in the last keyframes must be re-found, or they were mismatches."""
        points = self.map.points
        ids = points.alive_ids()
        age = keyframe.id - points.first_keyframe[ids]
        recent = ids[(age >= 1) & (age <= 3)]
        found_ratio = points.times_found[recent] / np.maximum(points.times_visible[recent], 1)
        observations = self.map.num_observations(recent)
        min_obs = 2 if self.mode == "mono" else 1
        old_enough = keyframe.id - points.first_keyframe[recent] >= 2
        bad = (found_ratio < self.config.min_found_ratio) | (old_enough & (observations <= min_obs))
        self.map.remove_points(recent[bad])

    # --- initialisation ----------------------------------------------------------------

    def _initialise(self, obs: Observation) -> None:
        prior = self.velocity @ self.last_pose if self.has_tracked else np.eye(4)
        if self.mode == "mono":
            self._initialise_monocular(obs, prior)
            return
        if int(np.isfinite(obs.right_x).sum()) < self.config.init_min_points:
            self._record_pose(obs.frame, prior)
            self.last_pose = prior
            return
        keyframe = self._make_keyframe(obs, prior, np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.map.add_keyframe(keyframe)
        self._add_points_with_depth(keyframe)
        self._start_tracking(obs, keyframe)

    def _start_tracking(self, obs: Observation, keyframe: Keyframe) -> None:
        self.state, self.has_tracked, self.lost_frames = TrackerState.TRACKING, True, 0
        self.reference, self._is_keyframe = keyframe, True
        self.last_pose = keyframe.cam_from_world
        self._add_event(obs.frame.index, "initialised")
        self._record_pose(obs.frame, keyframe.cam_from_world, keyframe)
        self._refresh_local_points()

    def _initialise_monocular(self, obs: Observation, prior: np.ndarray) -> None:
        ref = self.init_reference
        if ref is None or obs.frame.index - ref.frame.index > self.config.init_max_frames:
            self._set_init_reference(obs, prior)
            return
        ref_idx, cur_idx = self._start_map_matches(ref, obs)
        if len(ref_idx) < self.config.init_min_matches:
            self._set_init_reference(obs, prior)
            return
        two_view = initialise_two_view(ref.keypoints[ref_idx], obs.keypoints[cur_idx], self.camera, self.config)
        if two_view is None:
            self.last_pose = prior
            self._record_pose(obs.frame, prior)
            return
        cur_from_ref, xyz_ref, good = two_view
        scale = self._monocular_scale(cur_from_ref, xyz_ref, obs.frame.index - ref.frame.index)
        cur_from_ref[:3, 3] *= scale
        self._create_initial_map(ref, obs, self.init_reference_pose, cur_from_ref,
                                 ref_idx[good], cur_idx[good], xyz_ref[good] * scale)

    def _start_map_matches(self, ref: Observation, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        """The matches a monocular start map is built from, after the cross-check and the local ratio test."""
        cfg = self.config
        ref_idx, cur_idx = self._match(ref, obs)
        if self._cross_checks_start_map():
            agree = agrees_with(ref_idx, cur_idx, *mutual_nearest(ref.features.descriptors,
                                                                  obs.features.descriptors, cfg))
            ref_idx, cur_idx = ref_idx[agree], cur_idx[agree]
        if cfg.init_local_ratio is not None:
            distinct = locally_distinct(ref.features.descriptors[ref_idx], cur_idx, obs.keypoints,
                                        obs.features.descriptors, cfg.search_radius, cfg.init_local_ratio)
            ref_idx, cur_idx = ref_idx[distinct], cur_idx[distinct]
        return ref_idx, cur_idx

    def _cross_checks_start_map(self) -> bool:
        """``init_mutual_check``, with None resolved by the matcher: on unless it is mutual NN."""
        from models.nn_matcher import MutualNN
        if self.matcher is None:
            return False
        check = self.config.init_mutual_check
        return not isinstance(self.matcher, MutualNN) if check is None else bool(check)

    def _set_init_reference(self, obs: Observation, prior: np.ndarray) -> None:
        self.init_reference, self.init_reference_pose = obs, prior
        self.last_pose = prior
        self._record_pose(obs.frame, prior)

    def _monocular_scale(self, cur_from_ref: np.ndarray, xyz_ref: np.ndarray, frames: int) -> float:
        """Continue the previous segment's speed when there was one, else median depth 1."""
        speed = np.linalg.norm(self.velocity[:3, 3])
        if self.has_tracked and speed > 1e-6:
            return speed * frames / max(np.linalg.norm(cur_from_ref[:3, 3]), 1e-9)
        return 1.0 / np.median(xyz_ref[:, 2])

    def _create_initial_map(self, ref: Observation, obs: Observation, ref_pose, cur_from_ref,
                            ref_idx, cur_idx, xyz_ref) -> None:
        first = self._make_keyframe(ref, ref_pose, np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.map.add_keyframe(first)
        ids = self.map.add_points(first, ref_idx, transform(invert(ref_pose), xyz_ref))
        second = self._make_keyframe(obs, cur_from_ref @ ref_pose, cur_idx, ids)
        self.map.add_keyframe(second)
        # Only the first pose is fixed; the scale gauge is left to the solver's damping.
        local_bundle_adjustment(self.map, [first, second], self.config.ba, self.camera, None, fix_scale=False)
        self._reinterpolate_init_frames(first, second)
        frames = obs.frame.index - ref.frame.index
        step = pycolmap.interpolate_camera_poses(pycolmap.Rigid3d(), pycolmap.Rigid3d(
            (second.cam_from_world @ invert(first.cam_from_world))[:3]), 1.0 / frames)
        self.velocity = np.vstack([step.matrix(), [0, 0, 0, 1]])
        self.has_motion = True
        self.init_reference = None
        self._start_tracking(obs, second)

    def _reinterpolate_init_frames(self, first: Keyframe, second: Keyframe) -> None:
        """Frames between the two initial keyframes: poses interpolated on the stamps."""
        delta = pycolmap.Rigid3d((second.cam_from_world @ invert(first.cam_from_world))[:3])
        span = max(second.stamp - first.stamp, 1e-9)
        for i, record in enumerate(self.trajectory):
            if record.index >= first.frame_index and record.stamp <= second.stamp:
                t = (record.stamp - first.stamp) / span
                step = pycolmap.interpolate_camera_poses(pycolmap.Rigid3d(), delta, t).matrix()
                self.trajectory[i] = PoseRecord(record.index, record.stamp, first.id,
                                                np.vstack([step, [0, 0, 0, 1]]))

    # --- lost, relocalisation, new segments --------------------------------------------

    def _set_lost(self, obs: Observation) -> None:
        self.state = TrackerState.LOST
        self._add_event(obs.frame.index, "lost")
        self.lost_frames = 0
        self._recover(obs)

    def _recover(self, obs: Observation) -> None:
        if self._relocalise(obs):
            self._add_event(obs.frame.index, "relocalised")
            return
        self.lost_frames += 1
        if self.lost_frames >= self.config.reloc_attempts:
            self._start_new_segment(obs)
            return
        self.last_pose = self.velocity @ self.last_pose   # coast on the motion model
        self._record_pose(obs.frame, self.last_pose)

    def _relocalise(self, obs: Observation) -> bool:
        for keyframe in reversed(self.map.recent_keyframes(self.config.reloc_keyframes)):
            pose = self._pose_from_keyframe(keyframe, obs, self.config.reloc_min_inliers)
            if pose is None:
                continue
            self.state = TrackerState.TRACKING
            self.reference = keyframe
            self.last_pose = pose   # the coasting pose would corrupt the velocity
            self._refresh_local_points()
            if self._track_local_map(obs, prior=pose):
                self.lost_frames = 0
                return True
            self.state = TrackerState.LOST
        return False

    def _pose_from_keyframe(self, keyframe: Keyframe, obs: Observation, min_inliers: int):
        """cam_from_world of ``obs`` by matching it to ``keyframe``'s map points (the matcher) and
        RANSAC PnP; None with fewer than ``min_inliers``."""
        kf_idx, cur_idx = self._match(keyframe, obs)
        has_point = keyframe.point_ids[kf_idx] != NO_POINT
        kf_idx, cur_idx = kf_idx[has_point], cur_idx[has_point]
        if len(kf_idx) < min_inliers:
            return None
        xyz = self.map.points.xyz[keyframe.point_ids[kf_idx]]
        estimate = estimate_pose(obs.keypoints[cur_idx], xyz, self.colmap_camera, self.config.ransac_max_error,
                                 self.config.seed)
        if estimate is None or estimate[1].sum() < min_inliers:
            return None
        return estimate[0]

    def _start_new_segment(self, obs: Observation) -> None:
        """Forget the map and initialise again; the new map starts at the chained pose."""
        self._add_event(obs.frame.index, "new_segment")
        self.map.reset()
        self.reference, self.init_reference = None, None
        self.local_point_ids = np.zeros(0, np.int64)
        self.state = TrackerState.INITIALISING
        self._initialise(obs)

    # --- matching with the injected matcher --------------------------------------------

    def _match(self, first: Keyframe | Observation, second: Keyframe | Observation
               ) -> tuple[np.ndarray, np.ndarray]:
        """Keypoint index pairs between two keyframes/observations: the injected matcher, else mutual NN."""
        (raw0, desc0), (raw1, desc1) = matcher_inputs(first), matcher_inputs(second)
        if self.matcher is not None and raw0 and raw1:
            matches = to_numpy(self.matcher.match(raw0, raw1)["matches"]).astype(np.int64)
            matches = matches.reshape(-1, 2)
            return matches[:, 0], matches[:, 1]
        return mutual_nearest(desc0, desc1, self.config)


def matcher_inputs(view: Keyframe | Observation) -> tuple[dict, np.ndarray]:
    """The raw features (for the injected matcher) and the descriptors of a keyframe or observation."""
    if isinstance(view, Keyframe):
        return view.raw_features, view.descriptors
    return view.features.raw, view.features.descriptors


# --- association -------------------------------------------------------------------------


def max_distance(descriptors: np.ndarray, config: TrackerConfig) -> float:
    if config.max_descriptor_distance is not None:
        return config.max_descriptor_distance
    return 0.3 if descriptors.dtype == np.uint8 else 0.9


def triangulation_max_distance(descriptors: np.ndarray, config: TrackerConfig) -> float:
    if config.triangulation_max_descriptor_distance is not None:
        return config.triangulation_max_descriptor_distance
    return 0.2 if descriptors.dtype == np.uint8 else max_distance(descriptors, config)


def pair_distances(d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    """Normalised distance of row i of d0 to row i of d1: Hamming / bits, or unit-L2."""
    if d0.dtype == np.uint8:
        return np.bitwise_count(d0 ^ d1).sum(axis=1) / (8.0 * d0.shape[1])
    return np.sqrt(np.maximum(2.0 - 2.0 * np.einsum("ij,ij->i", d0, d1), 0.0))


def distance_matrix(d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    if len(d0) == 0 or len(d1) == 0:
        return np.zeros((len(d0), len(d1)), np.float32)
    if d0.dtype == np.uint8:  # Hamming as |a| + |b| - 2 a.b on the bits: one matrix product
        bits0 = np.unpackbits(d0, axis=1).astype(np.float32)
        bits1 = np.unpackbits(d1, axis=1).astype(np.float32)
        hamming = bits0.sum(1)[:, None] + bits1.sum(1)[None] - 2 * bits0 @ bits1.T
        return hamming / bits0.shape[1]
    return np.sqrt(np.maximum(2.0 - 2.0 * d0 @ d1.T, 0.0))


def best_unique_pairs(i: np.ndarray, j: np.ndarray, dist: np.ndarray, max_dist: float, ratio: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """From candidate pairs (i, j, dist): each i's best j if it passes the ratio test,
    then each j kept once (by its best i)."""
    keep = dist <= max_dist
    i, j, dist = i[keep], j[keep], dist[keep]
    if len(i) == 0:
        return i, j
    order = np.lexsort((dist, i))
    i, j, dist = i[order], j[order], dist[order]
    first = np.r_[True, i[1:] != i[:-1]]
    has_second = np.r_[~first[1:], False]            # next row belongs to the same i
    second_dist = np.where(has_second, np.r_[dist[1:], np.inf], np.inf)
    good = first & (dist < ratio * second_dist + 1e-12)
    i, j, dist = i[good], j[good], dist[good]
    if len(i) == 0:      # every candidate failed the ratio test
        return i, j
    order = np.lexsort((dist, j))
    i, j = i[order], j[order]
    first_j = np.r_[True, j[1:] != j[:-1]]
    return i[first_j], j[first_j]


def mutual_nearest(d0: np.ndarray, d1: np.ndarray, config: TrackerConfig) -> tuple[np.ndarray, np.ndarray]:
    dist = distance_matrix(d0, d1)
    if dist.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nn01, nn10 = dist.argmin(axis=1), dist.argmin(axis=0)
    i = np.flatnonzero(nn10[nn01] == np.arange(len(d0)))
    keep = dist[i, nn01[i]] <= max_distance(d0, config)
    return i[keep], nn01[i][keep]


def agrees_with(idx0: np.ndarray, idx1: np.ndarray, other0: np.ndarray, other1: np.ndarray) -> np.ndarray:
    """Boolean mask over the pairs (idx0, idx1): True where the other matching pairs idx0 the same way."""
    partner = np.full(max(idx0.max(initial=-1), other0.max(initial=-1)) + 1, -1)
    partner[other0] = other1
    return partner[idx0] == idx1


def locally_distinct(query_descriptors: np.ndarray, partner_idx: np.ndarray, keypoints: np.ndarray,
                     descriptors: np.ndarray, radius: float, ratio: float) -> np.ndarray:
    """Boolean mask over matches (query descriptor r -> keypoint partner_idx[r]): the partner's
    descriptor distance is below ``ratio`` times that of every other keypoint within ``radius`` px."""
    if len(partner_idx) == 0:
        return np.zeros(0, bool)
    near = cKDTree(keypoints).query_ball_point(keypoints[partner_idx], radius)   # each holds its partner
    rows = np.repeat(np.arange(len(partner_idx)), [len(n) for n in near])
    cols = np.concatenate(near).astype(np.int64)
    other = cols != partner_idx[rows]
    rows, cols = rows[other], cols[other]
    nearest_other = np.full(len(partner_idx), np.inf)
    np.minimum.at(nearest_other, rows, pair_distances(query_descriptors[rows], descriptors[cols]))
    return pair_distances(query_descriptors, descriptors[partner_idx]) < ratio * nearest_other


def project(xyz_world: np.ndarray, cam_from_world: np.ndarray, camera: Camera):
    """(N,2) pixels and (N,) depth."""
    xyz = transform(cam_from_world, xyz_world)
    z = xyz[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.c_[camera.fx * xyz[:, 0] / z + camera.cx, camera.fy * xyz[:, 1] / z + camera.cy]
    return uv, z


def search_by_projection(xyz, descriptors, cam_from_world, camera: Camera, keypoint_tree: cKDTree,
                         keypoint_descriptors, radius: float, config: TrackerConfig):
    """Match map points to keypoints near their projections.

    Returns (point index, keypoint index) of the matches and the indices of the points
    that project inside the image (for the found/visible statistics).
    """
    uv, z = project(xyz, cam_from_world, camera)
    visible = np.flatnonzero((z > 1e-3) & (uv[:, 0] >= 0) & (uv[:, 0] <= camera.width - 1)
                             & (uv[:, 1] >= 0) & (uv[:, 1] <= camera.height - 1))
    empty = np.zeros(0, np.int64)
    if len(visible) == 0 or keypoint_tree.n == 0:
        return empty, empty, visible
    pairs = cKDTree(uv[visible]).sparse_distance_matrix(keypoint_tree, radius, output_type="ndarray")
    if len(pairs) == 0:
        return empty, empty, visible
    i, j = visible[pairs["i"]], pairs["j"].astype(np.int64)
    dist = pair_distances(descriptors[i], keypoint_descriptors[j])
    point_idx, keypoint_idx = best_unique_pairs(i, j, dist, max_distance(descriptors, config), config.ratio)
    return point_idx, keypoint_idx, visible


# --- pose ---------------------------------------------------------------------------------


def to_rigid(T: np.ndarray) -> pycolmap.Rigid3d:
    return pycolmap.Rigid3d(np.ascontiguousarray(T[:3]))


def from_rigid(T: pycolmap.Rigid3d) -> np.ndarray:
    return np.vstack([T.matrix(), [0, 0, 0, 1]])


def estimate_pose(xy: np.ndarray, xyz: np.ndarray, camera: pycolmap.Camera, max_error: float, seed: int = 0):
    """LO-RANSAC PnP + refinement (pycolmap); (cam_from_world, inlier mask) or None.
    A fixed ``seed`` makes runs repeatable."""
    if len(xy) < 4:
        return None
    options = pycolmap.AbsolutePoseEstimationOptions()
    options.ransac.max_error = max_error
    options.ransac.random_seed = seed
    result = pycolmap.estimate_and_refine_absolute_pose(xy.astype(np.float64), xyz.astype(np.float64),
                                                        camera, options)
    if result is None:
        return None
    return from_rigid(result["cam_from_world"]), np.asarray(result["inlier_mask"], bool)


def refine_pose(cam_from_world: np.ndarray, xy: np.ndarray, xyz: np.ndarray, camera: pycolmap.Camera,
                max_error: float, rounds: int = 2):
    """Pose-only refinement, re-selecting inliers by reprojection error each round."""
    pose = cam_from_world
    for _ in range(rounds):
        uv, z = project(xyz, pose, _camera_of(camera))
        inliers = (z > 0) & (np.linalg.norm(uv - xy, axis=1) < max_error)
        if inliers.sum() < 4:
            return pose, inliers
        result = pycolmap.refine_absolute_pose(to_rigid(pose), xy.astype(np.float64), xyz.astype(np.float64),
                                               inliers, camera)
        if result is None:
            return pose, inliers
        pose = from_rigid(result["cam_from_world"])
    uv, z = project(xyz, pose, _camera_of(camera))
    return pose, (z > 0) & (np.linalg.norm(uv - xy, axis=1) < max_error)


def _camera_of(camera: pycolmap.Camera) -> Camera:
    fx, fy, cx, cy = camera.params
    return Camera(fx, fy, cx, cy, camera.width, camera.height)


def centre_of(cam_from_world: np.ndarray) -> np.ndarray:
    return -cam_from_world[:3, :3].T @ cam_from_world[:3, 3]


def median_parallax_deg(xyz: np.ndarray, centre0: np.ndarray, centre1: np.ndarray) -> float:
    if len(xyz) == 0:
        return 0.0
    r0, r1 = xyz - centre0, xyz - centre1
    cos = np.einsum("ij,ij->i", r0, r1) / (np.linalg.norm(r0, axis=1) * np.linalg.norm(r1, axis=1))
    return float(np.degrees(np.median(np.arccos(np.clip(cos, -1, 1)))))


# --- cameras, stereo and depth ------------------------------------------------------------


def undistort(keypoints: np.ndarray, camera: Camera) -> np.ndarray:
    keypoints = np.asarray(keypoints, np.float64).reshape(-1, 2)
    if camera.dist is None or not np.any(camera.dist) or len(keypoints) == 0:
        return keypoints
    return cv2.undistortPoints(keypoints[:, None], camera.K, camera.dist, P=camera.K)[:, 0].astype(np.float64)


def backproject(xy: np.ndarray, depth: np.ndarray, camera: Camera) -> np.ndarray:
    return np.c_[(xy[:, 0] - camera.cx) / camera.fx * depth, (xy[:, 1] - camera.cy) / camera.fy * depth, depth]


def sample_depth(depth_map: np.ndarray, keypoints: np.ndarray, max_depth: float) -> np.ndarray:
    """Depth at the nearest pixel of each keypoint; NaN where invalid or too far."""
    h, w = depth_map.shape[:2]
    x = np.clip(np.round(keypoints[:, 0]).astype(np.int64), 0, w - 1)
    y = np.clip(np.round(keypoints[:, 1]).astype(np.int64), 0, h - 1)
    depth = depth_map[y, x].astype(np.float64)
    return np.where((depth > 0) & (depth < max_depth), depth, np.nan)


def stereo_right_x(left: FrameFeatures, right_keypoints: np.ndarray, right_descriptors: np.ndarray,
                   camera: Camera, config: TrackerConfig, left_image=None, right_image=None) -> np.ndarray:
    """Match keypoints along rectified rows; x of each left keypoint in the right image."""
    left_keypoints = undistort(left.keypoints, camera)
    right_x = np.full(len(left_keypoints), np.nan)
    if len(left_keypoints) == 0 or len(right_keypoints) == 0:
        return right_x
    # Chebyshev ball in a scaled space: |dy| <= tolerance and 0 <= disparity <= max.
    half = config.stereo_max_disparity * camera.width / 2
    scale = np.array([1 / half, 1 / config.stereo_row_tolerance])
    query = (left_keypoints - [half, 0]) * scale
    pairs = cKDTree(query).sparse_distance_matrix(cKDTree(right_keypoints * scale), 1.0, p=np.inf,
                                                  output_type="ndarray")
    if len(pairs) == 0:
        return right_x
    i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    dist = pair_distances(left.descriptors[i], right_descriptors[j])
    i, j = best_unique_pairs(i, j, dist, max_distance(left.descriptors, config), config.ratio)
    right_x[i] = right_keypoints[j, 0]
    if config.stereo_subpixel and left_image is not None:
        right_x[i] = refine_right_x(left_image, right_image, left_keypoints[i], right_x[i],
                                    config.stereo_patch_radius, config.stereo_search_radius)
    # Far points have too small a disparity to measure depth: they count as monocular.
    min_disparity = camera.fx / config.stereo_max_depth_baselines
    right_x[~(left_keypoints[:, 0] - right_x > min_disparity)] = np.nan   # also clears NaN
    return right_x


def equiangular_vertex(c_minus: np.ndarray, c_centre: np.ndarray, c_plus: np.ndarray) -> np.ndarray:
    """Offset of the minimum of two lines of opposite slope through three costs at -1, 0, +1
    (the steeper side sets the slope); NaN where the centre is not a strict minimum."""
    rise = np.maximum(c_minus, c_plus) - c_centre
    valid = (c_centre < c_minus) & (c_centre < c_plus)
    return np.where(valid, 0.5 * (c_minus - c_plus) / np.where(valid, rise, 1.0), np.nan)


def refine_right_x(left_image: np.ndarray, right_image: np.ndarray, left_xy: np.ndarray,
                   right_x: np.ndarray, half_patch: int = 7, search: int = 5) -> np.ndarray:
    """Sub-pixel right x: patch SAD along the row around the match, then the equiangular
    line fit that suits SAD's V-shaped minimum (Shimizu & Okutomi 2005; ORB-SLAM fits a
    parabola, which pulls estimates ~0.1 px towards whole pixels). Detector positions are
    quantised by their pyramid level, and a disparity bias is a depth bias, i.e. scale drift.
    (Lucas-Kanade was tried: it biased disparities on KITTI by -0.5 % against SGBM.)"""
    h, w = left_image.shape
    xl, y = np.round(left_xy[:, 0]).astype(np.int64), np.round(left_xy[:, 1]).astype(np.int64)
    xr = np.round(right_x).astype(np.int64)
    margin = half_patch + search + 1
    ok = (y >= margin) & (y < h - margin) & (xl >= margin) & (xl < w - margin) & (xr >= margin) & (xr < w - margin)
    out = right_x.copy()
    if not ok.any():
        return out
    offsets = np.arange(-half_patch, half_patch + 1)
    rows = (y[ok, None] + offsets)[:, :, None]                                       # (n,P,1)
    left = left_image[rows, (xl[ok, None] + offsets)[:, None, :]].astype(np.float32)  # (n,P,P)
    left -= left.mean(axis=(1, 2), keepdims=True)
    shifts = np.arange(-search, search + 1)
    cols = xr[ok, None, None] + shifts[None, :, None] + offsets[None, None, :]        # (n,S,P)
    right = right_image[rows[:, None], cols[:, :, None, :]].astype(np.float32)       # (n,S,P,P)
    right -= right.mean(axis=(2, 3), keepdims=True)
    sad = np.abs(right - left[:, None]).sum(axis=(2, 3))                             # (n,S)
    best = sad.argmin(axis=1)
    n = np.arange(len(best))
    s0, s1, s2 = (sad[n, np.clip(best + d, 0, len(shifts) - 1)] for d in (-1, 0, 1))
    inner = (best > 0) & (best < len(shifts) - 1)
    delta = equiangular_vertex(s0, s1, s2)
    inner &= np.isfinite(delta)
    # The SAD compares columns around the rounded left x; carry its sub-pixel part over.
    refined = xr[ok] + shifts[best] + delta + (left_xy[ok, 0] - xl[ok])
    out[np.flatnonzero(ok)[inner]] = refined[inner]
    return out


# --- two-view geometry --------------------------------------------------------------------


def projection_matrix(camera: Camera, cam_from_world: np.ndarray) -> np.ndarray:
    return camera.K @ cam_from_world[:3]


def triangulate(xy0, xy1, pose0, pose1, camera: Camera, config: TrackerConfig):
    """Points (N,3) in world, a mask of those passing cheirality and reprojection checks,
    and their parallax angles in degrees."""
    if len(xy0) == 0:
        return np.zeros((0, 3)), np.zeros(0, bool), np.zeros(0)
    X = cv2.triangulatePoints(projection_matrix(camera, pose0), projection_matrix(camera, pose1),
                              xy0.T.astype(np.float64), xy1.T.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        xyz = (X[:3] / X[3]).T
    good = np.all(np.isfinite(xyz), axis=1)
    for xy, pose in ((xy0, pose0), (xy1, pose1)):
        uv, z = project(xyz, pose, camera)
        good &= (z > 0) & (np.linalg.norm(uv - xy, axis=1) < config.max_triangulation_error)
    r0, r1 = xyz - centre_of(pose0), xyz - centre_of(pose1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.einsum("ij,ij->i", r0, r1) / (np.linalg.norm(r0, axis=1) * np.linalg.norm(r1, axis=1))
    parallax = np.degrees(np.arccos(np.clip(np.nan_to_num(cos, nan=1.0), -1, 1)))
    return xyz, good, parallax


def triangulate_pair(new: Keyframe, old: Keyframe, camera: Camera, config: TrackerConfig,
                     pairs: tuple[np.ndarray, np.ndarray] | None = None):
    """Triangulate unmatched keypoints of two keyframes.

    ``pairs`` (keypoint indices in new, in old) come from a matcher; without them the free
    keypoints are paired by descriptor along epipolar lines. Either way a pair must lie within
    ``max_triangulation_error`` of its epipolar line, reproject and have enough parallax.
    Returns the keypoint indices in new and old and the points (world).
    """
    empty = np.zeros(0, np.int64)
    if np.linalg.norm(new.centre - old.centre) < 1e-6:
        return empty, empty, np.zeros((0, 3))
    F = fundamental_from_poses(old.cam_from_world, new.cam_from_world, camera)
    if pairs is None:
        idx_new, idx_old = epipolar_pairs(new, old, F, config)
    else:
        idx_new, idx_old = (np.asarray(p, np.int64) for p in pairs)
        free = (new.point_ids[idx_new] == NO_POINT) & (old.point_ids[idx_old] == NO_POINT)
        idx_new, idx_old = idx_new[free], idx_old[free]
        on_line = epipolar_distance(F, old.keypoints[idx_old], new.keypoints[idx_new]) < config.max_triangulation_error
        idx_new, idx_old = idx_new[on_line], idx_old[on_line]
    xyz, good, parallax = triangulate(old.keypoints[idx_old], new.keypoints[idx_new],
                                      old.cam_from_world, new.cam_from_world, camera, config)
    good &= parallax > config.min_triangulation_parallax_deg
    return idx_new[good], idx_old[good], xyz[good]


def epipolar_lines(F: np.ndarray, xy_old: np.ndarray) -> np.ndarray:
    """(N,3) normalised lines in the new image of points in the old one (x_new^T F x_old = 0)."""
    lines = np.c_[xy_old, np.ones(len(xy_old))] @ F.T
    return lines / np.linalg.norm(lines[:, :2], axis=1, keepdims=True)


def epipolar_distance(F: np.ndarray, xy_old: np.ndarray, xy_new: np.ndarray) -> np.ndarray:
    """Pixel distance of each new point to the epipolar line of its old partner."""
    return np.abs(np.einsum("ij,ij->i", np.c_[xy_new, np.ones(len(xy_new))], epipolar_lines(F, xy_old)))


def epipolar_pairs(new: Keyframe, old: Keyframe, F: np.ndarray, config: TrackerConfig):
    """Free keypoints of new and old paired by descriptor among those near each other's epipolar line."""
    free_new = np.flatnonzero(new.point_ids == NO_POINT)
    free_old = np.flatnonzero(old.point_ids == NO_POINT)
    if len(free_new) == 0 or len(free_old) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lines = epipolar_lines(F, old.keypoints[free_old])
    epipolar = np.abs(np.c_[new.keypoints[free_new], np.ones(len(free_new))] @ lines.T)
    i, j = np.nonzero(epipolar < config.max_triangulation_error)
    dist = pair_distances(new.descriptors[free_new[i]], old.descriptors[free_old[j]])
    i, j = best_unique_pairs(i, j, dist, triangulation_max_distance(new.descriptors, config), 0.8)
    return free_new[i], free_old[j]


def fundamental_from_poses(pose0: np.ndarray, pose1: np.ndarray, camera: Camera) -> np.ndarray:
    """F with x1^T F x0 = 0 for cam_from_world poses 0 and 1."""
    rel = pose1 @ invert(pose0)
    t = rel[:3, 3]
    E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ rel[:3, :3]
    K_inv = np.linalg.inv(camera.K)
    return K_inv.T @ E @ K_inv


def initialise_two_view(xy0: np.ndarray, xy1: np.ndarray, camera: Camera, config: TrackerConfig):
    """Relative pose of frame 1 (cur_from_ref, unit-less), points in frame 0, good mask; or None.

    Essential matrix or homography, picked with ORB-SLAM's score ratio; then
    triangulation with cheirality, reprojection and parallax checks.
    """
    K = camera.K
    xy0, xy1 = np.asarray(xy0, np.float64), np.asarray(xy1, np.float64)
    essential, H = two_view_ransac(xy0, xy1, camera, config.seed)
    if essential is None:
        return None
    F = np.linalg.inv(K).T @ essential["E"] @ np.linalg.inv(K)
    score_h = homography_score(H, xy0, xy1) if H is not None else 0.0
    score_f = fundamental_score(F, xy0, xy1)
    if score_h / max(score_h + score_f, 1e-9) > config.init_homography_ratio:
        _, rotations, translations, _ = cv2.decomposeHomographyMat(H, K)
        candidates = [(R, t.ravel()) for R, t in zip(rotations, translations)]
    else:   # pycolmap has already picked the decomposition with the points in front
        cur_from_ref = essential["cam2_from_cam1"]
        candidates = [(cur_from_ref.rotation.matrix(), np.asarray(cur_from_ref.translation))]
    best = None
    for R, t in candidates:
        rel = np.eye(4)
        rel[:3, :3], rel[:3, 3] = R, t / max(np.linalg.norm(t), 1e-12)
        xyz, good, parallax = triangulate(xy0, xy1, np.eye(4), rel, camera, config)
        if best is None or good.sum() > best[2].sum():
            best = (rel, xyz, good, parallax)
    if best is None or best[2].sum() < config.init_min_points:
        return None
    rel, xyz, good, parallax = best
    if np.median(parallax[good]) < config.init_min_parallax_deg:
        return None   # too little motion yet: depths would be unreliable
    good &= parallax > config.min_triangulation_parallax_deg
    return (rel, xyz, good) if good.sum() >= config.init_min_points else None


def two_view_ransac(xy0: np.ndarray, xy1: np.ndarray, camera: Camera, seed: int):
    """Essential matrix (1 px) and homography (2 px) by pycolmap's LO-RANSAC, seeded so that a
    run is repeatable and ``seed`` varies the initialisation too; (dict or None, H or None)."""
    options = pycolmap.RANSACOptions()
    options.confidence, options.random_seed = 0.999, seed
    options.max_error = 1.0
    colmap_camera = camera.to_colmap()
    essential = pycolmap.estimate_essential_matrix(xy0, xy1, colmap_camera, colmap_camera, options)
    options.max_error = 2.0
    homography = pycolmap.estimate_homography_matrix(xy0, xy1, options)
    return essential, (homography["H"] if homography is not None else None)


def fundamental_score(F, xy0, xy1, sigma: float = 1.0) -> float:
    """ORB-SLAM's model score: sum over both images of (threshold - chi2) for inliers."""
    h0, h1 = np.c_[xy0, np.ones(len(xy0))], np.c_[xy1, np.ones(len(xy1))]
    l1, l0 = h0 @ F.T, h1 @ F
    num = np.einsum("ij,ij->i", h1, l1) ** 2
    chi1 = num / (l1[:, 0] ** 2 + l1[:, 1] ** 2) / sigma ** 2
    chi0 = num / (l0[:, 0] ** 2 + l0[:, 1] ** 2) / sigma ** 2
    th, th_score = 3.841, 5.991
    inlier = (chi0 < th) & (chi1 < th)
    return float(np.sum(np.where(inlier, (th_score - chi0) + (th_score - chi1), 0.0)))


def homography_score(H, xy0, xy1, sigma: float = 1.0) -> float:
    def transfer(M, xy):
        p = np.c_[xy, np.ones(len(xy))] @ M.T
        return p[:, :2] / p[:, 2:]
    chi1 = np.sum((transfer(H, xy0) - xy1) ** 2, axis=1) / sigma ** 2
    chi0 = np.sum((transfer(np.linalg.inv(H), xy1) - xy0) ** 2, axis=1) / sigma ** 2
    th = 5.991
    inlier = (chi0 < th) & (chi1 < th)
    return float(np.sum(np.where(inlier, (th - chi0) + (th - chi1), 0.0)))


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)

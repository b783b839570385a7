"""Local bundle adjustment with pycolmap (Ceres), robust loss and fixed gauge.

``bundle_adjust`` solves a self-contained ``BAProblem`` (arrays in, arrays out) so it
can be tested on its own; ``local_bundle_adjustment`` builds that problem from the
map's sliding window, writes the result back and culls bad observations.

Stereo and RGB-D observations enter as a second, right camera in a two-sensor rig
with the fixed baseline (RGB-D uses a virtual right camera, as ORB-SLAM does): the
right x coordinate constrains depth, which keeps the metric scale without drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap

from .map import NO_POINT, Keyframe, Map
from .types import Camera


@dataclass
class BAConfig:
    window: int = 7                   # keyframes optimised
    max_fixed_keyframes: int = 4      # older keyframes seeing window points, held fixed
    min_views: int = 2                # points seen from fewer keyframes are left out
    max_iterations: int = 6           # local BA runs after every keyframe: keep it short
    function_tolerance: float = 1e-5  # relative cost change that ends the solve early
    loss: str = "HUBER"               # any pycolmap.LossFunctionType: HUBER, CAUCHY, SOFT_L1
    loss_scale: float = 2.0           # pixels
    max_reprojection_error: float = 3.0  # pixels; observations beyond are dropped afterwards
    num_threads: int = 1


@dataclass
class BAProblem:
    """Poses are cam_from_world 4x4; observation o sees point obs_point[o] from pose obs_pose[o]."""
    camera: Camera
    poses: np.ndarray            # (K,4,4)
    fixed_poses: np.ndarray      # (K,) bool
    points: np.ndarray           # (M,3)
    obs_pose: np.ndarray         # (O,) int
    obs_point: np.ndarray        # (O,) int
    obs_xy: np.ndarray           # (O,2) left image pixels
    obs_right_x: np.ndarray | None = None  # (O,) right image x, NaN = none; needs a baseline
    baseline: float | None = None


@dataclass
class BAStats:
    initial_error: float         # mean reprojection error in pixels (left and right)
    final_error: float
    num_poses: int
    num_fixed: int
    num_points: int
    num_observations: int
    num_culled: int = 0
    converged: bool = True
    iterations: int = 0
    seconds: float = 0.0         # solver time


def reprojection_errors(problem: BAProblem, poses=None, points=None) -> np.ndarray:
    """(O,) pixel error per observation: the larger of left and (if any) right."""
    poses = problem.poses if poses is None else poses
    points = problem.points if points is None else points
    T = poses[problem.obs_pose]
    xyz = np.einsum("oij,oj->oi", T[:, :3, :3], points[problem.obs_point]) + T[:, :3, 3]
    cam = problem.camera
    z = np.where(xyz[:, 2] > 1e-9, xyz[:, 2], np.nan)
    u = cam.fx * xyz[:, 0] / z + cam.cx
    v = cam.fy * xyz[:, 1] / z + cam.cy
    error = np.hypot(u - problem.obs_xy[:, 0], v - problem.obs_xy[:, 1])
    if problem.obs_right_x is not None and problem.baseline:
        u_right = u - cam.fx * problem.baseline / z
        right_error = np.abs(u_right - problem.obs_right_x)
        error = np.where(np.isnan(problem.obs_right_x), error, np.fmax(error, right_error))
    return np.where(np.isnan(error), np.inf, error)


def bundle_adjust(problem: BAProblem, config: BAConfig = BAConfig()) -> tuple[np.ndarray, np.ndarray, BAStats]:
    """Refine the free poses and all points; returns (poses, points, stats)."""
    initial = reprojection_errors(problem)
    reconstruction, point_ids = _build_reconstruction(problem)
    ba_config = pycolmap.BundleAdjustmentConfig()
    for image in reconstruction.images.values():
        ba_config.add_image(image.image_id)
    for camera_id in reconstruction.cameras:
        ba_config.set_constant_cam_intrinsics(camera_id)
    for k in np.flatnonzero(problem.fixed_poses):
        ba_config.set_constant_rig_from_world_pose(int(k) + 1)
    if len(reconstruction.cameras) > 1:
        ba_config.set_constant_sensor_from_rig_pose(reconstruction.camera(2).sensor_id)
    for point_id in point_ids:
        ba_config.add_variable_point(int(point_id))
    summary = pycolmap.create_default_bundle_adjuster(_options(config), ba_config, reconstruction).solve()
    ceres = summary.ceres_summary

    poses = problem.poses.copy()
    for k in range(len(poses)):
        if not problem.fixed_poses[k]:
            poses[k][:3] = reconstruction.frame(k + 1).rig_from_world.matrix()
    points = np.array([reconstruction.point3D(int(i)).xyz for i in point_ids]).reshape(-1, 3)
    final = reprojection_errors(problem, poses, points)
    stats = BAStats(_mean_finite(initial), _mean_finite(final), len(poses), int(problem.fixed_poses.sum()),
                    len(points), len(problem.obs_pose),
                    converged=summary.termination_type != pycolmap.BundleAdjustmentTerminationType.FAILURE,
                    iterations=ceres.num_successful_steps + ceres.num_unsuccessful_steps,
                    seconds=ceres.total_time_in_seconds)
    return poses, points, stats


def _mean_finite(errors: np.ndarray) -> float:
    finite = errors[np.isfinite(errors)]
    return float(finite.mean()) if len(finite) else float("nan")


def _options(config: BAConfig) -> pycolmap.BundleAdjustmentOptions:
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = False
    options.refine_principal_point = False
    options.refine_extra_params = False
    options.refine_sensor_from_rig = False
    options.print_summary = False
    options.ceres.loss_function_type = getattr(pycolmap.LossFunctionType, config.loss)
    options.ceres.loss_function_scale = config.loss_scale
    options.ceres.solver_options.max_num_iterations = config.max_iterations
    options.ceres.solver_options.function_tolerance = config.function_tolerance
    options.ceres.solver_options.num_threads = config.num_threads
    return options


def _build_reconstruction(problem: BAProblem) -> tuple[pycolmap.Reconstruction, list[int]]:
    """One rig per problem (left camera, plus the right one for stereo), one frame per pose.

    Frame k has id k + 1; its left image id 2k + 1 and right image id 2k + 2.
    """
    cam = problem.camera
    stereo = problem.obs_right_x is not None and bool(problem.baseline)
    reconstruction = pycolmap.Reconstruction()
    cameras = [cam.to_colmap(camera_id=i + 1) for i in range(2 if stereo else 1)]
    rig = pycolmap.Rig(rig_id=1)
    for camera in cameras:
        reconstruction.add_camera(camera)
    rig.add_ref_sensor(cameras[0].sensor_id)
    if stereo:  # right camera: x_right = x_left - baseline
        right_from_left = pycolmap.Rigid3d(pycolmap.Rotation3d(), np.array([-problem.baseline, 0.0, 0.0]))
        rig.add_sensor(cameras[1].sensor_id, right_from_left)
    reconstruction.add_rig(rig)

    # Observation o is keypoint slot[o] of its image(s).
    order = np.argsort(problem.obs_pose, kind="stable")
    slot = np.empty(len(order), np.int64)
    counts = np.bincount(problem.obs_pose, minlength=len(problem.poses))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot[order] = np.arange(len(order)) - np.repeat(starts, counts)
    for k, pose in enumerate(problem.poses):
        rows = order[starts[k]:starts[k] + counts[k]]
        frame = pycolmap.Frame(frame_id=k + 1, rig_id=1)
        frame.rig_from_world = pycolmap.Rigid3d(pose[:3])
        images = [pycolmap.Image(name=f"{k}", keypoints=problem.obs_xy[rows], camera_id=1, image_id=2 * k + 1)]
        if stereo:
            right_xy = np.c_[problem.obs_right_x[rows], problem.obs_xy[rows, 1]]
            right_xy[np.isnan(right_xy[:, 0])] = -1.0   # placeholder, never part of a track
            images.append(pycolmap.Image(name=f"{k}r", keypoints=right_xy, camera_id=2, image_id=2 * k + 2))
        for camera, image in zip(cameras, images):
            frame.add_data_id(pycolmap.data_t(camera.sensor_id, image.image_id))
        reconstruction.add_frame(frame)
        for image in images:
            image.frame_id = k + 1
            reconstruction.add_image(image)
        reconstruction.register_frame(k + 1)

    tracks = [pycolmap.Track() for _ in range(len(problem.points))]
    has_right = stereo and np.isfinite(problem.obs_right_x)
    for o, (k, m) in enumerate(zip(problem.obs_pose, problem.obs_point)):
        tracks[m].add_element(2 * int(k) + 1, int(slot[o]))
        if stereo and has_right[o]:
            tracks[m].add_element(2 * int(k) + 2, int(slot[o]))
    point_ids = [reconstruction.add_point3D(xyz, track) for xyz, track in zip(problem.points, tracks)]
    return reconstruction, point_ids


# --- the map's sliding window -------------------------------------------------------------


def local_bundle_adjustment(map_: Map, window: list[Keyframe], config: BAConfig, camera: Camera,
                            stereo_baseline: float | None = None, fix_scale: bool = False) -> BAStats:
    """Optimise ``window`` and its points; older keyframes seeing them are fixed.

    The gauge: keyframes outside the window that see window points are constant; when
    fewer than one (two with ``fix_scale``, for monocular maps) exist, the oldest
    window keyframes are held fixed instead.
    """
    full, keyframe_ids, all_point_ids = _window_problem(map_, window, camera, stereo_baseline, config, fix_scale)
    if full is None:
        return BAStats(float("nan"), float("nan"), 0, 0, 0, 0)
    problem, kept = drop_weak_points(full, config.min_views)
    if len(kept) == 0:
        return BAStats(float("nan"), float("nan"), len(full.poses), 0, 0, 0)
    point_ids = all_point_ids[kept]
    poses, points, stats = bundle_adjust(problem, config)
    for k, keyframe_id in enumerate(keyframe_ids):
        if not problem.fixed_poses[k]:
            map_.set_keyframe_pose(keyframe_id, poses[k])
    map_.points.xyz[point_ids] = points
    _carry_weak_points(map_, full, all_point_ids, kept, poses)
    stats.num_culled = _cull_observations(map_, problem, keyframe_ids, point_ids, poses, points,
                                          config.max_reprojection_error)
    return stats


def _carry_weak_points(map_: Map, full: BAProblem, point_ids: np.ndarray, kept: np.ndarray,
                       poses: np.ndarray) -> None:
    """Points left out of BA (seen from one keyframe) move rigidly with that keyframe,
    which is where BA would have put them; otherwise they go stale when it moves."""
    weak = np.setdiff1d(np.arange(len(full.points)), kept)
    if len(weak) == 0:
        return
    _, first_row = np.unique(full.obs_point, return_index=True)   # every point has a row
    k = full.obs_pose[first_row[weak]]
    new_from_old = np.einsum("kij,kjl->kil", np.linalg.inv(poses), full.poses)   # world -> world
    xyz = full.points[weak]
    map_.points.xyz[point_ids[weak]] = np.einsum("nij,nj->ni", new_from_old[k, :3, :3], xyz) + new_from_old[k, :3, 3]


def _window_problem(map_: Map, window: list[Keyframe], camera: Camera, baseline: float | None,
                    config: BAConfig, fix_scale: bool):
    """The window's keyframes, the older ones seeing its points (fixed) and all those points."""
    point_ids = map_.points_seen_by(window)
    if len(point_ids) == 0:
        return None, [], point_ids
    window_ids = {kf.id for kf in window}
    seen_from = {}
    for point_id in point_ids:
        for keyframe_id in map_.points.observations[point_id]:
            if keyframe_id not in window_ids:
                seen_from[keyframe_id] = seen_from.get(keyframe_id, 0) + 1
    outside = sorted(seen_from, key=seen_from.get, reverse=True)[:config.max_fixed_keyframes]
    keyframes = [map_.keyframes[i] for i in sorted(outside)] + list(window)
    fixed = np.zeros(len(keyframes), bool)
    fixed[:len(outside)] = True
    needed = 2 if fix_scale else 1
    if len(outside) < needed:
        fixed[:needed] = True

    obs_pose, obs_point, obs_xy, obs_right = [], [], [], []
    for k, kf in enumerate(keyframes):   # point_ids is sorted: columns by binary search
        indices = np.flatnonzero(kf.point_ids != NO_POINT)
        column = np.minimum(np.searchsorted(point_ids, kf.point_ids[indices]), len(point_ids) - 1)
        in_problem = point_ids[column] == kf.point_ids[indices]
        indices, column = indices[in_problem], column[in_problem]
        obs_pose.append(np.full(len(indices), k))
        obs_point.append(column)
        obs_xy.append(kf.keypoints[indices])
        obs_right.append(kf.right_x[indices])
    problem = BAProblem(camera, np.stack([kf.cam_from_world for kf in keyframes]), fixed,
                        map_.points.xyz[point_ids].copy(), np.concatenate(obs_pose),
                        np.concatenate(obs_point), np.concatenate(obs_xy),
                        np.concatenate(obs_right) if baseline else None, baseline)
    return problem, [kf.id for kf in keyframes], point_ids


def drop_weak_points(problem: BAProblem, min_views: int = 2) -> tuple[BAProblem, np.ndarray]:
    """Keep points seen from at least ``min_views`` poses. A point seen from one pose
    (even with a stereo measurement) does not constrain any pose: it only costs time."""
    views = np.bincount(problem.obs_point, minlength=len(problem.points))
    kept = np.flatnonzero(views >= min_views)
    new_index = np.full(len(problem.points), -1)
    new_index[kept] = np.arange(len(kept))
    rows = new_index[problem.obs_point] >= 0
    return BAProblem(problem.camera, problem.poses, problem.fixed_poses, problem.points[kept],
                     problem.obs_pose[rows], new_index[problem.obs_point[rows]], problem.obs_xy[rows],
                     None if problem.obs_right_x is None else problem.obs_right_x[rows],
                     problem.baseline), kept


def _cull_observations(map_: Map, problem: BAProblem, keyframe_ids, point_ids, poses, points,
                       max_error: float) -> int:
    """Drop observations with large error and points left with too little support."""
    errors = reprojection_errors(problem, poses, points)
    bad = np.flatnonzero(~(errors <= max_error))
    for o in bad:
        map_.remove_observation(int(point_ids[problem.obs_point[o]]), keyframe_ids[problem.obs_pose[o]])
    counts = map_.num_observations(point_ids)
    map_.remove_points(point_ids[counts == 0])
    return len(bad)

"""The local map: keyframes and 3D points, in numpy-friendly form with bounded memory.

Points live in a struct of arrays (positions, descriptors, counters) whose slots are
reused once a point dies, so vectorised projection needs no per-frame packing.
Keyframes hold their features and, per keypoint, the id of the point it observes.
Only the most recent keyframes stay in the map (the BA window plus a few for
relocalisation); older ones are dropped with their observations, and only their
poses are kept, as the backbone of the full trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NO_POINT = -1


@dataclass
class Keyframe:
    id: int
    frame_index: int
    stamp: float
    cam_from_world: np.ndarray    # 4x4
    keypoints: np.ndarray         # (N,2) undistorted pixels
    descriptors: np.ndarray       # (N,D) uint8 (binary) or float32
    right_x: np.ndarray           # (N,) x in the (virtual) right image, NaN = no stereo/depth
    point_ids: np.ndarray         # (N,) map point observed by each keypoint, NO_POINT = none
    raw_features: dict = field(default_factory=dict, repr=False)  # for the matcher (reloc)

    @property
    def world_from_cam(self) -> np.ndarray:
        return invert(self.cam_from_world)

    @property
    def centre(self) -> np.ndarray:
        return -self.cam_from_world[:3, :3].T @ self.cam_from_world[:3, 3]


class MapPoints:
    """Struct of arrays with slot reuse; a point's id is its slot."""

    def __init__(self, capacity: int = 4096):
        self.xyz = np.zeros((capacity, 3))
        self.descriptors: np.ndarray | None = None   # allocated on first add (dtype, dim)
        self.alive = np.zeros(capacity, bool)
        self.first_keyframe = np.zeros(capacity, np.int64)
        self.times_visible = np.zeros(capacity, np.int64)   # predicted in a tracked frame's view
        self.times_found = np.zeros(capacity, np.int64)     # and matched as an inlier there
        self.observations: list[dict[int, int]] = [dict() for _ in range(capacity)]  # kf -> keypoint
        self._free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return int(self.alive.sum())

    def alive_ids(self) -> np.ndarray:
        return np.flatnonzero(self.alive)

    def add(self, xyz: np.ndarray, descriptors: np.ndarray, keyframe_id: int) -> np.ndarray:
        if self.descriptors is None:
            self.descriptors = np.zeros((len(self.alive), descriptors.shape[1]), descriptors.dtype)
        while len(self._free) < len(xyz):
            self._grow()
        ids = np.array([self._free.pop() for _ in range(len(xyz))], np.int64)
        self.xyz[ids] = xyz
        self.descriptors[ids] = descriptors
        self.alive[ids] = True
        self.first_keyframe[ids] = keyframe_id
        self.times_visible[ids] = 1
        self.times_found[ids] = 1
        for i in ids:
            self.observations[i] = {}
        return ids

    def release(self, ids: np.ndarray) -> None:
        """Free the slots; callers first remove the observations from the keyframes."""
        for i in np.asarray(ids, np.int64):
            if self.alive[i]:
                self.alive[i] = False
                self.observations[i] = {}
                self._free.append(int(i))

    def _grow(self) -> None:
        old = len(self.alive)
        self.xyz = np.concatenate([self.xyz, np.zeros_like(self.xyz)])
        if self.descriptors is not None:
            self.descriptors = np.concatenate([self.descriptors, np.zeros_like(self.descriptors)])
        for name in ("alive", "first_keyframe", "times_visible", "times_found"):
            array = getattr(self, name)
            setattr(self, name, np.concatenate([array, np.zeros_like(array)]))
        self.observations += [dict() for _ in range(old)]
        self._free = list(range(2 * old - 1, old - 1, -1)) + self._free


class Map:
    """Keyframes of the current segment and their points; past keyframe poses forever."""

    def __init__(self):
        self.keyframes: dict[int, Keyframe] = {}          # insertion order = time order
        self.points = MapPoints()
        self.keyframe_poses: dict[int, np.ndarray] = {}   # every keyframe ever: cam_from_world
        self.keyframe_frames: dict[int, int] = {}         # every keyframe ever: its frame index
        self._next_keyframe_id = 0

    def new_keyframe_id(self) -> int:
        self._next_keyframe_id += 1
        return self._next_keyframe_id - 1

    def add_keyframe(self, keyframe: Keyframe) -> None:
        self.keyframes[keyframe.id] = keyframe
        self.keyframe_poses[keyframe.id] = keyframe.cam_from_world
        self.keyframe_frames[keyframe.id] = keyframe.frame_index
        for index in np.flatnonzero(keyframe.point_ids != NO_POINT):
            self.points.observations[keyframe.point_ids[index]][keyframe.id] = int(index)

    def set_keyframe_pose(self, keyframe_id: int, cam_from_world: np.ndarray) -> None:
        self.keyframes[keyframe_id].cam_from_world = cam_from_world
        self.keyframe_poses[keyframe_id] = cam_from_world

    def add_points(self, keyframe: Keyframe, keypoint_indices: np.ndarray, xyz: np.ndarray) -> np.ndarray:
        """New points seen by ``keyframe`` at ``keypoint_indices``; returns their ids."""
        ids = self.points.add(xyz, keyframe.descriptors[keypoint_indices], keyframe.id)
        keyframe.point_ids[keypoint_indices] = ids
        for point_id, index in zip(ids, keypoint_indices):
            self.points.observations[point_id][keyframe.id] = int(index)
        return ids

    def add_observation(self, point_id: int, keyframe: Keyframe, index: int) -> None:
        keyframe.point_ids[index] = point_id
        self.points.observations[point_id][keyframe.id] = int(index)

    def remove_observation(self, point_id: int, keyframe_id: int) -> None:
        index = self.points.observations[point_id].pop(keyframe_id, None)
        if index is not None and keyframe_id in self.keyframes:
            self.keyframes[keyframe_id].point_ids[index] = NO_POINT

    def remove_points(self, point_ids: np.ndarray) -> None:
        for point_id in np.asarray(point_ids, np.int64):
            for keyframe_id in list(self.points.observations[point_id]):
                self.remove_observation(point_id, keyframe_id)
        self.points.release(point_ids)

    def recent_keyframes(self, count: int) -> list[Keyframe]:
        return list(self.keyframes.values())[-count:]

    def points_seen_by(self, keyframes: list[Keyframe]) -> np.ndarray:
        ids = [kf.point_ids[kf.point_ids != NO_POINT] for kf in keyframes]
        if not ids:
            return np.zeros(0, np.int64)
        ids = np.unique(np.concatenate(ids))
        return ids[self.points.alive[ids]]

    def num_observations(self, point_ids: np.ndarray) -> np.ndarray:
        return np.array([len(self.points.observations[i]) for i in point_ids], np.int64)

    def drop_old_keyframes(self, keep: int) -> None:
        """Bound memory: forget all but the ``keep`` newest keyframes (their poses stay)."""
        while len(self.keyframes) > keep:
            oldest = next(iter(self.keyframes.values()))
            seen = oldest.point_ids[oldest.point_ids != NO_POINT]
            for point_id in seen:
                self.points.observations[point_id].pop(oldest.id, None)
            del self.keyframes[oldest.id]
            orphans = [p for p in seen if self.points.alive[p] and not self.points.observations[p]]
            self.points.release(np.array(orphans, np.int64))

    def reset(self) -> None:
        """Start a new segment: forget keyframes and points, keep the pose history."""
        self.keyframes.clear()
        self.points = MapPoints()


def invert(T: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = T[:3, :3].T
    out[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return out


def transform(T: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to (N,3) points."""
    return xyz @ T[:3, :3].T + T[:3, 3]

"""Trajectory error metrics: Umeyama alignment, ATE, RPE (as evo computes them) and KITTI's t_rel / r_rel.

All metrics take two trajectories that are already associated pose by pose (same length,
see `vo.eval.trajectory.associate`); `ref` is the ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from vo.eval.trajectory import Trajectory

ALIGNMENTS = ("se3", "sim3", "none")
KITTI_LENGTHS = (100, 200, 300, 400, 500, 600, 700, 800)   # metres, as the devkit
KITTI_STEP = 10                                              # first frames every 10 frames (1 s)


class MetricsError(ValueError):
    """Trajectories on which a metric is undefined (too short, degenerate, mismatched)."""


# ----------------------------------------------------------------------------- alignment

@dataclass(frozen=True)
class Alignment:
    """Similarity x -> scale * R x + t applied to an estimate to bring it onto the reference."""
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scale: float = 1.0

    @property
    def matrix(self) -> np.ndarray:
        """4x4 Sim(3) matrix."""
        sim3 = np.eye(4)
        sim3[:3, :3] = self.scale * self.rotation
        sim3[:3, 3] = self.translation
        return sim3

    def unapply_points(self, points: np.ndarray) -> np.ndarray:
        """Reference-frame points (N,3) into the estimate's frame (the inverse similarity)."""
        return (points - self.translation) @ self.rotation / self.scale

    def apply(self, traj: Trajectory) -> Trajectory:
        """Scales the positions and moves the whole trajectory; orientations stay rotations."""
        poses = traj.poses.copy()
        poses[:, :3, :3] = self.rotation @ traj.rotations
        poses[:, :3, 3] = self.scale * traj.positions @ self.rotation.T + self.translation
        return Trajectory(traj.stamps.copy(), poses, traj.name)


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix, in degrees (clipped, so safe near 0 and 180)."""
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def umeyama(source: np.ndarray, target: np.ndarray, with_scale: bool) -> Alignment:
    """Least-squares similarity (Umeyama, PAMI 1991) mapping source points (N,3) onto target (N,3)."""
    mean_src, mean_tgt = source.mean(axis=0), target.mean(axis=0)
    centred_src, centred_tgt = source - mean_src, target - mean_tgt
    variance_src = np.mean(np.sum(centred_src ** 2, axis=1))
    covariance = centred_tgt.T @ centred_src / len(source)
    u, d, vt = np.linalg.svd(covariance)
    if np.count_nonzero(d > np.finfo(d.dtype).eps) < 2:
        raise MetricsError("degenerate trajectory (points on a line or a point): cannot align")
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:   # keep a proper rotation, not a reflection
        sign[2, 2] = -1
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / variance_src) if with_scale else 1.0
    translation = mean_tgt - scale * rotation @ mean_src
    return Alignment(rotation, translation, scale)


def align(est: Trajectory, ref: Trajectory, method: str = "se3") -> tuple[Trajectory, Alignment]:
    """The estimate aligned onto the reference by positions: 'se3', 'sim3' (with scale) or 'none'."""
    _check_paired(est, ref)
    if method == "none":
        return est, Alignment()
    if method not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {method!r}; use one of {', '.join(ALIGNMENTS)}")
    if len(est) < 3:
        raise MetricsError(f"need at least 3 poses to align, got {len(est)}")
    alignment = umeyama(est.positions, ref.positions, with_scale=method == "sim3")
    return alignment.apply(est), alignment


def _check_paired(est: Trajectory, ref: Trajectory) -> None:
    if len(est) != len(ref):
        raise MetricsError(f"trajectories are not paired: {len(est)} vs {len(ref)} poses")
    if len(est) == 0:
        raise MetricsError("empty trajectories")


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class ErrorStats:
    rmse: float
    mean: float
    median: float
    std: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, errors: np.ndarray) -> "ErrorStats":
        """Same statistics as evo (population std)."""
        errors = np.asarray(errors, dtype=np.float64)
        if errors.size == 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, nan, 0)
        return cls(float(np.sqrt(np.mean(errors ** 2))), float(np.mean(errors)), float(np.median(errors)),
                   float(np.std(errors)), float(np.min(errors)), float(np.max(errors)), int(errors.size))


# ----------------------------------------------------------------------------- ATE / RPE

def _inverse(poses: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms (…,4,4)."""
    inverse = np.zeros_like(poses)
    rot_t = np.swapaxes(poses[..., :3, :3], -1, -2)
    inverse[..., :3, :3] = rot_t
    inverse[..., :3, 3] = -(rot_t @ poses[..., :3, 3:4])[..., 0]
    inverse[..., 3, 3] = 1.0
    return inverse


def ate_errors(est: Trajectory, ref: Trajectory) -> np.ndarray:
    """Per-pose position error (m): evo_ape with pose relation translation_part."""
    _check_paired(est, ref)
    return np.linalg.norm(est.positions - ref.positions, axis=1)


def rpe_pairs(count: int, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive pairs (0, d), (d, 2d), ...: evo_rpe's default (delta in frames, not all pairs)."""
    if delta < 1:
        raise ValueError("delta must be at least 1 frame")
    ids = np.arange(0, count, delta)
    return ids[:-1], ids[1:]


def rpe_errors(est: Trajectory, ref: Trajectory, delta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Relative pose errors over `delta` frames: (translation (m), rotation angle (deg)).

    E = (ref_i^-1 ref_j)^-1 (est_i^-1 est_j), as evo_rpe (translation_part / angle_deg).
    """
    _check_paired(est, ref)
    first, second = rpe_pairs(len(est), delta)
    ref_motion = _inverse(ref.poses[first]) @ ref.poses[second]
    est_motion = _inverse(est.poses[first]) @ est.poses[second]
    error = _inverse(ref_motion) @ est_motion
    translation = np.linalg.norm(error[:, :3, 3], axis=1)
    angle = np.degrees(Rotation.from_matrix(error[:, :3, :3]).magnitude()) if len(error) else np.zeros(0)
    return translation, angle


# ----------------------------------------------------------------------------- KITTI devkit

@dataclass(frozen=True)
class KittiErrors:
    t_rel: float            # %, mean translation error per distance travelled
    r_rel: float            # deg / 100 m
    num_segments: int
    per_length: dict        # length (m) -> (t_rel %, r_rel deg/100m, count)


def kitti_segment_errors(est: Trajectory, ref: Trajectory, lengths=KITTI_LENGTHS,
                         step: int = KITTI_STEP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(length, t_err per metre, r_err rad per metre) of every segment, as the devkit's calcSequenceErrors.

    Segments start every `step` frames and end at the first frame more than `length` metres
    of ground-truth path further. The devkit computes in float32; this in float64.
    """
    _check_paired(est, ref)
    travelled = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ref.positions, axis=0), axis=1))])
    starts = np.arange(0, len(ref), step)
    seg_lengths, t_errs, r_errs = [], [], []
    for length in lengths:
        ends = np.searchsorted(travelled, travelled[starts] + length, side="right")
        valid = ends < len(ref)
        first, last = starts[valid], ends[valid]
        # General inverse, as the devkit's Matrix::inv: KITTI files round rotations to 6 digits,
        # so a transpose would differ in the 7th digit of t_rel.
        ref_motion = np.linalg.inv(ref.poses[first]) @ ref.poses[last]
        est_motion = np.linalg.inv(est.poses[first]) @ est.poses[last]
        error = np.linalg.inv(est_motion) @ ref_motion
        cos_angle = np.clip(0.5 * (np.trace(error[:, :3, :3], axis1=1, axis2=2) - 1.0), -1.0, 1.0)
        seg_lengths.append(np.full(len(first), float(length)))
        t_errs.append(np.linalg.norm(error[:, :3, 3], axis=1) / length)
        r_errs.append(np.arccos(cos_angle) / length)
    return np.concatenate(seg_lengths), np.concatenate(t_errs), np.concatenate(r_errs)


def kitti_errors(est: Trajectory, ref: Trajectory) -> KittiErrors:
    """t_rel (%) and r_rel (deg/100 m) averaged over all segments of 100..800 m (devkit saveStats)."""
    lengths, t_err, r_err = kitti_segment_errors(est, ref)
    if len(lengths) == 0:
        nan = float("nan")
        return KittiErrors(nan, nan, 0, {})
    per_length = {int(L): (float(t_err[lengths == L].mean() * 100),
                           float(np.degrees(r_err[lengths == L].mean()) * 100),
                           int(np.count_nonzero(lengths == L)))
                  for L in np.unique(lengths)}
    return KittiErrors(float(t_err.mean() * 100), float(np.degrees(r_err.mean()) * 100), len(lengths), per_length)


# ----------------------------------------------------------------------------- everything at once

@dataclass(frozen=True)
class EvaluationResult:
    num_pairs: int
    alignment_method: str
    alignment: Alignment
    ate: ErrorStats              # metres
    rpe_translation: ErrorStats  # metres per `delta` frames
    rpe_rotation: ErrorStats     # degrees per `delta` frames
    delta: int
    kitti: KittiErrors | None = None


def evaluate(est: Trajectory, ref: Trajectory, alignment: str = "se3", delta: int = 1,
             with_kitti: bool = False) -> EvaluationResult:
    """ATE and RPE of a paired estimate after alignment (RPE and t_rel see the same aligned
    estimate, so a Sim(3) alignment fixes the scale of a monocular run for all metrics)."""
    aligned, transform = align(est, ref, alignment)
    rpe_t, rpe_r = rpe_errors(aligned, ref, delta)
    return EvaluationResult(
        num_pairs=len(est), alignment_method=alignment, alignment=transform,
        ate=ErrorStats.of(ate_errors(aligned, ref)),
        rpe_translation=ErrorStats.of(rpe_t), rpe_rotation=ErrorStats.of(rpe_r), delta=delta,
        kitti=kitti_errors(aligned, ref) if with_kitti else None)

"""Trajectories (stamped camera-to-world poses) and their TUM, KITTI and EuRoC file formats."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

FORMATS = ("tum", "kitti", "euroc")
EUROC_HEADER = ("#timestamp [ns],p_RS_R_x [m],p_RS_R_y [m],p_RS_R_z [m],"
                "q_RS_w [],q_RS_x [],q_RS_y [],q_RS_z []")


class TrajectoryError(ValueError):
    """A trajectory file that cannot be used; the message names the file and the problem."""


@dataclass(eq=False)   # arrays have no single truth value; compare fields explicitly
class Trajectory:
    stamps: np.ndarray   # (N,) seconds
    poses: np.ndarray    # (N, 4, 4) camera-to-world
    name: str = ""

    def __post_init__(self):
        self.stamps = np.asarray(self.stamps, dtype=np.float64).reshape(-1)
        self.poses = np.asarray(self.poses, dtype=np.float64).reshape(-1, 4, 4)
        if len(self.stamps) != len(self.poses):
            raise ValueError(f"{len(self.stamps)} stamps but {len(self.poses)} poses")

    def __len__(self) -> int:
        return len(self.stamps)

    @property
    def positions(self) -> np.ndarray:
        return self.poses[:, :3, 3]

    @property
    def rotations(self) -> np.ndarray:
        return self.poses[:, :3, :3]

    def subset(self, indices) -> "Trajectory":
        return Trajectory(self.stamps[indices], self.poses[indices], self.name)

    @classmethod
    def from_positions_quaternions(cls, stamps, positions, quats_xyzw, name: str = "") -> "Trajectory":
        """Quaternions are normalised (files carry rounded values)."""
        poses = np.tile(np.eye(4), (len(stamps), 1, 1))
        poses[:, :3, :3] = Rotation.from_quat(np.asarray(quats_xyzw).reshape(-1, 4)).as_matrix()
        poses[:, :3, 3] = positions
        return cls(stamps, poses, name)

    def quaternions_xyzw(self) -> np.ndarray:
        """Unit quaternions with w >= 0 (one canonical sign, so files diff cleanly)."""
        quats = Rotation.from_matrix(self.rotations).as_quat()
        return np.where(quats[:, 3:4] < 0, -quats, quats)

    def path_length(self) -> float:
        return float(np.linalg.norm(np.diff(self.positions, axis=0), axis=1).sum())


# ----------------------------------------------------------------------------- parsing helpers

def _require_file(path: Path) -> None:
    if path.is_dir():
        raise TrajectoryError(f"{path}: is a folder, expected a trajectory file")
    if not path.is_file():
        raise TrajectoryError(f"{path}: no such file")


def _read_rows(path: Path, delimiter: str | None, min_columns: int, exact: bool) -> np.ndarray:
    """Numbers of a text table, skipping '#' comments and blank lines; problems name the line."""
    _require_file(path)
    rows, width = [], None
    with path.open(errors="replace") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(delimiter)
            count = len(fields)
            if count < min_columns or (exact and count != min_columns) or (width and count != width):
                need = f"{min_columns}" if exact else f"at least {min_columns}"
                raise TrajectoryError(f"{path}: line {line_no} has {count} values, expected {need}")
            try:
                rows.append([float(field) for field in fields])
            except ValueError:
                raise TrajectoryError(f"{path}: line {line_no} holds a value that is not a number") from None
            width = count
    if not rows:
        raise TrajectoryError(f"{path}: no poses in file")
    table = np.array(rows, dtype=np.float64)
    if not np.all(np.isfinite(table)):
        line = int(np.flatnonzero(~np.all(np.isfinite(table), axis=1))[0]) + 1
        raise TrajectoryError(f"{path}: non-finite value in data row {line}")
    return table


def _check_stamps(stamps: np.ndarray, path: Path) -> None:
    """Stamps must not go back; repeated stamps are tolerated (TUM's own fr2/desk ground truth has one)."""
    bad = np.flatnonzero(np.diff(stamps) < 0)
    if bad.size:
        raise TrajectoryError(f"{path}: stamps go backwards at data row {int(bad[0]) + 2}")


def _check_quaternions(quats: np.ndarray, path: Path) -> None:
    norms = np.linalg.norm(quats, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > 0.1)   # rounding is fine, garbage is not
    if bad.size:
        raise TrajectoryError(f"{path}: quaternion of norm {norms[bad[0]]:.3g} in data row {int(bad[0]) + 1}")


# ----------------------------------------------------------------------------- TUM

def read_tum(path: str | Path) -> Trajectory:
    """`timestamp tx ty tz qx qy qz qw` per line."""
    path = Path(path)
    table = _read_rows(path, None, 8, exact=True)
    _check_stamps(table[:, 0], path)
    _check_quaternions(table[:, 4:8], path)
    return Trajectory.from_positions_quaternions(table[:, 0], table[:, 1:4], table[:, 4:8], path.stem)


def write_tum(path: str | Path, traj: Trajectory) -> None:
    table = np.column_stack([traj.stamps, traj.positions, traj.quaternions_xyzw()])
    np.savetxt(path, table, fmt="%.9f", delimiter=" ")


# ----------------------------------------------------------------------------- KITTI

def read_times(path: str | Path) -> np.ndarray:
    """One stamp per line (KITTI `times.txt`)."""
    path = Path(path)
    stamps = _read_rows(path, None, 1, exact=True)[:, 0]
    _check_stamps(stamps, path)
    return stamps


def read_kitti(path: str | Path, times_path: str | Path | None = None) -> Trajectory:
    """Row-major 3x4 [R|t] per line; stamps from `times_path`, else the line index."""
    path = Path(path)
    table = _read_rows(path, None, 12, exact=True)
    poses = np.tile(np.eye(4), (len(table), 1, 1))
    poses[:, :3, :] = table.reshape(-1, 3, 4)
    stamps = np.arange(len(table), dtype=np.float64)
    if times_path is not None:
        stamps = read_times(times_path)
        if len(stamps) != len(poses):
            raise TrajectoryError(f"{times_path}: {len(stamps)} stamps for {len(poses)} poses in {path.name}")
    return Trajectory(stamps, poses, path.stem)


def write_kitti(path: str | Path, traj: Trajectory, times_path: str | Path | None = None) -> None:
    np.savetxt(path, traj.poses[:, :3, :].reshape(-1, 12), fmt="%.9e", delimiter=" ")
    if times_path is not None:
        np.savetxt(times_path, traj.stamps, fmt="%.9f")


# ----------------------------------------------------------------------------- EuRoC

def read_euroc(path: str | Path) -> Trajectory:
    """EuRoC csv: ns stamp, position, quaternion w x y z; extra columns (velocities, biases) ignored."""
    path = Path(path)
    table = _read_rows(path, ",", 8, exact=False)
    _check_stamps(table[:, 0], path)
    _check_quaternions(table[:, 4:8], path)
    quats_xyzw = table[:, [5, 6, 7, 4]]
    return Trajectory.from_positions_quaternions(table[:, 0] * 1e-9, table[:, 1:4], quats_xyzw, path.stem)


def write_euroc(path: str | Path, traj: Trajectory) -> None:
    quats = traj.quaternions_xyzw()[:, [3, 0, 1, 2]]
    with open(path, "w") as handle:
        handle.write(EUROC_HEADER + "\n")
        for stamp, position, quat in zip(traj.stamps, traj.positions, quats):
            values = ",".join(f"{v:.9f}" for v in (*position, *quat))
            handle.write(f"{int(round(stamp * 1e9))},{values}\n")


# ----------------------------------------------------------------------------- any format

def detect_format(path: str | Path) -> str:
    """'euroc' for .csv, else 'kitti' (12 numbers per line) or 'tum' (8 numbers per line)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return "euroc"
    _require_file(path)
    with path.open(errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) in (8, 12):
                return "tum" if len(fields) == 8 else "kitti"
            raise TrajectoryError(f"{path}: {len(fields)} values per line; expected 8 (TUM) or 12 (KITTI)")
    raise TrajectoryError(f"{path}: no poses in file")


def read_trajectory(path: str | Path, fmt: str | None = None, times_path: str | Path | None = None) -> Trajectory:
    fmt = fmt or detect_format(path)
    if fmt == "tum":
        return read_tum(path)
    if fmt == "kitti":
        return read_kitti(path, times_path)
    if fmt == "euroc":
        return read_euroc(path)
    raise ValueError(f"unknown trajectory format {fmt!r}; use one of {', '.join(FORMATS)}")


def write_trajectory(path: str | Path, traj: Trajectory, fmt: str) -> None:
    writers = {"tum": write_tum, "kitti": write_kitti, "euroc": write_euroc}
    if fmt not in writers:
        raise ValueError(f"unknown trajectory format {fmt!r}; use one of {', '.join(FORMATS)}")
    writers[fmt](path, traj)


# ----------------------------------------------------------------------------- association

def nearest_indices(query: np.ndarray, reference: np.ndarray, max_diff: float) -> tuple[np.ndarray, np.ndarray]:
    """For each query stamp, the nearest reference stamp within max_diff (reference sorted).

    Returns (query indices, reference indices) of the matches. Ties go to the earlier
    reference stamp, as in evo's `matching_time_indices`.
    """
    query, reference = np.asarray(query, np.float64), np.asarray(reference, np.float64)
    if len(reference) == 0 or len(query) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    upper = np.clip(np.searchsorted(reference, query, side="right"), 0, len(reference) - 1)
    lower = np.clip(upper - 1, 0, None)
    diff_upper = reference[upper] - query
    diff_lower = np.where(upper > 0, query - reference[lower], np.inf)
    take_upper = (diff_upper <= max_diff) & (diff_upper < diff_lower)
    take_lower = ~take_upper & (diff_lower <= max_diff) & (diff_lower <= diff_upper)
    in_range = (query >= reference[0] - max_diff) & (query <= reference[-1] + max_diff)
    matched = (take_upper | take_lower) & in_range
    chosen = np.where(take_upper, upper, lower)
    return np.flatnonzero(matched), chosen[matched]


def associate(traj_a: Trajectory, traj_b: Trajectory, max_diff: float = 0.02) -> tuple[Trajectory, Trajectory]:
    """Pairs of poses with nearest stamps (within max_diff s), as evo's `associate_trajectories`.

    Every pose of the shorter trajectory looks up its nearest pose in the longer one, so no
    pose of the sparser trajectory (usually the estimate) is lost.
    """
    a_is_short = len(traj_b) > len(traj_a)   # equal lengths: b drives, as in evo
    short, long_ = (traj_a, traj_b) if a_is_short else (traj_b, traj_a)
    ids_short, ids_long = nearest_indices(short.stamps, long_.stamps, max_diff)
    if len(ids_short) == 0:
        raise TrajectoryError(f"no matching stamps between {traj_a.name or 'first'} and "
                              f"{traj_b.name or 'second'} trajectory within {max_diff} s")
    short, long_ = short.subset(ids_short), long_.subset(ids_long)
    return (short, long_) if a_is_short else (long_, short)

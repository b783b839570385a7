"""KITTI odometry sequence: `image_0/` (left), `image_1/` (right), `calib.txt`, `times.txt`,
ground truth in `../../poses/<sequence>.txt` when present."""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from vo.datasets.base import (Source, SourceError, first_image_size, read_gray_pair, read_stamp_file,
                              require_dir, require_file, warn)
from vo.datasets.calib import Calibration, Undistorter, load_calibration
from vo.eval.trajectory import TrajectoryError, read_kitti
from vo.types import Frame

KITTI_RATE_HZ = 10.0


def read_projections(path: Path) -> dict[str, np.ndarray]:
    """The 3x4 projection matrices of calib.txt by name ('P0', 'P1', ...)."""
    matrices = {}
    for line_no, line in enumerate(require_file(path, "calib.txt").read_text().splitlines(), 1):
        name, sep, values = line.partition(":")
        if not sep:
            continue
        try:
            numbers = np.array(values.split(), dtype=np.float64)
        except ValueError:
            raise SourceError(f"{path}: line {line_no} ({name.strip()}) holds a value that is not a number") from None
        if name.strip().startswith("P") and numbers.size != 12:
            raise SourceError(f"{path}: {name.strip()} has {numbers.size} values, expected 12")
        matrices[name.strip()] = numbers.reshape(3, -1) if numbers.size % 3 == 0 else numbers
    if "P0" not in matrices:
        raise SourceError(f"{path}: no 'P0:' line")
    return matrices


def calibration_from_projections(projections: dict[str, np.ndarray], path: Path) -> Calibration:
    p0 = projections["P0"]
    baseline = None
    if "P1" in projections:   # P1 = K [I | -b e_x]: fourth column holds -fx * baseline
        baseline = float(-projections["P1"][0, 3] / projections["P1"][0, 0])
    return Calibration(p0[0, 0], p0[1, 1], p0[0, 2], p0[1, 2], None, baseline, path=str(path))


def read_stamps(root: Path, count_hint: int) -> np.ndarray:
    times_path = root / "times.txt"
    if not times_path.is_file():
        warn(f"{times_path}: missing; assuming {KITTI_RATE_HZ:g} Hz")
        return np.arange(count_hint) / KITTI_RATE_HZ
    return read_stamp_file(times_path)


def read_ground_truth(root: Path, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    gt_path = root.parent.parent / "poses" / f"{root.name}.txt"
    if not gt_path.is_file():
        return None
    try:
        poses = read_kitti(gt_path).poses
    except TrajectoryError as exc:
        raise SourceError(str(exc)) from None
    count = min(len(poses), len(stamps))   # poses/XX.txt is full length; the images may be a prefix
    return stamps[:count], poses[:count]


class KittiSource(Source):
    kind = "kitti"

    def __init__(self, root: str | Path, calib: str | Path | None = None):
        root = Path(root)
        left_dir = require_dir(root / "image_0", "image_0 folder (left images)")
        images = sorted(left_dir.glob("*.png"))
        if not images:
            raise SourceError(f"{left_dir}: no .png images")
        calib_txt = root / "calib.txt"
        calibration = calibration_from_projections(read_projections(calib_txt), calib_txt)
        if calib is not None:
            override = load_calibration(calib)
            override.baseline = override.baseline or calibration.baseline
            calibration = override
        self.stamps = read_stamps(root, len(images))
        self.left_paths = [left_dir / f"{i:06d}.png" for i in range(len(self.stamps))]
        self.right_paths = [root / "image_1" / f"{i:06d}.png" for i in range(len(self.stamps))]
        if len(images) != len(self.stamps):
            warn(f"{left_dir}: {len(images)} images but {len(self.stamps)} stamps in times.txt")
        width, height = first_image_size(self.left_paths, "left")
        camera = calibration.to_camera(width, height)
        self.undistort = Undistorter.for_camera(camera)   # only a --calib with distortion needs it
        camera = self.undistort.camera if self.undistort else camera
        stereo = (root / "image_1").is_dir() and calibration.baseline is not None
        if stereo:
            self._check_stereo_sizes((width, height))
        super().__init__(root.name, camera, ("stereo", "mono") if stereo else ("mono",),
                         read_ground_truth(root, self.stamps), len(self.stamps))

    def _check_stereo_sizes(self, left_size: tuple[int, int]) -> None:
        right_size = first_image_size(self.right_paths, "right")
        if right_size != left_size:
            raise SourceError(f"{self.right_paths[0].parent}: stereo pair sizes differ "
                              f"(right {right_size[0]}x{right_size[1]}, left {left_size[0]}x{left_size[1]})")

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        size = (self.camera.width, self.camera.height)
        for index, (stamp, left_path) in islice(enumerate(zip(self.stamps, self.left_paths)), first, None):
            stereo = mode == "stereo"
            pair = read_gray_pair(left_path, self.right_paths[index] if stereo else None, stereo, size)
            if pair is None:
                continue
            left, right = pair
            if self.undistort is not None:
                left, right = self.undistort(left), (self.undistort(right) if right is not None else None)
            yield Frame(index, float(stamp), left, right=right, path=str(left_path))

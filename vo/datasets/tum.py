"""TUM RGB-D sequence: `rgb.txt`, `depth.txt`, `groundtruth.txt` and the image folders.

Colour and depth are paired as TUM's associate.py does (greedy by smallest stamp difference,
each frame used once, |dt| < 0.02 s). Intrinsics are the published ones of the sensor named in
the folder (freiburg1/2/3), unless `--calib` is given.
"""
from __future__ import annotations

import re
from itertools import islice
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from vo.datasets.base import (Source, SourceError, check_stamps, first_image_size, read_sized_image,
                              require_file)
from vo.datasets.calib import Calibration, Undistorter, load_calibration
from vo.eval.trajectory import TrajectoryError, nearest_indices, read_tum
from vo.types import Frame

MAX_STAMP_DIFF = 0.02     # s, TUM associate.py default
DEPTH_SCALE = 5000.0      # depth PNG units per metre

# Published calibrations (TUM RGB-D "file formats" page), 640x480; fr3 images come undistorted.
PUBLISHED_CALIBRATIONS = {
    1: Calibration(517.3, 516.5, 318.6, 255.3, np.array([0.2624, -0.9531, -0.0054, 0.0026, 1.1633]),
                   width=640, height=480, path="TUM freiburg1 calibration"),
    2: Calibration(520.9, 521.0, 325.1, 249.7, np.array([0.2312, -0.7849, -0.0033, -0.0001, 0.9172]),
                   width=640, height=480, path="TUM freiburg2 calibration"),
    3: Calibration(535.4, 539.2, 320.1, 247.6, None, width=640, height=480, path="TUM freiburg3 calibration"),
}


def read_file_list(path: Path) -> tuple[np.ndarray, list[str]]:
    """Stamps and relative file names of rgb.txt / depth.txt ('stamp file' per line, '#' comments)."""
    stamps, names = [], []
    for line_no, line in enumerate(require_file(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            stamps.append(float(fields[0]))
        except ValueError:
            raise SourceError(f"{path}: line {line_no} does not start with a stamp") from None
        if len(fields) < 2:
            raise SourceError(f"{path}: line {line_no} has no file name")
        names.append(fields[1])
    if not stamps:
        raise SourceError(f"{path}: lists no frames")
    stamps = np.array(stamps)
    check_stamps(stamps, path)
    return stamps, names


def associate_unique(stamps_a: np.ndarray, stamps_b: np.ndarray,
                     max_diff: float = MAX_STAMP_DIFF) -> list[tuple[int, int]]:
    """TUM associate.py: candidate pairs closer than max_diff, taken greedily by difference,
    each stamp at most once; returned sorted by the first stamp."""
    candidates = []
    for i, stamp in enumerate(stamps_a):
        lo, hi = np.searchsorted(stamps_b, [stamp - max_diff, stamp + max_diff])
        candidates += [(abs(stamp - stamps_b[j]), i, j) for j in range(lo, hi) if abs(stamp - stamps_b[j]) < max_diff]
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in sorted(candidates):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def published_calibration(root: Path) -> Calibration:
    match = re.search(r"(?:freiburg|fr)([123])", root.resolve().name)
    if not match:
        raise SourceError(f"{root}: cannot tell the sensor (freiburg1/2/3) from the folder name; pass --calib")
    return PUBLISHED_CALIBRATIONS[int(match.group(1))]


def read_ground_truth(root: Path, frame_stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Ground-truth poses nearest to each colour frame (within 0.02 s); frames without one are left out."""
    gt_path = root / "groundtruth.txt"
    if not gt_path.is_file():
        return None
    try:
        gt = read_tum(gt_path)
    except TrajectoryError as exc:
        raise SourceError(str(exc)) from None
    frame_ids, gt_ids = nearest_indices(frame_stamps, gt.stamps, MAX_STAMP_DIFF)
    return frame_stamps[frame_ids], gt.poses[gt_ids]


class TumSource(Source):
    kind = "tum"

    def __init__(self, root: str | Path, calib: str | Path | None = None):
        root = Path(root)
        self.root = root
        self.rgb_stamps, rgb_names = read_file_list(root / "rgb.txt")
        self.rgb_paths = [root / name for name in rgb_names]
        calibration = load_calibration(calib) if calib is not None else published_calibration(root)
        width, height = first_image_size(self.rgb_paths, "colour")
        camera = calibration.to_camera(width, height)
        self.undistort = Undistorter.for_camera(camera)
        if self.undistort is not None:
            camera = self.undistort.camera
        modes = ("mono",)
        self.pairs: list[tuple[int, int]] = []
        if (root / "depth.txt").is_file():
            self.depth_stamps, depth_names = read_file_list(root / "depth.txt")
            self.depth_paths = [root / name for name in depth_names]
            self.pairs = associate_unique(self.rgb_stamps, self.depth_stamps)
            self._check_depth_size((width, height))
            modes = ("rgbd", "mono") if self.pairs else modes
        super().__init__(root.name, camera, modes, read_ground_truth(root, self.rgb_stamps), len(self.rgb_stamps))

    def frame_count(self, mode: str | None = None) -> int:
        """rgbd frames are the associated colour/depth pairs; mono uses every colour frame."""
        return len(self.pairs) if (mode or self.mode) == "rgbd" else len(self.rgb_stamps)

    def _check_depth_size(self, colour_size: tuple[int, int]) -> None:
        depth_size = first_image_size(self.depth_paths, "depth")
        if depth_size != colour_size:
            raise SourceError(f"{self.depth_paths[0].parent}: depth images are {depth_size[0]}x{depth_size[1]} "
                              f"but colour images {colour_size[0]}x{colour_size[1]}")

    @property
    def _size(self) -> tuple[int, int]:
        return self.camera.width, self.camera.height

    def _colour(self, index: int) -> np.ndarray | None:
        image = read_sized_image(self.rgb_paths[index], cv2.IMREAD_COLOR, self._size)
        if image is None or self.undistort is None:
            return image
        return self.undistort(image)

    def _depth(self, index: int) -> np.ndarray | None:
        raw = read_sized_image(self.depth_paths[index], cv2.IMREAD_ANYDEPTH, self._size)
        if raw is None:
            return None
        depth = raw.astype(np.float32) / DEPTH_SCALE
        # Nearest neighbour: blending depths across an edge would invent surfaces.
        return depth if self.undistort is None else self.undistort(depth, cv2.INTER_NEAREST)

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        pairs = self.pairs if mode == "rgbd" else [(i, None) for i in range(len(self.rgb_stamps))]
        for index, (rgb_id, depth_id) in islice(enumerate(pairs), first, None):
            image = self._colour(rgb_id)
            depth = self._depth(depth_id) if depth_id is not None else None
            if image is None or (depth_id is not None and depth is None):
                continue
            extra = {"depth_stamp": float(self.depth_stamps[depth_id])} if depth_id is not None else {}
            yield Frame(index, float(self.rgb_stamps[rgb_id]), image, depth=depth,
                        path=str(self.rgb_paths[rgb_id]), extra=extra)

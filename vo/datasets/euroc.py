"""EuRoC MAV sequence (ASL format): `mav0/cam0`, `mav0/cam1` (data.csv, data/*.png, sensor.yaml)
and `mav0/state_groundtruth_estimate0/data.csv`.

Stereo frames are rectified with cv2.stereoRectify from the two sensor.yaml calibrations (pinhole,
radial-tangential) and extrinsics T_BS; the reported camera is the rectified left one, and the
ground truth is converted from the body (IMU) frame to that camera.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from vo.datasets.base import (Source, SourceError, check_stamps, first_image_size, read_gray_pair,
                              require_dir, require_file)
from vo.datasets.calib import (Calibration, StereoRectification, Undistorter, as_matrix,
                               calibration_from_mapping, load_calibration, read_opencv_yaml, stereo_rectify)
from vo.eval.trajectory import TrajectoryError, nearest_indices, read_euroc
from vo.types import Camera, Frame

GT_MAX_STAMP_DIFF = 0.02   # s; ground truth runs at 200 Hz, so the nearest is within 2.5 ms
SUPPORTED_DISTORTIONS = ("radial-tangential", "radtan", "none")


@dataclass
class EurocCamera:
    calibration: Calibration
    body_from_sensor: np.ndarray   # T_BS, 4x4
    stamps_ns: np.ndarray          # int64
    paths: list[Path]


def find_mav0(root: Path) -> Path:
    """The folder holding cam0/: `root/mav0`, or root itself when given the mav0 folder."""
    return root if (root / "cam0").is_dir() else require_dir(root / "mav0", "mav0 folder")


def read_image_list(csv_path: Path) -> tuple[np.ndarray, list[str]]:
    """`#timestamp [ns],filename` rows of a camera's data.csv."""
    stamps, names = [], []
    for line_no, line in enumerate(require_file(csv_path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 2 or not fields[0].isdigit():
            raise SourceError(f"{csv_path}: line {line_no} is not 'timestamp_ns,filename'")
        stamps.append(int(fields[0]))
        names.append(fields[1])
    if not stamps:
        raise SourceError(f"{csv_path}: lists no images")
    stamps = np.array(stamps, dtype=np.int64)
    check_stamps(stamps, csv_path)
    return stamps, names


def read_sensor_yaml(path: Path) -> tuple[Calibration, np.ndarray]:
    """Intrinsics, distortion, resolution and T_BS of an EuRoC camera sensor.yaml."""
    data = read_opencv_yaml(require_file(path, "sensor.yaml"))
    model = str(data.get("camera_model", "pinhole"))
    distortion_model = str(data.get("distortion_model", "none"))
    if model != "pinhole" or distortion_model not in SUPPORTED_DISTORTIONS:
        raise SourceError(f"{path}: unsupported camera model {model}/{distortion_model} "
                          f"(pinhole with radial-tangential distortion only)")
    if "T_BS" not in data:
        raise SourceError(f"{path}: missing 'T_BS'")
    return calibration_from_mapping(data, path), as_matrix(data["T_BS"], 4, 4, path, "T_BS")


def read_camera(cam_dir: Path, calib_override: str | Path | None = None) -> EurocCamera:
    calibration, body_from_sensor = read_sensor_yaml(cam_dir / "sensor.yaml")
    if calib_override is not None:
        calibration = load_calibration(calib_override)
    stamps, names = read_image_list(cam_dir / "data.csv")
    return EurocCamera(calibration, body_from_sensor, stamps, [cam_dir / "data" / name for name in names])


def camera_of(cam: EurocCamera, what: str) -> Camera:
    width, height = first_image_size(cam.paths, what)
    return cam.calibration.to_camera(width, height)


def read_ground_truth(mav0: Path, stamps: np.ndarray, body_from_camera: np.ndarray):
    """Poses of the (rectified) left camera at the frame stamps: T_WC = T_WB T_BS T_S,rect."""
    gt_path = mav0 / "state_groundtruth_estimate0" / "data.csv"
    if not gt_path.is_file():
        return None
    try:
        body = read_euroc(gt_path)
    except TrajectoryError as exc:
        raise SourceError(str(exc)) from None
    frame_ids, gt_ids = nearest_indices(stamps, body.stamps, GT_MAX_STAMP_DIFF)
    return stamps[frame_ids], body.poses[gt_ids] @ body_from_camera


class EurocSource(Source):
    kind = "euroc"

    def __init__(self, root: str | Path, calib: str | Path | None = None):
        root = Path(root)
        mav0 = find_mav0(root)
        left = read_camera(require_dir(mav0 / "cam0", "cam0 folder"), calib)
        left_camera = camera_of(left, "cam0")
        self.left_paths, self.right_paths = left.paths, None
        self.rectification: StereoRectification | None = None
        self.undistort = None
        body_from_camera = left.body_from_sensor
        if (mav0 / "cam1" / "data.csv").is_file():
            right = read_camera(mav0 / "cam1")
            self._pair_stereo(left, right)
            right_camera = camera_of(right, "cam1")
            if (right_camera.width, right_camera.height) != (left_camera.width, left_camera.height):
                raise SourceError(f"{mav0 / 'cam1'}: stereo pair sizes differ (cam1 {right_camera.width}x"
                                  f"{right_camera.height}, cam0 {left_camera.width}x{left_camera.height})")
            right_from_left = np.linalg.inv(right.body_from_sensor) @ left.body_from_sensor
            self.rectification = stereo_rectify(left_camera, right_camera, right_from_left)
            camera, modes = self.rectification.camera, ("stereo", "mono")
            body_from_camera = body_from_camera @ self.rectification.left_from_rectified
        else:
            self.stamps_ns = left.stamps_ns
            self.undistort = Undistorter.for_camera(left_camera)
            camera = self.undistort.camera if self.undistort else left_camera
            modes = ("mono",)
        stamps = self.stamps_ns * 1e-9
        name = root.name if root.name != "mav0" else root.parent.name
        super().__init__(name, camera, modes, read_ground_truth(mav0, stamps, body_from_camera), len(stamps))

    def _pair_stereo(self, left: EurocCamera, right: EurocCamera) -> None:
        """Keep frames both cameras recorded: the sensor triggers them together (equal stamps)."""
        common, left_ids, right_ids = np.intersect1d(left.stamps_ns, right.stamps_ns, return_indices=True)
        if len(common) == 0:
            raise SourceError(f"{right.paths[0].parent.parent / 'data.csv'}: no stamp in common with cam0")
        self.stamps_ns = common
        self.left_paths = [left.paths[i] for i in left_ids]
        self.right_paths = [right.paths[i] for i in right_ids]

    def _left(self, image: np.ndarray) -> np.ndarray:
        if self.rectification is not None:
            return self.rectification.left(image)
        return self.undistort(image) if self.undistort else image

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        # Sizes are those of the raw images, which equal the rectified ones.
        size = (self.camera.width, self.camera.height)
        for index, (stamp_ns, left_path) in islice(enumerate(zip(self.stamps_ns, self.left_paths)), first, None):
            stereo = mode == "stereo"
            pair = read_gray_pair(left_path, self.right_paths[index] if stereo else None, stereo, size)
            if pair is None:
                continue
            left, right = pair
            right = self.rectification.right(right) if right is not None else None
            yield Frame(index, float(stamp_ns) * 1e-9, self._left(left), right=right, path=str(left_path),
                        extra={"stamp_ns": int(stamp_ns)})

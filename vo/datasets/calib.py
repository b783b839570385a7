"""Camera calibration: the `--calib` YAML, OpenCV `%YAML:1.0` files, undistortion and stereo rectification.

The `--calib` file is plain YAML::

    fx: 517.3
    fy: 516.5
    cx: 318.6
    cy: 255.3
    distortion: [0.2624, -0.9531, -0.0054, 0.0026, 1.1633]   # optional, k1 k2 p1 p2 [k3]
    baseline: 0.12                                            # optional, metres (stereo)
    width: 640                                                # optional, checked against the images
    height: 480

ORB-SLAM style keys (`Camera.fx`, `Camera.k1`, `Camera.bf`, ...) and EuRoC style keys
(`intrinsics: [fu, fv, cu, cv]`, `distortion_coefficients`, `resolution`) are read too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import yaml

from vo.datasets.base import SourceError, warn
from vo.types import Camera


# ----------------------------------------------------------------------------- YAML reading

class _OpenCVLoader(yaml.SafeLoader):
    """SafeLoader that also understands OpenCV's `!!opencv-matrix` nodes."""


def _construct_opencv_matrix(loader: yaml.SafeLoader, node: yaml.Node) -> np.ndarray:
    fields = loader.construct_mapping(node, deep=True)
    return np.asarray(fields["data"], dtype=np.float64).reshape(int(fields["rows"]), int(fields["cols"]))


_OpenCVLoader.add_constructor("tag:yaml.org,2002:opencv-matrix", _construct_opencv_matrix)


def read_opencv_yaml(path: str | Path) -> dict:
    """A YAML mapping, accepting OpenCV's `%YAML:1.0` header (which PyYAML rejects)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: missing calibration file")
    text = path.read_text(errors="replace")
    if text.startswith("%YAML:"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    try:
        data = yaml.load(text, Loader=_OpenCVLoader)
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise SourceError(f"{path}: not valid YAML ({first_line})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a YAML mapping of calibration values")
    return data


def as_matrix(value, rows: int, cols: int, path: Path | str, key: str) -> np.ndarray:
    """A matrix from `!!opencv-matrix`, a {rows, cols, data} mapping (EuRoC T_BS) or a flat list."""
    if isinstance(value, dict):
        value = value.get("data")
    try:
        matrix = np.asarray(value, dtype=np.float64).reshape(rows, cols)
    except (TypeError, ValueError):
        raise SourceError(f"{path}: '{key}' is not a {rows}x{cols} matrix") from None
    return matrix


# ----------------------------------------------------------------------------- calibration

@dataclass
class Calibration:
    """Intrinsics as read from a file; width/height are only known when the file states them."""
    fx: float
    fy: float
    cx: float
    cy: float
    dist: np.ndarray | None = None
    baseline: float | None = None
    width: int | None = None
    height: int | None = None
    path: str = ""   # where it came from, for error messages

    def to_camera(self, width: int, height: int) -> Camera:
        """The camera for images of this size; raises SourceError when the calibration does not fit."""
        check_calibration_fits(self, width, height)
        return Camera(self.fx, self.fy, self.cx, self.cy, width, height, self.dist, self.baseline)


def check_calibration_fits(calib: Calibration, width: int, height: int) -> None:
    where = calib.path or "calibration"
    if calib.width is not None and (calib.width, calib.height) != (width, height):
        raise SourceError(f"{where}: calibration is for {calib.width}x{calib.height} images "
                          f"but the images are {width}x{height}")
    if not (0 < calib.cx < width and 0 < calib.cy < height):
        raise SourceError(f"{where}: principal point ({calib.cx:g}, {calib.cy:g}) lies outside "
                          f"the {width}x{height} images; calibration size does not match")
    # A principal point far off-centre usually means the calibration belongs to another resolution.
    if abs(calib.cx - width / 2) > width / 4 or abs(calib.cy - height / 2) > height / 4:
        warn(f"{where}: principal point ({calib.cx:g}, {calib.cy:g}) is far from the centre "
             f"of the {width}x{height} images; is the calibration for this resolution?")


def _flatten_keys(data: dict) -> dict:
    """'Camera.fx' and 'Camera1.fx' (ORB-SLAM) become 'fx'; keys are lower-cased."""
    return {str(key).split(".")[-1].lower(): value for key, value in data.items()}


def _number(values: dict, key: str, path: Path) -> float:
    if key not in values:
        raise SourceError(f"{path}: missing '{key}'")
    try:
        number = float(values[key])
    except (TypeError, ValueError):
        raise SourceError(f"{path}: '{key}' is not a number") from None
    if not np.isfinite(number):
        raise SourceError(f"{path}: '{key}' is not finite")
    return number


def _distortion(values: dict, path: Path) -> np.ndarray | None:
    coeffs = values.get("distortion", values.get("dist", values.get("distortion_coefficients")))
    if coeffs is None and "k1" in values:
        names = ["k1", "k2", "p1", "p2"] + (["k3"] if "k3" in values else [])
        coeffs = [_number(values, name, path) for name in names]
    if coeffs is None:
        return None
    if isinstance(coeffs, dict) or isinstance(coeffs, np.ndarray):
        coeffs = as_matrix(coeffs, 1, -1, path, "distortion").ravel()
    try:
        coeffs = np.asarray(coeffs, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise SourceError(f"{path}: 'distortion' must be a list of numbers") from None
    if coeffs.size not in (4, 5, 8):
        raise SourceError(f"{path}: 'distortion' needs 4 or 5 numbers (k1 k2 p1 p2 [k3]), got {coeffs.size}")
    return None if not np.any(coeffs) else coeffs


def calibration_from_mapping(data: dict, path: Path) -> Calibration:
    values = _flatten_keys(data)
    if "intrinsics" in values and "fx" not in values:   # EuRoC sensor.yaml: [fu, fv, cu, cv]
        intrinsics = as_matrix(values["intrinsics"], 1, 4, path, "intrinsics").ravel()
        values.update(zip(("fx", "fy", "cx", "cy"), intrinsics))
    if "resolution" in values and "width" not in values:
        values["width"], values["height"] = as_matrix(values["resolution"], 1, 2, path, "resolution").ravel()
    fx, fy, cx, cy = (_number(values, key, path) for key in ("fx", "fy", "cx", "cy"))
    if fx <= 0 or fy <= 0:
        raise SourceError(f"{path}: focal lengths must be positive")
    baseline = _number(values, "baseline", path) if "baseline" in values else None
    if baseline is None and "bf" in values:            # ORB-SLAM stores baseline times fx
        baseline = _number(values, "bf", path) / fx
    has_size = "width" in values and "height" in values
    width, height = (int(_number(values, key, path)) for key in ("width", "height")) if has_size else (None, None)
    return Calibration(fx, fy, cx, cy, _distortion(values, path), baseline, width, height, str(path))


def load_calibration(path: str | Path) -> Calibration:
    """Read a `--calib` YAML file (plain YAML or OpenCV `%YAML:1.0`)."""
    path = Path(path)
    return calibration_from_mapping(read_opencv_yaml(path), path)


DEFAULT_FIELD_OF_VIEW_DEG = 60.0   # horizontal; a typical webcam


def default_calibration(width: int, height: int, what: str) -> Calibration:
    """A guess for uncalibrated images: a 60-degree horizontal field of view, centred, no distortion."""
    focal = (width / 2) / np.tan(np.radians(DEFAULT_FIELD_OF_VIEW_DEG / 2))
    warn(f"{what}: no calibration given (--calib); assuming a {DEFAULT_FIELD_OF_VIEW_DEG:g}-degree field of view "
         f"(fx = fy = {focal:.1f}); run `python -m vo.calibrate` for a real one")
    return Calibration(focal, focal, width / 2, height / 2, width=width, height=height, path=what)


# ----------------------------------------------------------------------------- undistortion

@dataclass
class Undistorter:
    """Remaps images of a distorted camera to the same pinhole K without distortion."""
    camera: Camera          # the undistorted camera (dist None)
    map_x: np.ndarray
    map_y: np.ndarray

    @classmethod
    def for_camera(cls, camera: Camera) -> "Undistorter | None":
        """None when there is nothing to undo."""
        if camera.dist is None or not np.any(camera.dist):
            return None
        # Same K before and after: published TUM/ORB-SLAM setups keep the intrinsics unchanged.
        map_x, map_y = cv2.initUndistortRectifyMap(camera.K, camera.dist, None, camera.K,
                                                   (camera.width, camera.height), cv2.CV_32FC1)
        return cls(replace(camera, dist=None), map_x, map_y)

    def __call__(self, image: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        return cv2.remap(image, self.map_x, self.map_y, interpolation)


@dataclass
class StereoRectification:
    """Rectified stereo pair from two calibrated cameras (cv2.stereoRectify, zero disparity)."""
    camera: Camera              # rectified left camera, dist None, baseline set
    rotation_left: np.ndarray   # R1: x_rectified = R1 @ x_left (camera frames)
    left_maps: tuple[np.ndarray, np.ndarray]
    right_maps: tuple[np.ndarray, np.ndarray]

    @property
    def left_from_rectified(self) -> np.ndarray:
        """4x4 pose of the rectified left camera in the original left camera frame."""
        pose = np.eye(4)
        pose[:3, :3] = self.rotation_left.T
        return pose

    def left(self, image: np.ndarray) -> np.ndarray:
        return cv2.remap(image, *self.left_maps, cv2.INTER_LINEAR)

    def right(self, image: np.ndarray) -> np.ndarray:
        return cv2.remap(image, *self.right_maps, cv2.INTER_LINEAR)


def _zeros_if_none(dist: np.ndarray | None) -> np.ndarray:
    return np.zeros(5) if dist is None else dist


def stereo_rectify(left: Camera, right: Camera, right_from_left: np.ndarray) -> StereoRectification:
    """`right_from_left` maps points from the left camera frame to the right one (4x4)."""
    size = (left.width, left.height)
    dist_l, dist_r = _zeros_if_none(left.dist), _zeros_if_none(right.dist)
    # alpha=0 keeps only valid pixels, as ORB-SLAM's EuRoC stereo settings do.
    r1, r2, p1, p2, _, _, _ = cv2.stereoRectify(
        left.K, dist_l, right.K, dist_r, size, right_from_left[:3, :3], right_from_left[:3, 3:4].copy(),
        flags=cv2.CALIB_ZERO_DISPARITY, alpha=0)
    left_maps = cv2.initUndistortRectifyMap(left.K, dist_l, r1, p1[:3, :3], size, cv2.CV_32FC1)
    right_maps = cv2.initUndistortRectifyMap(right.K, dist_r, r2, p2[:3, :3], size, cv2.CV_32FC1)
    baseline = -p2[0, 3] / p2[0, 0]
    camera = Camera(p1[0, 0], p1[1, 1], p1[0, 2], p1[1, 2], left.width, left.height, None, float(baseline))
    return StereoRectification(camera, r1, left_maps, right_maps)

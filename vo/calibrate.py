"""Calibrate a camera from a checkerboard and write the YAML that `--calib` reads.

    python -m vo.calibrate SOURCE --board 9x6 --square 0.025 --out calib.yaml [--frames 20]

SOURCE is a camera index (0), a video file or a folder of images. ``--board`` counts the
board's inner corners (columns x rows, OpenCV's convention: a board of 10x7 squares has
9x6 inner corners); ``--square`` is the side of one square in metres. From a file or
folder, the board is searched in frames spread over the whole recording and ``--frames``
of the detections, evenly spread in time, are used; from a camera, a view is taken at
most every ``--interval`` seconds until ``--frames`` are collected (Ctrl-C stops early).

Problems with the input print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

EXIT_BAD_INPUT = 2
MIN_VIEWS = 6              # fewer views leave focal length and distortion poorly constrained
SCAN_OVERSAMPLING = 4      # frames searched per wanted view, so failed detections can be spared
DETECTION_MAX_SIDE = 1280  # the board is found on a downscaled copy (fast), refined at full size
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")


class CalibrationError(Exception):
    """Unusable input or too few views; the message is one line."""


@dataclass(frozen=True)
class Board:
    columns: int      # inner corners per row
    rows: int         # inner corners per column
    square: float     # metres

    @property
    def pattern(self) -> tuple[int, int]:
        return self.columns, self.rows

    def object_points(self) -> np.ndarray:
        """(columns*rows, 3) corner positions on the board plane z=0, in OpenCV's detection order."""
        grid = np.mgrid[0:self.columns, 0:self.rows].T.reshape(-1, 2)
        return np.hstack([grid * self.square, np.zeros((len(grid), 1))]).astype(np.float32)


@dataclass
class View:
    """One frame with the board found in it."""
    index: int
    corners: np.ndarray   # (N,1,2) float32 pixels


@dataclass
class CameraCalibration:
    camera_matrix: np.ndarray
    distortion: np.ndarray     # k1 k2 p1 p2 k3
    width: int
    height: int
    rms: float                 # pixels
    views_used: list[int]      # frame indices


# ----------------------------------------------------------------------------- frames

@dataclass
class FrameScan:
    """Frames to search for the board: ``frames`` yields (index, image); ``total`` for progress."""
    frames: Iterator[tuple[int, np.ndarray]]
    total: int | None
    live: bool          # a camera: views are collected until enough are found


def open_scan(spec: str, wanted: int, interval: float) -> FrameScan:
    path = Path(spec)
    if path.is_dir():
        return folder_scan(path, wanted)
    if path.is_file():
        return video_scan(path, wanted)
    if spec.isdigit():
        return camera_scan(int(spec), interval)
    raise CalibrationError(f"{spec}: no such video, image folder or camera index")


@contextmanager
def quiet_opencv():
    """Silence OpenCV's log while probing a source: a failed open prints pages of backend
    warnings, and our one-line error says it better."""
    logging = getattr(cv2, "utils", None) and getattr(cv2.utils, "logging", None)
    if logging is None:
        yield
        return
    previous = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging.setLogLevel(previous)


def spread_indices(count: int, wanted: int) -> np.ndarray:
    """At most ``wanted`` indices evenly spread over ``range(count)``."""
    return np.unique(np.linspace(0, count - 1, min(wanted, count)).round().astype(np.int64))


def folder_scan(folder: Path, wanted: int) -> FrameScan:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CalibrationError(f"{folder}: no images in the folder")
    chosen = spread_indices(len(files), wanted * SCAN_OVERSAMPLING)

    def frames():
        for i in chosen:
            image = cv2.imread(str(files[i]), cv2.IMREAD_GRAYSCALE)
            if image is not None:   # an unreadable file is just one view less
                yield int(i), image
    return FrameScan(frames(), len(chosen), live=False)


def video_scan(path: Path, wanted: int) -> FrameScan:
    with quiet_opencv():
        capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise CalibrationError(f"{path}: cannot open video (unknown codec or not a video)")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    chosen = set(spread_indices(count, wanted * SCAN_OVERSAMPLING).tolist()) if count > 0 else None
    last = max(chosen) if chosen else np.inf

    def frames():
        # Decode sequentially and skip with grab(): seeking is unreliable in many containers.
        index = 0
        try:
            while index <= last:
                if chosen is not None and index not in chosen:
                    if not capture.grab():
                        return
                else:
                    ok, image = capture.read()
                    if not ok:
                        return
                    yield index, to_gray(image)
                index += 1
        finally:
            capture.release()
    return FrameScan(frames(), len(chosen) if chosen is not None else None, live=False)


def camera_scan(camera_index: int, interval: float) -> FrameScan:
    with quiet_opencv():
        capture = cv2.VideoCapture(camera_index)
    if not capture.isOpened():
        raise CalibrationError(f"camera {camera_index}: cannot open camera")

    def frames():
        last_taken, index = -np.inf, 0
        try:
            while True:
                ok, image = capture.read()
                if not ok:
                    raise CalibrationError(f"camera {camera_index}: no frame could be read")
                now = time.monotonic()
                if now - last_taken >= interval:
                    last_taken = now
                    yield index, to_gray(image)
                index += 1
        finally:
            capture.release()
    return FrameScan(frames(), None, live=True)


def to_gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image


# ----------------------------------------------------------------------------- detection

def detect_board(gray: np.ndarray, board: Board) -> np.ndarray | None:
    """Sub-pixel inner corners (N,1,2) of the board, or None when it is not (fully) visible."""
    scale = min(1.0, DETECTION_MAX_SIDE / max(gray.shape))
    small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
    flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE | cv2.CALIB_CB_FAST_CHECK
    found, corners = cv2.findChessboardCorners(small, board.pattern, flags=flags)
    if not found:
        return None
    corners = (corners / scale).astype(np.float32)
    # The refinement window must stay inside one square, or it locks onto the wrong corner.
    grid = corners.reshape(board.rows, board.columns, 2)
    spacing = min(np.linalg.norm(np.diff(grid, axis=1), axis=2).min(),
                  np.linalg.norm(np.diff(grid, axis=0), axis=2).min())
    half_window = int(np.clip(spacing * 0.4, 2, 11))
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.01)
    return cv2.cornerSubPix(gray, corners, (half_window, half_window), (-1, -1), criteria)


def collect_views(scan: FrameScan, board: Board, wanted: int) -> tuple[list[View], tuple[int, int] | None]:
    """Views with a detected board and the image size (width, height)."""
    views, size = [], None
    progress = tqdm(total=wanted if scan.live else scan.total, unit="view" if scan.live else "frame",
                    desc="collecting views" if scan.live else "searching board", disable=None)
    try:
        for index, gray in scan.frames:
            if size is None:
                size = (gray.shape[1], gray.shape[0])
            elif (gray.shape[1], gray.shape[0]) != size:
                continue   # another resolution cannot share one calibration
            corners = detect_board(gray, board)
            if corners is not None:
                views.append(View(index, corners))
            # Live, progress counts views found; otherwise frames searched.
            progress.update(int(corners is not None) if scan.live else 1)
            progress.set_postfix(found=len(views))
            if scan.live and len(views) >= wanted:
                break
    except KeyboardInterrupt:
        if not scan.live:
            raise
        # From a camera, Ctrl-C means "enough": calibrate with the views so far.
    finally:
        progress.close()
    return views, size


def spread_views(views: list[View], wanted: int) -> list[View]:
    """``wanted`` views evenly spread in time: neighbouring frames add little new geometry."""
    return [views[i] for i in spread_indices(len(views), wanted)]


# ----------------------------------------------------------------------------- calibration

def calibrate_views(views: list[View], board: Board, size: tuple[int, int], fix_k3: bool) -> CameraCalibration:
    """OpenCV calibration; views far worse than the rest (blur, a wrong detection) are dropped once."""
    result, per_view = run_opencv_calibration(views, board, size, fix_k3)
    limit = max(3.0 * float(np.median(per_view)), 1.0)
    kept = [view for view, error in zip(views, per_view) if error <= limit]
    if MIN_VIEWS <= len(kept) < len(views):
        result, _ = run_opencv_calibration(kept, board, size, fix_k3)
        views = kept
    rms, camera_matrix, distortion = result
    return CameraCalibration(camera_matrix, distortion, size[0], size[1], rms, [v.index for v in views])


def run_opencv_calibration(views: list[View], board: Board, size: tuple[int, int], fix_k3: bool):
    # k3 is left at 0 by default: ordinary lenses barely need it and with ~20 views it
    # mostly fits noise, which then extrapolates badly towards the image corners.
    flags = cv2.CALIB_FIX_K3 if fix_k3 else 0
    object_points = [board.object_points() for _ in views]
    image_points = [view.corners for view in views]
    rms, camera_matrix, distortion, _, _, _, _, per_view = cv2.calibrateCameraExtended(
        object_points, image_points, size, None, None, flags=flags)
    distortion = np.zeros(5) if distortion is None else np.append(distortion.ravel(), np.zeros(5))[:5]
    return (float(rms), camera_matrix, distortion), per_view.ravel()


# ----------------------------------------------------------------------------- output

def calibration_yaml(calib: CameraCalibration, board: Board, source: str) -> str:
    """The `--calib` file: plain YAML, read back by vo.datasets.calib.load_calibration."""
    K, d = calib.camera_matrix, calib.distortion
    return "\n".join([
        f"# Calibrated by python -m vo.calibrate from {source}",
        f"# board {board.columns}x{board.rows} inner corners, {board.square:g} m squares, "
        f"{len(calib.views_used)} views",
        f"fx: {K[0, 0]:.6f}",
        f"fy: {K[1, 1]:.6f}",
        f"cx: {K[0, 2]:.6f}",
        f"cy: {K[1, 2]:.6f}",
        "distortion: [" + ", ".join(f"{v:.9g}" for v in d) + "]   # k1 k2 p1 p2 k3",
        f"width: {calib.width}",
        f"height: {calib.height}",
        f"rms: {calib.rms:.6f}   # reprojection error, pixels",
        "",
    ])


def parse_board(text: str) -> tuple[int, int]:
    try:
        columns, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COLUMNSxROWS inner corners, e.g. 9x6, got {text!r}") from None
    if columns < 2 or rows < 2:
        raise argparse.ArgumentTypeError(f"a board needs at least 2x2 inner corners, got {text!r}")
    return columns, rows


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vo.calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="camera index, video file or image folder")
    parser.add_argument("--board", type=parse_board, default=(9, 6),
                        help="inner corners COLUMNSxROWS (default 9x6)")
    parser.add_argument("--square", type=positive_float, default=0.025, help="square side in metres (default 0.025)")
    parser.add_argument("--out", default="calib.yaml", help="output YAML (default calib.yaml)")
    parser.add_argument("--frames", type=int, default=20, help="views to calibrate with (default 20)")
    parser.add_argument("--interval", type=positive_float, default=0.7,
                        help="camera only: seconds between views (default 0.7)")
    parser.add_argument("--k3", action="store_true", help="also estimate k3 (wide-angle lenses)")
    args = parser.parse_args(argv)
    if args.frames < MIN_VIEWS:
        parser.error(f"--frames must be at least {MIN_VIEWS}")
    return args


def run(args: argparse.Namespace) -> CameraCalibration:
    board = Board(*args.board, args.square)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CalibrationError(f"{out}: folder {out.parent} does not exist")
    scan = open_scan(str(args.source), args.frames, args.interval)
    views, size = collect_views(scan, board, args.frames)
    if size is None:
        raise CalibrationError(f"{args.source}: no frame could be read")
    if len(views) < MIN_VIEWS:
        raise CalibrationError(f"{args.source}: board {board.columns}x{board.rows} found in only {len(views)} "
                               f"frame(s), need at least {MIN_VIEWS}; check --board (inner corners) and the lighting")
    calib = calibrate_views(spread_views(views, args.frames), board, size, fix_k3=not args.k3)
    try:
        out.write_text(calibration_yaml(calib, board, str(args.source)))
    except OSError as exc:
        raise CalibrationError(f"{out}: cannot write ({exc.strerror})") from None
    return calib


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        calib = run(args)
    except CalibrationError as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("calibrate: interrupted", file=sys.stderr)
        return 130
    K = calib.camera_matrix
    print(f"{args.out}: fx {K[0, 0]:.2f} fy {K[1, 1]:.2f} cx {K[0, 2]:.2f} cy {K[1, 2]:.2f}, "
          f"{calib.width}x{calib.height}, {len(calib.views_used)} views, RMS {calib.rms:.3f} px")
    if calib.rms > 1.0:
        print("calibrate: RMS above 1 px; blurred views or a board that is not flat?", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

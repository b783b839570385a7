"""Video files and webcams, both read through cv2.VideoCapture (a webcam is VideoCapture(int)).

Video stamps are the container's presentation times (CAP_PROP_POS_MSEC), falling back to
index / fps; webcam stamps are seconds since the source was opened (monotonic clock).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from vo.datasets.base import Source, SourceError, image_size, require_file, warn
from vo.datasets.calib import Undistorter, default_calibration, load_calibration
from vo.types import Frame

MAX_WEBCAM_FAILURES = 10   # consecutive failed grabs before a webcam stream counts as ended


def open_capture(spec: str | int) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(spec)
    if not capture.isOpened():
        what = f"webcam {spec}" if isinstance(spec, int) else str(spec)
        problem = "cannot open camera" if isinstance(spec, int) else "cannot open video (unknown codec or not a video)"
        raise SourceError(f"{what}: {problem}")
    return capture


def read_first(capture: cv2.VideoCapture, what: str) -> np.ndarray:
    ok, image = capture.read()
    if not ok or image is None:
        raise SourceError(f"{what}: no frame could be read")
    return image


class VideoSource(Source):
    """A video file (kind 'video') or a webcam index (kind 'webcam')."""

    def __init__(self, spec: str | Path | int, calib: str | Path | None = None):
        self.spec = spec if isinstance(spec, int) else str(require_file(Path(spec), "video file"))
        self.kind = "webcam" if isinstance(spec, int) else "video"
        what = f"webcam {spec}" if self.kind == "webcam" else self.spec
        capture = open_capture(self.spec)
        first = read_first(capture, what)
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        width, height = image_size(first)
        calibration = load_calibration(calib) if calib is not None else default_calibration(width, height, what)
        camera = calibration.to_camera(width, height)
        self.undistort = Undistorter.for_camera(camera)
        camera = self.undistort.camera if self.undistort else camera
        if self.kind == "webcam":   # reopening a webcam is slow: keep it and its first frame
            self._capture, self._pending, self._clock_start = capture, first, time.monotonic()
            count = None
        else:
            capture.release()
            self._capture = None
        name = f"webcam{spec}" if self.kind == "webcam" else Path(self.spec).stem
        super().__init__(name, camera, ("mono",), None, count if count and count > 0 else None)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return self.undistort(image) if self.undistort else image

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        # A video decodes every frame on the way anyway; StartAt drops the early ones.
        yield from (self._webcam_frames() if self.kind == "webcam" else self._file_frames())

    def _file_frames(self) -> Iterator[Frame]:
        capture = open_capture(self.spec)
        try:
            index, last_stamp = 0, -np.inf
            while True:
                ok, image = capture.read()
                if not ok:
                    break
                stamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                if stamp <= last_stamp:   # backend without timestamps: fall back to the nominal rate
                    stamp = index / self.fps
                last_stamp = stamp
                yield Frame(index, stamp, self._prepare(image), path=self.spec)
                index += 1
            if self.num_frames and index < self.num_frames:
                warn(f"{self.spec}: stream ended after {index} of {self.num_frames} frames")
        finally:
            capture.release()

    def _webcam_frames(self) -> Iterator[Frame]:
        if self._capture is None:
            raise SourceError(f"webcam {self.spec}: closed")
        index, failures = 0, 0
        while failures < MAX_WEBCAM_FAILURES:
            image, self._pending = (self._pending, None) if self._pending is not None else (None, None)
            if image is None:
                ok, image = self._capture.read()
                if not ok or image is None:
                    failures += 1
                    warn(f"webcam {self.spec}: frame grab failed, skipped")
                    continue
            failures = 0
            yield Frame(index, time.monotonic() - self._clock_start, self._prepare(image), path=f"webcam:{self.spec}")
            index += 1

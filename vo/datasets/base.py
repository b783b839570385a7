"""What every source shares: the error type, the `Source` interface and small helpers."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from vo.types import Camera, Frame

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp"})


class SourceError(Exception):
    """Input that cannot be used: the message is one line naming the file and the problem."""


class SourceWarning(UserWarning):
    """Recoverable input problem (e.g. one unreadable frame, which is skipped)."""


def warn(message: str) -> None:
    warnings.warn(message, SourceWarning, stacklevel=3)


def require_file(path: Path, what: str = "file") -> Path:
    if not path.is_file():
        raise SourceError(f"{path}: missing {what}")
    return path


def require_dir(path: Path, what: str = "folder") -> Path:
    if not path.is_dir():
        raise SourceError(f"{path}: missing {what}")
    return path


def check_stamps(stamps: np.ndarray, path: Path | str) -> None:
    """Stamps must strictly increase: duplicates or disorder mean a broken index file."""
    steps = np.diff(stamps)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        k = int(bad[0]) + 1
        problem = "duplicate" if steps[bad[0]] == 0 else "unsorted"
        raise SourceError(f"{path}: {problem} stamp {stamps[k]} at entry {k}")
    if not np.all(np.isfinite(stamps)):
        raise SourceError(f"{path}: non-finite stamp")


def read_stamp_file(path: Path) -> np.ndarray:
    """One stamp (seconds) per line, as KITTI's times.txt; must strictly increase."""
    stamps = []
    for line_no, line in enumerate(require_file(path).read_text().splitlines(), 1):
        field = line.split("#", 1)[0].strip()
        if not field:
            continue
        try:
            stamps.append(float(field))
        except ValueError:
            raise SourceError(f"{path}: line {line_no} is not a stamp") from None
    if not stamps:
        raise SourceError(f"{path}: holds no stamps")
    stamps = np.array(stamps)
    check_stamps(stamps, path)
    return stamps


def read_image(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """The image, or None (and a warning) when the file is missing or unreadable."""
    image = cv2.imread(str(path), flags) if path.is_file() else None
    if image is None:
        warn(f"{path}: missing or unreadable frame, skipped")
    return image


def read_sized_image(path: Path, flags: int, size: tuple[int, int]) -> np.ndarray | None:
    """The image if it loads and has the sequence's (width, height); else None and a warning."""
    image = read_image(path, flags)
    if image is not None and image_size(image) != size:
        warn(f"{path}: {image.shape[1]}x{image.shape[0]} instead of {size[0]}x{size[1]}, frame skipped")
        return None
    return image


def read_gray_pair(left_path: Path, right_path: Path | None, stereo: bool, size: tuple[int, int]):
    """(left, right) gray images of one frame, right None unless ``stereo``; None when a needed one fails."""
    left = read_sized_image(left_path, cv2.IMREAD_GRAYSCALE, size)
    if left is None or not stereo:
        return None if left is None else (left, None)
    right = read_sized_image(right_path, cv2.IMREAD_GRAYSCALE, size)
    return None if right is None else (left, right)


def gray(image: np.ndarray) -> np.ndarray:
    """BGR (as OpenCV reads) or gray -> gray, as the extractors get every frame."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def as_uint8_image(image: np.ndarray) -> np.ndarray:
    """Gray stays gray, colour becomes BGR, 16-bit is scaled to 8-bit: what the tracker expects."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image


def image_size(image: np.ndarray) -> tuple[int, int]:
    """(width, height), the order cameras and OpenCV use."""
    return int(image.shape[1]), int(image.shape[0])


def first_image_size(paths: list[Path], what: str, tries: int = 10) -> tuple[int, int]:
    """Size of the first readable image; a sequence whose start is all broken is unusable."""
    for path in paths[:tries]:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None
        if image is not None:
            return image_size(image)
    where = paths[0].parent if paths else what
    raise SourceError(f"{where}: none of the first {min(tries, len(paths))} {what} images is readable")


def natural_key(name: str) -> list:
    """Sort key putting frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class Source:
    """A sequence of frames with its camera; subclasses implement `_frames(mode, first)`.

    Attributes: name, kind, camera (the camera of the images *as yielded*, i.e. undistorted /
    rectified), modes (richest first), mode (default for `frames()`), ground_truth (None or
    (stamps (N,), camera-to-world poses (N, 4, 4)) of the left / colour camera at frame stamps).
    """

    kind = ""

    def __init__(self, name: str, camera: Camera, modes: tuple[str, ...],
                 ground_truth: tuple[np.ndarray, np.ndarray] | None = None,
                 num_frames: int | None = None):
        self.name = name
        self.camera = camera
        self.modes = modes
        self.mode = modes[0]
        self.ground_truth = ground_truth
        self.num_frames = num_frames

    def frame_count(self, mode: str | None = None) -> int | None:
        """Number of frames `frames(mode)` would yield at most; None when unknown (webcam)."""
        return self.num_frames

    def __len__(self) -> int:
        count = self.frame_count(self.mode)
        if count is None:
            raise TypeError(f"{self.kind} source {self.name} has no known length")
        return count

    def __repr__(self) -> str:
        n = self.frame_count(self.mode)
        n = "?" if n is None else n
        cam = self.camera
        base = f", baseline {cam.baseline:.4f} m" if cam.baseline else ""
        return (f"<{self.kind} source {self.name!r}: {n} frames, modes {'/'.join(self.modes)}, "
                f"{cam.width}x{cam.height}, fx {cam.fx:.1f}{base}>")

    def check_mode(self, mode: str | None) -> str:
        mode = mode or self.mode
        if mode not in self.modes:
            raise SourceError(f"{self.name}: mode {mode!r} not available (offers {', '.join(self.modes)})")
        return mode

    def frames(self, mode: str | None = None, max_frames: int | None = None) -> Iterator[Frame]:
        """Frames in order; unreadable ones are skipped with a warning."""
        mode = self.check_mode(mode)
        generator = self._frames(mode)
        try:
            for count, frame in enumerate(generator):
                if max_frames is not None and count >= max_frames:
                    return
                yield frame
        finally:
            generator.close()  # releases video captures promptly

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        """Frames from index ``first`` on; file sources skip the earlier ones unread."""
        raise NotImplementedError

    def close(self) -> None:
        """Release devices; file-based sources hold nothing open."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StartAt(Source):
    """``source`` from its frame ``first`` on (pySLAM's start_frame_id): the same sequence
    with another start, so another initialisation."""

    def __init__(self, source: Source, first: int):
        super().__init__(source.name, source.camera, source.modes, source.ground_truth)
        self.kind, self.mode, self.source, self.first = source.kind, source.mode, source, first

    def frame_count(self, mode: str | None = None) -> int | None:
        count = self.source.frame_count(mode)
        return None if count is None else max(count - self.first, 0)

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        start = max(self.first, first)   # indices stay the sequence's; a live source cannot skip unread
        return (frame for frame in self.source._frames(mode, start) if frame.index >= start)

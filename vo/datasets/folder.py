"""A folder of images, taken in natural name order (frame2 before frame10).

Stamps are the frame index unless a `times.txt` (one stamp per image) lies in the folder,
or beside it (as KITTI's image_0/ with ../times.txt). Other files are skipped with one warning.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from vo.datasets.base import (IMAGE_EXTENSIONS, Source, SourceError, as_uint8_image, first_image_size,
                              natural_key, read_sized_image, read_stamp_file, require_dir, warn)
from vo.datasets.calib import Undistorter, default_calibration, load_calibration
from vo.types import Frame

COMPANION_FILES = frozenset({"times.txt", "calib.yaml", "calib.txt"})   # expected beside the images


def list_images(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and p.name not in COMPANION_FILES]
    if not images:
        raise SourceError(f"{folder}: no images (empty folder or no {'/'.join(sorted(IMAGE_EXTENSIONS))} files)")
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        warn(f"{folder}: skipped {len(others)} non-image file(s): {shown}")
    return images


def find_times(folder: Path) -> Path | None:
    for candidate in (folder / "times.txt", folder.parent / "times.txt"):
        if candidate.is_file():
            return candidate
    return None


def read_folder_stamps(folder: Path, count: int) -> np.ndarray:
    times_path = find_times(folder)
    if times_path is None:
        return np.arange(count, dtype=np.float64)
    stamps = read_stamp_file(times_path)
    if len(stamps) != count:
        raise SourceError(f"{times_path}: {len(stamps)} stamps for {count} images in {folder}")
    return stamps


class FolderSource(Source):
    kind = "folder"

    def __init__(self, folder: str | Path, calib: str | Path | None = None):
        folder = require_dir(Path(folder))
        self.paths = list_images(folder)
        self.stamps = read_folder_stamps(folder, len(self.paths))
        width, height = first_image_size(self.paths, "")
        calibration = load_calibration(calib) if calib is not None else default_calibration(width, height, str(folder))
        camera = calibration.to_camera(width, height)
        self.undistort = Undistorter.for_camera(camera)
        camera = self.undistort.camera if self.undistort else camera
        super().__init__(folder.name, camera, ("mono",), None, len(self.paths))

    def _frames(self, mode: str, first: int = 0) -> Iterator[Frame]:
        size = (self.camera.width, self.camera.height)
        for index, (stamp, path) in islice(enumerate(zip(self.stamps, self.paths)), first, None):
            image = read_sized_image(path, cv2.IMREAD_UNCHANGED, size)
            if image is None:
                continue
            image = as_uint8_image(image)
            if self.undistort is not None:
                image = self.undistort(image)
            yield Frame(index, float(stamp), image, path=str(path))

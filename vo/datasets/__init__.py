"""Frame sources: KITTI, TUM RGB-D, EuRoC, image folders, video files and webcams.

    source = open_source("/data/kitti/sequences/06")          # kind detected from the path
    for frame in source.frames("stereo", max_frames=100):
        ...

Every source has `.name`, `.kind`, `.camera` (of the images as yielded: undistorted /
rectified), `.modes` (richest first), `.mode`, `.ground_truth` (None or (stamps, camera-to-world
poses) of the left / colour camera at frame stamps), `len()` where known, and
`frames(mode=None, max_frames=None)`. Unusable input raises SourceError with a one-line message.
"""
from __future__ import annotations

from pathlib import Path

from vo.datasets.base import IMAGE_EXTENSIONS, Source, SourceError, SourceWarning, StartAt
from vo.datasets.euroc import EurocSource
from vo.datasets.folder import FolderSource
from vo.datasets.kitti import KittiSource
from vo.datasets.tum import TumSource
from vo.datasets.video import VideoSource

KINDS = ("kitti", "tum", "euroc", "folder", "video", "webcam")

__all__ = ["open_source", "detect_kind", "Source", "SourceError", "SourceWarning", "KINDS",
           "KittiSource", "TumSource", "EurocSource", "FolderSource", "VideoSource", "StartAt"]


def detect_kind(spec: str) -> str:
    """Which source a path (or webcam index) is, by what the folder holds."""
    if spec.strip().isdigit():
        return "webcam"
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{spec}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise SourceError(f"{spec}: a single image; pass the folder holding the sequence")
        return "video"
    if (path / "image_0").is_dir():
        return "kitti"
    if (path / "rgb.txt").is_file():
        return "tum"
    if (path / "mav0").is_dir() or (path / "cam0" / "data.csv").is_file():
        return "euroc"
    return "folder"


def open_source(spec: str, calib: str | None = None, mode: str | None = None) -> Source:
    """Open a sequence; `calib` is a --calib YAML overriding the intrinsics; `mode` (e.g. 'mono')
    becomes the default of `frames()` and must be one the source offers."""
    spec = str(spec)
    kind = detect_kind(spec)
    if calib is not None and not Path(calib).is_file():
        raise SourceError(f"{calib}: missing calibration file")
    if kind == "webcam":
        source = VideoSource(int(spec), calib)
    else:
        opener = {"kitti": KittiSource, "tum": TumSource, "euroc": EurocSource,
                  "folder": FolderSource, "video": VideoSource}[kind]
        source = opener(spec, calib)
    if mode is not None:
        source.mode = source.check_mode(mode)
    return source

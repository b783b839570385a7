"""Real images for self-supervised training, and the held-out ones for evaluation.

Only ../shared/data is used. Kodak24 is held out for the random-homography
evaluation; HPatches and the ScanNet pairs are evaluation data and never trained on.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp"}
HELD_OUT = ("images/natural/Kodak24",)
TRAINING = (
    ("images/natural", 1),
    ("images/misc", 1),
    ("images/lightglue", 1),
    ("images/freiburg_sequence", 1),
    ("pairs/phototourism", 1),
    ("tum/rgbd_dataset_freiburg3_teddy/rgb", 10),   # every 10th frame: consecutive frames add little
    ("kitti/sequences/06/image_0", 5),
)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def training_images(data_root: str | Path) -> list[Path]:
    root = Path(data_root)
    held_out = [root / h for h in HELD_OUT]
    images = []
    for sub, stride in TRAINING:
        found = [p for p in list_images(root / sub) if not any(h in p.parents for h in held_out)]
        images += found[::stride]
    return images


def held_out_images(data_root: str | Path) -> list[Path]:
    return [p for h in HELD_OUT for p in list_images(Path(data_root) / h)]


def load_gray(path: str | Path, size_hw=(240, 320)) -> np.ndarray:
    """Grayscale, resized to cover ``size_hw`` and centre-cropped to it (no distortion of aspect)."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"{path}: cannot read image")
    h, w = size_hw
    scale = max(h / image.shape[0], w / image.shape[1])
    resized = cv2.resize(image, (max(w, round(image.shape[1] * scale)), max(h, round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    top, left = (resized.shape[0] - h) // 2, (resized.shape[1] - w) // 2
    return np.ascontiguousarray(resized[top:top + h, left:left + w])

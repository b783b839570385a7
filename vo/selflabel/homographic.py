"""Stable / unstable keypoint labels from homographic consistency, without a VO run.

    python -m vo.selflabel.homographic --images weights/checkpoints/ha_labels_r2.npz --out runs/homographic \\
        [--detector weights/superpoint_ours_v4.pth] [--warps 12] [--set stable_px=0.8 ...]

SuperPointVO's idea (label a detector's own points by how well they re-project, then train it on
those labels) with homographies as the ground truth instead of bundle adjustment: each image is
warped ``warps`` times by the training homographies (``pair_conf``) and photometric changes, the
detector runs on all copies, and each of its points in the image is scored by how far the nearest
detection of each warped copy lies from where the homography puts the point:

- stable: re-detected within 3 px in at least ``min_repeat`` of the copies that see it, and the
  median distance of those re-detections at most ``stable_px``;
- unstable: re-detected in fewer than ``max_repeat_unstable`` of the copies, or median distance at
  least ``unstable_px``;
- otherwise not stored (ignored in training).

So the labels say where the detector localises well, which plain RANSAC on its matches needs
(#4: v4's points are 1.3 px off on average, SIFT's 0.84). The output is a ``vo.selflabel`` folder
(``manifest.json`` + ``homographic.npz``, format in ``labels.py``; ``errors`` holds the median
re-detection distance), which ``python -m vo.train superpointvo --labels DIR`` trains on.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from models.superpoint import SuperPoint
from vo.config import parse_overrides
from vo.datasets.real_images import DEFAULT_DATA
from vo.datasets.synthetic_shapes import photometric_augment
from vo.eval.features import CORRECT_DIST, pairwise_distances
from vo.geometry.homography import inside_mask, pair_conf, sample_homography, warp_image, warp_points
from vo.train.common import UnknownOption, merge_conf
from vo.train.superpointvo import cover

from .labels import add_entry, load_manifest, save_labels, save_manifest

EXIT_BAD_INPUT = 2

default_conf = {
    "image_size": (240, 320),   # images are scaled (aspect kept) to cover this, as the fine-tune crops them
    "warps": 12,
    "keypoint_threshold": 0.005,
    "max_keypoints": 512,       # per image at the covering size
    "min_views": 6,             # copies that must see a point for it to get a label
    "min_repeat": 0.6,
    "stable_px": 0.8,
    "max_repeat_unstable": 0.3,
    "unstable_px": 1.6,
    "seed": 0,
}


def redetection_distances(keypoints: np.ndarray, warped_detections: list[np.ndarray],
                          homographies: list[np.ndarray], hw, border: float = 4) -> np.ndarray:
    """(N, K) distance in px from each point's warp to the nearest detection of each copy; NaN where
    the copy does not see the point (its warp falls within ``border`` of the edge)."""
    out = np.full((len(keypoints), len(homographies)), np.nan)
    for k, (H, detections) in enumerate(zip(homographies, warped_detections)):
        projected = warp_points(H, keypoints)
        seen = inside_mask(projected, hw, border)
        if not len(detections):
            out[seen, k] = np.inf
            continue
        out[seen, k] = pairwise_distances(projected[seen], detections).min(axis=1)
    return out


def label_points(distances: np.ndarray, conf: dict) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 stable, 0 unstable, -1 neither) and median re-detection distance of each point."""
    n_views = (~np.isnan(distances)).sum(1)
    hit = np.nan_to_num(distances, nan=np.inf) <= CORRECT_DIST   # re-detected: the evaluation's radius
    repeat = hit.sum(1) / np.maximum(n_views, 1)
    median = np.full(len(distances), np.inf)
    found = hit.any(1)
    median[found] = np.nanmedian(np.where(hit, distances, np.nan)[found], axis=1)
    labels = np.full(len(distances), -1, np.int8)
    enough = n_views >= conf["min_views"]
    labels[enough & ((repeat < conf["max_repeat_unstable"]) | (median >= conf["unstable_px"]))] = 0
    labels[enough & (repeat >= conf["min_repeat"]) & (median <= conf["stable_px"])] = 1
    return labels, median.astype(np.float32)


def label_image(detector: SuperPoint, image: np.ndarray, rng: np.random.Generator, conf: dict):
    """Keypoints (in ``image``'s pixels), labels and median distances of one covered image."""
    hw = image.shape
    homographies = [sample_homography(hw, rng, **pair_conf) for _ in range(conf["warps"])]
    copies = [image] + [photometric_augment(rng, warp_image(image, H)) for H in homographies]
    batch = torch.from_numpy(np.stack(copies)).float()[:, None].div_(255)
    feats = detector.extract_batch(batch)
    keypoints = feats[0]["keypoints"].numpy().astype(np.float64)
    detections = [f["keypoints"].numpy().astype(np.float64) for f in feats[1:]]
    labels, median = label_points(redetection_distances(keypoints, detections, homographies, hw), conf)
    return keypoints, labels, median


def label_images(names: list[str], data_root: Path, detector: SuperPoint, conf: dict) -> dict:
    """The label arrays (``labels.py`` format) of the images ``names`` under ``data_root``."""
    rows = {"frame_paths": [], "keypoints": [], "labels": [], "errors": []}
    offsets = [0]
    for i, name in enumerate(tqdm(names, desc="homographic labels", unit="image")):
        path = data_root / name
        original = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if original is None:
            raise FileNotFoundError(f"{path}: cannot read the image")
        image, scale = cover(original, conf["image_size"])
        kpts, labels, median = label_image(detector, image, np.random.default_rng([conf["seed"], i]), conf)
        keep = labels >= 0
        rows["frame_paths"].append(str(path))
        rows["keypoints"].append(((kpts[keep] + 0.5) / scale - 0.5).astype(np.float32))   # original pixels
        rows["labels"].append(labels[keep])
        rows["errors"].append(median[keep])
        offsets.append(offsets[-1] + int(keep.sum()))
    return {"frame_paths": np.array(rows["frame_paths"]), "frame_indices": np.arange(len(names), dtype=np.int64),
            "offsets": np.array(offsets, np.int64), "keypoints": np.concatenate(rows["keypoints"]).reshape(-1, 2),
            "labels": np.concatenate(rows["labels"]), "errors": np.concatenate(rows["errors"]),
            "image_size": np.array([-1, -1], np.int64),   # the images differ in size
            "source": np.array("homographic"), "mode": np.array("homography"),
            "images_from_paths": np.array(True)}


def image_names(path: Path) -> list[str]:
    """The image names (relative to the data folder) of a Homographic Adaptation ``labels.npz``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file")
    with np.load(path) as data:
        if "names" not in data.files:
            raise ValueError(f"{path}: not a Homographic Adaptation labels file (no 'names')")
        return [str(n) for n in data["names"]]


def run(args: argparse.Namespace) -> Path:
    conf = merge_conf(default_conf, parse_overrides(args.set or []))
    names = image_names(Path(args.images))[:args.max_images]
    detector = SuperPoint(weights=args.detector, max_keypoints=conf["max_keypoints"],
                          keypoint_threshold=conf["keypoint_threshold"])
    start = time.time()
    arrays = label_images(names, Path(args.data), detector, conf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_labels(out / "homographic.npz", arrays)
    labels = arrays["labels"]
    entry = {"name": "homographic", "source": str(args.images), "mode": "homography",
             "features": str(detector.weights), "frames": len(names), "labelled_frames": len(names),
             "stable": int((labels == 1).sum()), "unstable": int((labels == 0).sum()),
             "keypoints": int(len(labels)), "file": "homographic.npz", "seconds": round(time.time() - start, 1)}
    manifest = add_entry(load_manifest(out), entry)
    save_manifest(out, {**manifest, "config": {**manifest.get("config", {}), "homographic": conf}})
    print(f"{out}: {len(names)} images, {entry['stable']} stable and {entry['unstable']} unstable points "
          f"({entry['stable'] / max(len(names), 1):.0f} / {entry['unstable'] / max(len(names), 1):.0f} per image)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vo.selflabel.homographic", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, metavar="LABELS_NPZ",
                   help="a Homographic Adaptation labels.npz: its images are labelled")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--detector", metavar="PTH", help="default: the shipped SuperPoint")
    p.add_argument("--data", default=str(DEFAULT_DATA), metavar="DIR", help="folder the image names are under")
    p.add_argument("--max-images", type=int, metavar="N")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help=f"override {sorted(default_conf)}")
    args = p.parse_args(argv)
    try:
        run(args)
    except UnknownOption as e:
        print(f"error: --set: {e.args[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

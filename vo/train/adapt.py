"""Stage 3: Homographic Adaptation, pseudo-ground-truth keypoints for real images.

    python -m vo.train adapt --detector runs/magicpoint/magicpoint.pth --out runs/ha_labels

The detector runs on N_h warps of each image (the first is the identity); the
heatmaps are unwarped and averaged over the warps that saw each pixel. NMS and a
threshold on the average give the labels. One ``labels.npz`` collects them:
``keypoints`` (K,2) float32 x,y in the ``image_size`` (H,W) crop, ``offsets`` (N+1,) and
``names`` (N,), image paths relative to the data folder (the images are not copied).
Per-image results are kept in ``parts/`` so a stopped run resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from models.runtime import autocast, select_precision
from models.superpoint import build_net, logits_to_heatmap, refine_subpixel, select_keypoints, simple_nms
from vo.datasets.real_images import load_gray, training_images
from vo.geometry.homography import homographic_adaptation_conf, sample_homography, warp_image
from vo.train.common import merge_conf, setup_cpu

default_conf = {
    "num_homographies": 100,
    "image_size": (240, 320),
    "batch_size": 25,
    "nms_radius": 4,
    "threshold": 0.015,
    "max_keypoints": 600,
    # Refine each label to the vertex of a log-parabola on the averaged heatmap (the detector's own
    # sub-pixel step). The average over warps dithers the pixel grid, so its peak says where in
    # the pixel the point lies; stage 4 uses that with label_sigma. False: integer labels (paper).
    "subpixel": False,
    "precision": None,    # None: bf16 where the CPU has bf16 units (heatmaps averaged in fp32), else fp32
    "seed": 0,
    "max_images": None,   # a prefix of the image list, for quick runs
    "shard": [0, 1],      # [k, n]: this process labels images i with i % n == k (n processes in parallel)
    "collect_only": False,  # gather the parts labelled so far into labels.npz, label nothing
}


def sample_homographies(shape_hw, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,3,3): the identity, then n-1 random warps kept inside the image."""
    hs = [np.eye(3)] + [sample_homography(shape_hw, rng, **homographic_adaptation_conf) for _ in range(n - 1)]
    return np.stack(hs)


@torch.inference_mode()
def adapted_heatmap(net, image: np.ndarray, homographies: np.ndarray, batch_size: int,
                    precision: str = "fp32") -> np.ndarray:
    """Average of the unwarped detector heatmaps over the warps that cover each pixel."""
    h, w = image.shape
    total = np.zeros((h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    ones = np.ones((h, w), np.float32)
    for start in range(0, len(homographies), batch_size):
        hs = homographies[start:start + batch_size]
        warped = np.stack([warp_image(image, H) for H in hs])
        x = torch.from_numpy(warped).float()[:, None].div_(255).contiguous(memory_format=torch.channels_last)
        with autocast(x.device, precision):   # inference mode: the decorator
            logits = net.detect(x)
        heat = logits_to_heatmap(logits.float()).numpy()
        for H, hm in zip(hs, heat):
            H_inv = np.linalg.inv(H)
            total += cv2.warpPerspective(hm, H_inv, (w, h), flags=cv2.INTER_LINEAR)
            count += cv2.warpPerspective(ones, H_inv, (w, h), flags=cv2.INTER_NEAREST)
    return total / np.maximum(count, 1.0)


def heatmap_to_keypoints(heatmap: np.ndarray, conf: dict) -> np.ndarray:
    heat = simple_nms(torch.from_numpy(heatmap)[None], conf["nms_radius"])[0]
    kpts, _ = select_keypoints(heat, conf["threshold"], border=4, max_keypoints=conf["max_keypoints"])
    if conf["subpixel"]:
        kpts = refine_subpixel(torch.from_numpy(heatmap), kpts)
    return kpts.numpy().astype(np.float32)


def label_image(net, path: Path, index: int, conf: dict) -> tuple[np.ndarray, np.ndarray]:
    image = load_gray(path, conf["image_size"])
    rng = np.random.default_rng([conf["seed"], index])
    homographies = sample_homographies(image.shape, conf["num_homographies"], rng)
    heatmap = adapted_heatmap(net, image, homographies, conf["batch_size"], conf["precision"])
    return image, heatmap_to_keypoints(heatmap, conf)


def part_path(out_dir: Path, index: int) -> Path:
    return out_dir / "parts" / f"{index:05d}.npz"


def relative_name(path: Path, data_root: Path) -> str:
    """Labels name images relative to the data folder, so a labels file travels without them."""
    return str(Path(path).resolve().relative_to(Path(data_root).resolve()))


def collect(out_dir: Path, paths: list[Path], data_root: Path, image_size) -> Path:
    """Gather the per-image parts that exist into one ``labels.npz`` (keypoints and image names only)."""
    keypoints, names = [], []
    for i, path in enumerate(paths):
        if part_path(out_dir, i).exists():
            keypoints.append(np.load(part_path(out_dir, i))["keypoints"])
            names.append(relative_name(path, data_root))
    offsets = np.cumsum([0] + [len(k) for k in keypoints])
    target = out_dir / "labels.npz"
    np.savez_compressed(target, keypoints=np.concatenate(keypoints), offsets=offsets, names=np.array(names),
                        image_size=np.array(image_size))
    return target


def reuse_labels(out_dir: Path, paths: list[Path], data_root: Path) -> int:
    """Turn an existing ``labels.npz`` (e.g. shipped as a checkpoint) back into parts, so they are skipped."""
    labels = out_dir / "labels.npz"
    if not labels.exists():
        return 0
    data = np.load(labels)
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    known = {str(n): data["keypoints"][a:b] for n, a, b in zip(data["names"], data["offsets"][:-1], data["offsets"][1:])}
    reused = 0
    for i, path in enumerate(paths):
        name = relative_name(path, data_root)
        if name in known and not part_path(out_dir, i).exists():
            np.savez(part_path(out_dir, i), keypoints=known[name])
            reused += 1
    return reused


def run(detector: str | Path, out_dir: str | Path, data_root: str | Path, conf: dict | None = None) -> Path:
    conf = merge_conf(default_conf, conf)
    conf["precision"] = select_precision(torch.device("cpu"), conf["precision"])
    setup_cpu()
    out_dir = Path(out_dir)
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    net = build_net(detector).eval().to(memory_format=torch.channels_last)
    paths = training_images(data_root)[:conf["max_images"]]
    (out_dir / "conf.json").write_text(json.dumps({**conf, "detector": str(detector), "images": len(paths)}))
    reused = reuse_labels(out_dir, paths, Path(data_root))
    if reused:
        print(f"{reused} images already labelled in {out_dir / 'labels.npz'}")
    shard, num_shards = conf["shard"]
    mine = [i for i in range(len(paths)) if i % num_shards == shard]
    if conf["collect_only"]:
        mine = []
    counts = []
    for i in tqdm(mine, desc="homographic adaptation", unit="img"):
        part = part_path(out_dir, i)
        if part.exists():  # resume: this image is labelled already
            continue
        _, keypoints = label_image(net, paths[i], i, conf)
        np.savez(part.with_suffix(".tmp.npz"), keypoints=keypoints)
        part.with_suffix(".tmp.npz").replace(part)   # a killed run leaves no half-written part
        counts.append(len(keypoints))
    if counts:
        print(f"labelled {len(counts)} new images, {np.mean(counts):.0f} keypoints each on average")
    missing = [i for i in range(len(paths)) if not part_path(out_dir, i).exists()]
    if missing and not conf["collect_only"]:
        print(f"{len(missing)} images still to label (other shards?); run again to collect labels.npz")
        return out_dir / "parts"
    if missing:
        print(f"collecting {len(paths) - len(missing)} of {len(paths)} images; the rest are not labelled yet")
    return collect(out_dir, paths, Path(data_root), conf["image_size"])

"""Ground-truth matches for SuperGlue training, and the cached feature pairs it trains on.

GT convention (glue-factory's): for every keypoint of image 0, the index of its match in
image 1, ``UNMATCHED`` (-1) when geometry says it has none, or ``IGNORE`` (-2) when
geometry cannot tell (reprojection between ``pos_th`` and ``neg_th``, no depth, occluded
but near a keypoint). The same for image 1, and the two agree: gt0[i] = j <=> gt1[j] = i.

A match is *positive* when the two keypoints are each other's nearest neighbour under
the symmetric reprojection distance max(|P(x0) - x1|, |x0 - P^-1(x1)|) and that distance
is below ``pos_th``; a keypoint is *unmatched* when its reprojection lies farther than
``neg_th`` from every keypoint of the other image.

Pairs come from three sources, all reduced to the same cached arrays:
  * ``homography``: real training images and a random warp of them, both photometrically
    augmented, GT by the known H;
  * ``tum``: RGB-D frames of TUM fr3/teddy with mocap poses, GT by depth reprojection;
  * ``kitti``: KITTI 06 left frames, depth from stereo disparity (SGBM), GT poses.
Features are the project's SuperPoint with a fixed keypoint count, so pairs stack into
batches; the cache (.npz) is written once so training never runs SuperPoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from scipy.spatial.distance import cdist

from vo.geometry.homography import inside_mask, pair_conf, sample_homography, warp_image, warp_points

UNMATCHED = -1
IGNORE = -2

# Warps for SuperGlue pairs: besides the SuperPoint training warps (full overlap), half of
# the pairs lose part of the view (artifacts allowed, more zoom and perspective), so the
# dustbin sees keypoints that truly have no partner, as in real VO pairs.
partial_view_conf = {**pair_conf, "patch_ratio": 0.7, "scaling_amplitude": 0.25,
                     "perspective_amplitude_x": 0.15, "perspective_amplitude_y": 0.15,
                     "allow_artifacts": True, "translation_overflow": 0.1}

default_conf = {
    "num_keypoints": 1024,
    # Top-k of all NMS maxima (glue-factory trains its matchers so): a fixed count per image,
    # and the matcher also learns to reject weak, unrepeatable points.
    "detection_threshold": 0.0,
    "pos_th": 3.0,            # px, matched within
    "neg_th": 5.0,            # px, unmatched beyond; ignored in between
    "homography": {
        "size_hw": (480, 640),
        "pairs_per_image": 1,
        "partial_view_fraction": 0.5,
        "seed": 0,
        "max_pairs": None,           # a cap, for quick trials
    },
    "tum": {
        "root": "tum/rgbd_dataset_freiburg3_teddy",
        "stride": 4,                 # an anchor every 4th frame
        "gaps": (8, 16, 32),         # frames, 0.27-1.1 s at 30 Hz
        "depth_rtol": 0.05,          # Kinect depth noise is ~1 % at 1-2 m; 5 % leaves room for blur
        "max_pairs": None,           # a cap, for quick trials
    },
    "kitti": {
        "root": "kitti/sequences/06",
        "stride": 1,
        "gaps": (1, 2, 4),           # ~1 m per frame
        "depth_rtol": 0.1,           # 1 px of disparity is 5 % of depth at 20 m
        "max_depth": 40.0,           # m; beyond, stereo depth is too coarse to check occlusion
        "max_pairs": None,           # a cap, for quick trials
    },
}


# ----------------------------------------------------------------------------- GT from geometry

def assign_from_distances(dist: np.ndarray, dist0: np.ndarray, dist1: np.ndarray,
                          pos_th: float, neg_th: float,
                          known0: np.ndarray | None = None, known1: np.ndarray | None = None):
    """Match labels from reprojection distances.

    ``dist`` (M,N) is the symmetric distance (inf where a pair cannot match), ``dist0`` (M,N)
    the distance in image 1 of each reprojected keypoint of image 0, ``dist1`` the same in
    image 0. ``known0``/``known1`` mark keypoints whose reprojection is known at all (depth);
    the others can only be ignored. Returns gt0 (M,), gt1 (N,) int64.
    """
    m, n = dist.shape
    known0 = np.ones(m, bool) if known0 is None else known0
    known1 = np.ones(n, bool) if known1 is None else known1
    gt0, gt1 = np.full(m, IGNORE, np.int64), np.full(n, IGNORE, np.int64)
    if m == 0 or n == 0:  # nothing on the other side: every known keypoint is unmatched
        gt0[known0], gt1[known1] = UNMATCHED, UNMATCHED
        return gt0, gt1
    gt0[known0 & (dist0.min(1) > neg_th)] = UNMATCHED
    gt1[known1 & (dist1.min(0) > neg_th)] = UNMATCHED
    nearest0, nearest1 = dist.argmin(1), dist.argmin(0)
    idx0 = np.arange(m)
    positive = (nearest1[nearest0] == idx0) & (dist[idx0, nearest0] < pos_th)
    gt0[idx0[positive]] = nearest0[positive]
    gt1[nearest0[positive]] = idx0[positive]
    return gt0, gt1


def homography_gt(kp0: np.ndarray, kp1: np.ndarray, H: np.ndarray, pos_th: float = 3.0, neg_th: float = 5.0):
    """GT of keypoints (M,2), (N,2) as x,y px of two images related by H (pixels of 0 -> 1).

    Returns gt0 (M,) and gt1 (N,): the partner index, UNMATCHED (-1) or IGNORE (-2).
    """
    kp0 = np.asarray(kp0, np.float64).reshape(-1, 2)
    kp1 = np.asarray(kp1, np.float64).reshape(-1, 2)
    dist0 = cdist(warp_points(H, kp0), kp1) if len(kp0) and len(kp1) else np.zeros((len(kp0), len(kp1)))
    dist1 = cdist(kp0, warp_points(np.linalg.inv(H), kp1)) if len(kp0) and len(kp1) else dist0
    return assign_from_distances(np.maximum(dist0, dist1), dist0, dist1, pos_th, neg_th)


def sample_depth(depth: np.ndarray, kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth (N,) at keypoints (N,2) and whether it is valid (> 0, finite, inside).

    Nearest pixel, not bilinear: blending depths across an object edge would invent a
    surface between foreground and background.
    """
    h, w = depth.shape
    cols = np.round(kp[:, 0]).astype(np.int64)
    rows = np.round(kp[:, 1]).astype(np.int64)
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    d = np.zeros(len(kp), np.float64)
    d[inside] = depth[rows[inside], cols[inside]]
    valid = inside & np.isfinite(d) & (d > 0)
    return np.where(valid, d, 0.0), valid


def project(kp: np.ndarray, d: np.ndarray, K_from: np.ndarray, K_to: np.ndarray,
            T_to_from: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (N,2) with depths (N,) in one camera -> pixels (N,2) and depths (N,) in the other.

    Points behind the other camera get NaN pixels.
    """
    rays = np.concatenate([kp, np.ones((len(kp), 1))], 1) @ np.linalg.inv(K_from).T
    points = (rays * d[:, None]) @ T_to_from[:3, :3].T + T_to_from[:3, 3]
    z = points[:, 2]
    in_front = z > 1e-6
    pixels = np.full((len(kp), 2), np.nan)
    pixels[in_front] = (points[in_front] @ K_to.T)[:, :2] / z[in_front, None]
    return pixels, z


def visible_in(pixels: np.ndarray, z: np.ndarray, depth_to: np.ndarray, rtol: float) -> np.ndarray:
    """Whether reprojected points land inside the other image, in front, and on its measured surface.

    The depth check is what catches occlusion: an occluded point projects onto a nearer
    surface, so the other camera measures less than the point's own depth.
    """
    h, w = depth_to.shape
    finite = np.all(np.isfinite(pixels), 1)
    inside = finite & inside_mask(np.where(finite[:, None], pixels, -1), (h, w))
    measured, valid = sample_depth(depth_to, np.where(inside[:, None], pixels, 0))
    return inside & valid & (z > 0) & (np.abs(z - measured) <= rtol * measured)


def depth_gt(kp0: np.ndarray, kp1: np.ndarray, depth0: np.ndarray, depth1: np.ndarray,
             K0: np.ndarray, K1: np.ndarray, T_1from0: np.ndarray,
             pos_th: float = 3.0, neg_th: float = 5.0, depth_rtol: float = 0.05):
    """GT of keypoints (M,2), (N,2) of two views with depth maps (HxW metres, 0 = unknown).

    ``T_1from0`` (4x4) maps points of camera 0 to camera 1. A keypoint without depth is
    ignored; a pair is positive only when both keypoints are visible in the other view
    (inside, in front, depth-consistent within ``depth_rtol``); a keypoint with depth whose
    reprojection is farther than ``neg_th`` from every keypoint (or behind the camera) is
    unmatched. Returns gt0 (M,), gt1 (N,).
    """
    kp0 = np.asarray(kp0, np.float64).reshape(-1, 2)
    kp1 = np.asarray(kp1, np.float64).reshape(-1, 2)
    d0, known0 = sample_depth(depth0, kp0)
    d1, known1 = sample_depth(depth1, kp1)
    kp0_1, z0_1 = project(kp0, d0, K0, K1, T_1from0)
    kp1_0, z1_0 = project(kp1, d1, K1, K0, np.linalg.inv(T_1from0))
    visible0 = known0 & visible_in(kp0_1, z0_1, depth1, depth_rtol)
    visible1 = known1 & visible_in(kp1_0, z1_0, depth0, depth_rtol)
    if len(kp0) == 0 or len(kp1) == 0:
        empty = np.zeros((len(kp0), len(kp1)))
        return assign_from_distances(empty, empty, empty, pos_th, neg_th, known0, known1)
    # Unknown or behind-the-camera projections are infinitely far from everything.
    dist0 = cdist(np.nan_to_num(kp0_1), kp1)
    dist1 = cdist(kp0, np.nan_to_num(kp1_0))
    dist0[~np.all(np.isfinite(kp0_1), 1) | ~known0] = np.inf
    dist1[:, ~np.all(np.isfinite(kp1_0), 1) | ~known1] = np.inf
    dist = np.where(visible0[:, None] & visible1[None], np.maximum(dist0, dist1), np.inf)
    return assign_from_distances(dist, dist0, dist1, pos_th, neg_th, known0, known1)


# ----------------------------------------------------------------------------- features

def extract_fixed(superpoint, image: np.ndarray, num_keypoints: int, threshold: float,
                  rng: np.random.Generator) -> dict:
    """SuperPoint features with exactly ``num_keypoints`` keypoints, as numpy.

    The best NMS maxima above ``threshold``; if the image has fewer, random pixels with
    score 0 fill the rest (their descriptors sampled there), so pairs stack into batches
    and the matcher learns that score-0 points rarely match.
    """
    from models.superpoint import (image_to_tensor, logits_to_heatmap, sample_descriptors, select_keypoints,
                                   simple_nms)

    conf = superpoint.conf
    with torch.inference_mode():
        images = image_to_tensor(image, superpoint.device)
        h, w = images.shape[-2:]
        logits, dense = superpoint.forward_dense(images)
        heatmap = simple_nms(logits_to_heatmap(logits, conf["cell"])[:, :h, :w], conf["nms_radius"])[0]
        kpts, scores = select_keypoints(heatmap, threshold, conf["remove_borders"], num_keypoints)
        missing = num_keypoints - len(kpts)
        if missing > 0:
            border = conf["remove_borders"]
            fill = np.stack([rng.integers(border, w - border, missing),
                             rng.integers(border, h - border, missing)], 1)
            kpts = torch.cat([kpts, torch.from_numpy(fill).to(kpts)])
            scores = torch.cat([scores, scores.new_zeros(missing)])
        desc = sample_descriptors(kpts[None], dense, conf["cell"])[0]
    return {"keypoints": kpts.cpu().numpy().astype(np.float32), "scores": scores.cpu().numpy().astype(np.float32),
            "descriptors": desc.cpu().numpy(), "image_size": np.array([w, h], np.float32)}


# ----------------------------------------------------------------------------- pair sources

@dataclass
class ImagePair:
    """Two grayscale images and what their GT needs: either ``H`` or depths, intrinsics and pose."""
    name: str
    image0: np.ndarray
    image1: np.ndarray
    H: np.ndarray | None = None
    depth0: np.ndarray | None = None
    depth1: np.ndarray | None = None
    K0: np.ndarray | None = None
    K1: np.ndarray | None = None
    T_1from0: np.ndarray | None = None
    key0: str | None = None   # frames shared by several pairs are extracted once
    key1: str | None = None


def homography_pairs(images: list[Path], conf: dict) -> Iterator[ImagePair]:
    """Each image and random warps of it, both photometrically augmented (SuperPoint training style).

    Pair i has its own generator seeded by (seed, i): the set does not depend on its size.
    """
    from vo.datasets.real_images import load_gray
    from vo.datasets.synthetic_shapes import photometric_augment

    size_hw = tuple(conf["size_hw"])
    for i in range(len(images) * conf["pairs_per_image"]):
        path = images[i % len(images)]
        rng = np.random.default_rng([conf["seed"], i])
        image = load_gray(path, size_hw)
        warp_conf = partial_view_conf if rng.random() < conf["partial_view_fraction"] else pair_conf
        H = sample_homography(size_hw, rng, **warp_conf)
        yield ImagePair(f"{path.stem}#{i}", photometric_augment(rng, image),
                        photometric_augment(rng, warp_image(image, H)), H=H)


def frame_pairs(count: int, stride: int, gaps) -> list[tuple[int, int]]:
    """(anchor, anchor + gap) index pairs within ``count`` frames."""
    return [(a, a + g) for a in range(0, count, stride) for g in gaps if a + g < count]


def interpolate_poses(stamps: np.ndarray, poses: np.ndarray, query: np.ndarray, max_gap: float = 0.02) -> dict:
    """{stamp: 4x4 pose} at ``query`` stamps, interpolated (slerp, lerp) between the two nearest poses.

    The nearest 100 Hz mocap pose can be 5 ms off; at the 20-40 deg/s of hand-held TUM
    sequences that alone moves points by ~1 px. Stamps outside the trajectory or with a
    neighbour farther than ``max_gap`` s get no pose.
    """
    from scipy.spatial.transform import Rotation, Slerp

    out = {}
    slerp = Slerp(stamps, Rotation.from_matrix(poses[:, :3, :3]))
    for q in np.asarray(query, np.float64):
        i = int(np.searchsorted(stamps, q))
        if i == 0 or i == len(stamps) or min(q - stamps[i - 1], stamps[i] - q) > max_gap:
            continue
        w = (q - stamps[i - 1]) / (stamps[i] - stamps[i - 1])
        pose = np.eye(4)
        pose[:3, :3] = slerp([q]).as_matrix()[0]
        pose[:3, 3] = (1 - w) * poses[i - 1, :3, 3] + w * poses[i, :3, 3]
        out[float(q)] = pose
    return out


def tum_pairs(root: Path, conf: dict) -> Iterator[ImagePair]:
    """TUM RGB-D frame pairs with registered depth and mocap poses (camera-to-world) at the colour stamps."""
    from vo.datasets import open_source
    from vo.eval.trajectory import read_tum

    source = open_source(str(root))
    gt = read_tum(root / "groundtruth.txt")
    pose_of = interpolate_poses(gt.stamps, gt.poses, source.rgb_stamps)
    # rgbd frame k is the k-th associated (colour, depth) pair; only those with a pose count.
    with_pose = [k for k, (rgb, _) in enumerate(source.pairs) if float(source.rgb_stamps[rgb]) in pose_of]
    index_pairs = [(with_pose[a], with_pose[b]) for a, b in frame_pairs(len(with_pose), conf["stride"], conf["gaps"])]
    needed = {k for pair in index_pairs for k in pair}
    frames = {f.index: (to_gray(f.image), f.depth, pose_of[float(f.stamp)])
              for f in source.frames("rgbd") if f.index in needed}
    K = source.camera.K
    for i, j in index_pairs:
        if i not in frames or j not in frames:   # an unreadable frame was skipped
            continue
        (image0, depth0, pose0), (image1, depth1, pose1) = frames[i], frames[j]
        yield ImagePair(f"tum {i}-{j}", image0, image1, depth0=depth0, depth1=depth1, K0=K, K1=K,
                        T_1from0=np.linalg.inv(pose1) @ pose0, key0=f"tum{i}", key1=f"tum{j}")


def stereo_depth(left: np.ndarray, right: np.ndarray, fx: float, baseline: float, max_depth: float) -> np.ndarray:
    """Depth (m, 0 = unknown) of a rectified pair from semi-global matching.

    SGBM's left-right check (disp12MaxDiff) and speckle filter drop most wrong disparities;
    far points (small disparity) are dropped because their depth is too coarse to judge occlusion.
    """
    block = 5
    sgbm = cv2.StereoSGBM_create(minDisparity=0, numDisparities=128, blockSize=block,
                                 P1=8 * block * block, P2=32 * block * block, disp12MaxDiff=1,
                                 uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
                                 mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY)
    disparity = sgbm.compute(left, right).astype(np.float32) / 16.0
    valid = disparity > fx * baseline / max_depth
    return np.where(valid, fx * baseline / np.maximum(disparity, 1e-6), 0.0).astype(np.float32)


def kitti_pairs(root: Path, conf: dict) -> Iterator[ImagePair]:
    """KITTI left-frame pairs with stereo depth and the official poses (camera 0 to world)."""
    from vo.datasets import open_source

    source = open_source(str(root))
    _, poses = source.ground_truth
    cam = source.camera
    frames = {}
    for f in source.frames("stereo"):
        if f.index < len(poses):
            frames[f.index] = (f.image, stereo_depth(f.image, f.right, cam.fx, cam.baseline, conf["max_depth"]))
    indices = sorted(frames)
    for a, b in frame_pairs(len(indices), conf["stride"], conf["gaps"]):
        i, j = indices[a], indices[b]
        T_1from0 = np.linalg.inv(poses[j]) @ poses[i]
        yield ImagePair(f"kitti {i}-{j}", frames[i][0], frames[j][0], depth0=frames[i][1], depth1=frames[j][1],
                        K0=cam.K, K1=cam.K, T_1from0=T_1from0, key0=f"kitti{i}", key1=f"kitti{j}")


def to_gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image


def pair_gt(pair: ImagePair, kp0: np.ndarray, kp1: np.ndarray, conf: dict, depth_rtol: float = 0.05):
    if pair.H is not None:
        return homography_gt(kp0, kp1, pair.H, conf["pos_th"], conf["neg_th"])
    return depth_gt(kp0, kp1, pair.depth0, pair.depth1, pair.K0, pair.K1, pair.T_1from0,
                    conf["pos_th"], conf["neg_th"], depth_rtol)


# ----------------------------------------------------------------------------- the cache

CACHE_KEYS = ("keypoints", "scores", "descriptors", "image_size", "gt")


def build_cache(path: str | Path, pairs: Iterator[ImagePair], extract: Callable[[np.ndarray, np.random.Generator], dict],
                conf: dict, meta: dict, depth_rtol: float = 0.05, total: int | None = None) -> Path:
    """Extract features of every pair, label them and write one .npz (atomically).

    ``extract(image, rng)`` returns a fixed-count feature dict (see `extract_fixed`).
    Descriptors are stored as float16 (unit vectors: 1e-3 error, half the size: a cache of
    800 pairs at 1024 keypoints is ~0.8 GB).
    """
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {f"{k}{i}": [] for k in CACHE_KEYS for i in (0, 1)}
    names, homographies, seen = [], [], {}
    for n, pair in enumerate(tqdm(pairs, total=total, desc=f"cache {path.stem}", unit="pair")):
        feats = []
        for side, (image, key) in enumerate(((pair.image0, pair.key0), (pair.image1, pair.key1))):
            if key is None or key not in seen:
                f = extract(image, np.random.default_rng([meta.get("seed", 0), n, side]))
                if key is not None:
                    seen[key] = f
            else:
                f = seen[key]
            feats.append(f)
        gt0, gt1 = pair_gt(pair, feats[0]["keypoints"], feats[1]["keypoints"], conf, depth_rtol)
        for i, (f, gt) in enumerate(zip(feats, (gt0, gt1))):
            columns[f"keypoints{i}"].append(f["keypoints"])
            columns[f"scores{i}"].append(f["scores"])
            columns[f"descriptors{i}"].append(f["descriptors"].astype(np.float16))
            columns[f"image_size{i}"].append(f["image_size"])
            columns[f"gt{i}"].append(gt.astype(np.int16))
        names.append(pair.name)
        homographies.append(pair.H if pair.H is not None else np.full((3, 3), np.nan))
    if not names:
        raise ValueError(f"{path}: no pairs to cache")
    arrays = {k: np.stack(v) for k, v in columns.items()}
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays, names=np.array(names), H=np.stack(homographies), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)   # an interrupted build never leaves a half cache behind
    return path


def cache_meta(path: str | Path) -> dict | None:
    """The metadata a cache was built with, or None if there is no readable cache."""
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError):
        return None


class PairCache:
    """A cache .npz in memory; ``batch`` stacks pairs into the dict SuperGlue's forward takes."""

    def __init__(self, path: str | Path):
        with np.load(path) as data:
            self.arrays = {k: data[k] for k in data.files if k not in ("names", "meta", "H")}
            self.names = list(data["names"])
            self.H = data["H"]
            self.meta = json.loads(str(data["meta"]))
        self.path = Path(path)

    def __len__(self) -> int:
        return len(self.names)

    def label_counts(self) -> dict:
        gt = np.concatenate([self.arrays["gt0"], self.arrays["gt1"]], 1)
        per_pair = lambda mask: float(mask.sum(1).mean())
        return {"pairs": len(self), "matched": per_pair(gt >= 0) / 2, "unmatched": per_pair(gt == UNMATCHED),
                "ignored": per_pair(gt == IGNORE)}

    def batch(self, indices, swap=None) -> dict:
        """Pairs ``indices`` as float32 / int64 tensors; where ``swap`` is True, images 0 and 1 trade places."""
        indices = np.asarray(indices)
        swap = np.zeros(len(indices), bool) if swap is None else np.asarray(swap, bool)
        out = {}
        for key in CACHE_KEYS:
            a, b = self.arrays[f"{key}0"][indices], self.arrays[f"{key}1"][indices]
            mask = swap.reshape(-1, *([1] * (a.ndim - 1)))
            first, second = np.where(mask, b, a), np.where(mask, a, b)
            dtype = torch.int64 if key == "gt" else torch.float32
            out[f"{key}0"] = torch.from_numpy(np.ascontiguousarray(first)).to(dtype)
            out[f"{key}1"] = torch.from_numpy(np.ascontiguousarray(second)).to(dtype)
        return out

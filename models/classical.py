"""Classical extractors (OpenCV ORB and SIFT) behind the SuperPoint interface.

``extract(image)`` returns numpy arrays: keypoints (N,2) float32 x,y px, scores (N,)
float32 = detector response (best first), descriptors (N,32) uint8 for ORB or
(N,128) float32 for SIFT, image_size (2,) int64 as (W,H).
"""
from __future__ import annotations

import cv2
import numpy as np

default_orb_conf = {
    "max_keypoints": 2000,
    "scale_factor": 1.2,
    "n_levels": 8,
    "edge_threshold": 31,
    "fast_threshold": 20,
    "subpixel": True,   # FAST corners sit on the pixel grid (of their pyramid level); refine them
    # Spread keypoints over the image as ORB-SLAM does: detect `oversample` times more, then keep
    # the strongest per grid cell (pixels; 0 = plain top-k by response). Texture-rich patches
    # otherwise take most of the budget and the pose rests on a small part of the image.
    "grid_cell": 40,
    "oversample": 4,
}

default_sift_conf = {
    "max_keypoints": 2000,
    "root": False,            # RootSIFT: L1-normalise then sqrt (Arandjelovic & Zisserman 2012)
    "contrast_threshold": 0.04,
    "edge_threshold": 10,
    "sigma": 1.6,
}


def to_gray_uint8(image) -> np.ndarray:
    """HxW / HxWx3 uint8 (BGR) numpy, or a torch tensor, -> HxW uint8 for OpenCV.

    Tensors follow the SuperPoint input convention: (H,W), (C,H,W) or (1,C,H,W) with
    C in {1,3} (3 = RGB), uint8 or float in [0,1].
    """
    if not isinstance(image, np.ndarray):  # a torch tensor; torch stays an optional import here
        tensor = image.detach().cpu()
        while tensor.dim() > 3 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3):
            tensor = tensor.permute(1, 2, 0)  # CHW -> HWC
        image = tensor.numpy()
        if image.dtype != np.uint8:
            image = np.clip(image.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 3:
            image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        # Floats are taken as [0,1] (the SuperPoint convention); other integers are clipped.
        if np.issubdtype(image.dtype, np.floating):
            image = image * 255.0 + 0.5
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def pack_features(keypoints, descriptors, image: np.ndarray, max_keypoints: int, desc_dim: int,
                  desc_dtype) -> dict:
    """OpenCV keypoints and descriptors -> the extractor dict, best response first, top-k."""
    height, width = image.shape[:2]
    if not keypoints or descriptors is None:
        return {"keypoints": np.zeros((0, 2), np.float32), "scores": np.zeros((0,), np.float32),
                "descriptors": np.zeros((0, desc_dim), desc_dtype),
                "image_size": np.array([width, height], np.int64)}
    xy = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2)
    scores = np.array([kp.response for kp in keypoints], np.float32)
    order = np.argsort(-scores, kind="stable")
    if max_keypoints is not None and max_keypoints >= 0:
        order = order[:max_keypoints]
    return {"keypoints": xy[order], "scores": scores[order],
            "descriptors": np.ascontiguousarray(descriptors[order]).astype(desc_dtype, copy=False),
            "image_size": np.array([width, height], np.int64)}


class ORB:
    """OpenCV ORB: oriented FAST + rotated BRIEF, binary (N,32) uint8 descriptors."""

    def __init__(self, max_keypoints: int = 2000, **conf):
        unknown = set(conf) - set(default_orb_conf)
        if unknown:
            raise TypeError(f"unknown ORB option(s): {sorted(unknown)}")
        self.conf = {**default_orb_conf, **conf, "max_keypoints": max_keypoints}
        c = self.conf
        # nfeatures bounds the detector itself; -1 ("keep all") maps to a large cap.
        detected = max_keypoints * (c["oversample"] if c["grid_cell"] else 1)
        self.orb = cv2.ORB_create(nfeatures=detected if max_keypoints > 0 else 100000,
                                  scaleFactor=c["scale_factor"], nlevels=c["n_levels"],
                                  edgeThreshold=c["edge_threshold"], fastThreshold=c["fast_threshold"])

    def extract(self, image) -> dict:
        gray = to_gray_uint8(image)
        keypoints, descriptors = self.orb.detectAndCompute(gray, None)
        feats = pack_features(keypoints, descriptors, gray, -1, 32, np.uint8)
        keep = spread_over_grid(feats["keypoints"], self.conf["grid_cell"], self.conf["max_keypoints"])
        feats.update(keypoints=feats["keypoints"][keep], scores=feats["scores"][keep],
                     descriptors=feats["descriptors"][keep])
        if self.conf["subpixel"] and len(feats["keypoints"]):
            feats["keypoints"] = refine_corners(gray, feats["keypoints"])
        return feats


def spread_over_grid(xy: np.ndarray, cell: float, max_keypoints: int) -> np.ndarray:
    """Indices of up to ``max_keypoints`` of ``xy`` (sorted best first), taken round-robin over
    grid cells: every cell's best, then every cell's second best, ...; returned best first.
    ``cell`` <= 0 keeps the plain top-k."""
    n = len(xy)
    if max_keypoints is None or max_keypoints < 0 or max_keypoints >= n:
        max_keypoints = n
    if cell <= 0 or n == 0:
        return np.arange(max_keypoints)
    cells = np.floor(xy / cell).astype(np.int64)
    cell_id = np.unique(cells, axis=0, return_inverse=True)[1].ravel()
    # Rank of each keypoint within its cell (input is best first, so a stable sort keeps that).
    order = np.argsort(cell_id, kind="stable")
    sorted_ids = cell_id[order]
    starts = np.r_[0, np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(np.lexsort((np.arange(n), rank))[:max_keypoints])


def refine_corners(gray: np.ndarray, xy: np.ndarray, max_shift: float = 1.5) -> np.ndarray:
    """Sub-pixel corner positions (OpenCV cornerSubPix); a point that wanders off keeps its place.

    Quantised positions bias stereo disparity, hence depth and the scale of a stereo trajectory.
    """
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 0.01)
    refined = cv2.cornerSubPix(gray, xy.reshape(-1, 1, 2).copy(), (3, 3), (-1, -1), criteria).reshape(-1, 2)
    moved = np.linalg.norm(refined - xy, axis=1) > max_shift
    refined[moved] = xy[moved]
    return refined.astype(np.float32)


class SIFT:
    """OpenCV SIFT, float32 (N,128) descriptors; ``root=True`` gives RootSIFT."""

    def __init__(self, max_keypoints: int = 2000, root: bool = False, **conf):
        unknown = set(conf) - set(default_sift_conf)
        if unknown:
            raise TypeError(f"unknown SIFT option(s): {sorted(unknown)}")
        self.conf = {**default_sift_conf, **conf, "max_keypoints": max_keypoints, "root": root}
        c = self.conf
        self.sift = cv2.SIFT_create(nfeatures=max(max_keypoints, 0), contrastThreshold=c["contrast_threshold"],
                                    edgeThreshold=c["edge_threshold"], sigma=c["sigma"])

    def extract(self, image) -> dict:
        gray = to_gray_uint8(image)
        keypoints, descriptors = self.sift.detectAndCompute(gray, None)
        feats = pack_features(keypoints, descriptors, gray, self.conf["max_keypoints"], 128, np.float32)
        if self.conf["root"] and len(feats["descriptors"]):
            desc = feats["descriptors"]
            desc = desc / np.maximum(np.abs(desc).sum(1, keepdims=True), 1e-12)
            feats["descriptors"] = np.sqrt(desc).astype(np.float32)
        return feats

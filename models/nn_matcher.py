"""Mutual nearest-neighbour matching with an optional Lowe ratio test.

Binary (uint8) descriptors are compared by Hamming distance, everything else by L2.
The whole distance matrix is one matrix product, so there are no per-keypoint loops.
"""
from __future__ import annotations

import numpy as np
import torch

default_conf = {
    "ratio": None,      # Lowe ratio: keep d1 < ratio * d2 (e.g. 0.8 for SIFT)
    "distance": None,   # keep d1 <= distance (bits for Hamming, L2 units otherwise)
    "metric": None,     # None = "hamming" for uint8 descriptors, "l2" otherwise
}


def _as_tensor(x, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu")


def unpack_bits(desc: torch.Tensor) -> torch.Tensor:
    """(N,B) uint8 -> (N,8B) float32 of 0/1."""
    shifts = torch.arange(8, device=desc.device, dtype=torch.uint8)
    return ((desc[..., None] >> shifts) & 1).reshape(desc.shape[0], -1).float()


def hamming_distance(desc0: torch.Tensor, desc1: torch.Tensor) -> torch.Tensor:
    """(M,B), (N,B) uint8 -> (M,N) bit differences, via |a| + |b| - 2 a.b on 0/1 vectors.

    The counts are integers below 2^24, so the float32 product is exact.
    """
    bits0, bits1 = unpack_bits(desc0), unpack_bits(desc1)
    return bits0.sum(1, keepdim=True) + bits1.sum(1)[None] - 2 * bits0 @ bits1.T


def l2_distance(desc0: torch.Tensor, desc1: torch.Tensor) -> torch.Tensor:
    """(M,D), (N,D) -> (M,N) Euclidean distances."""
    desc0, desc1 = desc0.float(), desc1.float()
    sq = (desc0 * desc0).sum(1, keepdim=True) + (desc1 * desc1).sum(1)[None] - 2 * desc0 @ desc1.T
    return sq.clamp_min(0).sqrt()


def nearest_neighbour(dist: torch.Tensor, ratio: float | None, max_distance: float | None):
    """Row-wise nearest neighbour of a (M,N) distance matrix -> (indices with -1 = rejected, d1)."""
    if dist.shape[1] >= 2 and ratio is not None:
        top = dist.topk(2, dim=1, largest=False)
        d1, d2, indices = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
    else:
        d1, indices = dist.min(dim=1)
        d2 = torch.full_like(d1, float("inf"))  # a single candidate is never ambiguous
    valid = torch.ones_like(indices, dtype=torch.bool)
    if ratio is not None:
        valid &= d1 < ratio * d2
    if max_distance is not None:
        valid &= d1 <= max_distance
    return torch.where(valid, indices, indices.new_tensor(-1)), d1


def mutual_nn_match(dist: torch.Tensor, ratio: float | None = None, max_distance: float | None = None):
    """(M,N) distances -> matches (K,2) and their distances (K,), mutual and tested both ways.

    The ratio and distance tests apply in both directions, so the result does not
    depend on which image comes first.
    """
    matches0, d0 = nearest_neighbour(dist, ratio, max_distance)
    matches1, _ = nearest_neighbour(dist.T, ratio, max_distance)
    idx0 = torch.arange(dist.shape[0], device=dist.device)
    safe = matches0.clamp_min(0)
    mutual = (matches0 >= 0) & (matches1[safe] == idx0)
    idx0 = idx0[mutual]
    return torch.stack([idx0, matches0[idx0]], 1), d0[idx0]


class MutualNN:
    """Mutual nearest neighbours; ``ratio`` = Lowe ratio, ``distance`` = max descriptor distance.

    ``match`` returns numpy arrays on the host: matches (K,2) int64, scores (K,)
    float32 (higher is better: 1 - d/bits for Hamming, 1/(1+d) for L2) and the
    raw distances (K,).
    """

    def __init__(self, ratio: float | None = None, distance: float | None = None, **conf):
        unknown = set(conf) - set(default_conf)
        if unknown:
            raise TypeError(f"unknown MutualNN option(s): {sorted(unknown)}")
        self.conf = {**default_conf, **conf, "ratio": ratio, "distance": distance}
        if self.conf["metric"] not in (None, "hamming", "l2"):
            raise ValueError(f"metric must be 'hamming' or 'l2', got {self.conf['metric']!r}")

    def match(self, feats0: dict, feats1: dict) -> dict:
        desc0 = _as_tensor(feats0["descriptors"])
        desc1 = _as_tensor(feats1["descriptors"], desc0.device)
        metric = self.conf["metric"] or ("hamming" if desc0.dtype == torch.uint8 else "l2")
        if metric == "hamming" and (desc0.dtype != torch.uint8 or desc1.dtype != torch.uint8):
            raise ValueError("Hamming matching needs uint8 (packed binary) descriptors")
        if desc0.shape[0] == 0 or desc1.shape[0] == 0:
            return {"matches": np.zeros((0, 2), np.int64), "scores": np.zeros((0,), np.float32),
                    "distances": np.zeros((0,), np.float32)}
        if desc0.shape[1] != desc1.shape[1]:
            raise ValueError(f"descriptor sizes differ: {desc0.shape[1]} vs {desc1.shape[1]}")
        with torch.inference_mode():
            if metric == "hamming":
                dist = hamming_distance(desc0, desc1)
            else:
                dist = l2_distance(desc0, desc1)
            matches, d = mutual_nn_match(dist, self.conf["ratio"], self.conf["distance"])
            scores = 1 - d / (8 * desc0.shape[1]) if metric == "hamming" else 1 / (1 + d)
            return {"matches": matches.cpu().numpy().astype(np.int64),
                    "scores": scores.float().cpu().numpy(),
                    "distances": d.float().cpu().numpy()}

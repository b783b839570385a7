"""Evaluate matchers on the same SuperPoint features: mutual NN, mutual NN + ratio test, SuperGlue.

    python -m vo.evaluate_matching [--superpoint PATH] [--superglue PATH ...] [--data DIR]
                                   [--ratio R ...] [--pairs N] [--seed S] [--out FILE.md]

Every image is described once (SuperPoint, at most 1024 keypoints) and every matcher
sees exactly those features, in one run:
  * homography pairs of the held-out Kodak24 images (seeded random warps that lose part
    of the view, as `vo.evaluate_features`' 'strong', plus photometric changes): match
    precision and recall against the GT of `vo.train.match_data.homography_gt`
    (matched within 3 px, unmatched beyond 5 px; ignored keypoints count for neither);
  * ScanNet pairs (SuperGlue's 15 sample pairs), resized to 640x480 with K scaled to
    match: relative-pose AUC at 5 / 10 / 20 degrees, the pose from an essential matrix
    by LO-RANSAC (pycolmap, 1 px at 640x480, SuperGlue's threshold), the error being the
    larger of the rotation and the translation-direction angles;
  * HPatches v_churchill (1 against 2..6, 640x480): homography accuracy at 1 / 3 / 5 px
    (mean corner error, RANSAC 3 px), as `vo.evaluate_features`.
The matchers get all keypoints (no shared-view filtering): what a VO front end gets.
One more row, for context, runs SIFT's own features (OpenCV, same keypoint budget) with
MNN + Lowe's ratio on the same pairs: how hard the pairs are for a classical pipeline.
Bad inputs print one line naming the file and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pycolmap
import torch
from tqdm import tqdm

from vo.eval import features as F
from vo.eval.metrics import rotation_angle_deg
from vo.evaluate_features import (HPATCHES_SEQUENCE, InputError, print_report, Pair, hpatches_pairs, strong_conf,
                                  synthetic_pairs)
from vo.types import Camera

EXIT_BAD_INPUT = 2
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAX_KEYPOINTS = 1024
SCANNET_SIZE_HW = (480, 640)
POSE_THRESHOLDS = (5, 10, 20)            # degrees
POSE_RANSAC_PX = 1.0                     # SuperGlue's evaluation threshold at 640x480
# SuperGlue paper, ScanNet test (1500 pairs, 640x480): context only, our 15 pairs are a sample.
PAPER_SCANNET_AUC = {"SuperPoint + SuperGlue": (16.16, 33.81, 51.84)}


@dataclass(frozen=True)
class Matcher:
    name: str
    match: Callable[[dict, dict], np.ndarray]    # two feature dicts -> (K,2) int64 index pairs


@dataclass(frozen=True)
class PosePair:
    name: str
    image0: np.ndarray
    image1: np.ndarray
    K0: np.ndarray
    K1: np.ndarray
    T_0to1: np.ndarray


# ----------------------------------------------------------------------------- matchers

def mutual_nn_matcher(ratio: float | None) -> Matcher:
    from models.nn_matcher import MutualNN

    matcher = MutualNN(ratio=ratio)
    name = "MNN" if ratio is None else f"MNN + ratio {ratio:g}"
    return Matcher(name, lambda f0, f1: matcher.match(f0, f1)["matches"])


def superglue_matcher(weights: str) -> Matcher:
    from models.superglue import SuperGlue

    model = SuperGlue(weights=weights, precision="fp32")   # fp32: the metrics describe the network
    layers = len(model.conf["GNN_layers"]) // 2
    return Matcher(f"SuperGlue {layers}L ({weights})", lambda f0, f1: model.match(f0, f1)["matches"])


# ----------------------------------------------------------------------------- data

def read_scannet_pairs(folder: Path, size_hw=SCANNET_SIZE_HW) -> list[PosePair]:
    """``pairs_with_gt.txt``: name0 name1 rot0 rot1 K0(9) K1(9) T_0to1(16); images resized, K scaled."""
    index = folder / "pairs_with_gt.txt"
    if not index.is_file():
        raise InputError(f"{index}: ScanNet pair list not found")
    pairs = []
    for line_no, line in enumerate(index.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 38:
            raise InputError(f"{index}: line {line_no} has {len(fields)} fields, expected 38")
        values = np.array(fields[2:], np.float64)
        if values[0] != 0 or values[1] != 0:
            raise InputError(f"{index}: line {line_no}: EXIF rotations are not supported")
        images, Ks = [], []
        for name, K in ((fields[0], values[2:11].reshape(3, 3)), (fields[1], values[11:20].reshape(3, 3))):
            image = cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise InputError(f"{folder / name}: cannot read image")
            images.append(cv2.resize(image, size_hw[::-1], interpolation=cv2.INTER_AREA))
            Ks.append(F.resize_matrix(image.shape, size_hw) @ K)   # pixels of the resized image
        pairs.append(PosePair(f"{fields[0]} {fields[1]}", images[0], images[1], Ks[0], Ks[1],
                              values[20:].reshape(4, 4)))
    return pairs


# ----------------------------------------------------------------------------- relative pose

def estimate_pose(kp0: np.ndarray, kp1: np.ndarray, K0: np.ndarray, K1: np.ndarray,
                  threshold_px: float = POSE_RANSAC_PX, confidence: float = 0.99999, seed: int = 0):
    """(R, t) with x1 = R x0 + t (t unit length) from matched pixels, or None.

    pycolmap's LO-RANSAC essential matrix (the tracker's estimator) with a pixel threshold on
    each camera, decomposed by the cheirality check. SuperGlue's evaluation calls OpenCV's
    findEssentialMat instead, which in OpenCV 5.1 fails an assertion on most real pairs.
    """
    if len(kp0) < 5:
        return None
    options = pycolmap.RANSACOptions()
    options.max_error, options.confidence, options.random_seed = threshold_px, confidence, seed
    answer = pycolmap.estimate_essential_matrix(kp0, kp1, pinhole_camera(K0), pinhole_camera(K1), options)
    if answer is None:
        return None
    pose = answer["cam2_from_cam1"]
    return pose.rotation.matrix(), pose.translation / max(np.linalg.norm(pose.translation), 1e-12)


def pinhole_camera(K: np.ndarray):
    """``K`` as a pycolmap camera; its size only bounds the principal point, so twice it is enough."""
    return Camera(K[0, 0], K[1, 1], K[0, 2], K[1, 2], width=int(2 * K[0, 2]), height=int(2 * K[1, 2])).to_colmap()


def angle_between(v0: np.ndarray, v1: np.ndarray) -> float:
    cos = np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1))
    return float(np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0))))


def pose_error(T_0to1: np.ndarray, estimate) -> float:
    """max(rotation error, translation-direction error) in degrees; inf for a failed estimate.

    An essential matrix fixes t only up to scale and, for the error, sign, so the direction
    error is the smaller of the angles to t and to -t (SuperGlue's compute_pose_error).
    """
    if estimate is None:
        return float("inf")
    R, t = estimate
    error_t = angle_between(t, T_0to1[:3, 3])
    error_t = min(error_t, 180 - error_t)
    error_R = rotation_angle_deg(R.T @ T_0to1[:3, :3])
    return max(error_t, error_R)


def pose_auc(errors, thresholds=POSE_THRESHOLDS) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, normalised (SuperGlue's pose_auc)."""
    errors = np.sort(np.asarray(errors, np.float64))
    recall = np.arange(1, len(errors) + 1) / len(errors)
    errors, recall = np.r_[0.0, errors], np.r_[0.0, recall]
    aucs = []
    for t in thresholds:
        last = np.searchsorted(errors, t)
        r = np.r_[recall[:last], recall[last - 1]]
        e = np.r_[errors[:last], t]
        aucs.append(float(np.trapezoid(r, x=e) / t))
    return aucs


# ----------------------------------------------------------------------------- per-pair metrics

def homography_pair_metrics(feats0: dict, feats1: dict, matches: np.ndarray, H: np.ndarray) -> dict:
    """Precision and recall of matches (K,2) against the homography GT of the same keypoints."""
    from vo.train.match_data import IGNORE, homography_gt

    gt0, _ = homography_gt(feats0["keypoints"], feats1["keypoints"], H)
    predicted = np.full(len(gt0), -1)
    predicted[matches[:, 0]] = matches[:, 1]
    counted = (predicted > -1) & (gt0 != IGNORE)
    correct = (predicted == gt0) & (gt0 > -1)
    return {"precision": correct.sum() / counted.sum() if counted.any() else float("nan"),
            "recall": correct.sum() / (gt0 > -1).sum() if (gt0 > -1).any() else float("nan"),
            "matches": len(matches)}


def nanmean(values) -> float:
    """Mean over the defined values; NaN (without a warning) when there are none."""
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def as_numpy(feats: dict) -> dict:
    to_np = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return {k: to_np(v) for k, v in feats.items()}


# ----------------------------------------------------------------------------- evaluation

def evaluate(extract: Callable[[np.ndarray], dict], matchers: list[Matcher], homography: list[Pair],
             scannet: list[PosePair], hpatches: list[Pair], progress=None) -> dict:
    """{matcher name: summary}; each image is described once and shared by all matchers."""
    cache: dict[str, dict] = {}

    def describe(key: str, image: np.ndarray) -> dict:
        if key not in cache:
            cache[key] = as_numpy(extract(image))
        return cache[key]

    tick = (lambda: progress.update(1)) if progress is not None else (lambda: None)
    h_feats = [(describe(f"h{p.key0}", p.image0), describe(f"h{p.key1}", p.image1)) for p in homography]
    s_feats = [(describe(f"s{i}a", p.image0), describe(f"s{i}b", p.image1)) for i, p in enumerate(scannet)]
    c_feats = [(describe(f"c{p.key0}", p.image0), describe(f"c{p.key1}", p.image1)) for p in hpatches]
    results = {}
    for matcher in matchers:
        records = []
        for (f0, f1), pair in zip(h_feats, homography):
            records.append(homography_pair_metrics(f0, f1, matcher.match(f0, f1), pair.H))
            tick()
        errors = []
        for (f0, f1), pair in zip(s_feats, scannet):
            m = matcher.match(f0, f1)
            estimate = estimate_pose(f0["keypoints"][m[:, 0]].astype(np.float64),
                                     f1["keypoints"][m[:, 1]].astype(np.float64), pair.K0, pair.K1)
            errors.append(pose_error(pair.T_0to1, estimate))
            tick()
        corner_errors = []
        for (f0, f1), pair in zip(c_feats, hpatches):
            corner_errors.append(F.corner_errors(f0["keypoints"], f1["keypoints"], matcher.match(f0, f1),
                                                 pair.H, pair.image0.shape))
            tick()
        mean = lambda key: nanmean([r[key] for r in records])
        summary = {"precision": mean("precision"), "recall": mean("recall"), "matches": mean("matches")}
        if errors:
            summary.update(zip(("auc5", "auc10", "auc20"), (100 * a for a in pose_auc(errors))))
            # tells matchers apart where no pose comes within 20 degrees (every AUC 0)
            summary["median_pose_error"] = float(np.median(errors))
        summary.update(F.homography_accuracies(corner_errors))
        results[matcher.name] = summary
    return results


COLUMNS = (("precision", "P", "{:.3f}"), ("recall", "R", "{:.3f}"), ("matches", "matches", "{:.0f}"),
           ("auc5", "AUC@5°", "{:.2f}"), ("auc10", "AUC@10°", "{:.2f}"), ("auc20", "AUC@20°", "{:.2f}"),
           ("median_pose_error", "median pose err. °", "{:.1f}"),
           ("h_acc_1", "H ε=1", "{:.3f}"), ("h_acc_3", "H ε=3", "{:.3f}"), ("h_acc_5", "H ε=5", "{:.3f}"),
           ("h_acc_magsac_1", "MAGSAC++ ε=1", "{:.3f}"), ("h_acc_magsac_3", "MAGSAC++ ε=3", "{:.3f}"),
           ("h_acc_magsac_5", "MAGSAC++ ε=5", "{:.3f}"))


def format_table(results: dict) -> str:
    header = "| Matcher | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, summary in results.items():
        cells = []
        for key, _, fmt in COLUMNS:
            value = summary.get(key)
            cells.append("-" if value is None else "n/a" if np.isnan(value) else fmt.format(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vo.evaluate_matching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--superpoint", metavar="PATH",
                        help="SuperPoint weights (default: those the first SuperGlue was trained on, "
                             "else the shipped weights/superpoint_*.pth)")
    parser.add_argument("--superglue", action="append", metavar="PATH", default=[],
                        help="SuperGlue weights (repeatable; 'indoor'/'outdoor' = shipped official files; "
                             "default: the shipped weights/superglue_*.pth)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.8],
                        help="Lowe ratio(s) for the MNN + ratio rows; pass several to tune (default 0.8)")
    parser.add_argument("--pairs", type=int, default=24, help="homography pairs of held-out images (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random homographies (default 0)")
    parser.add_argument("--max-keypoints", type=int, default=MAX_KEYPOINTS)
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    if args.pairs < 0:
        parser.error("--pairs must be at least 0")
    if args.out and not args.out.parent.is_dir():
        parser.exit(EXIT_BAD_INPUT, f"error: {args.out.parent}: output folder not found\n")
    return args


def run(args) -> str:
    from models.classical import SIFT
    from models.superpoint import SuperPoint
    from models.weights import WeightsError, default_weights_or_none, superglue_pair
    from vo.datasets.real_images import held_out_images

    if not args.data.is_dir():
        raise InputError(f"{args.data}: data folder not found")
    try:
        shipped = default_weights_or_none("superglue_*.pth")
        superglues = args.superglue or ([shipped] if shipped else [])
        # by default, the features the (first) SuperGlue learnt
        features = superglue_pair(args.superpoint, superglues[0])[0] if superglues else args.superpoint
        superpoint = SuperPoint(weights=features, max_keypoints=args.max_keypoints, precision="fp32")
        matchers = [mutual_nn_matcher(None)] + [mutual_nn_matcher(r) for r in args.ratio]
        matchers += [superglue_matcher(w) for w in superglues]
    except WeightsError as e:
        raise InputError(str(e)) from None
    held_out = held_out_images(args.data)
    if args.pairs and not held_out:
        raise InputError(f"{args.data / 'images/natural/Kodak24'}: no held-out images found")
    homography = list(synthetic_pairs(held_out, args.pairs, args.seed, strong_conf)) if args.pairs else []
    scannet = read_scannet_pairs(args.data / "pairs" / "scannet")
    hpatches = list(hpatches_pairs(args.data.joinpath(*HPATCHES_SEQUENCE)))
    sift = SIFT(max_keypoints=args.max_keypoints)
    sift_matcher = Matcher(f"*SIFT features*, MNN + ratio {args.ratio[0]:g}", mutual_nn_matcher(args.ratio[0]).match)
    total = (len(matchers) + 1) * (len(homography) + len(scannet) + len(hpatches))
    with tqdm(total=total, desc="evaluate matching", unit="pair", file=sys.stderr) as progress:
        results = evaluate(superpoint.extract, matchers, homography, scannet, hpatches, progress)
        results.update(evaluate(sift.extract, [sift_matcher], homography, scannet, hpatches, progress))
    paper = "; ".join(f"{k} {a:.2f} / {b:.2f} / {c:.2f}" for k, (a, b, c) in PAPER_SCANNET_AUC.items())
    legend = (f"Features: SuperPoint ({superpoint.weights}), at most {args.max_keypoints} keypoints, shared by all "
              f"matchers (the SIFT row, for context, uses SIFT's own). P / R / matches: {len(homography)} "
              f"held-out Kodak24 pairs at 480x640, random "
              f"'strong' homographies (seed {args.seed}) + photometric; a match is correct within 3 px. "
              f"AUC (%) and median pose error (max of the rotation and translation-direction angles): "
              f"{len(scannet)} ScanNet pairs at 640x480, essential matrix by LO-RANSAC (pycolmap) "
              f"({POSE_RANSAC_PX:g} px); paper (1500 pairs): {paper}. "
              f"H ε: HPatches v_churchill 1 vs 2..6 at 640x480, fraction of pairs with mean corner error <= ε px "
              f"(the paper's plain RANSAC and MAGSAC++, both 3 px, on the same matches).")
    return legend + "\n\n" + format_table(results) + "\n"


def main(argv: list[str] | None = None) -> int:
    return print_report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate local features with the SuperPoint paper's HPatches protocol.

    python -m vo.evaluate_features [--superpoint PATH ...] [--magicpoint PATH] [--data DIR]
                                   [--pairs N] [--seed S] [--out FILE.md]

Runs MagicPoint, SuperPoint(s), ORB and SIFT in one go on
  * hpatches/v_churchill: image 1 against images 2..6 with the published homographies;
  * held-out Kodak24 images, each warped by a seeded random homography, both images
    photometrically changed like the training pairs, once with the training warps
    (`pair_conf`) and once with stronger ones (`strong_conf`: more zoom, perspective
    and content leaving the view).
Images are evaluated at 480x640 (portrait HPatches images at 640x480) with at most
1000 keypoints each: the extractor's best 1000 over the whole image, as a VO front end
gets them (rpautrat picks the best 1000 inside the shared view instead). Matches are
mutual nearest neighbours of the keypoints in the shared view. MagicPoint's descriptors are untrained, so only its detector metrics are shown.
Bad inputs print one line naming the file and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from vo.eval import features as F
from vo.geometry.homography import pair_conf, sample_homography, warp_image

EXIT_BAD_INPUT = 2
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE_HW = (480, 640)
MAX_KEYPOINTS = 1000
HPATCHES_SEQUENCE = ("hpatches", "v_churchill")

# Stronger than the training warps (pair_conf), measured over 300 draws: zoom at the
# centre 1.1 / 1.4 / 1.9 (5th / 50th / 95th percentile; pair_conf 1.1 / 1.2 / 1.4), ratio of
# the local scales at the corners (perspective) median 1.9 (pair_conf 1.2; v_churchill's
# pairs 1.4 to 6), and 3 % of the view on average (at most 35 %) coming from outside the
# source, black as the lost content of HPatches' viewpoint sequences. Rotation stays
# within +-45 degrees like pair_conf: SuperPoint is not trained for more, and HPatches'
# viewpoint pairs rotate little (v_churchill: up to 13 degrees).
strong_conf = {**pair_conf, "patch_ratio": 0.7, "scaling_amplitude": 0.25,
               "perspective_amplitude_x": 0.15, "perspective_amplitude_y": 0.15,
               "allow_artifacts": True, "translation_overflow": 0.1}
WARPS = {"pair": pair_conf, "strong": strong_conf}

# SuperPoint paper, full HPatches at 480x640 with 1000 points (Table 3 / 4): context only.
PAPER_SUPERPOINT = {"repeatability": .581, "mle": 1.158, "h_acc_1": .310, "h_acc_3": .684,
                    "h_acc_5": .829, "nn_map": .821, "matching_score": .470}


class InputError(Exception):
    """A missing or unreadable input file; the message names it."""


def print_report(run, args) -> int:
    """Print (and save to ``args.out``) the report of ``run(args)``; bad input is one line, exit 2."""
    try:
        report = run(args)
        print(report)
        if args.out:
            args.out.write_text(report)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:   # e.g. an unwritable --out
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


@dataclass(frozen=True)
class Pair:
    """Two grayscale images and H mapping pixels of image 0 to pixels of image 1.

    ``key0`` / ``key1`` name the images so features of an image shared by several
    pairs (HPatches' reference image) are extracted once.
    """
    name: str
    key0: str
    image0: np.ndarray
    key1: str
    image1: np.ndarray
    H: np.ndarray


@dataclass(frozen=True)
class Method:
    name: str
    extract: Callable[[np.ndarray], dict]
    detector_only: bool = False   # MagicPoint: descriptors are untrained


# ----------------------------------------------------------------------------- data

def read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InputError(f"{path}: cannot read image")
    return image


def read_homography(path: Path) -> np.ndarray:
    try:
        H = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read a 3x3 homography ({type(e).__name__})") from None
    if H.shape != (3, 3):
        raise InputError(f"{path}: expected a 3x3 homography, got shape {H.shape}")
    return H


def hpatches_pairs(folder: Path, size_hw=SIZE_HW) -> Iterator[Pair]:
    """Image 1 against 2..6 of an HPatches sequence, resized, with H adapted (S1 H S0^-1)."""
    if not folder.is_dir():
        raise InputError(f"{folder}: HPatches sequence folder not found")
    reference = read_gray(folder / "1.ppm")
    target0 = F.oriented_size(reference.shape, size_hw)
    image0 = cv2.resize(reference, target0[::-1], interpolation=cv2.INTER_AREA)
    for k in range(2, 7):
        other = read_gray(folder / f"{k}.ppm")
        target1 = F.oriented_size(other.shape, size_hw)
        H = F.adapt_homography(read_homography(folder / f"H_1_{k}"),
                               reference.shape, target0, other.shape, target1)
        yield Pair(f"{folder.name} 1-{k}", "1", image0, str(k),
                   cv2.resize(other, target1[::-1], interpolation=cv2.INTER_AREA), H)


def synthetic_pairs(images: list[Path], num_pairs: int, seed: int, warp_conf: dict,
                    size_hw=SIZE_HW) -> Iterator[Pair]:
    """Pair i: image i mod len(images) and its random warp, both photometrically changed.

    Each pair has its own generator seeded by (seed, i), so pair i does not depend on
    how many pairs are drawn.
    """
    from vo.datasets.real_images import load_gray
    from vo.datasets.synthetic_shapes import photometric_augment

    for i in range(num_pairs):
        path = images[i % len(images)]
        rng = np.random.default_rng([seed, i])
        try:
            image = load_gray(path, size_hw)
        except OSError as e:
            raise InputError(str(e)) from None
        H = sample_homography(size_hw, rng, **warp_conf)
        warped = warp_image(image, H)
        yield Pair(f"{path.stem} #{i}", f"{i}a", photometric_augment(rng, image),
                   f"{i}b", photometric_augment(rng, warped), H)


# ----------------------------------------------------------------------------- metrics of one pair

def as_numpy(feats: dict) -> dict:
    """Extractor output (torch or numpy) -> numpy keypoints (N,2), scores, descriptors."""
    to_np = lambda x: x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return {k: to_np(feats[k]) for k in ("keypoints", "scores", "descriptors")}


def keep_shared(feats: dict, H: np.ndarray, other_hw) -> dict:
    """The features whose keypoints H maps into the other image (rpautrat's keep_shared_points)."""
    mask = F.shared_view_mask(feats["keypoints"], H, other_hw)
    return {k: np.asarray(feats[k])[mask] for k in ("keypoints", "scores", "descriptors")}


def evaluate_pair(feats0: dict, feats1: dict, H: np.ndarray, shape0, shape1, matcher,
                  detector_only: bool = False) -> dict:
    """All metrics of one pair; descriptor metrics are None for a detector-only method."""
    kp0, kp1 = feats0["keypoints"], feats1["keypoints"]
    record = {
        "repeatability": F.repeatability(kp0, kp1, H, shape0, shape1),
        "loc_errors": F.localization_errors(kp0, kp1, H, shape0, shape1),
        "num_shared": (F.shared_view_mask(kp0, H, shape1).sum()
                       + F.shared_view_mask(kp1, np.linalg.inv(H), shape0).sum()) / 2,
    }
    if detector_only:
        return record
    shared0, shared1 = keep_shared(feats0, H, shape1), keep_shared(feats1, np.linalg.inv(H), shape0)
    matches = matcher.match(shared0, shared1)["matches"]
    record.update(
        corner_errors=F.corner_errors(shared0["keypoints"], shared1["keypoints"], matches, H, shape0),
        ransac_draw_errors=F.ransac_draw_errors(shared0["keypoints"], shared1["keypoints"], matches, H, shape0),
        right_fit_error=F.right_matches_fit_error(shared0["keypoints"], shared1["keypoints"], matches, H, shape0),
        nn_map=F.nn_map(shared0["descriptors"], shared1["descriptors"],
                        shared0["keypoints"], shared1["keypoints"], H),
        matching_score=F.matching_score(shared0["keypoints"], shared1["keypoints"], matches,
                                        H, shape0, shape1),
    )
    return record


def summarize(records: list[dict]) -> dict:
    """Dataset values: means over pairs, except the MLE pooled over all correspondences
    (rpautrat's compute_loc_error). Pairs where a metric is undefined (NaN) are skipped."""
    nanmean = lambda values: float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    errors = np.concatenate([r["loc_errors"] for r in records]) if records else np.zeros(0)
    summary = {
        "pairs": len(records),
        "repeatability": nanmean(np.array([r["repeatability"] for r in records], float)),
        "mle": float(errors.mean()) if len(errors) else float("nan"),
        "keypoints": nanmean(np.array([r["num_shared"] for r in records], float)),
    }
    if records and "corner_errors" in records[0]:
        summary.update(F.homography_accuracies([r["corner_errors"] for r in records]))
        summary["h_acc_right_3"] = F.homography_accuracy([r["right_fit_error"] for r in records], 3)
        summary["h_acc_draws_3"] = F.expected_homography_accuracy([r["ransac_draw_errors"] for r in records], 3)
        summary["nn_map"] = nanmean(np.array([r["nn_map"] for r in records], float))
        summary["matching_score"] = nanmean(np.array([r["matching_score"] for r in records], float))
    return summary


def extract_cached(cache: dict, key: str, image: np.ndarray, extract) -> dict:
    if key not in cache:
        cache[key] = as_numpy(extract(image))
    return cache[key]


def evaluate_dataset(methods: list[Method], pairs: list[Pair], matcher=None, progress=None) -> dict:
    """{method name: summary} over ``pairs``; each image is extracted once per method."""
    from models.nn_matcher import MutualNN

    matcher = matcher or MutualNN(ratio=None)
    records = {m.name: [] for m in methods}
    for method in methods:
        cache: dict[str, dict] = {}
        for pair in pairs:
            feats0 = extract_cached(cache, pair.key0, pair.image0, method.extract)
            feats1 = extract_cached(cache, pair.key1, pair.image1, method.extract)
            records[method.name].append(evaluate_pair(feats0, feats1, pair.H, pair.image0.shape,
                                                      pair.image1.shape, matcher, method.detector_only))
            if progress is not None:
                progress.update(1)
    return {name: summarize(recs) for name, recs in records.items()}


# ----------------------------------------------------------------------------- report

COLUMNS = (("repeatability", "Rep."), ("mle", "MLE"), ("h_acc_1", "H ε=1"), ("h_acc_3", "H ε=3"),
           ("h_acc_5", "H ε=5"), ("h_acc_draws_3", f"RANSAC x{F.RANSAC_DRAWS} ε=3"),
           ("h_acc_magsac_1", "MAGSAC++ ε=1"), ("h_acc_magsac_3", "MAGSAC++ ε=3"),
           ("h_acc_magsac_5", "MAGSAC++ ε=5"), ("h_acc_right_3", "right-LS ε=3"), ("nn_map", "NN mAP"),
           ("matching_score", "M. score"), ("keypoints", "kp"))


def format_value(key: str, value) -> str:
    if value is None:
        return "-"
    if np.isnan(value):
        return "n/a"
    if key == "keypoints":
        return f"{value:.0f}"
    return f"{value:.3f}"


def format_table(title: str, summaries: dict, reference: dict | None = None) -> str:
    """A markdown table, one row per method; '-' where a metric does not apply."""
    header = "| Method | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [f"### {title}", "", header, "|" + "---|" * (len(COLUMNS) + 1)]
    rows = list(summaries.items()) + ([("*paper: SuperPoint, all HPatches*", reference)] if reference else [])
    for name, summary in rows:
        lines.append(f"| {name} | " + " | ".join(format_value(k, summary.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vo.evaluate_features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--superpoint", action="append", metavar="PATH", default=None,
                        help="SuperPoint weights (repeatable; default: the shipped weights/superpoint_*.pth)")
    parser.add_argument("--magicpoint", metavar="PATH",
                        help="MagicPoint weights (default: the shipped weights/magicpoint_*.pth)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--pairs", type=int, default=24, help="random-homography pairs per warp strength (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random homographies (default 0)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--threshold", type=float, default=0.005,
                        help="detection threshold of MagicPoint/SuperPoint (default 0.005, as released)")
    parser.add_argument("--nms", type=int, default=4, metavar="R",
                        help="NMS radius of MagicPoint/SuperPoint in px (default 4, as released)")
    parser.add_argument("--min-curvature", type=float, default=None, metavar="C",
                        help="SuperPoint: drop peaks whose log-heatmap curves less than C along its flattest axis "
                             "(default: keep all)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, metavar="S",
                        help="SuperPoint image scales, e.g. 1 0.7 (default: 1 only); the best 1000 of all are kept")
    parser.add_argument("--antialias", action="store_true",
                        help="SuperPoint: anti-aliased pooling, for files trained with it (vo.train superpoint "
                             "--set antialias=true; default: plain pooling, as every shipped file)")
    args = parser.parse_args(argv)
    if args.scales:
        from models.superpoint import checked_scales
        try:
            checked_scales(args.scales)
        except ValueError as e:
            parser.error(f"--scales {e}")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.nms < 0:
        parser.error("--nms must be 0 or more")
    if args.out and not args.out.parent.is_dir():   # fail now, not after minutes of evaluation
        parser.exit(EXIT_BAD_INPUT, f"error: {args.out.parent}: output folder not found\n")
    return args


def superpoint_method(name: str, weights, detector_only: bool, threshold: float = 0.005, scales=(1.0,),
                      nms_radius: int = 4, min_peak_curvature: float | None = None, antialias: bool = False) -> Method:
    from models.superpoint import SuperPoint
    # fp32 on purpose: the metrics describe the network, not a reduced-precision run.
    model = SuperPoint(weights=weights, max_keypoints=MAX_KEYPOINTS, keypoint_threshold=threshold, precision="fp32",
                       scales=tuple(scales), nms_radius=nms_radius, min_peak_curvature=min_peak_curvature,
                       antialias=antialias)
    return Method(name, model.extract, detector_only)


def build_methods(args) -> tuple[list[Method], list[str]]:
    """The methods to run and one-line notes about those skipped."""
    from models.classical import ORB, SIFT
    from models.weights import default_weights_or_none

    methods, notes = [], []
    shipped = {kind: default_weights_or_none(f"{kind}_*.pth") for kind in ("magicpoint", "superpoint")}
    magicpoint = args.magicpoint or shipped["magicpoint"]
    if magicpoint is None:
        notes.append("MagicPoint: no shipped weights/magicpoint_*.pth; skipped (pass --magicpoint PATH)")
    else:
        methods.append(superpoint_method(f"MagicPoint ({magicpoint})", magicpoint, detector_only=True,
                                         threshold=args.threshold, nms_radius=args.nms))
    superpoints = args.superpoint or ([shipped["superpoint"]] if shipped["superpoint"] else [])
    if not superpoints:
        notes.append("SuperPoint: no shipped weights/superpoint_*.pth; skipped (pass --superpoint PATH)")
    scales = tuple(args.scales or (1.0,))
    settings = f", scales {' '.join(f'{s:g}' for s in scales)}" if args.scales else ""
    settings += f", threshold {args.threshold:g}" if args.threshold != 0.005 else ""
    settings += f", NMS {args.nms}" if args.nms != 4 else ""
    settings += f", curvature >= {args.min_curvature:g}" if args.min_curvature is not None else ""
    settings += ", anti-aliased" if args.antialias else ""
    for path in superpoints:
        methods.append(superpoint_method(f"SuperPoint ({path}{settings})", path, detector_only=False,
                                         threshold=args.threshold, scales=scales, nms_radius=args.nms,
                                         min_peak_curvature=args.min_curvature, antialias=args.antialias))
    methods += [Method("ORB", ORB(max_keypoints=MAX_KEYPOINTS).extract),
                Method("SIFT", SIFT(max_keypoints=MAX_KEYPOINTS).extract)]
    return methods, notes


def build_datasets(args) -> dict[str, list[Pair]]:
    from vo.datasets.real_images import held_out_images

    if not args.data.is_dir():
        raise InputError(f"{args.data}: data folder not found")
    datasets = {"HPatches v_churchill (1 vs 2..6)": list(hpatches_pairs(args.data.joinpath(*HPATCHES_SEQUENCE)))}
    held_out = held_out_images(args.data)
    if not held_out:
        raise InputError(f"{args.data / 'images/natural/Kodak24'}: no held-out images found")
    for warp, conf in WARPS.items():
        title = f"Kodak24 (held out), random homographies '{warp}' + photometric, {args.pairs} pairs, seed {args.seed}"
        datasets[title] = list(synthetic_pairs(held_out, args.pairs, args.seed, conf))
    return datasets


def run(args) -> str:
    from models.weights import WeightsError

    try:
        methods, notes = build_methods(args)
    except WeightsError as e:
        raise InputError(str(e)) from None
    datasets = build_datasets(args)
    total = len(methods) * sum(len(pairs) for pairs in datasets.values())
    tables = []
    with tqdm(total=total, desc="evaluate features", unit="pair", file=sys.stderr) as progress:
        for title, pairs in datasets.items():
            summaries = evaluate_dataset(methods, pairs, progress=progress)
            reference = PAPER_SUPERPOINT if title.startswith("HPatches") else None
            tables.append(format_table(title, summaries, reference))
    legend = (f"Images at 480x640 (HPatches portrait at 640x480), at most {MAX_KEYPOINTS} keypoints; "
              "correct = within 3 px; H ε = fraction of pairs with mean corner error <= ε px "
              "(the paper's plain RANSAC and MAGSAC++, both 3 px, on the same mutual-NN matches); RANSAC "
              f"x{F.RANSAC_DRAWS} = plain RANSAC's expected accuracy over {F.RANSAC_DRAWS} orderings of the matches "
              "(its first draw is the H ε column's run); right-LS = a "
              "least-squares fit to the matches that are right by the truth (no estimator: what the matches allow); "
              "MLE in px; kp = mean keypoints per image in the shared view. "
              # SIFT, ORB and both estimators are OpenCV's, and its releases move them (5.x's plain RANSAC
              # no longer refits H on its inliers), so runs compare only at the same version.
              f"OpenCV {cv2.__version__}.")
    return "\n\n".join(notes + [legend] + tables) + "\n"


def main(argv: list[str] | None = None) -> int:
    return print_report(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

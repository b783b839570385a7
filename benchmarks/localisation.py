"""Keypoint localisation by cause: how far SuperPoint's keypoints move against SIFT's.

    python benchmarks/localisation.py [--superpoint FILE] [--images 24] [--threshold 0.05] [--scales 1 0.7]

On held-out Kodak24 images at 480x640 (those of `vo.evaluate_features`), each image is
detected again after one change, and the keypoints are compared through the known
geometry: the mean and median distance of the correspondences within 3 px, pooled over
images (the MLE of `vo.evaluate_features`). The changes, one cause each:

  * shift: the image moved by 1..7 whole pixels (across and down). An ideal detector moves
    exactly with it, as SIFT does; what a network leaves is its 8-pixel grid's aliasing;
  * photometric: the training pairs' photometric change on both images, no geometry;
  * warp: a random homography of the training pairs (`pair_conf`), no photometric change;
  * both: warp and photometric change, as `vo.evaluate_features`' Kodak 'pair' set.

SIFT is the baseline, measured in the same run; the ratio is SuperPoint's mean over SIFT's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vo.eval.features import localization_errors  # noqa: E402
from vo.evaluate_features import DEFAULT_DATA, MAX_KEYPOINTS, SIZE_HW, superpoint_method  # noqa: E402
from vo.geometry.homography import pair_conf, sample_homography, warp_image  # noqa: E402

MARGIN = 8     # px cut from every side, so that a shifted crop stays inside the image
CHANGES = ("shift", "photometric", "warp", "both")


def changed_pair(image: np.ndarray, change: str, index: int, seed: int):
    """(image 0, image 1, H from 0 to 1) for one cause of keypoint motion."""
    from vo.datasets.synthetic_shapes import photometric_augment

    rng = np.random.default_rng([seed, index])
    if change == "shift":
        d = 1 + index % 7
        m = MARGIN
        first = image[m:-m, m:-m]
        moved = image[m - d:image.shape[0] - m - d, m - d:image.shape[1] - m - d]   # content moved by +d
        return first, moved, np.array([[1.0, 0, d], [0, 1, d], [0, 0, 1]])
    H = sample_homography(image.shape, rng, **pair_conf) if change in ("warp", "both") else np.eye(3)
    first, second = image, warp_image(image, H)
    if change in ("photometric", "both"):
        first, second = photometric_augment(rng, first), photometric_augment(rng, second)
    return first, second, H


def localisation(extract, images: list[np.ndarray], change: str, seed: int) -> np.ndarray:
    """All correspondence distances (px) of ``extract`` over the images under ``change``."""
    errors = []
    for i, image in enumerate(images):
        first, second, H = changed_pair(image, change, i, seed)
        kp0 = np.asarray(extract(first)["keypoints"])
        kp1 = np.asarray(extract(second)["keypoints"])
        errors.append(localization_errors(kp0, kp1, H, first.shape, second.shape))
    return np.concatenate(errors)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superpoint", metavar="FILE", help="SuperPoint weights (default: the shipped default)")
    parser.add_argument("--antialias", action="store_true", help="anti-aliased pooling (files trained with it)")
    parser.add_argument("--images", type=int, default=24, help="held-out images (default 24, all of Kodak24)")
    parser.add_argument("--threshold", type=float, default=0.05, help="SuperPoint detection threshold (default 0.05)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.7], help="SuperPoint scales (default 1 0.7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from models.classical import SIFT
    from models.weights import WeightsError, default_weights
    from vo.datasets.real_images import held_out_images, load_gray

    args = parse_args(argv)
    paths = held_out_images(args.data)[:args.images]
    if not paths:
        print(f"error: {args.data / 'images/natural/Kodak24'}: no held-out images found", file=sys.stderr)
        return 2
    try:
        weights = args.superpoint or default_weights("superpoint_*.pth")
        superpoint = superpoint_method("SuperPoint", weights, False, args.threshold, args.scales,
                                       antialias=args.antialias)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = [load_gray(p, SIZE_HW) for p in paths]
    methods = {"SuperPoint": superpoint.extract, "SIFT": SIFT(max_keypoints=MAX_KEYPOINTS).extract}
    print(f"SuperPoint {weights}, threshold {args.threshold:g}, scales {' '.join(f'{s:g}' for s in args.scales)}; "
          f"{len(images)} Kodak24 images at {SIZE_HW[0]}x{SIZE_HW[1]}, {MAX_KEYPOINTS} keypoints")
    print("| change | SuperPoint mean / median px | SIFT mean / median px | ratio of means |")
    print("|---|---|---|---|")
    for change in tqdm(CHANGES, desc="changes", file=sys.stderr):
        errors = {name: localisation(extract, images, change, args.seed) for name, extract in methods.items()}
        sp, sift = errors["SuperPoint"], errors["SIFT"]
        ratio = f"{sp.mean() / sift.mean():.2f}" if sift.mean() > 0.05 else "- (SIFT ~0)"
        print(f"| {change} | {sp.mean():.3f} / {np.median(sp):.3f} | {sift.mean():.3f} / {np.median(sift):.3f} "
              f"| {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

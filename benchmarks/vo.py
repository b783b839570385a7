"""End-to-end VO benchmark: ATE and FPS on KITTI 06 and TUM fr3/teddy, per frontend.

    python benchmarks/vo.py                       # every row
    python benchmarks/vo.py --rows kitti-stereo tum-rgbd --frontends orb+mnn
    python benchmarks/vo.py --json results.json
    python benchmarks/vo.py --rows kitti-mono --seeds 9   # median ATE and its spread over 9 RANSAC seeds (mono: 5)
    python benchmarks/vo.py --rows kitti-mono --starts 9  # ... over starts at frames 0..8 (other initialisations)

ATE is the RMSE of positions after SE(3) alignment (Sim(3) for monocular runs), on the
frames that have ground truth (TUM: nearest stamp within 20 ms). FPS is end to end:
reading frames, feature extraction (both images in stereo) and tracking.
Data: KITTI odometry (Geiger et al., CVPR 2012, CC BY-NC-SA 3.0) and TUM RGB-D
(Sturm et al., IROS 2012, CC BY 4.0), read from ../shared/data beside the checkout.
"""
from __future__ import annotations

import os

# Small matrix products run faster on one BLAS thread, and the CPU is shared: threads
# contend. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import build_extractor, build_matcher  # noqa: E402
from models.superpoint import checked_scales  # noqa: E402
from models.weights import WeightsError, superglue_pair  # noqa: E402
from vo.datasets import StartAt, open_source  # noqa: E402
from vo.eval.metrics import evaluate  # noqa: E402
from vo.eval.trajectory import Trajectory, associate  # noqa: E402
from vo.pipeline import run  # noqa: E402
from vo.cli import UsageError, tracker_config  # noqa: E402
from vo.tracker import TrackerConfig  # noqa: E402

DATA = Path(os.environ.get("VO_SHARED_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class Row:
    name: str
    path: str          # under DATA
    mode: str
    target_ate: float  # metres; monocular targets are twice the metric ones


ROWS = {
    "kitti-stereo": Row("KITTI 06", "kitti/sequences/06", "stereo", 0.15),
    "kitti-mono": Row("KITTI 06", "kitti/sequences/06", "mono", 0.30),
    "tum-rgbd": Row("TUM teddy", "tum/rgbd_dataset_freiburg3_teddy", "rgbd", 0.015),
    "tum-mono": Row("TUM teddy", "tum/rgbd_dataset_freiburg3_teddy", "mono", 0.030),
}
FRONTENDS = {
    "orb+mnn": ("orb", "mnn"),
    "sift+mnn": ("sift", "mnn"),
    "superpoint+mnn": ("superpoint", "mnn"),
    "superpoint+superglue": ("superpoint", "superglue"),
}
TARGET_FPS = 5.0
# A monocular run's ATE turns on its two-view start, so one run is a draw (the same code spans 1.5-10 cm over
# starts on KITTI 06): like ORB-SLAM's papers, monocular rows report the median of five runs (RANSAC seeds 0..4).
MONO_SEEDS = 5


def build_frontend(name: str, weights: dict[str, str | None] | None = None, superpoint_conf: dict | None = None):
    """``weights`` maps 'superpoint' / 'superglue' to a file; None means the shipped default.
    ``superpoint_conf`` overrides SuperPoint's configuration (e.g. ``scales``)."""
    extractor, matcher = FRONTENDS[name]
    weights = dict(weights or {})
    if matcher == "superglue" and extractor == "superpoint":   # the pair that learnt each other
        weights["superpoint"], weights["superglue"] = superglue_pair(weights.get("superpoint"),
                                                                     weights.get("superglue"))
    extractor_kw = {"weights": weights[extractor]} if weights.get(extractor) else {}
    if extractor == "superpoint":
        extractor_kw.update(superpoint_conf or {})
    matcher_kw = {"weights": weights[matcher]} if weights.get(matcher) else {}
    return build_extractor(extractor, **extractor_kw), build_matcher(matcher, **matcher_kw)


def ate_of(result, source, mode: str) -> float:
    stamps, poses = source.ground_truth
    est, ref = associate(Trajectory(result.stamps, result.poses), Trajectory(stamps, poses), max_diff=0.02)
    return evaluate(est, ref, "sim3" if mode == "mono" else "se3").ate.rmse


def run_row(row: Row, frontend: str, max_frames: int | None, weights: dict | None = None,
            config: TrackerConfig | None = None, seeds: int = 1, starts: int = 1,
            superpoint_conf: dict | None = None) -> dict:
    """One row with one frontend; with ``seeds`` > 1 it runs once per RANSAC seed
    (``TrackerConfig.seed`` 0, 1, ...: the PnP and, in mono, the two-view
    initialisation RANSAC), with ``starts`` > 1 once per first frame 0, 1, ... (each seed);
    it reports the median ATE and all of them (``ate_runs``). A run's ATE covers its own frames."""
    out = {"row": f"{row.name} {row.mode}", "frontend": frontend, "target_ate": row.target_ate}
    try:
        extractor, matcher = build_frontend(frontend, weights, superpoint_conf)
    except (WeightsError, FileNotFoundError) as e:
        return {**out, "skipped": f"no weights ({str(e).splitlines()[0]})"}
    source = open_source(str(DATA / row.path))
    config = config or TrackerConfig()
    runs = []
    for start in range(starts):
        for seed in range(seeds):
            result = run(StartAt(source, start), row.mode, extractor, matcher,
                         replace(config, seed=config.seed + seed), max_frames=max_frames)
            runs.append((ate_of(result, source, row.mode), result))
    ate, result = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]   # the median run
    return {**out, "ate": ate, "ate_runs": [a for a, _ in runs], "start_frames": [first_start(r) for _, r in runs],
            "fps": result.fps, "frames": result.num_frames,
            "keyframes": result.num_keyframes, "lost": result.count("lost"),
            "segments": result.count("new_segment"), "interrupted": result.interrupted,
            "error": result.error, "timings_ms": result.timings_ms}


def first_start(result) -> int | None:
    """The frame at which the tracker first initialised (mono: the second frame of its two-view start)."""
    return next((index for index, name in result.events if name == "initialised"), None)


def format_table(results: list[dict]) -> str:
    lines = [f"{'sequence':<18}{'frontend':<22}{'ATE':>10}{'target':>9}{'FPS':>7}{'frames':>8}"
             f"{'KFs':>6}{'lost':>6}  verdict"]
    for r in results:
        head = f"{r['row']:<18}{r['frontend']:<22}"
        if "skipped" in r:
            lines.append(head + f"skipped: {r['skipped']}")
            continue
        lines.append(head + f"{ate_text(r['ate']):>10}{ate_text(r['target_ate']):>9}{r['fps']:>7.1f}"
                     f"{r['frames']:>8}{r['keyframes']:>6}{r['lost']:>6}  {verdict(r)}"
                     + (f"  ({r['error']})" if r["error"] else "") + spread_text(r))
    return "\n".join(lines)


def spread_text(r: dict) -> str:
    """Over several runs (seeds, starts): the ATE range, and each run's ATE with the frame at
    which it initialised (the monocular start is where runs part ways)."""
    ate_runs = r.get("ate_runs", [])
    if len(ate_runs) < 2:
        return ""
    per_run = ", ".join(f"{ate_text(a)} @{f}" for a, f in zip(ate_runs, r.get("start_frames", [])))
    return f"  ATE over {len(ate_runs)} runs {ate_text(min(ate_runs))} - {ate_text(max(ate_runs))} [{per_run}]"


def verdict(r: dict) -> str:
    misses = [what for what, missed in (("ATE", r["ate"] > r["target_ate"]), ("FPS", r["fps"] < TARGET_FPS),
                                        ("interrupted", r["interrupted"])) if missed]
    return "ok" if not misses else "MISSED " + ", ".join(misses)


def ate_text(metres: float) -> str:
    return f"{100 * metres:.2f} cm" if metres < 0.1 else f"{metres:.3f} m"


def format_ratios(results: list[dict], baseline: str = "orb+mnn") -> str:
    """ATE and FPS of each frontend relative to the baseline on the same row."""
    base = {r["row"]: r for r in results if r["frontend"] == baseline and "ate" in r}
    lines = [f"ratios to {baseline} (ATE: lower is better, FPS: higher is better)"]
    for r in results:
        if r["frontend"] == baseline or "ate" not in r or r["row"] not in base:
            continue
        b = base[r["row"]]
        lines.append(f"  {r['row']:<18}{r['frontend']:<22}ATE x{r['ate'] / b['ate']:.2f}   "
                     f"FPS x{r['fps'] / b['fps']:.2f}")
    return "\n".join(lines) if len(lines) > 1 else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--frontends", nargs="+", choices=list(FRONTENDS), default=list(FRONTENDS))
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--superpoint-weights", default=None, help="default: the shipped weights")
    parser.add_argument("--superglue-weights", default=None, help="default: the shipped weights")
    parser.add_argument("--superpoint-scales", type=float, nargs="+", default=None, metavar="S",
                        help="SuperPoint image scales, e.g. 1 0.7 (run_vo.py --scales; default: 1 only)")
    parser.add_argument("--triangulation", choices=("epipolar", "matcher"), default="epipolar",
                        help="how keyframes are paired for new points (TrackerConfig.triangulation_matching)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="TrackerConfig fields, e.g. triangulation_min_baseline_depth_ratio=0.02 ba.window=10")
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs per row with RANSAC seeds 0..N-1 (PnP, mono initialisation): median ATE and its "
                             f"spread (default: {MONO_SEEDS} for monocular rows, 1 for stereo and RGB-D)")
    parser.add_argument("--starts", type=int, default=1,
                        help="runs per row (and seed) starting at frames 0..N-1: other initialisations, same spread")
    args = parser.parse_args(argv)
    if args.superpoint_scales:
        try:
            checked_scales(args.superpoint_scales)
        except ValueError as e:
            parser.error(f"--superpoint-scales {e}")
    try:
        config = tracker_config(args)
    except UsageError as e:
        parser.error(str(e))
    weights = {"superpoint": args.superpoint_weights, "superglue": args.superglue_weights}
    superpoint_conf = {"scales": tuple(args.superpoint_scales)} if args.superpoint_scales else {}
    results = []
    for row_name in args.rows:
        for frontend in args.frontends:
            row = ROWS[row_name]
            seeds = args.seeds or (MONO_SEEDS if row.mode == "mono" else 1)
            results.append(run_row(row, frontend, args.max_frames, weights, config, seeds, args.starts,
                                   superpoint_conf))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(results))
    ratios = format_ratios(results)
    if ratios:
        print(ratios)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

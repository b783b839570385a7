"""Before / after self-improvement: PnP success at frame gaps and VO ATE, base vs fine-tuned detector.

    python -m vo.evaluate_selfimproving --base weights/superpoint_v1.pth --finetuned runs/superpointvo/superpointvo.pth
    python -m vo.evaluate_selfimproving --base A.pth --finetuned B.pth --sequences ../shared/data/kitti/sequences/06 \\
        --gaps 5 10 20 --extra orb --labels runs/selflabel

- PnP success (Self-Improving VO, DeTone et al. 2018, Table 1; ``vo/eval/pnp.py``): 3D points of
  frame i from depth (TUM) or stereo (KITTI), mutual-NN matches to frame i + gap, PnP RANSAC;
  success when the pose is within 5 deg and 5 cm (TUM) or 1 % of the distance travelled (KITTI)
  of the ground truth. First frames are taken every ``--stride`` frames (default: ~20 per sequence).
- VO ATE: ``vo.pipeline.run`` with each detector and mutual-NN matching, ATE as ``run_vo.py``
  reports it (SE(3)-aligned RMSE, ``vo.eval.metrics``).

Both detectors run on the same frames in the same run; ``--extra orb`` adds reference columns.
Default sequences: the shared TUM fr3/teddy (RGB-D) and KITTI 06 (stereo), the only ones with
depth or stereo in ../shared/data. Teddy is also the bundled sample's sequence: if the labels
came from it (``--labels DIR`` checks the manifest), its numbers are not held out.
Data: KITTI odometry (Geiger et al., CVPR 2012, CC BY-NC-SA 3.0), TUM RGB-D (Sturm et al., IROS 2012, CC BY 4.0).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):   # before numpy: a shared CPU, small products
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from vo.cli import UsageError, run_reporting_bad_input  # noqa: E402
from vo.datasets.real_images import DEFAULT_DATA  # noqa: E402

DEFAULT_SEQUENCES = ("tum/rgbd_dataset_freiburg3_teddy", "kitti/sequences/06")
DEFAULT_GAPS = (5, 10, 20)
MAX_ROTATION_DEG = 5.0
TUM_MAX_TRANSLATION = 0.05        # metres
KITTI_MAX_TRANSLATION_RATIO = 0.01  # of the distance travelled over the gap
PAIRS_PER_GAP = 20                # the default stride aims at about this many first frames


@dataclass
class Detector:
    name: str        # column title
    spec: str        # weights path or 'orb' / 'sift'
    extractor: object


@dataclass
class SequenceResult:
    name: str
    kind: str
    mode: str
    stride: int
    threshold: str
    pnp: dict = field(default_factory=dict)     # detector name -> {gap: GapSummary}
    ate: dict = field(default_factory=dict)     # detector name -> (rmse metres or None, frames, note)
    seconds: dict = field(default_factory=dict)  # detector name -> wall time


def build_detector(name: str, spec: str, max_keypoints: int) -> Detector:
    """A weights file (SuperPoint layout) or a classical detector name."""
    from models import build_extractor
    if spec.lower() in ("orb", "sift"):
        return Detector(name, spec, build_extractor(spec.lower(), max_keypoints=max(max_keypoints, 1500)))
    if not Path(spec).is_file():
        raise UsageError(f"{spec}: weights file not found")
    return Detector(name, spec, build_extractor("superpoint", weights=spec, max_keypoints=max_keypoints))


def labelled_sources(labels_dir: str | None) -> list[Path]:
    """The sequences a vo.selflabel run labelled (from its manifest.json)."""
    if not labels_dir:
        return []
    from vo.selflabel.labels import MANIFEST, load_manifest
    if not (Path(labels_dir) / MANIFEST).is_file():
        raise UsageError(f"{Path(labels_dir) / MANIFEST}: no self-labelling manifest")
    return [Path(s["source"]).resolve() for s in load_manifest(labels_dir)["sequences"] if s.get("source")]


def pnp_thresholds(kind: str) -> dict:
    if kind == "kitti":
        return {"max_translation": None, "max_translation_ratio": KITTI_MAX_TRANSLATION_RATIO}
    return {"max_translation": TUM_MAX_TRANSLATION, "max_translation_ratio": None}


def threshold_text(kind: str) -> str:
    if kind == "kitti":
        return f"rot < {MAX_ROTATION_DEG:g} deg, trans < {100 * KITTI_MAX_TRANSLATION_RATIO:g} % of the distance travelled"
    return f"rot < {MAX_ROTATION_DEG:g} deg, trans < {100 * TUM_MAX_TRANSLATION:g} cm"


def auto_stride(count: int, gaps) -> int:
    return max(1, (count - min(gaps)) // PAIRS_PER_GAP)


def evaluate_sequence(path: str, detectors: list[Detector], gaps, stride: int | None, vo: bool,
                      vo_frames: int | None) -> SequenceResult:
    from models import build_matcher
    from vo.cli import evaluate_ate
    from vo.datasets import open_source
    from vo.eval import pnp
    from vo.pipeline import run
    from vo.tracker import TrackerConfig
    source = open_source(path)
    mode = next((m for m in source.modes if m in ("rgbd", "stereo")), None)
    if mode is None:
        raise UsageError(f"{path}: no depth or stereo (modes {', '.join(source.modes)}); PnP needs 3D points")
    if source.ground_truth is None:
        raise UsageError(f"{path}: no ground truth")
    count = source.frame_count(mode)
    stride = stride or auto_stride(count, gaps)
    out = SequenceResult(source.name, source.kind, mode, stride, threshold_text(source.kind))
    for det in detectors:
        t0 = time.perf_counter()
        results = pnp.evaluate_pnp(source, mode, det.extractor, gaps, stride, max_rotation_deg=MAX_ROTATION_DEG,
                                   **pnp_thresholds(source.kind))
        out.pnp[det.name] = pnp.summarise(results, MAX_ROTATION_DEG)
        if vo:
            matcher = build_matcher("mnn", ratio=0.9 if det.spec.lower() == "sift" else None)
            result = run(source, mode, det.extractor, matcher, TrackerConfig(), max_frames=vo_frames)
            report = evaluate_ate(result, source)
            note = f"stopped: {result.error}" if result.interrupted else ""
            out.ate[det.name] = (report.stats.rmse if report else None, result.num_frames, note)
        out.seconds[det.name] = time.perf_counter() - t0
        print(f"  {source.name} {mode}: {det.name} done in {out.seconds[det.name]:.0f} s", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- tables

def rate_text(summary) -> str:
    if summary is None or summary.pairs == 0:
        return "n/a"
    return f"{summary.rate:.3f} ({summary.successes}/{summary.pairs})"


def ate_text(metres) -> str:
    if metres is None:
        return "n/a"
    return f"{100 * metres:.2f} cm" if metres < 1.0 else f"{metres:.3f} m"


def change_text(base, finetuned, kind: str) -> str:
    if base is None or finetuned is None or (isinstance(base, float) and not np.isfinite(base)):
        return "n/a"
    if kind == "rate":
        return f"{finetuned - base:+.3f}"
    return f"x{finetuned / base:.2f}" if base > 0 else "n/a"


def before_after_table(results: list[SequenceResult], names: list[str], gaps) -> str:
    """Markdown: one row per sequence and metric, a column per detector, then fine-tuned vs base."""
    base, tuned = names[0], names[1]
    lines = ["| sequence | metric | " + " | ".join(names) + " | change |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for r in results:
        label = f"{r.name} ({r.mode})"
        for gap in gaps:
            cells = [rate_text(r.pnp[n].get(gap)) for n in names]
            rates = [r.pnp[n][gap].rate if r.pnp[n].get(gap) and r.pnp[n][gap].pairs else None for n in (base, tuned)]
            lines.append(f"| {label} | PnP success, gap {gap} | " + " | ".join(cells)
                         + f" | {change_text(*rates, 'rate')} |")
        if r.ate:
            cells = [ate_text(r.ate[n][0]) + (f" ({r.ate[n][2]})" if r.ate[n][2] else "") for n in names]
            lines.append(f"| {label} | VO ATE, {r.ate[base][1]} frames | " + " | ".join(cells)
                         + f" | {change_text(r.ate[base][0], r.ate[tuned][0], 'ratio')} |")
    if len(results) > 1:
        for gap in gaps:
            means = []
            for n in names:
                rates = [r.pnp[n][gap].rate for r in results if r.pnp[n].get(gap) and r.pnp[n][gap].pairs]
                means.append(float(np.mean(rates)) if rates else None)
            cells = ["n/a" if m is None else f"{m:.3f}" for m in means]
            lines.append(f"| mean of sequences | PnP success, gap {gap} | " + " | ".join(cells)
                         + f" | {change_text(means[0], means[1], 'rate')} |")
    return "\n".join(lines)


def per_gap_table(results: list[SequenceResult], names: list[str], gaps) -> str:
    lines = ["| sequence | detector | gap | pairs | success | rotation only | median rot (deg) | median trans (cm) "
             "| median matches | median inliers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for n in names:
            for gap in gaps:
                s = r.pnp[n].get(gap)
                if s is None:
                    continue
                rot_only = f"{s.rotation_successes / s.pairs:.3f}" if s.pairs else "n/a"
                lines.append(f"| {r.name} | {n} | {gap} | {s.pairs} | {rate_text(s)} | {rot_only} | {s.median_rotation_deg:.2f} | "
                             f"{100 * s.median_translation:.1f} | {s.median_matches:.0f} | {s.median_inliers:.0f} |")
    return "\n".join(lines)


def report(results: list[SequenceResult], detectors: list[Detector], gaps, notes: list[str]) -> str:
    names = [d.name for d in detectors]
    out = ["## Self-improvement: before / after", "",
           "Detectors: " + "; ".join(f"{d.name} = `{d.spec}`" for d in detectors), ""]
    out += [before_after_table(results, names, gaps), ""]
    out += ["PnP success: " + "; ".join(f"{r.name} every {r.stride} frames, {r.threshold}" for r in results)
            + ". Change: fine-tuned minus base (PnP), fine-tuned / base (ATE).", ""]
    out += ["### Per gap", "", per_gap_table(results, names, gaps), "",
            f"'rotation only': rotation within {MAX_ROTATION_DEG:g} deg, the paper's ScanNet criterion; "
            "errors of failed PnP count as infinite in the medians."]
    if notes:
        out += [""] + [f"note: {n}" for n in notes]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vo.evaluate_selfimproving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", help="weights before fine-tuning (default: newest weights/superpoint_*.pth)")
    p.add_argument("--finetuned", help="weights after (default: newest weights/superpointvo_*.pth)")
    p.add_argument("--sequences", nargs="+", metavar="PATH",
                   help=f"TUM RGB-D or KITTI folders (default: {' and '.join(DEFAULT_SEQUENCES)} under the shared data)")
    p.add_argument("--data", default=os.environ.get("VO_SHARED_DATA", str(DEFAULT_DATA)),
                   help="the shared data folder, for the default sequences (env VO_SHARED_DATA)")
    p.add_argument("--gaps", nargs="+", type=int, default=list(DEFAULT_GAPS))
    p.add_argument("--stride", type=int, help=f"frames between first frames (default: ~{PAIRS_PER_GAP} per gap)")
    p.add_argument("--extra", nargs="*", default=[], metavar="DETECTOR",
                   help="reference columns: 'orb', 'sift' or weights files")
    p.add_argument("--no-vo", action="store_true", help="PnP success only")
    p.add_argument("--vo-frames", type=int, metavar="N", help="track only the first N frames for the ATE")
    p.add_argument("--max-keypoints", type=int, default=1024)
    p.add_argument("--labels", metavar="DIR", help="a vo.selflabel folder: flags sequences it labelled")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_reporting_bad_input(run, parse_args(argv))


def run(args) -> int:
    from models.weights import default_weights_or_none
    base = args.base or default_weights_or_none("superpoint_*.pth")
    tuned = args.finetuned or default_weights_or_none("superpointvo_*.pth")
    if base is None or tuned is None:
        missing = "--base (no weights/superpoint_*.pth)" if base is None else "--finetuned (no weights/superpointvo_*.pth)"
        raise UsageError(f"give {missing}")
    sequences = args.sequences or [str(Path(args.data) / s) for s in DEFAULT_SEQUENCES]
    for s in sequences:
        if not Path(s).exists():
            raise UsageError(f"{s}: no such sequence")
    detectors = [build_detector("base", base, args.max_keypoints), build_detector("fine-tuned", tuned, args.max_keypoints)]
    detectors += [build_detector(spec if spec.lower() in ("orb", "sift") else Path(spec).stem, spec, args.max_keypoints)
                  for spec in args.extra]
    labelled = labelled_sources(args.labels)
    notes = [f"{s} was self-labelled (see {args.labels}/manifest.json): not held out"
             for s in sequences if Path(s).resolve() in labelled]
    results = []
    for s in sequences:
        print(f"evaluating {s}", file=sys.stderr, flush=True)
        results.append(evaluate_sequence(s, detectors, args.gaps, args.stride, not args.no_vo, args.vo_frames))
    print(report(results, detectors, args.gaps, notes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{
            "sequence": r.name, "mode": r.mode, "stride": r.stride, "threshold": r.threshold,
            "pnp": {n: {str(g): vars(s) for g, s in gs.items()} for n, gs in r.pnp.items()},
            "ate": {n: {"rmse": a[0], "frames": a[1], "note": a[2]} for n, a in r.ate.items()},
            "seconds": r.seconds} for r in results], indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate an estimated trajectory against ground truth.

    python -m vo.evaluate EST GT [--align se3|sim3|none] [--format tum|kitti|euroc]
                          [--gt-format ...] [--delta 1] [--plot FILE.png]

Prints ATE (after alignment), RPE over `delta` frames and, when either file is in KITTI format,
the KITTI devkit t_rel / r_rel. ATE and RPE follow evo_ape / evo_rpe (translation_part, angle_deg).
Problems with the inputs print one line naming the file and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vo.eval.metrics import ALIGNMENTS, EvaluationResult, MetricsError, align, evaluate
from vo.eval.trajectory import FORMATS, Trajectory, TrajectoryError, associate, detect_format, read_trajectory

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("est", help="estimated trajectory")
    parser.add_argument("gt", help="ground-truth trajectory")
    parser.add_argument("--align", choices=ALIGNMENTS, default="se3",
                        help="se3 for stereo / RGB-D, sim3 for monocular (default se3)")
    parser.add_argument("--format", choices=FORMATS, help="format of EST (default: from the file)")
    parser.add_argument("--gt-format", choices=FORMATS, help="format of GT (default: from the file)")
    parser.add_argument("--delta", type=int, default=1, help="RPE delta in frames (default 1)")
    parser.add_argument("--max-diff", type=float, default=0.02, help="max stamp difference to pair poses (s)")
    parser.add_argument("--est-times", help="stamps for a KITTI-format EST (else line index)")
    parser.add_argument("--gt-times", help="stamps for a KITTI-format GT (else line index)")
    parser.add_argument("--plot", help="save a top view of both trajectories to this PNG")
    args = parser.parse_args(argv)
    if args.delta < 1:
        parser.error("--delta must be at least 1")
    return args


def pair_trajectories(est: Trajectory, gt: Trajectory, by_index: bool, args) -> tuple[Trajectory, Trajectory]:
    """KITTI files without stamps pair line by line; everything else by nearest stamp."""
    if not by_index:
        return associate(est, gt, args.max_diff)
    if len(est) != len(gt):
        raise TrajectoryError(f"{args.est}: {len(est)} poses but {args.gt} has {len(gt)}; "
                              f"files without stamps (KITTI) are paired line by line")
    return est, gt


def format_report(result: EvaluationResult, args) -> str:
    ate, rpe_t, rpe_r = result.ate, result.rpe_translation, result.rpe_rotation
    lines = [
        f"{Path(args.est).name} vs {Path(args.gt).name}: {result.num_pairs} pose pairs, "
        f"alignment {result.alignment_method} (scale {result.alignment.scale:.4f})",
        f"ATE  rmse {ate.rmse:.6f} m  mean {ate.mean:.6f}  median {ate.median:.6f}  "
        f"std {ate.std:.6f}  max {ate.max:.6f}",
        f"RPE  trans rmse {rpe_t.rmse:.6f} m  mean {rpe_t.mean:.6f}  max {rpe_t.max:.6f}   "
        f"rot rmse {rpe_r.rmse:.6f} deg  mean {rpe_r.mean:.6f}  max {rpe_r.max:.6f}  (delta {result.delta} frames)",
    ]
    if result.kitti is not None:
        kitti = result.kitti
        if kitti.num_segments == 0:
            lines.append("KITTI t_rel n/a: trajectory shorter than 100 m")
        else:
            lines.append(f"KITTI t_rel {kitti.t_rel:.4f} %  r_rel {kitti.r_rel:.4f} deg/100m  "
                         f"({kitti.num_segments} segments of 100-800 m)")
    return "\n".join(lines)


def run(args) -> str:
    est_format = args.format or detect_format(args.est)
    gt_format = args.gt_format or detect_format(args.gt)
    est = read_trajectory(args.est, est_format, args.est_times)
    gt = read_trajectory(args.gt, gt_format, args.gt_times)
    by_index = (est_format == "kitti" and not args.est_times) or (gt_format == "kitti" and not args.gt_times)
    est, gt = pair_trajectories(est, gt, by_index, args)
    result = evaluate(est, gt, args.align, args.delta, with_kitti="kitti" in (est_format, gt_format))
    report = format_report(result, args)
    if args.plot:
        from vo.viz.plots import plot_trajectory
        aligned, _ = align(est, gt, args.align)
        plot_trajectory(args.plot, aligned.positions, aligned.stamps, gt.positions, result.ate.rmse,
                        f"{Path(args.est).name} ({args.align}-aligned)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except TrajectoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MetricsError as exc:   # message has no file name: the estimate is what is unusable
        print(f"error: {args.est}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as exc:   # --plot without matplotlib installed
        print(f"error: --plot needs matplotlib ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:   # e.g. an unwritable --plot path
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``run_vo.py``: a sequence in, the trajectory (and map, pictures) out.

    python run_vo.py [SOURCE] [--mode mono|stereo|rgbd] [--features superpoint|orb|sift]
                     [--matcher superglue|mnn] [--out FILE --format tum|kitti|euroc] ...

With no SOURCE it runs the bundled sample. Whatever happens (bad frames, Ctrl-C, a crash
mid-run), the trajectory tracked so far is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Before numpy loads (the pipeline imports it): threaded OpenBLAS spin-waits against the
# tracker's own threads on small CPUs and made the tracker's matrix products 50x slower here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_SAMPLE = ROOT / "sequences" / "rgbd_dataset_freiburg3_teddy_sample"
EXIT_BAD_INPUT = 2
FORMAT_SUFFIX = {"tum": ".txt", "kitti": ".txt", "euroc": ".csv"}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_vo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default=None,
                   help="KITTI/TUM/EuRoC folder, image folder, video file or webcam index (default: bundled sample)")
    p.add_argument("--webcam", type=int, metavar="INDEX", help="same as giving the webcam index as SOURCE")
    p.add_argument("--mode", choices=("mono", "stereo", "rgbd"), help="default: the richest the source allows")
    p.add_argument("--features", choices=("superpoint", "superpointvo", "orb", "sift"),
                   help="default: superpoint when its weights are shipped, else orb")
    p.add_argument("--matcher", choices=("superglue", "mnn"),
                   help="SuperGlue (weights/superglue_*.pth) or mutual nearest neighbours; default: SuperGlue for "
                        "SuperPoint features when a shipped SuperGlue learnt them, else mutual NN")
    p.add_argument("--triangulation", choices=("epipolar", "matcher"), default="epipolar",
                   help="pair keyframes for new map points by descriptor search along epipolar lines "
                        "(default) or with the matcher (SuperGlue's context, one call per neighbour)")
    p.add_argument("--weights", metavar="DIR_OR_FILE", help="weights to use instead of the shipped ones")
    p.add_argument("--calib", metavar="FILE", help="calibration YAML (fx, fy, cx, cy, distortion, baseline)")
    p.add_argument("--out", metavar="FILE", help="trajectory file (default: outputs/<sequence>_<mode>.txt)")
    p.add_argument("--format", choices=("tum", "kitti", "euroc"), default="tum")
    p.add_argument("--start-frame", type=int, default=0, metavar="N",
                   help="skip the frames before N (pySLAM's start_frame_id); the map starts there")
    p.add_argument("--max-frames", type=int, metavar="N")
    p.add_argument("--max-keypoints", type=int, default=1024)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="SuperPoint: image scales to detect at, e.g. 1 0.7 (points that match across zoom; "
                        "about 1.5x the extraction time); the best --max-keypoints of all are kept")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the networks (default: the cores not busy with other jobs)")
    p.add_argument("--no-viz", action="store_true", help="no windows (also when no display is found)")
    p.add_argument("--save-map", metavar="FILE.ply", help="map points with colour")
    p.add_argument("--save-video", metavar="FILE.mp4", help="the tracks view, one video frame per input frame")
    p.add_argument("--plot", metavar="FILE.png", help="trajectory against ground truth, with the ATE")
    p.add_argument("--render-map", metavar="FILE.png", help="offscreen render of the map and trajectory")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="tracker options (vo/tracker.py: TrackerConfig), e.g. ransac_max_error=3 ba.window=10")
    return p.parse_args(argv)


@dataclass
class Frontend:
    name: str
    extractor: object
    matcher: object
    weights: tuple[str, ...] = ()    # file names of the networks, for the summary


def shipped(pattern: str, weights: str | None) -> Path | None:
    """The newest file matching ``pattern`` in --weights or weights/; a file --weights names is the
    feature network's (SuperPoint layout). SuperGlue's file comes from ``superglue_files``."""
    if weights and Path(weights).is_file():
        return Path(weights)
    folder = Path(weights) if weights else ROOT / "weights"
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such weights file or folder")
    from models.weights import newest_match
    return newest_match(folder, pattern)


def set_threads(threads: int | None) -> None:
    """Network threads: as asked, else what OMP_NUM_THREADS says, else the idle cores."""
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    from models.runtime import idle_cores
    torch.set_num_threads(threads if threads else idle_cores())


def superglue_files(args) -> tuple[Path | None, Path]:
    """SuperPoint and SuperGlue files for ``--matcher superglue``: ``models.weights.superglue_pair``
    of the file --weights names (a SuperPoint), or of the folder it names (default weights/)."""
    from models.weights import WeightsError, superglue_pair
    named = Path(args.weights) if args.weights and Path(args.weights).is_file() else None
    folder = Path(args.weights) if args.weights and named is None else ROOT / "weights"
    if named is None and not folder.is_dir():
        raise UsageError(f"{folder}: no such weights file or folder")
    try:
        return superglue_pair(named, None, folder)
    except WeightsError as e:
        raise UsageError(f"{e}; pass a weights folder" if named else str(e)) from None


def choose_matcher(args, features: str) -> tuple[str, Path | None, Path | None]:
    """The matcher's name and, for SuperGlue, its SuperPoint and SuperGlue files: --matcher, else
    SuperGlue for SuperPoint features a SuperGlue file learnt, else mutual NN."""
    if args.matcher == "mnn" or (args.matcher is None and features != "superpoint"):
        return "mnn", None, None
    try:
        return ("superglue", *superglue_files(args))
    except UsageError:
        if args.matcher == "superglue":
            raise
        return "mnn", None, None


def build_frontend(args) -> Frontend:
    from models import build_extractor, build_matcher
    from models.superpoint import checked_scales
    features, files = args.features, []
    sp_weights = shipped("superpoint_*.pth", args.weights)
    if features is None:
        features = "superpoint" if sp_weights else "orb"
        if not sp_weights:
            print("note: no SuperPoint weights shipped yet; using ORB features (see weights/README.md)")
    matcher_name, sg_features, sg_weights = choose_matcher(args, features)
    if features.startswith("superpoint"):
        try:
            scales = checked_scales(args.scales)
        except ValueError as e:
            raise UsageError(f"--scales {e}") from None
        pattern = f"{features}_*.pth"
        path = sg_features if features == "superpoint" and sg_features else shipped(pattern, args.weights)
        if path is None:
            stage = "superpointvo --labels DIR" if features == "superpointvo" else "superpoint"
            raise UsageError(f"{args.weights or ROOT / 'weights'}: no {pattern} weights found "
                             f"(train them with `python -m vo.train {stage}`, see weights/README.md)")
        extractor = build_extractor("superpoint", weights=path, max_keypoints=args.max_keypoints,
                                    scales=scales)
        files.append(path.name)
    else:
        extractor = build_extractor(features, max_keypoints=max(args.max_keypoints, 1500))
    if matcher_name == "superglue":
        matcher = build_matcher("superglue", weights=sg_weights)
        files.append(sg_weights.name)
    else:
        matcher = build_matcher("mnn", ratio=0.9 if features == "sift" else None)
    return Frontend(f"{features}+{matcher_name}", extractor, matcher, tuple(files))


def open_input(args):
    from vo.datasets import StartAt, open_source
    if args.start_frame < 0:
        raise UsageError(f"--start-frame {args.start_frame}: a frame index is 0 or more")
    spec = str(args.webcam) if args.webcam is not None else args.source or str(BUNDLED_SAMPLE)
    source = open_source(spec, calib=args.calib, mode=args.mode)
    if args.start_frame:
        count = source.frame_count(source.mode)
        if count is not None and args.start_frame >= count:
            raise UsageError(f"{spec}: --start-frame {args.start_frame} is outside its {count} frames")
        source = StartAt(source, args.start_frame)
    return source, args.mode or source.modes[0]


def default_out(source, mode: str, fmt: str) -> Path:
    return Path("outputs") / f"{source.name}_{mode}{FORMAT_SUFFIX[fmt]}"


def write_trajectory(result, path: Path, fmt: str) -> Path:
    from vo.eval.trajectory import Trajectory, write_trajectory as write
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, Trajectory(result.stamps, result.poses), fmt)
    return path


@dataclass
class AteReport:
    stats: object            # vo.eval.metrics.ErrorStats, metres
    method: str              # "se3" or "sim3"
    aligned: object          # the estimate, aligned onto the ground truth (paired poses)
    gt: object               # the ground truth at the same stamps
    alignment: object        # vo.eval.metrics.Alignment, estimate -> ground truth


def evaluate_ate(result, source) -> AteReport | None:
    """ATE against the source's ground truth; Sim(3) for monocular runs. None without ground truth."""
    if source.ground_truth is None or result.num_frames < 3:
        return None
    from vo.eval.metrics import ErrorStats, align, ate_errors
    from vo.eval.trajectory import Trajectory, associate
    est, gt = associate(Trajectory(result.stamps, result.poses), Trajectory(*source.ground_truth))
    if len(est) < 3:
        return None
    method = "sim3" if result.mode == "mono" else "se3"
    aligned, alignment = align(est, gt, method)
    return AteReport(ErrorStats.of(ate_errors(aligned, gt)), method, aligned, gt, alignment)


def summary(result, frontend: Frontend, source, ate, out: Path) -> str:
    lines = [
        f"sequence     {source.name} ({source.kind}, {result.mode}), frontend {frontend.name}"
        + (f" ({', '.join(frontend.weights)})" if frontend.weights else ""),
        f"frames       {result.num_frames} at {result.fps:.1f} FPS"
        + (f"  (stopped early: {result.error})" if result.interrupted else ""),
        f"keyframes    {result.num_keyframes}, map points {result.num_map_points}",
        f"events       lost {result.count('lost')}, relocalised {result.count('relocalised')}, "
        f"new segments {result.count('new_segment')}",
    ]
    if ate is not None:
        lines.append(f"ATE          rmse {100 * ate.stats.rmse:.2f} cm ({ate.method}-aligned, {ate.stats.count} poses)")
    else:
        lines.append("ATE          n/a (no ground truth)")
    lines.append(f"trajectory   {out}")
    return "\n".join(lines)


def make_views(args, source):
    from vo.viz.live import RunViews, ViewOptions
    for path in (args.save_video, args.save_map, args.render_map, args.plot, args.out):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    options = ViewOptions(windows=not args.no_viz, video_path=args.save_video,
                          collect_map=bool(args.save_map or args.render_map))
    return RunViews(options, source.ground_truth)


def save_pictures(args, result, views, ate) -> list[str]:
    """--save-map, --render-map and --plot, after the run; each failure is one warning line."""
    from vo.viz.plots import plot_trajectory
    from vo.viz.render import render_map_png, save_map_ply
    written = []
    points, colours = views.collector.arrays()
    keyframes = result.poses[result.keyframe_mask]
    jobs = [
        (args.save_map, lambda p: save_map_ply(p, points, colours)),
        (args.render_map, lambda p: render_map_png(
            p, points, colours, keyframes, result.poses[:, :3, 3],
            None if ate is None else ate.alignment.unapply_points(ate.gt.positions))),   # the map's frame
        (args.plot, lambda p: plot_trajectory(
            p, ate.aligned.positions if ate else result.poses[:, :3, 3], ate.aligned.stamps if ate else result.stamps,
            ate.gt.positions if ate else None, ate.stats.rmse if ate else None, result_title(result, ate))),
    ]
    for path, job in jobs:
        if not path:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            job(path)
            written.append(path)
        except Exception as e:   # a picture must never cost the trajectory
            print(f"warning: {path}: {e}", file=sys.stderr)
    return written


def result_title(result, ate) -> str:
    method = f" ({ate.method}-aligned)" if ate else ""
    return f"{result.mode} trajectory, {result.num_frames} frames{method}"


def tracker_config(args):
    """TrackerConfig from --triangulation and the --set overrides; a bad option is a UsageError."""
    from vo.config import parse_overrides, with_overrides
    from vo.tracker import TrackerConfig
    try:
        return with_overrides(TrackerConfig(triangulation_matching=args.triangulation), parse_overrides(args.set))
    except ValueError as e:
        raise UsageError(f"--set: {e}") from None


def run(args) -> int:
    from vo.pipeline import run as run_pipeline
    from tqdm import tqdm
    config = tracker_config(args)
    source, mode = open_input(args)
    frontend = build_frontend(args)
    total = source.frame_count(mode) if source.kind != "webcam" else None
    if total is not None and args.max_frames:
        total = min(total, args.max_frames)
    views = make_views(args, source)
    bar = tqdm(total=total, desc=f"{source.name} {mode}", unit="frame")

    def on_frame(frame, snapshot):
        views.on_frame(frame, snapshot)
        bar.update(1)
        bar.set_postfix(state=snapshot.state.name.lower(), pts=snapshot.num_points)

    try:
        result = run_pipeline(source, mode, frontend.extractor, frontend.matcher,
                              config, on_frame=on_frame, max_frames=args.max_frames)
    finally:
        bar.close()
        views.close()
    out = write_trajectory(result, Path(args.out) if args.out else default_out(source, mode, args.format), args.format)
    ate = evaluate_ate(result, source)
    pictures = save_pictures(args, result, views, ate)
    print(summary(result, frontend, source, ate, out))
    for path in pictures:
        print(f"wrote        {path}")
    return 0 if not result.interrupted or "KeyboardInterrupt" in (result.error or "") else 1


def run_reporting_bad_input(run_command, args) -> int:
    """``run_command(args)``; bad input becomes a one-line error and exit code 2, no traceback."""
    from models.weights import WeightsError
    from vo.datasets import SourceError
    try:
        return run_command(args)
    except (UsageError, SourceError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    try:
        return run_reporting_bad_input(run, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m vo.selflabel SOURCE... --out DIR``: stable / unstable keypoint labels from VO runs.

    python -m vo.selflabel ../shared/data/kitti/sequences/06 ../shared/data/tum/rgbd_dataset_freiburg3_teddy \\
        --out runs/selflabels [--workers 2] [--ray-address ADDR]

Writes DIR/<sequence>.npz, DIR/<sequence>.png and DIR/manifest.json (format: vo/selflabel/labels.py).
Sequences already in the manifest are skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before numpy: see vo/cli.py

from .label import SelfLabelConfig  # noqa: E402
from .labels import add_entry, is_labelled, load_manifest, save_labels, save_manifest  # noqa: E402
from .parallel import BACKENDS, BackendError, choose_backend, run_all  # noqa: E402
from .sequence import build_frontend, expected_frames, sequence_name  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vo.selflabel", description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="KITTI/TUM/EuRoC folder, image folder or video")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the labels, pictures and manifest")
    p.add_argument("--mode", choices=("mono", "stereo", "rgbd"), help="default: the richest each source allows")
    p.add_argument("--features", choices=("superpoint", "orb", "sift"),
                   help="default: superpoint when its weights are shipped (or given), else orb")
    p.add_argument("--weights", metavar="DIR_OR_FILE", help="weights to use instead of the shipped ones")
    p.add_argument("--max-frames", type=int, metavar="N", help="per sequence")
    p.add_argument("--max-keypoints", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="sequences labelled at once")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. ray://host:10001 or auto)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: serial for one worker, else Ray if installed, else local processes")
    defaults = SelfLabelConfig()
    p.add_argument("--min-track", type=int, default=defaults.min_track, help="frames a point must be tracked in")
    p.add_argument("--stable-px", type=float, default=defaults.stable_px, help="max mean error of stable points")
    p.add_argument("--unstable-px", type=float, default=defaults.unstable_px, help="min max error of unstable points")
    return p.parse_args(argv)


def resolve_features(args) -> str:
    """The features to use; the default falls back to ORB (one line) without SuperPoint weights."""
    from vo.cli import UsageError, shipped
    found = shipped("superpoint_*.pth", args.weights)
    if args.features == "superpoint" and found is None:
        raise UsageError(f"{args.weights or 'weights/'}: no superpoint_*.pth weights found")
    if args.features is not None:
        return args.features
    if found is not None:
        return "superpoint"
    print("note: no SuperPoint weights shipped (weights/superpoint_*.pth) nor given with --weights; "
          "self-labelling with ORB features")
    return "orb"


def make_config(args) -> SelfLabelConfig:
    from vo.cli import UsageError
    if args.min_track < 2 or not 0 < args.stable_px < args.unstable_px or args.workers < 1:
        raise UsageError("need --min-track >= 2, 0 < --stable-px < --unstable-px and --workers >= 1")
    return SelfLabelConfig(min_track=args.min_track, stable_px=args.stable_px, unstable_px=args.unstable_px,
                           mode=args.mode, features=resolve_features(args),
                           weights=str(Path(args.weights).resolve()) if args.weights else None,  # for workers
                           max_keypoints=args.max_keypoints, max_frames=args.max_frames)


def open_sources(specs: list[str], config: SelfLabelConfig) -> dict[str, tuple[str, int | None]]:
    """Absolute spec -> (sequence name, frames expected); fails early on unusable input."""
    from vo.cli import UsageError
    from vo.datasets import open_source
    out = {}
    for spec in specs:
        spec = str(Path(spec).resolve()) if Path(spec).exists() else spec
        with open_source(spec, mode=config.mode) as source:
            out[spec] = (sequence_name(source), expected_frames(source, config.mode or source.modes[0], config))
    names = [name for name, _ in out.values()]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"two sources are both named {duplicate!r}: label them into different --out folders")
    return out


class Writer:
    """Receives finished sequences: writes their files and the manifest, reports."""

    def __init__(self, out: Path, manifest: dict, bar, per_frame_progress: bool):
        self.out, self.manifest, self.bar = out, manifest, bar
        self.per_frame_progress = per_frame_progress
        self.failures = 0

    def __call__(self, spec: str, result) -> None:
        if isinstance(result, BaseException):
            self.failures += 1
            self.bar.write(f"error: {spec}: {type(result).__name__}: {result}".splitlines()[0], file=sys.stderr)
            return
        entry = result.entry
        save_labels(self.out / entry["file"], result.arrays)
        (self.out / entry["picture"]).write_bytes(result.picture)
        self.manifest = add_entry(self.manifest, entry)
        save_manifest(self.out, self.manifest)
        if not self.per_frame_progress:
            self.bar.update(entry["frames"])
        self.bar.write(f"{entry['name']}: {entry['frames']} frames, {entry['points']} points tracked in "
                       f">= {self.manifest['config']['min_track']} frames: {entry['stable']} stable, "
                       f"{entry['unstable']} unstable; {entry['keypoints']} labels in {entry['labelled_frames']} "
                       f"frames; {entry['fps']:.2f} FPS")


def run(args) -> int:
    from tqdm import tqdm
    config = make_config(args)
    backend = choose_backend(args.backend, args.workers, args.ray_address)
    if config.features == "superpoint":
        build_frontend(config)   # unusable weights: one error line now, not one per sequence
    sources = open_sources(args.sources, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    if manifest["config"] and manifest["config"] != asdict(config):
        print(f"note: {out / 'manifest.json'} was written with other settings; sequences labelled then are kept")
    manifest["config"] = asdict(config)
    save_manifest(out, manifest)
    todo = [spec for spec, (name, _) in sources.items() if not is_labelled(out, manifest, name)]
    for spec, (name, _) in sources.items():
        if spec not in todo:
            print(f"{name}: already labelled, skipped")
    if not todo:
        return 0
    counts = [sources[spec][1] for spec in todo]
    serial = backend == "serial"
    with tqdm(total=None if None in counts else sum(counts), desc="self-labelling", unit="frame") as bar:
        writer = Writer(out, manifest, bar, serial)
        run_all(todo, config, writer, backend, args.workers, args.ray_address,
                progress=bar.update if serial else None)
    print(f"labelled {len(todo) - writer.failures} of {len(todo)} sequences ({backend}) into {out}")
    return 1 if writer.failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.weights import WeightsError
    from vo.cli import UsageError
    from vo.datasets import SourceError
    try:
        return run(args)
    except (UsageError, SourceError, WeightsError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

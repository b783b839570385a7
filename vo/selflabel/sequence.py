"""Self-label one sequence: run the VO, collect tracks, grade them, draw the picture.

``label_sequence`` is the unit of work that ``parallel.py`` hands to a process or a Ray
task: it takes only a source spec and the config (both picklable) and returns the
arrays, the picture and the manifest entry, so that the caller writes every file.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vo.datasets import open_source
from vo.pipeline import run

from .label import STABLE, UNSTABLE, FrameLabels, SelfLabelConfig, TrackCollector, group_by_frame, label_tracks
from .pictures import pick_rows, picture_png


@dataclass
class SequenceResult:
    entry: dict                       # the manifest entry
    arrays: dict                      # the label file's arrays (labels.py)
    picture: bytes                    # PNG


def sequence_name(source) -> str:
    """The source's name, safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(source.name)).strip("._") or "sequence"


def build_frontend(config: SelfLabelConfig):
    """The extractor and matcher exactly as run_vo.py builds them for these features."""
    from vo.cli import build_frontend as cli_frontend
    # one scale: the labels train the network on the image as it is
    return cli_frontend(argparse.Namespace(features=config.features, weights=config.weights, matcher=None,
                                           max_keypoints=config.max_keypoints, scales=[1.0]))


def label_sequence(spec: str, config: SelfLabelConfig, progress: Callable[[int], None] | None = None
                   ) -> SequenceResult:
    """Label ``spec`` (a source path); ``progress(1)`` is called after every frame.
    Raises if the VO stops early (a KeyboardInterrupt stays one)."""
    start = time.perf_counter()
    source = open_source(spec, mode=config.mode)
    mode = config.mode or source.modes[0]
    frontend = build_frontend(config)
    collector = TrackCollector(keep_rows=candidate_rows(expected_frames(source, mode, config), config.picture_frames))
    result = run_vo(source, mode, frontend, config, collector, progress)
    tracks = collector.tracks()
    labels = label_tracks(tracks, poses_of_rows(result, collector.frame_indices), source.camera, config)
    grouped = group_by_frame(tracks, labels, source.camera)
    picture = picture_png(sequence_name(source), picture_frames(collector, grouped, config.picture_frames),
                          labels.point_mean, labels.point_max, config.stable_px, config.unstable_px)
    entry = manifest_entry(sequence_name(source), spec, mode, config, frontend, result, labels, grouped,
                           time.perf_counter() - start)
    return SequenceResult(entry, label_arrays(spec, mode, source, collector, grouped), picture)


def run_vo(source, mode: str, frontend, config: SelfLabelConfig, collector: TrackCollector, progress=None):
    """The pipeline with the collector as its callback; raises if it stopped early."""
    def on_frame(frame, snapshot):
        collector(frame, snapshot)
        if progress is not None:
            progress(1)

    result = run(source, mode, frontend.extractor, frontend.matcher, on_frame=on_frame, max_frames=config.max_frames)
    if result.interrupted:
        if "KeyboardInterrupt" in (result.error or ""):
            raise KeyboardInterrupt
        raise RuntimeError(f"the VO stopped after {result.num_frames} frames: {result.error}")
    return result


def manifest_entry(name: str, spec: str, mode: str, config: SelfLabelConfig, frontend, result, labels,
                   grouped: FrameLabels, seconds: float) -> dict:
    """The sequence's line in the manifest (see labels.py)."""
    return {"name": name, "source": str(spec), "mode": mode, "features": config.features,
            "matcher": frontend.name.split("+")[-1], "frames": result.num_frames,
            "labelled_frames": len(grouped.rows), "points": int((~np.isnan(labels.point_mean)).sum()),
            "stable": labels.count(STABLE), "unstable": labels.count(UNSTABLE),
            "keypoints": int(len(grouped.labels)), "file": f"{name}.npz", "picture": f"{name}.png",
            "seconds": round(seconds, 3), "fps": round(result.num_frames / seconds, 3),
            "vo_fps": round(result.fps, 3)}


def expected_frames(source, mode: str, config: SelfLabelConfig) -> int | None:
    total = source.frame_count(mode)
    if config.max_frames is not None:
        total = config.max_frames if total is None else min(total, config.max_frames)
    return total


def candidate_rows(total: int | None, how_many: int) -> list[int]:
    """Frame rows whose images are kept during the run: a few per picture frame, spread."""
    if total is None:
        return list(range(0, 30 * how_many, 10))
    return sorted({int(r) for r in np.linspace(0, max(total - 1, 0), 3 * how_many + 2)[1:-1]})


def poses_of_rows(result, frame_indices: list[int]) -> np.ndarray:
    """world_from_cam of each collected frame, by source frame index."""
    row_of = {int(i): r for r, i in enumerate(result.frame_indices)}
    return result.poses[[row_of[int(i)] for i in frame_indices]]


def picture_frames(collector: TrackCollector, grouped: FrameLabels, how_many: int) -> list[tuple]:
    """(image, keypoints, labels, title) of up to ``how_many`` kept frames, busy ones first."""
    position = {int(row): f for f, row in enumerate(grouped.rows) if int(row) in collector.images}
    sizes = np.diff(grouped.offsets)
    frames = []
    for row in pick_rows({row: int(sizes[f]) for row, f in position.items()}, how_many):
        rows = slice(grouped.offsets[position[row]], grouped.offsets[position[row] + 1])
        labels = grouped.labels[rows]
        title = (f"frame {collector.frame_indices[row]}: {int((labels == STABLE).sum())} stable, "
                 f"{int((labels == UNSTABLE).sum())} unstable")
        frames.append((collector.images[row], grouped.keypoints[rows], labels, title))
    return frames


def label_arrays(spec: str, mode: str, source, collector: TrackCollector, grouped: FrameLabels) -> dict:
    """The label file's arrays (see labels.py)."""
    paths = [collector.frame_paths[r] for r in grouped.rows]
    return {
        "frame_paths": np.array(paths, dtype=str) if paths else np.zeros(0, dtype="<U1"),
        "frame_indices": np.array([collector.frame_indices[r] for r in grouped.rows], np.int64),
        "offsets": grouped.offsets, "keypoints": grouped.keypoints.reshape(-1, 2), "labels": grouped.labels,
        "errors": grouped.errors, "image_size": np.array([source.camera.width, source.camera.height], np.int64),
        "obs_errors": grouped.obs_errors, "track_ids": grouped.track_ids,
        "source": np.array(str(spec)), "mode": np.array(mode),
        "images_from_paths": np.array(images_from_paths(source)),
    }


def images_from_paths(source) -> bool:
    """Whether reading a frame's file gives exactly the image the source yields."""
    transforms = getattr(source, "undistort", None) is not None or getattr(source, "rectification", None) is not None
    return source.kind in ("kitti", "tum", "euroc", "folder") and not transforms


"""The VO loop: frames in, one camera-to-world pose per frame out.

``run`` owns nothing but the loop: feature extraction (converted to numpy at this
boundary), the tracker, timing and the callback. It never loses work: on an
exception or Ctrl-C it stops and returns the trajectory so far, flagged as partial.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .datasets.base import gray
from .tracker import FrameFeatures, Tracker, TrackerConfig, TrackerSnapshot, to_numpy
from .types import Frame


@dataclass
class Result:
    mode: str
    frame_indices: np.ndarray     # (N,) source frame index of each pose
    stamps: np.ndarray            # (N,) source stamps, seconds
    poses: np.ndarray             # (N,4,4) camera-to-world, one per processed frame
    num_keyframes: int
    num_map_points: int           # in the map at the end (bounded by the local window)
    events: list[tuple[int, str]] = field(default_factory=list)  # (frame index, what)
    seconds: float = 0.0          # wall time of the loop, reading frames included
    timings_ms: dict[str, float] = field(default_factory=dict)   # mean per frame and stage
    interrupted: bool = False     # stopped early: poses cover only the frames done
    error: str | None = None      # what stopped it, if anything did
    keyframe_mask: np.ndarray | None = None  # (N,) True where the frame became a keyframe

    @property
    def num_frames(self) -> int:
        return len(self.stamps)

    @property
    def fps(self) -> float:
        return self.num_frames / self.seconds if self.seconds > 0 else 0.0

    def count(self, event: str) -> int:
        """How many 'lost', 'relocalised', 'new_segment' or 'initialised' events."""
        return sum(1 for _, name in self.events if name == event)


def to_frame_features(raw: dict) -> FrameFeatures:
    """Numpy view of an extractor's output; float descriptors are made unit-norm."""
    keypoints = to_numpy(raw["keypoints"]).astype(np.float64)
    keypoints = keypoints.reshape(-1, 2)
    descriptors = to_numpy(raw["descriptors"])
    descriptors = descriptors.reshape(descriptors.shape[-2:]) if descriptors.ndim == 3 else descriptors
    if descriptors.shape[0] != len(keypoints) and descriptors.shape[1] == len(keypoints):
        descriptors = descriptors.T   # (D,N) as in SuperPoint's reference code
    if descriptors.dtype != np.uint8:
        descriptors = descriptors.astype(np.float32)
        descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
    return FrameFeatures(keypoints, np.ascontiguousarray(descriptors), raw)


def run(source, mode: str, extractor, matcher=None, config: TrackerConfig | None = None,
        on_frame: Callable[[Frame, TrackerSnapshot], None] | None = None,
        max_frames: int | None = None) -> Result:
    """Track every frame of ``source`` in ``mode`` ('stereo', 'rgbd' or 'mono').

    ``extractor.extract(image)`` gets a grayscale uint8 image (in stereo, the left and
    right images from two threads at once); ``matcher.match`` is used for monocular
    initialisation and relocalisation (the tracker's own mutual nearest neighbours if
    None). ``on_frame(frame, snapshot)`` runs after each frame; whatever it raises, like
    any error or Ctrl-C, ends the run and the result keeps the poses so far with
    ``interrupted`` set.
    """
    if mode not in source.modes:
        raise ValueError(f"source supports modes {source.modes}, not {mode!r}")
    tracker = Tracker(source.camera, mode, config, matcher)
    totals = {"extract": 0.0, "track": 0.0, "callback": 0.0}
    interrupted, error = False, None
    # Left and right images are extracted concurrently: OpenCV and torch release the GIL.
    pool = ThreadPoolExecutor(max_workers=1) if mode == "stereo" else None
    start = time.perf_counter()
    try:
        for frame in source.frames(mode, max_frames=max_frames):
            t0 = time.perf_counter()
            right = pool.submit(extractor.extract, gray(frame.right)) if pool else None
            features = to_frame_features(extractor.extract(gray(frame.image)))
            right = to_frame_features(right.result()) if right else None
            t1 = time.perf_counter()
            snapshot = tracker.track(frame, features, right)
            t2 = time.perf_counter()
            if on_frame is not None:
                on_frame(frame, snapshot)
            totals["extract"] += t1 - t0
            totals["track"] += t2 - t1
            totals["callback"] += time.perf_counter() - t2
    except (KeyboardInterrupt, Exception) as e:   # keep what was tracked; the caller saves it
        interrupted, error = True, f"{type(e).__name__}: {e}"
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    indices, stamps, poses = tracker.poses()
    frames = max(len(stamps), 1)
    return Result(mode=mode, frame_indices=indices, stamps=stamps, poses=poses,
                  num_keyframes=len(tracker.map.keyframe_poses), num_map_points=len(tracker.map.points),
                  events=list(tracker.events), seconds=seconds,
                  timings_ms={k: 1000 * v / frames for k, v in totals.items()},
                  interrupted=interrupted, error=error,
                  keyframe_mask=np.isin(indices, tracker.keyframe_frame_indices()))

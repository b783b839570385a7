"""Feature tracks drawn over the image: trails, inliers / outliers and a head-up display.

``TrackHistory`` remembers where each track was over the last frames, ``draw_tracks`` turns
that into a BGR image, ``TracksWindow`` shows it (space pauses, q / Esc quits) and
``VideoSink`` records it. Only numpy arrays go in, so the caller decides what a track is:
the map point a keypoint was matched to is the natural id. Without ids, tracks are chained
by nearest neighbour between consecutive frames, which is good enough to look at.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from scipy.spatial import cKDTree

from vo.viz import require_display

# BGR colours, chosen to stay readable over grey images.
INLIER_COLOUR = (60, 220, 60)
OUTLIER_COLOUR = (40, 40, 230)
STATE_COLOURS = {"tracking": (60, 220, 60), "lost": (40, 40, 230), "initialising": (0, 210, 255)}
HUD_TEXT_COLOUR = (240, 240, 240)
COLOUR_BINS = 16     # trails are drawn in this many colour groups: one cv2 call per group
SUBPIXEL_BITS = 4    # cv2 drawing with fixed-point coordinates keeps slow trails smooth


# ----------------------------------------------------------------------------- history

@dataclass
class Trail:
    """Where one track was: ``points`` oldest first, the last one is in the current frame."""
    track_id: int
    points: np.ndarray   # (L,2) pixels, L <= history length
    age: int             # frames the track has been seen in; may exceed L


@dataclass
class _Track:
    points: deque
    age: int = 0
    last_seen: int = 0


class TrackHistory:
    """Per-track trails over the last ``length`` frames, keyed by a track / map point id.

    Memory is bounded: each trail keeps at most ``length`` points, and a track unseen for
    more than ``max_gap`` frames is forgotten. A track that jumps more than ``max_jump``
    pixels restarts: map point ids are slots that get reused, and a reused id must not
    draw a line across the image.
    """

    def __init__(self, length: int = 20, max_gap: int = 2, match_radius: float = 10.0,
                 max_jump: float = 100.0):
        self.length = length
        self.max_gap = max_gap
        self.max_jump = max_jump
        self.match_radius = match_radius   # pixels, only for chaining tracks without ids
        self._tracks: dict[int, _Track] = {}
        self._frame = -1
        self._next_id = 0                  # for tracks chained without ids
        self._heads = (np.zeros((0, 2)), np.zeros(0, np.int64))   # last frame's points and ids

    def __len__(self) -> int:
        return len(self._tracks)

    def update(self, keypoints: np.ndarray, ids: np.ndarray | None = None) -> list[Trail]:
        """Add one frame; returns one trail per keypoint, in the order of ``keypoints``.

        ``ids``: (N,) track id of each keypoint (e.g. its map point); negative = untracked.
        None chains keypoints to the previous frame's by nearest neighbour.
        """
        keypoints = np.asarray(keypoints, np.float64).reshape(-1, 2)
        self._frame += 1
        if ids is None:
            ids = self._chain_by_proximity(keypoints)
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != len(keypoints):
            raise ValueError(f"{len(keypoints)} keypoints but {len(ids)} ids")
        trails = [self._extend(int(i), xy) for i, xy in zip(ids, keypoints)]
        self._forget_stale()
        self._heads = (keypoints, ids)
        return trails

    def trails(self) -> list[Trail]:
        """Trails of the tracks seen in the latest frame."""
        return [self._as_trail(i, t) for i, t in self._tracks.items() if t.last_seen == self._frame]

    def _extend(self, track_id: int, xy: np.ndarray) -> Trail:
        if track_id < 0:   # untracked keypoint: a trail of one point, nothing remembered
            return Trail(track_id, xy[None].copy(), 1)
        track = self._tracks.get(track_id)
        if track is not None and track.last_seen == self._frame:   # a second keypoint, same id
            return Trail(track_id, xy[None].copy(), 1)
        if track is None or np.hypot(*(xy - track.points[-1])) > self.max_jump:
            track = self._tracks[track_id] = _Track(deque(maxlen=self.length))
        track.points.append(xy.copy())
        track.age += 1
        track.last_seen = self._frame
        return self._as_trail(track_id, track)

    @staticmethod
    def _as_trail(track_id: int, track: _Track) -> Trail:
        return Trail(track_id, np.array(track.points), track.age)

    def _forget_stale(self) -> None:
        oldest = self._frame - self.max_gap
        for track_id in [i for i, t in self._tracks.items() if t.last_seen < oldest]:
            del self._tracks[track_id]

    def _chain_by_proximity(self, keypoints: np.ndarray) -> np.ndarray:
        """Ids for keypoints without any: mutual nearest neighbours of the last frame's points.

        Camera motion shifts everything at once, so a first wide pass estimates the median
        image shift and the tight pass searches around the shifted positions.
        """
        previous, previous_ids = self._heads
        ids = np.full(len(keypoints), -1, np.int64)
        if len(previous) and len(keypoints):
            coarse = mutual_nearest(previous, keypoints, 4 * self.match_radius)
            shift = np.median(keypoints[coarse[1]] - previous[coarse[0]], axis=0) if len(coarse[0]) else 0.0
            prev_idx, cur_idx = mutual_nearest(previous + shift, keypoints, self.match_radius)
            ids[cur_idx] = previous_ids[prev_idx]
        fresh = np.flatnonzero(ids < 0)
        ids[fresh] = self._next_id + np.arange(len(fresh))
        self._next_id += len(fresh)
        return ids


def mutual_nearest(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i in a, j in b) that are each other's nearest neighbour within ``radius``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist_ab, nn_ab = cKDTree(b).query(a, distance_upper_bound=radius)
    _, nn_ba = cKDTree(a).query(b, distance_upper_bound=radius)
    i = np.flatnonzero(np.isfinite(dist_ab))
    j = nn_ab[i]
    mutual = nn_ba[j] == i
    return i[mutual], j[mutual]


# ----------------------------------------------------------------------------- drawing

def make_hud(frame: int, fps: float, state, tracked: int, map_points: int, **more) -> dict:
    """The standard HUD lines; ``state`` may be a TrackerState or its name."""
    state_name = getattr(state, "value", state)
    return {"frame": frame, "fps": fps, "state": str(state_name), "tracked": tracked,
            "map points": map_points, **more}


def draw_tracks(image: np.ndarray, trails: Sequence[Trail | np.ndarray],
                inlier_mask: np.ndarray | None = None, hud: dict | None = None,
                max_age: int = 30, scale: float = 1.0) -> np.ndarray:
    """A BGR copy of ``image`` with trails, current positions and a HUD box.

    Trails are coloured by track age (turbo colormap: blue = new, red = ``max_age`` frames or
    more), so long, stable tracks stand out. Inliers are green dots, outliers red crosses;
    ``inlier_mask`` is one bool per trail (None: all inliers). ``scale`` enlarges the output
    first, which keeps small images (e.g. 320x240) legible.
    """
    canvas = as_bgr(image)
    if scale != 1.0:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    else:
        canvas = canvas.copy()
    points = [np.asarray(getattr(t, "points", t), np.float64).reshape(-1, 2) * scale for t in trails]
    ages = np.array([getattr(t, "age", len(p)) for t, p in zip(trails, points)], np.int64)
    inliers = np.ones(len(points), bool) if inlier_mask is None else np.asarray(inlier_mask, bool)
    if len(inliers) != len(points):
        raise ValueError(f"{len(points)} trails but an inlier mask of {len(inliers)}")
    size = marker_size(canvas)
    lut = turbo_lut()
    draw_trails(canvas, points, age_bins(ages, max_age), lut, size)
    draw_heads(canvas, points, inliers, size)
    if hud:
        draw_hud(canvas, hud, lut, max_age)
    return canvas


def as_bgr(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def marker_size(image: np.ndarray) -> int:
    """Line width / dot radius unit: 1 px up to 480 lines, growing with the image."""
    return max(1, round(min(image.shape[:2]) / 480))


def turbo_lut() -> np.ndarray:
    """(256,3) BGR turbo colormap from OpenCV, so no matplotlib in the tracking loop."""
    ramp = np.arange(256, dtype=np.uint8).reshape(-1, 1)
    return cv2.applyColorMap(ramp, cv2.COLORMAP_TURBO).reshape(256, 3)


def age_bins(ages: np.ndarray, max_age: int) -> np.ndarray:
    """Colour bin (0..COLOUR_BINS-1) of each age; bins keep the number of draw calls small."""
    fraction = np.clip((ages - 1) / max(max_age - 1, 1), 0.0, 1.0)
    return np.minimum((fraction * COLOUR_BINS).astype(int), COLOUR_BINS - 1)


def bin_colour(bin_index: int, lut: np.ndarray) -> tuple[int, int, int]:
    # Skip turbo's darkest 10 % at both ends: they vanish on dark image regions.
    position = 25 + (230 - 25) * bin_index / (COLOUR_BINS - 1)
    return tuple(int(c) for c in lut[int(position)])


def fixed_point(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << SUBPIXEL_BITS)).astype(np.int32)


def draw_trails(canvas: np.ndarray, points: list[np.ndarray], bins: np.ndarray, lut: np.ndarray, size: int) -> None:
    for b in np.unique(bins):
        lines = [fixed_point(p) for p, pb in zip(points, bins) if pb == b and len(p) > 1]
        if lines:
            cv2.polylines(canvas, lines, False, bin_colour(int(b), lut), size, cv2.LINE_AA, SUBPIXEL_BITS)


def draw_heads(canvas: np.ndarray, points: list[np.ndarray], inliers: np.ndarray, size: int) -> None:
    radius = (2 * size) << SUBPIXEL_BITS
    arm = (2 * size + 1) << SUBPIXEL_BITS
    for trail, inlier in zip(points, inliers):
        if len(trail) == 0:
            continue
        x, y = fixed_point(trail[-1])
        if inlier:
            cv2.circle(canvas, (x, y), radius, INLIER_COLOUR, -1, cv2.LINE_AA, SUBPIXEL_BITS)
        else:
            cv2.line(canvas, (x - arm, y - arm), (x + arm, y + arm), OUTLIER_COLOUR, size, cv2.LINE_AA, SUBPIXEL_BITS)
            cv2.line(canvas, (x - arm, y + arm), (x + arm, y - arm), OUTLIER_COLOUR, size, cv2.LINE_AA, SUBPIXEL_BITS)


def format_hud_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(getattr(value, "value", value))


def draw_hud(canvas: np.ndarray, hud: dict, lut: np.ndarray, max_age: int) -> None:
    """Semi-transparent box, top left: one 'label  value' line per entry and an age colour bar."""
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, canvas.shape[0] / 1200)
    thickness = max(1, round(font_scale * 1.6))
    (_, text_h), _ = cv2.getTextSize("Ag", font, font_scale, thickness)
    line_h, pad = int(text_h * 1.9), int(text_h * 0.8)
    labels = [str(k) for k in hud]
    values = [format_hud_value(v) for v in hud.values()]
    label_w = max(cv2.getTextSize(s, font, font_scale, thickness)[0][0] for s in labels)
    value_w = max(cv2.getTextSize(s, font, font_scale, thickness)[0][0] for s in values)
    box_w = min(pad * 3 + label_w + value_w, canvas.shape[1])
    bar_h = max(4, text_h // 2)
    box_h = min(pad * 2 + line_h * len(labels) + bar_h + line_h, canvas.shape[0])

    # Darken rather than cover: the tracks under the box stay visible.
    region = canvas[:box_h, :box_w]
    region[:] = (region * 0.35).astype(np.uint8)
    for row, (label, value) in enumerate(zip(labels, values)):
        baseline = pad + line_h * row + text_h
        cv2.putText(canvas, label, (pad, baseline), font, font_scale, HUD_TEXT_COLOUR, thickness, cv2.LINE_AA)
        colour = STATE_COLOURS.get(value.lower(), HUD_TEXT_COLOUR) if label == "state" else HUD_TEXT_COLOUR
        cv2.putText(canvas, value, (pad * 2 + label_w, baseline), font, font_scale, colour, thickness, cv2.LINE_AA)
    draw_age_bar(canvas, (pad, pad + line_h * len(labels)), box_w - 2 * pad, bar_h, lut, max_age,
                 font, font_scale * 0.8, thickness)


def draw_age_bar(canvas, origin, width, height, lut, max_age, font, font_scale, thickness) -> None:
    """The trail colour legend: track age 1 .. max_age frames."""
    x0, y0 = origin
    if width <= 0 or y0 + height > canvas.shape[0]:
        return
    bins = np.minimum(np.arange(width) * COLOUR_BINS // width, COLOUR_BINS - 1)
    colours = np.array([bin_colour(int(b), lut) for b in range(COLOUR_BINS)], np.uint8)
    canvas[y0:y0 + height, x0:x0 + width] = colours[bins][None]
    caption = f"track age 1..{max_age}+"
    (_, text_h), _ = cv2.getTextSize(caption, font, font_scale, thickness)
    cv2.putText(canvas, caption, (x0, y0 + height + text_h + 3), font, font_scale, HUD_TEXT_COLOUR,
                thickness, cv2.LINE_AA)


# ----------------------------------------------------------------------------- output

class FpsMeter:
    """Frames per second over a sliding window of recent frames (for the HUD)."""

    def __init__(self, window: int = 30):
        self._times: deque[float] = deque(maxlen=window + 1)

    def tick(self) -> float:
        self._times.append(time.perf_counter())
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-9)


class TracksWindow:
    """A cv2 window: ``show`` an image; space pauses / resumes, q or Esc sets ``quit_requested``.

    While paused, ``show`` blocks (the tracker waits with it) until resumed or quit.
    Raises ``vo.viz.DisplayError`` when there is no display.
    """

    def __init__(self, title: str = "spvo tracks"):
        require_display()   # OpenCV's Qt backend would abort the process instead of raising
        self.title = title
        self.paused = False
        self.quit_requested = False
        self._shown = False
        cv2.namedWindow(title, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)

    def show(self, image: np.ndarray) -> None:
        if self.quit_requested:
            return
        cv2.imshow(self.title, image)
        self._shown = True
        self._handle_key(cv2.waitKey(1))
        if self.paused:
            cv2.imshow(self.title, paused_overlay(image))
        while self.paused and not self.quit_requested:
            self._handle_key(cv2.waitKey(30))
            if self._window_closed():
                self.quit_requested = True
        if self._window_closed():
            self.quit_requested = True

    def _handle_key(self, key: int) -> None:
        key &= 0xFF
        if key == ord(" "):
            self.paused = not self.paused
        elif key in (ord("q"), ord("Q"), 27):
            self.quit_requested = True

    def _window_closed(self) -> bool:
        return self._shown and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)   # lets the GUI thread actually remove the window
        except cv2.error:
            pass             # already closed by the user

    def __enter__(self) -> "TracksWindow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def paused_overlay(image: np.ndarray) -> np.ndarray:
    canvas = as_bgr(image).copy()
    font_scale = max(0.6, canvas.shape[0] / 600)
    thickness = max(1, round(font_scale * 2))
    text = "PAUSED (space resumes, q quits)"
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    origin = ((canvas.shape[1] - w) // 2, canvas.shape[0] - h)
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 210, 255), thickness, cv2.LINE_AA)
    return canvas


class VideoSinkError(RuntimeError):
    """The video file cannot be written; the message is one line."""


@dataclass
class VideoSink:
    """Writes one mp4 (mp4v) video frame per ``write``; frames are resized to ``size`` if needed."""
    path: str | Path
    fps: float
    size: tuple[int, int]            # (width, height)
    frames_written: int = field(default=0, init=False)

    def __post_init__(self):
        width, height = (int(v) for v in self.size)
        if width <= 0 or height <= 0 or not self.fps > 0:
            raise VideoSinkError(f"{self.path}: cannot write video of size {width}x{height} at {self.fps} fps")
        self.size = (width, height)
        if not Path(self.path).parent.is_dir():
            raise VideoSinkError(f"{self.path}: cannot write video (folder {Path(self.path).parent} does not exist)")
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), float(self.fps), self.size)
        if not self._writer.isOpened():
            raise VideoSinkError(f"{self.path}: cannot write video (OpenCV has no mp4v writer for this "
                                 f"file; use a .mp4 name in a writable folder)")

    def write(self, image: np.ndarray) -> None:
        if self._writer is None:
            raise VideoSinkError(f"{self.path}: video already closed")
        frame = as_bgr(image)
        if (frame.shape[1], frame.shape[0]) != self.size:
            # VideoWriter silently drops frames of another size; one frame per input is the contract.
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(np.ascontiguousarray(frame))
        self.frames_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> "VideoSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Feature tracks drawn over the image: trails, inliers / outliers and a head-up display.

``TrackHistory`` remembers where each track was over the last frames, ``draw_tracks`` turns
that into a BGR image, ``TracksWindow`` shows it (space pauses, q / Esc quits) and
``VideoSink`` records it. Only numpy arrays go in, so the caller decides what a track is:
the map point a keypoint was matched to is the natural id. (Chaining keypoints by nearest
neighbour instead was tried and is wrong for most tracks: ORB keypoints cluster closer
than they move between frames, so trails need the tracker's ids.)
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

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
class Trails:
    """One frame's trails, in keypoint order, packed for drawing without per-point Python.

    Row i of ``points`` holds trail i oldest first, right-aligned: its valid part is the
    last ``lengths[i]`` rows, and the very last row is the keypoint in the current frame.
    """
    ids: np.ndarray       # (N,) track ids, negative = untracked
    points: np.ndarray    # (N,L,2) pixels
    lengths: np.ndarray   # (N,) valid points per trail, 1..L
    ages: np.ndarray      # (N,) frames each track has been seen in; may exceed L

    def __len__(self) -> int:
        return len(self.ids)

    def trail(self, i: int) -> np.ndarray:
        return self.points[i, self.points.shape[1] - self.lengths[i]:]

    @classmethod
    def from_arrays(cls, trails: Sequence[np.ndarray]) -> "Trails":
        """From a list of (L_i,2) arrays (oldest first); the age is taken as L_i."""
        trails = [np.asarray(t, np.float64).reshape(-1, 2) for t in trails]
        lengths = np.array([len(t) for t in trails], np.int64)
        points = np.zeros((len(trails), max(lengths, default=1), 2))
        for row, trail in zip(points, trails):
            if len(trail):
                row[len(row) - len(trail):] = trail
        return cls(np.arange(len(trails)), points, lengths, lengths.copy())


class TrackHistory:
    """Per-track trails over the last ``length`` frames, keyed by a track / map point id.

    Memory is bounded: each track keeps at most ``length`` points in a fixed array row, and
    a track unseen for more than ``max_gap`` frames is forgotten and its row reused. A track
    that jumps more than ``max_jump`` pixels restarts: map point ids are slots that the map
    reuses, and a reused id must not draw a line across the image.
    """

    def __init__(self, length: int = 20, max_gap: int = 2, max_jump: float = 100.0, capacity: int = 1024):
        self.length, self.max_gap, self.max_jump = length, max_gap, max_jump
        self._frame = -1
        self._row_of: dict[int, int] = {}
        self._points = np.zeros((capacity, length, 2))
        self._lengths = np.zeros(capacity, np.int64)
        self._ages = np.zeros(capacity, np.int64)
        self._last_seen = np.zeros(capacity, np.int64)
        self._id_of_row = np.full(capacity, -1, np.int64)   # -1 = free row
        self._free_rows = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._row_of)

    def update(self, keypoints: np.ndarray, ids: np.ndarray) -> Trails:
        """Add one frame; returns one trail per keypoint, in the order of ``keypoints``.

        ``ids``: (N,) track id of each keypoint (e.g. its map point); negative = untracked.
        """
        keypoints = np.asarray(keypoints, np.float64).reshape(-1, 2)
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != len(keypoints):
            raise ValueError(f"{len(keypoints)} keypoints but {len(ids)} ids")
        self._frame += 1
        tracked = first_occurrences(ids) & (ids >= 0)   # a repeated id this frame: no trail
        rows = np.array([self._row(i) for i in ids[tracked]], np.int64)
        self._append(rows, keypoints[tracked])

        points = np.zeros((len(ids), self.length, 2))
        points[:, -1] = keypoints
        lengths, ages = np.ones(len(ids), np.int64), np.ones(len(ids), np.int64)
        points[tracked], lengths[tracked], ages[tracked] = self._points[rows], self._lengths[rows], self._ages[rows]
        self._forget_stale()
        return Trails(ids, points, lengths, ages)

    def _row(self, track_id: int) -> int:
        row = self._row_of.get(track_id)
        if row is None:
            if not self._free_rows:
                self._grow()
            row = self._free_rows.pop()
            self._row_of[track_id], self._id_of_row[row] = row, track_id
            self._lengths[row] = self._ages[row] = 0
        return row

    def _append(self, rows: np.ndarray, xy: np.ndarray) -> None:
        jumped = (self._lengths[rows] > 0) & (np.linalg.norm(xy - self._points[rows, -1], axis=1) > self.max_jump)
        self._lengths[rows[jumped]] = self._ages[rows[jumped]] = 0
        self._points[rows, :-1] = self._points[rows, 1:]   # shift left, newest point last
        self._points[rows, -1] = xy
        self._lengths[rows] = np.minimum(self._lengths[rows] + 1, self.length)
        self._ages[rows] += 1
        self._last_seen[rows] = self._frame

    def _forget_stale(self) -> None:
        stale = np.flatnonzero((self._id_of_row >= 0) & (self._last_seen < self._frame - self.max_gap))
        for row in stale:
            del self._row_of[int(self._id_of_row[row])]
        self._id_of_row[stale] = -1
        self._free_rows.extend(stale.tolist())

    def _grow(self) -> None:
        extra = len(self._id_of_row)
        self._points = np.concatenate([self._points, np.zeros_like(self._points)])
        self._lengths, self._ages, self._last_seen = (np.concatenate([a, np.zeros(extra, np.int64)])
                                                      for a in (self._lengths, self._ages, self._last_seen))
        self._id_of_row = np.concatenate([self._id_of_row, np.full(extra, -1, np.int64)])
        self._free_rows.extend(range(2 * extra - 1, extra - 1, -1))


def first_occurrences(ids: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(ids), bool)
    mask[np.unique(ids, return_index=True)[1]] = True
    return mask


# ----------------------------------------------------------------------------- drawing

def make_hud(frame: int, fps: float, state, tracked: int, map_points: int, **more) -> dict:
    """The standard HUD lines; ``state`` may be a TrackerState or its name."""
    state_name = getattr(state, "value", state)
    return {"frame": frame, "fps": fps, "state": str(state_name), "tracked": tracked,
            "map points": map_points, **more}


def draw_tracks(image: np.ndarray, trails: Trails | Sequence[np.ndarray],
                inlier_mask: np.ndarray | None = None, hud: dict | None = None,
                max_age: int = 30, scale: float = 1.0) -> np.ndarray:
    """A BGR copy of ``image`` with trails, current positions and a HUD box.

    Trails are coloured by track age (turbo colormap: blue = new, red = ``max_age`` frames or
    more), so long, stable tracks stand out. Inliers are green dots, outliers red crosses;
    ``inlier_mask`` is one bool per trail (None: all inliers). ``trails`` is what
    ``TrackHistory.update`` returns, or a list of (L,2) arrays. ``scale`` enlarges the
    output first, which keeps small images (e.g. 320x240) legible.
    """
    if not isinstance(trails, Trails):
        trails = Trails.from_arrays(trails)
    canvas = as_bgr(image)
    if scale != 1.0:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    elif canvas is image:   # never draw on the caller's frame
        canvas = canvas.copy()
    inliers = np.ones(len(trails), bool) if inlier_mask is None else np.asarray(inlier_mask, bool).reshape(-1)
    if len(inliers) != len(trails):
        raise ValueError(f"{len(trails)} trails but an inlier mask of {len(inliers)}")
    fixed = fixed_point(trails.points * scale)
    size = marker_size(canvas)
    lut = turbo_lut()
    draw_trails(canvas, fixed, trails.lengths, age_bins(trails.ages, max_age), lut, size)
    draw_heads(canvas, fixed[:, -1], inliers, size)
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


@lru_cache(maxsize=1)   # applyColorMap costs about a millisecond, every frame otherwise
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


def draw_trails(canvas: np.ndarray, fixed: np.ndarray, lengths: np.ndarray, bins: np.ndarray,
                lut: np.ndarray, size: int) -> None:
    width = fixed.shape[1]
    for b in np.unique(bins[lengths > 1]):
        lines = [fixed[i, width - lengths[i]:] for i in np.flatnonzero((bins == b) & (lengths > 1))]
        cv2.polylines(canvas, lines, False, bin_colour(int(b), lut), size, cv2.LINE_AA, SUBPIXEL_BITS)


def stamp_offsets(size: int, cross: bool) -> np.ndarray:
    """(K,2) pixel offsets of a filled disc, or of an X, of radius 2*size."""
    r = 2 * size
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = (np.abs(np.abs(dx) - np.abs(dy)) < size) if cross else (dx ** 2 + dy ** 2 <= r * r)
    return np.stack([dx[keep], dy[keep]], axis=1)


def draw_heads(canvas: np.ndarray, heads: np.ndarray, inliers: np.ndarray, size: int) -> None:
    """Inliers as green discs, outliers as red crosses, stamped in one numpy write each (no per-point calls)."""
    h, w = canvas.shape[:2]
    centres = np.round(heads / (1 << SUBPIXEL_BITS)).astype(np.int64)
    for chosen, cross, colour in ((inliers, False, INLIER_COLOUR), (~inliers, True, OUTLIER_COLOUR)):
        pixels = (centres[chosen][:, None, :] + stamp_offsets(size, cross)[None]).reshape(-1, 2)
        inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < w) & (pixels[:, 1] >= 0) & (pixels[:, 1] < h)
        canvas[pixels[inside, 1], pixels[inside, 0]] = colour


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

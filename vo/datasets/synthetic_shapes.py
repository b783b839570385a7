"""Synthetic Shapes (SuperPoint paper, Sec. 4.1), rendered on the fly with OpenCV.

Families follow the rpautrat/SuperPoint reimplementation: lines, polygons, multiple
shapes, ellipses (no keypoints), stars, checkerboards, stripes, cubes and
gaussian noise (no keypoints). Labels are the corners and junctions.

How labels are kept honest:
  * all shapes are drawn with sub-pixel vertices (cv2 `shift`), so a vertex at
    (x, y) is rendered at pixel coordinates (x, y) (pixel centres at integers);
  * corners covered by a shape drawn later are dropped (per-shape coverage masks);
  * corners that do not look like corners in the clean render (low Shi-Tomasi
    response, e.g. a colour that matches the background) are dropped;
  * corners outside the image are dropped.
Photometric changes (blur, noise, illumination) come after labelling, as in
training; they do not move the corners.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SHIFT = 4  # cv2 fixed-point bits: vertices are drawn with 1/16 px precision
SCALE = 1 << SHIFT

default_conf = {
    "image_size": (120, 160),  # H, W
    "families": {  # relative sampling weights
        "lines": 1.0,
        "polygon": 1.0,
        "multiple": 1.0,
        "ellipses": 1.0,
        "star": 1.0,
        "checkerboard": 1.0,
        "stripes": 1.0,
        "cube": 1.0,
        "gaussian_noise": 0.5,
    },
    "supersampling": 4,  # shapes are drawn at 4x and area-averaged (exact anti-aliasing)
    "min_contrast": 40,  # grey levels between a shape and the background mean
    "min_corner_response": 0.2,  # Shi-Tomasi, relative to an ideal 90 deg corner of min_contrast
    "photometric": {
        "enable": True,
        "blur_sigma": (0.0, 1.2),
        "brightness": 50,  # max absolute shift
        "contrast": (0.5, 1.5),
        "shade_strength": (-0.5, 0.6),  # multiplicative, smooth random shading
        "noise_std": (0.0, 15.0),
        "speckle_prob": (0.0, 0.003),
        "motion_blur_prob": 0.2,
        "motion_blur_max_kernel": 7,
    },
}


# ----------------------------------------------------------------------------- drawing helpers

def _fixed(pts: np.ndarray) -> np.ndarray:
    """Sub-pixel coordinates -> cv2 fixed-point int32 (used with shift=SHIFT)."""
    return np.round(np.asarray(pts, np.float64) * SCALE).astype(np.int32).reshape(-1, 2)


@dataclass
class Canvas:
    """Shapes are drawn supersampled and aliased on a layer above the background,
    then area-averaged by `composite`: the coverage of every pixel is exact, so a
    vertex (x, y) renders at (x, y). (cv2's own LINE_AA fills the pixels whose
    centre is on the edge, which shifts corners outwards by 0.5-2 px.)"""
    layer: np.ndarray  # uint8 (S*H, S*W): shape colours
    alpha: np.ndarray  # uint8 (S*H, S*W): 255 where any shape was drawn
    cover: np.ndarray  # uint8 (S*H, S*W): 1 where the current shape was drawn
    scale: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.layer.shape[0] // self.scale, self.layer.shape[1] // self.scale


def new_canvas(shape_hw, scale: int = 4) -> Canvas:
    hi = (shape_hw[0] * scale, shape_hw[1] * scale)
    return Canvas(np.zeros(hi, np.uint8), np.zeros(hi, np.uint8), np.zeros(hi, np.uint8), scale)


def _hi(canvas: Canvas, pts) -> np.ndarray:
    """Fixed-point supersampled coordinates: low-res pixel i spans hi-res pixels
    S*i .. S*i + S-1, whose centre is S*i + (S-1)/2."""
    s = canvas.scale
    return _fixed(np.asarray(pts, np.float64) * s + (s - 1) / 2)


def _fill_polygon(canvas: Canvas, pts: np.ndarray, color: int) -> None:
    poly = [_hi(canvas, pts)]
    for target, value in ((canvas.layer, int(color)), (canvas.alpha, 255), (canvas.cover, 1)):
        cv2.fillPoly(target, poly, value, cv2.LINE_8, shift=SHIFT)


def _draw_line(canvas: Canvas, p0, p1, color: int, thickness: float) -> None:
    a, b = (tuple(int(v) for v in _hi(canvas, p)[0]) for p in (p0, p1))
    t = max(1, int(round(thickness * canvas.scale)))
    for target, value in ((canvas.layer, int(color)), (canvas.alpha, 255), (canvas.cover, 1)):
        cv2.line(target, a, b, value, t, cv2.LINE_8, shift=SHIFT)


def _draw_ellipse(canvas: Canvas, center, axes, angle: float, color: int) -> None:
    c = tuple(int(v) for v in _hi(canvas, center)[0])
    ax = tuple(int(v) for v in _fixed(np.asarray(axes) * canvas.scale)[0])
    for target, value in ((canvas.layer, int(color)), (canvas.alpha, 255), (canvas.cover, 1)):
        cv2.ellipse(target, c, ax, float(angle), 0, 360, value, -1, cv2.LINE_8, shift=SHIFT)


def composite(background: np.ndarray, canvas: Canvas) -> np.ndarray:
    """Area-average the supersampled shapes and blend them over the background."""
    h, w = background.shape
    alpha = cv2.resize(canvas.alpha, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    # The layer is 0 wherever alpha is 0, so it is already alpha-premultiplied.
    colour = cv2.resize(canvas.layer, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    out = background.astype(np.float32) * (1 - alpha) + colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _contrasting_color(rng: np.random.Generator, background: float, min_contrast: float) -> int:
    """A grey level at least min_contrast away from the background level."""
    n_dark = max(0, int(np.floor(background - min_contrast)) + 1)  # 0 .. bg - c
    first_light = int(np.ceil(background + min_contrast))  # bg + c .. 255
    n_light = max(0, 256 - first_light)
    if n_dark + n_light == 0:
        return 255 if background < 128 else 0
    k = int(rng.integers(n_dark + n_light))
    return k if k < n_dark else first_light + k - n_dark


def _colors_apart(rng, background: float, min_contrast: float, n: int) -> list[int]:
    """n grey levels, each contrasting with the background and with the previous one."""
    colors = []
    for _ in range(n):
        for _ in range(20):  # rejection: cheap, and almost always succeeds at once
            c = _contrasting_color(rng, background, min_contrast)
            if not colors or abs(c - colors[-1]) >= min_contrast:
                break
        colors.append(c)
    return colors


def _min_dim(shape_hw) -> int:
    return min(shape_hw)


def _random_center(rng, shape_hw, margin: float = 0.0) -> np.ndarray:
    h, w = shape_hw
    return rng.uniform([margin, margin], [w - 1 - margin, h - 1 - margin])


def _interior_angles(poly: np.ndarray) -> np.ndarray:
    """Angle (rad) at each vertex of a closed polygon."""
    prev, nxt = np.roll(poly, 1, 0) - poly, np.roll(poly, -1, 0) - poly
    cos = (prev * nxt).sum(1) / (np.linalg.norm(prev, axis=1) * np.linalg.norm(nxt, axis=1) + 1e-9)
    return np.arccos(np.clip(cos, -1, 1))


def _segment_distance(a0, a1, b0, b1) -> float:
    """Minimum distance between segments [a0, a1] and [b0, b1] (0 if they cross)."""
    def cross(o, p, q):
        return (p[0] - o[0]) * (q[1] - o[1]) - (p[1] - o[1]) * (q[0] - o[0])

    if (cross(a0, a1, b0) * cross(a0, a1, b1) < 0) and (cross(b0, b1, a0) * cross(b0, b1, a1) < 0):
        return 0.0

    def point_segment(p, s0, s1):
        d = s1 - s0
        t = np.clip(np.dot(p - s0, d) / (np.dot(d, d) + 1e-9), 0, 1)
        return np.linalg.norm(p - (s0 + t * d))

    return min(point_segment(a0, b0, b1), point_segment(a1, b0, b1),
               point_segment(b0, a0, a1), point_segment(b1, a0, a1))


def _random_quad_homography(rng, shape_hw, size_range=(0.5, 1.1), jitter: float = 0.15) -> np.ndarray:
    """Homography from the unit square to a random convex quad around the image
    (used to lay out checkerboards and stripes in perspective)."""
    h, w = shape_hw
    unit = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    for _ in range(50):
        size = rng.uniform(*size_range) * _min_dim(shape_hw) * np.array([rng.uniform(0.8, 1.4), 1])
        quad = (unit - 0.5) * size
        quad += rng.uniform(-jitter, jitter, (4, 2)) * size
        angle = rng.uniform(-np.pi, np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        quad = quad @ rot.T + _random_center(rng, shape_hw, 0.2 * _min_dim(shape_hw))
        if np.all(_interior_angles(quad) > np.radians(40)) and _is_convex(quad):
            break
    return cv2.getPerspectiveTransform(unit.astype(np.float32), quad.astype(np.float32))


def _is_convex(poly: np.ndarray) -> bool:
    edges = np.roll(poly, -1, 0) - poly
    turns = edges[:, 0] * np.roll(edges, -1, 0)[:, 1] - edges[:, 1] * np.roll(edges, -1, 0)[:, 0]
    return bool(np.all(turns > 0) or np.all(turns < 0))


def _apply_h(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    homog = np.asarray(pts, np.float64) @ H[:, :2].T + H[:, 2]
    return homog[:, :2] / homog[:, 2:3]


def _drop_occluded(keypoints: np.ndarray, canvas: Canvas, radius: int = 2) -> np.ndarray:
    """Drop keypoints within `radius` px of the pixels the current shape covered."""
    if len(keypoints) == 0 or not canvas.cover.any():
        return keypoints
    h, w = canvas.shape
    cover = (cv2.resize(canvas.cover, (w, h), interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    cover = cv2.dilate(cover, kernel)
    ij = np.round(keypoints).astype(int)
    ij[:, 0], ij[:, 1] = ij[:, 0].clip(0, w - 1), ij[:, 1].clip(0, h - 1)
    return keypoints[cover[ij[:, 1], ij[:, 0]] == 0]


def _draw_in_order(canvas: Canvas, draws) -> np.ndarray:
    """Run drawing callables canvas -> keypoints one after the other; a shape
    hides the keypoints of the shapes under it."""
    keypoints = np.zeros((0, 2))
    for draw in draws:
        canvas.cover[:] = 0
        new = np.asarray(draw(canvas), np.float64).reshape(-1, 2)
        keypoints = np.concatenate([_drop_occluded(keypoints, canvas), new])
    return keypoints


# ----------------------------------------------------------------------------- primitives
# Each takes a Canvas, draws itself and returns its corners.

def polygon_at(rng, canvas, center, radius, bg, conf) -> np.ndarray:
    """A random 3-5 sided polygon inscribed in a circle; no near-flat vertices."""
    for _ in range(30):
        n = rng.integers(3, 6)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.6, 1.0, n)
        poly = center + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        corner_angles = _interior_angles(poly)
        edges = np.linalg.norm(np.roll(poly, -1, 0) - poly, axis=1)
        # Flat vertices are not corners; very sharp ones and tiny edges blur away.
        if corner_angles.max() < np.radians(155) and corner_angles.min() > np.radians(25) \
                and edges.min() > 0.3 * radius:
            break
    _fill_polygon(canvas, poly, _contrasting_color(rng, bg, conf["min_contrast"]))
    return poly


def ellipse_at(rng, canvas, center, radius, bg, conf) -> np.ndarray:
    """A filled ellipse: a blob with no corners (a negative example)."""
    # Not too elongated: the tips of thin ellipses look like corners.
    axes = radius * np.array([1.0, rng.uniform(0.45, 1.0)])
    _draw_ellipse(canvas, center, axes, rng.uniform(0, 180), _contrasting_color(rng, bg, conf["min_contrast"]))
    return np.zeros((0, 2))


def star_at(rng, canvas, center, radius, bg, conf) -> np.ndarray:
    """3-6 rays from a centre; corners are the centre and the ray ends."""
    n = rng.integers(3, 7)
    for _ in range(30):
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
        if gaps.min() > np.radians(30):  # rays too close merge into one blob
            break
    ends = center + np.stack([np.cos(angles), np.sin(angles)], 1) * (radius * rng.uniform(0.5, 1.0, n))[:, None]
    color, thickness = _contrasting_color(rng, bg, conf["min_contrast"]), rng.uniform(1, 3)
    for end in ends:
        _draw_line(canvas, center, end, color, thickness)
    return np.concatenate([center[None], ends])


def segment_at(rng, canvas, center, radius, bg, conf) -> np.ndarray:
    """One line segment through the centre; corners are its two ends."""
    angle = rng.uniform(0, np.pi)
    half = radius * rng.uniform(0.5, 1.0) * np.array([np.cos(angle), np.sin(angle)])
    ends = np.stack([center - half, center + half])
    _draw_line(canvas, ends[0], ends[1], _contrasting_color(rng, bg, conf["min_contrast"]),
               rng.uniform(1, 3))
    return ends


# ----------------------------------------------------------------------------- families
# Each takes (rng, canvas, background level, conf), draws and returns the keypoints.

def _place_circles(rng, shape_hw, n: int, radius_range, gap: float = 4.0, tries: int = 100):
    """Up to n non-overlapping circles (centre, radius) inside the image."""
    circles = []
    m = _min_dim(shape_hw)
    for _ in range(tries):
        if len(circles) == n:
            break
        r = rng.uniform(*radius_range) * m
        c = _random_center(rng, shape_hw, margin=0.5 * r)  # may stick out a little
        if all(np.linalg.norm(c - c2) > r + r2 + gap for c2, r2 in circles):
            circles.append((c, r))
    return circles


def draw_polygon(rng, canvas, bg, conf):
    circles = _place_circles(rng, canvas.shape, 1, (0.2, 0.45))
    return _draw_in_order(canvas, [lambda cv, c=c, r=r: polygon_at(rng, cv, c, r, bg, conf) for c, r in circles])


def draw_star(rng, canvas, bg, conf):
    circles = _place_circles(rng, canvas.shape, 1, (0.25, 0.45))
    return _draw_in_order(canvas, [lambda cv, c=c, r=r: star_at(rng, cv, c, r, bg, conf) for c, r in circles])


def draw_ellipses(rng, canvas, bg, conf):
    circles = _place_circles(rng, canvas.shape, int(rng.integers(1, 6)), (0.06, 0.25))
    return _draw_in_order(canvas, [lambda cv, c=c, r=r: ellipse_at(rng, cv, c, r, bg, conf) for c, r in circles])


def draw_multiple(rng, canvas, bg, conf):
    """Several small shapes of mixed kinds, mostly apart; overlaps hide corners."""
    primitives = [polygon_at, polygon_at, ellipse_at, star_at, segment_at]
    circles = _place_circles(rng, canvas.shape, int(rng.integers(2, 6)), (0.1, 0.22), tries=30)
    draws = [lambda cv, c=c, r=r, f=primitives[rng.integers(len(primitives))]: f(rng, cv, c, r, bg, conf)
             for c, r in circles]
    return _draw_in_order(canvas, draws)


def draw_lines(rng, canvas, bg, conf):
    """1-5 segments that neither cross nor touch (crossings would be unlabelled junctions)."""
    h, w = canvas.shape
    m = _min_dim(canvas.shape)
    segments, target = [], int(rng.integers(1, 6))
    for _ in range(60):
        if len(segments) == target:
            break
        p0, p1 = rng.uniform([0, 0], [w - 1, h - 1], (2, 2))
        thickness = rng.uniform(1, 3)
        if np.linalg.norm(p1 - p0) < 0.2 * m:
            continue
        if all(_segment_distance(p0, p1, q0, q1) > thickness + t + 4 for q0, q1, t in segments):
            segments.append((p0, p1, thickness))
    draws = []
    for p0, p1, t in segments:
        color = _contrasting_color(rng, bg, conf["min_contrast"])
        draws.append(lambda cv, p0=p0, p1=p1, t=t, col=color: (_draw_line(cv, p0, p1, col, t), np.stack([p0, p1]))[1])
    return _draw_in_order(canvas, draws)


def draw_checkerboard(rng, canvas, bg, conf):
    """A perspective checkerboard; corners are all grid intersections."""
    rows, cols = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    H = _random_quad_homography(rng, canvas.shape, size_range=(0.6, 1.3))
    gx, gy = np.meshgrid(np.linspace(0, 1, cols + 1), np.linspace(0, 1, rows + 1))
    grid = _apply_h(H, np.stack([gx.ravel(), gy.ravel()], 1)).reshape(rows + 1, cols + 1, 2)
    dark, light = _colors_apart(rng, bg, conf["min_contrast"] + 20, 2)
    for i in range(rows):
        for j in range(cols):
            cell = np.stack([grid[i, j], grid[i, j + 1], grid[i + 1, j + 1], grid[i + 1, j]])
            base = dark if (i + j) % 2 == 0 else light
            _fill_polygon(canvas, cell, int(np.clip(base + rng.integers(-10, 11), 0, 255)))
    return grid.reshape(-1, 2)


def draw_stripes(rng, canvas, bg, conf):
    """Parallel stripes in perspective; corners are the stripe ends."""
    n = int(rng.integers(3, 9))
    widths = rng.uniform(0.5, 1.5, n)
    cuts = np.concatenate([[0], np.cumsum(widths) / widths.sum()])
    H = _random_quad_homography(rng, canvas.shape, size_range=(0.6, 1.2))
    top, bottom = _apply_h(H, np.stack([cuts, np.zeros_like(cuts)], 1)), _apply_h(H, np.stack([cuts, np.ones_like(cuts)], 1))
    colors = _colors_apart(rng, bg, conf["min_contrast"], n)
    for k in range(n):
        _fill_polygon(canvas, np.stack([top[k], top[k + 1], bottom[k + 1], bottom[k]]), colors[k])
    return np.concatenate([top, bottom])


def _random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def draw_cube(rng, canvas, bg, conf):
    """An orthographic cube showing three faces; corners are its 7 visible vertices."""
    verts = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], np.float64) - 0.5
    faces = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
    normals = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], np.float64)
    for _ in range(50):  # a generic view: three faces clearly visible
        R = _random_rotation(rng)
        facing = (normals @ R.T)[:, 2]  # the camera looks along +z: visible when < 0
        front = facing[facing < 0]
        if len(front) == 3 and np.abs(front).min() > 0.25:  # no face seen edge-on
            break
    size = rng.uniform(0.3, 0.6) * _min_dim(canvas.shape)
    center = _random_center(rng, canvas.shape, margin=0.3 * size)
    pts = (verts @ R.T)[:, :2] * size + center
    visible = [f for f, z in zip(faces, facing) if z < 0]
    colors = _colors_apart(rng, bg, conf["min_contrast"], 3)
    for face, color in zip(visible, colors):
        _fill_polygon(canvas, pts[list(face)], color)
    return pts[sorted({v for f in visible for v in f})]


def draw_gaussian_noise(rng, canvas, bg, conf):
    """Pure noise covers the image: no keypoints (a negative example)."""
    h, w = canvas.shape
    noise = np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(20, 70), (h, w)), 0, 255).astype(np.uint8)
    # Nearest upsampling, so that area-averaging gives back the same noise.
    canvas.layer[:] = cv2.resize(noise, canvas.layer.shape[::-1], interpolation=cv2.INTER_NEAREST)
    canvas.alpha[:] = 255
    return np.zeros((0, 2))


FAMILIES = {
    "lines": draw_lines,
    "polygon": draw_polygon,
    "multiple": draw_multiple,
    "ellipses": draw_ellipses,
    "star": draw_star,
    "checkerboard": draw_checkerboard,
    "stripes": draw_stripes,
    "cube": draw_cube,
    "gaussian_noise": draw_gaussian_noise,
}


# ----------------------------------------------------------------------------- background and photometry

def random_background(rng, shape_hw) -> np.ndarray:
    """A smooth low-contrast texture: a grey level, low-frequency noise and soft blobs.
    Smooth on purpose, so that it has no corners of its own."""
    h, w = shape_hw
    level = rng.uniform(30, 225)
    coarse = rng.normal(0, 1, (int(rng.integers(2, 6)), int(rng.integers(2, 8)))).astype(np.float32)
    image = level + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(3, 12)
    blobs = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(0, 8))):
        center = tuple(int(v) for v in _random_center(rng, shape_hw))
        cv2.circle(blobs, center, int(rng.uniform(0.05, 0.2) * min(h, w)), float(rng.uniform(-20, 20)), -1)
    k = 2 * int(0.1 * min(h, w)) + 1
    image += cv2.GaussianBlur(blobs, (k, k), 0)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shade(rng, shape_hw, coarse: int = 8) -> np.ndarray:
    """A smooth field in [0, 1] (a blurred ellipse) for illumination changes,
    made at 1/coarse resolution since it is smooth anyway."""
    h, w = shape_hw
    hc, wc = max(h // coarse, 2), max(w // coarse, 2)
    field = np.zeros((hc, wc), np.float32)
    center = tuple(int(v) for v in _random_center(rng, (hc, wc)))
    axes = tuple(max(1, int(v)) for v in rng.uniform(0.2, 0.6, 2) * np.array([wc, hc]))
    cv2.ellipse(field, center, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    field = cv2.GaussianBlur(field, (0, 0), 0.25 * min(hc, wc))
    return cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)


def _motion_blur(rng, image: np.ndarray, max_kernel: int) -> np.ndarray:
    size = int(rng.integers(1, max_kernel // 2 + 1)) * 2 + 1
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2] = 1.0  # a horizontal line, rotated at random
    rot = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (size, size))
    return cv2.filter2D(image, -1, kernel / kernel.sum())


def photometric_augment(rng, image: np.ndarray, conf=default_conf["photometric"]) -> np.ndarray:
    """Blur, illumination (brightness, contrast, shading) and noise; geometry untouched."""
    img = image.astype(np.float32)
    sigma = rng.uniform(*conf["blur_sigma"])
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < conf["motion_blur_prob"]:
        img = _motion_blur(rng, img, conf["motion_blur_max_kernel"])
    mean = img.mean()
    img = (img - mean) * rng.uniform(*conf["contrast"]) + mean + rng.uniform(-1, 1) * conf["brightness"]
    img *= 1 - rng.uniform(*conf["shade_strength"]) * _shade(rng, img.shape)
    img += rng.normal(0, rng.uniform(*conf["noise_std"]), img.shape).astype(np.float32)
    n_speckle = rng.binomial(img.size, rng.uniform(*conf["speckle_prob"]))
    flat = img.reshape(-1)  # salt and pepper
    flat[rng.integers(0, img.size, n_speckle)] = rng.choice([0.0, 255.0], n_speckle)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- labels

def _corner_response(image: np.ndarray) -> np.ndarray:
    """Shi-Tomasi response, max-pooled over 5x5 so a sub-pixel corner is not missed."""
    response = cv2.cornerMinEigenVal(image.astype(np.float32), blockSize=3, ksize=3)
    return cv2.dilate(response, np.ones((5, 5), np.uint8))


@functools.lru_cache(maxsize=8)
def _reference_response(contrast: float) -> float:
    """Response of an ideal 90 degree corner of the given contrast, for thresholds."""
    canvas = new_canvas((32, 32))
    _fill_polygon(canvas, np.array([[16, 16], [40, 16], [40, 40], [16, 40]]), int(contrast))
    return float(_corner_response(composite(np.zeros((32, 32), np.uint8), canvas))[16, 16])


def keep_visible(image: np.ndarray, keypoints: np.ndarray, conf=default_conf) -> np.ndarray:
    """Keypoints inside the image whose clean render looks like a corner there."""
    h, w = image.shape
    keypoints = keypoints[(keypoints[:, 0] >= 0) & (keypoints[:, 0] <= w - 1)
                          & (keypoints[:, 1] >= 0) & (keypoints[:, 1] <= h - 1)]
    if len(keypoints) == 0:
        return keypoints
    ij = np.round(keypoints).astype(int)
    strength = _corner_response(image)[ij[:, 1], ij[:, 0]]
    threshold = conf["min_corner_response"] * _reference_response(conf["min_contrast"])
    keypoints = keypoints[strength >= threshold]
    # Two labels in one pixel (e.g. a degenerate cube view) are one corner.
    _, first = np.unique(np.round(keypoints).astype(int), axis=0, return_index=True)
    return keypoints[np.sort(first)]


def keypoint_map(keypoints: np.ndarray, hw) -> np.ndarray:
    """uint8 HxW map with 1 at the nearest pixel of each keypoint (x, y) inside the image."""
    h, w = hw
    label = np.zeros((h, w), np.uint8)
    ij = np.round(np.asarray(keypoints, np.float64).reshape(-1, 2)).astype(int)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    label[ij[ok, 1], ij[ok, 0]] = 1
    return label


def soft_keypoint_map(keypoints: np.ndarray, hw, sigma: float) -> np.ndarray:
    """float32 HxW map: each keypoint (x, y) inside the image spreads a mass of 1 over the 3x3
    pixels around its nearest one, as a Gaussian of ``sigma`` px centred on its sub-pixel position.

    A detector trained on these learns where within a pixel the point lies (a one-hot label can
    only say which pixel), and the log-parabola fit at inference reads it back exactly.
    """
    h, w = hw
    label = np.zeros((h, w), np.float32)
    xy = np.asarray(keypoints, np.float64).reshape(-1, 2)
    nearest = np.round(xy).astype(int)
    inside = (nearest[:, 0] >= 0) & (nearest[:, 0] < w) & (nearest[:, 1] >= 0) & (nearest[:, 1] < h)
    xy, nearest = xy[inside], nearest[inside]
    offsets = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1]), -1).reshape(-1, 2)     # (9,2) dx, dy
    pixels = nearest[:, None] + offsets[None]                                        # (N,9,2)
    weights = np.exp(-((pixels - xy[:, None]) ** 2).sum(-1) / (2 * sigma ** 2))
    ok = (pixels[..., 0] >= 0) & (pixels[..., 0] < w) & (pixels[..., 1] >= 0) & (pixels[..., 1] < h)
    weights = np.where(ok, weights, 0.0)
    weights /= weights.sum(1, keepdims=True)
    np.add.at(label, (pixels[ok][:, 1], pixels[ok][:, 0]), weights[ok].astype(np.float32))
    return label


def _merge_conf(conf) -> dict:
    conf = {**default_conf, **(conf or {})}
    conf["photometric"] = {**default_conf["photometric"], **conf.get("photometric", {})}
    return conf


def render_shape(rng: np.random.Generator, family: str | None = None, conf=default_conf):
    """Render one Synthetic Shapes image.

    Returns (image uint8 HxW, keypoints float32 (N, 2) as x, y pixel coordinates)."""
    conf = _merge_conf(conf)
    if family is None:
        names = list(conf["families"])
        weights = np.array([conf["families"][n] for n in names], np.float64)
        family = names[rng.choice(len(names), p=weights / weights.sum())]
    background = random_background(rng, conf["image_size"])
    canvas = new_canvas(conf["image_size"], conf["supersampling"])
    keypoints = FAMILIES[family](rng, canvas, float(background.mean()), conf)
    image = composite(background, canvas)
    keypoints = keep_visible(image, np.asarray(keypoints, np.float64).reshape(-1, 2), conf)
    if conf["photometric"]["enable"]:
        image = photometric_augment(rng, image, conf["photometric"])
    return image, keypoints.astype(np.float32)


# ----------------------------------------------------------------------------- cache

def _render_indexed(args):
    """Worker: sample `index` of a cache has its own seed, so the cache does not
    depend on the number of workers or on the order they run in."""
    seed, index, conf = args
    rng = np.random.default_rng([seed, index])
    names = list(conf["families"])
    weights = np.array([conf["families"][n] for n in names], np.float64)
    family = names[rng.choice(len(names), p=weights / weights.sum())]
    image, keypoints = render_shape(rng, family, conf)
    return image, keypoints, names.index(family)


def build_cache(path, n: int, seed: int = 0, conf=default_conf, workers: int = 2) -> Path:
    """Render n images and write them to one compressed .npz:
    images uint8 (n, H, W); keypoints float32 (M, 2) for all images, image i owning
    keypoints[offsets[i]:offsets[i + 1]]; family int per image; family_names; conf json."""
    from tqdm import tqdm

    conf = _merge_conf(conf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, conf) for i in range(n)]
    progress = dict(total=n, desc=f"synthetic shapes -> {path.name}", unit="img")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render_indexed, jobs, chunksize=64), **progress))
    else:
        results = [_render_indexed(job) for job in tqdm(jobs, **progress)]
    images = np.stack([r[0] for r in results]) if results else np.zeros((0, *conf["image_size"]), np.uint8)
    counts = [len(r[1]) for r in results]
    np.savez_compressed(
        path,
        images=images,
        keypoints=np.concatenate([r[1] for r in results] + [np.zeros((0, 2), np.float32)]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        family=np.array([r[2] for r in results], np.int16),
        family_names=np.array(list(conf["families"])),
        conf=np.array(json.dumps(conf)),
        seed=np.array(seed),
    )
    return path


class SyntheticShapesCache:
    """A rendered cache as a sequence of (image uint8 HxW, keypoints float32 (N, 2))."""

    def __init__(self, path):
        with np.load(path) as data:
            self.images = data["images"]
            self.keypoints = data["keypoints"]
            self.offsets = data["offsets"]
            self.family = data["family"]
            self.family_names = [str(n) for n in data["family_names"]]
            self.conf = json.loads(str(data["conf"]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.images[index], self.keypoints[start:end]

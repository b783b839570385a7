"""Random homographies and warping helpers (SuperPoint-style, pure numpy + OpenCV).

Convention: every H here maps pixel coordinates (x, y) of the *source* image to
pixel coordinates of the *warped* image, which is also what
`cv2.warpPerspective(src, H, ...)` expects. Pixel centres are at integers, so an
image of width W spans x in [0, W - 1].

`sample_homography` follows the idea of the SuperPoint TF code (rpautrat/SuperPoint
`sample_homography`): start from a centred patch, perturb it with a symmetric
perspective, a scale, a rotation and a translation, and keep only candidates that
stay inside the source. Differences, on purpose:
  * the patch is the quadrilateral of the *source* that fills the whole warped
    image, so "inside the source" really means no warped pixel is sampled from
    outside it when allow_artifacts=False;
  * everything is done in pixels, so rotations are true rotations on
    non-square images;
  * rotation is chosen before translation, so the translation uses whatever slack
    the rotation left instead of making most angles invalid.
"""
from __future__ import annotations

import cv2
import numpy as np

default_conf = {
    "translation": True,
    "rotation": True,
    "scaling": True,
    "perspective": True,
    "scaling_amplitude": 0.2,
    "perspective_amplitude_x": 0.2,
    "perspective_amplitude_y": 0.2,
    "patch_ratio": 0.85,
    "max_angle": np.pi / 2,
    "n_scales": 5,
    "n_angles": 25,
    "allow_artifacts": False,
    "translation_overflow": 0.0,  # fraction of the size, only with allow_artifacts
}

# Homographic Adaptation: strong warps (the paper uses N_h = 100 of these).
homographic_adaptation_conf = {**default_conf}

# Training pairs for the descriptor: milder in-plane rotation.
pair_conf = {**default_conf, "max_angle": np.pi / 4}


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, size: int) -> np.ndarray:
    """Normal samples re-drawn until within 2 std, like tf.truncated_normal."""
    out = rng.normal(mean, std, size)
    bad = np.abs(out - mean) > 2 * std
    while bad.any():
        out[bad] = rng.normal(mean, std, bad.sum())
        bad = np.abs(out - mean) > 2 * std
    return out


def _inside(corners: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """Whether all corners of each candidate (..., 4, 2) lie in [0, W-1] x [0, H-1]."""
    return np.all((corners >= 0) & (corners <= wh - 1), axis=(-1, -2))


def _pick(rng: np.random.Generator, candidates: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A random valid candidate; candidate 0 is the identity fallback."""
    idx = np.flatnonzero(valid)
    return candidates[rng.choice(idx) if len(idx) else 0]


def sample_homography(shape_hw, rng: np.random.Generator, out_hw=None, **conf) -> np.ndarray:
    """Sample a random 3x3 float64 homography from a source image of size shape_hw
    to a warped image of size out_hw (default: the same size).

    Keyword arguments override `default_conf`. With allow_artifacts=False the four
    corners of the warped image map inside the source, hence (convexity) every
    warped pixel comes from inside the source."""
    conf = {**default_conf, **conf}
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise TypeError(f"unknown homography options: {sorted(unknown)}")
    h, w = shape_hw
    out_h, out_w = shape_hw if out_hw is None else out_hw
    wh = np.array([w, h], np.float64)
    artifacts = conf["allow_artifacts"]

    # Normalised [0, 1] patch corners (TL, BL, BR, TR), as in the TF code.
    ratio = conf["patch_ratio"]
    margin = (1 - ratio) / 2
    patch = margin + np.array([[0, 0], [0, ratio], [ratio, ratio], [ratio, 0]], np.float64)

    if conf["perspective"]:
        amp_x, amp_y = conf["perspective_amplitude_x"], conf["perspective_amplitude_y"]
        if not artifacts:  # 2 std of the truncated normal = the margin at most
            amp_x, amp_y = min(amp_x, margin), min(amp_y, margin)
        dy = _truncated_normal(rng, 0, amp_y / 2, 1)[0]
        dx_left, dx_right = _truncated_normal(rng, 0, amp_x / 2, 2)
        # Symmetric keystone: one vertical edge shrinks while the other grows.
        patch = patch + np.array(
            [[dx_left, dy], [dx_left, -dy], [dx_right, dy], [dx_right, -dy]])

    # From here on, pixels (the corners of the warped image must land in [0, W-1]).
    patch = patch * (wh - 1)

    if conf["scaling"]:
        scales = np.concatenate(
            [[1.0], _truncated_normal(rng, 1, conf["scaling_amplitude"] / 2, conf["n_scales"])])
        center = patch.mean(0)
        scaled = (patch - center)[None] * scales[:, None, None] + center
        valid = np.ones(len(scales), bool) if artifacts else _inside(scaled, wh)
        valid[0] = valid[0] and not artifacts
        patch = _pick(rng, scaled, valid)

    if conf["rotation"]:
        max_angle = conf["max_angle"]
        angles = np.concatenate([[0.0], np.linspace(-max_angle, max_angle, conf["n_angles"])])
        cos, sin = np.cos(angles), np.sin(angles)
        rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
        center = patch.mean(0)
        rotated = np.einsum("aij,nj->ani", rot, patch - center) + center
        valid = np.ones(len(angles), bool) if artifacts else _inside(rotated, wh)
        valid[0] = valid[0] and not artifacts
        patch = _pick(rng, rotated, valid)

    if conf["translation"]:
        low, high = -patch.min(0), (wh - 1) - patch.max(0)  # slack left on each side
        if artifacts:
            overflow = conf["translation_overflow"] * wh
            low, high = low - overflow, high + overflow
        high = np.maximum(high, low)  # patch already touches both sides: no translation
        patch = patch + rng.uniform(low, high)

    out_corners = np.array(
        [[0, 0], [0, out_h - 1], [out_w - 1, out_h - 1], [out_w - 1, 0]], np.float64)
    # The source patch becomes the whole warped image.
    return cv2.getPerspectiveTransform(patch.astype(np.float32), out_corners.astype(np.float32)).astype(np.float64)


def warp_points(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply H to (N, 2) points (x, y); returns (N, 2) float64."""
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    homog = pts @ H[:, :2].T + H[:, 2]
    return homog[:, :2] / homog[:, 2:3]


def sample_shift(rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """A translation by whole pixels, each axis in [-max_shift, max_shift], never (0, 0).

    Content and labels move exactly (no interpolation): ``vo.train superpoint``'s ``{"shift": n}``
    pairs, which ask the detector to follow whole-pixel shifts as SIFT does, against its grid's aliasing."""
    while True:
        dx, dy = rng.integers(-max_shift, max_shift + 1, 2)
        if dx or dy:
            return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def warp_image(image: np.ndarray, H: np.ndarray, out_shape_hw=None,
               interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Warp an image with H (source -> warped); outside pixels become 0."""
    out_h, out_w = image.shape[:2] if out_shape_hw is None else out_shape_hw
    return cv2.warpPerspective(image, H, (int(out_w), int(out_h)), flags=interpolation,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def valid_mask(H: np.ndarray, in_hw, out_hw=None, border: int = 0) -> np.ndarray:
    """Boolean (out_h, out_w) mask of the warped pixels whose source point lies
    inside the source image, eroded by `border` px away from the invalid region
    (used to ignore interpolation artifacts along the warped boundary)."""
    in_h, in_w = in_hw
    out_h, out_w = in_hw if out_hw is None else out_hw
    ys, xs = np.mgrid[0:out_h, 0:out_w]
    grid = np.stack([xs.ravel(), ys.ravel()], -1)
    src = warp_points(np.linalg.inv(H), grid)
    tol = 1e-6  # corners mapped exactly onto the border must count as inside
    inside = ((src[:, 0] >= -tol) & (src[:, 0] <= in_w - 1 + tol)
              & (src[:, 1] >= -tol) & (src[:, 1] <= in_h - 1 + tol))
    mask = inside.reshape(out_h, out_w).astype(np.uint8)
    if border > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * border + 1, 2 * border + 1))
        # The default border value of erode is "max", so the image frame does not erode.
        mask = cv2.erode(mask, kernel)
    return mask.astype(bool)


def inside_mask(pts: np.ndarray, hw, border: float = 0) -> np.ndarray:
    """Boolean (N,) mask of the points (x, y) within [border, W-1-border] x [border, H-1-border]."""
    h, w = hw
    pts = np.asarray(pts).reshape(-1, 2)
    return ((pts[:, 0] >= border) & (pts[:, 0] <= w - 1 - border)
            & (pts[:, 1] >= border) & (pts[:, 1] <= h - 1 - border))


def filter_inside(pts: np.ndarray, hw, border: float = 0) -> np.ndarray:
    """The points (x, y) that lie inside an image of size hw (see `inside_mask`)."""
    pts = np.asarray(pts).reshape(-1, 2)
    return pts[inside_mask(pts, hw, border)]

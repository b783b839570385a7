"""A tiny exact renderer: textured planes and boxes seen along a known trajectory.

It produces images, metric depth and a rectified right view with perfectly known
poses, so tracker tests can demand centimetre accuracy. Rendering is ray casting
against a handful of rectangles: one vectorised intersection per plane, a z-buffer
by argmin, and a single ``cv2.remap`` into a texture atlas.

``RenderedSequence`` has the interface of ``vo.datasets`` sources (``camera``,
``modes``, ``ground_truth``, ``frames(mode)``), so the pipeline runs on it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from .types import Camera, Frame


@dataclass
class Rect:
    """A textured rectangle: points ``origin + a * axis_u + b * axis_v``, a, b in [0, 1].

    Only the side that ``normal = axis_u x axis_v`` points to is visible.
    """
    origin: np.ndarray
    axis_u: np.ndarray
    axis_v: np.ndarray
    texture: np.ndarray      # HxWx3 uint8, texel (0, 0) at the origin, u along columns


@dataclass
class RenderConfig:
    width: int = 320
    height: int = 240
    focal: float = 240.0
    baseline: float = 0.12         # metres, for the right view
    num_frames: int = 60
    fps: float = 20.0
    texels_per_metre: float = 90.0
    texture_blur: float = 0.8      # sigma in texels: limits aliasing when minified
    noise_sigma: float = 0.0       # image noise in grey levels
    color: bool = True
    seed: int = 0


def random_texture(width: int, height: int, rng: np.random.Generator, blur: float) -> np.ndarray:
    """Noise background plus many random shapes: dense, distinctive corners everywhere."""
    coarse = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    num_shapes = int(width * height / 120)
    for _ in range(num_shapes):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(3, 14))
        kind = rng.integers(0, 4)
        if kind == 0:
            cv2.rectangle(texture, (x, y), (x + size, y + int(rng.integers(3, 14))), colour, -1)
        elif kind == 1:
            cv2.circle(texture, (x, y), size // 2 + 1, colour, -1)
        elif kind == 2:
            pts = (np.array([x, y]) + rng.integers(-size, size + 1, (3, 2))).astype(np.int32)
            cv2.fillPoly(texture, [pts], colour)
        else:
            end = (x + int(rng.integers(-2 * size, 2 * size)), y + int(rng.integers(-2 * size, 2 * size)))
            cv2.line(texture, (x, y), end, colour, int(rng.integers(1, 3)))
    if blur > 0:
        texture = cv2.GaussianBlur(texture, (0, 0), blur)
    return texture


def make_rect(origin, axis_u, axis_v, rng, config: RenderConfig) -> Rect:
    origin, axis_u, axis_v = (np.asarray(v, np.float64) for v in (origin, axis_u, axis_v))
    size = (max(int(np.linalg.norm(axis_u) * config.texels_per_metre), 8),
            max(int(np.linalg.norm(axis_v) * config.texels_per_metre), 8))
    return Rect(origin, axis_u, axis_v, random_texture(*size, rng, config.texture_blur))


def room_with_boxes(rng: np.random.Generator, config: RenderConfig) -> list[Rect]:
    """A 4.4 x 2.4 x 6 m room (OpenCV axes: y down) with two boxes standing on the floor."""
    x0, x1, y0, y1, z0, z1 = -2.2, 2.2, -1.2, 1.2, -2.0, 4.0
    dx, dy, dz = x1 - x0, y1 - y0, z1 - z0
    rects = [  # axes ordered so that each normal (u x v) points into the room
        make_rect([x1, y0, z1], [-dx, 0, 0], [0, dy, 0], rng, config),   # front wall
        make_rect([x0, y0, z0], [dx, 0, 0], [0, dy, 0], rng, config),    # back wall
        make_rect([x0, y0, z1], [0, 0, -dz], [0, dy, 0], rng, config),   # left wall
        make_rect([x1, y0, z0], [0, 0, dz], [0, dy, 0], rng, config),    # right wall
        make_rect([x0, y1, z0], [dx, 0, 0], [0, 0, dz], rng, config),    # floor
        make_rect([x0, y0, z1], [dx, 0, 0], [0, 0, -dz], rng, config),   # ceiling
    ]
    rects += box([-1.2, 0.4, 2.4], [0.7, 0.8, 0.6], rng, config)
    rects += box([0.7, -0.3, 3.0], [0.6, 1.5, 0.6], rng, config)
    return rects


def box(corner, size, rng, config: RenderConfig) -> list[Rect]:
    """Five outward faces (no bottom) of an axis-aligned box; ``corner`` is its min corner."""
    (x, y, z), (sx, sy, sz) = corner, size
    ex, ey, ez = np.array([sx, 0, 0]), np.array([0, sy, 0]), np.array([0, 0, sz])
    c = np.array([x, y, z], np.float64)
    return [
        make_rect(c + ex, -ex, ey, rng, config),           # face towards -z
        make_rect(c + ez, ex, ey, rng, config),            # face towards +z
        make_rect(c, ez, ey, rng, config),                 # face towards -x
        make_rect(c + ex + ez, -ez, ey, rng, config),      # face towards +x
        make_rect(c, ex, ez, rng, config),                 # top, towards -y
    ]


def smooth_trajectory(num_frames: int) -> np.ndarray:
    """Camera-to-world poses (N,4,4): ~2 m of forward and sideways motion with rotation."""
    s = np.linspace(0.0, 1.0, num_frames)
    centres = np.stack([
        1.1 * np.sin(np.pi * s) - 0.3 * s,       # sideways, out and partly back
        0.15 * np.sin(2 * np.pi * s),            # a little up and down
        1.3 * s,                                 # forward
    ], axis=1)
    angles = np.stack([
        np.deg2rad(4.0) * np.sin(2 * np.pi * s),         # pitch
        np.deg2rad(14.0) * np.sin(1.5 * np.pi * s),      # yaw
        np.deg2rad(3.0) * np.sin(np.pi * s),             # roll
    ], axis=1)
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    poses[:, :3, :3] = Rotation.from_euler("xyz", angles).as_matrix()
    poses[:, :3, 3] = centres
    return poses


@dataclass
class TextureAtlas:
    """All textures stacked vertically, so one remap renders every plane."""
    image: np.ndarray
    row_offsets: np.ndarray   # (M,) first atlas row of each texture
    sizes: np.ndarray         # (M,2) texture width, height

    @staticmethod
    def build(rects: list[Rect]) -> "TextureAtlas":
        width = max(r.texture.shape[1] for r in rects)
        rows, offsets, sizes = [], [], []
        offset = 0
        for r in rects:
            h, w = r.texture.shape[:2]
            padded = np.zeros((h + 2, width, 3), np.uint8)  # gap rows: no bleeding
            padded[:h, :w] = r.texture
            rows.append(padded)
            offsets.append(offset)
            sizes.append((w, h))
            offset += h + 2
        return TextureAtlas(np.concatenate(rows), np.array(offsets, np.float32),
                            np.array(sizes, np.float32))


@dataclass
class RenderedView:
    image: np.ndarray   # HxWx3 BGR uint8
    depth: np.ndarray   # HxW float32 metres (z), 0 where nothing is hit


class Renderer:
    def __init__(self, rects: list[Rect], camera: Camera):
        self.camera = camera
        self.atlas = TextureAtlas.build(rects)
        self.origins = np.stack([r.origin for r in rects])
        self.axes_u = np.stack([r.axis_u for r in rects])
        self.axes_v = np.stack([r.axis_v for r in rects])
        normals = np.cross(self.axes_u, self.axes_v)
        self.normals = normals / np.linalg.norm(normals, axis=1, keepdims=True)
        # Dual basis: (p - origin) . dual_u = a for points p on the plane.
        uu = np.einsum("mi,mi->m", self.axes_u, self.axes_u)
        uv = np.einsum("mi,mi->m", self.axes_u, self.axes_v)
        vv = np.einsum("mi,mi->m", self.axes_v, self.axes_v)
        det = uu * vv - uv * uv
        self.dual_u = (vv[:, None] * self.axes_u - uv[:, None] * self.axes_v) / det[:, None]
        self.dual_v = (uu[:, None] * self.axes_v - uv[:, None] * self.axes_u) / det[:, None]
        # Rays through pixel centres have z = 1 in the camera, so the hit distance t is depth.
        self.pixel_u, self.pixel_v = np.meshgrid(np.arange(camera.width, dtype=np.float32),
                                                 np.arange(camera.height, dtype=np.float32))

    def render(self, world_from_cam: np.ndarray) -> RenderedView:
        R, centre = world_from_cam[:3, :3], world_from_cam[:3, 3]
        h, w = self.camera.height, self.camera.width
        M = (R @ np.linalg.inv(self.camera.K)).astype(np.float32)        # pixel -> world ray
        rays = self.pixel_u[..., None] * M[:, 0] + self.pixel_v[..., None] * M[:, 1] + M[:, 2]
        depth = np.full((h, w), np.inf, np.float32)                        # z-buffer
        map_x = np.full((h, w), -10, np.float32)                           # atlas coordinates
        map_y = np.full((h, w), -10, np.float32)
        for m in np.flatnonzero(np.einsum("mi,mi->m", self.normals, centre - self.origins) > 0):
            box = self._screen_box(m, R, centre)
            if box is None:
                continue
            (x0, x1), (y0, y1) = box
            block = np.s_[y0:y1, x0:x1]
            t, a, b = self._intersect(m, rays[block], centre)
            closer = (t > 1e-6) & (t < depth[block]) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
            width, height = self.atlas.sizes[m]
            depth[block][closer] = t[closer]
            map_x[block][closer] = a[closer] * (width - 1)
            map_y[block][closer] = b[closer] * (height - 1) + self.atlas.row_offsets[m]
        image = cv2.remap(self.atlas.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        depth[~np.isfinite(depth)] = 0
        return RenderedView(image, depth)

    def _intersect(self, m: int, rays: np.ndarray, centre: np.ndarray):
        """Depth t and plane coordinates (a, b) where ``centre + t * ray`` meets rectangle m."""
        rel = centre - self.origins[m]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.float32(-self.normals[m] @ rel) / (rays @ self.normals[m].astype(np.float32))
            a = (rays @ self.dual_u[m].astype(np.float32)) * t + np.float32(self.dual_u[m] @ rel)
            b = (rays @ self.dual_v[m].astype(np.float32)) * t + np.float32(self.dual_v[m] @ rel)
        return t, a, b

    def _screen_box(self, m: int, R: np.ndarray, centre: np.ndarray, near: float = 1e-3):
        """Pixel bounds ((x0, x1), (y0, y1)) of rectangle m clipped to z > near, or None."""
        o, u, v = self.origins[m], self.axes_u[m], self.axes_v[m]
        corners = (np.stack([o, o + u, o + u + v, o + v]) - centre) @ R   # camera frame
        clipped = []
        for p, q in zip(corners, np.roll(corners, -1, axis=0)):  # Sutherland-Hodgman, one plane
            if p[2] > near:
                clipped.append(p)
            if (p[2] > near) != (q[2] > near):
                clipped.append(p + (near - p[2]) / (q[2] - p[2]) * (q - p))
        if not clipped:
            return None
        pts = np.array(clipped)
        x = self.camera.fx * pts[:, 0] / pts[:, 2] + self.camera.cx
        y = self.camera.fy * pts[:, 1] / pts[:, 2] + self.camera.cy
        x0, x1 = max(int(np.floor(x.min())), 0), min(int(np.ceil(x.max())) + 1, self.camera.width)
        y0, y1 = max(int(np.floor(y.min())), 0), min(int(np.ceil(y.max())) + 1, self.camera.height)
        if x0 >= x1 or y0 >= y1:
            return None
        return (x0, x1), (y0, y1)


@dataclass
class RenderedSequence:
    """A source (see ``vo.datasets``) whose frames are rendered on the fly."""
    config: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self):
        c = self.config
        rng = np.random.default_rng(c.seed)
        self.camera = Camera(fx=c.focal, fy=c.focal, cx=(c.width - 1) / 2, cy=(c.height - 1) / 2,
                             width=c.width, height=c.height, baseline=c.baseline)
        self.renderer = Renderer(room_with_boxes(rng, c), self.camera)
        poses = smooth_trajectory(c.num_frames)
        self.ground_truth = (np.arange(c.num_frames) / c.fps, poses)
        self.modes = ("stereo", "rgbd", "mono")

    def frames(self, mode: str = "mono", max_frames: int | None = None) -> Iterator[Frame]:
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        stamps, poses = self.ground_truth
        count = len(stamps) if max_frames is None else min(max_frames, len(stamps))
        noise_rng = np.random.default_rng(self.config.seed + 1)
        for i in range(count):
            view = self.renderer.render(poses[i])
            frame = Frame(index=i, stamp=float(stamps[i]), image=self._finish(view.image, noise_rng),
                          path=f"rendered/{i:06d}")
            if mode == "rgbd":
                frame.depth = view.depth
            elif mode == "stereo":
                right_pose = poses[i].copy()
                right_pose[:3, 3] += poses[i][:3, 0] * self.config.baseline
                frame.right = self._finish(self.renderer.render(right_pose).image, noise_rng)
            yield frame

    def _finish(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.config.noise_sigma > 0:
            noisy = image.astype(np.float32) + rng.normal(0, self.config.noise_sigma, image.shape)
            image = np.clip(noisy, 0, 255).astype(np.uint8)
        return image if self.config.color else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


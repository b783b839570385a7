"""The map as a picture: open3d offscreen rendering (headless, CPU) and PLY export.

``render_map_png`` draws map points, keyframe frustums, the estimated trajectory and the
ground truth, seen from above and behind the cameras, so a run can be judged without a
screen. The scene helpers here (frustum wireframes, framing, the up direction) are plain
numpy and are shared with the live viewer in ``map3d``.

open3d is imported inside the functions that need it: the tracker process never pays for it.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# RGB 0..1. Points usually come out grey (grey images), so the lines use saturated colours.
TRAJECTORY_COLOUR = (0.95, 0.40, 0.00)   # orange
GT_COLOUR = (0.10, 0.60, 0.20)           # green
KEYFRAME_COLOUR = (0.15, 0.35, 0.85)     # blue
CURRENT_COLOUR = (0.85, 0.10, 0.55)      # magenta, the live camera
POINT_COLOUR = (0.25, 0.25, 0.25)        # when no colours are given
BACKGROUND = (1.0, 1.0, 1.0)
CAMERA_UP = np.array([0.0, -1.0, 0.0])   # OpenCV cameras: y points down, so up is -y


class RenderError(RuntimeError):
    """Offscreen rendering or writing the file failed; the message is one line."""


# ----------------------------------------------------------------------------- scene geometry (numpy)

def frustum_wireframe(poses: np.ndarray, size: float, aspect: float = 4 / 3, fov_deg: float = 60.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (5K,3) and line indices (8K,2) of a pyramid per camera-to-world pose.

    The apex is the camera centre; the base lies ``size`` ahead along +z (OpenCV camera).
    """
    poses = np.asarray(poses, np.float64).reshape(-1, 4, 4)
    half_w = size * np.tan(np.radians(fov_deg) / 2)
    half_h = half_w / aspect
    local = np.array([[0, 0, 0], [-half_w, -half_h, size], [half_w, -half_h, size],
                      [half_w, half_h, size], [-half_w, half_h, size]])
    vertices = np.einsum("kij,nj->kni", poses[:, :3, :3], local) + poses[:, None, :3, 3]
    # Four edges from the apex, four around the base.
    edges = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]])
    lines = edges[None] + 5 * np.arange(len(poses))[:, None, None]
    return vertices.reshape(-1, 3), lines.reshape(-1, 2)


def polyline(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points = finite_rows(points)
    count = len(points)
    return points, np.stack([np.arange(count - 1), np.arange(1, count)], axis=1) if count > 1 else np.zeros((0, 2), int)


def finite_rows(points: np.ndarray | None) -> np.ndarray:
    if points is None:
        return np.zeros((0, 3))
    points = np.asarray(points, np.float64).reshape(-1, 3)
    return points[np.all(np.isfinite(points), axis=1)]


def estimate_up(poses: np.ndarray) -> np.ndarray:
    """World up: the mean of the cameras' own up (-y) axes, which holds in any world frame
    as long as the cameras were held roughly upright (cars, handheld, drones)."""
    if len(poses) == 0:
        return CAMERA_UP.copy()
    up = -poses[:, :3, 1].mean(axis=0)
    norm = np.linalg.norm(up)
    return up / norm if norm > 1e-6 else CAMERA_UP.copy()


def horizontal(vector: np.ndarray, up: np.ndarray) -> np.ndarray | None:
    """``vector`` with its ``up`` part removed, unit length; None if it points (nearly) up."""
    flat = vector - np.dot(vector, up) * up
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 1e-6 else None


def any_perpendicular(up: np.ndarray) -> np.ndarray:
    helper = np.array([1.0, 0, 0]) if abs(up[0]) < 0.9 else np.array([0, 0, 1.0])
    return horizontal(helper, up)


def viewing_direction(poses: np.ndarray, trajectory: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Horizontal direction the cameras mostly looked in, else the direction of travel."""
    candidates = []
    if len(poses):
        candidates.append(poses[:, :3, 2].mean(axis=0))
    if len(trajectory) > 1:
        candidates.append(trajectory[-1] - trajectory[0])
    for candidate in candidates:
        direction = horizontal(candidate, up)
        if direction is not None:
            return direction
    return any_perpendicular(up)


@dataclass
class Framing:
    centre: np.ndarray
    radius: float
    points: np.ndarray      # (P,3) what must be in view


def frame_scene(points: np.ndarray, paths: list[np.ndarray], outlier_percentile: float = 5.0) -> Framing:
    """What the view must hold: all camera paths and the bulk of the map points.

    Map points are cut at per-axis percentiles: monocular and far stereo points scatter
    widely, and framing them all would shrink the interesting part to a dot.
    """
    parts = [p for p in paths if len(p)]
    if len(points) >= 20:
        low, high = np.percentile(points, [outlier_percentile, 100 - outlier_percentile], axis=0)
        parts.append(points[np.all((points >= low) & (points <= high), axis=1)])
    elif len(points):
        parts.append(points)
    if not parts:
        return Framing(np.zeros(3), 1.0, np.zeros((1, 3)))
    everything = np.concatenate(parts)
    low, high = everything.min(axis=0), everything.max(axis=0)
    return Framing((low + high) / 2, max(float(np.linalg.norm(high - low)) / 2, 1e-3), everything)


def overview_eye(framing: Framing, up: np.ndarray, forward: np.ndarray, fov_deg: float, aspect: float,
                 elevation_deg: float = 35.0, margin: float = 1.08) -> np.ndarray:
    """Camera position behind (against ``forward``) and above the scene, just far enough
    back that every framing point projects inside the image."""
    elevation = np.radians(elevation_deg)
    backward = -np.cos(elevation) * forward + np.sin(elevation) * up   # from the centre to the eye
    right = np.cross(-backward, up)
    right /= np.linalg.norm(right)
    screen_up = np.cross(right, -backward)
    offsets = framing.points - framing.centre
    tan_v = np.tan(np.radians(fov_deg) / 2)
    tan_h = tan_v * aspect
    # A point at offset q has depth (d - q.backward); it is in view when its lateral offsets
    # fit the field of view at that depth, which bounds the distance d from below.
    along = offsets @ backward
    needed = np.maximum(np.abs(offsets @ right) / tan_h, np.abs(offsets @ screen_up) / tan_v) + along
    distance = margin * max(float(needed.max()), 1e-3)
    return framing.centre + distance * backward


def point_colours(colors: np.ndarray | None, count: int) -> np.ndarray:
    """(count,3) RGB in 0..1; 0..255 input is rescaled, missing colours are grey."""
    if colors is None or len(colors) != count:
        return np.tile(POINT_COLOUR, (count, 1))
    colors = np.asarray(colors, np.float64).reshape(-1, 3)
    return np.clip(colors / 255.0 if colors.max(initial=0) > 1.0 else colors, 0.0, 1.0)


@dataclass
class MapScene:
    """What is drawn, cleaned of non-finite rows, with the view derived from it."""
    points: np.ndarray           # (N,3)
    colours: np.ndarray          # (N,3) RGB 0..1
    keyframe_poses: np.ndarray   # (K,4,4) camera-to-world
    trajectory: np.ndarray       # (M,3)
    gt: np.ndarray               # (G,3), may be empty
    current_pose: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, points, colors, keyframe_poses, trajectory, gt=None, current_pose=None) -> "MapScene":
        points = np.zeros((0, 3)) if points is None else np.asarray(points, np.float64).reshape(-1, 3)
        colours = point_colours(colors, len(points))
        keep = np.all(np.isfinite(points), axis=1)
        poses = np.zeros((0, 4, 4)) if keyframe_poses is None else np.asarray(keyframe_poses, np.float64).reshape(-1, 4, 4)
        poses = poses[np.all(np.isfinite(poses.reshape(len(poses), 16)), axis=1)]
        current = None if current_pose is None else np.asarray(current_pose, np.float64).reshape(4, 4)
        return cls(points[keep], colours[keep], poses, finite_rows(trajectory), finite_rows(gt), current)

    def framing(self) -> Framing:
        return frame_scene(self.points, [self.trajectory, self.gt, self.keyframe_poses[:, :3, 3]])

    def up(self) -> np.ndarray:
        return estimate_up(self.keyframe_poses if len(self.keyframe_poses) or self.current_pose is None
                           else self.current_pose[None])

    def keyframe_size(self, framing: Framing) -> float:
        """Frustum depth: visible at scene scale, yet not overlapping where keyframes are dense."""
        size = 0.04 * framing.radius
        if len(self.keyframe_poses) > 2:
            spacing = np.linalg.norm(np.diff(self.keyframe_poses[:, :3, 3], axis=0), axis=1)
            size = min(size, max(2.0 * float(np.median(spacing)), 0.01 * framing.radius))
        return size

    def legend(self) -> list[tuple[str, tuple]]:
        present = [("estimated", TRAJECTORY_COLOUR, len(self.trajectory) > 1),
                   ("ground truth", GT_COLOUR, len(self.gt) > 1),
                   ("keyframes", KEYFRAME_COLOUR, len(self.keyframe_poses) > 0)]
        return [(name, colour) for name, colour, shown in present if shown]


# ----------------------------------------------------------------------------- open3d geometry

def import_open3d():
    try:
        import open3d
    except ImportError as exc:   # a broken install usually lacks a system GL library
        raise RenderError(f"open3d is not usable: {exc}") from None
    return open3d


@contextmanager
def native_stdout_silenced():
    """Discard what C++ code writes to stdout meanwhile: Filament announces its engine and
    GPU there on every renderer, which would mix with the program's own output."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:   # no real stdout (e.g. a captured stream): nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def o3d_points(o3d, points: np.ndarray, colours: np.ndarray):
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.colors = o3d.utility.Vector3dVector(colours)
    return cloud


def o3d_lines(o3d, vertices: np.ndarray, lines: np.ndarray, colour):
    line_set = o3d.geometry.LineSet(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector2iVector(lines))
    line_set.colors = o3d.utility.Vector3dVector(np.tile(colour, (len(lines), 1)))
    return line_set


# ----------------------------------------------------------------------------- offscreen render

def render_map_png(path: str | Path, points: np.ndarray | None, colors: np.ndarray | None,
                   keyframe_poses: np.ndarray | None, trajectory: np.ndarray | None,
                   gt: np.ndarray | None = None, size: tuple[int, int] = (1280, 960),
                   fov_deg: float = 50.0, point_size: float = 4.0) -> None:
    """Render the map to a PNG of ``size`` (width, height), headless.

    ``points`` (N,3) with ``colors`` (N,3) RGB in 0..1 (0..255 accepted); ``keyframe_poses``
    (K,4,4) camera-to-world; ``trajectory`` and ``gt`` (M,3) positions in the same frame.
    """
    o3d = import_open3d()
    scene = MapScene.from_arrays(points, colors, keyframe_poses, trajectory, gt)
    width, height = (int(v) for v in size)
    scale = max(width, height) / 1280   # line and point sizes were tuned at 1280 px
    with native_stdout_silenced():
        image = render_scene(o3d, scene, (width, height), fov_deg, point_size * scale, scale)
    draw_legend(image, scene.legend())
    if not cv2.imwrite(str(path), image):
        raise RenderError(f"{path}: cannot write the image (missing folder or unknown extension)")


def render_scene(o3d, scene: MapScene, size: tuple[int, int], fov_deg: float, point_size: float,
                 line_scale: float) -> np.ndarray:
    """BGR image of the scene, seen from above and behind the cameras."""
    width, height = size
    try:
        renderer = o3d.visualization.rendering.OffscreenRenderer(width, height)
    except Exception as exc:   # open3d raises plain RuntimeError for a missing EGL / Vulkan
        raise RenderError(f"open3d cannot render offscreen here: {str(exc).splitlines()[0]}") from None
    view = renderer.scene
    view.set_background([*BACKGROUND, 1.0])
    # Filament's tone mapping greys the white background and pales every colour.
    view.view.set_post_processing(False)
    framing = scene.framing()
    if len(scene.points):
        view.add_geometry("points", o3d_points(o3d, scene.points, scene.colours), points_material(o3d, point_size))
    for name, geometry, width_px in map_line_sets(o3d, scene, framing):
        view.add_geometry(name, geometry, line_material(o3d, width_px * line_scale))
    up = scene.up()
    eye = overview_eye(framing, up, viewing_direction(scene.keyframe_poses, scene.trajectory, up),
                       fov_deg, width / height)
    renderer.setup_camera(fov_deg, framing.centre, eye, up)
    image = np.asarray(renderer.render_to_image())
    del renderer   # frees the GPU context before the next render in this process
    return cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2BGR)


def map_line_sets(o3d, scene: MapScene, framing: Framing):
    """(name, LineSet, line width px) for whatever is present; ground truth under the estimate."""
    sets = []
    if len(scene.gt) > 1:
        sets.append(("gt", o3d_lines(o3d, *polyline(scene.gt), GT_COLOUR), 3.0))
    if len(scene.keyframe_poses):
        wireframe = frustum_wireframe(scene.keyframe_poses, scene.keyframe_size(framing))
        sets.append(("keyframes", o3d_lines(o3d, *wireframe, KEYFRAME_COLOUR), 1.5))
    if len(scene.trajectory) > 1:
        sets.append(("trajectory", o3d_lines(o3d, *polyline(scene.trajectory), TRAJECTORY_COLOUR), 3.0))
    return sets


def points_material(o3d, point_size: float):
    material = o3d.visualization.rendering.MaterialRecord()
    material.shader = "defaultUnlit"   # map points have no normals: lit shading would be black
    material.point_size = float(point_size)
    return material


def line_material(o3d, width: float):
    material = o3d.visualization.rendering.MaterialRecord()
    material.shader = "unlitLine"      # the only shader that honours line_width
    material.line_width = float(width)
    return material


def draw_legend(image: np.ndarray, entries: list[tuple[str, tuple]]) -> None:
    """Colour swatches with names, bottom left (open3d's offscreen scene has no text)."""
    if not entries:
        return
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.45, image.shape[0] / 1600)
    thickness = max(1, round(font_scale * 2))
    (_, text_h), _ = cv2.getTextSize("Ag", font, font_scale, thickness)
    line_h, pad = int(text_h * 2.0), int(text_h)
    y = image.shape[0] - pad - line_h * len(entries)
    text_w = max(cv2.getTextSize(name, font, font_scale, thickness)[0][0] for name, _ in entries)
    # Lighten what lies under the legend so the names stay readable over map points.
    box = image[max(y - pad, 0):, :min(pad * 2 + 4 * text_h + text_w, image.shape[1])]
    box[:] = (255 - 0.25 * (255 - box.astype(np.float32))).astype(np.uint8)
    for name, colour in entries:
        bgr = tuple(int(255 * c) for c in colour[::-1])
        middle = y + text_h // 2
        cv2.line(image, (pad, middle), (pad + 3 * text_h, middle), bgr, max(2, thickness + 1), cv2.LINE_AA)
        cv2.putText(image, name, (pad + 4 * text_h, y + text_h), font, font_scale, (40, 40, 40), thickness, cv2.LINE_AA)
        y += line_h


def save_map_ply(path: str | Path, points: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Map points (N,3) with RGB colours (0..1 or 0..255) as a PLY point cloud."""
    o3d = import_open3d()
    scene = MapScene.from_arrays(points, colors, None, None)
    if not o3d.io.write_point_cloud(str(path), o3d_points(o3d, scene.points, scene.colours)):
        raise RenderError(f"{path}: cannot write the point cloud (missing folder or not .ply/.pcd)")

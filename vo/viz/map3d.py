"""A live 3D view of the map that never slows the tracker.

The open3d window runs in its own process (multiprocessing, spawn: a fresh interpreter,
so no forked OpenGL or Qt state). The tracker hands it snapshots through a small bounded
queue: ``update`` copies the arrays, rate-limits itself and drops the snapshot when the
queue is full, so it returns in well under a millisecond and never waits for the window.
The viewer only draws the newest snapshot it has; older ones are stale anyway.

Shown: map points in their image colours, keyframe frustums (blue), the estimated
trajectory (orange), the ground truth (green) and the current camera (magenta), seen by a
virtual camera that follows the current one from behind and above. Keys in the window:
F toggles follow (off: mouse navigation), Q / Esc closes it.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass

import numpy as np

from vo.viz import display_problem
from vo.viz import render

READY = "ready"
STARTUP_TIMEOUT_S = 60.0   # importing open3d in a fresh interpreter is slow on a loaded machine


class ViewerError(RuntimeError):
    """The viewer cannot run here (no display, open3d failed); the message is one line."""


@dataclass
class ViewerOptions:
    title: str = "spvo map"
    width: int = 1280
    height: int = 800
    max_rate_hz: float = 3.0       # snapshots sent per second, at most
    max_points: int = 200_000      # more are thinned evenly before sending
    max_path_points: int = 50_000  # trajectory / ground truth vertices, likewise
    point_size: float = 3.0
    follow: bool = True
    frame_rate_hz: float = 10.0    # window redraws per second (software GL shares the CPU)
    nice: int = 10                 # the viewer yields the CPU to the tracker
    save_on_close: str | None = None   # PNG of the last view, written when the window closes


@dataclass
class MapSnapshot:
    """What one update carries across the process boundary (float32 to halve the pickle)."""
    points: np.ndarray           # (N,3)
    colors: np.ndarray           # (N,3) RGB 0..1
    keyframe_poses: np.ndarray   # (K,4,4) camera-to-world
    trajectory: np.ndarray       # (M,3)
    gt: np.ndarray | None        # (G,3)
    current_pose: np.ndarray | None   # (4,4) camera-to-world of the latest frame


# ----------------------------------------------------------------------------- tracker side

class Map3DViewer:
    """Live map window. ``update`` never blocks; ``close`` ends the window process.

    Raises ``ViewerError`` at start when there is no display (the caller goes headless).
    Like any spawn-based multiprocessing, the program's main script needs the
    ``if __name__ == "__main__":`` guard (console scripts and ``python -m`` have it).
    """

    def __init__(self, start: bool = True, options: ViewerOptions | None = None):
        self.options = options or ViewerOptions()
        self._process = None
        self._updates = None
        self._stop = None
        self._window_closed = None
        self._last_sent = -np.inf
        if start:
            self.start()

    def start(self) -> None:
        """Open the window; returns once it is up, raises ``ViewerError`` if it cannot be."""
        if self._process is not None:
            return
        problem = display_problem()
        if problem is not None:
            raise ViewerError(f"3D viewer: {problem}")
        context = mp.get_context("spawn")
        # Two slots: one being drawn, one waiting. More would only queue stale snapshots.
        self._updates = context.Queue(maxsize=2)
        status = context.Queue()
        self._stop, self._window_closed = context.Event(), context.Event()
        self._process = context.Process(target=viewer_main, name="spvo-map3d", daemon=True,
                                        args=(self._updates, status, self._stop, self._window_closed, self.options))
        self._process.start()
        message = wait_for_status(status, self._process, STARTUP_TIMEOUT_S)
        if message != READY:
            self.close()
            raise ViewerError(f"3D viewer: {message}")

    @property
    def is_open(self) -> bool:
        return (self._process is not None and self._process.is_alive()
                and not self._window_closed.is_set())

    def update(self, points_xyz: np.ndarray, colors: np.ndarray | None, keyframe_poses: np.ndarray,
               trajectory: np.ndarray, gt: np.ndarray | None = None,
               current_pose: np.ndarray | None = None) -> bool:
        """Offer a snapshot; True if it was sent, False if rate-limited, dropped or closed.

        ``points_xyz`` (N,3), ``colors`` (N,3) RGB 0..1, ``keyframe_poses`` (K,4,4) and
        ``current_pose`` (4,4) camera-to-world, ``trajectory`` (M,3), ``gt`` (G,3) or None.
        Without ``current_pose`` the view follows the last keyframe's orientation.
        """
        if not self.is_open:
            return False
        now = time.monotonic()
        if now - self._last_sent < 1.0 / self.options.max_rate_hz:
            return False
        snapshot = make_snapshot(points_xyz, colors, keyframe_poses, trajectory, gt, current_pose, self.options)
        try:
            self._updates.put_nowait(snapshot)
        except queue.Full:   # the window is behind: this snapshot is dropped, the next one will do
            return False
        self._last_sent = now
        return True

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the user closes the window (e.g. to look at the final map); True if closed."""
        if self._process is None:
            return True
        self._process.join(timeout)
        return not self._process.is_alive()

    def close(self) -> None:
        if self._process is None:
            return
        self._stop.set()
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=2.0)
        # Unsent snapshots must not keep this process alive at exit.
        self._updates.cancel_join_thread()
        self._updates.close()
        self._process = None

    def __enter__(self) -> "Map3DViewer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_colours(image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """(N,3) RGB in 0..1 of the pixels under ``keypoints`` (N,2); grey images give grey."""
    keypoints = np.asarray(keypoints, np.float64).reshape(-1, 2)
    height, width = image.shape[:2]
    cols = np.clip(np.round(keypoints[:, 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.round(keypoints[:, 1]).astype(np.int64), 0, height - 1)
    pixels = image[rows, cols].astype(np.float64) / 255.0
    if pixels.ndim == 1:
        return np.repeat(pixels[:, None], 3, axis=1)
    return pixels[:, 2::-1] if pixels.shape[1] >= 3 else np.repeat(pixels[:, :1], 3, axis=1)   # BGR -> RGB


class PointColours:
    """A colour per map point id, taken from the image where the point was first seen.

    Ids are map point slots (small non-negative integers), so colours live in an array
    indexed by id. Call ``observe`` every frame with the tracked keypoints and their point
    ids, and ``retain`` with the live ids now and then, so that reused ids get a fresh colour.
    """

    def __init__(self, capacity: int = 4096):
        self._colours = np.tile(render.POINT_COLOUR, (capacity, 1))
        self._known = np.zeros(capacity, bool)

    def __len__(self) -> int:
        return int(self._known.sum())

    def observe(self, image: np.ndarray, keypoints: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64).reshape(-1)
        valid = ids >= 0
        if valid.any():
            self._reserve(int(ids[valid].max()) + 1)
        new = valid & ~self._known[np.where(valid, ids, 0)]
        self._colours[ids[new]] = image_colours(image, np.asarray(keypoints).reshape(-1, 2)[new])
        self._known[ids[new]] = True

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """(N,3) RGB 0..1; points never observed are grey."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        self._reserve(int(ids.max(initial=-1)) + 1)
        safe = np.maximum(ids, 0)
        known = (ids >= 0) & self._known[safe]
        return np.where(known[:, None], self._colours[safe], render.POINT_COLOUR)

    def retain(self, ids: np.ndarray) -> None:
        keep = np.zeros_like(self._known)
        ids = np.asarray(ids, np.int64).reshape(-1)
        keep[ids[(ids >= 0) & (ids < len(keep))]] = True
        self._known &= keep

    def _reserve(self, size: int) -> None:
        if size > len(self._known):
            extra = max(size, 2 * len(self._known)) - len(self._known)
            self._colours = np.vstack([self._colours, np.tile(render.POINT_COLOUR, (extra, 1))])
            self._known = np.concatenate([self._known, np.zeros(extra, bool)])


def thin(array: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` rows, evenly spaced and keeping the first and last (deterministic,
    so the view does not flicker, and a path still ends at the current camera)."""
    if len(array) <= limit:
        return array
    return array[np.linspace(0, len(array) - 1, limit).astype(np.int64)]


def as_float32(array, columns: int) -> np.ndarray:
    if array is None:
        return np.zeros((0, columns), np.float32)
    return np.array(array, np.float32).reshape(-1, columns)   # a copy: the caller may reuse its arrays


def make_snapshot(points, colors, keyframe_poses, trajectory, gt, current_pose, options: ViewerOptions) -> MapSnapshot:
    points = as_float32(points, 3)
    colours = render.point_colours(None if colors is None else np.asarray(colors), len(points)).astype(np.float32)
    step_points = thin(np.arange(len(points)), options.max_points)
    return MapSnapshot(
        points=points[step_points], colors=colours[step_points],
        keyframe_poses=as_float32(keyframe_poses, 16).reshape(-1, 4, 4),
        trajectory=thin(as_float32(trajectory, 3), options.max_path_points),
        gt=None if gt is None else thin(as_float32(gt, 3), options.max_path_points),
        current_pose=None if current_pose is None else np.array(current_pose, np.float32).reshape(4, 4))


def wait_for_status(status, process, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return status.get(timeout=0.2)
        except queue.Empty:
            if not process.is_alive():
                # Usually an import error printed above, or a script without the
                # `if __name__ == "__main__":` guard that spawn needs to re-import it.
                return f"window process exited (code {process.exitcode}) before it was ready"
    return f"window did not open within {timeout:.0f} s"


# ----------------------------------------------------------------------------- viewer process

def viewer_main(updates, status, stop, window_closed, options: ViewerOptions) -> None:
    """Entry point of the window process."""
    try:
        os.nice(options.nice)
    except (AttributeError, OSError):
        pass   # not POSIX, or not allowed: run at normal priority
    # Software GL (llvmpipe) would otherwise start one render thread per core against the tracker.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    try:
        import open3d as o3d
        if hasattr(o3d.utility, "set_verbosity_level"):
            o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
        window = LiveMapWindow(o3d, options)
    except Exception as exc:   # report any start-up failure as one line to the tracker side
        status.put(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'failed'}")
        return
    status.put(READY)
    try:
        period = 1.0 / options.frame_rate_hz
        idle_redraw_every = max(1, int(options.frame_rate_hz))   # ~1 Hz when nothing arrives
        for tick in itertools.count():
            if stop.is_set():
                break
            started = time.monotonic()
            latest = newest(updates)
            if latest is not None:
                window.show(latest)
            if not window.redraw(render=latest is not None or tick % idle_redraw_every == 0):
                break   # the user closed the window
            time.sleep(max(0.0, period - (time.monotonic() - started)))
    finally:
        window_closed.set()
        window.destroy()


def newest(updates) -> MapSnapshot | None:
    """Drain the queue, keep the last snapshot."""
    latest = None
    while True:
        try:
            latest = updates.get_nowait()
        except queue.Empty:
            return latest


class LiveMapWindow:
    """The open3d legacy Visualizer with one geometry per layer, updated in place."""

    def __init__(self, o3d, options: ViewerOptions):
        self.o3d, self.options = o3d, options
        self.vis = o3d.visualization.VisualizerWithKeyCallback()
        if not self.vis.create_window(options.title, options.width, options.height):
            raise RuntimeError("open3d could not create a window")
        render_option = self.vis.get_render_option()
        render_option.background_color = np.array(render.BACKGROUND)
        render_option.point_size = options.point_size
        self.follow = options.follow
        self.vis.register_key_callback(ord("F"), self._toggle_follow)
        self.layers = {name: geometry for name, geometry in (
            ("points", o3d.geometry.PointCloud()), ("gt", o3d.geometry.LineSet()),
            ("keyframes", o3d.geometry.LineSet()), ("trajectory", o3d.geometry.LineSet()),
            ("current", o3d.geometry.LineSet()))}
        self.added = False
        self.eye = self.target = None   # smoothed follow camera

    def _toggle_follow(self, vis) -> bool:
        self.follow = not self.follow
        return False

    def show(self, snapshot: MapSnapshot) -> None:
        view = render.MapScene.from_arrays(snapshot.points, snapshot.colors, snapshot.keyframe_poses,
                                           snapshot.trajectory, snapshot.gt, snapshot.current_pose)
        marker = view.keyframe_size(view.framing())
        cloud = self.layers["points"]
        cloud.points = self.o3d.utility.Vector3dVector(view.points)
        cloud.colors = self.o3d.utility.Vector3dVector(view.colours)
        self._set_lines("gt", *render.polyline(view.gt), render.GT_COLOUR)
        self._set_lines("trajectory", *render.polyline(view.trajectory), render.TRAJECTORY_COLOUR)
        self._set_lines("keyframes", *render.frustum_wireframe(view.keyframe_poses, marker), render.KEYFRAME_COLOUR)
        current = view.current_pose[None] if view.current_pose is not None else np.zeros((0, 4, 4))
        self._set_lines("current", *render.frustum_wireframe(current, 1.5 * marker), render.CURRENT_COLOUR)

        if not self.added:
            for geometry in self.layers.values():
                self.vis.add_geometry(geometry, reset_bounding_box=True)
            self.added = True
        else:
            for geometry in self.layers.values():
                self.vis.update_geometry(geometry)
        if self.follow:
            self._follow(view)

    def _set_lines(self, name: str, vertices: np.ndarray, lines: np.ndarray, colour) -> None:
        line_set = self.layers[name]
        line_set.points = self.o3d.utility.Vector3dVector(vertices)
        line_set.lines = self.o3d.utility.Vector2iVector(lines)
        line_set.colors = self.o3d.utility.Vector3dVector(np.tile(colour, (len(lines), 1)))

    def _follow(self, view: render.MapScene) -> None:
        """Chase camera: behind and above the current camera, distance set by the scene depth."""
        poses = view.keyframe_poses
        pose = view.current_pose if view.current_pose is not None else (poses[-1] if len(poses) else None)
        if pose is None:
            return
        centre = view.trajectory[-1] if len(view.trajectory) else pose[:3, 3]
        up = view.up()
        forward = render.horizontal(pose[:3, 2], up)
        if forward is None:   # looking straight down or up: keep the previous view
            return
        depth = follow_distance(view.points, centre)
        eye = centre - 1.2 * depth * forward + 0.7 * depth * up
        target = centre + 0.5 * depth * forward
        # Smooth, or every jitter of the pose estimate shakes the whole view.
        self.eye = eye if self.eye is None else 0.7 * self.eye + 0.3 * eye
        self.target = target if self.target is None else 0.7 * self.target + 0.3 * target
        set_view(self.vis, self.eye, self.target, up, 20.0 * depth)

    def redraw(self, render: bool = True) -> bool:
        """Handle window events; render only when asked (new data, or the idle rate). False once closed."""
        if not self.vis.poll_events():
            return False
        if render:
            self.vis.update_renderer()
        return True

    def destroy(self) -> None:
        if self.options.save_on_close:
            self.vis.capture_screen_image(self.options.save_on_close, do_render=True)
        self.vis.destroy_window()


def follow_distance(points: np.ndarray, centre: np.ndarray) -> float:
    """Median distance from the camera to the map: a scale that also works for monocular maps."""
    if len(points) < 10:
        return 1.0
    return float(np.median(np.linalg.norm(points - centre, axis=1)))


def set_view(vis, eye: np.ndarray, target: np.ndarray, up: np.ndarray, far: float) -> None:
    """Place the legacy Visualizer's camera exactly (its own lookat/zoom depend on bounding boxes)."""
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    true_up = np.cross(back, right)
    # OpenCV-style extrinsic: camera x right, y down, z forward (= -back).
    rotation = np.stack([right, -true_up, -back])
    extrinsic = np.eye(4)
    extrinsic[:3, :3] = rotation
    extrinsic[:3, 3] = -rotation @ eye
    control = vis.get_view_control()
    control.set_constant_z_near(far * 1e-4)
    control.set_constant_z_far(far)
    params = control.convert_to_pinhole_camera_parameters()
    params.extrinsic = extrinsic
    control.convert_from_pinhole_camera_parameters(params, allow_arbitrary=True)

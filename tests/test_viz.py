"""Visualisation and calibration, all headless: offscreen render, plots, track drawing, video,
checkerboard calibration on a synthetic video, and the live 3D viewer on a virtual X server.

GUI tests start their own Xvfb when there is no display; without Xvfb they skip, or fail
under CI=true, like the shared-data tests in conftest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vo import calibrate
from vo.datasets.calib import load_calibration
from vo.viz import DisplayError, display_problem
from vo.viz.map3d import Map3DViewer, PointColours, ViewerError, ViewerOptions
from vo.viz.plots import choose_view_axes, plot_trajectory
from vo.viz.render import POINT_COLOUR, RenderError, render_map_png, save_map_ply
from vo.viz.tracks import (INLIER_COLOUR, OUTLIER_COLOUR, TrackHistory, TracksWindow, VideoSink, VideoSinkError,
                           draw_tracks, make_hud)

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str):
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


# ----------------------------------------------------------------------------- synthetic scene

def look_pose(centre: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Camera-to-world pose at ``centre`` looking along ``forward``, upright (y down)."""
    z = forward / np.linalg.norm(forward)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, :3] = np.column_stack([x, np.cross(z, x), z])
    pose[:3, 3] = centre
    return pose


def synthetic_map(num_points: int = 3000, num_frames: int = 60, seed: int = 0):
    """Cameras on a half circle looking out at a cylindrical wall, a floor below (y down)."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, np.pi, num_frames)
    radial = np.column_stack([np.cos(angles), np.zeros(num_frames), np.sin(angles)])
    trajectory = 2.0 * radial
    poses = np.stack([look_pose(c, r) for c, r in zip(trajectory, radial)])
    wall_angles = rng.uniform(-0.3, np.pi + 0.3, num_points)
    points = np.column_stack([5 * np.cos(wall_angles), rng.uniform(-1.5, 1.5, num_points), 5 * np.sin(wall_angles)])
    points[::3, 1] = 1.5   # a third on the floor
    points[::3, [0, 2]] *= rng.uniform(0.3, 1.0, (len(points[::3]), 1))
    colors = rng.uniform(0, 1, (num_points, 3))
    gt = trajectory + np.column_stack([np.zeros(num_frames), 0.05 * np.sin(3 * angles), np.zeros(num_frames)])
    return points, colors, poses, trajectory, gt


def non_background_fraction(image: np.ndarray, background=(255, 255, 255), tolerance: int = 10) -> float:
    return float(np.mean(np.any(np.abs(image.astype(int) - background) > tolerance, axis=2)))


# ----------------------------------------------------------------------------- offscreen render, PLY

def test_render_map_png_is_framed_and_not_blank(tmp_path):
    points, colors, poses, trajectory, gt = synthetic_map()
    path = tmp_path / "map.png"
    try:
        render_map_png(path, points, colors, poses[::6], trajectory, gt=gt, size=(400, 300))
    except RenderError as exc:
        skip_or_fail(str(exc))
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (300, 400, 3)
    assert non_background_fraction(image) > 0.03
    # The estimated trajectory (orange, bright red channel, little blue) is in the picture.
    orange = (image[..., 2] > 200) & (image[..., 1] > 60) & (image[..., 1] < 150) & (image[..., 0] < 60)
    assert orange.sum() > 30


def test_save_map_ply_round_trip(tmp_path):
    import open3d as o3d
    points, colors, *_ = synthetic_map(num_points=500)
    save_map_ply(tmp_path / "map.ply", points, colors)
    cloud = o3d.io.read_point_cloud(str(tmp_path / "map.ply"))
    assert len(cloud.points) == 500
    np.testing.assert_allclose(np.asarray(cloud.colors), colors, atol=1 / 255)


# ----------------------------------------------------------------------------- plots

def test_plot_trajectory_with_ground_truth(tmp_path):
    _, _, _, trajectory, gt = synthetic_map()
    stamps = np.arange(len(trajectory)) / 30.0
    path = tmp_path / "trajectory.png"
    plot_trajectory(path, trajectory, stamps, gt, ate_rmse=0.035, title="synthetic", size=(800, 600))
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (600, 800, 3)
    assert non_background_fraction(image) > 0.02


def test_plot_trajectory_without_ground_truth(tmp_path):
    _, _, _, trajectory, _ = synthetic_map()
    path = tmp_path / "trajectory.png"
    plot_trajectory(path, trajectory, None, None, None, "no gt", size=(640, 480))
    image = cv2.imread(str(path))
    assert image.shape == (480, 640, 3) and non_background_fraction(image) > 0.02


def test_view_axes_take_least_spread_axis_as_vertical():
    road = np.column_stack([np.linspace(0, 50, 20), np.linspace(0, 1, 20), np.linspace(0, 80, 20)])
    axes = choose_view_axes(road)   # a camera frame: y is vertical (down), top view is x-z
    assert axes.top == (0, 2) and axes.side == (2, 1) and axes.vertical_down


# ----------------------------------------------------------------------------- tracks, video

def test_track_history_keeps_bounded_trails_and_restarts_reused_ids():
    history = TrackHistory(length=5, max_gap=1, max_jump=50)
    for frame in range(8):
        trails = history.update(np.array([[10.0 + frame, 20.0], [100.0, 100.0 + frame]]), np.array([1, 2]))
    assert trails.lengths.tolist() == [5, 5] and trails.ages.tolist() == [8, 8]
    np.testing.assert_array_equal(trails.trail(0)[:, 0], [13, 14, 15, 16, 17])
    trails = history.update(np.array([[400.0, 20.0], [5.0, 5.0], [6.0, 6.0]]), np.array([1, -1, 1]))
    assert trails.lengths.tolist() == [1, 1, 1]   # id 1 reused far away restarts; -1 and repeats: no trail
    history.update(np.zeros((0, 2)), np.zeros(0))
    history.update(np.zeros((0, 2)), np.zeros(0))
    assert len(history) == 0   # unseen for longer than max_gap: forgotten


def test_track_history_grows_beyond_its_initial_capacity():
    history = TrackHistory(capacity=2)
    for frame in range(3):
        trails = history.update(np.arange(10.0).reshape(-1, 2) + frame, np.arange(5) * 10)
    assert len(history) == 5 and trails.lengths.tolist() == [3] * 5


def test_draw_tracks_marks_inliers_outliers_and_hud():
    image = np.full((240, 320), 128, np.uint8)
    history = TrackHistory()
    for frame in range(6):
        trails = history.update(np.array([[200.0 + 3 * frame, 150.0], [250.0, 60.0 + 4 * frame]]), np.array([7, 9]))
    hud = make_hud(5, 29.7, "tracking", tracked=2, map_points=1200)
    out = draw_tracks(image, trails, np.array([True, False]), hud)
    assert out.shape == (240, 320, 3) and out.dtype == np.uint8
    changed = np.any(out != 128, axis=2)
    assert changed[150, 203:215].any()                                            # the first trail
    assert np.array_equal(out[150, 215], INLIER_COLOUR)                           # its head: a green dot
    assert np.abs(out[80, 250].astype(int) - OUTLIER_COLOUR).max() < 40           # a red cross centre
    assert changed[:20, :60].any()                                                # the HUD box
    assert not changed[200:, 20:150].any()                                        # elsewhere untouched


def test_video_sink_writes_one_frame_per_input(tmp_path):
    path = tmp_path / "tracks.mp4"
    with VideoSink(path, fps=10, size=(160, 120)) as sink:
        for i in range(7):
            frame = np.full((120, 160, 3), 30 * i, np.uint8)
            sink.write(frame if i != 3 else cv2.resize(frame, (320, 240)))   # other sizes are resized
    capture = cv2.VideoCapture(str(path))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (120, 160, 3)
        count += 1
    capture.release()
    assert count == 7 and sink.frames_written == 7


def test_video_sink_error_is_one_line(tmp_path):
    with pytest.raises(VideoSinkError) as error:
        VideoSink(tmp_path / "missing" / "out.mp4", 10, (160, 120))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- calibration

def board_image(columns: int, rows: int, square_px: int, border_px: int) -> np.ndarray:
    """A checkerboard with ``columns`` x ``rows`` inner corners and a white margin."""
    cells = np.indices((rows + 1, columns + 1)).sum(axis=0) % 2
    board = np.where(np.kron(cells, np.ones((square_px, square_px))) == 0, 0, 255).astype(np.uint8)
    return cv2.copyMakeBorder(board, *[border_px] * 4, cv2.BORDER_CONSTANT, value=255)


def write_board_video(path: Path, K: np.ndarray, columns: int = 9, rows: int = 6, square: float = 0.025,
                      num_frames: int = 16, size=(640, 480), seed: int = 0) -> None:
    """Views of the board from known poses: each frame is the board image warped by K [r1 r2 t]."""
    square_px, border_px = 40, 40
    board = board_image(columns, rows, square_px, border_px)
    metres_per_px, origin_px = square / square_px, border_px + square_px   # inner corner (0, 0)
    board_from_pixels = np.array([[metres_per_px, 0, -origin_px * metres_per_px],
                                  [0, metres_per_px, -origin_px * metres_per_px], [0, 0, 1]])
    centre = np.array([columns * square / 2, rows * square / 2, 0])
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for _ in range(num_frames):
        R = Rotation.from_euler("xyz", rng.uniform([-30, -30, -15], [30, 30, 15]), degrees=True).as_matrix()
        t = rng.uniform([-0.05, -0.04, 0.45], [0.05, 0.04, 0.6]) - R @ centre
        H = K @ np.column_stack([R[:, 0], R[:, 1], t]) @ board_from_pixels
        frame = cv2.warpPerspective(board, H, size, flags=cv2.INTER_AREA, borderValue=110)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def test_calibration_recovers_focal_length_from_synthetic_video(tmp_path):
    K = np.array([[600.0, 0, 320], [0, 600, 240], [0, 0, 1]])
    video, out = tmp_path / "board.avi", tmp_path / "calib.yaml"
    write_board_video(video, K)
    code = calibrate.main([str(video), "--board", "9x6", "--square", "0.025", "--out", str(out), "--frames", "12"])
    assert code == 0
    calib = load_calibration(out)   # the file the --calib option reads
    assert calib.fx == pytest.approx(600, rel=0.03) and calib.fy == pytest.approx(600, rel=0.03)
    assert calib.cx == pytest.approx(320, abs=10) and calib.cy == pytest.approx(240, abs=10)
    assert (calib.width, calib.height) == (640, 480)


def test_calibration_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert calibrate.main([str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "c.yaml")]) == 2
    blank = tmp_path / "blank.avi"
    writer = cv2.VideoWriter(str(blank), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for _ in range(8):
        writer.write(np.full((120, 160, 3), 90, np.uint8))
    writer.release()
    assert calibrate.main([str(blank), "--out", str(tmp_path / "c.yaml")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calibrate:")]
    assert len(errors) == 2 and "missing.mp4" in errors[0] and "found in only 0" in errors[1]
    assert not (tmp_path / "c.yaml").exists()


# ----------------------------------------------------------------------------- live windows

@pytest.fixture
def x_display(monkeypatch):
    """A usable X display: the current one, else a private Xvfb for this test."""
    if sys.platform.startswith("linux") and display_problem() is None:
        yield os.environ.get("DISPLAY")
        return
    if not sys.platform.startswith("linux"):
        yield None
        return
    if shutil.which("Xvfb") is None:
        skip_or_fail("no display and no Xvfb to start one")
    # -displayfd: Xvfb picks a free display number and reports it, so parallel runs cannot clash.
    server = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        number = server.stdout.readline().strip()
        if not number:
            skip_or_fail("Xvfb did not start")
        monkeypatch.setenv("DISPLAY", f":{number}")
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_point_colours_come_from_the_first_sighting():
    image = np.zeros((10, 10, 3), np.uint8)
    image[2, 3] = (255, 0, 0)   # BGR blue
    colours = PointColours()
    colours.observe(image, np.array([[3.0, 2.0], [0.0, 0.0]]), np.array([5, -1]))
    colours.observe(np.full((10, 10), 255, np.uint8), np.array([[3.0, 2.0]]), np.array([5]))   # seen before
    np.testing.assert_allclose(colours.lookup([5, -1, 99]), [[0, 0, 1], POINT_COLOUR, POINT_COLOUR])
    colours.retain([])
    assert len(colours) == 0


def test_map3d_viewer_accepts_updates_without_blocking(x_display, tmp_path):
    points, colors, poses, trajectory, gt = synthetic_map()
    screenshot = tmp_path / "last_view.png"
    options = ViewerOptions(width=480, height=360, max_rate_hz=1000.0, save_on_close=str(screenshot))
    with Map3DViewer(options=options) as viewer:
        assert viewer.is_open
        sent, slowest = 0, 0.0
        for i in range(10, len(trajectory) + 1, 10):
            started = time.perf_counter()
            sent += viewer.update(points, colors, poses[:i:6], trajectory[:i], gt, current_pose=poses[i - 1])
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.15)
        assert sent >= 1
        assert slowest < 0.25   # copies and a non-blocking put; generous for a loaded machine
        time.sleep(1.0)         # let the window draw the last snapshot before it is captured
    assert not viewer.is_open
    image = cv2.imread(str(screenshot))
    assert image is not None and non_background_fraction(image) > 0.01


def test_tracks_window_shows_and_closes(x_display):
    # A subprocess: Qt keeps its X connection for the life of the process, and this display
    # goes away when the test ends.
    script = ("import numpy as np; from vo.viz.tracks import TracksWindow\n"
              "w = TracksWindow('test'); w.show(np.zeros((120, 160, 3), np.uint8)); w.close()\n"
              "assert not w.quit_requested and not w.paused")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-500:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="display probing is Linux-only")
def test_windows_without_display_fail_with_one_line(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ViewerError) as error:
        Map3DViewer()
    assert "DISPLAY" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DisplayError):
        TracksWindow()

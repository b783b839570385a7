"""Frame sources on the shared recordings, on small synthetic EuRoC / folder / video data, and on
broken copies that must fail with a one-line SourceError (or warn and skip one frame)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tests.conftest import require_data
from vo.datasets import SourceError, SourceWarning, StartAt, detect_kind, open_source
from vo.datasets.calib import load_calibration
from vo.eval.trajectory import read_kitti

KITTI_06 = ("kitti", "sequences", "06")
TEDDY = ("tum", "rgbd_dataset_freiburg3_teddy")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def write_calib(path: Path, **values) -> Path:
    path.write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    return path


# ----------------------------------------------------------------------------- KITTI

def test_kitti_sequence_06():
    root = require_data(*KITTI_06)
    source = open_source(str(root))
    assert (source.kind, source.name, source.modes, len(source)) == ("kitti", "06", ("stereo", "mono"), 51)
    cam = source.camera
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == (707.0912, 707.0912, 601.8873, 183.1104)
    assert (cam.width, cam.height) == (1226, 370) and cam.dist is None
    assert cam.baseline == pytest.approx(379.8145 / 707.0912)
    frames = list(source.frames("stereo", max_frames=2))
    assert [f.index for f in frames] == [0, 1] and frames[1].stamp == pytest.approx(0.1044989)
    assert frames[0].image.shape == frames[0].right.shape == (370, 1226) and frames[0].image.dtype == np.uint8
    assert next(source.frames("mono")).right is None
    stamps, poses = source.ground_truth
    assert len(stamps) == 51 and stamps[1] == pytest.approx(0.1044989)
    np.testing.assert_array_equal(poses, read_kitti(root.parent.parent / "poses" / "06.txt").poses[:51])


def test_start_at_a_later_frame_keeps_indices_stamps_and_ground_truth():
    source = open_source(str(require_data(*KITTI_06)))
    later = StartAt(source, 48)
    frames = list(later.frames("mono"))
    assert [f.index for f in frames] == [48, 49, 50] and len(later) == 3
    assert frames[0].stamp == pytest.approx(source.ground_truth[0][48])
    first = require_data(*KITTI_06) / "image_0" / "000048.png"
    np.testing.assert_array_equal(frames[0].image, cv2.imread(str(first), cv2.IMREAD_GRAYSCALE))
    assert later.ground_truth is source.ground_truth and later.camera is source.camera
    assert (later.kind, later.modes) == (source.kind, source.modes)


def kitti_copy(tmp_path: Path, count: int = 3) -> Path:
    source = require_data(*KITTI_06)
    root = tmp_path / "sequences" / "06"
    for camera in ("image_0", "image_1"):
        (root / camera).mkdir(parents=True)
        for i in range(count):
            shutil.copy(source / camera / f"{i:06d}.png", root / camera)
    shutil.copy(source / "calib.txt", root)
    (root / "times.txt").write_text("".join((source / "times.txt").read_text().splitlines(True)[:count]))
    return root


def test_kitti_copy_without_poses_has_no_ground_truth(tmp_path):
    source = open_source(str(kitti_copy(tmp_path)))
    assert len(source) == 3 and source.ground_truth is None


def test_kitti_missing_calib(tmp_path):
    root = kitti_copy(tmp_path)
    (root / "calib.txt").unlink()
    with pytest.raises(SourceError, match="calib.txt") as error:
        open_source(str(root))
    assert "missing" in one_line(error)


@pytest.mark.parametrize("times, problem", [("0\n0.1\n0.1\n", "duplicate"), ("0\n0.2\n0.1\n", "unsorted")])
def test_kitti_bad_stamps(tmp_path, times, problem):
    root = kitti_copy(tmp_path)
    (root / "times.txt").write_text(times)
    with pytest.raises(SourceError, match=problem) as error:
        open_source(str(root))
    assert "times.txt" in one_line(error)


def test_kitti_stereo_sizes_differ(tmp_path):
    root = kitti_copy(tmp_path)
    for path in (root / "image_1").iterdir():
        cv2.imwrite(str(path), cv2.imread(str(path))[:, :1200])
    with pytest.raises(SourceError, match="stereo pair sizes differ") as error:
        open_source(str(root))
    assert "image_1" in one_line(error)


def test_kitti_calibration_size_mismatch(tmp_path):
    root = kitti_copy(tmp_path)
    for path in [*(root / "image_0").iterdir(), *(root / "image_1").iterdir()]:
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (408, 123)))
    with pytest.raises(SourceError, match="calib.txt") as error:
        open_source(str(root))
    assert "408x123" in one_line(error)


def test_kitti_missing_frame_is_skipped_with_a_warning(tmp_path):
    root = kitti_copy(tmp_path)
    (root / "image_1" / "000001.png").unlink()
    source = open_source(str(root))
    with pytest.warns(SourceWarning, match="000001.png"):
        frames = list(source.frames("stereo"))
    assert [f.index for f in frames] == [0, 2]
    assert len(list(source.frames("mono"))) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # a start after the missing frame never reads it
        assert [f.index for f in StartAt(source, 2).frames("stereo")] == [2]
        assert [f.index for f in StartAt(StartAt(source, 2), 1).frames("stereo")] == [2]   # indices are absolute


def test_kitti_empty_image_folder(tmp_path):
    root = kitti_copy(tmp_path)
    for path in (root / "image_0").iterdir():
        path.unlink()
    with pytest.raises(SourceError, match="no .png images") as error:
        open_source(str(root))
    assert "image_0" in one_line(error)


# ----------------------------------------------------------------------------- TUM

def tum_associate_reference(first: np.ndarray, second: np.ndarray, max_diff: float = 0.02) -> list[tuple]:
    """TUM's associate.py, as published (quadratic, greedy by difference)."""
    first_keys, second_keys = list(first), list(second)
    candidates = sorted((abs(a - b), a, b) for a in first_keys for b in second_keys if abs(a - b) < max_diff)
    matches = []
    for _, a, b in candidates:
        if a in first_keys and b in second_keys:
            first_keys.remove(a)
            second_keys.remove(b)
            matches.append((a, b))
    return sorted(matches)


def test_tum_teddy():
    root = require_data(*TEDDY)
    source = open_source(str(root))
    assert (source.kind, source.modes) == ("tum", ("rgbd", "mono"))
    cam = source.camera
    assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == (535.4, 539.2, 320.1, 247.6, 640, 480)
    assert cam.dist is None and cam.baseline is None
    expected = tum_associate_reference(source.rgb_stamps, source.depth_stamps)
    assert len(source) == source.frame_count("rgbd") == len(expected) and source.frame_count("mono") == 200
    frames = list(source.frames(max_frames=3))
    assert [(f.stamp, f.extra["depth_stamp"]) for f in frames] == [tuple(map(float, m)) for m in expected[:3]]
    frame = frames[0]
    assert frame.image.shape == (480, 640, 3) and frame.image.dtype == np.uint8
    assert frame.depth.dtype == np.float32 and frame.depth.shape == (480, 640)
    raw = cv2.imread(str(root / "depth" / f"{frame.extra['depth_stamp']:.6f}.png"), cv2.IMREAD_ANYDEPTH)
    np.testing.assert_allclose(frame.depth, raw / 5000.0, rtol=1e-6)
    assert 0.3 < np.median(frame.depth[frame.depth > 0]) < 5.0
    stamps, poses = source.ground_truth
    # README: ground truth starts ~0.14 s late, so the first 4 colour frames have none within 20 ms.
    assert len(stamps) == 196 and stamps[0] == source.rgb_stamps[4] and poses.shape == (196, 4, 4)
    assert next(source.frames("mono")).depth is None


def tum_copy(tmp_path: Path, folder_name: str, count: int = 3) -> Path:
    source = require_data(*TEDDY)
    root = tmp_path / folder_name
    for kind in ("rgb", "depth"):
        (root / kind).mkdir(parents=True)
        lines = [line for line in (source / f"{kind}.txt").read_text().splitlines() if not line.startswith("#")]
        for line in lines[:count]:
            shutil.copy(source / line.split()[1], root / kind)
        (root / f"{kind}.txt").write_text("# copy\n" + "\n".join(lines[:count]) + "\n")
    return root


def test_tum_freiburg1_frames_are_undistorted(tmp_path):
    root = tum_copy(tmp_path, "rgbd_dataset_freiburg1_copy")
    source = open_source(str(root), mode="mono")
    assert source.camera.dist is None and source.camera.fx == 517.3 and source.ground_truth is None
    frame = next(source.frames())
    raw = cv2.imread(frame.path)
    dist = np.array([0.2624, -0.9531, -0.0054, 0.0026, 1.1633])
    expected = cv2.undistort(raw, source.camera.K, dist)
    assert np.mean(cv2.absdiff(frame.image, expected)) < 1.0
    assert np.mean(cv2.absdiff(frame.image, raw)) > 3.0


def test_tum_calib_overrides_published_intrinsics(tmp_path):
    root = tum_copy(tmp_path, "my_recording")
    with pytest.raises(SourceError, match="freiburg1/2/3") as error:
        open_source(str(root))
    one_line(error)
    calib = write_calib(tmp_path / "calib.yaml", fx=500, fy=501, cx=320, cy=240)
    assert open_source(str(root), calib=str(calib)).camera.fy == 501


def test_tum_calibration_size_mismatch(tmp_path):
    root = tum_copy(tmp_path, "rgbd_dataset_freiburg3_copy")
    calib = write_calib(tmp_path / "calib.yaml", fx=500, fy=500, cx=160, cy=120, width=320, height=240)
    with pytest.raises(SourceError, match="320x240") as error:
        open_source(str(root), calib=str(calib))
    assert "calib.yaml" in one_line(error)


def test_tum_duplicate_stamps(tmp_path):
    root = tum_copy(tmp_path, "rgbd_dataset_freiburg3_copy")
    lines = (root / "rgb.txt").read_text().splitlines()
    (root / "rgb.txt").write_text("\n".join(lines + [lines[-1]]) + "\n")
    with pytest.raises(SourceError, match="duplicate") as error:
        open_source(str(root))
    assert "rgb.txt" in one_line(error)


# ----------------------------------------------------------------------------- EuRoC (synthetic)

# Calibration of the real EuRoC VI-sensor (V1_01_easy sensor.yaml files).
EUROC_CAMERAS = {
    "cam0": dict(T_BS=[0.0148655429818, -0.999880929698, 0.00414029679422, -0.0216401454975,
                       0.999557249008, 0.0149672133247, 0.025715529948, -0.064676986768,
                       -0.0257744366974, 0.00375618835797, 0.999660727178, 0.00981073058949,
                       0.0, 0.0, 0.0, 1.0],
                 intrinsics=[458.654, 457.296, 367.215, 248.375],
                 distortion=[-0.28340811, 0.07395907, 0.00019359, 1.76187114e-05]),
    "cam1": dict(T_BS=[0.0125552670891, -0.999755099723, 0.0182237714554, -0.0198435579556,
                       0.999598781151, 0.0130119051815, 0.0251588363115, 0.0453689425024,
                       -0.0253898008918, 0.0179005838253, 0.999517347078, 0.00786212447038,
                       0.0, 0.0, 0.0, 1.0],
                 intrinsics=[457.587, 456.134, 379.999, 255.238],
                 distortion=[-0.28368365, 0.07451284, -0.00010473, -3.55590700e-05]),
}
EUROC_T0 = 1403715273262142976
EUROC_SIZE = (752, 480)


def sensor_yaml(name: str, resolution=EUROC_SIZE) -> str:
    cam = EUROC_CAMERAS[name]
    return (f"%YAML:1.0\n---\nsensor_type: camera\ncomment: VI-Sensor {name} (MT9M034)\n"
            f"T_BS:\n  cols: 4\n  rows: 4\n  data: {cam['T_BS']}\n"
            f"rate_hz: 20\nresolution: {list(resolution)}\ncamera_model: pinhole\n"
            f"intrinsics: {cam['intrinsics']} #fu, fv, cu, cv\n"
            f"distortion_model: radial-tangential\ndistortion_coefficients: {cam['distortion']}\n")


def body_pose(t: float) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("zyx", [0.3 * t, 0.1, -0.05]).as_matrix()
    pose[:3, 3] = [1.0 + t, 2.0, 0.5 * t]
    return pose


def write_euroc_camera(mav0: Path, name: str, count: int, size=EUROC_SIZE, resolution=EUROC_SIZE) -> None:
    cam = mav0 / name
    (cam / "data").mkdir(parents=True)
    (cam / "sensor.yaml").write_text(sensor_yaml(name, resolution))
    rng = np.random.default_rng(len(name))
    lines = ["#timestamp [ns],filename"]
    for k in range(count):
        stamp = EUROC_T0 + k * 50_000_000
        image = cv2.GaussianBlur(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(cam / "data" / f"{stamp}.png"), image)
        lines.append(f"{stamp},{stamp}.png")
    (cam / "data.csv").write_text("\n".join(lines) + "\n")


def write_euroc_ground_truth(mav0: Path, seconds: float = 0.2) -> None:
    folder = mav0 / "state_groundtruth_estimate0"
    folder.mkdir(parents=True)
    lines = ["#timestamp, p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], q_RS_w [], q_RS_x [], q_RS_y [], q_RS_z [], "
             "v_RS_R_x [m s^-1], v_RS_R_y [m s^-1], v_RS_R_z [m s^-1], b_w_RS_S_x [rad s^-1], "
             "b_w_RS_S_y [rad s^-1], b_w_RS_S_z [rad s^-1], b_a_RS_S_x [m s^-2], b_a_RS_S_y [m s^-2], "
             "b_a_RS_S_z [m s^-2]"]
    for k in range(int(seconds * 200) + 1):   # 200 Hz, as the real ground truth
        pose = body_pose(k / 200)
        qx, qy, qz, qw = Rotation.from_matrix(pose[:3, :3]).as_quat()
        values = [*pose[:3, 3], qw, qx, qy, qz] + [0.0] * 9
        lines.append(f"{EUROC_T0 + k * 5_000_000}," + ",".join(f"{v:.12f}" for v in values))
    (folder / "data.csv").write_text("\n".join(lines) + "\n")


def euroc_sequence(tmp_path: Path, count: int = 3, stereo: bool = True, **right) -> Path:
    root = tmp_path / "V1_01_fake"
    write_euroc_camera(root / "mav0", "cam0", count)
    if stereo:
        write_euroc_camera(root / "mav0", "cam1", count, **right)
    write_euroc_ground_truth(root / "mav0")
    return root


def test_euroc_stereo_is_rectified(tmp_path):
    source = open_source(str(euroc_sequence(tmp_path)))
    assert (source.kind, source.name, source.modes, len(source)) == ("euroc", "V1_01_fake", ("stereo", "mono"), 3)
    cam = source.camera
    assert cam.dist is None and (cam.width, cam.height) == EUROC_SIZE
    assert cam.baseline == pytest.approx(0.1101, abs=0.001)   # the VI-sensor's ~11 cm baseline
    # The right camera centre, seen from the rectified left camera, lies on its x axis at +baseline.
    t_bs0, t_bs1 = (np.array(EUROC_CAMERAS[c]["T_BS"]).reshape(4, 4) for c in ("cam0", "cam1"))
    right_centre = (np.linalg.inv(t_bs0) @ t_bs1)[:3, 3]
    np.testing.assert_allclose(source.rectification.rotation_left @ right_centre, [cam.baseline, 0, 0], atol=1e-6)
    frames = list(source.frames())
    assert len(frames) == 3 and frames[0].image.shape == frames[0].right.shape == (480, 752)
    assert frames[1].stamp == pytest.approx((EUROC_T0 + 50_000_000) * 1e-9)
    assert next(source.frames("mono")).right is None


def test_euroc_ground_truth_is_the_rectified_left_camera(tmp_path):
    source = open_source(str(euroc_sequence(tmp_path)))
    stamps, poses = source.ground_truth
    assert len(stamps) == 3
    t_bs0 = np.array(EUROC_CAMERAS["cam0"]["T_BS"]).reshape(4, 4)
    for stamp, pose in zip(stamps, poses):
        body = body_pose(stamp - EUROC_T0 * 1e-9)
        np.testing.assert_allclose(pose[:3, 3], (body @ t_bs0)[:3, 3], atol=1e-6)   # rectifying only rotates
        optical_axis = body[:3, :3] @ t_bs0[:3, :3] @ source.rectification.rotation_left.T @ [0, 0, 1]
        np.testing.assert_allclose(pose[:3, 2], optical_axis, atol=1e-6)


def test_euroc_mono_only_is_undistorted(tmp_path):
    source = open_source(str(euroc_sequence(tmp_path, stereo=False) / "mav0"))
    assert source.modes == ("mono",) and source.camera.dist is None and source.camera.fx == 458.654
    assert source.name == "V1_01_fake" and next(source.frames()).image.shape == (480, 752)


def test_euroc_calibration_size_mismatch(tmp_path):
    root = euroc_sequence(tmp_path)
    (root / "mav0" / "cam0" / "sensor.yaml").write_text(sensor_yaml("cam0", resolution=(640, 480)))
    with pytest.raises(SourceError, match="640x480") as error:
        open_source(str(root))
    assert "cam0/sensor.yaml" in one_line(error)


def test_euroc_stereo_sizes_differ(tmp_path):
    root = euroc_sequence(tmp_path, size=(752, 470), resolution=(752, 470))
    with pytest.raises(SourceError, match="stereo pair sizes differ") as error:
        open_source(str(root))
    assert "cam1" in one_line(error)


def test_euroc_duplicate_stamps(tmp_path):
    root = euroc_sequence(tmp_path)
    csv = root / "mav0" / "cam0" / "data.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + [lines[-1]]) + "\n")
    with pytest.raises(SourceError, match="duplicate") as error:
        open_source(str(root))
    assert "cam0/data.csv" in one_line(error)


def test_euroc_missing_sensor_yaml(tmp_path):
    root = euroc_sequence(tmp_path)
    (root / "mav0" / "cam0" / "sensor.yaml").unlink()
    with pytest.raises(SourceError, match="sensor.yaml") as error:
        open_source(str(root))
    assert "missing" in one_line(error)


# ----------------------------------------------------------------------------- image folder

def image_folder(tmp_path: Path, names=("frame2.png", "frame10.png", "frame1.png")) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for k, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((40, 60, 3), 50 * k, np.uint8))
    return folder


@pytest.fixture
def calib_file(tmp_path) -> Path:
    return write_calib(tmp_path / "calib.yaml", fx=50, fy=50, cx=30, cy=20)


def test_folder_in_natural_order_skipping_other_files(tmp_path, calib_file):
    folder = image_folder(tmp_path)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(SourceWarning, match="skipped 2 non-image") as record:
        source = open_source(str(folder), calib=str(calib_file))
    assert len(record) == 1
    frames = list(source.frames())
    assert [Path(f.path).name for f in frames] == ["frame1.png", "frame2.png", "frame10.png"]
    assert [f.stamp for f in frames] == [0.0, 1.0, 2.0] and frames[0].image.shape == (40, 60, 3)
    assert (source.kind, source.modes, source.ground_truth) == ("folder", ("mono",), None)


def test_folder_stamps_from_times_txt(tmp_path, calib_file):
    folder = image_folder(tmp_path)
    (folder / "times.txt").write_text("10.0\n10.5\n11.0\n")
    assert [f.stamp for f in open_source(str(folder), calib=str(calib_file)).frames()] == [10.0, 10.5, 11.0]
    (folder / "times.txt").write_text("10.0\n10.5\n")
    with pytest.raises(SourceError, match="2 stamps for 3 images") as error:
        open_source(str(folder), calib=str(calib_file))
    assert "times.txt" in one_line(error)


def test_folder_unreadable_frame_is_skipped(tmp_path, calib_file):
    folder = image_folder(tmp_path)
    (folder / "frame2.png").write_text("corrupt")
    source = open_source(str(folder), calib=str(calib_file))
    with pytest.warns(SourceWarning, match="frame2.png"):
        assert [f.index for f in source.frames()] == [0, 2]


def test_folder_with_distortion_is_undistorted(tmp_path):
    folder = image_folder(tmp_path)
    calib = write_calib(tmp_path / "calib.yaml", fx=50, fy=50, cx=30, cy=20, distortion="[0.1, -0.05, 0, 0, 0]")
    source = open_source(str(folder), calib=str(calib))
    assert source.camera.dist is None and source.camera.fx == 50


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images") as error:
        open_source(str(tmp_path / "empty"))
    assert "empty" in one_line(error)


def test_uncalibrated_folder_warns_and_guesses(tmp_path):
    with pytest.warns(SourceWarning, match="60-degree field of view"):
        source = open_source(str(image_folder(tmp_path)))
    # 60 degrees across 60 px: fx = 30 / tan(30 deg)
    assert source.camera.fx == pytest.approx(30 / np.tan(np.radians(30))) and (source.camera.cx, source.camera.cy) == (30, 20)


# ----------------------------------------------------------------------------- video / webcam

def write_video(path: Path, count: int = 5, size=(64, 48), fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for k in range(count):
        writer.write(np.full((size[1], size[0], 3), 40 * k, np.uint8))
    writer.release()
    return path


def test_video_file(tmp_path):
    calib = write_calib(tmp_path / "calib.yaml", fx=60, fy=60, cx=32, cy=24, width=64, height=48)
    source = open_source(str(write_video(tmp_path / "clip.avi")), calib=str(calib))
    assert (source.kind, source.name, source.modes, len(source)) == ("video", "clip", ("mono",), 5)
    frames = list(source.frames())
    assert len(frames) == 5 and frames[0].image.shape == (48, 64, 3)
    np.testing.assert_allclose([f.stamp for f in frames], np.arange(5) / 10.0, atol=1e-6)
    assert len(list(source.frames(max_frames=2))) == 2   # re-iterable, truncatable


def test_video_calibration_size_mismatch(tmp_path):
    calib = write_calib(tmp_path / "calib.yaml", fx=60, fy=60, cx=32, cy=24, width=640, height=480)
    with pytest.raises(SourceError, match="640x480") as error:
        open_source(str(write_video(tmp_path / "clip.avi")), calib=str(calib))
    one_line(error)


def test_unreadable_video(tmp_path):
    (tmp_path / "broken.avi").write_text("not a video")
    with pytest.raises(SourceError, match="broken.avi") as error:
        open_source(str(tmp_path / "broken.avi"))
    one_line(error)


def test_webcam_index_is_detected_and_a_missing_camera_fails_cleanly():
    assert detect_kind("0") == "webcam"
    with pytest.raises(SourceError, match="webcam 9") as error:
        open_source("9")
    one_line(error)


# ----------------------------------------------------------------------------- open_source / calib

def test_missing_path_and_unavailable_mode(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="mode 'rgbd' not available"):
        open_source(str(kitti_copy(tmp_path)), mode="rgbd")
    assert open_source(str(kitti_copy(tmp_path / "b")), mode="mono").mode == "mono"


def test_calibration_files(tmp_path):
    opencv = tmp_path / "orb.yaml"
    opencv.write_text("%YAML:1.0\n---\nCamera.fx: 718.856\nCamera.fy: 718.856\nCamera.cx: 607.19\n"
                      "Camera.cy: 185.21\nCamera.k1: 0.1\nCamera.k2: -0.2\nCamera.p1: 0.0\nCamera.p2: 0.0\n"
                      "Camera.bf: 386.1448\nK: !!opencv-matrix\n  rows: 1\n  cols: 2\n  dt: d\n  data: [1, 2]\n")
    calib = load_calibration(opencv)
    assert calib.fx == 718.856 and calib.baseline == pytest.approx(386.1448 / 718.856)
    np.testing.assert_array_equal(calib.dist, [0.1, -0.2, 0.0, 0.0])
    with pytest.raises(SourceError, match="missing 'cy'"):
        load_calibration(write_calib(tmp_path / "a.yaml", fx=1, fy=1, cx=1))
    with pytest.raises(SourceError, match="4 or 5 numbers"):
        load_calibration(write_calib(tmp_path / "b.yaml", fx=1, fy=1, cx=1, cy=1, distortion="[1, 2]"))

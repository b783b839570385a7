"""Self-labelling (python -m vo.selflabel): grading, file format, Ray/process parity, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tests.conftest import ROOT, require_data
from vo.map import invert
from vo.render import RenderConfig, RenderedSequence
from vo.selflabel import (SelfLabelConfig, TrackCollector, Tracks, frame_labels, label_tracks, load_labels,
                          load_manifest, save_labels)
from vo.selflabel.__main__ import main
from vo.selflabel.label import IGNORED, STABLE, UNSTABLE, group_by_frame
from vo.types import Camera

SAMPLE = ROOT / "sequences" / "rgbd_dataset_freiburg3_teddy_sample"
TIMINGS = ("seconds", "fps", "vo_fps")


def rendered_tracks(num_frames: int = 30, seed: int = 0):
    """Surface points of a rendered room, seen in every frame where they are not occluded,
    with 0.3 px keypoint noise. Returns the sequence, its exact poses and the tracks."""
    sequence = RenderedSequence(RenderConfig(num_frames=num_frames))
    cam = sequence.camera
    poses = sequence.ground_truth[1]                                  # world_from_cam
    views = [sequence.renderer.render(pose) for pose in poses]
    rng = np.random.default_rng(seed)
    v, u = rng.uniform([10, 10], [cam.height - 10, cam.width - 10], (400, 2)).T
    z = views[num_frames // 2].depth[v.astype(int), u.astype(int)]
    xyz = np.c_[(u - cam.cx) / cam.fx * z, (v - cam.cy) / cam.fy * z, z]
    xyz = xyz @ poses[num_frames // 2][:3, :3].T + poses[num_frames // 2][:3, 3]   # world
    frame, track, xy = [], [], []
    for k, (pose, view) in enumerate(zip(poses, views)):
        p = xyz @ invert(pose)[:3, :3].T + invert(pose)[:3, 3]
        uv = np.c_[cam.fx * p[:, 0] / p[:, 2] + cam.cx, cam.fy * p[:, 1] / p[:, 2] + cam.cy]
        inside = (p[:, 2] > 0.1) & (uv > 2).all(1) & (uv[:, 0] < cam.width - 3) & (uv[:, 1] < cam.height - 3)
        ids = np.flatnonzero(inside)
        visible = np.abs(view.depth[np.round(uv[ids, 1]).astype(int), np.round(uv[ids, 0]).astype(int)]
                         - p[ids, 2]) < 0.02
        ids = ids[visible]
        frame.append(np.full(len(ids), k))
        track.append(ids)
        xy.append(uv[ids] + rng.normal(0, 0.3, (len(ids), 2)))
    tracks = Tracks(np.concatenate(frame), np.concatenate(track), np.concatenate(xy))
    return sequence, poses, tracks


def perturb_poses(poses: np.ndarray, rng) -> np.ndarray:
    """VO-like pose noise: ~0.5 cm and ~0.1 degree (about half a pixel here)."""
    noisy = poses.copy()
    for k in range(1, len(poses)):
        noisy[k, :3, :3] = Rotation.from_rotvec(rng.normal(0, np.deg2rad(0.06), 3)).as_matrix() @ poses[k, :3, :3]
        noisy[k, :3, 3] += rng.normal(0, 0.003, 3)
    return noisy


def test_label_tracks_finds_injected_outlier_tracks_on_a_rendered_sequence():
    sequence, poses, tracks = rendered_tracks()
    rng = np.random.default_rng(1)
    lengths = np.bincount(tracks.track, minlength=tracks.num_tracks)
    long = np.flatnonzero(lengths >= 15)
    chosen = rng.permutation(long)
    outliers, muddled = chosen[:40], chosen[40:70]          # 6-10 px off; 2 px off (neither label)
    xy = tracks.xy.copy()
    for ids, low, high in ((outliers, 6.0, 10.0), (muddled, 2.0, 2.0)):
        rows = np.flatnonzero(np.isin(tracks.track, ids))
        angle = rng.uniform(0, 2 * np.pi, len(rows))
        xy[rows] += rng.uniform(low, high, len(rows))[:, None] * np.c_[np.cos(angle), np.sin(angle)]
    tracks = replace(tracks, xy=xy)
    labels = label_tracks(tracks, perturb_poses(poses, rng), sequence.camera, SelfLabelConfig())

    clean = np.setdiff1d(np.flatnonzero(lengths >= 10), chosen[:70])
    assert len(clean) > 150 and len(outliers) == 40
    assert (labels.point_label[outliers] == UNSTABLE).all(), labels.point_max[outliers].min()
    assert (labels.point_label[clean] == STABLE).mean() > 0.98, np.sort(labels.point_mean[clean])[-5:]
    assert (labels.point_label[clean] == UNSTABLE).sum() == 0
    assert (labels.point_label[muddled] == IGNORED).mean() > 0.9 and not (labels.point_label[muddled] == STABLE).any()
    assert (labels.point_label[lengths < 10] == IGNORED).all() and np.isnan(labels.point_mean[lengths < 10]).all()
    assert np.median(labels.point_mean[clean]) < 0.5                  # the final BA absorbed the pose noise
    np.testing.assert_array_equal(labels.label, labels.point_label[tracks.track])
    assert labels.stats.final_error < labels.stats.initial_error


def test_label_file_round_trips(tmp_path):
    sequence, poses, tracks = rendered_tracks(num_frames=14)
    labels = label_tracks(tracks, poses, sequence.camera, SelfLabelConfig())
    grouped = group_by_frame(tracks, labels, sequence.camera)
    assert labels.count(STABLE) > 100 and len(grouped.rows) == 14
    arrays = {"frame_paths": np.array([f"rendered/{r:06d}.png" for r in grouped.rows]),
              "frame_indices": grouped.rows.astype(np.int64), "offsets": grouped.offsets,
              "keypoints": grouped.keypoints, "labels": grouped.labels, "errors": grouped.errors,
              "image_size": np.array([320, 240]), "obs_errors": grouped.obs_errors, "track_ids": grouped.track_ids,
              "source": np.array("rendered"), "mode": np.array("mono"), "images_from_paths": np.array(False)}
    loaded = load_labels(save_labels(tmp_path / "seq.npz", arrays))
    assert sorted(loaded) == sorted(arrays)
    for key, value in arrays.items():
        if value.ndim:
            np.testing.assert_array_equal(loaded[key], value)
            assert loaded[key].dtype == value.dtype, key
        else:
            assert loaded[key] == value.item()
    keypoints, frame_label = frame_labels(loaded, 3)
    rows = tracks.frame[labels.label != IGNORED] == grouped.rows[3]
    np.testing.assert_allclose(np.sort(keypoints[:, 0]), np.sort(tracks.xy[labels.label != IGNORED][rows, 0]),
                               atol=1e-4)
    assert frame_label.dtype == np.int8 and set(frame_label) <= {0, 1}
    assert not (tmp_path / "seq.npz.tmp").exists()
    broken = dict(arrays, offsets=arrays["offsets"][:-1])
    with pytest.raises(ValueError):
        load_labels(save_labels(tmp_path / "bad.npz", broken))


def test_collector_splits_a_reused_point_slot_into_two_tracks():
    """The map reuses a dead point's id: the new point must start a new track."""
    def snapshot(tracked, view_ids=(), view_creators=(), keyframe=False):
        view = SimpleNamespace(point_ids=np.array(view_ids, np.int64), first_keyframe=np.array(view_creators))
        return SimpleNamespace(point_ids=np.array(tracked, np.int64), keypoints=np.ones((len(tracked), 2)),
                               is_keyframe=keyframe, event=None, map_view=lambda: view)

    collector = TrackCollector()
    frame = SimpleNamespace(index=0, path="a.png", image=None)
    collector(frame, snapshot([], [5, 7], [0, 0], keyframe=True))       # keyframe 0 creates points 5 and 7
    collector(frame, snapshot([5, 7]))
    collector(frame, snapshot([5, 7], [5, 7], [2, 0], keyframe=True))   # keyframe 2 reuses slot 5
    collector(frame, snapshot([5, 7]))
    collector(frame, snapshot([5, 7]))
    tracks = collector.tracks()
    np.testing.assert_array_equal(tracks.frame, [1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(tracks.track, [0, 1, 0, 1, 2, 1, 2, 1])


def test_distorted_keypoints_are_stored_in_the_pixels_of_the_image():
    from vo.selflabel.label import distort
    from vo.tracker import undistort
    camera = Camera(500.0, 500.0, 320.0, 240.0, 640, 480, dist=np.array([-0.1, 0.02, 1e-3, -5e-4, 0.0]))
    raw = np.random.default_rng(0).uniform([20, 20], [620, 460], (50, 2))
    np.testing.assert_allclose(distort(undistort(raw, camera), camera), raw, atol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "/no/such/folder: no such file or folder"),
    ([str(SAMPLE), "--features", "superpoint", "--weights", "/no/weights"], "/no/weights"),
    ([str(SAMPLE), "--stable-px", "6"], "--stable-px < --unstable-px"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, args, message, capsys):
    assert main(args + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def require_ray():
    """Ray must be installed in CI (.ci/run installs the extra); elsewhere it is optional."""
    if os.environ.get("CI", "").lower() == "true":
        import ray  # noqa: F401
    else:
        pytest.importorskip("ray")


def without_timings(manifest: dict) -> dict:
    return {**manifest, "sequences": [{k: v for k, v in e.items() if k not in TIMINGS} for e in manifest["sequences"]]}


def test_ray_and_local_processes_give_the_same_labels(tmp_path):
    require_ray()
    specs = [str(SAMPLE), str(require_data("tum", "rgbd_dataset_freiburg3_teddy"))]
    common = ["--features", "orb", "--max-frames", "12", "--workers", "2"]
    assert main(specs + common + ["--backend", "ray", "--out", str(tmp_path / "ray")]) == 0
    assert main(specs + common + ["--backend", "processes", "--out", str(tmp_path / "local")]) == 0
    ray_manifest, local_manifest = load_manifest(tmp_path / "ray"), load_manifest(tmp_path / "local")
    assert without_timings(ray_manifest) == without_timings(local_manifest)
    entries = ray_manifest["sequences"]
    assert [e["name"] for e in entries] == ["rgbd_dataset_freiburg3_teddy", "rgbd_dataset_freiburg3_teddy_sample"]
    assert all(e["frames"] == 12 and e["stable"] > 0 for e in entries)
    for entry in entries:
        a, b = load_labels(tmp_path / "ray" / entry["file"]), load_labels(tmp_path / "local" / entry["file"])
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_command_labels_the_bundled_sample_and_resumes(tmp_path, capsys):
    out = tmp_path / "labels"
    command = [sys.executable, "-m", "vo.selflabel", str(SAMPLE), "--out", str(out), "--max-frames", "40"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["sequences"]
    assert manifest["version"] == 1 and manifest["config"]["min_track"] == 10
    assert entry["frames"] == 40 and entry["mode"] == "rgbd" and entry["features"] == "superpoint"
    assert entry["stable"] > 30 and entry["points"] >= entry["stable"] + entry["unstable"]
    data = load_labels(out / entry["file"])
    assert len(data["frame_paths"]) == entry["labelled_frames"] and len(data["labels"]) == entry["keypoints"]
    assert (data["labels"] == 1).sum() > 300 and (data["errors"][data["labels"] == 1] <= 1.0).all()
    assert data["images_from_paths"] and tuple(data["image_size"]) == (640, 480)
    first_path = data["frame_paths"][0]
    assert first_path.startswith(str(SAMPLE / "rgb")) and cv2.imread(first_path).shape == (480, 640, 3)
    keypoints = data["keypoints"]
    assert (keypoints >= 0).all() and (keypoints[:, 0] < 640).all() and (keypoints[:, 1] < 480).all()
    picture = cv2.imread(str(out / entry["picture"]))
    assert picture is not None and picture.shape[0] > 500 and picture.std() > 20
    green = (picture[..., 1] > 150) & (picture[..., 0] < 80) & (picture[..., 2] < 80)
    assert green.sum() > 200                                         # stable keypoints drawn

    assert main(command[3:]) == 0                                    # the same command again
    assert "already labelled, skipped" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text()) == manifest

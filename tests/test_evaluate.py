"""Trajectory I/O and metrics: agreement with evo on its own reference trajectories, KITTI devkit
t_rel / r_rel, format round trips and the command line."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tests.conftest import require_data
from vo.eval import metrics
from vo.eval.trajectory import (Trajectory, TrajectoryError, associate, detect_format, read_euroc, read_kitti,
                                read_tum, write_euroc, write_kitti, write_tum)
from vo.evaluate import main

evo_file_interface = pytest.importorskip("evo.tools.file_interface")
from evo.core import metrics as evo_metrics, sync as evo_sync  # noqa: E402

RTOL = 1e-6
STATS = ("rmse", "mean", "median", "std", "max")


def trajectories_dir():
    return require_data("trajectories")


# ----------------------------------------------------------------------------- evo reference

def evo_statistics(ref, est, alignment: str) -> dict[str, dict]:
    """What evo_ape / evo_rpe (translation_part, angle_deg, delta 1 frame) report."""
    est = copy.deepcopy(est)
    if alignment != "none":
        est.align(ref, correct_scale=alignment == "sim3")
    results = {}
    for key, metric in [
        ("ate", evo_metrics.APE(evo_metrics.PoseRelation.translation_part)),
        ("rpe_t", evo_metrics.RPE(evo_metrics.PoseRelation.translation_part, 1, evo_metrics.Unit.frames)),
        ("rpe_r", evo_metrics.RPE(evo_metrics.PoseRelation.rotation_angle_deg, 1, evo_metrics.Unit.frames)),
    ]:
        metric.process_data((ref, est))
        results[key] = metric.get_all_statistics()
    return results


def assert_agrees(result: metrics.EvaluationResult, expected: dict) -> None:
    ours = {"ate": result.ate, "rpe_t": result.rpe_translation, "rpe_r": result.rpe_rotation}
    for key, stats in ours.items():
        for name in STATS:
            assert getattr(stats, name) == pytest.approx(expected[key][name], rel=RTOL), (key, name)


@functools.lru_cache(maxsize=2)
def evo_and_our_pairs(est_name: str):
    """Both libraries' associated (ground truth, estimate) on fr2/desk; cached, evo reads slowly."""
    folder = trajectories_dir()
    gt_path, est_path = folder / "fr2_desk_groundtruth.txt", folder / est_name
    evo_pair = evo_sync.associate_trajectories(
        evo_file_interface.read_tum_trajectory_file(str(gt_path)),
        evo_file_interface.read_tum_trajectory_file(str(est_path)), max_diff=0.02)
    return evo_pair, associate(read_tum(gt_path), read_tum(est_path), max_diff=0.02)


@pytest.mark.parametrize("est_name, alignment", [
    ("fr2_desk_ORB.txt", "sim3"),
    ("fr2_desk_ORB.txt", "se3"),
    ("fr2_desk_ORB_kf_mono.txt", "sim3"),
])
def test_tum_metrics_agree_with_evo(est_name, alignment):
    (evo_ref, evo_est), (gt, est) = evo_and_our_pairs(est_name)
    np.testing.assert_array_equal(gt.stamps, evo_ref.timestamps)
    np.testing.assert_array_equal(est.stamps, evo_est.timestamps)
    assert_agrees(metrics.evaluate(est, gt, alignment), evo_statistics(evo_ref, evo_est, alignment))


def test_kitti_metrics_agree_with_evo():
    folder = trajectories_dir()
    evo_ref = evo_file_interface.read_kitti_poses_file(str(folder / "KITTI_00_gt.txt"))
    evo_est = evo_file_interface.read_kitti_poses_file(str(folder / "KITTI_00_ORB.txt"))
    gt, est = read_kitti(folder / "KITTI_00_gt.txt"), read_kitti(folder / "KITTI_00_ORB.txt")
    np.testing.assert_allclose(gt.poses, np.array(evo_ref.poses_se3), atol=1e-12)
    result = metrics.evaluate(est, gt, "se3")
    assert_agrees(result, evo_statistics(evo_ref, evo_est, "se3"))
    rotation, translation, scale = copy.deepcopy(evo_est).align(evo_ref)
    np.testing.assert_allclose(result.alignment.rotation, rotation, atol=1e-9)
    np.testing.assert_allclose(result.alignment.translation, translation, atol=1e-9)
    assert result.alignment.scale == scale == 1.0


def test_reading_matches_evo_for_tum_and_euroc(tmp_path):
    path = trajectories_dir() / "fr2_desk_ORB.txt"
    ours, theirs = read_tum(path), evo_file_interface.read_tum_trajectory_file(str(path))
    np.testing.assert_allclose(ours.poses, np.array(theirs.poses_se3), atol=1e-12)
    write_euroc(tmp_path / "est.csv", ours)
    evo_euroc = evo_file_interface.read_euroc_csv_trajectory(str(tmp_path / "est.csv"))
    np.testing.assert_allclose(read_euroc(tmp_path / "est.csv").poses, np.array(evo_euroc.poses_se3), atol=1e-12)


# ----------------------------------------------------------------------------- KITTI devkit

def devkit_errors_reference(poses_gt: np.ndarray, poses_est: np.ndarray) -> tuple[float, float]:
    """Line-by-line port of the devkit's calcSequenceErrors + saveStats (evaluate_odometry.cpp)."""
    dist = [0.0]
    for i in range(1, len(poses_gt)):
        dist.append(dist[-1] + float(np.linalg.norm(poses_gt[i - 1][:3, 3] - poses_gt[i][:3, 3])))
    t_errors, r_errors = [], []
    for first in range(0, len(poses_gt), 10):
        for length in (100, 200, 300, 400, 500, 600, 700, 800):
            last = next((i for i in range(first, len(dist)) if dist[i] > dist[first] + length), -1)
            if last == -1:
                continue
            delta_gt = np.linalg.inv(poses_gt[first]) @ poses_gt[last]
            delta_est = np.linalg.inv(poses_est[first]) @ poses_est[last]
            error = np.linalg.inv(delta_est) @ delta_gt
            d = 0.5 * (error[0, 0] + error[1, 1] + error[2, 2] - 1.0)
            r_errors.append(np.arccos(max(min(d, 1.0), -1.0)) / length)
            t_errors.append(np.linalg.norm(error[:3, 3]) / length)
    return 100 * float(np.mean(t_errors)), 100 * float(np.degrees(np.mean(r_errors)))


def test_kitti_devkit_errors_on_orb_slam_00():
    folder = trajectories_dir()
    gt, est = read_kitti(folder / "KITTI_00_gt.txt"), read_kitti(folder / "KITTI_00_ORB.txt")
    result = metrics.kitti_errors(est, gt)
    t_ref, r_ref = devkit_errors_reference(gt.poses, est.poses)
    assert result.t_rel == pytest.approx(t_ref, rel=1e-9)
    assert result.r_rel == pytest.approx(r_ref, rel=1e-9)
    # Pinned values; ORB-SLAM2's published stereo t_rel on 00 is 0.70 %.
    assert result.t_rel == pytest.approx(0.699728663858329, rel=1e-6)
    assert result.r_rel == pytest.approx(0.2533302348329914, rel=1e-6)
    assert result.num_segments == 3283
    assert sum(count for _, _, count in result.per_length.values()) == 3283


def test_kitti_errors_vanish_on_ground_truth_and_survive_rigid_motion():
    gt = read_kitti(require_data("kitti", "poses", "06.txt"))
    assert metrics.kitti_errors(gt, gt).t_rel == pytest.approx(0.0, abs=1e-9)
    moved = metrics.Alignment(Rotation.from_euler("z", 30, degrees=True).as_matrix(), np.array([5.0, -2, 1])).apply(gt)
    result = metrics.kitti_errors(moved, gt)
    # Not exactly 0: the file's 6-digit rotations are not quite orthonormal and arccos near 1 amplifies that.
    assert result.t_rel == pytest.approx(0.0, abs=1e-6) and result.r_rel == pytest.approx(0.0, abs=0.01)


# ----------------------------------------------------------------------------- alignment & RPE

def random_trajectory(count: int = 50, seed: int = 0) -> Trajectory:
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (count, 1, 1))
    poses[:, :3, :3] = Rotation.from_rotvec(rng.normal(scale=0.5, size=(count, 3))).as_matrix()
    poses[:, :3, 3] = np.cumsum(rng.normal(size=(count, 3)), axis=0)
    return Trajectory(1000.0 + 0.1 * np.arange(count), poses, "random")


def test_sim3_alignment_recovers_a_similarity():
    gt = random_trajectory()
    truth = metrics.Alignment(Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix(),
                              np.array([1.0, 2.0, 3.0]), 2.5)
    est = truth.apply(gt)
    aligned, found = metrics.align(est, gt, "sim3")
    assert found.scale == pytest.approx(1 / 2.5)
    np.testing.assert_allclose(aligned.poses, gt.poses, atol=1e-9)
    result = metrics.evaluate(est, gt, "sim3", delta=5)
    assert result.ate.rmse < 1e-9 and result.rpe_translation.max < 1e-9
    assert result.rpe_translation.count == 9   # evo's consecutive pairs (0,5), (5,10), ... (40,45)


def test_metric_errors_on_bad_input():
    gt = random_trajectory()
    with pytest.raises(metrics.MetricsError):
        metrics.evaluate(gt.subset(slice(0, 10)), gt, "se3")
    line = Trajectory(np.arange(5.0), np.tile(np.eye(4), (5, 1, 1)))
    with pytest.raises(metrics.MetricsError):
        metrics.align(line, line, "se3")


# ----------------------------------------------------------------------------- file formats

def test_tum_round_trip(tmp_path):
    traj = random_trajectory()
    write_tum(tmp_path / "t.txt", traj)
    back = read_tum(tmp_path / "t.txt")
    np.testing.assert_allclose(back.stamps, traj.stamps, atol=1e-9)
    np.testing.assert_allclose(back.poses, traj.poses, atol=1e-8)
    assert detect_format(tmp_path / "t.txt") == "tum"


def test_kitti_round_trip_with_and_without_times(tmp_path):
    traj = random_trajectory()
    write_kitti(tmp_path / "k.txt", traj, times_path=tmp_path / "times.txt")
    back = read_kitti(tmp_path / "k.txt", tmp_path / "times.txt")
    np.testing.assert_allclose(back.stamps, traj.stamps, atol=1e-9)
    np.testing.assert_allclose(back.poses, traj.poses, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(read_kitti(tmp_path / "k.txt").stamps, np.arange(len(traj)))
    assert detect_format(tmp_path / "k.txt") == "kitti"


def test_euroc_round_trip(tmp_path):
    traj = random_trajectory()
    write_euroc(tmp_path / "e.csv", traj)
    assert (tmp_path / "e.csv").read_text().startswith("#timestamp [ns],p_RS_R_x [m]")
    back = read_euroc(tmp_path / "e.csv")
    np.testing.assert_allclose(back.stamps, traj.stamps, atol=1e-6)
    np.testing.assert_allclose(back.poses, traj.poses, atol=1e-8)
    assert detect_format(tmp_path / "e.csv") == "euroc"


@pytest.mark.parametrize("content, problem", [
    ("1 2 3\n", "3 values"),
    ("1 0 0 0 0 0 0 1\n2 0 0 0 0 0 0 1\n3 0 0 0 0 0 x 1\n", "line 3"),
    ("# only a comment\n", "no poses"),
    ("2 0 0 0 0 0 0 1\n1 0 0 0 0 0 0 1\n", "backwards"),
    ("1 0 0 0 0 0 0 0\n", "quaternion"),
])
def test_bad_tum_files_name_the_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(TrajectoryError, match=problem) as info:
        read_tum(path)
    assert str(path) in str(info.value)


def test_associate_pairs_nearest_stamps_within_max_diff():
    traj = random_trajectory(10)
    shifted = Trajectory(traj.stamps + 0.015, traj.poses)
    a, b = associate(traj, shifted, max_diff=0.02)
    assert len(a) == len(b) == 10
    with pytest.raises(TrajectoryError, match="no matching stamps"):
        associate(traj, shifted, max_diff=0.01)


# ----------------------------------------------------------------------------- command line

def test_cli_reports_metrics_and_plots(tmp_path, capsys):
    folder = trajectories_dir()
    plot = tmp_path / "plot.png"
    code = main([str(folder / "freiburg1_xyz-ORB_kf_mono.txt"), str(folder / "freiburg1_xyz-groundtruth.txt"),
                 "--align", "sim3", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0 and "ATE  rmse" in out and "RPE" in out and "KITTI" not in out
    assert plot.stat().st_size > 1000


def test_cli_kitti_prints_devkit_errors(capsys):
    folder = trajectories_dir()
    assert main([str(folder / "KITTI_00_ORB.txt"), str(folder / "KITTI_00_gt.txt")]) == 0
    assert "t_rel 0.6997 %" in capsys.readouterr().out


@pytest.mark.parametrize("est_content", [None, "1 2 3\n", "garbage words here\n"])
def test_cli_bad_file_exits_2_with_one_line(tmp_path, capsys, est_content):
    est = tmp_path / "est.txt"
    if est_content is not None:
        est.write_text(est_content)
    code = main([str(est), str(trajectories_dir() / "fr2_desk_groundtruth.txt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and str(est) in err and "Traceback" not in err

"""PnP success at frame gaps (vo/eval/pnp.py) and the before/after command."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from models import build_extractor
from tests.conftest import require_data
from vo import evaluate_selfimproving as evaluate
from vo.eval import pnp
from vo.render import RenderConfig, RenderedSequence
from vo.tracker import project
from vo.types import Camera


def pose(rotvec_deg=(0, 0, 0), t=(0, 0, 0)) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    T[:3, 3] = t
    return T


def test_rotation_and_translation_errors_on_known_poses():
    assert pnp.rotation_angle_deg(pose((0, 3, 0))[:3, :3]) == pytest.approx(3.0)
    assert pnp.rotation_angle_deg(pose((180, 0, 0))[:3, :3]) == pytest.approx(180.0)
    gt = pose((0, 10, 0), (0.2, 0, -1.0))
    assert pnp.pose_errors(gt, gt) == pytest.approx((0.0, 0.0), abs=1e-9)
    # the estimate puts the second camera 4 cm further along the first camera's x axis, rotated 2 deg more
    centre_gt = -gt[:3, :3].T @ gt[:3, 3]
    R_est = pose((0, 12, 0))[:3, :3]
    est = np.eye(4)
    est[:3, :3] = R_est
    est[:3, 3] = -R_est @ (centre_gt + [0.04, 0, 0])
    rot, trans = pnp.pose_errors(est, gt)
    assert rot == pytest.approx(2.0) and trans == pytest.approx(0.04)
    assert pnp.is_success(rot, trans, 5.0, 0.05) and not pnp.is_success(rot, trans, 5.0, 0.03)
    assert not pnp.is_success(np.inf, np.inf, 5.0, 0.05)


def test_relative_ground_truth_maps_first_camera_points_into_the_second():
    world_from_first, world_from_second = pose((5, -20, 2), (1, 2, 3)), pose((-3, 10, 0), (1.5, 2, 4))
    x_first = np.array([0.3, -0.2, 4.0, 1.0])
    x_world = world_from_first @ x_first
    expected = np.linalg.inv(world_from_second) @ x_world
    np.testing.assert_allclose(pnp.relative_ground_truth(world_from_first, world_from_second) @ x_first, expected)
    assert pnp.travelled_distance(np.array([[0, 0, 0], [3, 4, 0], [3, 4, 1]], float)) == pytest.approx(6.0)


def test_points_from_depth_and_disparity_back_project_exactly():
    camera = Camera(500.0, 500.0, 320.0, 240.0, 640, 480, baseline=0.5)
    xyz = np.array([[0.5, -0.2, 4.0], [-1.0, 0.3, 10.0]])
    uv, z = project(xyz, np.eye(4), camera)
    depth = np.zeros((480, 640), np.float32)
    px = np.round(uv).astype(int)
    depth[px[:, 1], px[:, 0]] = z
    np.testing.assert_allclose(pnp.points_from_depth(px.astype(float), depth, camera, 20.0)[:, 2], z, rtol=1e-6)
    right_x = uv[:, 0] - camera.fx * camera.baseline / z
    np.testing.assert_allclose(pnp.points_from_disparity(uv, right_x, camera), xyz, atol=1e-9)
    assert np.isnan(pnp.points_from_disparity(uv, uv[:, 0] + 1, camera)).all()      # negative disparity


@pytest.mark.parametrize("mode", ["rgbd", "stereo"])
def test_orb_on_a_rendered_sequence_succeeds_at_small_gaps(mode):
    sequence = RenderedSequence(RenderConfig(num_frames=40))      # ~7 cm per frame; only 10 get rendered
    results = pnp.evaluate_pnp(sequence, mode, build_extractor("orb", max_keypoints=1500), gaps=(1, 3), stride=3,
                               count=10)
    summary = pnp.summarise(results)
    assert [summary[g].pairs for g in (1, 3)] == [3, 3]            # first frames 0, 3, 6
    assert all(summary[g].rate == 1.0 for g in (1, 3))
    # exact depth and poses: what is left is ORB's keypoint quantisation (measured: < 0.2 deg, < 1.2 cm)
    assert all(p.rotation_error_deg < 0.5 and p.translation_error < 0.02 and p.inliers > 300
               for ps in results.values() for p in ps)


def test_pnp_needs_depth():
    with pytest.raises(ValueError, match="3D points"):
        pnp.evaluate_pnp(RenderedSequence(RenderConfig(num_frames=4)), "mono", None)


def test_default_sequences_exist_in_the_shared_data():
    for sub in evaluate.DEFAULT_SEQUENCES:
        require_data(*sub.split("/"))


def test_before_after_table_on_kitti_with_classical_detectors(capsys, tmp_path):
    kitti = require_data("kitti", "sequences", "06")
    code = evaluate.main(["--base", "orb", "--finetuned", "sift", "--sequences", str(kitti), "--gaps", "1", "2",
                          "--stride", "20", "--vo-frames", "6", "--json", str(tmp_path / "out.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| 06 (stereo) | PnP success, gap 1 |" in out and "| 06 (stereo) | VO ATE, 6 frames |" in out
    assert "1 % of the distance travelled" in out
    import json
    numbers = json.loads((tmp_path / "out.json").read_text())[0]
    assert numbers["pnp"]["base"]["1"]["pairs"] == 3                  # first frames 0, 20, 40
    assert numbers["pnp"]["base"]["1"]["rotation_successes"] == 3     # ORB, 1.2 m apart: rotation is easy


def test_missing_weights_are_one_line_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("models.weights.WEIGHTS_DIR", tmp_path)
    assert evaluate.main(["--base", "orb", "--no-vo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "superpointvo_*.pth" in err and "\n" not in err
    assert evaluate.main(["--base", str(tmp_path / "no.pth"), "--finetuned", "orb", "--no-vo"]) == 2
    assert "weights file not found" in capsys.readouterr().err

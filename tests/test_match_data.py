"""SuperGlue training: GT matches from a homography and from depth, the cache, the loss, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.superglue import SuperGlue
from tests.conftest import require_data
from vo.train import match_data, superglue
from vo.train.match_data import IGNORE, UNMATCHED




def known_homography() -> np.ndarray:
    return np.array([[0.9, 0.1, 20.0], [-0.05, 1.1, 10.0], [1e-4, 2e-4, 1.0]])


def test_homography_gt_recovers_the_warp_with_noise_distractors_and_ambiguity():
    rng = np.random.default_rng(0)
    H = known_homography()
    # A grid keeps every keypoint > 20 px from the others, so "nearest" is unambiguous.
    xs, ys = np.meshgrid(np.arange(30, 300, 24.0), np.arange(30, 220, 24.0))
    kp0 = np.stack([xs.ravel(), ys.ravel()], 1)
    m = len(kp0)
    true = kp0[: m - 10]                                          # the last 10 have no partner
    warped = match_data.warp_points(H, true) + rng.uniform(-1, 1, true.shape)   # < 1.5 px noise
    warped[0] = match_data.warp_points(H, kp0[:1])[0] + [4.0, 0]  # 4 px: neither matched nor surely not
    far = np.array([[1000.0, 1000.0], [-500.0, 30.0]])           # distractors nowhere near a warp
    order = rng.permutation(len(warped) + len(far))
    kp1 = np.concatenate([warped, far])[order]
    where = np.argsort(order)                                     # kp0[i] (i < m-10) is kp1[where[i]]

    gt0, gt1 = match_data.homography_gt(kp0, kp1, H, pos_th=3, neg_th=5)
    assert gt0[0] == IGNORE and gt1[where[0]] == IGNORE
    np.testing.assert_array_equal(gt0[1: m - 10], where[1: m - 10])
    assert np.all(gt0[m - 10:] == UNMATCHED)
    np.testing.assert_array_equal(gt1[where[1: m - 10]], np.arange(1, m - 10))
    assert np.all(gt1[where[m - 10 + np.arange(2)]] == UNMATCHED)   # the distractors
    # symmetric: swapping the images with H^-1 gives the same labels
    back1, back0 = match_data.homography_gt(kp1, kp0, np.linalg.inv(H))
    np.testing.assert_array_equal(back0, gt0)
    np.testing.assert_array_equal(back1, gt1)


def test_homography_gt_with_empty_sides():
    gt0, gt1 = match_data.homography_gt(np.zeros((3, 2)), np.zeros((0, 2)), np.eye(3))
    assert list(gt0) == [UNMATCHED] * 3 and len(gt1) == 0


def plane_scene():
    """A fronto-parallel wall at 4 m seen by camera 0 and by camera 1, 0.3 m to the right, turned 3 degrees."""
    h, w = 120, 160
    K = np.array([[100.0, 0, 80], [0, 100, 60], [0, 0, 1]])
    a = np.deg2rad(3)
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    T_1from0 = np.eye(4)
    T_1from0[:3, :3], T_1from0[:3, 3] = R, R @ np.array([-0.3, 0, 0])   # camera 1 centre at x = +0.3
    depth0 = np.full((h, w), 4.0, np.float32)
    # Depth of the wall z0 = 4 seen from camera 1: the ray d1 of pixel p hits it at z0-component 4.
    T_0from1 = np.linalg.inv(T_1from0)
    ys, xs = np.mgrid[0:h, 0:w]
    rays1 = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3) @ np.linalg.inv(K).T
    dirs0 = rays1 @ T_0from1[:3, :3].T
    depth1 = ((4.0 - T_0from1[2, 3]) / dirs0[:, 2]).reshape(h, w).astype(np.float32)
    return K, T_1from0, depth0, depth1


def test_depth_gt_on_a_plane_with_a_hole_and_an_occluder():
    rng = np.random.default_rng(1)
    K, T_1from0, depth0, depth1 = plane_scene()
    xs, ys = np.meshgrid(np.arange(10, 150, 14.0), np.arange(10, 110, 14.0))
    kp0 = np.stack([xs.ravel(), ys.ravel()], 1)
    kp0_1, z = match_data.project(kp0, np.full(len(kp0), 4.0), K, K, T_1from0)
    inside = match_data.inside_mask(kp0_1, depth1.shape)
    kp1 = kp0_1[inside] + rng.uniform(-0.7, 0.7, (inside.sum(), 2))
    partner = np.full(len(kp0), -1)
    partner[inside] = np.arange(inside.sum())

    gt0, gt1 = match_data.depth_gt(kp0, kp1, depth0, depth1, K, K, T_1from0)
    np.testing.assert_array_equal(gt0[inside], partner[inside])
    assert np.all(gt0[~inside] == UNMATCHED)                      # they leave camera 1's view
    np.testing.assert_array_equal(gt1, np.flatnonzero(inside))

    # No depth at a keypoint of image 0: cannot tell, so ignored (and so is its partner).
    i = int(np.flatnonzero(inside)[5])
    holed = depth0.copy()
    holed[int(kp0[i, 1]) - 2: int(kp0[i, 1]) + 3, int(kp0[i, 0]) - 2: int(kp0[i, 0]) + 3] = 0
    gt0, gt1 = match_data.depth_gt(kp0, kp1, holed, depth1, K, K, T_1from0)
    assert gt0[i] == IGNORE and gt1[partner[i]] == IGNORE

    # An object at 1 m in front of the wall in image 1 hides the wall around one keypoint:
    # the point is occluded, so it is no positive (ignored, as a keypoint lies where it projects).
    j = int(np.flatnonzero(inside)[12])
    occluded = depth1.copy()
    u, v = np.round(kp0_1[j]).astype(int)
    occluded[v - 3: v + 4, u - 3: u + 4] = 1.0
    gt0, _ = match_data.depth_gt(kp0, kp1, depth0, occluded, K, K, T_1from0)
    assert gt0[j] == IGNORE
    assert np.sum(gt0 >= 0) == inside.sum() - 1


def test_stereo_depth_of_a_shifted_texture():
    rng = np.random.default_rng(2)
    texture = (rng.random((60, 220)) * 255).astype(np.uint8)
    texture = np.repeat(np.repeat(texture, 2, 0), 2, 1)[:100, :400]   # blobs of 2 px: matchable
    disparity = 20
    left, right = texture[:, :300], texture[:, disparity:disparity + 300]   # right sees x at x - d
    depth = match_data.stereo_depth(np.ascontiguousarray(left), np.ascontiguousarray(right),
                                    fx=100.0, baseline=0.5, max_depth=40.0)
    core = depth[20:80, 150:280]
    valid = core > 0
    assert valid.mean() > 0.8
    np.testing.assert_allclose(np.median(core[valid]), 100.0 * 0.5 / disparity, rtol=0.02)


def test_cache_round_trip_and_swap(tmp_path):
    from models.superpoint import SuperPoint

    rng = np.random.default_rng(3)
    extractor = SuperPoint(weights=False, channels=(8, 8, 16, 16, 32), device="cpu", precision="fp32")
    image = (rng.random((64, 80)) * 255).astype(np.uint8)
    H = np.array([[1.0, 0, 8], [0, 1, 8], [0, 0, 1]])   # a whole cell: the CNN is equivariant to it
    pairs = [match_data.ImagePair("a", image, match_data.warp_image(image, H), H=H)] * 2
    extract = lambda img, r: match_data.extract_fixed(extractor, img, 300, 0.0, r)
    path = match_data.build_cache(tmp_path / "c.npz", iter(pairs), extract,
                                  match_data.default_conf, {"seed": 0, "x": 1})
    assert match_data.cache_meta(path) == {"seed": 0, "x": 1}
    cache = match_data.PairCache(path)
    batch = cache.batch([0, 1, 1], swap=[False, False, True])
    assert batch["keypoints0"].shape == (3, 300, 2) and batch["descriptors0"].shape == (3, 300, 256)
    assert batch["gt0"].dtype == torch.int64 and (batch["gt0"][0] >= 0).any()
    for key in ("keypoints", "descriptors", "gt"):                 # the third is the second, swapped
        torch.testing.assert_close(batch[f"{key}0"][2], batch[f"{key}1"][1])
        torch.testing.assert_close(batch[f"{key}1"][2], batch[f"{key}0"][1])
    # labels agree both ways
    gt0, gt1 = batch["gt0"][0], batch["gt1"][0]
    matched = torch.nonzero(gt0 >= 0).squeeze(1)
    assert torch.equal(gt1[gt0[matched]], matched)


def test_assignment_loss_terms():
    log_p = torch.log(torch.tensor([[[0.5, 0.1, 0.4],
                                     [0.2, 0.2, 0.6],
                                     [0.3, 0.7, 2.0]]]))
    gt0, gt1 = torch.tensor([[0, UNMATCHED]]), torch.tensor([[0, IGNORE]])
    parts = superglue.assignment_loss(log_p, gt0, gt1)
    expected = -(np.log(0.5) + np.log(0.6)) / 2                  # one match, one unmatched in image 0
    assert parts["total"].item() == pytest.approx(expected, rel=1e-6)
    assert parts["nll_pos"].item() == pytest.approx(-np.log(0.5), rel=1e-6)
    balanced = superglue.assignment_loss(log_p, gt0, gt1, balance=0.5)
    assert balanced["total"].item() == pytest.approx(expected, rel=1e-6)


def tiny_problem(generator: torch.Generator, b: int = 2, m: int = 24, k: int = 16, dim: int = 32):
    """Image 1 holds k noisy copies of image 0's descriptors, shuffled, plus m - k strangers."""
    kp0 = torch.rand(b, m, 2, generator=generator) * 100
    desc0 = torch.nn.functional.normalize(torch.randn(b, m, dim, generator=generator), dim=-1)
    perm = torch.stack([torch.randperm(m, generator=generator) for _ in range(b)])
    desc1 = torch.nn.functional.normalize(torch.randn(b, m, dim, generator=generator), dim=-1).clone()
    kp1 = torch.rand(b, m, 2, generator=generator) * 100
    gt0 = torch.full((b, m), UNMATCHED, dtype=torch.long)
    gt1 = torch.full((b, m), UNMATCHED, dtype=torch.long)
    for i in range(b):
        src, dst = torch.arange(k), perm[i, :k]
        desc1[i, dst] = torch.nn.functional.normalize(desc0[i, src] + 0.3 * torch.randn(k, dim, generator=generator), dim=-1)
        kp1[i, dst] = kp0[i, src] + 2.0
        gt0[i, src], gt1[i, dst] = dst, src
    size = torch.tensor([100.0, 100.0])
    return {"keypoints0": kp0, "keypoints1": kp1, "descriptors0": desc0, "descriptors1": desc1,
            "scores0": torch.rand(b, m, generator=generator), "scores1": torch.rand(b, m, generator=generator),
            "image_size0": size, "image_size1": size, "gt0": gt0, "gt1": gt1}


def test_loss_is_finite_and_falls_with_a_tiny_superglue():
    torch.manual_seed(0)
    model = SuperGlue(weights=False, device="cpu", precision="fp32", descriptor_dim=32,
                      keypoint_encoder=[16], GNN_layers=["self", "cross"], num_heads=2,
                      sinkhorn_iterations=20).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = tiny_problem(torch.Generator().manual_seed(0))
    conf = {"loss": {"balance": None}}
    losses = []
    for _ in range(10):
        parts, _ = superglue.forward_loss(model, batch, conf)
        assert torch.isfinite(parts["total"])
        optimizer.zero_grad()
        parts["total"].backward()
        optimizer.step()
        losses.append(parts["total"].item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_descriptor_prior_init_starts_as_a_soft_mutual_nn():
    """Before any training, the prior-initialised matcher is as precise as mutual NN; the released init is chance."""
    batch = tiny_problem(torch.Generator().manual_seed(1), b=8)
    sim = batch["descriptors0"] @ batch["descriptors1"].transpose(1, 2)
    nearest0, nearest1 = sim.argmax(2), sim.argmax(1)
    mutual = nearest1.gather(1, nearest0) == torch.arange(sim.shape[1])
    mnn = superglue.match_metrics(torch.where(mutual, nearest0, -1), batch["gt0"])
    results = {}
    for init in ("prior", "released"):
        torch.manual_seed(0)
        model = SuperGlue(weights=False, device="cpu", precision="fp32", descriptor_dim=32, keypoint_encoder=[16],
                          GNN_layers=["self", "cross"] * 2, num_heads=2).train()
        if init == "prior":
            superglue.prior_init(model, temperature=0.05, dustbin=0.3)
            # every residual branch starts at zero: the GNN is the identity
            assert all(float(layer.mlp[-1].weight.detach().abs().max()) == 0 for layer in model.gnn.layers)
        with torch.no_grad():
            matches0 = superglue.filter_matches(model.eval()(batch), 0.2)[0]
        results[init] = {k: float(v.mean()) for k, v in superglue.match_metrics(matches0, batch["gt0"]).items()}
    assert results["prior"]["precision"] >= float(mnn["precision"].mean()) - 0.02, (results, mnn)
    assert results["prior"]["recall"] >= 0.5 and results["released"]["recall"] < 0.3, results


def test_keep_strongest_ignores_matches_whose_partner_is_cut():
    batch = tiny_problem(torch.Generator().manual_seed(2), b=1, m=24, k=16)
    kept = superglue.keep_strongest(batch, 12)
    assert kept["keypoints0"].shape == (1, 12, 2) and kept["descriptors1"].shape == (1, 12, 32)
    gt0, new0 = batch["gt0"][0, :12], kept["gt0"][0]
    assert torch.equal(new0[gt0 >= 12], torch.full_like(new0[gt0 >= 12], IGNORE))
    assert torch.equal(new0[gt0 < 12], gt0[gt0 < 12])     # kept pairs and unmatched stay as they were
    assert superglue.keep_strongest(batch, None) is batch


def test_conf_overrides_and_lr_schedule():
    conf = superglue.merge_conf({"layers": 3, "data.homography.pairs_per_image": 2})
    assert superglue.model_conf(conf)["GNN_layers"] == ["self", "cross"] * 3
    assert conf["data"]["homography"]["pairs_per_image"] == 2
    assert match_data.default_conf["homography"]["pairs_per_image"] == 1     # defaults untouched
    with pytest.raises(KeyError):
        superglue.merge_conf({"nope": 1})
    conf = superglue.merge_conf({"steps": 100, "lr": 1.0, "lr_decay_start": 0.5, "lr_final": 0.1})
    assert superglue.lr_at(10, conf) == 1.0 and superglue.lr_at(100, conf) == pytest.approx(0.1)


def test_pose_evaluation_recovers_a_known_relative_pose():
    from vo.evaluate_matching import estimate_pose, pose_auc, pose_error

    rng = np.random.default_rng(4)
    K0 = np.array([[580.0, 0, 320], [0, 580, 240], [0, 0, 1]])
    K1 = np.array([[600.0, 0, 330], [0, 590, 235], [0, 0, 1]])
    a = np.deg2rad(20)
    T_0to1 = np.eye(4)
    T_0to1[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    T_0to1[:3, 3] = [-0.5, 0.1, 0.05]
    points0 = np.stack([rng.uniform(-2, 2, 200), rng.uniform(-1.5, 1.5, 200), rng.uniform(3, 6, 200)], 1)
    points1 = points0 @ T_0to1[:3, :3].T + T_0to1[:3, 3]
    kp0 = points0 @ K0.T
    kp1 = points1 @ K1.T
    kp0, kp1 = kp0[:, :2] / kp0[:, 2:], kp1[:, :2] / kp1[:, 2:]
    kp1[:40] = rng.uniform(0, 640, (40, 2))                        # 20 % outliers
    assert pose_error(T_0to1, estimate_pose(kp0, kp1, K0, K1)) < 0.5
    assert pose_error(T_0to1, None) == float("inf")
    assert pose_auc([0.0, 0.0, np.inf], (5,)) == pytest.approx([2 / 3])

    # the summary: the right matches give AUC 100 and median error ~0; scrambled ones no pose at all
    from vo.evaluate_matching import Matcher, PosePair, evaluate
    blank = np.zeros((480, 640), np.uint8)
    pair = PosePair("a b", blank, blank + 1, K0, K1, T_0to1)
    extract = lambda image: {"keypoints": kp0 if image[0, 0] == 0 else kp1,
                             "scores": np.ones(200), "descriptors": np.eye(200, 256)}
    right = Matcher("right", lambda f0, f1: np.c_[np.arange(200), np.arange(200)])
    scrambled = Matcher("scrambled", lambda f0, f1: np.c_[np.arange(200), rng.permutation(200)])
    results = evaluate(extract, [right, scrambled], [], [pair], [])
    assert results["right"]["auc20"] > 95 and results["right"]["median_pose_error"] < 0.5
    assert results["scrambled"]["auc20"] == 0 and results["scrambled"]["median_pose_error"] > 20


def test_pose_estimation_survives_real_wide_baseline_matches():
    """OpenCV 5.1's findEssentialMat fails an assertion on these pairs' SIFT matches, mostly wrong
    ones; the evaluator's estimator must answer a proper pose for them, never raise."""
    import cv2
    from vo.evaluate_matching import estimate_pose, pose_error, read_scannet_pairs

    pairs = read_scannet_pairs(require_data("pairs", "scannet"))[:3]
    sift, matcher = cv2.SIFT_create(2000), cv2.BFMatcher()
    for pair in pairs:
        k0, d0 = sift.detectAndCompute(pair.image0, None)
        k1, d1 = sift.detectAndCompute(pair.image1, None)
        good = [a for a, b in matcher.knnMatch(d0, d1, k=2) if a.distance < 0.8 * b.distance]
        assert len(good) >= 20, pair.name
        kp0 = np.float64([k0[g.queryIdx].pt for g in good])
        kp1 = np.float64([k1[g.trainIdx].pt for g in good])
        R, t = estimate_pose(kp0, kp1, pair.K0, pair.K1)
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-6) and np.linalg.norm(t) == pytest.approx(1.0)
        assert 0 <= pose_error(pair.T_0to1, (R, t)) <= 180

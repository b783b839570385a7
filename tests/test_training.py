"""Training: labels, losses where the maths says zero or positive, learning, resuming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.superpoint import SuperPointNet
from vo.eval.detection import detection_map
from vo.train import losses, magicpoint

SLIM = (8, 8, 16, 16, 32)


def test_cell_labels_pick_the_keypoint_position_or_the_dustbin():
    kp_map = torch.zeros(1, 16, 24)
    kp_map[0, 13, 21] = 1                       # cell (1, 2), row 5, column 5 inside it
    labels = losses.keypoint_map_to_cell_labels(kp_map)
    assert labels[0, 1, 2] == 5 * 8 + 5
    assert (labels == 64).sum() == 5            # every other cell is empty


def test_detector_loss_is_zero_when_confident_and_right_positive_when_wrong():
    labels = torch.tensor([[[3, 64]]])
    logits = torch.full((1, 65, 1, 2), -50.0)
    logits[0, 3, 0, 0] = logits[0, 64, 0, 1] = 50.0
    assert losses.detector_loss(logits, labels) < 1e-6
    assert losses.detector_loss(logits, torch.tensor([[[4, 64]]])) > 10
    # the wrong cell carries no loss once it is outside the valid region
    valid = torch.ones(1, 8, 16)
    valid[:, :, :8] = 0
    assert losses.detector_loss(logits, torch.tensor([[[4, 64]]]), valid_mask=valid) < 1e-6


def test_descriptor_loss_zero_for_orthogonal_cells_positive_otherwise():
    hc, wc = 3, 4
    n = hc * wc
    desc = torch.eye(n).reshape(1, n, hc, wc)          # each cell its own axis: dot 1 with itself, 0 else
    identity = torch.eye(3)[None]
    s = losses.descriptor_correspondence(identity, hc, wc)
    assert torch.equal(s[0], torch.eye(n))
    assert losses.descriptor_loss(desc, desc, identity) < 1e-7
    assert losses.descriptor_loss(desc, -desc, identity) > 1.0       # positives pushed apart
    same = torch.ones(1, n, hc, wc)                                  # all cells alike: negatives too close
    assert losses.descriptor_loss(same, same, identity) > 0.5


def test_descriptor_correspondence_follows_the_homography():
    shift = torch.tensor([[[1.0, 0, 8], [0, 1, 0], [0, 0, 1]]])     # one cell to the right
    s = losses.descriptor_correspondence(shift, 2, 3)[0]
    assert s[0, 1] == 1 and s[0, 0] == 0 and s[2].sum() == 0          # the last column leaves the image


def test_detection_map_is_one_for_perfect_and_low_for_random_detections():
    rng = np.random.default_rng(0)
    truths = [rng.uniform(0, 100, (10, 2)) for _ in range(5)]
    perfect = [(t + 0.5, np.linspace(1, 0.5, len(t))) for t in truths]
    assert detection_map(perfect, truths) == 1.0
    random = [(rng.uniform(0, 100, (10, 2)), rng.random(10)) for _ in truths]
    assert detection_map(random, truths) < 0.2


def test_a_few_steps_lower_the_magicpoint_loss():
    torch.manual_seed(0)
    from vo.datasets import synthetic_shapes as shapes
    rng = np.random.default_rng(0)
    pairs = [shapes.render_shape(rng, family="polygon") for _ in range(8)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).float()[:, None] / 255
    kp_maps = torch.from_numpy(np.stack([shapes.keypoint_map(p[1], p[0].shape) for p in pairs]))
    labels = losses.keypoint_map_to_cell_labels(kp_maps, generator=torch.Generator().manual_seed(0))
    net = SuperPointNet(channels=SLIM)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(15):
        loss = losses.detector_loss(net.detect(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]


def test_a_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(tmp_path):
    conf = {"channels": SLIM, "batch_size": 2, "cache_size": 16, "eval_size": 2, "eval_every": 1000,
            "checkpoint_every": 1, "log_every": 1}
    torch.manual_seed(0)
    straight = magicpoint.train(tmp_path / "a" / "run", {**conf, "steps": 4})
    torch.manual_seed(0)
    magicpoint.train(tmp_path / "b" / "run", {**conf, "steps": 2})
    resumed = magicpoint.train(tmp_path / "b" / "run", {**conf, "steps": 4})
    a, b = torch.load(straight), torch.load(resumed)
    assert all(torch.allclose(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "run" / "log.txt").read_text().count("loss=") == 4


def test_homographic_adaptation_labels_resume_from_a_labels_file(tmp_path):
    from tests.conftest import require_data
    from vo.train import adapt
    from vo.train.superpoint import LabelledImages
    data = require_data()
    detector = tmp_path / "detector.pth"
    torch.manual_seed(0)
    torch.save(SuperPointNet(channels=SLIM).state_dict(), detector)
    conf = {"max_images": 2, "num_homographies": 3, "threshold": 0.0, "max_keypoints": 50}
    labels = adapt.run(detector, tmp_path / "ha", data, conf)
    first = np.load(labels)
    assert len(first["names"]) == 2 and len(first["keypoints"]) == 100 and not first["names"][0].startswith("/")
    dataset = LabelledImages(labels, data)
    image, keypoints = dataset[1]
    assert image.shape == (240, 320) and len(keypoints) == 50
    # a fresh folder holding only labels.npz (as shipped) labels nothing again
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "labels.npz").write_bytes(labels.read_bytes())
    assert adapt.reuse_labels(tmp_path / "again", adapt.training_images(data)[:2], data) == 2
    again = np.load(adapt.run(detector, tmp_path / "again", data, {**conf, "collect_only": True}))
    assert np.array_equal(again["keypoints"], first["keypoints"])


def test_learning_rate_steps_down_at_the_decay_step():
    from vo.train.common import learning_rate
    conf = {"lr": 1e-3, "lr_decay_step": 100, "lr_decay": 0.1}
    assert learning_rate(conf, 99) == 1e-3
    assert np.isclose(learning_rate(conf, 100), 1e-4) and np.isclose(learning_rate(conf, 5000), 1e-4)
    assert learning_rate({"lr": 1e-3, "lr_decay_step": None}, 10**6) == 1e-3


def test_set_overrides_reach_nested_options_and_reject_unknown_ones(capsys):
    """A dotted --set key changes the nested loss weight; a mistyped key stops the stage in one line."""
    from vo.train import superpoint
    from vo.train.__main__ import main
    from vo.train.common import UnknownOption, merge_conf
    conf = merge_conf(superpoint.default_conf, {"loss.lambda_loss": 1.0, "lr": 3e-4})
    assert conf["loss"]["lambda_loss"] == 1.0 and conf["lr"] == 3e-4
    assert superpoint.default_conf["loss"]["lambda_loss"] == losses.default_conf["lambda_loss"] == 1e-4
    for bad in ({"loss.lambda_los": 1.0}, {"nope": 1}, {"lr.x": 1}):
        with pytest.raises(UnknownOption):
            merge_conf(superpoint.default_conf, bad)
    assert main(["superpoint", "--labels", "missing.npz", "--set", "loss.lambda_los=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set: unknown option 'loss.lambda_los'"


def test_a_superpoint_run_resumes_without_its_init_file(tmp_path):
    from vo.train import superpoint
    from vo.train.common import Checkpoint
    net = SuperPointNet(channels=SLIM, batch_norm=True)
    checkpoint = Checkpoint(tmp_path)
    checkpoint.save(net, torch.optim.Adam(net.parameters()), step=7)
    resumed = superpoint.init_net(superpoint.default_conf, tmp_path / "gone.pth", checkpoint.path)
    step, _ = checkpoint.load(resumed, torch.optim.Adam(resumed.parameters()))   # strict: same widths and norms
    assert step == 7 and superpoint.channels_from_state_dict(resumed.state_dict()) == SLIM


def test_export_turns_a_superpoint_checkpoint_into_the_network_it_trained(tmp_path):
    from models.superpoint import build_net
    from vo.train.common import Checkpoint
    from vo.train.export import export_checkpoint
    torch.manual_seed(0)
    net = SuperPointNet(channels=(8, 8, 16, 16, 32), batch_norm=True)
    for norm in net.norms.values():   # statistics other than the identity, so folding matters
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    Checkpoint(tmp_path / "run").save(net, torch.optim.Adam(net.parameters()), 123)
    path, kind, step = export_checkpoint(tmp_path / "run" / "last.pth", tmp_path / "sp.pth")
    assert (kind, step) == ("superpoint", 123)
    image = torch.rand(1, 1, 64, 80)
    with torch.no_grad():
        expected = net.eval()(image)
        got = build_net(path).eval()(image)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_export_turns_a_superglue_checkpoint_into_loadable_weights(tmp_path):
    from models.superglue import SuperGlue
    from vo.train import superglue
    from vo.train.common import Checkpoint
    from vo.train.export import export_checkpoint
    model = superglue.build_model(superglue.merge_conf({"layers": 1}))
    Checkpoint(tmp_path / "run").save(model, torch.optim.Adam(model.parameters()), 7)
    path, kind, _ = export_checkpoint(tmp_path / "run" / "last.pth", tmp_path / "sg.pth")
    loaded = SuperGlue(weights=path, precision="fp32")
    assert kind == "superglue" and loaded.conf["GNN_layers"] == ["self", "cross"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_superglue_training_can_start_from_a_weights_file(tmp_path):
    from vo.train import superglue
    from vo.train.export import export_checkpoint
    from vo.train.common import Checkpoint
    trained = superglue.build_model(superglue.merge_conf({"layers": 1}))
    with torch.no_grad():
        trained.bin_score.fill_(4.25)
    Checkpoint(tmp_path / "run").save(trained, torch.optim.Adam(trained.parameters()), 3)
    path, _, _ = export_checkpoint(tmp_path / "run" / "last.pth", tmp_path / "sg.pth")
    model = superglue.build_model(superglue.merge_conf({"init": str(path)}))   # depth from the file
    assert len(model.gnn.layers) == 2 and model.training
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_superpoint_pairs_take_the_warp_overrides():
    from vo.train.superpoint import make_pair
    image = (np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8)
    kpts = np.array([[10.0, 20.0], [40.0, 30.0]])
    still = {"translation": False, "rotation": False, "scaling": False, "perspective": False, "patch_ratio": 1.0}
    H_still = make_pair(image, kpts, np.random.default_rng(1), still)[4]
    H_default = make_pair(image, kpts, np.random.default_rng(1))[4]
    np.testing.assert_allclose(H_still / H_still[2, 2], np.eye(3), atol=1e-6)
    assert np.abs(H_default / H_default[2, 2] - np.eye(3)).max() > 0.01


def test_shift_pairs_move_image_and_labels_by_the_same_whole_pixels():
    from vo.geometry.homography import sample_shift, warp_image
    from vo.train.superpoint import make_pair
    rng = np.random.default_rng(0)
    shifts = np.array([sample_shift(rng, 3)[:2, 2] for _ in range(300)])
    assert np.all(shifts == np.round(shifts)) and np.abs(shifts).max() == 3
    assert not np.any(np.all(shifts == 0, axis=1)) and len(np.unique(shifts, axis=0)) == 48   # 7x7 less (0, 0)

    image = (np.random.default_rng(1).random((60, 80)) * 255).astype(np.uint8)
    kpts = np.array([[10.0, 20.0], [40.0, 30.0], [77.0, 5.0]])
    _, _, map0, map1, H = make_pair(image, kpts, np.random.default_rng(2), {"shift": 5})
    dx, dy = int(H[0, 2]), int(H[1, 2])
    moved = warp_image(image, H)
    ys, xs = slice(max(dy, 0), 60 + min(dy, 0)), slice(max(dx, 0), 80 + min(dx, 0))
    source = image[max(-dy, 0):60 - max(dy, 0), max(-dx, 0):80 - max(dx, 0)]
    np.testing.assert_array_equal(moved[ys, xs], source)   # exact: no interpolation
    expected = {(int(x) + dx, int(y) + dy) for x, y in kpts if 0 <= x + dx < 80 and 0 <= y + dy < 60}
    assert {(x, y) for y, x in np.argwhere(map1)} == expected and map0.sum() == 3


def test_sub_pixel_labels_keep_their_position_and_their_mass():
    from models.superpoint import refine_subpixel
    from vo.datasets.synthetic_shapes import soft_keypoint_map
    kpts = np.array([[10.3, 20.8], [7.5, 7.6], [100.2, 50.4]])   # the second sits on a cell corner
    mass = soft_keypoint_map(kpts, (64, 128), sigma=0.5)
    assert mass.sum() == pytest.approx(3.0, abs=1e-5)
    # the detector's log-parabola step reads the sub-pixel position back from a label-shaped peak
    peaks = torch.tensor([[10.0, 21.0], [100.0, 50.0]])
    refined = refine_subpixel(torch.from_numpy(mass), peaks)
    np.testing.assert_allclose(refined.numpy(), kpts[[0, 2]], atol=1e-4)
    targets = losses.soft_cell_targets(torch.from_numpy(mass)[None])
    torch.testing.assert_close(targets.sum(1), torch.ones(1, 8, 16))
    # the corner point's mass is shared by four cells, each giving the rest to its dustbin
    corner_cells = targets[0, 64, :2, :2]
    assert (corner_cells > 0.3).all() and (corner_cells < 0.9).all()
    assert (targets[0, 64, 4:, :10] == 1).all()                       # empty cells: all dustbin


def test_soft_detector_loss_is_least_at_the_labels_and_one_hot_for_a_sharp_label():
    from vo.datasets.synthetic_shapes import keypoint_map, soft_keypoint_map
    kpts = np.array([[21.0, 13.0]])
    sharp = losses.soft_cell_targets(torch.from_numpy(soft_keypoint_map(kpts, (16, 24), sigma=0.05))[None])
    one_hot = losses.keypoint_map_to_cell_labels(torch.from_numpy(keypoint_map(kpts, (16, 24)))[None])
    torch.testing.assert_close(sharp.argmax(1), one_hot)
    soft = losses.soft_cell_targets(torch.from_numpy(soft_keypoint_map(kpts + 0.3, (16, 24), sigma=0.5))[None])
    at_labels = soft.clamp_min(1e-12).log()                           # logits whose softmax is the target
    entropy = -(soft * at_labels).sum(1).mean()
    assert losses.detector_loss(at_labels, soft) == pytest.approx(float(entropy), abs=1e-5)
    assert losses.detector_loss(at_labels + 0.5 * torch.randn(at_labels.shape), soft) > entropy


def test_adapted_labels_are_sub_pixel_only_when_asked():
    from vo.train import adapt
    ys, xs = np.mgrid[0:40, 0:60]
    heatmap = np.exp(-((xs - 30.3) ** 2 + (ys - 12.6) ** 2) / 2.0).astype(np.float32) * 0.5
    conf = {**adapt.default_conf, "threshold": 0.1}
    np.testing.assert_array_equal(adapt.heatmap_to_keypoints(heatmap, conf), [[30.0, 13.0]])
    refined = adapt.heatmap_to_keypoints(heatmap, {**conf, "subpixel": True})
    np.testing.assert_allclose(refined, [[30.3, 12.6]], atol=1e-3)
    from vo.train.superpoint import make_pair
    image = np.zeros((40, 64), np.uint8)
    maps = make_pair(image, refined, np.random.default_rng(0), sigma=0.5)[2:4]
    assert maps[0].dtype == np.float32 and maps[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_a_run_keeps_each_export_when_asked(tmp_path):
    from vo.train.common import fit
    net = SuperPointNet(channels=SLIM)
    conf = {"lr": 1e-3, "steps": 4, "log_every": 1, "checkpoint_every": 2, "export_every": 2, "keep_exports": True}

    def loss_at_step(step):
        total = sum((p ** 2).sum() for p in net.parameters())
        return {"total": total}

    final = fit(net, torch.optim.Adam(net.parameters(), lr=1e-3), tmp_path, conf, "superpoint.pth", loss_at_step, {})
    assert sorted(p.name for p in tmp_path.glob("export_*.pth")) == ["export_2.pth", "export_4.pth"]
    first, last = torch.load(tmp_path / "export_2.pth"), torch.load(tmp_path / "export_4.pth")
    assert all(torch.equal(last[k], v) for k, v in torch.load(final).items())
    assert not torch.equal(first["conv1a.weight"], last["conv1a.weight"])   # two different states


def test_covariance_loss_is_zero_for_heatmaps_that_move_with_the_warp_and_positive_otherwise():
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")

    def blobs(shift_x: float) -> torch.Tensor:   # two peaks, Gaussian-shaped, moved right by shift_x
        return sum(torch.exp(-((xs - cx - shift_x) ** 2 + (ys - cy) ** 2) / 2.0) for cx, cy in [(20, 15), (40, 25)])

    labels = torch.zeros(1, 40, 60, dtype=torch.bool)
    labels[0, 15, 20] = labels[0, 25, 40] = True
    shift = torch.tensor([[[1.0, 0.0, 1.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    heat0, moved = blobs(0.0)[None], blobs(1.5)[None]
    # Bilinear sampling of a smooth heatmap moved by H reads image 0's values back (to its blur).
    assert losses.covariance_loss(heat0, moved, labels, shift) < 0.01
    assert losses.covariance_loss(heat0, heat0, labels, torch.eye(3)[None]) == pytest.approx(0.0, abs=1e-6)
    # A heatmap that stayed where it was, though the image moved, is penalised.
    assert losses.covariance_loss(heat0, heat0, labels, shift) > 0.1
    # A window that leaves the image carries no loss (and no NaN).
    edge = torch.zeros_like(labels)
    edge[0, 1, 1] = True
    assert losses.covariance_loss(heat0, heat0, edge, shift) == 0.0
    # Centred (Pearson): still zero for the moved heatmap, but two flat windows now cost 1, not 0.
    assert losses.covariance_loss(heat0, moved, labels, shift, centred=True) < 0.01
    flat = torch.full_like(heat0, 0.25)   # exact in binary, so the centred window is exactly 0
    assert losses.covariance_loss(flat, flat, labels, shift) == pytest.approx(0.0, abs=1e-6)
    assert losses.covariance_loss(flat, flat, labels, shift, centred=True) == pytest.approx(1.0, abs=1e-6)

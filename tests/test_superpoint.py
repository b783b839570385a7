"""SuperPoint: post-processing on constructed inputs, weight loading and its errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.superpoint import (SuperPoint, SuperPointNet, logits_to_heatmap, peak_curvature, refine_subpixel,
                               sample_descriptors, select_keypoints, simple_nms)
from models.weights import WeightsError

ROOT = Path(__file__).resolve().parent.parent

OFFICIAL_SHAPES = {
    "conv1a": (64, 1), "conv1b": (64, 64), "conv2a": (64, 64), "conv2b": (64, 64),
    "conv3a": (128, 64), "conv3b": (128, 128), "conv4a": (128, 128), "conv4b": (128, 128),
    "convPa": (256, 128), "convPb": (65, 256), "convDa": (256, 128), "convDb": (256, 256),
}


def official_state_dict() -> dict:
    """Random tensors with the keys and shapes of the released superpoint_v1.pth."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out_c, in_c) in OFFICIAL_SHAPES.items():
        k = 1 if name in ("convPb", "convDb") else 3
        state[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g) * 0.05
        state[f"{name}.bias"] = torch.zeros(out_c)
    return state


def test_nms_keeps_the_strongest_peak_per_neighbourhood():
    scores = torch.zeros(1, 40, 40)
    scores[0, 10, 10] = 0.9
    scores[0, 12, 11] = 0.5     # within radius 4 of the stronger peak: suppressed
    scores[0, 30, 30] = 0.4     # isolated: kept
    kept = simple_nms(scores, radius=4)[0]
    assert torch.nonzero(kept).tolist() == [[10, 10], [30, 30]]


def test_nms_recovers_a_peak_hidden_behind_a_suppressed_one():
    # a chain 0.9 -> 0.8 -> 0.7 spaced by 3 px: 0.8 is suppressed by 0.9, so 0.7 becomes a maximum
    scores = torch.zeros(1, 20, 40)
    scores[0, 10, 5], scores[0, 10, 8], scores[0, 10, 11] = 0.9, 0.8, 0.7
    kept = torch.nonzero(simple_nms(scores, radius=3)[0])[:, 1].tolist()
    assert kept == [5, 11]


def test_selection_thresholds_removes_borders_and_keeps_top_k():
    heat = torch.zeros(32, 48)
    heat[2, 20] = 0.9           # inside the 4 px border: dropped
    heat[10, 10], heat[20, 30], heat[15, 40] = 0.3, 0.6, 0.002
    kpts, scores = select_keypoints(heat, threshold=0.005, border=4, max_keypoints=-1)
    assert kpts.tolist() == [[30.0, 20.0], [10.0, 10.0]]   # x,y, best first
    assert scores.tolist() == pytest.approx([0.6, 0.3])
    kpts, _ = select_keypoints(heat, threshold=0.005, border=4, max_keypoints=1)
    assert kpts.tolist() == [[30.0, 20.0]]


def test_heatmap_is_the_depth_to_space_softmax_without_dustbin():
    logits = torch.full((1, 65, 2, 3), -20.0)
    logits[0, 64] = 20.0                  # every cell says "no keypoint"...
    logits[0, 64, 1, 2] = -20.0
    logits[0, 8 * 5 + 3, 1, 2] = 20.0     # ...but cell (1,2) puts one at row 5, column 3
    heat = logits_to_heatmap(logits)
    assert heat.shape == (1, 16, 24)
    assert torch.nonzero(heat[0] > 0.5).tolist() == [[8 + 5, 16 + 3]]


def test_descriptor_sampling_at_cell_centres_follows_the_released_mapping():
    hc, wc = 6, 10
    # channel 0 is the cell's column, channel 1 a constant: their ratio reads back the sampled position
    desc = torch.zeros(1, 2, hc, wc)
    desc[0, 0] = torch.arange(wc).float()
    desc[0, 1] = 100.0
    ys, xs = torch.meshgrid(torch.arange(hc), torch.arange(wc), indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(1, -1, 2).float() * 8 + 3.5
    sampled = sample_descriptors(centres, desc)[0]
    position = sampled[:, 0] / sampled[:, 1] * 100.0
    # released code: (kp - s/2 + 0.5) / (W*s - s/2 - 0.5) spans the grid, so the first centre is exact
    expected = (centres[0, :, 0] - 3.5) / (wc * 8 - 4.5) * (wc - 1)
    assert torch.allclose(position, expected, atol=1e-4)
    assert position[0] == 0 and (position - xs.reshape(-1)).abs().max() < 0.5
    assert torch.allclose(sampled.norm(dim=1), torch.ones(hc * wc), atol=1e-5)


def test_official_layout_loads_strictly_and_extracts(tmp_path):
    path = tmp_path / "superpoint_v1.pth"
    torch.save(official_state_dict(), path)
    sp = SuperPoint(weights=path, max_keypoints=20, keypoint_threshold=0.0, precision="fp32")
    image = (np.random.default_rng(0).random((60, 83)) * 255).astype(np.uint8)  # not a multiple of 8
    feats = sp.extract(image)
    assert feats["keypoints"].shape == (20, 2) and feats["descriptors"].shape == (20, 256)
    assert feats["image_size"].tolist() == [83, 60]
    assert (feats["keypoints"][:, 0] < 83 - 4).all() and (feats["keypoints"][:, 1] < 60 - 4).all()
    colour = sp.extract(np.repeat(image[..., None], 3, axis=2))
    assert torch.allclose(colour["keypoints"], feats["keypoints"])


def test_default_weights_are_the_newest_of_our_own_even_beside_the_official_file(tmp_path):
    from models.weights import newest_match
    for name in ("superpoint_ours_v2.pth", "superpoint_ours_v10.pth", "superpoint_v1.pth"):
        (tmp_path / name).touch()
    assert newest_match(tmp_path, "superpoint_*.pth").name == "superpoint_ours_v10.pth"
    assert newest_match(tmp_path, "superpoint_v1.pth").name == "superpoint_v1.pth"   # named: picked
    for name in ("superpoint_ours_v2.pth", "superpoint_ours_v10.pth"):
        (tmp_path / name).unlink()
    assert newest_match(tmp_path, "superpoint_*.pth").name == "superpoint_v1.pth"    # the only one there
    assert newest_match(tmp_path, "superglue_*.pth") is None


def test_slim_widths_load_through_the_same_loader(tmp_path):
    net = SuperPointNet(channels=(32, 32, 64, 64, 128))
    path = tmp_path / "slim.pth"
    torch.save(net.state_dict(), path)
    assert SuperPoint(weights=path).net.conv1a.weight.shape[0] == 32


@pytest.mark.parametrize("damage, message", [
    ("missing", "weight file not found"),
    ("truncated", "not a readable torch weight file"),
    ("junk", "not a readable torch weight file"),    # a few bytes: the legacy reader's struct error
    ("foreign", "missing key 'conv1a.weight'"),
    ("shape", "key 'convDb.weight' has shape (128, 256, 1, 1), expected (256, 256, 1, 1)"),
    ("extra", "unexpected key 'extra.weight'"),
])
def test_bad_weight_files_get_one_line_errors(tmp_path, damage, message):
    path = tmp_path / "weights.pth"
    state = official_state_dict()
    if damage == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "junk":
        path.write_bytes(b"junk")
    elif damage == "foreign":
        torch.save({"bin_score": torch.tensor(1.0)}, path)
    elif damage == "shape":
        state["convDb.weight"] = torch.zeros(128, 256, 1, 1)
        torch.save(state, path)
    elif damage == "extra":
        state["extra.weight"] = torch.zeros(1)
        torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        SuperPoint(weights=path)
    text = str(err.value)
    assert str(path) in text and message in text and "\n" not in text


def test_default_precision_falls_back_to_fp32_without_bf16_units(monkeypatch):
    import models.runtime as runtime
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.select_precision(torch.device("cpu")) == "fp32"
    assert runtime.select_precision(torch.device("cpu"), "bf16") == "fp32"
    with pytest.raises(ValueError):
        runtime.select_precision(torch.device("cpu"), "fp16")


def test_folding_batch_norm_keeps_the_outputs_and_the_official_layout():
    torch.manual_seed(0)
    net = SuperPointNet(channels=(8, 8, 16, 16, 32), batch_norm=True)
    x = torch.rand(2, 1, 32, 48)
    net.train()
    for _ in range(3):
        net(x)                                  # move the running statistics off their defaults
    net.eval()
    plain = SuperPointNet(channels=(8, 8, 16, 16, 32))
    plain.load_state_dict(net.folded_state_dict(), strict=True)
    for a, b in zip(net(x), plain(x)):
        assert torch.allclose(a, b, atol=1e-4)


def test_opencv_max_filter_equals_max_pooling():
    from models.superpoint import max_filter
    x = torch.rand(2, 37, 53)
    pooled = torch.nn.functional.max_pool2d(x, kernel_size=9, stride=1, padding=4)
    assert torch.equal(max_filter(x, 4), pooled)
    assert torch.equal(max_filter(x.requires_grad_(), 4), pooled)   # the differentiable path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_max_pooling_equals_max_pool2d_on_odd_and_channels_last_maps(dtype):
    from models.superpoint import max_pool_2x2
    for shape in ((1, 3, 8, 12), (2, 5, 9, 13)):
        x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        assert torch.equal(max_pool_2x2(x), torch.nn.functional.max_pool2d(x, 2))
    grad = torch.randn(1, 2, 6, 6, requires_grad=True)
    max_pool_2x2(grad).sum().backward()      # training takes max_pool2d's backward: one 1 per window
    assert grad.grad.sum() == 2 * 3 * 3 and grad.grad.max() == 1


def sample_frame() -> np.ndarray:
    rgb = ROOT / "sequences" / "rgbd_dataset_freiburg3_teddy_sample" / "rgb"
    return cv2.imread(str(sorted(rgb.glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)


def test_antialiased_pooling_keeps_the_grid_and_follows_a_half_cell_shift_where_plain_pooling_jumps():
    from models.superpoint import max_blur_pool_2x2, max_pool_2x2
    image = torch.from_numpy(sample_frame()[:240, :320].astype(np.float32) / 255)[None, None]
    for pool in (max_pool_2x2, max_blur_pool_2x2):
        assert pool(image).shape == (1, 1, 120, 160)
        flat = torch.full((1, 3, 10, 14), 0.7)
        assert torch.allclose(pool(flat), torch.full((1, 3, 5, 7), 0.7))
    # Three poolings make the network's 8-pixel cells. An image moved right by half a cell (4 px)
    # should pool to about the mean of the unmoved map and the map moved by a whole cell (8 px);
    # plain pooling misses that by more than twice as much (measured: 0.018 against 0.007).
    def miss(pool):
        cells = lambda x: pool(pool(pool(x)))
        moved = lambda d: cells(image[..., 8:-8, 8 - d:image.shape[-1] - 8 - d])
        return float((moved(4) - (moved(0) + moved(8)) / 2)[..., 1:-1, 1:-1].abs().mean())
    assert miss(max_blur_pool_2x2) < 0.5 * miss(max_pool_2x2)


def test_antialiasing_adds_no_weights_so_the_layout_stays_the_official_one(tmp_path):
    plain = SuperPointNet(channels=(8, 8, 16, 16, 32))
    antialiased = SuperPointNet(channels=(8, 8, 16, 16, 32), antialias=True)
    assert plain.state_dict().keys() == antialiased.state_dict().keys()
    path = tmp_path / "superpoint.pth"
    torch.save(plain.state_dict(), path)
    assert not SuperPoint(weights=path).net.antialias     # shipped and official files: plain pooling
    assert SuperPoint(weights=path, antialias=True).net.antialias


def test_subpixel_refinement_recovers_the_centre_of_a_gaussian_peak():
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(40.0), indexing="ij")
    centre = torch.tensor([17.3, 11.8])   # x, y
    heatmap = torch.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * 1.2 ** 2)) * 0.5
    peak = torch.tensor([[17.0, 12.0]])
    refined = refine_subpixel(heatmap, peak)
    assert torch.allclose(refined[0], centre, atol=1e-3)


def test_subpixel_refinement_stays_within_half_a_pixel_on_flat_or_border_peaks():
    heatmap = torch.zeros(16, 16)
    heatmap[0, 5] = 0.3          # a one-pixel spike at the border: nothing to fit on one side
    heatmap[8, 8:11] = 0.2       # a plateau
    peaks = torch.tensor([[5.0, 0.0], [9.0, 8.0]])
    refined = refine_subpixel(heatmap, peaks)
    assert (refined - peaks).abs().max() <= 0.5
    assert torch.equal(refined[1], peaks[1])


def test_peak_curvature_is_the_flattest_axis_of_a_rotated_gaussian_peak():
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    angle, sigma_long, sigma_short = 0.6, 3.0, 1.0
    u = (xs - 16) * np.cos(angle) + (ys - 16) * np.sin(angle)
    v = -(xs - 16) * np.sin(angle) + (ys - 16) * np.cos(angle)
    elongated = 0.5 * torch.exp(-u ** 2 / (2 * sigma_long ** 2) - v ** 2 / (2 * sigma_short ** 2))
    round_peak = 0.5 * torch.exp(-((xs - 16) ** 2 + (ys - 16) ** 2) / (2 * sigma_short ** 2))
    peak = torch.tensor([[16.0, 16.0]])
    # -log of a Gaussian is a quadratic: its curvatures are 1 / sigma^2, exact in finite differences
    assert peak_curvature(elongated, peak).item() == pytest.approx(1 / sigma_long ** 2, rel=0.05)
    assert peak_curvature(round_peak, peak).item() == pytest.approx(1 / sigma_short ** 2, rel=1e-3)


def test_the_curvature_test_drops_ridge_peaks_and_keeps_the_budget(shared_data):
    image = cv2.imread(str(next((shared_data / "hpatches" / "v_churchill").glob("1.*"))), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
    plain = SuperPoint(max_keypoints=300, precision="fp32")
    tested = SuperPoint(max_keypoints=300, precision="fp32", min_peak_curvature=1.5)
    kept, all_points = tested.extract(image), plain.extract(image)
    assert len(kept["keypoints"]) == 300 and len(all_points["keypoints"]) == 300
    # the points both keep are the same points, and the test replaced some weak-curvature ones
    heatmap_points = {tuple(p) for p in all_points["keypoints"].round().int().tolist()}
    tested_points = {tuple(p) for p in kept["keypoints"].round().int().tolist()}
    assert 0 < len(tested_points - heatmap_points) < 300
    assert kept["scores"].min() < all_points["scores"].min()   # it reached deeper into the ranking


def test_int8_superpoint_calibrates_on_its_first_input_and_keeps_the_keypoints(shared_data):
    """Static int8 on a real image with trained weights: nearly every fp32 keypoint is found within 1 px."""
    image = cv2.imread(str(shared_data / "hpatches" / "v_churchill" / "1.ppm"), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
    fp32 = SuperPoint(weights=ROOT / "weights" / "magicpoint_synthetic.pth", precision="fp32", max_keypoints=-1).extract(image)
    int8_model = SuperPoint(weights=ROOT / "weights" / "magicpoint_synthetic.pth", precision="int8", max_keypoints=-1)
    assert int8_model.int8_net is None
    int8 = int8_model.extract(image)
    assert int8_model.int8_net is not None
    dist = torch.cdist(fp32["keypoints"], int8["keypoints"]).min(1).values
    assert len(fp32["keypoints"]) > 200
    assert (dist <= 1.0).float().mean() > 0.8


def test_a_coarser_scale_finds_the_points_of_the_reduced_image_in_original_pixels(shared_data):
    """Scale 0.5 = the network on the half-size image, keypoints mapped back pixel centre to pixel
    centre; several scales keep the best max_keypoints of all, each with its own descriptor."""
    import torch.nn.functional as F
    image = cv2.imread(str(shared_data / "hpatches" / "v_churchill" / "1.ppm"), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
    model = SuperPoint(precision="fp32", max_keypoints=400)
    tensor = torch.from_numpy(image).float()[None, None] / 255
    half = F.interpolate(tensor, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    direct = model.extract_batch(half)[0]
    coarse = model.extract_at_scale(tensor, 0.5)[0]
    assert torch.allclose(coarse["keypoints"], (direct["keypoints"] + 0.5) * 2 - 0.5)
    assert torch.equal(coarse["descriptors"], direct["descriptors"])
    assert coarse["image_size"].tolist() == [640, 480]

    both = SuperPoint(precision="fp32", max_keypoints=400, scales=(1.0, 0.5)).extract(image)
    fine = model.extract(image)
    assert len(both["keypoints"]) == 400 and len(both["descriptors"]) == 400
    pooled = torch.cat([fine["scores"], coarse["scores"]])
    assert torch.equal(both["scores"].sort().values, pooled.topk(400).values.sort().values)


def test_idle_cores_leaves_busy_cores_to_their_jobs():
    from models.runtime import idle_cores
    assert idle_cores(2, 0.1) == 2
    assert idle_cores(2, 1.2) == 1         # one core taken by a training job
    assert idle_cores(2, 5.0) == 1         # never fewer than one
    assert idle_cores(8, 2.6) == 5


def test_a_scale_of_zero_or_below_is_refused_where_superpoint_is_built():
    with pytest.raises(ValueError, match="1.0 0.0: every scale must be above 0"):
        SuperPoint(weights=False, precision="fp32", scales=(1.0, 0.0))

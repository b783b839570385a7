"""SuperPointVO: the stability loss, the self-labelled data and a few fine-tuning steps."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models import build_extractor
from models.superpoint import SuperPoint, build_net
from models.weights import WeightsError
from vo.train import losses, superpointvo
from vo.train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sequences" / "rgbd_dataset_freiburg3_teddy_sample"
MAGICPOINT = ROOT / "weights" / "magicpoint_synthetic.pth"
SLIM = (8, 8, 16, 16, 32)
SMALL = {"image_size": (96, 128), "batch_size": 2, "pair_batch_size": 1, "ha_labels": None,
         "channels": SLIM, "lr": 3e-3, "log_every": 1, "checkpoint_every": 2, "export_every": 100}


def write_labels(folder: Path, frames: int = 3, seed: int = 0, images_from_paths: bool = True) -> Path:
    """A vo.selflabel folder (manifest.json + one npz) over sample frames, with synthetic labels:
    the strongest corners are 'stable', random pixels 'unstable'."""
    rng = np.random.default_rng(seed)
    paths = sorted((SAMPLE / "rgb").glob("*.png"))[:frames]
    keypoints, labels, offsets = [], [], [0]
    for path in paths:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        corners = cv2.goodFeaturesToTrack(gray, 60, 0.05, 10)[:, 0]
        random = rng.uniform([8, 8], [gray.shape[1] - 8, gray.shape[0] - 8], (40, 2))
        keypoints.append(np.concatenate([corners, random]).astype(np.float32))
        labels.append(np.r_[np.ones(len(corners)), np.zeros(len(random))].astype(np.int8))
        offsets.append(offsets[-1] + len(keypoints[-1]))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "teddy.npz", frame_paths=np.array([str(p) for p in paths]),
             frame_indices=np.arange(len(paths)), offsets=np.array(offsets, np.int64),
             keypoints=np.concatenate(keypoints), labels=np.concatenate(labels),
             errors=np.zeros(offsets[-1], np.float32), image_size=np.array([640, 480]),
             source=str(SAMPLE), mode="mono", images_from_paths=images_from_paths)
    stable = int(sum((lab == 1).sum() for lab in labels))
    manifest = {"version": 1, "config": {}, "sequences": [{
        "name": "teddy", "source": str(SAMPLE), "mode": "rgbd", "features": "synthetic", "frames": len(paths),
        "labelled_frames": len(paths), "points": offsets[-1], "stable": stable, "unstable": offsets[-1] - stable,
        "file": "teddy.npz", "picture": None, "seconds": 0.0, "fps": 0.0}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ------------------------------------------------------------------ the loss on hand-made cells

def one_cell(points: dict[tuple[int, int], int]) -> torch.Tensor:
    """(1,8,8) label map of one cell: {(x, y): 1 stable / 0 unstable}, -1 elsewhere."""
    label_map = torch.full((1, 8, 8), -1, dtype=torch.int8)
    for (x, y), value in points.items():
        label_map[0, y, x] = value
    return label_map


def test_stability_loss_on_one_cell_is_the_cross_entropy_of_its_label():
    logits = torch.randn(1, 65, 1, 1, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, dim=1)[0, :, 0, 0]
    stable = one_cell({(3, 2): 1})                              # position 2 * 8 + 3
    assert torch.isclose(losses.stability_loss(logits, stable), -logp[19])
    unstable = one_cell({(5, 6): 0})
    assert torch.isclose(losses.stability_loss(logits, unstable), -logp[64])        # the dustbin
    assert torch.isclose(losses.stability_loss(logits, unstable, unstable="pixel"),
                         -torch.log1p(-logp[6 * 8 + 5].exp()))
    # two stable points: either satisfies the cell; an unstable one beside a stable one changes nothing
    two = one_cell({(3, 2): 1, (0, 0): 1})
    assert torch.isclose(losses.stability_loss(logits, two), -torch.logsumexp(logp[[0, 19]], 0))
    assert torch.isclose(losses.stability_loss(logits, one_cell({(3, 2): 1, (5, 6): 0})), -logp[19])
    assert losses.stability_loss(logits, one_cell({})) == 0                             # ignored


def test_stability_loss_ignores_unlabelled_cells_and_averages_labelled_ones():
    logits = torch.randn(1, 65, 2, 3, generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(logits, dim=1)
    label_map = torch.full((1, 16, 24), -1, dtype=torch.int8)
    label_map[0, 1, 2] = 1          # cell (0, 0), position 1 * 8 + 2
    label_map[0, 9, 17] = 0         # cell (1, 2)
    expected = (-logp[0, 10, 0, 0] - 2.0 * logp[0, 64, 1, 2]) / 3.0
    assert torch.isclose(losses.stability_loss(logits, label_map, unstable_weight=2.0), expected)
    valid = torch.ones(1, 16, 24)
    valid[0, 8:, 16:] = 0           # the unstable cell leaves the warp
    assert torch.isclose(losses.stability_loss(logits, label_map, valid_mask=valid), -logp[0, 10, 0, 0])


@pytest.mark.parametrize("mode", ["dustbin", "pixel"])
def test_stability_gradients_push_stable_up_and_unstable_down(mode):
    logits = torch.zeros(1, 65, 1, 2, requires_grad=True)
    label_map = torch.full((1, 8, 16), -1, dtype=torch.int8)
    label_map[0, 2, 3] = 1          # cell 0, position 19: stable
    label_map[0, 4, 13] = 0         # cell 1, position 37: unstable
    losses.stability_loss(logits, label_map, unstable=mode).backward()
    g = logits.grad[0]
    assert g[19, 0, 0] < 0 and (g[torch.arange(65) != 19, 0, 0] > 0).all()   # descent raises the stable logit only
    assert g[37, 0, 1] > 0                                                    # and lowers the unstable one
    assert g[64, 0, 1] < 0                                                    # in favour of the dustbin
    if mode == "dustbin":
        assert (g[:64, 0, 1] > 0).all()


def test_stability_loss_has_finite_gradients_with_nothing_labelled():
    logits = torch.randn(2, 65, 3, 4, requires_grad=True)
    loss = losses.stability_loss(logits, torch.full((2, 24, 32), -1, dtype=torch.int8))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and not logits.grad.any()


# ------------------------------------------------------------------ data and training

def test_self_labelled_frames_scale_and_crop_the_labels(tmp_path):
    labels_dir = write_labels(tmp_path / "labels", frames=2)
    frames = superpointvo.SelfLabelledFrames(labels_dir, (120, 160))
    assert len(frames) == 2 and frames.images[0].shape == (120, 160)      # 640x480 -> a quarter
    raw = np.load(labels_dir / "teddy.npz")
    n0 = int(raw["offsets"][1])
    np.testing.assert_allclose(frames.keypoints[0], (raw["keypoints"][:n0] + 0.5) / 4 - 0.5, atol=1e-4)
    image, kpts, labels = frames.crop(0, np.random.default_rng(0))
    label_map = superpointvo.label_map(kpts, labels, image.shape)
    assert (label_map == 1).sum() > 10 and (label_map == 0).sum() > 10
    images, maps, homographies = superpointvo.make_selflabelled_batch(frames, np.random.default_rng(0), 2)
    assert images.shape == (4, 1, 120, 160) and maps.shape == (4, 120, 160) and homographies.shape == (2, 3, 3)
    assert (maps[2:] == 1).sum() > 10            # the warps keep labels


def test_frames_come_from_the_source_when_the_files_are_not_the_labelled_images(tmp_path):
    from_files = superpointvo.SelfLabelledFrames(write_labels(tmp_path / "a", frames=2), (120, 160))
    from_source = superpointvo.SelfLabelledFrames(write_labels(tmp_path / "b", frames=2, images_from_paths=False),
                                                  (120, 160))
    assert from_source.names == from_files.names == ["teddy/0", "teddy/1"]
    for a, b in zip(from_files.images, from_source.images):
        np.testing.assert_array_equal(a, b)           # fr3 frames are read unchanged by the source


def test_a_few_fine_tuning_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    frames = superpointvo.SelfLabelledFrames(write_labels(tmp_path / "labels"), SMALL["image_size"])
    conf = {**superpointvo.default_conf, **SMALL}
    rng = np.random.default_rng(0)
    self_batch = superpointvo.make_selflabelled_batch(frames, rng, 2)
    pair_batch = superpointvo.superpoint.make_batch(frames.stable_points(), rng, 1)
    net = build_net(MAGICPOINT).to(memory_format=torch.channels_last)     # fine-tuning starts from a detector
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    history = []
    for step in range(12):
        parts = superpointvo.step_loss(net, self_batch, pair_batch, 0, conf)
        optimizer.zero_grad()
        parts["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in parts.items()})
    assert history[-1]["total"] < 0.7 * history[0]["total"]
    assert history[-1]["stability"] < 0.7 * history[0]["stability"]
    assert history[-1]["pair_desc"] < history[0]["pair_desc"]


def test_stage_runs_from_the_command_line_resumes_and_exports(tmp_path, capsys):
    labels_dir = write_labels(tmp_path / "labels", frames=2)
    run = tmp_path / "run"
    sets = [f"{k}={json.dumps(v)}" for k, v in SMALL.items()]
    assert train_main(["superpointvo", "--labels", str(labels_dir), "--init", "none", "--run", str(run),
                       "--steps", "2", "--set", *sets]) == 0
    assert torch.load(run / "last.pth", weights_only=False)["step"] == 2
    assert train_main(["superpointvo", "--labels", str(labels_dir), "--init", str(run / "superpointvo.pth"),
                       "--run", str(run), "--steps", "3", "--set", *sets]) == 0
    assert torch.load(run / "last.pth", weights_only=False)["step"] == 3       # resumed, one more step
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    sp = build_extractor("superpointvo", weights=run / "superpointvo.pth", max_keypoints=50)
    assert isinstance(sp, SuperPoint)
    feats = sp.extract(cv2.imread(str(next((SAMPLE / "rgb").glob("*.png")))))
    assert feats["descriptors"].shape[1] == 256


def test_missing_labels_or_weights_are_one_line_errors(tmp_path, capsys):
    assert train_main(["superpointvo", "--labels", str(tmp_path / "nothing"), "--init", "none",
                       "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.json" in err and "\n" not in err


def test_superpointvo_extractor_without_shipped_weights_names_the_pattern(monkeypatch, tmp_path):
    monkeypatch.setattr("models.weights.WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match=r"superpointvo_\*\.pth"):
        build_extractor("superpointvo")


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    labels_dir = write_labels(tmp_path / "labels", frames=2)
    run = tmp_path / "run"
    sets = [f"{k}={json.dumps(v)}" for k, v in {**SMALL, "checkpoint_every": 10 ** 6}.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vo.train", "superpointvo", "--labels", str(labels_dir),
                             "--init", "none", "--run", str(run), "--steps", "100000", "--set", *sets],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "interrupted at step" in out
    assert torch.load(run / "last.pth", weights_only=False)["step"] >= 1
    assert (run / "superpointvo.pth").is_file()

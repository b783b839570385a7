"""Stage 4: SuperPoint, detector and descriptor trained jointly on homography pairs.

    python -m vo.train superpoint --labels runs/ha_labels/labels.npz --init runs/magicpoint/magicpoint.pth

Each sample is an image with its Homographic Adaptation labels and a random warp
of it; both get photometric augmentation. Loss: L_p(X,Y) + L_p(X',Y') + lambda L_d
(the paper's), plus ``covariance_weight`` times ``losses.covariance_loss`` when asked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.superpoint import SuperPointNet, build_net, channels_from_state_dict, logits_to_heatmap
from models.runtime import autocast, select_precision
from vo.datasets.real_images import DEFAULT_DATA, load_gray
from vo.datasets.synthetic_shapes import keypoint_map, photometric_augment, soft_keypoint_map
from vo.geometry.homography import (filter_inside, pair_conf, sample_homography, sample_shift, warp_image,
                                   warp_points)
from vo.train import losses
from vo.train.common import Checkpoint, fit, merge_conf, read_checkpoint_model, setup_cpu, step_rng

default_conf = {
    "channels": (16, 32, 64, 64, 128),
    "batch_size": 4,          # pairs per step
    "lr": 1e-3,
    "lr_decay_step": None,    # from this step on, lr * lr_decay
    "lr_decay": 0.1,
    "precision": None,        # None: bf16 autocast where the CPU has bf16 units, else fp32
    "steps": 4000,
    "checkpoint_every": 50,
    "log_every": 10,
    "export_every": 250,
    "keep_exports": False,    # True: also export_<step>.pth at each export, not only the latest
    "seed": 0,
    # Each pair's warp: pair_conf with one of these overrides, drawn uniformly ([{}]: pair_conf
    # only). Adding stronger zoom and perspective, e.g. vo.evaluate_features' strong_conf
    # without the lost content, trains for the scale changes of forward motion and HPatches.
    # {"shift": n}: a translation by whole pixels up to n instead (``sample_shift``), whose
    # labels move exactly, against the 8-pixel grid's aliasing (benchmarks/localisation.py).
    "warps": [{}],
    # None: the paper's one-hot labels (the nearest pixel). A number: Gaussian labels of this
    # sigma (px) around the sub-pixel positions (``soft_keypoint_map``), for labels that carry
    # them (``vo.train adapt --set subpixel=true``) and for the warped image's exact positions.
    "label_sigma": None,
    # Weight of ``losses.covariance_loss`` (0: the paper's losses only): the heatmap around each
    # label must move with the warp, which one-hot labels do not ask for below a pixel.
    "covariance_weight": 0.0,
    "covariance_radius": 3,   # px; the windows are (2r+1)^2
    "covariance_centred": False,   # Pearson instead of cosine: flat windows are not rewarded
    # Anti-aliased pooling (``models.superpoint.max_blur_pool_2x2``), weightless, so a plain-pooling
    # file can start such a run. Tried against the grid's aliasing; it localised worse (weights/README.md).
    "antialias": False,
    "loss": losses.default_conf,
}


class LabelledImages:
    """The ``labels.npz`` written by Homographic Adaptation; images are read from the data folder."""

    def __init__(self, path: str | Path, data_root: str | Path = DEFAULT_DATA):
        data = np.load(path)
        self.keypoints, self.offsets = data["keypoints"], data["offsets"]
        size = tuple(int(v) for v in data["image_size"])
        self.images = [load_gray(Path(data_root) / str(name), size) for name in data["names"]]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.keypoints[self.offsets[i]:self.offsets[i + 1]]


def labels_map(keypoints: np.ndarray, hw, sigma: float | None) -> np.ndarray:
    """The paper's one-hot keypoint map (``sigma`` None) or Gaussian sub-pixel masses."""
    return keypoint_map(keypoints, hw) if sigma is None else soft_keypoint_map(keypoints, hw, sigma)


def make_pair(image: np.ndarray, keypoints: np.ndarray, rng: np.random.Generator, warp: dict | None = None,
              sigma: float | None = None):
    """An image, its random warp (``pair_conf`` updated by ``warp``, or a whole-pixel shift for
    ``{"shift": n}``), the keypoint maps of both (``labels_map``) and the homography (0 -> 1)."""
    hw = image.shape
    warp = warp or {}
    if "shift" in warp and len(warp) > 1:
        raise ValueError(f"warp {warp}: a shift takes no other homography options")
    H = sample_shift(rng, warp["shift"]) if "shift" in warp else sample_homography(hw, rng, **{**pair_conf, **warp})
    warped = warp_image(image, H)
    warped_kpts = filter_inside(warp_points(H, keypoints), hw)
    image0 = photometric_augment(rng, image)
    image1 = photometric_augment(rng, warped)
    return image0, image1, labels_map(keypoints, hw, sigma), labels_map(warped_kpts, hw, sigma), H


def make_batch(dataset: LabelledImages, rng: np.random.Generator, batch_size: int, warps=({},),
               sigma: float | None = None):
    """(2B,1,H,W) images (all first images, then all warps), (2B,H,W) keypoint maps, (B,3,3) H."""
    # One warp draws no number, so runs without a mix keep their random streams (and resumes).
    pairs = [make_pair(*dataset[int(i)], rng, warps[int(rng.integers(len(warps)))] if len(warps) > 1 else warps[0],
                       sigma)
             for i in rng.integers(0, len(dataset), batch_size)]
    images = np.stack([p[0] for p in pairs] + [p[1] for p in pairs])
    kp_maps = np.stack([p[2] for p in pairs] + [p[3] for p in pairs])
    homographies = np.stack([p[4] for p in pairs])
    images = torch.from_numpy(images).float()[:, None].div_(255).contiguous(memory_format=torch.channels_last)
    return images, torch.from_numpy(kp_maps), torch.from_numpy(homographies).float()


def forward(net, images: torch.Tensor, precision: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector logits and descriptors, the network under autocast (bf16) and the losses after it in fp32."""
    with autocast(images.device, precision or "fp32"):
        logits, desc = net(images)
    return logits.float(), desc.float()


def pair_loss(net, images, kp_maps, homographies, step: int, conf: dict) -> dict:
    """Total loss and its parts for one batch of pairs."""
    logits, desc = forward(net, images, conf.get("precision"))
    b = len(homographies)
    if kp_maps.is_floating_point():   # sub-pixel masses
        labels = losses.soft_cell_targets(kp_maps)
    else:
        labels = losses.keypoint_map_to_cell_labels(kp_maps, generator=torch.Generator().manual_seed(step))
    det0 = losses.detector_loss(logits[:b], labels[:b])
    det1 = losses.detector_loss(logits[b:], labels[b:])
    desc_loss = losses.descriptor_loss(desc[:b], desc[b:], homographies, conf=conf["loss"])
    total = det0 + det1 + conf["loss"]["lambda_loss"] * desc_loss
    parts = {"det": (det0 + det1) / 2, "desc": desc_loss}
    if conf.get("covariance_weight", 0) > 0:   # superpointvo's batches go without it
        parts["cov"] = pair_covariance(logits, kp_maps, homographies, conf["covariance_radius"],
                                        conf.get("covariance_centred", False))
        total = total + conf["covariance_weight"] * parts["cov"]
    return {"total": total, **parts}


def pair_covariance(logits, kp_maps, homographies, radius: int, centred: bool = False) -> torch.Tensor:
    """``losses.covariance_loss`` both ways: around image 0's labels into image 1, and back."""
    b = len(homographies)
    heat = logits_to_heatmap(logits)
    points = kp_maps > 0.5 if kp_maps.is_floating_point() else kp_maps > 0
    forward_loss = losses.covariance_loss(heat[:b], heat[b:], points[:b], homographies, radius, centred)
    backward_loss = losses.covariance_loss(heat[b:], heat[:b], points[b:], torch.linalg.inv(homographies), radius, centred)
    return (forward_loss + backward_loss) / 2


def init_net(conf: dict, init: str | Path | None, resume_from: Path | None = None) -> SuperPointNet:
    """From MagicPoint (encoder and detector; the descriptor head stays random) or from scratch.

    Training runs with BatchNorm; the initial weights are the folded ones of the stage before.
    A run that resumes takes only the widths from its checkpoint ``resume_from`` (whose weights
    `fit` loads next), so the init file need not exist any more.
    """
    if resume_from is not None and resume_from.exists():
        state, _ = read_checkpoint_model(resume_from)
        return SuperPointNet(channels=channels_from_state_dict(state), batch_norm=True, antialias=conf["antialias"])
    if init is None:
        return SuperPointNet(channels=conf["channels"], batch_norm=True, antialias=conf["antialias"])
    start = build_net(init)
    net = SuperPointNet(channels=channels_from_state_dict(start.state_dict()), batch_norm=True,
                        antialias=conf["antialias"])
    net.load_state_dict(start.state_dict(), strict=False)   # the norms start as identities
    return net


def train(labels: str | Path, run_dir: str | Path, init: str | Path | None = None,
          conf: dict | None = None, out_name: str = "superpoint.pth") -> Path:
    conf = merge_conf(default_conf, conf)
    conf["precision"] = select_precision(torch.device("cpu"), conf["precision"])
    setup_cpu()
    run_dir = Path(run_dir)
    dataset = LabelledImages(labels)
    net = init_net(conf, init, Checkpoint(run_dir).path).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=conf["lr"])

    def loss_at_step(step: int) -> dict:
        batch = make_batch(dataset, step_rng(conf["seed"], step), conf["batch_size"], conf["warps"],
                           conf["label_sigma"])
        return pair_loss(net, *batch, step, conf)

    postfix = {"det": "det", "desc": "desc", **({"cov": "cov"} if conf["covariance_weight"] > 0 else {})}
    return fit(net, optimizer, run_dir, conf, out_name, loss_at_step, postfix)

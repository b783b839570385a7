"""Stage 5: SuperPointVO, SuperPoint fine-tuned on its own VO stability labels.

    python -m vo.selflabel ... --out runs/selflabel          # stable / unstable points per frame
    python -m vo.train superpointvo --labels runs/selflabel --init weights/superpoint_*.pth

The recipe of Self-Improving Visual Odometry (DeTone et al., arXiv 1812.03245). Each step mixes
- a self-labelled batch: frames of the labelled sequences, resized (aspect kept) and randomly
  cropped to the training size, and a random homography warp of each with its labels warped;
  the detector learns stable points as positives and unstable ones as the dustbin
  (``losses.stability_loss``, on both copies), the descriptor the usual hinge between them;
- a homography-pair batch of stage 4 (``superpoint.make_batch`` / ``pair_loss``) on the
  Homographic Adaptation labels (``ha_labels``), so the descriptor does not drift towards the
  few labelled sequences. Without that file the pairs come from the self-labelled frames
  themselves, their stable points as detector labels.

Fine-tuning runs without BatchNorm by default: the network starts exactly as the weights it
is given (fresh norms would renormalise every layer with batch statistics at step 0).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from models.runtime import select_precision
from models.superpoint import SuperPointNet, build_net
from models.weights import default_weights, newest_match
from vo.datasets.base import as_uint8_image, gray
from vo.datasets.synthetic_shapes import photometric_augment
from vo.geometry.homography import inside_mask, pair_conf, sample_homography, warp_image, warp_points
from vo.train import losses, superpoint
from vo.train.common import fit, merge_conf, setup_cpu, step_rng

default_conf = {
    "channels": (16, 32, 64, 64, 128),   # only for --init none
    "batch_norm": False,
    "image_size": (240, 320),            # H, W of the training crops
    "batch_size": 2,                     # self-labelled frames per step (each also warped)
    "pair_batch_size": 2,                # homography pairs per step
    "ha_labels": "runs/ha_labels/labels.npz",
    "lr": 1e-4,
    "precision": None,                   # None: bf16 autocast where the CPU has bf16 units, else fp32
    "steps": 1000,
    "stability_weight": 1.0,
    "unstable_weight": 1.0,
    "unstable": "dustbin",               # or "pixel" (see losses.stability_loss)
    "pair_weight": 1.0,                  # of the homography-pair loss (detector + descriptor)
    "pair_warps": [{}],                  # the pairs' warps, as stage 4's ``warps``
    "min_points": 1,                     # frames with fewer labelled points are left out
    "checkpoint_every": 50,
    "log_every": 10,
    "export_every": 250,
    "keep_exports": False,    # True: also export_<step>.pth at each export, not only the latest
    "seed": 0,
    "loss": losses.default_conf,
}


def resolve_frame_path(path: str, labels_dir: Path) -> Path:
    """A frame path as written by the labeller: absolute, relative to the labels folder or to the cwd."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return labels_dir / p if (labels_dir / p).exists() else p


def cover(image: np.ndarray, size_hw) -> tuple[np.ndarray, float]:
    """A grayscale image scaled (aspect kept) to cover ``size_hw``; returns it and the scale."""
    h, w = size_hw
    scale = max(h / image.shape[0], w / image.shape[1])
    size = (max(w, round(image.shape[1] * scale)), max(h, round(image.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation), scale


def labelled_images(data, entry: dict, labels_dir: Path, frames: list[int]):
    """(f, grayscale image) for the wanted rows f of one sequence's npz.

    Files are read directly unless the labeller says they are not the images it labelled
    (``images_from_paths`` False: undistorted / rectified on reading, or a video); then the
    frames come from the source, matched by ``frame_indices``.
    """
    from_paths = bool(data["images_from_paths"]) if "images_from_paths" in data.files else True
    if from_paths:
        for f in frames:
            path = resolve_frame_path(str(data["frame_paths"][f]), labels_dir)
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise FileNotFoundError(f"{path}: cannot read the labelled frame")
            yield f, gray(as_uint8_image(image))
        return
    from vo.datasets import open_source
    source = str(data["source"]) if "source" in data.files else entry["source"]
    mode = str(data["mode"]) if "mode" in data.files else entry.get("mode")
    wanted = {int(data["frame_indices"][f]): f for f in frames}
    if not wanted:
        return
    for frame in open_source(source).frames(mode):
        if frame.index in wanted:
            yield wanted.pop(frame.index), gray(frame.image)
        if not wanted:
            return


def label_map(keypoints: np.ndarray, labels: np.ndarray, hw) -> np.ndarray:
    """int8 HxW map: 1 at stable points, 0 at unstable ones, -1 elsewhere (stable wins a tie)."""
    h, w = hw
    out = np.full((h, w), -1, np.int8)
    ij = np.round(np.asarray(keypoints, np.float64).reshape(-1, 2)).astype(int)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    for value in (0, 1):
        sel = ok & (np.asarray(labels) == value)
        out[ij[sel, 1], ij[sel, 0]] = value
    return out


class SelfLabelledFrames:
    """The frames of a ``python -m vo.selflabel`` folder (``manifest.json`` + one npz per sequence).

    Images are kept in memory scaled to cover the training size; ``crop`` cuts training crops.
    """

    def __init__(self, labels_dir: str | Path, size_hw=(240, 320), min_points: int = 1):
        self.dir = Path(labels_dir)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no self-labelling manifest (run `python -m vo.selflabel`)")
        manifest = json.loads(manifest_path.read_text())
        self.size_hw = tuple(int(v) for v in size_hw)
        self.images, self.keypoints, self.labels, self.names = [], [], [], []
        for entry in manifest["sequences"]:
            npz = self.dir / entry.get("file", f"{entry['name']}.npz")
            if not npz.is_file():
                npz = self.dir / f"{entry['name']}.npz"
            data = np.load(npz)
            offsets = data["offsets"]
            keep = [f for f in range(len(offsets) - 1) if offsets[f + 1] - offsets[f] >= max(min_points, 1)]
            for f, image in labelled_images(data, entry, self.dir, keep):
                lo, hi = int(offsets[f]), int(offsets[f + 1])
                image, scale = cover(image, self.size_hw)
                self.images.append(image)
                # pixel centres: x' + 0.5 = s (x + 0.5)
                self.keypoints.append((data["keypoints"][lo:hi].astype(np.float64) + 0.5) * scale - 0.5)
                self.labels.append(data["labels"][lo:hi].astype(np.int8))
                self.names.append(f"{entry['name']}/{int(data['frame_indices'][f])}")
        if not self.images:
            raise ValueError(f"{self.dir}: no frame with at least {min_points} labelled points")

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, i: int, rng: np.random.Generator | None = None):
        """(H,W) uint8 crop of frame i (random with ``rng``, else centred), its keypoints and labels."""
        image, h, w = self.images[i], *self.size_hw
        top_max, left_max = image.shape[0] - h, image.shape[1] - w
        if rng is None:
            top, left = top_max // 2, left_max // 2
        else:
            top, left = int(rng.integers(0, top_max + 1)), int(rng.integers(0, left_max + 1))
        kpts = self.keypoints[i] - [left, top]
        keep = inside_mask(kpts, (h, w))
        return np.ascontiguousarray(image[top:top + h, left:left + w]), kpts[keep], self.labels[i][keep]

    def stable_points(self) -> "StablePoints":
        return StablePoints(self)


class StablePoints:
    """Centre crops with their stable points only: what ``superpoint.make_batch`` expects of a dataset."""

    def __init__(self, frames: SelfLabelledFrames):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, kpts, labels = self.frames.crop(i)
        return image, kpts[labels == 1]


def make_selflabelled_batch(frames: SelfLabelledFrames, rng: np.random.Generator, batch_size: int):
    """(2B,1,H,W) images (crops, then their warps), (2B,H,W) label maps, (B,3,3) homographies (crop -> warp)."""
    crops, warps, maps0, maps1, homographies = [], [], [], [], []
    for i in rng.integers(0, len(frames), batch_size):
        image, kpts, labels = frames.crop(int(i), rng)
        hw = image.shape
        H = sample_homography(hw, rng, **pair_conf)
        warped_kpts = warp_points(H, kpts)
        inside = inside_mask(warped_kpts, hw)
        crops.append(photometric_augment(rng, image))
        warps.append(photometric_augment(rng, warp_image(image, H)))
        maps0.append(label_map(kpts, labels, hw))
        maps1.append(label_map(warped_kpts[inside], labels[inside], hw))
        homographies.append(H)
    images = torch.from_numpy(np.stack(crops + warps)).float()[:, None].div_(255)
    return (images.contiguous(memory_format=torch.channels_last), torch.from_numpy(np.stack(maps0 + maps1)),
            torch.from_numpy(np.stack(homographies)).float())


def selflabelled_loss(net, images, label_maps, homographies, conf: dict) -> dict:
    """Stability loss on the crops and their warps, descriptor hinge between them."""
    logits, desc = superpoint.forward(net, images, conf.get("precision"))
    b = len(homographies)
    stability = losses.stability_loss(logits, label_maps, conf["loss"]["cell"], conf["unstable_weight"],
                                      conf["unstable"])
    desc_loss = losses.descriptor_loss(desc[:b], desc[b:], homographies, conf=conf["loss"])
    return {"stability": stability, "desc_self": desc_loss,
            "total": conf["stability_weight"] * stability + conf["loss"]["lambda_loss"] * desc_loss}


def step_loss(net, self_batch, pair_batch, step: int, conf: dict) -> dict:
    """One step's loss: the self-labelled part plus the homography-pair part of stage 4."""
    parts = selflabelled_loss(net, *self_batch, conf)
    pairs = superpoint.pair_loss(net, *pair_batch, step, conf)
    return {"total": parts["total"] + conf["pair_weight"] * pairs["total"], "stability": parts["stability"],
            "desc_self": parts["desc_self"], "pair_det": pairs["det"], "pair_desc": pairs["desc"]}


def resolve_init(init: str | Path | None) -> Path | None:
    """'none' -> None; a glob (``weights/superpoint_*.pth``) -> its newest match; None -> the shipped SuperPoint."""
    if init is None:
        return default_weights("superpoint_*.pth")
    if str(init).lower() == "none":
        return None
    if glob.has_magic(str(init)):
        found = newest_match(Path(init).parent, Path(init).name)
        if found is None:
            raise FileNotFoundError(f"{init}: no weights match")
        return found
    return Path(init)


def init_net(conf: dict, init: Path | None) -> SuperPointNet:
    if conf["batch_norm"]:
        return superpoint.init_net(conf, init)
    if init is None:
        return SuperPointNet(channels=conf["channels"])
    return build_net(init)


def pair_dataset(conf: dict, frames: SelfLabelledFrames):
    """The HA labels of stage 3 when the file exists, else the self-labelled frames' stable points."""
    path = Path(conf["ha_labels"]) if conf.get("ha_labels") else None
    if path is not None and path.is_file():
        return superpoint.LabelledImages(path), str(path)
    return frames.stable_points(), "self-labelled frames (stable points)"


def train(labels_dir: str | Path, run_dir: str | Path, init: str | Path | None = None,
          conf: dict | None = None, out_name: str = "superpointvo.pth") -> Path:
    conf = merge_conf(default_conf, conf)
    conf["precision"] = select_precision(torch.device("cpu"), conf["precision"])
    run_dir = Path(run_dir)
    frames = SelfLabelledFrames(labels_dir, conf["image_size"], conf["min_points"])
    pairs, pairs_from = pair_dataset(conf, frames)
    setup_cpu()   # after loading: reading frames from a source may import libraries with their own handlers
    print(f"self-labelled frames: {len(frames)}; homography pairs from {pairs_from} ({len(pairs)} images)")
    net = init_net(conf, resolve_init(init)).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=conf["lr"])

    def loss_at_step(step: int) -> dict:
        rng = step_rng(conf["seed"], step)
        self_batch = make_selflabelled_batch(frames, rng, conf["batch_size"])
        pair_batch = superpoint.make_batch(pairs, rng, conf["pair_batch_size"], conf["pair_warps"])
        return step_loss(net, self_batch, pair_batch, step, conf)

    return fit(net, optimizer, run_dir, conf, out_name, loss_at_step,
               {"stab": "stability", "det": "pair_det", "desc": "pair_desc"})

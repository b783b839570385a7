"""Stage 2: MagicPoint, the detector alone, trained on Synthetic Shapes.

    python -m vo.train magicpoint --run runs/magicpoint --steps 3000
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.superpoint import SuperPointNet, logits_to_heatmap, select_keypoints, simple_nms
from vo.datasets import synthetic_shapes as shapes
from vo.eval.detection import detection_map
from vo.train.common import Checkpoint, TrainLog, export_weights, merge_conf, setup_cpu, step_rng
from vo.train.losses import detector_loss, keypoint_map_to_cell_labels

default_conf = {
    "channels": (16, 32, 64, 64, 128),  # slim widths: 7x fewer FLOPs, see weights/README.md
    "image_size": (120, 160),
    "batch_size": 32,
    "lr": 1e-3,
    "steps": 3000,
    "cache_size": 20000,
    "eval_size": 300,
    "eval_every": 500,
    "checkpoint_every": 100,
    "log_every": 20,
    "seed": 0,
    "nms_radius": 4,
    "detection_threshold": 0.001,
}


def make_batch(cache, rng: np.random.Generator, batch_size: int):
    """Random images from the cache with random flips; labels follow the flips."""
    idx = rng.integers(0, len(cache), batch_size)
    images, kp_maps = [], []
    for i in idx:
        image, keypoints = cache[int(i)]
        kp_map = shapes.keypoint_map(keypoints, image.shape)
        if rng.random() < 0.5:
            image, kp_map = image[:, ::-1], kp_map[:, ::-1]
        if rng.random() < 0.5:
            image, kp_map = image[::-1], kp_map[::-1]
        images.append(np.ascontiguousarray(image))
        kp_maps.append(np.ascontiguousarray(kp_map))
    images = torch.from_numpy(np.stack(images)).float()[:, None] / 255.0
    return images.contiguous(memory_format=torch.channels_last), torch.from_numpy(np.stack(kp_maps))


@torch.inference_mode()
def predict_keypoints(net, images: np.ndarray, nms_radius: int, threshold: float, batch: int = 32):
    """(N,H,W) uint8 -> list of (keypoints (K,2), scores (K,)) from the detector head."""
    net.eval()
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).float()[:, None] / 255.0
        heat = simple_nms(logits_to_heatmap(net.detect(x)), nms_radius)
        for h in heat:
            kpts, scores = select_keypoints(h, threshold, border=0, max_keypoints=-1)
            out.append((kpts.numpy(), scores.numpy()))
    net.train()
    return out


def render_eval_set(n: int, seed: int, image_size, noisy: bool):
    """Held-out rendered images (a seed the training cache never uses), clean or with photometric noise."""
    conf = {**shapes.default_conf, "image_size": tuple(image_size)}
    conf["photometric"] = {**conf["photometric"], "enable": noisy}
    rng = np.random.default_rng(seed)
    pairs = [shapes.render_shape(rng, conf=conf) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def evaluate_map(net, conf: dict, eval_sets: dict) -> dict:
    """Detection mAP (4 px) on each held-out set."""
    result = {}
    for name, (images, truths) in eval_sets.items():
        preds = predict_keypoints(net, images, conf["nms_radius"], conf["detection_threshold"])
        result[f"map_{name}"] = detection_map(preds, truths, radius=4.0)
    return result


def train(run_dir: str | Path, conf: dict | None = None) -> Path:
    conf = merge_conf(default_conf, conf)
    setup_cpu()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_path = run_dir.parent / f"synthetic_shapes_{conf['cache_size']}_{conf['image_size'][0]}x{conf['image_size'][1]}.npz"
    if not cache_path.exists():
        shapes_conf = {**shapes.default_conf, "image_size": tuple(conf["image_size"])}
        shapes.build_cache(cache_path, conf["cache_size"], seed=conf["seed"], conf=shapes_conf)
    cache = shapes.SyntheticShapesCache(cache_path)
    eval_sets = {noise: render_eval_set(conf["eval_size"], 10_000 + i, conf["image_size"], noise == "noisy")
                 for i, noise in enumerate(("clean", "noisy"))}

    net = SuperPointNet(channels=conf["channels"], batch_norm=True).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=conf["lr"])
    checkpoint, log = Checkpoint(run_dir), TrainLog(run_dir)
    step, _ = checkpoint.load(net, optimizer)
    bar = tqdm(total=conf["steps"], initial=step, desc="magicpoint", unit="step")
    try:
        while step < conf["steps"]:
            rng = step_rng(conf["seed"], step)
            images, kp_maps = make_batch(cache, rng, conf["batch_size"])
            labels = keypoint_map_to_cell_labels(kp_maps, generator=torch.Generator().manual_seed(step))
            loss = detector_loss(net.detect(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % conf["log_every"] == 0:
                log.write(step, loss=loss.item())
            if step % conf["checkpoint_every"] == 0 or step == conf["steps"]:
                checkpoint.save(net, optimizer, step)
            if step % conf["eval_every"] == 0 or step == conf["steps"]:
                log.write(step, **evaluate_map(net, conf, eval_sets))
                export_weights(net, run_dir / "magicpoint.pth")
    except KeyboardInterrupt:
        checkpoint.save(net, optimizer, step)
        print(f"\ninterrupted at step {step}; resume with the same command")
    bar.close()
    return export_weights(net, run_dir / "magicpoint.pth")

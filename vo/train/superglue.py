"""Stage 5: SuperGlue on the project's own SuperPoint features.

    python -m vo.train superglue --features-from runs/superpoint/superpoint.pth --run runs/superglue
    python -m vo.train superglue --features-from ... --run runs/superglue_small --set layers=4

The first run extracts features of every training pair once into ``RUN/cache/*.npz``
(homography pairs of real images, TUM RGB-D and KITTI 06 pairs, see `match_data`);
training then only reads the cache. Loss: the paper's negative log assignment at the
ground-truth matches plus the dustbin entries of the unmatched keypoints.
The model starts as Sinkhorn on the raw descriptor similarity (``prior_init``: zero
residual branches, identity projection), so the first step already matches like a soft
mutual NN; training steps see the 512 strongest keypoints of each cached image.
Exports ``RUN/superglue.pth`` in the official layout and ``RUN/superglue.json`` with the
model configuration it needs (``SuperGlue(weights=..., **json)``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.runtime import autocast, select_precision
from models.superglue import SuperGlue, filter_matches
from models.superglue import default_conf as superglue_conf
from vo.train import match_data
from vo.train.common import merge_conf as common_merge_conf
from vo.train.common import Checkpoint, TrainLog, export_weights, set_learning_rate, setup_cpu, step_rng

# Smaller than the official 9 x (self, cross): 4 pairs halve the time per step. The width
# stays 256 because the official layout has no input projection: the GNN runs at the
# descriptor size of SuperPoint.
small_conf = {"GNN_layers": ["self", "cross"] * 4}

default_conf = {
    "model": {},              # overrides of models.superglue.default_conf (official architecture)
    "layers": None,           # shortcut: number of (self, cross) GNN pairs, e.g. 4 = small_conf
    "batch_size": 2,          # pairs per step
    # The cache holds 1024 keypoints per image; training on the best 512 costs ~4x less in
    # attention and Sinkhorn (glue-factory trains on 512 too). Validation uses all of them.
    "train_keypoints": 512,
    "train_sinkhorn_iterations": 50,
    "lr": 1e-4,               # the paper's Adam rate
    "precision": None,        # None: bf16 autocast where the CPU has bf16 units, else fp32
    "lr_decay_start": 0.6,    # fraction of the steps after which the rate decays exponentially...
    "lr_final": 0.1,          # ...to this fraction of lr at the last step
    "steps": 3000,
    "checkpoint_every": 20,
    "log_every": 5,
    "export_every": 100,
    "val_every": 250,
    "val_pairs": 16,
    "seed": 0,
    "sources": {"homography": 1.0, "tum": 0.25, "kitti": 0.25},   # sampling weights
    "swap_probability": 0.5,  # the matcher must not depend on which image comes first
    "loss": {"balance": None},
    # "descriptor_prior": start as Sinkhorn on the raw descriptor similarity (see prior_init);
    # "official": the released random init, which starts from chance; a weights file: fine-tune
    # it (e.g. the shipped matcher on the features of a newer SuperPoint).
    "init": "descriptor_prior",
    "prior_temperature": 0.05,  # the initial similarity cos / T feeds Sinkhorn...
    "prior_dustbin": 0.3,       # ...against a dustbin at this cosine (both picked on validation pairs)
    "data": match_data.default_conf,
}

VAL_EVERY_NTH_IMAGE = 50      # these training images are kept out of training, for validation
default_sinkhorn_iterations = superglue_conf["sinkhorn_iterations"]   # validation runs as inference does


# ----------------------------------------------------------------------------- loss and metrics

def assignment_loss(log_assignment: torch.Tensor, gt0: torch.Tensor, gt1: torch.Tensor,
                    balance: float | None = None) -> dict:
    """SuperGlue's loss (paper eq. 10) of a (B, M+1, N+1) log assignment and GT labels (B,M), (B,N).

    Terms: -log P_ij for every GT match (i, j), -log P_i,dustbin for every unmatched keypoint
    of image 0 and -log P_dustbin,j for image 1; ignored keypoints (-2) add nothing.
    ``balance=None`` averages all terms of a pair (the paper's sum, scaled so pairs with more
    labels do not dominate the batch); a float w weighs the mean of the match terms by w and
    the mean of the dustbin terms by 1 - w (glue-factory). Returns per-pair ``total`` (B,)
    and the mean ``nll_pos``, ``nll_neg`` (B,) for logging.
    """
    m, n = gt0.shape[1], gt1.shape[1]
    matched = gt0 >= 0
    at_match = log_assignment[:, :m, :n].gather(2, gt0.clamp_min(0)[..., None]).squeeze(2)
    zero = log_assignment.new_zeros(())
    # torch.where, not a product with the mask: a -inf entry times 0 would be NaN.
    pos = -torch.where(matched, at_match, zero).sum(1)
    neg0 = -torch.where(gt0 == match_data.UNMATCHED, log_assignment[:, :m, n], zero).sum(1)
    neg1 = -torch.where(gt1 == match_data.UNMATCHED, log_assignment[:, m, :n], zero).sum(1)
    n_pos = matched.sum(1).clamp_min(1)
    n_neg = ((gt0 == match_data.UNMATCHED).sum(1) + (gt1 == match_data.UNMATCHED).sum(1)).clamp_min(1)
    nll_pos, nll_neg = pos / n_pos, (neg0 + neg1) / n_neg
    if balance is None:
        total = (pos + neg0 + neg1) / (matched.sum(1) + (gt0 == -1).sum(1) + (gt1 == -1).sum(1)).clamp_min(1)
    else:
        total = balance * nll_pos + (1 - balance) * nll_neg
    return {"total": total, "nll_pos": nll_pos, "nll_neg": nll_neg}


def match_metrics(matches0: torch.Tensor, gt0: torch.Tensor) -> dict:
    """Precision and recall (B,) of predicted matches (B,M; -1 = none) against GT labels.

    Precision counts predictions of keypoints whose GT is known (not ignored); recall is
    over the GT matches (glue-factory's definitions).
    """
    predicted = (matches0 > -1) & (gt0 != match_data.IGNORE)
    correct = (matches0 == gt0) & (gt0 > -1)
    precision = correct.sum(1) / predicted.sum(1).clamp_min(1)
    recall = correct.sum(1) / (gt0 > -1).sum(1).clamp_min(1)
    return {"precision": precision.float(), "recall": recall.float()}


# ----------------------------------------------------------------------------- model

def model_conf(conf: dict) -> dict:
    """The SuperGlue keyword arguments of a training conf (``layers`` overrides ``model``)."""
    model = dict(conf.get("model") or {})
    if conf.get("layers"):
        model["GNN_layers"] = ["self", "cross"] * int(conf["layers"])
    return model


def prior_init(model: SuperGlue, temperature: float, dustbin: float) -> SuperGlue:
    """Make a fresh model compute Sinkhorn(cos(d0, d1) / T) with a dustbin, i.e. a soft mutual NN.

    Every residual branch (keypoint encoder, attention MLPs) ends in a zero layer, so the
    GNN starts as the identity (as ReZero / zero-init residuals); the final projection
    starts as a scaled identity. Training then only has to learn what improves on NN
    matching, which two CPU cores can afford; from the released random init the matcher
    spends its first thousands of steps relearning descriptor similarity.
    """
    dim = model.conf["descriptor_dim"]
    scale = (dim ** 0.5 / temperature) ** 0.5        # sim = scale^2 cos / sqrt(dim) = cos / T
    with torch.no_grad():
        model.kenc.encoder[-1].weight.zero_()
        for layer in model.gnn.layers:
            layer.mlp[-1].weight.zero_()
        model.final_proj.weight.copy_(scale * torch.eye(dim)[..., None])
        model.final_proj.bias.zero_()
        model.bin_score.fill_(dustbin / temperature)
    return model


def build_model(conf: dict) -> SuperGlue:
    weights = conf["init"] if conf["init"] not in ("descriptor_prior", "official") else False
    model = SuperGlue(weights=weights, device="cpu", precision="fp32", **model_conf(conf)).train()
    if conf["init"] == "descriptor_prior":
        prior_init(model, conf["prior_temperature"], conf["prior_dustbin"])
    return model


def lr_at(step: int, conf: dict) -> float:
    """Constant, then exponential decay to ``lr_final`` x lr at the last step (the paper decays late too).

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    start = int(conf["lr_decay_start"] * conf["steps"])
    if step < start or conf["steps"] <= start:
        return conf["lr"]
    return conf["lr"] * conf["lr_final"] ** ((step - start) / (conf["steps"] - start))


# ----------------------------------------------------------------------------- data

def split_images(data_root: Path) -> tuple[list[Path], list[Path]]:
    """Training images for the homography pairs, and every 50th kept out for validation."""
    from vo.datasets.real_images import training_images

    images = training_images(data_root)
    val = images[::VAL_EVERY_NTH_IMAGE]
    held = set(val)
    return [p for p in images if p not in held], val


def weights_fingerprint(path: str | Path) -> dict:
    stat = os.stat(path)
    return {"features_from": str(Path(path).resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def source_pairs(name: str, data_root: Path, data_conf: dict, val: bool = False, val_pairs: int = 16):
    """(pair iterator, number of pairs or None, depth tolerance) of one source."""
    conf = data_conf[name]
    if name == "homography":
        train_images, val_images = split_images(data_root)
        if val:   # other seed: other warps of other images
            images = val_images[:val_pairs]
            return match_data.homography_pairs(images, {**conf, "pairs_per_image": 1, "seed": conf["seed"] + 1}), \
                len(images), 0.0
        pairs, total, rtol = match_data.homography_pairs(train_images, conf), \
            len(train_images) * conf["pairs_per_image"], 0.0
    else:
        make = {"tum": match_data.tum_pairs, "kitti": match_data.kitti_pairs}[name]
        pairs, total, rtol = make(data_root / conf["root"], conf), None, conf["depth_rtol"]
    if conf.get("max_pairs"):
        pairs = itertools.islice(pairs, conf["max_pairs"])
        total = conf["max_pairs"] if total is None else min(total, conf["max_pairs"])
    return pairs, total, rtol


def load_caches(features_from: str | Path, run_dir: Path, data_root: Path, conf: dict) -> dict:
    """{source: PairCache}, building the caches that are missing or were made from other features."""
    from models.superpoint import SuperPoint

    data_conf = conf["data"]
    names = [n for n, w in conf["sources"].items() if w > 0] + ["val"]
    extractor = None
    caches = {}
    for name in names:
        source = "homography" if name == "val" else name
        path = run_dir / "cache" / f"{name}.npz"
        meta = {**weights_fingerprint(features_from), "source": name,
                "conf": {k: v for k, v in data_conf.items() if not isinstance(v, dict)},
                "source_conf": data_conf[source], "val_pairs": conf["val_pairs"] if name == "val" else None}
        meta = json.loads(json.dumps(meta))   # tuples -> lists, as they come back from the file
        if match_data.cache_meta(path) != meta:
            if extractor is None:
                extractor = SuperPoint(weights=features_from, max_keypoints=data_conf["num_keypoints"],
                                       device="cpu", precision="fp32")
            extract = lambda image, rng: match_data.extract_fixed(
                extractor, image, data_conf["num_keypoints"], data_conf["detection_threshold"], rng)
            pairs, total, rtol = source_pairs(source, data_root, data_conf, name == "val", conf["val_pairs"])
            match_data.build_cache(path, pairs, extract, data_conf, meta, rtol, total)
        caches[name] = match_data.PairCache(path)
    return caches


def sample_batch(caches: dict, conf: dict, rng: np.random.Generator) -> dict:
    """A batch of pairs drawn from the sources by their weights; images swapped at random."""
    names = [n for n, w in conf["sources"].items() if w > 0]
    weights = np.array([conf["sources"][n] for n in names], float)
    picks = rng.choice(len(names), size=conf["batch_size"], p=weights / weights.sum())
    parts = []
    for k in np.unique(picks):
        cache = caches[names[k]]
        count = int((picks == k).sum())
        parts.append(cache.batch(rng.integers(0, len(cache), count), rng.random(count) < conf["swap_probability"]))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def keep_strongest(batch: dict, k: int | None) -> dict:
    """The first (highest-score) ``k`` keypoints of each image; a match whose partner is cut becomes ignored.

    An unmatched keypoint stays unmatched: it was farther than neg_th from every keypoint.
    """
    if not k or batch["keypoints0"].shape[1] <= k:
        return batch
    out = {key: v if key.startswith("image_size") else v[:, :k] for key, v in batch.items()}
    for gt in ("gt0", "gt1"):
        out[gt] = torch.where(out[gt] >= k, torch.full_like(out[gt], match_data.IGNORE), out[gt])
    return out


# ----------------------------------------------------------------------------- loop

@contextlib.contextmanager
def sinkhorn_iterations(model: SuperGlue, iterations: int):
    """Run ``model`` with this many Sinkhorn iterations inside the block (training uses fewer)."""
    before = model.conf["sinkhorn_iterations"]
    model.conf["sinkhorn_iterations"] = iterations
    try:
        yield model
    finally:
        model.conf["sinkhorn_iterations"] = before


def forward_loss(model: SuperGlue, batch: dict, conf: dict) -> tuple[dict, torch.Tensor]:
    with autocast(torch.device("cpu"), conf.get("precision") or "fp32"):   # the model keeps OT in fp32
        log_assignment = model(batch)
    parts = assignment_loss(log_assignment, batch["gt0"], batch["gt1"], conf["loss"]["balance"])
    return {k: v.mean() for k, v in parts.items()}, log_assignment


@torch.no_grad()
def validate(model: SuperGlue, cache: match_data.PairCache, conf: dict) -> dict:
    """Loss, precision and recall on the validation pairs, in eval mode (folded BatchNorm)."""
    model.eval()
    values = []
    try:
        for i in range(len(cache)):
            batch = cache.batch([i])
            with sinkhorn_iterations(model, default_sinkhorn_iterations):
                parts, log_assignment = forward_loss(model, batch, conf)
            matches0 = filter_matches(log_assignment, model.conf["match_threshold"])[0]
            metrics = match_metrics(matches0, batch["gt0"])
            values.append({"val_loss": parts["total"].item(), "val_precision": metrics["precision"].item(),
                           "val_recall": metrics["recall"].item()})
    finally:
        model.train()
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def export(model: SuperGlue, run_dir: Path, name: str = "superglue") -> Path:
    """Official-layout state dict plus the configuration needed to build the model for it."""
    path = export_weights(model, run_dir / f"{name}.pth")
    conf = {k: model.conf[k] for k in ("descriptor_dim", "keypoint_encoder", "GNN_layers", "num_heads")}
    (run_dir / f"{name}.json").write_text(json.dumps(conf) + "\n")
    return path


def merge_conf(overrides: dict | None) -> dict:
    """default_conf with ``overrides`` (dotted keys reach into the nest; see common.merge_conf)."""
    return common_merge_conf(default_conf, overrides)


def train(features_from: str | Path, run_dir: str | Path, data_root: str | Path,
          conf: dict | None = None) -> Path:
    conf = merge_conf(conf)
    conf["precision"] = select_precision(torch.device("cpu"), conf["precision"])
    setup_cpu()
    run_dir, data_root = Path(run_dir), Path(data_root)
    model = build_model(conf)   # first: a bad init file must not wait for the cache
    caches = load_caches(features_from, run_dir, data_root, conf)
    for name, cache in caches.items():
        counts = cache.label_counts()
        print(f"{name}: {counts['pairs']} pairs, per pair {counts['matched']:.0f} matches, "
              f"{counts['unmatched']:.0f} unmatched, {counts['ignored']:.0f} ignored keypoints")
    optimizer = torch.optim.Adam(model.parameters(), lr=conf["lr"])
    checkpoint, log = Checkpoint(run_dir), TrainLog(run_dir)
    try:
        step, _ = checkpoint.load(model, optimizer)
    except RuntimeError as e:   # e.g. a checkpoint of another layer count
        detail = " ".join(str(e).split()[6:])[:160]
        raise SystemExit(f"{checkpoint.path}: does not fit this model configuration ({detail}...); "
                         "use another --run or the --set it was started with") from None
    bar = tqdm(total=conf["steps"], initial=step, desc="superglue", unit="step")
    try:
        while step < conf["steps"]:
            batch = keep_strongest(sample_batch(caches, conf, step_rng(conf["seed"], step)), conf["train_keypoints"])
            lr = lr_at(step, conf)
            set_learning_rate(optimizer, lr)
            with sinkhorn_iterations(model, conf["train_sinkhorn_iterations"]):
                parts, _ = forward_loss(model, batch, conf)
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(parts["total"]):
                parts["total"].backward()
                optimizer.step()
            else:  # one degenerate batch must not poison Adam's moments
                log.write(step, skipped="non-finite loss")
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total'].item():.3f}", pos=f"{parts['nll_pos'].item():.3f}",
                            neg=f"{parts['nll_neg'].item():.3f}")
            if step % conf["log_every"] == 0:
                log.write(step, lr=lr, **{k: v.item() for k, v in parts.items()})
            if step % conf["checkpoint_every"] == 0:
                checkpoint.save(model, optimizer, step)
            if step % conf["export_every"] == 0:
                export(model, run_dir)
            if step % conf["val_every"] == 0:
                values = validate(model, caches["val"], conf)
                log.write(step, **values)
                bar.write(f"step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in values.items()))
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; resume with the same command")
    checkpoint.save(model, optimizer, step)
    bar.close()
    return export(model, run_dir)

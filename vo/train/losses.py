"""SuperPoint's losses (DeTone et al. 2018, Sec. 3.4), as small pure functions.

Shapes: B images of H x W pixels, cells of 8 x 8, so Hc = H/8 and Wc = W/8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

default_conf = {
    "cell": 8,
    "positive_margin": 1.0,   # m_p
    "negative_margin": 0.2,   # m_n
    "lambda_d": 250.0,        # weight of the positive pairs in the hinge
    "lambda_loss": 1e-4,      # weight of the descriptor loss in the total
}


def keypoint_map_to_cell_labels(kp_map: torch.Tensor, cell: int = 8,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,H,W) {0,1} keypoint map -> (B,Hc,Wc) class in 0..64 (64 = dustbin, no keypoint).

    A cell holding several keypoints takes one of them at random, as the paper says.
    """
    b, h, w = kp_map.shape
    cells = F.pixel_unshuffle(kp_map[:, None].float(), cell)          # (B,64,Hc,Wc)
    noise = torch.rand(cells.shape, generator=generator, device=cells.device)
    scored = cells * (1.0 + noise)                                      # ties broken at random
    dustbin = torch.full_like(scored[:, :1], 0.5)                       # wins only where the cell is empty
    return torch.cat([scored, dustbin], dim=1).argmax(dim=1)


def soft_cell_targets(mass_map: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """(B,H,W) keypoint mass per pixel (``soft_keypoint_map``) -> (B,65,Hc,Wc) class probabilities.

    Each cell's pixels keep their mass and the dustbin takes what is left; a cell holding more
    than one keypoint's mass is scaled to 1 with an empty dustbin: the expectation of the
    paper's rule, which keeps one of them at random.
    """
    masses = F.pixel_unshuffle(mass_map[:, None].float(), cell)           # (B,64,Hc,Wc)
    total = masses.sum(dim=1, keepdim=True)
    masses = masses / total.clamp(min=1.0)
    return torch.cat([masses, (1.0 - total).clamp(min=0.0)], dim=1)


def detector_loss(logits: torch.Tensor, labels: torch.Tensor,
                  valid_mask: torch.Tensor | None = None, cell: int = 8,
                  label_weights: torch.Tensor | None = None) -> torch.Tensor:
    """65-way cross-entropy per cell, averaged over valid cells.

    ``labels``: (B,Hc,Wc) classes, or (B,65,Hc,Wc) class probabilities (``soft_cell_targets``).

    ``valid_mask`` (B,H,W): a cell counts only when all its pixels are valid (inside a warp).
    ``label_weights`` (B,Hc,Wc): optional per-cell weights (0 = ignore), used by SuperPointVO.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")      # (B,Hc,Wc)
    weights = torch.ones_like(ce)
    if valid_mask is not None:
        weights = weights * (F.avg_pool2d(valid_mask[:, None].float(), cell)[:, 0] > 0.999).float()
    if label_weights is not None:
        weights = weights * label_weights
    return (ce * weights).sum() / weights.sum().clamp(min=1.0)


def cell_centres(hc: int, wc: int, cell: int = 8, device=None) -> torch.Tensor:
    """(Hc*Wc, 2) pixel coordinates x,y of the cell centres, row-major."""
    ys, xs = torch.meshgrid(torch.arange(hc, device=device), torch.arange(wc, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() * cell + (cell - 1) / 2


def warp_points_torch(points: torch.Tensor, homographies: torch.Tensor) -> torch.Tensor:
    """(N,2) points, (B,3,3) homographies -> (B,N,2) warped points."""
    homog = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)  # (N,3)
    warped = torch.einsum("bij,nj->bni", homographies.to(points.dtype), homog)
    return warped[..., :2] / warped[..., 2:].clamp(min=1e-8)


def descriptor_correspondence(homographies: torch.Tensor, hc: int, wc: int, cell: int = 8) -> torch.Tensor:
    """s_{hw,h'w'} = 1 when H maps the centre of cell hw within ``cell`` px of cell h'w': (B,Nc,Nc)."""
    centres = cell_centres(hc, wc, cell, homographies.device)
    warped = warp_points_torch(centres, homographies)                   # (B,Nc,2)
    dist = torch.cdist(warped, centres[None].expand(len(warped), -1, -1))
    return (dist < cell).float()   # strict: the 4-neighbours sit exactly one cell away


def descriptor_loss(desc0: torch.Tensor, desc1: torch.Tensor, homographies: torch.Tensor,
                    valid_mask1: torch.Tensor | None = None, conf: dict = default_conf) -> torch.Tensor:
    """Hinge loss over all pairs of cells between image 0 and its warp 1 (H maps 0 -> 1).

    desc0, desc1: (B,D,Hc,Wc) dense descriptors; they are L2-normalised here.
    ``valid_mask1`` (B,H,W): cells of image 1 outside the warp carry no loss.
    """
    b, d, hc, wc = desc0.shape
    cell = conf["cell"]
    d0 = F.normalize(desc0.float(), dim=1).reshape(b, d, -1)
    d1 = F.normalize(desc1.float(), dim=1).reshape(b, d, -1)
    dot = torch.einsum("bdi,bdj->bij", d0, d1)                         # (B,Nc,Nc)
    s = descriptor_correspondence(homographies, hc, wc, cell)
    positive = conf["lambda_d"] * s * F.relu(conf["positive_margin"] - dot)
    negative = (1 - s) * F.relu(dot - conf["negative_margin"])
    loss = positive + negative
    if valid_mask1 is not None:
        valid = (F.avg_pool2d(valid_mask1[:, None].float(), cell)[:, 0] > 0.999).reshape(b, 1, -1).float()
        return (loss * valid).sum() / (valid.sum() * hc * wc).clamp(min=1.0)
    return loss.mean()


def stability_loss(logits: torch.Tensor, label_map: torch.Tensor, cell: int = 8,
                   unstable_weight: float = 1.0, unstable: str = "dustbin",
                   valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SuperPointVO's detector supervision from VO stability labels.

    Self-Improving Visual Odometry (DeTone, Malisiewicz, Rabinovich, arXiv 1812.03245; the
    labelling rule is in shared/reference/recipes.md): a point tracked for 10+ frames is
    *stable* when its mean reprojection error after bundle adjustment is <= 1 px and
    *unstable* when its max error is >= 5 px; every other pixel is *ignored*. The detector is
    trained on these labels with the same 65-way cell classification as SuperPoint:

    - a cell holding stable points is a positive: -log of the probability of its stable
      positions (plain cross-entropy when there is one; any of them satisfies it when several);
    - ``unstable="dustbin"``: a cell holding unstable but no stable points is pushed to the
      dustbin (cross-entropy towards class 64);
      ``unstable="pixel"``: instead, each unstable pixel's probability is lowered,
      -log(1 - p), leaving the rest of its cell free;
    - cells with neither (and, given ``valid_mask`` (B,H,W), cells not fully inside a warp)
      carry no loss.

    logits: (B,65,Hc,Wc); label_map: (B,H,W) integers, 1 stable, 0 unstable, -1 ignored.
    Returns the mean over labelled cells (unstable ones weighted by ``unstable_weight``);
    0 when nothing is labelled.
    """
    if unstable not in ("dustbin", "pixel"):
        raise ValueError(f"unstable must be 'dustbin' or 'pixel', got {unstable!r}")
    logp = F.log_softmax(logits.float(), dim=1)                          # (B,65,Hc,Wc)
    stable = F.pixel_unshuffle((label_map == 1)[:, None].float(), cell)   # (B,64,Hc,Wc)
    unstable_px = F.pixel_unshuffle((label_map == 0)[:, None].float(), cell)
    has_stable = stable.sum(1) > 0                                       # (B,Hc,Wc)
    has_unstable = unstable_px.sum(1) > 0
    weights = torch.ones_like(has_stable, dtype=logp.dtype)
    if valid_mask is not None:
        weights = weights * (F.avg_pool2d(valid_mask[:, None].float(), cell)[:, 0] > 0.999).float()
    # A finite fill instead of -inf keeps the gradient of unlabelled cells finite (then zeroed).
    positive = -torch.logsumexp(logp[:, :-1].masked_fill(stable == 0, -1e4), dim=1)
    positive_w = has_stable.float() * weights
    if unstable == "dustbin":
        negative = -logp[:, -1]
        negative_w = (has_unstable & ~has_stable).float() * weights
        negative_count = negative_w
    else:
        p = logp[:, :-1].exp().clamp(max=1 - 1e-6)
        negative = -(torch.log1p(-p) * unstable_px).sum(1)               # summed over the cell's unstable pixels
        negative_w = has_unstable.float() * weights
        negative_count = unstable_px.sum(1) * weights
    total = (positive * positive_w).sum() + unstable_weight * (negative * negative_w).sum()
    count = positive_w.sum() + unstable_weight * negative_count.sum()
    return total / count.clamp(min=1.0)


def window_offsets(radius: int, device=None) -> torch.Tensor:
    """((2r+1)^2, 2) integer x,y offsets of a square window, row-major."""
    r = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dx, dy], dim=-1).reshape(-1, 2)


def bilinear_at(maps: torch.Tensor, batch_index: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (B,H,W) maps at (N,K,2) pixel x,y of images ``batch_index`` (N,) -> (N,K).

    ``F.grid_sample`` one image at a time, with the pixel convention of ``sample_descriptors``
    (align_corners: pixel 0 and W-1 are the edges of the grid).
    """
    height, width = maps.shape[-2:]
    grid = points * points.new_tensor([2 / (width - 1), 2 / (height - 1)]) - 1
    samples = points.new_zeros(points.shape[:-1])
    for b in batch_index.unique():
        rows = batch_index == b
        samples[rows] = F.grid_sample(maps[b][None, None], grid[rows][None], mode="bilinear",
                                      align_corners=True)[0, 0]
    return samples


def covariance_loss(heat0: torch.Tensor, heat1: torch.Tensor, labels0: torch.Tensor,
                    homographies: torch.Tensor, radius: int = 3, centred: bool = False) -> torch.Tensor:
    """Heatmap covariance around the labelled keypoints (not in the SuperPoint paper).

    R2D2's repeatability loss (Revaud et al. 2019), restricted to windows around the labels:
    1 - cosine similarity of the (2r+1)^2 heatmap values around each keypoint of image 0 and
    the values of image 1 bilinearly sampled where H (0 -> 1) puts those pixels. It is 0
    exactly when image 1's heatmap is image 0's moved by H, so it asks for peaks that move
    with the image, to a fraction of a pixel: what the MLE measures and what the one-hot
    cross-entropy leaves free. Windows not wholly inside both images carry no loss.

    The plain cosine is 1 for two flat windows, so it also rewards flattening the peaks (R2D2
    pairs it with a peakiness loss for that). ``centred`` takes each window's mean off first
    (Pearson's correlation): a flat window then scores 0 and its loss is 1.

    heat0, heat1: (B,H,W) probabilities (``logits_to_heatmap``); labels0: (B,H,W) bool, image 0's keypoints.
    """
    height, width = heat0.shape[-2:]
    batch_index, ys, xs = torch.nonzero(labels0, as_tuple=True)
    centres = torch.stack([xs, ys], dim=1).float()                          # (N,2)
    window = centres[:, None] + window_offsets(radius, heat0.device).float()   # (N,K,2)
    homog = torch.cat([window, torch.ones_like(window[..., :1])], dim=-1)
    warped = torch.einsum("nij,nkj->nki", homographies[batch_index].float(), homog)
    warped = warped[..., :2] / warped[..., 2:].clamp(min=1e-8)

    def inside(points):
        return ((points[..., 0] >= 0) & (points[..., 0] <= width - 1)
                & (points[..., 1] >= 0) & (points[..., 1] <= height - 1)).all(dim=1)

    keep = inside(window) & inside(warped)
    if not keep.any():
        return heat0.sum() * 0.0
    batch_index, window, warped = batch_index[keep], window[keep].long(), warped[keep]
    values0 = heat0[batch_index[:, None], window[..., 1], window[..., 0]]   # (N,K)
    values1 = bilinear_at(heat1, batch_index, warped)
    if centred:
        values0 = values0 - values0.mean(dim=1, keepdim=True)
        values1 = values1 - values1.mean(dim=1, keepdim=True)
    return (1 - F.cosine_similarity(values0, values1, dim=1, eps=1e-8)).mean()

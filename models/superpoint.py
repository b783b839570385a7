"""SuperPoint: keypoints and descriptors in one pass (DeTone et al., 2018).

The network keeps the official layout (``conv1a`` … ``convDb``) so the released
``superpoint_v1.pth`` and the project's own weights load through one path.
Post-processing follows the released code: 65-way softmax, depth-to-space,
max-pool NMS, threshold, border removal, top-k, bilinear descriptor sampling.
"""
from __future__ import annotations

import copy

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .quantize import quantize_static
from .runtime import autocast, select_device, select_precision
from .weights import WeightsError, default_weights, load_checked, read_state_dict

default_conf = {
    "descriptor_dim": 256,
    "nms_radius": 4,
    "keypoint_threshold": 0.005,
    "max_keypoints": 1024,   # -1 keeps all
    "remove_borders": 4,
    "cell": 8,
    "subpixel": True,        # refine peaks by a quadratic fit on the log-heatmap (not in the paper)
    # Drop peaks whose log-heatmap curves less than this along its flattest direction (None keeps
    # all; not in the paper). Flat-sided peaks, on edges, localise worst: SIFT's edge test, on the heatmap.
    "min_peak_curvature": None,
    # Image scales to detect and describe at, e.g. (1.0, 0.7): the best max_keypoints over all of
    # them are kept, so points also match across zoom (not in the paper, which runs at 1.0 only).
    "scales": (1.0,),
    # Anti-aliased pooling (``max_blur_pool_2x2``), for files trained with it (``vo.train superpoint
    # --set antialias=true``; none ships). Official files and ours run with plain pooling.
    "antialias": False,
}


NORMALISED_CONVS = ("conv1a", "conv1b", "conv2a", "conv2b", "conv3a", "conv3b", "conv4a", "conv4b",
                    "convPa", "convDa")


class SuperPointNet(nn.Module):
    """The bare network: image (B,1,H,W) in [0,1] -> logits (B,65,H/8,W/8), descriptors (B,D,H/8,W/8).

    ``batch_norm=True`` adds BatchNorm after every 3x3 conv, for training only: deep ReLU
    stacks without it sit for thousands of steps on the all-dustbin answer. Export folds
    the norms into the convs (``folded_state_dict``), so shipped files keep the official layout.
    """

    def __init__(self, descriptor_dim: int = 256, channels=(64, 64, 128, 128, 256), batch_norm: bool = False,
                 antialias: bool = False):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        conv = lambda i, o, k=3: nn.Conv2d(i, o, kernel_size=k, stride=1, padding=k // 2)
        self.conv1a, self.conv1b = conv(1, c1), conv(c1, c1)
        self.conv2a, self.conv2b = conv(c1, c2), conv(c2, c2)
        self.conv3a, self.conv3b = conv(c2, c3), conv(c3, c3)
        self.conv4a, self.conv4b = conv(c3, c4), conv(c4, c4)
        self.convPa, self.convPb = conv(c4, c5), conv(c5, 65, 1)
        self.convDa, self.convDb = conv(c4, c5), conv(c5, descriptor_dim, 1)
        self.norms = nn.ModuleDict({name: nn.BatchNorm2d(getattr(self, name).out_channels)
                                    for name in NORMALISED_CONVS}) if batch_norm else None
        # Anti-aliased pooling has no weights, so the layout stays the official one; official files
        # were trained with plain pooling and must run with it.
        self.antialias = antialias
        self.pool = max_blur_pool_2x2 if antialias else max_pool_2x2

    def block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """conv (+ norm) + ReLU."""
        x = getattr(self, name)(x)
        # In place: no fresh full-resolution buffer per layer (autograd keeps what it needs).
        return F.relu(self.norms[name](x) if self.norms is not None else x, inplace=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block("conv1b", self.block("conv1a", x))
        x = self.block("conv2b", self.block("conv2a", self.pool(x)))
        x = self.block("conv3b", self.block("conv3a", self.pool(x)))
        return self.block("conv4b", self.block("conv4a", self.pool(x)))

    def detect(self, image: torch.Tensor) -> torch.Tensor:
        """Detector logits only (MagicPoint training and homographic adaptation)."""
        return self.convPb(self.block("convPa", self.encode(image)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(image)
        logits = self.convPb(self.block("convPa", features))
        descriptors = self.convDb(self.block("convDa", features))
        return logits, descriptors

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The official layout, with each BatchNorm (eval statistics) folded into its conv."""
        state = {k: v.detach().float().clone() for k, v in self.state_dict().items() if not k.startswith("norms.")}
        for name, norm in (self.norms or {}).items():
            scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
            state[f"{name}.weight"] = state[f"{name}.weight"] * scale.view(-1, 1, 1, 1)
            state[f"{name}.bias"] = (state[f"{name}.bias"] - norm.running_mean) * scale + norm.bias.detach()
        return state


def channels_from_state_dict(state: dict) -> tuple[int, ...]:
    """Widths of a SuperPoint state dict in the official layout (the slim variant only narrows them)."""
    try:
        return tuple(int(state[k].shape[0]) for k in ("conv1a.weight", "conv2a.weight", "conv3a.weight",
                                                      "conv4a.weight", "convPa.weight"))
    except (KeyError, AttributeError, IndexError) as e:
        raise KeyError(e.args[0] if e.args else "conv1a.weight") from None


def build_net(weights, descriptor_dim: int = 256, antialias: bool = False) -> SuperPointNet:
    """A network with the widths found in ``weights`` (a path), loaded with strict checks."""
    state = read_state_dict(weights)
    try:
        channels = channels_from_state_dict(state)
    except KeyError as e:
        raise WeightsError(f"{weights}: missing key '{e.args[0]}' (is this a SuperPoint file?)") from None
    net = SuperPointNet(descriptor_dim, channels, antialias=antialias)
    load_checked(net, weights, state)
    return net


# ---------------------------------------------------------------- pure post-processing

def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, the same values; at inference as two strided maximums: on bf16
    channels_last CPU tensors max_pool2d took more time than the conv before it. Training keeps
    max_pool2d, whose backward ran a SuperPoint training step twice as fast."""
    if x.requires_grad:
        return F.max_pool2d(x, 2)
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[..., 0:height:2, :width], x[..., 1:height:2, :width])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def torch_max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def max_blur_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Anti-aliased 2x2 max pooling (Zhang 2019, "Making CNNs shift-invariant again"): the max
    over 2x2 windows at stride 1, then a [1 2 1]^2 / 16 blur at stride 2. Strided pooling makes
    the features depend on where a corner falls in the 8x8 grid and the blur takes much of that
    out; SuperPoint's decoder needs it to place points inside a cell, so a net fine-tuned with it
    localised worse (weights/README.md). Output pixel i is centred on input 2i + 0.5, as with
    ``max_pool_2x2``."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = F.max_pool2d(F.pad(x[..., :height, :width], (0, 1, 0, 1), mode="replicate"), 2, stride=1)
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (taps[:, None] * taps[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, kernel.contiguous(), stride=2, groups=x.shape[1])


def logits_to_heatmap(logits: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """(B,65,h,w) logits -> (B,H,W) keypoint probabilities; the dustbin is dropped."""
    prob = torch.softmax(logits.float(), dim=1)[:, :-1]
    return F.pixel_shuffle(prob, cell).squeeze(1)


def max_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over (2r+1)^2 windows of (B,H,W) maps; OpenCV's dilate on the CPU is ~50x faster than max_pool2d."""
    if x.device.type == "cpu" and not x.requires_grad:
        kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
        maps = x.float().contiguous().numpy()
        return torch.from_numpy(np.stack([cv2.dilate(m, kernel) for m in maps])).to(x.dtype)
    k = 2 * radius + 1  # separable: rows then columns
    x = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(x, kernel_size=(k, 1), stride=1, padding=(radius, 0))


def simple_nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """Keep local maxima within ``radius``; two extra rounds recover maxima hidden by suppressed peaks."""
    def max_pool(x):
        return max_filter(x, radius)

    zeros = torch.zeros_like(scores)
    max_mask = scores == max_pool(scores)
    for _ in range(2):
        supp_mask = max_pool(max_mask.float()) > 0
        supp_scores = torch.where(supp_mask, zeros, scores)
        new_max_mask = supp_scores == max_pool(supp_scores)
        max_mask = max_mask | (new_max_mask & (~supp_mask))
    return torch.where(max_mask, scores, zeros)


def select_keypoints(heatmap: torch.Tensor, threshold: float, border: int, max_keypoints: int):
    """One (H,W) heatmap after NMS -> keypoints (N,2) as x,y and scores (N,), best first."""
    height, width = heatmap.shape
    if border > 0:
        inside = torch.zeros_like(heatmap, dtype=torch.bool)
        inside[border:height - border, border:width - border] = True
        heatmap = torch.where(inside, heatmap, torch.zeros_like(heatmap))
    flat = heatmap.reshape(-1)
    idx = torch.nonzero(flat > threshold).squeeze(1)
    scores = flat[idx]
    if 0 <= max_keypoints < scores.numel():
        scores, order = torch.topk(scores, max_keypoints)
        idx = idx[order]
    else:
        scores, order = torch.sort(scores, descending=True)
        idx = idx[order]
    keypoints = torch.stack([idx % width, torch.div(idx, width, rounding_mode="floor")], dim=1)
    return keypoints.float(), scores


def parabola_vertex(f_minus: torch.Tensor, f_centre: torch.Tensor, f_plus: torch.Tensor) -> torch.Tensor:
    """Offset of the maximum of the parabola through three samples at -1, 0, +1, clipped to
    half a pixel; 0 where the samples do not curve downwards (flat or not a peak)."""
    curvature = f_minus + f_plus - 2 * f_centre
    step = 0.5 * (f_minus - f_plus) / curvature.clamp(max=-1e-6)
    return torch.where(curvature < 0, step, torch.zeros_like(step)).clamp(-0.5, 0.5)


def log_neighbourhood(heatmap: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """(N,3,3) log-heatmap around integer (N,2) x,y peaks of one (H,W) heatmap, [row dy+1, col dx+1];
    rows and columns past the border repeat the edge."""
    height, width = heatmap.shape
    logp = heatmap.clamp_min(1e-6).log()
    offsets = torch.arange(-1, 2, device=heatmap.device)
    x = (keypoints[:, 0].long()[:, None] + offsets).clamp(0, width - 1)
    y = (keypoints[:, 1].long()[:, None] + offsets).clamp(0, height - 1)
    return logp[y[:, :, None], x[:, None, :]]


def refine_subpixel(heatmap: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """Move integer (N,2) x,y peaks of one (H,W) heatmap to the vertex of a 1D parabola per axis.

    The fit is on the log-probabilities, which is exact for a Gaussian-shaped peak.
    """
    if len(keypoints) == 0:
        return keypoints
    patch = log_neighbourhood(heatmap, keypoints)
    dx = parabola_vertex(patch[:, 1, 0], patch[:, 1, 1], patch[:, 1, 2])
    dy = parabola_vertex(patch[:, 0, 1], patch[:, 1, 1], patch[:, 2, 1])
    return keypoints + torch.stack([dx, dy], dim=1)


def peak_curvature(heatmap: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """Smaller principal curvature of -log(heatmap) at integer (N,2) x,y peaks of one (H,W) heatmap.

    Large on both axes at a corner-like peak; near 0 where the peak runs along a ridge, whose
    position along it the network cannot pin down.
    """
    if len(keypoints) == 0:
        return keypoints.new_zeros(0)
    p = log_neighbourhood(heatmap, keypoints)
    dxx = 2 * p[:, 1, 1] - p[:, 1, 0] - p[:, 1, 2]
    dyy = 2 * p[:, 1, 1] - p[:, 0, 1] - p[:, 2, 1]
    dxy = -(p[:, 2, 2] - p[:, 2, 0] - p[:, 0, 2] + p[:, 0, 0]) / 4
    return (dxx + dyy) / 2 - torch.sqrt(((dxx - dyy) / 2) ** 2 + dxy ** 2)


def sample_descriptors(keypoints: torch.Tensor, descriptors: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Bilinearly sample (B,D,h,w) descriptors at (B,N,2) pixel keypoints -> (B,N,D), unit length.

    The mapping puts pixel ``cell/2 - 0.5`` on the first cell's centre, as the released code does.
    """
    b, d, h, w = descriptors.shape
    grid = keypoints - cell / 2 + 0.5
    grid = grid / grid.new_tensor([w * cell - cell / 2 - 0.5, h * cell - cell / 2 - 0.5])
    grid = (grid * 2 - 1).to(descriptors.dtype)
    sampled = F.grid_sample(descriptors, grid.view(b, 1, -1, 2), mode="bilinear", align_corners=True)
    return F.normalize(sampled.reshape(b, d, -1).float(), p=2, dim=1).transpose(1, 2)


def checked_scales(scales) -> tuple[float, ...]:
    """``scales`` as a tuple of floats; ValueError (naming them) unless every one is above 0."""
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"{' '.join(map(str, scales))}: every scale must be above 0")
    return scales


def merge_scales(features: tuple[dict, ...], max_keypoints: int) -> dict:
    """One feature dict from those of several scales: the ``max_keypoints`` best scores (-1: all)."""
    merged = {k: torch.cat([f[k] for f in features]) for k in ("keypoints", "scores", "descriptors")}
    if max_keypoints >= 0 and len(merged["scores"]) > max_keypoints:
        best = torch.topk(merged["scores"], max_keypoints).indices
        merged = {k: v[best] for k, v in merged.items()}
    return {**merged, "image_size": features[0]["image_size"]}


def image_to_tensor(image, device: torch.device) -> torch.Tensor:
    """HxW / HxWx3 uint8 (BGR) numpy, or a tensor, -> (1,1,H,W) float in [0,1] on ``device``."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        if image.ndim != 2:
            raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        tensor = tensor.float() / 255.0 if image.dtype == np.uint8 else tensor.float()
        return tensor[None, None]
    tensor = image.to(device)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    while tensor.dim() < 4:
        tensor = tensor[None]
    if tensor.shape[1] == 3:
        tensor = (tensor * tensor.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return tensor.float()


def pad_to_multiple(images: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Pad bottom/right so H and W divide by ``multiple``; keypoints keep their coordinates."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images


class SuperPoint:
    """Keypoint detector and descriptor.

    ``weights``: None = the project's shipped default, a path to a state dict in the
    official layout, or False for random initialisation (training, benchmarks).
    ``precision``: "fp32", "bf16" (CPU with bf16 units), "fp16" (CUDA) or "int8" (CPU, opt-in:
    calibrated on the first images it extracts); default fastest faithful.
    """

    def __init__(self, weights=None, max_keypoints: int = 1024, nms_radius: int = 4,
                 keypoint_threshold: float = 0.005, device=None, precision: str | None = None, **conf):
        self.conf = {**default_conf, **conf, "max_keypoints": max_keypoints,
                     "nms_radius": nms_radius, "keypoint_threshold": keypoint_threshold}
        self.conf["scales"] = checked_scales(self.conf["scales"])
        self.device = select_device(device)
        self.precision = select_precision(self.device, precision)
        if weights is None:
            weights = default_weights("superpoint_*.pth")
        if weights is False:
            net = SuperPointNet(self.conf["descriptor_dim"], self.conf.get("channels", (64, 64, 128, 128, 256)),
                                antialias=self.conf["antialias"])
        else:
            net = build_net(weights, self.conf["descriptor_dim"], self.conf["antialias"])
        if self.precision == "int8" and net.antialias:
            raise ValueError("precision 'int8' runs plain pooling only; use fp32 or bf16 with antialias=True")
        self.weights = weights
        self.net = net.eval().to(self.device, memory_format=torch.channels_last)
        self.int8_net = None   # built from the first input when precision == "int8"

    @torch.inference_mode()
    def extract(self, image) -> dict:
        """One image -> dict of keypoints (N,2), scores (N,), descriptors (N,D), image_size (W,H)."""
        batch = self.extract_batch(image_to_tensor(image, self.device))
        return batch[0]

    @torch.inference_mode()
    def extract_batch(self, images: torch.Tensor) -> list[dict]:
        """(B,1,H,W) float images in [0,1] -> one feature dict per image (stereo pairs, training)."""
        images = images.to(self.device)
        per_scale = [self.extract_at_scale(images, scale) for scale in self.conf["scales"]]
        if len(per_scale) == 1:
            return per_scale[0]
        return [merge_scales(feats, self.conf["max_keypoints"]) for feats in zip(*per_scale)]

    def extract_at_scale(self, images: torch.Tensor, scale: float) -> list[dict]:
        """Features of the images resized by ``scale``, keypoints in the original pixels."""
        height, width = images.shape[-2:]
        size = torch.tensor([width, height], device=self.device)
        if scale != 1.0:
            images = F.interpolate(images, scale_factor=scale, mode="bilinear", antialias=True,
                                   align_corners=False)
        to_original = size / torch.tensor(images.shape[-1:-3:-1], device=self.device)
        logits, descriptors = self.forward_dense(images)
        heatmaps = logits_to_heatmap(logits, self.conf["cell"])[:, :images.shape[-2], :images.shape[-1]]
        peaks = simple_nms(heatmaps, self.conf["nms_radius"])
        out = []
        for heatmap, peak_map, desc in zip(heatmaps, peaks, descriptors):
            kpts, scores = self.select(heatmap, peak_map)
            if self.conf["subpixel"]:
                kpts = refine_subpixel(heatmap, kpts)
            desc = sample_descriptors(kpts[None], desc[None], self.conf["cell"])[0]
            # pixel centres: x_original + 0.5 = (x_scaled + 0.5) * to_original
            kpts = (kpts + 0.5) * to_original - 0.5 if scale != 1.0 else kpts
            out.append({"keypoints": kpts, "scores": scores, "descriptors": desc, "image_size": size})
        return out

    def select(self, heatmap: torch.Tensor, peak_map: torch.Tensor):
        """Keypoints (N,2) and scores (N,) of one heatmap, best first, after the curvature test if set."""
        min_curvature, max_keypoints = self.conf["min_peak_curvature"], self.conf["max_keypoints"]
        kpts, scores = select_keypoints(peak_map, self.conf["keypoint_threshold"], self.conf["remove_borders"],
                                        max_keypoints if min_curvature is None else -1)
        if min_curvature is None:
            return kpts, scores
        sharp = peak_curvature(heatmap, kpts) >= min_curvature
        kpts, scores = kpts[sharp], scores[sharp]
        if 0 <= max_keypoints < len(scores):
            kpts, scores = kpts[:max_keypoints], scores[:max_keypoints]   # already best first
        return kpts, scores

    def network(self, images: torch.Tensor):
        """The module to run: the float network, or its int8 copy calibrated on ``images``."""
        if self.precision != "int8":
            return self.net
        if self.int8_net is None:
            float_net = copy.copy(self.net)
            float_net.pool = torch_max_pool_2x2   # quantized tensors pool natively; torch.maximum would not
            self.int8_net = quantize_static(float_net, [images.contiguous()])
        return self.int8_net

    def forward_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network pass in the chosen precision; returns fp32 logits and unit descriptors."""
        images = pad_to_multiple(images, self.conf["cell"]).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            logits, descriptors = self.network(images)(images)
        descriptors = F.normalize(descriptors.float(), p=2, dim=1)
        return logits.float(), descriptors

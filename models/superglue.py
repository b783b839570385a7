"""SuperGlue: matching with an attentional graph network and optimal transport (Sarlin et al., CVPR 2020).

The parameters keep the released layout (``bin_score``, ``kenc.encoder.N``,
``gnn.layers.N.attn.{proj.0,proj.1,proj.2,merge}``, ``gnn.layers.N.mlp.{0,1,3}``,
``final_proj``) so the official ``superglue_indoor.pth`` / ``superglue_outdoor.pth``
load unchanged. The computation is the released maths, reorganised for speed:

- tokens are rows ``(B, N, C)`` so every 1x1 convolution is one GEMM (``F.linear``),
  and at inference each BatchNorm is folded into the convolution before it;
- the two images share the projections and MLPs, so they go through them in one GEMM;
- q, k and v come from one fused GEMM, attention from ``scaled_dot_product_attention``;
- the score matrix and Sinkhorn always run in fp32, whatever the autocast precision.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .runtime import autocast, select_device, select_precision
from .weights import WeightsError, default_weights, load_checked, read_state_dict

default_conf = {
    "descriptor_dim": 256,
    "keypoint_encoder": [32, 64, 128, 256],
    "GNN_layers": ["self", "cross"] * 9,
    "num_heads": 4,
    "sinkhorn_iterations": 100,
    "match_threshold": 0.2,
    "weights": None,
}


# ---------------------------------------------------------------- building blocks

def MLP(channels: list[int]) -> nn.Sequential:
    """1x1 convs with BatchNorm + ReLU between them (not after the last): the released indices 0,1,3,4,..."""
    layers: list[nn.Module] = []
    for i in range(1, len(channels)):
        layers.append(nn.Conv1d(channels[i - 1], channels[i], kernel_size=1, bias=True))
        if i < len(channels) - 1:
            layers += [nn.BatchNorm1d(channels[i]), nn.ReLU()]
    return nn.Sequential(*layers)


def fold_batchnorm(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (Cout,Cin) and bias of conv followed by eval-mode BatchNorm, as one affine map."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight[..., 0] * scale[:, None]
    bias = (conv.bias - bn.running_mean) * scale + bn.bias
    return weight, bias


def run_mlp(mlp: nn.Sequential, x: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Apply a released-layout MLP to rows ``x`` (B, N, Cin) -> (B, N, Cout).

    ``segments`` are the per-image token counts concatenated in ``x``. The released
    model calls its MLPs once per image, so in training BatchNorm takes statistics
    per segment; in eval each BatchNorm is folded into the conv before it.
    """
    layers = list(mlp)
    for i, conv in enumerate(layers):
        if not isinstance(conv, nn.Conv1d):
            continue
        bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm1d) else None
        if bn is None:  # the last conv: no norm, no ReLU
            x = F.linear(x, conv.weight[..., 0], conv.bias)
        elif not bn.training:
            x = F.relu(F.linear(x, *fold_batchnorm(conv, bn)))
        else:
            x = F.linear(x, conv.weight[..., 0], conv.bias)
            x = torch.cat([bn(p.reshape(-1, p.shape[-1])).view_as(p) for p in x.split(segments, dim=1)], dim=1)
            x = F.relu(x)
    return x


def normalize_keypoints(kpts: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(B,N,2) pixels -> centred and scaled by 0.7*max(W,H), as the released code; size (B,2) = (W,H)."""
    size = size.to(kpts)
    center = size / 2
    scaling = size.max(-1, keepdim=True).values * 0.7
    return (kpts - center[:, None]) / scaling[:, None]


class KeypointEncoder(nn.Module):
    """MLP on (x, y, score) whose output is added to the descriptor."""

    def __init__(self, feature_dim: int, layers: list[int]):
        super().__init__()
        self.encoder = MLP([3] + list(layers) + [feature_dim])
        nn.init.constant_(self.encoder[-1].bias, 0.0)

    def forward(self, kpts: torch.Tensor, scores: torch.Tensor, segments: list[int]) -> torch.Tensor:
        return run_mlp(self.encoder, torch.cat([kpts, scores[..., None]], dim=-1), segments)


class MultiHeadedAttention(nn.Module):
    """Released parameter layout: ``proj`` = q, k, v 1x1 convs, then ``merge``."""

    def __init__(self, num_heads: int, d_model: int):
        super().__init__()
        assert d_model % num_heads == 0
        self.num_heads = num_heads
        self.dim = d_model // num_heads
        self.merge = nn.Conv1d(d_model, d_model, kernel_size=1)
        # The released init: q, k, v start as copies of merge.
        self.proj = nn.ModuleList([copy.deepcopy(self.merge) for _ in range(3)])

    def head_major(self) -> torch.Tensor:
        """Channel permutation to head-major order.

        The released code splits channels with ``view(b, dim, heads, n)``, so head h
        owns channels h, h+heads, h+2*heads, ...; permuting the projection rows (and
        the merge columns) once makes each head a contiguous block of ``dim`` channels.
        """
        return torch.arange(self.dim * self.num_heads, device=self.merge.weight.device) \
            .view(self.dim, self.num_heads).t().reshape(-1)

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        perm = self.head_major()
        weight = torch.cat([p.weight[perm, :, 0] for p in self.proj])
        bias = torch.cat([p.bias[perm] for p in self.proj])
        return weight, bias

    def merge_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.merge.weight[:, self.head_major(), 0], self.merge.bias


class AttentionalPropagation(nn.Module):
    def __init__(self, feature_dim: int, num_heads: int):
        super().__init__()
        self.attn = MultiHeadedAttention(num_heads, feature_dim)
        self.mlp = MLP([feature_dim * 2, feature_dim * 2, feature_dim])
        nn.init.constant_(self.mlp[-1].bias, 0.0)

    def forward(self, x: torch.Tensor, segments: list[int], cross: bool) -> torch.Tensor:
        """Update rows ``x`` (B, N0+N1, C) of both images; returns the residual delta."""
        b, _, c = x.shape
        heads, dim = self.attn.num_heads, self.attn.dim
        qkv = F.linear(x, *self.attn.qkv_weights())
        n0, n1 = segments
        if n0 == n1:
            # Both images in one kernel call: image index joins the batch, (3, 2B, heads, n, dim).
            q, k, v = qkv.view(b, 2, n0, 3, heads, dim).permute(3, 1, 0, 4, 2, 5) \
                .reshape(3, 2 * b, heads, n0, dim).unbind(0)
            if cross:  # image 0 attends to image 1 and vice versa
                k, v = k.roll(b, dims=0), v.roll(b, dims=0)
            message = F.scaled_dot_product_attention(q, k, v)        # (2B, heads, n, dim)
            message = message.view(2, b, heads, n0, dim).permute(1, 0, 3, 2, 4)  # (B, 2, n, heads, dim)
        else:
            q, k, v = qkv.view(b, -1, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
            q0, q1 = q.split(segments, dim=2)
            k0, k1 = k.split(segments, dim=2)
            v0, v1 = v.split(segments, dim=2)
            if cross:
                (k0, v0), (k1, v1) = (k1, v1), (k0, v0)
            message = torch.cat([F.scaled_dot_product_attention(q0, k0, v0),
                                 F.scaled_dot_product_attention(q1, k1, v1)], dim=2).transpose(1, 2)
        message = message.reshape(b, -1, c)  # head-major channels
        message = F.linear(message, *self.attn.merge_weights())
        return run_mlp(self.mlp, torch.cat([x, message], dim=-1), segments)


class AttentionalGNN(nn.Module):
    def __init__(self, feature_dim: int, layer_names: list[str], num_heads: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([AttentionalPropagation(feature_dim, num_heads) for _ in layer_names])
        self.names = list(layer_names)

    def forward(self, x: torch.Tensor, segments: list[int]) -> torch.Tensor:
        for layer, name in zip(self.layers, self.names):
            # Keep the residual stream in the input dtype (fp32) under autocast.
            x = x + layer(x, segments, cross=name == "cross").to(x.dtype)
        return x


# ---------------------------------------------------------------- optimal transport

def log_sinkhorn_iterations(Z: torch.Tensor, log_mu: torch.Tensor, log_nu: torch.Tensor,
                            iters: int) -> torch.Tensor:
    """Reference Sinkhorn in log space with logsumexp, as released (slow: two full exps per step)."""
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(Z + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(Z + u.unsqueeze(2), dim=1)
    return Z + u.unsqueeze(2) + v.unsqueeze(1)


def log_sinkhorn_stabilized(Z: torch.Tensor, log_mu: torch.Tensor, log_nu: torch.Tensor,
                            iters: int) -> torch.Tensor | None:
    """The same log-space iterates as ``log_sinkhorn_iterations``, with the exponentials taken once.

    ``logsumexp_j(Z_ij + v_j) = a_i + max(v) + log(sum_j K_ij exp(v_j - max(v)))`` with
    ``K = exp(Z - a)`` and ``a`` the row maxima, so each step is two mat-vecs instead of
    two exps over the whole matrix (~100x less work). Every row of K has a 1 and the
    dustbin row is all ones, so sums only underflow for score spreads beyond ~87;
    then this returns None and the caller falls back to the reference.
    """
    a = Z.amax(dim=2)                              # (B, M+1)
    K = torch.exp(Z - a.unsqueeze(2))              # (B, M+1, N+1), entries in (0, 1]
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        bv = v.amax(dim=1, keepdim=True)
        row = torch.bmm(K, torch.exp(v - bv).unsqueeze(2)).squeeze(2)
        u = log_mu - (a + bv + torch.log(row))
        w = a + u
        bw = w.amax(dim=1, keepdim=True)
        col = torch.bmm(torch.exp(w - bw).unsqueeze(1), K).squeeze(1)
        v = log_nu - (bw + torch.log(col))
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        return None
    return Z + u.unsqueeze(2) + v.unsqueeze(1)


def log_optimal_transport(scores: torch.Tensor, alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """(B,M,N) scores and the dustbin score ``alpha`` -> (B,M+1,N+1) log assignment, in fp32 (or fp64).

    Marginals as released: 1 per keypoint, N (resp. M) for the dustbin of image 0
    (resp. 1), all divided by M+N; the result is multiplied back by M+N, so exp of
    a real row sums to 1 and exp of the dustbin row sums to N.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    b, m, n = scores.shape
    alpha = alpha.to(scores.dtype)
    couplings = torch.cat([torch.cat([scores, alpha.expand(b, m, 1)], -1),
                           torch.cat([alpha.expand(b, 1, n), alpha.expand(b, 1, 1)], -1)], 1)
    norm = -math.log(m + n)
    log_mu = torch.full((m + 1,), norm, dtype=scores.dtype, device=scores.device)
    log_nu = torch.full((n + 1,), norm, dtype=scores.dtype, device=scores.device)
    log_mu[-1] = math.log(n) + norm
    log_nu[-1] = math.log(m) + norm
    log_mu, log_nu = log_mu.expand(b, -1), log_nu.expand(b, -1)
    Z = log_sinkhorn_stabilized(couplings, log_mu, log_nu, iters)
    if Z is None:
        Z = log_sinkhorn_iterations(couplings, log_mu, log_nu, iters)
    return Z - norm


def filter_matches(log_assignment: torch.Tensor, threshold: float):
    """Mutual argmax over the real rows/columns, kept when the assignment exceeds ``threshold``.

    Returns matches0 (B,M) and matches1 (B,N) with -1 for unmatched, and their
    scores (exp of the row maximum; 0 where not mutual), as the released code.
    """
    scores = log_assignment[:, :-1, :-1]
    max0, max1 = scores.max(2), scores.max(1)
    indices0, indices1 = max0.indices, max1.indices
    mutual0 = torch.arange(indices0.shape[1], device=scores.device)[None] == indices1.gather(1, indices0)
    mutual1 = torch.arange(indices1.shape[1], device=scores.device)[None] == indices0.gather(1, indices1)
    zero = scores.new_tensor(0)
    mscores0 = torch.where(mutual0, max0.values.exp(), zero)
    mscores1 = torch.where(mutual1, mscores0.gather(1, indices1), zero)
    valid0 = mutual0 & (mscores0 > threshold)
    valid1 = mutual1 & valid0.gather(1, indices1)
    matches0 = torch.where(valid0, indices0, indices0.new_tensor(-1))
    matches1 = torch.where(valid1, indices1, indices1.new_tensor(-1))
    return matches0, matches1, mscores0, mscores1


# ---------------------------------------------------------------- the model

def _as_tensor(x, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def conf_from_state_dict(state: dict, path="weights") -> dict:
    """Descriptor width, encoder widths and GNN depth of a state dict in the official layout."""
    if "bin_score" not in state:   # the first key of the official layout
        raise WeightsError(f"{path}: missing key 'bin_score' (is this a SuperGlue file?)")
    try:
        layers = {int(k.split(".")[2]) for k in state if k.startswith("gnn.layers.")}
        encoder = sorted(int(k.split(".")[2]) for k in state
                         if k.startswith("kenc.encoder.") and k.endswith(".weight") and state[k].dim() == 3)
        widths = [int(state[f"kenc.encoder.{i}.weight"].shape[0]) for i in encoder]
        return {"descriptor_dim": int(state["final_proj.weight"].shape[0]), "keypoint_encoder": widths[:-1],
                "GNN_layers": ["self", "cross"] * (len(layers) // 2)}
    except (KeyError, IndexError, ValueError) as e:
        raise WeightsError(f"{path}: missing key '{e.args[0] if e.args else 'final_proj.weight'}' "
                           "(is this a SuperGlue file?)") from None


def conf_beside(path) -> dict:
    """The model configuration ``vo.train superglue`` writes beside its weights (``NAME.json``), or {}.

    It holds what the official layout cannot: the head count of a configuration with other than 4.
    """
    beside = Path(path).with_suffix(".json")
    if not beside.is_file():
        return {}
    try:
        conf = json.loads(beside.read_text())
    except ValueError as e:
        raise WeightsError(f"{beside}: not a JSON model configuration ({e})") from None
    unknown = set(conf) - set(default_conf) if isinstance(conf, dict) else {"(not an object)"}
    if unknown:
        raise WeightsError(f"{beside}: unknown SuperGlue option(s) {sorted(unknown)}")
    return conf


class SuperGlue(nn.Module):
    """SuperGlue matcher.

    ``weights``: None = the project's shipped default (``weights/superglue_*.pth``),
    "indoor" / "outdoor" = that shipped file, a path to a state dict in the official
    layout, or False / "random" for a randomly initialised model (training).
    ``precision``: "fp32", "bf16" (CPU with bf16 units) or "fp16" (CUDA); default
    fastest faithful. The GNN runs in that precision; scores and Sinkhorn in fp32.
    """

    def __init__(self, weights=None, sinkhorn_iterations: int = 100, match_threshold: float = 0.2,
                 device=None, precision: str | None = None, **conf):
        super().__init__()
        unknown = set(conf) - set(default_conf)
        if unknown:
            raise TypeError(f"unknown SuperGlue option(s): {sorted(unknown)}")
        if weights is None:
            weights = default_weights("superglue_*.pth")
        elif weights in ("indoor", "outdoor"):
            weights = default_weights(f"superglue_{weights}.pth")
        state = None if weights is False or weights == "random" else read_state_dict(weights)
        # a file's own widths and depth (e.g. our smaller configuration) unless the caller says otherwise
        file_conf = {**conf_from_state_dict(state, weights), **conf_beside(weights)} if state is not None else {}
        self.conf = {**default_conf, **file_conf, **conf, "weights": weights,
                     "sinkhorn_iterations": sinkhorn_iterations, "match_threshold": match_threshold}
        dim = self.conf["descriptor_dim"]
        self.kenc = KeypointEncoder(dim, self.conf["keypoint_encoder"])
        self.gnn = AttentionalGNN(dim, self.conf["GNN_layers"], self.conf["num_heads"])
        self.final_proj = nn.Conv1d(dim, dim, kernel_size=1, bias=True)
        self.register_parameter("bin_score", nn.Parameter(torch.tensor(1.0)))

        if state is not None:
            load_checked(self, weights, state)
        self.weights = weights
        self.device = select_device(device)
        if precision == "int8":
            raise ValueError("precision 'int8' is for SuperPoint only; SuperGlue runs fp32, bf16 or fp16")
        self.precision = select_precision(self.device, precision)
        self.to(self.device).eval()

    def forward(self, data: dict) -> torch.Tensor:
        """Batched pairs -> (B, M+1, N+1) fp32 log assignment (the last row/column are dustbins).

        ``data``: keypoints0 (B,M,2) x,y px, scores0 (B,M), descriptors0 (B,M,D),
        image_size0 (B,2) or (2,) as (W,H), and the same for image 1. Differentiable;
        the caller picks the grad mode and autocast.
        """
        kpts0, kpts1 = data["keypoints0"], data["keypoints1"]
        desc0, desc1 = data["descriptors0"], data["descriptors1"]
        b, m, n = kpts0.shape[0], kpts0.shape[1], kpts1.shape[1]
        dim = self.conf["descriptor_dim"]
        for name, desc in (("descriptors0", desc0), ("descriptors1", desc1)):
            if desc.shape[-1] != dim:
                raise ValueError(f"SuperGlue expects {dim}-d descriptors, got {name} {tuple(desc.shape)}")
        if m == 0 or n == 0:
            return kpts0.new_zeros(b, m + 1, n + 1).float()
        segments = [m, n]
        size0 = data["image_size0"].to(kpts0).expand(b, 2)
        size1 = data["image_size1"].to(kpts1).expand(b, 2)
        kpts = torch.cat([normalize_keypoints(kpts0, size0), normalize_keypoints(kpts1, size1)], 1)
        scores = torch.cat([data["scores0"], data["scores1"]], 1).to(kpts)
        dtype = self.final_proj.weight.dtype  # fp32 normally; float64 in numerical tests
        x = torch.cat([desc0, desc1], 1).to(dtype)
        # The encoder is tiny; in bf16 the normalised positions would be quantised to ~3 px.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x + self.kenc(kpts.to(dtype), scores.to(dtype), segments)
        x = self.gnn(x, segments)
        # Scores and transport in fp32: bf16/fp16 rounding of S_ij flips near-tied argmaxes.
        with torch.autocast(device_type=x.device.type, enabled=False):
            mdesc = F.linear(x.to(dtype), self.final_proj.weight[..., 0], self.final_proj.bias)
            mdesc0, mdesc1 = mdesc.split(segments, dim=1)
            sim = torch.bmm(mdesc0, mdesc1.transpose(1, 2)) / dim ** 0.5
            return log_optimal_transport(sim, self.bin_score, self.conf["sinkhorn_iterations"])

    @torch.inference_mode()
    def match(self, feats0: dict, feats1: dict) -> dict:
        """Two feature dicts (numpy or torch) -> {"matches" (K,2) int64, "scores" (K,) float32}, on the host."""
        if self.training:
            raise RuntimeError("SuperGlue.match needs eval mode (BatchNorm statistics); call .eval() first")
        data = {}
        for i, feats in enumerate((feats0, feats1)):
            if "image_size" not in feats:
                raise KeyError("SuperGlue needs 'image_size' (W,H) in each feature dict to normalise keypoints")
            kpts = _as_tensor(feats["keypoints"], self.device).reshape(-1, 2)
            data[f"keypoints{i}"] = kpts[None]
            data[f"scores{i}"] = _as_tensor(feats["scores"], self.device).reshape(1, -1)
            desc = _as_tensor(feats["descriptors"], self.device)
            data[f"descriptors{i}"] = desc.reshape(1, -1, desc.shape[-1])
            data[f"image_size{i}"] = _as_tensor(feats["image_size"], self.device).reshape(1, 2)
        if data["keypoints0"].shape[1] == 0 or data["keypoints1"].shape[1] == 0:
            return {"matches": np.zeros((0, 2), np.int64), "scores": np.zeros((0,), np.float32)}
        with autocast(self.device, self.precision):
            log_assignment = self(data)
        matches0, _, mscores0, _ = filter_matches(log_assignment, self.conf["match_threshold"])
        idx0 = torch.nonzero(matches0[0] > -1).squeeze(1)
        matches = torch.stack([idx0, matches0[0, idx0]], 1)
        return {"matches": matches.cpu().numpy().astype(np.int64),
                "scores": mscores0[0, idx0].float().cpu().numpy()}


__all__ = ["SuperGlue", "default_conf", "log_optimal_transport", "log_sinkhorn_iterations",
           "filter_matches", "normalize_keypoints", "WeightsError"]

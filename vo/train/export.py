"""Shippable weights from a run's checkpoint: ``python -m vo.train export RUN/last.pth --out FILE.pth``.

A stage exports its weights every few hundred steps and at the end, overwriting them; this
exports the state a checkpoint holds (e.g. one kept in ``weights/checkpoints/``) without
rebuilding the stage's data. The kind of network is read from the checkpoint's keys:
SuperPoint / MagicPoint (``conv1a.weight``) or SuperGlue (``bin_score``); BatchNorm is
folded as the stages fold it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from models.superpoint import SuperPointNet, channels_from_state_dict


def load_model_state(path: str | Path) -> tuple[dict, int]:
    """The model state dict and the step of a training checkpoint (``last.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a training checkpoint (no 'model' entry)")
    return state["model"], int(state.get("step", 0))


def superglue_layers(state: dict) -> int:
    """Number of (self, cross) layer pairs of a SuperGlue state dict."""
    ids = {int(m.group(1)) for k in state if (m := re.match(r"gnn\.layers\.(\d+)\.", k))}
    return (max(ids) + 1) // 2


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> tuple[Path, str, int]:
    """Write the checkpoint's network as plain weights; returns (path, kind, step)."""
    state, step = load_model_state(checkpoint)
    out = Path(out)
    if "bin_score" in state:
        from vo.train import superglue
        conf = superglue.merge_conf({"layers": superglue_layers(state)})
        model = superglue.build_model(conf)
        model.load_state_dict(state)
        return superglue.export(model.eval(), out.parent, out.stem), "superglue", step
    if "conv1a.weight" in state:
        from vo.train.common import export_weights
        batch_norm = any(".running_mean" in k for k in state)
        net = SuperPointNet(channels=channels_from_state_dict(state), batch_norm=batch_norm)
        net.load_state_dict(state)
        return export_weights(net.eval(), out), "superpoint", step
    raise ValueError(f"{checkpoint}: neither a SuperPoint nor a SuperGlue checkpoint")

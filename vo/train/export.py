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

from models.superpoint import SuperPointNet, channels_from_state_dict
from vo.train.common import export_weights, read_checkpoint_model


def superglue_layers(state: dict) -> int:
    """Number of (self, cross) layer pairs of a SuperGlue state dict."""
    ids = {int(m.group(1)) for k in state if (m := re.match(r"gnn\.layers\.(\d+)\.", k))}
    return (max(ids) + 1) // 2


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> tuple[Path, str, int]:
    """Write the checkpoint's network as plain weights; returns (path, kind, step)."""
    state, step = read_checkpoint_model(checkpoint)
    out = Path(out)
    if "bin_score" in state:
        from vo.train import superglue
        conf = superglue.merge_conf({"layers": superglue_layers(state)})
        model = superglue.build_model(conf)
        model.load_state_dict(state)
        return superglue.export(model.eval(), out.parent, out.stem), "superglue", step
    if "conv1a.weight" in state:
        batch_norm = any(".running_mean" in k for k in state)
        net = SuperPointNet(channels=channels_from_state_dict(state), batch_norm=batch_norm)
        net.load_state_dict(state)
        return export_weights(net.eval(), out), "superpoint", step
    raise ValueError(f"{checkpoint}: neither a SuperPoint nor a SuperGlue checkpoint")

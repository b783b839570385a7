"""Channel pruning of a trained SuperPoint (seed 002, section 3.1.2), to fine-tune afterwards.

    python -m vo.train prune weights/superpoint_ours_full_v1.pth --channels 32 64 128 128 256 --out runs/prune/superpoint.pth
    python -m vo.train superpoint --init runs/prune/superpoint.pth ...

Each conv's input channels are ranked by the Frobenius norm of the weights that read them; the
least important go, and with them the matching output channels of the conv before. The result
keeps the official layout at the narrower widths, which every SuperPoint loader reads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.superpoint import build_net, channels_from_state_dict

# conv -> (index of its width in c1..c5, the convs that read its output), in network order
LAYERS = {
    "conv1a": (0, ("conv1b",)), "conv1b": (0, ("conv2a",)),
    "conv2a": (1, ("conv2b",)), "conv2b": (1, ("conv3a",)),
    "conv3a": (2, ("conv3b",)), "conv3b": (2, ("conv4a",)),
    "conv4a": (3, ("conv4b",)), "conv4b": (3, ("convPa", "convDa")),
    "convPa": (4, ("convPb",)), "convDa": (4, ("convDb",)),
}


def channel_importance(state: dict, consumers: tuple[str, ...]) -> torch.Tensor:
    """Frobenius norm of the weights reading each input channel, summed over the consumers."""
    return sum(state[f"{name}.weight"].float().pow(2).sum(dim=(0, 2, 3)) for name in consumers).sqrt()


def prune_channels(state: dict, channels: tuple[int, ...]) -> dict:
    """A copy of ``state`` (official layout) narrowed to ``channels`` = (c1, c2, c3, c4, c5)."""
    have = channels_from_state_dict(state)
    if len(channels) != 5 or any(new < 1 or new > old for new, old in zip(channels, have)):
        raise ValueError(f"channels {tuple(channels)} must be 5 widths between 1 and the network's {have}")
    # every ranking reads the unpruned weights, so the layers' choices do not depend on their order
    keep = {conv: channel_importance(state, consumers).argsort(descending=True)[:channels[width]].sort().values
            for conv, (width, consumers) in LAYERS.items()}
    pruned = {k: v.clone() for k, v in state.items()}
    for conv, kept in keep.items():      # this conv's outputs and its consumers' inputs
        pruned[f"{conv}.weight"] = pruned[f"{conv}.weight"][kept]
        pruned[f"{conv}.bias"] = pruned[f"{conv}.bias"][kept]
        for consumer in LAYERS[conv][1]:
            pruned[f"{consumer}.weight"] = pruned[f"{consumer}.weight"][:, kept]
    return pruned


def prune(weights: str | Path, channels: tuple[int, ...], out: str | Path) -> Path:
    """Prune the SuperPoint file ``weights`` to ``channels`` and save it to ``out``."""
    state = build_net(weights).state_dict()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(prune_channels(state, tuple(channels)), out)
    return out

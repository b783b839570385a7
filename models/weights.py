"""Loading weight files with strict checks and one-line errors."""
from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Magic Leap's files, which a user may drop into weights/; a default prefers the project's own.
OFFICIAL_NAMES = frozenset({"superpoint_v1.pth", "superglue_indoor.pth", "superglue_outdoor.pth"})
# SuperGlue learns one SuperPoint's descriptors: the SuperPoint file each known SuperGlue file was
# trained on (ours v1: on v2's features, then measured on v3, v2's fine-tune; v2: v1 fine-tuned on
# v4's features; v3: v2's first layer pair fine-tuned on them; weights/README.md).
SUPERGLUE_FEATURES = {"superglue_ours_v3.pth": "superpoint_ours_v4.pth",
                      "superglue_ours_v2.pth": "superpoint_ours_v4.pth",
                      "superglue_ours_v1.pth": "superpoint_ours_v3.pth",
                      "superglue_indoor.pth": "superpoint_v1.pth", "superglue_outdoor.pth": "superpoint_v1.pth"}


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable or does not fit the model."""


def default_weights(pattern: str) -> Path:
    """The newest shipped file in ``weights/`` matching ``pattern`` (e.g. 'superpoint_*.pth')."""
    found = newest_match(WEIGHTS_DIR, pattern)
    if found is None:
        raise WeightsError(
            f"no shipped weights match weights/{pattern}; pass weights=PATH "
            "(e.g. the official Magic Leap .pth) or train them with `python -m vo.train`")
    return found


def newest_match(folder: Path, pattern: str) -> Path | None:
    """The last file of ``folder`` matching ``pattern`` in natural order (v10 after v9), or None.

    The project's own files come before Magic Leap's: those are picked only when nothing else matches.
    """
    found = sorted(Path(folder).glob(pattern), key=lambda p: (p.name not in OFFICIAL_NAMES, natural_key(p)))
    return found[-1] if found else None


def superglue_features(superglue: str | Path) -> Path | None:
    """The SuperPoint file beside ``superglue`` that it was trained on, when known and present.

    ``superglue`` may also be one of SuperGlue's shortcuts, "indoor" or "outdoor" (Magic Leap's files in weights/).
    """
    if str(superglue) in ("indoor", "outdoor"):
        superglue = WEIGHTS_DIR / f"superglue_{superglue}.pth"
    name = SUPERGLUE_FEATURES.get(Path(superglue).name)
    path = Path(superglue).parent / name if name else None
    return path if path is not None and path.is_file() else None


def superglue_for(superpoint: str | Path) -> Path | None:
    """The SuperGlue file beside ``superpoint`` that was trained on its features, when known and present."""
    folder, name = Path(superpoint).parent, Path(superpoint).name
    found = [folder / glue for glue, features in SUPERGLUE_FEATURES.items()
             if features == name and (folder / glue).is_file()]
    return found[0] if found else None


def superglue_pair(superpoint: str | Path | None = None, superglue: str | Path | None = None,
                   folder: str | Path = WEIGHTS_DIR) -> tuple[Path | None, Path]:
    """The SuperPoint and SuperGlue files to run together.

    Named files stand. A named SuperPoint gets the SuperGlue beside it that learnt its features,
    and a WeightsError when none did; without one, SuperGlue is ``folder``'s newest. A SuperPoint
    not named is the one that SuperGlue learnt, else ``folder``'s newest (None when it has none).
    """
    if superglue is None:
        superglue = superglue_for(superpoint) if superpoint else newest_match(Path(folder), "superglue_*.pth")
        if superglue is None:
            raise WeightsError(f"{superpoint}: no SuperGlue file beside it learnt these features "
                               "(models.weights.SUPERGLUE_FEATURES)" if superpoint
                               else f"{folder}: no superglue_*.pth weights found")
    if superpoint is None:
        superpoint = superglue_features(superglue) or newest_match(Path(folder), "superpoint_*.pth")
    return (Path(superpoint) if superpoint else None), Path(superglue)


def natural_key(path: Path) -> list:
    """Sort key that orders the digit runs of a name by value: ..._v2.pth before ..._v10.pth."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def default_weights_or_none(pattern: str) -> str | None:
    """``default_weights(pattern)`` as a string, or None when nothing ships (optional rows of evaluators)."""
    try:
        return str(default_weights(pattern))
    except WeightsError:
        return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (or a training checkpoint holding one) safely."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, struct.error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: not a readable torch weight file ({first})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # our training checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return obj


def load_checked(model: torch.nn.Module, path: str | Path, state: dict | None = None) -> None:
    """Load ``path`` (or its already-read ``state``) into ``model`` with strict key and shape checks."""
    state = read_state_dict(path) if state is None else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise WeightsError(f"{path}: missing key '{key}' (is this the right model's file?)")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise WeightsError(
                f"{path}: key '{key}' has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise WeightsError(f"{path}: unexpected key '{extra[0]}' (is this the right model's file?)")
    model.load_state_dict(state, strict=True)

"""The self-label files: one ``.npz`` per sequence and a ``manifest.json`` per folder.

``DIR/<sequence>.npz`` (``np.load`` it, no pickles; ``load_labels`` checks it) holds the
frames with at least one label, in order, and their labelled keypoints grouped by frame:

=================  ===========  ==========================================================
array              shape/dtype  meaning
=================  ===========  ==========================================================
frame_paths        (F,) str     file of the left / colour image, as the source gives it
                                (a video file: the same path for all frames)
frame_indices      (F,) int64   the source's frame index (the frame number in a video)
offsets            (F+1,) int64 keypoints of frame f are rows offsets[f]:offsets[f+1]
keypoints          (K,2) f32    x, y in pixels of the image as the source yields it
labels             (K,) int8    1 = stable, 0 = unstable (ignored points are not stored)
errors             (K,) f32     the point's mean reprojection error after the final BA, px
image_size         (2,) int64   W, H
obs_errors         (K,) f32     this observation's reprojection error, px
track_ids          (K,) int32   the map point: equal ids are one 3D point seen in
                                several frames (0..P-1 within the file)
source             () str       the SOURCE given on the command line
mode               () str       mono | stereo | rgbd
images_from_paths  () bool      True when ``cv2.imread(frame_paths[f])`` is exactly the
                                image labelled; False when the source undistorts /
                                rectifies on reading or is a video: then read the frames
                                with ``vo.datasets.open_source(source).frames(mode)``
=================  ===========  ==========================================================

A point is stable when its mean error is <= stable_px (1 px), unstable when its max
error is >= unstable_px (5 px), over its observations in >= min_track (10) frames.
Every observation of a point carries that point's label.

``DIR/manifest.json``::

    {"version": 1,
     "config": {...SelfLabelConfig...},
     "sequences": [{"name", "source", "mode", "features", "frames" (processed),
                    "labelled_frames" (F), "points" (tracked in >= min_track frames),
                    "stable", "unstable" (points), "keypoints" (K), "file", "picture"
                    (relative to DIR), "seconds", "fps" (whole labelling, VO included),
                    "vo_fps"}, ...]}     # sorted by name

A sequence is labelled once its file exists and the manifest lists it: reruns skip it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("frame_paths", "frame_indices", "offsets", "keypoints", "labels", "errors", "image_size")


def save_labels(path: str | Path, arrays: dict) -> Path:
    """Write the arrays atomically (a crash leaves no half file)."""
    path = Path(path)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"label arrays miss {missing}")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
    return path


def load_labels(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of a label file, checked for consistency; 0-d arrays become scalars."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    for k, v in out.items():
        if v.ndim == 0:
            out[k] = v.item()
    missing = [k for k in REQUIRED if k not in out]
    offsets = out.get("offsets")
    if missing or offsets[0] != 0 or offsets[-1] != len(out["keypoints"]) or np.any(np.diff(offsets) < 0) \
            or len(offsets) != len(out["frame_paths"]) + 1 or len(out["labels"]) != len(out["keypoints"]):
        raise ValueError(f"{path}: not a consistent self-label file" + (f" (missing {missing})" if missing else ""))
    return out


def frame_labels(data: dict, f: int) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (n,2), labels (n,)) of the f-th frame of a loaded label file."""
    rows = slice(data["offsets"][f], data["offsets"][f + 1])
    return data["keypoints"][rows], data["labels"][rows]


def load_manifest(folder: str | Path) -> dict:
    """The folder's manifest, or an empty one when there is none yet."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"version": VERSION, "config": {}, "sequences": []}
    manifest = json.loads(path.read_text())
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')}, expected {VERSION}")
    return manifest


def save_manifest(folder: str | Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def add_entry(manifest: dict, entry: dict) -> dict:
    """The manifest with ``entry`` replacing any of the same name, sorted by name."""
    others = [e for e in manifest["sequences"] if e["name"] != entry["name"]]
    return {**manifest, "sequences": sorted(others + [entry], key=lambda e: e["name"])}


def is_labelled(folder: str | Path, manifest: dict, name: str) -> bool:
    entry = next((e for e in manifest["sequences"] if e["name"] == name), None)
    return entry is not None and (Path(folder) / entry["file"]).is_file()

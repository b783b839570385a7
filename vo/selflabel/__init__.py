"""Self-labelling: stable and unstable keypoints from the VO's own tracks (issue #7).

    python -m vo.selflabel SOURCE... --out DIR [--workers N] [--ray-address ADDR]

- ``label``: tracks from a run and their grading after a final bundle adjustment;
- ``labels``: the files (format in its docstring), ``load_labels`` / ``load_manifest``;
- ``sequence``: one sequence end to end; ``parallel``: serial, process or Ray dispatch;
- ``pictures``: the per-sequence picture.
"""
from .label import SelfLabelConfig, TrackCollector, TrackLabels, Tracks, label_tracks
from .labels import frame_labels, load_labels, load_manifest, save_labels

__all__ = ["SelfLabelConfig", "TrackCollector", "TrackLabels", "Tracks", "label_tracks",
           "frame_labels", "load_labels", "load_manifest", "save_labels"]

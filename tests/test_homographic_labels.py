"""Homographic stability labels (vo.selflabel.homographic): distances, the labelling rule, the files."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vo.selflabel import homographic
from vo.selflabel.labels import load_labels
from vo.train import superpointvo

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sequences" / "rgbd_dataset_freiburg3_teddy_sample"


def test_redetection_distance_is_the_offset_of_the_nearest_detection_and_nan_outside():
    points = np.array([[10.0, 10.0], [50.0, 40.0], [95.0, 40.0]])
    shift = np.array([[1, 0, 3.0], [0, 1, 0], [0, 0, 1]])       # +3 px in x: the last point leaves the view
    detections = points + [3.0 + 0.5, 0.0]                        # re-detected 0.5 px right of the truth
    d = homographic.redetection_distances(points, [detections, np.zeros((0, 2))], [shift, np.eye(3)], (60, 100))
    np.testing.assert_allclose(d[:2, 0], 0.5)
    assert np.isnan(d[2, 0])                                      # 98 px is within 4 px of the edge
    assert np.isinf(d[:, 1]).all()                                # seen, but nothing detected


def test_points_are_stable_when_re_detected_close_and_unstable_when_far_or_missed():
    conf = homographic.default_conf
    n = 12
    rows = {
        "close": np.full(n, 0.4),
        "far": np.full(n, 2.5),                                           # re-detected, 2.5 px off
        "missed": np.r_[np.full(2, 0.3), np.full(n - 2, np.inf)],         # re-detected in 2 of 12
        "between": np.full(n, 1.2),                                       # neither: ignored
        "unseen": np.r_[np.full(3, 0.4), np.full(n - 3, np.nan)],         # too few copies see it
        "half": np.r_[np.full(8, 0.5), np.full(4, 6.0)],                  # 8 of 12 within 3 px
    }
    labels, median = homographic.label_points(np.stack(list(rows.values())), conf)
    assert dict(zip(rows, labels.tolist())) == {"close": 1, "far": 0, "missed": 0, "between": -1, "unseen": -1,
                                                "half": 1}
    np.testing.assert_allclose(median[[0, 1, 3, 5]], [0.4, 2.5, 1.2, 0.5])


def test_labelling_real_frames_writes_a_folder_the_fine_tune_reads(tmp_path):
    frames = sorted((SAMPLE / "rgb").glob("*.png"))[:2]
    names = tmp_path / "ha.npz"
    np.savez(names, names=np.array([f"rgb/{p.name}" for p in frames]))
    out = tmp_path / "labels"
    assert homographic.main(["--images", str(names), "--out", str(out), "--data", str(SAMPLE),
                             "--set", "warps=8", "min_views=4"]) == 0
    data = load_labels(out / "homographic.npz")
    labels, median = data["labels"], data["errors"]
    assert (labels == 1).sum() >= 40 and (labels == 0).sum() >= 20    # v4 on two teddy frames
    assert median[labels == 1].max() <= 0.8 and np.median(median[labels == 0]) >= 1.6
    height, width = cv2.imread(str(frames[0])).shape[:2]
    assert (data["keypoints"] >= 0).all() and (data["keypoints"] < [width, height]).all()   # original pixels
    loaded = superpointvo.SelfLabelledFrames(out, (240, 320))
    assert len(loaded) == 2 and loaded.images[0].shape == (240, 320)                 # 640x480 halved
    np.testing.assert_allclose(loaded.keypoints[0][:5], (data["keypoints"][:5] + 0.5) / 2 - 0.5, atol=1e-4)


def test_a_labels_file_without_image_names_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, keypoints=np.zeros((0, 2)))
    assert homographic.main(["--images", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.npz" in err and "names" in err and "\n" not in err

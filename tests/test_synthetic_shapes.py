"""Synthetic Shapes: labels sit on rendered corners, negatives have none, the cache round-trips."""
import cv2
import numpy as np
import pytest

from vo.datasets.synthetic_shapes import (FAMILIES, SyntheticShapesCache, build_cache, default_conf,
                                          keypoint_map, render_shape)

CLEAN = {"photometric": {"enable": False}}
# Corners of filled regions: cornerSubPix converges onto them.
CORNER_FAMILIES = ["polygon", "checkerboard", "stripes", "cube"]
# Line ends (and star centres in "multiple"): the Shi-Tomasi peak is nearby.
LINE_FAMILIES = ["lines", "multiple"]


def subpixel_corners(image, keypoints):
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.01)
    start = keypoints.reshape(-1, 1, 2).astype(np.float32)
    return cv2.cornerSubPix(image, start.copy(), (3, 3), (-1, -1), criteria).reshape(-1, 2)


def peak_distance(response, x, y, radius=3):
    """Distance from (x, y) to the strongest response within radius."""
    h, w = response.shape
    xi, yi = int(round(x)), int(round(y))
    x0, y0 = max(xi - radius, 0), max(yi - radius, 0)
    window = response[y0:min(yi + radius + 1, h), x0:min(xi + radius + 1, w)]
    j, i = np.unravel_index(window.argmax(), window.shape)
    return np.hypot(x0 + i - x, y0 + j - y)


@pytest.mark.parametrize("family", CORNER_FAMILIES)
def test_labels_on_region_corners(family):
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(15):
        image, keypoints = render_shape(rng, family, CLEAN)
        if len(keypoints):
            errors.append(np.linalg.norm(subpixel_corners(image, keypoints) - keypoints, axis=1))
    errors = np.concatenate(errors)
    assert len(errors) > 20
    assert np.median(errors) < 0.6 and np.percentile(errors, 90) < 1.5 and errors.max() < 4


@pytest.mark.parametrize("family", LINE_FAMILIES)
def test_labels_on_line_ends(family):
    rng = np.random.default_rng(1)
    distances = []
    for _ in range(15):
        image, keypoints = render_shape(rng, family, CLEAN)
        response = cv2.cornerMinEigenVal(image.astype(np.float32), 3, 3)
        distances += [peak_distance(response, x, y) for x, y in keypoints]
    assert len(distances) > 20
    assert np.median(distances) < 1.0 and np.percentile(distances, 90) < 2.5


def test_star_labels():
    """Ray ends are sharp corners; the centre is a junction whose Shi-Tomasi peak
    sits in a notch between thick rays, up to a few px away: hence the looser tail."""
    rng = np.random.default_rng(1)
    distances = []
    for _ in range(15):
        image, keypoints = render_shape(rng, "star", CLEAN)
        response = cv2.cornerMinEigenVal(image.astype(np.float32), 3, 3)
        distances += [peak_distance(response, x, y) for x, y in keypoints]
    assert len(distances) > 20
    assert np.median(distances) < 1.0 and np.percentile(distances, 75) < 2.0


@pytest.mark.parametrize("family", ["ellipses", "gaussian_noise"])
def test_negatives_have_no_keypoints(family):
    rng = np.random.default_rng(2)
    for _ in range(10):
        image, keypoints = render_shape(rng, family)
        assert keypoints.shape == (0, 2) and image.std() > 1


def test_every_family_renders_in_bounds():
    rng = np.random.default_rng(3)
    h, w = default_conf["image_size"]
    for family in FAMILIES:
        for _ in range(5):
            image, keypoints = render_shape(rng, family)
            assert image.shape == (h, w) and image.dtype == np.uint8
            assert keypoints.dtype == np.float32 and keypoints.shape[1] == 2
            assert np.all(keypoints >= 0) and np.all(keypoints <= [w - 1, h - 1])


def test_occluded_corners_are_dropped():
    """A later shape covering an earlier corner removes that label."""
    from vo.datasets.synthetic_shapes import _draw_in_order, _fill_polygon, new_canvas

    canvas = new_canvas((60, 80))
    square = lambda x0, y0, s: np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s]], float)  # noqa: E731
    draws = [lambda cv: (_fill_polygon(cv, square(10, 10, 30), 200), square(10, 10, 30))[1],
             lambda cv: (_fill_polygon(cv, square(30, 30, 20), 50), square(30, 30, 20))[1]]
    keypoints = _draw_in_order(canvas, draws)
    assert [40, 40] not in keypoints.tolist() and [30, 30] in keypoints.tolist()
    assert len(keypoints) == 3 + 4


def test_render_is_deterministic():
    a = render_shape(np.random.default_rng(7))
    b = render_shape(np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_keypoint_map():
    label = keypoint_map(np.array([[0.2, 0.4], [159.4, 119.4], [10.6, 3.5], [-3, 4], [170, 5]]), (120, 160))
    assert label.dtype == np.uint8 and label.sum() == 3
    assert label[0, 0] and label[119, 159] and label[4, 11]


def test_cache_round_trip(tmp_path):
    path = build_cache(tmp_path / "shapes.npz", n=12, seed=5, workers=1)
    cache = SyntheticShapesCache(path)
    assert len(cache) == 12
    for index in (0, 7, -1):
        image, keypoints = cache[index]
        rng = np.random.default_rng([5, index % 12])
        # The same per-index seed renders the same sample (family drawn first).
        names = list(default_conf["families"])
        weights = np.array(list(default_conf["families"].values()))
        family = names[rng.choice(len(names), p=weights / weights.sum())]
        expected_image, expected_keypoints = render_shape(rng, family)
        assert np.array_equal(image, expected_image)
        np.testing.assert_array_equal(keypoints, expected_keypoints)
    with pytest.raises(IndexError):
        cache[12]

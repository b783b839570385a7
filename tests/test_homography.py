"""Random homographies stay inside the source, and points warp like images."""
import cv2
import numpy as np
import pytest

from vo.geometry.homography import (filter_inside, inside_mask, pair_conf, sample_homography,
                                    valid_mask, warp_image, warp_points)

HW = (120, 160)


def image_corners(hw):
    h, w = hw
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)


@pytest.mark.parametrize("conf", [{}, pair_conf, {"patch_ratio": 1.0}], ids=["default", "pair", "full"])
def test_samples_stay_inside_source(conf):
    rng = np.random.default_rng(0)
    for _ in range(300):
        H = sample_homography(HW, rng, **conf)
        source = warp_points(np.linalg.inv(H), image_corners(HW))
        assert np.all(source >= -1e-6) and np.all(source <= np.array(HW[::-1]) - 1 + 1e-6)
        assert valid_mask(H, HW).all()


def test_samples_vary():
    rng = np.random.default_rng(1)
    Hs = np.stack([sample_homography(HW, rng) for _ in range(50)])
    assert np.std(Hs[:, 0, 2]) > 1 and np.std(Hs[:, 2, 0]) > 1e-5  # translation, perspective
    angles = np.degrees(np.arctan2(Hs[:, 1, 0], Hs[:, 0, 0]))
    assert np.ptp(angles) > 5


def test_artifacts_allowed_leave_the_source():
    rng = np.random.default_rng(2)
    outside = [not valid_mask(sample_homography(HW, rng, allow_artifacts=True), HW).all() for _ in range(50)]
    assert np.mean(outside) > 0.3


def test_unknown_option_rejected():
    with pytest.raises(TypeError):
        sample_homography(HW, np.random.default_rng(0), max_angel=1.0)


def test_points_warp_like_the_image():
    rng = np.random.default_rng(3)
    for _ in range(20):
        H = sample_homography(HW, rng, out_hw=(96, 128))
        # A dot well inside both images: pick it in the warped one, map it back.
        point = warp_points(np.linalg.inv(H), rng.uniform([10, 10], [117, 85], (1, 2)))[0]
        dot = np.zeros(HW, np.float32)
        cv2.circle(dot, tuple(int(v) for v in np.round(point * 16)), 3 * 16, 1.0, -1, cv2.LINE_AA, shift=4)
        warped = warp_image(dot, H, (96, 128))
        ys, xs = np.mgrid[0:96, 0:128]
        centroid = np.array([(warped * xs).sum(), (warped * ys).sum()]) / warped.sum()
        expected = warp_points(H, point[None])[0]
        assert np.linalg.norm(centroid - expected) < 1.0


def test_inverse_consistency():
    rng = np.random.default_rng(4)
    H = sample_homography(HW, rng)
    pts = rng.uniform([0, 0], [159, 119], (100, 2))
    np.testing.assert_allclose(warp_points(np.linalg.inv(H), warp_points(H, pts)), pts, atol=1e-8)
    image = rng.integers(0, 255, HW).astype(np.uint8)
    back = warp_image(warp_image(image, H), np.linalg.inv(H))
    inner = valid_mask(np.linalg.inv(H), HW, border=3) & valid_mask(H, HW, border=3)
    # Two bilinear resamplings blur but do not move: compare a blurred version.
    blur = lambda x: cv2.GaussianBlur(x.astype(np.float32), (0, 0), 2)  # noqa: E731
    assert np.abs(blur(back) - blur(image))[inner].mean() < 12


def test_valid_mask_and_filter_inside():
    H = np.array([[1, 0, 40], [0, 1, 0], [0, 0, 1]], np.float64)  # shift right by 40 px
    mask = valid_mask(H, HW)
    assert not mask[:, :40].any() and mask[:, 40:].all()
    eroded = valid_mask(H, HW, border=2)
    assert not eroded[:, :42].any() and eroded[:, 43:].all()
    pts = np.array([[0, 0], [159, 119], [-0.1, 5], [160, 5], [5, 119.5]])
    assert inside_mask(pts, HW).tolist() == [True, True, False, False, False]
    assert len(filter_inside(pts, HW, border=1)) == 0

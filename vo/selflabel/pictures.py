"""One picture per sequence: a few frames with stable keypoints green and unstable ones
red (OpenCV), above a histogram of the points' reprojection errors (matplotlib, Agg)."""
from __future__ import annotations

import io

import cv2
import numpy as np

GREEN, RED = (0, 200, 0), (0, 0, 255)   # BGR


def draw_frame(image: np.ndarray, keypoints: np.ndarray, labels: np.ndarray, title: str) -> np.ndarray:
    """A BGR copy of ``image`` with the labelled keypoints circled and a title bar."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    unit = max(min(canvas.shape[1] / 640, canvas.shape[0] / 480), 0.5)   # sizes for 640x480
    radius, thickness = round(5 * unit), max(round(2 * unit), 1)
    for (x, y), label in zip(np.round(keypoints).astype(int), labels):
        cv2.circle(canvas, (int(x), int(y)), radius, GREEN if label == 1 else RED, thickness, cv2.LINE_AA)
    scale = 0.8 * unit
    (_, height), baseline = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    canvas[:height + baseline + 12] //= 3
    cv2.putText(canvas, title, (8, height + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return canvas


def montage(tiles: list[np.ndarray], columns: int = 2) -> np.ndarray:
    """Tiles of one size in a grid, row by row; missing cells are black."""
    rows = -(-len(tiles) // columns)
    blank = np.zeros_like(tiles[0])
    cells = tiles + [blank] * (rows * columns - len(tiles))
    return np.vstack([np.hstack(cells[r * columns:(r + 1) * columns]) for r in range(rows)])


def pick_rows(counts: dict[int, int], how_many: int) -> list[int]:
    """Up to ``how_many`` of the given frame rows, spread over the sequence, busiest first
    within each stretch."""
    rows = sorted(counts)
    if not rows:
        return []
    chunks = np.array_split(np.array(rows), min(how_many, len(rows)))
    return [int(max(chunk, key=lambda r: counts[int(r)])) for chunk in chunks]


def picture_png(name: str, frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
                point_mean: np.ndarray, point_max: np.ndarray, stable_px: float, unstable_px: float) -> bytes:
    """PNG bytes: the drawn frames (image, keypoints, labels, title) over the histogram."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tiles = None
    if frames:
        drawn = [draw_frame(*frame) for frame in frames]
        height, width = drawn[0].shape[:2]
        tiles = montage(drawn, columns=1 if width > 2 * height else 2)   # KITTI-wide frames: one column
    image_height = 10 * tiles.shape[0] / tiles.shape[1] if tiles is not None else 0
    fig = Figure(figsize=(10, image_height + 3.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if frames else 1, 1, height_ratios=[image_height, 3] if frames else [1])
    if frames:
        ax = fig.add_subplot(grid[0])
        ax.imshow(cv2.cvtColor(tiles, cv2.COLOR_BGR2RGB))
        ax.set_axis_off()
        ax.set_title(f"{name}: stable (green), unstable (red)")
    histogram(fig.add_subplot(grid[-1]), point_mean, point_max, stable_px, unstable_px)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def histogram(ax, point_mean: np.ndarray, point_max: np.ndarray, stable_px: float, unstable_px: float) -> None:
    """Per-point mean and max errors; the last bin gathers everything beyond."""
    top = 3 * unstable_px
    bins = np.linspace(0, top, 61)
    graded = ~np.isnan(point_mean)
    for values, label, colour in ((point_mean[graded], "mean error per point", "tab:green"),
                                  (point_max[graded], "max error per point", "tab:red")):
        ax.hist(np.clip(np.nan_to_num(values, posinf=top), 0, top - 1e-9), bins=bins, alpha=0.5,
                label=label, color=colour)
    ax.axvline(stable_px, color="tab:green", linestyle="--", label=f"stable: mean <= {stable_px:g} px")
    ax.axvline(unstable_px, color="tab:red", linestyle="--", label=f"unstable: max >= {unstable_px:g} px")
    ax.set_xlabel(f"reprojection error after the final BA (px; last bin: >= {top:g})")
    ax.set_ylabel("points")
    if graded.any():
        ax.set_yscale("log")
    ax.legend(fontsize=8)

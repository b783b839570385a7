"""Trajectory plots as PNG files (matplotlib, Agg backend: no display needed).

``plot_trajectory`` draws a top-down view, a side view and, with ground truth, the
position error over time. Styling follows evo: the reference is a grey dashed line, the
estimate a solid blue one. The figure is built on a bare ``Figure`` with an Agg canvas,
never through ``pyplot``, so there is no global figure state and nothing needs closing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

EST_COLOUR = "#1f77b4"
GT_COLOUR = "0.35"
ERROR_COLOUR = "#d62728"
AXIS_NAMES = "xyz"


@dataclass
class ViewAxes:
    """Which coordinates each view plots."""
    top: tuple[int, int]     # (horizontal, vertical) of the top-down view
    side: tuple[int, int]    # (horizontal, vertical) of the side view
    vertical_down: bool      # the vertical axis points down (camera frames: y), so flip it


def choose_view_axes(positions: np.ndarray) -> ViewAxes:
    """The axis with the least spread is taken as vertical: trajectories spread out horizontally.

    The top view keeps the two others in ascending order, which is the view from above
    when up is +z or +x, or -y (OpenCV camera frames, where y points down).
    """
    spread = np.ptp(positions, axis=0) if len(positions) else np.ones(3)
    vertical = int(np.argmin(spread))
    a, b = (axis for axis in range(3) if axis != vertical)
    widest = a if spread[a] >= spread[b] else b
    return ViewAxes(top=(a, b), side=(widest, vertical), vertical_down=vertical == 1)


def plot_trajectory(path: str | Path, est_positions: np.ndarray, stamps: np.ndarray | None = None,
                    gt_positions: np.ndarray | None = None, ate_rmse: float | None = None,
                    title: str = "", size: tuple[int, int] = (1200, 800), dpi: int = 100) -> None:
    """Save top and side views of the trajectory (and ground truth) to a PNG of ``size`` pixels.

    ``gt_positions`` must be paired with ``est_positions`` row by row and already aligned
    by the caller; the error subplot shows their per-frame distance over ``stamps``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    est = np.asarray(est_positions, np.float64).reshape(-1, 3)
    gt = None if gt_positions is None else np.asarray(gt_positions, np.float64).reshape(-1, 3)
    if gt is not None and len(gt) != len(est):
        raise ValueError(f"ground truth has {len(gt)} positions but the estimate {len(est)}; pair them first")
    times = np.arange(len(est), dtype=np.float64) if stamps is None else np.asarray(stamps, np.float64).reshape(-1)
    if len(times) != len(est):
        raise ValueError(f"{len(times)} stamps for {len(est)} positions")
    valid = np.all(np.isfinite(est), axis=1) & (np.all(np.isfinite(gt), axis=1) if gt is not None else True)
    est, times = est[valid], times[valid]
    gt = gt[valid] if gt is not None else None
    if len(est) == 0:
        raise ValueError("no finite positions to plot")

    axes = choose_view_axes(gt if gt is not None else est)
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=(1.25, 1))
    top = figure.add_subplot(grid[:, 0])
    side = figure.add_subplot(grid[0, 1] if gt is not None else grid[:, 1])
    draw_view(top, est, gt, axes.top, flip_vertical=False, equal=True, title="top view")
    draw_view(side, est, gt, axes.side, flip_vertical=axes.vertical_down, equal=False,
              title="side view (height exaggerated)")
    if gt is not None:
        draw_error(figure.add_subplot(grid[1, 1]), times - times[0], np.linalg.norm(est - gt, axis=1),
                   time_label="time [s]" if stamps is not None else "frame")
    top.legend(loc="best", fontsize="small")
    figure.suptitle(figure_title(title, ate_rmse, len(est)), fontsize="large")
    figure.savefig(str(path), dpi=dpi)


def figure_title(title: str, ate_rmse: float | None, count: int) -> str:
    parts = [title] if title else []
    if ate_rmse is not None:
        parts.append(f"ATE RMSE {ate_rmse:.4g} m")
    parts.append(f"{count} poses")
    return "   |   ".join(parts)


def draw_view(ax, est: np.ndarray, gt: np.ndarray | None, axes: tuple[int, int], flip_vertical: bool,
              equal: bool, title: str) -> None:
    h, v = axes
    if gt is not None:
        ax.plot(gt[:, h], gt[:, v], "--", color=GT_COLOUR, linewidth=1.5, label="ground truth")
    ax.plot(est[:, h], est[:, v], "-", color=EST_COLOUR, linewidth=1.5, label="estimate")
    ax.plot(est[0, h], est[0, v], "o", color="black", markersize=6, label="start")
    ax.plot(est[-1, h], est[-1, v], "s", color=EST_COLOUR, markersize=6, label="end")
    ax.set_xlabel(f"{AXIS_NAMES[h]} [m]")
    ax.set_ylabel(f"{AXIS_NAMES[v]} [m]" + (" (down)" if flip_vertical else ""))
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    if equal:
        ax.set_aspect("equal", adjustable="datalim")
    if flip_vertical:
        ax.invert_yaxis()


def draw_error(ax, times: np.ndarray, errors: np.ndarray, time_label: str) -> None:
    rmse = float(np.sqrt(np.mean(errors ** 2)))
    ax.plot(times, errors, "-", color=ERROR_COLOUR, linewidth=1.2, label="position error")
    ax.axhline(rmse, color="black", linestyle=":", linewidth=1.0, label=f"rmse {rmse:.3g} m")
    worst = int(np.argmax(errors))
    ax.plot(times[worst], errors[worst], "v", color=ERROR_COLOUR, markersize=6, label=f"max {errors[worst]:.3g} m")
    ax.set_xlabel(time_label)
    ax.set_ylabel("error [m]")
    ax.set_ylim(bottom=0)
    ax.set_title("position error after alignment", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")

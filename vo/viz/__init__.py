"""Visualisation: live feature tracks, a live 3D map, offscreen map renders and trajectory plots.

Every module takes plain numpy arrays, so it can be fed from the pipeline's callback or from
saved results alike:

- ``tracks``: ``TrackHistory``, ``draw_tracks``, ``TracksWindow`` (cv2 window), ``VideoSink`` (mp4).
- ``map3d``: ``Map3DViewer``, an open3d window in its own process fed by a bounded queue.
- ``render``: ``render_map_png`` (open3d offscreen, headless) and ``save_map_ply``.
- ``plots``: ``plot_trajectory`` (matplotlib, Agg) with top, side and error-over-time views.

open3d and matplotlib are imported lazily inside these modules, so importing ``vo.viz`` (or
``vo.viz.tracks``) costs the tracker process nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys


class DisplayError(RuntimeError):
    """No screen to open a window on; the message is one line and says what to do."""


def display_problem() -> str | None:
    """Why no window can be opened here, or None when a display looks usable.

    Checked up front because the failure modes are bad: OpenCV's Qt backend aborts the
    whole process without a display, and open3d silently falls back to an invisible EGL
    context. Only Linux/X11 can be probed cheaply; macOS and Windows always have a screen.
    """
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("WAYLAND_DISPLAY"):
        return None
    display = os.environ.get("DISPLAY")
    if not display:
        return "no display (DISPLAY is not set); run headless or start Xvfb (xvfb-run)"
    if not _x_display_opens(display):
        return f"cannot connect to display {display!r}; run headless or start Xvfb (xvfb-run)"
    return None


def require_display() -> None:
    problem = display_problem()
    if problem is not None:
        raise DisplayError(problem)


def _x_display_opens(display: str) -> bool:
    """Try XOpenDisplay; True when libX11 is missing (then the GUI library reports it)."""
    library = ctypes.util.find_library("X11")
    if library is None:
        return True
    try:
        xlib = ctypes.CDLL(library)
    except OSError:
        return True
    xlib.XOpenDisplay.restype = ctypes.c_void_p
    xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    xlib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    handle = xlib.XOpenDisplay(display.encode())
    if not handle:
        return False
    xlib.XCloseDisplay(handle)
    return True

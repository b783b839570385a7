"""Plain data shared between the pipeline's steps."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Camera:
    """Pinhole camera of the left / colour image (after rectification if any)."""
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    dist: np.ndarray | None = None   # OpenCV order k1 k2 p1 p2 [k3]; None = undistorted
    baseline: float | None = None    # metres, rectified stereo only

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)

    def to_colmap(self, camera_id: int | None = None):
        """The pinhole part as a ``pycolmap.Camera`` (keypoints are undistorted before use)."""
        import pycolmap   # lazy: plain data stays importable without it
        extra = {} if camera_id is None else {"camera_id": camera_id}
        return pycolmap.Camera(model="PINHOLE", width=self.width, height=self.height,
                               params=[self.fx, self.fy, self.cx, self.cy], **extra)


@dataclass
class Frame:
    """One input frame. Images are uint8, HxW (gray) or HxWx3 (BGR, as OpenCV reads)."""
    index: int
    stamp: float
    image: np.ndarray
    right: np.ndarray | None = None   # rectified right image (stereo)
    depth: np.ndarray | None = None   # float32 metres, 0 = invalid (RGB-D)
    path: str = ""
    extra: dict = field(default_factory=dict)

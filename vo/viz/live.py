"""The views of one run, fed by the pipeline's per-frame callback.

``RunViews`` owns what a run shows or records: the tracks window, the tracks video, the
live 3D map, and the whole map gathered for ``--save-map`` / ``--render-map`` (the tracker
keeps only a local window, so points are collected here as the run goes).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np

from vo.viz import DisplayError, display_problem
from vo.viz.map3d import PointColours, ViewerError
from vo.viz.tracks import FpsMeter, TrackHistory, VideoSink, draw_tracks, make_hud


@dataclass
class ViewOptions:
    windows: bool = True              # tracks window + live 3D map (when a display exists)
    video_path: str | None = None     # --save-video
    collect_map: bool = False         # --save-map / --render-map
    map_every: int = 5                # frames between 3D updates and map gathering (keyframes always)
    video_fps: float = 15.0


class MapCollector:
    """Every map point seen during the run, at its latest position, with its colour.

    The map reuses point slots, so a point is keyed by (slot, keyframe that created it).
    """

    def __init__(self):
        self.points: dict[tuple[int, int], np.ndarray] = {}
        self.colours: dict[tuple[int, int], np.ndarray] = {}

    def update(self, ids, first_keyframe, xyz, colours) -> None:
        for key, p, c in zip(zip(ids.tolist(), first_keyframe.tolist()), xyz, colours):
            self.points[key] = p
            self.colours[key] = c

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.points:
            return np.zeros((0, 3)), np.zeros((0, 3))
        keys = list(self.points)
        return np.array([self.points[k] for k in keys]), np.array([self.colours[k] for k in keys])


class RunViews:
    def __init__(self, options: ViewOptions, ground_truth=None):
        self.options = options
        self.history, self.fps = TrackHistory(), FpsMeter()
        self.colours, self.collector = PointColours(), MapCollector()
        self.gt_xyz = None if ground_truth is None else ground_truth[1][:, :3, 3]
        self.window = self.viewer = self.video = None
        self.positions: list[np.ndarray] = []
        self.quit_requested = False
        if options.windows:
            self.open_windows()

    def open_windows(self) -> None:
        problem = display_problem()
        if problem:
            warnings.warn(f"no windows: {problem}; running headless", stacklevel=3)
            return
        from vo.viz.map3d import Map3DViewer
        from vo.viz.tracks import TracksWindow
        try:
            self.window = TracksWindow("spvo tracks")
            self.viewer = Map3DViewer()
        except (DisplayError, ViewerError) as e:
            print(f"warning: {e}; continuing without that window", file=sys.stderr)

    def on_frame(self, frame, snapshot) -> None:
        """Called by the pipeline after each frame; raising KeyboardInterrupt stops the run cleanly."""
        self.positions.append(snapshot.world_from_cam[:3, 3].copy())
        needs_tracks = self.window is not None or self.options.video_path
        if self.viewer is not None or self.options.collect_map:   # only the map views use colours
            self.colours.observe(frame.image, snapshot.keypoints, snapshot.point_ids)
        if needs_tracks:
            self.show_tracks(frame, snapshot)
        if snapshot.is_keyframe or frame.index % self.options.map_every == 0:
            self.update_map(snapshot)
        if self.window is not None and self.window.quit_requested:
            raise KeyboardInterrupt("quit from the tracks window")

    def show_tracks(self, frame, snapshot) -> None:
        # outliers (matched to the map, rejected by PnP) join as untracked heads drawn as crosses
        keypoints = np.concatenate([snapshot.keypoints, snapshot.outliers])
        ids = np.concatenate([snapshot.point_ids, np.full(len(snapshot.outliers), -1)])
        inliers = np.arange(len(keypoints)) < len(snapshot.keypoints)
        trails = self.history.update(keypoints, ids)
        hud = make_hud(frame.index, self.fps.tick(), snapshot.state, snapshot.num_matches, snapshot.num_points)
        image = draw_tracks(frame.image, trails, inliers, hud)
        if self.options.video_path:
            if self.video is None:
                self.video = VideoSink(self.options.video_path, self.options.video_fps, image.shape[1::-1])
            self.video.write(image)
        if self.window is not None:
            self.window.show(image)

    def update_map(self, snapshot) -> None:
        if self.viewer is None and not self.options.collect_map:
            return
        view = snapshot.map_view()
        colours = self.colours.lookup(view.point_ids)
        if self.options.collect_map:
            self.collector.update(view.point_ids, view.first_keyframe, view.xyz, colours)
        if self.viewer is not None:
            self.viewer.update(view.xyz, colours, view.keyframe_poses, np.array(self.positions),
                               self.gt_xyz, snapshot.world_from_cam)
        self.colours.retain(view.point_ids)

    def close(self) -> None:
        for thing in (self.video, self.window, self.viewer):
            if thing is not None:
                thing.close()

"""Tracker FPS with the live windows (tracks + 3D map) against a headless run, same sequence, same run.

    python benchmarks/viz.py [SOURCE] [--features orb]

Without a display it starts Xvfb for the windowed run (the windows then render in software).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tum" / "rgbd_dataset_freiburg3_teddy"


def run_fps(source: str, features: str, windows: bool, env: dict) -> float:
    cmd = [sys.executable, str(ROOT / "run_vo.py"), source, "--features", features, "--out", os.devnull]
    if not windows:
        cmd.append("--no-viz")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"frames\s+\d+ at ([\d.]+) FPS", out).group(1))


def display_env() -> tuple[dict, subprocess.Popen | None]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if env.get("DISPLAY") or not shutil.which("Xvfb"):
        return env, None
    server = subprocess.Popen(["Xvfb", ":93", "-screen", "0", "1600x1200x24"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    return {**env, "DISPLAY": ":93"}, server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE))
    parser.add_argument("--features", default="orb")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians are compared")
    args = parser.parse_args(argv)
    env, server = display_env()
    headless, windowed = [], []
    try:
        for _ in range(args.repeats):   # alternate, so load changes hit both alike
            headless.append(run_fps(args.source, args.features, False, env))
            windowed.append(run_fps(args.source, args.features, True, env))
    finally:
        if server is not None:
            server.terminate()
    h, w = statistics.median(headless), statistics.median(windowed)
    print(f"headless runs {headless} FPS, windowed runs {windowed} FPS")
    print(f"{Path(args.source).name}, {args.features}: headless {h:.1f} FPS, "
          f"windows on {w:.1f} FPS (medians of {args.repeats}), ratio {w / h:.2f} (target >= 0.80)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cut the bundled sample (sequences/tum_teddy_sample) from the shared TUM fr3/teddy copy.

    python scripts/make_sample.py ../shared/data/tum/rgbd_dataset_freiburg3_teddy sequences/rgbd_dataset_freiburg3_teddy_sample
Every 2nd frame of the first 110 (15 Hz, 3.6 s); PNGs re-saved at maximum compression.
"""
import shutil
import sys
from pathlib import Path

import cv2


def read_list(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line and not line.startswith("#")]


def main(src: str, dst: str, frames: int = 110, stride: int = 2) -> None:
    src_dir, dst_dir = Path(src), Path(dst)
    for kind in ("rgb", "depth"):
        (dst_dir / kind).mkdir(parents=True, exist_ok=True)
        entries = read_list(src_dir / f"{kind}.txt")[:frames:stride]
        lines = [f"# {kind} frames: one in {stride} of the first {frames} of freiburg3_teddy", "# timestamp filename"]
        for stamp, name in entries:
            image = cv2.imread(str(src_dir / name), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(dst_dir / name), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
            lines.append(f"{stamp} {name}")
        (dst_dir / f"{kind}.txt").write_text("\n".join(lines) + "\n")
    last = float(read_list(dst_dir / "rgb.txt")[-1][0]) + 0.5
    gt = [line for line in (src_dir / "groundtruth.txt").read_text().splitlines()
          if line.startswith("#") or float(line.split()[0]) <= last]
    (dst_dir / "groundtruth.txt").write_text("\n".join(gt) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])

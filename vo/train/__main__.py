"""Training stages, each resumable from its run folder's last checkpoint.

    python -m vo.train magicpoint --run runs/magicpoint
    python -m vo.train adapt --detector runs/magicpoint/magicpoint.pth --out runs/ha_labels
    python -m vo.train superpoint --labels runs/ha_labels --run runs/superpoint
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse, else kept as strings."""
    conf = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            conf[key] = json.loads(value)
        except json.JSONDecodeError:
            conf[key] = value
    return conf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    mp = sub.add_parser("magicpoint", help="detector on Synthetic Shapes")
    mp.add_argument("--run", default="runs/magicpoint")
    mp.add_argument("--steps", type=int)
    mp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override default_conf")
    args = parser.parse_args(argv)

    conf = parse_overrides(args.set)
    if getattr(args, "steps", None):
        conf["steps"] = args.steps
    if args.stage == "magicpoint":
        from vo.train import magicpoint
        print(f"weights: {magicpoint.train(args.run, conf)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

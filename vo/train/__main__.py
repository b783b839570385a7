"""Training stages, each resumable from its run folder's last checkpoint.

    python -m vo.train magicpoint --run runs/magicpoint
    python -m vo.train adapt --detector runs/magicpoint/magicpoint.pth --out runs/ha_labels
    python -m vo.train superpoint --labels runs/ha_labels --run runs/superpoint
    python -m vo.train superglue --features-from runs/superpoint/superpoint.pth --run runs/superglue
    python -m vo.train superpointvo --labels runs/selflabel --init weights/superpoint_*.pth --run runs/superpointvo
    python -m vo.train export weights/checkpoints/superpoint_last.pth --out runs/superpoint_r2s/superpoint.pth
    python -m vo.train prune weights/superpoint_ours_full_v1.pth --channels 32 64 128 128 256 --out runs/prune/superpoint.pth
"""
from __future__ import annotations

import argparse
import sys

from models.weights import WeightsError
from vo.config import parse_overrides
from vo.datasets.real_images import DEFAULT_DATA
from vo.train.common import UnknownOption


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    mp = sub.add_parser("magicpoint", help="detector on Synthetic Shapes")
    mp.add_argument("--run", default="runs/magicpoint")
    mp.add_argument("--steps", type=int)
    mp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override default_conf")
    ad = sub.add_parser("adapt", help="Homographic Adaptation labels for real images")
    ad.add_argument("--detector", default="runs/magicpoint/magicpoint.pth")
    ad.add_argument("--out", default="runs/ha_labels")
    ad.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    ad.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    sp = sub.add_parser("superpoint", help="detector and descriptor on homography pairs")
    sp.add_argument("--labels", default="runs/ha_labels/labels.npz")
    sp.add_argument("--init", default="runs/magicpoint/magicpoint.pth",
                    help="start from these weights ('none' for scratch)")
    sp.add_argument("--run", default="runs/superpoint")
    sp.add_argument("--steps", type=int)
    sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    sg = sub.add_parser("superglue", help="matcher on cached SuperPoint features of homography, TUM and KITTI pairs")
    sg.add_argument("--features-from", required=True, metavar="WEIGHTS.pth", help="the SuperPoint whose features it learns")
    sg.add_argument("--run", default="runs/superglue")
    sg.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    sg.add_argument("--steps", type=int)
    sg.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override default_conf, e.g. layers=4 batch_size=1 data.homography.pairs_per_image=2")
    spvo = sub.add_parser("superpointvo", help="SuperPoint fine-tuned on VO stability labels (python -m vo.selflabel)")
    spvo.add_argument("--labels", required=True, metavar="DIR", help="a vo.selflabel output folder")
    spvo.add_argument("--init", default=None,
                     help="weights to fine-tune (default: the newest weights/superpoint_*.pth; 'none' for scratch)")
    spvo.add_argument("--run", default="runs/superpointvo")
    spvo.add_argument("--steps", type=int)
    spvo.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="override default_conf, e.g. ha_labels=runs/ha_labels/labels.npz lr=1e-4")
    ex = sub.add_parser("export", help="shippable weights from a run's checkpoint (RUN/last.pth)")
    ex.add_argument("checkpoint", metavar="LAST.pth")
    ex.add_argument("--out", required=True, metavar="FILE.pth")
    pr = sub.add_parser("prune", help="narrower SuperPoint from a trained one (channel pruning), to fine-tune")
    pr.add_argument("weights", metavar="SUPERPOINT.pth")
    pr.add_argument("--channels", type=int, nargs=5, required=True, metavar="C", help="c1 c2 c3 c4 c5")
    pr.add_argument("--out", required=True, metavar="FILE.pth")
    args = parser.parse_args(argv)

    conf = parse_overrides(getattr(args, "set", []))
    if getattr(args, "steps", None):
        conf["steps"] = args.steps
    try:
        return run_stage(args, conf)
    except UnknownOption as e:   # a mistyped --set key: one line, no traceback
        print(f"error: --set: {e.args[0]}", file=sys.stderr)
        return 2
    except WeightsError as e:    # a missing or bad weights file (--init, --features-from, ...): one line
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_stage(args, conf: dict) -> int:
    if args.stage == "magicpoint":
        from vo.train import magicpoint
        print(f"weights: {magicpoint.train(args.run, conf)}")
    elif args.stage == "adapt":
        from vo.train import adapt
        print(f"labels: {adapt.run(args.detector, args.out, args.data, conf)}")
    elif args.stage == "superpoint":
        from vo.train import superpoint
        init = None if args.init.lower() == "none" else args.init
        print(f"weights: {superpoint.train(args.labels, args.run, init, conf)}")
    elif args.stage == "superglue":
        from vo.train import superglue
        print(f"weights: {superglue.train(args.features_from, args.run, args.data, conf)}")
    elif args.stage == "export":
        from vo.train.export import export_checkpoint
        try:
            path, kind, step = export_checkpoint(args.checkpoint, args.out)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"weights: {path} ({kind}, step {step})")
    elif args.stage == "prune":
        from vo.train.prune import prune
        try:
            print(f"weights: {prune(args.weights, args.channels, args.out)}")
        except ValueError as e:   # widths the network cannot be pruned to: one line
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.stage == "superpointvo":
        from vo.train import superpointvo
        try:
            print(f"weights: {superpointvo.train(args.labels, args.run, args.init, conf)}")
        except FileNotFoundError as e:   # no labels yet: one line
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

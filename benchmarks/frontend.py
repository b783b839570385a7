"""Front-end speed and reduced-precision fidelity: SuperPoint and SuperGlue.

    python benchmarks/frontend.py [--runs 10] [--keypoints 512 1024 2048] [--force-precisions bf16]
    python benchmarks/frontend.py --compare weights/superpoint_ours_v3.pth weights/superpoint_ours_v4.pth

Speed: median ms/call over ``--runs`` calls after warm-up, for fp32 (the baseline,
measured in the same run) and each reduced precision this device really runs
(bf16 on a CPU with bf16 units, fp16 on CUDA). ``--force-precisions`` also times
precisions that ``select_precision`` would replace by fp32 (e.g. emulated bf16), and
int8 (SuperPoint only: static quantisation, calibrated on its first input).
Timing does not depend on the weights, so random ones are used.

Fidelity (real images, HPatches v_churchill: SuperPoint on images 1-5, SuperGlue on pairs 1 vs 2..6): SuperPoint
keypoints of the reduced precision within 1 px of fp32 (%), mean descriptor cosine of
those pairs, and the fraction of fp32 SuperGlue matches the reduced precision
reproduces; each as the mean and the worst image or pair. With
shipped/given weights these are the real networks; otherwise SuperPoint is random
and SuperGlue is a similarity matcher (random GNN with damped residuals, scaled
identity projection) on RootSIFT descriptors padded to 256-d, so its matches are
real and non-trivial.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.classical import SIFT  # noqa: E402
from models.runtime import cpu_has_fast_bf16, select_device, select_precision  # noqa: E402
from models.superglue import SuperGlue  # noqa: E402
from models.weights import WeightsError, default_weights  # noqa: E402

SHARED_DATA = Path(os.environ.get("VO_SHARED_DATA", ROOT.parent / "shared" / "data"))
SP_SIZES = [(640, 480), (1241, 376)]


# ---------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, runs: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall and CPU (process) time in ms of ``fn()`` over ``runs`` calls after warm-up.

    On a shared machine the CPU time shows what the call itself costs: with one
    thread it approximates the wall time of an idle machine.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def precisions(device: torch.device, forced: list[str]) -> list[str]:
    """fp32 first, then the reduced precisions the device really runs, then any forced ones."""
    out = ["fp32"]
    for p in ("bf16", "fp16"):
        try:
            if select_precision(device, p) == p:
                out.append(p)
        except ValueError:  # fp16 on CPU
            pass
    return out + [p for p in forced if p not in out]


def random_features(n: int, seed: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([640.0, 480.0])
    feats = {"keypoints": torch.rand(n, 2, generator=g) * size, "scores": torch.rand(n, generator=g),
             "descriptors": F.normalize(torch.randn(n, 256, generator=g), dim=-1), "image_size": size}
    return {k: v.to(device) for k, v in feats.items()}


def superpoint_factory(device):
    """``build(weights, precision)`` for SuperPoint, or None (with a note) when it cannot be imported."""
    try:
        from models.superpoint import SuperPoint
    except Exception as e:  # noqa: BLE001 - report any import problem and carry on
        print(f"SuperPoint: cannot import models.superpoint ({type(e).__name__}: {e}); skipped")
        return None

    def build(weights, precision: str):
        sp = SuperPoint(weights=weights, device=device, precision="fp32")
        sp.precision = precision  # set directly so forced precisions are honoured
        return sp
    return build


def table(title: str, rows: list[tuple[str, str, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'input':>21}  {'precision':>9}  {'ms/call':>9}  {'cpu ms':>9}  {'speed-up':>8}")
    for label, precision, ms, cpu, base in rows:
        print(f"  {label:>21}  {precision:>9}  {ms:9.1f}  {cpu:9.1f}  {base / ms:7.2f}x")


# ---------------------------------------------------------------- speed

def bench_superglue(device, precs, keypoints, runs, builds: dict) -> None:
    """``builds``: configuration name -> SuperGlue; the first one's fp32 is the baseline per size."""
    rows = []
    for n in keypoints:
        f0, f1 = random_features(n, 0, device), random_features(n, 1, device)
        base = None
        for name, sg in builds.items():
            for p in precs:
                if p == "int8":   # SuperPoint only
                    continue
                sg.precision = p
                ms, cpu = time_call(lambda: sg.match(f0, f1), device, runs)
                base = base or ms
                rows.append((f"{n} kp {name}", p, ms, cpu, base))
                print(f"  superglue {n:5d} kp {name} {p}: {ms:.1f} ms", flush=True)
    layers = ", ".join(f"{name} {len(sg.conf['GNN_layers'])} layers" for name, sg in builds.items())
    table(f"SuperGlue match ({layers}; 100 Sinkhorn iterations), median ms; speed-up against official fp32",
          rows)


def bench_superpoint(device, precs, runs, builds: dict) -> None:
    """``builds``: network name -> build(precision); the first one's fp32 is the baseline."""
    rows = []
    for w, h in SP_SIZES:
        image = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)
        base = None
        for name, build in builds.items():
            for p in precs:
                sp = build(p)
                ms, cpu = time_call(lambda: sp.extract(image), device, runs)
                base = base or ms
                rows.append((f"{w}x{h} {name}", p, ms, cpu, base))
                print(f"  superpoint {w}x{h} {name} {p}: {ms:.1f} ms", flush=True)
    table("SuperPoint extract (network + NMS + descriptors), median ms; "
          "speed-up against the official widths in fp32", rows)


def compare_superpoints(device, precision: str, runs: int, files: list[str]) -> None:
    """SuperPoint files timed in turn, one extract each per round, so that a shared host's slow
    phases hit all of them alike; the first file is the baseline."""
    factory = superpoint_factory(device)
    images = churchill_images("{root} missing; timing a random image")
    image = (cv2.resize(images[0], (640, 480)) if images
             else np.random.default_rng(0).integers(0, 256, (480, 640), dtype=np.uint8))
    models = {name: factory(name, precision) for name in files}
    for model in models.values():
        time_call(lambda: model.extract(image), device, runs=1)   # warm-up
    times = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model.extract(image)
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times[files[0]])
    print(f"\nSuperPoint extract at 640x480 ({'v_churchill 1' if images else 'random image'}), {precision}, "
          f"interleaved over {runs} rounds: median ms (min); time against the first file")
    for name, ms in times.items():
        print(f"  {name:>48}  {statistics.median(ms):8.1f} ({min(ms):.1f})  {statistics.median(ms) / base:5.2f}x")


# ---------------------------------------------------------------- fidelity

def churchill_images(missing_note: str = "fidelity: {root} missing; skipped"):
    root = SHARED_DATA / "hpatches" / "v_churchill"
    if not root.exists():
        print("\n" + missing_note.format(root=root))
        return None
    return [cv2.imread(str(root / f"{k}.ppm")) for k in range(1, 7)]


def keypoint_agreement(ref: dict, low: dict) -> tuple[float, float]:
    """Fraction of ``ref``'s keypoints with one of ``low``'s within 1 px, and their mean descriptor cosine."""
    k32, k16 = ref["keypoints"].float().cpu(), low["keypoints"].float().cpu()
    if len(k32) == 0 or len(k16) == 0:
        return 0.0, float("nan")
    dist, nearest = torch.cdist(k32, k16).min(1)
    close = dist <= 1.0
    d32 = ref["descriptors"].float().cpu()[close]
    d16 = low["descriptors"].float().cpu()[nearest[close]]
    cosine = F.cosine_similarity(d32, d16, dim=-1).mean().item() if close.any() else float("nan")
    return close.float().mean().item(), cosine


def superpoint_fidelity(build, precision, images) -> str:
    """Keypoints and descriptors of ``precision`` against fp32 on all images but the last, on which int8 calibrates."""
    low_model, ref_model = build(precision), build("fp32")
    if precision == "int8":
        low_model.extract(images[-1])
    within, cosine = zip(*(keypoint_agreement(ref_model.extract(im), low_model.extract(im)) for im in images[:-1]))
    return f"keypoints within 1 px {100 * np.mean(within):.1f}% (worst image {100 * min(within):.1f}%), " \
           f"descriptor cosine mean {np.mean(cosine):.4f} (worst {min(cosine):.4f}), {len(within)} images"


def similarity_superglue(device) -> SuperGlue:
    """Random GNN with damped residuals + scaled identity projection: matches by descriptor similarity."""
    torch.manual_seed(0)
    sg = SuperGlue(weights=False, device=device, precision="fp32")
    with torch.no_grad():
        for layer in sg.gnn.layers:
            layer.mlp[-1].weight.mul_(0.3)
        sg.final_proj.weight.copy_(16 * torch.eye(256, device=device)[..., None])
        sg.final_proj.bias.zero_()
    return sg


def padded_rootsift(image, n) -> dict:
    feats = SIFT(max_keypoints=n, root=True).extract(image)
    desc = np.zeros((len(feats["descriptors"]), 256), np.float32)
    desc[:, :128] = feats["descriptors"]
    return {**feats, "descriptors": desc, "scores": feats["scores"] / max(feats["scores"].max(), 1e-9)}


def same_matches(sg, precision, feats0, feats1) -> tuple[float, int]:
    """Fraction of the fp32 matches that ``precision`` reproduces, and the fp32 match count."""
    sg.precision = "fp32"
    ref = sg.match(feats0, feats1)
    sg.precision = precision
    low = sg.match(feats0, feats1)
    a, b = set(map(tuple, ref["matches"].tolist())), set(map(tuple, low["matches"].tolist()))
    return len(a & b) / max(len(a), 1), len(a)


def superglue_fidelity(sg, precision, feats) -> str:
    """``same_matches`` of the first image against each of the others."""
    same, counts = zip(*(same_matches(sg, precision, feats[0], other) for other in feats[1:]))
    return f"same matches {100 * np.mean(same):.1f}% (worst pair {100 * min(same):.1f}%; " \
           f"{min(counts)}-{max(counts)} fp32 matches per pair), {len(same)} pairs"


def fidelity(device, precs, build, sp_weights, sg_weights, n) -> None:
    reduced = [p for p in precs if p != "fp32"]
    print("\nFidelity vs fp32 on HPatches v_churchill (SuperPoint: images 1-5; SuperGlue: 1 vs 2..6)")
    if not reduced:
        print("  no reduced precision runs on this device (fp32 only); use --force-precisions bf16 to check anyway")
        return
    images = churchill_images()
    if images is None:
        return
    real_sp = sp_weights is not False
    if build is not None:
        print(f"  SuperPoint weights: {'given/shipped' if real_sp else 'random (keypoints of a random net are fragile)'}")
        for p in reduced:
            print(f"  SuperPoint {p}: {superpoint_fidelity(build, p, images)}")
    if sg_weights is not False and real_sp and build is not None:
        sg = SuperGlue(weights=sg_weights, device=device, precision="fp32")
        sp = build("fp32")
        feats = [sp.extract(im) for im in images]
        print(f"  SuperGlue: given/shipped weights on SuperPoint features ({len(feats[0]['keypoints'])} kp)")
    else:
        sg = similarity_superglue(device)
        feats = [padded_rootsift(im, n) for im in images]
        print(f"  SuperGlue: similarity matcher on RootSIFT padded to 256-d ({len(feats[0]['keypoints'])} kp)")
    for p in reduced:
        if p != "int8":   # SuperPoint only
            print(f"  SuperGlue {p}: {superglue_fidelity(sg, p, feats)}")


# ---------------------------------------------------------------- main

def resolve(weights, pattern):
    if weights:
        return weights
    try:
        return default_weights(pattern)
    except WeightsError:
        return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--keypoints", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force-precisions", nargs="*", default=[], choices=["bf16", "fp16", "int8"],
                        help="also time these where select_precision would fall back to fp32 "
                             "(int8: SuperPoint only, calibrated on its first input)")
    parser.add_argument("--fidelity-keypoints", type=int, default=1024)
    parser.add_argument("--superpoint-weights", default=None)
    parser.add_argument("--superglue-weights", default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["superglue", "superpoint", "fidelity"])
    parser.add_argument("--compare", nargs="+", metavar="SUPERPOINT.pth",
                        help="only time these SuperPoint files against each other, interleaved")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    precs = precisions(device, args.force_precisions)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"torch {torch.__version__}, device {device} ({name}), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fast bf16 {cpu_has_fast_bf16()}, "
          f"threads {torch.get_num_threads()}, load average {load:.1f}")
    print(f"precisions: {', '.join(precs)} (default here: {select_precision(device)})")
    if device.type == "cpu" and load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} exceeds {os.cpu_count()} CPUs; wall times are inflated "
              "(see the cpu ms column; --threads 1 suffers least from contention)")

    if args.compare:
        compare_superpoints(device, select_precision(device), args.runs, args.compare)
        return
    sp_weights = resolve(args.superpoint_weights, "superpoint_*.pth")
    sg_weights = resolve(args.superglue_weights, "superglue_*.pth")
    factory = superpoint_factory(device)
    if "superglue" not in args.skip:
        sg_builds = {"official": SuperGlue(weights=False, device=device, precision="fp32")}  # random weights
        if sg_weights:
            sg_builds["ours"] = SuperGlue(weights=sg_weights, device=device, precision="fp32")
        bench_superglue(device, precs, args.keypoints, args.runs, sg_builds)
    if "superpoint" not in args.skip and factory is not None:
        builds = {"official": lambda p: factory(False, p)}   # official widths, random weights
        if sp_weights:
            builds["ours"] = lambda p: factory(sp_weights, p)
        bench_superpoint(device, precs, args.runs, builds)
    if "fidelity" not in args.skip:
        build = None if factory is None else (lambda p: factory(sp_weights, p))
        fidelity(device, precs, build, sp_weights, sg_weights, args.fidelity_keypoints)


if __name__ == "__main__":
    main()

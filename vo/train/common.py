"""What every training stage shares: resumable checkpoints, a plain log, the CPU set-up."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def setup_cpu(threads: int | None = None) -> None:
    """Use every core for the math unless OMP_NUM_THREADS says otherwise (a shared machine).

    Data comes from pre-rendered caches, so no loader workers compete with the math.
    SIGTERM (and SIGINT, which background jobs ignore) stop a stage like Ctrl-C: checkpoint, then exit.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(threads or os.cpu_count() or 1)


class UnknownOption(KeyError):
    """A configuration key the stage's default_conf does not have."""


def merge_conf(defaults: dict, overrides: dict | None) -> dict:
    """A deep copy of a stage's ``defaults`` with ``overrides`` applied.

    A dotted key ("loss.lambda_loss") reaches into a nested dict. A key the defaults do not
    have raises UnknownOption, so a mistyped ``--set`` stops the stage instead of being ignored.
    """
    conf = copy.deepcopy(defaults)
    for key, value in (overrides or {}).items():
        *path, last = key.split(".")
        node = conf
        for part in path:
            if not isinstance(node.get(part), dict):
                raise UnknownOption(f"unknown option {key!r}")
            node = node[part]
        if last not in node:
            raise UnknownOption(f"unknown option {key!r}")
        node[last] = value
    return conf


def read_checkpoint_model(path: str | Path) -> tuple[dict, int]:
    """The model state dict and the step of a training checkpoint (``RUN/last.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a training checkpoint (no 'model' entry)")
    return state["model"], int(state.get("step", 0))


class Checkpoint:
    """``DIR/last.pth`` holds model, optimiser, step and RNG states; written atomically."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "last.pth"

    def save(self, model, optimizer, step: int, extra: dict | None = None) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "extra": extra or {},
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a kill mid-write never corrupts the last checkpoint

    def load(self, model, optimizer) -> tuple[int, dict]:
        """Restore into ``model``/``optimizer``; returns (step, extra), (0, {}) when starting fresh."""
        if not self.path.exists():
            return 0, {}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"]), state.get("extra", {})


class TrainLog:
    """Appends one JSON object per line to ``DIR/log.jsonl`` and mirrors it as text to ``log.txt``."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.started = time.time()

    def write(self, step: int, **values) -> None:
        record = {"step": step, "time": round(time.time() - self.started, 1), **values}
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        with open(self.dir / "log.txt", "a") as f:
            f.write(text + "\n")


def step_rng(seed: int, step: int) -> np.random.Generator:
    """A generator that depends only on (seed, step), so a resumed run draws the same batches."""
    return np.random.default_rng([seed, step])


def export_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Save a plain fp32 state dict in the official layout (what ``SuperPoint(weights=...)`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = getattr(model, "folded_state_dict", None)
    state = folded() if folded else {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def learning_rate(conf: dict, step: int) -> float:
    """Step decay: ``lr`` until ``lr_decay_step`` (None: never), then ``lr * lr_decay``.

    A smaller rate at the end settles the weights the noisy batches of 4 keep shaking.
    """
    decay_step = conf.get("lr_decay_step")
    if decay_step is not None and step >= decay_step:
        return conf["lr"] * conf.get("lr_decay", 0.1)
    return conf["lr"]


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def fit(net: torch.nn.Module, optimizer, run_dir: Path, conf: dict, out_name: str,
        loss_at_step: Callable[[int], dict], postfix: dict[str, str]) -> Path:
    """The loop the SuperPoint stages share: resume, step, log, checkpoint, export.

    ``loss_at_step(step)`` returns named scalar losses, "total" among them; ``postfix`` maps
    progress-bar labels to those names. Ctrl-C or SIGTERM saves a checkpoint and stops.
    """
    from tqdm import tqdm

    checkpoint, log = Checkpoint(run_dir), TrainLog(run_dir)
    step, _ = checkpoint.load(net, optimizer)
    bar = tqdm(total=conf["steps"], initial=step, desc=out_name.removesuffix(".pth"), unit="step")
    try:
        while step < conf["steps"]:
            set_learning_rate(optimizer, learning_rate(conf, step))
            parts = loss_at_step(step)
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix({label: f"{parts[name].item():.3f}" for label, name in postfix.items()})
            if step % conf["log_every"] == 0:
                log.write(step, **{k: v.item() for k, v in parts.items()})
            if step % conf["checkpoint_every"] == 0:
                checkpoint.save(net, optimizer, step)
            if step % conf["export_every"] == 0:
                exported = export_weights(net, run_dir / out_name)
                if conf["keep_exports"]:   # to compare exports later (weights/README.md's tables)
                    shutil.copyfile(exported, run_dir / f"export_{step}.pth")
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; resume with the same command")
    checkpoint.save(net, optimizer, step)
    bar.close()
    return export_weights(net, run_dir / out_name)

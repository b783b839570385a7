"""Where the sequences run: in this process, in local processes, or as Ray tasks.

- ``serial``: one after the other, here (progress per frame);
- ``processes``: a ``ProcessPoolExecutor`` with the spawn start method;
- ``ray``: one Ray task per sequence, on a local Ray started with ``workers`` CPUs or on
  the cluster at ``ray_address`` (whose nodes need the project installed with
  ``pip install .[ray]`` and the sequences at the same paths).

``auto`` is serial for one worker, else Ray when it is importable, else processes; a
``ray_address`` always means Ray. Every backend hands each finished sequence to
``on_done(spec, SequenceResult or the exception it raised)`` in this process, which
writes all files: workers need no access to the output folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from .label import SelfLabelConfig
from .sequence import SequenceResult, label_sequence

BACKENDS = ("auto", "serial", "processes", "ray")
OnDone = Callable[[str, "SequenceResult | Exception"], None]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


class BackendError(RuntimeError):
    """The backend asked for cannot run here."""


def choose_backend(backend: str, workers: int, ray_address: str | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ray_address or backend == "ray":
        if not ray_available():
            raise BackendError("Ray is not installed: pip install '.[ray]' (or use --backend processes)")
        return "ray"
    if backend != "auto":
        return backend
    if workers <= 1:
        return "serial"
    return "ray" if ray_available() else "processes"


def run_all(specs: list[str], config: SelfLabelConfig, on_done: OnDone, backend: str = "auto", workers: int = 1,
            ray_address: str | None = None, progress: Callable[[int], None] | None = None) -> str:
    """Label every spec with the chosen backend; returns the backend used."""
    chosen = choose_backend(backend, workers, ray_address)
    if chosen == "serial":
        run_serial(specs, config, on_done, progress)
    elif chosen == "processes":
        run_processes(specs, config, on_done, max(workers, 1))
    else:
        run_ray(specs, config, on_done, max(workers, 1), ray_address)
    return chosen


def run_serial(specs, config, on_done: OnDone, progress=None) -> None:
    for spec in specs:
        try:
            result = label_sequence(spec, config, progress)
        except Exception as e:   # one bad sequence must not cost the others
            result = e
        on_done(spec, result)


def worker_task(spec: str, config: SelfLabelConfig) -> SequenceResult:
    """``label_sequence`` on one core: workers share the machine."""
    import cv2
    cv2.setNumThreads(1)
    if config.features.startswith("superpoint"):
        import torch
        torch.set_num_threads(1)
    return label_sequence(spec, config)


def run_processes(specs, config, on_done: OnDone, workers: int) -> None:
    context = multiprocessing.get_context("spawn")
    with one_thread_children(), ProcessPoolExecutor(max_workers=min(workers, len(specs)) or 1,
                                                    mp_context=context) as pool:
        futures = {pool.submit(worker_task, spec, config): spec for spec in specs}
        for future in as_completed(futures):
            error = future.exception()
            on_done(futures[future], error if error is not None else future.result())


@contextlib.contextmanager
def one_thread_children():
    """BLAS/OpenMP thread counts for the children (read when they import numpy), unless
    set already; this process's environment is restored afterwards."""
    added = {k: v for k, v in ONE_THREAD.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def run_ray(specs, config, on_done: OnDone, workers: int, address: str | None) -> None:
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(**ray_init_args(workers, address))
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(worker_task)
        pending = {task.remote(spec, config): spec for spec in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                result = e.as_instanceof_cause()
            except Exception as e:   # a lost worker or node
                result = e
            on_done(spec, result)
    finally:
        if started:
            ray.shutdown()


def ray_init_args(workers: int, address: str | None) -> dict:
    """A local Ray with ``workers`` CPUs whose workers import this checkout, or a cluster."""
    env = dict(ONE_THREAD)
    if address:
        return {"address": address, "runtime_env": {"env_vars": env}, "logging_level": "WARNING"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"num_cpus": workers, "include_dashboard": False, "runtime_env": {"env_vars": env},
            "logging_level": "WARNING", "log_to_driver": True}

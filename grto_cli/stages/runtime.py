"""Where a stage runs: its processes, device, dtype and CPU threads."""

from __future__ import annotations

import os

from grto_cli.stages.console import console


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def join_processes(device: str = "auto"):
    """This invocation's processes (``core.distributed.Processes``): the launcher's when started by
    ``accelerate launch`` / torchrun, else a lone process. Processes other than the main one print
    nothing (one progress bar, one summary)."""
    from grto_cli.core.distributed import Processes

    processes = Processes.from_environment(cpu=not pick_device(device).startswith("cuda"))
    console.quiet = not processes.is_main
    return processes


def process_device(device: str, processes) -> str:
    """The device a stage runs on: the launcher's GPU for this process when several share a machine."""
    chosen = pick_device(device)
    if processes.distributed and chosen.startswith("cuda"):
        return str(processes.device)
    return chosen


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def cpu_threads() -> int:
    """This process's share of the CPU: ``OMP_NUM_THREADS`` when set (a launcher such as
    ``accelerate launch`` sets it per process), else every core the process may run on."""
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(available))


def set_threads() -> None:
    """Torch's intra-op threads: this process's share of the CPU (two trainings side by side that
    each took every core ran 10x slower each on the 2-core machine)."""
    import torch

    torch.set_num_threads(cpu_threads())


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

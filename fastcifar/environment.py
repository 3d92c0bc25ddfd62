"""What a result depends on, probed from this machine: device, driver, versions, code revision, data."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastcifar import __version__
from fastcifar.data import Dataset, public_name


def environment(device: torch.device, dataset: Dataset, world: int = 1) -> dict:
    """What a result depends on: device, driver, versions, code revision, data."""
    info = {
        "fastcifar": __version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "dali": module_version("nvidia.dali"),
        "numpy": module_version("numpy"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_bf16": cpu_computes_bf16(),
        "processes": world,  # torchrun ranks that trained together (one device each)
        "cuda": None,
        "driver": None,
        "data_source": public_name(dataset.source),  # shared in result files: no path of this machine
        "data_sha256": dataset.source_sha256,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def provenance() -> dict:
    """When and by which command a results file was made."""
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["fastcifar", *sys.argv[1:]]) if sys.argv else ""}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) rather than emulating bf16."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def module_version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except ImportError:
        return None

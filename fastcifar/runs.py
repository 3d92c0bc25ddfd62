"""The run folder: config.json, env.json, metrics.jsonl, checkpoint.pt, summary.json.

Every file of a run (JSON, metrics, checkpoint, report and plots) is written to a temporary
name and renamed, so none is ever seen half-written. `summary.json` is written last: a folder
without it is an unfinished run.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastcifar import __version__
from fastcifar.config import TrainConfig
from fastcifar.data import Dataset, public_name
from fastcifar.errors import UserError
from fastcifar.model import ResNet18

# 2: checkpoints record the number of processes (resume needs the same); 3: plain values only (weights_only)
CHECKPOINT_FORMAT = "fastcifar-checkpoint-3"
MODEL_NAME = "resnet18-cifar10"
CHECKPOINT_FILE = "checkpoint.pt"


def create_run_dir(out: str | None) -> Path:
    """`out`, which must be new or empty, or else a new runs/<timestamp>[-N]."""
    path = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out:
        resumable = (path / CHECKPOINT_FILE).is_file()
        refuse_used(path, "run folder", "pick another --out" + (f", or `--resume {path}`" if resumable else ""))
    try:
        if out:
            path.mkdir(parents=True, exist_ok=True)
        else:  # runs started in the same second (a sweep script) each claim their own folder
            stamp, n = path, 2
            path.parent.mkdir(parents=True, exist_ok=True)
            while not _claim(path):
                path, n = stamp.with_name(f"{stamp.name}-{n}"), n + 1
        probe_writable(path)
    except OSError as e:
        raise UserError(f"cannot write to run folder {path} ({e.strerror}): pick a writable --out") from None
    return path


def probe_writable(folder: Path) -> None:
    """Raise OSError unless a file can be created in `folder` (mode bits alone do not tell, as root)."""
    probe = folder / ".write-test"
    probe.write_text("")
    probe.unlink()


def refuse_used(path: Path, what: str, fix: str) -> None:
    """A UserError when `path` is a file or a folder with something in it."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{what} {path} exists and is not an empty folder: {fix}")


def _claim(path: Path) -> bool:
    """Create `path`; False when it exists (mkdir is atomic, so two processes never both get it)."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def write_atomically(path: Path, write) -> None:
    """`write(file)` to a temporary name, then rename it over `path`: a full disk or a kill leaves
    the file it replaces whole and no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:  # an open file, not a name: torch.save then raises OSError too
            write(file)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): free some space or choose another --out "
                        "(the file it would replace is unchanged)") from None
    finally:
        tmp.unlink(missing_ok=True)  # after an error or Ctrl-C; renamed away on success


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode()))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, fix: str = "is this a complete fastcifar run folder?"):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path} not found: {fix}") from None
    except ValueError:
        raise UserError(f"{path} is not valid JSON: {fix}") from None


def add_report_seconds(run_dir: Path, seconds: float) -> dict:
    """summary.json with the report's seconds added to its parts and its wall time; returned."""
    summary = read_json(run_dir / "summary.json")
    summary["report_seconds"] = seconds
    if summary.get("wall_seconds") is not None:
        summary["wall_seconds"] += seconds
    write_json(run_dir / "summary.json", summary)
    return summary


def write_metrics(path: Path, metrics: list[dict]) -> None:
    """Rewrite metrics.jsonl whole (one line per epoch), so a resumed run never repeats a line."""
    write_text(path, "".join(json.dumps(m) + "\n" for m in metrics))


def read_metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path} not found: is this a fastcifar run folder?") from None


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


# --- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    state = {"format": CHECKPOINT_FORMAT, "model_name": MODEL_NAME, **state}
    write_atomically(path, lambda file: torch.save(state, file))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file, or the one in a run folder; refuses files that are not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: pass a run folder or its {CHECKPOINT_FILE}")
    try:
        # weights_only: a checkpoint from elsewhere may hold pickled code, and this never runs it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects a {CHECKPOINT_FORMAT} file never does (it is older, or not from "
                        "fastcifar): train again with `fastcifar train`") from None
    except Exception as e:  # torch.load raises many types for a bad file
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated") from None
    if not isinstance(state, dict) or state.get("model_name") != MODEL_NAME:
        raise UserError(f"{path} is not a fastcifar {MODEL_NAME} checkpoint: train one with `fastcifar train`")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a {state.get('format')} checkpoint, this fastcifar reads {CHECKPOINT_FORMAT}: "
                        "train again with `fastcifar train`, or use the fastcifar version that wrote it")
    return state


def load_model(path: Path | str, device: str | torch.device = "cpu") -> tuple[ResNet18, tuple[str, ...]]:
    """The trained model of a run folder or checkpoint file, fp32 in eval mode, and its class names."""
    state = load_checkpoint(Path(path))
    return model_of(state).to(device), tuple(state["classes"])


def model_of(state: dict) -> ResNet18:
    model = ResNet18(len(state["classes"]))
    model.load_state_dict(state["model_state"])
    return model.eval()


def config_of(state: dict) -> TrainConfig:
    return TrainConfig.from_dict(state["config"])


def train_command(world: int) -> str:
    """The command that trains (and resumes) a run of `world` processes."""
    return "fastcifar train" if world == 1 else f"torchrun --nproc_per_node {world} -m fastcifar train"


def summarize(metrics: list[dict]) -> dict:
    """The notebook's table: best accuracy and its epoch, and the last epoch's, for train and test."""
    out = {}
    for split in ("train", "test"):
        best = max(metrics, key=lambda m: m[f"{split}_acc"])
        out[split] = {"max_acc": best[f"{split}_acc"], "max_epoch": best["epoch"],
                      "last_acc": metrics[-1][f"{split}_acc"]}
    out["epochs"] = len(metrics)
    out["train_seconds"] = sum(m["epoch_seconds"] for m in metrics)
    return out


def wall_parts(seconds: dict, metrics: list[dict]) -> dict:
    """summary.json's timing apart from training: each part's seconds and the wall time, with
    `other_seconds` (set-up, logging) the rest of it, so that the parts add up to the wall time."""
    parts = {"data_seconds": seconds["data"], "compile_seconds": seconds["compile"],
             "eval_seconds": sum(m["eval_seconds"] for m in metrics), "checkpoint_seconds": seconds["checkpoint"]}
    wall = seconds["wall"]
    train = sum(m["epoch_seconds"] for m in metrics)
    return {**parts, "other_seconds": None if wall is None else wall - train - sum(parts.values()),
            "wall_seconds": wall}


# The parts of summary.json's wall time, as format_wall names them.
WALL_PARTS = (("data", "data_seconds"), ("compile and warm-up", "compile_seconds"), ("train", "train_seconds"),
              ("eval", "eval_seconds"), ("checkpoints", "checkpoint_seconds"), ("report", "report_seconds"),
              ("other", "other_seconds"))


def format_wall(summary: dict) -> str:
    """One line: the wall time and what it went to."""
    parts = ", ".join(f"{name} {summary[key]:.1f}s" for name, key in WALL_PARTS if summary.get(key) is not None)
    wall = summary.get("wall_seconds")
    return (f"wall {wall:.1f}s: " if wall is not None else "wall time not recorded; ") + parts


def format_summary(summary: dict) -> str:
    lines = [f"{'':8}{'Max Acc @ Epoch':>20}{'Last Epoch Acc':>18}"]
    for split in ("train", "test"):
        s = summary[split]
        lines.append(f"{split:8}{s['max_acc']:>13.2%} @ {s['max_epoch']:<4}{s['last_acc']:>18.2%}")
    lines.append(f"training {summary['train_seconds']:.1f}s over {summary['epochs']} epochs")
    if "compile_seconds" in summary:  # a finished run's summary.json, not metrics summarized so far
        lines.append(format_wall(summary))
    return "\n".join(lines)

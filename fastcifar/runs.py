"""The run folder: config.json, env.json, metrics.jsonl, checkpoint.pt, summary.json, and the
summary's figures and their formatting. (The checkpoint's contents: checkpoints.py; what
env.json probes: environment.py.)

Every file of a run (JSON, metrics, checkpoint, report and plots) is written to a temporary
name and renamed, so none is ever seen half-written. `summary.json` is written last: a folder
without it is an unfinished run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fastcifar.errors import UserError

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


def train_command(world: int) -> str:
    """The command that trains (and resumes) a run of `world` processes."""
    return "fastcifar train" if world == 1 else f"torchrun --nproc_per_node {world} -m fastcifar train"


def summarize(metrics: list[dict]) -> dict:
    """The notebook's table: best accuracy and its epoch, and the last epoch's, for train and test
    (the test's over the epochs evaluated: the last one always, the others per --eval-every); the
    training seconds, and the time to the result: training plus the last epoch's evaluation."""
    out = {}
    for split in ("train", "test"):
        evaluated = [m for m in metrics if m[f"{split}_acc"] is not None]
        best = max(evaluated, key=lambda m: m[f"{split}_acc"], default=None)
        out[split] = {"max_acc": best[f"{split}_acc"] if best else None, "max_epoch": best["epoch"] if best else None,
                      "last_acc": metrics[-1][f"{split}_acc"]}
    out["epochs"] = len(metrics)
    out["train_seconds"] = sum(m["epoch_seconds"] for m in metrics)
    out["final_eval_seconds"] = metrics[-1]["test_seconds"]
    out["time_to_result_seconds"] = out["train_seconds"] + out["final_eval_seconds"]
    return out


def wall_parts(seconds: dict, metrics: list[dict]) -> dict:
    """summary.json's timing apart from training: each part's seconds and the wall time, with
    `other_seconds` (set-up, logging) the rest of it, so that the parts add up to the wall time."""
    parts = {"data_seconds": seconds["data"], "compile_seconds": seconds["compile"],
             "eval_seconds": sum(m["eval_seconds"] for m in metrics), "checkpoint_seconds": seconds["checkpoint"]}
    wall = seconds["wall"]
    train = sum(m["epoch_seconds"] for m in metrics)
    return {**parts, "other_seconds": wall - train - sum(parts.values()), "wall_seconds": wall}


# The parts of summary.json's wall time, as format_wall names them.
WALL_PARTS = (("data", "data_seconds"), ("compile and warm-up", "compile_seconds"), ("train", "train_seconds"),
              ("eval", "eval_seconds"), ("checkpoints", "checkpoint_seconds"), ("report", "report_seconds"),
              ("other", "other_seconds"))


def format_wall(summary: dict) -> str:
    """One line: the wall time and what it went to."""
    parts = ", ".join(f"{name} {summary[key]:.1f}s" for name, key in WALL_PARTS if key in summary)
    return f"wall {summary['wall_seconds']:.1f}s: {parts}"


def format_summary(summary: dict) -> str:
    lines = [f"{'':8}{'Max Acc @ Epoch':>20}{'Last Epoch Acc':>18}"]
    for split in ("train", "test"):
        s = summary[split]
        last = f"{s['last_acc']:>18.2%}" if s["last_acc"] is not None else f"{'-':>18}"
        best = f"{s['max_acc']:>13.2%} @ {s['max_epoch']:<4}" if s["max_acc"] is not None else f"{'-':>20}"
        lines.append(f"{split:8}{best}{last}")
    lines.append(f"training {summary['train_seconds']:.1f}s over {summary['epochs']} epochs")
    if "compile_seconds" in summary:  # a finished run's summary.json, not metrics summarized so far
        lines.append(f"time to result {summary['time_to_result_seconds']:.1f}s: training and the final "
                     f"evaluation ({summary['final_eval_seconds']:.1f}s)")
        lines.append(format_wall(summary))
    return "\n".join(lines)

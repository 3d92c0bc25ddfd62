"""`fastcifar bench --history [DIR]`: the committed bench results over time, as a picture and a table.

Results are grouped by everything that makes two of them comparable (bench.COMPARABLE: device,
preset, batch size, amp, compile, ...): each group is its own line, so figures of another device
or other settings are never drawn as if they were one series. Each point is labelled with the
commit it measured. Train images/sec is drawn for every group, MFU where a result has it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from fastcifar import bench, runs
from fastcifar.errors import UserError

# (result, axis title, scale): CPU and GPU speeds differ some 3,000-fold, so only a log axis shows both
FIGURES = (("train_images_per_sec", "train images/sec", "log"), ("mfu", "MFU (of the measured matmul peak)", "linear"))


def collect(folder: Path) -> tuple[dict[tuple, list[dict]], int]:
    """({comparable settings: results by time}, files skipped): the fastcifar-bench/1 files in `folder`."""
    if not folder.is_dir():
        raise UserError(f"--history {folder}: no such folder: give the folder of your bench JSON files")
    groups: dict[tuple, list[dict]] = {}
    skipped = 0
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            skipped += 1
            continue
        if not (isinstance(doc, dict) and doc.get("schema") == bench.SCHEMA
                and "train_images_per_sec" in doc["results"]):
            skipped += 1  # another kind of result (speedrun, profile), or a bench without the train step
            continue
        key = tuple(bench.comparable(doc["settings"]).values())
        groups.setdefault(key, []).append({**doc, "file": path.name})
    if not groups:
        raise UserError(f"--history {folder}: no {bench.SCHEMA} results with train images/sec there: "
                        "write some with `fastcifar bench --json FILE`")
    for results in groups.values():
        results.sort(key=lambda doc: doc["timestamp"])
    return groups, skipped


def label(key: tuple) -> str:
    settings = dict(zip(bench.COMPARABLE, key, strict=True))
    parts = [f"{settings['device_name']}", f"batch {settings['batch_size']}", f"amp {settings['amp']}",
             f"compile {settings['compile']}", f"loader {settings['loader']}"]
    parts += [f"preset {settings['preset']}"] if settings["preset"] else ["preset unrecorded (before 2026-11-29)"]
    parts += [f"{settings['ranks']} ranks"] if settings["ranks"] not in (None, 1) else []
    parts += ["quick"] if settings["quick"] else []
    parts += [] if settings["channels_last"] else ["NCHW"]
    parts += ["CUDA graphs"] if settings["cudagraphs"] else []
    return ", ".join(parts)


def table(groups: dict[tuple, list[dict]]) -> str:
    lines = []
    for key, results in groups.items():
        lines += [f"### {label(key)}", "", "| measured | commit | train images/sec (median, min–max) | MFU | file |",
                  "|---|---|---|---|---|"]
        for doc in results:
            train = doc["results"]["train_images_per_sec"]
            mfu = doc["results"].get("mfu")
            lines.append(f"| {doc['timestamp'][:16].replace('T', ' ')} | {(doc.get('git_sha') or '-')[:9]} | "
                         f"{train['median']:.1f} ({train['min']:.1f}–{train['max']:.1f}) | "
                         f"{'-' if mfu is None else format(mfu['median'], '.2%')} | {doc['file']} |")
        lines.append("")
    return "\n".join(lines)


def draw(groups: dict[tuple, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    fig, axes = plt.subplots(len(FIGURES), 1, figsize=(11, 4 + 3 * len(FIGURES)), sharex=True, squeeze=False)
    for (name, title, scale), ax in zip(FIGURES, axes[:, 0], strict=True):
        for key, results in groups.items():
            points = [(datetime.strptime(doc["timestamp"], "%Y-%m-%dT%H:%M:%S%z"), doc["results"][name]["median"],
                       (doc.get("git_sha") or "-")[:7]) for doc in results if name in doc["results"]]
            if not points:
                continue
            times, values, commits = zip(*points, strict=True)
            ax.plot(times, values, "o-", label=label(key))
            for t, v, commit in points:
                ax.annotate(commit, (t, v), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_ylabel(title)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("fastcifar bench over time, one line per device and settings")
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[-1, 0].xaxis.set_major_formatter(DateFormatter("%Y-%m-%d %H:%M"))
    fig.autofmt_xdate()
    fig.tight_layout()
    runs.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def history(folder: Path) -> tuple[Path, Path, int]:
    """Write history.png and history.md in `folder`; returns their paths and the files skipped."""
    from fastcifar.report import report_available

    if not report_available():
        raise UserError("--history draws with matplotlib: pip install 'fastcifar[report]'")
    groups, skipped = collect(folder)
    png, md = folder / "history.png", folder / "history.md"
    draw(groups, png)
    runs.write_text(md, "# fastcifar bench history\n\n![history](history.png)\n\n" + table(groups))
    return png, md, skipped

"""How often each speed gate cries wolf, and how often it catches a real slowdown.

    python bench/gate-reliability.py --runs 20 --json bench/results/DATE-cpu-gate-reliability.json \
        [--slowdowns 0,0.1,0.2] [--pairs 20] [-- BENCH FLAGS]

For each slowdown f, a temporary worktree of HEAD is made; for f > 0 its train step is wrapped
to sleep f times the step's own time after each step (a step that took t takes (1 + f) t, so
images/sec falls to 1 / (1 + f)). The wrapper is appended to that worktree's copy only: the
product's code never carries it. Then, `--runs` times, in turns over the slowdowns so that the
machine's drift falls on all alike:
- the A/B gate: `fastcifar bench --against HEAD` run from the worktree (HEAD against itself,
  or against its slowed copy);
- the saved-baseline gate: `fastcifar bench --what train` from the worktree, its median train
  images/sec against one saved run of the unchanged tree measured at the start.
Every run's samples are kept, so other rules and thresholds can be judged afterwards from the
same runs: `python bench/gate-reliability.py --analyze FILE` prints how often each rule fails a
run, per slowdown (at 0: false alarms; above: detections), with the pairs' first k for each k.
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastcifar.gate import judge

SLOWDOWN = '''

# Injected by bench/gate-reliability.py into a temporary copy: each train step takes {factor} times as long.
_measured_train_step = train_step


def train_step(*args, **kwargs):
    started = time.perf_counter()
    out = _measured_train_step(*args, **kwargs)
    if out[1].device.type == "cuda":
        torch.cuda.synchronize()
    time.sleep({fraction} * (time.perf_counter() - started))
    return out
'''


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def fastcifar(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastcifar", *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)})


def geometric_mean_below(ratios: list[float], thr: float) -> bool:
    return math.exp(statistics.fmean(math.log(r) for r in ratios)) < 1 - thr


def gate_fails(ratios: list[float], thr: float) -> bool:
    return judge([(1.0, r) for r in ratios], thr)["regressed"]


RULES = {  # name: does the run fail, given its pairs' ratios (current / base) and the threshold?
    "median below 1 - thr, sign interval below 1 (the gate)": gate_fails,
    "geometric mean below 1 - thr (no interval)": geometric_mean_below,
}


def analyze(path: str, thresholds=(0.05,)) -> None:
    results = json.loads(Path(path).read_text())
    slowdowns = list(results["runs"])
    counts = ", ".join(f"{len(results['runs'][f])} runs at {float(f):.0%}" for f in slowdowns)
    print(f"{path}: {counts}")
    print("| gate | rule | pairs | threshold | " + " | ".join(f"fails at {float(f):.0%}" for f in slowdowns) + " |")
    print("|---|---|---|---|" + "---|" * len(slowdowns))
    for thr in thresholds:
        for pairs in sorted({p for p in (6, 10, 14, 20) if p < results["pairs"]} | {results["pairs"]}):
            for name, fails in RULES.items():
                cells = []
                for f in slowdowns:
                    rows = results["runs"][f]
                    failed = sum(fails([s["current"] / s["base"] for s in row["ab"]["samples"][:pairs]], thr)
                                 for row in rows)
                    cells.append(f"{failed}/{len(rows)}")
                print(f"| A/B | {name} | {pairs} | {thr:.0%} | " + " | ".join(cells) + " |")
    for thr in (0.05, 0.10, 0.15):
        cells = []
        for f in slowdowns:
            rows = results["runs"][f]
            cells.append(f"{sum(row['saved_ratio'] < 1 - thr for row in rows)}/{len(rows)}")
        print(f"| saved baseline | median below 1 - thr | – | {thr:.0%} | " + " | ".join(cells) + " |")
    for f in slowdowns:
        ab = [row["ab"]["ratio"] for row in results["runs"][f]]
        saved = [row["saved_ratio"] for row in results["runs"][f]]
        print(f"slowdown {float(f):.0%}: A/B ratio {min(ab):.3f}..{max(ab):.3f} (median {statistics.median(ab):.3f}); "
              f"saved-baseline ratio {min(saved):.3f}..{max(saved):.3f} (median {statistics.median(saved):.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--slowdowns", default="0,0.1,0.2")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--json", help="where the runs go")
    parser.add_argument("--analyze", metavar="FILE", help="judge the runs in FILE by each rule; measure nothing")
    parser.add_argument("bench_flags", nargs="*", help="after --: both gates' bench flags (default: a quick CPU one)")
    args = parser.parse_args()
    if args.analyze:
        analyze(args.analyze)
        return 0
    if not args.json:
        parser.error("--json FILE is needed to measure")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the worktrees are removed below
    flags = args.bench_flags or ["--device", "cpu", "--batch-size", "32"]
    slowdowns = [float(f) for f in args.slowdowns.split(",")]
    repo = Path(git(Path(__file__).parent, "rev-parse", "--show-toplevel"))
    head = git(repo, "rev-parse", "HEAD")
    results = {"schema": "fastcifar-gate-reliability/1", "head": head, "bench_flags": flags, "pairs": args.pairs,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": {str(f): [] for f in slowdowns}}
    with tempfile.TemporaryDirectory(prefix="gate-reliability-") as tmp:
        trees = {}
        for f in slowdowns:
            tree = Path(tmp) / f"slowdown-{f}"
            git(repo, "worktree", "add", "--detach", "--quiet", str(tree), head)
            (tree / "fastcifar" / "kernels").symlink_to(tree / "kernels")
            if f:
                with open(tree / "fastcifar" / "train.py", "a") as source:
                    source.write(SLOWDOWN.format(factor=1 + f, fraction=f))
            trees[f] = tree
        try:
            baseline = Path(tmp) / "baseline.json"
            done = fastcifar(trees[slowdowns[0]], "bench", "--what", "train", *flags, "--json", str(baseline))
            assert done.returncode == 0, done.stderr
            saved = json.loads(baseline.read_text())["results"]["train_images_per_sec"]["median"]
            results["saved_baseline_images_per_sec"] = saved
            for run in range(args.runs):
                for f in slowdowns:
                    row = {}
                    ab_json = Path(tmp) / "ab.json"
                    done = fastcifar(trees[f], "bench", "--against", head, "--pairs", str(args.pairs), *flags,
                                     "--json", str(ab_json))
                    assert done.returncode in (0, 1), done.stderr
                    ab = json.loads(ab_json.read_text())
                    row["ab"] = {**ab["judgement"], "exit": done.returncode, "samples": ab["samples"]}
                    now = Path(tmp) / "now.json"
                    done = fastcifar(trees[f], "bench", "--what", "train", *flags, "--json", str(now))
                    assert done.returncode == 0, done.stderr
                    measured = json.loads(now.read_text())["results"]["train_images_per_sec"]
                    row["saved_ratio"], row["saved_samples"] = measured["median"] / saved, measured["samples"]
                    results["runs"][str(f)].append(row)
                    print(f"run {run + 1}/{args.runs} slowdown {f:.0%}: A/B {row['ab']['ratio']:.3f} "
                          f"[{row['ab']['low']:.3f}, {row['ab']['high']:.3f}] exit {row['ab']['exit']}; "
                          f"saved-baseline ratio {row['saved_ratio']:.3f}", flush=True)
                    Path(args.json).write_text(json.dumps(results, indent=1))  # kept as it grows
        finally:
            for tree in trees.values():
                git(repo, "worktree", "remove", "--force", str(tree))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

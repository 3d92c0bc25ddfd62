"""How often each speed gate cries wolf, and how often it catches a real slowdown.

    python bench/gate-reliability.py --runs 20 --json bench/results/DATE-cpu-gate-reliability.json \
        [--slowdowns 0,0.1,0.2] [--pairs 10] [-- BENCH FLAGS]

For each slowdown f, a temporary worktree of HEAD is made; for f > 0 its train step is wrapped
to sleep f times the step's own time after each step (a step that took t takes (1 + f) t, so
images/sec falls to 1 / (1 + f)). The wrapper is appended to that worktree's copy only: the
product's code never carries it. Then, `--runs` times, in turns over the slowdowns so that the
machine's drift falls on all alike:
- the A/B gate: `fastcifar bench --against HEAD` run from the worktree (HEAD against itself,
  or against its slowed copy);
- the saved-baseline gate: `fastcifar bench --what train` from the worktree, its median train
  images/sec against one saved run of the unchanged tree measured at the start.
Every run's ratio (and the A/B's interval) is kept, so any threshold can be judged afterwards.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--slowdowns", default="0,0.1,0.2")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--json", required=True)
    parser.add_argument("bench_flags", nargs="*", help="after --: both gates' bench flags (default: a quick CPU one)")
    args = parser.parse_args()
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

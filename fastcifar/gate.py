"""`fastcifar bench --against REV`: the speed gate as a same-run A/B against a base revision.

Two figures measured on different days, or on a shared machine at different minutes, differ by
more than the slowdowns worth catching. So the gate measures both sides in one job: REV is
checked out into a temporary git worktree, each side runs in its own worker process (this
module, `python -m fastcifar.gate`, in that side's code), both build the same bench run and warm
up, and then they take turns timing the train step, A B, B A, B A, A B ..., so that drift of the machine
falls on both sides alike. Each pair gives a ratio current / base of images/sec; the gate judges
their median with a 95% interval from the sign test (see `judge`; why not the mean: single turns
on shared cores swing widely, bench/NOTES.md "The speed gates' reliability").

Verdict: REGRESSED (exit 1) when the median is below 1 - max_regression and the interval below
1. Exit 2 when the sides are not comparable (other settings), as with `--compare`.

A worker is given its BenchConfig as one JSON argument, speaks one JSON line per reply on
stdout, prefixed by PREFIX (logs go to stderr), and reads `round` or `quit` on its stdin. A
revision without this module predates the gate; one whose worker takes other arguments (its
PROTOCOL differs) cannot serve as a base.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fastcifar.errors import UserError

SCHEMA = "fastcifar-ab/1"
PREFIX = "fastcifar-gate "
PROTOCOL = 2  # the worker's argument: 1, bench flags; 2, a BenchConfig as JSON
PAIRS = 20  # timed pairs of turns by default
MIN_PAIRS = 6  # fewer cannot give a 95% interval without assuming a distribution
SIGN_LEVEL = 0.025  # each tail of the sign test's interval: 95% in all


def sign_interval(ratios: list[float]) -> tuple[float, float]:
    """A 95% interval for the median of `ratios` that assumes no distribution: the order
    statistics k + 1 and n - k, with k the largest count such that P(Binomial(n, 1/2) <= k) <= 2.5%."""
    ordered, n = sorted(ratios), len(ratios)
    k = max(k for k in range(n // 2) if sum(math.comb(n, i) for i in range(k + 1)) / 2**n <= SIGN_LEVEL)
    return ordered[k], ordered[n - 1 - k]


def judge(pairs: list[tuple[float, float]], max_regression: float) -> dict:
    """The ratio current / base of (base, current) images/sec pairs and the verdict.

    The median of the pairs' ratios, not their mean: a turn that spans a change of the machine's
    speed (on shared machines, bursts of 2x) gives one wild ratio, which a median ignores. REGRESSED
    when the median is below 1 - max_regression (slower by more than the threshold) and the whole
    95% interval below 1 (slower at all, beyond the noise of the pairs)."""
    ratios = [current / base for base, current in pairs]
    low, high = sign_interval(ratios)
    median = statistics.median(ratios)
    return {"ratio": median, "low": low, "high": high, "pairs": len(pairs),
            "geometric_mean": math.exp(statistics.fmean(math.log(r) for r in ratios)),
            "max_regression": max_regression, "regressed": median < 1 - max_regression and high < 1}


def default_base(repo: Path) -> str:
    """The merge base of HEAD with the main branch (main, then master, local or origin's)."""
    for branch in ("main", "origin/main", "master", "origin/master"):
        found = _git(repo, "merge-base", "HEAD", branch, check=False)
        if found:
            return found
    raise UserError("--against: no main or master branch to take the merge base with: name the revision, "
                    "e.g. --against HEAD~1")


def against(rev: str | None, config: dict, pairs: int, max_regression: float, log=print) -> dict:
    """Run the A/B: `rev` (None: the merge base with main) against the code this process runs,
    both with the bench settings `config` (a BenchConfig's fields); returns the result (schema
    fastcifar-ab/1)."""
    import fastcifar

    current_root = Path(fastcifar.__file__).resolve().parent.parent
    repo = Path(_git(current_root, "rev-parse", "--show-toplevel", fix="--against needs fastcifar run from a git "
                     "checkout (pip install -e .)"))
    rev = rev or default_base(repo)
    sha = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not sha:
        raise UserError(f"--against {rev}: no such revision in {repo}: give a commit, branch or tag it has")
    with tempfile.TemporaryDirectory(prefix="fastcifar-ab-") as tmp:
        base_root = Path(tmp) / "base"
        _git(repo, "worktree", "add", "--detach", "--quiet", str(base_root), sha)
        # A cancelled CI job sends SIGTERM: raised as an exception, it still removes the worktree below.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            check_base(base_root, rev, sha)
            return _run_pairs(rev, sha, base_root, current_root, config, pairs, max_regression, log)
        finally:
            _git(repo, "worktree", "remove", "--force", str(base_root), check=False)
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def check_base(root: Path, rev: str, sha: str) -> None:
    gate = root / "fastcifar" / "gate.py"
    if not gate.is_file():
        raise UserError(f"--against {rev}: {sha[:12]} predates the A/B gate (no fastcifar/gate.py there): "
                        "compare against a later revision, or use --compare with a saved baseline")
    if f"\nPROTOCOL = {PROTOCOL} " not in gate.read_text():
        raise UserError(f"--against {rev}: {sha[:12]}'s gate worker takes other arguments than this one's "
                        f"(protocol {PROTOCOL}): compare against a later revision, or use --compare with a saved "
                        "baseline")


def turns(pairs: int) -> list[tuple[str, str]]:
    """Who goes first in each pair: A B, B A, B A, A B, ..., so that a drift of the machine's speed
    within a pair favours neither side over the run."""
    return [("base", "current") if i % 4 in (0, 3) else ("current", "base") for i in range(pairs)]


def _run_pairs(rev: str, sha: str, base_root: Path, current_root: Path, config: dict, pairs: int,
               max_regression: float, log) -> dict:
    from fastcifar import bench, environment

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(base_root), os.environ.get("PYTHONPATH", "")])}
    # One side warms up at a time: on a small machine their compiles would slow each other.
    log(f"A/B: base {rev} ({sha[:12]}) against this tree, {pairs} pairs")
    with Worker("base", config, base_root, env) as base, Worker("current", config, current_root, None) as current:
        differences = bench.settings_differ(base.hello["settings"], current.hello["settings"])
        if base.hello.get("turn_steps") != current.hello["turn_steps"]:  # each side times its own turns
            differences.append(f"steps per turn: {base.hello.get('turn_steps')} vs {current.hello['turn_steps']}")
        samples = []
        if not differences:
            sides = {"base": base, "current": current}
            for i, order in enumerate(turns(pairs)):
                rates = {name: sides[name].round() for name in order}
                samples.append((rates["base"], rates["current"]))
                log(f"pair {i + 1}/{pairs}: base {rates['base']:.1f}, current {rates['current']:.1f} images/s")
    result = {
        "schema": SCHEMA,
        **environment.provenance(),
        "base": {"rev": rev, "sha": sha, "fastcifar": base.hello["fastcifar"]},
        "current": {"sha": environment.git_sha(), "fastcifar": current.hello["fastcifar"]},
        "settings": current.hello["settings"],
        "void": differences,
        "samples": [{"base": b, "current": c} for b, c in samples],
    }
    return {**result, **({"judgement": judge(samples, max_regression)} if samples else {})}


class Worker:
    """One side of the A/B: a `python -m fastcifar.gate` process in that side's code."""

    def __init__(self, name: str, config: dict, root: Path, env: dict | None) -> None:
        self.name, root = name, root.resolve()
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(root), json.dumps(config)], cwd=root,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.hello = self._reply()
            # The right code on each side, kernels included: a path mix-up would compare a tree with itself.
            wrong = [m for m in ("fastcifar", "kernels") if not Path(self.hello[m]).resolve().is_relative_to(root)]
        except BaseException:
            self.process.kill()
            raise
        for module in wrong:
            self.process.kill()
            raise UserError(f"A/B: the {name} side loaded {module} from {self.hello[module]}, not from {root}: "
                                "run the gate from the checkout fastcifar is installed from")

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)

    def round(self) -> float:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return self._reply()["images_per_sec"]

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        self.process.wait()
        raise UserError(f"A/B: the {self.name} side's worker stopped (exit {self.process.returncode}); "
                        "its error is above")


# A worker runs in its side's checkout. Installed, the package maps kernels/ to fastcifar.kernels;
# the base's bare worktree is not installed, so the worker maps it the same way before anything
# imports it (else the installed tree's kernels would be found: the check in Worker catches that).
WORKER = """
import importlib.util, sys
import fastcifar
root, config = sys.argv[1:]
spec = importlib.util.spec_from_file_location("fastcifar.kernels", f"{root}/kernels/__init__.py",
                                              submodule_search_locations=[f"{root}/kernels"])
sys.modules["fastcifar.kernels"] = fastcifar.kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fastcifar.kernels)
from fastcifar.gate import main
main(config)
"""


def serve(config_json: str) -> None:
    """The worker: build the bench run of `config_json` (a BenchConfig's fields), warm up, say
    hello, then time one sample of the train step per `round` line until `quit`."""
    import fastcifar
    from fastcifar import bench, environment
    from fastcifar.config import default_data_root
    from fastcifar.kernels import augment

    values = json.loads(config_json)
    config = bench.BenchConfig(**{**values, "what": tuple(values["what"])})
    context = bench.prepare(config, log=lambda message: print(message, file=sys.stderr),
                            data_root=default_data_root(), compile_cache_dir=fastcifar.USER_COMPILE_CACHE_DIR)
    warm_up, timed, images = bench.train_steps(context, context.plan.turn_steps)
    warm_up()
    device_name = environment.device_name(context.runtime.device)
    _say({"fastcifar": fastcifar.__file__, "kernels": augment.__file__, "turn_steps": context.plan.turn_steps,
          "settings": bench.settings(context, device_name)})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        with bench.Timer(context.runtime.device) as t:
            timed()
        _say({"images_per_sec": images / t.seconds})


def _say(message: dict) -> None:
    print(PREFIX + json.dumps(message), flush=True)


def _git(repo: Path, *args: str, check: bool = True, fix: str = "") -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0 and check:
        raise UserError(f"git {args[0]} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}"
                        + (f": {fix}" if fix else ""))
    return done.stdout.strip() if done.returncode == 0 else ""


def format_result(result: dict) -> str:
    if result["void"]:
        return "comparison void, the sides differ in " + "; ".join(result["void"])
    j = result["judgement"]
    verdict = "REGRESSED" if j["regressed"] else "ok"
    return (f"train images/sec, current / base ({result['base']['rev']}, {result['base']['sha'][:12]}): "
            f"median {j['ratio']:.3f} (95% interval {j['low']:.3f} to {j['high']:.3f}, {j['pairs']} pairs); "
            f"fails when slower by more than {j['max_regression']:.0%} -> {verdict}")


def exit_code(result: dict) -> int:
    return 2 if result["void"] else int(result["judgement"]["regressed"])


def main(config_json: str) -> None:
    """The worker's entry (WORKER): its errors as the CLI's, one line and an exit code."""
    try:
        serve(config_json)
    except UserError as e:
        print(f"fastcifar: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

"""`fastcifar speedrun`: train a preset with several seeds; accuracy and time to result as JSON.

Each seed is a whole `fastcifar train` run (its own run folder under the speedrun folder).
A run's accuracy is its last epoch's test accuracy (with the recipe's test views), never the
best epoch's: picking the best epoch would select on the test set. Its headline time is the time
to that result: the sum of its epoch times, which count training steps only, plus the final
evaluation; compilation with its warm-up, data loading and any evaluations on the way (a
speedrun makes none unless --eval-every asks) are reported apart (see train.py). The seeds
run in one process, so the first seed's compile_seconds is the cold compile and later seeds
reuse its compiled code (theirs are near zero).

An interrupted speedrun continues with `fastcifar speedrun --resume DIR`: the plan in DIR says
what was asked, each finished seed's row is rebuilt from its run folder, and an interrupted
seed resumes from its checkpoint as `fastcifar train --resume` would.
"""

from __future__ import annotations

import re
import shutil
import statistics
import time
from pathlib import Path

from fastcifar import data, environment, runs
from fastcifar.config import SEED_LIMIT, TrainConfig
from fastcifar.errors import UserError
from fastcifar.train import train

SCHEMA = "fastcifar-speedrun/1"
PLAN_FILE = "speedrun.json"  # in the speedrun folder: what was asked, so that `--resume` can finish it
PLAN_SCHEMA = "fastcifar-speedrun-plan/1"


def default_json_path(preset: str, env: dict, folder: Path) -> Path:
    """<folder>/<date>-<device>-<preset>.json; a number is added rather than overwrite a result."""
    # CPU names are long model strings: "cpu" it is, the JSON keeps the full name
    slug = "cpu" if env["device_type"] == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower().replace("nvidia", "")).strip("-")
    stem = f"{time.strftime('%Y-%m-%d')}-{slug}-{preset}"
    path, n = folder / f"{stem}.json", 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    return path


def speedrun(preset: str, config: TrainConfig, seeds: int, out: Path, report, log=print,
             json_path: str | None = None) -> dict:
    """Train `config` with seeds config.seed, config.seed + 1, ...; `report(run_dir, config)` after each run.

    The plan (preset, seeds, config, the asked results file) is written to `out` first, so an
    interrupted speedrun can be continued with `resume(out, ...)`."""
    check_seeds(config.seed, seeds)
    runs.refuse_used(out, "speedrun folder", "pick another --out")  # before any training
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / PLAN_FILE, {"schema": PLAN_SCHEMA, "preset": preset, "seeds": seeds,
                                      "config": config.to_dict(), "json": json_path})
    return _run_seeds(preset, config, seeds, out, report, log)


def check_seeds(first: int, seeds: int) -> None:
    """Refuses a seed count below 1, or seeds past the largest (found before any training, not at the last seed)."""
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    if first + seeds > SEED_LIMIT:
        raise UserError(f"--seed {first} with --seeds {seeds} goes past the largest seed, 2**32 - 1: lower --seed")


def read_plan(out: Path) -> dict:
    """The plan that `speedrun` wrote in `out`."""
    plan = runs.read_json(out / PLAN_FILE, fix=f"is {out} a speedrun folder (`fastcifar speedrun --out`)?")
    if plan.get("schema") != PLAN_SCHEMA:
        raise UserError(f"{out / PLAN_FILE} is not a {PLAN_SCHEMA} plan: was it written by another fastcifar version?")
    return plan


def resume(out: Path, report, log=print, **changes) -> dict:
    """Continue the speedrun in `out`: finished seeds are kept, an interrupted one resumes from its
    checkpoint, the rest train. `changes` (cli.RESUME_FLAGS: the cache, reports, --ema, --eval-every, --cudagraphs)
    are written into the plan, so that a later resume keeps them, as `train --resume` keeps them in
    its checkpoint (else a plain resume would turn off an --ema that the one before it gave)."""
    plan = read_plan(out)
    config = TrainConfig.from_dict(plan["config"]).replace(**changes)
    if changes:
        runs.write_json(out / PLAN_FILE, {**plan, "config": config.to_dict()})
    return _run_seeds(plan["preset"], config, plan["seeds"], out, report, log)


def _run_seeds(preset: str, config: TrainConfig, seeds: int, out: Path, report, log) -> dict:
    results = []
    for seed in range(config.seed, config.seed + seeds):
        run_dir = out / f"seed-{seed}"
        if (run_dir / "summary.json").is_file():  # finished by an earlier process
            log(f"speedrun {preset}: seed {seed} finished earlier, kept")
            results.append(_record(seed, run_dir))
            continue
        # An interrupted seed goes on from its checkpoint; one stopped before its first checkpoint
        # has trained nothing kept, so it starts again.
        resumable = (run_dir / runs.CHECKPOINT_FILE).is_file()
        if run_dir.is_dir() and not resumable:
            shutil.rmtree(run_dir)
        log(f"speedrun {preset}: seed {seed} ({seed - config.seed + 1} of {seeds})"
            + (", resumed from its checkpoint" if resumable else ""))
        train(config.replace(seed=seed, out=str(run_dir)), resume=run_dir if resumable else None, log=log)
        report(run_dir, config)  # before the record: the seed's wall time takes in its report
        results.append(_record(seed, run_dir))
    env = runs.read_json(out / f"seed-{config.seed}" / "env.json")
    config_dict, env = _shareable(config.to_dict(), env)
    return {
        "schema": SCHEMA,
        "preset": preset,
        "device": env["device_name"],
        "data_source": env["data_source"],
        "data_sha256": env["data_sha256"],
        "runs": results,
        "summary": summarize(results),
        **environment.provenance(),
        "config": config_dict,
        "env": env,
    }


# Config keys that name this machine's folders, or differ per seed: not part of a shared result.
LOCAL_KEYS = ("seed", "out", "data_root", "compile_cache_dir", "compile_cache_file")


def _shareable(config: dict, env: dict) -> tuple[dict, dict]:
    """The config and environment as a result file shares them: the data named by file name and
    checksum, not by a path on this machine; whether a compile cache was used, not where."""
    config = {k: v for k, v in config.items() if k not in LOCAL_KEYS}
    if config["source"] is not None:
        config["source"] = data.public_name(config["source"])
    env = {**env, "data_source": data.public_name(env["data_source"]),
           "compile_cache": env["compile_cache"] is not None}
    return config, env


def _record(seed: int, run_dir: Path) -> dict:
    """One seed's row, from its finished run folder."""
    summary = runs.read_json(run_dir / "summary.json")
    metrics = runs.read_metrics(run_dir / "metrics.jsonl")
    return {
        "seed": seed,
        "test_acc": summary["test"]["last_acc"],
        "test_acc_trained": metrics[-1].get("test_acc_trained"),  # with --ema: the weights without the average
        "test_acc_by_epoch": [m["test_acc"] for m in metrics],  # the learning curve, for comparing recipes
        # with --ema, the trained weights' curve; None for an epoch without the average (its test_acc is theirs)
        "test_acc_trained_by_epoch": [m.get("test_acc_trained") for m in metrics],
        # the headline: training and the final evaluation with the recipe's test views, as a user waits for them
        "time_to_result_seconds": summary["time_to_result_seconds"],
        "train_seconds": summary["train_seconds"],
        "final_eval_seconds": summary["final_eval_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "data_seconds": summary["data_seconds"],
        "eval_seconds": summary["eval_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "images_per_sec": sum(m["train_images"] for m in metrics) / summary["train_seconds"],
        "run_dir": run_dir.name,  # inside the speedrun folder
    }


def summarize(results: list[dict]) -> dict:
    """Mean, standard deviation (n - 1; 0 for one run), min and max of each figure over the seeds."""
    out = {"seeds": len(results)}
    keys = ["test_acc", "time_to_result_seconds", "train_seconds", "compile_seconds", "images_per_sec"]
    if all(r.get("test_acc_trained") is not None for r in results):  # every seed averaged its weights
        keys.append("test_acc_trained")
    for key in keys:
        values = [r[key] for r in results]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    return out


def format_result(result: dict) -> str:
    s = result["summary"]
    acc, secs = s["test_acc"], s["time_to_result_seconds"]
    lines = [f"{'seed':>6}{'test acc':>10}{'result s':>10}{'train s':>10}{'compile s':>11}{'wall s':>10}"
             f"{'images/s':>11}"]
    lines += [f"{r['seed']:>6}{r['test_acc']:>10.2%}{r['time_to_result_seconds']:>10.2f}{r['train_seconds']:>10.2f}"
              f"{r['compile_seconds']:>11.1f}"
              f"{r['wall_seconds']:>10.1f}{r['images_per_sec']:>11.0f}" for r in result["runs"]]
    lines.append(
        f"{result['preset']} on {result['device']}, {s['seeds']} seed(s): test acc {acc['mean']:.2%} "
        f"± {acc['std']:.2%} (min {acc['min']:.2%}); time to result {secs['mean']:.2f}s ± {secs['std']:.2f} "
        f"(max {secs['max']:.2f}s: training and the final evaluation, compile and data apart); "
        f"{s['images_per_sec']['mean']:.0f} images/s; data: {result['data_source']}")
    if "test_acc_trained" in s:
        plain = s["test_acc_trained"]
        lines.append(f"the same runs' trained weights, without the average (--ema): test acc {plain['mean']:.2%} "
                     f"± {plain['std']:.2%} (min {plain['min']:.2%})")
    return "\n".join(lines)

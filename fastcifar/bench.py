"""`fastcifar bench`: images/sec, epoch seconds and MFU as self-describing JSON, and the regression gate.

The run is built as `train` builds it (runtime.build_run: the preset's optimizer, param groups
and LR schedule, compiled forward, loader), so the step timed is the recipe's: `train.train_step`
on batches made beforehand (`train`), and `train.train_epoch` over whole loader epochs with the
evaluation after (`epoch`). Data is synthetic so no dataset is needed. Each benchmark is one
function in BENCHMARKS, timed by `measure`: a warm-up first (compilation lands there; its seconds
are reported apart), then `repeats` timed runs with their median, min and max. CUDA work is
timed with CUDA events, CPU work with perf_counter.

MFU = train images/sec x 6 x (multiply-adds per image) / peak FLOP/s: a multiply-add is 2
FLOPs and backward costs twice the forward. Peak is measured in the same run as the best of a
few large matmuls in the training dtype (or in fp32, where that is faster), so MFU is relative
to what this device reaches.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar import compile_cache, dali_loader, data, distributed, environment, runs
from fastcifar.config import PRESETS, TrainConfig
from fastcifar.distributed import SINGLE, Dist
from fastcifar.errors import UserError
from fastcifar.evaluate import predict
from fastcifar.kernels import augment as aug
from fastcifar.loaders import CIFAR_MEAN, CIFAR_STD
from fastcifar.model import ResNet18, train_flops_per_image
from fastcifar.runtime import Run, Runtime, build_run, make_loader, make_scheduler, resolve_runtime
from fastcifar.train import train_epoch, train_step

SCHEMA = "fastcifar-bench/1"
WHAT = ("train", "eval", "loader", "epoch", "kernels")
# Settings that make two results comparable; any difference voids a comparison.
COMPARABLE = ("device_type", "device_name", "ranks", "preset", "batch_size", "amp", "compile", "cudagraphs",
              "channels_last", "loader", "quick")


@dataclass(frozen=True)
class BenchConfig:
    """What `fastcifar bench` measures and how; one field per flag, mapped as TrainConfig's are."""

    what: tuple[str, ...] = WHAT
    preset: str = "reference"  # the recipe whose step is timed (its optimizer, param groups, Nesterov)
    device: str = "auto"
    loader: str = "auto"
    batch_size: int | None = None  # None: the plan's (plan_for)
    compile: bool | None = None  # None: on for CUDA, off for CPU
    cudagraphs: bool = False
    amp: str = "auto"
    channels_last: bool = True
    dali_threads: int = TrainConfig.dali_threads
    dali_prefetch: int = TrainConfig.dali_prefetch
    quick: bool = False  # a few tiny steps: checks the bench, not the speed
    baseline: bool = False  # also the plain way: eager fp32 NCHW, torchvision DataLoader
    scaling: int | None = None  # also the train step under torchrun with 1..N ranks

    def __post_init__(self) -> None:
        unknown = set(self.what) - set(WHAT)
        if unknown or not self.what:
            raise UserError(f"--what: unknown {sorted(unknown)} or empty; choose from {','.join(WHAT)}")
        if self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(sorted(PRESETS))}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.scaling is not None and self.scaling < 2:
            raise UserError("--scaling N compares 1..N ranks: N must be at least 2")
        if self.scaling and self.cudagraphs:  # its ranks are DDP processes, which --cudagraphs refuses
            raise UserError("--scaling times DDP ranks, which run without CUDA graphs: drop --cudagraphs or --scaling")

    def train_config(self, **paths) -> TrainConfig:
        """The preset's recipe run as these settings say, on synthetic data, at 32x32 throughout;
        `paths`: data_root, compile_cache_dir. A preset's low-res epochs are left to `speedrun`,
        whose JSON times each epoch at its side: a bench's images/sec and MFU stay those of the
        full-size step, comparable across presets and with earlier baselines."""
        return PRESETS[self.preset].replace(
            device=self.device, loader=self.loader, compile=self.compile, cudagraphs=self.cudagraphs, amp=self.amp,
            channels_last=self.channels_last, dali_threads=self.dali_threads, dali_prefetch=self.dali_prefetch,
            synthetic=True, low_res=32, low_res_epochs=0, **paths)

    def to_argv(self) -> list[str]:
        """The `fastcifar bench` flags that rebuild this config (those that differ from the defaults)."""
        argv = []
        for field in dataclasses.fields(self):
            value, flag = getattr(self, field.name), "--" + field.name.replace("_", "-")
            if value == field.default:
                continue
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            else:
                argv += [flag, ",".join(value) if field.name == "what" else str(value)]
        return argv


@dataclass(frozen=True)
class BenchPlan:
    batch_size: int
    steps: int  # timed steps per repeat
    repeats: int
    warmup: int  # untimed steps first (their seconds are reported apart: compilation happens there)
    turn_steps: int  # steps in one turn of the A/B gate (gate.py): short turns, so a turn rarely spans a change of
    # the machine's speed
    epoch_images: int
    eval_images: int
    loader_images: int


def plan_for(device: torch.device, quick: bool, batch_size: int | None) -> BenchPlan:
    if quick:
        return BenchPlan(batch_size or 16, steps=1, repeats=3, warmup=1, turn_steps=1, epoch_images=32,
                         eval_images=32, loader_images=512)
    if device.type == "cpu":
        return BenchPlan(batch_size or 64, steps=3, repeats=3, warmup=1, turn_steps=1, epoch_images=512,
                         eval_images=512, loader_images=10_000)
    return BenchPlan(batch_size or 512, steps=20, repeats=5, warmup=3, turn_steps=10, epoch_images=50_000,
                     eval_images=10_000, loader_images=50_000)


class Timer:
    """`with Timer(device) as t:` -> t.seconds of the work inside: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            self.seconds = time.perf_counter() - self._t0


def figure(samples: list[float], unit: str, higher_is_better: bool = True) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "unit": unit,
            "higher_is_better": higher_is_better, "samples": samples}


def measure(fn, device: torch.device, repeats: int, amount: float | None = None, unit: str = "images/s",
            warm_up=None) -> tuple[dict, float]:
    """(figure, warm-up seconds): `warm_up` (default: one call of `fn`) runs first and is timed
    apart, since compilation and first-call costs land there; then `repeats` timed calls of `fn`.
    Each sample is `amount` / seconds (a rate), or seconds when `amount` is None (lower is better)."""
    with Timer(device) as t:
        (warm_up or fn)()
    samples = []
    for _ in range(repeats):
        with Timer(device) as timed:
            fn()
        samples.append(timed.seconds if amount is None else amount / timed.seconds)
    return figure(samples, "s" if amount is None else unit, higher_is_better=amount is not None), t.seconds


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The best matmul rate in `dtype` or fp32. A CPU without native bf16 emulates a bf16 matmul
    at a small fraction of its fp32 rate (about 1/130 on a 2-core Zen 3), while its bf16 convolutions
    run near the fp32 one: the fp32 rate is then the one to compare with."""
    return max(matmul_flops(device, d) for d in {dtype, torch.float32})


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, spent = 0.0, 0.0
    # Best of many: on a 2-core CPU the best of 5 ranged from 75 to 155 GFLOP/s. The time cap is
    # for slow ones (an emulated bf16 matmul there takes 2.5 s).
    for _ in range(20):
        with Timer(device) as t:
            a @ b
        best, spent = max(best, 2 * n**3 / t.seconds), spent + t.seconds
        if spent > 2.0:
            break
    return best


def run(config: BenchConfig, dist: Dist = SINGLE, log=print, **paths) -> dict:
    """Measure `config.what`; `paths` (data_root, compile_cache_dir) place the compile cache.

    Under torchrun (`dist` with several ranks) only the train step is measured, DDP-wrapped, and
    images/sec counts all ranks' images.
    """
    if dist.enabled and (set(config.what) != {"train"} or config.baseline):
        raise UserError("under torchrun, bench measures only --what train (no --baseline)")
    context = prepare(config, dist, log, **paths)
    results: dict[str, dict] = {}
    extra: dict[str, float] = {}
    for name, benchmark in BENCHMARKS:
        if name in config.what or (name == "baseline" and config.baseline):
            figures, notes = benchmark(context)
            results.update(figures)
            extra.update(notes)
    if dist.is_main:
        compile_cache.seal(context.runtime.compile_cache, log)
    if config.baseline and "train_images_per_sec" in results:
        base = results["baseline_train_images_per_sec"]["median"]
        results["speedup_vs_baseline"] = figure(
            [s / base for s in results["train_images_per_sec"]["samples"]], "x")

    env = environment.environment(context.runtime.device, context.dataset)
    return {
        "schema": SCHEMA,
        **environment.provenance(),
        "git_sha": env.pop("git_sha"),
        "environment": env,
        "settings": settings(context, env["device_name"]),
        "flops_per_train_image": train_flops_per_image(context.run.model),
        "extra": extra,
        "results": results,
    }


def settings(c: Context, device_name: str) -> dict:
    """What the figures were measured with; COMPARABLE names the keys two results must share."""
    plan, recipe, runtime = c.plan, c.recipe, c.runtime
    return {
        "device_type": runtime.device.type, "device_name": device_name, "preset": c.config.preset,
        "batch_size": plan.batch_size, "amp": str(runtime.amp_dtype), "compile": runtime.compile,
        "cudagraphs": runtime.cudagraphs, "channels_last": recipe.channels_last, "ranks": c.dist.world,
        "loader": runtime.loader,
        "dali_threads": recipe.dali_threads, "dali_prefetch": recipe.dali_prefetch,
        "quick": c.config.quick, "steps": plan.steps, "repeats": plan.repeats,
        "warmup": plan.warmup, "epoch_images": plan.epoch_images, "eval_images": plan.eval_images,
        "data": c.dataset.source,
    }


def prepare(config: BenchConfig, dist: Dist = SINGLE, log=print, **paths) -> Context:
    """The run the benchmarks time: the preset's recipe at the plan's batch size, built as
    `train` builds it, on synthetic data."""
    recipe = config.train_config(**paths)
    runtime = resolve_runtime(recipe, dist, log)
    plan = plan_for(runtime.device, config.quick, config.batch_size)
    recipe = recipe.replace(batch_size=plan.batch_size)
    train_images = plan.batch_size * (plan.warmup + plan.steps)
    dataset = data.synthetic(train=max(train_images, plan.epoch_images, plan.loader_images), test=plan.eval_images)
    distributed.init(dist, runtime.device)
    test_images, test_labels = (torch.from_numpy(a).to(runtime.device) for a in (dataset.test_images,
                                                                                  dataset.test_labels))
    return Context(config, recipe, runtime, plan, dataset, test_images, test_labels,
                   build_run(recipe, runtime, dataset, dist), dist, log)


@dataclass(frozen=True)
class Context:
    """What every benchmark below is given: the settings and the run they time."""

    config: BenchConfig
    recipe: TrainConfig
    runtime: Runtime
    plan: BenchPlan
    dataset: data.Dataset
    test_images: torch.Tensor  # on the device, as `train` keeps them
    test_labels: torch.Tensor
    run: Run
    dist: Dist
    log: Callable[[str], object]

    def evaluate(self) -> None:
        predict(self.run.forward, self.test_images, self.test_labels, self.recipe.eval_batch_size,
                self.runtime.amp_dtype)


def train_steps(c: Context, timed_steps: int | None = None):
    """(warm-up, timed, images): the recipe's steps on batches made beforehand (the loader is
    timed apart): the plan's warm-up steps, and the `timed_steps` steps (default: the plan's) that
    one sample times, with the images they train on."""
    plan = c.plan
    timed_steps = timed_steps or plan.steps
    batches = list(itertools.islice(c.run.loader.epoch(0), plan.warmup + timed_steps))
    c.run.model.train()

    def steps(part):
        return lambda: [train_step(c.run, images, labels) for images, labels in part]

    return steps(batches[:plan.warmup]), steps(batches[plan.warmup:]), timed_steps * plan.batch_size * c.dist.world


def _bench_train(c: Context) -> tuple[dict, dict]:
    """The train step, and MFU."""
    warm_up, timed, images = train_steps(c)
    speed, warmup_seconds = measure(timed, c.runtime.device, c.plan.repeats, amount=images, warm_up=warm_up)
    peak = measured_peak_flops(c.runtime.device, c.runtime.amp_dtype or torch.float32)
    flops_per_image = train_flops_per_image(c.run.model)
    mfu = figure([s * flops_per_image / peak for s in speed["samples"]], "fraction of measured matmul peak")
    return ({"train_images_per_sec": speed, "mfu": mfu},
            {"warmup_seconds": warmup_seconds, "peak_flops_measured": peak})


def _bench_eval(c: Context) -> tuple[dict, dict]:
    speed, first = measure(c.evaluate, c.runtime.device, c.plan.repeats, amount=c.plan.eval_images)
    return {"eval_images_per_sec": speed}, {"first_eval_seconds": first}


def _bench_epoch(c: Context) -> tuple[dict, dict]:
    """Whole epochs as `train` runs them: train_epoch over a loader epoch (augmentation, steps, LR
    schedule), then the evaluation. The first epoch warms up the epoch's own batch shapes."""
    recipe = c.recipe.replace(epochs=c.plan.repeats + 1)
    loader = make_loader(c.runtime.loader, c.dataset.head(c.plan.epoch_images, None), recipe, c.runtime, SINGLE)
    # the same compiled model, with a loader and an LR schedule of its own
    epoch_run = dataclasses.replace(c.run, config=recipe, loader=loader,
                                    scheduler=make_scheduler(c.run.optimizer, recipe, loader.batches_per_epoch))
    epochs = iter(range(recipe.epochs))

    def epoch() -> None:
        train_epoch(epoch_run, next(epochs))
        c.evaluate()

    seconds, _ = measure(epoch, c.runtime.device, c.plan.repeats)
    return {"epoch_seconds": seconds}, {}


def augment_inputs(n: int, device: torch.device) -> tuple:
    """The augmentation kernel's arguments for `n` random images: images, order, per-image
    parameters, mean, std, padding, cutout, output dtype."""
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device)
    params = torch.randint(0, 9, (n, 5), dtype=torch.int32, device=device)
    return (images, torch.randperm(n, device=device), params, list(CIFAR_MEAN), list(CIFAR_STD), 4, 16,
            torch.bfloat16)


def _bench_kernels(c: Context) -> tuple[dict, dict]:
    """The fused augmentation kernel against its torch reference (the kernel only on CUDA)."""
    device = c.runtime.device
    n = 50_000 if device.type == "cuda" else 4096
    args = augment_inputs(n, device)
    candidates = {"augment_reference": aug.augment_reference}
    if device.type == "cuda" and aug.triton is not None:
        candidates["augment_triton"] = aug.augment_triton
    out = {}
    for name, fn in candidates.items():
        out[f"{name}_images_per_sec"], _ = measure(lambda fn=fn: fn(*args), device, c.plan.repeats, amount=n)
    return out, {}


def _bench_loaders(c: Context) -> tuple[dict, dict]:
    """Whole epochs of each loader side by side, batches delivered on the device; the first epoch warms up."""
    device, dataset = c.runtime.device, c.dataset.head(c.plan.loader_images, None)
    candidates = {"torch": make_loader("torch", dataset, c.recipe, c.runtime, SINGLE)}
    if dali_loader.dali_available():
        candidates["dali"] = make_loader("dali", dataset, c.recipe, c.runtime, SINGLE)
    else:
        c.log("bench: DALI is not installed, so its loader is not timed (pip install 'fastcifar[dali]')")
    torchvision_loader = _torchvision_loader(dataset, c.plan.batch_size, device)
    out = {}
    for name, loader in [*candidates.items(), ("torchvision", None)]:
        epochs = itertools.count()

        def epoch(loader=loader, epochs=epochs) -> None:
            for images, _ in torchvision_loader if loader is None else loader.epoch(next(epochs)):
                images.to(device, non_blocking=True)  # a no-op for loaders already on the device

        out[f"loader_{name}_images_per_sec"], _ = measure(epoch, device, c.plan.repeats,
                                                          amount=len(dataset.train_labels))
    return out, {}


def _torchvision_loader(dataset: data.Dataset, batch_size: int, device: torch.device):
    """The usual way: a DataLoader over the uint8 images with torchvision transforms, one worker per core."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class Images(Dataset):
        def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(self.images[i]), int(self.labels[i])

    transform = transforms.Compose([
        transforms.ToTensor(), transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD), transforms.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1, 1)),
    ])
    return DataLoader(Images(dataset.train_images, dataset.train_labels, transform), batch_size=batch_size,
                      shuffle=True, num_workers=os.cpu_count() or 1, pin_memory=device.type == "cuda",
                      persistent_workers=True)


def _bench_baseline(c: Context) -> tuple[dict, dict]:
    """The plain way: eager fp32 NCHW model fed by a torchvision DataLoader with the usual
    transforms, and plain SGD."""
    device, plan = c.runtime.device, c.plan
    count = plan.batch_size * (plan.warmup + plan.steps * plan.repeats)
    batches = iter(_torchvision_loader(data.synthetic(train=count, test=1), plan.batch_size, device))
    model = ResNet18().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def steps(k: int):
        def run_steps() -> None:
            for _ in range(k):
                images, labels = next(batches)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                F.cross_entropy(model(images), labels).backward()  # the plain way: fp32, eager, no tricks
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run_steps

    speed, _ = measure(steps(plan.steps), device, plan.repeats, amount=plan.steps * plan.batch_size,
                       warm_up=steps(plan.warmup))
    return {"baseline_train_images_per_sec": speed}, {}


# In the order they run: the train step first, while the device is fresh.
BENCHMARKS = (("train", _bench_train), ("eval", _bench_eval), ("loader", _bench_loaders), ("epoch", _bench_epoch),
              ("kernels", _bench_kernels), ("baseline", _bench_baseline))


def scaling(config: BenchConfig, log=print) -> dict:
    """Train images/sec for 1..config.scaling processes, each run under torchrun with every other
    setting of `config`, and the efficiency against one rank: images/sec(k) / (k x images/sec(1))."""
    child = dataclasses.replace(config, what=("train",), baseline=False, scaling=None).to_argv()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in range(1, config.scaling + 1):
            out = Path(tmp) / f"{ranks}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_port", str(29600 + ranks), "-m", "fastcifar", "bench", *child, "--json", str(out)]
            log(f"scaling: {ranks} rank(s)")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"scaling run with {ranks} rank(s) failed: {done.stderr.strip().splitlines()[-1:]}")
            rows.append(runs.read_json(out)["results"]["train_images_per_sec"])
    one = rows[0]["median"]
    return {
        **{f"train_images_per_sec_{k}_ranks": row for k, row in enumerate(rows, start=1)},
        **{f"scaling_efficiency_{k}_ranks": figure([s / (k * one) for s in row["samples"]], "fraction of linear")
           for k, row in enumerate(rows, start=1)},
    }


# --- the regression gate ----------------------------------------------------------------------


def comparable(settings: dict) -> dict:
    """The COMPARABLE settings of a result."""
    return {k: settings.get(k) for k in COMPARABLE}


def settings_differ(baseline: dict, current: dict) -> list[str]:
    """'key: baseline vs current' for each COMPARABLE setting that differs."""
    old, new = comparable(baseline), comparable(current)
    return [f"{k}: {old[k]} vs {new[k]}" for k in COMPARABLE if old[k] != new[k]]


def compare(baseline: dict, current: dict, max_regression: float) -> tuple[int, str]:
    """(exit code, table): 0 when no figure regressed more than `max_regression`, 1 when one did
    or is missing from `current`, 2 when the two runs are not comparable (different device or settings)."""
    differences = settings_differ(baseline["settings"], current["settings"])
    if differences:
        return 2, "comparison void, the runs differ in " + "; ".join(differences)
    rows = [f"{'figure':<34}{'baseline':>14}{'current':>14}{'change':>9}  verdict"]
    worst = 0
    for name, base in baseline["results"].items():
        if name not in current["results"]:  # not measured this time: the gate cannot vouch for it
            rows.append(f"{name:<34}{base['median']:>14.4g}{'-':>14}{'':>9}  MISSING")
            worst = 1
            continue
        b, c = base["median"], current["results"][name]["median"]
        change = (c - b) / b if b else 0.0
        regression = -change if base["higher_is_better"] else change
        verdict = "REGRESSED" if regression > max_regression else "ok"
        worst = max(worst, int(verdict == "REGRESSED"))
        rows.append(f"{name:<34}{b:>14.4g}{c:>14.4g}{change:>+9.1%}  {verdict}")
    rows.append(f"threshold: {max_regression:.0%} regression" + ("; FAILED" if worst else "; passed"))
    return worst, "\n".join(rows)


def load(path: str) -> dict:
    fix = "pass a file written by `fastcifar bench --json FILE`"
    doc = runs.read_json(Path(path), fix=fix)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a {SCHEMA} file: {fix}")
    return doc


def format_results(result: dict) -> str:
    lines = [f"{result['settings']['device_name']} ({result['settings']['device_type']}), "
             f"batch {result['settings']['batch_size']}, amp {result['settings']['amp']}, "
             f"compile {result['settings']['compile']}, loader {result['settings']['loader']}"
             + (", CUDA graphs" if result["settings"].get("cudagraphs") else "")]
    for name, f in result["results"].items():
        lines.append(f"  {name:<34}{f['median']:>12.4g} {f['unit']}  (min {f['min']:.4g}, max {f['max']:.4g})")
    for name, value in result["extra"].items():
        lines.append(f"  {name:<34}{value:>12.4g}")
    return "\n".join(lines)

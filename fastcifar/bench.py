"""`fastcifar bench`: images/sec, epoch seconds and MFU as self-describing JSON, and the regression gate.

Timing: warm-up (and compilation, reported on its own) first, then `repeats` timed runs; the
median, min and max are reported. CUDA work is timed with CUDA events, CPU work with
perf_counter. Data is synthetic so no dataset is needed.

MFU = train images/sec x 6 x (multiply-adds per image) / peak FLOP/s: a multiply-add is 2
FLOPs and backward costs twice the forward. Peak is measured in the same run as the best of a
few large matmuls in the training dtype, so MFU is relative to what this device reaches.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar import data, distributed, runs
from fastcifar.config import TrainConfig
from fastcifar.distributed import SINGLE, Dist
from fastcifar.errors import UserError
from fastcifar.evaluate import predict
from fastcifar.loaders import CIFAR_MEAN, CIFAR_STD
from fastcifar.model import ResNet18, train_flops_per_image

SCHEMA = "fastcifar-bench/1"
WHAT = ("train", "eval", "loader", "epoch", "kernels")
# Settings that make two results comparable; any difference voids a comparison.
COMPARABLE = ("device_type", "device_name", "ranks", "batch_size", "amp", "compile", "channels_last", "loader", "quick")


@dataclass(frozen=True)
class BenchPlan:
    batch_size: int
    steps: int  # timed steps per repeat
    repeats: int
    warmup: int
    epoch_images: int
    eval_images: int
    loader_images: int


def plan_for(device: torch.device, quick: bool, batch_size: int | None) -> BenchPlan:
    if quick:
        return BenchPlan(batch_size or 16, steps=1, repeats=3, warmup=1, epoch_images=32, eval_images=32,
                         loader_images=512)
    if device.type == "cpu":
        return BenchPlan(batch_size or 64, steps=3, repeats=3, warmup=1, epoch_images=512, eval_images=512,
                         loader_images=10_000)
    return BenchPlan(batch_size or 512, steps=20, repeats=5, warmup=3, epoch_images=50_000, eval_images=10_000,
                     loader_images=50_000)


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


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        with Timer(device) as t:
            a @ b
        best = max(best, 2 * n**3 / t.seconds)
    return best


def run(config: TrainConfig, what: tuple[str, ...], quick: bool, baseline: bool, batch_size: int | None = None,
        dist: Dist = SINGLE, log=print) -> dict:
    """Measure `what` with the model and loader `config` selects; `batch_size` None: the plan's.

    Under torchrun (`dist` with several ranks) only the train step is measured, DDP-wrapped, and
    images/sec counts all ranks' images.
    """
    if dist.enabled and (set(what) != {"train"} or baseline):
        raise UserError("under torchrun, bench measures only --what train (no --baseline)")
    from fastcifar.train import make_forward, make_loader, make_model, resolve, train_step

    runtime = resolve(config, dist, log)
    device = runtime.device
    plan = plan_for(device, quick, batch_size)
    config = config.replace(batch_size=plan.batch_size)
    dtype = runtime.amp_dtype or torch.float32
    train_images = plan.batch_size * (plan.warmup + plan.steps * plan.repeats)
    dataset = data.synthetic(train=max(train_images, plan.epoch_images, plan.loader_images), test=plan.eval_images)
    results: dict[str, dict] = {}
    extra: dict[str, float] = {}

    distributed.init(dist, device)
    model = make_model(10, config, device)
    flops_per_image = train_flops_per_image(model)
    forward = make_forward(model, runtime, dist)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                                fused=device.type == "cuda")
    loader = make_loader(runtime.loader, dataset, config, runtime, dist)

    def step(images, labels):
        train_step(forward, optimizer, images, labels, runtime.amp_dtype)

    batches = list(itertools.islice(loader.epoch(0), plan.warmup + plan.steps))
    if "train" in what or "epoch" in what:
        model.train()
        with Timer(device) as t:
            step(*batches[0])
        extra["first_step_seconds"] = t.seconds  # includes compilation when compiling
        for images, labels in batches[1:plan.warmup]:
            step(images, labels)
        samples = []
        for _ in range(plan.repeats):
            with Timer(device) as t:
                for images, labels in batches[plan.warmup:plan.warmup + plan.steps]:
                    step(images, labels)
            samples.append(plan.steps * plan.batch_size * dist.world / t.seconds)
        results["train_images_per_sec"] = figure(samples, "images/s")
        peak = measured_peak_flops(device, dtype)
        extra["peak_flops_measured"] = peak
        results["mfu"] = figure([s * flops_per_image / peak for s in samples], "fraction of measured matmul peak")

    test_images = torch.from_numpy(dataset.test_images).to(device)
    test_labels = torch.from_numpy(dataset.test_labels).to(device)
    if "eval" in what or "epoch" in what:
        with Timer(device) as t:
            predict(forward, test_images, test_labels, config.eval_batch_size, runtime.amp_dtype)
        extra["first_eval_seconds"] = t.seconds
        samples = []
        for _ in range(plan.repeats):
            with Timer(device) as t:
                predict(forward, test_images, test_labels, config.eval_batch_size, runtime.amp_dtype)
            samples.append(plan.eval_images / t.seconds)
        results["eval_images_per_sec"] = figure(samples, "images/s")

    if "loader" in what:
        results.update(_bench_loaders(dataset.head(plan.loader_images, None), config, runtime, plan, log))

    if "epoch" in what:
        epoch_loader = make_loader(runtime.loader, dataset.head(plan.epoch_images, None), config, runtime,
                                   SINGLE)
        samples = []
        for epoch in range(plan.repeats + 1):
            model.train()
            with Timer(device) as t:
                for images, labels in epoch_loader.epoch(epoch):
                    step(images, labels)
                predict(forward, test_images, test_labels, config.eval_batch_size, runtime.amp_dtype)
            samples.append(t.seconds)
        results["epoch_seconds"] = figure(samples[1:], "s", higher_is_better=False)  # the first re-warms shapes

    if "kernels" in what:
        results.update(_bench_kernels(device, plan))

    if baseline:
        base = _torchvision_baseline(device, plan)
        results["baseline_train_images_per_sec"] = base
        if "train_images_per_sec" in results:
            results["speedup_vs_baseline"] = figure(
                [s / base["median"] for s in results["train_images_per_sec"]["samples"]], "x")

    env = runs.environment(device, dataset.source)
    return {
        "schema": SCHEMA,
        **runs.provenance(),
        "git_sha": env.pop("git_sha"),
        "environment": env,
        "settings": {
            "device_type": device.type, "device_name": env["device_name"], "batch_size": plan.batch_size,
            "amp": str(runtime.amp_dtype), "compile": runtime.compile, "channels_last": config.channels_last,
            "ranks": dist.world, "loader": runtime.loader, "dali_threads": config.dali_threads,
            "dali_prefetch": config.dali_prefetch,
            "quick": quick, "steps": plan.steps, "repeats": plan.repeats,
            "warmup": plan.warmup, "epoch_images": plan.epoch_images, "eval_images": plan.eval_images,
            "data": dataset.source,
        },
        "flops_per_train_image": flops_per_image,
        "extra": extra,
        "results": results,
    }


def _bench_kernels(device: torch.device, plan: BenchPlan) -> dict:
    """The fused augmentation kernel against its torch reference (the kernel only on CUDA)."""
    from fastcifar.kernels import augment as aug

    n = 50_000 if device.type == "cuda" else 4096
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device)
    indices = torch.randperm(n, device=device)
    params = torch.randint(0, 9, (n, 5), dtype=torch.int32, device=device)
    candidates = {"augment_reference": aug.augment_reference}
    if device.type == "cuda" and aug.triton is not None:
        candidates["augment_triton"] = aug.augment_triton
    out = {}
    for name, fn in candidates.items():
        args = (images, indices, params, list(CIFAR_MEAN), list(CIFAR_STD), 4, 16, torch.bfloat16)
        fn(*args)
        samples = []
        for _ in range(plan.repeats):
            with Timer(device) as t:
                fn(*args)
            samples.append(n / t.seconds)
        out[f"{name}_images_per_sec"] = figure(samples, "images/s")
    return out


def _bench_loaders(dataset: data.Dataset, config: TrainConfig, runtime, plan: BenchPlan, log) -> dict:
    """Whole epochs of each loader side by side, batches delivered on the device."""
    from fastcifar.dali_loader import dali_available
    from fastcifar.train import make_loader

    device = runtime.device
    candidates = {"torch": make_loader("torch", dataset, config, runtime, SINGLE)}
    if dali_available():
        candidates["dali"] = make_loader("dali", dataset, config, runtime, SINGLE)
    else:
        log("bench: DALI is not installed, so its loader is not timed (pip install 'fastcifar[dali]')")
    torchvision_loader = _torchvision_loader(dataset, plan.batch_size, device)
    out = {}
    for name, loader in [*candidates.items(), ("torchvision", None)]:
        samples = []
        for epoch in range(plan.repeats + 1):
            count = 0
            with Timer(device) as t:
                for images, labels in torchvision_loader if loader is None else loader.epoch(epoch):
                    images.to(device, non_blocking=True)  # a no-op for loaders already on the device
                    count += len(labels)
            samples.append(count / t.seconds)
        out[f"loader_{name}_images_per_sec"] = figure(samples[1:], "images/s")  # the first warms up
    return out


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


def _torchvision_baseline(device: torch.device, plan: BenchPlan) -> dict:
    """The plain way: eager fp32 NCHW model fed by a torchvision DataLoader with the usual transforms."""
    from fastcifar.train import train_step

    count = plan.batch_size * (plan.warmup + plan.steps * plan.repeats)
    loader = _torchvision_loader(data.synthetic(train=count, test=1), plan.batch_size, device)
    model = ResNet18().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = iter(loader)

    def run_steps(k: int) -> None:
        for _ in range(k):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            train_step(model, optimizer, images, labels, None)

    run_steps(plan.warmup)
    samples = []
    for _ in range(plan.repeats):
        with Timer(device) as t:
            run_steps(plan.steps)
        samples.append(plan.steps * plan.batch_size / t.seconds)
    return figure(samples, "images/s")


def scaling(max_ranks: int, bench_args: list[str], log=print) -> dict:
    """Train images/sec for 1..max_ranks processes, each run under torchrun, and the efficiency
    against one rank: images/sec(k) / (k x images/sec(1))."""
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in range(1, max_ranks + 1):
            out = Path(tmp) / f"{ranks}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_port", str(29600 + ranks), "-m", "fastcifar", "bench", "--what", "train",
                   *bench_args, "--json", str(out)]
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


def compare(baseline: dict, current: dict, max_regression: float) -> tuple[int, str]:
    """(exit code, table): 0 when no figure regressed more than `max_regression`, 1 when one did
    or is missing from `current`, 2 when the two runs are not comparable (different device or settings)."""
    differences = [f"{k}: {baseline['settings'].get(k)} vs {current['settings'].get(k)}"
                   for k in COMPARABLE if baseline["settings"].get(k) != current["settings"].get(k)]
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
             f"compile {result['settings']['compile']}, loader {result['settings']['loader']}"]
    for name, f in result["results"].items():
        lines.append(f"  {name:<34}{f['median']:>12.4g} {f['unit']}  (min {f['min']:.4g}, max {f['max']:.4g})")
    for name, value in result["extra"].items():
        lines.append(f"  {name:<34}{value:>12.4g}")
    return "\n".join(lines)

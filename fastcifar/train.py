"""The training loop: one config in, one run folder out.

`train` below is the whole run, top to bottom: resolve the runtime, load the data, build the
run (runtime.py), warm up (compile), then per epoch `train_epoch`, evaluate, write a metrics
line and, every `checkpoint_every` epochs, a checkpoint. A step is `train_step`: bf16 autocast
forward, loss, backward, the optimizer's step (then the lookahead's and the average's, when on),
then the OneCycle LR step. Loss and accuracy are summed on the device and read once per epoch.
SIGINT/SIGTERM finish the step, save and stop.

Epoch seconds count training alone. The rest of the wall time is timed apart (`WallClock`) and
written to summary.json, so that the parts add up to `wall_seconds`: data loading, compilation
with the warm-up that triggers it, evaluation, checkpoints, and `other` (building the model and
loader, logging); the CLI adds the report's seconds after it. A resumed run adds up all its processes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from tqdm import tqdm

from fastcifar import checkpoints, compile_cache, distributed, environment, muon, runs
from fastcifar import data as data_mod
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.evaluate import evaluate, predict, views
from fastcifar.loaders import batch_bounds, downscale
from fastcifar.model import ResNet18
from fastcifar.runtime import Run, Runtime, build_run, load_dataset, resolve_runtime

INTERRUPTED_EXIT = 130


class Interrupted(Exception):
    """Raised after a clean stop on SIGINT/SIGTERM; the checkpoint is saved."""

    exit_code = INTERRUPTED_EXIT


class NonFiniteLoss(UserError):
    exit_code = 3


def train(config: TrainConfig, dist: distributed.Dist = distributed.SINGLE, resume: Path | None = None,
          log=print, stop: Callable[[], bool] | None = None,
          network: Callable[[int], torch.nn.Module] = ResNet18) -> Path | None:
    """Train per `config`; returns the run folder (None on ranks other than 0, which write no files).
    `resume` continues the run in that folder.
    `stop` is asked after each step whether to save and raise Interrupted (default: whether a
    SIGINT or SIGTERM came). `network(classes)` builds the model: the reference ResNet18, which
    eval and the report load back; tests of the loop pass a tiny one."""
    started = time.perf_counter()
    say = log if dist.is_main else (lambda *_: None)
    runtime = resolve_runtime(config, dist, say)
    if config.device == "auto" and runtime.device.type == "cpu":  # so that nobody waits hours without knowing why
        say("device: cpu, no CUDA GPU is visible: a whole run takes hours on a CPU (--subset N trains on fewer "
            "images; --device cpu drops this note)")
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(config.deterministic)  # process-wide: set either way, for the next run
    torch.backends.cudnn.benchmark = runtime.device.type == "cuda" and not config.deterministic
    state = checkpoints.load_checkpoint(resume) if resume else None
    if state is not None and state["world"] != dist.world:  # its steps and LR schedule are per rank count
        raise UserError(f"{resume} was trained by {state['world']} process(es), this is {dist.world}: resume it with "
                        f"{runs.train_command(state['world'])} --resume {resume}")
    if state is not None and state["epoch"] >= config.epochs:
        raise UserError(f"{resume} has finished its {config.epochs} epochs, there is nothing to resume: "
                        f"`fastcifar report {resume}` rewrites its report; a longer run is a new `fastcifar train`")
    clock = WallClock(started, None if state is None else state["seconds"])
    distributed.init(dist, runtime.device)
    try:
        with StopFlag() as flag:
            with clock.part("data"):
                dataset = _load_once(config, dist, say)  # before the run folder: bad data leaves no folder behind
            run_dir = Path(resume) if resume else None
            if dist.is_main and run_dir is None:
                run_dir = runs.create_run_dir(config.out)
            graphs_before, cache_before = counters["stats"]["unique_graphs"], compile_cache.counts()
            if dist.is_main:
                _write_run_files(run_dir, config, runtime, dataset, dist.world)
            if dataset.synthetic:
                say(f"data: {dataset.source}")
            run = build_run(config, runtime, dataset, dist, state, network)
            metrics, start_epoch, start_step, partial = [], 0, 0, None
            if state is not None:
                metrics, start_epoch, start_step = state["metrics"], state["epoch"], state["step"]
                partial = state["partial"]
                _set_rng_state(state["rng"])
                say(f"resuming at epoch {start_epoch + 1}, step {start_step}")
            test_images = torch.from_numpy(dataset.test_images).to(runtime.device)
            test_labels = torch.from_numpy(dataset.test_labels).to(runtime.device)
            if runtime.compile or runtime.device.type == "cuda":  # compiling, or cuDNN choosing its kernels
                with clock.part("compile"):
                    warm_up_run(run, len(dataset.train_labels), test_images, test_labels, start_epoch, say)
                say(f"compile and warm-up: {clock.spent['compile']:.1f}s (not counted in epoch times)")

            def checkpoint(epoch: int, step: int, partial_epoch: dict | None) -> None:
                if dist.is_main:
                    with clock.part("checkpoint"):
                        checkpoints.save_checkpoint(run_dir / runs.CHECKPOINT_FILE, _checkpoint_state(
                            run, dataset, metrics, epoch, step, partial_epoch, clock.so_far()))

            def test_pass(final: bool) -> dict:  # the test set through the forward, with the weights it holds now
                # the recipe's test views give the result; a reading on the way, for the curve, takes the image alone
                tta, shift = (config.tta, config.tta_shift) if final else (False, 0)
                return {**evaluate(run.forward, test_images, test_labels, config.eval_batch_size, runtime.amp_dtype,
                                   tta, shift), "views": len(views(tta, shift))}

            stop_every = distributed.stop_check_every(runtime.device)
            stop_requested = stop or (lambda: flag.requested)
            for epoch in range(start_epoch, config.epochs):
                first = start_step if epoch == start_epoch else 0
                # Counts this process's images, so its rate is images/sec per rank.
                with tqdm(desc=f"epoch {epoch + 1}/{config.epochs}", unit="img", leave=False,
                          disable=None if dist.is_main else True) as bar:
                    stats = train_epoch(run, epoch, first, partial if first else None, on_step=bar.update,
                                        stop=lambda step: distributed.stop_agreed(dist, stop_requested(), step,
                                                                                  stop_every, runtime.device))
                if stats.stopped_at is not None:
                    checkpoint(epoch, stats.stopped_at, stats.partial())
                    say(f"interrupted in epoch {epoch + 1} after step {stats.stopped_at}; checkpoint saved. "
                        f"Resume with: {runs.train_command(dist.world)} --resume {run_dir}")
                    raise Interrupted
                final = epoch + 1 == config.epochs
                test = trained = None
                if final or (config.eval_every and (epoch + 1) % config.eval_every == 0):
                    with run.ema.swapped_in() if run.ema else contextlib.nullcontext():
                        test = test_pass(final)
                    # With --ema the trained weights too: the average does not change what is trained, so the
                    # two readings of one run measure what the average adds, free of seed noise.
                    trained = test_pass(final) if run.ema else None
                metrics.append(epoch_metrics(epoch, config.image_side(epoch), stats, test, trained))
                if dist.is_main:
                    runs.write_metrics(run_dir / "metrics.jsonl", metrics)
                    say(format_epoch(metrics[-1], config.epochs))
                if final or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
                    checkpoint(epoch + 1, 0, None)
            if dist.is_main:
                summary = {**runs.summarize(metrics), **runs.wall_parts(clock.so_far(), metrics),
                           "compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before,
                           "compile_cache": {"dir": runtime.compile_cache, **compile_cache.since(cache_before)}}
                runs.write_json(run_dir / "summary.json", summary)
                say(runs.format_summary(summary))
            return run_dir
    finally:
        distributed.shutdown(dist)


@dataclass(frozen=True)
class EpochStats:
    sums: list[float]  # over all ranks: loss x images, correct predictions, images
    lr: float  # the LR the epoch started with
    seconds: float  # training seconds, with the part before a resume
    stopped_at: int | None = None  # the step after which `stop` ended the epoch; None: it finished

    @property
    def images(self) -> int:
        return int(self.sums[2])

    def partial(self) -> dict:
        """The checkpoint's record of an epoch cut off, which `train_epoch` resumes from."""
        return {"sums": self.sums, "lr": self.lr, "seconds": self.seconds}


def train_epoch(run: Run, epoch: int, start_step: int = 0, resumed: dict | None = None,
                stop: Callable[[int], bool] = lambda step: False,
                on_step: Callable[[int], object] = lambda images: None) -> EpochStats:
    """Epoch `epoch` (from 0) from batch `start_step` on; `resumed` (`EpochStats.partial()` of the
    epoch's first part) carries on its sums and seconds. After each step `on_step` is told its
    image count (the progress bar) and `stop(step)`, True on every rank alike, ends the epoch
    there. The host waits for the device once, at the end."""
    device = run.runtime.device
    resumed = resumed or {"sums": [0.0, 0.0, 0.0], "lr": run.scheduler.get_last_lr()[0], "seconds": 0.0}
    # A checkpoint holds the sums over all ranks: rank 0 resumes with them, the others from zero.
    sums = torch.tensor(resumed["sums"] if run.dist.is_main else [0.0, 0.0, 0.0], device=device, dtype=torch.float64)
    side = run.config.image_side(epoch)
    bad_step = torch.tensor(-1, device=device)
    stopped_at = None
    run.model.train()
    started = time.perf_counter() - resumed["seconds"]
    frozen, before = run.frozen(epoch), epoch * run.loader.batches_per_epoch  # steps of the earlier epochs
    for step, (images, labels) in enumerate(run.loader.epoch(epoch, start_step), start=start_step + 1):
        logits, loss = train_step(run, downscale(images, side), labels, frozen, before + step)
        run.scheduler.step()
        detached = loss.detach().float()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(detached), step, bad_step)
        add_step_stats(sums, detached, logits, labels)
        on_step(len(labels))
        if stop(step):
            stopped_at = step
            break
    totals = distributed.all_sum(run.dist, sums).tolist()  # the one host sync of the epoch, on every rank
    seconds = time.perf_counter() - started
    _check_finite(bad_step, epoch)
    return EpochStats(totals, resumed["lr"], seconds, stopped_at)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, frozen: tuple[torch.Tensor, ...] = (),
               step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of the run's recipe; returns (logits, loss) without reading them on the
    host: bf16 autocast forward, loss with the recipe's label smoothing, backward, the `frozen`
    parameters' gradient dropped (so the optimizer leaves them, their momentum and their weight
    decay alone), the optimizer's step, then with --lookahead its pull toward the slow weights
    (`step`: the run's step, from 1; a benchmark gives none) and with --ema the average's update.
    The LR schedule's step is the caller's: a benchmark times steps past the schedule's end."""
    amp_dtype = run.runtime.amp_dtype
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = run.forward(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=run.config.label_smoothing)
    loss.backward()
    for p in frozen:
        p.grad = None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.lookahead and step is not None:
        run.lookahead.after_step(step)
    if run.ema:
        run.ema.update()
    return logits, loss


def add_step_stats(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """sums += (loss × batch size, correct predictions, batch size), without a host sync."""
    correct = (logits.argmax(1) == labels).sum()
    # full_like, not torch.tensor(len(labels), device=...): that copy from the host waits for the GPU
    sums += torch.stack([loss * len(labels), correct, torch.full_like(correct, len(labels))]).double()


def _check_finite(bad_step: torch.Tensor, epoch: int) -> None:
    step = int(bad_step.item())
    if step >= 0:
        raise NonFiniteLoss(f"loss became NaN/inf in epoch {epoch + 1} at step {step}; the last checkpoint is kept. "
                            "Lower --lr or check the data")


def epoch_metrics(epoch: int, side: int, stats: EpochStats, test: dict | None, trained: dict | None = None) -> dict:
    """metrics.jsonl's line for an epoch; `test`: the evaluation (None: the epoch had none, and its
    test fields are null); `trained`: with --ema, the trained weights' evaluation (`test` is the
    average's), as test_loss_trained and test_acc_trained."""
    loss_sum, correct, images = stats.sums
    return {
        "epoch": epoch + 1,
        "lr": stats.lr,
        "image_side": side,
        "train_loss": loss_sum / images,
        "train_acc": correct / images,
        "test_loss": test["loss"] if test else None,
        "test_acc": test["acc"] if test else None,
        "test_views": test["views"] if test else 0,
        "epoch_seconds": stats.seconds,
        "test_seconds": test["seconds"] if test else 0.0,  # the evaluation behind test_acc
        "eval_seconds": (test["seconds"] if test else 0.0) + (trained["seconds"] if trained else 0.0),
        "images_per_sec": images / stats.seconds,
        "train_images": stats.images,
        **({"test_loss_trained": trained["loss"], "test_acc_trained": trained["acc"]} if trained else {}),
    }


def format_epoch(m: dict, epochs: int) -> str:
    tested = (f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.2%}"
              + (f" ({m['test_views']} views)" if m["test_views"] > 1 else "")) if m["test_acc"] is not None \
        else "not evaluated"
    return (f"epoch {m['epoch']:>3}/{epochs}  lr {m['lr']:.4f}  train loss {m['train_loss']:.4f} "
            f"acc {m['train_acc']:.2%}  {tested}  "
            f"{m['epoch_seconds']:.1f}s  {m['images_per_sec']:.0f} img/s"
            + (f"  (images {m['image_side']}x{m['image_side']})" if m["image_side"] < 32 else "")
            + (f"  (trained weights, without the average: test acc {m['test_acc_trained']:.2%})"
               if "test_acc_trained" in m else ""))


def warm_up_run(run: Run, train_count: int, test_images: torch.Tensor, test_labels: torch.Tensor,
                start_epoch: int, log) -> None:
    """Compile before the timed epochs (and let cuDNN choose its kernels): each batch shape the
    rest of the run has, once (twice with --cudagraphs, see `warm_up`). With --compile-cache-file,
    the file is imported first and written after; the cache folder's files are listed for the
    next run's check."""
    config, runtime, dist = run.config, run.runtime, run.dist
    train_sizes = batch_sizes(batch_bounds(train_count, config.batch_size, dist.rank, dist.world))
    eval_sizes = batch_sizes(batch_bounds(len(test_labels), config.eval_batch_size))
    sides = sorted({config.image_side(epoch) for epoch in range(start_epoch, config.epochs)})
    carried = Path(config.compile_cache_file) if config.compile_cache_file and runtime.compile_cache else None
    if carried and dist.is_main:
        compile_cache.import_file(carried, runtime.device, log)
    warm_up(run.forward, run.model, train_sizes, sides, test_images, test_labels, eval_sizes, runtime)
    if carried and dist.is_main:
        compile_cache.export_file(carried, runtime.device, log)
    if dist.is_main:
        compile_cache.seal(runtime.compile_cache, log)


def warm_up(forward, model: torch.nn.Module, train_sizes: list[int], sides: list[int], test_images: torch.Tensor,
            test_labels: torch.Tensor, eval_sizes: list[int], runtime: Runtime) -> None:
    """Run every batch shape once (train: each batch size at each image side, forward and
    backward; eval: each batch size); with --cudagraphs twice, since torch runs a graph's first
    call plainly and records its CUDA graph on the second: no recording lands in a timed epoch.

    Gradients are dropped and the weights and BN statistics put back, so training is unchanged.
    Training inputs are zeros: only the shape, dtype and channels-last layout matter to compile.
    """
    device, dtype = runtime.device, runtime.amp_dtype or torch.float32
    calls = 2 if runtime.cudagraphs else 1
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    for size, side, _ in itertools.product(train_sizes, sides, range(calls)):
        images = torch.zeros(size, 3, side, side, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=runtime.amp_dtype is not None):
            loss = F.cross_entropy(forward(images), torch.zeros(size, dtype=torch.long, device=device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    for size, _ in itertools.product(eval_sizes, range(calls)):
        predict(forward, test_images[:size], test_labels[:size], size, runtime.amp_dtype)
    model.load_state_dict(saved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_sizes(bounds: list[tuple[int, int]]) -> list[int]:
    """The batch sizes an epoch has, each once (each is a compiled graph): all batches but the last
    are full, and the last is too when the batch size divides the images."""
    return sorted({hi - lo for lo, hi in (bounds[0], bounds[-1])}, reverse=True)


class WallClock:
    """Seconds of the parts that metrics.jsonl does not hold, and the wall time, summed over this
    process and the earlier ones of a resumed run (`earlier`, from its checkpoint)."""

    def __init__(self, started: float, earlier: dict | None) -> None:
        self.started = started
        self.earlier = earlier or {"data": 0.0, "compile": 0.0, "checkpoint": 0.0, "wall": 0.0}
        self.spent = {"data": 0.0, "compile": 0.0, "checkpoint": 0.0}

    @contextlib.contextmanager
    def part(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] += time.perf_counter() - started

    def so_far(self) -> dict:
        now = {**self.spent, "wall": time.perf_counter() - self.started}
        return {part: self.earlier[part] + now[part] for part in now}


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits. A second Ctrl-C kills."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _load_once(config: TrainConfig, dist: distributed.Dist, log) -> data_mod.Dataset:
    """Rank 0 builds a missing cache; the other ranks wait for it, then read it."""
    if dist.is_main:
        dataset = load_dataset(config, log)
    distributed.barrier(dist)
    return dataset if dist.is_main else load_dataset(config, log)


def _write_run_files(run_dir: Path, config: TrainConfig, runtime: Runtime, dataset: data_mod.Dataset,
                     world: int) -> None:
    runs.write_json(run_dir / "config.json", config.to_dict())
    runs.write_json(run_dir / "env.json", {
        **environment.environment(runtime.device, dataset, world),
        "loader": runtime.loader, "amp": str(runtime.amp_dtype), "compile": runtime.compile,
        "compile_cache": runtime.compile_cache,
        "muon_iterations": str(muon.iteration_dtype(runtime.device)) if config.optimizer == "muon" else None,
        "synthetic_data": dataset.synthetic, "classes": list(dataset.classes),
    })


def _checkpoint_state(run: Run, dataset: data_mod.Dataset, metrics: list[dict], epoch: int, step: int,
                      partial: dict | None, seconds: dict) -> dict:
    return {
        "config": run.config.to_dict(), "classes": list(dataset.classes), "data_source": dataset.source,
        # model_state holds the weights evaluated (eval and report load it); with --ema that is the
        # average, and resuming needs the trained weights too
        "model_state": run.ema.averaged_state() if run.ema else run.model.state_dict(),
        **({"train_state": run.model.state_dict()} if run.ema else {}),
        **({"lookahead_state": run.lookahead.state_dict()} if run.lookahead else {}),
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict(), "epoch": epoch, "step": step, "partial": partial,
        "metrics": metrics, "rng": _rng_state(), "world": run.dist.world, "seconds": seconds,
    }


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }


def _numpy_state() -> tuple:
    # Plain values, not an ndarray: checkpoints load with torch.load(weights_only=True).
    name, keys, *rest = np.random.get_state()
    return (name, keys.tolist(), *rest)


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(rng["python"])

"""The training loop: one config in, one run folder out.

Every step is visible below: data -> loader (-> shrunk, in `--low-res` epochs) -> model
(channels-last, bf16 autocast, compiled on CUDA) -> SGD + OneCycle, with loss and accuracy
summed on the device and read once per epoch. A checkpoint is written at the end of every
`checkpoint_every` epochs and on Ctrl-C.

Epoch seconds count training alone. The rest of the wall time is timed apart and written to
summary.json, so that the parts add up to `wall_seconds`: data loading, compilation with the
warm-up that triggers it, evaluation, checkpoints, and `other` (building the model and loader,
logging); the CLI adds the report's seconds after it. A resumed run adds up all its processes.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastcifar import compile_cache, distributed, runs
from fastcifar import data as data_mod
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.evaluate import evaluate, predict
from fastcifar.loaders import Loader, TorchLoader, batch_bounds, downscale
from fastcifar.model import ResNet18

INTERRUPTED_EXIT = 130
# The earlier processes of a run resumed from a checkpoint written before they were timed: their
# wall time is unknown, their other parts are left out.
UNTIMED = {"data": 0.0, "compile": 0.0, "checkpoint": 0.0, "wall": None}


class Interrupted(Exception):
    """Raised after a clean stop on SIGINT/SIGTERM; the checkpoint is saved."""

    exit_code = INTERRUPTED_EXIT


class NonFiniteLoss(UserError):
    exit_code = 3


@dataclass(frozen=True)
class Runtime:
    """What `auto` settings resolved to on this machine."""

    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    loader: str
    compile_cache: str | None = None  # the folder of torch.compile's caches; None: not compiling, or off


def resolve(config: TrainConfig, dist: distributed.Dist, log=print) -> Runtime:
    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu (or auto)")
    if config.device == "cuda" or (config.device == "auto" and has_cuda):
        device = torch.device("cuda", dist.local_rank)
    else:
        device = torch.device("cpu")
    on_cuda = device.type == "cuda"
    if config.sync_bn and not (dist.enabled and on_cuda):
        raise UserError("--sync-bn needs several CUDA ranks under torchrun: drop it here")
    compile_ = on_cuda if config.compile is None else config.compile
    cache = compile_cache.use(config.compile_cache_folder, config.compile_cache, log) if compile_ else None
    return Runtime(device, resolve_amp(config.amp, device, log), compile_, resolve_loader(config.loader, on_cuda, log),
                   cache)


def resolve_amp(choice: str, device: torch.device, log=print) -> torch.dtype | None:
    """The autocast dtype: bf16 when asked; with `auto`, on CUDA and on CPUs that compute bf16
    natively (AVX512-BF16 or AMX), where a ResNet18 step ran 2.2x faster than fp32. Other CPUs
    would emulate bf16, so they keep fp32."""
    if choice == "off":
        return None
    if choice == "bf16" or device.type == "cuda":
        return torch.bfloat16
    if runs.cpu_computes_bf16():
        log("amp: bf16 autocast (this CPU computes bf16 natively: AVX512-BF16 or AMX); --amp off keeps fp32")
        return torch.bfloat16
    log("amp: fp32 (this CPU has no native bf16, AVX512-BF16 or AMX, so bf16 would be emulated); --amp bf16 forces it")
    return None


def resolve_loader(choice: str, on_cuda: bool, log=print) -> str:
    from fastcifar.dali_loader import dali_available

    if choice == "dali" and not dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install 'fastcifar[dali]'")
    if choice == "auto":
        if on_cuda and dali_available():
            return "dali"
        log("loader: using the torch loader" + ("" if not on_cuda else " (DALI not installed)"))
        return "torch"
    return choice


def load_dataset(config: TrainConfig, log=print) -> data_mod.Dataset:
    dataset = data_mod.synthetic() if config.synthetic else data_mod.ensure(config.source, config.data_dir, log)
    return dataset.head(config.subset, config.test_subset)


def make_loader(kind: str, dataset: data_mod.Dataset, config: TrainConfig, runtime: Runtime,
                dist: distributed.Dist) -> Loader:
    # Images reach the model in bf16 directly when autocast is on: no extra cast pass.
    dtype = runtime.amp_dtype or torch.float32
    common = dict(batch_size=config.batch_size, seed=config.seed, padding=config.crop_padding,
                  flip=config.flip, cutout=config.cutout, rank=dist.rank, world=dist.world)
    if kind == "dali":
        from fastcifar.dali_loader import DaliLoader

        return DaliLoader(dataset.train_images, dataset.train_labels, device=runtime.device, dtype=dtype,
                          threads=config.dali_threads, prefetch=config.dali_prefetch, **common)
    return TorchLoader(dataset.train_images, dataset.train_labels, device=runtime.device, dtype=dtype, **common)


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


def make_model(num_classes: int, config: TrainConfig, device: torch.device) -> ResNet18:
    model = ResNet18(num_classes).to(device)
    if config.sync_bn:  # `resolve` has checked it runs on several CUDA ranks
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def make_forward(model: torch.nn.Module, runtime: Runtime, dist: distributed.Dist):
    """What the loop calls: the model, DDP-wrapped under torchrun, compiled when asked."""
    device = runtime.device
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model
    return torch.compile(net, dynamic=False) if runtime.compile else net


def train_step(forward, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               amp_dtype: torch.dtype | None, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (logits, loss) without reading them on the host."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = forward(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logits, loss


def add_step_stats(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """sums += (loss × batch size, correct predictions, batch size), without a host sync."""
    correct = (logits.argmax(1) == labels).sum()
    # full_like, not torch.tensor(len(labels), device=...): that copy from the host waits for the GPU
    sums += torch.stack([loss * len(labels), correct, torch.full_like(correct, len(labels))]).double()


def param_groups(model: torch.nn.Module, weight_decay: float, decay_bn_and_bias: bool) -> list[dict]:
    """All parameters decayed, or only conv and linear weights (BN weights and biases are 1-D)."""
    params = list(model.parameters())
    if decay_bn_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, config.weight_decay, config.decay_bn_and_bias), lr=config.lr,
                           momentum=config.momentum, nesterov=config.nesterov, fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   batches_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    # OneCycle needs two steps in each phase: very short runs stretch the warm-up, and runs of
    # fewer than 4 steps take the first steps of a 4-step cycle.
    total_steps = max(4, config.epochs * batches_per_epoch)
    pct_start = min(max(config.pct_start, 2 / total_steps), 1 - 2 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                               pct_start=pct_start, anneal_strategy=config.anneal)


def warm_up(forward, model: torch.nn.Module, train_sizes: list[int], sides: list[int], test_images: torch.Tensor,
            test_labels: torch.Tensor, eval_sizes: list[int], runtime: Runtime) -> None:
    """Run every batch shape of the run once (train: each batch size at each image side, forward and
    backward; eval), so compilation and cuDNN's kernel choice happen here rather than inside a
    timed epoch.

    Gradients are dropped and the weights and BN statistics put back, so training is unchanged.
    Training inputs are zeros: only the shape, dtype and channels-last layout matter to compile.
    """
    device, dtype = runtime.device, runtime.amp_dtype or torch.float32
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    model.train()
    for size, side in itertools.product(train_sizes, sides):
        images = torch.zeros(size, 3, side, side, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=runtime.amp_dtype is not None):
            loss = F.cross_entropy(forward(images), torch.zeros(size, dtype=torch.long, device=device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    for size in eval_sizes:
        predict(forward, test_images[:size], test_labels[:size], size, runtime.amp_dtype)
    model.load_state_dict(saved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, dist: distributed.Dist = distributed.SINGLE, resume: Path | None = None,
          log=print) -> Path:
    """Train per `config`; returns the run folder. `resume` continues the run in that folder."""
    started = time.perf_counter()
    say = log if dist.is_main else (lambda *_: None)
    runtime = resolve(config, dist, say)
    if config.device == "auto" and runtime.device.type == "cpu":  # so that nobody waits hours without knowing why
        say("device: cpu, no CUDA GPU is visible: a whole run takes hours on a CPU (--subset N trains on fewer "
            "images; --device cpu drops this note)")
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(config.deterministic)  # process-wide: set either way, for the next run
    torch.backends.cudnn.benchmark = runtime.device.type == "cuda" and not config.deterministic
    state = runs.load_checkpoint(resume) if resume else None
    if state is not None and state["world"] != dist.world:  # its steps and LR schedule are per rank count
        raise UserError(f"{resume} was trained by {state['world']} process(es), this is {dist.world}: resume it with "
                        f"{train_command(state['world'])} --resume {resume}")
    if state is not None and state["epoch"] >= config.epochs:
        raise UserError(f"{resume} has finished its {config.epochs} epochs, there is nothing to resume: "
                        f"`fastcifar report {resume}` rewrites its report; a longer run is a new `fastcifar train`")
    distributed.init(dist, runtime.device)
    try:
        data_started = time.perf_counter()
        dataset = _load_once(config, dist, say)  # before the run folder: bad data leaves no folder behind
        data_seconds = time.perf_counter() - data_started
        run_dir = Path(resume) if resume else None
        if dist.is_main and run_dir is None:
            run_dir = runs.create_run_dir(config.out)
        with StopFlag() as stop:
            return _train(config, runtime, dist, dataset, run_dir, state, stop, say, started, data_seconds)
    finally:
        distributed.shutdown(dist)


def _load_once(config: TrainConfig, dist: distributed.Dist, log) -> data_mod.Dataset:
    """Rank 0 builds a missing cache; the other ranks wait for it, then read it."""
    if dist.is_main:
        dataset = load_dataset(config, log)
    distributed.barrier(dist)
    return dataset if dist.is_main else load_dataset(config, log)


def _train(config: TrainConfig, runtime: Runtime, dist: distributed.Dist, dataset: data_mod.Dataset,
           run_dir: Path | None, state: dict | None, stop: StopFlag, log, started: float,
           data_seconds: float) -> Path:
    device = runtime.device
    graphs_before, cache_before = counters["stats"]["unique_graphs"], compile_cache.counts()
    if dist.is_main:
        runs.write_json(run_dir / "config.json", config.to_dict())
        runs.write_json(run_dir / "env.json", {
            **runs.environment(device, dataset.source, dist.world),
            "loader": runtime.loader, "amp": str(runtime.amp_dtype), "compile": runtime.compile,
            "compile_cache": runtime.compile_cache,
            "synthetic_data": dataset.synthetic, "classes": list(dataset.classes),
        })
    if dataset.synthetic:
        log(f"data: {dataset.source}")

    seed_everything(config.seed)
    model = make_model(len(dataset.classes), config, device)
    loader = make_loader(runtime.loader, dataset, config, runtime, dist)
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config, loader.batches_per_epoch)
    metrics: list[dict] = []
    start_epoch, start_step, partial = 0, 0, None
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        metrics, start_epoch, start_step, partial = state["metrics"], state["epoch"], state["step"], state["partial"]
        _set_rng_state(state["rng"])
        log(f"resuming at epoch {start_epoch + 1}, step {start_step}")

    forward = make_forward(model, runtime, dist)  # after loading: DDP copies rank 0's weights to all
    test_images = torch.from_numpy(dataset.test_images).to(device)
    test_labels = torch.from_numpy(dataset.test_labels).to(device)
    compile_seconds = 0.0
    if runtime.compile or device.type == "cuda":
        train_sizes = batch_sizes(batch_bounds(len(dataset.train_labels), config.batch_size, dist.rank, dist.world))
        eval_sizes = batch_sizes(batch_bounds(len(test_labels), config.eval_batch_size))
        sides = sorted({config.image_side(epoch) for epoch in range(start_epoch, config.epochs)})
        carried = Path(config.compile_cache_file) if config.compile_cache_file and runtime.compile_cache else None
        warm_started = time.perf_counter()
        if carried and dist.is_main:
            compile_cache.import_file(carried, device, log)
        warm_up(forward, model, train_sizes, sides, test_images, test_labels, eval_sizes, runtime)
        if carried and dist.is_main:
            compile_cache.export_file(carried, device, log)
        compile_seconds = time.perf_counter() - warm_started
        log(f"compile and warm-up: {compile_seconds:.1f}s (not counted in epoch times)")

    # Seconds of the parts that metrics.jsonl does not hold, summed over this and earlier processes.
    spent = {"data": data_seconds, "compile": compile_seconds, "checkpoint": 0.0, "wall": 0.0}
    earlier = dict.fromkeys(spent, 0.0) if state is None else state.get("seconds", UNTIMED)

    def seconds_so_far() -> dict:
        spent["wall"] = time.perf_counter() - started
        return {part: None if earlier[part] is None else earlier[part] + spent[part] for part in spent}

    def checkpoint(epoch: int, step: int, partial_epoch: dict | None) -> None:
        if dist.is_main:
            saving = time.perf_counter()
            runs.save_checkpoint(run_dir / runs.CHECKPOINT_FILE, {
                "config": config.to_dict(), "classes": list(dataset.classes), "data_source": dataset.source,
                "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(), "epoch": epoch, "step": step, "partial": partial_epoch,
                "metrics": metrics, "rng": _rng_state(), "world": dist.world, "seconds": seconds_so_far(),
            })
            spent["checkpoint"] += time.perf_counter() - saving

    stop_every = distributed.stop_check_every(device)
    for epoch in range(start_epoch, config.epochs):
        first = start_step if epoch == start_epoch else 0
        resumed = partial if first and partial else {"sums": [0.0, 0.0, 0.0], "lr": scheduler.get_last_lr()[0],
                                                     "seconds": 0.0}
        # A checkpoint holds the sums over all ranks: rank 0 resumes with them, the others from zero.
        sums = torch.tensor(resumed["sums"] if dist.is_main else [0.0, 0.0, 0.0], device=device, dtype=torch.float64)
        lr = resumed["lr"]  # the LR the epoch started with
        side = config.image_side(epoch)
        bad_step = torch.tensor(-1, device=device)
        model.train()
        epoch_started = time.perf_counter() - resumed["seconds"]  # a resumed epoch counts its first part too
        # Counts this process's images, so its rate is images/sec per rank.
        bar = tqdm(desc=f"epoch {epoch + 1}/{config.epochs}", unit="img", disable=None if dist.is_main else True,
                   leave=False)
        for step, (images, labels) in enumerate(loader.epoch(epoch, first), start=first + 1):
            images = downscale(images, side)
            logits, loss = train_step(forward, optimizer, images, labels, runtime.amp_dtype, config.label_smoothing)
            scheduler.step()
            detached = loss.detach().float()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(detached), step, bad_step)
            add_step_stats(sums, detached, logits, labels)
            bar.update(len(labels))
            if distributed.stop_agreed(dist, stop.requested, step, stop_every, device):
                so_far = distributed.all_sum(dist, sums).tolist()  # on every rank before any may raise below
                _check_finite(bad_step, epoch)
                checkpoint(epoch, step, {"sums": so_far, "lr": lr, "seconds": time.perf_counter() - epoch_started})
                bar.close()
                log(f"interrupted in epoch {epoch + 1} after step {step}; checkpoint saved. "
                    f"Resume with: {train_command(dist.world)} --resume {run_dir}")
                raise Interrupted
        bar.close()
        totals = distributed.all_sum(dist, sums).tolist()  # the one host sync of the epoch
        train_seconds = time.perf_counter() - epoch_started
        _check_finite(bad_step, epoch)
        test = evaluate(forward, test_images, test_labels, config.eval_batch_size, runtime.amp_dtype, config.tta)
        metrics.append({
            "epoch": epoch + 1,
            "lr": lr,
            "image_side": side,
            "train_loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2],
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "epoch_seconds": train_seconds,
            "eval_seconds": test["seconds"],
            "images_per_sec": totals[2] / train_seconds,
            "train_images": int(totals[2]),
        })
        if dist.is_main:
            runs.write_metrics(run_dir / "metrics.jsonl", metrics)
            m = metrics[-1]
            log(f"epoch {epoch + 1:>3}/{config.epochs}  lr {m['lr']:.4f}  train loss {m['train_loss']:.4f} "
                f"acc {m['train_acc']:.2%}  test loss {m['test_loss']:.4f} acc {m['test_acc']:.2%}  "
                f"{m['epoch_seconds']:.1f}s  {m['images_per_sec']:.0f} img/s"
                + (f"  (images {side}x{side})" if side < 32 else ""))
        last = epoch + 1 == config.epochs
        if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
            checkpoint(epoch + 1, 0, None)

    if dist.is_main:
        summary = {**summarize(metrics), **wall_parts(seconds_so_far(), metrics),
                   "compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before,
                   "compile_cache": {"dir": runtime.compile_cache, **compile_cache.since(cache_before)}}
        runs.write_json(run_dir / "summary.json", summary)
        log(format_summary(summary))
    return run_dir


def train_command(world: int) -> str:
    return "fastcifar train" if world == 1 else f"torchrun --nproc_per_node {world} -m fastcifar train"


def batch_sizes(bounds: list[tuple[int, int]]) -> list[int]:
    """The batch sizes an epoch has, each once (each is a compiled graph): all batches but the last
    are full, and the last is too when the batch size divides the images."""
    return sorted({hi - lo for lo, hi in (bounds[0], bounds[-1])}, reverse=True)


def _check_finite(bad_step: torch.Tensor, epoch: int) -> None:
    step = int(bad_step.item())
    if step >= 0:
        raise NonFiniteLoss(f"loss became NaN/inf in epoch {epoch + 1} at step {step}; the last checkpoint is kept. "
                            "Lower --lr or check the data")


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

"""A run's parts, resolved and built once for train, bench, profile and report alike.

`resolve_runtime` turns the config's `auto` settings into what this machine does (device, bf16,
compile, loader); `build_run` builds what a training step needs from a config: the model, the
forward the loop calls (DDP-wrapped, compiled), the recipe's optimizer and LR schedule, and the
loader. What `train` times is therefore what `bench` and `profile` time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fastcifar import compile_cache, dali_loader, distributed, runs
from fastcifar import data as data_mod
from fastcifar.config import MOMENTUM_SWING, TrainConfig
from fastcifar.ema import WeightAverage
from fastcifar.errors import UserError
from fastcifar.loaders import Loader, TorchLoader
from fastcifar.model import ResNet18, zero_init_residual


@dataclass(frozen=True)
class Runtime:
    """What `auto` settings resolved to on this machine."""

    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    loader: str
    compile_cache: str | None = None  # the folder of torch.compile's caches; None: not compiling, or off
    cudagraphs: bool = False  # compiled graphs replayed as CUDA graphs


def resolve_runtime(config: TrainConfig, dist: distributed.Dist, log=print) -> Runtime:
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
    if config.cudagraphs and not on_cuda:
        raise UserError("--cudagraphs needs a CUDA GPU and none is visible: run without it (--no-cudagraphs)")
    if config.cudagraphs and dist.enabled:  # DDP's gradient all-reduce runs between the graphs
        raise UserError("--cudagraphs runs on one GPU: drop it under torchrun")
    compile_ = on_cuda if config.compile is None else config.compile
    cache = compile_cache.use(config.compile_cache_folder, config.compile_cache, log) if compile_ else None
    return Runtime(device, resolve_amp(config.amp, device, log), compile_, resolve_loader(config.loader, on_cuda, log),
                   cache, config.cudagraphs)


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
    if choice == "dali" and not dali_loader.dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install 'fastcifar[dali]'")
    if choice == "auto":
        if on_cuda and dali_loader.dali_available():
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
    common = dict(batch_size=config.batch_size, seed=config.seed, padding=config.crop_padding, flip=config.flip,
                  alternate_flip=config.alternate_flip, cutout=config.cutout, rank=dist.rank, world=dist.world)
    if kind == "dali":
        return dali_loader.DaliLoader(dataset.train_images, dataset.train_labels, device=runtime.device, dtype=dtype,
                          threads=config.dali_threads, prefetch=config.dali_prefetch, **common)
    return TorchLoader(dataset.train_images, dataset.train_labels, device=runtime.device, dtype=dtype, **common)


def make_model(num_classes: int, config: TrainConfig, device: torch.device,
               network: Callable[[int], torch.nn.Module] = ResNet18) -> torch.nn.Module:
    model = network(num_classes).to(device)
    if config.zero_init_residual:
        zero_init_residual(model)
    if config.sync_bn:  # `resolve_runtime` has checked it runs on several CUDA ranks
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def make_forward(model: torch.nn.Module, runtime: Runtime, dist: distributed.Dist):
    """What the loop calls: the model, DDP-wrapped under torchrun, compiled when asked (with
    --cudagraphs in torch.compile's "reduce-overhead" mode: its graphs replayed as CUDA graphs)."""
    device = runtime.device
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model
    mode = "reduce-overhead" if runtime.cudagraphs else None
    return torch.compile(net, dynamic=False, mode=mode) if runtime.compile else net


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
    swing = MOMENTUM_SWING if config.momentum else 0.0
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                               pct_start=pct_start, anneal_strategy=config.anneal,
                                               cycle_momentum=config.momentum > 0,
                                               base_momentum=config.momentum - swing,
                                               max_momentum=config.momentum + swing)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything a training step touches."""

    config: TrainConfig
    runtime: Runtime
    dist: distributed.Dist
    model: torch.nn.Module  # the weights: checkpoints, evaluation without DDP, Grad-CAM
    forward: torch.nn.Module  # what the loop calls: the model, DDP-wrapped, compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Loader
    ema: WeightAverage | None = None  # with --ema: the weights every evaluation uses


def build_run(config: TrainConfig, runtime: Runtime, dataset: data_mod.Dataset,
              dist: distributed.Dist = distributed.SINGLE, state: dict | None = None,
              network: Callable[[int], torch.nn.Module] = ResNet18) -> Run:
    """The run `config` trains, seeded with config.seed; `state` (a checkpoint) restores the weights,
    the optimizer and the schedule (with --ema, its `model_state` is the average and `train_state`
    the trained weights). `network(classes)` builds the model (tests pass a tiny one)."""
    seed_everything(config.seed)
    model = make_model(len(dataset.classes), config, runtime.device, network)
    loader = make_loader(runtime.loader, dataset, config, runtime, dist)
    optimizer = make_optimizer(model, config, runtime.device)
    scheduler = make_scheduler(optimizer, config, loader.batches_per_epoch)
    if state is not None:
        model.load_state_dict(state["model_state"])
    ema = WeightAverage(model, config.ema) if config.ema else None  # starts from the weights loaded
    if state is not None:
        if "train_state" in state:  # an EMA run's: model_state above was the average
            model.load_state_dict(state["train_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
    forward = make_forward(model, runtime, dist)  # after loading: DDP copies rank 0's weights to all
    return Run(config, runtime, dist, model, forward, optimizer, scheduler, loader, ema)

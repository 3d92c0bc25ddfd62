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

from fastcifar import compile_cache, dali_loader, distributed, environment
from fastcifar import data as data_mod
from fastcifar.config import MOMENTUM_SWING, TrainConfig
from fastcifar.ema import WeightAverage
from fastcifar.errors import UserError
from fastcifar.loaders import Loader, TorchLoader
from fastcifar.lookahead import Lookahead
from fastcifar.model import ResNet18, zero_init_residual
from fastcifar.muon import MuonSGD
from fastcifar.whitening import whiten_stem


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
    if environment.cpu_computes_bf16():
        log("amp: bf16 autocast (this CPU computes bf16 natively: AVX512-BF16 or AMX); --amp off keeps fp32")
        return torch.bfloat16
    log("amp: fp32 (this CPU has no native bf16, AVX512-BF16 or AMX, so bf16 would be emulated); --amp bf16 forces it")
    return None


def resolve_loader(choice: str, on_cuda: bool, log=print) -> str:
    if choice == "dali" and not dali_loader.dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install 'fastcifar[dali]'")
    if choice == "auto":
        if on_cuda and dali_loader.dali_available():
            # said until a GPU run of this loader has been measured (bench/NOTES.md): the torch one has
            log("loader: DALI on the GPU, which this project has not yet run on a GPU itself (its CPU mode is "
                "tested against the torch loader); --loader torch is the GPU loader measured so far")
            return "dali"
        log("loader: using the torch loader" + ("" if not on_cuda else " (DALI not installed)"))
        return "torch"
    return choice


def load_dataset(config: TrainConfig, log=print) -> data_mod.Dataset:
    if config.synthetic:  # only the images the run uses, not the whole fake set for a 32-image test
        dataset = data_mod.synthetic(*(full if n is None else min(n, full) for n, full in
                                       ((config.subset, data_mod.SYNTHETIC_TRAIN),
                                        (config.test_subset, data_mod.SYNTHETIC_TEST))))
    else:
        dataset = data_mod.ensure(config.source, config.data_dir, log)
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


def batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of `model`, of any dimension."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def make_model(num_classes: int, config: TrainConfig, device: torch.device,
               network: Callable[[int], torch.nn.Module] = ResNet18) -> torch.nn.Module:
    model = network(num_classes).to(device)
    if config.zero_init_residual:
        zero_init_residual(model)
    for module in batch_norms(model):
        module.momentum = config.bn_momentum
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


def stem(model: torch.nn.Module) -> torch.nn.Conv2d | None:
    """The first convolution, which sees the images: ResNet18's conv1 (None in a model without one)."""
    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The optimizer's groups, each with its own peak LR (`lr`, which OneCycle takes as its
    max_lr) and weight decay: the weights (conv and linear; with --optimizer muon the conv
    filters but the stem apart, `muon: True`), the other 1-D parameters, and the BatchNorm
    biases at --bn-bias-lr-mult times the LR. Without --decay-bn-and-bias only the weights decay;
    Muon's filters never do. Parameters with the same settings share one group."""
    bn_biases = {id(m.bias) for m in batch_norms(model) if m.bias is not None}
    first = stem(model)
    muon = config.optimizer == "muon"
    rest_decay = config.weight_decay if config.decay_bn_and_bias else 0.0

    def settings(p: torch.nn.Parameter) -> tuple[float, float, bool]:  # (lr, weight decay, muon)
        if muon and p.ndim == 4 and (first is None or p is not first.weight):
            return config.muon_lr, 0.0, True
        if p.ndim > 1:
            return config.lr, config.weight_decay, False
        return config.lr * (config.bn_bias_lr_mult if id(p) in bn_biases else 1.0), rest_decay, False

    groups: dict[tuple, list] = {}
    for p in model.parameters():
        groups.setdefault(settings(p), []).append(p)
    return [{"params": params, "lr": lr, "weight_decay": decay, **({"muon": True} if is_muon else {})}
            for (lr, decay, is_muon), params in groups.items()]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    if config.optimizer == "muon":
        return MuonSGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                       muon_momentum=config.muon_momentum)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   batches_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    # OneCycle needs two steps in each phase: very short runs stretch the warm-up, and runs of
    # fewer than 4 steps take the first steps of a 4-step cycle.
    total_steps = max(4, config.epochs * batches_per_epoch)
    pct_start = min(max(config.pct_start, 2 / total_steps), 1 - 2 / total_steps)
    swing = MOMENTUM_SWING if config.momentum else 0.0
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                               total_steps=total_steps,
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
    lookahead: Lookahead | None = None  # with --lookahead

    def frozen(self, epoch: int) -> tuple[torch.nn.Parameter, ...]:
        """The parameters that stay as they are in `epoch` (from 0): the stem, for --freeze-stem-epochs."""
        return (stem(self.model).weight,) if epoch < self.config.freeze_stem_epochs else ()


def build_run(config: TrainConfig, runtime: Runtime, dataset: data_mod.Dataset,
              dist: distributed.Dist = distributed.SINGLE, state: dict | None = None,
              network: Callable[[int], torch.nn.Module] = ResNet18) -> Run:
    """The run `config` trains, seeded with config.seed; `state` (a checkpoint) restores the weights,
    the optimizer and the schedule (with --ema, its `model_state` is the average and `train_state`
    the trained weights). `network(classes)` builds the model (tests pass a tiny one)."""
    seed_everything(config.seed)
    model = make_model(len(dataset.classes), config, runtime.device, network)
    if config.whiten_stem and state is None:  # a resumed run has its stem in the checkpoint
        whiten_stem(stem(model), dataset.train_images)
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
    lookahead = Lookahead(model, config.lookahead, config.epochs * loader.batches_per_epoch) \
        if config.lookahead else None
    if lookahead and state is not None:
        lookahead.load_state_dict(state["lookahead_state"])
    forward = make_forward(model, runtime, dist)  # after loading: DDP copies rank 0's weights to all
    return Run(config, runtime, dist, model, forward, optimizer, scheduler, loader, ema, lookahead)

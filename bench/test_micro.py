"""Micro-benchmarks (pytest-benchmark): loader epoch, train step, eval step, augment kernel vs reference.

    pytest bench/ --benchmark-json out.json
    pytest bench/ --benchmark-compare=0001 --benchmark-compare-fail=mean:5%

The step timed is the recipe's own (`train.train_step`: the reference preset's optimizer),
built as `fastcifar train` builds it. images/sec is in each benchmark's extra_info. Runs on CUDA
when present, else on the CPU.
"""

import pytest
import torch
from fastcifar.kernels import augment as aug

from fastcifar.bench import augment_inputs
from fastcifar.config import REFERENCE
from fastcifar.distributed import SINGLE
from fastcifar.evaluate import predict
from fastcifar.runtime import build_run, load_dataset, resolve_runtime
from fastcifar.train import train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 512 if DEVICE.type == "cuda" else 32


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def run():
    config = REFERENCE.replace(device=DEVICE.type, loader="torch", synthetic=True, batch_size=BATCH,
                               subset=BATCH * 8, test_subset=BATCH)
    return build_run(config, resolve_runtime(config, SINGLE, log=lambda *_: None), load_dataset(config))


def per_second(benchmark, images):
    benchmark.extra_info["images_per_sec"] = images / benchmark.stats.stats.median
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def test_loader_epoch(benchmark, run):
    def one_epoch():
        for _ in run.loader.epoch(0):
            pass
        sync()

    benchmark(one_epoch)
    per_second(benchmark, BATCH * 8)


def test_train_step(benchmark, run):
    images, labels = next(iter(run.loader.epoch(0)))
    run.model.train()

    def step():
        train_step(run, images, labels)
        sync()

    step()  # compile outside the timing
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    per_second(benchmark, BATCH)


def test_eval_step(benchmark, run):
    images = torch.randint(0, 256, (BATCH, 32, 32, 3), dtype=torch.uint8, device=DEVICE)
    labels = torch.zeros(BATCH, dtype=torch.long, device=DEVICE)

    def step():
        predict(run.forward, images, labels, BATCH, run.runtime.amp_dtype)
        sync()

    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    per_second(benchmark, BATCH)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_augment(benchmark, impl):
    if impl == "triton" and (DEVICE.type != "cuda" or aug.triton is None):
        pytest.skip("the Triton kernel is timed on CUDA only (the interpreter is no speed)")
    fn = aug.augment_triton if impl == "triton" else aug.augment_reference
    n = 50_000 if DEVICE.type == "cuda" else 2048
    args = augment_inputs(n, DEVICE)

    def call():
        fn(*args)
        sync()

    call()
    benchmark(call)
    per_second(benchmark, n)

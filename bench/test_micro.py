"""Micro-benchmarks (pytest-benchmark): loader batch, train step, eval step, augment kernel vs reference.

    pytest bench/ --benchmark-json out.json
    pytest bench/ --benchmark-compare=0001 --benchmark-compare-fail=mean:5%

images/sec is in each benchmark's extra_info. Runs on CUDA when present, else on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from fastcifar.kernels import augment as aug

from fastcifar.data import synthetic
from fastcifar.loaders import CIFAR_MEAN, CIFAR_STD, TorchLoader
from fastcifar.model import ResNet18

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 512 if DEVICE.type == "cuda" else 32
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def dataset():
    return synthetic(train=BATCH * 8, test=BATCH)


@pytest.fixture(scope="module")
def model():
    m = ResNet18().to(DEVICE, memory_format=torch.channels_last)
    return torch.compile(m) if DEVICE.type == "cuda" else m


def per_second(benchmark, images):
    benchmark.extra_info["images_per_sec"] = images / benchmark.stats.stats.median
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def test_loader_batch(benchmark, dataset):
    loader = TorchLoader(dataset.train_images, dataset.train_labels, batch_size=BATCH, device=DEVICE, dtype=DTYPE,
                         seed=0, padding=4, flip=True, cutout=16)

    def one_epoch():
        for _ in loader.epoch(0):
            pass
        sync()

    benchmark(one_epoch)
    per_second(benchmark, len(dataset.train_labels))


def test_train_step(benchmark, dataset, model):
    images = torch.randn(BATCH, 3, 32, 32, device=DEVICE).to(DTYPE, memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (BATCH,), device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=DEVICE.type == "cuda")

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    step()  # compile outside the timing
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    per_second(benchmark, BATCH)


def test_eval_step(benchmark, model):
    images = torch.randn(BATCH, 3, 32, 32, device=DEVICE).to(DTYPE, memory_format=torch.channels_last)

    @torch.no_grad()
    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
            model.eval()(images)
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
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=DEVICE)
    indices = torch.randperm(n, device=DEVICE)
    params = torch.randint(0, 9, (n, 5), dtype=torch.int32, device=DEVICE)

    def run():
        fn(images, indices, params, list(CIFAR_MEAN), list(CIFAR_STD), 4, 16, DTYPE)
        sync()

    run()
    benchmark(run)
    per_second(benchmark, n)

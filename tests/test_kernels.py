"""The fused augmentation kernel against its torch reference (Triton's CPU interpreter in CI)."""

import pytest
import torch
from fastcifar.kernels import augment as aug

from fastcifar.loaders import CIFAR_MEAN, CIFAR_STD

pytestmark = pytest.mark.skipif(aug.triton is None, reason="Triton not installed")
MEAN, STD = list(CIFAR_MEAN), list(CIFAR_STD)


def random_case(n_images: int, batch: int, padding: int):
    seed = torch.seed() % 2**31  # fresh inputs every run; printed, so a failure shows how to repeat it
    print(f"random_case({n_images}, {batch}, {padding}): seed {seed}")
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 32, 32, 3), dtype=torch.uint8, generator=g)
    indices = torch.randint(0, n_images, (batch,), generator=g)
    params = torch.stack([
        torch.randint(0, 2 * padding + 1, (batch,), generator=g),
        torch.randint(0, 2 * padding + 1, (batch,), generator=g),
        torch.randint(0, 2, (batch,), generator=g), torch.randint(0, 32, (batch,), generator=g),
        torch.randint(0, 32, (batch,), generator=g)], 1).int()
    return images, indices, params


def poisoned_triton(images, indices, params, padding, cutout, dtype, monkeypatch):
    """Run the kernel into an output pre-filled with NaN, so an element it skips shows."""
    real_empty = torch.empty
    monkeypatch.setattr(aug.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    try:
        return aug.augment_triton(images, indices, params, MEAN, STD, padding, cutout, dtype)
    finally:
        monkeypatch.setattr(aug.torch, "empty", real_empty)


@pytest.mark.parametrize("batch", [1, 7, 64, 129])  # 129: a ragged last batch
@pytest.mark.parametrize("padding,cutout", [(4, 16), (0, 0), (4, 0), (2, 9)])
def test_fp32_exact(batch, padding, cutout, monkeypatch):
    images, indices, params = random_case(200, batch, padding)
    out = poisoned_triton(images, indices, params, padding, cutout, torch.float32, monkeypatch)
    ref = aug.augment_reference(images, indices, params, MEAN, STD, padding, cutout, torch.float32)
    assert not out.isnan().any()
    assert out.stride() == ref.stride() and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-126)))
    return torch.exp2(exponent - 7)


@pytest.mark.parametrize("batch", [5, 64])
def test_bf16_within_one_ulp(batch, monkeypatch):
    images, indices, params = random_case(100, batch, 4)
    out = poisoned_triton(images, indices, params, 4, 16, torch.bfloat16, monkeypatch).float()
    ref = aug.augment_reference(images, indices, params, MEAN, STD, 4, 16, torch.bfloat16).float()
    assert not out.isnan().any()
    assert ((out - ref).abs() <= ulp_bf16(torch.maximum(out.abs(), ref.abs()))).all()


@pytest.mark.slow  # compiles on the CPU
def test_custom_op_compiles_without_graph_breaks():
    images, indices, params = random_case(50, 16, 4)
    torch._dynamo.reset()

    def fn(images, indices, params):
        return aug.augment(images, indices, params, MEAN, STD, 4, 16, torch.float32) * 2

    explanation = torch._dynamo.explain(fn)(images, indices, params)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True)
    ref = aug.augment_reference(images, indices, params, MEAN, STD, 4, 16, torch.float32) * 2
    assert torch.equal(compiled(images, indices, params), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_matches_reference():
    images, indices, params = (t.cuda() for t in random_case(1000, 512, 4))
    for dtype in (torch.float32, torch.bfloat16):
        out = aug.augment_triton(images, indices, params, MEAN, STD, 4, 16, dtype).float()
        ref = aug.augment_reference(images, indices, params, MEAN, STD, 4, 16, dtype).float()
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-6)

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastcifar.kernels.augment import FLIP, augment_reference

from fastcifar.dali_loader import DaliLoader, build_pipeline, dali_available
from fastcifar.errors import UserError
from fastcifar.loaders import (
    CIFAR_MEAN,
    CIFAR_STD,
    TorchLoader,
    batch_bounds,
    downscale,
    draw_plan,
    eval_batches,
    normalize,
)

MEAN, STD = list(CIFAR_MEAN), list(CIFAR_STD)
CPU = torch.device("cpu")
needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")


def coded_images(n: int):
    """Every pixel of image i holds (i % 256, i // 256, label * 20): decodable after augmentation."""
    labels = np.arange(n) % 10
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    images[..., 2] = (labels * 20)[:, None, None]
    return images, labels.astype(np.int64)


def decode(batch: torch.Tensor) -> torch.Tensor:
    """(index, label) per image from its most common pixel (padding and cutout are minorities)."""
    pixels = batch.float().permute(0, 2, 3, 1) * torch.tensor(STD) + torch.tensor(MEAN)
    pixels = (pixels * 255).round().long().reshape(len(batch), -1, 3)
    code = pixels[..., 0] + 256 * pixels[..., 1] + 65536 * pixels[..., 2]
    mode = code.mode(dim=1).values
    return mode % 65536, mode // 65536 // 20


def make(kind, images, labels, **kw):
    args = dict(batch_size=32, device=CPU, dtype=torch.float32, seed=3, padding=4, flip=True, cutout=16) | kw
    return (DaliLoader(images, labels, threads=2, **args) if kind == "dali" else TorchLoader(images, labels, **args))


KINDS = ["torch", pytest.param("dali", marks=needs_dali)]


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_once_per_epoch_labels_aligned_new_order(kind):
    images, labels = coded_images(100)
    loader = make(kind, images, labels)
    orders = []
    for epoch in range(2):
        seen = []
        for batch, y in loader.epoch(epoch):
            assert batch.shape[1:] == (3, 32, 32) and batch.is_contiguous(memory_format=torch.channels_last)
            index, label = decode(batch)
            assert torch.equal(label, y)
            seen.append(index)
        seen = torch.cat(seen)
        assert sorted(seen.tolist()) == list(range(100))
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1])
    assert loader.batches_per_epoch == 4  # 32+32+32+4: the last batch is kept, smaller


@pytest.mark.parametrize("kind", KINDS)
def test_shards_cover_dataset_without_overlap(kind):
    images, labels = coded_images(101)
    seen = []
    for rank in range(3):
        loader = make(kind, images, labels, rank=rank, world=3)
        seen += [decode(b)[0] for b, _ in loader.epoch(0)]
    assert sorted(torch.cat(seen).tolist()) == list(range(101))


@pytest.mark.parametrize("kind", KINDS)
def test_alternate_flip_mirrors_each_image_in_every_other_epoch(kind):
    images, labels = coded_images(100)
    images[:, :, 0] = 255  # a white left column: on the right after a mirror
    loader = make(kind, images, labels, padding=0, cutout=0, alternate_flip=True)
    mirrored = []
    for epoch in range(3):
        by_image = torch.empty(100, dtype=torch.bool)
        for batch, _ in loader.epoch(epoch):
            by_image[decode(batch)[0]] = batch[:, 0, 0, 31] > batch[:, 0, 0, 0]
        mirrored.append(by_image)
    assert 0.3 < mirrored[0].float().mean() < 0.7  # epoch 0: a coin per image
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])


def test_alternate_flip_changes_only_the_flips_of_later_epochs():
    plans = {alt: [draw_plan(500, seed=2, epoch=e, padding=2, flip=True, cutout=8, alternate_flip=alt)
                   for e in range(3)] for alt in (False, True)}
    for epoch, ((order, params), (alt_order, alt_params)) in enumerate(zip(plans[False], plans[True], strict=True)):
        assert torch.equal(order, alt_order)
        others = [k for k in range(params.shape[1]) if k != FLIP]
        assert torch.equal(params[:, others], alt_params[:, others])
        assert torch.equal(params[:, FLIP], alt_params[:, FLIP]) == (epoch == 0)


def test_batch_bounds_rules():
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(10, 4, rank=1, world=2) == [(4, 8), (9, 10)]  # global batches [0, 8) and [8, 10)
    assert batch_bounds(10, 4, rank=0, world=2) == [(0, 4), (8, 9)]
    assert batch_bounds(9, 4, rank=1, world=2) == [(4, 8)]  # last global batch of 1 < 2 ranks: dropped


def test_plan_parameters_in_range_and_flip_rate():
    order, params = draw_plan(20_000, seed=1, epoch=0, padding=4, flip=True, cutout=16)
    assert sorted(order.tolist()) == list(range(20_000))
    assert params[:, :2].min() >= 0 and params[:, :2].max() == 8  # offsets -4..+4 around the centre
    assert 0.48 < params[:, 2].float().mean() < 0.52
    assert params[:, 3:].min() >= 0 and params[:, 3:].max() == 31


def test_crop_and_flip_match_pad_then_slice():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    _, params = draw_plan(6, seed=0, epoch=0, padding=4, flip=True, cutout=0)
    out = augment_reference(images, torch.arange(6), params, MEAN, STD, 4, 0, torch.float32)
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (4, 4, 4, 4))  # zero padding
    for k, (dy, dx, flip, _, _) in enumerate(params.tolist()):
        crop = padded[k, :, dy:dy + 32, dx:dx + 32]
        crop = crop.flip(-1) if flip else crop
        expected = (crop / 255 - torch.tensor(MEAN)[:, None, None]) * (1 / torch.tensor(STD))[:, None, None]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("centre,area", [((16, 16), 256), ((0, 0), 64), ((31, 20), 9 * 16), ((3, 30), 11 * 10)])
def test_cutout_square_clipped_at_borders(centre, area):
    images = torch.full((1, 32, 32, 3), 7, dtype=torch.uint8)
    params = torch.tensor([[4, 4, 0, *centre]], dtype=torch.int32)
    out = augment_reference(images, torch.arange(1), params, MEAN, STD, 4, 16, torch.float32)
    assert int((out[0] == 0).all(0).sum()) == area


def test_normalization():
    images = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    batch, _ = next(eval_batches(images, torch.zeros(1, dtype=torch.long), 8, torch.float32))
    expected = (200 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(batch[0, :, 5, 5], expected, rtol=1e-6, atol=1e-6)


def test_normalize_for_users_images():
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    expected = ((images.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2)
    torch.testing.assert_close(normalize(images), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize(images, mirror=True), expected.flip(3), rtol=1e-6, atol=1e-6)
    zero = (-torch.tensor(MEAN) / torch.tensor(STD))[None, :, None].expand(3, 3, 32)  # (image, channel, pixel)
    up_left, down_right = normalize(images, shift=1), normalize(images, shift=-1)
    torch.testing.assert_close(up_left[:, :, :31, :31], expected[:, :, 1:, 1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(down_right[:, :, 1:, 1:], expected[:, :, :31, :31], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up_left[:, :, 31], zero, rtol=1e-6, atol=1e-6)  # black fills in
    torch.testing.assert_close(down_right[..., 0], zero, rtol=1e-6, atol=1e-6)
    not_contiguous = images.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # NHWC view of NCHW memory
    torch.testing.assert_close(normalize(not_contiguous), expected, rtol=1e-6, atol=1e-6)
    for bad in (images.float(), images[:, :16], images[0]):
        with pytest.raises(ValueError, match=r"uint8 images of shape \(N, 32, 32, 3\)"):
            normalize(bad)


def test_downscale_averages_the_pixels_each_output_pixel_covers():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    images = images.contiguous(memory_format=torch.channels_last)
    half = downscale(images, 16)
    assert half.shape == (2, 3, 16, 16) and half.is_contiguous(memory_format=torch.channels_last)
    # pixel (i, j) of the 16x16 image is the mean of the 2x2 block at (2i, 2j)
    assert half[1, 2, 5, 7] == images[1, 2, 10:12, 14:16].mean()
    assert downscale(images.bfloat16(), 24).dtype == torch.bfloat16
    assert downscale(images, 24).shape == (2, 3, 24, 24)
    assert downscale(images, 32) is images


@needs_dali
@pytest.mark.parametrize("dtype,tol,augment", [
    (torch.float32, 1e-5, {}),
    (torch.bfloat16, 2e-2, {}),
    (torch.float32, 1e-5, {"padding": 2, "cutout": 9}),  # an odd square
    (torch.float32, 1e-5, {"padding": 0, "cutout": 0, "flip": False}),  # none: the fast preset has no cutout
])
def test_dali_equals_torch_loader(dtype, tol, augment):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 70)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DALI warns about inputs the graph leaves unused
        pairs = list(zip(make("dali", images, labels, dtype=dtype, **augment).epoch(1),
                         make("torch", images, labels, dtype=dtype, **augment).epoch(1), strict=True))
    for (a, ya), (b, yb) in pairs:
        assert a.dtype == b.dtype == dtype and torch.equal(ya, yb)
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol)  # DALI computes in fp16 for bf16


@needs_dali
def test_dali_resumes_mid_epoch_and_after_abandoned_epoch():
    images, labels = coded_images(100)
    loader = make("dali", images, labels)
    full = [decode(b)[0] for b, _ in loader.epoch(0)]
    next(iter(loader.epoch(1)))  # abandon epoch 1 after one batch
    tail = [decode(b)[0] for b, _ in loader.epoch(0, start=2)]
    assert [t.tolist() for t in tail] == [f.tolist() for f in full[2:]]


@needs_dali
def test_gpu_pipeline_definition_validates_without_gpu():
    for cutout in (16, 0):
        pipe = build_pipeline(lambda info: None, batch_size=8, gpu=True, device_id=None, threads=2, prefetch=2,
                              cutout=cutout, half=True)
        graph = pipe.serialize()
        assert b"gpu" in graph and (b"Erase" in graph) == bool(cutout)


@needs_dali
def test_dali_rejects_wrong_dtype():
    with pytest.raises(UserError, match="uint8"):
        make("dali", np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int64))


def test_dali_missing_is_a_clear_error(monkeypatch):
    from fastcifar import runtime

    monkeypatch.setattr("fastcifar.dali_loader.dali_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install 'fastcifar\[dali\]'"):
        runtime.resolve_loader("dali", on_cuda=False)
    messages = []
    assert runtime.resolve_loader("auto", on_cuda=True, log=messages.append) == "torch"
    assert messages == ["loader: using the torch loader (DALI not installed)"]


def test_auto_picks_dali_on_a_gpu_and_says_it_is_unmeasured_there(monkeypatch):
    from fastcifar import runtime

    monkeypatch.setattr("fastcifar.dali_loader.dali_available", lambda: True)
    messages = []
    assert runtime.resolve_loader("auto", on_cuda=True, log=messages.append) == "dali"
    assert len(messages) == 1 and "not yet run on a GPU" in messages[0] and "--loader torch" in messages[0]
    assert runtime.resolve_loader("auto", on_cuda=False, log=messages.append) == "torch"

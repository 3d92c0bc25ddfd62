"""Loaders: the uint8 dataset in, augmented channels-last `(images, labels)` batches out.

Every loader follows one epoch plan (`draw_plan`): a permutation of the training set and
per-image augmentation parameters, drawn on the CPU from (seed, epoch) alone. So loaders agree
with each other image for image, an epoch can be resumed mid-way by skipping batches, and all
ranks of a distributed run draw the same plan and take their own slices of it (`batch_bounds`).

Last-batch policy: nothing is dropped on one process; the last batch is simply smaller. With
W ranks, each global batch of W x batch_size plan positions is split into W near-equal pieces;
only a final global batch with fewer images than ranks is dropped (at most W-1 images).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.kernels.augment import CROP_X, CROP_Y, CUT_X, CUT_Y, FLIP, PARAMS, augment

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader(Protocol):
    batches_per_epoch: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start`, `start + 1`, ... of `epoch`: images (B,3,32,32) channels-last, labels (B,)."""
        ...


def draw_plan(n: int, seed: int, epoch: int, padding: int, flip: bool, cutout: int,
              alternate_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's order (int64, n) and per-position params (int32, n x PARAMS), see kernels/augment.py.

    With `alternate_flip`, an image is mirrored in epoch e exactly when it was not in epoch e - 1,
    epoch 0's coins deciding where it starts.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    # drawn in this order, whatever the columns' order: a seed's epochs stay what they were
    columns = {
        CROP_Y: torch.randint(0, 2 * padding + 1, (n,), generator=g),
        CROP_X: torch.randint(0, 2 * padding + 1, (n,), generator=g),
        FLIP: torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.int64),
        CUT_Y: torch.randint(0, 32, (n,), generator=g),
        CUT_X: torch.randint(0, 32, (n,), generator=g),
    }
    if flip and alternate_flip and epoch > 0:
        first_order, first_params = draw_plan(n, seed, 0, padding, flip, cutout)
        first_flip = torch.empty(n, dtype=torch.int64)
        first_flip[first_order] = first_params[:, FLIP].long()  # by image, not by position
        columns[FLIP] = first_flip[order] ^ (epoch % 2)
    return order, torch.stack([columns[k] for k in range(PARAMS)], dim=1).to(torch.int32)


def batch_bounds(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """This rank's (start, stop) plan positions for each batch of an epoch over n images."""
    bounds = []
    step = batch_size * world
    for start in range(0, n, step):
        size = min(step, n - start)
        if size < world:
            break  # a rank would get no image; see the module docstring
        pieces = [len(p) for p in torch.arange(size).tensor_split(world)]
        lo = start + sum(pieces[:rank])
        bounds.append((lo, lo + pieces[rank]))
    return bounds


class TorchLoader:
    """The whole uint8 dataset on the device; augmentation as one fused op per batch."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, device: torch.device,
        dtype: torch.dtype, seed: int, padding: int, flip: bool, cutout: int, alternate_flip: bool = False,
        rank: int = 0, world: int = 1,
    ) -> None:
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.device, self.dtype, self.seed = device, dtype, seed
        self.padding, self.flip, self.alternate_flip, self.cutout = padding, flip, alternate_flip, cutout
        self.bounds = batch_bounds(len(labels), batch_size, rank, world)
        self.batches_per_epoch = len(self.bounds)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order, params = draw_plan(len(self.labels), self.seed, epoch, self.padding, self.flip, self.cutout,
                                  self.alternate_flip)
        order = order.to(self.device, non_blocking=True)
        params = params.to(self.device, non_blocking=True)
        for lo, hi in self.bounds[start:]:
            indices = order[lo:hi]
            images = augment(self.images, indices, params[lo:hi], list(CIFAR_MEAN), list(CIFAR_STD),
                             self.padding, self.cutout, self.dtype)
            yield images, self.labels[indices]


def downscale(images: torch.Tensor, side: int) -> torch.Tensor:
    """A training batch shrunk to side x side by averaging ("area": each output pixel is the mean of
    the input pixels it covers), still channels-last; unchanged when it already has that size."""
    if images.shape[-1] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="area")


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32, *, mirror: bool = False,
              shift: int = 0) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) images as the model sees them at test time: (N, 3, 32, 32) channels-last,
    per-channel normalized; `mirror` flips them left-right and `shift` moves their content up and
    left by that many pixels (down and right when negative), zeros filling in (test-time views)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"normalize takes uint8 images of shape (N, 32, 32, 3), got {images.dtype} "
                         f"{tuple(images.shape)}: resize to 32x32 RGB and keep the 0-255 values")
    images = images.contiguous()  # the kernel reads each image as one block of 32 * 32 * 3 bytes
    indices = torch.arange(len(images), device=images.device)
    params = torch.zeros((len(images), PARAMS), dtype=torch.int32, device=images.device)
    params[:, FLIP] = int(mirror)
    params[:, CROP_Y] = params[:, CROP_X] = abs(shift) + shift  # a crop of the image padded by |shift|
    return augment(images, indices, params, list(CIFAR_MEAN), list(CIFAR_STD), abs(shift), 0, dtype)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, dtype: torch.dtype,
                 *, mirror: bool = False, shift: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """Test batches in order, normalized only (or mirrored and shifted: test-time augmentation views)."""
    for lo, hi in batch_bounds(len(labels), batch_size, rank, world):
        yield normalize(images[lo:hi], dtype, mirror=mirror, shift=shift), labels[lo:hi]

"""`--whiten-stem`: conv1's filters start as a whitening of the training images' 3x3 patches.

Each 3x3x3 patch of a normalized training image is a point in 27 dimensions. Its covariance has
eigenvectors v_i with eigenvalues l_i; a filter v_i / sqrt(l_i + eps) maps patches to a
coordinate of unit variance, uncorrelated with the others. Each such filter and its negative
(after the ReLU that follows BN, the two keep both signs of the coordinate) make 54 of conv1's
64 filters; the other 10 keep their default init. The network then starts from a stem that
already decorrelates the pixels, which the CIFAR-10 speed records found worth many epochs.
Computed once, from the first `images` training images, before the run trains; the model's
modules and parameter count are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcifar.loaders import normalize

EPS = 5e-4  # keeps the near-zero eigenvalues' filters bounded
IMAGES = 5000  # training images whose patches give the covariance


def patch_covariance(images: torch.Tensor, size: int = 3, chunk: int = 500) -> torch.Tensor:
    """Covariance (C*size*size, C*size*size) of every size x size patch of `images` (N, C, H, W),
    ordered as a conv filter's (C, kh, kw) flattens; summed in float64 over `chunk` images at a
    time, so that 5,000 images' patches need not be in memory at once."""
    dims = images.shape[1] * size * size
    total, outer, count = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64), 0
    for part in images.split(chunk):
        patches = F.unfold(part.double().cpu(), size).transpose(1, 2).reshape(-1, dims)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    return (outer - count * torch.outer(mean, mean)) / (count - 1)


def whitening_filters(covariance: torch.Tensor, channels: int = 3, size: int = 3,
                      eps: float = EPS) -> torch.Tensor:
    """(2D, channels, size, size) filters, D = channels * size * size: each eigenvector scaled by
    1/sqrt(eigenvalue + eps), then the same D negated."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.reshape(-1, channels, size, size)
    return torch.cat([filters, -filters]).float()


@torch.no_grad()
def whiten_stem(conv: torch.nn.Conv2d, train_images, images: int = IMAGES) -> None:
    """Set the first 2D filters of `conv` (the stem) from the patches of the first `images`
    uint8 (N, 32, 32, 3) training images, normalized as the model sees them."""
    batch = normalize(torch.as_tensor(train_images[:images])).float()
    filters = whitening_filters(patch_covariance(batch), conv.in_channels, conv.kernel_size[0])
    if len(filters) > conv.out_channels:
        raise ValueError(f"a {conv.kernel_size[0]}x{conv.kernel_size[0]} whitening needs {len(filters)} filters, "
                         f"the stem has {conv.out_channels}")
    conv.weight[: len(filters)] = filters.to(conv.weight)

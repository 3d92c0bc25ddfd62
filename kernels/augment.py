"""Fused CIFAR augmentation: gather, pad-crop, mirror, normalize, cutout -> channels-last batch.

One op, three pieces: `augment_reference` (plain torch, the definition), `augment_triton`
(one Triton program per image, uint8 in, fp32/bf16/fp16 out, one read and one write per
element), and the `fastcifar::augment` custom op that picks between them and that
`torch.compile` can trace through (fake implementation registered).

Per-image parameters, int32 `params[b] = (crop_y, crop_x, flip, cut_y, cut_x)`:
- output pixel (i, j) reads source pixel (i + crop_y - padding, j' + crop_x - padding), with
  j' = 31 - j when flip else j; sources outside the image read as pixel value 0 (zero padding);
- it is then normalized per channel, ((v / 255) - mean) * (1 / std);
- the cutout square, rows [cut_y - cutout//2, cut_y - cutout//2 + cutout) and the same for
  columns, clipped at the borders, is set to 0 (the mean) in output coordinates.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the reference serves alone.
    triton = None

SIZE = 32
CHANNELS = 3
# The columns of `params`, one row per image; the loaders draw them, DALI and both kernels read them.
CROP_Y, CROP_X, FLIP, CUT_Y, CUT_X = range(5)
PARAMS = 5


def augment_reference(
    images: torch.Tensor, indices: torch.Tensor, params: torch.Tensor,
    mean: list[float], std: list[float], padding: int, cutout: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    batch = indices.shape[0]
    x = images[indices]  # (B, 32, 32, 3) uint8
    p = params.long()
    ar = torch.arange(SIZE, device=images.device)
    rows = p[:, CROP_Y, None] - padding + ar
    cols = torch.where(p[:, FLIP, None].bool(), SIZE - 1 - ar, ar) + p[:, CROP_X, None] - padding
    inside = ((rows >= 0) & (rows < SIZE))[:, :, None] & ((cols >= 0) & (cols < SIZE))[:, None, :]
    b = torch.arange(batch, device=images.device)[:, None, None]
    pixels = x[b, rows.clamp(0, SIZE - 1)[:, :, None], cols.clamp(0, SIZE - 1)[:, None, :]]
    pixels = torch.where(inside[..., None], pixels, torch.zeros((), dtype=torch.uint8, device=images.device))
    mean_t = torch.tensor(mean, device=images.device)
    inv_std = torch.tensor([1.0 / s for s in std], device=images.device)  # as the kernel does
    value = (pixels.float() / 255.0 - mean_t) * inv_std
    if cutout > 0:
        top = p[:, CUT_Y, None] - cutout // 2
        left = p[:, CUT_X, None] - cutout // 2
        in_rows = (ar >= top) & (ar < top + cutout)
        in_cols = (ar >= left) & (ar < left + cutout)
        value = value.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[..., None], 0.0)
    out = torch.empty((batch, CHANNELS, SIZE, SIZE), dtype=out_dtype, device=images.device,
                      memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).copy_(value)
    return out


if triton is not None:

    @triton.jit
    def _augment_kernel(
        images_ptr, indices_ptr, params_ptr, out_ptr,
        mean0, mean1, mean2, inv_std0, inv_std1, inv_std2,
        padding, cutout,
        SIZE: tl.constexpr, CHANNELS: tl.constexpr, BLOCK: tl.constexpr, PARAMS: tl.constexpr,
        CROP_Y: tl.constexpr, CROP_X: tl.constexpr, FLIP: tl.constexpr, CUT_Y: tl.constexpr, CUT_X: tl.constexpr,
    ):
        b = tl.program_id(0)
        image = tl.load(indices_ptr + b).to(tl.int64)
        crop_y = tl.load(params_ptr + b * PARAMS + CROP_Y)
        crop_x = tl.load(params_ptr + b * PARAMS + CROP_X)
        flip = tl.load(params_ptr + b * PARAMS + FLIP)
        cut_top = tl.load(params_ptr + b * PARAMS + CUT_Y) - cutout // 2
        cut_left = tl.load(params_ptr + b * PARAMS + CUT_X) - cutout // 2

        # One element per lane over the image's HWC layout, so stores are contiguous.
        e = tl.arange(0, BLOCK)
        valid = e < SIZE * SIZE * CHANNELS
        c = e % CHANNELS
        pixel = e // CHANNELS
        i = pixel // SIZE
        j = pixel % SIZE
        src_row = i + crop_y - padding
        src_col = tl.where(flip != 0, SIZE - 1 - j, j) + crop_x - padding
        inside = (src_row >= 0) & (src_row < SIZE) & (src_col >= 0) & (src_col < SIZE)
        src = image * (SIZE * SIZE * CHANNELS) + (src_row * SIZE + src_col) * CHANNELS + c
        v = tl.load(images_ptr + src, mask=valid & inside, other=0).to(tl.float32)

        # fp32 throughout, one cast at the store (also what the CPU interpreter needs).
        mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))
        inv_std = tl.where(c == 0, inv_std0, tl.where(c == 1, inv_std1, inv_std2))
        v = (v / 255.0 - mean) * inv_std
        cut = (i >= cut_top) & (i < cut_top + cutout) & (j >= cut_left) & (j < cut_left + cutout)
        v = tl.where(cut, 0.0, v)
        tl.store(out_ptr + b.to(tl.int64) * (SIZE * SIZE * CHANNELS) + e, v.to(out_ptr.dtype.element_ty), mask=valid)


def augment_triton(
    images: torch.Tensor, indices: torch.Tensor, params: torch.Tensor,
    mean: list[float], std: list[float], padding: int, cutout: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("Triton is not installed; use augment_reference")
    batch = indices.shape[0]
    out = torch.empty((batch, CHANNELS, SIZE, SIZE), dtype=out_dtype, device=images.device,
                      memory_format=torch.channels_last)
    if batch:
        _augment_kernel[(batch,)](
            images, indices, params.contiguous(), out,
            mean[0], mean[1], mean[2], 1.0 / std[0], 1.0 / std[1], 1.0 / std[2],
            padding, cutout,
            SIZE=SIZE, CHANNELS=CHANNELS, BLOCK=4096, PARAMS=PARAMS,
            CROP_Y=CROP_Y, CROP_X=CROP_X, FLIP=FLIP, CUT_Y=CUT_Y, CUT_X=CUT_X,
        )
    return out


@torch.library.custom_op("fastcifar::augment", mutates_args=())
def augment(
    images: torch.Tensor, indices: torch.Tensor, params: torch.Tensor,
    mean: list[float], std: list[float], padding: int, cutout: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The fused kernel on CUDA, the torch reference elsewhere."""
    run = augment_triton if images.is_cuda and triton is not None else augment_reference
    return run(images, indices, params, mean, std, padding, cutout, out_dtype)


@augment.register_fake
def _(images, indices, params, mean, std, padding, cutout, out_dtype):
    return torch.empty((indices.shape[0], CHANNELS, SIZE, SIZE), dtype=out_dtype, device=images.device,
                       memory_format=torch.channels_last)

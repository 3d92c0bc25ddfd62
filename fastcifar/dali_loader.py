"""The NVIDIA DALI loader: the same epoch plan as the torch loader, augmented by DALI operators.

An external source hands DALI each batch's uint8 images (gathered from the cache in memory)
and the plan's per-image parameters; DALI then crops with zero padding (`slice`), mirrors and
normalizes to half precision (`crop_mirror_normalize`, HWC) and cuts out (`erase`), on the GPU
or, without one, with its CPU operators. HWC output seen through `permute(0, 3, 1, 2)` is
channels-last NCHW without a copy. DALI has no bf16 output: fp16 is cast on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastcifar.errors import UserError
from fastcifar.kernels.augment import CROP_X, CROP_Y, CUT_X, CUT_Y, FLIP
from fastcifar.loaders import CIFAR_MEAN, CIFAR_STD, Batch, batch_bounds, draw_plan


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_pipeline(source, *, batch_size: int, gpu: bool, device_id: int | None, threads: int, prefetch: int,
                   cutout: int, half: bool):
    """The DALI graph, on the GPU or on DALI's CPU operators.

    `gpu=True, device_id=None` defines the GPU graph without a GPU: enough to `serialize()` it,
    which checks the graph where no GPU exists (CI).
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipeline():
        outputs = 6 if cutout else 4  # the cutout square's anchor and shape only when there is one
        images, labels, start, mirror, *cut = fn.external_source(
            source=source, num_outputs=outputs, batch=True, batch_info=True, layout=["HWC"] + [None] * (outputs - 1))
        if gpu:
            images = images.gpu()
        images = fn.slice(images, start=start, shape=[32, 32], axis_names="HW",
                          out_of_bounds_policy="pad", fill_values=0)
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=[255 * m for m in CIFAR_MEAN], std=[255 * s for s in CIFAR_STD],
            dtype=types.FLOAT16 if half else types.FLOAT, output_layout="HWC")
        if cutout:
            images = fn.erase(images, anchor=cut[0], shape=cut[1], axis_names="HW", fill_value=0)
        return images, labels.gpu() if gpu else labels

    return pipeline()


class DaliLoader:
    """Implements `loaders.Loader` with a DALI pipeline (GPU when `device` is CUDA, else CPU)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, device: torch.device,
        dtype: torch.dtype, seed: int, padding: int, flip: bool, cutout: int, alternate_flip: bool = False,
        threads: int = 4, prefetch: int = 2, rank: int = 0, world: int = 1,
    ) -> None:
        if not dali_available():
            raise UserError("the DALI loader needs NVIDIA DALI: pip install 'fastcifar[dali]'")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise UserError(f"DALI loader needs uint8 (N, 32, 32, 3) images, got {images.dtype} {images.shape}: "
                            "rebuild the cache with `fastcifar data prepare`")
        self.images, self.labels = images, labels
        self.device, self.dtype, self.seed = device, dtype, seed
        self.padding, self.flip, self.alternate_flip, self.cutout = padding, flip, alternate_flip, cutout
        self.threads, self.prefetch = threads, prefetch
        self.bounds = batch_bounds(len(labels), batch_size, rank, world)
        self.batches_per_epoch = len(self.bounds)
        self.batch_size = max((hi - lo for lo, hi in self.bounds), default=1)
        self._iterator = None
        self._next = None  # (epoch, start) the running pipeline will produce next
        self._first = (0, 0)
        self._plan_cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            order, params = draw_plan(len(self.labels), self.seed, epoch, self.padding, self.flip, self.cutout,
                                      self.alternate_flip)
            self._plan_cache = (epoch, (order.numpy(), params.numpy()))
        return self._plan_cache[1]

    def _source(self, info):
        """Batch `info.iteration` of the pipeline's `info.epoch_idx`-th epoch, as DALI inputs."""
        first_epoch, first_start = self._first
        epoch = first_epoch + info.epoch_idx
        position = info.iteration + (first_start if info.epoch_idx == 0 else 0)
        if position >= len(self.bounds):
            raise StopIteration
        order, params = self._plan(epoch)
        lo, hi = self.bounds[position]
        indices, p = order[lo:hi], params[lo:hi]
        start = np.stack([p[:, CROP_Y], p[:, CROP_X]], 1).astype(np.int32) - self.padding
        inputs = (self.images[indices], self.labels[indices], start, p[:, FLIP].astype(np.int32))
        if not self.cutout:
            return inputs
        top_left = np.stack([p[:, CUT_Y], p[:, CUT_X]], 1) - self.cutout // 2
        clipped_lo = np.clip(top_left, 0, 32)
        clipped_hi = np.clip(top_left + self.cutout, 0, 32)
        return (*inputs, clipped_lo.astype(np.float32), (clipped_hi - clipped_lo).astype(np.float32))

    def _start(self, epoch: int, start: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._first = (epoch, start)
        cuda = self.device.type == "cuda"
        pipe = build_pipeline(self._source, batch_size=self.batch_size, gpu=cuda,
                              device_id=(self.device.index or 0) if cuda else None,
                              threads=self.threads, prefetch=self.prefetch, cutout=self.cutout,
                              half=self.dtype != torch.float32)
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        if self._iterator is None or self._next != (epoch, start):
            self._start(epoch, start)  # a new pipeline only when the epochs are not consecutive
        self._next = None  # an epoch left unfinished leaves the pipeline mid-way: rebuild next time
        for out in self._iterator:
            images, labels = out[0]["images"], out[0]["labels"]
            yield images.permute(0, 3, 1, 2).to(self.dtype), labels.reshape(-1)
        self._iterator.reset()
        self._next = (epoch + 1, 0)

"""Test-set evaluation: logits, loss and accuracy, per-class accuracy, confusion matrix, test-time views."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fastcifar.loaders import eval_batches


def views(tta: bool, shift: int) -> list[tuple[bool, int]]:
    """(mirror, shift) of each test-time view: the image, with `tta` its mirror image too, and with
    `shift` each of those also moved by `shift` pixels diagonally both ways."""
    shifts = (0, shift, -shift) if shift else (0,)
    return [(mirror, s) for mirror in ((False, True) if tta else (False,)) for s in shifts]


@torch.no_grad()
def predict(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
            amp_dtype: torch.dtype | None, tta: bool = False, shift: int = 0) -> torch.Tensor:
    """Logits (N, classes) in fp32 for uint8 test images on the model's device: the mean over the
    test-time `views` (one, the image itself, unless `tta` or `shift`)."""
    model.eval()
    dtype = amp_dtype or torch.float32

    def logits(mirror: bool, shift: int) -> torch.Tensor:
        out = []
        for batch, _ in eval_batches(images, labels, batch_size, dtype, mirror=mirror, shift=shift):
            with torch.autocast(images.device.type, dtype=dtype, enabled=amp_dtype is not None):
                # a copy: with --cudagraphs the next replay reuses the output's memory
                out.append(model(batch).to(torch.float32, copy=True))
        return torch.cat(out)

    return torch.stack([logits(mirror, s) for mirror, s in views(tta, shift)]).mean(0)


def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             amp_dtype: torch.dtype | None, tta: bool = False, shift: int = 0) -> dict:
    """Loss and accuracy over the test set, with one host sync."""
    started = time.perf_counter()
    logits = predict(model, images, labels, batch_size, amp_dtype, tta, shift)
    loss, correct = torch.stack([F.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum().float()]).tolist()
    return {"loss": loss, "acc": correct / len(labels), "seconds": time.perf_counter() - started}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    totals = confusion.sum(1)
    return (confusion.diag().double() / totals.clamp(min=1)).tolist()

"""Helpers the tests share: tiny data sets in each source layout, a tiny network, metrics without timing."""

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastcifar.data import CLASSES


def tiny_arrays(train_per_class=3, test_per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10), n).astype(np.int64)
        out[f"{split}_images"] = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        out[f"{split}_labels"] = labels
    return out


def without_timing(metrics: list[dict]) -> list[dict]:
    """Epoch metrics less the figures that vary from run to run, to compare runs."""
    return [{k: v for k, v in m.items() if k not in {"epoch_seconds", "test_seconds", "eval_seconds", "images_per_sec"}}
            for m in metrics]


class TinyNet(torch.nn.Module):
    """Stands in for ResNet18 where only the loop's compile behaviour is under test (compiles in seconds)."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_run(config, network=TinyNet, log=lambda *_: None):
    """(run, dataset) of `config` on the tiny network: the loop's mechanics without ResNet18's seconds."""
    from fastcifar import runtime
    from fastcifar.distributed import SINGLE

    dataset = runtime.load_dataset(config)
    resolved = runtime.resolve_runtime(config, SINGLE, log)
    return runtime.build_run(config, resolved, dataset, network=network), dataset


class RunsCode:
    """Unpickling it makes the folder `marker`: stands in for a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_batches_dir(folder: Path, arrays) -> Path:
    """The official cifar-10-batches-py layout (5 train pickles + test_batch), tiny."""
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(arrays["train_labels"])), 5)
    batches = [(f"data_batch_{i + 1}", idx, "train") for i, idx in enumerate(chunks)]
    batches.append(("test_batch", np.arange(len(arrays["test_labels"])), "test"))
    for name, idx, split in batches:
        images = arrays[f"{split}_images"][idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
        blob = {b"data": images, b"labels": arrays[f"{split}_labels"][idx].tolist()}
        (folder / name).write_bytes(pickle.dumps(blob, protocol=2))
    return folder


def write_image_tree(folder: Path, arrays, suffix=".png", size=32) -> Path:
    for split in ("train", "test"):
        for k, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"], strict=True)):
            path = folder / split / CLASSES[label] / f"{k:04d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).resize((size, size)).save(path)
    return folder


def tar_folder(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def write_official_archive(archive: Path, arrays) -> Path:
    """A tiny archive laid out as the official cifar-10-python.tar.gz; its files are built beside it."""
    folder = write_batches_dir(archive.parent / f"{archive.name}-src" / "cifar-10-batches-py", arrays)
    return tar_folder(folder, archive, "cifar-10-batches-py")


def train_tiny(config, **kwargs):
    """`train.train` on TinyNet: the loop's behaviour in seconds (eval and the report load ResNet18
    only: read such a run's checkpoint with `tiny_model_of`)."""
    from fastcifar import train

    kwargs.setdefault("log", lambda *_: None)
    return train.train(config, network=TinyNet, **kwargs)


def tiny_model_of(state: dict) -> TinyNet:
    model = TinyNet(len(state["classes"]))
    model.load_state_dict(state["model_state"])
    return model.eval()

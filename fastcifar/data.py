"""CIFAR-10 sources -> a validated uint8 cache -> a `Dataset` in memory.

Sources: the official `cifar-10-python.tar.gz` (URL or local file), its extracted
`cifar-10-batches-py/` folder, or an image-folder tree or tarball laid out
`<split>/<class>/*.{png,jpg}` (stored round-robin over the classes, file-name order within each,
so that `--subset N`, the first N images, is class-balanced). The cache is a folder of .npy arrays
plus a manifest with their sha256; it is built in a temporary folder and renamed into place, so it
is only ever seen whole.
Processes sharing a cache root lock it while building: one builds, the others wait and read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from fastcifar.config import OFFICIAL_URL
from fastcifar.errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
CACHE_NAME = "cifar10"
CACHE_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
SYNTHETIC_SOURCE = "synthetic (class prototypes + noise, seed 0; not CIFAR-10)"


@dataclass(frozen=True)
class Dataset:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    synthetic: bool = False
    source_sha256: str | None = None  # of the archive it was read from; None for a folder or synthetic data

    def head(self, train: int | None, test: int | None) -> Dataset:
        """The first `train` training and `test` test images (None keeps all)."""
        for name, n, total in (("--subset", train, len(self.train_labels)),
                               ("--test-subset", test, len(self.test_labels))):
            if n is not None and n > total:
                raise UserError(f"{name} {n} is larger than the {total} images available")
        return dataclasses.replace(self, train_images=self.train_images[:train], train_labels=self.train_labels[:train],
                                   test_images=self.test_images[:test], test_labels=self.test_labels[:test])


# The fake set's sizes when a run takes all of it: CIFAR-10's.
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 50_000, 10_000


def synthetic(train: int = SYNTHETIC_TRAIN, test: int = SYNTHETIC_TEST) -> Dataset:
    """Fixed-seed fake data for tests and benchmarks, never for accuracy.

    Each image is its class's random prototype blended half-and-half with noise, so a model can
    learn it (a loss that falls means something) while nothing about it resembles CIFAR-10.
    Each split's labels and noise come from their own streams, so the first n images are the same
    whatever the split's size: a small set is the head of the full one, made in a fraction of its time.
    """
    prototypes = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)

    def split(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.random.default_rng([0, stream, 0]).integers(0, 10, n, dtype=np.int64)
        noise = np.random.default_rng([0, stream, 1]).integers(0, 128, (n, 32, 32, 3), dtype=np.uint8)
        return prototypes[labels] // 2 + noise, labels

    return Dataset(*split(train, 1), *split(test, 2), CLASSES, SYNTHETIC_SOURCE, synthetic=True)


def cache_path(root: Path) -> Path:
    return Path(root) / CACHE_NAME


def _describe_source(source: str) -> str:
    """The canonical name a cache records for its source: URLs as given, paths made absolute."""
    return source if _is_url(source) else str(Path(source).expanduser().resolve())


def public_name(source: str) -> str:
    """How a shared result names a source: URLs as given, a local file or folder by its name alone
    (its path is this machine's; the archive's sha256 says which data it was)."""
    return source if _is_url(source) or source == SYNTHETIC_SOURCE else Path(source).name


def _cached_source(root: Path) -> str | None:
    """The source the cache under `root` was built from, or None when there is no cache."""
    try:
        return json.loads((cache_path(root) / "manifest.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        return None


def prepare(source: str | None, root: Path, log=print) -> Path:
    """Build the cache under `root` from `source` (default: the official URL); returns its folder."""
    root = Path(root).expanduser()
    with _locked(root, log):
        return _build(source, root, log)


def ensure(source: str | None, root: Path, log=print) -> Dataset:
    """The cache under `root`, built first when it is missing or was built from another `source`.
    Processes sharing `root` (a sweep started at once) build it once: the others wait, then read it."""
    root = Path(root).expanduser()
    with _locked(root, log):
        have = _cached_source(root)
        if have is None or (source is not None and _describe_source(source) != have):
            _build(source, root, log)
    return load(root)


@contextlib.contextmanager
def _locked(root: Path, log):
    """An exclusive lock on `root/.lock` (the OS drops it if the process dies). A file opened for
    writing, not the folder: NFS emulates flock with write locks, which need one."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data root {root} ({e.strerror}): pass a writable --data-root") from None
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only root (a shared cache): readable, and nothing here can build it anyway
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another fastcifar process to finish the cache in {root}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: go on, as before locks existed
            log(f"warning: cannot lock {root} ({e.strerror}); do not build this cache from two processes at once")
        yield
    finally:
        os.close(fd)


def _build(source: str | None, root: Path, log) -> Path:
    source = source or OFFICIAL_URL
    if _is_url(source):
        path = _download(source, root / "downloads")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"data source {source} does not exist: check the path, or pass the official URL")
    log(f"reading CIFAR-10 from {path}")
    arrays, classes, checksum = _read_source(path, log)
    _validate_arrays(arrays, len(classes), where=str(path))
    manifest = {
        "version": CACHE_VERSION,
        "source": _describe_source(source),
        "source_sha256": checksum,
        "classes": list(classes),
        "counts": {"train": len(arrays["train_labels"]), "test": len(arrays["test_labels"])},
    }
    final = cache_path(root)
    _write_cache_atomically(arrays, manifest, final)
    log(f"cache written to {final} ({manifest['counts']['train']} train, {manifest['counts']['test']} test images)")
    return final


def load(root: Path) -> Dataset:
    """Load and validate the cache under `root`."""
    folder = cache_path(Path(root).expanduser())
    manifest_file = folder / "manifest.json"
    if not manifest_file.exists():
        raise UserError(f"no CIFAR-10 cache in {folder}: run `fastcifar data prepare --source PATH_OR_URL`")
    fix = f"rebuild it with `fastcifar data prepare --data-root {folder.parent} --source ...`"
    try:
        manifest = json.loads(manifest_file.read_text())
        checksums = manifest["sha256"]
        classes = tuple(manifest["classes"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"cache manifest {manifest_file} is unreadable: {fix}") from None
    if manifest.get("version") != CACHE_VERSION:
        raise UserError(f"cache in {folder} has format version {manifest.get('version')}, "
                        f"expected {CACHE_VERSION}: {fix}")
    arrays = {}
    for name in ARRAYS:
        file = folder / f"{name}.npy"
        if not file.exists() or _sha256(file) != checksums.get(name):
            raise UserError(f"cache file {file} is missing or corrupt (checksum mismatch): {fix}")
        arrays[name] = np.load(file, allow_pickle=False)
    _validate_arrays(arrays, len(classes), where=str(folder))
    for split in ("train", "test"):
        if len(arrays[f"{split}_labels"]) != manifest["counts"][split]:
            raise UserError(f"cache in {folder} holds the wrong number of {split} images: {fix}")
    return Dataset(**arrays, classes=classes, source=manifest["source"], source_sha256=manifest.get("source_sha256"))


# --- reading sources -------------------------------------------------------------------------


def _read_source(path: Path, log) -> tuple[dict[str, np.ndarray], tuple[str, ...], str | None]:
    if path.is_dir():
        batches = _find_batches_dir(path)
        if batches is not None:
            return _from_pickles(lambda name: (batches / name).read_bytes()), CLASSES, None
        return (*_from_image_files(_walk_folder(path), str(path), log), None)
    checksum = _sha256(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            batch_names = [n for n in members if PurePosixPath(n).name == "data_batch_1"]
            if batch_names:
                if _md5(path) != OFFICIAL_MD5:
                    log(f"warning: {path} differs from the official cifar-10-python.tar.gz (md5 mismatch); "
                        "using it anyway")
                prefix = PurePosixPath(batch_names[0]).parent
                read = lambda name: _read_member(tar, members, str(prefix / name))  # noqa: E731
                return _from_pickles(read), CLASSES, checksum
            files = ((n, lambda m=m: tar.extractfile(m).read()) for n, m in members.items())
            return (*_from_image_files(files, str(path), log), checksum)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        reason = str(e).partition("\n")[0].rstrip(":")  # tarfile lists every method it tried, a line each
        raise UserError(f"{path} is not a readable archive ({type(e).__name__}: {reason}): "
                        "download or copy it again") from None


def _read_member(tar: tarfile.TarFile, members: dict, name: str) -> bytes:
    if name not in members:
        raise UserError(f"archive has no {name}: it is not a complete cifar-10-python.tar.gz")
    return tar.extractfile(members[name]).read()


def _find_batches_dir(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").exists():
            return candidate
    return None


# What a CIFAR batch pickle may name: numpy's array rebuilders (numpy 1 and 2 spell the module apart) and,
# in batches re-pickled by Python 3, its way of writing bytes.
_BATCH_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    """Refuses every other global: a doctored archive could otherwise run code when its batches load."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _BATCH_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds")
        return super().find_class(module, name)


def _from_pickles(read) -> dict[str, np.ndarray]:
    """The official python pickles (written by Python 2, hence encoding='bytes')."""

    def unpickle(name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            batch = _BatchUnpickler(io.BytesIO(read(name)), encoding="bytes").load()
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
            raise UserError(f"CIFAR batch {name} is corrupt ({e}): download the archive again") from None

    train = [unpickle(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = unpickle("test_batch")
    return {
        "train_images": np.concatenate([b[0] for b in train]),
        "train_labels": np.concatenate([b[1] for b in train]),
        "test_images": test_images,
        "test_labels": test_labels,
    }


def _walk_folder(path: Path):
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        yield str(file.relative_to(path).as_posix()), file.read_bytes


def _from_image_files(files, where: str, log) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Images named `.../<split>/<class>/<file>`; split is train or test."""
    found: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for name, read in files:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or parts[-3] not in found or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        found[parts[-3]].setdefault(parts[-2], []).append((parts[-1], name, read()))
    if not found["train"] or not found["test"]:
        raise UserError(f"{where} has no <train|test>/<class>/*.png|jpg images: "
                        "give the official archive or a folder laid out that way")
    classes = tuple(sorted(found["train"]))
    if tuple(sorted(found["test"])) != classes:
        raise UserError(f"{where}: train classes {list(classes)} differ from test classes {sorted(found['test'])}")
    if len(classes) != len(CLASSES):
        raise UserError(f"{where} has {len(classes)} classes {list(classes)}; CIFAR-10 needs 10")
    total = sum(len(v) for split in found.values() for v in split.values())
    arrays = {}
    with tqdm(total=total, desc="decoding images", unit="img", disable=None) as bar:
        for split, by_class in found.items():
            images, labels = [], []
            for label, name, data in _interleave([sorted(by_class[cls]) for cls in classes]):
                images.append(_decode(data, name))
                labels.append(label)
                bar.update()
            arrays[f"{split}_images"] = np.stack(images)
            arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    return arrays, classes


def _interleave(per_class: list[list[tuple]]) -> list[tuple[int, str, bytes]]:
    """Round-robin over the classes (file-name order within each), so any prefix is balanced."""
    rounds = max(len(files) for files in per_class)
    return [(label, files[k][1], files[k][2]) for k in range(rounds)
            for label, files in enumerate(per_class) if k < len(files)]


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (32, 32):
                raise UserError(f"image {name} is {image.size[0]}x{image.size[1]}; CIFAR-10 images are 32x32")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image {name} cannot be decoded ({e}): the source is corrupt") from None


def _validate_arrays(arrays: dict[str, np.ndarray], num_classes: int, where: str) -> None:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise UserError(f"{where}: {split} images are {images.dtype} {images.shape}, expected uint8 (N, 32, 32, 3)")
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise UserError(f"{where}: {split} labels are {labels.dtype} {labels.shape}, "
                            f"expected int64 ({len(images)},)")
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"{where}: {split} labels are empty or outside 0..{num_classes - 1}")
        missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
        if split == "train" and missing:
            raise UserError(f"{where}: no training images for class(es) {missing}")


def _write_cache_atomically(arrays: dict[str, np.ndarray], manifest: dict, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        manifest["sha256"] = {}
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name], allow_pickle=False)
            manifest["sha256"][name] = _sha256(tmp / f"{name}.npy")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if old.exists():
                old.rename(final)  # the previous cache comes back rather than being deleted below
            raise
    except OSError as e:
        aside = f"; the previous cache is left in {old}" if old.exists() and not final.exists() else ""
        raise UserError(f"cannot write the cache to {final} ({e.strerror}){aside}: "
                        "free some space or pass a writable --data-root") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():  # else putting the previous cache back failed too: `old` is all that is left of it
            shutil.rmtree(old, ignore_errors=True)


# --- download and checksums -----------------------------------------------------------------


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _download(url: str, folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only data root: the download has nowhere to go
        raise UserError(f"cannot create {folder} for the download ({e.strerror}): "
                        "pass a writable --data-root") from None
    # The URL's file name without its query; a URL that names no file gets the official name.
    target = folder / (PurePosixPath(urllib.parse.urlsplit(url).path).name or OFFICIAL_URL.rsplit("/", 1)[-1])
    if target.exists() and _md5(target) == OFFICIAL_MD5:
        return target
    partial = target.with_suffix(target.suffix + ".part")
    try:
        _fetch(url, partial)
        if url == OFFICIAL_URL and _md5(partial) != OFFICIAL_MD5:
            raise UserError(f"download of {url} failed its md5 check (expected {OFFICIAL_MD5}): try again")
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)  # a failed or interrupted (Ctrl-C) download leaves no part file
    return target


def _fetch(url: str, path: Path) -> None:
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading", disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # HTTPException: e.g. a bad port
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot download {url} ({reason}): offline? copy cifar-10-python.tar.gz here by hand and run "
            "`fastcifar data prepare --source PATH`"
        ) from None
    # read(n) returns what arrived when the server hangs up early, without an error: count it.
    if total is not None and received != total:
        raise UserError(f"download of {url} was cut off after {received} of {total} bytes: try again")


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return _digest(path, "sha256")


def _md5(path: Path) -> str:
    return _digest(path, "md5")

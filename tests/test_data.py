import hashlib
import http.server
import json
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import RunsCode, tar_folder, write_batches_dir, write_image_tree, write_official_archive
from PIL import Image

from fastcifar import data, runtime
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError


def interleaved(arrays):
    """The cache order of an image-folder source: round-robin over classes (tiny_arrays sorts by class)."""
    out = {}
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        rank_in_class = np.arange(len(labels)) - np.searchsorted(labels, labels)
        order = np.lexsort((labels, rank_in_class))
        out[f"{split}_images"], out[f"{split}_labels"] = arrays[f"{split}_images"][order], labels[order]
    return out


def assert_same(dataset, arrays):
    for name in data.ARRAYS:
        np.testing.assert_array_equal(getattr(dataset, name), arrays[name])
    assert dataset.classes == data.CLASSES


def test_official_archive(tmp_path, arrays):
    archive = write_official_archive(tmp_path / "cifar-10-python.tar.gz", arrays)
    messages = []
    data.prepare(str(archive), tmp_path / "root", log=messages.append)
    assert_same(data.load(tmp_path / "root"), arrays)
    # Not the official bytes: accepted with a warning.
    assert any("md5" in m and "warning" in m for m in messages)
    manifest = json.loads((tmp_path / "root" / "cifar10" / "manifest.json").read_text())
    assert manifest["source_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_extracted_batches_folder(tmp_path, arrays):
    folder = write_batches_dir(tmp_path / "cifar-10-batches-py", arrays)
    for source, root in ((folder, tmp_path / "a"), (tmp_path, tmp_path / "b")):  # the folder or its parent
        data.prepare(str(source), root, log=lambda *_: None)
        assert_same(data.load(root), arrays)


def test_image_folder_tree_png(tmp_path, arrays):
    write_image_tree(tmp_path / "tree", arrays)
    data.prepare(str(tmp_path / "tree"), tmp_path / "root", log=lambda *_: None)
    dataset = data.load(tmp_path / "root")
    assert_same(dataset, interleaved(arrays))  # PNG is lossless
    assert dataset.train_labels[:10].tolist() == list(range(10))  # any prefix is class-balanced


def test_image_folder_tarball_jpeg(tmp_path, arrays):
    tree = write_image_tree(tmp_path / "tree", arrays, suffix=".jpg")
    archive = tar_folder(tree, tmp_path / "cifar10-jpeg.tar.gz", "cifar10-jpeg")
    data.prepare(str(archive), tmp_path / "root", log=lambda *_: None)
    dataset = data.load(tmp_path / "root")
    np.testing.assert_array_equal(dataset.train_labels, interleaved(arrays)["train_labels"])
    # JPEG is lossy: compare with the files' own decoding, round-robin over the classes.
    files = [sorted((tree / "train" / c).iterdir()) for c in data.CLASSES]
    expected = [np.asarray(Image.open(per_class[k])) for k in range(3) for per_class in files]
    np.testing.assert_array_equal(dataset.train_images, np.stack(expected))


def test_ensure_builds_once_then_reads_and_rebuilds_for_another_source(tmp_path, arrays):
    first = write_batches_dir(tmp_path / "a" / "cifar-10-batches-py", arrays)
    second = write_image_tree(tmp_path / "tree", arrays)
    root, builds = tmp_path / "root", []
    log = lambda message: builds.append(message) if message.startswith("reading") else None  # noqa: E731
    for source in (first, None, first, second, None):  # None: whatever the cache holds
        dataset = data.ensure(source and str(source), root, log=log)
    assert len(builds) == 2 and dataset.source == str(second.resolve())


def test_processes_sharing_a_cache_root_build_it_once(tmp_path, arrays, monkeypatch):
    # Threads stand in for processes: flock excludes other open files in the same process too.
    source = write_batches_dir(tmp_path / "src" / "cifar-10-batches-py", arrays)
    real_read, builds, waits = data._read_source, [], []

    def slow_read(path, log):
        builds.append(path)
        time.sleep(0.5)  # long enough for the other thread to find no cache, were there no lock
        return real_read(path, log)

    monkeypatch.setattr(data, "_read_source", slow_read)
    log = lambda message: waits.append(message) if message.startswith("waiting") else None  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: data.ensure(str(source), tmp_path / "root", log=log), range(2)))
    assert len(builds) == 1 and len(waits) == 1
    assert all(np.array_equal(r.train_images, results[0].train_images) for r in results)


def test_a_file_system_without_locks_still_builds_the_cache(tmp_path, arrays, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(data.fcntl, "flock", no_locks)
    source = write_batches_dir(tmp_path / "src" / "cifar-10-batches-py", arrays)
    messages = []
    assert_same(data.ensure(str(source), tmp_path / "root", log=messages.append), arrays)
    assert any(m.startswith("warning: cannot lock") and "No locks available" in m for m in messages)


def test_a_read_only_cache_root_is_read_without_a_lock(tmp_path, arrays, monkeypatch):
    root = tmp_path / "root"
    data.prepare(str(write_batches_dir(tmp_path / "src" / "cifar-10-batches-py", arrays)), root, log=lambda *_: None)
    (root / ".lock").unlink()
    real_open = data.os.open

    def read_only(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied")  # chmod cannot show it: tests may run as root
        return real_open(path, flags, *args)

    monkeypatch.setattr(data.os, "open", read_only)
    assert_same(data.ensure(None, root, log=lambda *_: None), arrays)


def test_synthetic_is_labelled():
    d = data.synthetic(train=8, test=4)
    assert d.synthetic and "synthetic" in d.source and "not CIFAR-10" in d.source
    np.testing.assert_array_equal(d.train_images, data.synthetic(train=8, test=4).train_images)


def test_a_small_synthetic_set_is_the_head_of_a_larger_one():
    small, large = data.synthetic(train=8, test=4), data.synthetic(train=300, test=50)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(small, name), getattr(large, name)[:len(getattr(small, name))])
    assert not np.array_equal(small.train_images[:4], small.test_images)  # the splits are not one stream


def test_a_synthetic_subset_larger_than_the_set_is_refused():
    config = TrainConfig(synthetic=True, subset=8, test_subset=10_001)
    with pytest.raises(UserError, match="--test-subset 10001 is larger than the 10000 images available"):
        runtime.load_dataset(config)


def test_corrupt_cache_detected(tmp_path, arrays):
    write_image_tree(tmp_path / "tree", arrays)
    data.prepare(str(tmp_path / "tree"), tmp_path / "root", log=lambda *_: None)
    file = tmp_path / "root" / "cifar10" / "train_images.npy"
    raw = bytearray(file.read_bytes())
    raw[-1] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt"):
        data.load(tmp_path / "root")


def test_missing_cache_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="fastcifar data prepare"):
        data.load(tmp_path)


@pytest.mark.parametrize("fails", ["writing an array", "renaming the new cache into place"])
def test_failed_rebuild_keeps_old_cache_and_leaves_no_temp(tmp_path, arrays, monkeypatch, fails):
    write_image_tree(tmp_path / "tree", arrays)
    root = tmp_path / "root"
    data.prepare(str(tmp_path / "tree"), root, log=lambda *_: None)
    before = (root / "cifar10" / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fails == "writing an array":
        monkeypatch.setattr(data.np, "save", crash)
    else:  # by then the old cache has been moved aside
        rename = data.Path.rename
        monkeypatch.setattr(data.Path, "rename", lambda src, dst: crash() if ".tmp-" in src.name else rename(src, dst))
    with pytest.raises(UserError, match="cannot write the cache"):
        data.prepare(str(tmp_path / "tree"), root, log=lambda *_: None)
    assert sorted(p.name for p in root.iterdir()) == [".lock", "cifar10"]  # no temp or half cache
    assert (root / "cifar10" / "manifest.json").read_text() == before
    data.load(root)


def test_a_rebuild_that_cannot_put_the_old_cache_back_keeps_it_aside(tmp_path, arrays, monkeypatch):
    write_image_tree(tmp_path / "tree", arrays)
    root = tmp_path / "root"
    data.prepare(str(tmp_path / "tree"), root, log=lambda *_: None)
    rename = data.Path.rename

    def fails_but_the_first(src, dst):  # moving the old cache aside works, every later rename fails
        if src.name != "cifar10":
            raise OSError(5, "Input/output error")
        return rename(src, dst)

    monkeypatch.setattr(data.Path, "rename", fails_but_the_first)
    with pytest.raises(UserError, match="cannot write the cache") as error:
        data.prepare(str(tmp_path / "tree"), root, log=lambda *_: None)
    kept = [p for p in root.iterdir() if p.name.startswith(".cifar10.old-")]
    assert len(kept) == 1 and (kept[0] / "manifest.json").exists()
    assert f"the previous cache is left in {kept[0]}" in str(error.value)  # the user is told where


def test_truncated_archive(tmp_path, arrays):
    archive = write_official_archive(tmp_path / "a.tar.gz", arrays)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable archive"):
        data.prepare(str(archive), tmp_path / "root", log=lambda *_: None)
    assert not (tmp_path / "root" / "cifar10").exists()


def test_batches_pickled_by_numpy_1_load(tmp_path, arrays):
    folder = write_batches_dir(tmp_path / "cifar-10-batches-py", arrays)
    for batch in folder.iterdir():  # the official files name numpy 1's module
        batch.write_bytes(batch.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    data.prepare(str(folder), tmp_path / "root", log=lambda *_: None)
    assert_same(data.load(tmp_path / "root"), arrays)


def test_a_batch_pickle_that_would_run_code_is_refused(tmp_path, arrays):
    folder = write_batches_dir(tmp_path / "cifar-10-batches-py", arrays)
    doctored = {b"data": RunsCode(tmp_path / "ran"), b"labels": []}
    (folder / "data_batch_3").write_bytes(pickle.dumps(doctored, protocol=2))
    with pytest.raises(UserError, match=r"CIFAR batch data_batch_3 is corrupt \(it names \w+\.mkdir"):
        data.prepare(str(folder), tmp_path / "root", log=lambda *_: None)
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "root" / "cifar10").exists()


def test_a_file_that_is_no_archive_gets_a_one_line_error(tmp_path):
    (tmp_path / "a.tar.gz").write_text("not an archive\n")
    with pytest.raises(UserError, match="not a readable archive") as e:
        data.prepare(str(tmp_path / "a.tar.gz"), tmp_path / "root", log=lambda *_: None)
    assert "\n" not in str(e.value)


def test_wrong_layout(tmp_path):
    (tmp_path / "src" / "misc").mkdir(parents=True)
    (tmp_path / "src" / "misc" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="<train|test>"):
        data.prepare(str(tmp_path / "src"), tmp_path / "root", log=lambda *_: None)


def test_wrong_image_size(tmp_path, arrays):
    write_image_tree(tmp_path / "tree", arrays, size=48)
    with pytest.raises(UserError, match="48x48"):
        data.prepare(str(tmp_path / "tree"), tmp_path / "root", log=lambda *_: None)


def test_empty_class(tmp_path, arrays):
    tree = write_image_tree(tmp_path / "tree", arrays)
    for f in (tree / "train" / "cat").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="classes"):
        data.prepare(str(tree), tmp_path / "root", log=lambda *_: None)


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.prepare(str(tmp_path / "nope.tar.gz"), tmp_path / "root", log=lambda *_: None)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cifar-10-python.tar.gz",  # nothing listens there
                                 "http://127.0.0.1:abc/cifar-10-python.tar.gz"])  # http.client's InvalidURL
def test_offline_download_is_a_clear_error(tmp_path, url):
    with pytest.raises(UserError, match="fastcifar data prepare --source"):
        data.prepare(url, tmp_path / "root", log=lambda *_: None)
    assert not list((tmp_path / "root" / "downloads").iterdir())  # no partial download left


@pytest.fixture
def http_server():
    """A local HTTP server: `serve(body, cut_at=None)` gives a URL sending `body`, or only its
    first `cut_at` bytes before hanging up (the header still announces the whole length)."""
    served = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, cut_at = served[self.path.partition("?")[0]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:cut_at])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(body: bytes, cut_at: int | None = None) -> str:
        served["/cifar-10-python.tar.gz"] = (body, cut_at)
        return f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz"

    yield serve
    server.shutdown()


def test_a_download_builds_the_cache(tmp_path, arrays, http_server):
    archive = write_official_archive(tmp_path / "cifar-10-python.tar.gz", arrays)
    url = http_server(archive.read_bytes()) + "?download=1"  # a mirror's URL may carry a query
    messages = []
    assert_same(data.ensure(url, tmp_path / "root", log=messages.append), arrays)
    assert any("md5 mismatch" in m for m in messages)  # a mirror's archive is not the official one
    assert [p.name for p in (tmp_path / "root" / "downloads").iterdir()] == ["cifar-10-python.tar.gz"]


def test_a_cut_off_download_is_a_clear_error_and_leaves_no_part_file(tmp_path, http_server):
    url = http_server(b"x" * 100_000, cut_at=1000)
    with pytest.raises(UserError, match="cut off after 1000 of 100000 bytes: try again"):
        data.prepare(url, tmp_path / "root", log=lambda *_: None)
    assert not list((tmp_path / "root" / "downloads").iterdir())


def test_an_interrupted_download_leaves_no_part_file(tmp_path, http_server, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the bytes arrive

    monkeypatch.setattr(data.tqdm, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(http_server(b"x" * 1000), tmp_path / "root", log=lambda *_: None)
    assert not list((tmp_path / "root" / "downloads").iterdir())


def test_a_download_into_a_read_only_root_is_a_clear_error(tmp_path, monkeypatch):
    real_mkdir = data.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "downloads":
            raise PermissionError(13, "Permission denied")  # chmod cannot show it: tests may run as root
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(data.Path, "mkdir", read_only)
    with pytest.raises(UserError, match="Permission denied.*writable --data-root"):
        data.prepare("http://127.0.0.1:9/cifar-10-python.tar.gz", tmp_path / "root", log=lambda *_: None)


def test_head_subsets_and_checks_size():
    d = data.synthetic(train=10, test=6).head(4, 2)
    assert len(d.train_labels) == 4 and len(d.test_labels) == 2
    with pytest.raises(UserError, match="--subset"):
        d.head(100, None)

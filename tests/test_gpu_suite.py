"""bench/gpu-suite.sh at toy size (--smoke): one step per job at deadline 0, resuming where it stopped."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import tiny_arrays, write_batches_dir

from fastcifar import data

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu-suite.sh"


def run_suite(cwd: Path, cache: Path, out: Path, deadline: str, only: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTCIFAR_DATA": str(cache), "OUT": str(out), "GPU_SUITE_ONLY": only,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this venv's python3
    return subprocess.run(["bash", str(SCRIPT), "--smoke", deadline], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    data.prepare(str(write_batches_dir(tmp_path / "src", tiny_arrays(7, 7))), root, log=lambda *_: None)
    return root


def test_each_job_runs_the_next_unfinished_step(tmp_path, cache):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    results = work / "runs" / "gpu-suite-smoke"
    only = "gpu-tests bench profile"  # three quick steps, none a speedrun

    first = run_suite(work, cache, out, "0", only)  # deadline 0: the first step starts, no second one
    assert first.returncode == 0, first.stderr
    assert "stopping before bench" in first.stdout
    assert re.search(r"^bench: not run yet$", first.stdout, re.M)
    assert re.search(r"^speedrun-fast: not run yet$", first.stdout, re.M)  # not among those named
    tests = json.loads((results / "gpu-tests.json").read_text())
    assert tests["schema"] == "fastcifar-gpu-tests/1" and tests["tests"] == tests["skipped"] > 0  # no GPU here
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert {"./gpu-tests.json", "./gpu-tests.log"} <= set(tar.getnames())

    second = run_suite(work, cache, out, "0", only)
    assert second.returncode == 0, second.stderr
    assert "gpu-suite: gpu-tests:" not in second.stdout  # finished: skipped
    assert "gpu-suite: bench:" in second.stdout and "stopping before profile" in second.stdout
    assert "results" in json.loads((results / "bench.json").read_text())
    assert re.search(r"^gpu-tests: \d+ tests, 0 failed, \d+ skipped", second.stdout, re.M)

    third = run_suite(work, cache, out, "0", only)
    assert third.returncode == 0, third.stderr
    assert "gpu-suite: profile:" in third.stdout and "stopping" not in third.stdout  # the last one named
    assert "convolution backward" in json.loads((results / "profile.json").read_text())["families_ms_per_step"]
    assert "sum (vs measured step)" in third.stdout  # the profile's table among the results
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert {"./profile.json", "./profile.trace.json.gz", "./bench.json"} <= set(tar.getnames())


def test_without_cache_or_tarball_it_names_the_fix(tmp_path):
    result = run_suite(tmp_path, tmp_path / "no-cache", tmp_path, "100")
    assert result.returncode == 2
    assert "fastcifar data prepare" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_failing_step_is_marked_and_the_suite_goes_on(tmp_path, cache):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    results = work / "runs" / "gpu-suite-smoke"
    images = cache / "cifar10" / "train_images.npy"
    images.write_bytes(images.read_bytes()[:-1] + b"x")  # the speedruns fail on a corrupt cache; the bench does not
    only = "speedrun-fast-cudagraphs bench-fast-cudagraphs"  # smoke: both run without --cudagraphs

    first = run_suite(work, cache, out, "100", only)
    assert first.returncode == 1
    assert "speedrun-fast-cudagraphs failed" in first.stderr and "corrupt" in first.stdout
    assert "--cudagraphs" not in first.stdout  # the CPU cannot replay CUDA graphs
    assert (results / "speedrun-fast-cudagraphs.failed").is_file()
    assert (results / "bench-fast-cudagraphs.json").is_file()
    assert re.search(r"^speedrun-fast-cudagraphs: failed \(log: ", first.stdout, re.M)
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert "./speedrun-fast-cudagraphs.failed" in tar.getnames()

    second = run_suite(work, cache, out, "100", only)  # a failed step is not tried again
    assert second.returncode == 0 and "gpu-suite: speedrun-fast-cudagraphs:" not in second.stdout

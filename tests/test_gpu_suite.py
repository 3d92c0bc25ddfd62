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


def run_suite(cwd: Path, cache: Path, out: Path, deadline: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTCIFAR_DATA": str(cache), "OUT": str(out),
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

    first = run_suite(work, cache, out, "0")  # deadline 0: the first step starts, no second one
    assert first.returncode == 0, first.stderr
    assert "stopping before bench" in first.stdout
    assert re.search(r"^bench: not run yet$", first.stdout, re.M)
    tests = json.loads((results / "gpu-tests.json").read_text())
    assert tests["schema"] == "fastcifar-gpu-tests/1" and tests["tests"] == tests["skipped"] > 0  # no GPU here
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert {"./gpu-tests.json", "./gpu-tests.log"} <= set(tar.getnames())

    second = run_suite(work, cache, out, "0")
    assert second.returncode == 0, second.stderr
    assert "gpu-suite: gpu-tests:" not in second.stdout  # finished: skipped
    assert "gpu-suite: bench:" in second.stdout and "stopping before profile" in second.stdout
    assert "results" in json.loads((results / "bench.json").read_text())
    assert re.search(r"^gpu-tests: \d+ tests, 0 failed, \d+ skipped", second.stdout, re.M)

    third = run_suite(work, cache, out, "0")
    assert third.returncode == 0, third.stderr
    assert "gpu-suite: profile:" in third.stdout and "stopping before speedrun-fast" in third.stdout
    assert "convolution backward" in json.loads((results / "profile.json").read_text())["families_ms_per_step"]
    assert "sum (vs measured step)" in third.stdout  # the profile's table among the results
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert {"./profile.json", "./profile.trace.json.gz", "./bench.json"} <= set(tar.getnames())


def test_without_cache_or_tarball_it_names_the_fix(tmp_path):
    result = run_suite(tmp_path, tmp_path / "no-cache", tmp_path, "100")
    assert result.returncode == 2
    assert "fastcifar data prepare" in result.stderr
    assert not (tmp_path / "runs").exists()

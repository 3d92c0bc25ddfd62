"""bench/gpu-suite.sh at toy size (--smoke): one step per job at deadline 0, resuming where it stopped."""

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import tar_folder, tiny_arrays, write_batches_dir, write_image_tree

from fastcifar import cli, data
from fastcifar.config import FAST, REFERENCE

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu-suite.sh"
LOSSLESS_SHA256 = "613b1f23d7a05815aed3b3e401a4358057ded462d1beddac75464954d2e86fc6"  # shared/data/README.md


def run_suite(cwd: Path, cache: Path, out: Path, deadline: str, only: str = "", part: Path | None = None,
              **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTCIFAR_DATA": str(cache), "OUT": str(out), "GPU_SUITE_ONLY": only,
           "GPU_SUITE_STAGING": str(cwd / "staging"),  # not the machine's /tmp/gpu-data
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_vars}  # this venv's python3
    return subprocess.run(["bash", str(SCRIPT), "--smoke", *(["--data-part", str(part)] if part else []), deadline],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_fast_minus_the_levers_puts_the_references_values_back():
    # the suite's fast-minus-* rows turn a lever off by restating its default: they must follow it
    text = SCRIPT.read_text()
    flags = [f for name in ("no_whiten", "no_bn", "no_bias", "no_muon")
             for f in re.search(rf'^{name}="([^"]*)"$', text, re.M).group(1).split()]
    config = cli.config_from_args(cli.build_parser().parse_args(["speedrun", *flags]))
    levers = ("whiten_stem", "freeze_stem_epochs", "bn_momentum", "lookahead", "bn_bias_lr_mult", "optimizer")
    assert {f: getattr(config, f) for f in levers} == {f: getattr(REFERENCE, f) for f in levers}
    assert all(getattr(FAST, f) != getattr(REFERENCE, f) for f in levers)  # each one a lever fast has on


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    data.prepare(str(write_batches_dir(tmp_path / "src", tiny_arrays(7, 7))), root, log=lambda *_: None)
    return root


@pytest.mark.slow  # runs processes
def test_each_job_runs_the_next_unfinished_step(tmp_path, cache):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    results = work / "runs" / "gpu-suite-smoke"
    only = "gpu-tests bench profile"  # three quick steps, none a speedrun

    first = run_suite(work, cache, out, "0", only)  # deadline 0: the first step starts, no second one
    assert first.returncode == 0, first.stderr
    assert "stopping before profile" in first.stdout
    assert re.search(r"^bench: not run yet$", first.stdout, re.M)
    assert re.search(r"^speedrun-fast: not run yet$", first.stdout, re.M)  # not among those named
    tests = json.loads((results / "gpu-tests.json").read_text())
    assert tests["schema"] == "fastcifar-gpu-tests/1" and tests["tests"] == tests["skipped"] > 0  # no GPU here
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert {"./gpu-tests.json", "./gpu-tests.log"} <= set(tar.getnames())

    second = run_suite(work, cache, out, "0", only)
    assert second.returncode == 0, second.stderr
    assert "gpu-suite: gpu-tests:" not in second.stdout  # finished: skipped
    assert "gpu-suite: profile:" in second.stdout and "stopping before bench" in second.stdout
    assert "convolution backward" in json.loads((results / "profile.json").read_text())["families_ms_per_step"]
    assert "sum (vs measured step)" in second.stdout  # the profile's table among the results
    assert re.search(r"^gpu-tests: \d+ tests, 0 failed, \d+ skipped", second.stdout, re.M)

    third = run_suite(work, cache, out, "0", only)
    assert third.returncode == 0, third.stderr
    assert "gpu-suite: bench:" in third.stdout and "stopping" not in third.stdout  # the last one named
    assert "results" in json.loads((results / "bench.json").read_text())
    with tarfile.open(out / "gpu-suite.tgz") as tar:
        assert {"./profile.json", "./profile.trace.json.gz", "./bench.json"} <= set(tar.getnames())


def test_without_the_data_the_speedruns_wait_and_the_fix_is_named(tmp_path):
    result = run_suite(tmp_path, tmp_path / "no-cache", tmp_path, "100", only="speedrun-fast")
    assert result.returncode == 0, result.stderr
    assert "the speedruns wait" in result.stdout and "--data-part" in result.stdout
    assert re.search(r"^speedrun-fast: not run yet$", result.stdout, re.M)
    assert not (tmp_path / "runs" / "gpu-suite-smoke" / "speedrun-fast.log").exists()


def split_like_device_data(tarball: Path, folder: Path, parts: int = 3) -> list[Path]:
    """The tarball in `parts` folders of one chunk each, the last with a join.sh, as
    shared/scripts/device-data lays out the real one."""
    blob, size = tarball.read_bytes(), -(-tarball.stat().st_size // parts)
    out = []
    for k in range(parts):
        part = folder / f"part{k + 1}"
        part.mkdir(parents=True)
        (part / f"{tarball.name}.chunk{k:02d}").write_bytes(blob[k * size:(k + 1) * size])
        out.append(part)
    (out[-1] / "join.sh").write_text("#!/usr/bin/env bash\n")
    return out


def send_parts_in_turn(tmp_path: Path, parts: list[Path], sha256: str) -> list[subprocess.CompletedProcess]:
    """One smoke job per part, as one device call each: the GPU tests need no data, the speedrun waits for all."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    return [run_suite(work, tmp_path / "cache", out, "300", "gpu-tests speedrun-fast", part,
                      GPU_SUITE_DATA_SHA256=sha256) for part in parts]


@pytest.mark.slow  # runs processes
def test_the_data_travels_in_parts_and_the_speedruns_start_once_it_is_whole(tmp_path):
    tree = write_image_tree(tmp_path / "src" / "cifar10-png", tiny_arrays(7, 7))
    tarball = tar_folder(tree, tmp_path / "cifar10-png.tar.gz", "cifar10-png")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    first, second, third = send_parts_in_turn(tmp_path, split_like_device_data(tarball, tmp_path / "parts"), sha)
    results = tmp_path / "work" / "runs" / "gpu-suite-smoke"
    for job, chunks in ((first, 1), (second, 2)):
        assert job.returncode == 0, job.stderr
        assert f"{chunks} chunk(s) of the data" in job.stdout and "the speedruns wait" in job.stdout
        assert re.search(r"^speedrun-fast: not run yet$", job.stdout, re.M)
    assert "gpu-suite: gpu-tests:" in first.stdout and (results / "gpu-tests.json").is_file()  # no GPU minute idle
    assert third.returncode == 0, third.stderr
    assert "parts are joined, sha256 checked" in third.stdout and "gpu-suite: speedrun-fast:" in third.stdout
    result = json.loads((results / "speedrun-fast.json").read_text())
    assert result["data_sha256"] == sha and result["data_source"] == "cifar10-png.tar.gz"
    assert not list((tmp_path / "work" / "staging").glob("*.chunk*"))  # joined: the chunks are gone


@pytest.mark.slow  # runs processes
def test_a_damaged_part_is_named_and_the_speedruns_keep_waiting(tmp_path):
    tree = write_image_tree(tmp_path / "src" / "cifar10-png", tiny_arrays(3, 3))
    tarball = tar_folder(tree, tmp_path / "cifar10-png.tar.gz", "cifar10-png")
    parts = split_like_device_data(tarball, tmp_path / "parts")
    chunk = next(parts[1].glob("*.chunk*"))
    chunk.write_bytes(chunk.read_bytes()[:-1])
    *_, last = send_parts_in_turn(tmp_path, parts, hashlib.sha256(tarball.read_bytes()).hexdigest())
    assert last.returncode == 0 and "send every part again" in last.stderr
    assert re.search(r"^speedrun-fast: not run yet$", last.stdout, re.M)


@pytest.mark.slow
def test_the_real_tarball_rehearsed_as_the_gpu_jobs_bring_it(tmp_path):
    # the whole chain on the CPU: shared/scripts/device-data splits the lossless tarball, one job
    # per part copies it in, the last joins it, checks it and trains on it
    script = SCRIPT.parents[2] / "shared" / "scripts" / "device-data"
    tarball = SCRIPT.parents[2] / "shared" / "data" / "cifar10-png.tar.gz"
    if not (script.is_file() and tarball.is_file()):
        pytest.skip(f"no {script} or {tarball}: the rehearsal needs the shared folder beside the repository")
    # a repository of its own beside a shared/data holding the tarball: the script writes .gpu-data
    # and .git/info/exclude there, not in this checkout (whose .git may have no info/ folder)
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / tarball.name).symlink_to(tarball)
    split = subprocess.run(["bash", str(script)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr
    parts = sorted((repo / ".gpu-data").glob("part*"))
    assert len(parts) == 3 and (parts[-1] / "join.sh").is_file()
    *_, last = send_parts_in_turn(tmp_path, parts, LOSSLESS_SHA256)
    assert last.returncode == 0, last.stderr
    result = json.loads((tmp_path / "work" / "runs" / "gpu-suite-smoke" / "speedrun-fast.json").read_text())
    assert result["data_sha256"] == LOSSLESS_SHA256 and result["data_source"] == "cifar10-png.tar.gz"


@pytest.mark.slow  # runs processes
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

"""Two CPU processes under torchrun (gloo): one run folder, metrics over all ranks' images."""

import subprocess
import sys

import torch

from fastcifar import runs
from fastcifar.distributed import Dist, from_env


def test_from_env():
    assert from_env({}) == Dist()
    assert from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == Dist(1, 2, 1)


def test_two_process_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "fastcifar", "train", "--synthetic", "--device", "cpu", "--epochs", "2", "--subset", "130",
           "--test-subset", "32", "--batch-size", "16", "--no-report", "--deterministic", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   1/2") == 1  # only rank 0 prints
    metrics = runs.read_metrics(out / "metrics.jsonl")
    assert [m["train_images"] for m in metrics] == [130, 130]  # each image once across both ranks
    assert (out / "summary.json").exists() and not list(tmp_path.glob("run?*"))

    # The checkpoint loads into a single-process model and evaluates there.
    state = runs.load_checkpoint(out)
    from fastcifar.model import ResNet18

    model = ResNet18()
    model.load_state_dict(state["model_state"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    from fastcifar import cli

    assert cli.main(["eval", str(out)]) == 0


def test_bench_scaling_under_torchrun():
    from fastcifar import bench

    rows = bench.scaling(2, ["--device", "cpu", "--quick"], log=lambda *_: None)
    assert set(rows) == {"train_images_per_sec_1_ranks", "train_images_per_sec_2_ranks",
                         "scaling_efficiency_1_ranks", "scaling_efficiency_2_ranks"}
    assert rows["scaling_efficiency_1_ranks"]["median"] == 1.0
    assert rows["train_images_per_sec_2_ranks"]["median"] > 0

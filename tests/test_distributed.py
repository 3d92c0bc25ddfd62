"""Two CPU processes under torchrun (gloo): one run folder, metrics over all ranks' images."""

import signal
import subprocess
import sys

import pytest
import torch
from helpers import without_timing

from fastcifar import checkpoints, distributed, runs
from fastcifar.distributed import SINGLE, Dist, from_env, stop_agreed

CPU = torch.device("cpu")


def test_from_env():
    assert from_env({}) == Dist()
    assert from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == Dist(1, 2, 1)


def test_one_process_stops_at_once_on_request():
    assert stop_agreed(SINGLE, True, 1, 20, CPU) and not stop_agreed(SINGLE, False, 1, 20, CPU)


def test_ranks_agree_on_a_stop_every_few_steps_not_every_step(monkeypatch):
    reduced = []

    def other_rank_says(other):
        def all_sum(dist, values):
            reduced.append(values)
            return values + other
        return all_sum

    two = Dist(0, 2, 0)
    monkeypatch.setattr(distributed, "all_sum", other_rank_says(0.0))
    assert [step for step in range(1, 41) if stop_agreed(two, True, step, 20, CPU)] == [20, 40]
    assert len(reduced) == 2  # no all_reduce on the other steps
    assert not stop_agreed(two, False, 20, 20, CPU)
    monkeypatch.setattr(distributed, "all_sum", other_rank_says(1.0))
    assert stop_agreed(two, False, 20, 20, CPU)  # only the other rank was asked to stop
    assert distributed.stop_check_every(torch.device("cuda")) > 1 and distributed.stop_check_every(CPU) == 1


def test_each_cuda_rank_works_on_its_own_gpu_from_the_start(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch_dist, "init_process_group", lambda backend: calls.append(backend))
    distributed.init(Dist(1, 2, 1), torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), "nccl"]
    calls.clear()
    distributed.init(Dist(1, 2, 1), CPU)
    assert calls == ["gloo"]


def torchrun_train(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "fastcifar", "train", *args]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_then_resume_equals_uninterrupted(tmp_path):
    flags = ["--synthetic", "--device", "cpu", "--epochs", "2", "--subset", "320",
             "--test-subset", "32", "--batch-size", "16", "--no-report", "--deterministic"]
    subprocess.run(torchrun_train(29518, *flags, "--out", str(tmp_path / "straight")), check=True,
                   capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    # Ctrl-C in a terminal reaches torchrun alone (its workers run in their own sessions); it passes
    # SIGINT on to each rank. Sent once epoch 1 is logged, so both ranks are inside the loop.
    launcher = subprocess.Popen(torchrun_train(29519, *flags, "--out", str(cut)), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    for line in launcher.stdout:
        if line.startswith("epoch   1/2"):
            launcher.send_signal(signal.SIGINT)
            break
    out, _ = launcher.communicate(timeout=600)
    assert "Resume with: torchrun --nproc_per_node 2 -m fastcifar train --resume" in out
    state = checkpoints.load_checkpoint(cut)
    assert state["epoch"] == 1 and 0 < state["step"] <= 10  # in epoch 2, of 10 steps per rank
    assert not (cut / "summary.json").exists()

    subprocess.run(torchrun_train(29520, "--resume", str(cut)), check=True, capture_output=True, timeout=600)
    assert without_timing(runs.read_metrics(cut / "metrics.jsonl")) == \
        without_timing(runs.read_metrics(tmp_path / "straight" / "metrics.jsonl"))


@pytest.mark.slow  # runs processes
def test_two_process_run(tmp_path):
    out = tmp_path / "run"
    cmd = torchrun_train(29517, "--synthetic", "--device", "cpu", "--epochs", "2", "--subset", "130",
                         "--test-subset", "32", "--batch-size", "16", "--no-report", "--deterministic",
                         "--out", str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   1/2") == 1  # only rank 0 prints
    metrics = runs.read_metrics(out / "metrics.jsonl")
    assert [m["train_images"] for m in metrics] == [130, 130]  # each image once across both ranks
    assert (out / "summary.json").exists() and not list(tmp_path.glob("run?*"))

    # The checkpoint loads into a single-process model and evaluates there.
    state = checkpoints.load_checkpoint(out)
    from fastcifar.model import ResNet18

    model = ResNet18()
    model.load_state_dict(state["model_state"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    from fastcifar import cli

    assert cli.main(["eval", str(out)]) == 0


@pytest.mark.slow  # compiles, or runs processes: minutes on 2 cores
def test_bench_scaling_under_torchrun():
    from fastcifar import bench

    rows = bench.scaling(bench.BenchConfig(device="cpu", quick=True, scaling=2), log=lambda *_: None)
    assert set(rows) == {"train_images_per_sec_1_ranks", "train_images_per_sec_2_ranks",
                         "scaling_efficiency_1_ranks", "scaling_efficiency_2_ranks"}
    assert rows["scaling_efficiency_1_ranks"]["median"] == 1.0
    assert rows["train_images_per_sec_2_ranks"]["median"] > 0


@pytest.mark.slow  # runs processes
def test_the_levers_stack_trains_under_ddp(tmp_path):
    # Muon's step and the lookahead act on each rank's copy after DDP has all-reduced the
    # gradients, so every rank computes the same update from the same weights
    out = tmp_path / "stack"
    cmd = torchrun_train(29521, "--synthetic", "--device", "cpu", "--epochs", "2", "--subset", "64",
                         "--test-subset", "32", "--batch-size", "16", "--no-report", "--deterministic",
                         "--optimizer", "muon", "--whiten-stem", "--freeze-stem-epochs", "1", "--lookahead", "2",
                         "--bn-momentum", "0.4", "--bn-bias-lr-mult", "4", "--out", str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoints.load_checkpoint(out)
    assert any(group.get("muon") for group in state["optimizer_state"]["param_groups"])
    assert len(state["lookahead_state"]) > 0
    assert [m["train_images"] for m in runs.read_metrics(out / "metrics.jsonl")] == [64, 64]

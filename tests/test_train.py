import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastcifar import cli, runs, train
from fastcifar.config import TrainConfig

TINY = TrainConfig(synthetic=True, device="cpu", loader="torch", subset=64, test_subset=32, batch_size=16,
                   epochs=2, report=False, deterministic=True)
TIMING = {"epoch_seconds", "eval_seconds", "images_per_sec"}


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def test_run_folder_contents(tmp_path):
    run_dir = train.train(TINY.replace(out=str(tmp_path / "run")), log=lambda *_: None)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt", "config.json", "env.json", "metrics.jsonl", "summary.json"]
    assert TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == TINY.replace(out=str(run_dir))
    env = json.loads((run_dir / "env.json").read_text())
    assert env["synthetic_data"] and "synthetic" in env["data_source"] and env["torch"] == torch.__version__
    metrics = runs.read_metrics(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                               "eval_seconds", "images_per_sec", "train_images"}
    assert metrics[0]["train_images"] == 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["last_acc"] == metrics[-1]["test_acc"]
    assert runs.load_checkpoint(run_dir)["epoch"] == 2


def test_single_step_run_completes(tmp_path):
    run_dir = train.train(TINY.replace(batch_size=64, epochs=1, out=str(tmp_path / "run")), log=lambda *_: None)
    assert runs.read_metrics(run_dir / "metrics.jsonl")[0]["train_images"] == 64


def test_loss_falls_when_overfitting_a_tiny_set(tmp_path):
    config = TINY.replace(subset=32, epochs=8, lr=0.05, crop_padding=0, flip=False, cutout=0, weight_decay=0,
                          out=str(tmp_path / "run"))
    metrics = runs.read_metrics(train.train(config, log=lambda *_: None) / "metrics.jsonl")
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert metrics[-1]["train_acc"] > 0.5  # chance is 0.1


def test_deterministic_runs_are_identical(tmp_path):
    a = runs.read_metrics(train.train(TINY.replace(out=str(tmp_path / "a")), log=lambda *_: None) / "metrics.jsonl")
    b = runs.read_metrics(train.train(TINY.replace(out=str(tmp_path / "b")), log=lambda *_: None) / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)


def test_interrupted_mid_epoch_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    config = TINY.replace(epochs=3)
    straight = train.train(config.replace(out=str(tmp_path / "straight")), log=lambda *_: None)

    calls = {"n": 0}
    real_any_rank = train.distributed.any_rank

    def stop_at_step_6(dist, flag, device):
        calls["n"] += 1
        return real_any_rank(dist, flag, device) or calls["n"] == 6  # epoch 2, step 2

    monkeypatch.setattr(train.distributed, "any_rank", stop_at_step_6)
    messages = []
    with pytest.raises(train.Interrupted):
        train.train(config.replace(out=str(tmp_path / "cut")), log=messages.append)
    assert "fastcifar train --resume" in messages[-1]
    state = runs.load_checkpoint(tmp_path / "cut")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(train.distributed, "any_rank", real_any_rank)

    train.train(config.replace(out=str(tmp_path / "cut")), resume=tmp_path / "cut", log=lambda *_: None)
    assert without_timing(runs.read_metrics(tmp_path / "cut" / "metrics.jsonl")) == \
        without_timing(runs.read_metrics(straight / "metrics.jsonl"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = train.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, *args, **kwargs):
        loss = real(logits, *args, **kwargs)
        if not logits.requires_grad:
            return loss  # evaluation
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 else loss  # epoch 2, step 1

    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="epoch 2 at step 1"):
        train.train(TINY.replace(out=str(tmp_path / "run")), log=lambda *_: None)
    assert runs.load_checkpoint(tmp_path / "run")["epoch"] == 1
    assert len(runs.read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


def run_cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--subset", "100000"], "--subset 100000 is larger"),
])
def test_cli_errors_are_one_line_and_leave_no_folder(tmp_path, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "run"
    base = ["train", "--synthetic", "--device", "cpu", "--subset", "64", "--test-subset", "32", "--out", str(out)]
    code, err = run_cli(base + args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_rejects_unknown_choice(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--amp", "fp8"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_unwritable_out_and_existing_out(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    base = ["train", "--synthetic", "--device", "cpu", "--subset", "64", "--test-subset", "32", "--batch-size", "16"]
    code, err = run_cli(base + ["--out", str(tmp_path / "full")], capsys)
    assert code == 2 and "not empty" in err
    (tmp_path / "file").write_text("")  # a folder cannot be made under a file, even by root
    code, err = run_cli(base + ["--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "cannot write to run folder" in err


def test_cli_resume_of_foreign_checkpoint(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.pt")
    code, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a fastcifar resnet18-cifar10 checkpoint" in err


def test_sigint_saves_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastcifar", "train", "--synthetic", "--device", "cpu", "--subset", "256",
           "--test-subset", "32", "--batch-size", "16", "--epochs", "3", "--no-report", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "env.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Resume with: fastcifar train --resume" in output
    assert runs.load_checkpoint(out)["step"] >= 1
    assert not (out / "summary.json").exists()


def test_every_config_field_has_a_flag_and_flags_override_the_preset():
    import dataclasses

    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {action.dest for action in train_parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    args = cli.build_parser().parse_args(["train", "--epochs", "3", "--no-flip", "--cutout", "0", "--lr", "0.2"])
    config = cli.config_from_args(args)
    assert (config.epochs, config.flip, config.cutout, config.lr, config.batch_size) == (3, False, 0, 0.2, 512)

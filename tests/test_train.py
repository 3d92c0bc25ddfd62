import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import RunsCode, TinyNet, tiny_model_of, tiny_run, train_tiny, without_timing
from PIL import Image

import fastcifar
from fastcifar import checkpoints, cli, data, environment, report, runs, runtime, train
from fastcifar.config import PRESETS, TrainConfig
from fastcifar.distributed import Dist
from fastcifar.errors import UserError
from fastcifar.evaluate import evaluate, predict
from fastcifar.loaders import batch_bounds, normalize
from fastcifar.model import ResNet18

# fp32 (amp off): these tests check the loop the same way on CPUs with and without native bf16;
# the amp tests below cover bf16.
TINY = TrainConfig(synthetic=True, device="cpu", loader="torch", subset=64, test_subset=32, batch_size=16,
                   epochs=2, report=False, deterministic=True, amp="off")


def test_run_folder_contents(tmp_path):
    run_dir = train_tiny(TINY.replace(out=str(tmp_path / "run")), log=lambda *_: None)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt", "config.json", "env.json", "metrics.jsonl", "summary.json"]
    assert TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == TINY.replace(out=str(run_dir))
    env = json.loads((run_dir / "env.json").read_text())
    assert env["synthetic_data"] and "synthetic" in env["data_source"] and env["torch"] == torch.__version__
    metrics = runs.read_metrics(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) == {"epoch", "lr", "image_side", "train_loss", "train_acc", "test_loss", "test_acc",
                               "test_views", "epoch_seconds", "test_seconds", "eval_seconds", "images_per_sec",
                               "train_images"}
    assert metrics[0]["train_images"] == 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["last_acc"] == metrics[-1]["test_acc"]
    assert summary["train_seconds"] == pytest.approx(sum(m["epoch_seconds"] for m in metrics))
    assert summary["data_seconds"] > 0
    assert summary["compile_seconds"] == 0.0 and summary["compiled_graphs"] == 0  # CPU without --compile
    assert_wall_time_adds_up(summary, metrics)
    assert checkpoints.load_checkpoint(run_dir)["epoch"] == 2


@pytest.mark.parametrize(("eval_every", "views"), [(1, [1, 1, 1, 6]), (2, [0, 1, 0, 6]), (0, [0, 0, 0, 6])])
def test_epochs_are_evaluated_per_eval_every_on_one_view_and_the_last_with_the_recipes_views(tmp_path, eval_every,
                                                                                              views):
    config = TINY.replace(epochs=4, eval_every=eval_every, tta=True, tta_shift=1, out=str(tmp_path / "run"))
    run_dir = train_tiny(config, log=lambda *_: None)
    metrics = runs.read_metrics(run_dir / "metrics.jsonl")
    assert [m["test_views"] for m in metrics] == views
    assert [m["test_acc"] is None for m in metrics] == [v == 0 for v in views]
    assert all(m["test_seconds"] == m["eval_seconds"] == 0 for m in metrics if m["test_acc"] is None)
    # the result is the six views' accuracy, as the saved weights give it with them
    dataset = runtime.load_dataset(config)
    images, labels = torch.from_numpy(dataset.test_images), torch.from_numpy(dataset.test_labels)
    model = tiny_model_of(checkpoints.load_checkpoint(run_dir))
    assert evaluate(model, images, labels, 1000, None, tta=True, shift=1)["acc"] == metrics[-1]["test_acc"]
    assert evaluate(model, images, labels, 1000, None)["loss"] != metrics[-1]["test_loss"]  # one view differs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["last_acc"] == metrics[-1]["test_acc"]
    assert summary["test"]["max_acc"] == max(m["test_acc"] for m in metrics if m["test_acc"] is not None)
    assert_wall_time_adds_up(summary, metrics)


def test_time_to_result_is_the_training_and_the_final_evaluation(tmp_path):
    run_dir = train_tiny(TINY.replace(epochs=3, out=str(tmp_path / "run")), log=lambda *_: None)
    metrics = runs.read_metrics(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_seconds"] == metrics[-1]["test_seconds"] > 0
    assert summary["time_to_result_seconds"] == pytest.approx(summary["train_seconds"] + summary["final_eval_seconds"])
    # the earlier epochs' evaluations are no part of it; compile, data and checkpoints neither
    assert summary["time_to_result_seconds"] < summary["train_seconds"] + summary["eval_seconds"]
    assert summary["time_to_result_seconds"] < summary["wall_seconds"]
    assert f"time to result {summary['time_to_result_seconds']:.1f}s" in runs.format_summary(summary)


def assert_wall_time_adds_up(summary: dict, metrics: list[dict]) -> None:
    assert summary["eval_seconds"] == pytest.approx(sum(m["eval_seconds"] for m in metrics))
    assert summary["checkpoint_seconds"] > 0 and summary["other_seconds"] >= 0
    parts = [summary[f"{part}_seconds"] for part in ("data", "compile", "train", "eval", "checkpoint", "other")]
    assert sum(parts) == pytest.approx(summary["wall_seconds"])
    assert runs.format_wall(summary).startswith(f"wall {summary['wall_seconds']:.1f}s: data ")


def test_single_step_run_completes(tmp_path):
    run_dir = train_tiny(TINY.replace(batch_size=64, epochs=1, out=str(tmp_path / "run")), log=lambda *_: None)
    assert runs.read_metrics(run_dir / "metrics.jsonl")[0]["train_images"] == 64


@pytest.mark.parametrize("amp", ["off", pytest.param("bf16", marks=pytest.mark.slow)])
def test_loss_falls_when_overfitting_a_tiny_set(tmp_path, amp):
    # The real ResNet18, one step of ten images an epoch; bf16 is slow: a CPU without native bf16 emulates it.
    config = TINY.replace(subset=10, test_subset=10, batch_size=10, epochs=6, lr=0.05, crop_padding=0, flip=False,
                          cutout=0, weight_decay=0, amp=amp, out=str(tmp_path / "run"))
    metrics = runs.read_metrics(train.train(config, log=lambda *_: None) / "metrics.jsonl")
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert metrics[-1]["train_acc"] > 0.5  # one class for all scores 0.3 at most on these ten


def test_deterministic_runs_are_identical(tmp_path):
    a = runs.read_metrics(train_tiny(TINY.replace(out=str(tmp_path / "a")), log=lambda *_: None) / "metrics.jsonl")
    b = runs.read_metrics(train_tiny(TINY.replace(out=str(tmp_path / "b")), log=lambda *_: None) / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)
    assert torch.are_deterministic_algorithms_enabled()
    train_tiny(TINY.replace(deterministic=False, epochs=1, subset=16, test_subset=16, out=str(tmp_path / "c")),
                log=lambda *_: None)
    assert not torch.are_deterministic_algorithms_enabled()  # a later run in the process does not inherit it


def stop_after(steps: int):
    """A `stop` for train(): asked after every step, it says stop after the `steps`-th, as a Ctrl-C there would."""
    asked = itertools.count(1)
    return lambda: next(asked) >= steps


def test_interrupted_mid_epoch_then_resumed_equals_uninterrupted(tmp_path):
    config = TINY.replace(epochs=3)
    straight = train_tiny(config.replace(out=str(tmp_path / "straight")), log=lambda *_: None)
    messages = []
    with pytest.raises(train.Interrupted):  # after step 6: epoch 2, step 2
        train_tiny(config.replace(out=str(tmp_path / "cut")), log=messages.append, stop=stop_after(6))
    assert "fastcifar train --resume" in messages[-1]
    state = checkpoints.load_checkpoint(tmp_path / "cut")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert not (tmp_path / "cut" / "summary.json").exists()

    seconds_at_cut = state["seconds"]
    assert seconds_at_cut["wall"] > seconds_at_cut["data"] > 0
    train_tiny(config.replace(out=str(tmp_path / "cut")), resume=tmp_path / "cut", log=lambda *_: None)
    metrics = runs.read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert without_timing(metrics) == without_timing(runs.read_metrics(straight / "metrics.jsonl"))
    # the wall time and its parts take in both processes
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["wall_seconds"] > seconds_at_cut["wall"] and summary["data_seconds"] > seconds_at_cut["data"]
    assert_wall_time_adds_up(summary, metrics)


def test_an_ema_run_evaluates_and_saves_the_average_and_resumes_to_the_uninterrupted_run(tmp_path):
    config = TINY.replace(epochs=3, ema=0.9)
    straight = train_tiny(config.replace(out=str(tmp_path / "straight")), log=lambda *_: None)
    plain = train_tiny(config.replace(ema=0.0, out=str(tmp_path / "plain")), log=lambda *_: None)
    metrics = runs.read_metrics(straight / "metrics.jsonl")
    plain_losses = [m["test_loss"] for m in runs.read_metrics(plain / "metrics.jsonl")]
    assert [m["test_loss"] for m in metrics] != plain_losses
    # the average leaves training as it was: the trained weights evaluate as the plain run's
    assert [m["test_loss_trained"] for m in metrics] == pytest.approx(plain_losses, rel=1e-6)

    state = checkpoints.load_checkpoint(straight)
    assert any(not torch.equal(state["model_state"][k], state["train_state"][k]) for k in state["model_state"])
    dataset = runtime.load_dataset(config)
    saved = evaluate(tiny_model_of(state), torch.from_numpy(dataset.test_images),
                     torch.from_numpy(dataset.test_labels), config.eval_batch_size, None)
    assert saved["loss"] == pytest.approx(metrics[-1]["test_loss"], rel=1e-5)  # the saved model is the one evaluated

    with pytest.raises(train.Interrupted):  # after step 6: epoch 2, step 2
        train_tiny(config.replace(out=str(tmp_path / "cut")), log=lambda *_: None, stop=stop_after(6))
    train_tiny(config.replace(out=str(tmp_path / "cut")), resume=tmp_path / "cut", log=lambda *_: None)
    assert without_timing(runs.read_metrics(tmp_path / "cut" / "metrics.jsonl")) == without_timing(metrics)

    # a plain run resumed with --ema: the average begins there, the training goes on unchanged
    with pytest.raises(train.Interrupted):
        train_tiny(config.replace(ema=0.0, out=str(tmp_path / "late")), log=lambda *_: None, stop=stop_after(6))
    train_tiny(config.replace(out=str(tmp_path / "late")), resume=tmp_path / "late", log=lambda *_: None)
    late = runs.read_metrics(tmp_path / "late" / "metrics.jsonl")
    assert "test_loss_trained" not in late[0] and late[0]["test_loss"] == pytest.approx(plain_losses[0], rel=1e-6)
    assert [m["test_loss_trained"] for m in late[1:]] == pytest.approx(plain_losses[1:], rel=1e-6)
    assert [m["test_loss"] for m in late[1:]] != plain_losses[1:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run of the real ResNet18, which eval, load_model and the docs' example read back."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return train.train(TINY.replace(epochs=1, out=str(out)), log=lambda *_: None)


def test_a_trained_model_loads_for_use_in_python(finished_run):
    model, classes = checkpoints.load_model(finished_run)  # the documented route (docs/run-folder.md)
    assert classes == data.CLASSES and not model.training and next(model.parameters()).dtype == torch.float32
    test = runtime.load_dataset(TINY)  # the run's test images
    labels = torch.from_numpy(test.test_labels)
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(test.test_images)))
    # The loss, not only the accuracy: after one epoch the model may still guess one class for all.
    measured = runs.read_metrics(finished_run / "metrics.jsonl")[-1]
    assert F.cross_entropy(logits, labels).item() == pytest.approx(measured["test_loss"], rel=1e-5)
    assert (logits.argmax(1) == labels).double().mean().item() == pytest.approx(measured["test_acc"])


def test_the_documented_python_example_runs(finished_run, tmp_path, monkeypatch, capsys):
    page = (Path(__file__).parents[1] / "docs" / "run-folder.md").read_text()
    example = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "RUN").symlink_to(finished_run)
    Image.fromarray(np.full((40, 50, 3), 90, dtype=np.uint8)).save("cat.png")  # any size: the example resizes
    exec(example, {})
    assert capsys.readouterr().out.strip() in data.CLASSES


def test_resume_needs_the_process_count_it_was_trained_with(finished_run):
    with pytest.raises(UserError, match=r"trained by 1 process\(es\), this is 2: resume it with fastcifar train"):
        train.train(TINY, Dist(0, 2, 0), resume=finished_run, log=lambda *_: None)  # before any rendezvous


def test_an_out_folder_holding_a_run_is_refused_with_the_resume_command(finished_run):
    with pytest.raises(UserError, match=f"pick another --out, or `--resume {finished_run}`"):
        runs.create_run_dir(str(finished_run))


def test_resuming_a_finished_run_is_refused_and_changes_nothing(finished_run):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    with pytest.raises(UserError, match="has finished its 1 epochs, there is nothing to resume"):
        train.train(checkpoints.config_of(checkpoints.load_checkpoint(finished_run)), resume=finished_run,
                    log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def save_then_fill_the_disk(state, file):
        saves.append(state["epoch"])
        if len(saves) == 2:
            file.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(state, file)

    monkeypatch.setattr(checkpoints.torch, "save", save_then_fill_the_disk)
    with pytest.raises(UserError, match="cannot write .*checkpoint.pt \\(No space left on device\\)"):
        train_tiny(TINY.replace(out=str(tmp_path / "run")), log=lambda *_: None)
    assert saves == [1, 2] and checkpoints.load_checkpoint(tmp_path / "run")["epoch"] == 1
    assert not list((tmp_path / "run").glob("*.tmp"))


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
        train_tiny(TINY.replace(out=str(tmp_path / "run")), log=lambda *_: None)
    assert checkpoints.load_checkpoint(tmp_path / "run")["epoch"] == 1
    assert len(runs.read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


def run_cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--subset", "100000"], "--subset 100000 is larger"),
    (["--pct-start", "1.5"], "--pct-start must be between 0 and 1"),
    (["--sync-bn"], "--sync-bn needs several CUDA ranks"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--momentum", "-0.5"], "--momentum must be 0 or in [0.05, 0.95)"),
    (["--momentum", "0.96"], "--momentum must be 0 or in [0.05, 0.95)"),
    (["--momentum", "0", "--nesterov"], "--nesterov needs a --momentum above 0"),
    (["--weight-decay", "nan"], "--weight-decay must be 0 or a positive number"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (["--ema", "1"], "--ema must be at least 0 and below 1"),
    (["--ema", "-0.1"], "--ema must be at least 0 and below 1"),
    (["--cudagraphs"], "--cudagraphs needs a CUDA GPU"),
    (["--cudagraphs", "--no-compile"], "--cudagraphs replays compiled graphs: drop --no-compile"),
    (["--tta-shift", "5"], "--tta-shift must be between 0 and 4 pixels"),
    (["--alternate-flip", "--no-flip"], "--alternate-flip alternates the flip: drop --no-flip"),
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


def test_falling_back_to_the_cpu_is_said_and_choosing_it_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    for device, expected in (("auto", 1), ("cpu", 0)):
        messages = []
        train_tiny(TINY.replace(device=device, epochs=1, subset=16, test_subset=16, out=str(tmp_path / device)),
                    log=messages.append)
        assert sum("device: cpu, no CUDA GPU is visible" in m for m in messages) == expected


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_a_cpu_is_bf16_where_the_cpu_computes_bf16(tmp_path, monkeypatch, native):
    monkeypatch.setattr(environment, "cpu_computes_bf16", lambda: native)  # the CPU's instruction set
    messages = []
    config = TINY.replace(amp="auto", epochs=1, subset=4, test_subset=4, batch_size=4, out=str(tmp_path / "run"))
    run_dir = train_tiny(config, log=messages.append)
    env = json.loads((run_dir / "env.json").read_text())
    assert env["amp"] == ("torch.bfloat16" if native else "None") and env["cpu_bf16"] is native
    said = [m for m in messages if m.startswith("amp: ")]
    assert len(said) == 1 and said[0].startswith("amp: bf16" if native else "amp: fp32")


def test_amp_off_and_bf16_are_obeyed_and_cuda_auto_is_bf16(monkeypatch):
    monkeypatch.setattr(environment, "cpu_computes_bf16", lambda: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_amp("off", cpu) is None and runtime.resolve_amp("off", cuda) is None
    monkeypatch.setattr(environment, "cpu_computes_bf16", lambda: False)
    assert runtime.resolve_amp("bf16", cpu) is torch.bfloat16
    assert runtime.resolve_amp("auto", cuda, log=pytest.fail) is torch.bfloat16


def test_cli_prints_its_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fastcifar {fastcifar.__version__}"


def test_cli_unwritable_out_and_existing_out(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    base = ["train", "--synthetic", "--device", "cpu", "--subset", "64", "--test-subset", "32", "--batch-size", "16"]
    code, err = run_cli(base + ["--out", str(tmp_path / "full")], capsys)
    assert code == 2 and "exists and is not an empty folder" in err and "--resume" not in err
    (tmp_path / "file").write_text("")  # a folder cannot be made under a file, even by root
    code, err = run_cli(base + ["--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "cannot write to run folder" in err
    code, err = run_cli(base + ["--out", str(tmp_path / "file")], capsys)
    assert code == 2 and "exists and is not an empty folder" in err and "Traceback" not in err
    assert "--resume" not in err  # a file is no run to resume


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, "strftime", lambda _: "20260101-000000")
    folders = [runs.create_run_dir(None) for _ in range(3)]
    assert [str(f) for f in folders] == ["runs/20260101-000000", "runs/20260101-000000-2", "runs/20260101-000000-3"]


def test_resume_refuses_recipe_flags_and_takes_a_new_data_root(finished_run, capsys):
    code, err = run_cli(["train", "--resume", str(finished_run), "--epochs", "5", "--lr", "0.5"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--resume continues {finished_run} with its saved config: drop --epochs --lr" in err
    code, err = run_cli(["train", "--resume", str(finished_run), "--config", "c.json"], capsys)
    assert code == 2 and "drop --config" in err
    args = cli.build_parser().parse_args(["train", "--resume", str(finished_run), "--data-root", "/moved",
                                          "--no-report", "--cudagraphs", "--ema", "0.99", "--eval-every", "3"])
    saved = checkpoints.config_of(checkpoints.load_checkpoint(finished_run))
    assert cli._resumed_config(finished_run, args) == saved.replace(data_root="/moved", report=False, cudagraphs=True,
                                                                    ema=0.99, eval_every=3)


def test_a_run_trained_with_cuda_graphs_resumes_and_evaluates_on_a_cpu_without_them(finished_run, tmp_path):
    state = checkpoints.load_checkpoint(finished_run)
    state["config"]["cudagraphs"] = True  # as a GPU run with --cudagraphs saves it
    checkpoints.save_checkpoint(tmp_path / runs.CHECKPOINT_FILE, state)
    args = cli.build_parser().parse_args(["train", "--resume", str(tmp_path), "--no-cudagraphs"])
    assert cli._resumed_config(tmp_path, args).cudagraphs is False
    assert report.run_eval(tmp_path, device="cpu")["test_acc"] == runs.read_metrics(
        finished_run / "metrics.jsonl")[-1]["test_acc"]


def test_cli_refuses_foreign_and_older_format_checkpoints(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.pt")
    code, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a fastcifar resnet18-cifar10 checkpoint" in err
    torch.save({"format": "fastcifar-checkpoint-1", "model_name": checkpoints.MODEL_NAME}, tmp_path / "checkpoint.pt")
    code, err = run_cli(["eval", str(tmp_path)], capsys)
    assert code == 2 and "is a fastcifar-checkpoint-1 checkpoint, this fastcifar reads " \
        f"{checkpoints.CHECKPOINT_FORMAT}" in err


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model_name": checkpoints.MODEL_NAME,
                "config": RunsCode(tmp_path / "ran")}, tmp_path / "checkpoint.pt")
    code, err = run_cli(["eval", str(tmp_path)], capsys)
    assert code == 2 and f"holds objects a {checkpoints.CHECKPOINT_FORMAT} file never does" in err
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow  # runs processes
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
    assert checkpoints.load_checkpoint(out)["step"] >= 1
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("command", ["train", "speedrun", "profile"])
def test_every_config_field_has_a_flag(command):
    import dataclasses

    parser = cli.build_parser()._subparsers._group_actions[0].choices[command]
    dests = {action.dest for action in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests


def test_flags_override_the_preset():
    args = cli.build_parser().parse_args(["train", "--epochs", "3", "--no-flip", "--cutout", "0", "--lr", "0.2"])
    config = cli.config_from_args(args)
    assert (config.epochs, config.flip, config.cutout, config.lr, config.batch_size) == (3, False, 0, 0.2, 512)


def test_low_res_epochs_0_alone_turns_the_presets_low_res_off():
    fast = cli.config_from_args(cli.build_parser().parse_args(["speedrun", "--epochs", "2", "--low-res-epochs", "0",
                                                               "--freeze-stem-epochs", "0"]))
    assert (fast.low_res, fast.low_res_epochs, fast.image_side(0)) == (32, 0, 32)
    with pytest.raises(UserError, match="go together"):  # a side asked for with no epochs is still refused
        cli.config_from_args(cli.build_parser().parse_args(["speedrun", "--low-res", "20", "--low-res-epochs", "0"]))


def test_warm_up_restores_the_model_and_leaves_no_gradients():
    model = TinyNet(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resolved = runtime.Runtime(torch.device("cpu"), None, False, "torch")
    test_images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    train.warm_up(model, model, [8, 3], [16, 32], test_images, torch.zeros(12, dtype=torch.long), [8, 4], resolved)
    after = model.state_dict()
    assert after["bn.num_batches_tracked"] == 0 and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cudagraphs, calls", [(False, 1), (True, 2)])
def test_warm_up_runs_each_shape_twice_when_cuda_graphs_record_on_the_second_call(cudagraphs, calls):
    shapes = []

    class Recorded(TinyNet):
        def forward(self, images):
            shapes.append((self.training, *images.shape))
            return super().forward(images)

    model = Recorded(10)
    resolved = runtime.Runtime(torch.device("cpu"), None, True, "torch", cudagraphs=cudagraphs)
    test_images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    train.warm_up(model, model, [8, 3], [32], test_images, torch.zeros(12, dtype=torch.long), [8], resolved)
    assert sorted(set(shapes)) == [(False, 8, 3, 32, 32), (True, 3, 3, 32, 32), (True, 8, 3, 32, 32)]
    assert all(shapes.count(shape) == calls for shape in shapes)


@pytest.mark.parametrize("cudagraphs, mode", [(False, None), (True, "reduce-overhead")])
def test_cuda_graphs_compile_in_torchs_reduce_overhead_mode(monkeypatch, cudagraphs, mode):
    asked = {}
    monkeypatch.setattr(torch, "compile", lambda model, **options: asked.update(options) or model)
    resolved = runtime.Runtime(torch.device("cpu"), None, True, "torch", cudagraphs=cudagraphs)
    runtime.make_forward(TinyNet(10), resolved, runtime.distributed.SINGLE)
    assert asked == {"dynamic": False, "mode": mode}


def test_an_epoch_stopped_by_its_hook_resumes_to_the_sums_of_an_uncut_epoch():
    whole = train.train_epoch(tiny_run(TINY)[0], 0)
    run, _ = tiny_run(TINY)
    told = []
    first = train.train_epoch(run, 0, stop=lambda step: step == 2, on_step=told.append)
    assert first.stopped_at == 2 and first.images == 32 and told == [16, 16]  # 64 images in batches of 16
    rest = train.train_epoch(run, 0, start_step=2, resumed=first.partial())
    assert rest.stopped_at is None and rest.images == whole.images == 64
    assert rest.sums == pytest.approx(whole.sums) and rest.lr == whole.lr and rest.seconds > first.seconds


@pytest.mark.slow  # compiles on the CPU
@pytest.mark.parametrize("low_res", [{}, {"low_res": 16, "low_res_epochs": 1}], ids=["32px", "16px-then-32px"])
def test_a_compiled_run_compiles_only_in_its_warm_up(tmp_path, low_res):
    torch._dynamo.reset()
    # 40 images in batches of 16: 16, 16, 8; 20 test images in batches of 16: 16, 4
    config = TINY.replace(subset=40, test_subset=20, eval_batch_size=16, compile=True,
                          data_root=str(tmp_path / "data"), **low_res)
    run, dataset = tiny_run(config)
    test_images, test_labels = torch.from_numpy(dataset.test_images), torch.from_numpy(dataset.test_labels)
    counters = torch._dynamo.utils.counters  # not imported above: the CLI must load before torch's compiler
    graphs = counters["stats"]["unique_graphs"]
    train.warm_up_run(run, len(dataset.train_labels), test_images, test_labels, 0, log=lambda *_: None)
    # each batch shape is a graph: train 16 and 8 at each image side, eval 16 and 4
    assert counters["stats"]["unique_graphs"] - graphs == 2 * (2 if low_res else 1) + 2
    with torch._dynamo.config.patch(error_on_recompile=True):  # a compile inside an epoch raises
        for epoch in range(config.epochs):
            train.train_epoch(run, epoch)
            evaluate(run.forward, test_images, test_labels, config.eval_batch_size, None, config.tta)


def test_each_batch_size_of_an_epoch_is_one_shape_to_compile():
    assert train.batch_sizes(batch_bounds(50_000, 512)) == [512, 336]  # full batches and the last
    assert train.batch_sizes(batch_bounds(50_000, 500)) == [500]  # the last is full too
    # the test set in batches of one size: one eval graph for the reference and fast presets
    assert all(train.batch_sizes(batch_bounds(10_000, p.eval_batch_size)) == [p.eval_batch_size]
               for p in PRESETS.values())


def test_low_res_epochs_train_on_shrunk_images_and_say_so():
    class Recording(TinyNet):
        def forward(self, images):
            shapes.append(tuple(images.shape))
            return super().forward(images)

    shapes = []
    config = TINY.replace(epochs=3, low_res=16, low_res_epochs=2)
    run, _ = tiny_run(config, Recording)
    rows = [train.epoch_metrics(epoch, config.image_side(epoch), train.train_epoch(run, epoch),
                                {"loss": 1.0, "acc": 0.5, "seconds": 1.0, "views": 1}) for epoch in range(3)]
    assert shapes == [(16, 3, 16, 16)] * 8 + [(16, 3, 32, 32)] * 4  # 64 images / 16: 4 steps an epoch
    assert [m["image_side"] for m in rows] == [16, 16, 32]
    assert ["(images 16x16)" in train.format_epoch(m, 3) for m in rows] == [True, True, False]


@pytest.mark.parametrize("flags, message", [
    ({"low_res": 24}, "go together"),
    ({"low_res_epochs": 2}, "go together"),
    ({"low_res": 18, "low_res_epochs": 1}, "16, 20, 24, 28 or 32"),
    ({"low_res": 8, "low_res_epochs": 1}, "16, 20, 24, 28 or 32"),
    ({"low_res": 24, "low_res_epochs": 2}, "fewer than --epochs"),  # TINY has 2 epochs
])
def test_bad_low_res_settings_name_the_fix(flags, message):
    with pytest.raises(UserError, match=message):
        TINY.replace(**flags)


def test_linear_anneal_decays_linearly_and_cos_does_not():
    # 64 images / 16 = 4 steps an epoch, 16 in all; OneCycle peaks at step 3 (pct_start 0.25 of 16,
    # minus one) and ends at step 15 at peak / 25 / 1e4; epoch 3 starts at step 8, 5/12 of the way down.
    peak = TINY.lr
    low = peak / 25 / 1e4
    lrs = {}
    for anneal in ("linear", "cos"):
        run, _ = tiny_run(TINY.replace(epochs=4, anneal=anneal))
        lrs[anneal] = [train.train_epoch(run, epoch).lr for epoch in range(4)]
    assert lrs["linear"][2] == pytest.approx(peak - (peak - low) * 5 / 12)
    assert lrs["cos"][2] == pytest.approx(low + (peak - low) * (1 + math.cos(math.pi * 5 / 12)) / 2)


def momentums(config, steps: int = 16, **default_cycle) -> list[float]:
    """The momentum of each of `steps` steps under `config`'s scheduler (or torch's default
    OneCycle with `default_cycle` given)."""
    optimizer = runtime.make_optimizer(torch.nn.Linear(2, 2), config, torch.device("cpu"))
    if default_cycle:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, **default_cycle)
    else:
        scheduler = runtime.make_scheduler(optimizer, config, batches_per_epoch=steps // config.epochs)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    return seen


def test_momentum_swings_around_the_flag_and_the_reference_keeps_torchs_cycle():
    config = TINY.replace(epochs=4)  # 16 steps, the LR peaks at step 3
    reference = momentums(config)
    assert reference == pytest.approx(momentums(config, pct_start=config.pct_start, anneal_strategy=config.anneal))
    assert reference[0] == pytest.approx(0.95) and min(reference) == pytest.approx(0.85) == reference[3]
    lower = momentums(config.replace(momentum=0.6))
    assert lower[0] == pytest.approx(0.65) and lower[3] == pytest.approx(0.55)
    assert set(momentums(config.replace(momentum=0.0))) == {0.0}


def test_without_bn_and_bias_decay_only_conv_and_linear_weights_decay():
    model = ResNet18(10)
    decayed, rest = runtime.param_groups(model, TINY.replace(weight_decay=5e-4, decay_bn_and_bias=False))
    assert decayed["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    expected = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert {id(p) for p in decayed["params"]} == expected
    assert len(decayed["params"]) + len(rest["params"]) == len(list(model.parameters()))
    (everything,) = runtime.param_groups(model, TINY.replace(weight_decay=5e-4, decay_bn_and_bias=True))
    assert len(everything["params"]) == len(list(model.parameters()))


def test_tta_run_reports_the_flip_averaged_test_loss(tmp_path):
    from fastcifar.evaluate import predict

    run_dir = train_tiny(TINY.replace(epochs=1, tta=True, out=str(tmp_path / "run")), log=lambda *_: None)
    model = tiny_model_of(checkpoints.load_checkpoint(run_dir))
    dataset = runtime.load_dataset(TINY, log=lambda *_: None)
    images, labels = torch.from_numpy(dataset.test_images), torch.from_numpy(dataset.test_labels)
    loss = {tta: torch.nn.functional.cross_entropy(predict(model, images, labels, 64, None, tta), labels).item()
            for tta in (False, True)}
    logged = runs.read_metrics(run_dir / "metrics.jsonl")[0]["test_loss"]
    assert logged == pytest.approx(loss[True], rel=1e-5) and logged != pytest.approx(loss[False], rel=1e-5)


def test_predict_keeps_every_batchs_logits_when_the_model_reuses_its_output_memory():
    # as a CUDA-graph replay (--cudagraphs) does: each call writes its output into the same tensor
    class OneOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.zeros(4, 10)

        def forward(self, images):
            return self.out.copy_(images.mean((1, 2, 3))[:, None].expand(-1, 10))

    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    logits = predict(OneOutput(), images, torch.zeros(8, dtype=torch.long), 4, None)
    assert torch.allclose(logits[:, 0], normalize(images).mean((1, 2, 3)))


def test_fast_preset_is_the_reference_model_with_its_own_recipe():
    config = cli.config_from_args(cli.build_parser().parse_args(["train", "--preset", "fast"]))
    assert config == PRESETS["fast"].replace(compile_cache_dir=config.compile_cache_dir)
    assert config != PRESETS["reference"].replace(compile_cache_dir=config.compile_cache_dir)
    models = [runtime.make_model(10, preset, torch.device("cpu")) for preset in (config, PRESETS["reference"])]
    fast, reference = ({name: tuple(t.shape) for name, t in m.state_dict().items()} for m in models)
    assert fast == reference and sum(p.numel() for p in models[0].parameters()) == 11_173_962
    assert [type(m) for m in models[0].modules()] == [type(m) for m in models[1].modules()]


def test_step_stats_sum_loss_times_batch_correct_and_count():
    sums = torch.zeros(3, dtype=torch.float64)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    train.add_step_stats(sums, torch.tensor(0.5), logits, torch.tensor([0, 1, 1]))
    train.add_step_stats(sums, torch.tensor(1.0), logits[:1], torch.tensor([1]))
    assert sums.tolist() == [0.5 * 3 + 1.0 * 1, 2 + 0, 3 + 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_eager_gpu_runs_are_identical(tmp_path):
    # Raises where an op has no deterministic CUDA kernel (adaptive_avg_pool2d's backward had none).
    config = TINY.replace(device="cuda", compile=False)
    a = runs.read_metrics(train.train(config.replace(out=str(tmp_path / "a")), log=lambda *_: None) / "metrics.jsonl")
    b = runs.read_metrics(train.train(config.replace(out=str(tmp_path / "b")), log=lambda *_: None) / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ema, cudagraphs", [(0.0, False), (0.9, False), (0.0, True)],
                         ids=["plain", "ema", "cudagraphs"])
def test_training_steps_never_wait_for_the_gpu(tmp_path, monkeypatch, ema, cudagraphs):
    # A host sync per step would leave the GPU idle while the host queues the next step. CUDA
    # raises on any sync from the epoch's first step until its one sync (the sums' all_sum).
    real_step, real_all_sum = train.train_step, train.distributed.all_sum

    def step(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        return real_step(*args, **kwargs)

    def all_sum(*args):
        torch.cuda.set_sync_debug_mode("default")
        return real_all_sum(*args)

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train.distributed, "all_sum", all_sum)
    config = TrainConfig(synthetic=True, loader="torch", subset=512, test_subset=256, batch_size=64, epochs=2,
                         ema=ema, cudagraphs=cudagraphs, report=False, out=str(tmp_path / "run"))
    try:
        run_dir = train.train(config, log=lambda *_: None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [m["train_images"] for m in runs.read_metrics(run_dir / "metrics.jsonl")] == [512, 512]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_record_in_the_warm_up_replay_in_the_epochs_and_train_alike(monkeypatch):
    from torch._inductor import cudagraph_trees

    # CUDA graph trees run a graph plainly first (run_eager), then record it (record_function)
    calls = {"run_eager": 0, "record_function": 0}

    def counted(name):
        real = getattr(cudagraph_trees.CUDAGraphTreeManager, name)

        def spy(self, *args, **kwargs):
            calls[name] += 1
            return real(self, *args, **kwargs)
        return spy

    for name in calls:
        monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, name, counted(name))
    counters = torch._dynamo.utils.counters
    skips = counters["inductor"]["cudagraph_skips"]
    config = TrainConfig(synthetic=True, loader="torch", subset=200, test_subset=100, batch_size=64,
                         eval_batch_size=50, epochs=2, tta=True, report=False)
    metrics = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        run, dataset = tiny_run(config.replace(cudagraphs=graphs), network=ResNet18)
        test_images, test_labels = (torch.from_numpy(a).cuda() for a in (dataset.test_images, dataset.test_labels))
        train.warm_up_run(run, len(dataset.train_labels), test_images, test_labels, 0, log=lambda *_: None)
        warmed = dict(calls)
        metrics[graphs] = []
        for epoch in range(config.epochs):
            stats = train.train_epoch(run, epoch)
            test = evaluate(run.forward, test_images, test_labels, config.eval_batch_size, torch.bfloat16, True)
            metrics[graphs] += [stats.sums[0] / stats.images, test["loss"]]
        assert calls == warmed  # nothing ran plainly or was recorded after the warm-up
    assert calls["record_function"] >= 3  # train 64 and 8 (forward and backward each), eval 50
    assert counters["inductor"]["cudagraph_skips"] == skips  # every graph was replayed, none fell back
    # replays read each step's new batch and weights: the losses follow the plain compiled run's
    assert metrics[True] == pytest.approx(metrics[False], rel=0.02)

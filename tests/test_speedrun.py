import hashlib
import json
import statistics
import time

import pytest
import torch
from helpers import tiny_run, without_timing, write_official_archive
from torch._dynamo.utils import counters

from fastcifar import checkpoints, cli, runs, speedrun, train
from fastcifar.config import PRESETS

# fast starts at 24x24 with its stem frozen, and must end at 32x32 with the stem training: these
# short runs keep 32x32 and a free stem throughout
FAST_TINY = ["--synthetic", "--device", "cpu", "--subset", "32", "--test-subset", "16", "--batch-size", "16",
             "--epochs", "1", "--low-res-epochs", "0", "--freeze-stem-epochs", "0", "--no-report", "--amp", "off"]
# the loop's mechanics with SGD for every filter: on a CPU, Muon's orthogonalization of ResNet18's
# filters takes longer than a 16-image step itself (Muon's own tests: test_levers.py)
TINY = [*FAST_TINY, "--optimizer", "sgd"]
REAL_STOP_AGREED = train.distributed.stop_agreed


def ctrl_c_when(monkeypatch, condition) -> None:
    """Runs stop as on a Ctrl-C after the first step at which `condition()` holds."""
    monkeypatch.setattr(train.distributed, "stop_agreed", lambda *a: REAL_STOP_AGREED(*a) or condition())


def test_speedrun_writes_one_record_per_seed(tmp_path, capsys):
    out, path = tmp_path / "runs", tmp_path / "results" / "fast.json"
    code = cli.main(["speedrun", *FAST_TINY, "--epochs", "2", "--seed", "3", "--seeds", "2", "--out", str(out),
                     "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(path.read_text())
    assert {"preset", "device", "data_source", "runs"} <= set(result)
    assert result["preset"] == "fast" and "synthetic" in result["data_source"]
    assert [r["seed"] for r in result["runs"]] == [3, 4]
    for record in result["runs"]:
        run_dir = out / f"seed-{record['seed']}"
        assert checkpoints.config_of(checkpoints.load_checkpoint(run_dir)).seed == record["seed"]
        metrics = runs.read_metrics(run_dir / "metrics.jsonl")
        last = metrics[-1]
        assert record["test_acc"] == last["test_acc"] and 0 <= record["test_acc"] <= 1
        # a speedrun evaluates its last epoch alone unless --eval-every asks for more
        assert record["test_acc_by_epoch"] == [None, last["test_acc"]] and len(metrics) == 2
        assert record["train_seconds"] == pytest.approx(sum(m["epoch_seconds"] for m in metrics))
        assert record["final_eval_seconds"] == last["test_seconds"] > 0
        assert record["time_to_result_seconds"] == pytest.approx(record["train_seconds"] + last["test_seconds"])
        assert record["time_to_result_seconds"] <= record["wall_seconds"]
        assert record["compile_seconds"] == 0.0  # CPU, not compiled
    accuracies = [r["test_acc"] for r in result["runs"]]
    assert result["summary"]["test_acc"]["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert result["summary"]["test_acc"]["min"] == min(accuracies)
    assert result["config"]["epochs"] == 2 and "seed" not in result["config"]
    assert result["summary"]["time_to_result_seconds"]["mean"] == pytest.approx(
        statistics.fmean(r["time_to_result_seconds"] for r in result["runs"]))
    assert "time to result" in capsys.readouterr().out


def test_speedrun_evaluates_every_epoch_when_asked(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = cli.main(["speedrun", *TINY, "--epochs", "2", "--seeds", "1", "--eval-every", "1",
                     "--out", str(tmp_path / "runs"), "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    assert None not in json.loads(path.read_text())["runs"][0]["test_acc_by_epoch"]


def test_speedrun_result_names_no_path_of_this_machine(tmp_path, arrays, capsys):
    # The result file is meant to be committed and shared: its data is named by file name and
    # checksum, and no folder of the machine that ran it appears in it.
    archive = write_official_archive(tmp_path / "cifar.tar.gz", arrays)
    path = tmp_path / "r.json"
    code = cli.main(["speedrun", "--source", str(archive), "--data-root", str(tmp_path / "data"), "--device", "cpu",
                     "--batch-size", "10", "--epochs", "1", "--low-res-epochs", "0", "--freeze-stem-epochs", "0",
                     "--no-report", "--amp", "off",
                     "--out", str(tmp_path / "runs"), "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(path.read_text())
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert result["data_source"] == result["env"]["data_source"] == result["config"]["source"] == "cifar.tar.gz"
    assert result["data_sha256"] == result["env"]["data_sha256"] == sha
    assert result["runs"][0]["run_dir"] == "seed-0" and "data_root" not in result["config"]
    assert str(tmp_path) not in path.read_text()


@pytest.mark.parametrize("args,epochs_saved", [([], [2]), (["--checkpoint-every", "1"], [1, 2])])
def test_speedrun_saves_each_seeds_last_checkpoint_unless_told(tmp_path, monkeypatch, args, epochs_saved):
    saved = []  # the epoch of every checkpoint written
    real_save = checkpoints.save_checkpoint

    def save(path, state):
        saved.append(state["epoch"])
        real_save(path, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    code = cli.main(["speedrun", *TINY, "--epochs", "2", "--seeds", "2", "--out", str(tmp_path / "runs"),
                     "--json", str(tmp_path / "r.json"), *args])
    assert code == 0 and saved == epochs_saved * 2
    assert all(checkpoints.load_checkpoint(tmp_path / "runs" / f"seed-{seed}")["epoch"] == 2 for seed in (0, 1))


@pytest.mark.slow  # compiles, or runs processes: minutes on 2 cores
def test_later_seeds_reuse_the_first_seeds_compiled_code(tmp_path):
    # The seeds share one process; dynamo keeps at most 8 compiled versions of a function, then
    # runs it uncompiled. Were each seed's fresh model to compile anew, later seeds would slow down.
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # the counter is process-wide: other tests compile too
    graphs = []  # graphs compiled so far, after each seed
    # every shape a run has: 2 train batch sizes x 2 image sides, 2 eval batch sizes
    config = PRESETS["fast"].replace(synthetic=True, device="cpu", compile=True, data_root=str(tmp_path / "data"),
                                     subset=40, test_subset=20, batch_size=16, eval_batch_size=16, epochs=2,
                                     low_res=16, low_res_epochs=1, report=False, whiten_stem=False,
                                     freeze_stem_epochs=0)  # the tiny network's 4 stem filters are too few to whiten
    for seed in range(3):  # as speedrun's seeds: a fresh run of the next seed, in the same process
        run, dataset = tiny_run(config.replace(seed=seed))
        test_images, test_labels = torch.from_numpy(dataset.test_images), torch.from_numpy(dataset.test_labels)
        train.warm_up_run(run, len(dataset.train_labels), test_images, test_labels, 0, log=lambda *_: None)
        for epoch in range(config.epochs):
            train.train_epoch(run, epoch)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [before + 6] * 3


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--seed", str(2**32 - 1), "--seeds", "2"], "goes past the largest seed, 2**32 - 1: lower --seed"),
    (["--low-res", "24", "--low-res-epochs", "5", "--epochs", "3"],  # fast's low-res epochs, too few epochs
     "--low-res-epochs (5) must be fewer than --epochs (3): the last epoch trains at 32x32, as the test images are; "
     "pass fewer --low-res-epochs (0: none)"),
])
def test_speedrun_bad_flags(tmp_path, capsys, args, message):
    code = cli.main(["speedrun", *TINY, "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r.json").exists()


def test_interrupted_speedrun_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    args = [*TINY, "--seeds", "2", "--deterministic"]  # 1 epoch of 2 steps per seed
    assert cli.main(["speedrun", *args, "--out", str(tmp_path / "straight"), "--json", str(tmp_path / "a.json")]) == 0
    cut = tmp_path / "cut"
    ctrl_c_when(monkeypatch, lambda: (cut / "seed-0" / "summary.json").exists())  # in the second seed's first step
    code = cli.main(["speedrun", *args, "--out", str(cut), "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert code == train.INTERRUPTED_EXIT and not (tmp_path / "b.json").exists()
    assert f"speedrun interrupted: 1 of 2 seed(s) finished, in {cut}; continue it with: " \
           f"fastcifar speedrun --resume {cut}" in err
    assert checkpoints.load_checkpoint(cut / "seed-1")["step"] == 1
    monkeypatch.setattr(train.distributed, "stop_agreed", REAL_STOP_AGREED)
    code = cli.main(["speedrun", "--resume", str(cut)])  # the results go where the first command asked
    assert code == 0, capsys.readouterr().err
    straight, resumed = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert [r["seed"] for r in resumed["runs"]] == [0, 1]  # seed 0 kept, seed 1 resumed mid-epoch
    assert [r["test_acc"] for r in resumed["runs"]] == [r["test_acc"] for r in straight["runs"]]
    for run in ("seed-0", "seed-1"):
        assert without_timing(runs.read_metrics(cut / run / "metrics.jsonl")) == \
            without_timing(runs.read_metrics(tmp_path / "straight" / run / "metrics.jsonl"))
    # each seed's wall time takes in all its processes: more than its training and evaluation
    assert all(r["wall_seconds"] > r["train_seconds"] + r["eval_seconds"] for r in resumed["runs"])
    assert resumed["config"] == straight["config"] and resumed["preset"] == "fast"


def test_a_flag_given_to_one_resume_holds_on_the_next(tmp_path, capsys, monkeypatch):
    out, path = tmp_path / "runs", tmp_path / "r.json"
    metrics = out / "seed-0" / "metrics.jsonl"

    def stop_in_epoch(n):  # a Ctrl-C after the first step of epoch n (from 1)
        ctrl_c_when(monkeypatch, lambda: metrics.exists() and len(runs.read_metrics(metrics)) == n - 1)

    stop_in_epoch(2)
    code = cli.main(["speedrun", *TINY, "--epochs", "3", "--seeds", "1", "--checkpoint-every", "1", "--eval-every", "1",
                     "--out", str(out), "--json", str(path)])
    assert code == train.INTERRUPTED_EXIT, capsys.readouterr().err
    stop_in_epoch(3)
    assert cli.main(["speedrun", "--resume", str(out), "--ema", "0.9"]) == train.INTERRUPTED_EXIT
    monkeypatch.setattr(train.distributed, "stop_agreed", REAL_STOP_AGREED)
    assert cli.main(["speedrun", "--resume", str(out)]) == 0, capsys.readouterr().err
    # the average from the --ema resume on, through the plain resume after it
    epochs = runs.read_metrics(metrics)
    assert ["test_acc_trained" in m for m in epochs] == [False, True, True]
    assert checkpoints.config_of(checkpoints.load_checkpoint(out / "seed-0")).ema == 0.9
    result = json.loads(path.read_text())
    assert result["config"]["ema"] == 0.9
    assert result["runs"][0]["test_acc_trained_by_epoch"] == [None] + [m["test_acc_trained"] for m in epochs[1:]]


def test_resume_restarts_a_seed_stopped_before_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli.main(["speedrun", *TINY, "--seeds", "1", "--out", str(out), "--json", str(tmp_path / "a.json")]) == 0
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):  # as if killed before a checkpoint
        (out / "seed-0" / name).unlink()
    a = (tmp_path / "a.json").read_text()
    assert cli.main(["speedrun", "--resume", str(out), "--json", str(tmp_path / "b.json")]) == 0
    assert checkpoints.load_checkpoint(out / "seed-0")["epoch"] == 1 and (out / "seed-0" / "summary.json").exists()
    assert (tmp_path / "b.json").exists() and (tmp_path / "a.json").read_text() == a  # --json overrides the plan's


@pytest.mark.parametrize("args", [["--epochs", "3"], ["--seeds", "2"], ["--preset", "fast"]])
def test_speedrun_resume_refuses_flags_that_change_the_plan(tmp_path, capsys, args):
    out = tmp_path / "runs"
    assert cli.main(["speedrun", *TINY, "--seeds", "1", "--out", str(out), "--json", str(tmp_path / "a.json")]) == 0
    plan = (out / speedrun.PLAN_FILE).read_text()
    code = cli.main(["speedrun", "--resume", str(out), *args, "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert code == 2 and f"drop {args[0]}" in err and err.count("\n") == 1
    assert (out / speedrun.PLAN_FILE).read_text() == plan and not (tmp_path / "b.json").exists()


def test_speedrun_resume_of_a_folder_without_a_plan_names_the_fix(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    code = cli.main(["speedrun", "--resume", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "speedrun.json not found: is" in err and err.count("\n") == 1


def test_speedrun_refuses_a_used_folder_before_training(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep").write_text("")
    code = cli.main(["speedrun", *TINY, "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")])
    assert code == 2 and "exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["keep"]
    code = cli.main(["speedrun", *TINY, "--out", str(tmp_path / "runs" / "keep"), "--json", str(tmp_path / "r.json")])
    assert code == 2 and "exists and is not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("json_path,message", [("file/r.json", "pass a writable --json PATH"),
                                               ("folder", "is a folder: give a file name")])
def test_speedrun_bad_results_path_fails_before_training(tmp_path, capsys, json_path, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    code = cli.main(["speedrun", *TINY, "--out", str(tmp_path / "runs"), "--json", str(tmp_path / json_path)])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_default_json_path_names_date_device_preset_and_never_overwrites(tmp_path):
    gpu = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    first = speedrun.default_json_path("fast", gpu, tmp_path)
    assert first.name == f"{time.strftime('%Y-%m-%d')}-h100-80gb-hbm3-fast.json"
    first.write_text("{}")
    assert speedrun.default_json_path("fast", gpu, tmp_path).name == first.name.replace("fast.json", "fast-2.json")
    cpu = {"device_type": "cpu", "device_name": "AMD EPYC 9654 96-Core Processor (2 cores)"}
    assert speedrun.default_json_path("reference", cpu, tmp_path).name.endswith("-cpu-reference.json")


def test_an_ema_speedrun_sums_up_its_trained_weights_beside_the_average():
    rows = [{"seed": s, "test_acc": 0.90 + s / 100, "test_acc_trained": 0.89 + s / 100, "train_seconds": 8.0,
             "time_to_result_seconds": 8.5, "compile_seconds": 1.0, "wall_seconds": 12.0, "images_per_sec": 50_000.0}
            for s in (0, 1)]
    summary = speedrun.summarize(rows)
    assert summary["test_acc_trained"]["mean"] == pytest.approx(0.895) and summary["test_acc"]["min"] == 0.90
    table = speedrun.format_result({"preset": "fast", "device": "GPU", "data_source": "d", "runs": rows,
                                    "summary": summary})
    assert table.splitlines()[-1].startswith("the same runs' trained weights, without the average (--ema): "
                                             "test acc 89.50%")
    without = speedrun.summarize([rows[0], {**rows[1], "test_acc_trained": None}])  # a seed without --ema
    assert "test_acc_trained" not in without


def test_the_results_table_leads_with_the_time_to_result_beside_training_and_wall_time():
    row = {"seed": 0, "test_acc": 0.9, "time_to_result_seconds": 8.4, "train_seconds": 8.0, "compile_seconds": 30.0,
           "wall_seconds": 52.5, "images_per_sec": 50_000.0}
    rows = [row, {**row, "seed": 1, "time_to_result_seconds": 8.6}]
    table = speedrun.format_result({"preset": "fast", "device": "GPU", "data_source": "d", "runs": rows,
                                    "summary": speedrun.summarize(rows)}).splitlines()
    assert table[0].split() == ["seed", "test", "acc", "result", "s", "train", "s", "compile", "s", "wall", "s",
                                "images/s"]
    assert table[1].split() == ["0", "90.00%", "8.40", "8.00", "30.0", "52.5", "50000"]
    assert table[2].split() == ["1", "90.00%", "8.60", "8.00", "30.0", "52.5", "50000"]
    assert "time to result 8.50s ± 0.14 (max 8.60s" in table[3]

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_arrays, write_batches_dir
from PIL import Image
from torch import nn

from fastcifar import checkpoints, cli, data, report, runs, train
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.evaluate import confusion_matrix, per_class_accuracy, predict

pytestmark = pytest.mark.skipif(not report.report_available(), reason="needs the [report] extra")


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_gradcam_equals_independent_computation():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, target = small_net(), 3
    x = torch.randn(2, 3, 32, 32)
    classes = [1, 7]
    with GradCAM(model=model, target_layers=[model[target]]) as cam:
        library = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])

    saved = {}
    model[target].register_forward_hook(lambda m, i, o: saved.__setitem__("act", o))
    logits = model(x.requires_grad_())
    grads = torch.autograd.grad(logits[torch.arange(2), classes].sum(), saved["act"])[0]
    weights = grads.mean(dim=(2, 3), keepdim=True)  # spatially averaged gradients
    maps = torch.relu((weights * saved["act"]).sum(1)).detach().numpy()
    for ours, theirs in zip(maps, library, strict=True):
        # Up to the library's min-max scaling (whose 1e-7 epsilon matters for small maps).
        ours, theirs = ours - ours.min(), theirs - theirs.min()
        np.testing.assert_allclose(theirs / theirs.max(), ours / ours.max(), atol=1e-5)


def test_tta_averages_logits_of_image_and_mirror():
    model = small_net()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    labels = torch.zeros(5, dtype=torch.long)
    plain = predict(model, images, labels, 4, None)
    mirrored = predict(model, images.flip(2), labels, 4, None)  # flip the width axis of NHWC
    torch.testing.assert_close(predict(model, images, labels, 4, None, tta=True), (plain + mirrored) / 2)


def test_shifted_views_average_the_image_moved_both_ways_diagonally():
    model = small_net()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    labels = torch.zeros(5, dtype=torch.long)
    padded = torch.nn.functional.pad(images, (0, 0, 2, 2, 2, 2))  # zeros around each NHWC image
    moved = [padded[:, 2 + d:34 + d, 2 + d:34 + d] for d in (0, 2, -2)]
    each = [predict(model, view, labels, 4, None, tta=tta) for view in moved for tta in (False, True)]
    torch.testing.assert_close(predict(model, images, labels, 4, None, shift=2), (each[0] + each[2] + each[4]) / 3)
    torch.testing.assert_close(predict(model, images, labels, 4, None, tta=True, shift=2), sum(each[1::2]) / 3)


def test_per_class_accuracy_agrees_with_confusion():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = confusion_matrix(labels, predicted, 3)
    assert confusion.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert per_class_accuracy(confusion) == [0.5, 2 / 3, 1.0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(synthetic=True, device="cpu", loader="torch", subset=64, test_subset=48, batch_size=16,
                         epochs=2, report=False, tta=True, low_res=16, low_res_epochs=1, amp="off", out=str(out))
    return train.train(config, log=lambda *_: None)


def test_report_files(tiny_run):
    path = report.write_report(tiny_run)
    text = path.read_text()
    sizes = {"learning_curve.png": (800, 200), "confusion.png": (500, 500), "misclassified.png": (400, 200),
             "gradcam.png": (600, 400)}
    for name, (min_w, min_h) in sizes.items():
        with Image.open(tiny_run / name) as image:
            image.load()
            assert image.width >= min_w and image.height >= min_h, name
        assert f"({name})" in text
    summary = (tiny_run / "summary.txt").read_text()
    assert "11,173,962" in summary and "958.09" in summary
    assert "synthetic data, accuracy meaningless" in text and "Max Acc @ Epoch" in text and "Unfinished" not in text
    assert "test accuracy with flip TTA" in text
    assert runs.format_wall(json.loads((tiny_run / "summary.json").read_text())) in text  # the wall time's parts
    assert "images shrunk to 16x16 in the first 1 epoch(s)" in text
    assert "\n| 1 | 16 | " in text and "\n| 2 | 32 | " in text  # the timing table's epoch and image side
    result = json.loads((tiny_run / "eval_tta.json").read_text())  # the run measured its accuracy with TTA
    assert len(result["per_class_acc"]) == 10 and result["test_images"] == 48
    assert result["test_acc"] == runs.read_metrics(tiny_run / "metrics.jsonl")[-1]["test_acc"]


def test_report_of_an_unfinished_run_says_so_and_how_to_continue(tiny_run, tmp_path):
    # What an interrupted run leaves: no summary.json, and metrics.jsonl only once an epoch has finished.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "summary.json").unlink()
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    text = report.write_report(run).read_text()
    assert "**Unfinished run**: 1 of 2 epochs" in text and f"`fastcifar train --resume {run}`" in text
    (run / "metrics.jsonl").unlink()
    with pytest.raises(UserError, match=f"no finished epoch yet: continue it with `fastcifar train --resume {run}`"):
        report.write_report(run)
    with pytest.raises(UserError, match="env.json not found: is this a fastcifar run folder?"):
        report.write_report(run / "config.json")  # a file, not a folder


def test_a_report_stopped_by_ctrl_c_leaves_no_half_written_file(tiny_run, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("gradcam.png", "report.md"):  # what an earlier report left
        (run / name).write_bytes(b"earlier " + name.encode())
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    real_savefig = Figure.savefig

    def interrupted_at_gradcam(fig, file, **kwargs):
        if fig.get_suptitle().startswith("Grad-CAM"):
            file.write(b"half a png")
            raise KeyboardInterrupt
        real_savefig(fig, file, **kwargs)

    monkeypatch.setattr(Figure, "savefig", interrupted_at_gradcam)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(run)
    after = {path.name: path.read_bytes() for path in run.iterdir()}
    assert after.keys() == before.keys()  # no .tmp file
    assert after["gradcam.png"] == before["gradcam.png"] and after["report.md"] == before["report.md"]


def test_eval_cli_writes_json_and_tta(tiny_run, capsys):
    for name in ("eval.json", "eval_tta.json"):  # what the run's report wrote
        (tiny_run / name).unlink(missing_ok=True)
    written = []
    for flags, tta, shift, name, said in (
        ([], False, 0, "eval.json", None),
        (["--tta"], True, 0, "eval_tta.json", "(with flip TTA)"),
        (["--tta-shift", "1"], False, 1, "eval_shift1.json", "(with +-1 px shifts TTA)"),
        (["--tta", "--tta-shift", "2"], True, 2, "eval_tta_shift2.json", "(with flip and +-2 px shifts TTA)"),
    ):
        assert cli.main(["eval", str(tiny_run / "checkpoint.pt"), *flags]) == 0
        written.append(name)
        assert sorted(p.name for p in tiny_run.glob("eval*.json")) == sorted(written)  # none overwritten
        out = capsys.readouterr().out
        assert ("TTA" in out) == bool(flags) and (said is None or said in out) and "airplane" in out
        result = json.loads((tiny_run / name).read_text())
        confusion = np.asarray(result["confusion"])
        assert result["tta"] == tta and result["tta_shift"] == shift
        assert confusion.sum() == 48
        assert np.allclose(list(result["per_class_acc"].values()),
                           confusion.diagonal() / np.maximum(confusion.sum(1), 1))


def test_eval_rejects_a_shift_out_of_range_in_one_line(tiny_run, capsys):
    before = sorted(p.name for p in tiny_run.iterdir())
    assert cli.main(["eval", str(tiny_run), "--tta-shift", "5"]) == 2
    err = capsys.readouterr().err
    assert "--tta-shift must be between 0 and 4 pixels" in err and err.count("\n") == 1
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # nothing written


def test_eval_warns_when_the_cache_holds_other_data_than_the_run_trained_on(tmp_path, capsys):
    root = tmp_path / "cache"
    data.prepare(str(write_batches_dir(tmp_path / "a", tiny_arrays(2, 2))), root, log=lambda *_: None)
    config = TrainConfig(device="cpu", loader="torch", batch_size=8, epochs=1, report=False, data_root=str(root),
                         amp="off", out=str(tmp_path / "run"))
    run_dir = train.train(config, log=lambda *_: None)
    report.run_eval(run_dir)
    assert "warning" not in capsys.readouterr().err
    data.prepare(str(write_batches_dir(tmp_path / "b", tiny_arrays(2, 2, seed=1))), root, log=lambda *_: None)
    report.run_eval(run_dir)
    assert f"was trained on {tmp_path / 'a'}, the cache in {root} holds {tmp_path / 'b'}" in capsys.readouterr().err
    assert json.loads((run_dir / "eval.json").read_text())["data_source"] == "b"  # its name, not this machine's path


@pytest.mark.slow  # compiles on the CPU
def test_compiled_and_eager_eval_agree(tiny_run):
    state = checkpoints.load_checkpoint(tiny_run)
    model = report.ResNet18()
    model.load_state_dict(state["model_state"])
    from fastcifar.data import synthetic

    d = synthetic(train=1, test=48)
    images, labels = torch.from_numpy(d.test_images), torch.from_numpy(d.test_labels)
    eager = predict(model, images, labels, 48, None)
    compiled = predict(torch.compile(model), images, labels, 48, None)
    assert torch.equal(eager.argmax(1), compiled.argmax(1))
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_train_cli_adds_the_reports_seconds_to_the_wall_time(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--synthetic", "--device", "cpu", "--subset", "32", "--test-subset", "16",
                     "--batch-size", "16", "--epochs", "1", "--amp", "off", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0 and (out / "report.md").exists()
    summary = json.loads((out / "summary.json").read_text())
    parts = ("data", "compile", "train", "eval", "checkpoint", "report", "other")
    assert summary["report_seconds"] > 0
    assert sum(summary[f"{part}_seconds"] for part in parts) == pytest.approx(summary["wall_seconds"])
    assert printed[-1] == runs.format_wall(summary) and "report" in printed[-1]  # the last line says it all

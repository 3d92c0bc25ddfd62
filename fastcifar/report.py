"""`fastcifar eval` and `fastcifar report`: the reference notebook's outputs as files in the run folder.

eval.json (accuracy, per-class accuracy, confusion matrix; eval_tta.json, eval_tta_shift1.json, ...
with test-time views),
report.md, learning_curve.png, confusion.png, misclassified.png, gradcam.png and summary.txt
(torchinfo). Grad-CAM and the summary use the uncompiled fp32 model; matplotlib, grad-cam and
torchinfo load only here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from fastcifar import checkpoints, runs
from fastcifar.config import TrainConfig, check_tta_shift
from fastcifar.data import public_name
from fastcifar.distributed import SINGLE
from fastcifar.errors import UserError
from fastcifar.evaluate import confusion_matrix, per_class_accuracy, predict
from fastcifar.loaders import normalize
from fastcifar.model import ResNet18, count_parameters, multiply_adds
from fastcifar.runtime import load_dataset, resolve_runtime

REPORT_PACKAGES = ("matplotlib", "pytorch_grad_cam", "torchinfo")


def report_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in REPORT_PACKAGES)


def _load(checkpoint: Path, device: str, data_root: str | None):
    state = checkpoints.load_checkpoint(checkpoint)
    config: TrainConfig = checkpoints.config_of(state)
    # the plain model is evaluated: no CUDA graphs, so a run trained with them evaluates on a CPU too
    config = config.replace(device=device, loader="torch", cudagraphs=False,
                            **({"data_root": data_root} if data_root else {}))
    runtime = resolve_runtime(config, SINGLE, log=lambda *_: None)
    dataset = load_dataset(config, log=lambda *_: None)
    if dataset.source != state["data_source"]:  # the cache was rebuilt from another source since
        print(f"warning: {checkpoint} was trained on {state['data_source']}, the cache in {config.data_dir} "
              f"holds {dataset.source}: these results are on that data", file=sys.stderr)
    return config, runtime, dataset, checkpoints.model_of(state).to(runtime.device)


def run_eval(checkpoint: Path, device: str = "auto", tta: bool = False, shift: int = 0,
             data_root: str | None = None) -> dict:
    """Evaluate a checkpoint on the test set; prints a table and writes eval.json (named by its
    test-time views otherwise: `_eval_name`) beside it."""
    check_tta_shift(shift)
    _, runtime, dataset, model = _load(checkpoint, device, data_root)
    result = _evaluate(model, dataset, runtime, tta, shift)
    print(format_per_class(result, dataset.classes))
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    _write_eval(run_dir, result)
    return result


def _eval_name(tta: bool, shift: int) -> str:
    """eval.json, eval_tta.json, eval_shift1.json, eval_tta_shift1.json, ...: one file per set of
    test-time views, so that evaluating one way does not overwrite another way's result."""
    return "eval" + ("_tta" if tta else "") + (f"_shift{shift}" if shift else "") + ".json"


def _write_eval(run_dir: Path, result: dict) -> None:
    runs.write_json(run_dir / _eval_name(result["tta"], result["tta_shift"]),
                    {k: v for k, v in result.items() if k != "logits"})


def _evaluate(model, dataset, runtime, tta: bool, shift: int) -> dict:
    images = torch.from_numpy(dataset.test_images).to(runtime.device)
    labels = torch.from_numpy(dataset.test_labels).to(runtime.device)
    logits = predict(model, images, labels, 1024, runtime.amp_dtype, tta=tta, shift=shift)
    confusion = confusion_matrix(labels, logits.argmax(1), len(dataset.classes))
    return {
        "test_acc": confusion.diag().sum().item() / len(labels),
        "per_class_acc": dict(zip(dataset.classes, per_class_accuracy(confusion), strict=True)),
        "confusion": confusion.tolist(),
        "tta": tta,
        "tta_shift": shift,
        "test_images": len(labels),
        "data_source": public_name(dataset.source),  # eval files get shared: no path of this machine
        "logits": logits.cpu(),
    }


def format_per_class(result: dict, classes) -> str:
    lines = [f"test accuracy {result['test_acc']:.2%}" + _views_said(result["tta"], result["tta_shift"], " ({})"),
             f"{'class':<12}{'accuracy':>10}"]
    lines += [f"{c:<12}{result['per_class_acc'][c]:>10.2%}" for c in classes]
    return "\n".join(lines)


def _views_said(tta: bool, shift: int, template: str) -> str:
    """`template` around the test-time views in words, or "" for the image alone."""
    if not (tta or shift):
        return ""
    said = " and ".join(([] if not tta else ["flip"]) + ([f"+-{shift} px shifts"] if shift else []))
    return template.format(f"with {said} TTA")


def write_report(run_dir: Path, device: str = "auto", data_root: str | None = None, count: int = 20) -> Path:
    if not report_available():
        raise UserError("the report needs matplotlib, grad-cam and torchinfo: pip install 'fastcifar[report]'")
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    env = runs.read_json(run_dir / "env.json", fix="is this a fastcifar run folder?")
    resume = f"{runs.train_command(env['processes'])} --resume {run_dir}"
    # metrics.jsonl appears after the first epoch; summary.json once the run has finished
    metrics = runs.read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if not metrics:
        raise UserError(f"{run_dir} has no finished epoch yet: continue it with `{resume}`")
    finished = (run_dir / "summary.json").exists()
    config, runtime, dataset, model = _load(run_dir, device, data_root)
    model = model.float()
    # with the views the run's test accuracy was measured with
    result = _evaluate(model, dataset, runtime, config.tta, config.tta_shift)
    _write_eval(run_dir, result)
    probs = result["logits"].softmax(1)
    predicted = probs.argmax(1).numpy()
    wrong = np.flatnonzero(predicted != dataset.test_labels)[:count]
    right = np.flatnonzero(predicted == dataset.test_labels)[: max(1, count // 4)]

    plot_learning_curve(metrics, run_dir / "learning_curve.png")
    plot_confusion(np.asarray(result["confusion"]), dataset.classes, run_dir / "confusion.png")
    plot_misclassified(dataset, wrong, predicted, probs, run_dir / "misclassified.png")
    plot_gradcam(model.cpu(), dataset, np.concatenate([right[:4], wrong[:8]]), predicted, run_dir / "gradcam.png")
    summary_text = model_summary(ResNet18(len(dataset.classes)))
    runs.write_text(run_dir / "summary.txt", summary_text)

    summary = runs.read_json(run_dir / "summary.json") if finished else runs.summarize(metrics)  # with the timing
    table = runs.format_summary(summary)
    lines = [
        f"# fastcifar run `{run_dir.name}`",
        "",
        f"Data: {dataset.source}" + (" — **synthetic data, accuracy meaningless**" if dataset.synthetic else ""),
        f"Device: {env['device_name']} ({env['device_type']}, {env['processes']} process(es)); "
        f"torch {env['torch']}; loader {env.get('loader')}; amp {env.get('amp')}; compile {env.get('compile')}",
        f"Recipe: {config.epochs} epochs, batch {config.batch_size}, peak LR {config.lr} ({config.anneal} OneCycle), "
        f"train images {len(dataset.train_labels)}, test images {len(dataset.test_labels)}"
        + (f", images shrunk to {config.low_res}x{config.low_res} in the first {config.low_res_epochs} epoch(s)"
           if config.low_res_epochs else "")
        + _views_said(config.tta, config.tta_shift, ", test accuracy {}"),
        "",
        *([] if finished else [f"**Unfinished run**: {len(metrics)} of {config.epochs} epochs. Accuracy per class, "
                               f"the confusion matrix and the images are of the weights saved when it stopped. "
                               f"Continue it with `{resume}`.", ""]),
        "## Results",
        "```", table, "```",
        "",
        "## Per-class test accuracy",
        "| class | accuracy |", "|---|---|",
        *[f"| {c} | {a:.2%} |" for c, a in result["per_class_acc"].items()],
        "",
        "## Timing",
        "| epoch | image side | train s | images/s | eval s | test acc | test views |", "|---|---|---|---|---|---|---|",
        *[f"| {m['epoch']} | {m['image_side']} | {m['epoch_seconds']:.2f} | {m['images_per_sec']:.0f} | "
          f"{m['eval_seconds']:.2f} | " + (f"{m['test_acc']:.2%} | {m['test_views']} |" if m["test_acc"] is not None
                                           else "- | - |") for m in metrics],
        "",
        "Train seconds count training steps only: compilation (after a warm-up on every batch shape) "
        "and data loading are in the results above, evaluation in its own column. Epochs before the last are "
        "evaluated every `--eval-every` epochs, on the image alone; the last with the recipe's test views.",
        "",
        "## Learning curve", "![learning curve](learning_curve.png)", "",
        "## Confusion matrix", "![confusion matrix](confusion.png)", "",
        "## Misclassified test images", "![misclassified](misclassified.png)", "",
        "## Grad-CAM (layer4)",
        "Top row: the test images (✓ correct, ✗ misclassified); below each, heat maps for the predicted class, "
        "then for the true class.",
        "![Grad-CAM](gradcam.png)", "",
        "## Model summary", "```", summary_text.rstrip(), "```", "",
    ]
    path = run_dir / "report.md"
    runs.write_text(path, "\n".join(lines))
    return path


def _save(fig, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    try:
        runs.write_atomically(path, lambda file: fig.savefig(file, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def model_summary(model: torch.nn.Module) -> str:
    import torchinfo

    stats = torchinfo.summary(model, (1, 3, 32, 32), verbose=0, device="cpu")
    return (f"{stats}\n\nparameters {count_parameters(model):,}; multiply-adds "
            f"{multiply_adds(model) / 1e6:.2f} M in convs + linear\n")


def plot_learning_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        evaluated = [m for m in metrics if m[f"{split}_acc"] is not None]  # the test: per --eval-every
        axes[0].plot([m["epoch"] for m in evaluated], [m[f"{split}_loss"] for m in evaluated], style, label=split)
        axes[1].plot([m["epoch"] for m in evaluated], [100 * m[f"{split}_acc"] for m in evaluated], style,
                     label=split)
    axes[2].plot(epochs, [m["lr"] for m in metrics], "-o", color="tab:green")
    for ax, title in zip(axes, ("loss", "accuracy (%)", "learning rate at epoch start"), strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    _save(fig, path, dpi=100)


def plot_confusion(confusion: np.ndarray, classes, path: Path) -> None:
    import matplotlib.pyplot as plt

    normalized = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{normalized[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if normalized[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (rows normalized)")
    fig.tight_layout()
    _save(fig, path, dpi=100)


def plot_misclassified(dataset, indices: np.ndarray, predicted: np.ndarray, probs: torch.Tensor, path: Path) -> None:
    import matplotlib.pyplot as plt

    cols = 5
    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices, strict=False):  # the last row may have empty cells
        ax.imshow(dataset.test_images[i], interpolation="nearest")
        ax.set_title(f"true: {dataset.classes[dataset.test_labels[i]]}\npred: {dataset.classes[predicted[i]]} "
                     f"({probs[i, predicted[i]]:.0%})", fontsize=9)
    fig.suptitle(f"misclassified test images ({len(indices)} shown)")
    fig.tight_layout()
    _save(fig, path, dpi=100)


def plot_gradcam(model: torch.nn.Module, dataset, indices: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    """Grad-CAM on layer4 for the predicted and the true class, over each image."""
    import matplotlib.pyplot as plt
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = dataset.test_images[indices]
    x = normalize(torch.from_numpy(images))  # as the model sees them at test time
    true = dataset.test_labels[indices]
    with GradCAM(model=model.float().eval(), target_layers=[model.layer4]) as cam:
        maps = {name: cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
                for name, classes in (("predicted", predicted[indices]), ("true", true))}
    fig, axes = plt.subplots(3, len(indices), figsize=(len(indices) * 1.6, 5.2), squeeze=False)
    for k, i in enumerate(indices):
        rgb = images[k].astype(np.float32) / 255
        mark = "✓" if predicted[i] == true[k] else "✗"
        axes[0, k].imshow(images[k], interpolation="nearest")
        axes[0, k].set_title(f"{mark} {dataset.classes[true[k]]}", fontsize=8)
        for row, name in ((1, "predicted"), (2, "true")):
            axes[row, k].imshow(show_cam_on_image(rgb, maps[name][k], use_rgb=True), interpolation="bilinear")
            cls = predicted[i] if name == "predicted" else true[k]
            axes[row, k].set_title(f"{name}: {dataset.classes[cls]}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Grad-CAM on layer4 (✓ correct, ✗ misclassified)")
    fig.tight_layout()
    _save(fig, path, dpi=110)

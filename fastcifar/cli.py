"""The one CLI: `fastcifar train | data prepare | eval | report`. Flags map one-to-one to TrainConfig."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fastcifar.config import AMP_MODES, DEVICES, LOADERS, PRESETS, TrainConfig
from fastcifar.errors import UserError


def _data_root_default() -> str:
    return os.environ.get("FASTCIFAR_DATA", "~/.cache/fastcifar")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="reference", help="named recipe (default: reference)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process; the global batch is this times the number of ranks")
    p.add_argument("--lr", type=float, help="OneCycle peak learning rate")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--loader", choices=LOADERS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--amp", choices=AMP_MODES, help="bf16 autocast (default auto: on for CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--source", help="URL, cifar-10-python.tar.gz, cifar-10-batches-py/ or an image-folder tree/tarball")
    p.add_argument("--synthetic", action="store_true", default=None, help="random images (tests/benchmarks only)")
    p.add_argument("--subset", type=int, help="train on the first N training images")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    p.add_argument("--data-root", help="cache folder (default: $FASTCIFAR_DATA or ~/.cache/fastcifar)")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (0: only the last)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config")
    p.add_argument("--no-report", dest="report", action="store_false", default=None, help="skip the report files")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset, overridden by every flag the user gave."""
    base = PRESETS[args.preset]
    changes = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    changes.setdefault("data_root", _data_root_default())
    return base.replace(**changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcifar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_train_flags(sub.add_parser("train", help="train the reference ResNet18"))

    data = sub.add_parser("data", help="dataset cache")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="build the uint8 cache from a source")
    prepare.add_argument("--source", help="URL, archive or folder (default: the official URL)")
    prepare.add_argument("--root", default=None, help="cache folder (default: $FASTCIFAR_DATA or ~/.cache/fastcifar)")

    ev = sub.add_parser("eval", help="test accuracy, per-class accuracy and confusion matrix of a checkpoint")
    ev.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    ev.add_argument("--tta", action="store_true", help="average each image's logits with its mirror image's")
    ev.add_argument("--device", choices=DEVICES, default="auto")
    ev.add_argument("--data-root", default=None)

    rep = sub.add_parser("report", help="write report.md and the plots for a run folder")
    rep.add_argument("run_dir")
    rep.add_argument("--device", choices=DEVICES, default="auto")
    rep.add_argument("--data-root", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"fastcifar: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fastcifar: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "data":
        from fastcifar import data

        data.prepare(args.source, Path(args.root or _data_root_default()))
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        from fastcifar.report import run_eval

        result = run_eval(Path(args.checkpoint), device=args.device, tta=args.tta, data_root=args.data_root)
        print(json.dumps({k: result[k] for k in ("test_acc", "tta")}))
        return 0
    if args.command == "report":
        from fastcifar.report import write_report

        path = write_report(Path(args.run_dir), device=args.device, data_root=args.data_root)
        print(f"report written to {path}")
        return 0
    raise AssertionError(args.command)


def _train(args: argparse.Namespace) -> int:
    from fastcifar import distributed, runs
    from fastcifar.train import Interrupted, train

    dist = distributed.from_env()
    resume = Path(args.resume) if args.resume else None
    config = runs.config_of(runs.load_checkpoint(resume)) if resume else config_from_args(args)
    try:
        run_dir = train(config, dist, resume=resume)
    except Interrupted as e:
        return e.exit_code
    if config.report and dist.is_main:
        from fastcifar.report import report_available, write_report

        if report_available():
            print(f"report written to {write_report(run_dir, device=config.device, data_root=config.data_root)}")
        else:
            print("report skipped: pip install 'fastcifar[report]' for the plots, Grad-CAM and summary")
    return 0

"""The one CLI: `fastcifar train | speedrun | data prepare | eval | report | bench | profile`.

Training flags map one-to-one to TrainConfig fields; a preset supplies the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from fastcifar import USER_COMPILE_CACHE_DIR, __version__
from fastcifar.config import (
    AMP_MODES,
    ANNEALS,
    DEVICES,
    LOADERS,
    OPTIMIZERS,
    PRESETS,
    SEEDS,
    TrainConfig,
    default_data_root,
)
from fastcifar.errors import UserError

# What a speedrun does unless told, where it differs from the preset: a GPU seed takes seconds, so
# it keeps only its last checkpoint (Ctrl-C or SIGTERM still saves one; slow devices: give
# --checkpoint-every 1), and it is timed to its final answer, so it evaluates only at the end.
SPEEDRUN_DEFAULTS = {"checkpoint_every": 0, "eval_every": 0}

# where the cache lives unless --data-root says (config.default_data_root), as the help says it
DATA_ROOT_DEFAULT = "$FASTCIFAR_DATA, else ~/.cache/fastcifar"


def _add_train_flags(p: argparse.ArgumentParser, preset: str, shown: str | None = None,
                     command_defaults: dict | None = None) -> None:
    """The TrainConfig flags, one per field, in groups; each help says the default of the preset
    `shown` (the one --preset names, else `preset`). Every default is None in the namespace, so
    that --resume can tell which flags were given; the preset fills the rest."""
    defaults = PRESETS[shown or preset].replace(**(command_defaults or {}))

    def flag(group, name: str, help: str, **kwargs) -> None:
        none = kwargs.pop("none", None)  # what the field's None means
        value = getattr(defaults, name.removeprefix("--").replace("-", "_"))
        said = none if value is None else ("on" if value else "off") if isinstance(value, bool) else value
        group.add_argument(name, help=f"{help} (default: {said})", **kwargs)

    def switch(group, name: str, help: str) -> None:
        flag(group, name, help, action=argparse.BooleanOptionalAction, default=None)

    p.add_argument("--preset", choices=sorted(PRESETS), help=f"named recipe, which the other flags change "
                   f"(default: {preset}); with --help, the defaults shown are its values")
    p.add_argument("--config", metavar="JSON", help="start from this config file instead of a preset: a run's "
                   "config.json, or one written by hand (unknown keys are refused); flags change its fields, and "
                   "the run goes to a new folder unless --out names one")
    p.set_defaults(default_preset=preset)
    recipe = p.add_argument_group("recipe")
    flag(recipe, "--epochs", "training epochs", type=int)
    flag(recipe, "--batch-size", "images per step and process; the global batch is this times the ranks", type=int)
    flag(recipe, "--lr", "OneCycle's peak learning rate", type=float)
    flag(recipe, "--momentum", "SGD momentum at the middle of OneCycle's cycle, which swings it 0.05 either way "
         "(0: plain SGD)", type=float)
    switch(recipe, "--nesterov", "Nesterov momentum")
    flag(recipe, "--weight-decay", "L2 weight decay", type=float)
    flag(recipe, "--pct-start", "fraction of the steps spent warming up to the peak LR", type=float)
    flag(recipe, "--anneal", "OneCycle's ramps: cosine, or linear warm-up and decay", choices=ANNEALS)
    switch(recipe, "--decay-bn-and-bias", "weight decay on BatchNorm weights and biases too (--no-...: on conv "
           "and linear weights only)")
    flag(recipe, "--label-smoothing", "label smoothing of the cross-entropy", type=float)
    switch(recipe, "--zero-init-residual", "start each residual block's last BatchNorm scale at 0, so each block "
           "begins as its shortcut")
    flag(recipe, "--optimizer", "sgd, or muon: Muon (orthogonalized Nesterov momentum) for every conv filter but "
         "the stem, SGD for the stem, BatchNorm and the head", choices=OPTIMIZERS)
    flag(recipe, "--muon-lr", "with --optimizer muon: the conv filters' peak LR, on the same OneCycle schedule",
         type=float)
    flag(recipe, "--muon-momentum", "with --optimizer muon: the conv filters' Nesterov momentum (not cycled)",
         type=float)
    flag(recipe, "--bn-bias-lr-mult", "BatchNorm biases train at this times the LR", type=float, metavar="X")
    flag(recipe, "--bn-momentum", "BatchNorm running statistics' momentum (torch's sense: each batch's weight)",
         type=float, metavar="M")
    flag(recipe, "--lookahead", "every K steps pull the weights part way back to a slow copy, more so late in the "
         "run, which ends on the slow copy (0: off)", type=int, metavar="K")
    switch(recipe, "--whiten-stem", "start conv1's filters as a whitening of the training images' 3x3 patches "
           "(54 of its 64 filters)")
    flag(recipe, "--freeze-stem-epochs", "keep conv1's weights as they start for the first N epochs", type=int,
         metavar="N")
    flag(recipe, "--ema", "evaluate and save a moving average of the weights and BN statistics with this decay "
         "per step, e.g. 0.99 (0: the trained weights)", type=float, metavar="DECAY")
    augment = p.add_argument_group("augmentation (training images)")
    flag(augment, "--crop-padding", "random crops within +-N pixels, the border zero-filled (0: no crop)", type=int,
         metavar="N")
    switch(augment, "--flip", "mirror each image with probability 1/2")
    switch(augment, "--alternate-flip", "mirror each image in every other epoch (the first at random) instead of by "
           "a coin each epoch")
    flag(augment, "--cutout", "side of the square cut out of each image, filled with the mean (0: none)", type=int)
    flag(augment, "--low-res", "train the first --low-res-epochs epochs on images shrunk to SxS (16, 20, 24 or 28)",
         type=int, metavar="S")
    flag(augment, "--low-res-epochs", "epochs at --low-res, the rest at 32x32 (0 alone turns them off)", type=int,
         metavar="N")
    views = p.add_argument_group("test views and evaluation")
    switch(views, "--tta", "the result's test accuracy over each image and its mirror image (logits averaged)")
    flag(views, "--tta-shift", "the result's test views also moved diagonally by +-PIXELS, 3x the views (0: none)",
         type=int, metavar="PIXELS")
    flag(views, "--eval-every", "evaluate every N epochs on the image alone, for the learning curve; the last epoch "
         "is always evaluated with the test views above (0: the last only)", type=int, metavar="N")
    flag(views, "--eval-batch-size", "images per evaluation batch", type=int)
    data = p.add_argument_group("data")
    flag(data, "--source", "where to build the cache from when it is missing: URL, cifar-10-python.tar.gz, "
         "cifar-10-batches-py/, or an image-folder tree or tarball", none="the cache, else the official URL")
    flag(data, "--data-root", "cache folder", none=DATA_ROOT_DEFAULT)
    flag(data, "--synthetic", "fixed-seed fake images instead of CIFAR-10: tests and benchmarks only",
         action="store_true", default=None)
    flag(data, "--subset", "train on the first N training images", type=int, metavar="N", none="all 50,000")
    flag(data, "--test-subset", "evaluate on the first N test images", type=int, metavar="N", none="all 10,000")
    flag(data, "--seed", "seed of the weights' init and of each epoch's augmentation plan", type=int)
    execution = p.add_argument_group("execution")
    flag(execution, "--device", "where to train", choices=DEVICES)
    flag(execution, "--amp", "bf16 autocast; auto: on CUDA, and on CPUs with AVX512-BF16 or AMX", choices=AMP_MODES)
    switch(execution, "--channels-last", "channels-last memory layout")
    flag(execution, "--compile", "torch.compile the model", none="on for CUDA, off for a CPU",
         action=argparse.BooleanOptionalAction, default=None)
    switch(execution, "--cudagraphs", "replay the compiled graphs as CUDA graphs (torch.compile's reduce-overhead "
           "mode; one GPU)")
    switch(execution, "--compile-cache", "keep what torch.compile builds in --compile-cache-dir for later runs")
    flag(execution, "--compile-cache-dir", "torch.compile's cache folder", metavar="DIR",
         none="$TORCHINDUCTOR_CACHE_DIR if set, else <data root>/compile-cache")
    flag(execution, "--compile-cache-file", "load compiled code from FILE before compiling and write it back after: "
         "carries the compile cache to another machine with the same torch, Triton and device", metavar="FILE",
         none="none")
    flag(execution, "--loader", "the training-data loader; auto: DALI on a GPU when installed, else torch",
         choices=LOADERS)
    flag(execution, "--dali-threads", "DALI CPU threads", type=int)
    flag(execution, "--dali-prefetch", "DALI prefetch queue depth", type=int)
    flag(execution, "--sync-bn", "SyncBatchNorm across torchrun ranks (GPUs)", action="store_true", default=None)
    flag(execution, "--deterministic", "deterministic algorithms: two runs with one seed give the same metrics",
         action="store_true", default=None)
    outputs = p.add_argument_group("outputs")
    flag(outputs, "--out", "run folder; for speedrun the folder of its seeds' run folders",
         none="runs/<timestamp>, speedrun: runs/speedrun-<preset>-<time>")
    flag(outputs, "--checkpoint-every", "epochs between checkpoints (0: only the last)", type=int, metavar="N")
    outputs.add_argument("--no-report", dest="report", action="store_false", default=None,
                         help="skip the report files (default: " + ("written" if defaults.report else "skipped") + ")")


DATA_ROOT_HELP = f"cache folder (default: {DATA_ROOT_DEFAULT})"


def _preset_asked(argv: list[str]) -> str | None:
    """The --preset on the command line, read before the parser is built so that --help shows its values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    return known.preset


def _given(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user set by a flag (an unset flag is None)."""
    return {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}


def config_from_args(args: argparse.Namespace, command_defaults: dict | None = None) -> TrainConfig:
    """The preset (or --config's file), overridden by every flag the user gave; `command_defaults`
    are the command's own defaults (SPEEDRUN_DEFAULTS), which the file's values and the flags win over."""
    changes = _given(args)
    if changes.get("low_res_epochs") == 0:  # alone, turns a preset's low-res epochs off
        changes.setdefault("low_res", 32)
    changes.setdefault("compile_cache_dir", USER_COMPILE_CACHE_DIR)
    if args.config:
        if args.preset:
            raise UserError("--config and --preset each name the starting recipe: give one of them")
        # a run's config.json names that run's folder: a new run gets its own unless --out is given
        return config_file(Path(args.config)).replace(out=None).replace(**changes)
    return PRESETS[args.preset or args.default_preset].replace(**{**(command_defaults or {}), **changes})


def config_file(path: Path) -> TrainConfig:
    """A TrainConfig from a JSON file of its fields (a run's config.json, or a hand-written subset)."""
    from fastcifar import runs

    values = runs.read_json(path, fix="give a run's config.json or a JSON object of TrainConfig fields")
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a JSON object of TrainConfig fields: see a run's config.json for one")
    try:
        return TrainConfig.from_dict(values)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def build_parser(shown: str | None = None) -> argparse.ArgumentParser:
    """The CLI; `shown`: the preset whose values the training flags' help gives as defaults."""
    parser = argparse.ArgumentParser(prog="fastcifar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastcifar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the reference ResNet18")
    _add_train_flags(train, "reference", shown)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config")

    speed = sub.add_parser("speedrun", help="train a preset with N seeds: accuracy mean/std/min and time as JSON")
    _add_train_flags(speed, "fast", shown, SPEEDRUN_DEFAULTS)
    speed.add_argument("--seeds", type=int, help=f"runs with seeds --seed, --seed + 1, ... (default {SEEDS})")
    speed.add_argument("--resume", metavar="SPEEDRUN_DIR",
                       help="finish an interrupted speedrun: finished seeds are kept, the interrupted one resumes")
    speed.add_argument("--json", help="results file (default: bench/results/<date>-<device>-<preset>.json)")

    data = sub.add_parser("data", help="dataset cache")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="build the uint8 cache from a source")
    prepare.add_argument("--source", help="URL, archive or folder (default: the official URL)")
    prepare.add_argument("--data-root", "--root", dest="data_root", default=None, help=DATA_ROOT_HELP)

    ev = sub.add_parser("eval", help="test accuracy, per-class accuracy and confusion matrix of a checkpoint")
    ev.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    ev.add_argument("--tta", action="store_true", help="average each image's logits with its mirror image's")
    ev.add_argument("--tta-shift", type=int, default=0, metavar="PIXELS",
                    help="average also over the views moved diagonally by +-PIXELS (e.g. 1)")
    ev.add_argument("--device", choices=DEVICES, default="auto", help="where to evaluate (default: auto)")
    ev.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)

    bench = sub.add_parser("bench", help="images/sec, epoch seconds, MFU as JSON; --compare gates on regressions")
    # default None: BenchConfig holds the defaults, as TrainConfig does for training
    bench.add_argument("--what", help="comma-separated subset of train,eval,loader,epoch,kernels (default: all)")
    bench.add_argument("--preset", choices=sorted(PRESETS), help="the recipe whose step is timed (default: reference)")
    bench.add_argument("--device", choices=DEVICES, help="the device timed (default: auto)")
    bench.add_argument("--loader", choices=LOADERS, help="the loader of the loader and epoch figures (default: auto)")
    bench.add_argument("--batch-size", type=int,
                       help="images per train step (default: 512 on a GPU, 64 on a CPU, 16 with --quick)")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (default: on for CUDA, off for a CPU)")
    bench.add_argument("--cudagraphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay the compiled graphs as CUDA graphs")
    bench.add_argument("--amp", choices=AMP_MODES, help="bf16 autocast (default: auto, as for train)")
    bench.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels-last memory layout (default: on)")
    bench.add_argument("--dali-threads", type=int, help="DALI CPU threads (default: the preset's)")
    bench.add_argument("--dali-prefetch", type=int, help="DALI prefetch queue depth (default: the preset's)")
    bench.add_argument("--quick", action="store_true", default=None,
                       help="a few tiny steps: checks the bench, not the speed")
    bench.add_argument("--baseline", action="store_true", default=None,
                       help="also time eager fp32 NCHW + torchvision DataLoader, and report the speedup")
    bench.add_argument("--scaling", type=int, metavar="N",
                       help="also time the train step under torchrun with 1..N ranks (DDP) and report efficiency")
    bench.add_argument("--json", help="write the results here")
    bench.add_argument("--compare", metavar="BASELINE_JSON", help="exit 1 if a figure regressed past --max-regression")
    bench.add_argument("--current", metavar="JSON", help="with --compare: compare this file instead of measuring")
    bench.add_argument("--max-regression", type=float, default=0.05,
                       help="the slowdown the gate tolerates, as a fraction (default 0.05)")
    bench.add_argument("--against", nargs="?", const="", metavar="REV",
                       help="A/B gate: time the train step of this tree and of REV (default: the merge base with "
                            "main) in turns in one job; exit 1 when slower by more than --max-regression")
    bench.add_argument("--pairs", type=int, help="with --against: timed pairs of turns (default 20)")
    bench.add_argument("--history", nargs="?", const="bench/results", metavar="DIR",
                       help="draw the bench results in DIR (default bench/results) over time: DIR/history.png "
                            "and DIR/history.md, one line per device and settings; measures nothing")

    prof = sub.add_parser("profile", help="where a training step's time goes, per op family: table, JSON, trace")
    _add_train_flags(prof, "reference", shown)
    prof.add_argument("--steps", type=int, default=10, help="training steps recorded after the warm-up (default 10)")
    prof.add_argument("--warmup", type=int, default=3, help="unrecorded steps first, compile included (default 3)")

    rep = sub.add_parser("report", help="write report.md and the plots for a run folder")
    rep.add_argument("run_dir", help="a run folder")
    rep.add_argument("--device", choices=DEVICES, default="auto", help="where to evaluate (default: auto)")
    rep.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_preset_asked(argv)).parse_args(argv)
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

        data.prepare(args.source, Path(args.data_root or default_data_root()).expanduser())
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        from fastcifar.report import run_eval

        result = run_eval(Path(args.checkpoint), device=args.device, tta=args.tta, shift=args.tta_shift,
                          data_root=args.data_root)
        print(json.dumps({k: result[k] for k in ("test_acc", "tta", "tta_shift")}))
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "speedrun":
        return _speedrun(args)
    if args.command == "profile":
        return _profile(args)
    if args.command == "report":
        from fastcifar.report import write_report

        path = write_report(Path(args.run_dir), device=args.device, data_root=args.data_root)
        print(f"report written to {path}")
        return 0
    raise AssertionError(args.command)


def _train(args: argparse.Namespace) -> int:
    from fastcifar import distributed
    from fastcifar.train import Interrupted, train

    dist = distributed.from_env()
    resume = Path(args.resume) if args.resume else None
    config = _resumed_config(resume, args) if resume else config_from_args(args)
    try:
        run_dir = train(config, dist, resume=resume)
    except Interrupted as e:
        return e.exit_code
    if dist.is_main:
        _report(run_dir, config)
    return 0


# Flags that may change when a run resumes: where the cache is, whether to write the report,
# whether the compiled graphs replay as CUDA graphs (how it runs on this machine, not what it
# computes), --ema (what is evaluated, not what is trained; an average begun at the resume
# weighs its start decay**n after n steps: under 1% after 460 steps at 0.99) and --eval-every
# (how often the curve is read; the last epoch is evaluated as ever). Any other would change the
# recipe or its schedule halfway.
RESUME_FLAGS = ("data_root", "report", "cudagraphs", "ema", "eval_every")


def _resumed_config(resume: Path, args: argparse.Namespace) -> TrainConfig:
    from fastcifar import checkpoints

    _refuse_with_resume(resume, args)
    return checkpoints.config_of(checkpoints.load_checkpoint(resume)).replace(**_given(args))


def _refuse_with_resume(resume: Path, args: argparse.Namespace, also: list[str] = ()) -> None:
    """A UserError naming every flag given with --resume that would change the saved run."""
    refused = ["--" + k.replace("_", "-") for k in _given(args) if k not in RESUME_FLAGS]
    refused += ["--preset"] * (args.preset is not None) + ["--config"] * (args.config is not None) + list(also)
    if refused:
        raise UserError(f"--resume continues {resume} with its saved config: drop {' '.join(refused)} "
                        "(only --data-root, --no-report, --ema, --eval-every and --[no-]cudagraphs may change; "
                        "other settings need a new run)")


def _report(run_dir: Path, config: TrainConfig) -> None:
    """The report files after a run, unless --no-report."""
    if not config.report:
        return
    from fastcifar import runs
    from fastcifar.report import report_available, write_report

    if report_available():
        started = time.perf_counter()
        path = write_report(run_dir, device=config.device, data_root=config.data_root)
        print(f"report written to {path}")
        if (run_dir / "summary.json").is_file():  # a finished run: its wall time takes in the report
            print(runs.format_wall(runs.add_report_seconds(run_dir, time.perf_counter() - started)))
    else:
        print("report skipped: pip install 'fastcifar[report]' for the plots, Grad-CAM and summary")


def _results_folder(json_path: str | None, default: Path = Path("bench/results")) -> Path:
    """The folder of --json (else `default`), checked and made before measuring, so a bad place
    fails at once rather than after the work."""
    if json_path and Path(json_path).is_dir():
        raise UserError(f"--json {json_path} is a folder: give a file name, e.g. {Path(json_path) / 'results.json'}")
    folder = Path(json_path).parent if json_path else default
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder} for the results ({e.strerror}): pass a writable --json PATH") from None
    return folder


def _speedrun(args: argparse.Namespace) -> int:
    from fastcifar import distributed, runs, speedrun
    from fastcifar.train import Interrupted

    if distributed.from_env().enabled:
        raise UserError("speedrun runs one process: drop torchrun "
                        "(multi-GPU training is `torchrun ... fastcifar train`)")
    if args.resume:
        out = Path(args.resume)
        _refuse_with_resume(out, args, also=["--seeds"] if args.seeds is not None else [])
        # the file asked for when the speedrun started, unless --json names another
        # (plans written before it was recorded have none: the default then)
        json_path = args.json or speedrun.read_plan(out).get("json")
    else:
        json_path = args.json
        seeds = SEEDS if args.seeds is None else args.seeds
        config = config_from_args(args, SPEEDRUN_DEFAULTS)
        speedrun.check_seeds(config.seed, seeds)  # before the folder is named
        preset = "config" if args.config else args.preset or args.default_preset  # a --config file: its own recipe
        out = Path(args.out or Path("runs") / f"speedrun-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    folder = _results_folder(json_path)
    try:
        if args.resume:
            result = speedrun.resume(out, _report, **_given(args))
        else:
            result = speedrun.speedrun(preset, config, seeds, out, _report, json_path=json_path)
    except Interrupted as e:
        finished = len(list(out.glob("seed-*/summary.json")))
        seeds = speedrun.read_plan(out)["seeds"]
        print(f"speedrun interrupted: {finished} of {seeds} seed(s) finished, in {out}; continue it with: "
              f"fastcifar speedrun --resume {out}", file=sys.stderr)
        return e.exit_code
    print(speedrun.format_result(result))
    path = Path(json_path) if json_path else speedrun.default_json_path(result["preset"], result["env"], folder)
    runs.write_json(path, result)
    print(f"results written to {path}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from fastcifar import profile, runs

    if args.steps < 1 or args.warmup < 1:
        raise UserError("--steps and --warmup must be at least 1")
    config = config_from_args(args)
    out = Path(config.out or Path("runs") / f"profile-{time.strftime('%Y%m%d-%H%M%S')}")
    runs.refuse_used(out, "profile folder", "pick another --out")  # before the work
    result = profile.profile(config, args.steps, out, warmup=args.warmup)
    print(profile.format_profile(result))
    print(f"profile written to {out / 'profile.json'}; trace: {out / result['trace']} "
          "(open it in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def bench_config_from_args(args: argparse.Namespace):
    """The BenchConfig of the flags given (an unset flag is None: the config's default)."""
    from fastcifar.bench import BenchConfig

    given = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    if "what" in given:
        given["what"] = tuple(w for w in given["what"].split(",") if w)
    return BenchConfig(**given)


def _bench_against(args: argparse.Namespace, config, dist) -> int:
    from fastcifar import gate, runs

    if dist.enabled:
        raise UserError("--against runs its own processes: drop torchrun")
    given = [flag for flag, value in (("--compare", args.compare), ("--current", args.current),
                                      ("--baseline", config.baseline), ("--scaling", config.scaling),
                                      ("--what", args.what and config.what != ("train",))) if value]
    if given:
        raise UserError(f"--against times the train step of both revisions alone: drop {' '.join(given)}")
    pairs = gate.PAIRS if args.pairs is None else args.pairs
    if pairs < gate.MIN_PAIRS:
        raise UserError(f"--pairs must be at least {gate.MIN_PAIRS}: fewer give no 95% interval")
    if args.json:
        _results_folder(args.json)
    result = gate.against(args.against or None, dataclasses.asdict(dataclasses.replace(config, what=("train",))),
                          pairs, args.max_regression)
    print(gate.format_result(result))
    if args.json:
        runs.write_json(Path(args.json), result)
        print(f"results written to {args.json}")
    return gate.exit_code(result)


def _bench(args: argparse.Namespace) -> int:
    from fastcifar import bench, distributed, runs

    if args.history is not None:
        from fastcifar import history

        png, md, skipped = history.history(Path(args.history))
        print(md.read_text())
        print(f"history written to {png} and {md}" + (f" ({skipped} other JSON files skipped)" if skipped else ""))
        return 0
    dist = distributed.from_env()
    config = bench_config_from_args(args)  # checks the flags before anything is measured
    if not 0 <= args.max_regression < math.inf:
        raise UserError("--max-regression must be a fraction of 0 or more, e.g. 0.05 for 5%")
    if args.current and not args.compare:
        raise UserError("--current goes with --compare BASELINE_JSON")
    if args.compare and args.json and Path(args.json).resolve() == Path(args.compare).resolve():
        raise UserError("--json names the --compare baseline, which the new results would replace: "
                        "write them to another file")
    if args.against is not None:
        return _bench_against(args, config, dist)
    if args.pairs is not None:
        raise UserError("--pairs goes with --against REV")
    baseline = bench.load(args.compare) if args.compare else None  # read first: a bad path fails before measuring
    if args.current:
        result = bench.load(args.current)
    else:
        if args.json and dist.is_main:
            _results_folder(args.json)
        try:
            result = bench.run(config, dist=dist, data_root=default_data_root(),
                               compile_cache_dir=USER_COMPILE_CACHE_DIR)
        finally:
            distributed.shutdown(dist)
        if not dist.is_main:
            return 0
        if config.scaling:
            result["results"].update(bench.scaling(config))
        print(bench.format_results(result))
        if args.json:
            runs.write_json(Path(args.json), result)
            print(f"results written to {args.json}")
    if args.compare:
        code, table = bench.compare(baseline, result, args.max_regression)
        print(table)
        return code
    return 0

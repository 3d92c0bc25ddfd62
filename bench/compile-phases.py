"""Where a compiled run's compile and warm-up seconds go: cold, warm, and imported from a file.

    python bench/compile-phases.py --json bench/results/DATE-cpu-compile-phases.json [-- TRAIN FLAGS]

Three `fastcifar train` runs of the real ResNet18, each in its own process, torch's own caches in
/tmp emptied before each, as after a reboot: `cold` compiles into the empty compile cache beside a
new data root and exports it with --compile-cache-file; `warm` runs again with that data root;
`imported` runs with another new data root (a fresh machine) and imports the file. Each child
records torch's compile timers (`torch._dynamo.utils.compilation_time_metrics`, summed over the
run's graphs: dynamo's bytecode tracing, the inductor call with its cache lookups and loads,
guards) beside the run's summary, so the seconds not in any timer (the warm-up steps' own compute,
lazy imports) show as the rest. The default flags give a real run's 4 batch shapes (train full and
last batch, eval full and last batch) on 80 synthetic images.
"""

import argparse
import getpass
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# 80 images in batches of 32: 32, 32, 16; 48 test images in batches of 32: 32, 16
DEFAULT_FLAGS = ["--synthetic", "--device", "cpu", "--compile", "--subset", "80", "--test-subset", "48",
                 "--batch-size", "32", "--eval-batch-size", "32", "--epochs", "1", "--no-report"]
# each run's own flags: which data root (so which cache folder) and whether the file is used
RUNS = {"cold": ["--data-root", "{work}/data", "--compile-cache-file", "{work}/compiled.bin"],
        "warm": ["--data-root", "{work}/data"],
        "imported": ["--data-root", "{work}/fresh-data", "--compile-cache-file", "{work}/compiled.bin"]}
# torch's timers that, between them, cover a compile without counting a second twice
PHASES = {"dynamo_bytecode_tracing": "bytecode_tracing", "inductor_and_caches": "OutputGraph.call_user_compiler",
          "guards": "build_guards"}


def child(argv: list[str]) -> None:
    """Run `fastcifar train argv` here and print the compile timers' sums as JSON."""
    started = time.perf_counter()
    import torch._dynamo.utils as dynamo_utils

    from fastcifar import cli

    imported = time.perf_counter() - started
    code = cli.main(["train", *argv])
    timers = {name: sum(values) for name, values in dynamo_utils.compilation_time_metrics.items()}
    print(json.dumps({"exit": code, "import_seconds": imported, "timers": timers}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("flags", nargs="*", help="fastcifar train flags (after --)")
    args = parser.parse_args()
    if args.child:
        return child(args.flags)
    if not args.json:
        parser.error("--json FILE is required")
    from fastcifar import environment, runs

    flags = args.flags or DEFAULT_FLAGS
    with tempfile.TemporaryDirectory() as work:
        measured = {}
        for name, own in RUNS.items():
            shutil.rmtree(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}", ignore_errors=True)
            out = Path(work) / name
            done = subprocess.run([sys.executable, __file__, "--child", "--", *flags,
                                   *(flag.format(work=work) for flag in own), "--out", str(out)],
                                  capture_output=True, text=True, check=True)
            reported = json.loads(done.stdout.strip().splitlines()[-1])
            summary = runs.read_json(out / "summary.json")
            phases = {phase: reported["timers"].get(timer, 0.0) for phase, timer in PHASES.items()}
            measured[name] = {
                "compile_seconds": summary["compile_seconds"], "compiled_graphs": summary["compiled_graphs"],
                "compile_cache": summary["compile_cache"], "wall_seconds": summary["wall_seconds"],
                "phases": phases, "rest": summary["compile_seconds"] - sum(phases.values()),
                "import_seconds": reported["import_seconds"], "torch_timers": reported["timers"],
            }
            print(f"{name}: compile and warm-up {summary['compile_seconds']:.1f}s = "
                  + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in phases.items())
                  + f", rest {measured[name]['rest']:.1f}s")
        environment = runs.read_json(Path(work) / "warm" / "env.json")
        file_bytes = (Path(work) / "compiled.bin").stat().st_size
    cold = measured["cold"]["compile_seconds"]
    runs.write_json(Path(args.json), {
        "schema": "fastcifar-compile-phases/2",
        **environment.provenance(),
        "command": "python bench/compile-phases.py " + " ".join(sys.argv[1:]),
        "environment": environment,
        "what": "compile and warm-up seconds of the real ResNet18: cold (and exported to a file), warm from the "
                "cache beside the data root, imported from the file into an empty cache folder; /tmp's torch "
                "caches emptied before each; split by torch's compile timers (summed over graphs); rest: the "
                "warm-up steps' compute, lazy imports and whatever no timer covers",
        "compile_cache_file_bytes": file_bytes,
        "runs": measured,
        "warm_over_cold": measured["warm"]["compile_seconds"] / cold,
        "imported_over_cold": measured["imported"]["compile_seconds"] / cold,
    })


if __name__ == "__main__":
    main()

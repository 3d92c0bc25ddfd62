#!/usr/bin/env bash
# Cold, warm and imported compile of the real ResNet18, torch's default cache in /tmp emptied
# before each run, as after a reboot: `cold` compiles into the cache beside its data root and
# exports it with --compile-cache-file; `warm` runs again with that data root; `imported` runs with
# a new, empty data root (a fresh machine) and imports the file. Each run has the four batch
# shapes of a real one before the eval batch divided the test set (train full and last batch, eval
# full and last batch). Writes RESULTS_JSON with each run's compile seconds, compiled graphs and
# cache hits and misses.
#
# usage, from the repository root:  bash bench/compile-cache.sh [--device cpu|cuda] RESULTS_JSON
set -euo pipefail
device=cpu
if [ "${1:-}" = "--device" ]; then device=$2; shift 2; fi
results=${1:?usage: bash bench/compile-cache.sh [--device cpu|cuda] RESULTS_JSON}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# 80 images in batches of 32: 32, 32, 16; 48 test images in batches of 32: 32, 16
flags=(--synthetic --device "$device" --compile --subset 80 --test-subset 48 --batch-size 32 --eval-batch-size 32
       --epochs 1 --no-report)
for run in cold warm imported; do
  rm -rf "${TMPDIR:-/tmp}/torchinductor_$(whoami)"
  echo "compile-cache: $run run"
  case $run in
    cold) more=(--data-root "$work/data" --compile-cache-file "$work/compiled.bin") ;;
    warm) more=(--data-root "$work/data") ;;
    imported) more=(--data-root "$work/fresh-data" --compile-cache-file "$work/compiled.bin") ;;
  esac
  python3 -m fastcifar train "${flags[@]}" "${more[@]}" --out "$work/$run"
done
python3 - "$work" "$results" "$*" <<'PY'
import sys
from pathlib import Path

from fastcifar import runs

work, results = Path(sys.argv[1]), Path(sys.argv[2])
summaries = {run: runs.read_json(work / run / "summary.json") for run in ("cold", "warm", "imported")}
cold, warm, imported = (summaries[run]["compile_seconds"] for run in ("cold", "warm", "imported"))
runs.write_json(results, {
    "schema": "fastcifar-compile-cache/1",
    **runs.provenance(),
    "command": "bash bench/compile-cache.sh " + sys.argv[3],
    "environment": runs.read_json(work / "warm" / "env.json"),
    "what": "compile and warm-up seconds of the real ResNet18 (4 batch shapes): cold (and exported to a file), "
            "warm from the cache beside the data root, imported from the file into an empty cache folder; "
            "/tmp's torch caches emptied before each run",
    "compile_cache_file_bytes": (work / "compiled.bin").stat().st_size,
    "runs": {run: {key: s[key] for key in ("compile_seconds", "compiled_graphs", "compile_cache", "wall_seconds")}
             for run, s in summaries.items()},
    "warm_over_cold": warm / cold,
    "imported_over_cold": imported / cold,
})
print(f"compile and warm-up: cold {cold:.1f}s, warm {warm:.1f}s ({warm / cold:.0%} of cold), imported {imported:.1f}s "
      f"({imported / cold:.0%}); written to {results}")
PY

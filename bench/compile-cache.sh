#!/usr/bin/env bash
# Cold against warm compile of the real ResNet18: two `fastcifar train --compile` runs sharing one
# data root (so one compile cache beside it), torch's default cache in /tmp emptied before each,
# as after a reboot. Each run has the four batch shapes of a real one (train full and last batch,
# eval full and last batch). Writes RESULTS_JSON with both runs' compile seconds, compiled graphs
# and cache hits and misses.
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
       --epochs 1 --no-report --data-root "$work/data")
for run in cold warm; do
  rm -rf "${TMPDIR:-/tmp}/torchinductor_$(whoami)"
  echo "compile-cache: $run run"
  python3 -m fastcifar train "${flags[@]}" --out "$work/$run"
done
python3 - "$work" "$results" "$*" <<'PY'
import sys
from pathlib import Path

from fastcifar import runs

work, results = Path(sys.argv[1]), Path(sys.argv[2])
summaries = {run: runs.read_json(work / run / "summary.json") for run in ("cold", "warm")}
cold, warm = (summaries[run]["compile_seconds"] for run in ("cold", "warm"))
runs.write_json(results, {
    "schema": "fastcifar-compile-cache/1",
    **runs.provenance(),
    "command": "bash bench/compile-cache.sh " + sys.argv[3],
    "environment": runs.read_json(work / "warm" / "env.json"),
    "what": "compile and warm-up seconds of the real ResNet18 (4 batch shapes), cold then warm from the cache "
            "beside the data root, /tmp's torch caches emptied before each run",
    "runs": {run: {key: s[key] for key in ("compile_seconds", "compiled_graphs", "compile_cache", "wall_seconds")}
             for run, s in summaries.items()},
    "warm_over_cold": warm / cold,
})
print(f"compile and warm-up: cold {cold:.1f}s, warm {warm:.1f}s ({warm / cold:.0%} of cold); written to {results}")
PY

#!/usr/bin/env bash
# Every GPU measurement the project still owes, most wanted first, resumable: the fast preset
# over 5 seeds on the real CIFAR-10 (the lossless copy), the shorter recipes beside it, the fast
# step and run with and without CUDA graphs, the GPU tests (kernel against its reference on
# CUDA, two deterministic eager runs equal, no host sync in an epoch, CUDA graphs replayed), the
# reference recipe, then the ablation rows of bench/NOTES.md and what an earlier lease measured
# already (the whole-model bench with the plain baseline, the step profile by op family).
#
# usage, from the repository root:  bash bench/gpu-suite.sh [--smoke] [--data-part DIR] DEADLINE_SECONDS
# GPU_SUITE_ONLY="step step ..." runs only the steps named (in the suite's order).
#
# Each step writes runs/gpu-suite/<step>.log and, whole at its end, <step>.json; a step whose
# JSON exists is skipped, so a second job picks up where the last one stopped. For jobs with a
# time limit (nothing comes back from a killed job), no step starts once DEADLINE_SECONDS minus
# the longest step so far have passed. A failing step leaves <step>.failed (its log's tail), is
# not tried again while that file is there, and the suite goes on to the next; the exit status
# is 1 when a step failed in this job. When $OUT names a folder, all JSON and logs are packed
# into $OUT/gpu-suite.tgz after every step. Prints each step's result at the end (a speedrun's
# summary line, a bench's table). A failing GPU test is a result, not a failed step: the step
# records the counts.
#
# The data: the speedruns train on the CIFAR-10 cache in $FASTCIFAR_DATA (default
# ~/.cache/fastcifar), built here from the lossless tarball (cifar10-png.tar.gz, 168 MB). One
# job carries at most 64 MiB, so ../shared/scripts/device-data splits the tarball into parts
# (.gpu-data/part1..3) and each job brings one: --data-part DIR copies DIR's files into
# $GPU_SUITE_STAGING (default /tmp/gpu-data, which outlives a job while the machine stays warm).
# Once every chunk is there (their joined sha256 is the tarball's) the suite joins them and
# builds the cache. Until then the steps that need no real data run (the GPU tests, the
# benches and profiles on synthetic data) and the speedruns wait for a later job. Needs no DALI,
# grad-cam or torchinfo: speedruns run with --no-report, and the torch loader is used without DALI.
#
# --smoke: the same steps at toy size on the CPU (about 4 min on 2 cores): checks the script
# before GPU time is spent on it. --cudagraphs needs a GPU, so the smoke runs those steps without it.
set -euo pipefail
export PYTHONUNBUFFERED=1

smoke=0
part=
while [ $# -gt 1 ]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --data-part) part=${2:?--data-part needs a folder}; shift 2 ;;
    *) break ;;
  esac
done
deadline=${1:?usage: bash bench/gpu-suite.sh [--smoke] [--data-part DIR] DEADLINE_SECONDS}
results=runs/gpu-suite
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FASTCIFAR_DATA:-$HOME/.cache/fastcifar}
staging=${GPU_SUITE_STAGING:-/tmp/gpu-data}
tarball=$staging/cifar10-png.tar.gz
# the lossless copy's checksum (shared/data/README.md); a test of the suite sets its own
data_sha256=${GPU_SUITE_DATA_SHA256:-613b1f23d7a05815aed3b3e401a4358057ded462d1beddac75464954d2e86fc6}

speedrun_flags=(--no-report --data-root "$cache")
bench_flags=()
profile_flags=(--synthetic)
if [ "$smoke" = 1 ]; then
  results=runs/gpu-suite-smoke
  # 9 one-step epochs: more than the most low-res epochs of a step (8), which must leave the last
  # epoch at 32x32
  speedrun_flags+=(--device cpu --subset 32 --test-subset 64 --epochs 9 --batch-size 32 --seeds 1)
  bench_flags+=(--device cpu --quick --what train,eval)
  profile_flags+=(--device cpu --subset 32 --batch-size 16 --steps 1 --warmup 1)
fi

# step name | command (pytest, or a fastcifar command). Every speedrun needs the real data; the
# other steps run on synthetic data, so the jobs that bring the data's first parts do them.
# Ablation steps change one thing from the fast preset (4 epochs, 2 at 24x24, the four levers of
# bench/NOTES.md on, 6 test views, since 2026-12-03).
# fast without each lever, then without all four (the levers off: flags back to their defaults)
no_whiten="--no-whiten-stem --freeze-stem-epochs 0"
no_bn="--bn-momentum 0.1 --lookahead 0"
no_bias="--bn-bias-lr-mult 1"
no_muon="--optimizer sgd"
steps=(
  "speedrun-fast|speedrun --preset fast --seeds 5"
  # by FLOPs (epochs x side^2) around fast: where 5 seeds fall below 89.5%
  "shorter-epochs-3-low-res-epochs-1|speedrun --epochs 3 --low-res-epochs 1"
  "longer-epochs-6-low-res-epochs-3|speedrun --epochs 6 --low-res-epochs 3"
  # which lever carries the gain (one CPU seed of 6 epochs: 92.09% with all four, 88.68% without)
  "fast-minus-whiten|speedrun $no_whiten"
  "fast-minus-bn-lookahead|speedrun $no_bn"
  "fast-minus-bias-lr|speedrun $no_bias"
  "fast-minus-muon|speedrun $no_muon"
  "fast-minus-levers|speedrun $no_whiten $no_bn $no_bias $no_muon"
  # fast until 2026-12-03: twice the epochs, no levers (one CPU seed: 92.17%)
  "plain-epochs-12-low-res-epochs-6|speedrun --epochs 12 --low-res-epochs 6 $no_whiten $no_bn $no_bias $no_muon"
  "bench-fast|bench --preset fast --what train,epoch"
  "bench-fast-cudagraphs|bench --preset fast --what train,epoch --cudagraphs"
  "speedrun-fast-cudagraphs|speedrun --preset fast --seeds 5 --cudagraphs"
  "gpu-tests|pytest -m gpu"
  "speedrun-reference|speedrun --preset reference --seeds 1"
  "profile-cudagraphs|profile --preset fast --steps 20 --cudagraphs"
  "profile|profile --preset fast --steps 20"
  "bench|bench --baseline"
  # the flip alone at test time: the shifts added +0.12 to +0.28 on five CPU runs' weights, -0.11 on a sixth
  "ablate-tta-shift-0|speedrun --tta-shift 0"
  "ablate-alternate-flip|speedrun --alternate-flip"
  "ablate-ema-0.99|speedrun --ema 0.99"
  "ablate-label-smoothing-0.2|speedrun --label-smoothing 0.2"
  "ablate-lr-0.1|speedrun --lr 0.1"
  "ablate-label-smoothing-0|speedrun --label-smoothing 0"
  "ablate-no-tta|speedrun --no-tta"
  "ablate-anneal-cos|speedrun --anneal cos"
  "ablate-lr-0.4|speedrun --lr 0.4"
  "ablate-no-nesterov|speedrun --no-nesterov"
  "ablate-decay-bn-and-bias|speedrun --decay-bn-and-bias"
  "ablate-cutout-8|speedrun --cutout 8"
  "ablate-cutout-16|speedrun --cutout 16"
  "ablate-batch-1024|speedrun --batch-size 1024 --lr 0.4"
  "ablate-full-res|speedrun --low-res-epochs 0"
  "ablate-low-res-16|speedrun --low-res 16"
  "ablate-crop-padding-4|speedrun --crop-padding 4"
)

# python3 -m rather than the console script, whose folder may not be on PATH
python3 -c "import fastcifar.kernels" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .

if [ -n "$part" ]; then
  [ -d "$part" ] || { echo "gpu-suite: --data-part $part is not a folder: make the parts with ../shared/scripts/device-data" >&2; exit 2; }
  mkdir -p "$staging" && cp "$part"/* "$staging"/
fi
have_data=0
if [ -f "$cache/cifar10/manifest.json" ]; then
  have_data=1
else
  if [ ! -f "$tarball" ] && compgen -G "$staging/cifar10-png.tar.gz.chunk*" > /dev/null; then
    # the chunks' names sort in their order; complete once the whole has the tarball's checksum
    cat $(ls "$staging"/cifar10-png.tar.gz.chunk* | sort) > "$tarball.tmp"
    if [ "$(sha256sum "$tarball.tmp" | cut -d' ' -f1)" = "$data_sha256" ]; then
      mv "$tarball.tmp" "$tarball" && rm -f "$staging"/cifar10-png.tar.gz.chunk*
      echo "gpu-suite: the data's parts are joined, sha256 checked: $tarball"
    else
      rm -f "$tarball.tmp"
      chunks=$(ls "$staging"/cifar10-png.tar.gz.chunk* | wc -l)
      echo "gpu-suite: $chunks chunk(s) of the data in $staging, not yet the whole tarball: the speedruns wait for the next part"
      if [ -f "$staging/join.sh" ]; then  # device-data puts it in the last part: all have come, one is damaged
        echo "gpu-suite: the last part is here, but the chunks joined do not give the tarball's sha256 (one is missing or damaged): send every part again" >&2
      fi
    fi
  fi
  if [ -f "$tarball" ]; then
    python3 -m fastcifar data prepare --source "$tarball" --data-root "$cache"
    have_data=1
  fi
fi
if [ "$have_data" = 0 ]; then
  echo "gpu-suite: no CIFAR-10 cache in $cache and no $tarball: the speedruns wait (bring the parts with --data-part, or run fastcifar data prepare --data-root $cache)"
fi
mkdir -p "$results"

pack() {  # after every step: a job killed at its time limit still returns the finished steps
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-suite.tgz" -C "$results" $(cd "$results" && ls ./*.json ./*.log ./*.json.gz ./*.failed 2>/dev/null)
  fi
}

start=$SECONDS
longest=0
failed=0
for step in "${steps[@]}"; do
  name=${step%%|*}
  read -r -a command <<< "${step#*|}"
  [ -f "$results/$name.json" ] || [ -f "$results/$name.failed" ] && continue
  if [ -n "${GPU_SUITE_ONLY:-}" ] && [[ " $GPU_SUITE_ONLY " != *" $name "* ]]; then continue; fi
  [ "${command[0]}" = speedrun ] && [ "$have_data" = 0 ] && continue  # waits for the data
  if [ "$smoke" = 1 ]; then
    for i in "${!command[@]}"; do [ "${command[$i]}" = --cudagraphs ] && unset "command[$i]"; done
    command=("${command[@]}")
  fi
  if (( SECONDS - start + longest > deadline )); then
    echo "gpu-suite: stopping before $name ($((SECONDS - start)) s used, longest step ${longest} s); call again"
    break
  fi
  rm -rf "${results:?}/$name"  # a step killed at the job's time limit leaves a half-filled folder
  case "${command[0]}" in
    pytest) run=(python3 -m pytest "$repo/tests" "${command[@]:1}" -q -p no:cacheprovider
                 --junitxml "$results/$name.xml") ;;
    speedrun) run=(python3 -m fastcifar "${command[@]}" "${speedrun_flags[@]}" --out "$results/$name"
                   --json "$results/$name.json") ;;
    profile) run=(python3 -m fastcifar "${command[@]}" "${profile_flags[@]}" --out "$results/$name") ;;
    *) run=(python3 -m fastcifar "${command[@]}" "${bench_flags[@]}" --json "$results/$name.json") ;;
  esac
  echo "gpu-suite: $name: ${run[*]}"
  began=$SECONDS
  if [ "${command[0]}" = pytest ]; then  # the counts, pass or fail, are the step's result
    "${run[@]}" > "$results/$name.log" 2>&1 || true
    python3 - "$results/$name.xml" "$results/$name.json" <<'PY'
import json, sys, xml.etree.ElementTree as tree
suite = tree.parse(sys.argv[1]).getroot().find("testsuite")
counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
with open(sys.argv[2], "w") as out:
    json.dump({"schema": "fastcifar-gpu-tests/1", **counts}, out)
PY
  elif ! "${run[@]}" > "$results/$name.log" 2>&1; then
    tail -n 20 "$results/$name.log" | tee "$results/$name.failed"
    echo "gpu-suite: $name failed (log: $results/$name.log); going on with the next step" >&2
    failed=1
  fi
  if [ "${command[0]}" = profile ] && [ ! -f "$results/$name.failed" ]; then
    cp "$results/$name/trace.json.gz" "$results/$name.trace.json.gz"
    cp "$results/$name/profile.json" "$results/$name.json"  # last: the JSON marks the step done
  fi
  (( SECONDS - began > longest )) && longest=$((SECONDS - began))
  pack
done
python3 - "$results" "${steps[@]%%|*}" <<'PY'
import sys
from pathlib import Path
from fastcifar import bench, profile, runs, speedrun
for name in sys.argv[2:]:
    path = Path(sys.argv[1]) / f"{name}.json"
    if path.with_suffix(".failed").exists():
        print(f"{name}: failed (log: {path.with_suffix('.log')})")
        continue
    if not path.exists():
        print(f"{name}: not run yet")
        continue
    result = runs.read_json(path)
    if result["schema"] == "fastcifar-gpu-tests/1":
        print(f"{name}: {result['tests']} tests, {result['failures'] + result['errors']} failed, "
              f"{result['skipped']} skipped (log: {path.with_suffix('.log')})")
    elif result["schema"] == speedrun.SCHEMA:  # its last line is the summary over the seeds
        print(f"{name}: " + speedrun.format_result(result).splitlines()[-1])
    else:
        print(f"{name}: " + (profile.format_profile if result["schema"] == profile.SCHEMA else bench.format_results)(result))
PY
exit $failed

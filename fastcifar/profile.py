"""`fastcifar profile`: where a training step's time goes, per op family, on any device.

The run is built as `train` builds it (model, compiled forward, loader, the recipe's optimizer
and schedule), warmed up, and then `steps` full training steps are recorded with
torch.profiler. A step is what an epoch's loop does per batch: the loader's batch, forward,
loss, backward, optimizer and LR step.

Time is split by op family from exclusive times, so nothing is counted twice:
- CPU: each op's self time, filed under the first family in FAMILIES that matches the op or one
  of the ops around it (outermost first: `aten::mul_` inside the optimizer's step is optimizer
  time); time inside a step but outside every op is host overhead.
- CUDA: each kernel's time, filed by the kernel's name; the gaps in which no kernel ran are
  idle (the GPU waiting on the host).
The families add up to the step time measured apart (perf_counter on the CPU, CUDA events on a
GPU); `coverage` says how closely.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

from fastcifar import compile_cache, distributed, environment, runs
from fastcifar.bench import Timer, measured_peak_flops
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.model import multiply_adds
from fastcifar.runtime import build_run, load_dataset, resolve_runtime
from fastcifar.train import train_step

SCHEMA = "fastcifar-profile/1"
STEP_LABEL = "fastcifar.step"
LOADER_LABEL = "fastcifar.loader"
HOST = "host overhead (outside ops)"
IDLE = "idle (no kernel running)"
OTHER = "other"
CONV_FAMILIES = ("convolution forward", "convolution backward")

# The one table: (family, pattern), first match wins, searched in lowercased op and kernel names.
# CPU ops are aten:: names (and autograd's "...Backward0" nodes); CUDA kernels are cuDNN/CUTLASS
# names (fprop, dgrad, wgrad), ATen kernel names and Triton kernels (triton_*).
FAMILIES: tuple[tuple[str, str], ...] = (
    ("augmentation/loader", r"fastcifar\.loader|fastcifar::augment|augment_kernel|upsample|interpolate"),
    ("optimizer", r"optimizer\.|sgd|_foreach_|multi_tensor_apply|lr_scheduler"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsoftmax|nllloss"),
    ("convolution backward", r"convolutionbackward|convolution_backward|dgrad|wgrad"),
    ("convolution forward", r"conv|fprop|xmma|implicit_gemm|winograd"),
    ("batch norm", r"batch_norm|batchnorm|\bbn_|_bn_"),
    ("memory copies", r"memcpy|memset|copy_|_to_copy|aten::to\b|clone|contiguous|cat\b"),
    ("elementwise/fused", r"triton_|cpp_fused|elementwise|vectorized|reduce|relu|threshold|add|mul|mean|sum|"
                          r"div|addmm|mm\b|gemm|linear|accumulategrad|fill|zero|where|stack|argmax|eq"),
)


def family_of(names: list[str]) -> str:
    """The family of an op given its own name last and the names of the ops around it before it,
    outermost first; the first name that any pattern matches decides."""
    for name in names:
        lowered = name.lower()
        for family, pattern in FAMILIES:
            if re.search(pattern, lowered):
                return family
    return OTHER


def profile(config: TrainConfig, steps: int, out: Path, warmup: int = 3, log=print) -> dict:
    """Record `steps` training steps of `config` after `warmup` unrecorded ones; write the trace
    and profile.json to `out` and return the profile."""
    runtime = resolve_runtime(config, distributed.SINGLE, log)
    device = runtime.device
    dataset = load_dataset(config, log)
    if len(dataset.train_labels) < config.batch_size:
        raise UserError(f"--batch-size {config.batch_size} is more than the {len(dataset.train_labels)} "
                        "training images: lower --batch-size or raise --subset")
    run = build_run(config, runtime, dataset)
    batches = _full_batches(run.loader, config.batch_size)
    run.model.train()

    def step() -> None:
        with record_function(STEP_LABEL):
            with record_function(LOADER_LABEL):
                images, labels = next(batches)
            train_step(run, images, labels)
            run.scheduler.step()

    started = time.perf_counter()
    for _ in range(warmup):  # compiles, and lets cuDNN choose its kernels
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log(f"warm-up ({warmup} steps, compile included): {time.perf_counter() - started:.1f}s")
    compile_cache.seal(runtime.compile_cache, log)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step_seconds = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            with Timer(device) as t:
                step()
            step_seconds.append(t.seconds)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json.gz"
    prof.export_chrome_trace(str(trace))

    events = prof.events()
    split = _gpu_split(events) if device.type == "cuda" else _cpu_split(events)
    step_ms = 1000 * sum(step_seconds) / steps
    families = {name: ms / steps for name, ms in sorted(split["families"].items(), key=lambda kv: -kv[1])}
    conv_ms = sum(families.get(name, 0.0) for name in CONV_FAMILIES)
    dtype = runtime.amp_dtype or torch.float32
    peak = measured_peak_flops(device, dtype)
    conv_flops = 6 * multiply_adds(run.model) * config.batch_size  # forward + backward, per step
    result = {
        "schema": SCHEMA,
        **environment.provenance(),
        "environment": environment.environment(device, dataset),
        "settings": {"batch_size": config.batch_size, "steps": steps, "warmup": warmup, "amp": str(runtime.amp_dtype),
                     "compile": runtime.compile, "cudagraphs": runtime.cudagraphs,
                     "channels_last": config.channels_last, "loader": runtime.loader},
        "step_ms": step_ms,
        "step_ms_samples": [1000 * s for s in step_seconds],
        "images_per_sec": config.batch_size * steps / sum(step_seconds),
        "families_ms_per_step": families,
        "coverage": sum(families.values()) / step_ms,
        "top_kernels": [{"name": name, "ms_per_step": ms / steps, "calls_per_step": calls / steps}
                        for name, ms, calls in split["top"]],
        "conv_tflops": conv_flops / (conv_ms / 1000) / 1e12 if conv_ms else None,
        "peak_tflops_measured": peak / 1e12,
        "trace": trace.name,
    }
    runs.write_json(out / "profile.json", result)
    return result


def _full_batches(loader, batch_size: int):
    """Full batches, epoch after epoch: a smaller last batch would be one more compiled shape."""
    epoch = 0
    while True:
        yield from ((images, labels) for images, labels in loader.epoch(epoch) if len(labels) == batch_size)
        epoch += 1


def _cpu_split(events) -> dict:
    """Self CPU time of every op inside a step, by family; a step's own self time is host overhead."""
    families: dict[str, float] = {}
    per_op: dict[str, list[float]] = {}
    for event in events:
        chain = _chain(event)
        if STEP_LABEL not in chain:
            continue
        inside = chain[chain.index(STEP_LABEL) + 1:]
        family = family_of(inside) if inside else HOST
        ms = event.self_cpu_time_total / 1000
        families[family] = families.get(family, 0.0) + ms
        if inside:
            row = per_op.setdefault(event.name, [0.0, 0])
            row[0] += ms
            row[1] += 1
    return {"families": families, "top": _top(per_op)}


def _gpu_split(events) -> dict:
    """Kernel time inside the recorded steps by family, and the gaps between kernels as idle."""
    # record_function spans (fastcifar.step, the optimizer's step) are also drawn on the GPU's
    # timeline; they are not kernels, and counting them hid most of the idle time
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    families: dict[str, float] = {}
    per_kernel: dict[str, list[float]] = {}
    for kernel in kernels:
        ms = kernel.time_range.elapsed_us() / 1000
        family = family_of([kernel.name])
        families[family] = families.get(family, 0.0) + ms
        row = per_kernel.setdefault(kernel.name, [0.0, 0])
        row[0] += ms
        row[1] += 1
    spans = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    busy_us, end = 0.0, None
    for start, stop in spans:  # the union of kernel intervals: overlapping kernels count once
        if end is None or start > end:
            busy_us += stop - start
            end = stop
        elif stop > end:
            busy_us += stop - end
            end = stop
    total_us = (spans[-1][1] - spans[0][0]) if spans else 0.0
    overlap_ms = sum(families.values()) - busy_us / 1000
    if overlap_ms > 0:  # kernels on several streams at once: scale so families add up to busy time
        scale = (busy_us / 1000) / sum(families.values())
        families = {name: ms * scale for name, ms in families.items()}
    families[IDLE] = (total_us - busy_us) / 1000
    return {"families": families, "top": _top(per_kernel)}


def _chain(event) -> list[str]:
    """The names of an event's enclosing ops, outermost first, then its own."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names[::-1]


def _top(per_name: dict[str, list[float]], count: int = 15) -> list[tuple[str, float, int]]:
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:count]
    return [(name, ms, calls) for name, (ms, calls) in ranked]


def format_profile(result: dict) -> str:
    s = result["settings"]
    lines = [f"{result['environment']['device_name']}: batch {s['batch_size']}, amp {s['amp']}, "
             f"compile {s['compile']}{', CUDA graphs' if s.get('cudagraphs') else ''}, loader {s['loader']}; "
             f"{s['steps']} steps recorded after {s['warmup']} warm-up",
             f"step {result['step_ms']:.2f} ms, {result['images_per_sec']:.0f} images/s",
             "", f"{'family':<30}{'ms/step':>10}{'share':>8}"]
    step_ms = result["step_ms"]
    for name, ms in result["families_ms_per_step"].items():
        lines.append(f"{name:<30}{ms:>10.2f}{ms / step_ms:>8.1%}")
    lines.append(f"{'sum (vs measured step)':<30}{sum(result['families_ms_per_step'].values()):>10.2f}"
                 f"{result['coverage']:>8.1%}")
    lines += ["", f"{'top ops / kernels':<70}{'ms/step':>10}{'calls':>7}"]
    for row in result["top_kernels"]:
        name = row["name"] if len(row["name"]) <= 68 else row["name"][:65] + "..."
        lines.append(f"{name:<70}{row['ms_per_step']:>10.2f}{row['calls_per_step']:>7.0f}")
    achieved, peak = result["conv_tflops"], result["peak_tflops_measured"]
    if achieved is not None:
        lines.append(f"\nconvolutions: {achieved:.3g} TFLOP/s achieved against a measured matmul peak of "
                     f"{peak:.3g} TFLOP/s ({achieved / peak:.1%})")
    return "\n".join(lines)

"""torchrun + DistributedDataParallel plumbing: which process this is, and sums across ranks.

`fastcifar train` under `torchrun --nproc_per_node N` runs one process per rank; torchrun sets
RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous, the CLI reads them once (`from_env`) and
passes a `Dist` down. Without torchrun it is a single process and none of this is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env(environ=os.environ) -> Dist:
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> None:
    if dist.enabled and not torch_dist.is_initialized():
        if device.type == "cuda":
            # Each rank's GPU becomes its current device: NCCL's barrier, CUDA events and Triton
            # launches all use the current device, which is GPU 0 on every rank until set.
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_sum(dist: Dist, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a no-op on one process)."""
    if dist.enabled:
        values = values.clone()
        torch_dist.all_reduce(values)
    return values


# Under torchrun the ranks agree on a Ctrl-C with an all_reduce read on the host. On CUDA that read
# waits for the GPU, so they agree every STOP_CHECK_EVERY steps rather than stall every step; a CPU
# run agrees every step. Either stops well inside the 30 s torchrun gives a rank after passing the
# signal on (then it kills it, and the checkpoint with it).
STOP_CHECK_EVERY = 20


def stop_check_every(device: torch.device) -> int:
    return STOP_CHECK_EVERY if device.type == "cuda" else 1


def stop_agreed(dist: Dist, requested: bool, step: int, every: int, device: torch.device) -> bool:
    """Whether to stop after `step`, the same answer on every rank: on one process as soon as a
    stop is requested; under torchrun when any rank has requested one, checked on steps that are
    multiples of `every` (steps are numbered alike on all ranks)."""
    if not dist.enabled:
        return requested
    if step % every:
        return False
    return bool(all_sum(dist, torch.tensor([float(requested)], device=device)).item())

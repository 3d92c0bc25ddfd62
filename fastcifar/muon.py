"""`--optimizer muon`: Muon for the convolution filters, SGD for the rest, as one optimizer.

Muon replaces a weight matrix's update by an orthogonalized one: the Nesterov momentum of its
gradient goes through a few Newton-Schulz iterations that push every singular value towards 1,
so that a step moves every direction of the filter bank by about the same amount, however
unevenly the gradient spreads over them. A conv filter (out, in, kh, kw) is treated as the matrix
(out, in x kh x kw). torch.optim.Muon takes 2-D parameters only; here the groups marked
`muon: True` get this update on their flattened filters (with torch.optim.Muon's conventions:
momentum as an average, `lerp`, and the step scaled by sqrt(max(1, rows / cols))), and the
others plain SGD (momentum, Nesterov, weight decay, as torch.optim.SGD computes it). One
optimizer, so that one OneCycle schedule drives every group's LR and one state_dict holds both.
"""

from __future__ import annotations

import math

import torch

# The quintic's coefficients (a, b, c) of X <- aX + (bA + cA^2)X, A = XX^T, as in torch.optim.Muon:
# chosen for speed, they map singular values in (0, 1] to about 0.7-1.2 in 5 steps, not exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def iteration_dtype(device: torch.device) -> torch.dtype:
    """What the Newton-Schulz iterations compute in: bf16 on a GPU, fp32 on a CPU (where bf16 may
    be emulated). A run's env.json names it."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """`update` (a filter bank or matrix) with the singular values of its flattened matrix pushed
    towards 1 and its singular vectors kept, in `iteration_dtype`, returned in the update's dtype."""
    x = update.reshape(len(update), -1).to(iteration_dtype(update.device))
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # the Frobenius norm bounds the largest singular value by 1
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).reshape(update.shape).to(update.dtype)


class MuonSGD(torch.optim.Optimizer):
    """SGD for each group, or Muon for the groups with `muon=True` (their own `muon_momentum`,
    not cycled by OneCycle, which cycles `momentum`; no weight decay unless the group sets it)."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool = False, weight_decay: float = 0.0,
                 muon_momentum: float = 0.6, ns_steps: int = NS_STEPS) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      muon=False, muon_momentum=muon_momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (_muon if group["muon"] else _sgd)(p, self.state[p], group)
        return loss


def _sgd(p: torch.Tensor, state: dict, group: dict) -> None:
    grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
    momentum = group["momentum"]
    if momentum:
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = grad.clone()
        else:
            buffer.mul_(momentum).add_(grad)
        grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
    p.add_(grad, alpha=-group["lr"])


def _muon(p: torch.Tensor, state: dict, group: dict) -> None:
    momentum = group["muon_momentum"]
    buffer = state.setdefault("momentum_buffer", torch.zeros_like(p))
    buffer.lerp_(p.grad, 1 - momentum)
    update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
    rows, cols = len(p), p[0].numel()
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(orthogonalize(update, group["ns_steps"]), alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))

"""`--lookahead K`: every K steps the weights move part way back toward a slow copy of themselves.

The slow copy holds every floating-point tensor of the model's state, BatchNorm's running
statistics included. Every K steps it moves toward the trained weights by (1 - decay), and the
weights then continue from it: a step of K fast updates is shrunk toward where the last one
began, which damps the noise of a high learning rate. The decay rises over the run,
decay = BASE**K * (step / total_steps)**3, so the early, large-LR steps are left alone and the
late ones are averaged most, and the run ends on the slow copy (one last move with decay 1). The
CIFAR-10 speed records use this schedule (with K = 5) and report that it helps only together with
a fast BatchNorm momentum (`--bn-momentum`), so that the statistics keep up with the weights.
"""

from __future__ import annotations

import torch

BASE = 0.95  # the slow copy's decay per step at the run's end


class Lookahead:
    def __init__(self, model: torch.nn.Module, every: int, total_steps: int) -> None:
        self.every, self.total_steps = every, total_steps
        self._live = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self.slow = [t.clone() for t in self._live]

    def decay(self, step: int) -> float:
        """The slow copy's decay at `step` (from 1): 1 at the last step, so the run ends on it."""
        return 1.0 if step >= self.total_steps else BASE ** self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step `step` (counted from 1 over the whole run): every `every` steps, and
        at the last, the slow copy moves and the weights take its value."""
        if step % self.every and step < self.total_steps:
            return
        torch._foreach_lerp_(self.slow, self._live, 1 - self.decay(step))
        torch._foreach_copy_(self._live, self.slow)

    def state_dict(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.slow]

    def load_state_dict(self, slow: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.slow, [t.to(s.device) for s, t in zip(self.slow, slow, strict=True)])

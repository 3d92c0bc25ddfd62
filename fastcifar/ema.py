"""An exponential moving average of a model's weights and BatchNorm statistics (`--ema DECAY`).

After each optimizer step every floating-point tensor of the model's state moves into the
average: average += (1 - decay) * (weights - average), one fused lerp over all of them, with no
host sync. Evaluation swaps the average into the model for its duration and the trained weights
back after, so the same (compiled) forward serves both and nothing recompiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = model
        # parameters, and BN running statistics (num_batches_tracked is an integer, left as trained)
        self._live = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self._average = [t.clone() for t in self._live]  # it starts at the weights it is given

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._average, self._live, 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block and its trained weights again after."""
        trained = [t.clone() for t in self._live]
        with torch.no_grad():
            torch._foreach_copy_(self._live, self._average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, trained)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with the average in place of the trained weights."""
        with self.swapped_in():
            return {name: value.clone() for name, value in self.model.state_dict().items()}

"""The reference CIFAR-10 ResNet18, written out explicitly.

BasicBlocks [2, 2, 2, 2]; a 3x3 stem without max-pool; layers 2 and 3 halve the resolution,
layer4 keeps stride 1 (so it runs at 8x8); global average pool; Linear 512 -> 10.
11,173,962 parameters; 958.08 M multiply-adds in its convs and linear layer for one 3x32x32
image (torchinfo also counts batch-norm scales and reports 958.09 M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._layer(64, 64, stride=1)
        self.layer2 = self._layer(64, 128, stride=2)
        self.layer3 = self._layer(128, 256, stride=2)
        self.layer4 = self._layer(256, 512, stride=1)  # stays at 8x8: the reference's choice
        self.linear = nn.Linear(512, num_classes)

    @staticmethod
    def _layer(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pool as a mean: adaptive_avg_pool2d's CUDA backward has no deterministic
        # kernel, so it would fail under --deterministic.
        out = out.mean((2, 3))
        return self.linear(out)


def zero_init_residual(model: nn.Module) -> None:
    """Start every BasicBlock as its shortcut alone: its last BN scale at 0, so the residual
    branch adds nothing until trained (the "zero-gamma" init of large-batch ImageNet training).
    Parameters and shapes unchanged. Off in both presets (what it measured: bench/NOTES.md, search 9)."""
    for block in model.modules():
        if isinstance(block, BasicBlock):
            nn.init.zeros_(block.bn2.weight)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds of one forward pass on one image, counted from conv and linear layers.

    The same rule as torchinfo's: a conv costs out_elements * in_channels/groups * kh * kw,
    a linear in_features * out_features. Batch norm, ReLU and pooling are not counted.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, _output) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def train_flops_per_image(model: nn.Module) -> int:
    """FLOPs of one training image: 2 FLOPs per multiply-add, times 3 for forward + backward."""
    return 3 * 2 * multiply_adds(model)

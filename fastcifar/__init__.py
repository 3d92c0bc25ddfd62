"""fastcifar: the reference CIFAR-10 ResNet18, trained fast, timed honestly."""

__version__ = "0.1.0"

"""fastcifar: the reference CIFAR-10 ResNet18, trained fast, timed honestly."""

__version__ = "0.1.0"

import os

# Read when the package loads, before any of its modules imports torch: importing torch's
# compiler sets TORCHINDUCTOR_CACHE_DIR to torch's own default, and a user's value must win.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
USER_COMPILE_CACHE_DIR = os.environ.get(COMPILE_CACHE_ENV)

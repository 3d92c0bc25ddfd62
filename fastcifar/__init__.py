"""fastcifar: the reference CIFAR-10 ResNet18, trained fast, timed honestly."""

__version__ = "0.1.0"

import os

COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _users_compile_cache_dir() -> str | None:
    """The user's TORCHINDUCTOR_CACHE_DIR, read when the package loads: fastcifar sets the variable
    to its own folder later. torch's compiler, once used, sets it to torch's default, which is
    not the user's choice."""
    value = os.environ.get(COMPILE_CACHE_ENV)
    if value is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return None if os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


USER_COMPILE_CACHE_DIR = _users_compile_cache_dir()

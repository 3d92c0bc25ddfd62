import os

# Without a GPU, Triton kernels run in its CPU interpreter; it must be set before triton loads.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import tiny_arrays  # noqa: E402


@pytest.fixture
def arrays():
    return tiny_arrays()


@pytest.fixture(autouse=True)
def compile_cache_restored(monkeypatch):
    """A compiled run points torch's caches at its data root through the environment and inductor's
    config: undone after each test, so no test compiles into another test's folder."""
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with inductor_config.patch(force_disable_caches=inductor_config.force_disable_caches):
        yield

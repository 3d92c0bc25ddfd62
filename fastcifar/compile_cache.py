"""Where torch.compile keeps what it compiled, so that a second run skips most of the compiling.

torch's default is /tmp/torchinductor_<user>, which a reboot or a fresh container starts
without. fastcifar keeps it beside the data cache (`<data root>/compile-cache`) instead, or in
`--compile-cache-dir` (which defaults to a TORCHINDUCTOR_CACHE_DIR the user set: the CLI reads
it before torch, which fills in its own default on import). A folder that cannot be written is
warned about and compiling goes on without a lasting cache. `--no-compile-cache` turns torch's
caches off.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch._dynamo.utils import counters

ENV = "TORCHINDUCTOR_CACHE_DIR"
# (summary name, counter group, counter): how many compiled graphs each cache served or missed
COUNTERS = (("fx_graph_hits", "inductor", "fxgraph_cache_hit"), ("fx_graph_misses", "inductor", "fxgraph_cache_miss"),
            ("aot_autograd_hits", "aot_autograd", "autograd_cache_hit"),
            ("aot_autograd_misses", "aot_autograd", "autograd_cache_miss"))


def use(folder: Path, enabled: bool, log=print) -> str | None:
    """Point torch's compile caches at `folder` and return it; None when they are off."""
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = not enabled
    if not enabled:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        log(f"warning: compile cache {folder} is not writable ({e.strerror}): compiling without a lasting cache "
            "(pass a writable --compile-cache-dir, or --no-compile-cache)")
        inductor_config.force_disable_caches = True
        return None
    os.environ[ENV] = str(folder)  # inductor reads it at each compile
    return str(folder)


def counts() -> dict[str, int]:
    """The caches' hit and miss counters so far in this process."""
    return {name: counters[group][counter] for name, group, counter in COUNTERS}


def since(before: dict[str, int]) -> dict[str, int]:
    return {name: value - before[name] for name, value in counts().items()}


"""Where torch.compile keeps what it compiled, so that a second run skips most of the compiling.

torch's default is /tmp/torchinductor_<user>, which a reboot or a fresh container starts
without. fastcifar keeps it beside the data cache (`<data root>/compile-cache`) instead, or in
`--compile-cache-dir` (which defaults to a TORCHINDUCTOR_CACHE_DIR the user set: the package
reads it when it loads, and torch's own default, which torch's compiler fills in, is not taken
for the user's). A folder that cannot be written is
warned about and compiling goes on without a lasting cache. `--no-compile-cache` turns torch's
caches off. On the CPU the folder also keeps the C++ header inductor precompiles for its kernels.

torch survives a cache entry it cannot unpickle, but not damaged generated code or a damaged
compiled library: loading those crashed the run (an InductorError, a bus error). So each
compiling run lists the folder's files with their hashes (`MANIFEST`) once it has compiled, and
the next run checks them before torch reads the folder: a file changed since clears the folder
with a warning, and the run compiles anew. Files not listed yet (a run killed before it wrote
the list, another run compiling now) are left alone.

`--compile-cache-file FILE` carries the compiled code to another machine (a fresh CI runner):
a run loads FILE into the caches before it compiles, and writes what it compiled or loaded back
to FILE (torch.compiler's save/load_cache_artifacts). The file is stamped with the torch and
Triton versions and the device; one made elsewhere is skipped with a note, a damaged one with a
warning, and the run compiles as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from fastcifar import COMPILE_CACHE_ENV, environment, runs
from fastcifar.errors import UserError

ENV = COMPILE_CACHE_ENV
FILE_SCHEMA = "fastcifar-compile-cache-file/1"
MANIFEST = "fastcifar-manifest.json"
MANIFEST_SCHEMA = "fastcifar-compile-cache-manifest/1"
HEADERS = "precompiled_headers"  # not listed: the compiler checks a precompiled header and ignores a bad one
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
        runs.probe_writable(folder)
    except OSError as e:
        log(f"warning: compile cache {folder} is not writable ({e.strerror}): compiling without a lasting cache "
            "(pass a writable --compile-cache-dir, or --no-compile-cache)")
        inductor_config.force_disable_caches = True
        return None
    changed = damaged(folder)
    if changed:
        log(f"warning: compile cache {folder} is damaged ({changed}): cleared, compiling anew")
        shutil.rmtree(folder, ignore_errors=True)  # other ranks under torchrun may be clearing it too
        folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)  # inductor reads it at each compile
    _keep_precompiled_headers_in(folder)
    return str(folder)


def _keep_precompiled_headers_in(folder: Path) -> None:
    """inductor's CPU backend precompiles its kernels' common header (a large file, seconds to
    build) into torch's default folder in /tmp, whatever the cache folder, and builds it again
    before it loads a cached kernel once /tmp is emptied (what that costs: bench/NOTES.md, "Where
    a warm run's compile seconds go"). Kept in the cache folder, it lasts as the rest does. A
    torch without these (private) names keeps torch's place."""
    import torch._inductor.codecache as codecache

    if not all(hasattr(codecache, name) for name in ("_HEADER_DIR", "_HEADER_LOCK_DIR", "_precompile_header")):
        return
    codecache._HEADER_DIR = str(folder / HEADERS)
    codecache._HEADER_LOCK_DIR = str(folder / HEADERS / "locks")
    codecache._precompile_header.cache_clear()  # it remembers where it put each header


def seal(cache: str | None, log=print) -> None:
    """List the files of the cache folder (a Runtime's; None: not compiling, or off) and their
    hashes, for the next run's check. Called by one process once it has compiled."""
    if cache is None:
        return
    folder = Path(cache)
    files = {str(path.relative_to(folder)): _hash(path) for path in _files(folder)}
    try:
        runs.write_json(folder / MANIFEST, {"schema": MANIFEST_SCHEMA, "files": files})
    except UserError as e:
        log(f"warning: compile cache {folder} left unchecked for the next run: {e}")


def damaged(folder: Path) -> str | None:
    """What is wrong with the folder's listed files, or None when they are as listed (or no list)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        listed = json.loads(manifest.read_text())
        files = dict(listed["files"]) if listed["schema"] == MANIFEST_SCHEMA else None
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if files is None:
        return f"its {MANIFEST} is unreadable"
    changed = [name for name, digest in files.items()
               if (folder / name).is_file() and _hash(folder / name) != digest]
    return f"{len(changed)} of its files changed since they were written" if changed else None


def _files(folder: Path):
    return (path for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith(MANIFEST) and path.relative_to(folder).parts[0] != HEADERS)


def _hash(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()


def counts() -> dict[str, int]:
    """The caches' hit and miss counters so far in this process."""
    return {name: counters[group][counter] for name, group, counter in COUNTERS}


def since(before: dict[str, int]) -> dict[str, int]:
    return {name: value - before[name] for name, value in counts().items()}


def stamp(device: torch.device) -> dict:
    """What compiled code is only valid for: the same torch, Triton and device."""
    return {"torch": torch.__version__, "triton": environment.module_version("triton"),
            "device_name": environment.device_name(device)}


def import_file(path: Path, device: torch.device, log=print) -> int:
    """Load the compiled code in `path` into the caches; the number of artifacts loaded (0 when the
    file is not there yet, was made for another torch, Triton or device, or is damaged)."""
    if not path.is_file():
        log(f"compile cache file {path}: not there yet, this run compiles and writes it")
        return 0
    try:
        header, blob = path.read_bytes().split(b"\n", 1)
        header = json.loads(header)
        made_for = header["stamp"] if header["schema"] == FILE_SCHEMA else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        made_for, problem = None, type(e).__name__
    else:
        problem = f"not a {FILE_SCHEMA} file"
    if made_for is None:
        log(f"warning: compile cache file {path} is damaged ({problem}): compiling anew, it will be rewritten")
        return 0
    here = stamp(device)
    if made_for != here:
        log(f"compile cache file {path} was made for {made_for}, this is {here}: not used, compiling anew")
        return 0
    try:
        info = torch.compiler.load_cache_artifacts(blob)  # None for bytes it cannot read, or it raises
    except Exception as e:
        info, problem = None, type(e).__name__
    else:
        problem = "unreadable artifacts"
    if info is None:
        log(f"warning: compile cache file {path} could not be loaded ({problem}): compiling anew")
        return 0
    log(f"compile cache file {path}: {_count(info)} compiled artifacts loaded")
    return _count(info)


def export_file(path: Path, device: torch.device, log=print) -> int:
    """Write the compiled code of this process to `path`; the number of artifacts written."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log(f"compile cache file {path}: nothing compiled to write")
        return 0
    blob, info = saved
    header = json.dumps({"schema": FILE_SCHEMA, "stamp": stamp(device)}).encode()
    runs.write_atomically(path, lambda file: file.write(header + b"\n" + blob))
    log(f"compile cache file {path}: {_count(info)} compiled artifacts written")
    return _count(info)


def _count(info) -> int:
    """Compiled artifacts (graphs, kernels, autotuning results) in a torch.compiler CacheInfo."""
    return sum(len(names) for names in info.artifacts.values())

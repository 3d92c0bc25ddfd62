import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import tiny_run

from fastcifar import compile_cache, train
from fastcifar.config import TrainConfig

TINY = TrainConfig(synthetic=True, device="cpu", loader="torch", subset=32, test_subset=16, batch_size=16,
                   eval_batch_size=16, epochs=1, report=False, amp="off", compile=True)


def compile_tiny(config: TrainConfig, log=lambda *_: None) -> dict:
    """What a compiled run of `config` does before its first epoch, on the tiny network, in a
    process that has compiled nothing yet: the compile cache's folder and its counts."""
    torch._dynamo.reset()
    before = compile_cache.counts()
    run, dataset = tiny_run(config, log=log)
    test_images, test_labels = torch.from_numpy(dataset.test_images), torch.from_numpy(dataset.test_labels)
    train.warm_up_run(run, len(dataset.train_labels), test_images, test_labels, 0, log)
    return {"dir": run.runtime.compile_cache, **compile_cache.since(before)}


@pytest.mark.slow  # compiles, or runs processes: minutes on 2 cores
def test_a_second_run_with_the_same_data_root_compiles_from_the_cache(tmp_path):
    config = TINY.replace(data_root=str(tmp_path / "data"))
    folder = str(tmp_path / "data" / "compile-cache")
    cold, warm = compile_tiny(config), compile_tiny(config)
    assert cold["dir"] == warm["dir"] == folder
    assert cold["fx_graph_misses"] > 0 and cold["fx_graph_hits"] == 0
    assert warm["fx_graph_hits"] == cold["fx_graph_misses"] and warm["fx_graph_misses"] == 0


@pytest.mark.slow  # runs processes
@pytest.mark.parametrize("first", ["fastcifar.train", "torch._inductor.codecache"])
def test_the_cli_keeps_the_users_cache_folder_and_not_torchs_default(first, tmp_path):
    # torch's compiler loaded first (as the tests and the A/B worker load it), and used before
    # fastcifar loads (a script that compiled something else): the user's value still wins, and
    # the default torch filled in is not taken for the user's
    code = (f"import os, {first}, torch._inductor.runtime.cache_dir_utils as d; d.cache_dir(); "
            "import fastcifar.cli as cli; print(cli.USER_COMPILE_CACHE_DIR, os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    for user_set in (None, str(tmp_path / "mine")):
        run_env = env if user_set is None else {**env, compile_cache.ENV: user_set}
        kept, torchs = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True,
                                      check=True).stdout.split()
        assert kept == str(user_set) and torchs == (user_set or torchs) != "None"  # torch filled in its default


def test_a_cache_folder_set_by_the_user_wins(tmp_path, monkeypatch):
    from fastcifar import cli

    monkeypatch.setattr(cli, "USER_COMPILE_CACHE_DIR", None)  # none set when the CLI loaded
    assert cli.config_from_args(cli.build_parser().parse_args(["train"])).compile_cache_dir is None
    assert TINY.replace(data_root=str(tmp_path)).compile_cache_folder == tmp_path / "compile-cache"
    # as read when the CLI loaded, before torch filled in its own default
    monkeypatch.setattr(cli, "USER_COMPILE_CACHE_DIR", str(tmp_path / "mine"))
    config = cli.config_from_args(cli.build_parser().parse_args(["train", "--data-root", str(tmp_path / "data")]))
    assert config.compile_cache_folder == tmp_path / "mine"
    flagged = cli.build_parser().parse_args(["train", "--compile-cache-dir", str(tmp_path / "flag")])
    assert cli.config_from_args(flagged).compile_cache_folder == tmp_path / "flag"


def test_an_unwritable_cache_folder_warns_and_compiles_without_it(tmp_path):
    (tmp_path / "data").write_text("")  # a file where the folder would go
    said = []
    assert compile_cache.use(tmp_path / "data", True, log=said.append) is None
    assert len(said) == 1 and said[0].startswith("warning: compile cache ") and "--no-compile-cache" in said[0]
    assert torch._inductor.config.force_disable_caches


def test_no_compile_cache_turns_the_caches_off(tmp_path):
    assert compile_cache.use(tmp_path / "cache", False) is None
    assert torch._inductor.config.force_disable_caches and not (tmp_path / "cache").exists()
    assert compile_cache.use(tmp_path / "cache", True) == str(tmp_path / "cache")
    assert not torch._inductor.config.force_disable_caches


@pytest.mark.slow  # compiles, or runs processes: minutes on 2 cores
def test_a_cache_file_carries_the_compiled_code_to_a_fresh_machine(tmp_path):
    carried = tmp_path / "compiled.bin"

    def run(name: str, file: str | None) -> dict:  # a fresh data root each time: an empty cache folder
        return compile_tiny(TINY.replace(data_root=str(tmp_path / name), compile_cache_file=file), said.append)

    said = []
    run("first", str(carried))
    assert carried.is_file() and said.count(f"compile cache file {carried}: not there yet, this run compiles and "
                                            "writes it") == 1
    without = run("control", None)
    with_file = run("fresh", str(carried))
    assert without["fx_graph_misses"] > 0  # an empty cache folder alone compiles
    assert with_file["fx_graph_hits"] == without["fx_graph_misses"] and with_file["fx_graph_misses"] == 0
    assert any(m.startswith(f"compile cache file {carried}: ") and m.endswith("compiled artifacts loaded")
               for m in said)


def test_a_cache_file_from_elsewhere_or_damaged_is_skipped_with_a_note(tmp_path):
    cpu = torch.device("cpu")
    said = []
    other = tmp_path / "other.bin"
    other.write_bytes(json.dumps({"schema": compile_cache.FILE_SCHEMA,
                                  "stamp": {**compile_cache.stamp(cpu), "torch": "2.0.0"}}).encode() + b"\nx")
    assert compile_cache.import_file(other, cpu, log=said.append) == 0
    assert "was made for" in said[-1] and "not used, compiling anew" in said[-1]
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"\x00\x01 not a cache file")
    assert compile_cache.import_file(damaged, cpu, log=said.append) == 0
    assert said[-1].startswith(f"warning: compile cache file {damaged} is damaged")
    unknown = tmp_path / "unknown.bin"
    unknown.write_bytes(json.dumps({"schema": "other/1", "stamp": compile_cache.stamp(cpu)}).encode() + b"\nx")
    assert compile_cache.import_file(unknown, cpu, log=said.append) == 0
    assert said[-1].startswith(f"warning: compile cache file {unknown} is damaged (not a fastcifar-compile-cache")
    stamped = tmp_path / "bad-artifacts.bin"
    stamped.write_bytes(json.dumps({"schema": compile_cache.FILE_SCHEMA, "stamp": compile_cache.stamp(cpu)}).encode()
                        + b"\nnot artifacts")
    assert compile_cache.import_file(stamped, cpu, log=said.append) == 0
    assert said[-1].startswith(f"warning: compile cache file {stamped} could not be loaded")


def test_a_cache_folder_changed_since_it_was_listed_is_cleared_with_a_warning(tmp_path):
    folder = tmp_path / "cache"
    (folder / "ab").mkdir(parents=True)
    (folder / "ab" / "graph.so").write_bytes(b"compiled")
    (folder / "entry").write_bytes(b"pickled")
    compile_cache.seal(str(folder))
    (folder / "entry").unlink()  # a listed file gone, and one not listed yet: both fine
    (folder / "new").write_bytes(b"written after the list")
    said = []
    assert compile_cache.use(folder, True, log=said.append) == str(folder)
    assert said == [] and (folder / "ab" / "graph.so").is_file() and (folder / "new").is_file()

    (folder / "ab" / "graph.so").write_bytes(b"garbage!")  # same size, other bytes
    assert compile_cache.use(folder, True, log=said.append) == str(folder)
    assert said == [f"warning: compile cache {folder} is damaged (1 of its files changed since they were written): "
                    "cleared, compiling anew"]
    assert list(folder.iterdir()) == []

    (folder / compile_cache.MANIFEST).write_text("{not json")
    assert compile_cache.use(folder, True, log=said.append) == str(folder)
    assert said[-1].endswith(f"damaged (its {compile_cache.MANIFEST} is unreadable): cleared, compiling anew")
    compile_cache.seal(None)  # not compiling: nothing to list


@pytest.mark.slow  # compiles, in two processes
def test_a_corrupted_cache_folder_is_rebuilt_not_a_crash(tmp_path):
    # Before the list, loading garbled generated code crashed the process (an InductorError; once
    # a bus error, exit 135). The precompiled header is not listed: the compiler must ignore it.
    code = ("import sys, json; sys.path.insert(0, 'tests'); from test_compile_cache import TINY, compile_tiny; "
            f"print(json.dumps(compile_tiny(TINY.replace(data_root={str(tmp_path)!r}), print)))")

    def compile_in_a_process() -> tuple[list[str], dict]:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        *said, counts = done.stdout.strip().splitlines()
        return said, json.loads(counts)

    _, cold = compile_in_a_process()
    files = [path for path in (tmp_path / "compile-cache").rglob("*")
             if path.is_file() and path.name != compile_cache.MANIFEST]
    assert cold["fx_graph_misses"] > 0 and len(files) > 10
    assert any(path.parent.name == compile_cache.HEADERS for path in files)  # the CPU's precompiled header too
    for path in files:
        path.write_bytes(os.urandom(max(path.stat().st_size, 1)))
    said, again = compile_in_a_process()
    assert any(line.startswith("warning: compile cache ") and "is damaged" in line for line in said)
    assert again["fx_graph_misses"] == cold["fx_graph_misses"] and again["fx_graph_hits"] == 0

    # A garbled precompiled header alone: no clearing, and the kernels built again over it compile
    cache = tmp_path / "compile-cache"
    for path in (cache / compile_cache.HEADERS).glob("*.gch"):
        path.write_bytes(os.urandom(path.stat().st_size))
    for kernels in cache.glob("??"):  # inductor's folders of generated and compiled kernels
        shutil.rmtree(kernels)
    said, third = compile_in_a_process()
    assert not any("is damaged" in line for line in said)
    assert third["fx_graph_hits"] == cold["fx_graph_misses"] and third["fx_graph_misses"] == 0


@pytest.mark.slow  # compiles twice
def test_a_cache_folder_from_another_torch_is_compiled_anew_not_an_error(tmp_path, monkeypatch):
    import torch._inductor.codecache as codecache

    config = TINY.replace(data_root=str(tmp_path))
    cold = compile_tiny(config)
    # every FX-graph and AOTAutograd cache key holds this hash of torch's own source
    monkeypatch.setattr(codecache, "torch_key", lambda: b"another torch's source")
    other = compile_tiny(config)
    assert other["dir"] == cold["dir"] and cold["fx_graph_misses"] > 0
    assert other["fx_graph_hits"] == other["aot_autograd_hits"] == 0
    assert other["fx_graph_misses"] == cold["fx_graph_misses"]

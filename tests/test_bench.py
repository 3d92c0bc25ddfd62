import copy
import dataclasses
import json

import pytest
import torch

from fastcifar import bench, cli
from fastcifar.config import PRESETS
from fastcifar.errors import UserError


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    assert cli.main(["bench", "--device", "cpu", "--quick", "--what", "train,eval,loader,kernels",
                     "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_schema_is_self_describing(quick):
    assert quick["schema"] == bench.SCHEMA
    for key in ("timestamp", "git_sha", "command", "environment", "settings", "results", "flops_per_train_image"):
        assert key in quick
    env = quick["environment"]
    assert {"torch", "triton", "dali", "python", "device_name", "processes", "cuda", "driver"} <= set(env)
    assert quick["settings"]["batch_size"] == 16 and quick["settings"]["quick"] is True
    assert quick["settings"]["preset"] == "reference" and quick["extra"]["warmup_seconds"] > 0
    assert quick["flops_per_train_image"] == 6 * 958_075_904
    for name in ("train_images_per_sec", "eval_images_per_sec", "loader_torch_images_per_sec",
                 "loader_dali_images_per_sec", "loader_torchvision_images_per_sec", "mfu",
                 "augment_reference_images_per_sec"):
        f = quick["results"][name]
        assert f["min"] <= f["median"] <= f["max"] and f["unit"] and len(f["samples"]) == 3


def scaled(doc, factor):
    out = copy.deepcopy(doc)
    for f in out["results"].values():
        for key in ("median", "min", "max"):
            f[key] *= factor if f["higher_is_better"] else 1 / factor
    return out


def test_compare_finds_regression_and_passes_otherwise(quick):
    assert bench.compare(quick, quick, 0.05)[0] == 0
    code, table = bench.compare(scaled(quick, 2.0), quick, 0.05)  # the baseline was twice as fast
    assert code == 1 and "REGRESSED" in table
    assert bench.compare(quick, scaled(quick, 2.0), 0.05)[0] == 0  # faster is fine
    assert bench.compare(scaled(quick, 1.04), quick, 0.05)[0] == 0  # within the threshold


def test_compare_fails_when_a_baseline_figure_was_not_measured(quick):
    partial = copy.deepcopy(quick)
    del partial["results"]["eval_images_per_sec"]
    code, table = bench.compare(quick, partial, 0.05)
    assert code == 1 and "MISSING" in table and "FAILED" in table
    assert bench.compare(partial, quick, 0.05)[0] == 0  # a figure new in the current run is no regression


def test_compare_is_void_when_device_or_settings_differ(quick):
    other = copy.deepcopy(quick)
    other["settings"]["device_name"] = "NVIDIA H100 80GB HBM3"
    other["settings"]["batch_size"] = 512
    code, message = bench.compare(other, quick, 0.05)
    assert code == 2 and "void" in message and "device_name" in message and "batch_size" in message


def test_a_result_with_cuda_graphs_does_not_compare_with_one_without(quick):
    assert quick["settings"]["cudagraphs"] is False
    graphed = copy.deepcopy(quick)
    graphed["settings"]["cudagraphs"] = True
    code, message = bench.compare(quick, graphed, 0.05)
    assert code == 2 and "cudagraphs: False vs True" in message


def test_compare_cli_against_doubled_copy(quick, tmp_path, capsys):
    (tmp_path / "base.json").write_text(json.dumps(scaled(quick, 2.0)))
    (tmp_path / "now.json").write_text(json.dumps(quick))
    assert cli.main(["bench", "--compare", str(tmp_path / "base.json"), "--current", str(tmp_path / "now.json")]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--what", ","], "--what: unknown [] or empty"),
    (["--what", "train,speed"], "--what: unknown ['speed'] or empty"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--scaling", "0"], "--scaling N compares 1..N ranks: N must be at least 2"),
    (["--scaling", "2", "--cudagraphs"], "--scaling times DDP ranks, which run without CUDA graphs"),
    (["--max-regression", "nan"], "--max-regression must be a fraction of 0 or more"),
])
def test_bench_bad_flags_fail_before_measuring(args, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured despite a bad flag"))
    assert cli.main(["bench", "--device", "cpu", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_loader_bench_without_dali_says_it_skipped_it(monkeypatch):
    from fastcifar import dali_loader

    monkeypatch.setattr(dali_loader, "dali_available", lambda: False)
    messages = []
    config = bench.BenchConfig(what=("loader",), device="cpu", loader="torch", quick=True)
    result = bench.run(config, log=messages.append)
    assert "loader_dali_images_per_sec" not in result["results"] and "loader_torch_images_per_sec" in result["results"]
    assert any("DALI is not installed, so its loader is not timed" in m for m in messages)


def test_the_scaling_children_and_the_ab_gate_get_every_flag_of_the_parent():
    config = bench.BenchConfig(what=("train", "eval"), preset="fast", device="cpu", loader="torch", batch_size=8,
                               compile=False, amp="off", channels_last=False, dali_threads=2, dali_prefetch=3,
                               quick=True, baseline=True, scaling=2)
    graphed = dataclasses.replace(config, compile=True, cudagraphs=True, scaling=None)  # never with --scaling
    # so each must travel
    assert all(getattr(config, f.name) != f.default or f.name == "cudagraphs" for f in dataclasses.fields(config))
    for c in (config, graphed):
        assert cli.bench_config_from_args(cli.build_parser().parse_args(["bench", *c.to_argv()])) == c
    assert cli.bench_config_from_args(cli.build_parser().parse_args(["bench"])) == bench.BenchConfig()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_bench_times_the_recipes_step(preset):
    context = bench.prepare(bench.BenchConfig(preset=preset, device="cpu", loader="torch", quick=True),
                            log=lambda *_: None)
    recipe, groups = PRESETS[preset], context.run.optimizer.param_groups
    muon, bias_lr = recipe.optimizer == "muon", recipe.bn_bias_lr_mult != 1
    # the weights; the other 1-D parameters unless they decay alike; Muon's filters; the BN biases' own LR
    assert len(groups) == 1 + (not recipe.decay_bn_and_bias) + muon + bias_lr
    assert {g["max_lr"] for g in groups} == {recipe.lr} | ({recipe.muon_lr} if muon else set()) | (
        {recipe.lr * recipe.bn_bias_lr_mult} if bias_lr else set())
    assert any(g.get("muon", False) for g in groups) == muon  # torch.optim.SGD unless muon
    assert all(g["nesterov"] == recipe.nesterov for g in groups)  # momentum: OneCycle cycles it
    assert any(g["weight_decay"] == recipe.weight_decay for g in groups if not g.get("muon"))
    assert context.recipe.label_smoothing == recipe.label_smoothing and context.recipe.batch_size == 16
    assert context.recipe.image_side(0) == 32  # fast's low-res epochs are not what a bench times


@pytest.mark.parametrize(("bf16_rate", "peak"), [(1e9, 1e11), (1e12, 1e12)])
def test_the_peak_is_the_faster_of_the_training_dtype_and_fp32(bf16_rate, peak, monkeypatch):
    # A CPU that emulates bf16 multiplies bf16 matrices ~100x slower than fp32 ones (a GPU: the other way round).
    rates = {torch.bfloat16: bf16_rate, torch.float32: 1e11}
    monkeypatch.setattr(bench, "matmul_flops", lambda device, dtype: rates[dtype])
    assert bench.measured_peak_flops(torch.device("cpu"), torch.bfloat16) == peak
    assert bench.measured_peak_flops(torch.device("cpu"), torch.float32) == 1e11


def test_load_rejects_foreign_json(tmp_path):
    for text in ('{"schema": "x"}', "[1, 2]"):
        (tmp_path / "other.json").write_text(text)
        with pytest.raises(UserError, match="is not a fastcifar-bench/1 file: pass a file written by"):
            bench.load(str(tmp_path / "other.json"))


def test_a_missing_or_overwritten_baseline_fails_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before checking --compare"))
    base = tmp_path / "base.json"
    assert cli.main(["bench", "--device", "cpu", "--quick", "--compare", str(base)]) == 2
    assert f"{base} not found" in capsys.readouterr().err
    base.write_text('{"schema": "a speedrun, say"}')
    assert cli.main(["bench", "--device", "cpu", "--quick", "--compare", str(base)]) == 2
    assert "is not a fastcifar-bench/1 file" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--quick", "--compare", str(base), "--json", str(base)]) == 2
    assert "--json names the --compare baseline" in capsys.readouterr().err
    assert base.read_text() == '{"schema": "a speedrun, say"}'


def test_bench_unwritable_json_folder_fails_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before checking --json"))
    (tmp_path / "file").write_text("")
    code = cli.main(["bench", "--device", "cpu", "--quick", "--json", str(tmp_path / "file" / "r.json")])
    assert code == 2 and "pass a writable --json PATH" in capsys.readouterr().err

import gzip
import hashlib
import json

import pytest
from helpers import write_official_archive
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from fastcifar import cli, profile
from fastcifar.dali_loader import dali_available


@pytest.mark.parametrize("names,family", [
    (["aten::conv2d", "aten::convolution", "aten::mkldnn_convolution"], "convolution forward"),
    (["autograd::engine::evaluate_function: ConvolutionBackward0", "aten::convolution_backward"],
     "convolution backward"),
    (["aten::batch_norm", "aten::native_batch_norm"], "batch norm"),
    (["autograd::engine::evaluate_function: NativeBatchNormBackward0"], "batch norm"),
    (["aten::cross_entropy_loss", "aten::log_softmax"], "loss"),
    (["Optimizer.step#SGD.step", "aten::mul_"], "optimizer"),  # an elementwise op inside the optimizer
    (["fastcifar.loader", "fastcifar::augment", "aten::index"], "augmentation/loader"),
    (["aten::to", "aten::_to_copy", "aten::copy_"], "memory copies"),
    (["aten::relu"], "elementwise/fused"),
    (["autograd::engine::evaluate_function: torch::autograd::AccumulateGrad"], "elementwise/fused"),
    # CUDA kernel names
    (["sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"], "convolution forward"),
    (["sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"], "convolution backward"),
    (["sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"], "convolution backward"),
    (["void cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float>"], "batch norm"),
    (["triton_poi_fused__native_batch_norm_legit_functional_relu_0"], "batch norm"),
    (["triton_per_fused_add_mean_relu_1"], "elementwise/fused"),
    (["void at::native::(anonymous namespace)::fused_sgd_kernel<float>"], "optimizer"),
    (["_augment_kernel"], "augmentation/loader"),
    (["Memcpy HtoD (Pageable -> Device)"], "memory copies"),
    (["ProfilerStep#3"], profile.OTHER),
])
def test_every_family_has_its_ops_and_kernels(names, family):
    assert profile.family_of(names) == family


def test_gpu_split_counts_kernels_not_the_annotations_drawn_over_them():
    def gpu_event(name, start_us, end_us, annotation=False):
        return FunctionEvent(0, name, 0, start_us, end_us, device_type=DeviceType.CUDA, is_user_annotation=annotation)

    events = [gpu_event("fastcifar.step", 0, 10_000, annotation=True),  # the step as drawn on the GPU timeline
              gpu_event("sm90_xmma_fprop_implicit_gemm_bf16", 1_000, 3_000),
              gpu_event("triton_poi_fused__native_batch_norm_legit_functional_relu_0", 6_000, 7_000)]
    families = profile._gpu_split(events)["families"]
    assert families == {"convolution forward": 2.0, "batch norm": 1.0, profile.IDLE: 3.0}


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=[
    pytest.mark.dali, pytest.mark.skipif(not dali_available(), reason="DALI not installed")])])
def test_profile_writes_trace_json_and_a_table_that_adds_up(tmp_path, capsys, loader):
    out = tmp_path / "prof"
    code = cli.main(["profile", "--synthetic", "--device", "cpu", "--batch-size", "32", "--subset", "64",
                     "--steps", "3", "--warmup", "1", "--loader", loader, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["profile.json", "trace.json.gz"]
    with gzip.open(out / "trace.json.gz", "rt") as f:
        assert any(e.get("name") == profile.STEP_LABEL for e in json.load(f)["traceEvents"])
    result = json.loads((out / "profile.json").read_text())
    families = result["families_ms_per_step"]
    # self times, so nothing is counted twice: the families add up to the step time measured apart
    assert result["coverage"] == pytest.approx(1.0, abs=0.05)
    assert families["convolution forward"] > 0 and families["convolution backward"] > 0
    assert {"batch norm", "loss", "optimizer", "augmentation/loader"} <= set(families)
    assert result["settings"]["loader"] == loader
    assert len(result["step_ms_samples"]) == 3 and len(result["top_kernels"]) == 15
    assert result["images_per_sec"] == pytest.approx(32 * 3 / (sum(result["step_ms_samples"]) / 1000))
    assert 0 < result["conv_tflops"] and result["peak_tflops_measured"] > 0
    for line in ("family", "convolution backward", "sum (vs measured step)", "top ops / kernels", "TFLOP/s"):
        assert line in printed


def test_profile_json_names_its_data_by_file_name_and_checksum(tmp_path, arrays, capsys):
    # profile.json is shared like a bench result: no folder of the machine that made it
    archive = write_official_archive(tmp_path / "cifar.tar.gz", arrays)
    out = tmp_path / "prof"
    code = cli.main(["profile", "--source", str(archive), "--data-root", str(tmp_path / "data"), "--device", "cpu",
                     "--batch-size", "10", "--steps", "1", "--warmup", "1", "--amp", "off", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    env = json.loads((out / "profile.json").read_text())["environment"]
    assert env["data_source"] == "cifar.tar.gz"
    assert env["data_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert str(tmp_path) not in (out / "profile.json").read_text()


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps and --warmup must be at least 1"),
    (["--batch-size", "128"], "--batch-size 128 is more than the 64 training images"),
])
def test_profile_bad_flags_are_one_line_errors(tmp_path, capsys, args, message):
    code = cli.main(["profile", "--synthetic", "--device", "cpu", "--subset", "64", "--out", str(tmp_path / "p"),
                     *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()

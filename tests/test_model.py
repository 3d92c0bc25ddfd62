import pytest
import torch
import torch.nn.functional as F

from fastcifar.config import TrainConfig
from fastcifar.model import ResNet18, count_parameters, multiply_adds, zero_init_residual
from fastcifar.runtime import make_model

# (module, output shape at 1x3x32x32, parameters) from the reference torchinfo table.
TABLE = [
    ("conv1", (64, 32, 32), 1_728), ("bn1", (64, 32, 32), 128),
    ("layer1.0.conv1", (64, 32, 32), 36_864), ("layer1.0.bn1", (64, 32, 32), 128),
    ("layer1.1.conv2", (64, 32, 32), 36_864), ("layer1", (64, 32, 32), 4 * 36_864 + 4 * 128),
    ("layer2.0.conv1", (128, 16, 16), 73_728), ("layer2.0.conv2", (128, 16, 16), 147_456),
    ("layer2.0.shortcut", (128, 16, 16), 8_448), ("layer2.1.conv1", (128, 16, 16), 147_456),
    ("layer3.0.conv1", (256, 8, 8), 294_912), ("layer3.0.conv2", (256, 8, 8), 589_824),
    ("layer3.0.shortcut", (256, 8, 8), 33_280),
    ("layer4.0.conv1", (512, 8, 8), 1_179_648), ("layer4.0.conv2", (512, 8, 8), 2_359_296),
    ("layer4.0.shortcut", (512, 8, 8), 132_096), ("layer4.1.conv2", (512, 8, 8), 2_359_296),
    ("layer4", (512, 8, 8), None), ("linear", (10,), 5_130),
]


def test_layer_table_matches_reference():
    model = ResNet18().eval()
    shapes = {}
    for name, module in model.named_modules():
        if name in {row[0] for row in TABLE}:
            module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    model(torch.zeros(1, 3, 32, 32))
    modules = dict(model.named_modules())
    for name, shape, params in TABLE:
        assert shapes[name] == shape, name
        if params is not None:
            assert count_parameters(modules[name]) == params, name


def test_totals():
    model = ResNet18()
    assert count_parameters(model) == 11_173_962
    assert multiply_adds(model) == 958_075_904  # convs + linear; torchinfo adds BN: 958.09 M
    assert model.training  # counting does not leave the model in eval mode


def test_channels_last_gives_the_same_output_as_the_default_layout():
    torch.manual_seed(0)
    model = ResNet18().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)  # NCHW, contiguous
    model = model.to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()  # the layout did change
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compiles on the CPU
def test_compiled_matches_eager_on_cpu():
    torch.manual_seed(0)
    model = ResNet18().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    torch.manual_seed(0)
    model = ResNet18()
    zero_init_residual(model)
    assert count_parameters(model) == 11_173_962
    last_scales = [p for name, p in model.named_parameters() if name.endswith("bn2.weight")]
    assert len(last_scales) == 8 and all(torch.equal(p, torch.zeros_like(p)) for p in last_scales)
    assert torch.equal(model.layer1[0].bn1.weight, torch.ones(64))  # the other BNs keep scale 1
    x = torch.rand(2, 64, 8, 8)  # non-negative, as after a ReLU: an identity shortcut passes it unchanged
    torch.testing.assert_close(model.layer1[1](x), x)
    # the branch is not dead: the loss reaches the zeroed scales, so the first step moves them
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    assert all(p.grad.abs().sum() > 0 for p in last_scales)


@pytest.mark.parametrize("zero", [False, True])
def test_make_model_zero_inits_the_residuals_only_when_asked(zero):
    model = make_model(10, TrainConfig(zero_init_residual=zero), torch.device("cpu"))
    assert torch.equal(model.layer4[1].bn2.weight, torch.full((512,), 0.0 if zero else 1.0))

"""The speed records' levers on the same model: Muon, lookahead, BatchNorm momentum and bias LR,
a whitened (and frozen) stem. Loop tests run on a small network with ResNet18's stem shape."""

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import without_timing

from fastcifar import checkpoints, cli, runs, runtime, train
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.loaders import normalize
from fastcifar.lookahead import BASE, Lookahead
from fastcifar.model import ResNet18, count_parameters
from fastcifar.muon import MuonSGD, orthogonalize
from fastcifar.whitening import EPS, patch_covariance, whiten_stem, whitening_filters

TINY = TrainConfig(synthetic=True, device="cpu", loader="torch", subset=64, test_subset=32, batch_size=16,
                   epochs=3, report=False, deterministic=True, amp="off")


class StemNet(torch.nn.Module):
    """ResNet18's stem (3 -> 64, 3x3, no bias, BN), one more conv and a head: seconds, not minutes."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        self.conv2 = torch.nn.Conv2d(64, 8, 3, stride=4, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.linear = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.linear(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def run_tiny(config, out, **kwargs):
    return train.train(config.replace(out=str(out)), log=lambda *_: None, network=StemNet, **kwargs)


def stop_after(steps: int):
    asked = itertools.count(1)
    return lambda: next(asked) >= steps


def assert_resumes_to_the_uninterrupted_run(config, tmp_path) -> dict:
    """Cut after step 6 (epoch 2 of 3, step 2), resume: the metrics equal the straight run's; returns its state."""
    straight = run_tiny(config, tmp_path / "straight")
    with pytest.raises(train.Interrupted):
        run_tiny(config, tmp_path / "cut", stop=stop_after(6))
    run_tiny(config, tmp_path / "cut", resume=tmp_path / "cut")
    assert without_timing(runs.read_metrics(tmp_path / "cut" / "metrics.jsonl")) == \
        without_timing(runs.read_metrics(straight / "metrics.jsonl"))
    return checkpoints.load_checkpoint(straight)


# --- Muon ---------------------------------------------------------------------------------------


def test_orthogonalize_pushes_the_singular_values_to_one_and_keeps_the_singular_vectors():
    torch.manual_seed(0)
    # a filter bank whose singular values spread over two orders of magnitude (5 steps lift
    # values down to about 1/100 of the largest into the band; much smaller ones stay below it)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(288, 64))
    matrix = u @ torch.diag(torch.logspace(0, -2, 64)) @ v.T
    out = orthogonalize(matrix.reshape(64, 32, 3, 3)).reshape(64, 288)
    values = torch.linalg.svdvals(out)
    assert values.min() > 0.5 and values.max() < 1.5
    rotated = u.T @ out @ v  # in the input's singular basis the output is diagonal
    assert (rotated - torch.diag(rotated.diag())).abs().max() < 1e-3
    tall = orthogonalize(matrix.T)  # more rows than columns: the same on the transpose
    assert torch.allclose(tall, orthogonalize(matrix).T, atol=1e-5)


def test_a_muon_step_equals_torchs_muon_on_the_flattened_filters():
    torch.manual_seed(0)
    filters = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    flat = torch.nn.Parameter(filters.detach().reshape(16, -1).clone())
    ours = MuonSGD([{"params": [filters], "muon": True}], lr=0.05, momentum=0.9, nesterov=True, muon_momentum=0.6)
    theirs = torch.optim.Muon([flat], lr=0.05, momentum=0.6, nesterov=True, weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn(16, 8, 3, 3)
        filters.grad, flat.grad = grad.clone(), grad.reshape(16, -1).clone()
        ours.step()
        theirs.step()
    # torch.optim.Muon iterates in bf16, this CPU path in fp32: equal within bf16's rounding
    torch.testing.assert_close(filters.detach().reshape(16, -1), flat.detach(), atol=2e-3, rtol=2e-3)
    assert ours.state[filters]["momentum_buffer"].shape == filters.shape


def test_the_sgd_groups_step_as_torchs_sgd():
    torch.manual_seed(0)
    ours_params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5))]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    settings = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ours, theirs = MuonSGD(ours_params, **settings), torch.optim.SGD(torch_params, **settings)
    for _ in range(4):
        for a, b in zip(ours_params, torch_params, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_params, torch_params, strict=True):
        assert torch.equal(a, b)


def test_muon_takes_every_conv_filter_but_the_stem_and_leaves_the_model_as_it_is():
    model = ResNet18(10)
    groups = runtime.param_groups(model, TINY.replace(optimizer="muon", muon_lr=0.03))
    muon = [g for g in groups if g.get("muon")]
    assert len(muon) == 1 and muon[0]["lr"] == 0.03 and muon[0]["weight_decay"] == 0.0
    filters = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {id(p) for p in muon[0]["params"]} == {id(p) for p in filters[1:]}  # conv1 stays with SGD
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert count_parameters(model) == 11_173_962
    optimizer = runtime.make_optimizer(model, TINY.replace(optimizer="muon"), torch.device("cpu"))
    assert isinstance(optimizer, MuonSGD)


def test_a_muon_run_resumes_to_the_uninterrupted_run(tmp_path):
    state = assert_resumes_to_the_uninterrupted_run(TINY.replace(optimizer="muon"), tmp_path)
    assert any(g.get("muon") for g in state["optimizer_state"]["param_groups"])


def test_a_runs_env_json_names_what_muons_iterations_computed_in(tmp_path):
    muon_run, sgd_run = (run_tiny(TINY.replace(epochs=1, optimizer=o), tmp_path / o) for o in ("muon", "sgd"))
    assert json.loads((muon_run / "env.json").read_text())["muon_iterations"] == "torch.float32"  # a CPU
    assert json.loads((sgd_run / "env.json").read_text())["muon_iterations"] is None


# --- Lookahead ----------------------------------------------------------------------------------


def test_lookaheads_decay_rises_to_its_end_and_the_run_ends_on_the_slow_copy():
    model = torch.nn.Linear(3, 2)
    lookahead = Lookahead(model, every=5, total_steps=100)
    assert lookahead.decay(0) == 0 and lookahead.decay(50) == pytest.approx(BASE**5 / 8)
    assert lookahead.decay(99) < BASE**5 < lookahead.decay(100) == 1.0
    slow = [t.clone() for t in lookahead.slow]
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(3)  # not a multiple of 5: nothing moves
    assert torch.equal(lookahead.slow[0], slow[0]) and not torch.equal(model.weight, slow[0])
    lookahead.after_step(50)  # the slow copy moves (1 - decay) of the way; the weights take its value
    decay = lookahead.decay(50)
    assert torch.allclose(lookahead.slow[0], slow[0] + (1 - decay) * 1.0)
    assert torch.equal(model.weight, lookahead.slow[0])
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(100)
    assert torch.equal(model.weight, lookahead.slow[0])  # the last step: back to the slow copy, unmoved


def test_a_lookahead_run_changes_the_training_and_resumes_to_the_uninterrupted_run(tmp_path):
    state = assert_resumes_to_the_uninterrupted_run(TINY.replace(lookahead=2), tmp_path)
    plain = runs.read_metrics(run_tiny(TINY, tmp_path / "plain") / "metrics.jsonl")
    ahead = runs.read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [m["train_loss"] for m in ahead] != [m["train_loss"] for m in plain]
    model = StemNet(10)
    model.load_state_dict(state["model_state"])
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert all(torch.equal(a, b) for a, b in zip(floats, state["lookahead_state"], strict=True))


# --- BatchNorm ----------------------------------------------------------------------------------


def test_bn_momentum_weighs_each_batchs_statistics():
    config = TINY.replace(bn_momentum=0.4)
    model = runtime.make_model(10, config, torch.device("cpu"), StemNet)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [m.momentum for m in norms] == [0.4, 0.4]
    images = torch.randn(8, 3, 32, 32)
    model.train()(images)
    batch_mean = model.conv1(images).mean((0, 2, 3))
    assert torch.allclose(norms[0].running_mean, 0.4 * batch_mean.detach(), atol=1e-6)  # from 0: 0.6 * 0 + 0.4 * mean


def test_bn_biases_train_at_their_multiple_of_the_lr_all_through_the_schedule():
    model = StemNet(10)
    config = TINY.replace(bn_bias_lr_mult=64.0, decay_bn_and_bias=False)
    optimizer = runtime.make_optimizer(model, config, torch.device("cpu"))
    scheduler = runtime.make_scheduler(optimizer, config, batches_per_epoch=4)
    biases = {id(model.bn1.bias), id(model.bn2.bias)}
    (bias_group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} == biases]
    weights = optimizer.param_groups[0]
    assert bias_group["weight_decay"] == 0.0 and id(model.conv1.weight) in {id(p) for p in weights["params"]}
    for _ in range(12):
        assert bias_group["lr"] == pytest.approx(64 * weights["lr"])
        optimizer.step()
        scheduler.step()


# --- Whitened stem ------------------------------------------------------------------------------


def correlated_images(count: int, seed: int) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images whose neighbouring pixels and channels are correlated, as photos' are."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(count, 36, 36, 1)) + 0.5 * rng.normal(size=(count, 36, 36, 3))
    smooth = sum(base[:, i:i + 32, j:j + 32] for i in range(5) for j in range(5)) / 5
    return np.clip(128 + 40 * smooth, 0, 255).astype(np.uint8)


def test_the_whitened_stems_outputs_are_uncorrelated_with_unit_variance_on_held_out_patches():
    conv = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    default = conv.weight.detach().clone()
    whiten_stem(conv, correlated_images(500, seed=0))
    assert torch.equal(conv.weight[54:], default[54:])  # 54 = 2 x 27 filters; the other 10 keep their init
    assert torch.equal(conv.weight[27:54], -conv.weight[:27])
    held_out = normalize(torch.from_numpy(correlated_images(500, seed=1))).float()
    outputs = torch.nn.functional.conv2d(held_out, conv.weight[:27].detach())  # no padding: whole patches
    covariance = patch_covariance(outputs, size=1)
    assert (covariance - torch.diag(covariance.diag())).abs().max() < 0.05
    # unit variance, but for directions whose variance is near eps: l / (l + eps) of it is left
    eigenvalues = torch.linalg.eigvalsh(patch_covariance(normalize(torch.from_numpy(correlated_images(500, 0)))))
    assert torch.allclose(covariance.diag(), eigenvalues / (eigenvalues + EPS), atol=0.05)
    assert (eigenvalues > 100 * EPS).sum() >= 10  # so that most of them are held to unit variance
    raw = patch_covariance(held_out)  # the pixels themselves are far from that
    assert (raw - torch.diag(raw.diag())).abs().max() > 0.3


def test_whitening_filters_invert_the_covariance():
    torch.manual_seed(0)
    a = torch.randn(27, 27, dtype=torch.float64)
    covariance = a @ a.T + torch.eye(27, dtype=torch.float64)
    filters = whitening_filters(covariance, eps=0.0).double().reshape(54, 27)
    assert torch.allclose(filters[:27].T @ filters[:27], torch.linalg.inv(covariance), atol=1e-4)


def test_a_frozen_stem_stays_as_whitened_then_trains_and_a_resumed_run_keeps_it(tmp_path):
    config = TINY.replace(whiten_stem=True, freeze_stem_epochs=2, checkpoint_every=1)
    seen = {}

    def stem_after_each_epoch(real=train.train_epoch):
        def spy(run, epoch, *args, **kwargs):
            stats = real(run, epoch, *args, **kwargs)
            seen.setdefault(run.config.out, []).append(run.model.conv1.weight.detach().clone())
            return stats
        return spy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_epoch", stem_after_each_epoch())
        run_dir = run_tiny(config, tmp_path / "run")
    after = seen[str(run_dir)]
    dataset = runtime.load_dataset(config)
    whitened = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    whiten_stem(whitened, dataset.train_images)
    assert torch.equal(after[0][:54], whitened.weight[:54].detach())  # as whitened, through epochs 1 and 2
    assert torch.equal(after[1], after[0])
    assert not torch.equal(after[2], after[1])  # epoch 3 trains it
    assert_resumes_to_the_uninterrupted_run(config, tmp_path)


def test_bad_lever_values_are_one_line_errors(capsys):
    for flags, message in [(["--optimizer", "adam"], "invalid choice"),
                           (["--bn-momentum", "0"], "--bn-momentum must be in (0, 1]"),
                           (["--lookahead", "-1"], "--lookahead must be 0"),
                           (["--freeze-stem-epochs", "1"], "add --whiten-stem"),
                           (["--whiten-stem", "--freeze-stem-epochs", "20"], "fewer than --epochs (20)"),
                           (["--bn-bias-lr-mult", "0"], "--bn-bias-lr-mult must be a positive number")]:
        try:
            code = cli.main(["train", "--synthetic", "--device", "cpu", *flags])
        except SystemExit as exit:  # argparse's own refusal of a choice
            code = exit.code
        err = capsys.readouterr().err
        assert code == 2 and message in err, (flags, err)
    with pytest.raises(UserError, match="--muon-lr"):
        TINY.replace(muon_lr=0.0)

"""Untrained models give logits of order one (issue 20, item 4).

A fresh network whose residual branches each add their own variance (RefineNet's RCUs and
chained pooling, ResNet-101's 33 bottlenecks) used to start from logits of ~1e6 in training mode
and ~1e8 in eval mode, where BatchNorm's initial statistics (mean 0, variance 1) do not
normalise: a first-epoch loss in the thousands. Every registered model, width-reduced, must
start with logits whose spread is at most 100 in both modes (classifiers initialised to zero
or near zero on purpose, as FCN's and DeepLab's papers do, give less).
"""
import numpy as np
import pytest

import minidl
from seg import models
from seg.models.backbones import Bottleneck, ResNet
from seg.models.refinenet import ChainedResidualPooling, ResidualConvUnit

TINY = 1 / 16
SIZES = {"deconvnet": (224, 224)}       # DeconvNet's fc6 needs a 7x7 pool5


def _model_and_input(name, device):
    minidl.manual_seed(0)
    if name == "unet":
        model = models.build(name, 2, in_channels=1)
        size = model.valid_input_size(64, 64)
    else:
        model = models.build(name, 2, in_channels=1, width=TINY)
        size = SIZES.get(name, (64, 64))
    x = np.random.default_rng(0).standard_normal((2, 1) + tuple(size)).astype(np.float32)
    return model.to(device), minidl.tensor(x).to(device)


@pytest.mark.parametrize("name", models.available())
def test_initial_logits_are_of_order_one(name, device):
    model, x = _model_and_input(name, device)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with minidl.no_grad():
            logits = minidl.backend.to_numpy(model(x).data)
        assert np.isfinite(logits).all(), (name, mode)
        assert logits.std() <= 100, f"{name} in {mode} mode starts with logits of spread {logits.std():.3g}"


def test_residual_branches_start_at_zero():
    resnet = ResNet(layers=(1, 1, 1, 1), width=TINY)
    blocks = [m for m in resnet.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(not b.bn3.weight.data.any() for b in blocks)
    assert all(b.bn1.weight.data.all() for b in blocks)          # only the branch's last BN
    net = models.build("refinenet", 2, width=TINY)
    rcus = [m for m in net.modules() if isinstance(m, ResidualConvUnit)]
    crps = [m for m in net.modules() if isinstance(m, ChainedResidualPooling)]
    assert len(rcus) == 20 and len(crps) == 4
    assert all(not r.conv2.weight.data.any() and r.conv1.weight.data.any() for r in rcus)
    assert all(not c.weight.data.any() for crp in crps for c in crp.convs)


def test_a_zero_branch_still_learns():
    """The zeroed convs get gradients: the first step moves them off zero."""
    minidl.manual_seed(0)
    rcu = ResidualConvUnit(3)
    from seg.models.refinenet import fixup_init_
    fixup_init_(rcu)
    x = minidl.tensor(np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32))
    (rcu(x) ** 2).sum().backward()
    assert np.abs(rcu.conv2.weight.grad).max() > 0

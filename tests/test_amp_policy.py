"""autocast's float32 rule for the normalisations, BCE and the 2-norm: fed a float16 activation,
they compute in float32 (PyTorch keeps layer/group norm, the losses and norm in float32), equal
to the same op on the activation cast up outside autocast."""
import numpy as np
import pytest

import minidl
from minidl import amp, functional as F, nn
from conftest import to_numpy

TARGET = (np.random.default_rng(1).random((2, 4, 6, 6)) < 0.5).astype(np.float32)

# name -> op(a, device); a is a float16 activation (for BCE, float16 probabilities).
OPS = {
    # SyncBatchNorm on a float16 array failed in the CPU kernel (Numba has no float16).
    "sync_batch_norm": lambda a, device: nn.SyncBatchNorm(4).to(device)(a),
    "instance_norm": lambda a, device: nn.InstanceNorm2d(4).to(device)(a),  # was float16 stats
    "layer_norm": lambda a, device: F.layer_norm(a, (4, 6, 6)),
    "binary_cross_entropy": lambda a, device: F.binary_cross_entropy(
        a, minidl.tensor(TARGET, device=device)),
    "norm": lambda a, device: a.norm(),                          # was a float16 sum of squares
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_float32_rule_on_float16_input(device, name):
    op = OPS[name]
    minidl.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).to(device)
    x = minidl.randn(2, 4, 6, 6, device=device)
    with amp.autocast(device, dtype="float16"):
        a = conv(x)
        if name == "binary_cross_entropy":
            a = F.sigmoid(a)                       # unlisted: stays float16
        out = op(a, device)
    assert a.dtype == np.float16 and out.dtype == np.float32
    want = op(a.detach().float(), device)      # the reference: float32, no autocast
    np.testing.assert_allclose(to_numpy(out.data), to_numpy(want.data), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert conv.weight.grad.dtype == np.float32 and np.isfinite(to_numpy(conv.weight.grad)).all()

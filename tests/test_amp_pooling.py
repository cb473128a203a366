"""Max pooling of float16 arrays (what a conv under float16 autocast hands on): pooled in
float32 by the kernels, returned as float16, exactly; and a U-Net's forward and backward under
float16 autocast on each device."""
import numpy as np

import minidl
import seg.models
from minidl import amp, functional as F

from conftest import to_numpy


def test_max_pool2d_of_float16_is_exact_and_stays_float16(device):
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 7)).astype(np.float16)
    t16 = minidl.tensor(x, device=device, requires_grad=True)
    t32 = minidl.tensor(x.astype(np.float32), device=device, requires_grad=True)
    y16, y32 = F.max_pool2d(t16, 2), F.max_pool2d(t32, 2)
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(to_numpy(y16.data).astype(np.float32), to_numpy(y32.data))
    gy = np.random.default_rng(1).standard_normal(y16.shape).astype(np.float16)
    y16.backward(minidl.tensor(gy, device=device))
    y32.backward(minidl.tensor(gy.astype(np.float32), device=device))
    assert t16.grad.dtype == np.float16
    np.testing.assert_array_equal(to_numpy(t16.grad).astype(np.float32), to_numpy(t32.grad))


def test_unet_trains_a_step_under_float16_autocast(device):
    minidl.manual_seed(0)
    model = seg.models.build("unet", 2, 1, depth=2, features_root=4, padding="same").to(device)
    x = minidl.randn(1, 1, 16, 16, device=device)
    target = minidl.randint(0, 2, (1, 16, 16), device=device)
    with amp.autocast(device, dtype="float16"):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    assert loss.dtype == np.float32 and np.isfinite(float(loss.item()))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == np.float32 for g in grads)
    assert all(np.isfinite(to_numpy(g)).all() for g in grads)

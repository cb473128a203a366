"""The graph walk itself: shared sub-expressions, reuse, no_grad, freed graphs, long chains."""

import numpy as np
import pytest

import minidl
from minidl import functional as F
from conftest import assert_close


def leaf(values, device="cpu", dtype="float64"):
    return minidl.tensor(np.asarray(values, dtype=dtype), requires_grad=True, device=device)


def test_diamond_graph_sums_both_paths(device):
    # y = (2x) * (3x) = 6x^2: the gradient 12x arrives through two branches that meet again.
    x = leaf([1.0, -2.0, 0.5], device)
    a, b = x * 2.0, x * 3.0
    y = (a * b).sum()
    y.backward()
    assert_close(x.grad, 12 * x.numpy())


def test_diamond_with_shared_intermediate_runs_its_backward_once():
    # h is used by two consumers; its own backward must run once with the summed gradient.
    calls = []

    class Tracked(minidl.Function):
        def forward(self, x):
            return x * 1.0

        def backward(self, gy):
            calls.append(gy.copy())
            return gy

    x = leaf([1.0, 2.0])
    h = Tracked.apply(x)
    y = (h * h + h.exp()).sum()
    y.backward()
    assert len(calls) == 1
    assert_close(x.grad, 2 * x.numpy() + np.exp(x.numpy()))


def test_reused_tensor_accumulates():
    x = leaf([1.5, -0.5])
    (x * x * x + x).sum().backward()
    assert_close(x.grad, 3 * x.numpy() ** 2 + 1)


def test_backward_twice_accumulates_with_retain_graph():
    x = leaf([1.0, 3.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert_close(x.grad, 2 * (2 * x.numpy()))


def test_double_backward_on_freed_graph_raises_clear_error():
    x = leaf([1.0, 2.0])
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        y.backward()


def test_freed_graph_drops_saved_arrays():
    x = leaf(np.ones(1000))
    y = x.exp()
    node = y._node
    assert hasattr(node, "y")
    y.sum().backward()
    assert node.freed and not hasattr(node, "y")


def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    with minidl.no_grad():
        y = x * 2.0 + 1.0
        with minidl.enable_grad():
            z = x * 3.0
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad
    assert minidl.is_grad_enabled()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_backward_on_tensor_without_grad_raises():
    x = minidl.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match="does not require grad"):
        (x * 2.0).sum().backward()


def test_non_scalar_backward_needs_a_gradient():
    x = leaf([1.0, 2.0])
    y = x * 2.0
    with pytest.raises(RuntimeError, match="one-element tensor"):
        y.backward()
    with pytest.raises(ValueError, match="gradient of shape"):
        y.backward(np.ones(3))
    y.backward(np.array([1.0, 10.0]))
    assert_close(x.grad, [2.0, 20.0])


def test_chain_of_ten_thousand_ops_no_recursion_limit():
    x = leaf([1.0])
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    assert_close(x.grad, [1.0001 ** 10_000], rtol=1e-9)


def test_broadcasting_gradients_sum_to_input_shapes(device):
    a = leaf(np.arange(3.0).reshape(3, 1), device)
    b = leaf(np.arange(4.0).reshape(1, 4) + 1, device)
    c = leaf(2.0, device)
    ((a * b + c) / b).sum().backward()
    # d/da sum(a + c/b) over the (3, 4) grid = 4 ones per row; d/dc = sum(1/b) per row * 3
    assert a.grad.shape == (3, 1) and b.grad.shape == (1, 4) and c.grad.shape == ()
    assert_close(a.grad, np.full((3, 1), 4.0))
    assert_close(c.grad, 3 * (1 / (np.arange(4.0) + 1)).sum())
    assert_close(b.grad, (-3 * 2.0 / (np.arange(4.0) + 1) ** 2).reshape(1, 4))


def test_detach_and_constants_stop_gradients():
    x = leaf([1.0, 2.0])
    w = leaf([3.0, 4.0])
    (x.detach() * w + x * np.array([5.0, 6.0])).sum().backward()
    assert_close(w.grad, [1.0, 2.0])
    assert_close(x.grad, [5.0, 6.0])


def test_gradient_of_an_unused_branch_is_untouched():
    x, unused = leaf([1.0]), leaf([2.0])
    _ = unused * 3.0
    (x * 2.0).sum().backward()
    assert unused.grad is None


def test_float32_stays_float32():
    x = minidl.tensor([1.0, 2.0], requires_grad=True)
    y = (x * 2.0 + 1 - x / 3.0) ** 2
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_functional_binary_ops_accept_arrays_and_scalars():
    x = leaf([1.0, 2.0])
    assert_close(F.add(x, 1.0).data, [2.0, 3.0])
    assert_close(F.sub(1.0, x).data, [0.0, -1.0])
    assert_close(F.mul(np.array([2.0, 3.0]), x).data, [2.0, 6.0])
    assert_close(F.div(x, 2.0).data, [0.5, 1.0])
    assert_close(F.neg(x).data, [-1.0, -2.0])

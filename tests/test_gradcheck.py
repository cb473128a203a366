"""gradcheck itself: it passes correct backwards and catches wrong ones, in both modes."""
import numpy as np
import pytest

import minidl
from strategies import check_grad, values


class Square(minidl.Function):
    """x^2 with a backward that can be made wrong on purpose."""
    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, gy):
        return gy * (self.factor * self.x)


def square(x, factor=2.0):
    return Square.apply(x, factor=factor)


@pytest.mark.parametrize("mode", ["full", "random"])
def test_passes_a_correct_backward(mode):
    assert check_grad(lambda x: square(x) * 3.0, values(0, (4, 5)), mode=mode)


@pytest.mark.parametrize("mode", ["full", "random"])
def test_catches_a_wrong_backward_and_reports_the_worst_element(mode):
    with pytest.raises(AssertionError, match=rf"gradcheck failed \({mode} mode\): input 0 at "
                                            r".*analytic .* vs numeric"):
        check_grad(lambda x: square(x, factor=2.05), values(1, (3, 4)), mode=mode)


def test_catches_a_wrong_backward_in_the_second_input_only():
    a, b = values(2, (3,)), values(3, (3,))
    with pytest.raises(AssertionError, match="input 1 at position"):
        check_grad(lambda x, y: x * 2.0 + square(y, factor=1.9), a, b)


def test_auto_mode_uses_random_directions_for_large_inputs():
    with pytest.raises(AssertionError, match="random mode"):
        check_grad(lambda x: square(x, factor=2.1).sum(), values(4, (40, 40)))
    assert check_grad(lambda x: square(x).sum(), values(4, (40, 40)))


def test_return_false_instead_of_raising_and_leave_inputs_untouched():
    a = values(5, (2, 3))
    x = minidl.tensor(a.copy(), requires_grad=True)
    assert minidl.gradcheck(lambda t: square(t, 3.0), [x], raise_exception=False) is False
    assert np.array_equal(x.data, a) and x.grad is None


def test_rejects_float32_inputs_and_non_tensor_outputs():
    x32 = minidl.tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="float64"):
        minidl.gradcheck(lambda t: t * 2.0, [x32])
    x = minidl.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(TypeError, match="return a Tensor"):
        minidl.gradcheck(lambda t: t.data * 2, [x])
    with pytest.raises(ValueError, match="requires_grad=True"):
        minidl.gradcheck(lambda t: t * 2.0, [minidl.tensor(np.ones(3))])

"""conv2d / conv_transpose2d: values against a direct-loop oracle, the adjoint identity,
float64 gradient checks, torch's size arithmetic, chunking, errors; Conv layers, the
bilinear_/identity_ initialisers, receptive fields and the edge-detection example."""
import importlib.util
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from minidl import functional as F, nn
from minidl.ops import conv as conv_ops, conv_plan

from conftest import to_numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- oracle and helpers
def direct_conv2d(x, w, b, stride, padding, dilation, groups):
    """Convolution straight from the definition (no im2col): for every kernel tap, add the
    strided input slice times that tap's weights."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, wd = x.shape
    c_out, c_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, c_out, ho, wo))
    og = c_out // groups
    for g in range(groups):
        for o in range(og):
            for ci in range(c_g):
                for i in range(kh):
                    for j in range(kw):
                        patch = xp[:, g * c_g + ci, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                                   j * dw:j * dw + sw * (wo - 1) + 1:sw]
                        y[:, g * og + o] += w[g * og + o, ci, i, j] * patch
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def t(a, device, grad=False):
    return minidl.tensor(np.asarray(a), requires_grad=grad, device=device)


def check_grad(fn, arrays, device, mode="random"):
    """minidl.gradcheck on float64 tensors on `device`. The hypothesis-driven checks use
    random directions (a wrong Jacobian entry fails them with probability 1, at a fraction
    of the cost); a few fixed cases compare every Jacobian entry (mode="full")."""
    tensors = [t(np.asarray(a, dtype=np.float64), device, grad=True) for a in arrays]
    assert minidl.gradcheck(fn, tensors, mode=mode, n_directions=4)


@st.composite
def conv_case(draw, max_hw=7):
    groups = draw(st.integers(1, 2))
    c = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    lo_h, lo_w = max(1, (kh - 1) * dh + 1 - 2 * ph), max(1, (kw - 1) * dw + 1 - 2 * pw)
    h = draw(st.integers(lo_h, max(lo_h, max_hw)))
    w = draw(st.integers(lo_w, max(lo_w, max_hw)))
    return dict(n=draw(st.integers(1, 2)), c=c, c_out=c_out, h=h, w=w, k=(kh, kw),
                stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def arrays_for(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    w = rng.standard_normal((case["c_out"], case["c"] // case["groups"]) + case["k"])
    b = rng.standard_normal(case["c_out"]) if case["bias"] else None
    return x, w, b


def conv_kwargs(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"])


# ---------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("route", ["rows", "full", "plain"])
@given(case=conv_case())
def test_conv2d_matches_direct_loops(device, route, case):
    case = on_route(case, route)
    x, w, b = arrays_for(case)
    with columns_kept(True, route):
        y = F.conv2d(t(x, device), t(w, device), None if b is None else t(b, device),
                     **conv_kwargs(case))
    expected = direct_conv2d(x, w, b, case["stride"], case["padding"], case["dilation"],
                             case["groups"])
    assert y.shape == expected.shape
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-10, atol=1e-10)


def columns_kept(keep, route="full"):
    """keep=False: small layers rebuild their columns in backward like big ones do.
    route "rows": every conv with vertical stride 1 and kh > 1 takes the row route (see
    minidl/ops/conv_plan.py; on the CPU; the size rules that pick it are lifted), "full":
    none, "plain": conv.py's Im2col (the whole column matrix, no plan)."""
    algorithm = {"rows": "row", "full": "im2col", "plain": "plain"}[route]
    keep_bytes = conv_plan.settings.keep_columns_bytes if keep else 0
    return conv_plan.override(algorithm=algorithm, keep_columns_bytes=keep_bytes)


def on_route(case, route):
    """A case the row route applies to (vertical stride 1), when that route is asked for."""
    return dict(case, stride=(1, case["stride"][1])) if route == "rows" else case


COLUMNS = [(True, "rows"), (True, "full"), (False, "rows"), (False, "full"), (True, "plain")]
COLUMN_IDS = ["kept-rows", "kept-full", "rebuilt-rows", "rebuilt-full", "plain"]


@pytest.mark.parametrize("keep, route", COLUMNS, ids=COLUMN_IDS)
@given(case=conv_case(max_hw=5))
def test_conv2d_gradients(device, keep, route, case):
    case = on_route(case, route)
    x, w, b = arrays_for(case)
    kw = conv_kwargs(case)
    with columns_kept(keep, route):
        if b is None:
            check_grad(lambda x, w: F.conv2d(x, w, **kw), [x, w], device)
        else:
            check_grad(lambda x, w, b: F.conv2d(x, w, b, **kw), [x, w, b], device)


@given(case=conv_case(max_hw=5), c_in=st.integers(2, 3))
def test_stride1_input_gradient_as_a_convolution(device, case, c_in):
    """With stride 1 and fewer output than input channels the input gradient is a conv of gy
    with the flipped, channel-swapped kernel: it equals the col2im route exactly (to rounding)
    for every kernel, padding, dilation and grouping, and passes the gradient check."""
    g = case["groups"]
    case = dict(case, stride=(1, 1), c=g * c_in, c_out=g * (c_in - 1))
    x, w, _ = arrays_for(case)
    kw = conv_kwargs(case)
    geom = conv_ops.conv2d_geometry(x.shape, w.shape, **kw)
    taken = conv_plan._adjoint_geometry(geom, x.shape[2:])
    assert (taken is None) == any(p > d * (k - 1) for p, d, k in
                                  zip(case["padding"], case["dilation"], case["k"]))
    xp = minidl.backend.array_module(device)
    gy = xp.asarray(np.random.default_rng(case["seed"]).standard_normal(
        (case["n"], case["c_out"], geom.ho, geom.wo)))
    routes = []
    for input_grad in ("auto", "col2im"):
        with conv_plan.override(input_grad=input_grad):
            plan = conv_plan.plan(geom, x.shape, case["c_out"], device)
        assert (plan.adjoint is not None) == (input_grad == "auto" and device == "cpu"
                                              and taken is not None
                                              and plan.kind != "pointwise")
        routes.append(to_numpy(plan.input_grad(gy, xp.asarray(w), x.shape)))
    np.testing.assert_allclose(routes[0], routes[1], rtol=1e-10, atol=1e-10)
    check_grad(lambda x, w: F.conv2d(x, w, **kw), [x, w], device)


@pytest.mark.parametrize("keep", [True, False], ids=["columns-kept", "columns-rebuilt"])
@given(case=conv_case(max_hw=5))
def test_weight_gradient_in_either_layout(device, keep, case):
    """The weight gradient is summed transposed for narrow layers and in its own layout for
    wide ones (settings.transposed_max_out): both give the gradient-checked result."""
    x, w, _ = arrays_for(case)
    kw = conv_kwargs(case)
    grads = []
    for bound in (10 ** 9, 0):
        wt = t(w, device, True)
        with columns_kept(keep), conv_plan.override(transposed_max_out=bound):
            F.conv2d(t(x, device), wt, **kw).sum().backward()
        grads.append(to_numpy(wt.grad))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    with columns_kept(keep):
        check_grad(lambda w: F.conv2d(t(x, device), w, **kw), [w], device)


def test_conv2d_float32_default_and_bias_gradient_is_sum(device):
    rng = np.random.default_rng(0)
    x = t(rng.standard_normal((2, 3, 6, 5)).astype(np.float32), device, grad=True)
    w = t(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), device, grad=True)
    b = t(np.zeros(4, np.float32), device, grad=True)
    y = F.conv2d(x, w, b, padding=1)
    assert y.dtype == np.float32 and y.shape == (2, 4, 6, 5)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(gy)
    np.testing.assert_allclose(to_numpy(b.grad), gy.sum(axis=(0, 2, 3)), rtol=1e-5)
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


@given(case=conv_case(), op_extra=st.integers(0, 1))
def test_conv_transpose2d_is_the_adjoint_of_conv2d(device, case, op_extra):
    """<conv2d(x, w), y> == <x, conv_transpose2d(y, w)> with output_padding giving x's size."""
    x, w, _ = arrays_for(case)
    kw = conv_kwargs(case)
    rng = np.random.default_rng(case["seed"] + 1)
    y = rng.standard_normal(F.conv2d(x, w, **kw).shape)
    (sh, sw), (ph, pw), (dh, dwl) = case["stride"], case["padding"], case["dilation"]
    k = case["k"]
    # The rows the conv leaves over at the end come back through output_padding.
    op = ((case["h"] + 2 * ph - dh * (k[0] - 1) - 1) % sh,
          (case["w"] + 2 * pw - dwl * (k[1] - 1) - 1) % sw)
    z = F.conv_transpose2d(t(y, device), t(w, device), output_padding=op, **kw)
    assert z.shape == x.shape
    lhs = (to_numpy(F.conv2d(t(x, device), t(w, device), **kw).data) * y).sum()
    rhs = (x * to_numpy(z.data)).sum()
    assert abs(lhs - rhs) <= 1e-9 * (1 + abs(lhs))


@pytest.mark.parametrize("keep, route", COLUMNS, ids=COLUMN_IDS)
@given(case=conv_case(max_hw=4), op=st.tuples(st.integers(0, 2), st.integers(0, 2)))
def test_conv_transpose2d_gradients(device, keep, route, case, op):
    case = on_route(case, route)
    # Read as a transposed-conv weight, w (C_out, C/G, kh, kw) maps C_out channels to C.
    _, w, _ = arrays_for(case)
    rng = np.random.default_rng(case["seed"] + 2)
    x = rng.standard_normal((case["n"], case["c_out"], case["h"], case["w"]))
    b = rng.standard_normal(case["c"]) if case["bias"] else None
    op = tuple(min(o, max(s, d) - 1) for o, s, d in zip(op, case["stride"], case["dilation"]))
    kw = dict(conv_kwargs(case), output_padding=op)
    sizes = [conv_ops.conv_transpose_output_size(s, k, st_, p, o, d) for s, k, st_, p, o, d in
             zip(x.shape[2:], case["k"], case["stride"], case["padding"], op, case["dilation"])]
    if min(sizes) <= 0:
        with pytest.raises(ValueError, match="not positive"):
            F.conv_transpose2d(x, w, **kw)
        return
    with columns_kept(keep, route):
        if b is None:
            check_grad(lambda x, w: F.conv_transpose2d(x, w, **kw), [x, w], device)
        else:
            check_grad(lambda x, w, b: F.conv_transpose2d(x, w, b, **kw), [x, w, b], device)


@given(h=st.integers(1, 40), k=st.integers(1, 7), s=st.integers(1, 4), p=st.integers(0, 3),
       d=st.integers(1, 3), op=st.integers(0, 3))
def test_output_sizes_follow_torch_formulas(h, k, s, p, d, op):
    """torch.nn.Conv2d / ConvTranspose2d docs: H_out = floor((H + 2p - d(k-1) - 1)/s + 1) and
    H_out = (H - 1)s - 2p + d(k-1) + output_padding + 1."""
    x = np.zeros((1, 1, h, h + 1))
    w = np.zeros((1, 1, k, k))
    if h + 2 * p >= d * (k - 1) + 1:
        y = F.conv2d(x, w, stride=s, padding=p, dilation=d)
        expected = int(np.floor((h + 2 * p - d * (k - 1) - 1) / s + 1))
        assert y.shape[2] == expected
        assert y.shape[3] == int(np.floor((h + 1 + 2 * p - d * (k - 1) - 1) / s + 1))
    else:
        with pytest.raises(ValueError, match="larger than the padded input|more than the padded"):
            F.conv2d(x, w, stride=s, padding=p, dilation=d)
    expected_t = (h - 1) * s - 2 * p + d * (k - 1) + op + 1
    if op >= s and op >= d:
        with pytest.raises(ValueError, match="output_padding"):
            F.conv_transpose2d(x, w, stride=s, padding=p, output_padding=op, dilation=d)
    elif expected_t <= 0:
        with pytest.raises(ValueError, match="not positive"):
            F.conv_transpose2d(x, w, stride=s, padding=p, output_padding=op, dilation=d)
    else:
        z = F.conv_transpose2d(x, w, stride=s, padding=p, output_padding=op, dilation=d)
        assert z.shape[2] == expected_t


@pytest.mark.parametrize("k,d", [(3, 1), (4, 1), (2, 3), (3, 2), ((2, 3), (1, 2))])
def test_padding_same_and_valid(device, k, d):
    """'same' keeps H x W; an odd total padding puts the extra row/column at the end (torch)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 7, 6))
    kh, kw = (k, k) if isinstance(k, int) else k
    dh, dw = (d, d) if isinstance(d, int) else d
    w = rng.standard_normal((3, 2, kh, kw))
    y = F.conv2d(t(x, device), t(w, device), padding="same", dilation=d)
    assert y.shape == (1, 3, 7, 6)
    th, tw = dh * (kh - 1), dw * (kw - 1)
    padded = np.pad(x, ((0, 0), (0, 0), (th // 2, th - th // 2), (tw // 2, tw - tw // 2)))
    np.testing.assert_allclose(to_numpy(y.data), direct_conv2d(padded, w, None, (1, 1), (0, 0),
                                                               (dh, dw), 1), atol=1e-10)
    valid = F.conv2d(t(x, device), t(w, device), padding="valid", dilation=d)
    np.testing.assert_allclose(to_numpy(valid.data),
                               direct_conv2d(x, w, None, (1, 1), (0, 0), (dh, dw), 1), atol=1e-10)
    check_grad(lambda x, w: F.conv2d(x, w, padding="same", dilation=d), [x[:, :, :4, :3], w], device,
               mode="full")


@pytest.mark.parametrize("route, stride", [("full", (2, 1)), ("rows", (1, 2))])
def test_chunked_columns_give_the_same_results(device, route, stride):
    """A tiny column-buffer bound forces sample chunks and bands of output rows (on the row
    route the bands of row columns overlap by the kernel's extra rows)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 11, 9))
    w = rng.standard_normal((6, 2, 3, 2))
    gy = None
    results = []
    for bound in (conv_plan.settings.column_buffer_bytes, 4 * 4 * 3 * 2 * 9 * 8 * 3, 300):
        xt, wt = t(x, device, True), t(w, device, True)
        with columns_kept(False, route), conv_plan.override(column_buffer_bytes=bound):
            y = F.conv2d(xt, wt, stride=stride, padding=(2, 1), dilation=(2, 1), groups=2)
            gy = rng.standard_normal(y.shape) if gy is None else gy
            y.backward(t(gy, device))
            z = F.conv_transpose2d(t(gy, device), wt, stride=stride, padding=(2, 1),
                                   dilation=(2, 1), groups=2, output_padding=(0, 0))
        results.append([to_numpy(a) for a in (y.data, xt.grad, wt.grad, z.data)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(results[0][0], direct_conv2d(x, w, None, stride, (2, 1), (2, 1), 2),
                               atol=1e-10)


def test_row_route_is_taken_where_it_pays():
    """The size rules: small-channel layers on large maps take the row route; the first
    layer of one channel, small maps, wide layers and strided convs keep the full im2col."""
    def route(x_shape, w_shape, device="cpu", **kw):
        geom = conv_ops.conv2d_geometry(x_shape, w_shape, **kw)
        return conv_plan.plan(geom, x_shape, w_shape[0], device).kind == "row"
    assert route((4, 16, 64, 88), (8, 16, 3, 3), padding=1)
    assert route((1, 128, 256, 256), (64, 128, 3, 3), padding=1)
    assert not route((1, 1, 256, 256), (64, 1, 3, 3), padding=1)          # C = 1
    assert not route((4, 64, 8, 11), (64, 64, 3, 3), padding=1)           # 2 extra rows of 8
    assert not route((1, 512, 32, 32), (512, 512, 3, 3), padding=1)       # wide
    assert not route((4, 16, 64, 88), (8, 16, 3, 3), padding=1, stride=2)
    assert not route((4, 16, 64, 88), (8, 16, 1, 3), padding=(0, 1))      # kh = 1
    assert not route((4, 16, 64, 88), (8, 16, 3, 3), "gpu", padding=1)


def test_one_by_one_conv(device):
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((2, 4, 3, 5)), rng.standard_normal((6, 2, 1, 1)), rng.standard_normal(6)
    y = F.conv2d(t(x, device), t(w, device), t(b, device), groups=2)
    np.testing.assert_allclose(to_numpy(y.data), direct_conv2d(x, w, b, (1, 1), (0, 0), (1, 1), 2),
                               atol=1e-12)
    check_grad(lambda x, w, b: F.conv2d(x, w, b, groups=2), [x[:1, :, :2], w, b], device,
               mode="full")


@pytest.mark.parametrize("call,match", [
    (lambda: F.conv2d(np.zeros((1, 3, 5, 5)), np.zeros((2, 2, 3, 3))), "3 channels.*expects 2"),
    (lambda: F.conv2d(np.zeros((1, 4, 5, 5)), np.zeros((3, 2, 3, 3)), groups=2), "groups=2 must divide"),
    (lambda: F.conv2d(np.zeros((1, 3, 5, 5)), np.zeros((2, 1, 3, 3)), groups=3), "groups=3 must divide"),
    (lambda: F.conv2d(np.zeros((1, 1, 2, 5)), np.zeros((1, 1, 3, 3))), "more than the padded input 2x5"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), dilation=3), "spans 7x7"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), stride=0), r"stride must be positive, got \(0, 0\)"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), stride=(1, -1)), "stride must be positive"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), padding=-1), "non-negative"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), padding="same", stride=2), "'same' needs stride 1"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), padding="full"), "'same' or 'valid'"),
    (lambda: F.conv2d(np.zeros((1, 5, 5)), np.zeros((1, 1, 3, 3))), "must be 4-D"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((2, 1, 3, 3)), np.zeros(3)), r"bias must have shape \(2,\)"),
    (lambda: F.conv_transpose2d(np.zeros((1, 2, 3, 3)), np.zeros((2, 1, 3, 3)), stride=2,
                                output_padding=2), r"output_padding \(2, 2\) must be smaller than either the stride \(2, 2\) or the dilation \(1, 1\)"),
    (lambda: F.conv_transpose2d(np.zeros((1, 3, 3, 3)), np.zeros((2, 1, 3, 3))), "3 channels.*expects 2"),
    (lambda: F.conv_transpose2d(np.zeros((1, 3, 3, 3)), np.zeros((3, 1, 3, 3)), groups=2), "groups=2 must divide"),
    (lambda: F.conv_transpose2d(np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1)), padding=1), "not positive"),
])
def test_invalid_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------- layers
def test_conv_layers_shapes_names_and_default_init(device):
    minidl.manual_seed(0)
    conv = nn.Conv2d(4, 8, (3, 5), stride=2, padding=(1, 2), groups=2, device=device)
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    assert conv.weight.shape == (8, 2, 3, 5) and conv.bias.shape == (8,)
    bound = 1 / np.sqrt(2 * 3 * 5)                         # torch: U(+-1/sqrt(fan_in))
    wv = to_numpy(conv.weight.data)
    assert np.abs(wv).max() <= bound and np.abs(wv).max() > 0.8 * bound
    assert np.abs(to_numpy(conv.bias.data)).max() <= bound
    y = conv(minidl.randn(2, 4, 9, 10, device=device))
    assert y.shape == (2, 8, 5, 5) and y.dtype == np.float32

    up = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1, bias=False, device=device)
    assert up.weight.shape == (8, 3, 4, 4) and up.bias is None
    assert np.abs(to_numpy(up.weight.data)).max() <= 1 / np.sqrt(3 * 16)
    assert up(y).shape == (2, 3, 10, 10)
    odd = nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1, device=device)
    assert odd(y).shape == (2, 3, 9, 9)
    assert odd(y, output_size=(10, 10)).shape == (2, 3, 10, 10)
    with pytest.raises(ValueError, match="not reachable"):
        odd(y, output_size=(12, 10))
    same = nn.Conv2d(3, 3, 4, padding="same", device=device)
    assert same(minidl.randn(1, 3, 6, 7, device=device)).shape == (1, 3, 6, 7)


# ---------------------------------------------------------------------- initialisers
def test_bilinear_init_values_and_constant_upsampling(device):
    w = minidl.zeros(3, 3, 4, 4, device=device)
    nn.init.bilinear_(w)
    k = to_numpy(w.data)
    np.testing.assert_allclose(k[0, 0, 0], [0.0625, 0.1875, 0.1875, 0.0625])
    np.testing.assert_allclose(k[1, 1], np.outer([.25, .75, .75, .25], [.25, .75, .75, .25]))
    assert k[0, 1].sum() == 0 and k[2, 0].sum() == 0            # channel diagonal only
    for size, stride in ((4, 2), (16, 8), (64, 32), (3, 2)):
        kk = np.zeros((1, 1, size, size))
        nn.init.bilinear_(kk)
        if size == 2 * stride:
            assert kk.sum() == pytest.approx(stride ** 2)
    np.testing.assert_allclose(kk[0, 0, 1], [0.5, 1.0, 0.5])     # odd k = 3: centre f-1 = 1
    # Upsampling a constant map by 2 keeps it constant away from the border.
    y = F.conv_transpose2d(minidl.ones(1, 3, 5, 5, device=device), w, stride=2, padding=1)
    np.testing.assert_allclose(to_numpy(y.data)[:, :, 1:-1, 1:-1], 1.0, rtol=1e-6)


def test_identity_init_passes_input_through(device):
    x = minidl.randn(2, 3, 6, 6, device=device)
    conv = nn.Conv2d(3, 3, 3, padding=2, dilation=2, device=device)
    nn.init.identity_(conv.weight)
    nn.init.zeros_(conv.bias)
    np.testing.assert_allclose(to_numpy(conv(x).data), to_numpy(x.data), rtol=1e-5)   # cuBLAS may round differently
    wide = np.zeros((5, 2, 3, 3))
    nn.init.identity_(wide)
    assert wide[:, :, 1, 1].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1], [1, 0]]
    assert wide.sum() == 5


# ---------------------------------------------------------------------- receptive field
@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_dilated_stack_receptive_field(n_layers):
    """Yu & Koltun: 3x3 convs with dilations 1, 2, 4, ..., 2^i have a receptive field of
    2^(i+2) - 1 pixels (i + 1 layers), measured through identity-initialised layers."""
    layers = []
    for i in range(n_layers):
        conv = nn.Conv2d(2, 2, 3, padding=2 ** i, dilation=2 ** i)
        nn.init.identity_(conv.weight)          # must not hide the field
        layers += [conv, nn.ReLU()]
    i = n_layers - 1
    assert minidl.receptive_field(nn.Sequential(*layers), 2, size=64) == (2 ** (i + 2) - 1,) * 2


def test_receptive_field_of_the_context_module_and_pooling():
    """DilatedNet basic context module (dilations 1,1,2,4,8,16,1 then 1x1): 67 pixels."""
    layers = []
    for d in (1, 1, 2, 4, 8, 16, 1):
        layers += [nn.Conv2d(1, 1, 3, padding=d, dilation=d), nn.ReLU()]
    layers.append(nn.Conv2d(1, 1, 1))
    assert minidl.receptive_field(nn.Sequential(*layers), 1, size=96) == (67, 67)
    # conv3 -> pool2 -> conv3 sees 3 + 1 + 2 * 2 = 8 pixels; a 3x5 kernel is not square.
    net = nn.Sequential(nn.Conv2d(1, 2, (3, 5)), nn.MaxPool2d(2), nn.Conv2d(2, 1, 3))
    assert minidl.receptive_field(net, 1, size=32) == (8, 10)


# ---------------------------------------------------------------------- the talk's example
def _load_example():
    path = os.path.join(REPO, "examples", "edge_detection.py")
    spec = importlib.util.spec_from_file_location("edge_detection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_detection_example_numbers(tmp_path):
    example = _load_example()
    image, kernel, edges = example.vertical_edge_example()
    assert image.tolist() == [[10, 10, 10, 0, 0, 0]] * 6
    assert kernel.tolist() == [[1, 0, -1]] * 3
    assert edges.tolist() == [[0, 30, 30, 0]] * 4
    out = example.main(str(tmp_path / "edges.png"), size=64)
    assert os.path.getsize(out) > 1000


def test_geometry_is_cached_per_arguments_and_errors_are_not():
    """conv2d_geometry runs for every layer call: the same arguments give the same
    (read-only) Geometry object; unhashable arguments bypass the cache with equal results;
    bad arguments raise on every call."""
    from minidl.ops.conv import conv2d_geometry
    g1 = conv2d_geometry((2, 3, 9, 9), (4, 3, 3, 3), 2, (1, 0), 1, 1)
    assert conv2d_geometry((2, 3, 9, 9), (4, 3, 3, 3), 2, (1, 0), 1, 1) is g1
    g2 = conv2d_geometry((2, 3, 9, 9), (4, 3, 3, 3), [2, 2], [1, 0], 1, 1)
    assert g2 is not g1 and repr(g2) == repr(g1)
    for _ in range(2):
        with pytest.raises(ValueError, match="stride must be positive"):
            conv2d_geometry((2, 3, 9, 9), (4, 3, 3, 3), 0, 0, 1, 1)


def test_conv_settings_refuse_unknown_names_and_values_and_override_restores():
    """The route switches are named settings: a misspelt name or an unknown algorithm is
    refused with a sentence listing the choices; override() puts the old values back."""
    before = conv_plan.settings.algorithm, conv_plan.settings.column_buffer_bytes
    with pytest.raises(ValueError, match="algorithm must be one of .*'row'.*got 'rows'"):
        conv_plan.settings.algorithm = "rows"
    with pytest.raises(AttributeError, match="no attribute 'column_buffer'.*column_buffer_bytes"):
        with conv_plan.override(column_buffer=1):
            pass
    geom = conv_ops.conv2d_geometry((1, 16, 64, 64), (8, 16, 3, 3), padding=1)
    with conv_plan.override(algorithm="im2col", column_buffer_bytes=1024):
        assert conv_plan.plan(geom, (1, 16, 64, 64), 8, "cpu").kind == "im2col"
        assert conv_plan.plan(geom, (1, 16, 64, 64), 8, "cpu").budget == 1024
        with conv_plan.override(algorithm="plain"):
            assert conv_plan.plan(geom, (1, 16, 64, 64), 8, "cpu") is None
    assert (conv_plan.settings.algorithm, conv_plan.settings.column_buffer_bytes) == before
    assert conv_plan.plan(geom, (1, 16, 64, 64), 8, "cpu").kind == "row"

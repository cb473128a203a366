"""The implicit-GEMM route of the conv plan (minidl/ops/conv_implicit_gemm.py, conv_plan.plan).

1. The plan's four methods against conv.py's textbook Im2col (float64), in every precision,
   on the host emulation of the kernels (tests/gpu_emulation_blocks.py; no GPU, no CuPy
   needed), with the per-precision error bound of tests/test_implicit_gemm.py.
2. The adjoint identities <conv(x), gy> = <x, input_grad(gy)> = <W, weight_grad(x, gy)> of
   the float32 kernels, hypothesis-driven (finite differences need float64, which the
   kernels do not take: float64 goes to the im2col fallback, checked by gradcheck below).
3. The rule that picks the route (conv_plan._implicit_gemm_route, conv_precision).
4. F.conv2d / F.conv_transpose2d end to end on each device with
   minidl.backends.conv_algorithm = "implicit_gemm" and in each precision's setting: on "gpu"
   (CuPy, or `-p fake_cupy`) through the kernels, on "cpu" through the CPU's own plan.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minidl
import kernels.implicit_gemm as ig
from minidl import amp, functional as F
from minidl.ops import conv as conv_ops, conv_plan
from minidl.ops.conv_implicit_gemm import ImplicitGemmPlan
from minidl.ops.geometry import conv2d_geometry, conv_transpose2d_geometry

from conftest import to_numpy
from test_implicit_gemm import UNIT_ROUNDOFF

# (name, x shape, w shape, stride, padding, dilation, groups): small, the emulation is slow
CONVS = [
    ("3x3 same", (2, 3, 6, 5), (4, 3, 3, 3), 1, 1, 1, 1),
    ("1x1", (1, 5, 4, 4), (3, 5, 1, 1), 1, 0, 1, 1),
    ("3x3 stride 2 dilation 2", (1, 2, 9, 8), (3, 2, 3, 3), 2, 2, 2, 1),
    ("3x3 groups 2", (1, 4, 5, 5), (6, 2, 3, 3), 1, 1, 1, 2),
]


@pytest.fixture
def emulated(monkeypatch):
    """The kernels' wrappers running on the host emulation with NumPy arrays."""
    import gpu_emulation_blocks
    try:
        module = gpu_emulation_blocks.BlockModule(ig.cuda_source(includes=False))
    except RuntimeError as exc:          # no C++ compiler on this machine
        pytest.skip(str(exc))
    calls = []

    def run(name, grid, args):
        calls.append(name)
        module.launch(name, grid, ig.THREADS, args)
    monkeypatch.setattr(ig, "_xp", lambda: np)
    monkeypatch.setattr(ig, "_run_kernel", run)
    return calls


def _arrays(xs, ws, ys, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (xs, ws, ys))


def _layer(case):
    _, xs, ws, s, p, d, g = case
    geom = conv2d_geometry(xs, ws, s, p, d, g)
    return geom, xs, ws, (xs[0], ws[0], geom.ho, geom.wo)


def _assert_within(got, exact, bound, precision, r):
    """|got - exact| <= (2u + R 2^-24) (|A| @ |B|): operands rounded to u, float32 sums."""
    tol = (2 * UNIT_ROUNDOFF[precision] + r * 2.0 ** -24) * bound + 1e-30
    assert got.dtype == np.float32 and got.shape == exact.shape
    assert np.all(np.abs(got - exact) <= tol), float(np.max(np.abs(got - exact) - tol))


# ---------------------------------------------------------------------- 1. the plan's methods
@pytest.mark.parametrize("precision", ig.PRECISIONS)
@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
def test_plan_methods_match_im2col(case, precision, emulated):
    geom, xs, ws, ys = _layer(case)
    x, w, gy = _arrays(xs, ws, ys)
    route = ImplicitGemmPlan(geom, precision, conv_plan.ConvPlan(geom, xs, ws[0], "gpu"))
    exact = conv_ops.Im2col(geom)        # float64; of |x|, |w|: the error bound's scale
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    kh, kw, groups = ws[2], ws[3], geom.groups

    y, kept = route.forward(x, w, keep_columns=True)
    assert kept is None                       # no column matrix exists on this route
    _assert_within(y, exact.forward(x64, w64), exact.forward(abs(x64), abs(w64)), precision,
                   ws[1] * kh * kw)
    gx = route.input_grad(gy, w, xs)
    _assert_within(gx, exact.input_grad(gy64, w64, xs),
                   exact.input_grad(abs(gy64), abs(w64), xs), precision, ws[0] // groups * kh * kw)
    gw = route.weight_grad(x, gy, ws)
    _assert_within(gw, exact.weight_grad(x64, gy64, ws),
                   exact.weight_grad(abs(x64), abs(gy64), ws), precision, ys[0] * ys[2] * ys[3])
    both = route.backward(gy, w, x, None, xs, ws, True, True)
    np.testing.assert_array_equal(both[0], gx)
    np.testing.assert_array_equal(both[1], gw)
    assert route.backward(gy, w, x, None, xs, ws, False, True)[0] is None
    assert set(emulated) == {ig.kernel_name(k, precision) for k in ig.KINDS}


def test_float64_and_kept_columns_go_to_the_im2col_fallback(emulated):
    geom, xs, ws, ys = _layer(CONVS[0])
    x, w, gy = _arrays(xs, ws, ys, np.float64)
    fallback = conv_plan.ConvPlan(geom, xs, ws[0], "gpu")
    route = ImplicitGemmPlan(geom, "tf32", fallback)
    exact = conv_ops.Im2col(geom)
    y, cols = route.forward(x, w, keep_columns=True)
    np.testing.assert_allclose(y, exact.forward(x, w), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(route.input_grad(gy, w, xs), exact.input_grad(gy, w, xs),
                               rtol=1e-12, atol=1e-12)
    gx, gw = route.backward(gy, w, x, cols, xs, ws, True, True)
    np.testing.assert_allclose(gw, exact.weight_grad(x, gy, ws), rtol=1e-12, atol=1e-12)
    assert emulated == []                     # no kernel ran
    # float32 arrays, but columns that a fallback forward kept (a CPU plan keeps small ones;
    # a GPU plan never does): the fallback sums them
    keeper = ImplicitGemmPlan(geom, "tf32", conv_plan.ConvPlan(geom, xs, ws[0], "cpu"))
    x32, w32, gy32 = (a.astype(np.float32) for a in (x, w, gy))
    _, cols32 = keeper.fallback.forward(x32, w32, keep_columns=True)
    assert cols32 is not None
    np.testing.assert_allclose(keeper.weight_grad(None, gy32, ws, cols=cols32),
                               exact.weight_grad(x, gy, ws), rtol=1e-4, atol=1e-4)
    assert emulated == []


# ---------------------------------------------------------------------- 2. adjoints (float32)
@settings(max_examples=6)
@given(n=st.integers(1, 2), c=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 3),
       s=st.integers(1, 2), p=st.integers(0, 2), d=st.integers(1, 2), hw=st.integers(3, 7),
       seed=st.integers(0, 2 ** 16))
def test_kernels_through_the_plan_are_adjoint(emulated, n, c, cout, k, s, p, d, hw, seed):
    xs, ws = (n, c, hw, hw + 1), (cout, c, k, k)
    if (hw + 2 * p - d * (k - 1) - 1) < 0:
        return                                # no output pixel: nothing to compare
    geom = conv2d_geometry(xs, ws, s, p, d, 1)
    x, w, gy = _arrays(xs, ws, (n, cout, geom.ho, geom.wo), seed=seed)
    route = ImplicitGemmPlan(geom, "highest", conv_plan.ConvPlan(geom, xs, cout, "gpu"))
    y, gx, gw = route.forward(x, w), route.input_grad(gy, w, xs), route.weight_grad(x, gy, ws)
    inner = [float(np.vdot(a.astype(np.float64), b)) for a, b in ((y, gy), (x, gx), (w, gw))]
    scale = float(np.vdot(abs(y), abs(gy))) + 1e-30
    assert abs(inner[0] - inner[1]) <= 1e-5 * scale and abs(inner[0] - inner[2]) <= 1e-5 * scale


# ---------------------------------------------------------------------- 3. the rule
@pytest.fixture
def rule(monkeypatch):
    """plan() on device "gpu" with a stated tensor-core answer; returns (kind, precision)."""
    def decide(x_shape=(2, 8, 16, 16), c_out=8, kernel=3, tensor_cores=True):
        monkeypatch.setattr(conv_plan, "_tensor_cores", lambda: tensor_cores)
        conv_plan._plans.clear()          # plans are cached without the tensor-core answer
        geom = conv2d_geometry(x_shape, (c_out, x_shape[1], kernel, kernel), 1, kernel // 2, 1, 1)
        found = conv_plan.plan(geom, x_shape, c_out, "gpu")
        return found.kind, getattr(found, "precision", None)
    yield decide
    minidl.set_float32_matmul_precision("highest")
    conv_plan._plans.clear()


def test_auto_keeps_exact_float32_on_im2col_and_tensor_core_modes_on_the_kernels(rule):
    assert rule() == ("im2col", None)                       # "highest": im2col + cuBLAS
    assert rule(kernel=1) == ("pointwise", None)
    minidl.set_float32_matmul_precision("high")
    assert rule() == ("implicit_gemm", "tf32")
    assert rule(kernel=1) == ("pointwise", None)            # cuBLAS's own TF32 GEMM
    assert rule(tensor_cores=False) == ("im2col", None)     # before compute capability 8.0
    with amp.autocast("gpu", dtype="bfloat16"):
        assert rule() == ("implicit_gemm", "bf16")
        assert rule(kernel=1) == ("implicit_gemm", "bf16")  # really low precision, 1x1 too
    with amp.autocast("gpu", dtype="float16"):
        assert rule() == ("implicit_gemm", "fp16")
    with amp.autocast("cpu", dtype="float16"):              # autocast of the other device
        assert rule() == ("implicit_gemm", "tf32")


def test_the_setting_forces_or_forbids_the_kernels(rule):
    with conv_plan.override(algorithm="implicit_gemm"):
        assert rule() == ("implicit_gemm", "highest")
        assert rule(kernel=1, tensor_cores=False) == ("implicit_gemm", "highest")
        # too big for the kernels' 32-bit indexing: im2col (never allocated here)
        assert rule(x_shape=(2 ** 16, 8, 64, 64))[0] == "im2col"
        geom = conv2d_geometry((1, 8, 16, 16), (8, 8, 3, 3), 1, 1, 1, 1)
        assert conv_plan.plan(geom, (1, 8, 16, 16), 8, "cpu").kind in ("im2col", "row")
    minidl.set_float32_matmul_precision("high")
    for algorithm in ("im2col", "row"):
        with conv_plan.override(algorithm=algorithm):
            assert rule()[0] == "im2col"
    with conv_plan.override(algorithm="plain"):
        geom = conv2d_geometry((1, 8, 16, 16), (8, 8, 3, 3), 1, 1, 1, 1)
        assert conv_plan.plan(geom, (1, 8, 16, 16), 8, "gpu") is None


def test_backends_conv_algorithm_is_the_plan_setting():
    assert minidl.backends.conv_algorithm == conv_plan.settings.algorithm == "auto"
    try:
        minidl.backends.conv_algorithm = "implicit_gemm"
        assert conv_plan.settings.algorithm == "implicit_gemm"
        conv_plan.settings.algorithm = "im2col"
        assert minidl.backends.conv_algorithm == "im2col"
        with pytest.raises(ValueError, match="algorithm must be one of"):
            minidl.backends.conv_algorithm = "winograd"
    finally:
        minidl.backends.conv_algorithm = "auto"
    assert conv_plan.conv_precision("cpu") is None


# ---------------------------------------------------------------------- 4. end to end
SETTINGS = [("implicit_gemm", "highest", None), ("auto", "high", None),
            ("auto", "highest", "bfloat16"), ("implicit_gemm", "highest", "float16")]
KERNEL_PRECISION = {None: {"highest": "highest", "high": "tf32"}, "bfloat16": "bf16",
                    "float16": "fp16"}


def _run_setting(fn, algorithm, matmul, autocast_dtype, device):
    minidl.set_float32_matmul_precision(matmul)
    try:
        with conv_plan.override(algorithm=algorithm), \
                amp.autocast(device, dtype=autocast_dtype or "bfloat16",
                             enabled=autocast_dtype is not None):
            return fn()
    finally:
        minidl.set_float32_matmul_precision("highest")


def _spy(monkeypatch):
    """Record (kernel wrapper, precision) of every implicit-GEMM call."""
    seen = []
    for name in ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"):
        original = getattr(ig, name)

        def spy(*args, _name=name, _original=original):
            seen.append((_name, args[-1]))
            return _original(*args)
        monkeypatch.setattr(ig, name, spy)
    return seen


@pytest.mark.parametrize("algorithm, matmul, autocast_dtype", SETTINGS)
@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_conv_ops_end_to_end(device, op, algorithm, matmul, autocast_dtype, monkeypatch):
    """Forward and both gradients of the op match the CPU's float32 result, to a tolerance per
    precision stated as a share of the largest value (the tight per-element bounds are
    tests/test_implicit_gemm.py's); on the GPU every product ran on the kernels, in the
    precision the setting names, backward included (it runs outside the autocast block)."""
    rng = np.random.default_rng(5)
    if op == "conv2d":
        xs, ws, kwargs = (2, 4, 6, 5), (6, 2, 3, 3), dict(padding=1, groups=2)
    else:
        xs, ws, kwargs = (1, 4, 3, 4), (4, 3, 2, 2), dict(stride=2)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    fn = getattr(F, op)

    def run(dev):
        xt = minidl.tensor(x, device=dev, requires_grad=True)
        wt = minidl.tensor(w, device=dev, requires_grad=True)
        y = fn(xt, wt, **kwargs)
        return y, xt, wt

    ref, xr, wr = run("cpu")
    gy = rng.standard_normal(ref.shape).astype(np.float32)
    ref.backward(minidl.tensor(gy))
    seen = _spy(monkeypatch)
    y, xt, wt = _run_setting(lambda: run(device), algorithm, matmul, autocast_dtype, device)
    y.backward(minidl.tensor(gy, device=device))
    got = [to_numpy(a) for a in (y.data, xt.grad, wt.grad)]
    assert got[1].dtype == got[2].dtype == np.float32       # gradients of float32 parameters
    if autocast_dtype is None:
        tol = 1e-5 if matmul == "highest" or device == "cpu" else 1e-2   # TF32: 2^-11 steps
    else:                                                   # inputs rounded: bf16 / fp16 epsilons
        tol = {"bfloat16": 4e-2, "float16": 1e-2}[autocast_dtype]
    for g, r in zip(got, (ref.data, xr.grad, wr.grad)):
        r = to_numpy(r)
        np.testing.assert_allclose(g.astype(np.float32), r, rtol=0, atol=tol * np.abs(r).max())
    precision = KERNEL_PRECISION[autocast_dtype]
    precision = precision[matmul] if isinstance(precision, dict) else precision
    if device == "gpu":
        assert {name for name, _ in seen} == {"conv2d_forward", "conv2d_input_grad",
                                              "conv2d_weight_grad"}
        assert {p for _, p in seen} == {precision}
    else:
        assert seen == []                    # the CPU has no such kernels: its own plan ran


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_float64_gradcheck_under_implicit_gemm_uses_the_fallback(device, op, monkeypatch):
    rng = np.random.default_rng(2)
    if op == "conv2d":
        xs, ws, kwargs = (1, 2, 5, 4), (3, 2, 3, 3), dict(padding=1, stride=(1, 2))
    else:
        xs, ws, kwargs = (1, 2, 3, 3), (2, 3, 2, 2), dict(stride=2)
    tensors = [minidl.tensor(rng.standard_normal(s), device=device, requires_grad=True)
               for s in (xs, ws)]
    seen = _spy(monkeypatch)
    with conv_plan.override(algorithm="implicit_gemm"):
        assert minidl.gradcheck(lambda x, w: getattr(F, op)(x, w, **kwargs), tensors,
                                n_directions=4)
    assert seen == []
    if device == "gpu" and op == "conv2d":          # the route was there, and stepped aside
        geom = conv2d_geometry(xs, ws, 1, 1, 1, 1)
        with conv_plan.override(algorithm="implicit_gemm"):
            assert conv_plan.plan(geom, xs, ws[0], "gpu").kind == "implicit_gemm"


def test_transposed_geometry_plans_on_the_kernels_too(rule):
    """conv_transpose2d plans its adjoint conv (from its output to its input)."""
    geom, out = conv_transpose2d_geometry((1, 8, 4, 4), (8, 4, 2, 2), 2, 0, 0, 1, 1)
    with conv_plan.override(algorithm="implicit_gemm"):
        found = conv_plan.plan(geom, (1, 4) + out, 8, "gpu")
    assert found.kind == "implicit_gemm" and found.fallback.geom is geom

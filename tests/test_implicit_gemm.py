"""The implicit-GEMM convolution kernels (kernels/implicit_gemm.py) and their NumPy reference.

1. The NumPy reference (kernels/implicit_gemm_reference.py) against minidl's own conv2d /
   conv_transpose2d and their gradients, in float64.
2. nvcc compiles every (kind, precision) entry point to PTX for sm_80 and sm_90 (where nvcc exists).
3. Host emulation (tests/gpu_emulation_blocks.py): the CUDA source runs on the CPU, block by
   block, with shared memory, __syncthreads and a WMMA stand-in; every shape class of the model
   zoo, every kind and precision, against the reference.
4. On a GPU (real CuPy): the same comparisons.

Tolerances, per precision, from the error bound of a dot product whose operands are rounded to
a unit roundoff u and summed in float32:  |got - exact| <= (2u + R 2^-24) (|A| @ |B|)  with
u = 2^-24 ("highest"), 2^-11 ("tf32" and "fp16"), 2^-8 ("bf16"); |A| @ |B| is the same
convolution of |x| and |w|. Against the reference in the *same* precision (operands rounded
alike) only the summation order differs: 1e-5 of |A| @ |B|.
"""
import shutil
import subprocess

import numpy as np
import pytest

import minidl
import kernels.implicit_gemm as ig
import kernels.implicit_gemm_reference as igref
from minidl import functional as F
from minidl.ops.conv import conv_output_size

from conftest import GPU_PRESENT, GPU_SKIP_REASON

UNIT_ROUNDOFF = {"highest": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}

# Every shape class of the model zoo: (name, x shape, w shape, stride, padding, dilation, groups)
CONVS = [
    ("1x1, two tiles of M and Q", (1, 8, 9, 9), (70, 8, 1, 1), 1, 0, 1, 1),
    ("3x3", (2, 3, 7, 6), (5, 3, 3, 3), 1, 1, 1, 1),
    ("3x3 dilation 24", (1, 2, 50, 49), (3, 2, 3, 3), 1, 24, 24, 1),
    ("7x7 stride 2", (1, 3, 13, 12), (4, 3, 7, 7), 2, 3, 1, 1),
    ("3x3 groups 2", (2, 6, 6, 5), (4, 3, 3, 3), 1, 1, 1, 2),
    ("3x3 depthwise", (1, 4, 5, 5), (4, 1, 3, 3), 1, 1, 1, 4),
]
# Transposed: (name, x shape, w shape (C_in, C_out/G, kh, kw), stride, padding, groups)
CONV_TS = [
    ("2x2 stride 2 transposed", (2, 6, 4, 5), (6, 3, 2, 2), 2, 0, 1),
    ("3x3 stride 2 transposed, groups 2", (1, 4, 3, 3), (4, 2, 3, 3), 2, 1, 2),
]


def _data(x_shape, w_shape, y_shape, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(np.float32) for s in (x_shape, w_shape, y_shape))


def _out_hw(x_shape, w_shape, s, p, d):
    return tuple(conv_output_size(n, k, s, p, d) for n, k in zip(x_shape[2:], w_shape[2:]))


def _geom(s, p, d):
    return (s, s, p, p, d, d)


# ---------------------------------------------------------------------------- 1. reference
@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
def test_reference_matches_minidl_conv2d(case):
    _, xs, ws, s, p, d, g = case
    ho, wo = _out_hw(xs, ws, s, p, d)
    x, w, gy = _data(xs, ws, (xs[0], ws[0], ho, wo))
    xt = minidl.tensor(x.astype(np.float64), requires_grad=True)
    wt = minidl.tensor(w.astype(np.float64), requires_grad=True)
    y = F.conv2d(xt, wt, stride=s, padding=p, dilation=d, groups=g)
    y.backward(minidl.tensor(gy.astype(np.float64)))
    np.testing.assert_allclose(igref.conv2d_forward(x, w, *_geom(s, p, d), ho, wo, g), y.numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(igref.conv2d_input_grad(gy, w, xs[2], xs[3], *_geom(s, p, d), g),
                               np.asarray(xt.grad), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(igref.conv2d_weight_grad(x, gy, ws[2], ws[3], *_geom(s, p, d), g),
                               np.asarray(wt.grad), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CONV_TS, ids=[c[0] for c in CONV_TS])
def test_reference_transposed_matches_minidl(case):
    _, xs, ws, s, p, g = case
    xt = minidl.tensor(np.random.default_rng(1).standard_normal(xs), requires_grad=True)
    wt = minidl.tensor(np.random.default_rng(2).standard_normal(ws), requires_grad=True)
    y = F.conv_transpose2d(xt, wt, stride=s, padding=p, groups=g)
    out_hw = y.shape[2:]
    got = igref.conv_transpose2d_forward(xt.numpy().astype(np.float32), wt.numpy().astype(np.float32),
                                         out_hw, *_geom(s, p, 1), g)
    np.testing.assert_allclose(got, y.numpy(), rtol=1e-5, atol=1e-5)


def test_rounding_model():
    v = np.array([1 + 2 ** -9, 1 + 2 ** -11 + 2 ** -20, 3.0, -1 - 2 ** -11], dtype=np.float32)
    np.testing.assert_array_equal(igref.round_to(v, "bf16"), np.float32([1, 1, 3, -1]))
    np.testing.assert_array_equal(igref.round_to(v, "tf32"),
                                  np.float32([1 + 2 ** -9, 1 + 2 ** -10, 3, -1 - 2 ** -10]))
    np.testing.assert_array_equal(igref.round_to(v, "fp16"), v.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="precision must be one of"):
        igref.round_to(v, "fp8")


# ---------------------------------------------------------------------------- 2. nvcc
@pytest.mark.parametrize("precisions", [ig.PRECISIONS] + [(p,) for p in ig.PRECISIONS],
                         ids=["all"] + list(ig.PRECISIONS))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_with_nvcc(arch, precisions, tmp_path):
    """The whole source and each precision's own module (as the loader compiles them)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not on PATH; CI machines have it")
    src = tmp_path / "implicit_gemm.cu"
    src.write_text(ig.cuda_source(precisions))
    proc = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "--std=c++14", str(src), "-o",
                           str(tmp_path / "out.ptx")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ptx = (tmp_path / "out.ptx").read_text()
    for kind in ig.KINDS:
        for precision in precisions:
            assert f".entry {ig.kernel_name(kind, precision)}(" in ptx
    if precisions != ("highest",):             # the tensor-core modes issue MMA instructions
        assert "mma.sync" in ptx or "wmma.mma" in ptx
    else:
        assert "#include" not in src.read_text()    # "highest" needs no header


def test_source_without_includes_has_no_headers():
    assert "#include" not in ig.cuda_source(includes=False)
    assert "#include <mma.h>" in ig.cuda_source(("tf32",))


# ---------------------------------------------------------------------------- 3./4. kernels
@pytest.fixture(params=["emulated", pytest.param("gpu", marks=pytest.mark.skipif(
    not GPU_PRESENT, reason=GPU_SKIP_REASON))])
def runner(request, monkeypatch):
    """The kernel wrappers as they run: on the host emulation, or on a real GPU. Returns a
    function turning the wrappers' output into a NumPy array."""
    if request.param == "gpu":
        import cupy
        return cupy.asnumpy, cupy.asarray
    import gpu_emulation_blocks
    try:
        module = gpu_emulation_blocks.BlockModule(ig.cuda_source(includes=False))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(ig, "_xp", lambda: np)
    monkeypatch.setattr(ig, "_run_kernel",
                        lambda name, grid, args: module.launch(name, grid, ig.THREADS, args))
    return np.asarray, np.asarray


def _check(got, exact, bound, rounded, precision, r):
    """got within the precision's error bound of the exact value, and within float32
    summation error of the reference with the same rounding."""
    tol = (2 * UNIT_ROUNDOFF[precision] + r * 2.0 ** -24) * bound + 1e-30
    assert np.all(np.abs(got - exact) <= tol), np.max(np.abs(got - exact) - tol)
    np.testing.assert_allclose(got, rounded, rtol=0, atol=1e-5 * float(bound.max()))


@pytest.mark.parametrize("precision", ig.PRECISIONS)
@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
def test_conv2d_kernels_against_reference(case, precision, runner):
    to_np, to_dev = runner
    _, xs, ws, s, p, d, g = case
    ho, wo = _out_hw(xs, ws, s, p, d)
    x, w, gy = _data(xs, ws, (xs[0], ws[0], ho, wo))
    geom = _geom(s, p, d)
    kh, kw = ws[2:]

    y = to_np(ig.conv2d_forward(to_dev(x), to_dev(w), *geom, ho, wo, g, precision))
    _check(y, igref.conv2d_forward(x, w, *geom, ho, wo, g),
           igref.conv2d_forward(np.abs(x), np.abs(w), *geom, ho, wo, g),
           igref.conv2d_forward(x, w, *geom, ho, wo, g, precision), precision, ws[1] * kh * kw)

    gx = to_np(ig.conv2d_input_grad(to_dev(gy), to_dev(w), xs[2], xs[3], *geom, g, precision))
    _check(gx, igref.conv2d_input_grad(gy, w, xs[2], xs[3], *geom, g),
           igref.conv2d_input_grad(np.abs(gy), np.abs(w), xs[2], xs[3], *geom, g),
           igref.conv2d_input_grad(gy, w, xs[2], xs[3], *geom, g, precision), precision,
           ws[0] // g * kh * kw)

    gw = to_np(ig.conv2d_weight_grad(to_dev(x), to_dev(gy), kh, kw, *geom, g, precision))
    _check(gw, igref.conv2d_weight_grad(x, gy, kh, kw, *geom, g),
           igref.conv2d_weight_grad(np.abs(x), np.abs(gy), kh, kw, *geom, g),
           igref.conv2d_weight_grad(x, gy, kh, kw, *geom, g, precision), precision, xs[0] * ho * wo)


@pytest.mark.parametrize("precision", ["highest", "bf16"])
@pytest.mark.parametrize("case", CONV_TS, ids=[c[0] for c in CONV_TS])
def test_conv_transpose2d_kernels_against_reference(case, precision, runner):
    """The transposed conv through the adjoint entry points (forward, input and weight grad)."""
    to_np, to_dev = runner
    _, xs, ws, s, p, g = case
    out_hw = tuple((n - 1) * s - 2 * p + k for n, k in zip(xs[2:], ws[2:]))
    x, w, gy = _data(xs, ws, (xs[0], ws[1] * g) + out_hw, seed=3)
    geom = _geom(s, p, 1)
    y = to_np(ig.conv_transpose2d_forward(to_dev(x), to_dev(w), out_hw, *geom, g, precision))
    r = ws[0] // g * ws[2] * ws[3]
    _check(y, igref.conv_transpose2d_forward(x, w, out_hw, *geom, g),
           igref.conv_transpose2d_forward(np.abs(x), np.abs(w), out_hw, *geom, g),
           igref.conv_transpose2d_forward(x, w, out_hw, *geom, g, precision), precision, r)
    # Its input gradient is the conv2d of gy; its weight gradient conv2d's with x, gy exchanged.
    gx = to_np(ig.conv_transpose2d_input_grad(to_dev(gy), to_dev(w), *geom, g, xs[2:], precision))
    _check(gx, igref.conv2d_forward(gy, w, *geom, *xs[2:], g),
           igref.conv2d_forward(np.abs(gy), np.abs(w), *geom, *xs[2:], g),
           igref.conv2d_forward(gy, w, *geom, *xs[2:], g, precision), precision, ws[1] * ws[2] * ws[3])
    gw = to_np(ig.conv_transpose2d_weight_grad(to_dev(x), to_dev(gy), ws[2], ws[3], *geom, g, precision))
    _check(gw, igref.conv2d_weight_grad(gy, x, ws[2], ws[3], *geom, g),
           igref.conv2d_weight_grad(np.abs(gy), np.abs(x), ws[2], ws[3], *geom, g),
           igref.conv2d_weight_grad(gy, x, ws[2], ws[3], *geom, g, precision), precision,
           xs[0] * xs[2] * xs[3])


def test_bad_arguments(runner):
    to_np, to_dev = runner
    x, w = to_dev(np.zeros((1, 2, 4, 4), np.float32)), to_dev(np.zeros((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="precision must be one of"):
        ig.conv2d_forward(x, w, 1, 1, 1, 1, 1, 1, 4, 4, 1, "float8")
    with pytest.raises(TypeError, match="must be float32"):
        ig.conv2d_forward(x.astype(np.float64), w, 1, 1, 1, 1, 1, 1, 4, 4, 1)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        ig.conv2d_input_grad(x, w, 4, 4, 1, 1, 1, 1, 1, 1, 3)
    with pytest.raises(ValueError, match=r"needs weight.shape\[1\] \* groups"):
        ig.conv2d_forward(x, w, 1, 1, 1, 1, 1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="as many channels as weight.shape"):
        ig.conv2d_input_grad(to_dev(np.zeros((1, 3, 4, 4), np.float32)), w, 4, 4, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="same batch size"):
        ig.conv2d_weight_grad(x, to_dev(np.zeros((2, 2, 4, 4), np.float32)), 3, 3, 1, 1, 1, 1, 1, 1, 1)


def test_wgrad_splits_cover_the_reduction():
    for r, blocks in [(1, 1), (100, 1), (524288, 9), (524288, 1000), (4097, 2)]:
        splits, per = ig.wgrad_splits(r, blocks, 1, 1)
        assert per % ig.BK == 0 and splits * per >= r and (splits - 1) * per < r

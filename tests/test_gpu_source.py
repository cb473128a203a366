"""Checks of the GPU kernel bundle (kernels/gpu.py) that need no GPU.

1. NVRTC compiles the CUDA source for float32 and float64 and every kernel is in the PTX
   (runs where CuPy's NVRTC binding loads; NVRTC itself needs no GPU); nvcc, where it is on
   PATH, does the same.
2. Host emulation: the *same* CUDA source is compiled as plain C++ with a tiny shim
   (threadIdx/blockIdx as globals, integer atomics as plain read-modify-writes) and the
   Python wrappers of kernels/gpu.py run on NumPy arrays through it. Each kernel launch
   is executed as several emulated threads in a random order, so a result that depended
   on thread order would show up. Every launch's arguments are checked against the
   kernel's C signature (pointer element types, scalar types), the mistakes a GPU would
   not report. Results are compared with kernels/reference.py.
"""
import shutil
import subprocess

import numpy as np
import pytest

import gpu_emulation
import kernels.gpu as gpu
import kernels.reference as ref

FLOATS = [np.float32, np.float64]
INDEX_TYPES = [np.int32, np.int64]

# ---------------------------------------------------------------------------- 1. NVRTC


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # no CuPy, or no NVRTC library next to it
        pytest.skip(f"CuPy's NVRTC binding is not available here ({type(exc).__name__}: {exc}); "
                    "`pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12` enables this check")


@pytest.mark.parametrize("itype", INDEX_TYPES, ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
def test_cuda_source_compiles_with_nvrtc(dtype, itype):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(gpu.cuda_source(dtype, itype), "kernels_gpu.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=compute_80"])
    except Exception as exc:
        pytest.fail(f"NVRTC rejected kernels/gpu.py source for {np.dtype(dtype)}: {exc}\n"
                    f"{nvrtc.getProgramLog(prog)}")
    log = nvrtc.getProgramLog(prog)
    assert "warning" not in str(log).lower(), f"NVRTC warnings:\n{log}"
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    missing = [n for n in gpu.KERNEL_NAMES if f".entry {n}(" not in ptx]
    assert not missing, f"kernels missing from the PTX: {missing}"


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The same check through nvcc, which machines without CuPy (CI) have: NVRTC's test above
    skips there."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not on PATH; CI machines have it")
    for dtype in FLOATS:
        for itype in INDEX_TYPES:
            src = tmp_path / f"kernels_{np.dtype(dtype)}_{np.dtype(itype)}.cu"
            src.write_text(gpu.cuda_source(dtype, itype))
            proc = subprocess.run([nvcc, "-ptx", "-arch=compute_80", str(src), "-o",
                                   str(src.with_suffix(".ptx"))], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            assert "warning" not in proc.stderr.lower(), f"nvcc warnings:\n{proc.stderr}"
            ptx = src.with_suffix(".ptx").read_text()
            missing = [n for n in gpu.KERNEL_NAMES if f".entry {n}(" not in ptx]
            assert not missing, f"kernels missing from the PTX: {missing}"


# ---------------------------------------------------------------------------- 2. host emulation
class _HostLib:
    """The CUDA source compiled for the host, one library per (dtype, index type)."""

    def __init__(self, tmpdir):
        if gpu_emulation.compiler() is None:
            pytest.skip("no C++ compiler (g++/clang++) to build the host emulation of the CUDA source")
        self.modules = {(np.dtype(d), np.dtype(i)): gpu_emulation.HostModule(gpu.cuda_source(d, i), tmpdir)
                        for d in FLOATS for i in INDEX_TYPES}
        self.rng = np.random.default_rng(0)
        self.launches = []

    def launch(self, name, dtype, itype, total, args):
        """Stand-in for gpu._run_kernel: check the arguments, run as shuffled emulated threads."""
        self.launches.append((name, np.dtype(itype).name))
        nthreads = 5
        self.modules[(np.dtype(dtype), np.dtype(itype))].run(
            name, args, nthreads=nthreads, order=self.rng.permutation(nthreads))


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return _HostLib(str(tmp_path_factory.mktemp("gpu_emulation")))


@pytest.fixture(params=["int32", "int64"], ids=["idx32", "idx64"])
def emu(host_lib, monkeypatch, request):
    """kernels.gpu running on the host: NumPy arrays, kernels compiled by the C++ compiler.
    Runs each test twice: with 32-bit index arithmetic (what small arrays get) and with
    64-bit forced (what arrays of 2^31 elements and more get)."""
    monkeypatch.setattr(gpu, "_xp", lambda: np)
    monkeypatch.setattr(gpu, "_run_kernel", host_lib.launch)
    if request.param == "int64":
        monkeypatch.setattr(gpu, "_INT32_LIMIT", 0)
    gpu._bilinear_tables.cache_clear()
    host_lib.launches.clear()
    yield host_lib
    gpu._bilinear_tables.cache_clear()


def _close(name, actual, expected, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if np.dtype(dtype) == np.float32 else dict(rtol=1e-12, atol=1e-12)
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != reference {expected.shape}"
    np.testing.assert_allclose(actual, expected, err_msg=name, **tol)


def _out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# (kh, kw, sh, sw, ph, pw, dh, dw, extra rows/cols asked beyond symmetric padding)
GEOMETRIES = [
    (3, 3, 1, 1, 1, 1, 1, 1, 0),     # "same" 3x3 conv
    (3, 3, 1, 1, 0, 0, 1, 1, 0),     # "valid" 3x3 conv (U-Net)
    (2, 2, 2, 2, 0, 0, 1, 1, 0),     # 2x2 pool / stride-2
    (3, 2, 2, 3, 1, 0, 2, 1, 0),     # asymmetric everything, dilation
    (3, 3, 2, 2, 1, 1, 1, 1, 1),     # ceil_mode-like extra window
    (1, 1, 1, 1, 0, 0, 1, 1, 0),     # 1x1
    (4, 3, 3, 1, 2, 1, 1, 3, 0),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_im2col_col2im_match_reference(emu, geom, dtype):
    kh, kw, sh, sw, ph, pw, dh, dw, extra = geom
    rng = np.random.default_rng(1)
    n, c, h, w = 2, 3, 7, 9
    ho, wo = _out(h, kh, sh, ph, dh) + extra, _out(w, kw, sw, pw, dw) + extra
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    args = (kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
    _close("im2col", gpu.im2col(x, *args), ref.im2col(x, *args), dtype)
    cols = rng.standard_normal((n, c * kh * kw, ho * wo)).astype(dtype)
    _close("col2im", gpu.col2im(cols, c, h, w, *args), ref.col2im(cols, c, h, w, *args), dtype)


def test_im2col_accepts_non_contiguous_input(emu):
    x = np.random.default_rng(2).standard_normal((2, 5, 6, 3)).astype(np.float32).transpose(0, 3, 1, 2)
    assert not x.flags.c_contiguous
    args = (3, 3, 1, 1, 1, 1, 1, 1, 5, 6)
    _close("im2col(non-contiguous)", gpu.im2col(x, *args), ref.im2col(np.ascontiguousarray(x), *args),
           np.float32)


@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_maxpool_matches_reference_with_ties(emu, geom, dtype):
    kh, kw, sh, sw, ph, pw, dh, dw, extra = geom
    rng = np.random.default_rng(3)
    n, c, h, w = 2, 3, 8, 7
    ho, wo = _out(h, kh, sh, ph, dh) + extra, _out(w, kw, sw, pw, dw) + extra
    # Few distinct values: many ties, and overlapping windows pick one pixel several times.
    x = rng.integers(-2, 3, size=(n, c, h, w)).astype(dtype)
    args = (kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
    y, idx = gpu.maxpool2d_forward(x, *args)
    y_ref, idx_ref = ref.maxpool2d_forward(x, *args)
    _close("maxpool y", y, y_ref, dtype)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, idx_ref, err_msg="maxpool indices (first max must win ties)")
    gy = rng.standard_normal(y.shape).astype(dtype)
    # A window lying wholly in the padding has idx -1 and no input to send its gradient
    # to (the GPU kernel drops it; NumPy's add.at in the reference would wrap -1 to the
    # last pixel), so compare with such windows' gradients zeroed.
    empty = idx_ref < 0
    assert np.all(y[empty] == -np.inf), "a window without input pixels must give -inf"
    gy_ref = np.where(empty, 0, gy).astype(dtype)
    _close("maxpool backward", gpu.maxpool2d_backward(gy, idx, h, w),
           ref.maxpool2d_backward(gy_ref, np.where(empty, 0, idx_ref), h, w), dtype)


def test_maxpool_nan_wins_and_backward_is_exactly_the_cpu_order(emu):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    x[0, 0, 2, 3] = np.nan
    args = (3, 3, 1, 1, 1, 1, 1, 1, 6, 6)
    y, idx = gpu.maxpool2d_forward(x, *args)
    y_ref, idx_ref = ref.maxpool2d_forward(x, *args)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    # Constant input: every window picks its first pixel; sums of up to 4 values per pixel
    # must be bit-identical to adding them in output order (what the CPU kernel does).
    gy = rng.standard_normal((1, 2, 6, 6)).astype(np.float32) * 1e3
    _, idx0 = ref.maxpool2d_forward(np.zeros_like(x), *args)
    expected = np.zeros((1, 2, 36), np.float32)
    for ch in range(2):
        for o in range(36):
            expected[0, ch, idx0[0, ch].ravel()[o]] += gy[0, ch].ravel()[o]
    np.testing.assert_array_equal(gpu.maxpool2d_backward(gy, idx0, 6, 6), expected.reshape(1, 2, 6, 6))


@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
def test_maxunpool_matches_reference(emu, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 10)).astype(dtype)
    y, idx = ref.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, 1, 1, 4, 5)
    _close("maxunpool forward", gpu.maxunpool2d_forward(y, idx, 8, 10),
           ref.maxunpool2d_forward(y, idx, 8, 10), dtype)
    gy = rng.standard_normal((2, 3, 8, 10)).astype(dtype)
    _close("maxunpool backward", gpu.maxunpool2d_backward(gy, idx), ref.maxunpool2d_backward(gy, idx),
           dtype)
    # Repeated indices (overlapping pooling windows): the last one in plane order wins, as in NumPy.
    dup = rng.integers(0, 6, size=(2, 3, 4, 5)).astype(np.int64)
    vals = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    _close("maxunpool forward (repeats)", gpu.maxunpool2d_forward(vals, dup, 8, 10),
           ref.maxunpool2d_forward(vals, dup, 8, 10), dtype)


SIZES = [((5, 7), (11, 3)), ((4, 4), (8, 8)), ((9, 6), (4, 5)), ((1, 3), (4, 1)), ((6, 6), (6, 6)),
         ((3, 8), (1, 16))]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
def test_bilinear_matches_reference(emu, sizes, align_corners, dtype):
    (h, w), (ho, wo) = sizes
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, h, w)).astype(dtype)
    _close("bilinear forward", gpu.bilinear_forward(x, ho, wo, align_corners),
           ref.bilinear_forward(x, ho, wo, align_corners), dtype)
    gy = rng.standard_normal((2, 3, ho, wo)).astype(dtype)
    _close("bilinear backward", gpu.bilinear_backward(gy, h, w, align_corners),
           ref.bilinear_backward(gy, h, w, align_corners), dtype)


def test_bilinear_backward_is_the_adjoint_of_forward(emu):
    # <forward(x), g> == <x, backward(g)> for any x, g: the gather visits every tap once.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 13, 5))
    g = rng.standard_normal((1, 2, 4, 17))
    for ac in (False, True):
        lhs = np.sum(gpu.bilinear_forward(x, 4, 17, ac) * g)
        rhs = np.sum(x * gpu.bilinear_backward(g, 13, 5, ac))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_index_type_follows_array_size(emu):
    x = np.zeros((1, 1, 4, 4), np.float32)
    gpu.im2col(x, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4)
    expected = "int64" if gpu._INT32_LIMIT == 0 else "int32"
    assert emu.launches == [("im2col_kernel", expected)]


def test_empty_inputs_launch_nothing(emu):
    x = np.zeros((0, 3, 4, 4), np.float32)
    assert gpu.im2col(x, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4).shape == (0, 27, 16)
    assert gpu.bilinear_forward(x, 8, 8, False).shape == (0, 3, 8, 8)
    y, idx = gpu.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, 1, 1, 2, 2)
    assert y.shape == idx.shape == (0, 3, 2, 2)
    assert emu.launches == [], f"empty inputs launched {emu.launches}"


def test_unsupported_dtype_is_a_clear_error(emu):
    with pytest.raises(TypeError, match="supports float32 and float64.*astype"):
        gpu.im2col(np.zeros((1, 1, 3, 3), np.int32), 1, 1, 1, 1, 0, 0, 1, 1, 3, 3)


def test_kernel_signatures_cover_every_kernel():
    source = gpu.cuda_source(np.float32, np.int32)
    assert gpu_emulation.typedefs(source) == {"T": np.dtype(np.float32), "I": np.dtype(np.int32)}
    sigs = gpu_emulation.signatures(source)
    assert sorted(sigs) == sorted(gpu.KERNEL_NAMES)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 2, 300), (5, 1, 1)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_batchnorm_relu_kernels_match_reference(emu, shape, training, relu, dtype):
    """The fused batch norm (+ ReLU) forward and its backward (partial sums in several lanes
    per channel: (1, 2, 300) has more values than _BN_LANES) against the reference."""
    rng = np.random.default_rng(1)
    n, c, s = shape
    x = rng.standard_normal(shape).astype(dtype)
    mean, var = ref.batchnorm_stats(x)
    inv_std = (1 / np.sqrt(var + 1e-5)).astype(dtype)
    scale, shift = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    y, xhat = gpu.batchnorm_forward(x, mean, inv_std, scale, shift, relu)
    ry, rxhat = ref.batchnorm_forward(x, mean, inv_std, scale, shift, relu)
    _close("y", y, ry, dtype)
    _close("xhat", xhat, rxhat, dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    got = gpu.batchnorm_backward(gy, rxhat, inv_std, scale, training, shift if relu else None)
    want = ref.batchnorm_backward(gy, rxhat, inv_std, scale, training, shift if relu else None)
    for name, a, b in zip(("gx", "gscale", "gshift"), got, want):
        _close(name, a, b.astype(dtype), dtype)
    assert [name for name, _ in emu.launches] == [
        "batchnorm_forward_kernel", "batchnorm_backward_reduce_kernel",
        "batchnorm_sum_lanes_kernel", "batchnorm_backward_apply_kernel"]


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 2, 300), (3, 1, 200), (2, 1, 1)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_batchnorm_statistics_kernels_match_reference(emu, shape, dtype, track):
    """Training: the statistics kernel and the merge kernel give mean, inv_std and the
    updated running statistics (momentum 0.3, unbiased variance) of the reference, in two
    launches; (1, 2, 300) and (3, 1, 200) merge several lanes per channel, and the offset of
    1e3 checks the merge keeps a float32 variance's digits. Eval: inv_std in one launch."""
    rng = np.random.default_rng(5)
    x = (1e3 + rng.standard_normal(shape)).astype(dtype)
    c = shape[1]
    rm0, rv0 = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    mine = (rm0.copy(), rv0.copy()) if track else (None, None)
    theirs = (rm0.copy(), rv0.copy()) if track else (None, None)
    mean, inv_std = gpu.batchnorm_train_statistics(x, 1e-5, *mine, momentum=0.3)
    ref_mean, ref_inv_std = ref.batchnorm_train_statistics(x, 1e-5, *theirs, momentum=0.3)
    _close("mean", mean, ref_mean, dtype)
    # A float32 variance of values near 1e3 has about 4 good digits (the inputs' rounding).
    np.testing.assert_allclose(inv_std, ref_inv_std, rtol=1e-3 if dtype == np.float32 else 1e-9)
    if track:
        _close("running_mean", mine[0], theirs[0], dtype)
        np.testing.assert_allclose(mine[1], theirs[1],
                                   rtol=1e-3 if dtype == np.float32 else 1e-9)
        assert not np.array_equal(mine[0], rm0)        # updated in place
    assert [name for name, _ in emu.launches] == ["batchnorm_stats_kernel",
                                                  "batchnorm_merge_kernel"]
    emu.launches.clear()
    mean, inv_std = gpu.batchnorm_eval_statistics(rm0, rv0, 1e-5)
    ref_mean, ref_inv_std = ref.batchnorm_eval_statistics(rm0, rv0, 1e-5)
    assert mean is rm0
    _close("eval inv_std", inv_std, ref_inv_std, dtype)
    assert [name for name, _ in emu.launches] == ["batchnorm_inv_std_kernel"]


def test_batchnorm_statistics_refuse_running_stats_of_another_dtype(emu):
    x = np.ones((2, 2, 3), np.float32)
    with pytest.raises(TypeError, match="running_mean in place.*float32"):
        gpu.batchnorm_train_statistics(x, 1e-5, np.zeros(2), np.ones(2), 0.1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_optimizer_kernels_match_reference(emu, dtype):
    """Three steps of Adam (with AMSGrad and L2 decay) and of SGD (momentum, dampening,
    Nesterov, decay) on one flat array: one launch per step, the reference's numbers."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(37).astype(dtype)
    mine = [p0.copy()] + [np.zeros_like(p0) for _ in range(3)]
    theirs = [p0.copy()] + [np.zeros_like(p0) for _ in range(3)]
    sgd_mine, sgd_theirs = [p0.copy(), np.zeros_like(p0)], [p0.copy(), np.zeros_like(p0)]
    for t in range(1, 4):
        g = rng.standard_normal(37).astype(dtype)
        args = (True, 0.9, 0.999, 1e-2 / (1 - 0.9 ** t), np.sqrt(1 - 0.999 ** t), 1e-8, 0.01)
        gpu.adam_update(mine[0], g, *mine[1:], *args)
        ref.adam_update(theirs[0], g, *theirs[1:], *args)
        sargs = (t == 1, 0.1, 0.9, 0.0, 1e-3, True)
        gpu.sgd_update(sgd_mine[0], g, sgd_mine[1], *sargs)
        ref.sgd_update(sgd_theirs[0], g, sgd_theirs[1], *sargs)
    for name, a, b in zip(("p", "m", "v", "v_max"), mine, theirs):
        _close(name, a, b, dtype)
    for name, a, b in zip(("sgd p", "sgd buf"), sgd_mine, sgd_theirs):
        _close(name, a, b, dtype)
    assert [name for name, _ in emu.launches] == ["adam_update_kernel", "sgd_update_kernel"] * 3


def test_optimizer_kernel_refuses_mismatched_state(emu):
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="state must match its parameter"):
        gpu.adam_update(p, p, np.zeros(4, np.float64), np.zeros(4, np.float32), None, False,
                        0.9, 0.999, 1e-3, 1.0, 1e-8, 0.0)


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 2, 300), (3, 1, 200), (5, 1, 1)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_batchnorm_stats_kernel_matches_reference(emu, shape, dtype):
    """Per-channel mean and variance in one pass (Welford per lane, lanes merged): (1, 2, 300)
    and (3, 1, 200) have more values than _BN_LANES; the offset of 1e3 would lose every
    digit of a float32 variance computed as E[x^2] - E[x]^2."""
    x = (1e3 + np.random.default_rng(4).standard_normal(shape)).astype(dtype)
    mean, var = gpu.batchnorm_stats(x)
    ref_mean, ref_var = ref.batchnorm_stats(x.astype(np.float64))
    assert mean.dtype == var.dtype == dtype and mean.shape == var.shape == (shape[1],)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=1e-6 if dtype == np.float32 else 1e-12)
    assert [name for name, _ in emu.launches] == ["batchnorm_stats_kernel",
                                                  "batchnorm_merge_kernel"]

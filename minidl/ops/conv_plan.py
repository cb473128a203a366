"""How each convolution runs: the speed routes, and the one `plan(...)` that picks them.

conv.py states what a convolution computes (y = W @ cols and its two adjoints) and reads
best there. This module holds the ways of computing it faster or in less memory, chosen per
layer and device by `plan(geom, x_shape, c_out, device)`, which returns a `ConvPlan`:

    kind "pointwise"  a 1x1 conv with stride 1 and no padding: x is its own column matrix
    kind "im2col"     the full column matrix (K = C*kh*kw rows), built in pieces
    kind "row"        row columns (K = C*kw rows) and one GEMM of the stacked kernel rows
                      (CPU: stride-1 convs with few channels; see `_row_route`)
    kind "implicit_gemm"   (GPU) no column matrix at all: CUDA kernels gather its tiles into
                      shared memory (conv_implicit_gemm.ImplicitGemmPlan; see
                      `_implicit_gemm_route` for when, `conv_precision` for which kernels)
    adjoint           the input gradient of a stride-1 conv with fewer output than input
                      channels as a conv of gy (CPU; see `_adjoint_geometry`), else col2im
    keep_bytes        a layer whose column matrix is at most this big keeps it from forward
                      to backward (CPU: with few channels im2col costs about as much as the
                      GEMM); a bigger one rebuilds it in backward
    budget, target    one piece of columns: at most `budget` bytes and about `target` output
                      pixels (CPU: cache-sized; GPU: as big as memory allows, few launches)
    transposed_weight_grad   sum gW transposed (CPU, narrow layers: BLAS wants K first)

Every plan offers forward / input_grad / weight_grad / backward with the same signatures as
conv.py's plain `Im2col`, and the Functions call only those. Another algorithm is one more
class with these four methods (as ImplicitGemmPlan), one more name in ALGORITHMS, and one
more branch in `plan`; conv.py does not change. The switches are the attributes of
`settings` (see `Settings`; `minidl.backends.conv_algorithm` is `settings.algorithm` under
PyTorch's kind of name); tests and benchmarks change them for a while with `override(...)`.

Memory: the column buffer is kh*kw times the input (a 3x3 conv on a 64 x 572 x 572 U-Net
map needs 750 MB), so a big layer builds it in pieces: whole samples while they fit,
otherwise bands of output rows of one sample. The budget bounds one column buffer (and the
equally sized column gradient); it is exceeded only when one output row alone is larger.
"""
import contextlib
import dataclasses

from .. import amp, backend, precision as matmul_precision
from .conv_implicit_gemm import ImplicitGemmPlan
from .geometry import Geometry
import kernels
from kernels import implicit_gemm

ALGORITHMS = ("auto", "plain", "im2col", "row", "implicit_gemm")
INPUT_GRADS = ("auto", "col2im")


@dataclasses.dataclass
class Settings:
    """The convolution switches, read by `plan` (a change applies from the next call on).

    algorithm            "auto": the rules below choose per layer and device; "plain": the
                         textbook path of conv.py (whole column matrix, no pieces); "im2col":
                         full columns in pieces, never the row route nor implicit GEMM; "row":
                         the row route wherever it applies (CPU, vertical stride 1, kh > 1),
                         size rules lifted; "implicit_gemm": the implicit-GEMM kernels for
                         every float32 conv on the GPU, in the precision of `conv_precision`
                         (the CPU plans as under "auto")
    input_grad           "auto": the adjoint route where it pays (CPU); "col2im": never
    keep_columns_bytes   largest column matrix a layer keeps for backward (CPU; 0: never)
    column_buffer_bytes  bound on one piece's column buffer (CPU)
    target_columns       output pixels per piece (CPU): columns still in cache for the GEMM
    gpu_column_buffer_bytes, gpu_target_columns   the same on the GPU (no cache to stay in,
                         a fixed cost per GEMM launch: big pieces)
    row_min_channels, row_max_out_channels, row_max_extra_share   when "auto" takes the row
                         route (see `_row_route`)
    transposed_max_out   widest layer (output channels per group) whose weight gradient is
                         summed transposed (CPU)
    """
    algorithm: str = "auto"
    input_grad: str = "auto"
    keep_columns_bytes: int = 16 * 2 ** 20
    # Below glibc's 32 MiB mmap ceiling malloc recycles the buffer from call to call.
    column_buffer_bytes: int = 16 * 2 ** 20
    target_columns: int = 4096
    gpu_column_buffer_bytes: int = 512 * 2 ** 20
    gpu_target_columns: int = 1 << 30
    row_min_channels: int = 4        # the row GEMM's K is C*kw: too short below this
    row_max_out_channels: int = 256  # wider layers are compute-bound: full columns are faster
    row_max_extra_share: float = 1 / 8   # the (kh-1)*dh extra rows, as a share of the output's
    transposed_max_out: int = 32

    def __setattr__(self, name, value):
        _check_name(name)
        for field, allowed in (("algorithm", ALGORITHMS), ("input_grad", INPUT_GRADS)):
            if name == field and value not in allowed:
                raise ValueError(f"conv settings: {field} must be one of {allowed}, got {value!r}.")
        super().__setattr__(name, value)
        _plans.clear()          # plans made under the old settings no longer apply


def _check_name(name):
    if name not in Settings.__dataclass_fields__:
        raise AttributeError(f"conv settings have no attribute {name!r}; the settings are "
                             f"{', '.join(Settings.__dataclass_fields__)}.")


_plans = {}     # (geom, x_shape, c_out, device) -> ConvPlan: a model repeats its layers
settings = Settings()


@contextlib.contextmanager
def override(**changes):
    """Change some `settings` for the duration of a with-block (tests, benchmarks)."""
    for name in changes:
        _check_name(name)
    saved = {name: getattr(settings, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(settings, name, value)
        yield settings
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)


def plan(geom, x_shape, c_out, device):
    """Decide how the conv `geom` from x (N, C, H, W) to C_out channels runs on `device`.

    Returns a ConvPlan or an ImplicitGemmPlan (shared between calls with the same arguments,
    settings and precision: treat it as read-only), or None for settings.algorithm "plain"
    (conv.py's Im2col then). The precision (`conv_precision`) is read now, in forward.
    """
    if settings.algorithm == "plain":
        return None
    precision = conv_precision(device)
    # geom: memoized, so compared by identity
    key = (geom, tuple(x_shape), c_out, device, precision)
    found = _plans.get(key)
    if found is None:
        if len(_plans) >= 1024:
            _plans.clear()
        found = ConvPlan(geom, x_shape, c_out, device)
        if _implicit_gemm_route(found, x_shape, c_out, precision):
            found = ImplicitGemmPlan(geom, precision, fallback=found)
        _plans[key] = found
    return found


def conv_precision(device):
    """The implicit-GEMM kernels' precision for a conv on `device` now: "bf16" / "fp16" under
    autocast of that device, else "tf32" under set_float32_matmul_precision("high"), else
    "highest" (exact float32). None on the CPU (no such kernels; autocast's rounding there
    is done by minidl/amp.py around the ordinary plans)."""
    if device != "gpu":
        return None
    low = amp.autocast_dtype(device)
    if low is not None:
        return {"bfloat16": "bf16", "float16": "fp16"}[low]
    return "tf32" if matmul_precision.get_float32_matmul_precision() == "high" else "highest"


# ---------------------------------------------------------------------- the rules
def _is_pointwise(geom, in_hw):
    """A 1x1 conv with stride 1 and no padding: the input already is its column matrix."""
    return (geom.kh == geom.kw == 1 and geom.sh == geom.sw == 1 and geom.ph == geom.pw == 0
            and (geom.ho, geom.wo) == tuple(in_hw))


def _row_route(geom, c_in, c_out, device):
    """Whether the row route pays (measured per layer on a 2-core CPU, see
    docs/PERFORMANCE.md): few channels on large maps, where writing the full columns costs
    more than the GEMM; not for the first 1-channel layer, small maps or wide layers."""
    if settings.algorithm == "im2col" or device != "cpu" or geom.sh != 1 or geom.kh == 1:
        return False
    if settings.algorithm == "row":
        return True
    return (c_in // geom.groups >= settings.row_min_channels
            and c_out <= settings.row_max_out_channels
            and (geom.kh - 1) * geom.dh <= settings.row_max_extra_share * geom.ho)


_tensor_core_cache = {}


def _tensor_cores():
    """Whether this GPU runs the tensor-core kernels (compute capability 8.0 or later)."""
    if "gpu" not in _tensor_core_cache:
        _tensor_core_cache["gpu"] = implicit_gemm.tensor_cores_available()
    return _tensor_core_cache["gpu"]


def _implicit_gemm_route(found, x_shape, c_out, precision):
    """Whether the conv `found` plans runs on the implicit-GEMM kernels instead.

    "implicit_gemm" asks for them on every GPU conv they can index (32-bit: fewer than 2^31
    elements per array). "auto" is cautious until the GPU figures are in (docs/GPU.md): exact
    float32 ("highest") stays on im2col + cuBLAS, the reference; a tensor-core precision
    takes the kernels on a GPU that has tensor cores (compute capability 8.0+), since
    im2col + cuBLAS can only emulate bf16/fp16 in float32 and pays the column round trip
    for TF32, except a TF32 1x1 conv (no columns to save there: cuBLAS's TF32 GEMM).
    """
    if found.device != "gpu" or settings.algorithm not in ("auto", "implicit_gemm"):
        return False
    n, c, h, w = x_shape
    if max(n * c * h * w, n * c_out * found.geom.ho * found.geom.wo) >= 2 ** 31:
        return False
    if settings.algorithm == "implicit_gemm":
        return True
    if precision == "highest" or (precision == "tf32" and found.kind == "pointwise"):
        return False
    return _tensor_cores()


def _adjoint_geometry(geom, in_hw):
    """The Geometry of the stride-1 conv that computes this conv's input gradient, or None.

    With stride 1, y[o] = sum_i w[i] x[o + d*i - p] has the adjoint
    gx[t] = sum_i w[k-1-i] gy[t + d*i - p'] with p' = d*(k-1) - p: a convolution of gy
    with the flipped kernel, padded by p' before (and cut to x's size after). It needs
    p' >= 0, i.e. padding at most the dilated kernel's reach, true of every layer in seg/.
    """
    if (geom.sh, geom.sw) != (1, 1):
        return None
    padding = (geom.dh * (geom.kh - 1) - geom.ph, geom.dw * (geom.kw - 1) - geom.pw)
    if min(padding) < 0:
        return None
    return Geometry((geom.kh, geom.kw), (1, 1), padding, (geom.dh, geom.dw), tuple(in_hw),
                    geom.groups)


class ConvPlan:
    """How one conv layer runs on one device; see the module docstring for the fields.

    geom: the layer's Geometry; x_shape (N, C, H, W) its input; c_out its output channels.
    """

    def __init__(self, geom, x_shape, c_out, device):
        n, c, h, w = x_shape
        self.geom, self.device = geom, device
        self.c_in, self.c_out = c, c_out
        if _is_pointwise(geom, (h, w)):
            self.kind = "pointwise"
        elif _row_route(geom, c, c_out, device):
            self.kind = "row"
        else:
            self.kind = "im2col"
        self.adjoint = None
        if (settings.input_grad == "auto" and device == "cpu" and c_out < c
                and self.kind != "pointwise"):
            # (measured: 1.2-1.6x faster for C_out = C/2, a loss for C_out = 2C)
            adjoint = _adjoint_geometry(geom, (h, w))
            if adjoint is not None:
                self.adjoint = ConvPlan(adjoint, (n, c_out, geom.ho, geom.wo), c, device)
        if device == "cpu":
            self.budget = settings.column_buffer_bytes
            # Row columns are kh times smaller per pixel: pieces of kh times as many pixels.
            self.target = settings.target_columns * (geom.kh if self.kind == "row" else 1)
            self.keep_bytes = min(settings.keep_columns_bytes, settings.column_buffer_bytes)
        else:   # im2col is cheap next to the GEMM on the GPU: never keep columns
            self.budget = settings.gpu_column_buffer_bytes
            self.target = settings.gpu_target_columns
            self.keep_bytes = -1
        # cols @ gy.T puts the long K side first, where OpenBLAS wants it; a wide layer keeps
        # gW's own layout (turning a transposed sum back costs a strided copy of gW).
        self.transposed_weight_grad = (device == "cpu" and self.kind != "row"
                                       and c_out // geom.groups <= settings.transposed_max_out)
        if self.kind == "row":
            self.unfold, self.extra = _row_geometry(geom), (geom.kh - 1) * geom.dh
        else:
            self.unfold, self.extra = geom, 0
        self.k = c * self.unfold.kh * self.unfold.kw     # rows of the column matrix

    def __repr__(self):
        return (f"ConvPlan(kind={self.kind!r}, device={self.device!r}, "
                f"adjoint={self.adjoint is not None}, keep_bytes={self.keep_bytes}, "
                f"budget={self.budget}, target={self.target}, "
                f"transposed_weight_grad={self.transposed_weight_grad})")

    # ------------------------------------------------------------------ pieces
    def pieces(self, n, row_bytes):
        """Split (samples, output rows) into pieces (n0, n1, r0, r1) for the column buffer.

        row_bytes: bytes of the column buffer for one output row of one sample. A piece covers
        about `target` output pixels (whole samples when they are that small), and never
        more than `budget` bytes unless one output row alone is larger.
        """
        ho, wo = self.geom.ho, self.geom.wo
        max_rows = max(1, self.budget // row_bytes)
        rows = min(max_rows, max(1, -(-self.target // wo)))
        if rows >= ho:                      # whole samples, several per piece when they are small
            step = max(1, min(max_rows // ho, -(-self.target // (ho * wo))))
            for n0 in range(0, n, step):
                yield n0, min(n, n0 + step), 0, ho
        else:                               # bands of output rows of one sample
            for b in range(n):
                for r0 in range(0, ho, rows):
                    yield b, b + 1, r0, min(ho, r0 + rows)

    def columns(self, x, n0, n1, r0, r1):
        """im2col of samples n0:n1 for output rows r0:r1 (plus the row route's extra rows)
        -> (n, G, K/G, rows*wo).

        A band of rows is asked for by moving the padding: with ph - r0*sh (negative past the
        top) the kernel's first output row is row r0, and rows outside the image read zeros,
        so no band of x is copied (that copy cost 2% of the big U-Net's step).
        """
        u, G = self.unfold, self.geom.groups
        cols = kernels.for_array(x).im2col(x[n0:n1], u.kh, u.kw, u.sh, u.sw, u.ph - r0 * u.sh,
                                           u.pw, u.dh, u.dw, r1 + self.extra - r0, u.wo)
        return cols.reshape(n1 - n0, G, self.k // G, -1)

    # ------------------------------------------------------------------ forward
    def forward(self, x, weight, keep_columns=False):
        """y = conv2d(x, weight) without bias, as arrays. x (N, C, H, W) -> (N, C_out, ho, wo).

        keep_columns: also return the column matrix (N, G, K/G, L) for weight_grad when the
        layer is small enough (keep_bytes), else None: returns (y, cols) then. On the row
        route the kept matrix is the row columns (N, G, C/G*kw, rows*wo).
        """
        geom, xp = self.geom, backend.get_array_module(x)
        x, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(weight)
        n, c = x.shape[:2]
        G, c_out = geom.groups, weight.shape[0]
        cog, wo, L = c_out // G, geom.wo, geom.ho * geom.wo
        y = xp.empty((n, G, cog, L), dtype=xp.result_type(x.dtype, weight.dtype))
        if self.kind == "pointwise":
            xp.matmul(_weight_blocks(weight, G), x.reshape(n, G, c // G, L), out=y)
            y = y.reshape(n, c_out, geom.ho, wo)
            return (y, None) if keep_columns else y
        extra = self.extra
        w_mat = _stacked_weights(weight, G) if extra else _weight_blocks(weight, G)

        def piece(n0, n1, r0, r1):
            """y for samples n0:n1, output rows r0:r1; returns the columns it used."""
            cols = self.columns(x, n0, n1, r0, r1)
            out = y[n0:n1, :, :, r0 * wo:r1 * wo]
            if not extra:
                xp.matmul(w_mat, cols, out=out)
                return cols
            z = xp.matmul(w_mat, cols)          # (n, G, kh*C_out/G, rows*wo): all kernel rows
            l, step = (r1 - r0) * wo, geom.dh * wo
            xp.add(z[:, :, :cog, :l], z[:, :, cog:2 * cog, step:step + l], out=out)
            for i in range(2, geom.kh):
                out += z[:, :, i * cog:(i + 1) * cog, i * step:i * step + l]
            return cols

        kept = None
        if keep_columns and n * self.k * self.unfold.ho * wo * x.itemsize <= self.keep_bytes:
            kept = piece(0, n, 0, geom.ho)
        else:
            for n0, n1, r0, r1 in self.pieces(n, self.k * wo * x.itemsize):
                piece(n0, n1, r0, r1)
        y = y.reshape(n, c_out, geom.ho, wo)
        return (y, kept) if keep_columns else y

    # ------------------------------------------------------------------ input gradient
    def input_grad(self, gy, weight, in_shape, weight_grad=None):
        """The adjoint of forward in x: gy (N, C_out, ho, wo) -> gx of in_shape (N, C, H, W).

        weight_grad: a WeightGrad to feed with the row route's shifted stacks of gy as they
        are built (Conv2d's backward: one stack per piece for both gradients); it stays
        unfed on the other routes.
        """
        geom = self.geom
        xp, kern = backend.get_array_module(gy), kernels.for_array(gy)
        gy, weight = xp.ascontiguousarray(gy), xp.ascontiguousarray(weight)
        n, c, h, w = in_shape
        G, c_out = geom.groups, weight.shape[0]
        if self.adjoint is not None:
            return self.adjoint.forward(gy, _adjoint_weight(weight, G))
        L, wo = geom.ho * geom.wo, geom.wo
        gy_blocks = gy.reshape(n, G, c_out // G, L)
        dtype = xp.result_type(gy.dtype, weight.dtype)
        if self.kind == "pointwise":
            w_t = _weight_blocks(weight, G).transpose(0, 2, 1)
            return xp.matmul(w_t, gy_blocks).reshape(in_shape)
        # The column gradient W2.T @ gy, folded back onto the pixels by col2im; on the row
        # route the (smaller) row-column gradient, from the stacked weights and gy's stack.
        unfold, extra, k = self.unfold, self.extra, self.k
        if extra:
            w_t = _stacked_weights(weight, G).transpose(0, 2, 1)   # (G, C/G*kw, kh*C_out/G)
        else:
            w_t = _weight_blocks(weight, G).transpose(0, 2, 1)     # (G, K/G, C_out/G), a view
        pieces = list(self.pieces(n, k * wo * xp.dtype(dtype).itemsize))
        gx = None if len(pieces) == 1 else xp.zeros(in_shape, dtype=dtype)
        for n0, n1, r0, r1 in pieces:
            gy_p = gy_blocks[n0:n1, :, :, r0 * wo:r1 * wo]
            if extra:
                gy_p = _shifted_rows(gy_p, geom, r1 - r0 + extra)
                if weight_grad is not None:
                    weight_grad.add(gy_p, n0, n1, r0, r1, shifted=True)
            gcols = xp.matmul(w_t, gy_p).reshape(n1 - n0, k, -1)
            if r0 == 0 and r1 == geom.ho:
                part = kern.col2im(gcols, c, h, w, *unfold.args(), unfold.ho, wo)
                if gx is None:
                    return part
                gx[n0:n1] = part
            else:
                a, b, top = _band(unfold, h, r0, r1 + extra)
                if b > a:    # bands overlap by the kernel's reach: add, do not assign
                    gx[n0:n1, :, a:b] += kern.col2im(gcols, c, b - a, w, unfold.kh, unfold.kw,
                                                     unfold.sh, unfold.sw, top, unfold.pw,
                                                     unfold.dh, unfold.dw, r1 + extra - r0, wo)
        return gx

    # ------------------------------------------------------------------ weight gradient
    def weight_grad(self, x, gy, w_shape, cols=None):
        """d<gy, conv2d(x, W)>/dW: x (N, C, H, W), gy (N, C_out, ho, wo) -> (C_out, C/G, kh, kw).

        cols: the columns forward kept (same plan, so the same route); else rebuilt.
        """
        xp = backend.get_array_module(gy)
        gy = xp.ascontiguousarray(gy)
        dtype = xp.result_type(gy.dtype, x.dtype if cols is None else cols.dtype)
        acc = WeightGrad(self, x, w_shape, cols, dtype)
        acc.add_all(gy)
        return acc.result()

    def backward(self, gy, weight, x, cols, x_shape, w_shape, need_x, need_w,
                 channel_major=False):
        """Both gradients of y = conv2d(x, weight) -> (gx or None, gW or None).

        x or cols (what forward kept) are needed for gW only, weight for gx only.
        channel_major: gy is (C_out, N, ho, wo), as folds() asked (Conv2d's ReLU writes it so).
        """
        xp = backend.get_array_module(gy)
        gy = xp.ascontiguousarray(gy)
        if channel_major or (cols is None and self.folds(x_shape[0], gy.dtype)):
            return self._backward_folded(gy, weight, x, x_shape, w_shape, need_x, need_w,
                                         channel_major)
        gx = gw = None
        if need_w:
            dtype = xp.result_type(gy.dtype, (x if cols is None else cols).dtype)
            acc = WeightGrad(self, x, w_shape, cols, dtype)
        if need_x:   # on the row route this also feeds acc, with the stacks of gy it builds
            gx = self.input_grad(gy, weight, x_shape, weight_grad=acc if need_w else None)
        if need_w:
            if not acc.fed:
                acc.add_all(gy)
            gw = acc.result()
        return gx, gw

    def folds(self, n, dtype):
        """Whether backward runs folded for a batch of n (_backward_folded): on the GPU, a
        plain im2col conv (groups 1) whose columns for the whole batch are one piece."""
        if (self.device != "gpu" or self.kind != "im2col" or self.geom.groups != 1
                or self.extra or self.adjoint is not None or n < 2):
            return False
        row_bytes = self.k * self.geom.wo * dtype.itemsize
        return list(self.pieces(n, row_bytes)) == [(0, n, 0, self.geom.ho)]

    def _backward_folded(self, gy, weight, x, x_shape, w_shape, need_x, need_w, channel_major):
        """Both gradients with the samples folded into the GEMMs: gy as (C_out, N*L) (L =
        ho*wo) and the columns as (K, N*L) (im2col_rows), so that

            gx = col2im_rows(W.T @ gy)        W (C_out, K): W.T is F-contiguous, which
            gW = gy @ cols.T                  cuBLAS takes as a transpose flag (no copy)

        are one 2-D GEMM each for the whole batch. gy is copied to that layout here unless
        it came so (channel_major: Conv2d's ReLU/bias kernel wrote it), one launch fewer.
        """
        xp, kern, u = backend.get_array_module(gy), kernels.for_array(gy), self.unfold
        n, c, h, w = x_shape
        c_out = w_shape[0]
        gy_t = gy.reshape(c_out, -1) if channel_major else _channel_major(gy.reshape(n, c_out, -1))
        gx = gw = None
        if need_x:
            w2 = xp.ascontiguousarray(weight).reshape(c_out, -1)
            gx = kern.col2im_rows(xp.matmul(w2.T, gy_t), n, c, h, w, *u.args(), u.ho, u.wo)
        if need_w:
            acc = WeightGrad(self, x, w_shape, None, xp.result_type(gy.dtype, x.dtype))
            acc._add_folded(gy_t, 0, n)
            gw = acc.result()
        return gx, gw


class WeightGrad:
    """d<gy, conv2d(x, W)>/dW, summed piece by piece: x (N, C, H, W) -> (C_out, C/G, kh, kw).

    cols: the columns forward kept (same plan, so the same route); else each piece's columns
    are rebuilt from x. `add` takes gy for samples n0:n1, output rows r0:r1; on the row
    route it may get gy's shifted stack (built by input_grad) instead.

    The sum is kept as gW itself, (G, rows*C_out/G, K/G) with rows = kh on the row route
    (its stacked kernel rows) and 1 otherwise, or (plan.transposed_weight_grad) as its
    transpose (G, K/G, C_out/G). On the GPU the first product is the sum (_add_product): no
    zero fill and no add for it, 2 launches per conv (the CPU keeps adding to zeros, so its
    results stay bit-for-bit those of before: 0 + -0.0 is +0.0).
    """

    def __init__(self, plan, x, w_shape, cols, dtype):
        xp = self.xp = backend.get_array_module(x if cols is None else cols)
        self.plan, self.x, self.w_shape, self.cols = plan, x, w_shape, cols
        geom = plan.geom
        G, cog = geom.groups, w_shape[0] // geom.groups
        # A 1x1 conv's input is its own column matrix (forward keeps no columns for it).
        self.own_columns = cols is None and plan.kind == "pointwise"
        self.extra = plan.extra
        taps = geom.kh * geom.kw if self.own_columns else plan.unfold.kh * plan.unfold.kw
        self.k = w_shape[1] * G * taps
        self.fed = False
        self.rows = geom.kh if self.extra else 1
        self.transposed = plan.transposed_weight_grad
        self.shape = (G, self.k // G, cog) if self.transposed else (G, self.rows * cog, self.k // G)
        self.dtype = dtype
        self.gw = xp.zeros(self.shape, dtype=dtype) if plan.device == "cpu" else None

    def columns(self, n0, n1, r0, r1):
        """The columns of samples n0:n1, output rows r0:r1: (n, G, K/G, rows*wo)."""
        G, wo, k, xp = self.plan.geom.groups, self.plan.geom.wo, self.k, self.xp
        if self.cols is not None:               # kept by forward
            return self.cols[n0:n1, :, :, r0 * wo:(r1 + self.extra) * wo]
        if self.own_columns:
            x = xp.ascontiguousarray(self.x[n0:n1]).reshape(n1 - n0, G, k // G, -1)
            return x[..., r0 * wo:r1 * wo]
        x = self.x = xp.ascontiguousarray(self.x)
        return self.plan.columns(x, n0, n1, r0, r1)

    def add(self, gy_p, n0, n1, r0, r1, shifted=False):
        """gy_p: gy (n, G, C_out/G, rows*wo) of those samples and rows, or (shifted=True, row
        route only) its shifted stack."""
        xp, geom, self.fed = self.xp, self.plan.geom, True
        if self._fold_batch(n0, n1, r0, r1):
            self._add_folded(_channel_major(gy_p[:, 0]), n0, n1)
            return
        cols_p = self.columns(n0, n1, r0, r1)
        if self.extra and not shifted:
            # The row route: gy's rows shifted by each kernel row i, stacked (i, o), so one
            # product gives every kernel row's gradient.
            gy_p = _shifted_rows(gy_p, geom, cols_p.shape[-1] // geom.wo)
        a, b = (cols_p, gy_p) if self.transposed else (gy_p, cols_p)
        if self.plan.device == "cpu":
            # One batched product (NumPy hands each sample's transposed view to BLAS as a
            # transpose flag), then the sum over samples.
            self._add_product(xp.matmul(a, b.transpose(0, 1, 3, 2)).sum(axis=0))
        elif geom.groups == 1:
            # 2-D products per sample: the .T of a C-contiguous matrix is F-contiguous, which
            # cuBLAS takes as a transpose flag, so nothing is copied (CuPy's batched matmul
            # copies a transposed view); the temporary stays small.
            for s in range(n1 - n0):
                self._add_product(xp.matmul(a[s, 0], b[s, 0].T)[None])
        else:   # grouped convs: small blocks, one batched product per sample
            for s in range(n1 - n0):
                self._add_product(xp.matmul(a[s], b[s].transpose(0, 2, 1)))

    def _add_product(self, p):
        """gW += p, p of gW's shape; the first p becomes gW (GPU: gW starts as None)."""
        if self.gw is None:
            self.gw = p
        else:
            self.gw += p     # same shapes: an add in place (`gw[0] += p` would copy back too)

    def _fold_batch(self, n0, n1, r0, r1):
        """Whether the GPU sums this piece in one GEMM over its samples (_add_folded): whole
        samples, several, of a plain im2col conv (groups 1) whose columns are rebuilt from x."""
        plan = self.plan
        return (plan.device == "gpu" and plan.kind == "im2col" and plan.geom.groups == 1
                and self.cols is None and not self.extra and n1 - n0 > 1
                and (r0, r1) == (0, plan.geom.ho))

    def _add_folded(self, gy_t, n0, n1):
        """gW += gy_t (C_out, n*L) @ cols (K, n*L).T, gy_t: gy of samples n0:n1 channel-major
        (_channel_major): the samples folded into the product's inner dimension, so one GEMM
        sums over them. 2 launches (the columns in that layout, kernels' im2col_rows; the
        GEMM), and gy's copy unless it came channel-major, instead of 1 + 2 per sample,
        which is what a launch-bound small network pays for."""
        xp, u = self.xp, self.plan.unfold
        x = self.x = xp.ascontiguousarray(self.x)
        cols = kernels.for_array(x).im2col_rows(x[n0:n1], u.kh, u.kw, u.sh, u.sw, u.ph, u.pw,
                                                u.dh, u.dw, u.ho, u.wo)          # (K, n*L)
        self._add_product(xp.matmul(gy_t, cols.T)[None])

    def add_all(self, gy):
        """Every piece of gy (N, C_out, ho, wo): kept or 1x1 columns in one, else pieces."""
        geom, n = self.plan.geom, gy.shape[0]
        gy_blocks = gy.reshape(n, geom.groups, -1, geom.ho * geom.wo)
        if self.cols is not None or self.own_columns:
            self.add(gy_blocks, 0, n, 0, geom.ho)
            return
        for n0, n1, r0, r1 in self.plan.pieces(n, self.k * geom.wo * self.x.itemsize):
            self.add(gy_blocks[n0:n1, :, :, r0 * geom.wo:r1 * geom.wo], n0, n1, r0, r1)

    def result(self):
        if self.gw is None:                     # nothing added (an empty batch)
            self.gw = self.xp.zeros(self.shape, dtype=self.dtype)
        G, c_out, c_in_g = self.plan.geom.groups, self.w_shape[0], self.w_shape[1]
        cog, taps = c_out // G, self.k // G // c_in_g      # taps: kh*kw, or kw (row route)
        if self.transposed:                     # (G, C/G * taps, C_out/G)
            gw = self.gw.reshape(G, c_in_g, taps, cog).transpose(0, 3, 1, 2)
        else:                                   # (G, rows * C_out/G, C/G * taps)
            gw = self.gw.reshape(G, self.rows, cog, c_in_g, taps).transpose(0, 2, 3, 1, 4)
        return self.xp.ascontiguousarray(gw).reshape(self.w_shape)


# ---------------------------------------------------------------------- helpers
def _channel_major(gy):
    """gy (n, C_out, L) -> (C_out, n*L), C-contiguous (a copy): the layout whose product
    with im2col_rows' columns sums over the samples."""
    xp = backend.get_array_module(gy)
    return xp.ascontiguousarray(gy.transpose(1, 0, 2)).reshape(gy.shape[1], -1)


def _band(geom, h, r0, r1):
    """Input rows [a, b) that output rows [r0, r1) read, and the padding left above row a."""
    start = r0 * geom.sh - geom.ph
    a = min(max(0, start), h)
    b = max(a, min(h, (r1 - 1) * geom.sh - geom.ph + (geom.kh - 1) * geom.dh + 1))
    return a, b, a - start


def _weight_blocks(weight, groups):
    """weight (C_out, C_in/G, kh, kw) -> (G, C_out/G, K/G), a view."""
    c_out = weight.shape[0]
    return weight.reshape(groups, c_out // groups, -1)


def _adjoint_weight(weight, groups):
    """weight (C_out, C/G, kh, kw) -> (C, C_out/G, kh, kw): each group's block transposed
    (input and output channels swap roles) and the kernel flipped in both axes."""
    xp = backend.get_array_module(weight)
    c_out, c_in_g, kh, kw = weight.shape
    blocks = weight.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(0, 2, 1, 3, 4)
    return xp.ascontiguousarray(blocks[..., ::-1, ::-1]).reshape(groups * c_in_g,
                                                                 c_out // groups, kh, kw)


# ---------------------------------------------------------------------- the row route
# A conv with vertical stride 1 (every 3x3 conv of U-Net, SegNet, DeepLab's atrous convs)
# can unfold only along the width. Its "row columns" are im2col with a 1 x kw kernel over
# ho + (kh-1)*dh rows: B[(c, j), (r, ox)] holds x[c, r - ph, ox*sw + j*dw - pw]. The
# kh*kw-tap column matrix is then kh overlapping windows of B, one per kernel row i,
# shifted by i*dh rows:
#
#     y[o, (oy, ox)] = sum_i  W_i[o, (c, j)] @ B[(c, j), (oy + i*dh, ox)]
#
# so one GEMM of the stacked weights (kh*C_out, C*kw) @ B gives all kh partial products,
# and y is the sum of their shifted windows. B is kh times smaller than the full columns,
# which matters where writing the columns to memory, not the GEMM, sets the pace: few
# output channels on large maps. It costs (kh-1)*dh extra rows of GEMM and a pass over the
# kh partial products, a loss on small maps and for wide (compute-bound) layers.
def _row_geometry(geom):
    """The im2col geometry of geom's row columns: kernel (1, kw) over ho + (kh-1)*dh rows."""
    return Geometry((1, geom.kw), (1, geom.sw), (geom.ph, geom.pw), (1, geom.dw),
                    (geom.ho + (geom.kh - 1) * geom.dh, geom.wo), geom.groups)


def _stacked_weights(weight, groups):
    """(C_out, C/G, kh, kw) -> (G, kh*C_out/G, C/G*kw): rows (i, o), columns (c, j)."""
    xp = backend.get_array_module(weight)
    c_out, c_in_g, kh, kw = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(0, 3, 1, 2, 4)
    return xp.ascontiguousarray(w).reshape(groups, kh * (c_out // groups), c_in_g * kw)


def _shifted_rows(gy_p, geom, span):
    """The row route's stack of gy: gy_p (n, G, C_out/G, rows*wo) -> (n, G, kh*C_out/G,
    span*wo) whose block i holds gy_p moved down by i*dh rows (zeros elsewhere), so that
    (stacked weights).T @ it and it @ (row columns).T sum over the kernel rows in one GEMM."""
    xp = backend.get_array_module(gy_p)
    m, G, cog, l = gy_p.shape
    out = xp.empty((m, G, geom.kh * cog, span * geom.wo), dtype=gy_p.dtype)
    for i in range(geom.kh):
        block, start = out[:, :, i * cog:(i + 1) * cog], i * geom.dh * geom.wo
        block[..., :start] = 0
        block[..., start:start + l] = gy_p
        block[..., start + l:] = 0
    return out

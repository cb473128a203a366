"""Hot loops, one bundle of kernels per device (the minitorch `tensor_ops` idea).

    reference.py  plain NumPy, written to be read; the oracle the tests compare against
    cpu.py        the same kernels compiled with Numba (used for NumPy arrays)
    gpu.py        the same kernels as CUDA source compiled by CuPy (used for CuPy arrays)
    cuda.py       the CuPy loader (imported on first use; minidl.backend re-exports it)
    permutohedral_{reference,cpu,gpu}.py   the dense CRF's lattice filter, the same three ways;
                  cpu.py and gpu.py expose theirs as PermutohedralLattice and softmax_rows

    implicit_gemm.py  GPU convolution without the im2col buffer (tensor cores), not a bundle:
                      called by the conv plan; its NumPy twin is implicit_gemm_reference.py

Every bundle offers the same functions with the same signatures; `for_array(x)` returns
the bundle that matches where `x` lives. This is the only place that chooses.
"""
import importlib

_bundles = {}     # "cpu" / "gpu" -> module, imported on first use (every op asks, often)


def for_array(array):
    """The kernel bundle (module) for an array: kernels.cpu for NumPy, kernels.gpu for CuPy."""
    device = "gpu" if type(array).__module__.startswith("cupy") else "cpu"
    bundle = _bundles.get(device)
    if bundle is None:
        bundle = _bundles[device] = importlib.import_module(f"kernels.{device}")
    return bundle


"""scripts/kernel_report.py: what ptxas and the SASS say about the CUDA kernels.

1. The occupancy arithmetic against the CUDA occupancy rules, worked by hand.
2. The parsers on a few lines of ptxas / cuobjdump output.
3. Where nvcc exists: the implicit-GEMM bundles compiled as the project compiles them; every
   entry point is reported, none spills, and (where a disassembler exists) the tensor-core
   modes issue HMMA instructions and "highest" none, with no local-memory traffic and no
   generic loads or stores.
4. Without nvcc the script says so in one line and succeeds.
"""
import importlib.util
import os

import pytest

import kernels.implicit_gemm as ig

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                     "kernel_report.py")
_spec = importlib.util.spec_from_file_location("kernel_report", _PATH)
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)


# ---------------------------------------------------------------------------- 1. occupancy
@pytest.mark.parametrize("arch, threads, regs, smem, want", [
    # 95 registers -> 3072 per warp (rounded to 256) -> 21 warps of 65536 -> 5 blocks of 4 warps
    ("sm_90", 128, 95, 27136, (5, 20 / 64, "registers")),
    # 64 registers -> 2048 per warp -> 32 warps -> 8 blocks; shared: 8 x (27136 + 1024) fits 228 KB
    ("sm_90", 128, 64, 27136, (8, 32 / 64, "registers")),
    # 32 registers, 256 threads: 2048 threads per SM allow 8 blocks, which is all of the SM
    ("sm_90", 256, 32, 0, (8, 1.0, "warps")),
    # shared memory decides: 164 KB / (40 KB + 1 KB) = 4 blocks on an A100, 5 on an H100
    ("sm_80", 128, 32, 40 * 1024, (4, 16 / 64, "shared memory")),
    ("sm_90", 128, 32, 40 * 1024, (5, 20 / 64, "shared memory")),
    # tiny blocks: the 32-blocks-per-SM limit
    ("sm_90", 32, 16, 0, (32, 0.5, "blocks")),
    # more shared memory than a block may have: it cannot launch
    ("sm_80", 128, 32, 200 * 1024, (0, 0.0, "shared memory")),
])
def test_occupancy_follows_the_cuda_rules(arch, threads, regs, smem, want):
    blocks, occ, limiter = kr.occupancy(arch, threads, regs, smem)
    assert (blocks, limiter) == (want[0], want[2])
    assert occ == pytest.approx(want[1])


# ---------------------------------------------------------------------------- 2. parsers
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'conv_fwd_tf32' for 'sm_90'
ptxas info    : Function properties for conv_fwd_tf32
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 27072 bytes smem, 460 bytes cmem[0]
ptxas info    : Compiling entry function 'im2col_kernel' for 'sm_90'
ptxas info    : Function properties for im2col_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 448 bytes cmem[0]
"""

SASS = """\
\t\tFunction : conv_fwd_tf32
        /*0a30*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0a40*/              @!P0 LDL.LU R3, [R1+0x4] ;
        /*0a50*/                   LD.E R5, desc[UR4][R6.64] ;
        /*0a60*/                   LDS.128 R8, [R2] ;
        /*0a68*/                   LDSM.16.MT88.4 R44, [R44] ;
        /*0a70*/                   STL [R1], R3 ;
\t\tFunction : im2col_kernel
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   STS [R3], R4 ;
"""


def test_parse_ptxas_reads_every_field():
    got = kr.parse_ptxas(PTXAS_LOG)
    assert got["conv_fwd_tf32"] == dict(registers=80, stack=16, spill_stores=12, spill_loads=8,
                                        smem=27072, cmem0=460)
    assert got["im2col_kernel"] == dict(registers=32, stack=0, spill_stores=0, spill_loads=0,
                                        smem=0, cmem0=448)


def test_count_sass_counts_per_kernel():
    got = kr.count_sass(SASS)
    assert got["conv_fwd_tf32"] == dict(hmma=1, imma=0, ldl=1, stl=1, generic=1, vec128=1, ldsm=1)
    assert got["im2col_kernel"] == dict(hmma=0, imma=0, ldl=0, stl=0, generic=0, vec128=1, ldsm=0)


def test_bundles_are_the_sources_the_project_compiles():
    got = kr.bundles()
    for p in ig.PRECISIONS:
        assert got[f"implicit_gemm_{p}"] == (ig.cuda_source((p,)), ig.THREADS)
    assert {n for n in got if n.startswith("gpu_")} == {
        "gpu_float32_int32", "gpu_float32_int64", "gpu_float64_int32", "gpu_float64_int64"}


# ---------------------------------------------------------------------------- 3. nvcc
@pytest.fixture(scope="module")
def implicit_gemm_rows():
    if kr.find_nvcc() is None:
        pytest.skip("nvcc (the CUDA toolkit) is not on PATH or in CUDA_PATH; CI machines have it")
    return kr.report(["sm_90"], ["implicit_gemm"], jobs=2)


def test_every_implicit_gemm_kernel_is_reported_without_spills(implicit_gemm_rows):
    rows, _ = implicit_gemm_rows
    assert {r["kernel"] for r in rows} == {ig.kernel_name(k, p) for k in ig.KINDS for p in ig.PRECISIONS}
    for r in rows:
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["smem"] > 0 and r["blocks_per_sm"] >= 1, r


def test_tensor_core_modes_issue_hmma(implicit_gemm_rows):
    rows, disasm = implicit_gemm_rows
    if disasm is None:
        pytest.skip("no cuobjdump or nvdisasm (pip install nvidia-cuda-cuobjdump) to read the SASS")
    for r in rows:
        tensor_core = not r["kernel"].endswith("_highest")
        assert (r["hmma"] > 0) == tensor_core, r
        assert r["ldl"] == r["stl"] == 0, r
        # fragments move between registers and the shared tiles with LDS/STS (or ldmatrix),
        # not generic LD/ST (kernels/implicit_gemm.py, SharedFragments)
        assert r["generic"] == 0, r


# ---------------------------------------------------------------------------- 4. no nvcc
def test_without_nvcc_it_says_so_and_succeeds(monkeypatch, capsys):
    monkeypatch.setattr(kr, "find_nvcc", lambda: None)
    assert kr.main([]) == 0
    assert "nvcc (the CUDA toolkit) not found" in capsys.readouterr().out


# ---------------------------------------------------------------------------- 5. NVRTC
def test_bundles_without_headers_compile_with_nvrtc():
    """NVRTC (what cupy.RawModule compiles with), with CuPy's options and no include folder:
    every bundle that includes no CUDA header compiles (the tensor-core ones need mma.h:
    `kernel_report.py --nvrtc` says whether it resolves)."""
    lib = kr._nvrtc_library()
    if lib is None:
        pytest.skip("no libnvrtc here (CuPy brings one; or pip install nvidia-cuda-nvrtc)")
    for name, (source, _) in kr.bundles().items():
        if "#include" in source:
            continue
        ok, log = kr.nvrtc_compile(lib, source, kr.cupy_like_options("sm_90", []))
        assert ok, f"{name}: {log}"

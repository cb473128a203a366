"""What the CUDA compiler says about the project's kernels: registers, spills, shared memory,
occupancy, and (for the implicit-GEMM convolution) the tensor-core and local-memory instructions.

    python3 scripts/kernel_report.py                  # sm_80 and sm_90, every bundle
    python3 scripts/kernel_report.py --arch sm_90 --bundle implicit_gemm --json out.json

Needs nvcc (the CUDA toolkit), not a GPU. Every source bundle is compiled exactly as the project
ships it (the same text, typedef variants and defines that kernels/*.py hand to CuPy), with
`nvcc -cubin -Xptxas -v`; ptxas's summary gives registers, spill bytes and static shared memory
per kernel. Where cuobjdump or nvdisasm is found (next to nvcc, on PATH, or from the PyPI
packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm), the machine code (SASS) is read too:

    HMMA      tensor-core instructions (IMMA: their integer kind), one per m16n8kK piece
    LDL/STL   local-memory loads and stores: spills or arrays the compiler could not keep in registers
    LD/ST     generic loads and stores (the address space is decided at run time; WMMA's
              fragment loads from shared memory come out this way, see docs/PERFORMANCE.md)
    vec       128-bit loads (LDG.E.128, LDS.128): vectorised accesses
    LDSM      ldmatrix: a warp loads whole 8 x 8 tiles of 16-bit values from shared memory

The project compiles with NVRTC through cupy.RawModule, not nvcc: `--nvrtc` compiles each bundle
with libnvrtc too (found through $NVRTC_LIBRARY, CuPy's wheels or the system), with the options
CuPy passes, and says whether the CUDA headers the tensor-core modes include resolve.

Exit status 0 when the report was printed (or nvcc is missing: one line says so, and --nvrtc
still runs), 1 when a bundle does not compile (with nvcc, or with NVRTC and the CUDA headers).
"""
import argparse
import ctypes
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ARCHS = ("sm_80", "sm_90")

# ------------------------------------------------------------------------------- occupancy
# Per-SM limits by compute capability, from the CUDA C++ Programming Guide's table
# "Technical Specifications per Compute Capability" and the occupancy calculator's
# allocation granularities (CUDA Occupancy Calculator / cudaOccupancyMaxActiveBlocksPerMultiprocessor):
#   registers are allocated per warp in units of 256; a block gets whole warps;
#   shared memory is allocated in units of 128 bytes, and since compute capability 8.0 the
#   runtime reserves 1 KB per block on top of what the kernel asks for.
# sm_80 (A100): 164 KB shared memory per SM, at most 163 KB per block;
# sm_90 (H100, H200): 228 KB per SM, at most 227 KB per block. Both: 65536 registers,
# 2048 threads (64 warps) and 32 blocks per SM, 255 registers per thread.
LIMITS = {
    "sm_80": dict(gpu="A100", regs=65536, reg_unit=256, smem=164 * 1024, smem_block=163 * 1024,
                  smem_unit=128, smem_reserved=1024, warps=64, blocks=32),
    "sm_90": dict(gpu="H100/H200", regs=65536, reg_unit=256, smem=228 * 1024, smem_block=227 * 1024,
                  smem_unit=128, smem_reserved=1024, warps=64, blocks=32),
}


def _round_up(v, unit):
    return -(-v // unit) * unit


def occupancy(arch, threads, registers, shared_bytes):
    """Resident blocks per SM and the fraction of the SM's warps they fill, with what limits them.

    threads: per block; registers: per thread (ptxas); shared_bytes: static + dynamic per block.
    Returns (blocks, occupancy in 0..1, limiter) with limiter one of "warps", "blocks",
    "registers", "shared memory"."""
    lim = LIMITS[arch]
    warps = -(-threads // 32)
    by = {"warps": lim["warps"] // warps, "blocks": lim["blocks"]}
    if registers:
        per_warp = _round_up(registers * 32, lim["reg_unit"])
        by["registers"] = (lim["regs"] // per_warp) // warps
    if shared_bytes:
        if shared_bytes > lim["smem_block"]:
            return 0, 0.0, "shared memory"
        by["shared memory"] = lim["smem"] // _round_up(shared_bytes + lim["smem_reserved"], lim["smem_unit"])
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    blocks = by[limiter]
    return blocks, blocks * warps / lim["warps"], limiter


# ------------------------------------------------------------------------------- the bundles
def bundles():
    """Every CUDA module the project compiles at run time: name -> (source, threads per block).

    The sources come from the kernel modules themselves, so this is what CuPy would compile."""
    import numpy as np
    gpu = importlib.import_module("kernels.gpu")
    ig = importlib.import_module("kernels.implicit_gemm")
    perm = importlib.import_module("kernels.permutohedral_gpu")
    out = {}
    for p in ig.PRECISIONS:                      # one RawModule per precision (_run_kernel)
        out[f"implicit_gemm_{p}"] = (ig.cuda_source((p,)), ig.THREADS)
    for dtype in (np.float32, np.float64):       # one RawModule per (T, I) (kernels.gpu._module)
        for itype in (np.int32, np.int64):
            name = f"gpu_{np.dtype(dtype).name}_{np.dtype(itype).name}"
            out[name] = (gpu.cuda_source(dtype, itype), gpu._BLOCK)
    out["permutohedral"] = (perm._CUDA_SRC, 256)  # permutohedral_gpu._launch: 256 threads
    return out


# ------------------------------------------------------------------------------- tools
def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                return os.path.join(root, "bin", "nvcc")
    return nvcc


def _nvcc_bin_dir(nvcc):
    # /usr/local/bin/nvcc is often a wrapper script: ask nvcc where its toolkit is.
    proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    m = re.search(r"\bTOP=(\S+)", proc.stderr)
    return [os.path.normpath(os.path.join(m.group(1), "bin"))] if m else []


def find_disassembler(nvcc):
    """(tool, argv prefix) of cuobjdump or nvdisasm, or (None, None)."""
    dirs = [os.path.dirname(os.path.realpath(nvcc))] + _nvcc_bin_dir(nvcc)
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += sorted(glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*", "bin")))
    for tool, argv in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
        for d in dirs:
            path = os.path.join(d, tool)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path, argv
    return None, None


# ------------------------------------------------------------------------------- ptxas
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_ptxas(log):
    """ptxas -v output -> {kernel: {registers, stack, spill_stores, spill_loads, smem, cmem0}}."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = kernels.setdefault(m.group(1), dict(registers=0, stack=0, spill_stores=0,
                                                          spill_loads=0, smem=0, cmem0=0))
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s, c = _SMEM.search(line), _CMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
            current["cmem0"] = int(c.group(1)) if c else 0
    return kernels


# One SASS instruction line: "/*0a30*/  @!P0 HMMA.1684.F32.TF32 R4, R8, R12, R4 ;"
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_FUNCTION = re.compile(r"Function : (\w+)|^\s*\.text\.(\w+):")


def count_sass(sass):
    """SASS listing -> {kernel: {hmma, imma, ldl, stl, generic, vec128, ldsm}}."""
    out, current = {}, None
    for line in sass.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = out.setdefault(m.group(1) or m.group(2),
                                     dict(hmma=0, imma=0, ldl=0, stl=0, generic=0, vec128=0, ldsm=0))
            continue
        m = _SASS_OP.search(line)
        if current is None or not m:
            continue
        op, mods = m.group(1), m.group(2)
        key = {"HMMA": "hmma", "IMMA": "imma", "LDL": "ldl", "STL": "stl", "LD": "generic",
               "ST": "generic", "LDSM": "ldsm"}.get(op)
        if key:
            current[key] += 1
        if op in ("LDG", "LDS") and ".128" in mods:
            current["vec128"] += 1
    return out


def compile_bundle(nvcc, disasm, name, source, arch, workdir):
    """nvcc -cubin one bundle for one arch: {kernel: stats} or raises RuntimeError with the log."""
    src = os.path.join(workdir, f"{name}_{arch}.cu")
    cubin = src[:-3] + ".cubin"
    with open(src, "w") as f:
        f.write(source)
    # -std=c++17 as CuPy passes to NVRTC; -Xptxas -v prints the per-kernel resource summary.
    proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v",
                           "-o", cubin, src], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({arch}) did not compile:\n{proc.stderr}")
    stats = parse_ptxas(proc.stderr)
    if disasm[0]:
        sass = subprocess.run([disasm[0], *disasm[1], cubin], capture_output=True, text=True).stdout
        for kernel, counts in count_sass(sass).items():
            if kernel in stats:
                stats[kernel].update(counts)
    return stats


def report(archs, names, jobs=None):
    """Compile the chosen bundles for the chosen archs: a list of one dict per kernel."""
    nvcc = find_nvcc()
    disasm = find_disassembler(nvcc)
    all_bundles = bundles()
    chosen = {n: all_bundles[n] for n in all_bundles if any(n.startswith(k) for k in names)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as work, \
            ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        futures = {(n, a): pool.submit(compile_bundle, nvcc, disasm, n, src, a, work)
                   for n, (src, _) in chosen.items() for a in archs}
        for (name, arch), fut in futures.items():
            threads = chosen[name][1]
            for kernel, s in sorted(fut.result().items()):
                blocks, occ, limiter = occupancy(arch, threads, s["registers"], s["smem"])
                rows.append(dict(bundle=name, arch=arch, kernel=kernel, threads=threads,
                                 blocks_per_sm=blocks, occupancy=occ, limiter=limiter, **s))
    return rows, disasm[0]


def print_table(rows, disasm):
    cols = ["arch", "bundle", "kernel", "regs", "spill st/ld", "smem", "blocks/SM", "occupancy", "limited by"]
    sass = disasm is not None
    if sass:
        cols += ["HMMA", "LDL/STL", "generic LD/ST", "128-bit LDG/LDS", "LDSM"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["arch"], r["bundle"], r["kernel"], r["registers"], f"{r['spill_stores']}/{r['spill_loads']}",
                 r["smem"], r["blocks_per_sm"], f"{r['occupancy']:.0%}", r["limiter"]]
        if sass:
            cells += [r.get("hmma", 0) + r.get("imma", 0), f"{r.get('ldl', 0)}/{r.get('stl', 0)}",
                      r.get("generic", 0), r.get("vec128", 0), r.get("ldsm", 0)]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if not sass:
        print("(no cuobjdump or nvdisasm found: SASS counts left out; pip install nvidia-cuda-cuobjdump)")


# ------------------------------------------------------------------------------- NVRTC
def _nvrtc_library():
    """A loadable libnvrtc, or None: $NVRTC_LIBRARY, CuPy's / NVIDIA's wheels, the system."""
    candidates = [os.environ.get("NVRTC_LIBRARY")]
    for site in sys.path:
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    candidates += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for c in candidates:
        if not c or "builtins" in c or ".alt." in c:
            continue
        try:
            # NVRTC dlopens its builtins library by name: load it from the same folder first.
            for builtins in sorted(glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so*"))):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


HEADERS = ("mma.h", "cuda_bf16.h", "cuda_fp16.h")     # what kernels/implicit_gemm.py includes


def cupy_like_options(arch, include_dirs):
    """The options cupy.RawModule hands NVRTC for code= (CuPy 14: cupy/_core/core.pyx
    assemble_cupy_compiler_options, cupy/cuda/compiler.py _compile_with_cache_cuda): C++17,
    flush denormals, a cubin for the device's arch, device code by default, its own include
    folders and the CUDA headers' folder. (CuPy's own include folders hold no CUDA header.)"""
    opts = ["--std=c++17", "-ftz=true", f"-arch={arch}", "--device-as-default-execution-space"]
    return opts + [f"-I{d}" for d in include_dirs]


def nvrtc_compile(lib, source, options):
    """Compile with NVRTC: (ok, log)."""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip()


def cuda_include_dir(nvcc):
    """The CUDA headers' folder CuPy would use (cuda.pathfinder, as CuPy 14 asks it), else
    the toolkit's (CUDA_PATH, CUDA_HOME, next to nvcc), or None."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        found = find_nvidia_header_directory("cudart")
        if found:
            return found
    except Exception:           # not installed, or an older cuda-pathfinder
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")):
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    for d in _nvcc_bin_dir(nvcc) if nvcc else []:
        inc = os.path.join(os.path.dirname(d), "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
            return inc
    return None


def nvrtc_report(arch="sm_90", include=None):
    """Each bundle through NVRTC, without and with the CUDA include folder (`include`, or the
    one CuPy would find): prints two tables; False when a bundle fails with the folder."""
    lib = _nvrtc_library()
    if lib is None:
        print("NVRTC: no libnvrtc found (set NVRTC_LIBRARY, or pip install nvidia-cuda-nvrtc): skipped")
        return True
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    nvcc = find_nvcc()
    inc = include or cuda_include_dir(nvcc)
    print(f"\nNVRTC {major.value}.{minor.value}, {arch}, CuPy's options; CUDA include folder: {inc}")
    print("| bundle | no -I | with the CUDA include folder |")
    print("|---|---|---|")
    ok_all = True
    folders = ([], [inc] if inc else None)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:     # NVRTC calls release the GIL
        results = {(name, i): pool.submit(nvrtc_compile, lib, source, cupy_like_options(arch, dirs))
                   for name, (source, _) in bundles().items()
                   for i, dirs in enumerate(folders) if dirs is not None}
        for name in bundles():
            cells = []
            for i, dirs in enumerate(folders):
                if dirs is None:
                    cells.append("(no include folder found)")
                    continue
                ok, log = results[name, i].result()
                missing = re.findall(r"(?:cannot|could not) open source file \"([\w./]+)\"", log)
                cells.append("ok" if ok else "fails: " + (", ".join(sorted(set(missing))) + " not found"
                                                          if missing else log.splitlines()[0][:80]))
                ok_all &= ok or not dirs
            print(f"| {name} | {cells[0]} | {cells[1]} |")
    # Each header the tensor-core modes include, alone: does NVRTC find it by itself?
    print("| header | no -I | with the CUDA include folder |")
    print("|---|---|---|")
    for header in HEADERS:
        cells = [("ok" if nvrtc_compile(lib, f"#include <{header}>\n", cupy_like_options(arch, dirs))[0]
                  else "not found") if dirs is not None else "(no include folder found)"
                 for dirs in ([], [inc] if inc else None)]
        print(f"| {header} | {cells[0]} | {cells[1]} |")
    return ok_all


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=ARCHS, help="repeatable; default: all")
    ap.add_argument("--bundle", action="append",
                    help="bundle name prefix (implicit_gemm, gpu, permutohedral); repeatable")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--nvrtc", action="store_true", help="also compile every bundle with NVRTC")
    ap.add_argument("--cuda-include", help="the CUDA headers' folder for --nvrtc (default: the one "
                                           "CuPy would use)")
    args = ap.parse_args(argv)
    ok = True
    if find_nvcc() is None:
        print("kernel_report: nvcc (the CUDA toolkit) not found on PATH or in CUDA_PATH: no ptxas report")
    else:
        try:
            rows, disasm = report(args.arch or ARCHS, args.bundle or ["implicit_gemm", "gpu", "permutohedral"])
        except RuntimeError as exc:
            print(exc)
            return 1
        print_table(rows, disasm)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(tmp, args.json)
    if args.nvrtc:
        ok = nvrtc_report((args.arch or ["sm_90"])[-1], args.cuda_include)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

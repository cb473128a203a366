"""Backend switches under PyTorch's kind of name (torch.backends.cudnn...): `minidl.backends`.

    minidl.backends.conv_algorithm = "implicit_gemm"   # or "auto" (default), "im2col", ...

conv_algorithm is minidl.ops.conv_plan.settings.algorithm under another name (reading and
setting either is the same): one of conv_plan.ALGORITHMS,

    "auto"           the rules of conv_plan.plan: on the GPU im2col + cuBLAS in exact
                     float32, the implicit-GEMM kernels in TF32 ("high" matmul precision)
                     and under bf16/fp16 autocast (docs/GPU.md); on the CPU its own routes
    "implicit_gemm"  the implicit-GEMM kernels for every float32 conv on the GPU
    "im2col"         the explicit column matrix + GEMM everywhere (the reference route)
    "plain", "row"   conv.py's textbook path; the CPU's row route wherever it applies

A module cannot have a property, so this module's class is swapped for one that has it
(the same trick as a module-level __getattr__, for setting as well as reading).
"""
import sys
import types

from .ops import conv_plan


class _Backends(types.ModuleType):
    @property
    def conv_algorithm(self):
        return conv_plan.settings.algorithm

    @conv_algorithm.setter
    def conv_algorithm(self, value):
        conv_plan.settings.algorithm = value     # checks the name, drops plans made before


sys.modules[__name__].__class__ = _Backends

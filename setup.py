"""Builds sideways_kernels._C: the op schemas, the CPU kernels and, where torch
was built with CUDA and nvcc exists, the CUDA kernels.

CUDA is decided by torch.version.cuda and nvcc, never by torch.cuda.is_available():
a build machine often has no GPU. SIDEWAYS_NO_CUDA=1 skips CUDA; SIDEWAYS_CUDA_ARCHS
(default "80,90a") lists the architectures compiled for. MAX_JOBS bounds ninja's parallel compiles.
"""
import glob
import os
import shutil
import sys

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's default build isolation hides the torch you installed
    sys.exit("sideways-kernels builds against the torch already installed: install torch first "
             "(pip install torch==2.13.0, any 2.11-2.13), then pip install --no-build-isolation .")
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    if os.environ.get("SIDEWAYS_NO_CUDA", "0") == "1":
        return False
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return torch.version.cuda is not None and (shutil.which("nvcc") or os.path.exists(nvcc))


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20"]  # torch >= 2.13 headers use C++20
    if _with_cuda():
        archs = os.environ.get("SIDEWAYS_CUDA_ARCHS", "80,90a").split(",")  # e.g. "90a" alone: a faster build
        nvcc = ["-O3", "-std=c++17", "-lineinfo"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        return CUDAExtension("sideways_kernels._C", sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
                             extra_compile_args={"cxx": cxx + ["-DSIDEWAYS_WITH_CUDA"], "nvcc": nvcc})
    return CppExtension("sideways_kernels._C", sources, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

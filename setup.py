"""Builds sideways_kernels._C: the op schemas, the CPU kernels and, where torch
was built with CUDA and nvcc exists, the CUDA kernels.

CUDA is decided by torch.version.cuda and nvcc, never by torch.cuda.is_available():
a build machine often has no GPU. SIDEWAYS_NO_CUDA=1 skips CUDA; SIDEWAYS_CUDA_ARCHS
(default "80,90a") lists the architectures compiled for. MAX_JOBS bounds ninja's parallel compiles.
"""
import glob
import os
import re
import shlex
import shutil
import sys


def _front_end(argv):
    """``argv`` with the flag that turns off build isolation, if it is a pip or ``python -m
    build`` command line; else None."""
    base = [os.path.basename(a) for a in argv]
    pip = re.compile(r"pip[0-9.]*$")
    if base and pip.match(base[0]):
        name, rest = [base[0]], argv[1:]
    elif base and re.match(r"python[0-9.]*$", base[0]) and len(argv) > 1 and pip.match(base[1]):
        name, rest = [base[1]], argv[2:]
    elif base and re.match(r"python[0-9.]*$", base[0]) and "-m" in argv[1:3] and argv.index("-m") + 1 < len(argv) \
            and argv[argv.index("-m") + 1] in ("pip", "build"):
        at = argv.index("-m")
        name, rest = ["python", "-m", argv[at + 1]], argv[at + 2:]
    else:
        return None
    flag = "--no-isolation" if name[-1] == "build" else "--no-build-isolation"
    if flag in rest:
        return shlex.join(name + rest)
    if name[-1] == "build":
        return shlex.join(name + [flag] + rest)
    sub = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)  # install, wheel, ...
    if sub is None:
        return None
    return shlex.join(name + rest[:sub + 1] + [flag] + rest[sub + 1:])


def _rerun_command() -> str:
    """The command the user ran (pip's process, a parent of this one, on Linux) with build
    isolation off; both pip commands where it cannot tell."""
    pid = os.getppid()
    for _ in range(6):  # pip -> its build-backend hook (this process) -> setup.py, maybe via a shell
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        command = _front_end(argv)
        if command:
            return command
        if parent <= 1:
            break
        pid = parent
    return "pip install --no-build-isolation . (or pip wheel --no-build-isolation . for a wheel)"


try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's default build isolation hides the torch you installed
    sys.exit("sideways-kernels builds against the torch already installed: install torch first "
             f"(pip install torch==2.13.0, any 2.11-2.13), then {_rerun_command()}")
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

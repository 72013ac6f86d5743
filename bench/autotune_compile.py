"""How long an autotuned Triton launch of a new shape spends compiling the configs it times, with
one compile thread and with several (``SIDEWAYS_TRITON_COMPILE_THREADS``) — on any machine, GPU
or not: Triton compiles for an sm_90 GPU that need not be there, and nothing is launched (each
launch the autotuner makes is a warm-up, which compiles the kernel or finds it compiled).

    python bench/autotune_compile.py                   # a C3D layer's forward: 1 thread, then 2
    python bench/autotune_compile.py --threads 1 8
    python bench/autotune_compile.py --problem small --json   # what test_triton.py checks

Per setting: the configs timed, the kernels compiled in all and by the first timing, whether any
compiled on the calling thread, and the seconds the launch took (its timing stubbed out: the
rest is compiling). Each setting compiles afresh (its own Triton cache directory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sideways_kernels.triton as T  # noqa: E402
from sideways_kernels import ops  # noqa: E402

# (ring: span, batch, channels, height, width; output channels; dtype; path)
PROBLEMS = {
    "c3d": ((3, 8, 128, 28, 28), 256, torch.bfloat16, "box"),  # C3D's 128->256 layer: the box forward
    "small": ((3, 2, 64, 6, 6), 64, torch.float16, "general"),  # 64->64: four general configs survive pruning
}


class GPU:
    """The active driver of an sm_90 GPU: all that compiling for one asks of it."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def forward_launch(problem: str) -> tuple:
    """(kernel, name, args, meta) of the forward's launch of ``problem``, as the op makes it on
    CPU tensors (recorded, not run)."""
    (span, batch, channels, height, width), out_channels, dtype, path = PROBLEMS[problem]
    launched = []
    launch, T._launch = T._launch, lambda kernel, name, grid, args, meta, device, **kw: launched.append(
        (kernel, name, args, meta))
    try:
        ring = ops.empty_ring(span, batch, channels, height, width, dtype=dtype)
        weight = torch.randn(out_channels, channels, 3, 3, 3)
        with T.using(path=path, gemm_split=1):
            torch.ops.sideways_triton.ring_conv_forward(ring, None, 0, weight, None, [1, 1], [1, 1], [1, 1], 1, 1)
    finally:
        T._launch = launch
    return launched[0]


def first_launch(kernel, name: str, args: list, meta: dict, threads: int) -> dict:
    """The autotuned launch, with ``threads`` compile threads, of a kernel never compiled before."""
    os.environ["SIDEWAYS_TRITON_COMPILE_THREADS"] = str(threads)
    jit = JITFunction(kernel.fn)  # compiled afresh
    tuner = T._autotuner(jit, name, 90, 2, T._takes_aligned(name, kernel, args))
    jit.device_caches[0]  # its compiler, made for the GPU above
    compiled_in, compiled_at_timing, compile, run = [], [], jit.compile, jit.run
    jit.compile = lambda *a, **k: (compiled_in.append(threading.get_ident()), compile(*a, **k))[1]
    jit.run = lambda *a, warmup, **k: run(*a, warmup=True, **k)  # nothing to launch on
    tuner._do_bench = lambda call, quantiles: (compiled_at_timing.append(len(jit.device_caches[0][0])), call(),
                                               [1.0] * 3)[2]
    start = time.perf_counter()
    tuner[lambda META: (1,)](*args, **meta)
    return dict(threads=threads, timed=len(compiled_at_timing), compiled=len(compiled_in),
                compiled_at_timing=compiled_at_timing, on_the_calling_thread=threading.get_ident() in compiled_in,
                seconds=round(time.perf_counter() - start, 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="c3d")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", action="store_true", help="one JSON line of the settings' results")
    args = p.parse_args(argv)
    if any(t < 1 for t in args.threads):
        p.error("--threads: each count must be >= 1")
    kernel, name, launch_args, meta = forward_launch(args.problem)
    driver.set_active(GPU())
    results = []
    for threads in args.threads:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            results.append(first_launch(kernel, name, launch_args, meta, threads))
        r = results[-1]
        if not args.json:
            print(f"{name} ({args.problem}), sm_90: {r['timed']} configs timed, {r['compiled']} compiled "
                  f"({r['compiled_at_timing'][0]} before the first timing) with {threads} thread(s): "
                  f"{r['seconds']} s", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

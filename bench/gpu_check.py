"""Ahead-of-time checks of the Triton kernels, no GPU needed (`make gpu-check`).

Every kernel (forward, input gradient, weight update: accumulate and the SGD epilogue) x every
config of its list for the architecture and activation type (sideways_kernels/triton/configs.py)
x {fp32, bf16} activations is compiled with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` for
sm_90a and sm_80; one line each: registers, stack (spills), shared memory, the tensor-core
instruction family in the PTX (``wgmma`` on sm_90a, ``mma`` on sm_80, ``fma`` without), and
whether the loads are software-pipelined (async copies: ``num_stages`` at work).

Fails on a spill, on shared memory over the device's limit, on a 16-bit sm_90a kernel without
wgmma, or on a 16-bit kernel whose loads are not pipelined. A config that spills is one the
autotuner must never pick: the list is the place to fix. The specialisation compiled here (which
strides are 1) is the one real launches make: test_triton.py checks that against the ops.

    python bench/gpu_check.py            # everything, two compiles at a time
    python bench/gpu_check.py --arch 90 --kernel weight_update_sgd
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

KERNELS = ("ring_conv_forward", "window_input_grad", "weight_update", "weight_update_sgd")
DTYPES = ("fp32", "bf16")


# The strides a launch passes as 1 (Triton's JIT specialises an int equal to 1 into a constant):
# channels-last activations and errors (channels innermost) and the weights as the ops lay them
# out for the GEMM (sideways_kernels/triton/__init__.py); every other int and every pointer is
# assumed divisible by 16, as it is for channel counts that are multiples of 16.
UNIT = {"ring_conv_forward": ("s_c", "w_o", "o_c"), "window_input_grad": ("g_c", "w_c", "i_c"),
        "weight_update": ("g_c", "s_c")}


def _signature(kernel: str, dtype: str, cfg) -> tuple:
    from sideways_kernels.triton import kernels as K
    act, master = f"*{dtype}", "*fp32"  # 16-bit activations, fp32 master weights (as autocast trains)
    if kernel == "ring_conv_forward":
        fn = K._ring_conv_forward_kernel
        ptrs = dict(ring=act, weight=act, bias=master, out=act)
        const = dict(KT=3, KH=3, KW=3, HAS_BIAS=True)
    elif kernel == "window_input_grad":
        fn = K._window_input_grad_kernel
        ptrs = dict(grad_out=act, wsum=act, grad_in=act)
        const = dict(KH=3, KW=3)
    else:
        fn = K._weight_update_kernel
        ptrs = dict(grad_out=act, ring=act, target=master, momentum_buffer=master, partials="*fp32",
                    counters="*i32")
        sgd = kernel == "weight_update_sgd"
        const = dict(KT=3, KH=3, KW=3, SGD=sgd, HAS_BUFFER=sgd, NESTEROV=sgd, FIRST_STEP=False)
    const.update(PRECISION="ieee" if dtype == "fp32" else "tf32", ONE_GROUP=True, **cfg.meta())
    const.update({name: 1 for name in UNIT[kernel.replace("_sgd", "")]})
    floats = {"lr", "momentum", "dampening", "weight_decay"}
    sig = {a: ptrs.get(a) or ("constexpr" if a in const else "fp32" if a in floats else "i32") for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if sig[a] != "constexpr" and sig[a] != "fp32" and a not in ("slot", "B", "H", "W", "H_OUT", "W_OUT",
                                                                          "R", "groups", "stride_h", "stride_w",
                                                                          "pad_h", "pad_w", "dil_h", "dil_w", "dil_t")}
    return fn, sig, const, aligned


def check(job: tuple) -> dict:
    kernel, arch, dtype, cfg = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sideways_kernels.triton.configs import SHARED_MEMORY
    fn, sig, const, aligned = _signature(kernel, dtype, cfg)
    try:
        compiled = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as exc:  # noqa: BLE001 - reported as a failed line
        return dict(job=job, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    ptx = compiled.asm["ptx"]
    family = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"
    pipelined = "async_copy" in compiled.asm["ttgir"] or "async_tma" in compiled.asm["ttgir"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    shared = compiled.metadata.shared
    result = dict(job=job, regs=int(reg.group(1)) if reg else -1, stack=int(stack.group(1)) if stack else -1,
                  shared=shared, family=family, pipelined=pipelined)
    problems = []
    if result["stack"] > 0:
        problems.append(f"spills ({result['stack']} B of stack)")
    if shared > SHARED_MEMORY[arch]:
        problems.append(f"shared memory {shared} B over the limit {SHARED_MEMORY[arch]} B")
    if arch == 90 and dtype != "fp32" and family != "wgmma":
        problems.append("16-bit on sm_90a without wgmma")
    if dtype != "fp32" and not pipelined:  # e.g. a mask or offset whose alignment Triton cannot see
        problems.append("16-bit loads not software-pipelined (no async copies): num_stages has no effect")
    result["problems"] = problems
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, choices=(90, 80), action="append")
    p.add_argument("--kernel", choices=KERNELS, action="append")
    p.add_argument("--dtype", choices=DTYPES, action="append")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    from sideways_kernels.triton.configs import configs_for
    kind = {"ring_conv_forward": "gemm", "window_input_grad": "gemm", "weight_update": "weight_update",
            "weight_update_sgd": "weight_update:sgd"}
    jobs = [(k, arch, d, cfg) for arch in (args.arch or (90, 80)) for k in (args.kernel or KERNELS)
            for d in (args.dtype or DTYPES) for cfg in configs_for(kind[k], arch, 4 if d == "fp32" else 2)]
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(check, jobs):
            kernel, arch, dtype, cfg = r["job"]
            head = f"{kernel:<18} sm_{arch}{'a' if arch == 90 else ' '} {dtype:<4} {cfg.name:<18}"
            if "error" in r:
                failed += 1
                print(f"{head} FAILED to compile: {r['error']}", flush=True)
                continue
            split = " split-K" if kernel.startswith("weight_update") else ""
            line = (f"{head} regs {r['regs']:3d} stack {r['stack']:5d} B shared {r['shared'] // 1024:3d} KiB "
                    f"{r['family']:<5}{' pipelined' if r['pipelined'] else ''}{split}")
            if r["problems"]:
                failed += 1
                line += "  FAIL: " + "; ".join(r["problems"])
            print(line, flush=True)
    print(f"gpu-check: {len(jobs)} kernel/config/arch/dtype compiles, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

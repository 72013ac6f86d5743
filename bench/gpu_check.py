"""Ahead-of-time checks of the Triton kernels, no GPU needed (`make gpu-check`).

Every kernel x every config of its list for the architecture and activation type
(sideways_kernels/triton/configs.py) is compiled with ``triton.compile(...,
target=GPUTarget("cuda", arch, 32))``:
- the general kernels (kernels.py: forward, input gradient, the weight update's split-K GEMM;
  the forward and GEMM also with few channels' taps folded into K, ``_fold``) for sm_90a and
  sm_80, fp32 and bf16, each in the specialisations launches make (configs.aligned): every
  channel count and stride a multiple of 16, in the CONFIGS lists, and in the UNALIGNED lists
  ``_unaligned`` (R(2+1)D's 45 channels, a grouped conv's 8 per group: no int divisible by 16, so
  Triton loads element by element and pipelines nothing) and the folded ones, whose gather loads
  so too: ``_fold`` (an RGB stem's 3 channels, unaligned strides) and ``_depthwise`` (1 channel in
  and out per group, aligned strides; the input gradient's too, unfolded); and the weight
  update's second launch (the splits' sum and the epilogue: accumulating, or the SGD step; fp32
  whatever the activations);
- the box kernels (boxes.py: TMA boxes, wgmma, persistent) for sm_90a, bf16 — the only
  architecture and type the ops send them; the input gradient is the forward's kernel on the
  error (one slot, no bias), compiled in that specialisation.
- a tick's weight updates grouped (``box_grouped_weight_update``: every layer's tiles in one
  persistent launch, the tensors' addresses as int64 arguments; ``grouped_weight_finish``: its
  finish for every layer, accumulating or the SGD step), in their own config list; the stages'
  first forwards grouped (``box_grouped_forward``, pushing the frames; ``_pool``: with the 1x2x2
  max pool of the stages the engine runs itself) and their input gradients
  (``box_grouped_input_grad``: the same kernel on the errors), in theirs; and the stages'
  epilogues after forwards run elsewhere (``box_grouped_stage_epilogue``, ``_pool``: no GEMM);
- the bias gradient's column sum (``column_sum``: fp32 partials of the error's rows, fp32 and
  bf16) and its finish (a new sum, or ``_add``: into a gradient), in their one config
  (configs.COLUMN_SUM).
One line each: registers, stack (spills), shared memory, and what the PTX does — the matrix
instruction family (``wgmma``, ``mma``, or ``fma`` without tensor cores), ``tma``
(``cp.async.bulk.tensor``), ``cp.async`` (pipelined element copies), and ``persistent`` (the
kernel walks its tiles by the grid size).

Fails on a spill, on shared memory over the device's limit, on a 16-bit sm_90a kernel without
wgmma, on a 16-bit aligned general kernel whose loads are not software-pipelined, and on a box
kernel without TMA or without its persistent loop. A config that fails is one the autotuner must never
pick: the list is the place to fix. The specialisations compiled here (which strides are 1,
which ints multiples of 16, which constants) are the ones real launches make: test_triton.py
checks that against the ops' launches (``test_launches_pass_unit_strides...``,
``test_a_general_launch_takes_the_configs_compiled_for_its_alignment``).

It needs Triton only, not torch (the kernels are loaded without the package), so the device
image's Triton can check the same sources in a small venv of its own (the Makefile's
``.venv-triton36``):

    python bench/gpu_check.py            # everything, two compiles at a time
    python bench/gpu_check.py --arch 90 --kernel box_weight_update
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import re
import subprocess
import sys
import tempfile
import types

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
TRITON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sideways_kernels", "triton")

GENERAL = ("ring_conv_forward", "ring_conv_forward_unaligned", "ring_conv_forward_fold", "ring_conv_forward_depthwise",
           "window_input_grad", "window_input_grad_unaligned", "window_input_grad_depthwise", "weight_update",
           "weight_update_unaligned", "weight_update_fold", "weight_update_depthwise", "weight_finish",
           "weight_finish_sgd",
           "grouped_weight_finish", "grouped_weight_finish_sgd", "column_sum", "column_sum_finish",
           "column_sum_finish_add", "split_sum")
BOX = ("box_forward", "box_input_grad", "box_weight_update", "box_grouped_forward", "box_grouped_forward_pool",
       "box_grouped_input_grad", "box_grouped_weight_update", "box_grouped_stage_epilogue",
       "box_grouped_stage_epilogue_pool")
NO_MMA = ("column_sum", "split_sum", "box_grouped_stage_epilogue", "box_grouped_stage_epilogue_pool")  # no GEMM
KERNELS = GENERAL + BOX
DTYPES = ("fp32", "bf16")
KIND = {**{f"ring_conv_forward{v}": "gemm" for v in ("", "_unaligned", "_fold", "_depthwise")},
        **{f"weight_update{v}": "weight_update" for v in ("", "_unaligned", "_fold", "_depthwise")},
        **{f"window_input_grad{v}": "gemm" for v in ("", "_unaligned", "_depthwise")},
        "box_forward": "box_gemm", "box_input_grad": "box_gemm", "box_weight_update": "box_weight_update",
        "box_grouped_forward": "box_grouped_forward", "box_grouped_forward_pool": "box_grouped_forward",
        "box_grouped_input_grad": "box_grouped_forward", "box_grouped_stage_epilogue": "box_grouped_forward",
        "box_grouped_stage_epilogue_pool": "box_grouped_forward",
        "box_grouped_weight_update": "box_grouped_weight_update",
        "weight_finish": None, "weight_finish_sgd": None,
        "grouped_weight_finish": None, "grouped_weight_finish_sgd": None,  # None: one fixed config (configs.FINISH)
        "column_sum": None, "column_sum_finish": None, "column_sum_finish_add": None,  # (configs.COLUMN_SUM)
        "split_sum": None}  # (configs.SPLIT_SUM)


# The strides a launch passes as 1 (Triton's JIT specialises an int equal to 1 into a constant):
# channels-last activations and errors (channels innermost) and the weights as the ops lay them
# out for the GEMM (sideways_kernels/triton/__init__.py); every other int but configs.ANY_INT's
# and every pointer is assumed divisible by 16, as it is for channel counts that are multiples of
# 16 — except in a general kernel's ``_unaligned`` and ``_fold`` variants (configs.aligned: a
# channel count or stride not a multiple of 16), where no int is. The box kernels take no unit
# strides: their descriptors have the channels innermost by construction.
UNIT = {"ring_conv_forward": ("s_c", "w_o", "o_c"), "window_input_grad": ("g_c", "w_c", "i_c"),
        "weight_update": ("g_c", "s_c"), "box_forward": (), "box_input_grad": (), "box_weight_update": (),
        "box_grouped_forward": (), "box_grouped_forward_pool": (), "box_grouped_input_grad": (),
        "box_grouped_weight_update": (), "box_grouped_stage_epilogue": (), "box_grouped_stage_epilogue_pool": (),
        "weight_finish": ("t_w",), "grouped_weight_finish": (), "column_sum": (),
        "column_sum_finish": (), "split_sum": ()}


def gathers(kernel: str) -> bool:
    """A general kernel's specialisation that loads element by element (unaligned, or folded: its
    gather): the UNALIGNED lists, nothing for cp.async to pipeline."""
    return kernel.endswith(("_unaligned", "_fold", "_depthwise"))


def kernels_module(name: str):
    """``sideways_kernels/triton/<name>.py`` without importing the package (which needs torch)."""
    if "_swk_triton" not in sys.modules:
        package = types.ModuleType("_swk_triton")
        package.__path__ = [TRITON_DIR]
        sys.modules["_swk_triton"] = package
    return importlib.import_module(f"_swk_triton.{name}")


def _signature(kernel: str, dtype: str, cfg) -> tuple:
    import triton.language as tl
    K, X = kernels_module("kernels"), kernels_module("boxes")
    act, master = f"*{dtype}", "*fp32"  # 16-bit activations, fp32 master weights (as autocast trains)
    base = re.sub(r"_(sgd|add|fold|depthwise|unaligned)$", "", kernel)
    unaligned = kernel.endswith(("_unaligned", "_fold"))  # (no int divisible by 16: the RGB stem's strides)
    sgd = kernel.endswith("_sgd")
    taps = dict(KT=3, KH=3, KW=3)
    update_ptrs = dict(grad_out=act, ring=act, partials="*fp32")
    fn, ptrs, const = {
        "ring_conv_forward": (K._ring_conv_forward_kernel, dict(ring=act, weight=act, bias=master, out=act),
                              dict(KT=3, KH=3, KW=3, HAS_BIAS=True)),
        "window_input_grad": (K._window_input_grad_kernel, dict(grad_out=act, wsum=act, grad_in=act),
                              dict(KH=3, KW=3)),
        "weight_update": (K._weight_update_kernel, update_ptrs, dict(taps)),
        "weight_finish": (K._weight_finish_kernel, dict(partials="*fp32", target=master, momentum_buffer=master),
                          dict(taps, SGD=sgd, HAS_BUFFER=sgd, NESTEROV=sgd, FIRST_STEP=False)),
        # the tick's frame pushed into the ring in the same launch, as the pipeline's layers run it
        "box_forward": (X._box_forward_kernel, dict(ring=act, frame=act, weight=act, bias=master, out=act,
                                                    partials="*fp32"),
                        dict(KT=3, KH=3, KW=3, HAS_BIAS=True, PUSH=True)),
        "box_input_grad": (X._box_forward_kernel, dict(ring=act, frame=act, weight=act, bias=act, out=act,
                                                       partials="*fp32"),
                           dict(KT=1, KH=3, KW=3, HAS_BIAS=False, PUSH=False)),
        "box_weight_update": (X._box_weight_update_kernel, update_ptrs, dict(taps, TAPS=3)),
        # a tick's layers in one launch: their tensors' addresses are int64 arguments
        "box_grouped_forward": (X._grouped_box_forward_kernel, dict(table="*i64"),
                                dict(taps, PUSH=True, POOL=False,
                                     DTYPE=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")),
                                     BIAS=tl.float32, G_P2=16)),
        # chain stages the engine runs itself with a 1x2x2 max pool after the ReLU (C3D's blocks)
        "box_grouped_forward_pool": (X._grouped_box_forward_kernel, dict(table="*i64"),
                                     dict(taps, PUSH=True, POOL=True,
                                          DTYPE=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")),
                                          BIAS=tl.float32, G_P2=16)),
        # a tick's stage-first input gradients: the same kernel on the errors (one slot, no push)
        "box_grouped_input_grad": (X._grouped_box_forward_kernel, dict(table="*i64"),
                                   dict(KT=1, KH=3, KW=3, PUSH=False, POOL=False,
                                        DTYPE=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")),
                                        BIAS=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")), G_P2=16)),
        # chain stages' epilogues after forwards run elsewhere (cuDNN): no GEMM, TMA loads and stores
        "box_grouped_stage_epilogue": (X._grouped_stage_epilogue_kernel, dict(table="*i64"),
                                       dict(POOL=False, DTYPE=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")),
                                            BIAS=tl.float32, G_P2=16)),
        "box_grouped_stage_epilogue_pool": (X._grouped_stage_epilogue_kernel, dict(table="*i64"),
                                            dict(POOL=True,
                                                 DTYPE=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")),
                                                 BIAS=tl.float32, G_P2=16)),
        "box_grouped_weight_update": (X._grouped_box_weight_update_kernel, dict(partials="*fp32", table="*i64"),
                                      dict(taps, TAPS=3, DTYPE=getattr(tl, {"bf16": "bfloat16"}.get(dtype, "float32")),
                                           G_P2=16)),
        "grouped_weight_finish": (K._grouped_weight_finish_kernel, dict(partials="*fp32", table="*i64", hyper="*fp32"),
                                  dict(taps, SGD=sgd, NESTEROV=sgd, TARGET=tl.float32, G_P2=16)),
        # the bias gradient: the error's rows summed per channel (fp32 partials), then the partials
        "column_sum": (K._column_sum_kernel, dict(x=act, partials="*fp32"),
                       dict(BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_N, STAGES=cfg.num_stages)),
        "column_sum_finish": (K._column_sum_finish_kernel, dict(partials="*fp32", out="*fp32"),
                              dict(ACCUMULATE=kernel.endswith("_add"), BLOCK_P=cfg.BLOCK_K, BLOCK_C=cfg.BLOCK_N,
                                   STAGES=cfg.num_stages)),
        # the split-K box forward's second launch: the splits' fp32 partials summed, the bias, the cast
        "split_sum": (K._split_sum_kernel, dict(partials="*fp32", bias=master, out=act),
                      dict(HAS_BIAS=True, BLOCK=cfg.BLOCK_M)),
    }[base]
    if base in ("ring_conv_forward", "window_input_grad", "weight_update"):
        const.update(PRECISION="ieee" if dtype == "fp32" else "tf32")
    if base in ("ring_conv_forward", "weight_update"):  # the taps folded into K: an RGB stem's 3 channels
        # (_fold), or 1 in and 1 out per group (_depthwise: Triton's constants for ints equal to 1)
        const.update(FOLD=3 if kernel.endswith("_fold") else 1 if kernel.endswith("_depthwise") else 0)
    if kernel.endswith("_depthwise"):  # (the input gradient's too, which never folds; its summed weight's
        const.update(cg=1, mg=1, **({"w_o": 1} if base == "window_input_grad" else {}))  # w_o is cg)
    finish = base in ("weight_finish", "grouped_weight_finish")
    if not base.startswith(("column_sum", "split_sum")):
        meta = {k: v for k, v in cfg.meta().items() if k in fn.arg_names}  # (an epilogue has no BLOCK_K)
        const.update(dict(TAPS_P2=32, BLOCK_MC=cfg.BLOCK_M // 32) if finish else meta)
    if base == "weight_finish":
        const.update(DENSE=True)
    const.update({name: 1 for name in UNIT[base]})
    floats = {"lr", "momentum", "dampening", "weight_decay"}
    addresses = re.compile(r"[aerbtfwoc]\d+$")  # a grouped launch's tensors
    sig = {a: ptrs.get(a) or ("constexpr" if a in const else "fp32" if a in floats else
                              "i64" if base.startswith(("grouped", "box_grouped")) and addresses.match(a) else "i32")
           for a in fn.arg_names}
    any_int = kernels_module("configs").ANY_INT
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if sig[a] not in ("constexpr", "fp32") and a not in any_int and not (unaligned and sig[a] == "i32")}
    return fn, sig, const, aligned


def check(job: tuple) -> dict:
    kernel, arch, dtype, cfg = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    SHARED_MEMORY = kernels_module("configs").SHARED_MEMORY
    fn, sig, const, aligned = _signature(kernel, dtype, cfg)
    try:
        compiled = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as exc:  # noqa: BLE001 - reported as a failed line
        return dict(job=job, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    family = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"
    tma = "cp.async.bulk.tensor" in ptx
    pipelined = "async_copy" in ttgir or "async_tma" in ttgir
    # the box kernels walk their tiles in steps of the grid's size
    persistent = kernel.startswith("box") and re.search(r"get_num_programs\s+x", ttgir) is not None
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    shared = compiled.metadata.shared
    result = dict(job=job, regs=int(reg.group(1)) if reg else -1, stack=int(stack.group(1)) if stack else -1,
                  shared=shared, family=family, tma=tma, pipelined=pipelined, persistent=persistent)
    problems = []
    if result["stack"] > 0:
        problems.append(f"spills ({result['stack']} B of stack)")
    if shared > SHARED_MEMORY[arch]:
        problems.append(f"shared memory {shared} B over the limit {SHARED_MEMORY[arch]} B")
    if arch == 90 and dtype != "fp32" and family != "wgmma" and kernel not in NO_MMA:
        problems.append("16-bit on sm_90a without wgmma")
    if dtype != "fp32" and not pipelined and kernel not in NO_MMA[1:] and not gathers(kernel):
        # e.g. a mask or offset whose alignment Triton cannot see (split_sum: fp32; an epilogue: one
        # load; an unaligned problem: element loads, which cp.async's 4 bytes and more cannot take)
        problems.append("16-bit loads not software-pipelined (no async copies): num_stages has no effect")
    if kernel.startswith("box") and not tma:
        problems.append("a box kernel without TMA copies (cp.async.bulk.tensor)")
    if kernel.startswith("box") and not persistent:
        problems.append("a box kernel without its persistent tile loop")
    result["problems"] = problems
    return result


def jobs_for(archs, kernels, dtypes) -> list:
    configs = kernels_module("configs")
    jobs = []
    for arch in archs:
        for k in kernels:
            for d in dtypes:
                if k.startswith("box") and (arch != 90 or d == "fp32"):
                    continue  # the ops send the box kernels 16-bit work on sm_90 only
                if "weight_finish" in k or k.startswith("column_sum_finish"):
                    fixed = configs.FINISH if "weight_finish" in k else configs.COLUMN_SUM
                    jobs += [(k, arch, "fp32", fixed)] if d == "fp32" else []  # fp32 partials and weights
                    continue
                if k in ("column_sum", "split_sum"):
                    jobs.append((k, arch, d, configs.COLUMN_SUM if k == "column_sum" else configs.SPLIT_SUM))
                    continue
                jobs += [(k, arch, d, cfg) for cfg in configs.configs_for(KIND[k], arch, 4 if d == "fp32" else 2,
                                                                          is_aligned=not gathers(k))]
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, choices=(90, 80), action="append")
    p.add_argument("--kernel", choices=KERNELS, action="append")
    p.add_argument("--dtype", choices=DTYPES, action="append")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    import triton
    jobs = jobs_for(args.arch or (90, 80), args.kernel or KERNELS, args.dtype or DTYPES)
    print(f"gpu-check with Triton {triton.__version__}", flush=True)
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(check, jobs):
            kernel, arch, dtype, cfg = r["job"]
            head = f"{kernel:<22} sm_{arch}{'a' if arch == 90 else ' '} {dtype:<4} {cfg.name:<24}"
            if "error" in r:
                failed += 1
                print(f"{head} FAILED to compile: {r['error']}", flush=True)
                continue
            what = [r["family"]] + [name for name in ("tma", "pipelined", "persistent") if r[name]]
            if "weight_update" in kernel:
                what.append("split-K")
            line = (f"{head} regs {r['regs']:3d} stack {r['stack']:5d} B shared {r['shared'] // 1024:3d} KiB "
                    f"{' '.join(what)}")
            if r["problems"]:
                failed += 1
                line += "  FAIL: " + "; ".join(r["problems"])
            print(line, flush=True)
    print(f"gpu-check (Triton {triton.__version__}): {len(jobs)} kernel/config/arch/dtype compiles, {failed} failed",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

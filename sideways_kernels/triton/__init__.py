"""The sideways ops as Triton kernels, registered with ``torch.library.triton_op`` in the
``sideways_triton`` namespace (same signatures as ``torch.ops.sideways``), so
``torch.compile`` can trace them on a GPU. On CPU tensors they run under the Triton
interpreter: set ``TRITON_INTERPRET=1`` before this module is imported.

Tiles: on a GPU, ``triton.autotune`` picks each kernel's config from its architecture's list
(:mod:`.configs`, pruned by shared memory and the problem's size), keyed on the problem's shape
and dtype, restoring every in-place output between trials; under the interpreter one config
runs (:func:`using` chooses it: the tests run every config of every list). The weight update
splits its reduction over several programs per tile when the tiles alone would not fill the
SMs, with a deterministic last-program epilogue (kernels.py).

``launches`` counts kernel launches per op: proof that a pipeline really ran Triton.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import weakref
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime import _allocation  # the allocator's context variable (the same in Triton 3.6 and 3.9)
from triton.runtime import _async_compile  # AsyncCompileMode's context variable (the same in 3.6 and 3.9)

from .. import forms
from . import boxes as X
from . import kernels as K
from .configs import (COLUMN_SUM, DEFAULT, DEFAULT_BOX, FINISH, FOLD_CHANNELS, SMALL_CHANNELS, SPLIT_SUM, Config,
                      aligned, channel_block, configs_for, fit_channels, prune, prune_boxes, split_k)
from ..ops import conv_output_size, ring_output_hw
from ..reference import sgd_step

__all__ = ["ring_conv_forward", "window_input_grad", "weight_grad_accumulate", "sgd_tick_update",
           "grouped_weight_updates", "grouped_ring_conv_forwards", "grouped_window_input_grads", "bias_grad",
           "launches", "using", "picked"]

launches: collections.Counter = collections.Counter()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_chosen: dict = {"config": None, "box_config": None, "split": None, "gemm_split": None, "path": None,
                 "rotation": 0}  # set by using()
_autotuned: dict = {}  # (kernel name, capability, element size, aligned) -> autotuned kernel
_latest: dict = {}  # (kernel name, capability, element size) -> the key of its last autotuned launch
_derived: dict = {}  # (id(weight), summed, flipped) -> (weak reference to it, version, dtype, the weight as read)


@contextlib.contextmanager
def using(config: Optional[Config] = None, split: Optional[int] = None, box_config: Optional[Config] = None,
          path: Optional[str] = None, rotation: int = 0, gemm_split: Optional[int] = None):
    """Run the general kernels with ``config`` and the box kernels with ``box_config`` (instead of
    the autotuner's or the interpreter's default), the weight update with ``split`` programs per
    tile and the box forward and input gradient with ``gemm_split`` (instead of the SM-based
    choices), and every op on ``path``: "box" (refusing a problem
    the box kernels cannot take; float32 allowed, for exact tests), "general", or None (the
    choice of :func:`box_path`). ``rotation`` renumbers the weight update's splits, so that
    another split arrives last (tests of its determinism)."""
    if path not in (None, "box", "general"):
        raise ValueError(f"path must be 'box', 'general' or None, got {path!r}")
    before = dict(_chosen)
    _chosen.update(config=config, split=split, box_config=box_config, path=path, rotation=rotation,
                   gemm_split=gemm_split)
    try:
        yield
    finally:
        _chosen.update(before)


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# Each kernel's GEMM (M, N) and element size from its arguments: what the autotuner keys and
# prunes on (it sees only the kernel's own arguments); for the box kernels also the frame their
# boxes walk and which block of a config is the box.
_PROBLEM = {
    "ring_conv_forward": lambda a: (a["B"] * a["H_OUT"] * a["W_OUT"], a["mg"], a["ring"]),  # (per group)
    "window_input_grad": lambda a: (a["B"] * a["H"] * a["W"], a["cg"], a["grad_out"]),
    "weight_update": lambda a: (a["mg"], a["cg"], a["ring"]),  # a tile: one tap
    "box_forward": lambda a: (a["B"] * a["H_OUT"] * a["W_OUT"], a["C_OUT"], a["ring"]),
    "box_input_grad": lambda a: (a["B"] * a["H_OUT"] * a["W_OUT"], a["C_OUT"], a["ring"]),  # the forward's kernel
    "box_weight_update": lambda a: (a["C_OUT"], a["C"], a["ring"]),
}
_BOXES = {  # box kernel -> (the frame its boxes walk, the config's box size)
    "box_forward": (lambda a: (a["H_OUT"], a["W_OUT"]), lambda c: c.BLOCK_M),
    "box_input_grad": (lambda a: (a["H_OUT"], a["W_OUT"]), lambda c: c.BLOCK_M),
    "box_weight_update": (lambda a: (a["H_OUT"], a["W_OUT"]), lambda c: c.BLOCK_K),
}


def _folded_channels(a: dict) -> int:
    """What a general forward's or weight update's K step or tile walks: its channels per group,
    or with ``FOLD`` every tap's of them."""
    return a["cg"] * a["KT"] * a["KH"] * a["KW"] if a.get("FOLD") else a["cg"]


# kernel -> (the channels its K loop or tile steps through, the config's block of them: a forward's
# and input gradient's K step, a weight update tile's input channels — or, folded, its (tap,
# channel) pairs): SMALL_CHANNELS wide for problems of that many or fewer (configs.fit_channels)
_CHANNEL_BLOCK = {"ring_conv_forward": (_folded_channels, "BLOCK_K"),
                  "window_input_grad": (lambda a: a["mg"], "BLOCK_K"),
                  "weight_update": (_folded_channels, "BLOCK_N"),
                  "box_forward": (lambda a: a["C"], "BLOCK_K"), "box_input_grad": (lambda a: a["C"], "BLOCK_K"),
                  "box_weight_update": (lambda a: a["C"], "BLOCK_N")}
# the autotuner's keys: a box kernel's channels, a general one's per group (a group a grid row)
_KEYS = {name: ["B", "C", "H", "W", "C_OUT", "H_OUT", "W_OUT"] if name.startswith("box") else
         ["B", "cg", "H", "W", "mg", "H_OUT", "W_OUT"] for name in _PROBLEM}
_KIND = {"ring_conv_forward": "gemm", "window_input_grad": "gemm", "weight_update": "weight_update",
         "box_forward": "box_gemm", "box_input_grad": "box_gemm", "box_weight_update": "box_weight_update"}


def folds(channels_per_group: int) -> bool:
    """Whether the general kernels fold a problem's taps into K (configs.FOLD_CHANNELS)."""
    return channels_per_group <= FOLD_CHANNELS


def _fold(channels_per_group: int) -> int:
    """The general kernels' ``FOLD``: the channels per group where they fold (a constant of the
    compiled kernel, so its gather's divisions by it are cheap), else 0."""
    return channels_per_group if folds(channels_per_group) else 0


def _as_config(c) -> Config:
    """A ``triton.Config`` of our lists back as a :class:`Config`."""
    k = c.kwargs
    return Config(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, c.num_warps, k.get("BOX_W", 0))


def _launch(kernel, name: str, grid, args: list, meta: dict, device, element_size: int = 2, channels: int = 0):
    """One launch of ``kernel``: with the chosen config, the interpreter's default, or the
    autotuner's pick over its kind's list for the architecture and activation size, pruned for
    the problem. ``grid(config)``. ``channels``: a box kernel's C, whose block the interpreter's
    default narrows where the grouped launches do (:data:`_CHANNEL_BLOCK`)."""
    box = name.startswith("box")
    cfg = _chosen["box_config" if box else "config"]
    if cfg is None and (INTERPRET or device.type != "cuda"):
        field = _CHANNEL_BLOCK[name][1]  # (a box kernel's: narrowed as the grouped launches narrow it)
        cfg = DEFAULT if not box else \
            DEFAULT_BOX._replace(**{field: channel_block(channels, getattr(DEFAULT_BOX, field))})
    if cfg is not None:
        wrap_triton(kernel)[grid(cfg)](*args, **meta, **cfg.meta(), num_warps=cfg.num_warps,
                                       num_stages=cfg.num_stages)
        return
    capability = _capability(device)
    key = (name, capability, element_size, _takes_aligned(name, kernel, args))
    _latest[key[:3]] = key
    if key not in _autotuned:
        _autotuned[key] = _autotuner(kernel, name, capability, element_size, key[-1])
    wrap_triton(_autotuned[key])[lambda META: grid(Config(META["BLOCK_M"], META["BLOCK_N"], META["BLOCK_K"], 0, 0,
                                                          META.get("BOX_W", 0)))](*args, **meta)


def _autotuner(kernel, name: str, capability: int, element_size: int, is_aligned: bool):
    """``triton.autotune`` of ``kernel`` over its kind's list for the architecture, activation size
    and alignment (:func:`.configs.configs_for`), pruned for each problem, compiling the configs it
    is about to time in parallel (:func:`_compiling_before_timing`)."""
    box = name.startswith("box")

    def early_prune(configs, named_args, **kwargs):
        problem = {**named_args, **kwargs}
        m, n, tensor = _PROBLEM[name](problem)
        ours = [_as_config(c) for c in configs]
        channels, block = _CHANNEL_BLOCK[name]
        keep = fit_channels(prune(ours, m, n, tensor.element_size(), capability), channels(problem),
                            lambda c: getattr(c, block))
        if box:
            frame, positions_of = _BOXES[name]
            keep = prune_boxes(keep, *frame(problem), positions_of)
        names = {c.name for c in keep}
        return [c for c, o in zip(configs, ours) if o.name in names]
    configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)
               for c in configs_for(_KIND[name], capability, element_size, is_aligned)]
    return _compiling_before_timing(triton.autotune(configs, key=_KEYS[name],
                                                    prune_configs_by={"early_config_prune": early_prune})(kernel))


def _compile_threads() -> int:
    """The threads that compile an autotuner's configs at once: ``SIDEWAYS_TRITON_COMPILE_THREADS``,
    else the CPUs, at most 8."""
    raw = os.environ.get("SIDEWAYS_TRITON_COMPILE_THREADS")
    if raw is None:
        return max(1, min(8, os.cpu_count() or 1))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"SIDEWAYS_TRITON_COMPILE_THREADS must be an int >= 1, got {raw!r}")
    return int(raw)


def _compiling_before_timing(tuner):
    """``tuner``, compiling the configs it is about to time for a new problem in parallel threads
    first (``triton.AsyncCompileMode``), so that timing finds each one compiled. Triton compiles
    each config as it times it, one after another: about a second each for our kernels (on this
    project's CPU), so a list of 5-9 configs costs seconds for every new shape — the GPU runs'
    test phases passed 4-10 tests a minute. Its compiler releases the GIL, so threads overlap
    (``bench/autotune_compile.py``: 4 box-forward configs on 2 CPUs, 3.2 s -> 1.6 s). A config that
    fails to compile fails again, as before, when it is timed (the autotuner skips it)."""
    prune = tuner.prune_configs

    def prune_and_compile(kwargs: dict) -> list:
        configs = prune(kwargs)
        threads = min(len(configs), _compile_threads())
        # (the launch's positional arguments, as Autotuner.run bound them: Triton 3.6 to 3.9 does)
        if threads > 1 and _async_compile.active_mode.get() is None and getattr(tuner, "nargs", None):
            args = list(tuner.nargs.values())
            meta = {k: v for k, v in kwargs.items() if k != "warmup"}
            with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
                    triton.AsyncCompileMode(pool, ignore_errors=True):
                for config in configs:
                    tuner.fn.warmup(*args, **meta, **config.all_kwargs())
        return configs

    tuner.prune_configs = prune_and_compile
    return tuner


def _takes_aligned(name: str, kernel, args: list) -> bool:
    """Whether a launch's autotuner takes its kind's CONFIGS lists — a box kernel always; a general
    one where :func:`.configs.aligned` (its channel counts and strides multiples of 16) and every
    tensor starts 16 bytes into its storage (whose start torch's allocators align; read so, not
    by address, since torch.compile traces the ops on tensors that have none) — or the UNALIGNED
    ones (a folded launch's few channels are never aligned: its gather loads element by element)."""
    if name.startswith("box"):
        return True
    named = dict(zip(kernel.arg_names, args))
    return aligned({n: v for n, v in named.items() if isinstance(v, int)}) and all(
        v.storage_offset() * v.element_size() % 16 == 0 for v in named.values() if isinstance(v, torch.Tensor))


def picked(name: str, device: torch.device, element_size: int = 2) -> Optional[str]:
    """The config the autotuner last chose for kernel ``name`` (``"ring_conv_forward"``,
    ``"window_input_grad"``, ``"weight_update"``, or a box kernel: ``"box_forward"``,
    ``"box_input_grad"``, ``"box_weight_update"``; the weight update's SGD step and accumulation
    share its GEMM)
    on ``device``, or None before it has run there."""
    best = getattr(_autotuned.get(_latest.get((name, _capability(device), element_size))), "best_config", None)
    return None if best is None else _as_config(best).name


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _geometry(ring, slot, weight, stride, padding, dilation, dilation_t, groups):
    """Every check csrc/checks.h makes, for a backend with no C++ in front of it."""
    _check(ring.dim() == 5, f"ring must be 5-D [R, B, C, H, W], got shape {tuple(ring.shape)}")
    _check(ring.dtype in DTYPES, f"the Triton backend runs {DTYPES}; ring is {ring.dtype}")
    _check(weight.dim() == 5, f"weight must be 5-D [C_out, C/groups, k_t, k_h, k_w], got shape {tuple(weight.shape)}")
    _check(weight.device == ring.device, f"weight must be on {ring.device} like ring, got {weight.device}")
    _check(len(stride) == 2 and min(stride) >= 1, f"stride must be 2 entries >= 1, got {stride}")
    _check(len(padding) == 2 and min(padding) >= 0, f"padding must be 2 entries >= 0, got {padding}")
    _check(len(dilation) == 2 and min(dilation) >= 1, f"dilation must be 2 entries >= 1, got {dilation}")
    _check(dilation_t >= 1 and groups >= 1, f"dilation_t and groups must be >= 1, got {dilation_t}, {groups}")
    R, B, C, H, W = ring.shape
    c_out, _, k_t, k_h, k_w = weight.shape
    _check(C % groups == 0 and c_out % groups == 0 and weight.shape[1] * groups == C,
           f"weight.size(1) must be C/groups = {C // groups} and groups must divide C ({C}) and C_out ({c_out})")
    _check(R == dilation_t * (k_t - 1) + 1, f"ring.size(0) must be dilation_t*(k_t-1)+1 = {dilation_t * (k_t - 1) + 1}")
    _check(0 <= slot < R, f"slot must be in [0, {R}), got {slot}")
    h_out = conv_output_size(H, k_h, stride[0], padding[0], dilation[0])
    w_out = conv_output_size(W, k_w, stride[1], padding[1], dilation[1])
    _check(h_out >= 1 and w_out >= 1, "padded input is smaller than the dilated kernel")
    return R, B, C, H, W, c_out, k_t, k_h, k_w, h_out, w_out


def _check_grad_out(grad_out, ring, B, c_out, h_out, w_out):
    _check(tuple(grad_out.shape) == (B, c_out, h_out, w_out),
           f"grad_out must have shape {(B, c_out, h_out, w_out)}, got {tuple(grad_out.shape)}")
    _check(grad_out.dtype == ring.dtype and grad_out.device == ring.device, "grad_out must match the ring's dtype and device")


paths: collections.Counter = collections.Counter()  # (op, "box" | "general") -> launches


def _tma_strides(t: torch.Tensor) -> Optional[list]:
    """``t``'s strides as a TMA descriptor takes them, channels (dim 1 of a frame, dim 2 of a
    ring) innermost, or None where a descriptor cannot describe it: channels not unit-stride, or
    another stride or the base not 16-byte aligned. A dimension of size 1 is never stepped, so
    its stride is free: 16 bytes stands in for whatever torch put there."""
    channels = t.dim() - 3
    size = t.element_size()
    if t.stride(channels) != 1 or t.data_ptr() % 16:
        return None
    strides = [st if n > 1 else 16 // size for d, (st, n) in enumerate(zip(t.stride(), t.shape)) if d != channels]
    if any(st <= 0 or st * size % 16 for st in strides):
        return None
    return strides


def box_path(device: torch.device, dtype: torch.dtype, stride, groups: int, channels: tuple, tensors: tuple) -> Optional[str]:
    """Why a problem cannot take the box kernels (boxes.py), or None when it can: they need TMA
    (an sm_90+ GPU, or the interpreter), 16-bit activations, spatial stride 1 (a box cannot skip
    positions; padding and dilation are shifts, which boxes express), one group, ``channels``
    (the counts the weights' descriptors step by: a forward's and a weight update's output
    channels, an input gradient's both) in whole 16-byte rows, and ``tensors`` (rings, frames)
    with channels innermost and 16-byte aligned strides and base — a ring of few channels (the
    RGB stem's 3) stored in 16-byte rows (``ops.empty_ring(..., aligned=True)``) has them, and
    its descriptor zero-fills the channels past its own.
    ``using(path=...)`` overrides: "general" always, "box" also for float32 (exact tests)."""
    forced = _chosen["path"]
    if forced == "general":
        return "the general path was chosen (using(path='general'))"
    if device.type == "cuda" and _capability(device) < 90:
        return f"TMA needs sm_90 or newer (this GPU is sm_{_capability(device)})"
    if dtype not in (torch.float16, torch.bfloat16) and forced != "box":
        return f"{dtype} activations run the general path's exact fp32 (the box kernels are for 16-bit)"
    if list(stride) != [1, 1]:
        return f"spatial stride {tuple(stride)} (a box cannot skip positions)"
    if groups != 1:
        return f"groups={groups}"
    size = torch.tensor([], dtype=dtype).element_size()
    if any(c * size % 16 for c in channels):
        return f"channel counts {channels} are not multiples of {16 // size} (16-byte rows)"
    for t in tensors:
        if _tma_strides(t) is None:
            c = t.shape[t.dim() - 3]
            if t.stride(t.dim() - 3) == 1 and c * size % 16:
                return f"{c} channels in rows of {c}, not whole 16-byte units (ops.empty_ring(..., aligned=True))"
            return "a tensor's channels are not innermost, or its strides or base are not 16-byte aligned"
    return None


def _take_box(op: str, reason: Optional[str]) -> bool:
    """Count the path ``op`` takes; refuse when the box path was forced and cannot be taken."""
    if reason is not None and _chosen["path"] == "box":
        raise ValueError(f"using(path='box') but {op} cannot take the box kernels: {reason}")
    paths[(op, "general" if reason else "box")] += 1
    return reason is None


def _descriptor_scratch(device: torch.device) -> None:
    """Tensor descriptors made on the device need a little global scratch for the TMA
    descriptors; Triton asks its allocator for it (torch's caching allocator, so CUDA-graph
    captures take it from their pool). Triton keeps the allocator in a context variable, which
    every thread starts without (a pipeline's stage threads among them): so it is checked on
    every call and installed where the calling thread has none, never over one the user set."""
    if device.type != "cuda":
        return
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _persistent(tiles: int, device: torch.device):
    """A persistent grid: one program per SM (never more programs than work)."""
    return (max(1, min(tiles, _sms(device))),)


@triton_op("sideways_triton::ring_conv_forward", mutates_args={"ring"})
def ring_conv_forward(ring: torch.Tensor, frame: Optional[torch.Tensor], slot: int, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride: List[int], padding: List[int], dilation: List[int],
                      dilation_t: int, groups: int) -> torch.Tensor:
    R, B, C, H, W, c_out, k_t, k_h, k_w, h_out, w_out = _forward_geometry(ring, frame, slot, weight, bias, stride,
                                                                           padding, dilation, dilation_t, groups)
    out = torch.empty((B, c_out, h_out, w_out), dtype=ring.dtype, device=ring.device, memory_format=torch.channels_last)
    weight = _weight_as(weight, ring.dtype)
    launches["ring_conv_forward"] += 1
    if _take_box("ring_conv_forward", box_path(ring.device, ring.dtype, stride, groups, (c_out,), (ring,))):
        if frame is not None and _tma_strides(frame) is None:  # (the video's own frames: channels not innermost)
            _push(ring, slot, frame)
            frame = None
        _box_gemm("box_forward", ring, weight, bias, out, R, slot, padding, dilation, dilation_t, (k_t, k_h, k_w),
                  frame)
        return out
    if frame is not None:
        _push(ring, slot, frame)
    M, N = B * h_out * w_out, c_out // groups
    _launch(K._ring_conv_forward_kernel, "ring_conv_forward",
            lambda cfg: (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N), groups),
            [ring, weight, bias if bias is not None else weight, out, *ring.stride(), *weight.stride(), *out.stride(),
             B, C // groups, H, W, N, h_out, w_out, R, slot, *stride, *padding, *dilation, dilation_t],
            dict(KT=k_t, KH=k_h, KW=k_w, HAS_BIAS=bias is not None, PRECISION=_precision(ring.dtype),
                 FOLD=_fold(C // groups)), ring.device, element_size=ring.element_size())
    return out


def _forward_geometry(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t, groups) -> tuple:
    """:func:`_geometry`, and the checks of a forward's frame and bias."""
    geometry = _geometry(ring, slot, weight, stride, padding, dilation, dilation_t, groups)
    _, B, C, H, W, c_out = geometry[:6]
    if frame is not None:
        _check(tuple(frame.shape) == (B, C, H, W) and frame.dtype == ring.dtype, "frame must be [B, C, H, W] like the ring")
        _check(frame.device == ring.device, f"frame must be on {ring.device} like ring, got {frame.device}")
    if bias is not None:
        _check(tuple(bias.shape) == (c_out,), f"bias must have shape [{c_out}], got {tuple(bias.shape)}")
    return geometry


def _push(ring: torch.Tensor, slot: int, frame: torch.Tensor) -> None:
    """The frame into its ring slot as a launch of its own (the box forward pushes it itself)."""
    launches["ring_push"] += 1
    ring[slot].copy_(frame)


@triton_op("sideways_triton::window_input_grad", mutates_args={})
def window_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_size: List[int], stride: List[int],
                      padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    B, c_out, h_out, w_out, cg, H, W, k_h, k_w = _input_grad_geometry(grad_out, weight, input_size, stride, padding,
                                                                      dilation, groups)
    grad_in = torch.empty((B, cg * groups, H, W), dtype=grad_out.dtype, device=grad_out.device,
                          memory_format=torch.channels_last)
    launches["window_input_grad"] += 1
    if _take_box("window_input_grad", box_path(grad_out.device, grad_out.dtype, stride, groups, (cg, c_out),
                                               (grad_out,))):
        box = _input_grad_box(grad_out, weight, padding, dilation, grad_in)
        _box_gemm("box_input_grad", box.ring, box.weight, None, grad_in, 1, 0, box.padding, dilation, 1, box.taps)
        return grad_in
    summed = _weight_as(weight, grad_out.dtype, summed=True)
    M, N = B * H * W, cg
    _launch(K._window_input_grad_kernel, "window_input_grad",
            lambda cfg: (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N), groups),
            [grad_out, summed, grad_in, *grad_out.stride(), *summed.stride(), *grad_in.stride(),
             B, cg, H, W, c_out // groups, h_out, w_out, *stride, *padding, *dilation],
            dict(KH=k_h, KW=k_w, PRECISION=_precision(grad_out.dtype)), grad_out.device,
            element_size=grad_out.element_size())
    return grad_in


def _input_grad_geometry(grad_out, weight, input_size, stride, padding, dilation, groups) -> tuple:
    """The checks of an input gradient's arguments: B, C_out, H', W', C/groups, H, W, k_h, k_w."""
    _check(grad_out.dim() == 4 and weight.dim() == 5, "grad_out must be 4-D and weight 5-D")
    _check(grad_out.dtype in DTYPES, f"the Triton backend runs {DTYPES}; grad_out is {grad_out.dtype}")
    B, c_out, h_out, w_out = grad_out.shape
    _check(weight.shape[0] == c_out and c_out % groups == 0, "grad_out.size(1) must be weight.size(0), divisible by groups")
    H, W = input_size
    k_h, k_w = weight.shape[3:]
    _check(conv_output_size(H, k_h, stride[0], padding[0], dilation[0]) == h_out
           and conv_output_size(W, k_w, stride[1], padding[1], dilation[1]) == w_out,
           f"grad_out's {h_out}x{w_out} is not the conv output size for input_size {input_size}")
    return B, c_out, h_out, w_out, weight.shape[1], H, W, k_h, k_w


def _box_gemm(name: str, ring, weight, bias, out, R: int, slot: int, padding, dilation, dilation_t: int, taps: tuple,
              frame: Optional[torch.Tensor] = None):
    """:func:`.boxes._box_forward_kernel` (``name``: "box_forward", or "box_input_grad" on the error
    as a one-slot ring) into ``out`` ``[B, C_OUT, H_OUT, W_OUT]`` (dense channels-last), split over
    K where its tiles would leave SMs idle (:func:`_box_gemm_splits`), the splits' partials then
    summed by :func:`.kernels._split_sum_kernel`. ``frame`` (channels innermost): pushed into
    ``slot`` by the same launch."""
    _, B, C, H, W = ring.shape
    _, c_out, h_out, w_out = out.shape
    device = ring.device
    splits = _box_gemm_splits(B, C, c_out, h_out, w_out, math.prod(taps), _sms(device))
    partials = _partials(device, splits * out.numel()) if splits > 1 else _never_written(device)
    _descriptor_scratch(device)
    tiles = lambda cfg: (B * triton.cdiv(h_out, cfg.BLOCK_M // cfg.BOX_W) * triton.cdiv(w_out, cfg.BOX_W)
                         * triton.cdiv(c_out, cfg.BLOCK_N))
    k_t, k_h, k_w = taps
    _launch(X._box_forward_kernel, name, lambda cfg: _persistent(tiles(cfg) * splits, device),
            [ring, frame if frame is not None else ring, weight, bias if bias is not None else weight, out, partials,
             *_tma_strides(ring), *(_tma_strides(frame) if frame is not None else [0, 0, 0]), *_tma_strides(out),
             B, C, H, W, c_out, h_out, w_out, R, slot, *padding, *dilation, dilation_t, splits],
            dict(KT=k_t, KH=k_h, KW=k_w, HAS_BIAS=bias is not None, PUSH=frame is not None), device,
            element_size=ring.element_size(), channels=C)
    if splits > 1:
        launches["split_sum"] += 1
        block = SPLIT_SUM.BLOCK_M
        wrap_triton(K._split_sum_kernel)[(triton.cdiv(out.numel(), block),)](
            partials, bias if bias is not None else out, out, splits, out.numel(), c_out, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=SPLIT_SUM.num_warps)


def _box_gemm_splits(B: int, C: int, c_out: int, h_out: int, w_out: int, taps: int, sms: int) -> int:
    """The box forward's (and input gradient's) split count on a GPU of ``sms`` SMs (what
    ``using(gemm_split=...)`` overrides): :func:`.configs.split_k` for 128x128 tiles of 8x16
    positions, over K steps of 64 channels of a tap (``C``: the channels read)."""
    if _chosen["gemm_split"]:
        return _chosen["gemm_split"]
    tiles = B * triton.cdiv(h_out, 8) * triton.cdiv(w_out, 16) * triton.cdiv(c_out, 128)
    return split_k(tiles, taps * triton.cdiv(C, 64), 1, sms)


def _weight_as(weight: torch.Tensor, dtype: torch.dtype, summed: bool = False, flipped: bool = False) -> torch.Tensor:
    """The weight as the GEMMs read it: in the activations' dtype (float32 masters meet 16-bit
    activations as autocast rounds them, and the tensor cores read 16-bit operands), laid out so
    that for each tap the [reduction, N] operand is dense with N innermost (output channels for
    the forward: memory [k_t, k_h, k_w, C/groups, C_out]; input channels for the input gradient,
    whose operand is the taps' sum: memory [k_h, k_w, C_out, C/groups]; ``flipped``: that sum
    with its spatial taps reversed, for the box kernels' input gradient) — unit-stride vectors
    Triton can load 16 bytes at a time and pipeline. Same shape and indexing as the weight.
    Made once per version of that weight tensor (every in-place update bumps ``_version``, this
    module's fused SGD op too: a triton_op bumps the arguments it declares mutated). Inside a
    CUDA-graph capture or a compile it is always computed, so a replay recomputes it — but in a
    run that holds the weight's forms (:mod:`..forms`: no weight changes within it) the one made
    at the run's start is read, in a capture too."""
    held = forms.get(weight, ("triton", dtype, summed, flipped))
    if held is not None:
        return held
    make = functools.partial(_derive, weight, dtype, summed, flipped)
    capturing = weight.is_cuda and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing or weight._base is not None:
        return make()  # a view (a clip edge's live taps) is a new tensor every call: nothing to reuse
    key = (id(weight), summed, flipped)
    cached = _derived.get(key)
    if cached is not None and cached[0]() is weight and cached[1] == weight._version and cached[2] == dtype:
        return cached[3]
    result = make()
    _derived[key] = (weakref.ref(weight, functools.partial(_forget, key)), weight._version, dtype, result)
    return result


def _derive(weight: torch.Tensor, dtype: torch.dtype, summed: bool, flipped: bool) -> torch.Tensor:
    if summed:  # [C_out, C/groups, k_h, k_w], memory [k_h, k_w, C_out, C/groups]
        taps = weight.sum(2).flip(2, 3) if flipped else weight.sum(2)
        return taps.to(dtype).permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    return weight.to(dtype).permute(2, 3, 4, 1, 0).contiguous().permute(4, 3, 0, 1, 2)


def forms_of(weight: torch.Tensor, dtype: torch.dtype, forward: bool, input_grad: bool) -> list:
    """(weight, key, make) of the forms this backend's ``forward`` and ``input_grad`` read (the
    input gradient's taps' sum both ways: the box kernel's flipped in space, the general one's
    not), for a run that holds them (:mod:`..forms`)."""
    kinds = ([(False, False)] if forward else []) + ([(True, False), (True, True)] if input_grad else [])
    return [(weight, ("triton", dtype, summed, flipped), functools.partial(_derive, weight, dtype, summed, flipped))
            for summed, flipped in kinds]


def _forget(key, _gone) -> None:
    """A weight died: its derived copy goes with it (else the entry would hold that memory for good)."""
    cache = _derived
    if cache is not None:
        entry = cache.get(key)
        if entry is not None and entry[0]() is None:
            del cache[key]


def _launch_weight_update(target, buffer, grad_out, ring, slot, stride, padding, dilation, dilation_t, groups,
                          hyper=(0.0, 0.0, 0.0, 0.0), sgd=False, nesterov=False, first_step=False):
    """Two launches: the split-K GEMM leaves every split's fp32 partial of dW (box or general
    kernel), then :func:`.kernels._weight_finish_kernel` sums them and updates ``target``."""
    R, B, C, H, W, c_out, k_t, k_h, k_w, h_out, w_out = _geometry(ring, slot, target, stride, padding, dilation,
                                                                   dilation_t, groups)
    _check_grad_out(grad_out, ring, B, c_out, h_out, w_out)
    if buffer is not None:
        _check(buffer.shape == target.shape and buffer.stride() == target.stride() and buffer.dtype == target.dtype,
               "momentum_buffer must match the weight's shape, layout and dtype")
    device = ring.device
    taps, K_total, cg = k_t * k_h * k_w, B * h_out * w_out, C // groups
    shape = dict(KT=k_t, KH=k_h, KW=k_w)
    box = _take_box("weight_update", box_path(device, ring.dtype, stride, groups, (c_out,), (ring, grad_out)))
    per_tile = _taps_per_tile(taps) if box else 1
    # a kernel argument (the finish's too), so one value for every config the autotuner tries
    fold = not box and folds(cg)
    splits = _chosen["split"] or _weight_update_splits(c_out, cg, groups, taps, per_tile, K_total, device, fold)
    partials = _partials(device, splits * taps * c_out * cg)
    if box:
        _descriptor_scratch(device)
        tiles_of = lambda cfg: triton.cdiv(c_out, cfg.BLOCK_M) * triton.cdiv(C, cfg.BLOCK_N) * (taps // per_tile)
        _launch(X._box_weight_update_kernel, "box_weight_update", lambda cfg: _persistent(tiles_of(cfg) * splits, device),
                [grad_out, ring, partials, *_tma_strides(grad_out), *_tma_strides(ring), B, C, H, W, c_out, h_out,
                 w_out, R, slot, *padding, *dilation, dilation_t, splits, _chosen["rotation"]],
                dict(**shape, TAPS=per_tile), device, element_size=ring.element_size(), channels=C)
    else:  # output tiles: BLOCK_M output channels x BLOCK_N input channels of one tap (or BLOCK_N pairs)
        columns = (lambda cfg: triton.cdiv(taps * cg, cfg.BLOCK_N)) if fold else \
            (lambda cfg: taps * triton.cdiv(cg, cfg.BLOCK_N))
        tiles_of = lambda cfg: triton.cdiv(c_out // groups, cfg.BLOCK_M) * columns(cfg)
        _launch(K._weight_update_kernel, "weight_update", lambda cfg: (tiles_of(cfg), splits, groups),
                [grad_out, ring, partials, *grad_out.stride(), *ring.stride(), B, cg, H, W, c_out // groups, h_out,
                 w_out, R, slot, *stride, *padding, *dilation, dilation_t, _chosen["rotation"]],
                dict(**shape, PRECISION=_precision(ring.dtype), FOLD=_fold(cg)), device,
                element_size=ring.element_size())
    taps_p2 = triton.next_power_of_2(taps)
    pairs = max(1, FINISH.BLOCK_M // taps_p2)  # (output, input channel) pairs a program, every tap of each
    wrap_triton(K._weight_finish_kernel)[(triton.cdiv(c_out * cg, pairs),)](
        partials, target, buffer if buffer is not None else target, splits, c_out, cg, *target.stride(), *hyper,
        **shape, SGD=sgd, HAS_BUFFER=buffer is not None, NESTEROV=nesterov, FIRST_STEP=first_step,
        DENSE=target.is_contiguous(), TAPS_P2=taps_p2, BLOCK_MC=pairs, num_warps=FINISH.num_warps)


def _taps_per_tile(taps: int) -> int:
    """Taps a box weight-update tile takes (one accumulator each), sharing each error box it loads."""
    return 3 if taps % 3 == 0 else 2 if taps % 2 == 0 else 1


def _check_sgd(momentum_buffer, momentum: float, dampening: float, nesterov: bool) -> None:
    """The SGD step's own checks, as torch.optim.SGD makes them."""
    _check(momentum == 0 or momentum_buffer is not None, "momentum_buffer is required when momentum != 0")
    _check(not nesterov or (momentum > 0 and dampening == 0), "nesterov needs momentum > 0 and dampening == 0")


def _weight_update_splits(c_out: int, cg: int, groups: int, taps: int, per_tile: int, positions: int,
                         device: torch.device, fold: bool = False) -> int:
    """The weight update's split count (what ``using(split=...)`` overrides): :func:`.configs.split_k`
    for 128x64 tiles of ``per_tile`` taps, or of 64 (tap, channel) pairs where the general kernel
    ``fold``s (smaller tiles give more work items, which the box kernel's persistent programs walk
    and the general kernel's grid holds)."""
    columns = triton.cdiv(taps * cg, 64) if fold else triton.cdiv(cg, 64) * (taps // per_tile)
    tiles = groups * triton.cdiv(c_out // groups, 128) * columns
    return split_k(tiles, positions, 64, _sms(device))


def _partials(device: torch.device, floats: int) -> torch.Tensor:
    """The split-K weight update's fp32 partials, ``[splits, taps, C_out, C_in/groups]``: fresh
    per call (from the caching allocator), so two streams' updates never share them."""
    return torch.empty(max(floats, 1), dtype=torch.float32, device=device)


_NEVER_WRITTEN: dict = {}


def _never_written(device: torch.device) -> torch.Tensor:
    """One fp32 per device for a pointer argument the launch never touches (an unsplit box GEMM's
    partials): made once, not allocated at every call."""
    t = _NEVER_WRITTEN.get(device)
    if t is None:
        t = _NEVER_WRITTEN[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


# --- every layer's weight update of a tick in one launch ------------------------------------


@dataclasses.dataclass
class _Update:
    """One layer's weight update, from the arguments of ``weight_grad_accumulate`` (``target``: the
    gradients, added to) or of ``sgd_tick_update`` (``target``: the weight, stepped)."""
    target: torch.Tensor
    buffer: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    bias_buffer: Optional[torch.Tensor]
    grad_out: torch.Tensor
    ring: torch.Tensor
    slot: int
    geometry: tuple  # stride, padding, dilation, dilation_t, groups
    hyper: tuple = (0.0, 0.0, 0.0, 0.0)  # lr, momentum, dampening, weight decay
    sgd: bool = False
    nesterov: bool = False
    first_step: bool = False
    call: tuple = ()  # (op, args) it came from

    @classmethod
    def of(cls, op: str, args: tuple) -> "_Update":
        if op == "weight_grad_accumulate":
            grad_w, grad_b, grad_out, ring, slot, *geometry = args
            return cls(grad_w, None, grad_b, None, grad_out, ring, slot, tuple(geometry), call=(op, args))
        weight, buf, bias, bias_buf, grad_out, ring, slot, *rest = args
        geometry, (lr, momentum, dampening, weight_decay, nesterov, first) = tuple(rest[:5]), rest[5:]
        _check_sgd(buf, momentum, dampening, nesterov)
        if momentum == 0:  # no buffer is read or written
            buf = bias_buf = None
        return cls(weight, buf, bias, bias_buf, grad_out, ring, slot, geometry,
                   (float(lr), float(momentum), float(dampening), float(weight_decay)), True, bool(nesterov),
                   bool(first), (op, args))

    def shape(self) -> tuple:
        """What one grouped launch shares: the kernel's shape, the step, the dtypes, the device."""
        return (*self.target.shape[2:], self.sgd, self.nesterov, self.ring.dtype, self.target.dtype, self.ring.device)

    def groupable(self) -> bool:
        """Whether the grouped kernels take it: the box path (:func:`box_path`) and dense parameters
        and buffers of one dtype (the finish writes them in memory order). Checks the op's
        arguments as the op would (a bad one raises here, as it would there)."""
        geometry = _geometry(self.ring, self.slot, self.target, *self.geometry)
        _check_grad_out(self.grad_out, self.ring, geometry[1], geometry[5], *geometry[9:])
        stride, groups = self.geometry[0], self.geometry[4]
        if box_path(self.ring.device, self.ring.dtype, stride, groups, (geometry[5],),
                    (self.ring, self.grad_out)) is not None:
            return False
        params = [self.target, self.buffer, self.bias, self.bias_buffer]
        dense = all(t is None or (t.is_contiguous() and t.dtype == self.target.dtype) for t in params)
        same = all(b is None or b.shape == p.shape for p, b in ((self.target, self.buffer), (self.bias, self.bias_buffer)))
        return dense and same


def grouped_weight_updates(calls: list) -> list:
    """Run ``calls`` — ``(op, args)`` of ``weight_grad_accumulate`` or ``sgd_tick_update``, each
    layer's of a tick — as grouped launches where they can be: per kernel shape (and step and
    dtype), one :func:`.boxes._grouped_box_weight_update_kernel` over every layer's tiles (the
    bias gradients summed in it too, as items of their own) and one :func:`.kernels._grouped_weight_finish_kernel`
    for their weights and biases (per ``kernels.GROUP`` of those); up to ``kernels.GROUP`` layers a
    launch. Returns the calls it
    did not run (not on the box path, a non-dense parameter, a parameter met a second time: its
    later updates; inside a CUDA-graph capture, a launch whose tables were never made), for the
    caller to run in order after it. The results are the ops' (the
    bias summed in another order: float32 rounding)."""
    groups: dict = {}
    left, seen = [], set()
    for op, args in calls:
        update = _Update.of(op, args)
        if id(update.target) in seen or not update.groupable():
            left.append((op, args))
            continue
        seen.add(id(update.target))
        groups.setdefault(update.shape(), []).append(update)
    for updates in groups.values():
        for lo in range(0, len(updates), K.GROUP):
            chunk = updates[lo:lo + K.GROUP]
            if not _grouped_launch(chunk):
                left.extend(u.call for u in chunk)
    return left


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _grouped_config(kind: str, height: int, width: int, positions_of, device: torch.device) -> Config:
    """One box config for a grouped launch of ``kind`` (configs.py): the chosen one, the
    interpreter's default, or the first tile shape of its list in the box width that wastes least
    on the largest frame, ``height x width`` (``positions_of(cfg)``: a box's positions)."""
    cfg = _chosen["box_config"]
    if cfg is not None:
        return cfg
    if INTERPRET or device.type != "cuda":
        return DEFAULT_BOX
    listed = configs_for(kind, _capability(device))
    widths = [c for c in listed if c._replace(BOX_W=0) == listed[0]._replace(BOX_W=0)]
    return prune_boxes(widths, height, width, positions_of)[0]


def _grouped_launch(updates: list) -> bool:
    """One grouped GEMM and its finishes for ``updates`` (one shape, at most ``kernels.GROUP``);
    False (nothing run) inside a CUDA-graph capture that would need a new table."""
    u0 = updates[0]
    device, k_t, k_h, k_w = u0.ring.device, *u0.target.shape[2:]
    taps = k_t * k_h * k_w
    per_tile = _taps_per_tile(taps)
    largest = max(updates, key=lambda u: u.grad_out.shape[2] * u.grad_out.shape[3])
    cfg = _grouped_config("box_grouped_weight_update", *largest.grad_out.shape[2:], lambda c: c.BLOCK_K, device)
    bh = cfg.BLOCK_K // cfg.BOX_W
    tiles = [triton.cdiv(u.target.shape[0], cfg.BLOCK_M) * (taps // per_tile)
             * triton.cdiv(u.ring.shape[2], channel_block(u.ring.shape[2], cfg.BLOCK_N))
             for u in updates]
    rows, items, finish, bias_rows, hyper, floats = [], [0], [], [], [], 0
    for u, n in zip(updates, tiles):
        _, b, c, h, w = u.ring.shape
        c_out, h_out, w_out = u.grad_out.shape[1:]
        splits = _chosen["split"] or split_k(sum(tiles), triton.cdiv(h_out, bh) * triton.cdiv(w_out, cfg.BOX_W) * b,
                                              1, _sms(device))
        at, floats = floats, floats + splits * taps * c_out * c
        bias_at = -1
        if u.bias is not None:
            bias_at, floats = floats, floats + splits * c_out
            bias_rows.append((u, bias_at, splits, c_out))
        stride, padding, dilation, dilation_t, _ = u.geometry
        rows.append([at, bias_at, *_tma_strides(u.grad_out), *_tma_strides(u.ring), b, c, h, w, c_out, h_out, w_out,
                     u.ring.shape[0], u.slot, *padding, *dilation, dilation_t, splits])
        bias_items = triton.cdiv(c_out, cfg.BLOCK_M) * splits if u.bias is not None else 0  # boxes._box_bias_item
        items.append(items[-1] + n * splits + bias_items)
        finish.append((u.target, u.buffer, at, splits, c_out, c, u.first_step))
        hyper.append(u.hyper)
    G = len(updates)
    finish += [(u.bias, u.bias_buffer, at, splits, c_out, 1, u.first_step) for u, at, splits, c_out in bias_rows]
    hyper += [u.hyper for u, *_ in bias_rows]
    finish_launch = _finish_plan(finish, hyper, (k_t, k_h, k_w), len(updates), device)
    table = _table([v for r in rows for v in r] + items, torch.int64, device)
    if table is None or finish_launch is None:
        return False
    partials = _partials(device, floats)
    _descriptor_scratch(device)
    X._grouped_box_weight_update_kernel[_persistent(items[-1], device)](
        partials, table, G, *_addresses(u.grad_out for u in updates), *_addresses(u.ring for u in updates),
        KT=k_t, KH=k_h, KW=k_w, TAPS=per_tile, DTYPE=_TL_DTYPE[u0.ring.dtype], G_P2=triton.next_power_of_2(G),
        **cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    launches["grouped_weight_update"] += 1
    paths[("weight_update", "grouped")] += G
    finish_launch(partials, u0)
    written = [t for u in updates for t in (u.target, u.buffer, u.bias, u.bias_buffer) if t is not None]
    torch.autograd.graph.increment_version(written)  # as ATen's in-place ops do (the 16-bit weight caches)
    return True


# --- the forwards (and input gradients) of a tick's layers in one launch -------------------------


@dataclasses.dataclass
class _Box:
    """One problem of a grouped box launch (:func:`.boxes._grouped_box_forward_kernel`): ``out``
    ``[B, C_OUT, H_OUT, W_OUT]`` (dense channels-last) = the convolution of ``ring`` ``[R, B, C, H,
    W]`` (window's newest frame in ``slot``) with ``weight`` in the GEMM layout ``[taps·C, C_OUT]``
    (``taps``: k_t, k_h, k_w) at stride 1, plus ``bias``; ``frame``: pushed into ``slot`` by the
    same launch. A forward, or an input gradient: the error as a one-slot ring and the taps' sum
    flipped in space (as :func:`window_input_grad`'s box path)."""
    ring: torch.Tensor
    frame: Optional[torch.Tensor]
    slot: int
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    padding: list
    dilation: list
    dilation_t: int
    taps: tuple
    out: torch.Tensor
    relu: bool = False  # the output through a ReLU (a forward's epilogue)
    error: Optional[torch.Tensor] = None  # like ``out``: masked in place by the ReLU's mask (a chain stage's)
    conv_error: Optional[torch.Tensor] = None  # a 2x2 max pool after the ReLU: the error at the conv's output

    def key(self) -> tuple:
        """What a problem shares with those it is launched with."""
        dtype = self.ring.dtype
        return (*self.taps, dtype, self.bias.dtype if self.bias is not None else dtype, self.ring.device,
                self.frame is not None, self.conv_error is not None)


def grouped_ring_conv_forwards(calls: list, stages: Optional[list] = None) -> list:
    """The outputs of ``calls`` — the arguments of :func:`ring_conv_forward`, each layer's of a
    tick — computed as grouped launches where they can be: per kernel shape (and dtypes, device,
    whether frames are pushed), one :func:`.boxes._grouped_box_forward_kernel` over every layer's
    tiles that also pushes every frame into its slot; up to ``kernels.GROUP`` layers a launch. A
    call off the box path (:func:`box_path`), with a frame whose channels are not innermost, on a
    ring met before in ``calls``, or in a launch whose table a CUDA-graph capture cannot make,
    runs as :func:`ring_conv_forward` alone, after the grouped launches, in order. The results
    are the op's: the same sums in the same order, except that the op alone may split K on a
    GPU. Bad arguments raise as the op would.

    ``stages`` (one per call, or None): each call as a Sideways chain stage's forward, ``(out,
    relu, error, conv_error)``: the output written into ``out`` (``[B, C_OUT, H_OUT, W_OUT]``, the
    next stage's double buffer) through a ReLU where ``relu``, and ``error`` (like ``out``, or
    None: the error that arrived for this output) masked in place by that ReLU's mask, in the
    launch's epilogue; with ``conv_error`` (``[B, C_OUT, H_OUT, W_OUT]``; a ReLU and an error
    given) a 1x2x2 max pool follows the ReLU: ``out`` and ``error`` are the pooled output's (half
    the height and width, floor) and the error at the conv's output goes to ``conv_error`` (each
    window's error at its first maximum, where positive; the pool's and the ReLU's backward). What
    runs alone does the same after its op."""
    stages = stages or [None] * len(calls)
    boxes, rings = [], set()
    for args, stage in zip(calls, stages):
        box = _forward_box(*args, stage=stage) if id(args[0]) not in rings else None
        boxes.append(box)
        rings.add(id(args[0]))
    outs = _grouped_boxes("ring_conv_forward", boxes, lambda i: None)
    alone = [i for i, out in enumerate(outs) if out is None]
    for i, out in zip(alone, forwards_then_epilogues(ring_conv_forward, [calls[i] for i in alone],
                                                      [stages[i] for i in alone])):
        outs[i] = out
    return outs


def forwards_then_epilogues(forward, calls: list, stages: list, bias_after=lambda args: False) -> list:
    """``calls`` (:func:`ring_conv_forward`'s arguments) run one by one by ``forward`` (this op, or
    the one the dispatch picks), then their chain stages' epilogues (``stages``, as
    :func:`grouped_ring_conv_forwards` takes them, or None) together (:func:`stage_epilogues`).
    ``bias_after(args)``: the forward adds its bias after rounding its output (the torch
    backend's ``add_``), so the epilogue adds it instead, with the same rounding; else the forward
    adds it. Their outputs, in order."""
    after = [stage is not None and args[4] is not None and bias_after(args) for args, stage in zip(calls, stages)]
    convs = [forward(*args[:4], None, *args[5:]) if moved else forward(*args) for args, moved in zip(calls, after)]
    staged = [i for i, stage in enumerate(stages) if stage is not None]
    done = stage_epilogues([convs[i] for i in staged], [calls[i][4] if after[i] else None for i in staged],
                           [stages[i] for i in staged])
    for i, out in zip(staged, done):
        convs[i] = out
    return convs


def stage_epilogues(convs: list, biases: list, stages: list) -> list:
    """What a grouped forward's epilogue does for chain stages (``stages``: (out, relu, error,
    conv_error) each, as :func:`grouped_ring_conv_forwards` takes them), after their forwards ran
    elsewhere (``convs``: each conv's output ``[B, C_OUT, H_OUT, W_OUT]``; ``biases``: each one's
    bias where the forward has not added it, else None): one
    :func:`.boxes._grouped_stage_epilogue_kernel` per pool kind (and bias dtype) and
    ``kernels.GROUP`` stages over those whose tensors TMA descriptors take (:func:`box_path`:
    sm_90 or the interpreter, 16-bit, channels-last frames in 16-byte rows); ATen's ops for the
    rest (:func:`_stage_epilogue`), with the same results. Returns each stage's output."""
    outs: list = [None] * len(convs)
    groups: dict = {}
    for i, (conv, stage) in enumerate(zip(convs, stages)):
        out, relu, error, conv_error = _stage_parts(stage)
        if box_path(conv.device, conv.dtype, [1, 1], 1, (conv.shape[1],),
                    tuple(t for t in (conv, out, error, conv_error) if t is not None)) is None:
            groups.setdefault((conv.dtype, conv.device, conv_error is not None), []).append(i)
        else:
            outs[i] = _stage_epilogue(conv, stage, biases[i])
    by_bias: dict = {}  # (a launch reads its biases in one dtype; a stage without one goes with any)
    for key, members in groups.items():
        kinds = {biases[i].dtype for i in members if biases[i] is not None} or {None}
        first = next(iter(kinds))
        for i in members:
            by_bias.setdefault((key, biases[i].dtype if biases[i] is not None else first), []).append(i)
    for members in by_bias.values():
        for lo in range(0, len(members), K.GROUP):
            chunk = members[lo:lo + K.GROUP]
            if _grouped_epilogue_launch([convs[i] for i in chunk], [biases[i] for i in chunk],
                                        [stages[i] for i in chunk]):
                for i in chunk:
                    outs[i] = stages[i][0]
            else:
                for i in chunk:
                    outs[i] = _stage_epilogue(convs[i], stages[i], biases[i])
    return outs


def _grouped_epilogue_launch(convs: list, biases: list, stages: list) -> bool:
    """One :func:`.boxes._grouped_stage_epilogue_kernel` (one pool kind, dtypes and device, at most
    ``kernels.GROUP`` stages); False (nothing run) inside a CUDA-graph capture that would need a
    new table."""
    c0, pool = convs[0], stages[0][3] is not None
    largest = max(convs, key=lambda c: c.shape[2] * c.shape[3])
    cfg = _grouped_config("box_grouped_forward", *largest.shape[2:], lambda c: c.BLOCK_M, c0.device)
    bh = cfg.BLOCK_M // cfg.BOX_W
    rows, tiles = [], [0]
    for conv, bias, (out, relu, error, conv_error) in zip(convs, biases, stages):
        B, c_out, h_out, w_out = conv.shape
        rows.append([*_tma_strides(conv), B, c_out, h_out, w_out, int(bias is not None), *_tma_strides(out),
                     *_stage_fields(relu, error, conv_error)])
        tiles.append(tiles[-1] + B * triton.cdiv(h_out, bh) * triton.cdiv(w_out, cfg.BOX_W)
                     * triton.cdiv(c_out, cfg.BLOCK_N))
    table = _table([v for r in rows for v in r] + tiles, torch.int64, c0.device)
    if table is None:
        return False
    G = len(convs)
    _descriptor_scratch(c0.device)
    X._grouped_stage_epilogue_kernel[_persistent(tiles[-1], c0.device)](
        table, G, *_addresses(convs), *_addresses(b if b is not None else c for b, c in zip(biases, convs)),
        *_addresses(st[0] for st in stages), *_addresses(st[2] if st[2] is not None else st[0] for st in stages),
        *_addresses(st[3] if pool else st[0] for st in stages), POOL=pool, DTYPE=_TL_DTYPE[c0.dtype],
        BIAS=_TL_DTYPE[next((b.dtype for b in biases if b is not None), c0.dtype)], G_P2=triton.next_power_of_2(G),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BOX_W=cfg.BOX_W, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    launches["grouped_stage_epilogue"] += 1
    paths[("stage_epilogue", "grouped")] += G
    return True


def _stage_parts(stage: Optional[tuple]) -> tuple:
    """A chain stage's epilogue ``(out, relu, error, conv_error)`` (None: no epilogue), checked."""
    out, relu, error, conv_error = stage if stage is not None else (None, False, None, None)
    _check(conv_error is None or (relu and error is not None), "a stage's pool needs its ReLU and its error")
    return out, relu, error, conv_error


def _stage_fields(relu: bool, error: Optional[torch.Tensor], conv_error: Optional[torch.Tensor]) -> list:
    """A stage's epilogue in a grouped launch's table, as :func:`.boxes._stage_store` reads it from
    its flags on: the flags (bit 0 a ReLU, bit 1 the error masked), the error's strides (b, h, w),
    the conv-resolution error's (a pool; zeros where there is none)."""
    strides = lambda t: _tma_strides(t) if t is not None else [0, 0, 0]
    return [int(relu) | 2 * int(error is not None), *strides(error), *strides(conv_error)]


def _stage_epilogue(out: torch.Tensor, stage: Optional[tuple], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What a grouped launch's epilogue does for a chain stage (``stage``: (out, relu, error,
    conv_error); :func:`grouped_ring_conv_forwards`), after a forward run alone (``out``: its
    output, ``bias`` not added yet: added here as the torch backend adds it), in ATen's ops."""
    if bias is not None:
        with torch.no_grad():
            out.add_(bias.view(1, -1, 1, 1))  # (in the output's dtype, computed in float32: one rounding)
    if stage is None:
        return out
    target, relu, error, conv_error = stage
    with torch.no_grad():  # (the buffers given are no autograd graph's; the op's output may need a gradient)
        if conv_error is not None:
            y = torch.relu(out)
            pooled, where = torch.ops.aten.max_pool2d_with_indices(y, [2, 2], [2, 2])
            target.copy_(pooled)
            masked = torch.ops.aten.threshold_backward(error, pooled, 0)
            conv_error.copy_(torch.ops.aten.max_pool2d_with_indices_backward(masked, y, [2, 2], [2, 2], [0, 0],
                                                                             [1, 1], False, where))
            return target
        torch.clamp(out, min=0, out=target) if relu else target.copy_(out)  # (ATen's relu is this clamp)
        if error is not None:
            error.copy_(torch.ops.aten.threshold_backward(error, target, 0))
    return target


def grouped_window_input_grads(calls: list, outs: Optional[list] = None) -> list:
    """The input gradients of ``calls`` — the arguments of :func:`window_input_grad`, each
    layer's of a tick — as :func:`grouped_ring_conv_forwards` computes forwards: the box path's
    input gradient is the forward's kernel on the error, so per kernel shape one grouped launch;
    what the box path cannot take runs alone. ``outs`` (one per call, or None): where each goes
    (``[B, C, H, W]``: the double buffer of the stage below)."""
    outs = outs or [None] * len(calls)

    def alone(i):
        grad = window_input_grad(*calls[i])
        return grad if outs[i] is None else outs[i].copy_(grad)
    return _grouped_boxes("window_input_grad", [_input_grad_box_of(*args, grad_in=out) for args, out in zip(calls, outs)],
                          alone)


def _forward_box(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t, groups,
                 stage: Optional[tuple] = None) -> Optional[_Box]:
    """A forward as a grouped launch's problem (``stage``: its epilogue, as
    :func:`grouped_ring_conv_forwards` takes it), or None where the grouped kernel cannot take it."""
    R, B, C, H, W, c_out, k_t, k_h, k_w, h_out, w_out = _forward_geometry(ring, frame, slot, weight, bias, stride,
                                                                           padding, dilation, dilation_t, groups)
    out, relu, error, conv_error = _stage_parts(stage)
    shape = (B, c_out, h_out // 2, w_out // 2) if conv_error is not None else (B, c_out, h_out, w_out)
    for name, t, want in (("out", out, shape), ("error", error, shape), ("conv_error", conv_error,
                                                                         (B, c_out, h_out, w_out))):
        _check(t is None or (tuple(t.shape) == want and t.dtype == ring.dtype and t.device == ring.device),
               f"a stage's {name} must be {list(want)} of the ring's dtype and device, got "
               f"{None if t is None else (list(t.shape), t.dtype, t.device)}")
    if box_path(ring.device, ring.dtype, stride, groups, (c_out,), (ring,)) is not None:
        return None
    if any(t is not None and _tma_strides(t) is None for t in (frame, out, error, conv_error)):
        return None
    if out is None:
        out = torch.empty(shape, dtype=ring.dtype, device=ring.device, memory_format=torch.channels_last)
    return _Box(ring, frame, slot, _weight_as(weight, ring.dtype), bias, list(padding), list(dilation), dilation_t,
                (k_t, k_h, k_w), out, relu, error, conv_error)


def _input_grad_box_of(grad_out, weight, input_size, stride, padding, dilation, groups,
                       grad_in: Optional[torch.Tensor] = None) -> Optional[_Box]:
    """An input gradient as a grouped launch's problem (into ``grad_in`` where given), or None where
    the box path cannot take it."""
    B, c_out, _, _, cg, H, W, _, _ = _input_grad_geometry(grad_out, weight, input_size, stride, padding, dilation,
                                                          groups)
    _check(grad_in is None or (tuple(grad_in.shape) == (B, cg * groups, H, W) and grad_in.dtype == grad_out.dtype
                               and grad_in.device == grad_out.device),
           f"an input gradient's out must be {[B, cg * groups, H, W]} of grad_out's dtype and device")
    if box_path(grad_out.device, grad_out.dtype, stride, groups, (cg, c_out), (grad_out,)) is not None:
        return None
    if grad_in is None:
        grad_in = torch.empty((B, cg, H, W), dtype=grad_out.dtype, device=grad_out.device,
                              memory_format=torch.channels_last)
    elif _tma_strides(grad_in) is None:
        return None
    return _input_grad_box(grad_out, weight, padding, dilation, grad_in)


def _input_grad_box(grad_out, weight, padding, dilation, grad_in) -> _Box:
    """The box path's input gradient: the forward's box kernel on the error as a one-slot ring,
    with the taps' sum flipped in space and the padding that makes a stride-1 transposed conv a
    conv (boxes.py)."""
    flipped = _weight_as(weight, grad_out.dtype, summed=True, flipped=True)
    pad = [dilation[i] * (weight.shape[3 + i] - 1) - padding[i] for i in range(2)]
    return _Box(grad_out.unsqueeze(0), None, 0, flipped, None, pad, list(dilation), 1, (1, *weight.shape[3:]), grad_in)


def _grouped_boxes(op: str, boxes: list, alone) -> list:
    """The outputs of ``boxes`` (a :class:`_Box` or None each): per :meth:`_Box.key`, grouped
    launches of up to ``kernels.GROUP``; then ``alone(i)`` for each None and each problem of a
    launch that could not be made, in order."""
    outs: list = [None] * len(boxes)
    groups: dict = {}
    left = []
    for i, box in enumerate(boxes):
        (left if box is None else groups.setdefault(box.key(), [])).append(i)
    for members in groups.values():
        for lo in range(0, len(members), K.GROUP):
            chunk = members[lo:lo + K.GROUP]
            if _grouped_box_launch(op, [boxes[i] for i in chunk]):
                for i in chunk:
                    outs[i] = boxes[i].out
            else:
                left.extend(chunk)
    for i in sorted(left):
        outs[i] = alone(i)
    return outs


def _grouped_box_launch(op: str, boxes: list) -> bool:
    """One :func:`.boxes._grouped_box_forward_kernel` for ``boxes`` (one key, at most
    ``kernels.GROUP``); False (nothing run) inside a CUDA-graph capture that would need a new
    table."""
    b0 = boxes[0]
    device, dtype, push, pool = b0.ring.device, b0.ring.dtype, b0.frame is not None, b0.conv_error is not None
    at_conv = lambda b: b.conv_error if pool else b.out  # (the conv's output: the tiles cover it)
    largest = max(boxes, key=lambda b: at_conv(b).shape[2] * at_conv(b).shape[3])
    cfg = _grouped_config("box_grouped_forward", *at_conv(largest).shape[2:], lambda c: c.BLOCK_M, device)
    bh = cfg.BLOCK_M // cfg.BOX_W
    assert not pool or (bh % 2 == 0 and cfg.BOX_W % 2 == 0), "a pooled tile holds whole 2x2 windows"
    rows, tiles, pushed = [], [0], [0]
    for b in boxes:
        R, B, C, H, W = b.ring.shape
        _, c_out, h_out, w_out = at_conv(b).shape
        rows.append([*_tma_strides(b.ring), *(_tma_strides(b.frame) if push else [0, 0, 0]), *_tma_strides(b.out),
                     B, C, H, W, c_out, h_out, w_out, R, b.slot, *b.padding, *b.dilation, b.dilation_t,
                     int(b.bias is not None), *_stage_fields(b.relu, b.error, b.conv_error)])
        tiles.append(tiles[-1] + B * triton.cdiv(h_out, bh) * triton.cdiv(w_out, cfg.BOX_W)
                     * triton.cdiv(c_out, cfg.BLOCK_N))
        pushed.append(pushed[-1] + B * triton.cdiv(H, bh) * triton.cdiv(W, cfg.BOX_W) * triton.cdiv(C, cfg.BLOCK_K))
    table = _table([v for r in rows for v in r] + tiles + (pushed if push else []), torch.int64, device)
    if table is None:
        return False
    G = len(boxes)
    _descriptor_scratch(device)
    X._grouped_box_forward_kernel[_persistent(max(tiles[-1], pushed[-1] if push else 0), device)](
        table, G, *_addresses(b.ring for b in boxes),
        *_addresses(b.frame if push else b.ring for b in boxes),
        *_addresses(b.weight for b in boxes), *_addresses(b.bias if b.bias is not None else b.ring for b in boxes),
        *_addresses(b.out for b in boxes), *_addresses(b.error if b.error is not None else b.out for b in boxes),
        *_addresses(at_conv(b) for b in boxes), KT=b0.taps[0], KH=b0.taps[1], KW=b0.taps[2], PUSH=push, POOL=pool,
        DTYPE=_TL_DTYPE[dtype], BIAS=_TL_DTYPE[b0.bias.dtype if b0.bias is not None else dtype],
        G_P2=triton.next_power_of_2(G), **cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    launches[f"grouped_{'forward' if op == 'ring_conv_forward' else 'input_grad'}"] += 1
    paths[(op, "grouped")] += G
    written = [b.ring for b in boxes] if push else []  # (as the op does: it mutates the ring)
    written += [t for b in boxes for t in (b.out, b.error, b.conv_error) if t is not None]
    torch.autograd.graph.increment_version(written)  # (outputs given: a double buffer)
    return True


def _addresses(tensors) -> list:
    """``kernels.GROUP`` addresses for a grouped launch's arguments: the tensors', then the first's
    again in the unused places (never read)."""
    ptrs = [t.data_ptr() for t in tensors]
    return ptrs + ptrs[:1] * (K.GROUP - len(ptrs))


def _finish_plan(problems: list, hyper: list, kernel: tuple, weights: int, device):
    """The launches of :func:`.kernels._grouped_weight_finish_kernel` for ``problems`` — (target,
    momentum buffer or None, partials' offset, splits, C_OUT, CG, first step): the first
    ``weights`` of ``kernel``'s taps, the rest biases; one launch per ``kernels.GROUP`` of them —
    as a function of (partials, an update of the launch), their tables made now; None if one
    cannot be."""
    taps_p2 = triton.next_power_of_2(kernel[0] * kernel[1] * kernel[2])
    pairs = max(1, FINISH.BLOCK_M // taps_p2)
    launches_ = []
    for lo in range(0, len(problems), K.GROUP):
        chunk = problems[lo:lo + K.GROUP]
        blocks = [0]
        for _, _, _, _, c_out, cg, _ in chunk:
            blocks.append(blocks[-1] + triton.cdiv(c_out * cg, pairs))
        rows = [[at, splits, c_out, cg, int(buf is not None), int(first), int(lo + i >= weights)]
                for i, (_, buf, at, splits, c_out, cg, first) in enumerate(chunk)]
        table = _table([v for r in rows for v in r] + blocks, torch.int64, device)
        factors = _table([v for h in hyper[lo:lo + K.GROUP] for v in h], torch.float32, device)
        if table is None or factors is None:
            return None
        launches_.append((chunk, blocks[-1], table, factors))

    def run(partials, u0: _Update):
        for chunk, n_blocks, table, factors in launches_:
            G = len(chunk)
            K._grouped_weight_finish_kernel[(n_blocks,)](
                partials, table, factors, G, *_addresses(t for t, *_ in chunk),
                *_addresses(b if b is not None else t for t, b, *_ in chunk),
                KT=kernel[0], KH=kernel[1], KW=kernel[2], SGD=u0.sgd, NESTEROV=u0.nesterov,
                TARGET=_TL_DTYPE[chunk[0][0].dtype], G_P2=triton.next_power_of_2(G), TAPS_P2=taps_p2,
                BLOCK_MC=pairs, num_warps=FINISH.num_warps)
            launches["grouped_weight_finish"] += 1
    return run


_tables: collections.OrderedDict = collections.OrderedDict()  # (values, dtype, device) -> (table, kept)
TABLES = 1024  # tables kept besides those a CUDA graph reads (a learning-rate schedule makes new ones)


def _table(values: list, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A grouped launch's table on ``device``, or None inside a CUDA-graph capture that would need a
    new one. Its values hold no addresses, so a tick's table is the same every time the tick's
    phase comes round: made the first time (a pipeline runs a phase eagerly before it captures
    it; a copy from the host cannot be captured), reused after, so no tick copies from the host.
    Those a capture read are kept for good (its replays read them); of the rest the last TABLES."""
    key = (tuple(values), dtype, device)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    entry = _tables.get(key)
    if entry is None:
        if capturing:
            return None
        entry = (torch.tensor(values, dtype=dtype, device=device), False)
        loose = [k for k, (_, kept) in _tables.items() if not kept]
        for k in loose[:max(0, len(loose) + 1 - TABLES)]:
            del _tables[k]
    if capturing:
        entry = (entry[0], True)
    _tables[key] = entry
    _tables.move_to_end(key)
    return entry[0]


def bias_grad(grad_out: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The bias gradient of a conv whose output error is ``grad_out`` [B, C, H, W]: its sum over
    (b, h, w) in fp32, added into ``out`` where given (an accumulating gradient, in its dtype),
    else returned as a new fp32 tensor. Two launches: fp32 partials of blocks of rows
    (:func:`.kernels._column_sum_kernel`), then their sum in row order — the same bits every
    run. ``grad_out`` channels-last and dense (rows of C channels) on a device Triton runs on;
    anything else is ATen's sum."""
    c = grad_out.shape[1] if grad_out.dim() == 4 else 0
    if out is not None:
        _check(tuple(out.shape) == (c,) and out.device == grad_out.device,
               f"out must have shape [{c}] on {grad_out.device}, got {tuple(out.shape)} on {out.device}")
    rows_of_channels = grad_out.dim() == 4 and grad_out.is_contiguous(memory_format=torch.channels_last)
    if (not rows_of_channels or grad_out.dtype not in DTYPES or grad_out.numel() == 0
            or (grad_out.device.type != "cuda" and not INTERPRET) or (out is not None and not out.is_contiguous())):
        total = grad_out.sum((0, 2, 3), dtype=torch.float32)
        return total if out is None else out.add_(total)
    m = grad_out.numel() // c
    block_m, block_c = COLUMN_SUM.BLOCK_M, min(COLUMN_SUM.BLOCK_N, triton.next_power_of_2(c))
    column_blocks = triton.cdiv(c, block_c)
    # two programs an SM, each streaming its rows pipelined: few partials, so that the finish
    # (one program per column block) has little to sum
    programs = max(1, min(triton.cdiv(m, block_m), 2 * _sms(grad_out.device) // column_blocks))
    rows = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows)
    partials = torch.empty((programs, c), dtype=torch.float32, device=grad_out.device)
    steps = dict(num_warps=COLUMN_SUM.num_warps, num_stages=COLUMN_SUM.num_stages)
    wrap_triton(K._column_sum_kernel)[(programs, column_blocks)](grad_out, partials, m, c, c, rows, BLOCK_M=block_m,
                                                                 BLOCK_C=block_c, STAGES=COLUMN_SUM.num_stages, **steps)
    total = out if out is not None else torch.empty(c, dtype=torch.float32, device=grad_out.device)
    wrap_triton(K._column_sum_finish_kernel)[(column_blocks,)](partials, total, programs, c,
                                                               ACCUMULATE=out is not None, BLOCK_P=COLUMN_SUM.BLOCK_K,
                                                               BLOCK_C=block_c, STAGES=COLUMN_SUM.num_stages, **steps)
    launches["bias_grad"] += 1
    return total


@triton_op("sideways_triton::weight_grad_accumulate", mutates_args={"grad_weight", "grad_bias"})
def weight_grad_accumulate(grad_weight: torch.Tensor, grad_bias: Optional[torch.Tensor], grad_out: torch.Tensor,
                           ring: torch.Tensor, slot: int, stride: List[int], padding: List[int], dilation: List[int],
                           dilation_t: int, groups: int) -> None:
    _launch_weight_update(grad_weight, None, grad_out, ring, slot, stride, padding, dilation, dilation_t, groups)
    if grad_bias is not None:
        bias_grad(grad_out, grad_bias)
    launches["weight_grad_accumulate"] += 1


@triton_op("sideways_triton::sgd_tick_update",
           mutates_args={"weight", "momentum_buffer", "bias", "bias_momentum_buffer"})
def sgd_tick_update(weight: torch.Tensor, momentum_buffer: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    bias_momentum_buffer: Optional[torch.Tensor], grad_out: torch.Tensor, ring: torch.Tensor,
                    slot: int, stride: List[int], padding: List[int], dilation: List[int], dilation_t: int,
                    groups: int, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                    first_step: bool) -> None:
    _check_sgd(momentum_buffer, momentum, dampening, nesterov)
    _launch_weight_update(weight, momentum_buffer if momentum != 0 else None, grad_out, ring, slot, stride, padding,
                          dilation, dilation_t, groups, (lr, momentum, dampening, weight_decay), sgd=True,
                          nesterov=nesterov, first_step=first_step)
    if bias is not None:  # the step of a vector: torch's
        sgd_step(bias, bias_momentum_buffer if momentum != 0 else None, bias_grad(grad_out).to(bias.dtype), lr,
                 momentum, dampening, weight_decay, nesterov, first_step)
    launches["sgd_tick_update"] += 1


# Shapes only, so tracing never runs a kernel (under the interpreter it cannot).
@ring_conv_forward.register_fake
def _(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t, groups):
    h, w = ring_output_hw(ring, weight, stride, padding, dilation)
    return torch.empty((ring.shape[1], weight.shape[0], h, w), dtype=ring.dtype, device=ring.device,
                       memory_format=torch.channels_last)


@window_input_grad.register_fake
def _(grad_out, weight, input_size, stride, padding, dilation, groups):
    return torch.empty((grad_out.shape[0], weight.shape[1] * groups, *input_size), dtype=grad_out.dtype,
                       device=grad_out.device, memory_format=torch.channels_last)


@weight_grad_accumulate.register_fake
def _(grad_weight, grad_bias, grad_out, ring, slot, stride, padding, dilation, dilation_t, groups):
    return None


@sgd_tick_update.register_fake
def _(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot, stride, padding, dilation,
      dilation_t, groups, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None

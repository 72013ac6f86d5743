"""A tick model you can read without a GPU: where a Sideways training tick's time should go.

    python bench/tick_model.py --model c3d|r3d_18|chain --batch 8 --size 112 [--frames 48] [--stages 4]
                               [--update clip|tick] [--measure]

The pipeline runs a training clip with bf16 activations on *fake* tensors (shapes, dtypes and
every launch as on real ones; no arithmetic, so a full-size network costs seconds on a CPU),
with a dispatch mode counting what the engine launches at each tick: every ``torch.ops.sideways``
op (the forward, input gradient and weight update of each SidewaysConv3d) and every ATen op that
is a kernel (views, metadata and allocations are not). From the shapes it prints, per tick and
per layer and op: FLOPs, the bytes each launch must move at least (every operand read once,
every result written once), the launch plan (kernels per tick today, and the planned grouped
launch count), and a predicted time from stated rates, beside clip BP's measured time per
frame. ``--measure`` (a CUDA GPU) times the same clip and prints measured beside predicted.

The rates (``GPU``) are one H100's (``bench/measurements/h100-2026-11-27/`` and ``-28/``, bf16):
the 780 TFLOP/s matmul ceiling; each op's GPU time (replayed from a CUDA graph) at seven C3D and
r3d_18 layer shapes for cuDNN's best layout, the torch backend, the CUDA and the Triton kernels
(a layer takes the rate of the shape nearest its channels); "today" prices each op at the
backend dispatch.json picks for it; the cost of a launch is inferred from a measured clip
(REFERENCE_TICK: r3d_18, eager vs replayed from CUDA graphs, over the launches this model counts
there); clip BP's and Sideways' measured frames/s end to end — and HBM bandwidth, a datasheet
figure (not measured). What changed since those runs (bench/RESULTS.md) is priced at the old
rates. FLOPs of the input gradient follow the benchmarks' convention (every temporal tap: what
cuDNN computes; the Triton and CUDA backends sum the taps' weights first and do 1/k_t of it).
Launches are counted with the CPU's backend, where a sideways op is one kernel; on a GPU the
Triton and CUDA backends add a
few small ones (split-K counters, weight relayouts after an update): not counted here.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from sideways_kernels import SidewaysConv3d, SidewaysPipeline, models  # noqa: E402
from sideways_kernels.pipeline import frame_logits  # noqa: E402

aten = torch.ops.aten

# --- the rates: bench/measurements/h100-2026-11-27/ and -28/ (one NVIDIA H100 80GB HBM3, bf16) -------
GPU = dict(
    device="NVIDIA H100 80GB HBM3",
    matmul_tflops=779.6,  # measured: a large bf16 torch.matmul (2026-11-27, run2)
    hbm_tb_s=3.35,  # NOT measured: the H100 SXM datasheet's HBM3 bandwidth
    sms=132,  # the H100 SXM's SMs (datasheet): where the box forward and input gradient split over K
    # µs of one call's GPU time (replayed from a CUDA graph) at these (C_in, C_out, B, H=W), 3x3x3,
    # bf16: the best cuDNN layout, the torch backend's op as of 2026-11-27 (before its 2-D fold: not
    # measured since), the CUDA kernels and the Triton kernels (2026-11-27 run2; Triton's weight ops
    # 2026-11-28 call2, its first redesign: not its coalesced finish since)
    shapes=[(64, 64, 8, 56), (64, 128, 8, 56), (128, 128, 8, 28), (128, 256, 16, 28), (256, 256, 8, 14),
            (256, 256, 32, 14), (512, 512, 8, 7)],
    graph_us=dict(
        cudnn=dict(forward=[29.7, 35.2, 27.7, 51.7, 27.6, 51.7, 47.3],
                   input_grad=[83.6, 126.1, 57.8, 145.8, 58.6, 173.6, 76.2],
                   weight_accumulate=[34.0, 36.0, 19.8, 42.1, 23.4, 45.3, 53.8],
                   weight_sgd=[48.8, 50.6, 35.5, 63.4, 44.0, 72.5, 116.8]),
        torch=dict(forward=[48.5, 62.1, 40.8, 74.5, 38.9, 77.7, 84.7],
                   input_grad=[115.2, 176.1, 88.1, 187.8, 76.1, 148.8, 136.5],
                   weight_accumulate=[51.3, 56.3, 31.2, 65.3, 36.4, 71.6, 86.3],
                   weight_sgd=[58.9, 63.3, 40.1, 80.4, 65.6, 95.9, 184.4]),
        cuda=dict(forward=[272.8, 279.5, 414.4, 513.1, 819.5, 809.6, 1588.4],
                  input_grad=[120.4, 198.7, 164.4, 293.2, 308.8, 299.2, 593.1],
                  weight_accumulate=[423.0, 430.9, 238.6, 813.5, 256.8, 815.6, 415.2],
                  weight_sgd=[431.7, 461.9, 279.1, 864.1, 310.1, 864.0, 813.3]),
        triton=dict(forward=[46.6, 46.1, 33.6, 55.8, 64.8, 83.0, 160.4],
                    input_grad=[22.3, 28.7, 20.3, 32.7, 28.6, 34.3, 63.7],
                    weight_accumulate=[30.5, 50.9, 45.5, 107.7, 91.6, 157.5, 281.7],
                    weight_sgd=[33.5, 55.4, 51.8, 124.8, 136.2, 206.9, 466.1])),
    # end to end, B8, 112x112, bf16 autocast, frames/s: clip BP (nn.Conv3d + autograd), and Sideways
    # with the default dispatch and CUDA graphs (r3d_18: converted, causal, BatchNorm per frame)
    clip_bp_fps={("c3d", 16): 13971, ("c3d", 48): 13909, ("c3d", 256): 14044, ("r3d_18", 16): 6483,
                 ("r3d_18", 48): 8424},
    sideways_fps={("c3d", 48): 9747, ("c3d", 256): 11259, ("r3d_18", 48): 7383},
)
# The tick that prices a launch: r3d_18 (causal, 4 stages) at B8, 112x112, T48 with the default
# dispatch, 1,070 frames/s eager and 7,542 replayed from CUDA graphs (2026-11-28 call1)
REFERENCE_TICK = dict(model="r3d_18", batch=8, size=112, frames=48, stages=4, update="clip", eager_fps=1070,
                      graph_fps=7542)

SIDEWAYS_KIND = {"ring_conv_forward": "forward", "window_input_grad": "input_grad",
                 "weight_grad_accumulate": "weight_accumulate", "sgd_tick_update": "weight_sgd"}
SIDEWAYS_OP = {kind: op for op, kind in SIDEWAYS_KIND.items()}
# ATen ops that launch no kernel: views, metadata, allocations
NOT_KERNELS = {"detach", "view", "_unsafe_view", "unsqueeze", "squeeze", "as_strided", "slice", "select",
               "expand", "permute", "t", "transpose", "alias", "empty", "empty_like", "empty_strided", "new_empty",
               "new_empty_strided", "lift_fresh", "set_", "resize_", "is_same_size", "split", "split_with_sizes",
               "unbind", "chunk", "view_as", "_reshape_alias", "narrow", "diagonal", "unfold", "sym_size",
               "sym_stride", "sym_numel", "_has_compatible_shallow_copy_type"}
GEMM_KINDS = ("forward", "input_grad", "weight_accumulate", "weight_sgd")


def _is_kernel(func, args=(), kwargs=None, out=None) -> bool:
    """Whether an ATen op launches a kernel (not a view, metadata or an allocation; in-place views
    too: unsqueeze_, as_strided_, ...). Given its arguments and output: not an op that may or may
    not copy (``reshape``, ``flatten``, ``contiguous``: composite ops that can reach a dispatch
    mode undecomposed) where it returned a view of its input."""
    name = func._overloadpacket.__name__
    if func.namespace != "aten" or name in NOT_KERNELS or name.endswith("_") and name[:-1] in NOT_KERNELS:
        return False
    return out is None or not _returned_a_view(func, args, kwargs or {}, out)


def _returned_a_view(func, args, kwargs: dict, out) -> bool:
    """Whether a functional op's every output lies in the storage of one of its inputs."""
    outs = _tensors(out)
    if func._schema.is_mutable or not outs:
        return False
    inputs = {t.untyped_storage()._cdata for t in _tensors(list(args) + list(kwargs.values()))}
    return all(t.untyped_storage()._cdata in inputs for t in outs)


# what the code measured launched to seed the loss's backward (autograd's ones and the division by
# the clip's frames); the engine now keeps the seed (Engine._loss_seed): no kernel today
LOSS_SEED = "aten.ones_like + aten.div (the loss backward's seed)"


@dataclasses.dataclass
class Launch:
    op: str  # "sideways.ring_conv_forward", "aten.relu_", ...
    kind: str  # forward | input_grad | weight_accumulate | weight_sgd | other
    layer: Optional[str]  # the SidewaysConv3d's name (sideways ops)
    flops: float
    bytes: float
    shape: str = ""  # the conv's problem (sideways ops)
    kernels: int = 1  # the kernels it launches on a GPU under today's dispatch (a sideways op: see kernels_today)
    kernels_derived: int = 1  # as the code the GPU measured launched it: each call deriving the weight's
    # forms (no run held them), no box GEMM split over K
    today: str = ""  # the backend today's dispatch sends it to (a sideways op: today_for)


def launch_count(launches: list, held: bool = True) -> int:
    """The kernels a tick's launches make on a GPU (a sideways op may make several); ``held``:
    as today's code runs it, else with every call deriving the weight's forms (the code the GPU
    runs so far measured)."""
    return sum(l.kernels if held else l.kernels_derived for l in launches)


class _Kernels(TorchDispatchMode):
    """Counts the ATen calls that are kernels."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._fused_sgd_.default:  # counted, not run: it has no fake kernel (and writes only its inputs)
            self.n += 1
            return None
        out = func(*args, **(kwargs or {}))
        self.n += _is_kernel(func, args, kwargs, out)
        return out


_KERNELS_TODAY: dict = {}


def kernels_today(name: str, args, held: bool, measured: bool = False) -> int:
    """The kernels one sideways op launches on a GPU under today's dispatch (sm_90, bf16): the
    torch backend's ATen calls, counted by running its function on copies of the op's tensors
    (``held``: with the run's weight forms made once, sideways_kernels/forms.py, as a run with
    ``update="clip"`` has them); Triton's forward and input gradient one kernel (two where the box
    kernel splits over K on the GPU's SMs: the partials' sum; one more where the forward copies its
    frame into the ring first) and the weight derivation it makes per call when not held; anything
    else one. ``measured``: as the code the GPU measured (no split, every frame copied)."""
    kind = SIDEWAYS_KIND[name]
    key = (name, held, measured, tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else
                             tuple(a) if isinstance(a, list) else a for a in args))
    if key in _KERNELS_TODAY:
        return _KERNELS_TODAY[key]
    on = today_for(name, args)
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    weight = copies[{"ring_conv_forward": 3, "window_input_grad": 1}.get(name, 0)]
    dtype = copies[0].dtype  # the forward's ring, the input gradient's error: the activations'
    count = _Kernels()
    if on == "torch":
        from sideways_kernels import forms, torch_backend
        ring_at = {"ring_conv_forward": 0, "weight_grad_accumulate": 3, "sgd_tick_update": 5}.get(name)
        if ring_at is not None and not measured:  # a layer's ring, as a layer makes it on CUDA for this backend
            copies[ring_at] = _layer_ring_on_cuda(copies[ring_at])
        with _padded_as_on_cuda(not measured):
            made = torch_backend.forms_of(weight, dtype, kind == "forward", kind == "input_grad") if held else []
            with forms.held(made), count:
                getattr(torch_backend, name)(*copies)
        n = count.n
    elif on == "triton" and kind in ("forward", "input_grad"):
        import sideways_kernels.triton as triton_backend
        if not held:
            with count:
                triton_backend._derive(weight, dtype, kind == "input_grad", kind == "input_grad")
        n = 1 + count.n + (not measured and _box_splits(name, args) > 1) + _push_copies(name, args, measured)
    else:
        n = 1
    _KERNELS_TODAY[key] = n
    return n


@contextlib.contextmanager
def _padded_as_on_cuda(padded: bool = True):
    """The torch backend pads a small 16-bit ring image with zero channels on CUDA only
    (``torch_backend.channel_pad``: two kernels, in a forward and in a weight gradient); the
    tensors counted here are CPU or fake ones, so count them as a GPU runs them (``padded``; the
    code the GPU measured had no pad)."""
    from sideways_kernels import torch_backend
    pad = torch_backend._pad
    if padded:
        torch_backend._pad = lambda channels, cuda, dtype: pad(channels, True, dtype)
    try:
        yield
    finally:
        torch_backend._pad = pad


def _layer_ring_on_cuda(ring: torch.Tensor) -> torch.Tensor:
    """``ring`` (in ``ops.empty_ring``'s layout: a layer's) made as a layer makes it on CUDA for the
    torch backend: with the zero channels its padded image needs (``torch_backend.ring_image_pad``),
    which the backend then reads in place. A ring of another layout is left as it is."""
    from sideways_kernels import ops, torch_backend
    span, b, c, h, w = ring.shape
    if ring.stride(0) != c or ring.stride(4) != span * c:
        return ring
    pad = torch_backend._pad(span * c, True, ring.dtype)
    return ops.empty_ring(span, b, c, h, w, dtype=ring.dtype, device=ring.device, image_pad=pad).copy_(ring)


def _push_copies(name: str, args, measured: bool) -> int:
    """1 where a Triton forward copies its frame into the ring in a launch of its own: off the box
    path (a spatial stride, groups) or for a frame whose channels are not innermost (the video's);
    the box forward pushes a layer's frame itself. ``measured``: the code measured copied all."""
    if name != "ring_conv_forward" or args[1] is None:
        return 0
    stride, groups = args[5], args[9]
    fused = list(stride) == [1, 1] and groups == 1 and args[1].stride(1) == 1  # (a recording's fake tensors
    return int(measured or not fused)  # have no address to check the alignment of: channels of 16 bytes assumed)


def _box_splits(name: str, args) -> int:
    """The split count of a Triton forward's or input gradient's box kernel on the GPU (1 off the
    box path: a spatial stride or groups)."""
    import sideways_kernels.triton as triton_backend
    from sideways_kernels.ops import conv_output_size
    if name == "ring_conv_forward":
        ring, weight, stride, padding, dilation, groups = args[0], args[3], args[5], args[6], args[7], args[9]
        _, b, c, h, w = ring.shape
        c_out, (k_t, k_h, k_w) = weight.shape[0], weight.shape[2:]
        h_out, w_out = (conv_output_size(n, k, s, p, d) for n, k, s, p, d in
                        zip((h, w), (k_h, k_w), stride, padding, dilation))
        taps = k_t * k_h * k_w
    else:  # the input gradient: the forward's kernel on the error, writing the input's frame
        grad_out, weight, (h_out, w_out), stride, groups = args[0], args[1], args[2], args[3], args[6]
        b, c = grad_out.shape[:2]
        c_out, taps = weight.shape[1], weight.shape[3] * weight.shape[4]
    if list(stride) != [1, 1] or groups != 1:
        return 1
    return triton_backend._box_gemm_splits(b, c, c_out, h_out, w_out, taps, GPU["sms"])


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


class _Recorder(TorchDispatchMode):
    """Counts the launches of each tick (``begin_tick`` starts the next tick's list) and follows
    the memory each tick allocates: its peak while the tick runs (``peaks``) and what of it is
    still alive when the tick ends (``leftover``: storage -> (bytes, the op that made it))."""

    def __init__(self, convs: dict, fake: bool, held: bool = False):
        super().__init__()
        self.convs = convs  # name -> SidewaysConv3d
        self.fake = fake
        self.held = held  # the run holds its weights' forms (kernels_today: Launch.kernels)
        self.ticks: list[list[Launch]] = []
        self.peaks: list[int] = []
        self.leftover: list[dict] = []
        self._refs: list = []  # (weakref to a tensor on storage allocated this tick, op)
        self._fresh: set = set()  # storages allocated this tick
        self.adding_gradients = False  # inside Engine._add_gradients (one launch; the code measured: one each)

    def begin_tick(self) -> None:
        self.end_tick()
        self.ticks.append([])
        self.peaks.append(0)
        self._refs, self._fresh = [], set()

    def end_tick(self, returned=()) -> None:
        """``returned``: what the tick hands its caller (its outputs and losses): not kept by it."""
        if len(self.leftover) < len(self.ticks):
            handed = {t.untyped_storage()._cdata for t in _tensors(list(returned))}
            self.leftover.append({k: v for k, v in self._live().items() if k not in handed})

    def _live(self) -> dict:
        alive, out = [], {}
        for ref, op in self._refs:
            t = ref()
            if t is None:
                continue
            alive.append((ref, op))
            storage = t.untyped_storage()
            out.setdefault(storage._cdata, (storage.nbytes(), op))
        self._refs = alive
        return out

    def _follow(self, op: str, args, kwargs, out) -> None:
        seen = {t.untyped_storage()._cdata for t in _tensors(list(args) + list(kwargs.values()))}
        for t in _tensors(out):
            key = t.untyped_storage()._cdata
            if key not in seen:
                self._fresh.add(key)
            if key in self._fresh:
                self._refs.append((weakref.ref(t), op))
        self.peaks[-1] = max(self.peaks[-1], sum(n for n, _ in self._live().values()))

    def _layer(self, ring=None, weight=None) -> Optional[str]:
        for name, m in self.convs.items():
            if (ring is not None and m._ring is ring) or (weight is not None and (m.weight is weight or
                                                                                   weight._base is m.weight)):
                return name
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _shapes_only(func, args, kwargs) if self.fake else NotImplemented
        if out is NotImplemented:
            out = func(*args, **kwargs)
        namespace, name = func.namespace, func._overloadpacket.__name__
        if not self.ticks or namespace == "prim":
            return out
        self._follow(f"{namespace}.{name}", args, kwargs, out)
        if namespace == "aten" and not _is_kernel(func, args, kwargs, out):
            return out
        if namespace == "sideways":
            self.ticks[-1].append(_sideways_launch(name, args, out, self))
        else:
            inputs = {id(t): t for t in _tensors(list(args) + list(kwargs.values()))}
            written = [t for t in _tensors(out)]
            moved = sum(_nbytes(t) for t in inputs.values()) + sum(_nbytes(t) for t in written)
            self.ticks[-1].append(Launch(f"{namespace}.{name}", "other", None, _aten_flops(func, args, kwargs, out),
                                         moved, kernels_derived=len(args[0]) if self.adding_gradients else 1))
        return out


def _shapes_only(func, args, kwargs):
    """Fake tensors decompose BatchNorm in Python (30 ms a call): only its shapes matter here."""
    if func is aten.native_batch_norm.default:
        x = args[0]
        stats = x.new_empty((x.shape[1],), dtype=torch.float32)
        return torch.empty_like(x), stats, stats.clone()
    if func is aten.native_batch_norm_backward.default:
        x, w, mask = args[1], args[2], args[9]
        return (torch.empty_like(x) if mask[0] else None,
                torch.empty_like(w) if mask[1] and w is not None else None,
                torch.empty_like(w) if mask[2] and w is not None else None)
    return NotImplemented


def _aten_flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0.0
    try:
        return float(formula(*args, **kwargs, out_val=out))
    except Exception:  # a formula that does not take these arguments
        return 0.0


def _sideways_launch(name: str, args, out, rec: _Recorder) -> Launch:
    """FLOPs and least bytes of one sideways op (ops.py's argument order)."""
    kind = SIDEWAYS_KIND[name]
    if name == "ring_conv_forward":
        ring, frame, _, weight, bias = args[:5]
        layer, grad_out = rec._layer(ring=ring, weight=weight), out
    elif name == "window_input_grad":
        grad_out, weight = args[:2]
        ring, frame, bias, layer = None, None, None, rec._layer(weight=weight)
    elif name == "weight_grad_accumulate":
        weight, bias, grad_out, ring = args[:4]
        frame, layer = None, rec._layer(ring=ring)
    else:  # sgd_tick_update
        weight, _, bias, _, grad_out, ring = args[:6]
        frame, layer = None, rec._layer(ring=ring, weight=weight)
    m = rec.convs.get(layer)
    if m is not None:  # the layer's whole weight (an input gradient at the clip's edge gets its live taps)
        weight = m.weight
    k_t = weight.shape[2]
    act = grad_out.element_size()
    flops = 2.0 * grad_out.numel() * weight[0].numel()  # every tap (results.md's convention)
    frame_bytes = 0 if m is None or m._ring is None else m._ring[0].numel() * act
    w_gemm = weight.numel() * act  # the weight as the GEMMs read it: in the activations' type
    if kind == "forward":
        moved = k_t * frame_bytes + w_gemm + _nbytes(out) + 2 * _nbytes(frame) + _nbytes(bias)
    elif kind == "input_grad":
        moved = _nbytes(grad_out) + w_gemm / k_t + _nbytes(out)  # the taps' summed weight
    elif kind == "weight_accumulate":
        moved = _nbytes(grad_out) + k_t * frame_bytes + 2 * _nbytes(weight) + 2 * _nbytes(bias)
    else:  # weight, momentum buffer: read and written
        moved = _nbytes(grad_out) + k_t * frame_bytes + 4 * _nbytes(weight) + 4 * _nbytes(bias)
    shape = ""
    if m is not None:
        b, c, h, w = m._ring.shape[1:] if m._ring is not None else (0, 0, 0, 0)
        ks = "x".join(str(k) for k in m.kernel_size)
        st = "" if tuple(m.stride) == (1, 1, 1) else " s" + "x".join(str(s) for s in m.stride)
        shape = f"{c}->{m.out_channels} {h}x{w} k{ks}{st}"
    return Launch(f"sideways.{name}", kind, layer, flops, moved, shape, kernels_today(name, args, rec.held),
                  kernels_today(name, args, False, measured=True), today_for(name, args))


# --- the networks ----------------------------------------------------------------------------------

def build(model: str, stages: int, update: str = "clip", device: str = "cpu"):
    """(network, pipeline) as the GPU runs' end-to-end rows build them: C3D 64-256 (bench_gpu's
    builder), or a converted r3d_18 (width 64, causal temporal padding, BatchNorm per frame)."""
    import bench_gpu
    if model == "c3d":
        net = bench_gpu._c3d(SidewaysConv3d, device)
        cut = lambda **kw: SidewaysPipeline(models.stages(net, stages), **kw)
    elif model == "r3d_18":
        net = models.r3d_18(10).to(device)
        cut = lambda **kw: SidewaysPipeline.from_model(net, stages=stages, batchnorm="frame", temporal_padding="causal",
                                                       **kw)
    elif model == "chain":
        net = chain(stages)
        cut = lambda **kw: SidewaysPipeline(list(net), **kw)
    else:
        raise ValueError(f"--model must be c3d, r3d_18 or chain, got {model!r}")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9) if update == "tick" else None
    return net, cut(update=update, optimizer=opt, cuda_graph=False)


def chain(stages: int, width: int = 64) -> torch.nn.Sequential:
    """The end-to-end rows' chain of conv-ReLU stages (bench_gpu._chain), on the CPU."""
    import bench_gpu
    return bench_gpu._chain(SidewaysConv3d, "cpu", width, stages)


def own_stages(pipe) -> dict:
    """The stages the engine runs itself in a steady tick on a backend that groups forwards (the
    Triton backend's; Engine._own_stage): every stage but the top whose module is a conv, its ReLU
    and maybe a 1x2x2 max pool — stage -> (conv, ReLU, pool)."""
    from sideways_kernels.engine import stage_conv_relu_pool
    return {k: found for k, nodes in enumerate(pipe.engine.stages[:-1])
            if (found := stage_conv_relu_pool(pipe.graph, nodes)) is not None}


@dataclasses.dataclass
class Recording:
    ticks: list  # per tick, its launches (Launch)
    plans: list  # the schedule's TickPlans
    peaks: list  # per tick, the most bytes the tick's own allocations held at once
    leftover: list  # per tick, what the tick allocated and is alive at its end (storage -> (bytes, op))
    held: dict  # Engine.held_by_kind() after the clip
    grads: int  # bytes of the parameters' gradients after the clip (fp32)
    grad_storages: set  # their storages
    params: int
    held_forms: bool = False  # the run held its weights' forms (kernels_today)


def record(net, pipe, batch: int, size: int, frames: int, amp: bool = True, fake: bool = True,
           held: Optional[bool] = None) -> Recording:
    """Run two training clips, as a training loop does (the gradients set to None in between),
    and count each tick's launches and allocations in the second (the first allocates the
    rings and buffers). ``amp``: bf16 activations as CUDA autocast gives them — emulated by a
    bf16 network and clip (CPU autocast would run pools and others in fp32, which CUDA's does
    not); CUDA autocast's few casts (each frame at the first conv, the logits for the loss)
    are not counted. The network's parameters are put back as they were. ``held``: whether the
    run holds its weights' forms, for counting the kernels of a sideways op (default: as today's
    code does, with ``update="clip"``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    saved = [(t, t.detach().clone()) for t in [*net.parameters(), *net.buffers()]] if amp else None
    if amp:
        net.to(torch.bfloat16)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, SidewaysConv3d)}
    rec = _Recorder(convs, fake, pipe.update == "clip" if held is None else held)
    engine = pipe.engine
    own = vars(engine).get("_tick")  # an instance's own _tick (a test's), put back after
    tick = engine._tick

    def counted(*a, **kw):
        rec.begin_tick()
        up, down, done, losses = tick(*a, **kw)
        rec.end_tick((done, losses))
        return up, down, done, losses
    add_gradients = engine._add_gradients

    def adding(into, grads):  # autograd added each parameter's gradient by a launch of its own in the code measured
        rec.adding_gradients = True
        try:
            add_gradients(into, grads)
        finally:
            rec.adding_gradients = False
    engine._add_gradients = adding
    loss_seed = engine._loss_seed

    def seeding(frame_loss):  # the code measured made the loss backward's seed every tick: ones, then a division
        if rec.ticks:
            rec.ticks[-1].append(Launch(LOSS_SEED, "other", None, 0.0, 0.0, kernels=0, kernels_derived=2))
        return loss_seed(frame_loss)
    engine._loss_seed = seeding
    schedule = pipe._schedule(frames, "sideways", True)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    try:
        with mode:
            video = torch.zeros(batch, 3, frames, size, size, dtype=torch.bfloat16 if amp else torch.float32)
            target = torch.zeros(batch, dtype=torch.long)
            out_len = pipe.output_length(frames)
            loss = lambda out, t: F.cross_entropy(frame_logits(out), target)
            for recorded in (False, True):
                net.zero_grad(set_to_none=True)
                engine._tick = counted if recorded else tick
                clip = (video[:, :, t:t + 1] for t in range(frames))
                with rec if recorded else contextlib.nullcontext():
                    for _ in engine.run(schedule, clip, "sideways", loss, None, backend=pipe.backend,
                                        optimizer=pipe.optimizer, update=pipe.update, loss_frames=out_len):
                        pass
            held = engine.held_by_kind()
            grads = sum(p.grad.numel() * 4 for p in net.parameters() if p.grad is not None)  # fp32 masters
            grad_storages = {p.grad.untyped_storage()._cdata for p in net.parameters() if p.grad is not None}
    finally:
        if saved is not None:
            net.to(torch.float32)
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)
        if own is None:
            del engine._tick
        else:
            engine._tick = own
        del engine._add_gradients, engine._loss_seed
        if fake:  # leave no fake tensor behind
            from sideways_kernels.graph import PoolNode
            for m in net.modules():
                if isinstance(m, SidewaysConv3d):
                    m._ring = None
            for node in pipe.graph.nodes:
                if isinstance(node, PoolNode):
                    node._ring = None
            net.zero_grad(set_to_none=True)
            if pipe.optimizer is not None:
                pipe.optimizer.state.clear()
            engine.buffers.clear(), engine.fifo.clear(), engine.queue.clear(), engine.seeds.clear()
    _group_today(rec.ticks, schedule, pipe, {id(m): name for name, m in convs.items()})
    return Recording(rec.ticks, list(schedule), rec.peaks, rec.leftover, held, grads, grad_storages,
                     sum(p.numel() * 4 for p in net.parameters()), rec.held)


def _group_today(ticks: list, schedule, pipe, names: dict) -> None:
    """Where today's dispatch sends the stages' first convs' forwards or input gradients to
    Triton, the engine groups them (Engine._forwards_ahead, _defer_input_grads): in each tick such
    launches share one kernel per kernel shape (``Launch.kernels``: 1 for the first of a group, 0
    for the others; their split-K sums gone). ``names``: id(layer) -> its name."""
    for tick, plan in zip(ticks, schedule):
        problems = schedule.problems(plan)
        for op in ("forward", "input_grad"):
            groups, _ = _stage_first(pipe, schedule.inputs, problems, op)
            launches = {l.layer: l for l in tick if l.kind == op}
            chosen = [[launches[names[id(m)]] for m in group if names.get(id(m)) in launches
                       and launches[names[id(m)]].today == "triton"] for group in groups.values()]
            if sum(map(len, chosen)) < 2:
                continue
            for group in chosen:
                for i, launch in enumerate(group):
                    launch.kernels = int(i % 16 == 0)


def kept_across_ticks(got: Recording) -> dict:
    """What a tick allocated that outlives it, besides the gradients (storage -> (bytes, op)):
    in a clip after the first, nothing — the engine keeps only what it holds by construction."""
    return {k: v for tick in got.leftover for k, v in tick.items() if k not in got.grad_storages}


def bp_saved_bytes(net, batch: int, size: int, frames: int, amp: bool = True) -> int:
    """Bytes clip BP (the network on the whole clip, autograd) saves for its backward, on fake
    tensors: what its peak holds beyond Sideways' (the parameters and gradients are common)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    seen: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        seen.setdefault(storage._cdata, storage.nbytes())
        return t
    dtype = torch.bfloat16 if amp else torch.float32
    net = copy.deepcopy(net).to(dtype)  # as under CUDA autocast (record's amp)
    with FakeTensorMode(allow_non_fake_inputs=True):
        video = torch.zeros(batch, 3, frames, size, size, dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(video)
    return sum(seen.values())


# --- the model -------------------------------------------------------------------------------------

TABLES = ("today", "cudnn", "triton", "ceiling")  # the rates a tick's GEMMs are priced at


def _rate(table: str, kind: str, problem: tuple) -> float:
    """TFLOP/s of ``kind`` in ``GPU["graph_us"][table]`` at the measured shape nearest ``problem``
    (C_in, C_out, output positions B·H·W; log scale; the geometric mean of the rates of shapes
    equally near)."""
    shapes = GPU["shapes"]
    far = [sum(abs(math.log2(max(c, 1)) - math.log2(m)) for c, m in zip(problem, (*s[:2], s[2] * s[3] ** 2)))
           for s in shapes]
    nearest = [i for i, d in enumerate(far) if d <= min(far) + 1e-9]  # a tie: their rates' geometric mean
    rate = lambda i: 2 * math.prod(shapes[i]) * shapes[i][3] * 27 / (GPU["graph_us"][table][kind][i] * 1e-6) / 1e12
    return math.exp(sum(math.log(rate(i)) for i in nearest) / len(nearest))


def _problem(launch: Launch) -> tuple:
    """(C_in, C_out, output positions) of a launch (its shape ``"64->128 56x56 k3x3x3"``; the
    positions from its FLOPs: 2 per multiply-add of every tap)."""
    if "->" not in launch.shape:
        return 64, 64, 8 * 56 * 56
    c_in, rest = launch.shape.split("->")
    c_out, taps = int(rest.split()[0]), math.prod(map(int, rest.split()[-1][1:].split("x")))
    return int(c_in), c_out, max(launch.flops / (2 * int(c_in) * c_out * taps), 1)


def today(kind: str, layer: Optional[tuple] = None) -> str:
    """The backend the default dispatch runs ``kind`` on for bf16 on sm_90 (dispatch.json), for a
    ``layer`` (``backend.Layer``; None: any) where it measured that layer."""
    from sideways_kernels import backend
    return backend.choose(SIDEWAYS_OP[kind], torch.bfloat16, "sm_90", layer=layer)


def today_for(name: str, args) -> str:
    """The backend the default dispatch (sm_90, bf16) sends a recorded call of sideways op
    ``name`` to: ``backend.measured_choice`` with every backend built (a call Triton would run on
    its general kernels — strided, grouped, unaligned — goes to cuDNN unless a run measured its
    layer itself)."""
    from sideways_kernels import backend
    bf16 = torch.empty(0, dtype=torch.bfloat16)  # the activations' type (only its type and device are read)
    return backend.measured_choice(name, bf16, "sm_90", backend._layer(name, args), backend.call_geometry(name, args),
                                   built=lambda backend_name: backend_name)  # (the GPU runs' build: every backend)


def _layer_of(launch: Launch) -> Optional[tuple]:
    """A sideways op's layer as the dispatch keys it (:func:`_problem`; None where strided)."""
    return None if " s" in launch.shape else _problem(launch)


def gemm_us(launch: Launch, table: str) -> float:
    """Predicted µs of one sideways op: its FLOPs at the measured rate (``table``: cudnn, triton,
    today — the default dispatch's backend for the op — or the matmul ceiling; on Triton times
    :func:`channel_waste`), or its bytes at the HBM datasheet bandwidth if that is longer."""
    flops = launch.flops
    if table == "ceiling":
        rate = GPU["matmul_tflops"]
    else:
        backend = launch.today if table == "today" else table
        rate = _rate(backend, launch.kind, _problem(launch))
        flops *= channel_waste(launch) if backend == "triton" else 1.0
    return max(flops / (rate * 1e12), launch.bytes / (GPU["hbm_tb_s"] * 1e12)) * 1e6


def channel_waste(launch: Launch) -> float:
    """The MMA work per real FLOP of a sideways op on the Triton kernels, which step through the
    channels a problem reduces over (a forward's and weight update's input channels, an input
    gradient's output channels) in blocks of 64 (sm_90's configs), of configs.SMALL_CHANNELS for
    that many or fewer: a stride-1 RGB stem (the box kernels) costs 16/3 of its FLOPs there. A
    strided one (the general kernels) folds its taps into K (configs.FOLD_CHANNELS): 3 channels x
    147 taps in blocks of 64 pairs. The measured rates, of 64 and more channels, waste none."""
    from sideways_kernels.triton.configs import FOLD_CHANNELS, channel_block
    c_in, c_out, _ = _problem(launch)
    channels = c_out if launch.kind == "input_grad" else c_in
    if launch.kind != "input_grad" and channels <= FOLD_CHANNELS and _layer_of(launch) is None:  # strided
        channels *= math.prod(map(int, launch.shape.split()[2][1:].split("x")))
    block = channel_block(channels, 64)
    return -(-channels // block) * block / channels


def memory_us(launch: Launch) -> float:
    return launch.bytes / (GPU["hbm_tb_s"] * 1e12) * 1e6


def planned_launches(tick: list[Launch], problems: list) -> tuple[int, list[str]]:
    """The grouped plan for one tick (``problems``: ``Schedule.problems`` of its plan): per GEMM
    kind, one grouped launch per dependency wave (a stage's layers feed each other within a
    tick; the stages are independent), every weight update in one; elementwise nodes
    (activations, joins, casts, BatchNorm's normalisation, spatial pools, copies into rings and
    buffers) fused into those launches' epilogues; one launch for every BatchNorm's per-frame
    statistics forward and one backward; one for the loss and the head; one for the optimizer
    step of the parameters the fused update does not cover."""
    parts = []
    for op in ("forward", "input_grad"):
        waves = 1 + max((p.wave for p in problems if p.op == op), default=-1)
        if waves:
            parts.append(f"{waves} x grouped {op}")
    if any(p.op == "weight" for p in problems):
        parts.append("1 x grouped weight update")
    ops = {l.op for l in tick}
    if "aten.native_batch_norm" in ops:
        parts.append("1 x BatchNorm statistics (forward)")
    if "aten.native_batch_norm_backward" in ops:
        parts.append("1 x BatchNorm statistics (backward)")
    if ops & {"aten.nll_loss_forward", "aten._log_softmax"}:
        parts.append("1 x loss and head")
    if any(op.startswith("aten._foreach") for op in ops):
        parts.append("1 x optimizer step (non-conv parameters)")
    return sum(int(part.split(" x ")[0]) for part in parts), parts


@dataclasses.dataclass
class TickSummary:
    index: int  # the tick shown
    steady: bool
    launches: list
    flops: float
    min_bytes: float  # the GEMMs' operands, once each
    other_bytes: float  # what today's other launches move
    gemm_us: dict  # table -> µs of the tick's GEMMs
    other_us: float


def built_weight_launches(pipe, problems: list) -> tuple[int, str]:
    """The launches the Triton backend makes today for a tick's weight updates (``problems``:
    ``Schedule.problems``): the layers on the box path (16-bit, spatial stride 1, one group,
    channels in multiples of 8) grouped — per kernel shape and 16 layers one GEMM and a finish per
    16 of their weights and biases —, each other layer alone (its GEMM, its finish and, with a
    bias, the bias's sum and step)."""
    layers = [_problem_layer(pipe, q) for q in problems if q.op == "weight"]
    shapes: dict = {}
    alone = 0
    for m in layers:
        if _on_box_path(m, _reads_video(pipe, m)):
            shapes.setdefault(tuple(m.kernel_size), []).append(m)
        else:
            alone += 2 + 2 * (m.bias is not None)
    grouped = 0
    for group in shapes.values():
        for lo in range(0, len(group), 16):
            chunk = group[lo:lo + 16]
            grouped += 1 + math.ceil((len(chunk) + sum(m.bias is not None for m in chunk)) / 16)
    n_grouped = sum(len(g) for g in shapes.values())
    return grouped + alone, (f"{n_grouped} layers grouped in {grouped} launches ({len(shapes)} kernel shapes), "
                             f"{len(layers) - n_grouped} alone in {alone}")


def built_first_conv_launches(pipe, problems: list, op: str) -> tuple[int, str]:
    """The launches the Triton backend makes today for a tick's forwards or input gradients
    (``op``; ``problems``: ``Schedule.problems``): the stages' first convs (:func:`_stage_first`)
    grouped, per kernel shape (a forward's also per epilogue: a stage run by the engine with a pool
    apart) and 16 layers one launch, where two or more go; every other one in a launch of its own
    (counted as one: a split-K sum or a frame's copy not included)."""
    grouped, mine = _stage_first(pipe, pipe._schedule(1, "sideways", True).inputs, problems, op)
    n = sum(len(g) for g in grouped.values())
    what = {"forward": "forwards ahead", "input_grad": "input gradients after the backwards"}[op]
    if n < 2:
        return len(mine), f"no two stages' first convs to group; {len(mine)} alone"
    launches = sum(math.ceil(len(g) / 16) for g in grouped.values())
    kinds = "kernel shapes and epilogues" if op == "forward" else "kernel shapes"
    return launches + len(mine) - n, (f"{n} stages' first {what} in {launches} launches "
                                      f"({len(grouped)} {kinds}), {len(mine) - n} alone")


def _stage_first(pipe, inputs: list, problems: list, op: str) -> tuple[dict, list]:
    """Of a tick's ``op`` problems (forward or input_grad; all of them the second item), the
    stages' first convs the engine groups on the box path, by kernel shape (an input gradient's:
    its taps summed, k_h x k_w): each stage's first conv where it reads the stage's arriving sample
    — the forwards (each pushing a frame; the stem's where the engine runs its stage, which copies
    the video's NCDHW frame into a channels-last one first) ahead of the stages, the input
    gradients after their backwards (Engine._forwards_ahead). ``inputs``: the schedule's, the
    producer entering each stage."""
    from sideways_kernels.engine import _leading_conv
    from sideways_kernels.graph import ChainNode
    graph = pipe.graph
    grouped: dict = {}
    mine = [q for q in problems if q.op == op]
    own = own_stages(pipe)
    pooled = {k for k, (_, _, pool) in own.items() if pool} if op == "forward" else set()
    for q in mine:
        node, m = graph.nodes[q.node], _problem_layer(pipe, q)
        leads = _leading_conv(node.module) is m if isinstance(node, ChainNode) else q.layer == 0
        if (q.stage > 0 or (op == "forward" and 0 in own)) and (op == "input_grad" or q.action == "push") \
                and list(node.inputs) == [inputs[q.stage]] and leads and _on_box_path(m, q.stage == 0):
            # (a stage run by the engine with a pool: a launch of its own kind)
            grouped.setdefault((*m.kernel_size[1 if op == "input_grad" else 0:], q.stage in pooled), []).append(m)
    return grouped, mine


def _problem_layer(pipe, q) -> SidewaysConv3d:
    from sideways_kernels.graph import ChainNode
    node = pipe.graph.nodes[q.node]
    return (node.layers if isinstance(node, ChainNode) else [node.module])[q.layer]


def _on_box_path(m: SidewaysConv3d, video: bool = False) -> bool:
    """Whether a layer's ops take Triton's box kernels on a GPU in 16 bits (triton.box_path);
    ``video``: it reads the video (the stem: a forward and a weight update, its rings in 16-byte rows,
    whatever its input channels)."""
    return tuple(m.stride[1:]) == (1, 1) and m.groups == 1 and m.out_channels % 8 == 0 and \
        (video or m.in_channels % 8 == 0)


def _reads_video(pipe, m: SidewaysConv3d) -> bool:
    from sideways_kernels.engine import reads_video
    return reads_video(pipe.graph, pipe.engine.stages[0], pipe._schedule(1, "sideways", True).inputs[0], m)


def summarize(ticks: list, plans: list, index: Optional[int] = None) -> TickSummary:
    """The tick a steady state repeats (the busiest steady tick), else the busiest tick."""
    if index is None:
        steady = [i for i, p in enumerate(plans) if p.steady]
        pool = steady or range(len(ticks))
        index = max(pool, key=lambda i: (len(ticks[i]), sum(l.flops for l in ticks[i])))
    tick = ticks[index]
    gemms = [l for l in tick if l.kind in GEMM_KINDS]
    others = [l for l in tick if l.kind not in GEMM_KINDS]
    return TickSummary(index, plans[index].steady, tick, sum(l.flops for l in tick), sum(l.bytes for l in gemms),
                       sum(l.bytes for l in others), {t: sum(gemm_us(l, t) for l in gemms)
                                                      for t in TABLES},
                       sum(memory_us(l) for l in others))


@dataclasses.dataclass
class LaunchCosts:
    """What a launch costs beyond its math, inferred from the measured ticks of REFERENCE_TICK
    (eager and replayed from CUDA graphs, per tick over its clip) and this model of that clip:
    ``graph_us``, inside a graph (the GPU's launch latency, a small kernel's ramp and tail, stream
    joins, less what the stages' streams overlap): (graph time - modelled math) / launches, both
    per tick; ``eager_us``, on top of that when launched from Python: (eager - graph) / launches."""
    launches: int
    modelled_ms: float
    graph_us: float
    eager_us: float


def measured_tick_ms(fps: float, batch: int, frames: int, ticks: int) -> float:
    """ms per tick of a clip measured at ``fps`` frames/s (frames of all ``batch`` clips)."""
    return batch * frames / fps / ticks * 1e3


def launch_costs() -> LaunchCosts:
    r = REFERENCE_TICK
    net, pipe = build(r["model"], r["stages"], r["update"])
    got = record(net, pipe, r["batch"], r["size"], r["frames"])
    ticks = [summarize(got.ticks, got.plans, i) for i in range(len(got.ticks))]
    n = sum(launch_count(t.launches, held=False) for t in ticks) / len(ticks)  # (measured before forms were held)
    n += counted_frames(pipe, got.plans) / len(ticks)  # and with a BatchNorm's count added every frame
    modelled = sum(t.gemm_us["today"] + t.other_us for t in ticks) / len(ticks) / 1e3
    graph, eager = (measured_tick_ms(r[k], r["batch"], r["frames"], len(ticks)) for k in ("graph_fps", "eager_fps"))
    return LaunchCosts(round(n), modelled, max(graph - modelled, 0.0) * 1e3 / n, (eager - graph) * 1e3 / n)


def counted_frames(pipe, plans: list) -> int:
    """The kernels the code measured launched and today's does not: a BatchNorm that updates its
    running statistics added one to its ``num_batches_tracked`` every frame; the engine now adds a
    run's count once at its end (``LocalNode.frame_counter``)."""
    from sideways_kernels.engine import counted_firings, frame_counters
    counted = frame_counters(pipe.graph, range(len(pipe.graph.nodes)))
    return sum(len(counted_firings(plan, range(len(plan.stages)), counted)) for plan in plans)


def layer_frames(pipe, frames: int) -> dict:
    """Output frames of each SidewaysConv3d for a clip of ``frames`` (what the clip forward
    computes), by the layer's name."""
    from sideways_kernels.graph import SOURCE, ChainNode, ConvNode
    graph = pipe.graph
    lengths = graph.lengths(frames)
    of = {}
    for node in graph.nodes:
        if isinstance(node, ConvNode):
            of[id(node.module)] = lengths[node.index]
        elif isinstance(node, ChainNode):
            n = frames if node.inputs[0] == SOURCE else lengths[node.inputs[0]]
            for layer in node.layers:
                n += layer.length_change
                of[id(layer)] = n
    return of


def per_frame_bp_us(net, pipe, ticks: list, frames: int) -> float:
    """Clip BP's convolutions per frame at cuDNN's rates: each layer's forward, input gradient
    (where the Sideways tick computes one) and weight gradient, once per frame it outputs."""
    out_frames = layer_frames(pipe, frames)
    convs = dict(net.named_modules())
    seen: dict = {}
    for tick in ticks:
        for l in tick:
            if l.layer is not None and l.kind in GEMM_KINDS:
                seen.setdefault(l.layer, {})[l.kind] = l
    total = 0.0
    for layer, by_kind in seen.items():
        share = out_frames.get(id(convs[layer]), frames) / frames
        fwd = by_kind.get("forward")
        if fwd is None:
            continue
        kinds = ["forward", "weight_accumulate"] + (["input_grad"] if "input_grad" in by_kind else [])
        total += share * sum(gemm_us(dataclasses.replace(fwd, kind=k), "cudnn") for k in kinds)
    return total


def report(model: str, batch: int, size: int, frames: int, stages: int, update: str, measure: bool = False,
           out=sys.stdout) -> dict:
    began = time.perf_counter()
    net, pipe = build(model, stages, update)
    got = record(net, pipe, batch, size, frames)
    ticks, plans = got.ticks, got.plans
    s = summarize(ticks, plans)
    costs = launch_costs()
    p = lambda *a: print(*a, file=out)
    p(f"# Tick model: {model}, B{batch}, {size}x{size}, T{frames}, {stages} stages, update={update!r}, bf16 autocast")
    p(f"{len(ticks)} ticks for {frames} frames (fill and drain: {len(ticks) - frames}); "
      f"{sum(p_.steady for p_ in plans)} steady. Shown: tick {s.index} ({'steady' if s.steady else 'the busiest'}).")
    p("")
    p("## Per layer and op (one call; the tick shown)")
    p(f"{'layer':32} {'problem':28} {'op':18} {'calls':>5} {'GFLOP':>8} {'MB min':>8} "
      f"{'us today':>9} {'us cuDNN':>9} {'us Triton':>9} {'us ceil':>8}")
    rows = collections.OrderedDict()
    for l in s.launches:
        if l.kind in GEMM_KINDS:
            rows.setdefault((l.layer, l.kind), [l, 0])[1] += 1
    for (layer, kind), (l, n) in rows.items():
        p(f"{str(layer)[:32]:32} {l.shape[:28]:28} {kind:18} {n:5d} {l.flops / 1e9:8.3f} {l.bytes / 1e6:8.2f} "
          + " ".join(f"{gemm_us(l, t):9.1f}" for t in TABLES[:-1]) + f" {gemm_us(l, 'ceiling'):8.1f}")
    p("(today: " + ", ".join(f"{kind} {today(kind)}" for kind in GEMM_KINDS) + " — dispatch.json's sm_90 bf16 "
      "choice, cuDNN (torch) for a call Triton would run on its unmeasured general kernels: strided, grouped, "
      "unaligned; a torch op priced at the torch backend's rates of 2026-11-27)")
    p("")
    p("## Other launches of the tick shown (ATen kernels: bytes at the HBM datasheet bandwidth)")
    others = collections.OrderedDict()
    for l in s.launches:
        if l.kind not in GEMM_KINDS and l.kernels:
            o = others.setdefault(l.op, [0, 0.0])
            o[0] += 1
            o[1] += l.bytes
    for op, (n, b) in sorted(others.items(), key=lambda kv: -kv[1][1]):
        p(f"  {op:40} x{n:<4d} {b / 1e6:9.2f} MB {b / (GPU['hbm_tb_s'] * 1e12) * 1e6:8.1f} us")
    n_today = launch_count(s.launches)
    sideways = [l for l in s.launches if l.kind in GEMM_KINDS]
    schedule = pipe._schedule(frames, "sideways", True)
    planned, parts = planned_launches(s.launches, schedule.problems(plans[s.index]))
    mean_launches = sum(launch_count(t) for t in ticks) / len(ticks)
    p("")
    p("## Launch plan")
    p(f"today: {n_today} kernel launches this tick ({len(sideways)} sideways ops in {launch_count(sideways)} kernels "
      f"under today's dispatch, {n_today - launch_count(sideways)} ATen kernels); {mean_launches:.0f} per tick on "
      "average over the clip" + (" (the weights' forms made once a clip)" if got.held_forms else ""))
    p(f"planned (grouped, Schedule.problems): {planned} — " + "; ".join(parts))
    built, how = built_weight_launches(pipe, schedule.problems(plans[s.index]))
    p(f"built so far: the weight updates on the Triton backend, {built} launches this tick — {how}")
    for op, what in (("forward", "forwards"), ("input_grad", "input gradients")):
        built, how = built_first_conv_launches(pipe, schedule.problems(plans[s.index]), op)
        p(f"built so far: the {what} on the Triton backend, {built} launches this tick — {how}")
    own = own_stages(pipe)
    if own:
        pools = sum(pool for _, _, pool in own.values())
        p(f"built so far: {len(own)} stages the engine runs itself (a conv, its ReLU, {pools} of them a 1x2x2 max "
          "pool) on the Triton backend — their forwards, input gradients and weight updates in the grouped launches "
          "above, whatever the depth; each one's ReLU, ReLU backward, pool and pool backward and two double-buffer "
          f"copies ({4 * len(own) + 2 * pools} launches a steady tick) in those launches' epilogues")
        from sideways_kernels import backend
        p(f"built so far on the default dispatch, where dispatch.json's stage_epilogue is \"triton\" (today, sm_90 "
          f"bf16: \"{backend.choose('stage_epilogue', torch.bfloat16, 'sm_90')}\"): the same {len(own)} stages run by "
          "the engine, their forwards where the dispatch sends them (cuDNN) and every one's epilogue in 1 launch a "
          "steady tick")
    r = REFERENCE_TICK
    p(f"a launch costs {costs.graph_us:.1f} us in a graph and {costs.eager_us:.1f} us more from Python, inferred "
      f"from the {GPU['device']}'s {r['model']} clip (B{r['batch']} {r['size']}x{r['size']} T{r['frames']}, default "
      f"dispatch: {r['graph_fps']} frames/s in graphs, {r['eager_fps']} eager) over the {costs.launches} launches "
      f"and {costs.modelled_ms:.3f} ms of modelled math this model finds per tick there")
    p("")
    gemm, other = s.gemm_us, s.other_us
    graph = gemm["today"] + other + n_today * costs.graph_us
    eager = graph + n_today * costs.eager_us
    grouped = gemm["cudnn"] + planned * costs.graph_us  # every GEMM at cuDNN's rates, elementwise work fused
    p(f"## Predicted time of the tick shown ({GPU['device']} rates; HBM: datasheet)")
    p(f"FLOPs {s.flops / 1e9:.1f} GFLOP; bytes: GEMM operands {s.min_bytes / 1e6:.1f} MB (the least a tick "
      f"moves), other launches {s.other_bytes / 1e6:.1f} MB")
    p(f"GEMMs: {gemm['today'] / 1e3:.3f} ms at today's default's rates, {gemm['cudnn'] / 1e3:.3f} ms at cuDNN's, "
      f"{gemm['triton'] / 1e3:.3f} ms at our Triton kernels', {gemm['ceiling'] / 1e3:.3f} ms at the "
      f"{GPU['matmul_tflops']:.0f} TFLOP/s ceiling")
    p(f"other launches (memory-bound): {other / 1e3:.3f} ms; per-launch costs: {n_today} x "
      f"({costs.graph_us:.1f} + {costs.eager_us:.1f}) us")
    p(f"=> eager today ~{eager / 1e3:.3f} ms; CUDA graph today ~{graph / 1e3:.3f} ms; grouped ({planned} launches) "
      f"at cuDNN's rates, elementwise fused, in a graph ~{grouped / 1e3:.3f} ms; at the ceiling "
      f"~{gemm['ceiling'] / 1e3:.3f} ms")
    means = [summarize(ticks, plans, i) for i in range(len(ticks))]
    mean = lambda f: sum(f(m) for m in means) / len(means)
    graph_of = lambda m, held=True: m.gemm_us["today"] + m.other_us + launch_count(m.launches, held) * costs.graph_us
    mean_graph = mean(graph_of)
    # the code measured: every call deriving its weight's forms, every BatchNorm counting each frame
    mean_derived = mean(lambda m: graph_of(m, held=False)) + counted_frames(pipe, plans) / len(ticks) * costs.graph_us
    mean_eager = mean_graph + mean(lambda m: launch_count(m.launches)) * costs.eager_us
    mean_grouped = mean(lambda m: m.gemm_us["cudnn"] + planned_launches(m.launches, schedule.problems(plans[m.index]))[0]
                        * costs.graph_us)
    p(f"mean over the clip's {len(ticks)} ticks: eager today ~{mean_eager / 1e3:.3f} ms, CUDA graph today "
      f"~{mean_graph / 1e3:.3f} ms, grouped in a graph ~{mean_grouped / 1e3:.3f} ms per tick; "
      f"{mean(lambda m: m.flops) / 1e9:.1f} GFLOP per tick")
    bp = GPU["clip_bp_fps"].get((model, frames))
    sideways = GPU["sideways_fps"].get((model, frames))
    bp_model = per_frame_bp_us(net, pipe, ticks, frames)
    p("")
    p("## Clip BP, per frame (a frame of all B clips: what a tick must take to match it)")
    measured_at = ", ".join(f"{m} T{t}" for m, t in GPU["clip_bp_fps"])
    if bp is not None and batch == 8 and size == 112:
        p(f"measured ({GPU['device']}, B8 112x112 T{frames}): {bp} frames/s = {batch / bp * 1e3:.3f} ms per frame")
    else:
        p(f"measured ({GPU['device']}): only at B8, 112x112: {measured_at}")
    p(f"model: its convolutions at cuDNN's rates: {bp_model / 1e3:.3f} ms per frame")
    per_frame = lambda ms: ms * len(ticks) / frames
    p(f"Sideways per frame (ticks per frame {len(ticks) / frames:.2f}): eager today ~{per_frame(mean_eager) / 1e3:.3f} "
      f"ms, CUDA graph today ~{per_frame(mean_graph) / 1e3:.3f} ms, grouped ~{per_frame(mean_grouped) / 1e3:.3f} ms")
    if sideways is not None and batch == 8 and size == 112 and stages == 4 and update == "clip":
        p(f"measured ({GPU['device']}, default dispatch, CUDA graphs): {sideways} frames/s = "
          f"{batch / sideways * 1e3:.3f} ms per frame, {measured_tick_ms(sideways, batch, frames, len(ticks)):.3f} ms "
          f"per tick; predicted per tick for the code measured (every call deriving its weight's forms, every "
          f"BatchNorm counting each frame): {mean_derived / 1e3:.3f} ms, for today's: {mean_graph / 1e3:.3f} ms "
          "(the torch backend's fold and the kernels changed too since: bench/RESULTS.md)")
    p("")
    p("## Memory at this size (bf16 activations, fp32 weights and gradients)")
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    held = sum(got.held.values())
    p(f"held by the engine across ticks (Engine.held_by_kind): {mib(held)} — "
      + ", ".join(f"{k} {mib(v)}" for k, v in got.held.items() if v))
    busiest = max(range(len(got.peaks)), key=got.peaks.__getitem__)
    p(f"a tick's own allocations at their peak: {mib(got.peaks[busiest])} (tick {busiest}); mean "
      f"{mib(sum(got.peaks) / len(got.peaks))}")
    kept = kept_across_ticks(got)
    p(f"allocated by a tick and alive after it, besides the gradients: {mib(sum(n for n, _ in kept.values()))}"
      + "".join(f"; {op} {mib(n)}" for n, op in kept.values()))
    sideways_peak = got.params + got.grads + held + got.peaks[busiest]
    bp_saved = bp_saved_bytes(net, batch, size, frames)
    p(f"parameters {mib(got.params)}, gradients {mib(got.grads)} => Sideways peak ~{mib(sideways_peak)} (the backends' "
      f"16-bit copies of the weights, ~{mib(got.params / 2)}, not counted)")
    p(f"clip BP: saves {mib(bp_saved)} for its backward => peak ~{mib(got.params + got.grads + bp_saved)} "
      f"(ratio {sideways_peak / (got.params + got.grads + bp_saved):.2f})")
    p(f"(modelled in {time.perf_counter() - began:.0f} s)")
    result = dict(ticks=len(ticks), shown=s.index, launches=n_today, planned=planned, costs=costs, recording=got,
                  sideways_peak=sideways_peak, bp_peak=got.params + got.grads + bp_saved,
                  predicted_eager_ms=eager / 1e3, predicted_graph_ms=graph / 1e3, predicted_grouped_ms=grouped / 1e3,
                  mean_eager_ms=mean_eager / 1e3, mean_graph_ms=mean_graph / 1e3, mean_grouped_ms=mean_grouped / 1e3,
                  mean_derived_ms=mean_derived / 1e3)
    if measure:
        result.update(measure_on_gpu(model, batch, size, frames, stages, update, out,
                                     predicted=dict(eager=mean_eager / 1e3, graph=mean_graph / 1e3, peak=sideways_peak)))
    return result


def measure_on_gpu(model, batch, size, frames, stages, update, out=sys.stdout, clips: int = 4,
                   predicted: Optional[dict] = None) -> dict:
    """Times the same clip on a CUDA GPU under bf16 autocast, CUDA graphs off and on: ms per
    tick (the mean over the last clips: the first warms up, the second captures) and the peak
    memory of a clip, beside the model's ``predicted`` ms per tick (eager, graph) and peak."""
    if not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU")
    predicted = predicted or {}
    got = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        net, pipe = build(model, stages, update, device="cuda")
        pipe.cuda_graph = graphs
        video = torch.randn(batch, 3, frames, size, size, device="cuda")
        target = torch.randint(0, 10, (batch,), device="cuda")
        times, peaks = [], []
        for _ in range(clips):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                pipe.backward_clip(video, target)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
            peaks.append(torch.cuda.max_memory_allocated())
            net.zero_grad(set_to_none=True)
        name = "graph" if graphs else "eager"
        ms = sum(times[2:]) / len(times[2:]) / pipe.last_ticks * 1e3
        replays = pipe._graphs.replays if pipe._graphs is not None else 0
        got[f"measured_{name}_ms"], got[f"measured_{name}_peak"] = ms, peaks[-1]
        print(f"measured, graphs {'on ' if graphs else 'off'}: {ms:.3f} ms per tick (predicted "
              f"{predicted.get(name, float('nan')):.3f}; replays {replays}), "
              f"{batch * frames / (ms * pipe.last_ticks / 1e3):.0f} frames/s; peak {peaks[-1] / 2**20:.0f} MiB "
              f"(predicted {predicted.get('peak', float('nan')) / 2**20:.0f}; engine holds "
              f"{pipe.engine.held_bytes() / 2**20:.0f})", file=out)
    return got


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--model", choices=["c3d", "r3d_18", "chain"], default="c3d")
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--size", type=int, default=112)
    a.add_argument("--frames", type=int, default=48)
    a.add_argument("--stages", type=int, default=4)
    a.add_argument("--update", choices=["clip", "tick"], default="clip")
    a.add_argument("--measure", action="store_true", help="also time the clip on a CUDA GPU")
    args = a.parse_args(argv)
    report(args.model, args.batch, args.size, args.frames, args.stages, args.update, args.measure)


if __name__ == "__main__":
    main()

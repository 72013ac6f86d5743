"""A tick model you can read without a GPU: where a Sideways training tick's time should go.

    python bench/tick_model.py --model c3d|r3d_18 --batch 8 --size 112 [--frames 48] [--stages 4]
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

The rates (``H200``) are the figures of ``../shared/measurements/h200-2026-11-27/`` (one H200,
bf16): the 774 TFLOP/s matmul ceiling, cuDNN's and our Triton kernels' measured per-op rates
(results.md; a layer takes the rate measured at the C3D shape whose input channels are nearest),
the cost of one eager launch inferred from the C3D tick there (10.66 ms eager vs 2.06 ms from a
CUDA graph, over the launches this model counts for that tick), clip BP's frames/s (e2e.log) —
and HBM bandwidth, a datasheet figure (not measured). FLOPs of the input gradient follow
results.md's convention (every temporal tap: what cuDNN computes; the Triton and CUDA
backends sum the taps' weights first and do 1/k_t of it). Launches are counted with the
CPU's backend, where a sideways op is one kernel; on a GPU the Triton and CUDA backends add a
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

# --- the rates: ../shared/measurements/h200-2026-11-27/ (one NVIDIA H200, bf16) ------------------
H200 = dict(
    matmul_tflops=774.0,  # measured: a large bf16 torch.matmul (results.md)
    hbm_tb_s=4.8,  # NOT measured: the H200 datasheet's HBM3e bandwidth
    # results.md, TFLOP/s per op at the three C3D shapes (C_in, C_out, B, H=W): the best cuDNN
    # layout, and our Triton kernels (the default backend for bf16 on sm_90)
    shapes=[(64, 128, 8, 56), (128, 256, 16, 28), (256, 256, 32, 14)],
    cudnn=dict(forward=[133.0, 244.6, 241.7], input_grad=[54.2, 127.0, 102.1],
               weight_accumulate=[174.0, 302.6, 250.6], weight_sgd=[96.5, 178.9, 182.1]),
    triton=dict(forward=[37.1, 60.2, 56.1], input_grad=[40.9, 139.8, 88.0],
                weight_accumulate=[27.8, 43.1, 38.7], weight_sgd=[24.3, 40.3, 39.7]),
    # results.md: a C3D (64-256) tick at B8, 56x56, T64, per-tick SGD, 4 stages, bf16 autocast
    tick_eager_ms=10.662, tick_graph_ms=2.062,
    # e2e.log: clip BP (nn.Conv3d + autograd) frames/s at B8, 112x112, bf16 autocast
    clip_bp_fps={("c3d", 16): 14676, ("c3d", 48): 16616, ("r3d_18", 16): 6550, ("r3d_18", 48): 9125},
)
REFERENCE_TICK = dict(model="c3d", batch=8, size=56, frames=16, stages=4, update="tick")  # H200's tick_*_ms

SIDEWAYS_KIND = {"ring_conv_forward": "forward", "window_input_grad": "input_grad",
                 "weight_grad_accumulate": "weight_accumulate", "sgd_tick_update": "weight_sgd"}
# ATen ops that launch no kernel: views, metadata, allocations
NOT_KERNELS = {"detach", "view", "_unsafe_view", "unsqueeze", "squeeze", "as_strided", "slice", "select",
               "expand", "permute", "t", "transpose", "alias", "empty", "empty_like", "empty_strided", "new_empty",
               "new_empty_strided", "lift_fresh", "set_", "resize_", "is_same_size", "split", "split_with_sizes",
               "unbind", "chunk", "view_as", "_reshape_alias", "narrow", "diagonal", "unfold", "sym_size",
               "sym_stride", "sym_numel", "_has_compatible_shallow_copy_type"}
GEMM_KINDS = ("forward", "input_grad", "weight_accumulate", "weight_sgd")


@dataclasses.dataclass
class Launch:
    op: str  # "sideways.ring_conv_forward", "aten.relu_", ...
    kind: str  # forward | input_grad | weight_accumulate | weight_sgd | other
    layer: Optional[str]  # the SidewaysConv3d's name (sideways ops)
    flops: float
    bytes: float
    shape: str = ""  # the conv's problem (sideways ops)


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

    def __init__(self, convs: dict, fake: bool):
        super().__init__()
        self.convs = convs  # name -> SidewaysConv3d
        self.fake = fake
        self.ticks: list[list[Launch]] = []
        self.peaks: list[int] = []
        self.leftover: list[dict] = []
        self._refs: list = []  # (weakref to a tensor on storage allocated this tick, op)
        self._fresh: set = set()  # storages allocated this tick

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
        if namespace == "aten" and (name in NOT_KERNELS or name.endswith("_") and name[:-1] in NOT_KERNELS):
            return out  # (in-place views too: unsqueeze_, as_strided_, ...)
        if namespace == "sideways":
            self.ticks[-1].append(_sideways_launch(name, args, out, self))
        else:
            inputs = {id(t): t for t in _tensors(list(args) + list(kwargs.values()))}
            written = [t for t in _tensors(out)]
            moved = sum(_nbytes(t) for t in inputs.values()) + sum(_nbytes(t) for t in written)
            self.ticks[-1].append(Launch(f"{namespace}.{name}", "other", None, _aten_flops(func, args, kwargs, out),
                                         moved))
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
    return Launch(f"sideways.{name}", kind, layer, flops, moved, shape)


# --- the networks ----------------------------------------------------------------------------------

def build(model: str, stages: int, update: str = "clip", device: str = "cpu"):
    """(network, pipeline) as the H200 run built them: C3D 64-256 (bench_gpu's builder), or a
    converted r3d_18 (width 64, BatchNorm per frame)."""
    import bench_gpu
    if model == "c3d":
        net = bench_gpu._c3d(SidewaysConv3d, device)
        cut = lambda **kw: SidewaysPipeline(models.stages(net, stages), **kw)
    elif model == "r3d_18":
        net = models.r3d_18(10).to(device)
        cut = lambda **kw: SidewaysPipeline.from_model(net, stages=stages, batchnorm="frame", **kw)
    else:
        raise ValueError(f"--model must be c3d or r3d_18, got {model!r}")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9) if update == "tick" else None
    return net, cut(update=update, optimizer=opt, cuda_graph=False)


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


def record(net, pipe, batch: int, size: int, frames: int, amp: bool = True, fake: bool = True) -> Recording:
    """Run two training clips, as a training loop does (the gradients set to None in between),
    and count each tick's launches and allocations in the second (the first allocates the
    rings and buffers). ``amp``: bf16 activations as CUDA autocast gives them — emulated by a
    bf16 network and clip (CPU autocast would run pools and others in fp32, which CUDA's does
    not); CUDA autocast's few casts (each frame at the first conv, the logits for the loss)
    are not counted. The network's parameters are put back as they were."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    saved = [(t, t.detach().clone()) for t in [*net.parameters(), *net.buffers()]] if amp else None
    if amp:
        net.to(torch.bfloat16)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, SidewaysConv3d)}
    rec = _Recorder(convs, fake)
    engine = pipe.engine
    own = vars(engine).get("_tick")  # an instance's own _tick (a test's), put back after
    tick = engine._tick

    def counted(*a, **kw):
        rec.begin_tick()
        up, down, done, losses = tick(*a, **kw)
        rec.end_tick((done, losses))
        return up, down, done, losses
    schedule = pipe._schedule(frames, "sideways", True)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    try:
        with mode:
            video = torch.zeros(batch, 3, frames, size, size, dtype=torch.bfloat16 if amp else torch.float32)
            target = torch.zeros(batch, dtype=torch.long)
            out_len = pipe.output_length(frames)
            loss = lambda out, t: F.cross_entropy(frame_logits(out), target) / out_len
            for recorded in (False, True):
                net.zero_grad(set_to_none=True)
                engine._tick = counted if recorded else tick
                clip = (video[:, :, t:t + 1] for t in range(frames))
                with rec if recorded else contextlib.nullcontext():
                    for _ in engine.run(schedule, clip, "sideways", loss, None, backend=pipe.backend,
                                        optimizer=pipe.optimizer, update=pipe.update):
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
            engine.buffers.clear(), engine.fifo.clear(), engine.queue.clear()
    return Recording(rec.ticks, list(schedule), rec.peaks, rec.leftover, held, grads, grad_storages,
                     sum(p.numel() * 4 for p in net.parameters()))


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

def _rate(table: str, kind: str, layer_cin: int) -> float:
    """TFLOP/s of ``kind`` from H200[table] at the measured shape with the nearest C_in."""
    shapes = H200["shapes"]
    i = min(range(len(shapes)), key=lambda j: abs(math.log2(max(layer_cin, 1)) - math.log2(shapes[j][0])))
    return H200[table][kind][i]


def _cin(shape: str) -> int:
    return int(shape.split("->")[0]) if "->" in shape else 64


def gemm_us(launch: Launch, table: str) -> float:
    """Predicted µs of one sideways op: its FLOPs at the measured rate, or its bytes at the HBM
    datasheet bandwidth if that is longer."""
    rate = H200["matmul_tflops"] if table == "ceiling" else _rate(table, launch.kind, _cin(launch.shape))
    return max(launch.flops / (rate * 1e12), launch.bytes / (H200["hbm_tb_s"] * 1e12)) * 1e6


def memory_us(launch: Launch) -> float:
    return launch.bytes / (H200["hbm_tb_s"] * 1e12) * 1e6


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
    channels in multiples of 8) grouped — per kernel shape and 16 layers one GEMM and one finish,
    plus one finish for their biases —, each other layer alone (its GEMM, its finish and, with a
    bias, the bias's sum and step)."""
    from sideways_kernels.graph import ChainNode
    graph = pipe.graph
    layers = [(graph.nodes[q.node].layers if isinstance(graph.nodes[q.node], ChainNode)
               else [graph.nodes[q.node].module])[q.layer] for q in problems if q.op == "weight"]
    shapes: dict = {}
    alone = 0
    for m in layers:
        if tuple(m.stride[1:]) == (1, 1) and m.groups == 1 and m.in_channels % 8 == 0 and m.out_channels % 8 == 0:
            shapes.setdefault(tuple(m.kernel_size), []).append(m)
        else:
            alone += 2 + 2 * (m.bias is not None)
    grouped = 0
    for group in shapes.values():
        for lo in range(0, len(group), 16):
            chunk = group[lo:lo + 16]
            grouped += 2 + any(m.bias is not None for m in chunk)
    n_grouped = sum(len(g) for g in shapes.values())
    return grouped + alone, (f"{n_grouped} layers grouped in {grouped} launches ({len(shapes)} kernel shapes), "
                             f"{len(layers) - n_grouped} alone in {alone}")


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
                                                      for t in ("cudnn", "triton", "ceiling")},
                       sum(memory_us(l) for l in others))


@dataclasses.dataclass
class LaunchCosts:
    """What a launch costs beyond its math, inferred from the H200's C3D tick (eager 10.66 ms,
    CUDA graph 2.06 ms) and this model of that tick: ``graph_us``, inside a graph (the GPU's
    launch latency, a small kernel's ramp and tail, stream joins): (graph time - modelled math)
    / launches; ``eager_us``, on top of that when launched from Python: (eager - graph) /
    launches."""
    launches: int
    modelled_ms: float
    graph_us: float
    eager_us: float


def launch_costs() -> LaunchCosts:
    r = REFERENCE_TICK
    net, pipe = build(r["model"], r["stages"], r["update"])
    got = record(net, pipe, r["batch"], r["size"], r["frames"])
    s = summarize(got.ticks, got.plans)
    n, modelled = len(s.launches), (s.gemm_us["triton"] + s.other_us) / 1e3
    return LaunchCosts(n, modelled, max(H200["tick_graph_ms"] - modelled, 0.0) * 1e3 / n,
                       (H200["tick_eager_ms"] - H200["tick_graph_ms"]) * 1e3 / n)


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
      f"{'us cuDNN':>9} {'us Triton':>9} {'us ceil':>8}")
    rows = collections.OrderedDict()
    for l in s.launches:
        if l.kind in GEMM_KINDS:
            rows.setdefault((l.layer, l.kind), [l, 0])[1] += 1
    for (layer, kind), (l, n) in rows.items():
        p(f"{str(layer)[:32]:32} {l.shape[:28]:28} {kind:18} {n:5d} {l.flops / 1e9:8.3f} {l.bytes / 1e6:8.2f} "
          f"{gemm_us(l, 'cudnn'):9.1f} {gemm_us(l, 'triton'):9.1f} {gemm_us(l, 'ceiling'):8.1f}")
    p("")
    p("## Other launches of the tick shown (ATen kernels: bytes at the HBM datasheet bandwidth)")
    others = collections.OrderedDict()
    for l in s.launches:
        if l.kind not in GEMM_KINDS:
            o = others.setdefault(l.op, [0, 0.0])
            o[0] += 1
            o[1] += l.bytes
    for op, (n, b) in sorted(others.items(), key=lambda kv: -kv[1][1]):
        p(f"  {op:40} x{n:<4d} {b / 1e6:9.2f} MB {b / (H200['hbm_tb_s'] * 1e12) * 1e6:8.1f} us")
    n_today = len(s.launches)
    n_sideways = sum(l.kind in GEMM_KINDS for l in s.launches)
    schedule = pipe._schedule(frames, "sideways", True)
    planned, parts = planned_launches(s.launches, schedule.problems(plans[s.index]))
    mean_launches = sum(len(t) for t in ticks) / len(ticks)
    p("")
    p("## Launch plan")
    p(f"today: {n_today} launches this tick ({n_sideways} sideways ops, {n_today - n_sideways} ATen kernels); "
      f"{mean_launches:.0f} per tick on average over the clip")
    p(f"planned (grouped, Schedule.problems): {planned} — " + "; ".join(parts))
    built, how = built_weight_launches(pipe, schedule.problems(plans[s.index]))
    p(f"built so far: the weight updates on the Triton backend, {built} launches this tick — {how}")
    p(f"a launch costs {costs.graph_us:.1f} us in a graph and {costs.eager_us:.1f} us more from Python, inferred "
      f"from the H200 C3D tick (B8 56x56 per-tick SGD: {H200['tick_graph_ms']} ms in a graph, "
      f"{H200['tick_eager_ms']} ms eager) over the {costs.launches} launches and {costs.modelled_ms:.3f} ms of "
      f"modelled math this model finds in that tick")
    p("")
    gemm, other = s.gemm_us, s.other_us
    graph = gemm["triton"] + other + n_today * costs.graph_us
    eager = graph + n_today * costs.eager_us
    grouped = gemm["cudnn"] + planned * costs.graph_us  # every GEMM at cuDNN's rates, elementwise work fused
    p("## Predicted time of the tick shown (H200 rates; HBM: datasheet)")
    p(f"FLOPs {s.flops / 1e9:.1f} GFLOP; bytes: GEMM operands {s.min_bytes / 1e6:.1f} MB (the least a tick "
      f"moves), other launches {s.other_bytes / 1e6:.1f} MB")
    p(f"GEMMs: {gemm['cudnn'] / 1e3:.3f} ms at cuDNN's rates, {gemm['triton'] / 1e3:.3f} ms at our Triton "
      f"kernels' (measured), {gemm['ceiling'] / 1e3:.3f} ms at the {H200['matmul_tflops']:.0f} TFLOP/s ceiling")
    p(f"other launches (memory-bound): {other / 1e3:.3f} ms; per-launch costs: {n_today} x "
      f"({costs.graph_us:.1f} + {costs.eager_us:.1f}) us")
    p(f"=> eager today ~{eager / 1e3:.3f} ms; CUDA graph today ~{graph / 1e3:.3f} ms; grouped ({planned} launches) "
      f"at cuDNN's rates, elementwise fused, in a graph ~{grouped / 1e3:.3f} ms; at the ceiling "
      f"~{gemm['ceiling'] / 1e3:.3f} ms")
    means = [summarize(ticks, plans, i) for i in range(len(ticks))]
    mean = lambda f: sum(f(m) for m in means) / len(means)
    mean_graph = mean(lambda m: m.gemm_us["triton"] + m.other_us + len(m.launches) * costs.graph_us)
    mean_eager = mean_graph + mean(lambda m: len(m.launches)) * costs.eager_us
    mean_grouped = mean(lambda m: m.gemm_us["cudnn"] + planned_launches(m.launches, schedule.problems(plans[m.index]))[0]
                        * costs.graph_us)
    p(f"mean over the clip's {len(ticks)} ticks: eager today ~{mean_eager / 1e3:.3f} ms, CUDA graph today "
      f"~{mean_graph / 1e3:.3f} ms, grouped in a graph ~{mean_grouped / 1e3:.3f} ms per tick; "
      f"{mean(lambda m: m.flops) / 1e9:.1f} GFLOP per tick")
    bp = H200["clip_bp_fps"].get((model, frames))
    bp_model = per_frame_bp_us(net, pipe, ticks, frames)
    p("")
    p("## Clip BP, per frame (a frame of all B clips: what a tick must take to match it)")
    if bp is not None and batch == 8 and size == 112:
        p(f"measured (e2e.log, B8 112x112 T{frames}): {bp} frames/s = {batch / bp * 1e3:.3f} ms per frame")
    else:
        p("measured (e2e.log): only at B8, 112x112, T16 and T48")
    p(f"model: its convolutions at cuDNN's rates: {bp_model / 1e3:.3f} ms per frame")
    per_frame = lambda ms: ms * len(ticks) / frames
    p(f"Sideways per frame (ticks per frame {len(ticks) / frames:.2f}): eager today ~{per_frame(mean_eager) / 1e3:.3f} "
      f"ms, CUDA graph today ~{per_frame(mean_graph) / 1e3:.3f} ms, grouped ~{per_frame(mean_grouped) / 1e3:.3f} ms")
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
                  mean_eager_ms=mean_eager / 1e3, mean_graph_ms=mean_graph / 1e3, mean_grouped_ms=mean_grouped / 1e3)
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
    a.add_argument("--model", choices=["c3d", "r3d_18"], default="c3d")
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

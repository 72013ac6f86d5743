"""The streaming graph (DESIGN.md §5): a video network as nodes that each take at most one
sample a tick. A node's output samples are numbered 0, 1, 2, …; its *window* says which input
samples output ``n`` is made of (``n·stride − pad + j·dilation``, ``j < kernel``) and so which
input sample's arrival lets it emit ``n``. That gives every node a **rate divisor** (it emits
once every ``r`` input frames) and a **lag** (its output for a frame appears ``λ`` input frames
late): a temporal conv or pool maps ``(r, λ)`` to ``(r·s, λ + r·(d·(k−1) − p))``; frame-local
nodes keep both. A join (``+``, ``cat``, ``*``) waits until every input has the same sample
index, holding the earlier inputs' samples meanwhile (its delay line).

Temporal padding (``from_model(..., temporal_padding=)``): ``"same"`` streams every layer as the
model defines it; ``"causal"`` moves each temporal conv's and pool's padding to the past side
(window pad ``(p_start + p_end, 0)``), so the layer reads no future frame and adds no lag; its
function shifts in time. A strided layer's causal window ends on the last frame of its stride
group (pad ``(span − stride, 0)``, :func:`causal_padding`): every frame of the clip's whole groups
is read, at a lag of ``stride − 1``; a partial last group gives no output. A temporal node keeps
its window under each setting (:attr:`Node.windows`), so :meth:`StreamGraph.lags` gives both lags
whichever one streams.

Node kinds:

- :class:`ChainNode` — a stage module of the list API (``SidewaysPipeline([stage, ...])``), run
  whole once a tick; its SidewaysConv3d layers form a chain and follow a StreamClock.
- :class:`ConvNode` — a SidewaysConv3d: any temporal kernel, stride, padding and dilation.
- :class:`PoolNode` — MaxPool3d/AvgPool3d over time (its spatial part is applied per frame).
- :class:`LocalNode` — a frame-local op: elementwise, a join, a spatial op, a BatchNorm under
  its policy, and the pool over all remaining frames (``head=True``), whose per-frame part is
  the op itself on one frame.

Stages are cut where a single tensor crosses (:func:`cut_points`, :func:`balance`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import PUSH, HOLD, ZEROS, SidewaysConv3d, StreamClock, live_taps

__all__ = ["Window", "Node", "ChainNode", "ConvNode", "PoolNode", "LocalNode", "StreamGraph", "SOURCE",
           "TEMPORAL_PADDINGS", "causal_padding", "cut_points", "balance"]

INF = math.inf
SOURCE = -1  # producer id of the video
TEMPORAL_PADDINGS = ("same", "causal")


def causal_padding(pad: tuple[int, int], span: int, stride: int = 1) -> Union[tuple[int, int], str]:
    """The causal form of temporal padding ``(start, end)`` of a window of ``span`` frames moving
    ``stride`` frames: no end padding. Stride 1: all of the padding on the past side,
    ``(start + end, 0)`` (a layer without end padding is left as it is). Strided: each window ends
    on the last frame of its stride group (output ``n`` reads up to input ``n·stride + stride − 1``),
    ``(span − stride, 0)``: every frame of the clip's whole groups is read (windows ending on the
    group's first frame never read the last ``stride − 1`` frames, and the first output after a
    few strides saw one frame), the layer adds a lag of ``stride − 1`` at its input rate, and
    strided branches that meet stay aligned and of one length, ``⌊L / stride⌋`` (a negative start
    skips the first frames: an unpadded 1-tap strided shortcut reads the group's last frame, as its
    padded 3-tap sibling does). A partial last group gives no output: its window would need
    frames after the clip. (End padding to complete it was tried: in Sideways the drain then
    normalised all-zero samples with per-frame BatchNorm and the gradients grew ~10^5-fold.)
    Returns why not (a sentence) where the padding exceeds ``span - 1`` (the causal window would
    begin before the span allows: its first outputs would precede every input)."""
    start, end = pad
    if end == 0 and stride == 1:
        return (start, end)
    if start + end > span - 1:
        return (f"its temporal padding {start}+{end} exceeds the window span - 1 = {span - 1}, so its causal form "
                f"(all {start + end} zero frames before the window) would emit outputs before any input; use "
                "temporal_padding='same'")
    return (start + end, 0) if stride == 1 else (span - stride, 0)


@dataclasses.dataclass(frozen=True)
class Window:
    """Which input samples output sample ``n`` reads: ``n·stride − pad[0] + j·dilation`` for
    ``j < kernel``; those outside ``[0, L)`` are padding (zeros for a conv, left out of a pool).
    ``ceil`` is a pool's ceil_mode. Frame-local nodes have the trivial window."""
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad: tuple[int, int] = (0, 0)
    ceil: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def lag(self) -> int:
        """Input samples between output ``n``'s first stride position and its newest input."""
        return self.span - 1 - self.pad[0]

    def length(self, n_in: float) -> float:
        """Output samples of an input of ``n_in`` samples (PyTorch's conv and pooling rule)."""
        if n_in == INF:
            return INF
        num = n_in + self.pad[0] + self.pad[1] - self.span
        if num < 0:
            return 0
        out = (-(-num // self.stride) if self.ceil else num // self.stride) + 1
        if self.ceil and (out - 1) * self.stride >= n_in + self.pad[0]:
            out -= 1
        return out

    def emits(self, m: int) -> Optional[int]:
        """The output sample that input sample ``m``'s arrival completes, or None."""
        q = m - self.lag
        if q < 0 or q % self.stride:
            return None
        return q // self.stride

    def taps(self, n: int) -> list[int]:
        start = n * self.stride - self.pad[0]
        return [start + j * self.dilation for j in range(self.kernel)]


class Node:
    """One op of the network as it streams. ``inputs``: producer ids (node indices, or
    :data:`SOURCE`). ``timed``: its output has a time axis (False after a head pool)."""
    kind = "node"
    window = Window()
    # A temporal node's window under each temporal padding setting (None: that setting cannot
    # stream it); frame-local nodes have the trivial window under both.
    windows: Optional[dict] = None

    def __init__(self, name: str, inputs: Sequence[int], module: Optional[nn.Module] = None):
        self.name, self.inputs, self.module = name, list(inputs), module
        self.timed = True
        self.tensor = True  # False for a node that yields a Python value (a size) per frame
        self.index = -1  # position in the graph, set by StreamGraph

    def out_length(self, lengths: list[float]) -> float:
        return self.window.length(lengths[0])

    def window_for(self, setting: str) -> Optional[Window]:
        """Its window under temporal padding ``setting`` (None where that setting cannot stream it)."""
        return self.window if self.windows is None else self.windows[setting]

    def emits(self, m: int) -> Optional[int]:
        return self.window.emits(m)

    def modules(self) -> list[nn.Module]:
        return [self.module] if self.module is not None else []

    def begin(self, mode: str) -> None:
        """A run starts (per-run state is reset here)."""

    def offline(self, *inputs):
        """The op on whole clips (GraphStage.forward, and predict's head)."""
        return self.module(*inputs)

    def flops(self, inputs: list, out) -> float:
        """Multiply-adds ×2 of one emission (for balancing stages); elementwise by default."""
        return float(out.numel()) if isinstance(out, torch.Tensor) else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _triple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _max_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    k, s, p, d = _triple(kernel_size), _triple(stride or kernel_size), _triple(padding), _triple(dilation)
    if (k[0], s[0], p[0]) != (1, 1, 0) or return_indices:
        return NotImplemented
    return F.max_pool2d(x, k[1:], s[1:], p[1:], d[1:], ceil_mode)


def _avg_pool(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    k, s, p = _triple(kernel_size), _triple(stride or kernel_size), _triple(padding)
    if (k[0], s[0], p[0]) != (1, 1, 0):
        return NotImplemented
    return F.avg_pool2d(x, k[1:], s[1:], p[1:], ceil_mode, count_include_pad, divisor_override)


# the 5-D function -> the same function of the 4-D frame (NotImplemented where it reaches across frames)
_FRAME_FORMS = {F.max_pool3d: _max_pool, F.avg_pool3d: _avg_pool, F.batch_norm: F.batch_norm}


class FrameKernels(torch.overrides.TorchFunctionMode):
    """While a node computes on a frame ``[B, C, 1, H, W]``: the batch norms and the max/avg pools
    that stay within the frame run on it as ``[B, C, H, W]``, where PyTorch's CUDA kernels for
    4-D channels-last tensors are the fast ones — BatchNorm's per-channel kernels (a 5-D input
    gets a Welford reduction and broadcast elementwise kernels: a third of a converted r3d_18's
    GPU time per tick on an H100, 2026-11-28) and the pools' NHWC kernels (the 3-D pools took a
    quarter of C3D's). The same function of the same numbers; at the function level, so a
    module's hooks still see the 5-D frame they always see. Everything else passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        form = _FRAME_FORMS.get(func)
        if form is not None and isinstance(args[0], torch.Tensor) and args[0].dim() == 5 and args[0].shape[2] == 1:
            out = form(args[0].squeeze(2), *args[1:], **kwargs)
            if out is not NotImplemented:
                return out.unsqueeze(2)
        return func(*args, **kwargs)


class ChainNode(Node):
    """A stage module of the list API: one frame in, one frame out, every tick. Its
    SidewaysConv3d layers form a chain inside it (a StreamClock tells each its frame); frame
    ``m`` in emits frame ``m − delay`` out."""
    kind = "chain"

    def __init__(self, name: str, inputs: Sequence[int], module: nn.Module):
        super().__init__(name, inputs, module)
        self.layers = [m for m in module.modules() if isinstance(m, SidewaysConv3d)]
        self.delay = sum(layer.stream_delay for layer in self.layers)
        self.change = sum(layer.length_change for layer in self.layers)
        self.clock = StreamClock()

    def out_length(self, lengths):
        return max(lengths[0] + self.change, 0)

    def emits(self, m):
        return m - self.delay if m >= self.delay else None

    def min_input(self) -> int:
        """The fewest input frames for which every layer outputs one."""
        change, need = 0, 1
        for layer in self.layers:
            change += layer.length_change
            need = max(need, 1 - change)
        return need

    def steps(self, m: int, length: float) -> tuple:
        """Every layer's (action, slot) when frame ``m`` of ``length`` enters (for graph phases)."""
        out = []
        for layer in self.layers:
            out.append(layer.ring_step(m, length))
            m, length = m - layer.stream_delay, length + layer.length_change
        return tuple(out)

    def run(self, x: torch.Tensor, m: int, length: float) -> torch.Tensor:
        self.clock.frame, self.clock.length = m, length
        with FrameKernels():
            out = self.module(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 5 or out.shape[2] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{self.name} ({type(self.module).__name__}) returned {shape}; a stage must map a "
                             "frame [B, C, 1, H, W] to [B, C', 1, H', W']")
        return out


def _windows(pad: tuple[int, int], span: int, stride: int, make: Callable[[tuple[int, int]], Window],
             temporal_padding: str) -> tuple[dict, Window]:
    """A temporal node's window under each setting, and the one it streams with (ValueError: why
    that setting cannot stream it)."""
    if temporal_padding not in TEMPORAL_PADDINGS:
        raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDINGS}, got {temporal_padding!r}")
    pads = {"same": pad, "causal": causal_padding(pad, span, stride)}
    if isinstance(pads[temporal_padding], str):
        raise ValueError(pads[temporal_padding])
    windows = {key: make(p) if isinstance(p, tuple) else None for key, p in pads.items()}
    return windows, windows[temporal_padding]


class ConvNode(Node):
    """A SidewaysConv3d streaming from its ring: it pushes every input sample and emits when a
    window is complete (every ``stride`` samples). ``temporal_padding="causal"``: the module's
    temporal padding all on the past side (the ring starts zeroed for all of it, no end padding);
    :meth:`offline` then pads the clip that way (the module itself is left as it is)."""
    kind = "conv"

    def __init__(self, name: str, inputs: Sequence[int], module: SidewaysConv3d, temporal_padding: str = "same"):
        super().__init__(name, inputs, module)
        k, s, d = module.kernel_size[0], module.stride[0], module.dilation[0]
        self.windows, self.window = _windows(module.temporal_padding, module.span, s, lambda p: Window(k, s, d, p),
                                             temporal_padding)

    def step(self, m: int, length: float) -> tuple[str, int, bool, Optional[tuple]]:
        """(ring action, slot, emits, live taps) for input sample ``m`` of ``length``: the clip's
        samples are pushed, the end padding's zero samples too, then the ring holds; the slot is
        the window's newest (sample ``i`` lives in slot ``i % span``); the live taps are those of
        the window ending there that read a sample of the clip (:func:`~.nn.live_taps`; part of
        the tick's phase, so a CUDA graph is captured per pattern)."""
        end = self.window.pad[1]
        action = PUSH if 0 <= m < length else ZEROS if length <= m < length + end else HOLD
        newest = min(max(m, -1), length + end - 1)
        emits = self.emits(m) is not None
        live = live_taps(newest, self.window.kernel, self.window.dilation, length) if emits else None
        return action, int(newest) % self.window.span, emits, live

    def offline(self, x):
        m = self.module
        if self.window.pad == m.temporal_padding:
            return m(x)
        w0, w1, h0, h1 = m._reversed_padding_repeated_twice[:4]  # zeros: other modes pad no time (trace checks)
        return F.conv3d(F.pad(x, (w0, w1, h0, h1, *self.window.pad)), m.weight, m.bias, m.stride, 0, m.dilation,
                        m.groups)

    def run(self, x: torch.Tensor, step: tuple) -> Optional[torch.Tensor]:
        return self.module.stream_step(x, *step)

    def flops(self, inputs, out):
        w = self.module.weight
        return 2.0 * out.numel() * w[0].numel()


class _Substitute(torch.autograd.Function):
    """Forward: ``value``. Backward: its gradient goes to ``stand_in`` (same shape): the
    Sideways rule for a held sample — the error meets the newest input, not the old one."""

    @staticmethod
    def forward(ctx, value, stand_in):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def substitute(value: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    return _Substitute.apply(value.detach(), stand_in)


class PoolNode(Node):
    """MaxPool3d / AvgPool3d with a temporal window: the spatial part pools each frame as it
    arrives (a ring of pooled frames), the temporal part reduces the window's real frames when
    it is complete. Max is separable; the average divides by PyTorch's divisor (padding counted
    or not, ``divisor_override``). Sideways: every window frame's gradient goes to the frame that
    arrived now, as for a temporal conv. ``temporal_padding="causal"``: the temporal padding all
    on the past side, as if the clip were padded there (zeros counted or not as the module
    says, ``-inf`` for max) and pooled without temporal padding."""
    kind = "pool"

    def __init__(self, name: str, inputs: Sequence[int], module: Optional[nn.Module], *, kind: str,
                 kernel, stride, padding, dilation=(1, 1, 1), ceil_mode=False, count_include_pad=True,
                 divisor_override=None, temporal_padding: str = "same"):
        super().__init__(name, inputs, module)
        self.reduce = kind  # "max" | "avg"
        span = dilation[0] * (kernel[0] - 1) + 1
        self.windows, self.window = _windows(
            (padding[0], padding[0]), span, stride[0], lambda p: Window(kernel[0], stride[0], dilation[0], p, ceil_mode),
            temporal_padding)
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override
        if kind == "max":
            self.spatial = lambda f: F.max_pool2d(f, kernel[1:], stride[1:], padding[1:], dilation[1:], ceil_mode)
        else:  # sums when a divisor override divides the whole window
            self.spatial = lambda f: F.avg_pool2d(f, kernel[1:], stride[1:], padding[1:], ceil_mode, count_include_pad,
                                                  1 if divisor_override else None)
        self._ring: Optional[torch.Tensor] = None
        self._held: dict = {}
        self._offline = module if module is not None else (
            (lambda x: F.max_pool3d(x, kernel, stride, padding, dilation, ceil_mode)) if kind == "max" else
            (lambda x: F.avg_pool3d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)))
        if self.window.pad != (padding[0], padding[0]):
            self._offline = self._padded_offline(kernel, stride, (0, *padding[1:]), dilation, ceil_mode)

    def _padded_offline(self, kernel, stride, padding, dilation, ceil_mode) -> Callable:
        """The pool of a clip padded in time by the window's (uneven) padding."""
        pad = (0, 0, 0, 0, *self.window.pad)
        if self.reduce == "max":
            return lambda x: F.max_pool3d(F.pad(x, pad, value=-math.inf), kernel, stride, padding, dilation, ceil_mode)
        if self.divisor_override or self.count_include_pad:
            return lambda x: F.avg_pool3d(F.pad(x, pad), kernel, stride, padding, ceil_mode, True,
                                          self.divisor_override)

        def real_only(x):  # padding not counted: window sums over the window's count of real elements
            ones = F.pad(torch.ones_like(x[:1, :1]), pad)
            sums = F.avg_pool3d(F.pad(x, pad), kernel, stride, padding, ceil_mode, True, 1)
            return sums / F.avg_pool3d(ones, kernel, stride, padding, ceil_mode, True, 1)
        return real_only

    def offline(self, x):
        return self._offline(x)

    def step(self, m: int, length: float):
        """(slot to push into or None, (slots of the real taps, divisor) if emitting, else None)."""
        span = self.window.span
        push = m % span if 0 <= m < length else None
        n = self.emits(m)
        if n is None:
            return push, None
        n_out = self.window.length(length)
        if n >= n_out and n_out > 0:  # past the end: the last window again
            n = n_out - 1
        taps = [i for i in self.window.taps(n) if 0 <= i < length]
        return push, (tuple(i % span for i in taps), self._divisor(n, length, len(taps)))

    def _divisor(self, n: int, length: float, real: int) -> float:
        if self.reduce == "max":
            return 1.0
        if self.divisor_override:
            return float(self.divisor_override)
        if not self.count_include_pad:
            return float(real)
        start = n * self.window.stride - self.window.pad[0]
        return float(min(start + self.window.kernel, length + self.window.pad[1]) - start)

    def begin(self, mode):
        self._held = {}
        self._mode = mode

    def run(self, x: torch.Tensor, step, sideways: bool) -> Optional[torch.Tensor]:
        push, emit = step
        pooled = self.spatial(x.squeeze(2))
        if self._mode == "bp":  # graph-connected frames, keyed by slot
            if push is not None:
                self._held[push] = pooled
            frames = [self._held[s] for s in emit[0]] if emit else None
        else:
            shape = (self.window.span, *pooled.shape)
            if self._ring is None or self._ring.shape != shape or self._ring.dtype != pooled.dtype \
                    or self._ring.device != pooled.device:
                self._ring = pooled.new_zeros(shape)
            if push is not None:
                with torch.no_grad():  # (in the graph, the ring would chain every tick's autograd graph to the next)
                    self._ring[push].copy_(pooled)
            if not emit:
                return None
            frames = [self._ring[s] for s in emit[0]]
            if sideways:
                frames = [substitute(f, pooled) for f in frames]
        if not emit:
            return None
        if not frames:  # a dilated window that falls on padding only: PyTorch's empty max and sum
            empty = torch.full_like(pooled, -math.inf) if self.reduce == "max" else torch.zeros_like(pooled)
            return (empty if self.reduce == "max" else empty / emit[1]).unsqueeze(2)
        stack = torch.stack(frames, dim=2)
        if self.reduce == "max":  # max_pool3d over time keeps PyTorch's tie and NaN rules
            out = F.max_pool3d(stack, (stack.shape[2], 1, 1))
        else:
            out = stack.sum(2, keepdim=True) / emit[1]
        return out

    def flops(self, inputs, out):
        return float(inputs[0].numel()) * self.window.kernel


class FrameCounter:
    """What a frame-local op counts per frame that an engine run may count for it instead (a
    BatchNorm's ``num_batches_tracked``: one add a run, not a kernel per frame). ``tensor()``: the
    counter, or None where the op must count itself (it is not updating, or the count steers it).
    ``engine``: set while a run counts it — only then does the op skip its own count (called as a
    module, e.g. a ``GraphStage`` on a clip, it counts as usual)."""

    def __init__(self, tensor: Callable[[], Optional[torch.Tensor]]):
        self.tensor = tensor
        self.engine = False


class LocalNode(Node):
    """A frame-local op: ``fn(*input samples)``, applied to each frame as it comes (a join's
    inputs meet on the same sample). ``head``: the pool over all remaining frames (its output
    has no time axis; per frame it is the op on one frame, and ``predict`` accumulates it).
    ``fn_no_update``: the op on the drain's held samples (a BatchNorm's, which updates no running
    statistics). ``frame_counter``: a :class:`FrameCounter` the engine may advance in place of
    the op (a BatchNorm's ``num_batches_tracked``)."""
    kind = "local"

    def __init__(self, name: str, inputs: Sequence[int], module: Optional[nn.Module], fn: Callable, *,
                 head: Optional[str] = None, timed: bool = True, flops_per_out: float = 1.0,
                 fn_no_update: Optional[Callable] = None, frame_counter: Optional["FrameCounter"] = None):
        super().__init__(name, inputs, module)
        self.fn, self.fn_no_update, self.frame_counter = fn, fn_no_update, frame_counter
        self.head = head  # "mean" | "max" | None
        self.timed = timed
        self.flops_per_out = flops_per_out

    def out_length(self, lengths):
        if len(set(lengths)) > 1:
            raise ValueError(f"'{self.name}' joins inputs of {' and '.join(str(int(n)) for n in lengths)} frames (at its "
                             "rate): the model itself cannot take a clip of this length")
        return lengths[0]

    def emits(self, m):
        return m

    def offline(self, *inputs):
        return self.fn(*inputs)

    def run(self, inputs: list, valid: bool):
        with FrameKernels():
            if not valid and self.fn_no_update is not None:
                return self.fn_no_update(*inputs)
            return self.fn(*inputs)

    def flops(self, inputs, out):
        return self.flops_per_out * (out.numel() if isinstance(out, torch.Tensor) else 0.0)


class StreamGraph:
    """Nodes in topological order; ``output``: the node whose samples are the frame outputs.
    ``rate``/``lag`` per node (in input frames) and each join's delay-line need follow from the
    windows; :meth:`lags` gives the output's lag under each temporal padding setting."""

    def __init__(self, nodes: Sequence[Node], output: int):
        self.nodes = list(nodes)
        for i, node in enumerate(self.nodes):
            node.index = i
            if any(p >= i for p in node.inputs):
                raise ValueError(f"node {node.name!r} reads a later node: not in topological order")
        self.output = output
        self.consumers: list[list[int]] = [[] for _ in self.nodes]
        self.source_consumers: list[int] = []
        for node in self.nodes:
            for p in node.inputs:
                (self.source_consumers if p == SOURCE else self.consumers[p]).append(node.index)
        self.rate, self.lag = self._clocks()

    def lags(self) -> dict:
        """The output's lag under each temporal padding setting (``{"same": ..., "causal": ...}``;
        None where that setting cannot stream a node, or cannot apply: a chain's stage modules)."""
        out = {}
        for setting in TEMPORAL_PADDINGS:
            windows = [node.window_for(setting) for node in self.nodes]
            if any(w is None for w in windows) or any(isinstance(n, ChainNode) for n in self.nodes) and \
                    setting != "same":
                out[setting] = None
            else:
                out[setting] = int(self._clocks(lambda node: windows[node.index])[1][self.output])
        return out

    def _clocks(self, window_of: Callable[[Node], Window] = lambda node: node.window):
        rate, lag = [1] * len(self.nodes), [0] * len(self.nodes)
        of = lambda p, table, default: default if p == SOURCE else table[p]
        for node in self.nodes:
            rates = {of(p, rate, 1) for p in node.inputs}
            if len(rates) > 1:
                raise ValueError(f"'{node.name}' joins inputs at different rates (one sample every {sorted(rates)} "
                                 "frames): their frames cannot meet")
            r = rates.pop() if rates else 1
            lam = max((of(p, lag, 0) for p in node.inputs), default=0)
            if isinstance(node, ChainNode):
                rate[node.index], lag[node.index] = r, lam + r * node.delay
            else:
                window = window_of(node)
                rate[node.index], lag[node.index] = r * window.stride, lam + r * window.lag
        return rate, lag

    def lengths(self, frames: float) -> list[float]:
        """Samples each node outputs for a clip of ``frames`` frames."""
        out: list[float] = []
        for node in self.nodes:
            out.append(node.out_length([frames if p == SOURCE else out[p] for p in node.inputs]))
        return out

    def min_clip_length(self, limit: int = 4096) -> int:
        """The fewest frames for which every node outputs at least one sample (and every join's
        inputs have equal lengths)."""
        for frames in range(1, limit + 1):
            try:
                if min(self.lengths(frames)) >= 1:
                    return frames
            except ValueError:
                continue
        raise ValueError(f"no clip of up to {limit} frames gives every node an output")

    def modules(self) -> list[nn.Module]:
        seen, out = set(), []
        for node in self.nodes:
            for m in node.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out


def cut_points(graph: StreamGraph) -> list[int]:
    """Positions ``i`` after which exactly one value crosses from nodes ``<= i`` to nodes
    ``> i`` — a tensor (or the video), produced at or before ``i`` — and no module with
    parameters is used on both sides: where a stage boundary can go."""
    n = len(graph.nodes)
    last_use = {}
    for node in graph.nodes:
        for p in node.inputs:
            last_use[p] = max(last_use.get(p, -2), node.index)
    first_param_use, last_param_use = {}, {}
    for node in graph.nodes:
        for m in node.modules():
            if any(True for _ in m.parameters(recurse=True)):
                first_param_use.setdefault(id(m), node.index)
                last_param_use[id(m)] = node.index
    points = []
    for i in range(n - 1):
        live = [p for p, last in last_use.items() if last > i and p <= i]
        if len(live) != 1 or live[0] == SOURCE:
            continue
        if any(first_param_use[k] <= i < last_param_use[k] for k in first_param_use):
            continue
        if not graph.nodes[live[0]].tensor:
            continue
        points.append(i)
    return points


def balance(costs: Sequence[float], points: Sequence[int], n_stages: int) -> list[int]:
    """The ``n_stages - 1`` cut positions among ``points`` (a stage ends after each) whose most
    costly stage costs least (the tick time is the slowest stage's)."""
    n = len(costs)
    if n_stages < 1:
        raise ValueError(f"stages must be >= 1, got {n_stages}")
    if n_stages - 1 > len(points):
        raise ValueError(f"this network has {len(points) + 1} places to end a stage (single-tensor cut points), "
                         f"so at most {len(points) + 1} stages; got stages={n_stages}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    ends = list(points) + [n - 1]  # a stage ends after one of these
    # best[s][e]: (least max cost, previous end) for s+1 stages ending after ends[e]
    best = [[(INF, -1)] * len(ends) for _ in range(n_stages)]
    for e, end in enumerate(ends):
        best[0][e] = (prefix[end + 1], -1)
    for s in range(1, n_stages):
        for e, end in enumerate(ends):
            for q in range(e):
                cost = max(best[s - 1][q][0], prefix[end + 1] - prefix[ends[q] + 1])
                if cost < best[s][e][0]:
                    best[s][e] = (cost, q)
    cuts, e = [], len(ends) - 1
    for s in range(n_stages - 1, 0, -1):
        e = best[s][e][1]
        cuts.append(ends[e])
    return cuts[::-1]

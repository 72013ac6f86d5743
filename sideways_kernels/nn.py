"""Drop-in layers: :class:`SidewaysConv3d` is an ``nn.Conv3d`` (same constructor,
state dict, ``isinstance``) that, inside a :class:`~sideways_kernels.SidewaysPipeline`,
streams one frame a tick from a ring of its last inputs and runs the Sideways
backward through the compiled ops. Outside a pipeline it *is* ``nn.Conv3d``.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import empty_ring, row_length
from .reference import sgd_step

__all__ = ["SidewaysConv3d", "convert", "StreamClock"]

# What a layer does with the frame it receives at a tick (DESIGN.md §1, clip edges): push it
# into the ring, push a zero frame (end padding), or leave the ring as it is.
PUSH, ZEROS, HOLD = "push", "zeros", "hold"


@dataclasses.dataclass
class StreamClock:
    """Inside a chain stage (a stage module run as one node): the index of the frame that
    enters the stage's next :class:`SidewaysConv3d`, and the length of that frame stream
    (``inf`` while a live stream's end is unknown). Each layer it passes advances both to
    those of its own output: a layer with temporal padding emits frame ``t`` late, and its
    stream is shorter or longer."""
    frame: int = 0
    length: float = math.inf

    def valid(self) -> bool:
        return 0 <= self.frame < self.length


@dataclasses.dataclass
class _Stream:
    """A layer's streaming state inside one pipeline run."""
    mode: str  # "sideways" (ring + Sideways backward), "bp" (graph-connected window), "infer"
    kernels: object  # backend.kernels(...)
    optimizer: Optional[torch.optim.Optimizer] = None  # per-tick fused SGD, when set
    clock: Optional[StreamClock] = None  # chain stages: the layer works its step out from it
    window: Optional[collections.deque] = None  # bp mode: the last `span` frames, in the graph
    fresh: bool = True  # the ring is zeroed (the clip's start padding) at the run's first step
    geometry: Optional[tuple] = None  # (F.pad args or None, conv2d args): fixed for the run
    smoothing: int = 1  # weight updates pair the mean of the last k windows with the mean of the last k errors
    history: Optional[collections.deque] = None  # smoothing > 1: (window in time order, error) of the last k
    updates: Optional[object] = None  # backend.WeightUpdates: the weight update waits for the tick's end
    ahead: Optional[tuple] = None  # ((frame's address, slot), output): this tick's forward, run ahead (Engine)
    defer_input_grad: Optional[Callable] = None  # takes this tick's window_input_grad args, run later (Engine)

    def weight_op(self, op: str, *args) -> None:
        """Weight op ``op`` ("weight_grad_accumulate" or "sgd_tick_update") now, or held for the
        tick's grouped launch."""
        if self.updates is not None:
            self.updates.add(op, args)
        else:
            getattr(self.kernels, op)(*args)


class SidewaysConv3d(nn.Conv3d):
    """``nn.Conv3d`` that streams inside a :class:`~sideways_kernels.SidewaysPipeline`.

    Called on a clip ``[B, C, T, H, W]`` it is exactly ``nn.Conv3d`` (outputs and gradients).
    In a pipeline it receives one frame ``[B, C, 1, H, W]`` a tick, keeps a ring of its last
    ``dilation_t*(k_t-1)+1`` inputs (allocated once per input shape) and returns the conv of
    that window; a frozen network streamed this way reproduces the clip forward, each layer
    emitting frame ``t`` late by ``span-1-left_temporal_padding`` ticks. In Sideways mode its
    backward pairs the arriving error with the window as it is now: the weight gradient of tap
    ``j`` is error × ring frame ``j`` (accumulated in place by one op, or applied straight into
    the weight by the fused SGD op in per-tick mode) and the gradient sent down is the sum over
    the window of every tap's input gradient.

    Streaming needs left temporal padding at most ``span-1`` and zero temporal padding mode, and
    a temporal stride only as a node of a graph (:meth:`SidewaysPipeline.from_model`), where it
    emits every s-th tick; :meth:`streaming_problem` says which rule a layer breaks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stream: Optional[_Stream] = None
        self._ring: Optional[torch.Tensor] = None  # kept across runs; never in the state dict

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, *, copy: bool = False) -> "SidewaysConv3d":
        """A SidewaysConv3d with ``conv``'s configuration and parameters: the same
        ``Parameter`` objects (so optimizers keep working), or copies with ``copy=True``.
        dtype and device are kept."""
        if not isinstance(conv, nn.Conv3d):
            raise TypeError(f"from_conv3d expects an nn.Conv3d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        take = (lambda p: nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)) if copy else (lambda p: p)
        new.weight = take(conv.weight)
        if conv.bias is not None:
            new.bias = take(conv.bias)
        new.train(conv.training)
        return new

    # --- geometry ------------------------------------------------------------------------

    @property
    def span(self) -> int:
        """Frames in the ring: ``dilation_t*(k_t-1)+1``."""
        return self.dilation[0] * (self.kernel_size[0] - 1) + 1

    @property
    def temporal_padding(self) -> tuple[int, int]:
        """(start, end) zero frames of the clip convolution (``padding='same'`` may be uneven)."""
        p = self._reversed_padding_repeated_twice
        return p[4], p[5]

    @property
    def stream_delay(self) -> int:
        """Ticks between a frame entering the layer and its output leaving it."""
        return self.span - 1 - self.temporal_padding[0]

    @property
    def length_change(self) -> int:
        """Output frames minus input frames of the clip convolution."""
        start, end = self.temporal_padding
        return start + end - (self.span - 1)

    def streaming_problem(self, temporal_stride: bool = False) -> Optional[str]:
        """Why this layer cannot stream exactly, or None. A temporal stride streams only as a
        node of a graph (:meth:`SidewaysPipeline.from_model`), where what is above it ticks at
        its rate; a chain stage runs every layer once a tick."""
        start, end = self.temporal_padding
        if self.stride[0] != 1 and not temporal_stride:
            return (f"temporal stride {self.stride[0]} inside a stage module (a stage emits one frame per tick; "
                    "SidewaysPipeline.from_model streams strided layers at their own rate)")
        if start > self.span - 1:
            return (f"start temporal padding {start} exceeds the window span - 1 = {self.span - 1} "
                    "(outputs would precede their inputs)")
        if self.padding_mode != "zeros" and (start or end):
            return f"padding_mode={self.padding_mode!r} with temporal padding (a stream can only pad time with zeros)"
        return None

    def ring_step(self, n: int, length: float) -> tuple[str, int]:
        """(action, slot) for input frame ``n`` of a stream of ``length`` frames: frames of the
        clip are pushed, the end padding's zero frames too, and after them the ring holds; the
        slot is where the frame goes, and the window's newest slot (frame ``i`` lives in slot
        ``i % span``; the ring starts zeroed, which is the clip's start padding)."""
        end = self.temporal_padding[1]
        action = PUSH if 0 <= n < length else ZEROS if length <= n < length + end else HOLD
        newest = min(max(n, -1), length + end - 1)
        return action, int(newest) % self.span

    def _spatial_padding(self) -> tuple[list[int], Optional[tuple]]:
        """(op padding, F.pad args or None): symmetric zero padding goes to the op; uneven
        ('same' with even kernels) or non-zero modes are applied to the frame first."""
        w0, w1, h0, h1 = self._reversed_padding_repeated_twice[:4]
        if self.padding_mode == "zeros" and h0 == h1 and w0 == w1:
            return [h0, w0], None
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return [0, 0], ((w0, w1, h0, h1), mode)

    def conv2d_args(self, padding: list[int]) -> tuple:
        """(stride, padding, dilation, dilation_t, groups) as the sideways ops take them."""
        return list(self.stride[1:]), padding, list(self.dilation[1:]), self.dilation[0], self.groups

    # --- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._stream
        if s is None:
            return super().forward(x)
        if s.clock is None:
            raise RuntimeError(f"{type(self).__name__} is streamed by a graph node, which calls stream_step()")
        clock = s.clock  # a chain stage: one frame in, one frame out, every tick
        action, slot = self.ring_step(clock.frame, clock.length)
        clock.frame -= self.stream_delay
        clock.length += self.length_change
        # no live taps here: a chain stage's layers still send every tap's error down (with live
        # taps a chain under torchrun disagreed with one process in the 7th digit, not yet understood)
        return self.stream_step(x, action, slot)

    def stream_step(self, x: torch.Tensor, action: str, slot: int, emit: bool = True,
                    live: Optional[tuple] = None) -> Optional[torch.Tensor]:
        """One tick of streaming: ``action`` (PUSH/ZEROS/HOLD) on ring ``slot``, then, if ``emit``,
        the conv of the window whose newest frame is in ``slot``, as a frame ``[B, C_out, 1, H', W']``
        (a layer with temporal stride s emits every s-th tick). ``live``: which of the window's
        taps read a frame of the clip (None: all; :func:`live_taps`) — Sideways sends the error
        down through those only."""
        s = self._stream
        frame = self._stream_frame(x)
        if s.mode == "bp":  # F.conv3d: autocast applies as to any conv
            return self._window_forward(frame, action, emit)
        frame = _autocast(frame)
        self._ready_ring(frame, action, slot)
        push = frame if action == PUSH else None
        if not emit:  # a strided layer between outputs: the frame only goes into the ring (Sideways
            with torch.no_grad():  # hands an error to the frame that completes a window)
                if push is not None:
                    self._ring[slot].copy_(push)
            return None
        if s.mode == "infer" or not torch.is_grad_enabled():
            out = _ring_forward(s, self._ring, push, slot, self.weight, self.bias)
        else:
            return _SidewaysTick.apply(frame, push, self.weight, self.bias, self, slot, live)
        return out.unsqueeze(2)

    def forward_ahead(self, x: torch.Tensor, action: str, slot: int,
                      into: Optional[torch.Tensor] = None) -> Optional[tuple]:
        """The ring op's arguments of this tick's forward of ``x`` (a push that emits), for a grouped
        launch ahead of the stages (Engine), having done what :meth:`stream_step` does before the op
        (the ring made, or zeroed at the run's first step); the launch's output goes to
        :attr:`_Stream.ahead`, where the stage's own call finds it. None where the forward is not
        one to run ahead: not streaming with the ring ops, not a push, a frame padded or cast
        first (a new tensor each call). ``into``: a frame buffer (``[B, C, H, W]``) the frame is
        copied into first, cast to its dtype — for a stage the engine runs itself, whose video frame
        (a float32 NCDHW slice) becomes a channels-last frame of the activations there (no call of
        the stage looks for the output then)."""
        s = self._stream
        if s is None or s.mode == "bp" or action != PUSH:
            return None
        frame = self._stream_frame(x)
        if s.geometry[0] is not None:
            return None
        if into is not None:
            frame = into.copy_(frame)
        if frame.dtype != activation_dtype(frame):
            return None
        return (self._ready_ring(frame, action, slot), frame, slot, self.weight, self.bias, *s.geometry[1])

    def _stream_frame(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked, as the 4-D frame the ring takes (padded first where the op cannot pad)."""
        s = self._stream
        if x.dim() != 5 or x.shape[2] != 1:
            raise ValueError(f"inside a pipeline {type(self).__name__} receives one frame [B, C, 1, H, W], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} input channels (dim 1 of its input "
                             f"[B, C, T, H, W]), got {x.shape[1]}")
        if s.geometry is None:
            padding, pre_pad = self._spatial_padding()
            s.geometry = (pre_pad, self.conv2d_args(padding))
        pre_pad = s.geometry[0]
        frame = x.squeeze(2)
        return F.pad(frame, *pre_pad) if pre_pad is not None else frame

    def _ready_ring(self, frame: torch.Tensor, action: str, slot: int) -> torch.Tensor:
        """The ring, ready for ``frame``'s step: made (or zeroed: the clip's start padding) at the
        run's first step, slot ``slot`` zeroed for a ZEROS step."""
        s = self._stream
        if s.fresh:  # first step of the run: (re)use the ring, zeroed = the clip's start padding
            shape, aligned = (self.span, *frame.shape), getattr(s.kernels, "aligned_rows", False)
            image_pad = getattr(s.kernels, "ring_image_pad", lambda *a: 0)(self.span, frame)
            row = row_length(frame.shape[1], frame.dtype, aligned)
            if self._ring is None or self._ring.shape != shape or self._ring.dtype != frame.dtype \
                    or self._ring.device != frame.device or self._ring.stride(0) != row \
                    or self._ring.stride(4) != self.span * row + image_pad:
                self._ring = empty_ring(*shape, dtype=frame.dtype, device=frame.device, aligned=aligned,
                                        image_pad=image_pad)
            else:
                self._ring.zero_()
            s.fresh = False
        if action == ZEROS:
            with torch.no_grad():
                self._ring[slot].zero_()
        return self._ring

    def _window_forward(self, frame: torch.Tensor, action: str, emit: bool):
        """bp mode: the window is a list of graph-connected frames, so autograd through the
        whole run is exact backprop of the clip."""
        s = self._stream
        if s.window is None:
            s.window = collections.deque([torch.zeros_like(frame)] * self.span, maxlen=self.span)
        if action == PUSH:
            s.window.append(frame)
        elif action == ZEROS:
            s.window.append(torch.zeros_like(frame))
        if not emit:
            return None
        stride, pad, dil, dil_t, groups = s.geometry[1]
        clip = torch.stack(list(s.window), dim=2)
        return F.conv3d(clip, self.weight, self.bias, (1, *stride), (0, *pad), (dil_t, *dil), groups)  # [B, C', 1, H', W']


def live_taps(newest: float, kernel: int, dilation: int, length: float) -> Optional[tuple]:
    """Which taps of the window whose newest frame is ``newest`` read a frame of a clip of
    ``length`` (the others read padding), or None when all do. Sideways sends the error of the
    live taps only: BP drops the gradient of a padding tap, and summed onto the frame that
    arrived now it was an error that frame never caused — after three temporal strides most
    taps of r2plus1d_18's top layers read padding, and its Sideways gradients were 2-6x BP's
    and uncorrelated with them."""
    first = newest - dilation * (kernel - 1)
    live = tuple(0 <= first + j * dilation < length for j in range(kernel))
    return None if all(live) else live


class _SidewaysTick(torch.autograd.Function):
    """One tick of a streaming SidewaysConv3d: forward through the ring op; backward is
    the Sideways one (input gradient summed over the window's live taps; weight gradient of
    every tap against the ring as it is now, accumulated or applied by the fused ops)."""

    @staticmethod
    def forward(ctx, frame, push, weight, bias, layer: SidewaysConv3d, slot, live):
        s = layer._stream
        # Everything the backward needs, as of this tick (it may run after the run ended).
        ctx.layer, ctx.stream, ctx.ring, ctx.slot, ctx.live = layer, s, layer._ring, slot, live
        ctx.input_hw = list(frame.shape[-2:])
        out = _ring_forward(s, layer._ring, push, slot, weight, bias)
        # [B, C', 1, H', W'] by changing the fresh output's own shape, not as a view of it: a view
        # made here may not be modified in place (ReLU(inplace=True) next), and a copy would cost
        # a pass over the activation every tick.
        return out.unsqueeze_(2)

    @staticmethod
    def backward(ctx, grad_out):
        layer: SidewaysConv3d = ctx.layer
        s, ring = ctx.stream, ctx.ring
        args = s.geometry[1]
        grad_out = grad_out.squeeze(2)
        if not grad_out.is_contiguous(memory_format=torch.channels_last):  # the layout every backend reads best
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_frame = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation, _, groups = args
            weight = layer.weight
            if ctx.live is not None and any(ctx.live):  # padding taps send nothing down; the live ones are
                weight = weight.narrow(2, ctx.live.index(True), sum(ctx.live))  # a run: a view, same strides
            elif ctx.live is not None:  # no tap reads the clip
                weight = torch.zeros_like(weight)
            call = (grad_out, weight, ctx.input_hw, stride, padding, dilation, groups)
            if s.defer_input_grad is not None:  # the engine runs it with other stages' at the tick's end
                s.defer_input_grad(call)
            else:
                grad_frame = s.kernels.window_input_grad(*call)
        train_w = ctx.needs_input_grad[2]
        train_b = layer.bias is not None and ctx.needs_input_grad[3]
        weight_step(layer, s, ring, grad_out, ctx.slot, train_w, train_b)
        return grad_frame, None, None, None, None, None, None


def weight_step(layer: SidewaysConv3d, s: _Stream, ring: torch.Tensor, grad_out: torch.Tensor, slot: int,
                train_w: bool, train_b: bool) -> None:
    """The Sideways weight update of a streaming layer (``s``: its stream state of the tick, which a
    backward may outlive): ``grad_out`` (this tick's error at its output, ``[B, C_out, H', W']``
    channels-last) paired with every tap's frame of ``ring`` as it is now (newest in ``slot``):
    accumulated into the gradients, or applied by the fused SGD op in per-tick mode (now, or held
    for the tick's grouped launch)."""
    args = s.geometry[1]
    if s.smoothing > 1 and (train_w or train_b):
        ring, grad_out, slot = _smoothed(s, ring, grad_out, slot)
    with torch.no_grad():
        if s.optimizer is not None and train_w and _group_of(s.optimizer, layer.weight) is not None:
            _fused_sgd(s, layer, ring, grad_out, slot, args, train_b)
        elif train_w:
            if layer.weight.grad is None:
                layer.weight.grad = torch.zeros_like(layer.weight)
            grad_b = None
            if train_b:
                if layer.bias.grad is None:
                    layer.bias.grad = torch.zeros_like(layer.bias)
                grad_b = layer.bias.grad
            s.weight_op("weight_grad_accumulate", layer.weight.grad, grad_b, grad_out, ring, slot, *args)
        elif train_b:
            _accumulate(layer.bias, grad_out.sum((0, 2, 3), dtype=layer.bias.dtype))


def _ring_forward(s: _Stream, ring, push, slot: int, weight, bias) -> torch.Tensor:
    """This tick's ring op — or its output, where the engine ran it ahead in a grouped launch
    (:meth:`SidewaysConv3d.forward_ahead`) for this frame and slot (the frame already pushed)."""
    ahead, s.ahead = s.ahead, None
    if ahead is not None and push is not None and ahead[0] == (push.data_ptr(), slot):
        return ahead[1]
    return s.kernels.ring_conv_forward(ring, push, slot, weight, bias, *s.geometry[1])


def _autocast(frame: torch.Tensor) -> torch.Tensor:
    """The frame in the autocast dtype where autocast is on, as ``nn.Conv3d`` would cast it: the
    ring, the output and the errors are then 16-bit while the weights stay float32 masters
    (the ops take both; autocast itself stays out of the ops)."""
    return frame.to(activation_dtype(frame))


def activation_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a layer's ring and activations take, for a frame or a weight ``t``: autocast's
    where it is on for ``t``'s device (and ``t`` is a float autocast casts), else ``t``'s own."""
    device_type = t.device.type
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def _smoothed(s: _Stream, ring: torch.Tensor, grad_out: torch.Tensor, slot: int) -> tuple:
    """smoothing = k: this update's (window, error) joins the last k; returns the mean window (in
    time order, newest in the last slot) and the mean error, to pair in the weight update."""
    if s.history is None:
        s.history = collections.deque(maxlen=s.smoothing)
    span = ring.shape[0]
    window = torch.stack([ring[(slot + 1 + i) % span] for i in range(span)])
    s.history.append((window, grad_out.clone()))
    n = len(s.history)
    mean_window = sum(w for w, _ in s.history) / n
    mean_error = (sum(e for _, e in s.history) / n).contiguous(memory_format=torch.channels_last)
    return mean_window, mean_error, span - 1


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g.to(p.dtype).clone()
    else:
        p.grad.add_(g)


def _group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> Optional[dict]:
    for group in opt.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


def _sgd_hyper(group: dict) -> tuple:
    """(lr, momentum, dampening, weight_decay, nesterov) of a torch.optim.SGD param group."""
    return float(group["lr"]), group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]


def _has_buffer(opt: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    return opt.state.get(p, {}).get("momentum_buffer") is not None


def _momentum_buffer(opt: torch.optim.Optimizer, p: torch.Tensor, momentum: float):
    """The optimizer's own buffer (so torch.optim.SGD and the fused op share state), and
    whether it is fresh (torch.optim.SGD then sets buf = grad)."""
    if momentum == 0:
        return None, False
    if _has_buffer(opt, p):
        return opt.state[p]["momentum_buffer"], False
    buf = opt.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
    return buf, True


def _fused_sgd(s: _Stream, layer: SidewaysConv3d, ring, grad_out, slot, args, train_b: bool) -> None:
    """Per-tick update: the weight's gradient goes straight into the weight (one op); the
    bias rides along when it shares the weight's param group and momentum age."""
    opt = s.optimizer
    group = _group_of(opt, layer.weight)
    hyper = _sgd_hyper(group)
    momentum = hyper[1]
    bias_group = _group_of(opt, layer.bias) if train_b else None
    together = bias_group is group and (momentum == 0 or _has_buffer(opt, layer.weight) == _has_buffer(opt, layer.bias))
    buf, first = _momentum_buffer(opt, layer.weight, momentum)
    bias, bias_buf = (layer.bias, _momentum_buffer(opt, layer.bias, momentum)[0]) if together else (None, None)
    s.weight_op("sgd_tick_update", layer.weight, buf, bias, bias_buf, grad_out, ring, slot, *args, *hyper, first)
    if train_b and not together:
        grad_b = grad_out.sum((0, 2, 3), dtype=layer.bias.dtype)
        if bias_group is None:
            _accumulate(layer.bias, grad_b)
        else:
            b_buf, b_first = _momentum_buffer(opt, layer.bias, bias_group["momentum"])
            sgd_step(layer.bias, b_buf, grad_b, *_sgd_hyper(bias_group), b_first)


def convert(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Swap every ``nn.Conv3d`` of ``model`` (in place, recursively) for a
    :class:`SidewaysConv3d` sharing its parameters; returns ``model``. ``filter_fn(module,
    fully_qualified_name)`` chooses which convs to swap. State dict keys and outputs are
    unchanged. A model that is itself an ``nn.Conv3d`` is returned converted."""
    if isinstance(model, nn.Conv3d) and not isinstance(model, SidewaysConv3d):
        return SidewaysConv3d.from_conv3d(model) if filter_fn is None or filter_fn(model, "") else model

    def swap(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Conv3d) and not isinstance(child, SidewaysConv3d):
                if filter_fn is None or filter_fn(child, fqn):
                    setattr(module, name, SidewaysConv3d.from_conv3d(child))
            else:
                swap(child, fqn)

    swap(model, "")
    return model

"""The layer-pipelined scheduler (DESIGN.md §1): frames enter one per tick, every
stage works at once on what the stage below produced last tick, and — in Sideways
mode — every stage also pushes the error the stage above sent last tick through its
*current* Jacobian. ``mode="bp"`` runs the very same ticks but keeps the whole
autograd graph and back-propagates the clip loss at the end: exact backprop, for a
fair comparison.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import time
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as _backend
from .cuda_graphs import TickGraphs
from .nn import ClipLength, SidewaysConv3d, StreamClock, _Stream

__all__ = ["SidewaysPipeline", "ClipResult", "NonFiniteError", "split_sequential", "streaming_problem"]

Frames = Union[torch.Tensor, Iterable[torch.Tensor]]


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN or inf in the video or the loss; nothing was changed by the clip."""


class ClipResult(NamedTuple):
    loss: torch.Tensor  # the clip loss: mean over output frames of loss_fn(frame logits, target), detached
    outputs: torch.Tensor  # the top stage's per-frame outputs stacked in time: [B, C', T_out, H', W']


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


_MIXES_TIME = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
               nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def streaming_problem(module: nn.Module) -> Optional[str]:
    """Why ``module``, applied one frame ``[B, C, 1, H, W]`` at a time, would not give what it
    gives on the whole clip — or None when it streams exactly."""
    if isinstance(module, SidewaysConv3d):
        return module.streaming_problem()
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        pad = module.padding if isinstance(module.padding, str) else _triple(module.padding)[0]
        if module.kernel_size[0] != 1 or module.stride[0] != 1 or pad not in (0, "valid"):
            return ("a plain nn.Conv3d mixing frames (temporal kernel, stride or padding); "
                    "convert it with sideways_kernels.convert(model)")
    if isinstance(module, (nn.MaxPool3d, nn.AvgPool3d)):
        k, s = _triple(module.kernel_size), _triple(module.stride or module.kernel_size)
        if k[0] != 1 or s[0] != 1 or _triple(module.padding)[0] != 0:
            return "temporal pooling (kernel/stride/padding over time); pool over space only: kernel (1, kh, kw)"
    if isinstance(module, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)) and _triple(module.output_size)[0] is not None:
        return "adaptive pooling to a fixed number of frames; use output_size=(None, h, w)"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
        return ("batch statistics over (B, T, H, W) normalise over time; "
                "put it in eval mode (running statistics) or normalise per frame")
    if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return "normalisation over (T, H, W) mixes frames"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) >= 3:
        return "LayerNorm over (T, H, W) mixes frames"
    if isinstance(module, _MIXES_TIME):
        return "a recurrent or attention layer over time has no per-frame streaming rule here"
    return None


def split_sequential(model: nn.Sequential, cuts: Sequence[int]) -> list[nn.Sequential]:
    """Cut ``model`` into stages before each index in ``cuts`` (the modules are shared, so
    the model and its state dict are unchanged): ``split_sequential(net, [2, 5])`` gives
    ``net[0:2], net[2:5], net[5:]``."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"split_sequential expects an nn.Sequential, got {type(model).__name__}")
    cuts = list(cuts)
    if any(not isinstance(c, int) for c in cuts) or cuts != sorted(set(cuts)) or \
            any(c <= 0 or c >= len(model) for c in cuts):
        raise ValueError(f"cuts must be strictly increasing indices in [1, {len(model) - 1}], got {cuts}")
    bounds = [0, *cuts, len(model)]
    children = list(model)
    return [nn.Sequential(*children[a:b]) for a, b in zip(bounds, bounds[1:])]


def frame_logits(out: torch.Tensor) -> torch.Tensor:
    """One frame's output ``[B, K, 1, H, W]`` as ``loss_fn`` sees it: the time axis removed,
    and ``[B, K]`` when the spatial extent is 1×1 (a per-frame classifier)."""
    out = out.squeeze(2)
    return out.flatten(1) if out.shape[-2:] == (1, 1) else out


class SidewaysPipeline:
    """Trains a chain of stages depth-parallel with Sideways, or with exact backprop.

    Args:
        stages: the network cut into a list of ``nn.Module``s; each maps one frame
            ``[B, C, 1, H, W]`` to ``[B, C', 1, H', W']``. Temporal layers must be
            :class:`SidewaysConv3d` (see :func:`~sideways_kernels.convert`); layers that mix
            frames otherwise are refused, naming the module and why. Within a stage, the
            SidewaysConv3d layers are applied one after the other (a chain).
        loss_fn: ``loss_fn(frame_logits, target) -> scalar``; default cross-entropy.
        mode: ``"sideways"`` (the approximation) or ``"bp"`` (exact backprop of the clip loss).
        update: ``"clip"`` (default: gradients accumulate in ``.grad`` over the clip, step your
            optimizer yourself) or ``"tick"`` (``optimizer``, a ``torch.optim.SGD``, is applied
            every tick; SidewaysConv3d weights through the fused update op, never materialising
            their gradient).
        devices: one device per stage; stages are moved there and activations/errors copied
            between them. On CUDA every stage runs on its own stream, so the stages of a tick
            overlap; each tick ends with all of them joined.
        backend: ``"torch" | "cpp" | "triton" | "cuda"``, else ``SIDEWAYS_BACKEND`` or the
            fastest one built for each stage's device.
        cuda_graph: in :meth:`backward_clip` (Sideways mode, every stage on one CUDA device),
            replay each steady-state tick — all stages' forward and Sideways backward, the
            gradient accumulation or per-tick update, the buffer swap — from a CUDA graph
            captured once per phase and input shape (:mod:`sideways_kernels.cuda_graphs`); where
            that is impossible it warns once and ticks eagerly. The loss function must then be
            capturable (no host syncs), and every trainable parameter gets a ``.grad``.

    The clip loss is the mean, over the frames the clip forward outputs, of
    ``loss_fn(logits of frame t, target)`` (DESIGN.md §1): buffers start at zero (the clip's
    start padding), zero frames follow the clip while a layer's end padding needs them, and
    the pipeline keeps ticking until every frame's error has reached the bottom stage.
    """

    def __init__(self, stages: Sequence[nn.Module], loss_fn: Optional[Callable] = None, mode: str = "sideways", *,
                 update: str = "clip", optimizer: Optional[torch.optim.Optimizer] = None,
                 devices: Optional[Sequence[Union[str, torch.device]]] = None, backend: Optional[str] = None,
                 cuda_graph: bool = False):
        stages = list(stages) if not isinstance(stages, nn.Module) else [stages]
        if not stages or not all(isinstance(s, nn.Module) for s in stages):
            raise TypeError("stages must be a non-empty sequence of nn.Module")
        self.stages = nn.ModuleList(stages)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.mode = mode
        self.update = update
        self.optimizer = optimizer
        self.backend = backend
        if backend is not None and backend not in _backend.NAMES:
            raise ValueError(f"backend must be one of {_backend.NAMES} or None, got {backend!r}")
        if devices is not None:
            if len(devices) != len(stages):
                raise ValueError(f"devices needs one device per stage ({len(stages)}), got {len(devices)}")
            for stage, device in zip(self.stages, devices):
                stage.to(device)
        self.devices = [torch.device(d) for d in devices] if devices is not None else None
        self._layers = [[m for m in stage.modules() if isinstance(m, SidewaysConv3d)] for stage in self.stages]
        seen = set()
        for layer in itertools.chain(*self._layers):
            if id(layer) in seen:
                raise ValueError("a SidewaysConv3d appears twice in the stages; a layer streams in one place only")
            seen.add(id(layer))
        self._buffers: dict = {}
        self._streams: Optional[list] = None  # per-stage CUDA streams, made on first use
        # The stages this process runs, and how it exchanges with the processes running the
        # others (sideways_kernels.distributed); one process runs them all by default.
        self._lo, self._hi = 0, len(self.stages)
        self._boundary = None
        self._timer: Optional[_StageTimer] = None  # set while stage_times() measures
        self.cuda_graph = cuda_graph
        self._graphs: Optional[TickGraphs] = None
        self.last_ticks = 0  # ticks the last run took
        self._check_config()

    # --- configuration ---------------------------------------------------------------------

    def _check_config(self) -> None:
        if self.mode not in ("sideways", "bp"):
            raise ValueError(f"mode must be 'sideways' or 'bp', got {self.mode!r}")
        if self.update not in ("clip", "tick"):
            raise ValueError(f"update must be 'clip' or 'tick', got {self.update!r}")
        if self.update == "tick":
            if self.mode != "sideways":
                raise ValueError("update='tick' applies the optimizer every tick, which only mode='sideways' does")
            if not isinstance(self.optimizer, torch.optim.SGD):
                raise TypeError(f"update='tick' needs a torch.optim.SGD optimizer (the fused update is SGD), got "
                                f"{type(self.optimizer).__name__}")
            if any(g.get("maximize") or isinstance(g["lr"], torch.Tensor) for g in self.optimizer.param_groups):
                raise ValueError("update='tick' supports SGD groups with maximize=False and a float lr")
        for i, stage in enumerate(self.stages):
            for name, module in stage.named_modules():
                why = streaming_problem(module)
                if why is not None:
                    where = f"stage {i}" + (f", module '{name}'" if name else "")
                    raise ValueError(f"{where} ({type(module).__name__}) cannot stream: {why}")

    def _device(self, i: int) -> torch.device:
        if self.devices is not None:
            return self.devices[i]
        p = next(itertools.chain(self.stages[i].parameters(), self.stages[i].buffers()), None)
        return p.device if p is not None else torch.device("cpu")

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.stages.parameters()

    def min_clip_length(self) -> int:
        """The fewest frames a clip needs so that every layer outputs at least one frame."""
        change, need = 0, 1
        for layer in itertools.chain(*self._layers):
            change += layer.length_change
            need = max(need, 1 - change)
        return need

    def output_length(self, frames: int) -> int:
        """Frames the clip forward outputs for a clip of ``frames`` frames."""
        return frames + sum(layer.length_change for layer in itertools.chain(*self._layers))

    # --- public entry points ---------------------------------------------------------------

    def backward_clip(self, video: Frames, target, *, per_frame_target: Optional[bool] = None) -> ClipResult:
        """Run one clip through the pipeline (fill, one frame a tick, drain) and leave the clip
        loss's weight gradients in each parameter's ``.grad`` (accumulating, as autograd does).

        ``video``: ``[B, C, T, H, W]`` or a sequence of frames ``[B, C, H, W]``. ``target``: what
        ``loss_fn`` takes for a frame; with ``per_frame_target`` (default: an integer tensor
        ``[B, T_out]``) frame ``t`` gets ``target[:, t]``. On any error (bad input, a
        non-finite loss) every ``.grad``, weight and optimizer state is left as it was.
        """
        self._check_config()
        frames, length, finite = self._frames(video, need_length=True)
        out_len = self.output_length(length)
        if per_frame_target is None:
            per_frame_target = (isinstance(target, torch.Tensor) and target.dim() == 2 and not target.is_floating_point()
                                and target.shape[1] == out_len)
        if per_frame_target and (not isinstance(target, torch.Tensor) or target.dim() < 2 or target.shape[1] != out_len):
            raise ValueError(f"a per-frame target must be [B, {out_len}, ...] (one entry per output frame), "
                             f"got {tuple(getattr(target, 'shape', ()))}")
        if isinstance(target, torch.Tensor):
            target = target.to(self._device(len(self.stages) - 1))
        graphs = self._graphs_for(target)
        target_of = lambda t: target[:, t] if per_frame_target else target
        stage_target = None
        if graphs is not None:  # the loss reads the target from a fixed buffer (per frame: filled before each tick)
            staged = graphs.stage("target", target_of(0), target.device)
            target_of = lambda t: staged
            if per_frame_target:
                stage_target = lambda t: staged.copy_(target[:, t])

        def frame_loss(out: torch.Tensor, t: int) -> torch.Tensor:
            loss = self.loss_fn(frame_logits(out), target_of(t))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))}")
            return loss.reshape(()) / out_len  # its finiteness is checked once, after the ticks

        params = [p for p in self.stages.parameters() if p.requires_grad]
        stashed = [p.grad for p in params]
        for p in params:
            p.grad = None
        snapshot = self._snapshot(params) if self.update == "tick" else None
        try:
            if graphs is not None:
                if self.update == "clip":
                    graphs.grad_buffers(params)
                graphs.begin_clip(self._clip_signature(params, out_len, per_frame_target))
            losses: list[torch.Tensor] = []
            outputs = list(self._run(frames, length, finite, self.mode, frame_loss, losses, graphs, stage_target))
            self._check_losses(losses)
            if self.mode == "bp":
                self._backward_bp(losses)
            self._reduce_gradients(params)
        except BaseException:
            for p, g in zip(params, stashed):
                p.grad = g
            if snapshot is not None:
                self._restore(params, snapshot)
            raise
        for p, g in zip(params, stashed):
            if g is not None:
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g
            elif graphs is not None and p.grad is not None:
                p.grad = p.grad.clone()  # the buffer stays the graphs'
        return ClipResult(self._clip_loss(losses), torch.cat(outputs, dim=2) if outputs else None)

    def _check_losses(self, losses: list) -> None:
        """One look at every frame's loss (one host sync a clip, not one a tick)."""
        if losses and not torch.isfinite(torch.stack([l.detach() for l in losses])).all():
            t = next(t for t, l in enumerate(losses) if not torch.isfinite(l.detach()))
            raise NonFiniteError(f"non-finite loss ({losses[t].item()}) at frame {t}; "
                                 "no gradient or weight was changed")

    def _graphs_for(self, target) -> Optional[TickGraphs]:
        """The CUDA graphs this clip ticks with, or None (with a warning the first time a
        reason comes up) where it cannot."""
        if not self.cuda_graph:
            return None
        if self._graphs is None:
            self._graphs = TickGraphs()
        why = self._graphs.why_not([self._device(i) for i in range(len(self.stages))], self.mode,
                                   self._boundary is not None, target)
        if why is not None:
            self._graphs.warn(why)
            return None
        return self._graphs

    def _clip_signature(self, params: list, out_len: int, per_frame_target: bool) -> tuple:
        """Everything a captured tick has baked in besides its buffers: a change drops the graphs."""
        hyper = ()
        if self.optimizer is not None and self.update == "tick":
            hyper = tuple((tuple(sorted((k, v) for k, v in g.items() if k != "params" and isinstance(v, (int, float))))
                           for g in self.optimizer.param_groups))
            hyper += tuple(s["momentum_buffer"].data_ptr() for s in self.optimizer.state.values()
                           if s.get("momentum_buffer") is not None)
        return (out_len, per_frame_target, self.loss_fn, self.update, hyper, tuple(p.data_ptr() for p in params),
                tuple(m.training for m in self.stages.modules()),
                tuple(_backend.resolve(self._device(i), self.backend) for i in range(len(self.stages))))

    def _reduce_gradients(self, params: list) -> None:
        """After a clip, before earlier gradients are added back: nothing in one process
        (data-parallel replicas average theirs here)."""

    def _backward_bp(self, losses: list) -> None:
        """bp mode, after the ticks: back-propagate the clip loss through the kept graph."""
        torch.stack(losses).sum().backward()

    def _clip_loss(self, losses: list) -> torch.Tensor:
        return torch.stack([l.detach() for l in losses]).sum()

    def stage_times(self, video: Frames, target, **kwargs) -> list[float]:
        """Seconds per tick each stage's work takes (its forward, plus its backward in Sideways
        mode), measured on one clip run as :meth:`backward_clip` runs it (same arguments) and
        averaged over the ticks the stage worked. Gradients, weights and optimizer state are
        left as they were. On CUDA the device is synchronised around every stage while
        measuring. ``balanced_placement(n, world, costs=pipe.stage_times(...))`` balances ranks
        (:mod:`sideways_kernels.distributed`)."""
        params = [p for p in self.stages.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        snapshot = self._snapshot(params) if self.update == "tick" else None
        self._timer = _StageTimer([self._device(i) for i in range(len(self.stages))])
        graphs, self.cuda_graph = self.cuda_graph, False  # eager ticks: a timer cannot run inside a capture
        try:
            self.backward_clip(video, target, **kwargs)
            return self._timer.per_tick()
        finally:
            self._timer, self.cuda_graph = None, graphs
            for p, g in zip(params, grads):
                p.grad = g
            if snapshot is not None:
                self._restore(params, snapshot)

    def stream(self, frames: Frames) -> Iterator[torch.Tensor]:
        """Inference, one frame a tick: yields the top stage's output of each frame as a frame,
        ``[B, C', H', W']``, in frame order, as soon as it is out: the k-th yielded tensor is the
        clip forward's frame k, so ``torch.stack(list(pipe.stream(clip)), dim=2) == net(clip)``.
        ``frames``: a clip ``[B, C, T, H, W]``, one frame ``[B, C, H, W]``, or any iterable of
        frames (read lazily, so a live source works)."""
        self._check_config()
        frames, length, finite = self._frames(frames, need_length=False)
        return (out.squeeze(2) for out in self._run(frames, length, finite, "infer", None, None))

    # --- the engine --------------------------------------------------------------------------

    def _frames(self, video: Frames, need_length: bool):
        """(iterator of frames [B, C, 1, H, W], T or None, whether they are known finite). A
        clip tensor is checked for NaN/inf here, once: one host sync, not one a tick."""
        if isinstance(video, torch.Tensor):
            if video.dim() == 4 and not need_length:  # stream() of one frame [B, C, H, W]
                video = video.unsqueeze(2)
            if video.dim() != 5:
                raise ValueError(f"video must be [B, C, T, H, W], got shape {tuple(video.shape)}")
            length = video.shape[2]
            self._check_length(length)
            if video.is_floating_point() and not torch.isfinite(video).all():
                t = int((~torch.isfinite(video)).transpose(0, 2).flatten(1).any(1).nonzero()[0])
                raise NonFiniteError(f"frame {t} of the video contains NaN or inf")
            return (video[:, :, t:t + 1] for t in range(length)), length, True
        if need_length:
            video = list(video)
            self._check_length(len(video))
            return iter(video), len(video), False
        return iter(video), None, False

    def _check_length(self, length: int) -> None:
        need = self.min_clip_length()
        if length < need:
            raise ValueError(f"the clip has {length} frame(s) but this pipeline needs at least {need} "
                             f"(its temporal convolutions output {self.output_length(length)} frames for it)")

    def _check_frame(self, f, t: int, first: Optional[torch.Tensor], finite: bool) -> torch.Tensor:
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"frame {t} must be a tensor, got {type(f).__name__}")
        if f.dim() == 4:
            f = f.unsqueeze(2)
        if f.dim() != 5 or f.shape[2] != 1:
            raise ValueError(f"frame {t} must be [B, C, H, W] or [B, C, 1, H, W], got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"frame {t} must be a floating tensor, got {f.dtype}")
        if first is not None and (f.shape != first.shape or f.dtype != first.dtype):
            raise ValueError(f"frame {t} is {tuple(f.shape)} {f.dtype} but frame 0 was {tuple(first.shape)} "
                             f"{first.dtype}: a video's shape cannot change mid-clip")
        if not finite and not torch.isfinite(f).all():
            raise NonFiniteError(f"frame {t} of the video contains NaN or inf")
        return f.to(self._device(0))

    def _check_output(self, i: int, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 5 or out.shape[2] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"stage {i} ({type(self.stages[i]).__name__}) returned {shape}; a stage must map a "
                             "frame [B, C, 1, H, W] to [B, C', 1, H', W']")

    def _carry(self, kind: str, parity: int, i: int, value: torch.Tensor) -> torch.Tensor:
        """Copy ``value`` into the preallocated double buffer (kind, parity) of stage ``i``, on
        that stage's device: written at tick τ, read at τ+1. Reallocated only when the shape
        changes."""
        key = (kind, parity, i)
        buf = self._buffers.get(key)
        device = self._device(i)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != device \
                or buf.stride() != value.stride():
            # Same memory layout as the value: a channels-last activation meeting a contiguous
            # gradient makes every elementwise backward take a slow strided path.
            buf = self._buffers[key] = torch.empty_like(value, device=device, memory_format=torch.preserve_format)
        return buf.copy_(value, non_blocking=True)

    @contextlib.contextmanager
    def _streaming(self, mode: str, clocks: list[StreamClock]):
        optimizer = self.optimizer if (mode == "sideways" and self.update == "tick") else None
        try:
            for i, layers in enumerate(self._layers):
                kernels = _backend.kernels(_backend.resolve(self._device(i), self.backend))
                for layer in layers:
                    layer._stream = _Stream(clock=clocks[i], mode=mode, kernels=kernels, optimizer=optimizer)
            yield
        finally:
            for layer in itertools.chain(*self._layers):
                layer._stream = None

    def _run(self, frames: Iterator, length: Optional[int], finite: bool, mode: str, frame_loss, losses,
             graphs: Optional[TickGraphs] = None, stage_target=None) -> Iterator[torch.Tensor]:
        """Tick until every output frame is out (and, in Sideways mode, every error has reached
        the bottom); yields the top stage's valid outputs in frame order. With ``graphs``, the
        steady-state ticks are CUDA-graph replays (cuda_graphs.py); ``stage_target(t)`` then puts
        frame t's target where the loss reads it."""
        n_stages = len(self.stages)
        top = n_stages - 1
        lo, boundary = self._lo, self._boundary
        clip = ClipLength(math.inf if length is None else length)
        clocks = self._clocks = [StreamClock(clip) for _ in range(n_stages)]  # the layers' clocks this run
        change = self.output_length(0)
        acts: list = [None] * n_stages  # (input tensor, frame index, length offset) of each stage
        errs: list = [None] * n_stages  # gradient w.r.t. each stage's output, sent last tick
        first = zeros = None
        emitted = 0
        training = frame_loss is not None
        drain_bound = self._drain_bound()
        ticks = self.total_ticks(clip.frames, mode) if boundary is not None else None  # the length is known then
        if boundary is not None:
            boundary.start()
        with self._streaming(mode, clocks):
            for tick in itertools.count():
                if lo > 0:
                    pass  # this process's first stage is fed by the process below (acts[lo])
                elif clip.frames == math.inf or tick < clip.frames:
                    f = next(frames, None)
                    if f is None:  # an iterable stream just ended
                        self._check_length(tick)
                        clip.frames = tick
                    else:
                        first = self._check_frame(f, tick, first, finite)
                        acts[0] = (first if graphs is None else graphs.stage("frame", first, first.device), tick, 0)
                if lo == 0 and tick >= clip.frames:  # drain: zero frames, which layers use only as end padding
                    zeros = torch.zeros_like(first) if zeros is None else zeros
                    acts[0] = (zeros, tick, 0)
                if tick > clip.frames + drain_bound:
                    raise RuntimeError(f"pipeline did not drain after {tick} ticks; a stage mixes SidewaysConv3d "
                                       "branches with different delays (only chains stream)")
                if training and stage_target is not None and acts[top] is not None:
                    t_out = acts[top][1] - self._shift[top][0]
                    if 0 <= t_out < clip.frames + acts[top][2] + self._shift[top][1]:
                        stage_target(t_out)
                phase = self._phase(tick, acts, errs, clip) if graphs is not None else None
                if phase is None:
                    new_acts, new_errs, done, tick_losses = self._tick(tick, acts, errs, clocks, mode, frame_loss)
                else:  # a steady-state tick: its graph does the tensors, the Python side is done here
                    # What a capture bakes in, bound now (the emulation's replay re-runs it).
                    tick_fn = functools.partial(self._tick, tick, list(acts), list(errs), mode=mode,
                                                frame_loss=frame_loss)
                    new_acts, new_errs, done, tick_losses = graphs.run(
                        phase, lambda f=tick_fn: f(clocks=self._clocks), self._python_state, self._advance_slots)
                    new_acts = [None] + [(new_acts[i + 1][0], acts[i][1] - self._shift[i][0],
                                          acts[i][2] + self._shift[i][1]) for i in range(top)]
                    done, tick_losses = [o.clone() for o in done], [l.clone() for l in tick_losses]
                emitted += len(done)
                if training:
                    losses.extend(tick_losses)
                if boundary is not None:
                    boundary.end_tick(tick, mode)
                yield from done
                acts[lo + 1:self._hi] = new_acts[lo + 1:self._hi]
                errs = new_errs
                if boundary is not None:
                    if tick + 1 == ticks:
                        boundary.finish(tick, mode)
                        self.last_ticks = tick + 1
                        return
                elif emitted >= clip.frames + change and all(e is None for e in errs):
                    self.last_ticks = tick + 1
                    return

    def _tick(self, tick: int, acts: list, errs: list, clocks: list, mode: str, frame_loss):
        """One tick of this process's stages: every stage with an input runs its forward and, in
        Sideways mode, pushes the error it got last tick back through it; then the per-tick
        optimizer step. Returns (next tick's acts, next tick's errs, the top's valid outputs,
        their losses), all tensors that live across ticks or fresh ones — nothing else changes
        but the layers' slots, the clocks, the gradients and the optimizer's state."""
        n_stages = len(self.stages)
        top = n_stages - 1
        lo, hi, boundary = self._lo, self._hi, self._boundary
        remote_below = boundary is not None and lo > 0  # stage lo's input comes from the process below
        remote_above = boundary is not None and hi < n_stages  # stage hi-1's error comes from the one above
        training = frame_loss is not None
        parity = tick % 2
        new_acts: list = [None] * n_stages
        new_errs: list = [None] * n_stages
        done: list = []  # this tick's valid top outputs, handed out once the tick is joined
        losses: list = []
        stepped = False
        streams = self._fork()
        try:
            for i in range(lo, hi):
                stage = self.stages[i]
                if i == lo and remote_below:  # waited for only now: it arrived during our last tick
                    acts[i] = boundary.receive("act", tick, mode)
                if acts[i] is None:
                    continue  # nothing has reached this stage yet
                if self._timer is not None:
                    self._timer.start(i)
                if streams[i] is not None:  # the stage's work goes on its own CUDA stream
                    torch.cuda.set_stream(streams[i])
                x, clocks[i].frame, clocks[i].offset = acts[i]
                err = errs[i]
                err_from_above = remote_above and i == hi - 1
                if mode == "sideways":
                    # Whether an error comes from above is known only once it has come, after
                    # this forward: be ready for one.
                    backward = err is not None or (i == top or err_from_above) and training
                    xin = x.detach().requires_grad_(backward and i > 0)
                    with torch.set_grad_enabled(backward):
                        out = stage(xin)
                elif mode == "bp":
                    xin = x
                    with torch.enable_grad():
                        out = stage(x)
                else:
                    with torch.no_grad():
                        out = stage(x)
                self._check_output(i, out)
                t = clocks[i].frame
                if i == top:
                    if not clocks[i].valid():
                        continue
                    done.append(out.detach())
                    if not training:
                        continue
                    loss = frame_loss(out, t)
                    # bp keeps the graph for the end; Sideways must not, or every frame's loss
                    # would pin its graph's leaves (memory growing with T).
                    losses.append(loss if mode == "bp" else loss.detach())
                    if mode != "sideways":
                        continue
                    loss.backward()
                else:
                    if i + 1 == hi:  # the next stage lives in another process: send now, so the
                        # transfer overlaps this stage's backward
                        boundary.send("up", tick, out if mode == "bp" else out.detach(), t, clocks[i].offset, mode)
                    else:
                        nxt = out if mode == "bp" else self._carry("act", parity, i + 1, out.detach())
                        new_acts[i + 1] = (nxt.to(self._device(i + 1)), t, clocks[i].offset)
                    if err_from_above:
                        err = boundary.receive("err", tick, mode)
                    if mode != "sideways" or err is None:
                        continue
                    if out.requires_grad:
                        torch.autograd.backward(out, err)
                stepped = True
                if i > 0 and xin.grad is not None:
                    if i == lo:  # the stage below lives in another process
                        boundary.send("down", tick, xin.grad, mode=mode)
                    else:
                        new_errs[i - 1] = self._carry("err", parity, i - 1, xin.grad)
        finally:
            self._join(streams)
            if self._timer is not None:
                self._timer.stop()
        if stepped and self.update == "tick" and mode == "sideways":
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return new_acts, new_errs, done, losses

    # --- CUDA-graph ticks (cuda_graphs.py) -----------------------------------------------------

    @functools.cached_property
    def _shift(self) -> list[tuple[int, int]]:
        """Per stage: (frames its layers delay a frame by, frames they add to the stream)."""
        return [(sum(l.stream_delay for l in layers), sum(l.length_change for l in layers)) for layers in self._layers]

    def _phase(self, tick: int, acts: list, errs: list, clip: ClipLength) -> Optional[tuple]:
        """The phase (parity, every layer's ring slot) of a steady-state tick — every stage has
        an input and (below the top) an error, every layer takes a real frame, the top emits a
        valid one — or None for a fill or drain tick."""
        n_stages = len(self.stages)
        if tick >= clip.frames or any(a is None for a in acts) or any(e is None for e in errs[:n_stages - 1]):
            return None
        slots = []
        for (_, frame, offset), layers in zip(acts, self._layers):
            for layer in layers:
                if not 0 <= frame < clip.frames + offset or layer._stream.slot < 0:
                    return None
                slots.append(layer._stream.slot)
                frame, offset = frame - layer.stream_delay, offset + layer.length_change
        if not 0 <= frame < clip.frames + offset:  # the top stage's output
            return None
        # The buffers' addresses too: a graph is only valid for the storage it was captured on.
        rings = tuple(l._ring.data_ptr() for l in itertools.chain(*self._layers))
        return tick % 2, tuple(slots), rings, tuple(b.data_ptr() for b in self._buffers.values())

    def _advance_slots(self) -> None:
        """What a replayed steady-state tick leaves undone: every layer pushed one frame."""
        for layer in itertools.chain(*self._layers):
            layer._stream.slot = (layer._stream.slot + 1) % layer.span

    def _python_state(self, state=None):
        """The Python state a tick changes (ring slots, gradient references), or set it."""
        layers = list(itertools.chain(*self._layers))
        params = list(self.stages.parameters())
        if state is None:
            return [l._stream.slot for l in layers], [p.grad for p in params]
        for layer, slot in zip(layers, state[0]):
            layer._stream.slot = slot
        for p, g in zip(params, state[1]):
            p.grad = g

    def total_ticks(self, frames: int, mode: str) -> int:
        """Ticks a clip of ``frames`` frames takes: its last output frame leaves the top stage
        after every layer's delay and one tick per stage boundary; in Sideways mode its error
        then needs one more tick per boundary to reach the bottom stage."""
        delay = sum(layer.stream_delay for layer in itertools.chain(*self._layers))
        boundaries = len(self.stages) - 1
        last_out = self.output_length(frames) - 1 + delay + boundaries
        return last_out + 1 + (boundaries if mode == "sideways" else 0)

    def _fork(self) -> list:
        """One CUDA stream per stage on a GPU (None elsewhere), each waiting for everything
        issued so far on its device's current stream (the caller's, or a graph's capture
        stream): the last tick's work and buffers."""
        if self._streams is None:
            self._streams = [torch.cuda.Stream(self._device(i)) if self._device(i).type == "cuda" else None
                             for i in range(len(self.stages))]
        self._home = {s.device: torch.cuda.current_stream(s.device) for s in self._streams if s is not None}
        for s in self._streams:
            if s is not None:
                s.wait_stream(self._home[s.device])
        return self._streams

    def _join(self, streams: list) -> None:
        """End of a tick: every stage's stream joins back into its device's current stream, so
        the next tick (and the caller) sees all of this tick's results."""
        for s in streams:
            if s is not None:
                self._home[s.device].wait_stream(s)
                torch.cuda.set_stream(self._home[s.device])

    def _drain_bound(self) -> int:
        """Ticks after the last frame within which a chain pipeline has drained."""
        layers = list(itertools.chain(*self._layers))
        return sum(l.stream_delay + l.temporal_padding[1] for l in layers) + 2 * len(self.stages) + 2

    def _snapshot(self, params):
        """What per-tick updates change (weights, optimizer state), to undo a failed clip."""
        return [p.detach().clone() for p in params], copy.deepcopy(self.optimizer.state_dict())

    def _restore(self, params, snapshot) -> None:
        weights, state = snapshot
        with torch.no_grad():
            for p, saved in zip(params, weights):
                p.copy_(saved)
        self.optimizer.load_state_dict(state)


class _StageTimer:
    """Wall time of each stage's work within the ticks (stage_times())."""

    def __init__(self, devices: list):
        self.devices = devices
        self.total = [0.0] * len(devices)
        self.ticks = [0] * len(devices)
        self._current: Optional[tuple] = None

    def _now(self, i: int) -> float:
        if self.devices[i].type == "cuda":
            torch.cuda.synchronize(self.devices[i])
        return time.perf_counter()

    def start(self, i: int) -> None:
        self.stop()
        self.ticks[i] += 1
        self._current = (i, self._now(i))

    def stop(self) -> None:
        if self._current is not None:
            i, began = self._current
            self.total[i] += self._now(i) - began
            self._current = None

    def per_tick(self) -> list[float]:
        return [t / max(n, 1) for t, n in zip(self.total, self.ticks)]

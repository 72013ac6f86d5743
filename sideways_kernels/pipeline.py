"""The public pipeline (DESIGN.md §1, §5): frames enter one per tick, every stage works at
once on what the stage below produced last tick, and — in Sideways mode — every stage also
pushes the error the stage above sent last tick through its *current* Jacobian.
``mode="bp"`` runs the very same ticks but keeps the whole autograd graph and back-propagates
the clip loss at the end: exact backprop, for a fair comparison.

A pipeline is built from a list of stage modules (a chain: each maps a frame to a frame) or,
with :meth:`SidewaysPipeline.from_model`, from any traceable video network (residuals,
branches, temporal strides and pools, BatchNorm, pooled heads), cut into stages where one
tensor crosses. The pieces: :mod:`~sideways_kernels.trace` (fx tracing, conversion, refusals),
:mod:`~sideways_kernels.graph` (nodes, clocks, cuts), :mod:`~sideways_kernels.schedule` (which
node fires when), :mod:`~sideways_kernels.engine` (the ticks on tensors).
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as _backend
from .cuda_graphs import TickGraphs
from .engine import Engine, _StageTimer, _leading_conv
from .graph import SOURCE, ChainNode, ConvNode, LocalNode, Node, StreamGraph, _triple, balance, cut_points
from .nn import SidewaysConv3d
from .schedule import Schedule
from .trace import StreamingError, trace_model

__all__ = ["SidewaysPipeline", "ClipResult", "NonFiniteError", "StreamingError", "GraphStage", "split_sequential",
           "streaming_problem", "frame_logits"]

Frames = Union[torch.Tensor, Iterable[torch.Tensor]]


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN or inf in the video or the loss; nothing was changed by the clip."""


class ClipResult(NamedTuple):
    loss: torch.Tensor  # the clip loss: mean over output frames of loss_fn(frame logits, target), detached
    outputs: Optional[torch.Tensor]  # the per-frame outputs stacked in time at dim 2 (None on ranks without the top)
    logits: Optional[torch.Tensor] = None  # the clip's prediction: the mean of the frame logits [B, K]


_MIXES_TIME = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
               nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def streaming_problem(module: nn.Module) -> Optional[str]:
    """Why ``module``, applied one frame ``[B, C, 1, H, W]`` at a time inside a stage module,
    would not give what it gives on the whole clip — or None when it streams exactly."""
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
            return ("temporal pooling (kernel/stride/padding over time) inside a stage module; pool over space only "
                    "(kernel (1, kh, kw)), or build the pipeline with SidewaysPipeline.from_model")
    if isinstance(module, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)) and _triple(module.output_size)[0] is not None:
        return ("adaptive pooling to a fixed number of frames; use output_size=(None, h, w), or "
                "SidewaysPipeline.from_model, which makes a pool over all frames a per-frame head")
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
        return ("batch statistics over (B, T, H, W) normalise over time; put it in eval mode (running statistics), "
                "or use SidewaysPipeline.from_model(..., batchnorm='frame' or 'frozen')")
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
    """One frame's output as ``loss_fn`` sees it: a frame ``[B, K, 1, H, W]`` loses its time
    axis and becomes ``[B, K]`` when the spatial extent is 1×1 (a per-frame classifier); a
    per-frame head's output (no time axis, e.g. ``[B, K]``) is taken as it is."""
    if out.dim() != 5:
        return out
    out = out.squeeze(2)
    return out.flatten(1) if out.shape[-2:] == (1, 1) else out


class _Traced:
    """A model traced by from_model: the graph, the BatchNorms it streams and their policy, the
    temporal padding it streams with."""

    def __init__(self, model: nn.Module, graph: StreamGraph, batchnorms: list, policy: Optional[str],
                 temporal_padding: str = "same"):
        self.model, self.graph, self.batchnorms, self.policy = model, graph, batchnorms, policy
        self.temporal_padding = temporal_padding


class GraphStage(nn.Module):
    """Stage ``index`` of a model traced by :meth:`SidewaysPipeline.from_model`: the nodes
    ``nodes`` of its streaming graph. Its ``layers`` are the model's own modules (shared, so
    ``stage.to(device)`` moves them); called on a clip it runs its part of the model offline —
    the function the pipeline streams (with ``temporal_padding="causal"``, the causal one)."""

    def __init__(self, traced: _Traced, index: int, nodes: Sequence[int]):
        super().__init__()
        object.__setattr__(self, "traced", traced)  # not a submodule: the model is the user's
        self.index, self.nodes = index, list(nodes)
        graph = traced.graph
        seen, layers = set(), []
        for i in self.nodes:
            for m in graph.nodes[i].modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    layers.append(m)
        self.layers = nn.ModuleList(layers)
        after = {p for i in range(self.nodes[-1] + 1, len(graph.nodes)) for p in graph.nodes[i].inputs}
        self.output = graph.output if graph.output in self.nodes else next(i for i in self.nodes if i in after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This stage's part of the model on a whole clip (its input: what crosses into it)."""
        graph = self.traced.graph
        first = self.nodes[0]
        values = {p: x for i in self.nodes for p in graph.nodes[i].inputs if p < first}
        for i in self.nodes:
            node = graph.nodes[i]
            values[i] = node.offline(*[values[p] for p in node.inputs])
        return values[self.output]

    def extra_repr(self) -> str:
        names = [self.traced.graph.nodes[i].name for i in self.nodes]
        return f"index={self.index}, nodes={names[0]!r} .. {names[-1]!r} ({len(names)})"


class SidewaysPipeline:
    """Trains a network cut into stages depth-parallel with Sideways, or with exact backprop.

    Args:
        stages: a list of stage modules, each mapping one frame ``[B, C, 1, H, W]`` to
            ``[B, C', 1, H', W']`` (a chain; temporal layers must be :class:`SidewaysConv3d`,
            see :func:`~sideways_kernels.convert`, applied one after the other inside a stage;
            layers that mix frames otherwise are refused, naming the module and why) — or the
            stages :meth:`from_model` cut from any traceable network.
        loss_fn: ``loss_fn(frame_logits, target) -> scalar``; default cross-entropy.
        mode: ``"sideways"`` (the approximation) or ``"bp"`` (exact backprop of the clip loss).
        update: ``"clip"`` (default: gradients accumulate in ``.grad`` over the clip, step your
            optimizer yourself) or ``"tick"`` (``optimizer``, a ``torch.optim.SGD``, is applied
            every tick; SidewaysConv3d weights through the fused update op, never materialising
            their gradient).
        devices: one device per stage; stages are moved there and activations/errors copied
            between them. On CUDA every stage runs on its own stream, so the stages of a tick
            overlap; each tick ends with all of them joined.
        backend: ``"torch" | "cpp" | "triton" | "cuda" | "auto"``, else ``SIDEWAYS_BACKEND`` or the
            default for each stage's device (on CUDA ``auto``: per op the backend measured
            fastest there, :mod:`sideways_kernels.backend`; else the fastest built).
        cuda_graph: in :meth:`backward_clip` (Sideways mode, every stage on one CUDA device),
            replay every tick from a CUDA graph captured once per phase
            (:mod:`sideways_kernels.cuda_graphs`: the first clip of a length warms up, the second
            captures, later ones replay). Default None: on wherever that is possible, silently
            eager elsewhere (CPU, several devices, ``mode="bp"``, distributed, ``smoothing > 1``);
            ``True``: also say once why not where impossible; ``False``: eager ticks. A capture
            that fails (a host sync in the loss function or a node) warns once, naming it, and
            the pipeline ticks eagerly. With graphs every trainable parameter gets a ``.grad``.
        smoothing: ``k >= 1``. Sideways pairs each arriving error with the activation as it is
            now; with ``k > 1`` every SidewaysConv3d's weight update (accumulated or per-tick)
            pairs instead the mean of the last ``k`` errors it received with the mean of the
            last ``k`` input windows they met (fewer at the clip's start). The error sent down is
            unchanged, and so are bp mode and parameters of other layers. ``k = 1`` (default)
            is Sideways as it is.

    The clip loss is the mean, over the frames the clip forward outputs, of
    ``loss_fn(logits of frame t, target)`` (DESIGN.md §1): rings start at zero (the clip's
    start padding), the layers that pad the clip's end get zero frames after it, and the
    pipeline keeps ticking until every frame's error has reached the bottom stage.
    """

    def __init__(self, stages: Sequence[nn.Module], loss_fn: Optional[Callable] = None, mode: str = "sideways", *,
                 update: str = "clip", optimizer: Optional[torch.optim.Optimizer] = None,
                 devices: Optional[Sequence[Union[str, torch.device]]] = None, backend: Optional[str] = None,
                 cuda_graph: Optional[bool] = None, smoothing: int = 1):
        stages = list(stages) if not isinstance(stages, nn.Module) else [stages]
        if not stages or not all(isinstance(s, nn.Module) for s in stages):
            raise TypeError("stages must be a non-empty sequence of nn.Module")
        self.stages = nn.ModuleList(stages)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.mode, self.update, self.optimizer, self.backend = mode, update, optimizer, backend
        self.smoothing = smoothing
        if backend is not None and backend not in _backend.NAMES:
            raise ValueError(f"backend must be one of {_backend.NAMES} or None, got {backend!r}")
        if devices is not None:
            if len(devices) != len(stages):
                raise ValueError(f"devices needs one device per stage ({len(stages)}), got {len(devices)}")
            for stage, device in zip(self.stages, devices):
                stage.to(device)
        self.devices = [torch.device(d) for d in devices] if devices is not None else None
        self._traced = self._graph_of(stages)
        self.engine = Engine(self.graph, self._node_lists, self._device)
        self.cuda_graph = cuda_graph
        self._graphs: Optional[TickGraphs] = None
        self.last_ticks = 0  # ticks the last run took
        self._schedules: dict = {}
        self._check_config()

    def _graph_of(self, stages: list) -> Optional[_Traced]:
        """The streaming graph: the traced model's, or a chain of the stage modules."""
        graph_stages = [isinstance(s, GraphStage) for s in stages]
        if any(graph_stages):
            if not all(graph_stages) or any(s.traced is not stages[0].traced for s in stages) or \
                    [s.index for s in stages] != list(range(len(stages))):
                raise ValueError("stages made by from_model must all come from one call, in order")
            self.graph = stages[0].traced.graph
            self._node_lists = [s.nodes for s in stages]
            return stages[0].traced
        nodes = [ChainNode(f"stage {i}", [i - 1 if i else SOURCE], stage) for i, stage in enumerate(stages)]
        self.graph = StreamGraph(nodes, len(nodes) - 1)
        self._node_lists = [[i] for i in range(len(nodes))]
        seen = set()
        for layer in itertools.chain(*(n.layers for n in nodes)):
            if id(layer) in seen:
                raise ValueError("a SidewaysConv3d appears twice in the stages; a layer streams in one place only")
            seen.add(id(layer))
        return None

    # --- from a whole network ------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, stages: int = 1, loss_fn: Optional[Callable] = None,
                   mode: str = "sideways", *, batchnorm: Optional[str] = None, temporal_padding: str = "same",
                   example: Optional[torch.Tensor] = None, balance_by: str = "flops", **kwargs) -> "SidewaysPipeline":
        """A pipeline for any traceable video network: its ``nn.Conv3d`` layers become
        :class:`SidewaysConv3d` in place (the parameters, optimizer and state dict keep working),
        torch.fx traces it into a streaming graph, and the graph is cut into ``stages`` stages
        where a single tensor crosses, balanced by cost.

        Args:
            batchnorm: what BatchNorm does in training mode, where batch statistics over
                ``(B, T, H, W)`` cannot stream: ``"frame"`` normalises each frame by its own batch
                statistics over ``(B, H, W)`` (the running buffers updated once per frame), or
                ``"frozen"`` uses the running statistics (its affine parameters still train).
                Both modes (bp and sideways) use the same policy. Default None: a BatchNorm in
                training mode is refused, naming this option. Eval mode streams exactly.
            temporal_padding: ``"same"`` (default) streams the model's own function: a padded
                temporal conv or pool waits for its future frames, so the pipeline lags (54 frames
                for ``r2plus1d_18``) and Sideways pairs most errors of a short clip with its end
                padding. ``"causal"`` streams each temporally padded conv and pool with all of that
                padding on the past side (it reads frames ``t-2p..t``, not ``t-p..t+p``), so it
                adds no lag; a temporally strided one's window ends on the last frame of its
                stride group (every frame is read; a lag of ``stride - 1`` at its input rate; a
                partial last group gives no output). The modules, parameters and state dict are unchanged
                and ``model(video)`` is still the 'same' function; the pipeline (``backward_clip``,
                ``stream``, ``predict``, ``stage(clip)``) computes the causal one, whose frame
                ``t`` is the 'same' frame ``t - p`` per layer (zero history at the start). A layer
                whose causal form would start before its window (padding above ``span - 1``) is
                refused by name. :attr:`lags` gives the lag under both.
            example: a clip ``[B, C, T, H, W]`` to measure the nodes' cost on (default: one of
                112×112, else 224×224, frames with the first conv's channels).
            balance_by: ``"flops"`` (default) or ``"time"`` (measured on ``example``).
            kwargs: as for the constructor (``update``, ``optimizer``, ``devices``, ...).
        """
        graph, batchnorms = trace_model(model, batchnorm, temporal_padding)
        convs = [n.module for n in graph.nodes if isinstance(n, ConvNode)]
        if len({id(c) for c in convs}) != len(convs):
            raise StreamingError("a Conv3d module is called at two places; each call needs its own ring, so give "
                                 "each place its own module")
        traced = _Traced(model, graph, batchnorms, batchnorm, temporal_padding)
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive int, got {stages!r}")
        if balance_by not in ("flops", "time"):
            raise ValueError(f"balance_by must be 'flops' or 'time', got {balance_by!r}")
        costs, produced = _probe(graph, model, example, batchnorms, by=balance_by)
        points = [i for i in cut_points(graph) if produced[_crossing_after(graph, i)]]
        ends = balance(costs, points, stages)
        bounds = [-1, *ends, len(graph.nodes) - 1]
        lists = [list(range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]
        return cls([GraphStage(traced, k, nodes) for k, nodes in enumerate(lists)], loss_fn, mode, **kwargs)

    # --- configuration ---------------------------------------------------------------------

    def _check_config(self) -> None:
        if self.mode not in ("sideways", "bp"):
            raise ValueError(f"mode must be 'sideways' or 'bp', got {self.mode!r}")
        if self.update not in ("clip", "tick"):
            raise ValueError(f"update must be 'clip' or 'tick', got {self.update!r}")
        if not any(self.cuda_graph is v for v in (None, True, False)):
            raise ValueError(f"cuda_graph must be None (on where possible), True or False, got {self.cuda_graph!r}")
        if not isinstance(self.smoothing, int) or isinstance(self.smoothing, bool) or self.smoothing < 1:
            raise ValueError(f"smoothing must be an int >= 1 (1: Sideways as it is), got {self.smoothing!r}")
        if self.update == "tick":
            if self.mode != "sideways":
                raise ValueError("update='tick' applies the optimizer every tick, which only mode='sideways' does")
            if not isinstance(self.optimizer, torch.optim.SGD):
                raise TypeError(f"update='tick' needs a torch.optim.SGD optimizer (the fused update is SGD), got "
                                f"{type(self.optimizer).__name__}")
            if any(g.get("maximize") or isinstance(g["lr"], torch.Tensor) for g in self.optimizer.param_groups):
                raise ValueError("update='tick' supports SGD groups with maximize=False and a float lr")
        if self._traced is None:
            for i, stage in enumerate(self.stages):
                for name, module in stage.named_modules():
                    why = streaming_problem(module)
                    if why is not None:
                        where = f"stage {i}" + (f", module '{name}'" if name else "")
                        raise ValueError(f"{where} ({type(module).__name__}) cannot stream: {why}")
            return
        policy = self._traced.policy
        for bn, name in self._traced.batchnorms:
            batch_stats = bn.training or not bn.track_running_stats
            if batch_stats and policy is None:
                raise StreamingError(f"module '{name}' ({type(bn).__name__}) is in training mode: its batch statistics "
                                     "over (B, T, H, W) include future frames, so it cannot stream; pass "
                                     "batchnorm='frame' (per-frame batch statistics) or batchnorm='frozen' (running "
                                     "statistics) to from_model, or put it in eval mode")
            if policy == "frozen" and not bn.track_running_stats:
                raise StreamingError(f"module '{name}' ({type(bn).__name__}) has no running statistics to freeze "
                                     "(track_running_stats=False); use batchnorm='frame'")

    def _device(self, i: int) -> torch.device:
        if self.devices is not None:
            return self.devices[i]
        p = next(itertools.chain(self.stages[i].parameters(), self.stages[i].buffers()), None)
        return p.device if p is not None else torch.device("cpu")

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.stages.parameters()

    def min_clip_length(self) -> int:
        """The fewest frames a clip needs so that every layer outputs at least one frame."""
        if self._traced is None:  # a chain: each stage in turn
            need, change = 1, 0
            for node in self.graph.nodes:
                need = max(need, node.min_input() - change)
                change += node.change
            return need
        return self.graph.min_clip_length()

    @property
    def lag(self) -> int:
        """Input frames between a frame entering the pipeline and the output it completes leaving
        it (the temporal receptive field's future side plus the strides' waits). Sideways pairs
        an error with activations about that many frames newer, so it needs clips several
        times longer; shorter clips are warned about."""
        return int(self.graph.lag[self.graph.output])

    @property
    def lags(self) -> dict:
        """The lag under each ``temporal_padding`` of :meth:`from_model`, whichever this pipeline
        streams with: ``{"same": 54, "causal": 7}`` for ``r2plus1d_18``. None where that setting
        cannot stream the model (a layer it refuses) or does not apply (the list API streams its
        stage modules as they are)."""
        return self.graph.lags()

    @property
    def temporal_padding(self) -> Optional[str]:
        """The ``temporal_padding`` this pipeline streams with (None: the list API's stage modules)."""
        return self._traced.temporal_padding if self._traced is not None else None

    def output_length(self, frames: int) -> int:
        """Frames the clip forward outputs for a clip of ``frames`` frames."""
        return int(self.graph.lengths(frames)[self.graph.output])

    def total_ticks(self, frames: int, mode: str) -> int:
        """Ticks a clip of ``frames`` frames takes in ``mode`` ("sideways", "bp" or "infer")."""
        return self._schedule(frames, mode, mode != "infer").total_ticks()

    def _schedule(self, frames: float, mode: str, training: bool) -> Schedule:
        if frames == math.inf:
            return Schedule(self.graph, self._node_lists, frames, mode, training)
        key = (frames, mode, training)
        if key not in self._schedules:
            self._schedules[key] = Schedule(self.graph, self._node_lists, frames, mode, training)
        return self._schedules[key]

    # --- public entry points ---------------------------------------------------------------

    def backward_clip(self, video: Frames, target, *, per_frame_target: Optional[bool] = None) -> ClipResult:
        """Run one clip through the pipeline (fill, one frame a tick, drain) and leave the clip
        loss's weight gradients in each parameter's ``.grad`` (accumulating, as autograd does).

        ``video``: ``[B, C, T, H, W]`` or a sequence of frames ``[B, C, H, W]``. ``target``: what
        ``loss_fn`` takes for a frame; with ``per_frame_target`` (default: an integer tensor
        ``[B, T_out]``) frame ``t`` gets ``target[:, t]``. On any error (bad input, a
        non-finite loss) every ``.grad``, weight, buffer and optimizer state is left as it was.
        """
        self._check_config()
        frames, length, finite = self._frames(video, need_length=True)
        out_len = self.output_length(length)
        if self.mode == "sideways" and length <= self.lag:
            causal = self.lags.get("causal")
            hint = (f"from_model(..., temporal_padding='causal') (lag {causal}), " if causal is not None
                    and causal < self.lag and self.temporal_padding == "same" else "")
            warnings.warn(f"a clip of {length} frame{'s' if length != 1 else ''} is no longer than the pipeline's lag "
                          f"of {self.lag} frames: "
                          "Sideways pairs most errors with activations of the clip's end padding and learns little; "
                          f"use clips several times the lag, {hint}fewer temporal strides, or mode='bp'", UserWarning,
                          stacklevel=2)
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
            logits, frame_target = frame_logits(out), target_of(t)
            try:
                loss = self.loss_fn(logits, frame_target)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                if type(exc) not in (RuntimeError, ValueError, TypeError, IndexError):
                    raise  # (a subclass may take other arguments, or be caught by its type: as it was)
                raise type(exc)(f"loss_fn failed on the top stage's output frame {tuple(logits.shape)} (what the "
                                f"model's last stage gives one frame, as frame_logits passes it) and the target "
                                f"{tuple(getattr(frame_target, 'shape', ()))}: {exc}") from exc
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))}")
            return loss.reshape(())  # its finiteness is checked once, after the ticks

        params = [p for p in self.stages.parameters() if p.requires_grad]
        stashed = [p.grad for p in params]
        for p in params:
            p.grad = None
        snapshot = self._snapshot(params)
        try:
            if graphs is not None:
                if self.update == "clip":
                    graphs.grad_buffers(params, stashed)
                graphs.begin_clip(self._clip_signature(params, out_len, per_frame_target))
            losses: list[torch.Tensor] = []
            schedule = self._schedule(length, self.mode, True)
            outputs = list(self._run(schedule, frames, self.mode, frame_loss, losses, graphs, stage_target, out_len))
            finite.check()
            self._check_losses(losses)
            if self.mode == "bp":
                self._backward_bp(losses)
            self._reduce_gradients(params)
        except BaseException:
            for p, g in zip(params, stashed):
                p.grad = g
            self._restore(params, snapshot)
            raise
        for p, g in zip(params, stashed):
            if g is not None:
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g
            # else (graphs): the graphs' gradient buffer is handed over; they take it back once free
        stacked = _stack(outputs, self._timed_output()) if outputs else None
        logits = torch.stack([frame_logits(o) for o in outputs]).mean(0) if outputs else None
        return ClipResult(self._clip_loss(losses), stacked, logits)

    def _check_losses(self, losses: list) -> None:
        """One look at every frame's loss (one host sync a clip, not one a tick)."""
        if losses and not torch.isfinite(torch.stack([l.detach() for l in losses])).all():
            t = next(t for t, l in enumerate(losses) if not torch.isfinite(l.detach()))
            raise NonFiniteError(f"non-finite loss ({losses[t].item()}) at frame {t}; "
                                 "no gradient or weight was changed")

    def _graphs_for(self, target) -> Optional[TickGraphs]:
        """The CUDA graphs this clip ticks with, or None (with a warning the first time a
        reason comes up) where it cannot."""
        if self.cuda_graph is False:
            return None
        devices = {self._device(i) for i in range(len(self.stages))}
        if self.cuda_graph is None and self._graphs is None and \
                (len(devices) != 1 or next(iter(devices)).type != "cuda"):  # the default, off a GPU: no graphs
            return None
        if self._graphs is None:
            self._graphs = TickGraphs()
        self._graphs.asked = self.cuda_graph is True
        why = self._graphs.why_not([self._device(i) for i in range(len(self.stages))], self.mode,
                                   self.engine.boundary is not None, target)
        if why is None and self.smoothing > 1:
            why = "smoothing > 1 keeps each layer's last errors and windows on the Python side"
        if why is not None:
            self._graphs.warn(why)
            return None
        return self._graphs

    def _clip_signature(self, params: list, out_len: int, per_frame_target: bool) -> tuple:
        """Everything a captured tick has baked in besides its buffers: a change drops the graphs."""
        hyper = ()
        if self.optimizer is not None and self.update == "tick":
            hyper = tuple((tuple(sorted((k, v) for k, v in g.items() if k != "params" and isinstance(v, (int, float))))
                           for g in self.optimizer.param_groups))  # (the momentum buffers: Engine.addresses)
        return (out_len, per_frame_target, self.loss_fn, self.update, hyper, tuple(p.data_ptr() for p in params),
                tuple(m.training for m in self.stages.modules()),
                tuple(_backend.resolve(self._device(i), self.backend) for i in range(len(self.stages))),
                _autocast_state(self._device(0).type))

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
        averaged over the ticks the stage worked. Gradients, weights, buffers and optimizer state
        are left as they were. On CUDA the device is synchronised around every stage while
        measuring. ``balanced_placement(n, world, costs=pipe.stage_times(...))`` balances ranks
        (:mod:`sideways_kernels.distributed`)."""
        params = [p for p in self.stages.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        snapshot = self._snapshot(params)
        self.engine.timer = _StageTimer([self._device(i) for i in range(len(self.stages))])
        graphs, self.cuda_graph = self.cuda_graph, False  # eager ticks: a timer cannot run inside a capture
        try:
            self.backward_clip(video, target, **kwargs)
            return self.engine.timer.per_tick()
        finally:
            self.engine.timer, self.cuda_graph = None, graphs
            for p, g in zip(params, grads):
                p.grad = g
            self._restore(params, snapshot)

    def stream(self, frames: Frames) -> Iterator[torch.Tensor]:
        """Inference, one frame a tick: yields the output of each frame as soon as it is out, in
        frame order — a frame ``[B, C', H', W']`` (the k-th is the clip forward's frame k, so
        ``torch.stack(list(pipe.stream(clip)), dim=2) == net(clip)``), or a per-frame head's
        logits. ``frames``: a clip ``[B, C, T, H, W]``, one frame ``[B, C, H, W]``, or any iterable
        of frames (read lazily, so a live source works)."""
        self._check_config()
        frames, length, finite = self._frames(frames, need_length=False)
        schedule = self._schedule(math.inf if length is None else length, "infer", False)
        for out in self._run(schedule, frames, "infer", None, None):
            yield out.squeeze(2) if out.dim() == 5 else out
        finite.check()

    @torch.no_grad()
    def predict(self, video: Frames) -> torch.Tensor:
        """What the model returns for ``video``, computed by streaming it: a network whose
        output keeps the time axis gives its frames stacked (``[B, K, T', H', W']``); one with a
        head that pools over all frames gets that pool accumulated over the streamed frames and
        the head applied once — exactly ``model(video)``, in eval and in training mode (with
        ``temporal_padding="causal"``: the causal network's output, see :meth:`from_model`)."""
        self._check_config()
        frames, length, finite = self._frames(video, need_length=True)
        heads = {i: node for i, node in enumerate(self.graph.nodes) if isinstance(node, LocalNode) and node.head}
        self.engine.heads = {i: [None, 0] for i in heads}
        try:
            outputs = list(self._run(self._schedule(length, "infer", False), frames, "infer", None, None))
            accumulated = dict(self.engine.heads)
        finally:
            self.engine.heads = None
        finite.check()
        if not heads:
            return _stack(outputs, self._timed_output())
        values = {i: (acc / count if heads[i].head == "mean" else acc) for i, (acc, count) in accumulated.items()}
        stage_of = {i: k for k, nodes in enumerate(self._node_lists) for i in nodes}
        for node in self.graph.nodes:
            if node.index in values or node.timed or not any(p in values for p in node.inputs):
                continue  # streamed per frame (a time axis, or a size or split of one): not after a head
            device = self._device(stage_of[node.index])
            ins = [values[p].to(device) if isinstance(values[p], torch.Tensor) else values[p] for p in node.inputs]
            values[node.index] = node.offline(*ins)
        return values[self.graph.output]

    def _timed_output(self) -> bool:
        return self.graph.nodes[self.graph.output].timed

    # --- the engine --------------------------------------------------------------------------

    def _run(self, schedule, frames, mode, frame_loss, losses, graphs=None, stage_target=None, loss_frames=1):
        key = None
        if graphs is not None:
            key = lambda plan: (plan.phase(self.engine.lo, self.engine.hi), plan.tick % 2)
        yield from self.engine.run(schedule, frames, mode, frame_loss, losses, backend=self.backend,
                                   optimizer=self.optimizer, update=self.update, graphs=graphs,
                                   stage_target=stage_target, phase_key=key, smoothing=self.smoothing,
                                   loss_frames=loss_frames)
        self.last_ticks = self.engine.last_ticks

    def _frames(self, video: Frames, need_length: bool):
        """(iterator of checked frames [B, C, 1, H, W] on stage 0's device, T or None, a check
        of their finiteness made once the clip has run: one host sync a clip)."""
        finite = _Finite(eager=not need_length)
        if isinstance(video, torch.Tensor):
            if video.dim() == 4 and not need_length:  # stream() of one frame [B, C, H, W]
                video = video.unsqueeze(2)
            if video.dim() != 5:
                raise ValueError(f"video must be [B, C, T, H, W], got shape {tuple(video.shape)}")
            if not video.is_floating_point():
                raise TypeError(f"video must be a floating tensor, got {video.dtype}")
            stage = self._video_stage()
            conv = None if stage is None else _leading_conv(stage)
            if conv is not None and video.shape[1] != conv.in_channels == video.shape[2]:  # (surely the video's conv)
                raise ValueError(f"video must be [B, C, T, H, W] with the {conv.in_channels} channels the first conv "
                                 f"takes, got shape {tuple(video.shape)}: one in [B, T, C, H, W] order takes "
                                 ".transpose(1, 2)")
            length = video.shape[2]
            self._check_length(length)
            clip = (video[:, :, t:t + 1] for t in range(length))
            if need_length and video.device == self._device(0):
                finite.whole(video)
        elif isinstance(video, (str, bytes)) or not hasattr(video, "__iter__"):
            raise TypeError(f"video must be a tensor [B, C, T, H, W] or an iterable of frame tensors [B, C, H, W], "
                            f"got {type(video).__name__}")
        elif need_length:
            clip = list(video)
            if clip and not isinstance(clip[0], torch.Tensor):  # (before its length is judged)
                raise _not_a_frame(0, clip[0])
            length = len(clip)
            self._check_length(length)
        else:
            clip, length = video, None
        return self._checked(iter(clip), finite), length, finite

    def _checked(self, frames: Iterator, finite: "_Finite") -> Iterator[torch.Tensor]:
        first = None
        for t, f in enumerate(frames):
            first = self._check_frame(f, t, first)
            finite.add(first)
            yield first
        if first is None or t + 1 < self.min_clip_length():
            self._check_length(0 if first is None else t + 1)

    def _check_length(self, length: int) -> None:
        try:
            self.graph.lengths(length)
        except ValueError as exc:
            raise ValueError(f"a clip of {length} frames does not fit this network: {exc}") from None
        need = self.min_clip_length()
        if length < need:
            raise ValueError(f"the clip has {length} frame(s) but this pipeline needs at least {need} "
                             f"(its temporal layers output {max(self.output_length(length), 0)} frames for it)")

    def _check_frame(self, f, t: int, first: Optional[torch.Tensor]) -> torch.Tensor:
        if not isinstance(f, torch.Tensor):
            raise _not_a_frame(t, f)
        if f.dim() == 4:
            f = f.unsqueeze(2)
        if f.dim() != 5 or f.shape[2] != 1:
            raise ValueError(f"frame {t} must be [B, C, H, W] or [B, C, 1, H, W], got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"frame {t} must be a floating tensor, got {f.dtype}")
        if first is not None and (f.shape != first.shape or f.dtype != first.dtype):
            raise ValueError(f"frame {t} is {tuple(f.shape)} {f.dtype} but frame 0 was {tuple(first.shape)} "
                             f"{first.dtype}: a video's shape cannot change mid-clip")
        if first is None:
            self._check_dtype(f)
        return f.to(self._device(0))

    def _video_stage(self) -> Optional[nn.Module]:
        """Stage 0, where it runs here (it reads the video)."""
        return self.stages[0] if len(self.stages) and self.engine.lo == 0 else None

    def _check_dtype(self, frame: torch.Tensor) -> None:
        """A video whose dtype the first conv cannot take — autocast casts float32 and the 16-bit
        types where it is on, nothing else does — refused before the run, by name (it would fail
        deep in the first tick's op)."""
        stage = self._video_stage()  # (its first conv in module order: a from_model graph's stem)
        conv = None if stage is None else next((m for m in stage.modules() if isinstance(m, SidewaysConv3d)), None)
        if conv is None or frame.dtype == conv.weight.dtype:
            return
        if frame.dtype in (torch.float32, torch.float16, torch.bfloat16) and \
                torch.is_autocast_enabled(self._device(0).type):
            return
        raise TypeError(f"video is {frame.dtype} but the first stage's conv weights are {conv.weight.dtype}: cast "
                        f"the video (video.to({conv.weight.dtype})) or the model, or run under torch.autocast")

    def _snapshot(self, params):
        """What a clip changes besides .grad (weights and optimizer state with per-tick updates,
        BatchNorm running buffers), to undo a failed clip."""
        weights = [p.detach().clone() for p in params] if self.update == "tick" else None
        state = copy.deepcopy(self.optimizer.state_dict()) if self.update == "tick" else None
        buffers = [b for m in self.stages.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for b in m.buffers()]
        return weights, state, [(b, b.clone()) for b in buffers]

    def _restore(self, params, snapshot) -> None:
        weights, state, buffers = snapshot
        with torch.no_grad():
            if weights is not None:
                for p, saved in zip(params, weights):
                    p.copy_(saved)
            for b, saved in buffers:
                b.copy_(saved)
        if state is not None:
            self.optimizer.load_state_dict(state)


def _not_a_frame(t: int, f) -> TypeError:
    return TypeError(f"frame {t} of the video must be a tensor [B, C, H, W], got {type(f).__name__} (a video is a "
                     "tensor [B, C, T, H, W] or an iterable of frame tensors)")


def _autocast_state(device_type: str) -> tuple:
    """(on, dtype) of autocast for ``device_type``: what a captured tick casts to."""
    on = torch.is_autocast_enabled(device_type)
    return on, torch.get_autocast_dtype(device_type) if on else None


class _Finite:
    """Per-frame finiteness flags kept on the device, looked at once (one host sync a clip);
    ``eager``: each frame looked at as it comes (a live stream's outputs go out at once).
    :meth:`whole`: a clip already on stage 0's device is checked in one go instead — its minimum
    and maximum, which NaN and inf reach (one reduction, no temporary the clip's size as isfinite
    would make; not five kernels launched from Python every tick, outside its graph)."""

    def __init__(self, eager: bool = False):
        self.flags: list = []
        self.eager = eager
        self.video: Optional[torch.Tensor] = None

    def whole(self, video: torch.Tensor) -> None:
        self.video, self.flags = video, [torch.isfinite(torch.stack(torch.aminmax(video))).all()]

    def add(self, frame: torch.Tensor) -> None:
        if self.video is not None:  # (checked whole)
            return
        self.flags.append(torch.isfinite(frame).all())
        if self.eager:
            self.check()

    def check(self) -> None:
        if not self.flags or bool(torch.stack(self.flags).all()):
            return
        if self.video is not None:
            t = next(t for t in range(self.video.shape[2]) if not bool(torch.isfinite(self.video[:, :, t]).all()))
        else:
            t = next(t for t, ok in enumerate(self.flags) if not bool(ok))
        raise NonFiniteError(f"frame {t} of the video contains NaN or inf")


def _stack(outputs: list, timed: bool) -> torch.Tensor:
    """Per-frame outputs in time: frames [B, C, 1, H, W] concatenated at dim 2 (the clip
    forward's output), a per-frame head's outputs [B, K, ...] stacked at dim 2."""
    return torch.cat(outputs, dim=2) if timed else torch.stack(outputs, dim=2)


def _crossing_after(graph: StreamGraph, i: int) -> int:
    live = {p for j in range(i + 1, len(graph.nodes)) for p in graph.nodes[j].inputs if p <= i}
    return live.pop()


def _probe(graph: StreamGraph, model: nn.Module, example, batchnorms, by: str):
    """Each node's cost per tick (FLOPs of one emission over its rate divisor, or measured
    seconds), and whether it yields a tensor — from one clip streamed through the graph as
    a single stage, nothing changed (eval mode, no gradients)."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    first_conv = next((n.module for n in graph.nodes if isinstance(n, ConvNode)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    frames = graph.min_clip_length()
    candidates = [example] if example is not None else [
        torch.zeros(1, channels, frames, s, s, dtype=dtype, device=device) for s in (112, 224)]
    flops = [0.0] * len(graph.nodes)
    seconds = [0.0] * len(graph.nodes)
    produced = [False] * len(graph.nodes)
    engine = Engine(graph, [list(range(len(graph.nodes)))], lambda k: device)
    modes = {m: m.training for m in model.modules()}
    error = None
    for clip in candidates:
        if not isinstance(clip, torch.Tensor) or clip.dim() != 5:
            raise ValueError(f"example must be a clip [B, C, T, H, W], got {type(clip).__name__}")

        def observe(node: Node, inputs, out, took):
            if out is None:
                return
            produced[node.index] = produced[node.index] or isinstance(out, torch.Tensor)
            tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
            flops[node.index] = max(flops[node.index], node.flops(tensors, out) if isinstance(out, torch.Tensor) else 0)
            seconds[node.index] += took
        engine.observer = observe
        model.eval()
        try:
            with torch.no_grad():
                schedule = Schedule(graph, engine.stages, clip.shape[2], "infer", False)
                frames_in = (clip[:, :, t:t + 1] for t in range(clip.shape[2]))
                for _ in engine.run(schedule, frames_in, "infer", None, None):
                    pass
            error = None
            break
        except (RuntimeError, ValueError) as exc:  # e.g. frames too small for a fixed-size pool
            error = exc
        finally:
            for m, training in modes.items():
                m.train(training)
            engine.observer = None
    if error is not None:
        raise ValueError(f"from_model could not stream a probe clip through the model to measure its layers "
                         f"({error}); pass example=<a clip [B, C, T, H, W] the model takes>") from None
    rate = graph.rate
    if by == "time":
        return seconds, produced
    return [(f + 2e5) / r for f, r in zip(flops, rate)], produced

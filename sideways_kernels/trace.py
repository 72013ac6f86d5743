"""Tracing and conversion for :meth:`SidewaysPipeline.from_model`: torch.fx traces the model,
its ``nn.Conv3d`` layers become :class:`SidewaysConv3d` in place (parameters shared), and every
node is classified by what it does to the time axis:

- frame-local (elementwise, joins, spatial ops, channel ops, BatchNorm in eval mode or under a
  ``batchnorm`` policy) — applied to each frame as it comes;
- temporal convs and pools — streamed from rings, at their own rate after a stride; with
  ``temporal_padding="causal"`` their temporal padding is all on the past side (the causal form,
  refused by name where it would begin before the window's span allows);
- the pool over all remaining frames (``AdaptiveAvgPool3d`` to one frame, ``mean`` or ``amax``
  over the time axis) — the *head pool*: per frame it is the op on one frame; what follows it has
  no time axis and becomes a per-frame head;
- anything else that touches the time axis — refused, naming the node and why.

Values are tracked as *timed* (a time axis at a known dim), *pooled* (derived from a head pool:
no time axis) or *static* (parameters and constants: evaluated when used).
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import SOURCE, TEMPORAL_PADDINGS, ConvNode, FrameCounter, LocalNode, Node, PoolNode, StreamGraph, _triple
from .nn import SidewaysConv3d, convert

__all__ = ["trace_model", "StreamingError", "BATCHNORM_POLICIES"]

BATCHNORM_POLICIES = (None, "frame", "frozen")
_BN = nn.modules.batchnorm._BatchNorm


def _engine_counts(m: nn.Module) -> bool:
    """Whether the engine, not the module, counts the frames a BatchNorm updating its running
    statistics sees (``num_batches_tracked``): one add per run (``Engine.run``) instead of a
    kernel per norm per frame (15 of the ~218 launches of a converted r3d_18's busiest tick, 8 of
    81 on average, by bench/tick_model.py). Only where the
    count does not steer the update (a momentum is set; ``None`` averages by the count) and the
    forward is BatchNorm's own."""
    return (m.training and m.track_running_stats and m.momentum is not None
            and getattr(m, "num_batches_tracked", None) is not None and type(m).forward is _BN.forward)


@contextlib.contextmanager
def _uncounted(m: nn.Module):
    """``m``'s forward without its count: BatchNorm skips the add when the buffer is None."""
    counter = m.num_batches_tracked
    m.num_batches_tracked = None
    try:
        yield
    finally:
        m.num_batches_tracked = counter


class StreamingError(ValueError):
    """The model cannot stream: every node that cannot, and why."""


@dataclasses.dataclass(frozen=True)
class _Value:
    kind: str  # "timed" | "pooled" | "static" | "shape" (the shape of a timed tensor) | "tuple"
    node: Optional[int] = None  # the stream node producing it (SOURCE for the video)
    tdim: Optional[int] = None  # timed: where the time axis is
    ndim: Optional[int] = None
    head: Optional[str] = None  # pooled: the head pool it comes from


class _Tracer(fx.Tracer):
    """Keeps convs (also subclasses such as torchvision's Conv3DSimple), norms and pools whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv3d, nn.modules.conv._ConvNd, _BN, nn.modules.pooling._MaxPoolNd,
                          nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                          nn.modules.pooling._AdaptiveMaxPoolNd)):
            return True
        return super().is_leaf_module(m, qualname)


_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pos,
    operator.pow, operator.mod, operator.abs, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp,
    torch.clip, torch.neg, torch.pow, torch.maximum, torch.minimum, torch.where, torch.erf, torch.square,
    torch.sign, torch.sin, torch.cos, torch.nn.functional.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.dropout,
    F.alpha_dropout, torch.flatten, torch.cat, torch.concat, torch.stack, torch.mean, torch.sum, torch.amax,
    torch.amin, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.transpose, torch.permute,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, F.linear, F.adaptive_avg_pool3d,
    F.adaptive_max_pool3d, F.avg_pool3d, F.max_pool3d, torch.max, torch.min,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "sub", "sub_", "mul", "mul_", "div",
    "div_", "clamp", "clamp_", "clamp_min", "clamp_min_", "exp", "neg", "abs", "pow", "sqrt", "contiguous", "clone",
    "float", "double", "half", "bfloat16", "to", "type_as", "detach", "sign", "square",
}
_DIM_METHODS = {"flatten", "mean", "sum", "amax", "amin", "softmax", "log_softmax", "transpose", "permute",
                "squeeze", "unsqueeze", "chunk", "split", "size", "dim", "view", "reshape", "flip", "cumsum", "roll",
                "max", "min", "expand", "repeat"}
_INPLACE_MODULES = {
    nn.ReLU: lambda m, x: F.relu(x), nn.ReLU6: lambda m, x: F.relu6(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope), nn.ELU: lambda m, x: F.elu(x, m.alpha),
    nn.SELU: lambda m, x: F.selu(x), nn.CELU: lambda m, x: F.celu(x, m.alpha),
    nn.Hardtanh: lambda m, x: F.hardtanh(x, m.min_val, m.max_val), nn.Hardswish: lambda m, x: F.hardswish(x),
    nn.Hardsigmoid: lambda m, x: F.hardsigmoid(x), nn.SiLU: lambda m, x: F.silu(x), nn.Mish: lambda m, x: F.mish(x),
    nn.Dropout: lambda m, x: F.dropout(x, m.p, m.training), nn.AlphaDropout: lambda m, x: F.alpha_dropout(x, m.p,
                                                                                                         m.training),
    nn.Threshold: lambda m, x: F.threshold(x, m.threshold, m.value),
}
_FRAME_LOCAL_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
                        nn.Dropout, nn.AlphaDropout, nn.Threshold)
_MIXES_TIME = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
               nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _describe(fxn: fx.Node, root: nn.Module) -> str:
    if fxn.op == "call_module":
        return f"module '{fxn.target}' ({type(root.get_submodule(fxn.target)).__name__})"
    name = getattr(fxn.target, "__name__", str(fxn.target))
    return f"node '{fxn.name}' ({'method .' if fxn.op == 'call_method' else ''}{name})"


class _Refusal(Exception):
    pass


class _Builder:
    """One pass over the fx graph, building stream nodes; refusals are collected."""

    def __init__(self, root: nn.Module, graph: fx.Graph, batchnorm: Optional[str], temporal_padding: str = "same"):
        self.root, self.fx, self.batchnorm, self.temporal_padding = root, graph, batchnorm, temporal_padding
        self.values: dict[fx.Node, _Value] = {}
        self.nodes: list[Node] = []
        self.refusals: list[str] = []
        self.output: Optional[int] = None
        self.bn_nodes: list[tuple[nn.Module, str]] = []  # (BatchNorm, name) streamed as frame-local ops

    # --- evaluation helpers ------------------------------------------------------------------

    def _attr(self, target: str):
        obj = self.root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def static(self, fxn: fx.Node):
        """Value of a node that does not depend on the video (parameters, constants)."""
        args = fx.node.map_arg(fxn.args, self.static)
        kwargs = fx.node.map_arg(fxn.kwargs, self.static)
        if fxn.op == "get_attr":
            return self._attr(fxn.target)
        return self._apply(fxn, args, kwargs)

    def _apply(self, fxn: fx.Node, args, kwargs):
        if fxn.op == "call_module":
            return self.root.get_submodule(fxn.target)(*args, **kwargs)
        if fxn.op == "call_function":
            return fxn.target(*args, **kwargs)
        return getattr(args[0], fxn.target)(*args[1:], **kwargs)

    def _fn(self, fxn: fx.Node, dynamic: list[fx.Node], call=None):
        """The per-frame function of a node: its dynamic inputs are the arguments."""
        def fn(*vals):
            env = dict(zip(dynamic, vals))
            sub = lambda n: env[n] if n in env else self.static(n)
            args, kwargs = fx.node.map_arg(fxn.args, sub), fx.node.map_arg(fxn.kwargs, sub)
            return call(*args, **kwargs) if call is not None else self._apply(fxn, args, kwargs)
        return fn

    # --- the pass ------------------------------------------------------------------------------

    def build(self) -> StreamGraph:
        placeholders = [n for n in self.fx.nodes if n.op == "placeholder"]
        if not placeholders:
            raise StreamingError("the model takes no input")
        for extra in placeholders[1:]:
            if not extra.args:  # no default value
                self.refusals.append(f"input '{extra.name}': from_model streams models that take one video tensor")
        for fxn in self.fx.nodes:
            try:
                self._visit(fxn)
            except _Refusal as why:
                self.refusals.append(f"{_describe(fxn, self.root)}: {why}")
                self.values[fxn] = _Value("timed", None, 2, 5)  # go on, to report every problem at once
        if self.refusals:
            raise StreamingError("this model cannot stream:\n  " + "\n  ".join(self.refusals))
        return StreamGraph(self.nodes, self.output)

    def _visit(self, fxn: fx.Node) -> None:
        if fxn.op == "placeholder":
            if fxn is next(n for n in self.fx.nodes if n.op == "placeholder"):
                self.values[fxn] = _Value("timed", SOURCE, 2, 5)
            else:
                self.values[fxn] = _Value("static")
            return
        if fxn.op == "get_attr":
            self.values[fxn] = _Value("static")
            return
        if fxn.op == "output":
            out = fxn.args[0]
            if not isinstance(out, fx.Node) or self.values[out].kind not in ("timed", "pooled"):
                raise _Refusal("the model must return one tensor computed from the video")
            if self.values[out].node is None or self.values[out].node == SOURCE:
                raise _Refusal("the model's output is its input")
            self.output = self.values[out].node
            return
        inputs = fxn.all_input_nodes
        dynamic = list(dict.fromkeys(n for n in inputs if self.values[n].kind != "static"))
        if not dynamic:
            self.values[fxn] = _Value("static")
            return
        kinds = {self.values[n].kind for n in dynamic}
        if "timed" in kinds and "pooled" in kinds:
            pooled = next(n for n in dynamic if self.values[n].kind == "pooled")
            raise _Refusal(f"mixes per-frame values with '{self.values[pooled].head}', which pools over all frames: a "
                           "clip-level statistic used inside the clip (e.g. squeeze-excitation over (T, H, W)) "
                           "cannot stream")
        if "shape" in kinds and fxn.op == "call_function" and fxn.target is operator.getitem:
            self._shape_item(fxn)
            return
        has_time = lambda n: self.values[n].kind in ("timed", "shape") or \
            (self.values[n].kind == "tuple" and self.values[n].tdim is not None)
        if not any(has_time(n) for n in dynamic):  # after a head pool (or sizes): no time axis to mind
            self._local(fxn, dynamic, _Value("pooled", None, None, None, self._head_of(dynamic)))
            return
        if fxn.op == "call_module":
            self._module(fxn, dynamic)
        elif fxn.op == "call_function" and fxn.target is operator.getitem:
            self._getitem(fxn, dynamic)
        elif fxn.op == "call_function" and fxn.target is builtins.getattr:
            self._getattr(fxn, dynamic)
        else:
            self._function(fxn, dynamic)

    def _head_of(self, dynamic) -> Optional[str]:
        return next((self.values[n].head for n in dynamic if self.values[n].head), None)

    def _add(self, node: Node, fxn: fx.Node, value: _Value) -> None:
        node.index = len(self.nodes)
        self.nodes.append(node)
        self.values[fxn] = dataclasses.replace(value, node=node.index)

    def _inputs(self, dynamic) -> list[int]:
        out = []
        for n in dynamic:
            node = self.values[n].node
            if node is None:
                raise _Refusal("reads a value that could not be streamed (see above)")
            out.append(node)
        return out

    def _local(self, fxn, dynamic, value: _Value, *, call=None, head=None, flops=1.0, fn_no_update=None,
               module=None, frame_counter=None) -> None:
        node = LocalNode(fxn.target if fxn.op == "call_module" else fxn.name, self._inputs(dynamic),
                         module if module is not None else
                         (self.root.get_submodule(fxn.target) if fxn.op == "call_module" else None),
                         self._fn(fxn, dynamic, call), head=head, timed=value.kind == "timed", flops_per_out=flops,
                         fn_no_update=fn_no_update, frame_counter=frame_counter)
        node.tensor = value.kind in ("timed", "pooled")
        self._add(node, fxn, value)

    def _timed_input(self, fxn, dynamic) -> _Value:
        v = self.values[dynamic[0]]
        if v.kind != "timed":
            raise _Refusal(f"expects a tensor with a time axis, got a {v.kind} value")
        return v

    def _sole_consumer(self, fxn: fx.Node) -> bool:
        arg = fxn.args[0] if fxn.args else None
        return isinstance(arg, fx.Node) and len(arg.users) == 1

    # --- modules -------------------------------------------------------------------------------

    def _module(self, fxn: fx.Node, dynamic) -> None:
        m = self.root.get_submodule(fxn.target)
        v = self._timed_input(fxn, dynamic)
        if isinstance(m, SidewaysConv3d):
            self._need_ndhw(v)
            why = m.streaming_problem(temporal_stride=True)
            if why is not None:
                raise _Refusal(why)
            self._add(self._temporal(ConvNode, fxn.target, self._inputs(dynamic), m), fxn, v)
        elif isinstance(m, nn.modules.conv._ConvNd):
            if isinstance(m, nn.ConvTranspose3d) and (m.kernel_size[0], m.stride[0], m.padding[0]) == (1, 1, 0):
                self._local(fxn, dynamic, v, flops=2.0 * m.weight[0].numel())
            else:
                raise _Refusal(f"a {type(m).__name__} on a tensor with a time axis has no streaming rule here")
        elif isinstance(m, _BN):
            self._batchnorm(fxn, dynamic, m, v)
        elif isinstance(m, (nn.MaxPool3d, nn.AvgPool3d)):
            self._need_ndhw(v)
            if isinstance(m, nn.MaxPool3d) and m.return_indices:
                raise _Refusal("return_indices=True")
            k, s = _triple(m.kernel_size), _triple(m.stride if m.stride is not None else m.kernel_size)
            p = _triple(m.padding)
            if (k[0], s[0], p[0]) == (1, 1, 0):
                self._local(fxn, dynamic, v, flops=float(k[1] * k[2]))
                return
            if isinstance(m, nn.MaxPool3d):
                node = self._temporal(PoolNode, fxn.target, self._inputs(dynamic), m, kind="max", kernel=k, stride=s, padding=p,
                                dilation=_triple(m.dilation), ceil_mode=m.ceil_mode)
            else:
                node = self._temporal(PoolNode, fxn.target, self._inputs(dynamic), m, kind="avg", kernel=k, stride=s, padding=p,
                                ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                                divisor_override=m.divisor_override)
            self._add(node, fxn, v)
        elif isinstance(m, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)):
            self._need_ndhw(v)
            size_t = _triple(m.output_size)[0]
            if size_t is None:
                self._local(fxn, dynamic, v)
            elif size_t == 1:
                head = "mean" if isinstance(m, nn.AdaptiveAvgPool3d) else "max"
                self._local(fxn, dynamic, _Value("pooled", None, None, 5, fxn.target), head=head)
            else:
                raise _Refusal(f"adaptive pooling to {size_t} frames: its windows depend on the clip length")
        elif isinstance(m, tuple(_INPLACE_MODULES)) and getattr(m, "inplace", False) and self._sole_consumer(fxn):
            # in place on a per-frame sample that may be a held or buffered one: out of place, same values
            self._local(fxn, dynamic, v, call=lambda x, _m=m, _f=_INPLACE_MODULES[type(m)]: _f(_m, x))
        elif isinstance(m, _FRAME_LOCAL_MODULES):
            self._local(fxn, dynamic, v)
        elif isinstance(m, nn.Dropout3d):
            if m.training:
                raise _Refusal("Dropout3d in training mode drops a channel in every frame at once; streamed, each "
                               "frame would draw its own mask (use nn.Dropout, or eval mode)")
            self._local(fxn, dynamic, v)
        elif isinstance(m, nn.Flatten):
            self._local(fxn, dynamic, self._flatten(v, m.start_dim, m.end_dim))
        elif isinstance(m, nn.Linear):
            if v.tdim == v.ndim - 1:
                raise _Refusal("Linear over the time axis")
            self._local(fxn, dynamic, v, flops=2.0 * m.in_features)
        elif isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            self._not_time(v, m.dim, "softmax over the time axis")
            self._local(fxn, dynamic, v)
        elif isinstance(m, nn.LayerNorm):
            if v.tdim >= v.ndim - len(m.normalized_shape):
                raise _Refusal("LayerNorm over the time axis mixes frames")
            self._local(fxn, dynamic, v)
        elif isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
            raise _Refusal("normalisation over (T, H, W) mixes frames")
        elif isinstance(m, _MIXES_TIME):
            raise _Refusal("a recurrent or attention layer over time has no per-frame streaming rule")
        else:
            raise _Refusal(f"no per-frame streaming rule for {type(m).__name__} on a tensor with a time axis")

    def _temporal(self, node_cls, *args, **kwargs) -> Node:
        """A temporal conv or pool node under the run's temporal padding (refused: why that
        padding cannot stream it)."""
        try:
            return node_cls(*args, temporal_padding=self.temporal_padding, **kwargs)
        except ValueError as why:
            raise _Refusal(str(why)) from None

    def _batchnorm(self, fxn, dynamic, m: nn.Module, v: _Value) -> None:
        """Eval mode with running statistics is frame-local. Training mode: the policy — per-frame
        batch statistics ("frame": the module itself on each frame, running buffers updated per
        frame, not on the drain's held samples) or running statistics ("frozen") — checked again at
        every run (the model may be put in training mode later)."""
        def frozen(x):
            return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

        def no_update(x):
            if not m.training and m.track_running_stats:
                return m(x)
            if self.batchnorm == "frozen" and m.track_running_stats:
                return frozen(x)
            return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)

        def frame(x):
            if self.batchnorm == "frozen" and m.training and m.track_running_stats:
                return frozen(x)
            if not counter.engine:
                return m(x)
            with _uncounted(m):
                return m(x)

        counter = FrameCounter(lambda: m.num_batches_tracked if self.batchnorm != "frozen" and _engine_counts(m)
                               else None)
        self._local(fxn, dynamic, v, call=frame, flops=2.0, fn_no_update=no_update, frame_counter=counter)
        self.bn_nodes.append((m, fxn.target))

    # --- functions and methods -----------------------------------------------------------------

    def _function(self, fxn: fx.Node, dynamic) -> None:
        target, name = fxn.target, fxn.target if isinstance(fxn.target, str) else getattr(fxn.target, "__name__", "")
        method = fxn.op == "call_method"
        known = target in _ELEMENTWISE_METHODS or target in _DIM_METHODS if method else target in _ELEMENTWISE_FUNCTIONS
        values = [self.values[n] for n in dynamic]
        timed = [v for v in values if v.kind == "timed"]
        if not known:
            raise _Refusal("an op the converter does not know on a tensor with a time axis: it cannot prove it "
                           "frame-local")
        if not timed:
            raise _Refusal("uses a split of a tensor with a time axis in a way the converter does not know")
        v = timed[0]
        args = list(fxn.args)
        arg = lambda i, key, default=None: args[i] if len(args) > i else fxn.kwargs.get(key, default)
        if len({(t.tdim, t.ndim) for t in timed}) > 1:
            raise _Refusal("joins tensors whose time axes are not aligned")
        if name in ("flatten",):
            self._local(fxn, dynamic, self._flatten(v, arg(1, "start_dim", 0), arg(2, "end_dim", -1)))
        elif name in ("max", "min") and (isinstance(arg(1, "dim"), fx.Node) or len(dynamic) > 1):
            self._local(fxn, dynamic, v)  # elementwise maximum/minimum of two tensors
        elif name in ("mean", "sum", "amax", "amin", "max", "min"):
            self._reduce(fxn, dynamic, v, name, arg(1, "dim"), arg(2, "keepdim", False))
        elif name in ("cat", "concat", "stack"):
            dim = arg(1, "dim", 0)
            if name != "stack":
                self._not_time(v, dim, "concatenates along the time axis")
                self._local(fxn, dynamic, v)
            else:
                d = dim % (v.ndim + 1)
                self._local(fxn, dynamic, dataclasses.replace(v, tdim=v.tdim + (d <= v.tdim), ndim=v.ndim + 1))
        elif name in ("softmax", "log_softmax", "flip", "cumsum", "roll"):
            dims = arg(1, "dim") if name != "roll" else arg(2, "dims")
            if dims is None:
                raise _Refusal(f"{name} over every axis, time included")
            for d in (dims if isinstance(dims, (tuple, list)) else [dims]):
                self._not_time(v, d, f"{name} along the time axis")
            self._local(fxn, dynamic, v)
        elif name in ("transpose",):
            a, b = arg(1, "dim0") % v.ndim, arg(2, "dim1") % v.ndim
            t = b if v.tdim == a else a if v.tdim == b else v.tdim
            self._local(fxn, dynamic, dataclasses.replace(v, tdim=t))
        elif name in ("permute",):
            dims = args[1:] if method and len(args) > 2 else arg(1, "dims")
            dims = [d % v.ndim for d in dims]
            self._local(fxn, dynamic, dataclasses.replace(v, tdim=dims.index(v.tdim)))
        elif name in ("squeeze",):
            d = arg(1, "dim")
            if d is None:
                raise _Refusal("squeeze() without a dim would remove a frame's time axis")
            ds = [x % v.ndim for x in (d if isinstance(d, (tuple, list)) else [d])]
            if v.tdim in ds:
                raise _Refusal("squeezes the time axis")
            self._local(fxn, dynamic, dataclasses.replace(v, tdim=v.tdim - sum(x < v.tdim for x in ds),
                                                          ndim=v.ndim - len(ds)))
        elif name in ("unsqueeze",):
            d = arg(1, "dim") % (v.ndim + 1)
            self._local(fxn, dynamic, dataclasses.replace(v, tdim=v.tdim + (d <= v.tdim), ndim=v.ndim + 1))
        elif name in ("chunk", "split"):
            self._not_time(v, arg(2, "dim", 0), f"{name} along the time axis")
            self._local(fxn, dynamic, dataclasses.replace(v, kind="tuple"))
            self.nodes[-1].tensor = False
        elif name == "size":
            d = arg(1, "dim")
            if d is None or d % v.ndim == v.tdim:
                raise _Refusal("reads the number of frames, which a stream does not know")
            self._local(fxn, dynamic, _Value("size"))
            self.nodes[-1].tensor, self.nodes[-1].timed = False, False
        elif name == "dim":
            self.values[fxn] = _Value("static")
        elif name in ("view", "reshape", "expand", "repeat"):
            raise _Refusal(f"{name} of a tensor with a time axis: the converter cannot prove it keeps frames apart")
        elif name == "linear":
            if v.tdim == v.ndim - 1:
                raise _Refusal("linear over the time axis")
            self._local(fxn, dynamic, v)
        elif name in ("adaptive_avg_pool3d", "adaptive_max_pool3d"):
            size_t = _triple(arg(1, "output_size"))[0]
            if size_t == 1:
                head = "mean" if "avg" in name else "max"
                self._local(fxn, dynamic, _Value("pooled", None, None, 5, fxn.name), head=head)
            elif size_t is None:
                self._local(fxn, dynamic, v)
            else:
                raise _Refusal(f"adaptive pooling to {size_t} frames: its windows depend on the clip length")
        elif name in ("avg_pool3d", "max_pool3d"):
            self._functional_pool(fxn, dynamic, v, name, arg)
        elif method and target.endswith("_") and target[:-1] in _ELEMENTWISE_METHODS:
            if self._sole_consumer(fxn):  # in place on a sample that may be held: out of place, same values
                self._local(fxn, dynamic, v, call=lambda x, *a, _t=target[:-1], **k: getattr(x, _t)(*a, **k))
            else:
                self._local(fxn, dynamic, v)
        else:
            self._local(fxn, dynamic, v)

    def _reduce(self, fxn, dynamic, v: _Value, name: str, dim, keepdim: bool) -> None:
        if dim is None:
            raise _Refusal(f"{name} over every axis (the batch and time included)")
        dims = [d % v.ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if v.tdim in dims:
            head = {"mean": "mean", "amax": "max"}.get(name)
            if head is None:
                raise _Refusal(f"{name} over the time axis (a head pool must be a mean or amax: it then pools "
                               "whatever clip length comes)")
            ndim = v.ndim if keepdim else v.ndim - len(dims)
            self._local(fxn, dynamic, _Value("pooled", None, None, ndim, fxn.name), head=head)
            return
        if name in ("max", "min") and not isinstance(dim, (tuple, list)):
            raise _Refusal(f"{name}(dim) returns values and indices; use amax/amin")
        t = v.tdim if keepdim else v.tdim - sum(d < v.tdim for d in dims)
        self._local(fxn, dynamic, dataclasses.replace(v, tdim=t, ndim=v.ndim if keepdim else v.ndim - len(dims)))

    def _functional_pool(self, fxn, dynamic, v, name, arg) -> None:
        k = _triple(arg(1, "kernel_size"))
        s = _triple(arg(2, "stride") or k)
        p = _triple(arg(3, "padding", 0))
        if name == "max_pool3d":
            if arg(6, "return_indices", False):
                raise _Refusal("return_indices=True")
            d, ceil = _triple(arg(4, "dilation", 1)), arg(5, "ceil_mode", False)
            if (k[0], s[0], p[0]) == (1, 1, 0):
                return self._local(fxn, dynamic, v)
            node = self._temporal(PoolNode, fxn.name, self._inputs(dynamic), None, kind="max", kernel=k, stride=s, padding=p,
                            dilation=d, ceil_mode=ceil)
        else:
            if (k[0], s[0], p[0]) == (1, 1, 0):
                return self._local(fxn, dynamic, v)
            node = self._temporal(PoolNode, fxn.name, self._inputs(dynamic), None, kind="avg", kernel=k, stride=s, padding=p,
                            ceil_mode=arg(4, "ceil_mode", False), count_include_pad=arg(5, "count_include_pad", True),
                            divisor_override=arg(6, "divisor_override"))
        self._add(node, fxn, v)

    def _getitem(self, fxn, dynamic) -> None:
        v = self.values[dynamic[0]]
        index = fxn.args[1]
        if v.kind == "tuple":  # an element of chunk/split: the same time axis
            self._local(fxn, dynamic, dataclasses.replace(v, kind="timed"))
            return
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) or isinstance(i, (torch.Tensor, list)) for i in idx):
            raise _Refusal("advanced indexing of a tensor with a time axis")
        # walk the index to the dim it addresses on the time axis
        n_consume = sum(1 for i in idx if i is not None and i is not Ellipsis)
        dim, new_t, out_dim = 0, None, 0
        for i in idx:
            if i is Ellipsis:
                skip = v.ndim - n_consume
                if dim <= v.tdim < dim + skip:
                    new_t = out_dim + (v.tdim - dim)
                dim, out_dim = dim + skip, out_dim + skip
            elif i is None:
                out_dim += 1
            else:
                if dim == v.tdim:
                    if not (isinstance(i, slice) and i == slice(None)):
                        raise _Refusal("indexes the time axis")
                    new_t = out_dim
                if isinstance(i, slice):
                    out_dim += 1
                dim += 1
        if new_t is None:
            new_t = out_dim + (v.tdim - dim)
        ndim = out_dim + (v.ndim - dim)
        self._local(fxn, dynamic, dataclasses.replace(v, tdim=new_t, ndim=ndim))

    def _getattr(self, fxn, dynamic) -> None:
        v = self.values[dynamic[0]]
        if fxn.args[1] == "shape":
            self.values[fxn] = _Value("shape", self._inputs(dynamic)[0], v.tdim, v.ndim)
        elif fxn.args[1] in ("dtype", "device", "ndim"):
            self.values[fxn] = _Value("static")
        else:
            raise _Refusal(f"attribute '{fxn.args[1]}' of a tensor with a time axis")

    def _shape_item(self, fxn) -> None:
        v = self.values[fxn.args[0]]
        i = fxn.args[1]
        if not isinstance(i, int) or i % v.ndim == v.tdim:
            raise _Refusal("reads the number of frames, which a stream does not know")
        node = LocalNode(fxn.name, [v.node], None, lambda x, _i=i: x.shape[_i], timed=False)
        node.tensor = False
        self._add(node, fxn, _Value("size"))

    # --- checks --------------------------------------------------------------------------------

    def _need_ndhw(self, v: _Value) -> None:
        if v.ndim != 5 or v.tdim != 2:
            raise _Refusal(f"expects [B, C, T, H, W] with time at dim 2, got time at dim {v.tdim} of {v.ndim}")

    def _not_time(self, v: _Value, dim, why: str) -> None:
        if dim is not None and dim % v.ndim == v.tdim:
            raise _Refusal(why)

    def _flatten(self, v: _Value, start: int, end: int) -> _Value:
        start, end = start % v.ndim, end % v.ndim
        if start <= v.tdim <= end and end > start:
            raise _Refusal("flattens the time axis into other axes")
        if v.tdim > end:
            return dataclasses.replace(v, tdim=v.tdim - (end - start), ndim=v.ndim - (end - start))
        return dataclasses.replace(v, ndim=v.ndim - (end - start))


def trace_model(model: nn.Module, batchnorm: Optional[str] = None,
                temporal_padding: str = "same") -> tuple[StreamGraph, list]:
    """Convert ``model``'s Conv3d layers in place and trace it into a :class:`StreamGraph`
    whose temporal convs and pools stream with ``temporal_padding`` (``"same"``: as the model
    pads; ``"causal"``: all of it on the past side; the modules are left as they are).
    Returns (graph, [(BatchNorm module, name)] of the BatchNorms it streams). Raises
    :class:`StreamingError` listing every node that cannot stream."""
    if batchnorm not in BATCHNORM_POLICIES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_POLICIES}, got {batchnorm!r}")
    if temporal_padding not in TEMPORAL_PADDINGS:
        raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDINGS}, got {temporal_padding!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_model expects an nn.Module, got {type(model).__name__}")
    convert(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; the user needs one line
        raise StreamingError(f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                             "from_model needs a model without Python control flow on tensor values") from None
    builder = _Builder(model, graph, batchnorm, temporal_padding)
    stream = builder.build()
    return stream, builder.bn_nodes

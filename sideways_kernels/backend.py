"""Which implementation of the sideways ops the layers call: the one place that
decides. ``SIDEWAYS_BACKEND=torch|cpp|triton|cuda|auto`` or :func:`set_backend`
chooses; the default is the fastest one built for the tensors' device. On CUDA that is ``auto``:
per op and activation dtype, the backend ``dispatch.json`` names for the GPU's architecture — the
CUDA or Triton kernels, or the torch backend's cuDNN calls where those measured faster (written
from a GPU run's side-by-side timings by ``bench/gpu_report.py``; float16 takes bfloat16's where
only that was measured; until an architecture is measured: cuDNN for 16-bit, the CUDA kernels for
fp32) — among the backends built here (:func:`built_for`)."""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import types
from typing import NamedTuple, Optional

import torch

from . import forms, torch_backend
from ._loader import backends

# "auto": the default made explicit — on CUDA per op and dtype from dispatch.json (among the
# backends built); elsewhere the fastest backend built for the device.
NAMES = ("torch", "cpp", "triton", "cuda", "auto")
_override: Optional[str] = None


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every layer (``None`` returns to the environment/default)."""
    if name is not None and name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    global _override
    _override = name


def requested() -> Optional[str]:
    """The backend asked for by set_backend() or SIDEWAYS_BACKEND, if any."""
    name = _override or os.environ.get("SIDEWAYS_BACKEND") or None
    if name is not None and name not in NAMES:
        raise ValueError(f"SIDEWAYS_BACKEND must be one of {NAMES}, got {name!r}")
    return name


def resolve(device: torch.device, name: Optional[str] = None) -> str:
    """The backend used for tensors on ``device``: ``name`` if given, else the requested one,
    else the default (``auto`` on CUDA, the fastest built elsewhere); refuses one that cannot run
    there."""
    have = backends()
    name = name or requested()
    if name is None or name == "auto":
        if device.type == "cuda":
            return "auto"  # the measured choice per op, among the backends built (built_for)
        return "cpp" if have["cpp"] else "torch"
    if name == "cpp" and not have["cpp"]:
        raise RuntimeError(f"backend 'cpp' requested but the compiled library is not loaded: {have.get('cpp_error')}")
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpp' runs CPU tensors; these are on {device}")
    if name == "cuda" and not have["cuda"]:
        raise RuntimeError("backend 'cuda' requested but no CUDA kernels are built or no GPU is visible")
    if name == "triton":
        if not have["triton"]:
            raise RuntimeError("backend 'triton' requested but triton is not installed (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before starting Python")
    return name


OPS = ("ring_conv_forward", "window_input_grad", "weight_grad_accumulate", "sgd_tick_update")


def kernels(name: str) -> types.SimpleNamespace:
    """The op functions of backend ``name``, with the signatures of ``torch.ops.sideways``.
    ``cpp`` and ``cuda`` are the same dispatcher ops (the tensors' device picks the kernel).
    ``group``: where the backend runs several layers' weight updates as one launch (Triton, and
    ``auto`` where the dispatch picks Triton), a function taking ``(op, args)`` calls of the two
    weight ops and returning those it did not run, and ``groups(op, args)``, whether a call goes
    there; else None. ``group_forwards`` likewise, for several layers' forwards: a function taking
    a list of ``ring_conv_forward`` argument tuples (and optionally, per call, a chain stage's
    epilogue: ``triton.grouped_ring_conv_forwards``) and returning their outputs, and
    ``groups_forward(args)``, whether a call goes there; ``group_input_grads``, a function taking
    a list of ``window_input_grad`` argument tuples (and optionally, per call, where its result
    goes) and returning their results (grouped where they go to Triton, each other one by its op).
    ``aligned_rows``: whether the layers store rings and frames of few channels (the RGB stem's) in
    16-byte rows (``ops.aligned_channels``), as Triton's box kernels read them — not for the torch
    backend, whose fold reads a ring as one image; ``ring_image_pad(span, frame)``: the zero
    channels after each position of a layer's ring (``ops.empty_ring``'s ``image_pad``), where the
    torch backend pads that image (its RGB stem's on CUDA: then a view, not a copy a call).
    ``stage_epilogue(args)``: whether a chain stage the engine runs itself may have this forward
    run by itself, not grouped, and its epilogue in a grouped Triton launch of its own
    (``group_forwards`` does both; ``auto``: where dispatch.json's ``stage_epilogue`` says Triton)."""
    if name == "auto":
        ops = {op: _dispatched(op) for op in OPS}
        triton_ops = kernels("triton") if backends()["triton"] else None
        forward = ops["ring_conv_forward"]
        return types.SimpleNamespace(**ops, group=getattr(triton_ops, "group", None),
                                     groups=lambda op, args: ops[op].target(args) == "triton",
                                     group_forwards=_forwards_where_dispatched(
                                         forward, getattr(triton_ops, "group_forwards", None)),
                                     groups_forward=lambda args: forward.target(args) == "triton",
                                     stage_epilogue=lambda args: backends()["triton"]
                                     and _choice("stage_epilogue", args[0]) == "triton",
                                     group_input_grads=_grouped_where_dispatched(
                                         ops["window_input_grad"], getattr(triton_ops, "group_input_grads", None)),
                                     aligned_rows=False, ring_image_pad=_ring_image_pad_where_dispatched)
    if name in ("cpp", "cuda"):  # autocast-neutral in C++ (csrc/ops.cpp)
        return types.SimpleNamespace(**{op: getattr(torch.ops.sideways, op) for op in OPS}, group=None,
                                     group_forwards=None, group_input_grads=None, aligned_rows=False,
                                     ring_image_pad=_no_pad, stage_epilogue=lambda args: False)
    group = group_forwards = group_input_grads = None
    if name == "triton":
        module = importlib.import_module("sideways_kernels.triton")
        group = _autocast_neutral(module.grouped_weight_updates)
        group_forwards = _autocast_neutral(module.grouped_ring_conv_forwards)
        group_input_grads = _autocast_neutral(module.grouped_window_input_grads)
    source = torch.ops.sideways_triton if name == "triton" else torch_backend
    return types.SimpleNamespace(**{op: _autocast_neutral(getattr(source, op)) for op in OPS}, group=group,
                                 groups=lambda op, args: True, group_forwards=group_forwards,
                                 groups_forward=lambda args: True, group_input_grads=group_input_grads,
                                 aligned_rows=name == "triton",
                                 ring_image_pad=_no_pad if name == "triton" else torch_backend.ring_image_pad,
                                 stage_epilogue=lambda args: False)


def _no_pad(span: int, frame: torch.Tensor) -> int:
    return 0


def _ring_image_pad_where_dispatched(span: int, frame: torch.Tensor) -> int:
    """``auto``'s: the torch backend's pad where a ring's ops may run there (any layout serves the
    others)."""
    if not frame.is_cuda or not any("torch" in _choices(op, frame, None) for op in
                                    ("ring_conv_forward", "weight_grad_accumulate", "sgd_tick_update")):
        return 0
    return torch_backend.ring_image_pad(span, frame)


def _forwards_where_dispatched(op, grouped):
    """``auto``'s grouped forwards (``triton.grouped_ring_conv_forwards``'s arguments, per call a
    chain stage's epilogue or None): as :func:`_grouped_where_dispatched`; each call the dispatch
    sends elsewhere (cuDNN, say) by it, then the epilogues of those that are chain stages in
    Triton's grouped launch (``triton.forwards_then_epilogues``; a torch-backend forward's bias
    added there, as that backend adds it after its convolution)."""
    def alone(calls: list, stages: list) -> list:
        from . import triton as _triton
        return _triton.forwards_then_epilogues(op, calls, stages, lambda args: op.target(args) == "torch")
    return _grouped_where_dispatched(op, grouped, alone)


def _grouped_where_dispatched(op, grouped, alone=None):
    """``auto``'s grouped call of ``op`` (a list of calls' arguments and, optionally, one extra per
    call: where its result goes, or a forward's stage): the calls the dispatch sends to Triton
    through Triton's ``grouped``, the others through ``alone(calls, extras)`` (default: each by the
    dispatch, its result copied into the extra where one is given); in their order (None without
    ``grouped``)."""
    if grouped is None:
        return None
    if alone is None:
        def alone(calls: list, outs: list) -> list:
            return [op(*args) if out is None else out.copy_(op(*args)) for args, out in zip(calls, outs)]

    def run(calls: list, extras: Optional[list] = None) -> list:
        extras = extras or [None] * len(calls)
        mine = [i for i, args in enumerate(calls) if op.target(args) == "triton"]
        got = dict(zip(mine, grouped([calls[i] for i in mine], [extras[i] for i in mine]) if mine else []))
        rest = [i for i in range(len(calls)) if i not in got]
        got.update(zip(rest, alone([calls[i] for i in rest], [extras[i] for i in rest]) if rest else []))
        return [got[i] for i in range(len(calls))]
    run.__wrapped__ = getattr(grouped, "__wrapped__", grouped)
    return run


def constant_weights(name: str, layers: list, dtype: torch.dtype):
    """For a run that changes none of ``layers``' weights: the forms of each weight that the
    forward and the input gradient read on backend ``name`` (``auto``: where the dispatch sends
    activations of ``dtype``), made once for the run (:mod:`.forms`); the torch backend's for a
    layer that folds (one group, no temporal dilation), Triton's for any. The CUDA kernels keep
    their own cache (csrc)."""
    made = []
    for layer in layers:
        weight = layer.weight
        probe = torch.empty(0, dtype=dtype, device=weight.device)
        # (the frame's size is not known yet: every backend a size may take)
        key = Layer(layer.in_channels, layer.out_channels, None, tuple(layer.kernel_size[1:]), tuple(layer.stride[1:]),
                    layer.groups)
        forward, input_grad = (_choices(op, probe, key, _geometry(op, key)) if name == "auto" and weight.is_cuda
                               else {name} for op in ("ring_conv_forward", "window_input_grad"))
        folds = layer.groups == 1 and (layer.dilation[0] == 1 or layer.kernel_size[0] == 1)
        if folds and "torch" in forward | input_grad:
            made += torch_backend.forms_of(weight, dtype, "torch" in forward, "torch" in input_grad)
        if "triton" in forward | input_grad:
            made += importlib.import_module("sideways_kernels.triton").forms_of(weight, dtype, "triton" in forward,
                                                                                "triton" in input_grad)
    return forms.held(made)


class WeightUpdates:
    """A tick's weight updates, held until the tick's end and then run as few launches as the
    backend can (``kernels(...).group``): every layer's update of a tick reads only that layer's
    ring and error, and nothing later in the tick reads the weights it writes (each stage's
    forward ran before its backward, the next tick's forwards come after), so deferring them
    changes no result. A weight met a second time in a tick first runs what is held. A call the
    backend would not group (``auto``'s choice for the dtype is not Triton) runs at once, on its
    stage's stream, beside the other stages' work."""

    def __init__(self, ops: types.SimpleNamespace):
        self.ops = ops
        self.held: list = []  # (op, args)
        self._targets: set = set()

    def add(self, op: str, args: tuple) -> None:
        if not self.ops.groups(op, args):
            getattr(self.ops, op)(*args)
            return
        if id(args[0]) in self._targets:
            self.run()
        self.held.append((op, args))
        self._targets.add(id(args[0]))

    def run(self) -> None:
        held, self.held, self._targets = self.held, [], set()
        if held:
            for op, args in self.ops.group(held):
                getattr(self.ops, op)(*args)


def _autocast_neutral(fn):
    """``fn`` computing in the dtypes it is given, as the C++ ops do: under autocast the torch
    calls inside it would otherwise re-cast (a float32 ring would give a bfloat16 output)."""
    def call(*args, **kwargs):
        on = [t for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as off:
            for device_type in on:
                off.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)
    call.__name__ = call.__qualname__ = getattr(fn, "__name__", "op")
    call.__wrapped__ = fn
    return call


# --- the default on CUDA: per op and dtype, from dispatch.json ---------------------------------

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch.json")
_table: Optional[dict] = None
_chosen: dict = {}  # (op, dtype, device index, layer, geometry) -> backend name
# the argument whose dtype is the activations', by position and name in torch.ops.sideways' schemas
_ACTIVATION_ARG = {"ring_conv_forward": (0, "ring"), "window_input_grad": (0, "grad_out"),
                   "weight_grad_accumulate": (2, "grad_out"), "sgd_tick_update": (4, "grad_out")}
# where _layer reads a call's stride and groups among its positional arguments (the layers pass every one)
_STRIDE_ARG = {"ring_conv_forward": 5, "window_input_grad": 3, "weight_grad_accumulate": 5, "sgd_tick_update": 7}
_GROUPS_ARG = {"ring_conv_forward": 9, "window_input_grad": 6, "weight_grad_accumulate": 9, "sgd_tick_update": 11}


def call_geometry(op: str, args: tuple) -> Optional[tuple]:
    """A call's (stride, groups, channels) (:func:`on_measured_kernels`), or None where its
    positional ``args`` stop before groups."""
    layer = _layer(op, args)
    return None if layer is None else _geometry(op, layer)


def _geometry(op: str, layer: "Layer") -> tuple:
    """(stride, groups, channels) of ``op`` on ``layer`` as triton.box_path takes them: the output
    channels, and an input gradient's input channels per group before them."""
    channels = (layer.c_in // layer.groups, layer.c_out) if op == "window_input_grad" else (layer.c_out,)
    return layer.stride, layer.groups, channels


def table() -> dict:
    """dispatch.json: ``unmeasured`` (dtype -> backend) and ``measured`` (``sm_XY`` -> its device,
    date and ``ops``: op -> dtype -> backend)."""
    global _table
    if _table is None:
        with open(TABLE_PATH) as f:
            _table = json.load(f)
    return _table


class Layer(NamedTuple):
    """A conv as a GPU run's per-shape rows key it (``dispatch.json``'s ``shapes``, written by
    ``gpu_report.dispatch``): its channels, the positions of its input frame (B·H·W; None where
    not known yet), spatial kernel (kh, kw), spatial stride and groups. A row says which backend
    ran fastest on that very layer (the kernels a backend takes depend on all but the positions
    and the temporal taps, which only lengthen their loops — and a clip's edge passes the input
    gradient its live taps alone), so it stands for layers equal in the rest, the nearest in
    positions taken."""
    c_in: int
    c_out: int
    positions: Optional[int] = None
    kernel_hw: tuple = (3, 3)
    stride: tuple = (1, 1)
    groups: int = 1


def choose(op: str, dtype: torch.dtype, arch: str, dispatch: Optional[dict] = None,
           layer: Optional[tuple] = None) -> str:
    """``"cuda"``, ``"triton"`` or ``"torch"`` (cuDNN, where it measured fastest) for ``op`` on
    activations of ``dtype`` on a GPU of ``arch`` (e.g. ``"sm_90"``): for a ``layer``
    (:class:`Layer`, or its first three fields) the architecture measured (``shapes``), the
    fastest there at the nearest positions; else the op's measured choice for that architecture
    (over its 3x3x3 stride-1 shapes measured), else the unmeasured default;
    a dtype neither names goes to ``"cuda"``, whose binding runs every dtype (ATen beyond its own)
    or refuses it with the op's argument check."""
    dispatch = dispatch or table()
    row = _nearest_row(dispatch, op, dtype, arch, layer)
    if row is not None:
        return row["backend"]
    name = str(dtype).replace("torch.", "")
    measured = _measured(dispatch.get("measured", {}).get(arch, {}).get("ops", {}).get(op, {}), name)
    return measured or HELPERS.get(op) or dispatch["unmeasured"].get(name, "cuda")


def _measured(by_dtype: dict, dtype_name: str):
    """A measured entry's value for ``dtype_name``; float16's, where only bfloat16 was measured,
    is bfloat16's: the same kernels (cuDNN's, ours) at the same tensor-core rate."""
    return by_dtype.get(dtype_name) or (by_dtype.get("bfloat16") if dtype_name == "float16" else None)


def _rows_of(dispatch: dict, op: str, dtype: torch.dtype, arch: str, layer: Optional[tuple]) -> list:
    """An architecture's per-shape rows for ``op`` at ``layer`` (:class:`Layer`; its positions
    aside): ``{"channels": [C_in, C_out], "positions": B·H·W, "backend": ..., "kernel": [kt, kh, kw],
    "stride"}`` each (the last two 3x3x3 and 1 where absent; no run measures grouped convs)."""
    if layer is None:
        return []
    layer = Layer(*layer)
    entry = dispatch.get("measured", {}).get(arch, {})
    rows = _measured(entry.get("shapes", {}).get(op, {}), str(dtype).replace("torch.", "")) or []
    of_row = lambda s: Layer(*s["channels"], None, tuple(s.get("kernel", (3, 3, 3))[1:]), tuple(s.get("stride", (1, 1))))
    return [s for s in rows if of_row(s) == layer._replace(positions=None)]


def _nearest_row(dispatch: dict, op: str, dtype: torch.dtype, arch: str, layer: Optional[tuple]) -> Optional[dict]:
    """Of :func:`_rows_of`, the one measured at the positions nearest ``layer``'s (the first where
    it names none)."""
    rows = _rows_of(dispatch, op, dtype, arch, layer)
    if not rows:
        return None
    positions = Layer(*layer).positions or rows[0]["positions"]
    return min(rows, key=lambda s: abs(math.log(s["positions"] / max(positions, 1))))


# What runs a choice whose backend is not built here (no nvcc at install: no CUDA kernels; no
# Triton): the CUDA kernels' exact fp32 in Triton's exact fp32, else cuDNN; Triton's 16-bit in
# cuDNN, which every GPU run measured faster than the CUDA kernels at every op (bench/RESULTS.md).
_STAND_INS = {"cuda": ("triton", "torch"), "triton": ("torch",)}


def built_for(name: str) -> str:
    """``name`` (a backend the dispatch chose) if it is built here, else its stand-in."""
    have = backends()
    return next(n for n in (name, *_STAND_INS.get(name, ())) if n == "torch" or have.get(n))


# Parts of the ops measured on their own, and their choice until a GPU run has measured them: the
# bias gradient (the error's sum over b, h, w) in ATen or Triton (``bias_grad``); a chain stage's
# epilogue (bias, ReLU, pool, their backwards) after a cuDNN forward: ATen's per stage through
# autograd ("torch"), or the engine running the stage with every such stage's epilogue in one
# Triton launch ("triton": ``stage_epilogue``, measured end to end).
HELPERS = {"bias_grad": "torch", "stage_epilogue": "torch"}


def bias_grad(grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias gradient of a conv whose output error is ``grad_out`` [B, C, H, W], in ``dtype``:
    on CUDA, Triton's column sum (:func:`sideways_kernels.triton.bias_grad`) where dispatch.json
    measured it faster for the error's dtype on this architecture (not when the torch backend was
    asked for by name: that is ATen throughout), else ATen's sum (its column reduction: 14.5% of
    C3D's GPU time per clip on the H100, 2026-11-28)."""
    if (grad_out.is_cuda and requested() != "torch" and backends()["triton"]
            and _choice("bias_grad", grad_out) == "triton"):
        return importlib.import_module("sideways_kernels.triton").bias_grad(grad_out).to(dtype)
    return grad_out.sum((0, 2, 3), dtype=dtype)


def _choice(op: str, t: torch.Tensor, layer: Optional[Layer] = None, geometry: Optional[tuple] = None) -> str:
    """:func:`measured_choice` for ``op`` on CUDA activations like ``t`` among the backends built,
    made once per dtype, device, layer and geometry."""
    key = (op, t.dtype, t.device.index, layer, geometry)
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = measured_choice(op, t, _arch(t.device), layer, geometry)
    return name


def measured_choice(op: str, t: torch.Tensor, arch: str, layer: Optional[Layer] = None,
                    geometry: Optional[tuple] = None, built=None) -> str:
    """The backend a call of ``op`` runs on for activations like ``t`` on a GPU of ``arch``, of a
    ``layer`` (:class:`Layer`) and ``geometry`` (:func:`call_geometry`), among the backends
    ``built`` (default :func:`built_for`): the fastest a GPU run measured at the layer itself,
    where it did (its row timed the very kernels the call takes); else the op's choice on the
    kernels measured (:func:`on_measured_kernels`)."""
    built = built or built_for
    row = _nearest_row(table(), op, t.dtype, arch, layer)
    if row is not None and built(row["backend"]) == row["backend"]:
        return row["backend"]
    return on_measured_kernels(built(row["backend"] if row else choose(op, t.dtype, arch)), t, arch, geometry)


def on_measured_kernels(name: str, t: torch.Tensor, arch: str, geometry: Optional[tuple]) -> str:
    """``name``, or cuDNN where that is Triton and Triton would run a call of ``geometry``
    (stride, groups, the channel counts ``triton.box_path`` checks; activations like ``t``) on its
    general kernels on a GPU of ``arch`` with TMA: GPU runs time the box kernels there (every
    stride-1 aligned layer shape bench_gpu.py measures takes them), so the op's measured Triton
    choice says nothing of its general kernels (a strided, grouped or unaligned conv), which
    only a run's row of that layer itself (:func:`measured_choice`) has timed against cuDNN."""
    if name != "triton" or geometry is None or int(arch[3:]) < 90:
        return name
    stride, groups, channels = geometry
    box = importlib.import_module("sideways_kernels.triton").box_path(t.device, t.dtype, stride, groups, channels, ())
    return name if box is None else "torch"


def _choices(op: str, t: torch.Tensor, layer: Optional[Layer], geometry: Optional[tuple] = None) -> set:
    """Every backend ``op`` may run on for CUDA activations like ``t`` in ``layer`` (:class:`Layer`,
    its frame's size not known yet; None: any) of ``geometry`` (:func:`on_measured_kernels`): each
    measured row's of the layer at any positions, else the op's choice."""
    rows = _rows_of(table(), op, t.dtype, _arch(t.device), layer)
    return {_choice(op, t, Layer(*layer)._replace(positions=s["positions"]), geometry) for s in rows} or \
        {_choice(op, t, None, geometry)}


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _layer(op: str, args: tuple) -> Optional[Layer]:
    """The :class:`Layer` of a call of ``op`` with positional ``args``, or None where they stop
    before groups (the layers pass every one)."""
    if len(args) <= _GROUPS_ARG[op]:
        return None
    stride, groups = tuple(args[_STRIDE_ARG[op]]), args[_GROUPS_ARG[op]]
    if op == "ring_conv_forward":  # (ring [R, B, C, H, W], frame, slot, weight, ...)
        _, b, c, h, w = args[0].shape
        weight = args[3]
    elif op == "window_input_grad":  # (grad_out [B, C_out, H', W'], weight, input_size, ..., groups)
        weight, (h, w) = args[1], args[2]
        b, c = args[0].shape[0], weight.shape[1] * groups
    else:
        weight, ring = (args[0], args[3]) if op == "weight_grad_accumulate" else (args[0], args[5])
        _, b, c, h, w = ring.shape
    return Layer(c, weight.shape[0], b * h * w, tuple(weight.shape[3:]), stride, groups)


def _dispatched(op: str):
    kernels_of = {}  # backend name -> its op (made at the first call sent there: only built ones are)
    index, arg_name = _ACTIVATION_ARG[op]

    def target(args: tuple, kwargs: Optional[dict] = None) -> str:
        """The backend this op runs on for a call with these arguments: by the activations' dtype,
        the layer's shape where the dispatch measured its channels, and the kernels measured."""
        t = args[index] if len(args) > index else kwargs[arg_name]
        layer = _layer(op, args)
        return _choice(op, t, layer, None if layer is None else _geometry(op, layer))

    def call(*args, **kwargs):
        name = target(args, kwargs)
        if name not in kernels_of:
            kernels_of[name] = getattr(kernels(name), op)
        return kernels_of[name](*args, **kwargs)
    call.__name__ = call.__qualname__ = op
    call.target = target
    return call

"""CUDA-graph ticks (``SidewaysPipeline(..., cuda_graph=True)``): a steady-state tick — a real
frame entering, every stage past its fill — launches the same kernels on the same buffers as
every other tick of the same *phase*: its plan without the frame numbers (which nodes fire,
ring and FIFO slots, which errors are due; :mod:`sideways_kernels.schedule`) and the double
buffers' parity. So one graph is captured per phase, the second time the phase comes round
(after one eager warm-up tick), and replayed from then on; fill and drain ticks run eagerly.

What makes a replay right: every tensor a tick reads or writes lives across ticks at a fixed
address — the layers' rings, the joins' FIFO slots, the waiting errors, the pipeline's double
buffers, a staged copy of the input frame and of the frame's target, the optimizer's momentum
buffers and, with ``update="clip"``, gradient buffers owned here (the clip's gradients are
copied out at its end) — and the addresses are part of the key. The plan says everything a
tick's Python decides, so a replay leaves nothing undone. Anything baked into a capture
(hyper-parameters, the loss function, the parameters' storage, the clip length) is part of the
clip signature; a change drops the graphs.

Where a graph is impossible (not one CUDA device, ``mode="bp"``, a distributed pipeline, a
target that is not a tensor, a capture that fails) the pipeline warns once and ticks eagerly.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch

__all__ = ["TickGraphs"]


class _CudaGraph:
    """One captured tick: ``capture`` records ``fn`` and runs it once (as a replay)."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()
        self.outputs = None

    def capture(self, fn: Callable, restore: Callable):
        # The capture runs fn's Python (not its kernels) on a side stream; the replay runs them.
        with torch.cuda.graph(self.graph):
            self.outputs = fn()
        self.graph.replay()
        return self.outputs

    def replay(self, restore: Callable):
        self.graph.replay()
        return self.outputs


class _EmulatedGraph:
    """The CPU stand-in the tests use: a replay re-runs the captured call with the Python
    state of the capture (gradient references), as a real graph replays what was baked into it,
    and then puts back the Python state the pipeline keeps."""

    def __init__(self):
        self.fn, self.baked = None, None

    def capture(self, fn: Callable, restore: Callable):
        self.fn, self.baked = fn, restore()
        restore(self.baked)
        return fn()

    def replay(self, restore: Callable):
        now = restore()
        restore(self.baked)
        try:
            return self.fn()
        finally:
            restore(now)


def _no_cast_cache():
    """Autocast as it is, minus its cache of cast weights: a capture must record the casts (the
    cache would bake in a copy made before the capture, stale once the weights change, and
    freed when the outermost autocast exits)."""
    on = [t for t in ("cuda", "cpu") if torch.is_autocast_enabled(t)]
    stack = contextlib.ExitStack()
    for device_type in on:
        stack.enter_context(torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                                           cache_enabled=False))
    return stack


class TickGraphs:
    """The graphs of one pipeline, keyed by phase, valid for one clip signature."""

    def __init__(self, emulate: bool = False):
        self.emulate = emulate
        self.graphs: dict = {}  # phase -> graph, or None after the warm-up tick of that phase
        self.signature = None
        self.failed: Optional[str] = None  # why capturing failed: the pipeline runs eagerly from then on
        self.warned: set = set()
        self._grads: dict = {}  # parameter -> its gradient buffer (update="clip")
        self._staged: dict = {}  # name -> buffer of a staged input (frame, target)
        self.captures = self.replays = 0

    # --- when ---------------------------------------------------------------------------------

    def why_not(self, devices: list, mode: str, distributed: bool, target) -> Optional[str]:
        """Why this clip cannot tick in graphs, or None."""
        if self.failed:
            return self.failed
        if not self.emulate and (devices[0].type != "cuda" or any(d != devices[0] for d in devices)):
            return f"every stage must be on one CUDA device (stages on {sorted({str(d) for d in devices})})"
        if mode != "sideways":
            return f"mode={mode!r} keeps the whole clip's autograd graph; only Sideways ticks repeat"
        if distributed:
            return "a distributed pipeline exchanges messages every tick"
        if not isinstance(target, torch.Tensor):
            return f"the target is a {type(target).__name__}, not a tensor that can be staged"
        return None

    def warn(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"cuda_graph=True but {reason}: the ticks run eagerly", RuntimeWarning, stacklevel=4)

    def begin_clip(self, signature: tuple) -> None:
        if signature != self.signature:
            self.graphs.clear()
            self.signature = signature

    # --- static buffers ---------------------------------------------------------------------------

    def stage(self, name: str, value: torch.Tensor, device) -> torch.Tensor:
        """``value`` copied into the buffer ``name`` (kept while its shape and dtype do)."""
        buf = self._staged.get(name)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != torch.device(device):
            buf = self._staged[name] = torch.empty(value.shape, dtype=value.dtype, device=device)
        return buf.copy_(value)

    def grad_buffers(self, params: list) -> None:
        """Give every parameter its fixed, zeroed gradient buffer (update="clip")."""
        for p in params:
            buf = self._grads.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = self._grads[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                buf.zero_()
            p.grad = buf

    # --- a tick ------------------------------------------------------------------------------------

    def run(self, phase, fn: Callable, python_state: Callable):
        """Run the tick ``fn`` (whose results are fixed tensors) through the graph of ``phase``:
        eagerly the first time (warm-up), captured the second, replayed after that.
        ``python_state()`` returns the Python state a tick changes, ``python_state(s)`` sets it
        (everything else a tick needs comes from its plan, part of the phase)."""
        phase = (phase, tuple(b.data_ptr() for b in self._staged.values()))
        if phase not in self.graphs:
            self.graphs[phase] = None
            return fn()
        graph = self.graphs[phase]
        if graph is not None:
            out = graph.replay(python_state)
            self.replays += 1
            return out
        graph = _EmulatedGraph() if self.emulate else _CudaGraph()
        before = python_state()
        try:
            with _no_cast_cache():
                out = graph.capture(fn, python_state)
        except Exception as exc:  # e.g. a kernel that syncs with the host; nothing ran yet
            python_state(before)
            self.failed = f"capturing a tick failed ({type(exc).__name__}: {exc})"
            self.graphs.clear()
            self.warn(self.failed)
            return fn()
        self.graphs[phase] = graph
        self.captures += 1
        return out

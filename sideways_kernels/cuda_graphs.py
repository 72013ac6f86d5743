"""CUDA-graph ticks (``SidewaysPipeline(..., cuda_graph=...)``, on by default where every stage
is on one CUDA device): every tick of a clip — fill and drain ticks as well as steady ones —
launches the same kernels on the same buffers as the tick of the same *phase* in the next clip
of the same length: its plan without the frame numbers (which nodes fire, ring and FIFO slots,
which errors are due; :mod:`sideways_kernels.schedule`), the double buffers' parity, and the
Python state a tick reads (which gradients and momentum buffers exist, which rings a first
firing zeroes). So one graph is captured per phase, the second time the phase comes round
(the first run of a phase is the eager warm-up: lazily allocated buffers, library handles,
autotuning), and replayed from then on. A clip's first ticks are all new phases, so the first
clip warms up, the second captures, the third replays; a phase that repeats within a clip (a
chain's steady state) replays within the second clip already.

What makes a replay right: every tensor a tick reads or writes lives across ticks at a fixed
address — the layers' rings, the joins' FIFO slots, the waiting errors, the pipeline's double
buffers, a staged copy of the input frame and of the frame's target, the optimizer's momentum
buffers and, with ``update="clip"``, gradient buffers owned here — and a graph is replayed only
while those addresses are the ones it was captured on (else it is captured again). A capture
that allocates one of them (a first use) keeps its results but not its graph. After a replay
the Python state is set to what the capture left (``Engine.python_state``). Anything baked
into a capture (hyper-parameters, the loss function, the parameters' storage, the clip length)
is part of the clip signature; a change drops the graphs.

Memory: all graphs of a pipeline allocate from one shared memory pool, so the graphs together
hold about one tick's temporaries (not one per phase): no two of them run at once, nothing
one leaves behind is read by another (a tick's outputs are copied out before the next replay,
and what lives across ticks is allocated outside the captures).

Where a graph is impossible (not one CUDA device, ``mode="bp"``, a distributed pipeline, a
target that is not a tensor, smoothing) the pipeline ticks eagerly — saying why once when
``cuda_graph=True`` was asked for, silently by default. A capture that fails (a host sync in
a node or the loss function) warns once, naming what the tick was running, and the pipeline
ticks eagerly from then on.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from typing import Callable, Optional

import torch

__all__ = ["TickGraphs"]


class _CudaGraph:
    """One captured tick: ``capture`` records ``fn`` and runs it once (as a replay). ``pool``: the
    memory pool shared by every graph of the pipeline."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.outputs = None

    def capture(self, fn: Callable, restore: Callable):
        # The capture runs fn's Python (not its kernels) on a side stream; the replay runs them.
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.outputs = fn()
        self.graph.replay()
        return self.outputs

    def replay(self, restore: Callable):
        self.graph.replay()
        return self.outputs


class _EmulatedGraph:
    """The CPU stand-in the tests use: a replay re-runs the captured call with the Python
    state of the capture (gradient references, ring flags), as a real graph replays what was
    baked into it, and then puts back the Python state as it was before the replay (a real
    replay runs no Python; the pipeline then sets the state the capture left). Like a real
    replay it returns the capture's own output tensors, rewritten with the new values: a caller
    that keeps one past the next replay sees it change, as on a GPU."""

    def __init__(self):
        self.fn, self.baked, self.outputs = None, None, None

    def capture(self, fn: Callable, restore: Callable):
        self.fn, self.baked = fn, _weak(restore())  # (a real graph holds no Python reference either)
        self.outputs = fn()
        return self.outputs

    def replay(self, restore: Callable):
        now = restore()
        restore(_strong(self.baked))
        try:
            new = self.fn()
            with torch.no_grad():
                _rewrite(self.outputs, new)
        finally:
            restore(now)
        return self.outputs


def _rewrite(captured, new) -> None:
    """Copy ``new`` into ``captured``, tensor by tensor (nested lists and tuples); a replay whose
    outputs are not those of its capture (other tensors' shapes, another structure) would have
    replayed other kernels on a GPU: an error."""
    if isinstance(captured, torch.Tensor) and isinstance(new, torch.Tensor) and captured.shape == new.shape:
        if new is not captured:
            captured.copy_(new)
    elif isinstance(captured, (list, tuple)) and type(new) is type(captured) and len(new) == len(captured):
        for c, n in zip(captured, new):
            _rewrite(c, n)
    elif not (captured is None and new is None):
        raise RuntimeError(f"an emulated replay returned {type(new).__name__} where its capture returned "
                           f"{type(captured).__name__}: a GPU replay would have run other kernels")


def _weak(state):
    """``state`` (nested lists and tuples) with its tensors as weak references: what a graph keeps
    must not keep a gradient buffer from being taken back (``TickGraphs.grad_buffers``)."""
    if isinstance(state, torch.Tensor):
        return weakref.ref(state)
    if isinstance(state, (list, tuple)):
        return type(state)(_weak(s) for s in state)
    return state


def _strong(state):
    if isinstance(state, weakref.ref):
        return state()
    if isinstance(state, (list, tuple)):
        return type(state)(_strong(s) for s in state)
    return state


class _Captured:
    """A graph, the addresses it was captured on, and the Python state its capture left."""

    def __init__(self, graph, addresses: tuple, after):
        self.graph, self.addresses, self.after = graph, addresses, after


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


def _unshared(buf: torch.Tensor) -> bool:
    """Nothing but TickGraphs' table holds ``buf`` (no Python reference, .grad or view)."""
    try:
        views = torch._C._storage_Use_Count(buf.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return False
    return sys.getrefcount(buf) <= 4 and views <= 2  # the table, the caller, this argument, getrefcount; buf, untyped_storage()


class TickGraphs:
    """The graphs of one pipeline, keyed by phase, valid for one clip signature."""

    def __init__(self, emulate: bool = False, asked: bool = True):
        self.emulate = emulate
        self.asked = asked  # cuda_graph=True (say why when graphs are impossible); else the default: silent
        self.graphs: dict = {}  # key -> _Captured, or None once warmed up (run eagerly once)
        self.signature = None
        self.failed: Optional[str] = None  # why capturing failed: the pipeline runs eagerly from then on
        self.warned: set = set()
        self._grads: dict = {}  # parameter -> its gradient buffer (update="clip")
        self._staged: dict = {}  # name -> buffer of a staged input (frame, target)
        self._pool = None  # the memory pool every graph allocates from (CUDA)
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

    def warn(self, reason: str, failure: bool = False) -> None:
        """Say ``reason`` once: always for a failed capture, else when cuda_graph=True was asked for."""
        if reason in self.warned or not (failure or self.asked):
            return
        self.warned.add(reason)
        what = "cuda_graph=True but" if self.asked else "CUDA graphs (on by default; cuda_graph=False turns them off):"
        warnings.warn(f"{what} {reason}: the ticks run eagerly", RuntimeWarning, stacklevel=4)

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

    def grad_buffers(self, params: list, stashed: list) -> None:
        """Give every parameter a fixed, zeroed gradient buffer (update="clip"): the one it got
        last clip — handed over as its ``.grad`` at the clip's end, not copied — once nobody
        holds it any more (the optimizer's ``zero_grad()`` set ``.grad`` to None); else a new one
        (graphs then capture again on it). ``stashed``: the gradients the clip adds to."""
        for p, kept in zip(params, stashed):
            buf = self._grads.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device \
                    or kept is buf or not _unshared(buf):
                buf = self._grads[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                buf.zero_()
            p.grad = buf

    # --- a tick ------------------------------------------------------------------------------------

    def held_bytes(self) -> int:
        """Bytes kept here across clips: the staged frame and target, the gradient buffers."""
        return sum(t.untyped_storage().nbytes() for t in [*self._staged.values(), *self._grads.values()])

    def run(self, phase, fn: Callable, engine):
        """Run the tick ``fn`` (whose results are fixed tensors) through the graph of ``phase``:
        eagerly the first time (warm-up), captured the second, replayed after that while what it
        was captured on is where it was (``engine.addresses()``, the staged inputs); else captured
        again. The key is ``phase`` and ``engine.state_key`` of the Python state.
        ``engine.python_state()`` / ``engine.python_state(s)`` gets and sets the Python state a
        tick changes: a replay leaves it as the capture did."""
        before = engine.python_state()
        key = (phase, engine.state_key(before))
        if key not in self.graphs:
            self.graphs[key] = None
            return fn()
        where = self._addresses(engine)
        captured = self.graphs[key]
        if captured is not None and captured.addresses == where:
            out = captured.graph.replay(engine.python_state)
            engine.python_state(_strong(captured.after))
            self.replays += 1
            return out
        if not self.emulate and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = _EmulatedGraph() if self.emulate else _CudaGraph(self._pool)
        engine.at = "the tick's start"
        try:
            with _no_cast_cache():
                out = graph.capture(fn, engine.python_state)
        except Exception as exc:  # e.g. a kernel that syncs with the host; the Python that ran is undone
            engine.python_state(before)
            self.failed = f"capturing a tick failed at {engine.at} ({type(exc).__name__}: {exc})"
            self.graphs.clear()
            self.warn(self.failed, failure=True)
            return fn()
        if self._addresses(engine) != where:  # the capture allocated a buffer: its results stand, not its graph
            self.graphs[key] = None
            return out
        self.graphs[key] = _Captured(graph, where, _weak(engine.python_state()))
        self.captures += 1
        return out

    def _addresses(self, engine) -> tuple:
        return engine.addresses(), tuple(b.data_ptr() for b in self._staged.values())

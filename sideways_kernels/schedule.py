"""The clocks (DESIGN.md §5): which node fires at which tick on which sample, computed ahead
of the tensors. The engine only carries out what a :class:`TickPlan` says, so the tick count
is known before a clip runs (processes running part of the pipeline stop on time), and a
plan's :attr:`~TickPlan.phase` — everything about a tick except the frame numbers — keys its
CUDA graph.

Timing. Frame ``t`` enters at tick ``t``; after the clip the source keeps sending *held*
samples (the last frame again: the clip's end is zero padding only for the layers that pad,
which push zeros for them), so the end padding's outputs come out and every node keeps a
current state while the errors drain. Within a tick a sample passes through every node of a
stage that it reaches; a stage's output reaches the next stage one tick later.

Errors (Sideways mode). An error reaching a node goes through the Jacobian of that node's
*current* state and on to the node's input at once: a temporal conv or pool sums its window's
gradients onto the sample that arrived now (a ConvNode those of the taps that read a sample of
the clip: a padding tap's, which backprop drops, is dropped too; a chain stage's layers send
every tap's), a join's held sample hands its gradient to the
newest sample of that input. Where that producer did not fire this tick (it runs at a slower
rate or another phase), the error waits on its output and goes through the producer's next
firing instead; an error from the stage above waits likewise for the stage's output. On a
static video every window, held sample and current state holds the same frame, so this is the
exact gradient (oracle 4); errors cross a stage boundary in one tick, as activations do.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Sequence

from .graph import SOURCE, ChainNode, ConvNode, PoolNode, StreamGraph
from .nn import ZEROS

__all__ = ["Step", "StagePlan", "TickPlan", "Schedule", "Problem"]

INF = math.inf
LOSS = "loss"


@dataclasses.dataclass(frozen=True)
class Step:
    """What one node does at a tick. ``fire``: it runs on input sample ``m`` (else it only
    stores arrivals); ``emit``: the output sample it emits (None: none this tick); ``valid``:
    that sample is part of the clip's output (not a drain sample); ``work``: the node kind's
    own instructions (ring action and slot, pool taps, …); ``inputs``: per input, "new" (it
    arrived now) or ("held", fifo slot, producer fired now); ``stores``: (input, fifo slot) of
    arrivals kept for a later firing."""
    node: int
    fire: bool
    m: Optional[int] = None
    emit: Optional[int] = None
    valid: bool = False
    work: object = None
    inputs: tuple = ()
    stores: tuple = ()
    stored: tuple = ()  # the sample index of each store (the schedule's bookkeeping, not part of the phase)

    def phase(self) -> tuple:
        return (self.node, self.fire, self.emit is not None, self.valid, self.work, self.inputs, self.stores)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage at one tick: ``arrive``: the input sample it gets (from below or the
    source); ``steps``; ``out``: the output sample it sends up (index, valid) or None;
    ``loss``: the output frame whose loss it computes (top stage); ``takes_error``: an error
    from above arrives; ``roots``: producers whose waiting error goes through them now;
    ``backward``: it back-propagates this tick; ``sends_error``: an error goes down.
    ``arrive_real``: the arriving sample is one of the clip's (else a held one: the stage uses
    its own copy of the last real one, kept when ``keep_arrival``)."""
    arrive: Optional[int]
    steps: tuple
    out: Optional[tuple]
    loss: Optional[int] = None
    takes_error: bool = False
    roots: tuple = ()
    backward: bool = False
    sends_error: bool = False
    queued: tuple = ()  # producers of this stage with an error waiting from an earlier tick
    arrive_real: bool = False
    keep_arrival: bool = False
    traversed: frozenset = frozenset()  # nodes the backward goes through (bookkeeping, not in the phase)

    def phase(self) -> tuple:
        return (self.arrive is not None, tuple(s.phase() for s in self.steps),
                None if self.out is None else self.out[1], self.loss is not None, self.takes_error, self.roots,
                self.backward, self.sends_error, self.queued, self.arrive_real, self.keep_arrival)


@dataclasses.dataclass(frozen=True)
class TickPlan:
    tick: int
    stages: tuple  # StagePlan per stage
    steady: bool  # a real frame enters and every stage is past its fill (CUDA graphs capture every tick)

    def phase(self, lo: int = 0, hi: Optional[int] = None) -> tuple:
        return tuple(s.phase() for s in self.stages[lo:hi])


@dataclasses.dataclass(frozen=True)
class Problem:
    """One convolution GEMM of a tick, as a grouped executor would take it from the plan: the
    ``op`` ("forward", "input_grad" or "weight") of SidewaysConv3d ``layer`` (its index among
    the node's layers: a chain stage has several) of graph node ``node`` in ``stage``, on the
    ring whose newest frame is in ``slot`` (a forward first puts ``action`` there: the arriving
    frame, zeros or nothing). ``wave``: how many problems of the same op must finish before it
    within the tick — a stage's layers feed each other within a tick (the forward from the
    stage's input up, the backward from its output down), while the stages of a tick are
    independent. So a grouped executor needs 1 + max wave launches per op kind. The error a
    backward problem reads is the gradient at the layer's output this tick."""
    stage: int
    node: int
    layer: int
    op: str
    slot: int
    action: str = ""
    wave: int = 0


class Schedule:
    """The plans of one run: ``graph`` cut into ``stages`` (node indices, topological order),
    ``frames`` in the clip (``inf`` for a live stream until :meth:`end` says), ``mode``
    ("sideways", "bp" or "infer") and whether frames get a loss (``training``)."""

    def __init__(self, graph: StreamGraph, stages: Sequence[Sequence[int]], frames: float, mode: str,
                 training: bool):
        self.graph, self.stages, self.mode, self.training = graph, [list(s) for s in stages], mode, training
        self.frames = frames
        self.stage_of = {i: k for k, nodes in enumerate(self.stages) for i in nodes}
        # the producer whose samples enter each stage: the video, or the node the cut below crosses
        self.inputs = [SOURCE] + [self._crossing(k) for k in range(1, len(self.stages))]
        self.outputs = [self.inputs[k + 1] for k in range(len(self.stages) - 1)] + [graph.output]
        self.depth: dict = {}  # (node, input) -> FIFO slots, from a dry run
        self._plans, self._plans_for = None, None
        self._lengths = graph.lengths(frames)
        self.depth = self._measure_depths()

    def _crossing(self, k: int) -> int:
        first = self.stages[k][0]
        crossing = {p for i in range(first, len(self.graph.nodes)) for p in self.graph.nodes[i].inputs if p < first}
        if len(crossing) != 1:
            raise ValueError(f"stage {k} is fed by {len(crossing)} values; a stage boundary must cross one tensor")
        return crossing.pop()

    def end(self, frames: int) -> None:
        """A live stream ended after ``frames`` frames."""
        self.frames = frames
        self._lengths = self.graph.lengths(frames)

    def length(self, p: int) -> float:
        return self.frames if p == SOURCE else self._lengths[p]

    def out_frames(self) -> float:
        """Samples the output node emits for the clip (the frames the clip forward outputs)."""
        return self.length(self.graph.output)

    def _measure_depths(self) -> dict:
        """FIFO slots each join input needs: the most samples it holds at once, from a dry run
        of this clip (a live stream: of a clip long enough to reach the steady state)."""
        frames = self.frames
        if frames == INF:
            g = self.graph
            self.end(max(g.min_clip_length(), 2 * max(g.lag) + 8 * max(g.rate) + 16))
        depth: dict = {}
        try:
            for _ in self._simulate(depth, measure=True):
                pass
        finally:
            self.frames, self._lengths = frames, self.graph.lengths(frames)
        return {key: max(d, 1) for key, d in depth.items()}

    def __iter__(self) -> Iterator[TickPlan]:
        if self.frames == INF:  # a live stream: planned tick by tick (forward only: nothing to prune)
            return self._simulate(self.depth, measure=False)
        if self._plans is None or self._plans_for != self.frames:
            self._plans = self._prune(list(self._simulate(self.depth, measure=False)))
            self._plans_for = self.frames
        return iter(self._plans)

    def total_ticks(self) -> int:
        return sum(1 for _ in self)

    def problems(self, plan: TickPlan) -> list[Problem]:
        """Every convolution GEMM ``plan`` makes the engine launch (in Sideways training): each
        SidewaysConv3d that computes an output this tick (a chain stage runs all its layers, a
        graph conv when its window completes) its forward; each layer the tick's backward goes
        through its weight update, and its input gradient where its input carries a gradient
        (not the video's frames). ``wave`` orders the dependent ones within a stage."""
        graph, out = self.graph, []
        for k, sp in enumerate(plan.stages):
            fired = {st.node: st for st in sp.steps if st.fire}
            before: dict = {}  # node -> forward convs on the longest path up to its output, this tick
            grads: dict = {self.inputs[k]: k > 0}  # does the node's output carry a gradient
            for c in self.stages[k]:
                node = graph.nodes[c]
                ins = [p for p in node.inputs]
                depth = max((before.get(p, 0) for p in ins), default=0)
                grads[c] = any(grads.get(p, False) for p in ins) or any(
                    p.requires_grad for m in node.modules() for p in m.parameters())
                step = fired.get(c)
                if step is None:
                    before[c] = depth
                    continue
                if isinstance(node, ChainNode):
                    for i, (action, slot) in enumerate(step.work):
                        out.append(Problem(k, c, i, "forward", slot, action, depth + i))
                    before[c] = depth + len(node.layers)
                elif isinstance(node, ConvNode) and step.work[2]:
                    out.append(Problem(k, c, 0, "forward", step.work[1], step.work[0], depth))
                    before[c] = depth + 1
                else:
                    before[c] = depth
            if not (self.mode == "sideways" and self.training and sp.backward):
                continue
            after: dict = {}  # node -> backward convs between the tick's roots and its output
            for c in reversed(self.stages[k]):
                if c not in sp.traversed:
                    continue
                node = graph.nodes[c]
                depth = max((after[d] for d in graph.consumers[c] if d in after), default=0)
                layers = node.layers if isinstance(node, ChainNode) else [node.module] if isinstance(node, ConvNode) \
                    else []
                step = fired[c]
                slots = [slot for _, slot in step.work] if isinstance(node, ChainNode) else \
                    [step.work[1]] if layers else []
                input_grad = any(grads.get(p, False) for p in node.inputs)
                for j, i in enumerate(reversed(range(len(layers)))):
                    out.append(Problem(k, c, i, "weight", slots[i], wave=depth + j))
                    if i > 0 or input_grad:
                        out.append(Problem(k, c, i, "input_grad", slots[i], wave=depth + j))
                after[c] = depth + len(layers)
        return out

    # --- the simulation ------------------------------------------------------------------------

    def _simulate(self, depth: dict, measure: bool) -> Iterator[TickPlan]:
        graph, n_stages = self.graph, len(self.stages)
        top = n_stages - 1
        sideways = self.mode == "sideways" and self.training
        fifo: dict = {}  # (node, input) -> list of sample indices held
        expected: dict = {}  # join -> next sample it fires on
        sent_up: list = [None] * n_stages  # sample index arriving at stage k this tick
        errors_down: list = [False] * n_stages  # an error arrives at stage k's output this tick
        queued: set = set()  # producers with an error waiting for their next firing
        last_out = -1  # output frames emitted so far - 1
        seen = [False] * n_stages
        warm = None
        bound = None
        tick = 0
        while True:
            plans = []
            next_up = [None] * n_stages
            next_down = [False] * n_stages
            for k, nodes in enumerate(self.stages):
                arrive = tick if k == 0 else sent_up[k]
                emitted: dict = {}
                held_from: dict = {}  # node -> its inputs as fired (for the backward)
                if arrive is not None:
                    emitted[self.inputs[k]] = arrive
                steps = []
                for c in nodes:
                    node = graph.nodes[c]
                    arrivals = [(pos, emitted[p]) for pos, p in enumerate(node.inputs) if p in emitted]
                    if not arrivals:
                        continue
                    if len(node.inputs) == 1:
                        m, inputs, stores = arrivals[0][1], ("new",), ()
                    else:
                        m, inputs, stores = self._join(c, node, arrivals, emitted, fifo, expected, depth, measure)
                    stored = tuple(dict(arrivals)[pos] for pos, _ in stores)
                    if m is None:
                        steps.append(Step(c, False, stores=stores, stored=stored))
                        continue
                    n = node.emits(m)
                    valid = n is not None and n < self.length(c)
                    steps.append(Step(c, True, m, n, valid, self._work(node, m), inputs, stores, stored))
                    held_from[c] = inputs
                    if n is not None:
                        emitted[c] = n
                seen[k] = seen[k] or bool(steps)
                out_node = self.outputs[k]
                out = (emitted[out_node], emitted[out_node] < self.length(out_node)) if out_node in emitted else None
                loss = None
                if k == top and out is not None and out[1]:
                    last_out = out[0]
                    loss = out[0] if self.training else None
                if k < top and out is not None:
                    next_up[k + 1] = out[0]
                takes = errors_down[k]
                roots, backward, sends, traversed = (), False, False, frozenset()
                waiting = tuple(sorted(p for p in queued if self.stage_of.get(p) == k))
                if sideways:
                    if takes:
                        queued.add(out_node)
                    roots = tuple(p for p in sorted(queued) if p in emitted and self.stage_of.get(p) == k)
                    queued.difference_update(roots)
                    if roots or loss is not None:
                        backward = True
                        sends, traversed = self._backward(k, [out_node] if loss is not None else [], roots, emitted,
                                                          held_from, queued)
                    if sends and k > 0:
                        next_down[k - 1] = True
                crossing = self.inputs[k]
                real = arrive is not None and arrive < self.length(crossing)
                last_real = real and arrive == self.length(crossing) - 1
                plans.append(StagePlan(arrive, tuple(steps), out, loss, takes, roots, backward, sends and k > 0,
                                       waiting, real, last_real and k > 0, traversed))
            if warm is None and all(seen) and (not sideways or plans[0].backward):
                warm = tick
            drain = any(sp.arrive is not None and not sp.arrive_real or sp.keep_arrival for sp in plans[1:])
            plan = TickPlan(tick, tuple(plans), steady=warm is not None and tick < self.frames and not drain)
            yield plan
            sent_up, errors_down = next_up, next_down
            out_total = self.out_frames()
            if last_out + 1 >= out_total and not any(errors_down) and not queued:
                return
            if bound is None and self.frames != INF:
                bound = self._drain_bound()
            if bound is not None and tick > bound:
                raise RuntimeError(f"the pipeline did not drain within {bound} ticks (a node waits for a sample "
                                   "that never comes)")
            tick += 1

    def _join(self, c, node, arrivals, emitted, fifo, expected, depth, measure):
        """A node with several inputs: arrivals queue up; it fires when every input has the
        sample it expects next. Returns (m or None, inputs as fired, stores)."""
        m = expected.get(c, 0)
        arrived = dict(arrivals)
        for pos, idx in arrivals:
            fifo.setdefault((c, pos), []).append(idx)
        ready = all(fifo.get((c, pos)) and fifo[(c, pos)][0] == m for pos in range(len(node.inputs)))
        stores, inputs = [], []
        for pos, p in enumerate(node.inputs):
            queue = fifo.get((c, pos), [])
            keep = queue[1:] if ready else queue
            if measure:  # a sample read now and one stored now live in the FIFO together
                depth[(c, pos)] = max(depth.get((c, pos), 0), len(queue))
            d = depth.get((c, pos), 1)
            if pos in arrived and arrived[pos] in keep:
                stores.append((pos, arrived[pos] % d))
            if ready:
                if arrived.get(pos) == m:
                    inputs.append("new")
                else:
                    inputs.append(("held", m % d, p in emitted))
        if not ready:
            return None, (), tuple(stores)
        for pos in range(len(node.inputs)):
            fifo[(c, pos)].pop(0)
        expected[c] = m + 1
        return m, tuple(inputs), tuple(stores)

    def _prune(self, plans: list) -> list:
        """Drop the firings on held samples (after the clip) that nothing uses: kept are the
        firings on the clip's samples, those that push end padding or emit a frame of the output,
        those the tick's backward goes through, and whatever those read (same tick, or a FIFO
        sample stored earlier). Held samples never cross a stage boundary: a stage reads its own
        copy of the last real sample it got. Same results, far less work in the drain."""
        graph = self.graph
        need_store: set = set()  # (node, input, sample index) read later by a kept firing
        out = []
        for plan in reversed(plans):
            stages = []
            for k, sp in enumerate(plan.stages):
                needed = set(sp.traversed)
                steps = []
                for step in reversed(sp.steps):
                    node = graph.nodes[step.node]
                    fire = step.fire and (step.node in needed or self._essential(node, step))
                    stores = tuple(st for st, idx in zip(step.stores, step.stored)
                                   if (step.node, st[0], idx) in need_store)
                    for pos, _ in stores:
                        needed.add(node.inputs[pos])
                    if fire:
                        for pos, (p, how) in enumerate(zip(node.inputs, step.inputs)):
                            if how == "new":
                                needed.add(p)
                            else:
                                need_store.add((step.node, pos, step.m))
                    if fire or stores:
                        steps.append(dataclasses.replace(step, fire=fire, stores=stores,
                                                         stored=tuple(i for st, i in zip(step.stores, step.stored)
                                                                      if st in stores)))
                out_sent = sp.out if sp.out is not None and sp.out[1] else None
                stages.append(dataclasses.replace(sp, steps=tuple(reversed(steps)), out=out_sent))
            out.append(dataclasses.replace(plan, stages=tuple(stages)))
        return out[::-1]

    def _essential(self, node, step: Step) -> bool:
        """A firing that changes what comes later: on a clip sample, pushing end padding, or
        emitting an output frame."""
        if step.valid or step.m < self.length(node.inputs[0]):
            return True
        work = step.work
        if isinstance(node, ConvNode):
            return work[0] == ZEROS
        if isinstance(node, ChainNode):
            return any(action == ZEROS for action, _ in work)
        return False

    def _work(self, node, m: int):
        length = self.length(node.inputs[0]) if node.inputs else self.frames
        if isinstance(node, ConvNode):
            return node.step(m, length)
        if isinstance(node, PoolNode):
            return node.step(m, length)
        if isinstance(node, ChainNode):
            return node.steps(m, length)
        return None

    def _backward(self, k, loss_roots, roots, emitted, held_from, queued) -> tuple[bool, frozenset]:
        """Follow this tick's graph from the roots: a held input whose producer did not fire
        queues the error there; reaching the stage's input sends it down. Returns (whether an
        error goes down, the nodes it went through)."""
        frontier = list(loss_roots) + list(roots)
        seen, sends = set(), False
        source = self.inputs[k]
        while frontier:
            c = frontier.pop()
            if c in seen:
                continue
            seen.add(c)
            if c == source:
                sends = True
                continue
            for p, how in zip(self.graph.nodes[c].inputs, held_from[c]):
                if how == "new" or how[2]:  # arrived now, or its producer fired now (the stand-in)
                    frontier.append(p)
                elif p == source:  # a held sample of the stage's input: its error goes down
                    sends = True
                else:
                    queued.add(p)
        return sends, frozenset(seen - {source})

    def _drain_bound(self) -> int:
        g = self.graph
        return int(self.frames + max(g.lag) + max(g.rate) * (4 * len(self.stages) + 4) + 8)

"""The tick executor: carries out a :class:`~sideways_kernels.schedule.Schedule` on tensors.

Data flows one way through a tick: each stage takes the sample that arrived from below (the
video for stage 0) and the error that arrived from above, both written last tick into double
buffers; runs the steps its plan lists (rings, FIFOs and layers do their part); computes the
top frame's loss; back-propagates what is due; and writes the other half of the double buffers.

Modes: ``"sideways"`` back-propagates every tick through that tick's graph only (held samples
hand their gradient on as the schedule describes); ``"bp"`` keeps every sample in the autograd
graph (rings become lists of graph-connected frames) so the clip loss's backward at the end is
exact backprop; ``"infer"`` runs forward only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
import warnings
from typing import Callable, Optional

import torch

from . import backend as _backend
from .graph import ChainNode, ConvNode, PoolNode, StreamGraph, substitute
from .nn import PUSH, SidewaysConv3d, _Stream, activation_dtype, weight_step
from .ops import empty_frame, ring_output_hw, row_length
from .schedule import Schedule, StagePlan, TickPlan

__all__ = ["Engine"]


class _Catch(torch.autograd.Function):
    """Forward: ``value``. Backward: its gradient is handed to ``sink`` (a held sample whose
    producer fires later: the error waits there)."""

    @staticmethod
    def forward(ctx, value, anchor, sink):
        ctx.sink = sink
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink(grad)
        return None, None, None


def frame_counters(graph: StreamGraph, nodes) -> dict:
    """Of ``nodes`` (indices), those whose frames a run counts in place of the op
    (``LocalNode.frame_counter``): index -> (the FrameCounter, its tensor for this run)."""
    found = {}
    for i in nodes:
        counter = getattr(graph.nodes[i], "frame_counter", None)
        tensor = counter.tensor() if counter is not None else None
        if tensor is not None:
            found[i] = (counter, tensor)
    return found


def counted_firings(plan: TickPlan, stages, nodes) -> list:
    """The firings of ``nodes`` in ``plan``'s ``stages`` on a valid sample (not the drain's held
    ones): each counts a frame."""
    return [step.node for k in stages for step in plan.stages[k].steps
            if step.fire and step.valid and step.node in nodes]


class Engine:
    """Runs ticks for stages ``[lo, hi)`` of ``graph`` cut into ``stages`` (node lists).
    ``device(k)``: stage k's device. ``boundary``: the exchange with other processes
    (sideways_kernels.distributed) or None."""

    def __init__(self, graph: StreamGraph, stages: list[list[int]], device: Callable[[int], torch.device]):
        self.graph, self.stages, self._device_of = graph, stages, device
        self._devices: Optional[list] = None  # each stage's device, looked up once a run
        self.lo, self.hi = 0, len(stages)
        self.boundary = None
        self.timer: Optional[_StageTimer] = None
        self.buffers: dict = {}  # (kind, parity, stage) -> double buffer
        self.fifo: dict = {}  # (node, input) -> {slot: fixed buffer of a held sample}
        self.held: dict = {}  # bp mode, per run: (node, input) -> {slot: held sample, in the graph}
        self.queue: dict = {}  # producer -> buffer of the error waiting for its next firing
        self.seeds: dict = {}  # (dtype, device, frames) -> the loss backward's seed (_loss_seed)
        self._streams: Optional[list] = None
        self._anchor = torch.zeros(0, requires_grad=True)
        self.inputs = self.outputs = None  # producer entering / leaving each stage, from the schedule
        self.heads: Optional[dict] = None  # predict(): head pool -> [accumulated output, frames]
        self.observer: Optional[Callable] = None  # observer(node, inputs, output, seconds): the cost probe
        self.tick_optimizer = None
        self._layers: list = []  # the streaming SidewaysConv3d layers of the current run
        self._updates: list = []  # backend.WeightUpdates of the current run: each tick's, run at its end
        self._counted: dict = {}  # node -> [FrameCounter, its tensor, valid firings] of the current run
        self._members: Optional[tuple] = None  # _find_members() of the current run
        self._accumulated: dict = {}  # stage -> the parameters autograd accumulates into (_accumulating_once)
        self._deferred: dict = {}  # stage -> the window_input_grad calls of its first conv held this tick
        self._deferred_layers: dict = {}  # stage -> that conv
        self._plain: dict = {}  # stage -> (its conv, ReLU, pool) where its module is just those (this run)
        self._said_alone = False  # _say_what_runs_alone warned
        self.at = ""  # what the tick is doing now (a node's name, a stage's backward): named when a capture fails

    # --- a run -------------------------------------------------------------------------------

    def run(self, schedule: Schedule, frames, mode: str, frame_loss, losses: Optional[list], *, backend=None,
            optimizer=None, update: str = "clip", graphs=None, stage_target=None, phase_key=None, smoothing: int = 1,
            loss_frames: int = 1):
        """Tick until the schedule ends; yields the top stage's valid outputs in frame order.
        ``frames``: an iterator of checked frames [B, C, 1, H, W] (stage 0's process only).
        ``frame_loss(out, t)``: a frame's loss, of which the clip loss is the sum over its
        ``loss_frames`` output frames divided by ``loss_frames`` (each tick's share in ``losses``)."""
        self.inputs, self.outputs = schedule.inputs, schedule.outputs
        self.schedule, self.mode = schedule, mode
        self._devices = [self._device_of(k) for k in range(len(self.stages))]
        self.frame_loss, self.losses, self.loss_frames = frame_loss, losses, loss_frames
        self.tick_optimizer = optimizer if (mode == "sideways" and update == "tick") else None
        up: list = [None] * len(self.stages)  # sample arriving at each stage
        down: list = [None] * len(self.stages)  # error arriving at each stage's output
        plans = iter(schedule)
        last = None
        self.held = {}
        boundary = self.boundary
        if boundary is not None:
            boundary.start()
        tick = -1
        with self._streaming(mode, backend, optimizer if (mode == "sideways" and update == "tick") else None, smoothing):
            for tick in itertools.count():
                x0 = None
                if self.lo == 0:
                    if tick < schedule.frames:
                        f = next(frames, None)
                        if f is None:  # a live stream just ended
                            schedule.end(tick)
                        else:
                            last = f
                    x0 = last  # after the clip: the last frame, held
                plan = next(plans, None)
                if plan is None:
                    break
                if self.lo == 0 and x0 is not None and graphs is not None:
                    x0 = graphs.stage("frame", x0, x0.device)
                if stage_target is not None and self.hi == len(self.stages) and plan.stages[-1].loss is not None:
                    stage_target(plan.stages[-1].loss)
                if graphs is None:
                    up, down, done, tick_losses = self._tick(plan, x0, up, down)
                else:  # every tick, fill and drain too: its graph does the tensors, the plan says the rest
                    fn = functools.partial(self._tick, plan, x0, list(up), list(down))
                    up, down, done, tick_losses = graphs.run(phase_key(plan), fn, self)
                    # a graph's outputs are rewritten by its next replay (and its pool is shared)
                    done, tick_losses = [o.clone() for o in done], [l.clone() for l in tick_losses]
                self._count_frames(plan)
                if losses is not None:
                    losses.extend(tick_losses)
                if boundary is not None:
                    boundary.end_tick(tick, mode)
                yield from done
        if boundary is not None:
            boundary.finish(tick - 1, mode)
        self.last_ticks = tick

    def device(self, k: int) -> torch.device:
        return self._devices[k] if self._devices is not None else self._device_of(k)

    # --- what a CUDA graph of a tick depends on (sideways_kernels.cuda_graphs) -----------------

    def python_state(self, state=None):
        """What a tick reads or changes on the Python side that a graph replay would not redo:
        the parameters' gradient references (a tick may create a ``.grad``; the per-tick optimizer
        sets them to None) and each streaming layer's ``fresh`` flag (its first firing of a run
        zeroes its ring, then clears the flag). ``python_state()`` returns it, ``python_state(s)``
        sets it."""
        params, layers = self._graph_params(), self._layers
        if state is None:
            return [p.grad for p in params], [layer._stream.fresh for layer in layers]
        grads, fresh = state
        for p, g in zip(params, grads):
            if p.grad is not g:  # (the setter's checks cost more than this look, every tick)
                p.grad = g
        for layer, f in zip(layers, fresh):
            layer._stream.fresh = f

    def _graph_params(self) -> list:
        return self._local_members()[0]

    def _local_members(self) -> tuple:
        """(parameters, SidewaysConv3d layers, pool nodes) of the local stages: the run's, looked
        up once when it began, else looked up now."""
        return self._members if self._members is not None else self._find_members()

    def _find_members(self) -> tuple:
        params = [p for k in range(self.lo, self.hi) for m in self._stage_modules(k) for p in m.parameters()]
        layers = [m for k in range(self.lo, self.hi) for top in self._stage_modules(k) for m in top.modules()
                  if isinstance(m, SidewaysConv3d)]
        pools = [n for k in range(self.lo, self.hi) for n in (self.graph.nodes[i] for i in self.stages[k])
                 if isinstance(n, PoolNode)]
        return params, layers, pools

    def _momentum_buffers(self) -> list:
        opt = self.tick_optimizer
        if opt is None:
            return []
        return [opt.state.get(p, {}).get("momentum_buffer") for g in opt.param_groups for p in g["params"]]

    def _stage_modules(self, k: int) -> list:
        return [m for i in self.stages[k] for m in self.graph.nodes[i].modules()]

    def _autograd_params(self, k: int) -> list:
        """Stage ``k``'s parameters whose gradients autograd accumulates — not a SidewaysConv3d's,
        which its ops write — and whose accumulation no hook watches."""
        modules = self._stage_modules(k)
        by_ops = {id(p) for top in modules for m in top.modules() if isinstance(m, SidewaysConv3d)
                  for p in m.parameters(recurse=False)}
        params = {id(p): p for m in modules for p in m.parameters()}
        return [p for p in params.values() if p.requires_grad and id(p) not in by_ops
                and not getattr(p, "_post_accumulate_grad_hooks", None)]

    @contextlib.contextmanager
    def _accumulating_once(self, k: int):
        """Stage ``k``'s Sideways backward with its parameters' gradients set aside: autograd then
        hands each parameter this tick's gradient without a kernel (AccumulateGrad takes the
        tensor), and one foreach launch adds them into the gradients set aside, in place — the
        sums AccumulateGrad's add_ makes (old + new), in one launch where it made one per
        parameter (r3d_18's 40 BatchNorm parameters: about 20 launches a tick)."""
        held = [(p, p.grad) for p in self._accumulated.get(k, ()) if p.grad is not None]
        for p, _ in held:
            p.grad = None
        try:
            yield
        finally:
            pairs = [(old, p.grad) for p, old in held if p.grad is not None]
            if pairs:
                self._add_gradients([old for old, _ in pairs], [new for _, new in pairs])
            for p, old in held:
                p.grad = old

    @staticmethod
    def _add_gradients(into: list, grads: list) -> None:
        """``into[i] += grads[i]`` for every i, in one launch."""
        with torch.no_grad():
            torch._foreach_add_(into, grads)

    # --- a tick ------------------------------------------------------------------------------

    def _tick(self, plan: TickPlan, x0, up: list, down: list):
        """Every local stage's part of one tick; then the per-tick optimizer step. Returns
        (next tick's arrivals, next tick's errors, the top's valid outputs, their losses)."""
        n_stages = len(self.stages)
        new_up: list = [None] * n_stages
        new_down: list = [None] * n_stages
        done, losses = [], []
        parity = plan.tick % 2
        boundary = self.boundary
        stepped = False
        arrivals = {k: self._arrival(k, plan, x0, up) for k in range(self.lo, self.hi)}
        self._deferred, self._deferred_layers, pending = {}, {}, {}
        own = self._forwards_ahead(plan, arrivals, down)
        streams = self._fork()
        try:
            for k in range(self.lo, self.hi):
                sp, x_in = plan.stages[k], arrivals[k]
                if k in own:  # its forward ran ahead into the next stage's buffer; its backward comes below
                    new_up[k + 1] = own[k].out
                    stepped = True
                    continue
                if not sp.steps and not sp.takes_error and not sp.queued:
                    continue
                if self.timer is not None:
                    self.timer.start(k)
                if streams[k] is not None:  # the stage's work goes on its own CUDA stream
                    torch.cuda.set_stream(streams[k])
                err_in = down[k] if k < self.hi - 1 else None
                above = boundary is not None and k == self.hi - 1 and k < n_stages - 1
                out, err, loss = self._stage(k, sp, x_in, err_in, above, plan.tick, done)
                stepped = stepped or sp.backward
                if loss is not None:
                    losses.append(loss)
                if sp.out is not None and k < n_stages - 1:
                    if k == self.hi - 1:  # the next stage lives in another process
                        pass  # sent by _stage right after the forward
                    else:
                        nxt = out if self.mode == "bp" else self._carry("act", parity, k + 1, out.detach())
                        new_up[k + 1] = nxt.to(self.device(k + 1)) if self.mode == "bp" else nxt
                if isinstance(err, list):  # its first conv's input gradient is still to come (below)
                    pending[k] = (err, x_in)
                elif err is not None:
                    self._send_down(k, err, plan.tick, new_down)
        finally:
            self._join(streams)
            for layer in self._layers:  # (an output run ahead for a stage that did not take it)
                layer._stream.ahead = layer._stream.defer_input_grad = None
            if self.timer is not None:
                self.timer.stop()
        if pending or own:
            self.at = "the stages' first input gradients, grouped"
            self._deferred_errors(pending, own, plan.tick, new_down)
        self.at = "the tick's weight updates"
        for updates in self._updates:
            updates.run()
        if stepped and self.tick_optimizer is not None:
            self.at = "the per-tick optimizer step"
            self.tick_optimizer.step()
            self.tick_optimizer.zero_grad(set_to_none=True)
        return new_up, new_down, done, losses

    def _arrival(self, k: int, plan: TickPlan, x0, up: list):
        """The sample stage ``k`` takes this tick (None: none): the video's frame, the boundary's
        (the first local stage of a rank: it arrived during our last tick), the double buffer's,
        or the held copy of the clip's last sample (the drain)."""
        sp = plan.stages[k]
        if k == 0:
            x_in = x0 if sp.arrive is not None else None
        elif k == self.lo:
            got = self.boundary.receive("act", plan.tick, self.mode)
            x_in = None if got is None else got[0]
        else:
            x_in = up[k]
        if sp.keep_arrival:  # the last sample of the clip from below: held samples are copies of it
            self._carry("held", 0, k, x_in.detach())
        if k > 0 and sp.arrive is not None and not sp.arrive_real:
            x_in = self.buffers.get(("held", 0, k))
        if sp.arrive is not None and x_in is None:
            raise RuntimeError(f"stage {k} expected a sample at tick {plan.tick} and got none")
        return x_in

    def _forwards_ahead(self, plan: TickPlan, arrivals: dict, down: list) -> dict:
        """Every stage's first conv, where it reads the stage's arriving sample, run before the
        stages in one grouped launch per kernel shape, where the backend groups forwards
        (``kernels(...).group_forwards``: Triton's box kernels); each stage then finds its output
        (:meth:`~.nn.SidewaysConv3d.forward_ahead`). Only a stage's first conv can go ahead: it
        reads last tick's sample, a later one what this tick's nodes make. A lone forward runs in
        its stage as before. Then those convs' input gradients are held (:meth:`_defer_input_grads`).

        A stage that is just a conv, its ReLU and maybe a 1x2x2 max pool (:meth:`_own_stage`) is
        then the engine's to run: its launch's epilogue applies the ReLU (and the pool), writes the
        output straight into the next stage's double buffer and masks the error that arrived for it
        in place (the ReLU's backward; with the pool, the error at the conv's output goes to a buffer
        of the stage's, through the pool's backward), so the stage runs nothing of its own; its input
        gradient and weight update come after the stages (:meth:`_deferred_errors`). Where the
        forward is not grouped (``auto`` sends it to cuDNN) but the backend allows
        (``kernels(...).stage_epilogue``), the forward runs by itself and every such stage's epilogue
        in one launch after it. Returns those stages: stage -> :class:`_Own`."""
        if self.mode == "bp" or self.observer is not None:
            return {}
        batches: dict = {}
        firsts = []  # (stage, layer) of the convs found
        own = {}
        for k in range(self.lo, self.hi):
            found = self._first_conv(k, plan.stages[k], arrivals[k])
            if found is None:
                continue
            layer, action, slot = found
            firsts.append((k, layer))
            kernels = layer._stream.kernels
            grouped = getattr(kernels, "group_forwards", None)
            plain = self._own_stage(k, plan.stages[k], action, arrivals[k], down[k]) if grouped is not None else None
            into = None
            if plain is not None and k == 0:  # the video's frame: cast into a channels-last frame the launch reads
                x = arrivals[k]
                into = self._frame_buffer("in", 0, k, x.shape, activation_dtype(x),
                                          getattr(kernels, "aligned_rows", False))[:, :, 0]
            args = layer.forward_ahead(arrivals[k], action, slot, into=into) if grouped is not None else None
            if args is None or not (kernels.groups_forward(args) or (plain is not None
                                                                     and kernels.stage_epilogue(args))):
                continue
            epilogue = None
            if plain is not None:
                _, relu, pool = plain
                out = self._frame_buffer("act", plan.tick % 2, k + 1, down[k].shape, down[k].dtype)
                at_conv = self._frame_buffer("conv error", 0, k, _conv_output(args), down[k].dtype) \
                    if pool else None
                epilogue = (out[:, :, 0], relu, down[k][:, :, 0], at_conv[:, :, 0] if pool else None)
                own[k] = _Own(layer, out, at_conv[:, :, 0] if pool else down[k][:, :, 0], arrivals[k], args[0],
                              args[2])
            batches.setdefault(_grouping(grouped), []).append((k, layer, args, epilogue))
        for batch in batches.values():
            if len(batch) < 2 and batch[0][3] is None:
                continue
            self.at = "the stages' first forwards, grouped"
            outs = batch[0][1]._stream.kernels.group_forwards([args for _, _, args, _ in batch],
                                                              [epilogue for *_, epilogue in batch])
            for (k, layer, args, epilogue), out in zip(batch, outs):
                if epilogue is None:
                    layer._stream.ahead = ((args[1].data_ptr(), args[2]), out)
        self._defer_input_grads(plan, [(k, layer) for k, layer in firsts if k not in own], len(own))
        return own

    def _own_stage(self, k: int, sp: StagePlan, action: str, x_in, err_in) -> Optional[tuple]:
        """(conv, ReLU after it, pool after that) where stage ``k`` is the engine's to run this tick
        (:meth:`_forwards_ahead`), else None: its module is a conv, its ReLU and maybe a max pool
        (``_plain``), it pushes its sample, emits into a double buffer of this process on its
        device, and back-propagates the error that arrived for it (in the dtype its activations
        take), nothing else (no waiting error, no held sample). Not while stages are timed
        (``stage_times``: an own stage has no time of its own)."""
        plain = self._plain.get(k)
        if plain is None or err_in is None or self.timer is not None or k >= self.hi - 1 \
                or self.device(k + 1) != self.device(k) or err_in.dtype != activation_dtype(x_in):
            return None
        if k == self.lo and k > 0 and self.boundary is not None:  # its error goes to another process
            return None
        if action != PUSH or sp.out is None or not (sp.backward and sp.takes_error) or sp.queued \
                or sp.keep_arrival or sp.roots != (self.outputs[k],) or sp.sends_error != (k > 0):
            return None
        if k > 0 and self.device(k - 1) != self.device(k):
            return None
        return plain

    def _defer_input_grads(self, plan: TickPlan, firsts: list, owned: int) -> None:
        """The input gradients of the stages' first convs (``firsts``: (stage, layer)) held until
        every stage's backward has run, then run in one grouped launch per kernel shape (with those
        of the ``owned`` stages the engine runs itself) where the backend groups them
        (``kernels(...).group_input_grads``) and two or more go together: each goes only into the
        error its stage sends down (the stage's input, a leaf of this tick's graph), which nothing
        reads before the tick's end."""
        backs = [(k, layer) for k, layer in firsts if self.mode == "sideways" and plan.stages[k].backward
                 and plan.stages[k].sends_error and getattr(layer._stream.kernels, "group_input_grads", None) is not None]
        if len(backs) + owned < 2:
            return
        for k, layer in backs:
            self._deferred[k] = calls = []
            layer._stream.defer_input_grad = calls.append
            self._deferred_layers[k] = layer

    def _deferred_errors(self, pending: dict, own: dict, tick: int, new_down: list) -> None:
        """The errors of the stages whose first conv's input gradient was held (``pending``: stage
        -> (the error's other parts, the stage's input)) and of the stages the engine runs itself
        (``own``): those gradients in grouped launches (an own stage's straight into the double
        buffer below), each error sent down; then the own stages' weight updates (held for the
        tick's grouped launch)."""
        batches: dict = {}  # grouping -> (the backend's grouped call, [(stage, window_input_grad args, out or None)])
        for k in pending:
            fn = self._deferred_layers[k]._stream.kernels.group_input_grads
            for args in self._deferred[k]:
                batches.setdefault(_grouping(fn), (fn, []))[1].append((k, args, None))
        for k, stage in own.items():
            layer = stage.layer
            if not stage.error.is_contiguous(memory_format=torch.channels_last):  # (the weight update's layout)
                stage.error = stage.error.contiguous(memory_format=torch.channels_last)
            if k == 0:
                continue
            stride, padding, dilation, _, groups = layer._stream.geometry[1]
            below = self._frame_buffer("err", tick % 2, k - 1, stage.input.shape, stage.input.dtype)
            new_down[k - 1] = below
            fn = layer._stream.kernels.group_input_grads
            call = (stage.error, layer.weight, list(stage.input.shape[-2:]), stride, padding, dilation, groups)
            batches.setdefault(_grouping(fn), (fn, []))[1].append((k, call, below[:, :, 0]))
        for fn, calls in batches.values():
            grads = fn([args for _, args, _ in calls], [out for *_, out in calls])
            for (k, _, out), grad in zip(calls, grads):
                if out is None:
                    pending[k][0].append(grad.unsqueeze(2))
        for k, (parts, x_in) in pending.items():
            self._send_down(k, functools.reduce(torch.add, parts) if parts else torch.zeros_like(x_in), tick, new_down)
        for stage in own.values():
            layer = stage.layer
            weight_step(layer, layer._stream, stage.ring, stage.error, stage.slot, layer.weight.requires_grad,
                        layer.bias is not None and layer.bias.requires_grad)

    def _send_down(self, k: int, err: torch.Tensor, tick: int, new_down: list) -> None:
        """Stage ``k``'s error for the stage below: across the boundary, or into its double buffer."""
        if k == self.lo and k > 0 and self.boundary is not None:
            self.boundary.send("down", tick, err, mode=self.mode)
        elif k > 0:
            new_down[k - 1] = self._carry("err", tick % 2, k - 1, err)

    def _first_conv(self, k: int, sp: StagePlan, x_in) -> Optional[tuple]:
        """(layer, ring action, slot) of stage ``k``'s first step when it is a conv of the stage's
        arriving sample (a conv node that emits, or a chain stage whose nn.Sequential starts with
        the conv) on the ring ops, else None."""
        if x_in is None or not sp.steps:
            return None
        step = sp.steps[0]
        node = self.graph.nodes[step.node]
        if not step.fire or step.stores or list(node.inputs) != [self.inputs[k]] or step.inputs[0] != "new":
            return None
        if isinstance(node, ConvNode):
            action, slot, emits, _ = step.work
            layer = node.module if emits else None
        elif isinstance(node, ChainNode):
            layer = _leading_conv(node.module)
            if layer is not None:
                action, slot = node.steps(step.m, self.schedule.length(node.inputs[0]))[0]
        else:
            layer = None
        return None if layer is None or layer._stream is None else (layer, action, slot)

    def _stage(self, k: int, sp: StagePlan, x_in, err_in, above: bool, tick: int, done: list):
        """One stage's tick: its steps, the top's loss, the Sideways backward of what is due.
        Returns (its output sample or None, the error for the stage below or None, the loss)."""
        nodes, mode = self.graph.nodes, self.mode
        backward = mode == "sideways" and sp.backward
        source = self.inputs[k]
        values: dict = {}
        leaf = None
        if x_in is not None:
            if backward and k > 0:
                leaf = x_in.detach().requires_grad_()
                values[source] = leaf
            else:
                values[source] = x_in
        flags = set(sp.queued)
        caught: list = []  # errors of held stage-input samples: they go down with the input's
        with torch.set_grad_enabled(mode == "bp" or backward):
            for step in sp.steps:
                node = nodes[step.node]
                for pos, slot in step.stores:
                    self._store(node.index, pos, slot, values[node.inputs[pos]])
                if not step.fire:
                    continue
                inputs = [self._input(node, pos, how, values, source, backward, flags, caught)
                          for pos, how in enumerate(step.inputs)]
                out = self._fire(node, step, inputs, backward)
                if step.emit is not None:
                    values[node.index] = out
        out_node = self.outputs[k]
        out = values.get(out_node) if sp.out is not None else None
        loss = None
        if k == len(self.stages) - 1 and sp.out is not None and sp.out[1]:  # a frame of the clip's output
            done.append(out.detach())
            if self.frame_loss is not None:
                self.at = "the loss function"
                frame_loss = self.frame_loss(out, sp.out[0])
                loss = (frame_loss if mode == "bp" else frame_loss.detach()) / self.loss_frames
        if above and sp.out is not None:  # sent now, so the transfer overlaps this stage's backward
            self.boundary.send("up", tick, out if mode == "bp" else out.detach(), sp.out[0], 0, mode)
        if above and mode == "sideways" and self.frame_loss is not None:
            got = self.boundary.receive("err", tick, mode)
            err_in = got
            if sp.takes_error and got is None:
                raise RuntimeError(f"stage {k} expected an error from above at tick {tick} and got none")
        err = None
        if backward:
            tensors, grads = [], []
            if loss is not None:
                tensors.append(frame_loss)
                grads.append(self._loss_seed(frame_loss))
            incoming = err_in if sp.takes_error else None
            for p in sp.roots:
                g = self.queue[p] if p in flags else None
                if p == out_node and incoming is not None:
                    g = incoming if g is None else g + incoming
                    incoming = None
                if g is None:  # the error did not connect to anything: nothing to push
                    continue
                tensors.append(values[p])
                grads.append(g)
            flags.difference_update(sp.roots)
            if incoming is not None:
                self._queue_add(out_node, incoming, flags)
            tensors = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]
            if tensors:
                self.at = f"the Sideways backward of stage {k}"
                with self._accumulating_once(k):
                    torch.autograd.backward([t for t, _ in tensors], [g for _, g in tensors])
            if sp.sends_error:
                parts = ([leaf.grad] if leaf is not None and leaf.grad is not None else []) + caught
                if k in self._deferred:  # the rest of it is its first conv's input gradient, at the tick's end
                    return out, parts, loss
                err = functools.reduce(torch.add, parts) if parts else torch.zeros_like(x_in)
        elif mode == "sideways" and sp.takes_error and err_in is not None:
            self._queue_add(out_node, err_in, flags)
        return out, err, loss

    def _loss_seed(self, frame_loss: torch.Tensor) -> torch.Tensor:
        """The gradient of the clip loss by a frame's loss, 1/frames, made as autograd makes it for
        ``frame_loss / frames`` (ones, divided: the same bits) once and kept, so a tick's backward
        launches neither."""
        key = (frame_loss.dtype, frame_loss.device, self.loss_frames)
        seed = self.seeds.get(key)
        if seed is None:
            seed = self.seeds[key] = torch.ones((), dtype=frame_loss.dtype, device=frame_loss.device).div_(
                self.loss_frames)
        return seed

    def _input(self, node, pos: int, how, values: dict, source: int, backward: bool, flags: set, caught: list):
        p = node.inputs[pos]
        if how == "new":
            return values[p]
        _, slot, now = how
        held = (self.held if self.mode == "bp" else self.fifo)[(node.index, pos)][slot]
        if not backward or not isinstance(held, torch.Tensor) or not held.is_floating_point():
            return held
        if now:  # its producer fired now: the error goes to that fresh sample
            return substitute(held, values[p])
        if p == source:
            return _Catch.apply(held, self._anchor, caught.append)
        return _Catch.apply(held, self._anchor, functools.partial(self._queue_add, p, flags=flags))

    def _store(self, node: int, pos: int, slot: int, value) -> None:
        """A join's input held for a later firing: a reference in bp mode (it stays in the graph),
        else a copy into a fixed slot (the arriving tensor's buffer is written again)."""
        if self.mode == "bp":
            self.held.setdefault((node, pos), {})[slot] = value
            return
        held = self.fifo.setdefault((node, pos), {})
        if not isinstance(value, torch.Tensor):  # a size
            held[slot] = value
            return
        buf = held.get(slot)
        value = value.detach()
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
            buf = held[slot] = torch.empty_like(value, memory_format=torch.preserve_format)
        buf.copy_(value)

    def _queue_add(self, p: int, g: torch.Tensor, flags: set) -> None:
        buf = self.queue.get(p)
        if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
            buf = self.queue[p] = torch.empty_like(g, memory_format=torch.preserve_format)
            flags.discard(p)
        if p in flags:
            buf.add_(g)
        else:
            buf.copy_(g)
            flags.add(p)

    def _fire(self, node, step, inputs: list, backward: bool):
        self.at = f"node {node.name!r}"
        if self.observer is not None:
            began = time.perf_counter()
            out = self._compute(node, step, inputs, backward)
            self.observer(node, inputs, out, time.perf_counter() - began)
        else:
            out = self._compute(node, step, inputs, backward)
        if self.heads is not None and node.index in self.heads and step.valid:
            acc = self.heads[node.index]
            acc[0] = out.clone() if acc[0] is None else acc[0] + out if node.head == "mean" else \
                torch.maximum(acc[0], out)
            acc[1] += 1
        return out

    def _compute(self, node, step, inputs: list, backward: bool):
        if isinstance(node, ChainNode):
            out = node.run(inputs[0], step.m, self.schedule.length(node.inputs[0]))
            return out if step.emit is not None else None
        if isinstance(node, ConvNode):
            return node.run(inputs[0], step.work)
        if isinstance(node, PoolNode):
            return node.run(inputs[0], step.work, backward)
        return node.run(inputs, step.valid)

    def _carry(self, kind: str, parity: int, i: int, value: torch.Tensor) -> torch.Tensor:
        """Copy ``value`` into the preallocated double buffer (kind, parity) of stage ``i``, on
        that stage's device: written at tick τ, read at τ+1. Reallocated only when the shape
        changes."""
        key = (kind, parity, i)
        buf = self.buffers.get(key)
        device = self.device(i)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != device \
                or not _same_strides(buf, value.stride()):
            # Same memory layout as the value: a channels-last activation meeting a contiguous
            # gradient makes every elementwise backward take a slow strided path.
            buf = self.buffers[key] = torch.empty_like(value, device=device, memory_format=torch.preserve_format)
        return buf.copy_(value, non_blocking=True)

    def _frame_buffer(self, kind: str, parity: int, i: int, shape, dtype: torch.dtype,
                      aligned: bool = False) -> torch.Tensor:
        """The buffer (kind, parity) of stage ``i`` for a launch to write a frame into: ``shape``
        (``[B, C, 1, H, W]``) and ``dtype``, on stage ``i``'s device, its frame channels-last (the
        layout the grouped kernels write; ``aligned``: in 16-byte rows, ``ops.empty_frame``): the
        one there where it is so, else a new one."""
        key = (kind, parity, i)
        buf = self.buffers.get(key)
        B, C, _, H, W = shape
        row = row_length(C, dtype, aligned)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype or buf.device != self.device(i) \
                or not _same_strides(buf[:, :, 0], (H * W * row, 1, W * row, row)):
            buf = self.buffers[key] = empty_frame(B, C, H, W, dtype=dtype, device=self.device(i),
                                                  aligned=aligned).unsqueeze(2)
        return buf

    def held_bytes(self) -> int:
        """Bytes this engine keeps across ticks by construction (constant in the clip length):
        the sum of :meth:`held_by_kind`."""
        return sum(self.held_by_kind().values())

    def held_by_kind(self) -> dict:
        """What this engine keeps across ticks, in bytes, by kind: the layers' ``rings`` (a conv's
        last inputs), the temporal pools' ``pool rings``, the joins' ``FIFO slots`` (delay lines),
        the ``waiting errors`` (an error held for its producer's next firing), the ``double
        buffers`` (activations and errors between stages, and where the engine runs a stage itself a
        pooled stage's error at its conv and the stem's frame in the activations' dtype) and the
        ``held samples`` (each stage's copy of the last sample of the clip, for the drain) and the
        ``loss seeds`` (:meth:`_loss_seed`'s scalars).
        Everything else a tick allocates is freed by the end of the tick; the parameters'
        gradients, the optimizer's state and the backends' caches of weights are not the engine's."""
        seen: set = set()
        out: dict = {}
        for kind, tensors in self._persistent_by_kind().items():
            total = 0
            for t in tensors:
                storage = t.untyped_storage()
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    total += storage.nbytes()
            out[kind] = total
        return out

    def _persistent(self) -> list:
        return [t for tensors in self._persistent_by_kind().values() for t in tensors]

    def _persistent_by_kind(self) -> dict:
        _, layers, pools = self._local_members()
        return {"rings": [m._ring for m in layers if m._ring is not None],
                "pool rings": [n._ring for n in pools if n._ring is not None],
                "FIFO slots": [t for slots in self.fifo.values() for t in slots.values() if isinstance(t, torch.Tensor)],
                "waiting errors": list(self.queue.values()),
                "double buffers": [b for key, b in self.buffers.items() if key[0] != "held"],
                "held samples": [b for key, b in self.buffers.items() if key[0] == "held"],
                "loss seeds": list(self.seeds.values())}

    def addresses(self) -> tuple:
        """Where every tensor that lives across ticks is — rings, FIFO slots, waiting errors,
        double buffers, gradients and momentum buffers (None where there is none yet: a tick
        would create it): a captured tick is valid only on these."""
        ptr = lambda t: None if t is None else t.data_ptr()
        return (tuple(t.data_ptr() for t in self._persistent()), tuple(ptr(p.grad) for p in self._graph_params()),
                tuple(ptr(b) for b in self._momentum_buffers()))

    @staticmethod
    def state_key(state) -> tuple:
        """What of the Python state ``state`` (:meth:`python_state`) decides a tick's kernels
        beyond the addresses: which rings a first firing zeroes."""
        return tuple(state[1])

    # --- streaming state, streams, timing ----------------------------------------------------

    @contextlib.contextmanager
    def _streaming(self, mode: str, backend, optimizer, smoothing: int = 1):
        """Every streaming layer's state for a run. In Sideways mode a backend that groups weight
        updates (``kernels(...).group``) gets them held and run once per tick (:meth:`_tick`).
        Without a per-tick optimizer no weight changes within the run: the backends' forms of the
        weights are made once for it (``backend.constant_weights``)."""
        layers, updates, backends, named = [], {}, {}, []
        try:
            for k in range(self.lo, self.hi):
                name = _backend.resolve(self.device(k), backend)
                kernels = _backend.kernels(name)
                if mode == "sideways" and getattr(kernels, "group", None) is not None and name not in updates:
                    updates[name] = _backend.WeightUpdates(kernels)
                for i in self.stages[k]:
                    node = self.graph.nodes[i]
                    node.begin(mode)
                    streamed = node.layers if isinstance(node, ChainNode) else \
                        [node.module] if isinstance(node, ConvNode) else []
                    for layer in streamed:
                        named.append((node, layer, name,
                                      k == 0 and reads_video(self.graph, [i], self.inputs[0], layer)))
                        clock = node.clock if isinstance(node, ChainNode) else None
                        layer._stream = _Stream(mode, kernels, optimizer, clock=clock, smoothing=smoothing,
                                                updates=updates.get(name))
                        layers.append(layer)
                        backends.setdefault((name, activation_dtype(layer.weight)), []).append(layer)
            self._layers, self._members, self._updates = layers, self._find_members(), list(updates.values())
            self._accumulated = {k: self._autograd_params(k) for k in range(self.lo, self.hi)} \
                if mode == "sideways" else {}
            self._plain = {k: found for k in range(self.lo, self.hi) if (found := self._conv_relu_pool(k)) is not None} \
                if mode == "sideways" else {}
            if mode == "sideways":
                self._say_what_runs_alone(named)
            local = [i for k in range(self.lo, self.hi) for i in self.stages[k]]
            for i, (counter, tensor) in frame_counters(self.graph, local).items():
                self._counted[i] = [counter, tensor, 0]
                counter.engine = True
            with contextlib.ExitStack() as held:
                if optimizer is None and mode != "bp":  # (bp runs F.conv3d on the window, not the ops)
                    for (name, dtype), group in backends.items():
                        held.enter_context(_backend.constant_weights(name, group, dtype))
                yield
        finally:
            self._layers, self._members, self._updates, self._plain, self._accumulated = [], None, [], {}, {}
            for layer in layers:
                layer._stream = None
            counted, self._counted = self._counted, {}
            with torch.no_grad():
                for counter, tensor, n in counted.values():
                    counter.engine = False
                    if n:
                        tensor.add_(n)

    def _say_what_runs_alone(self, named: list) -> None:
        """Once per engine, one line naming the convs (``named``: (node, layer, backend, whether it
        reads the video)) that the Triton backend cannot put in a tick's grouped launches — off its
        box kernels (``triton.box_path`` says why: a stride, groups, channel counts, float32, …) —
        so each of their ops runs alone, on the general kernels: the same results, more launches.
        The video's conv (the RGB stem) needs no input gradient, and its ring and frame are stored
        in 16-byte rows: its input channels need not fill them."""
        mine = [(node, layer, video) for node, layer, backend, video in named if backend == "triton"]
        if self._said_alone or not mine:
            return
        from .triton import box_path
        alone = [(node, layer, reason) for node, layer, video in mine if (reason := box_path(
            layer.weight.device, activation_dtype(layer.weight), layer.stride[1:], layer.groups,
            (layer.out_channels,) if video else (layer.in_channels // layer.groups, layer.out_channels), ()))
            is not None]
        if alone:
            self._said_alone = True
            why: dict = {}
            for node, layer, reason in alone:
                sub = next(n for n, m in node.module.named_modules() if m is layer)
                why.setdefault(reason, []).append(f"{node.name}.{sub}" if sub else node.name)
            warnings.warn(f"on the Triton backend {len(alone)} of {len(mine)} convs run each op alone, outside the "
                          "tick's grouped launches (the same results, more launches): "
                          + "; ".join(f"{reason}: {', '.join(names)}" for reason, names in why.items()), stacklevel=5)

    def _conv_relu_pool(self, k: int) -> Optional[tuple]:
        """(conv, ReLU after it, pool after that) where stage ``k`` is one chain node whose module is
        a conv, its ReLU and maybe a max pool (:func:`conv_relu_pool`), on a backend that groups
        forwards and input gradients: a stage the engine can run itself (:meth:`_forwards_ahead`).
        Else None."""
        found = stage_conv_relu_pool(self.graph, self.stages[k])
        if found is None:
            return None
        kernels = found[0]._stream.kernels
        if getattr(kernels, "group_forwards", None) is None or getattr(kernels, "group_input_grads", None) is None:
            return None
        return found

    def _count_frames(self, plan: TickPlan) -> None:
        """After a tick (eager or replayed): one more for each counted node that fired on a valid
        sample (``LocalNode.frame_counter``); the counters are advanced when the run ends."""
        if self._counted:
            for i in counted_firings(plan, range(self.lo, self.hi), self._counted):
                self._counted[i][2] += 1

    def _fork(self) -> list:
        """One CUDA stream per stage on a GPU (None elsewhere), each waiting for everything
        issued so far on its device's current stream (the caller's, or a graph's capture
        stream): the last tick's work and buffers."""
        if self._streams is None:
            self._streams = [torch.cuda.Stream(self.device(i)) if self.device(i).type == "cuda" else None
                             for i in range(len(self.stages))]
        if not any(s is not None for s in self._streams):
            return self._streams
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


@dataclasses.dataclass
class _Own:
    """A stage the engine runs itself this tick (:meth:`Engine._forwards_ahead`): its conv, the
    next stage's double buffer its output goes into (``[B, C, 1, H, W]``), the error at the conv's
    output the forward's epilogue leaves (the one that arrived, masked in place; or, after a pool,
    its own buffer's), the sample it takes (the shape of the error it sends down), and the ring and
    slot of its forward."""
    layer: SidewaysConv3d
    out: torch.Tensor
    error: torch.Tensor
    input: torch.Tensor
    ring: torch.Tensor
    slot: int


def conv_relu_pool(module: torch.nn.Module) -> Optional[tuple]:
    """(conv, whether a ReLU follows it, whether a 1x2x2 max pool follows that) where ``module`` is,
    through plain ``nn.Sequential`` nesting, a SidewaysConv3d, optionally an ``nn.ReLU`` and then
    optionally an ``nn.MaxPool3d`` over 1x2x2 windows (C3D's blocks), with no hooks anywhere (a
    hook or a subclass may compute otherwise): a stage module the engine can run itself. Else None."""
    found = torch.nn.modules.module
    if found._global_forward_hooks or found._global_forward_pre_hooks or found._global_backward_hooks \
            or found._global_backward_pre_hooks:
        return None
    leaves = []

    def walk(m) -> bool:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
        if type(m) is torch.nn.Sequential:
            return all(walk(child) for child in m)
        leaves.append(m)
        return True
    if not walk(module) or not leaves or type(leaves[0]) is not SidewaysConv3d:
        return None
    relu = len(leaves) > 1 and type(leaves[1]) is torch.nn.ReLU
    rest = leaves[1 + relu:]
    pool = relu and len(rest) == 1 and _max_pool_2x2(rest[0])
    return (leaves[0], relu, pool) if len(rest) == pool else None


def stage_conv_relu_pool(graph: StreamGraph, nodes) -> Optional[tuple]:
    """:func:`conv_relu_pool` of a stage (``nodes``: its nodes' indices in ``graph``) that is one
    chain node, else None."""
    stage = [graph.nodes[i] for i in nodes]
    return conv_relu_pool(stage[0].module) if len(stage) == 1 and isinstance(stage[0], ChainNode) else None


def reads_video(graph: StreamGraph, stage_nodes, source: int, layer: SidewaysConv3d) -> bool:
    """Whether ``layer`` is the conv a stage's node (``stage_nodes``: the first stage's) applies
    first to the video (``source``: the graph's input): the RGB stem, which sends no error down."""
    for i in stage_nodes:
        node = graph.nodes[i]
        if list(node.inputs) == [source]:
            module = getattr(node, "module", None)
            if layer is (_leading_conv(module) if isinstance(node, ChainNode) else module):
                return True
    return False


def _max_pool_2x2(m: torch.nn.Module) -> bool:
    """Whether ``m`` is ``nn.MaxPool3d((1, 2, 2))``: 1x2x2 windows, stride, no padding or dilation, floor."""
    t = torch.nn.modules.utils._triple
    return type(m) is torch.nn.MaxPool3d and t(m.kernel_size) == (1, 2, 2) and t(m.stride) == (1, 2, 2) \
        and t(m.padding) == (0, 0, 0) and t(m.dilation) == (1, 1, 1) and not m.ceil_mode and not m.return_indices


def _conv_output(args: tuple) -> tuple:
    """The shape ``[B, C_out, 1, H', W']`` of the output frame of a ring op's forward (``args``:
    ``ring_conv_forward``'s)."""
    ring, _, _, weight, _, stride, padding, dilation = args[:8]
    return (ring.shape[1], weight.shape[0], 1, *ring_output_hw(ring, weight, stride, padding, dilation))


def _same_strides(t: torch.Tensor, strides) -> bool:
    """Whether ``t`` steps through memory as ``strides`` do, on every dimension it has more than
    one of (a dimension of size 1 is never stepped: its stride is free)."""
    return all(a == b for a, b, n in zip(t.stride(), strides, t.shape) if n > 1)


def _grouping(fn):
    """What decides which layers share a grouped call: the backend's function (each stage's
    backend wraps the same one)."""
    return getattr(fn, "__wrapped__", fn)


def _leading_conv(module: torch.nn.Module) -> Optional[SidewaysConv3d]:
    """The SidewaysConv3d a module's forward applies first to its input: down the first children
    of plain nn.Sequential modules (no hooks that could change the input; a subclass may
    compute otherwise), else None."""
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    while type(module) is torch.nn.Sequential and len(module) and not module._forward_pre_hooks and not hooks:
        module = module[0]
    return module if isinstance(module, SidewaysConv3d) and not module._forward_pre_hooks else None


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

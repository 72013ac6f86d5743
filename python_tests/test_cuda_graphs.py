"""CUDA-graph ticks, verified without a GPU: the pipeline's graph logic (which ticks are
steady, the phase a graph is keyed by, staged inputs and targets, gradient buffers, what the
pipeline redoes after a replay) runs with an emulated graph whose replay re-runs the captured
call with the Python state baked in at capture, as a real graph would. Its results must equal
eager ticks bit for bit (float64). Real capture and replay are tested in test_gpu.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from sideways_kernels import SidewaysPipeline
from sideways_kernels.cuda_graphs import TickGraphs, _EmulatedGraph
from sideways_kernels.schedule import TickPlan
from graphs import Residuals
from nets import DT, classifier_net, stages_of

# Temporal kernels 3, 2 and 3 with dilation: ring spans 3, 2 and 5. Every clip starts its rings
# afresh, so a clip's steady ticks meet the same phases as the last clip's: the first clip warms
# each phase up, the second captures it, the third and fourth replay it.
TEMPORAL = [(3, 1, 1), (2, 1, 1), (3, 2, 2)]


def _pipe(stages, graphs: bool, **kw) -> SidewaysPipeline:
    """A pipeline of ``stages``; with ``graphs``, on emulated CUDA graphs (a replay re-runs the
    capture with its Python state, as a real one would)."""
    pipe = SidewaysPipeline(stages, cuda_graph=graphs, **kw)
    if graphs:
        pipe._graphs = TickGraphs(emulate=True)
    return pipe


def _run(update: str, per_frame: bool, graphs: bool, clips=4, T=13, stages=3):
    torch.manual_seed(11)
    net = classifier_net(TEMPORAL, act=torch.nn.Tanh)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pipe = _pipe(stages_of(net, stages), graphs, update=update, optimizer=opt if update == "tick" else None)
    g = torch.Generator().manual_seed(5)
    results = []
    for _ in range(clips):
        video = torch.randn(2, 3, T, 9, 8, dtype=DT, generator=g)
        out_len = pipe.output_length(T)
        target = torch.randint(0, 7, (2, out_len) if per_frame else (2,), generator=g)
        r = pipe.backward_clip(video, target)
        results.append((r.loss, r.outputs, [p.grad.clone() if p.grad is not None else None for p in net.parameters()],
                        [p.detach().clone() for p in net.parameters()]))
        if update == "clip":
            opt.step()
            opt.zero_grad()
    return results, pipe


def _clips(pipe, net, shape: tuple, classes: int, seed: int, clips: int = 3) -> list:
    """(loss, outputs, gradients) of ``clips`` clips of random video ``shape``, gradients zeroed
    after each."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(clips):
        r = pipe.backward_clip(torch.randn(*shape, dtype=DT, generator=g), torch.randint(0, classes, (shape[0],),
                                                                                          generator=g))
        rows.append((r.loss, r.outputs, [p.grad.clone() for p in net.parameters()]))
        net.zero_grad()
    return rows


def _assert_same(a, b):
    for (la, oa, ga, wa), (lb, ob, gb, wb) in zip(a, b):
        assert torch.equal(la, lb) and torch.equal(oa, ob)
        for x, y in zip(ga, gb):
            assert (x is None and (y is None or not y.any())) or torch.equal(x, y)
        for x, y in zip(wa, wb):
            assert torch.equal(x, y)


@pytest.mark.parametrize("update,per_frame", [("clip", False), ("clip", True), ("tick", True)])
def test_graph_ticks_equal_eager_ticks(update, per_frame):
    eager, _ = _run(update, per_frame, graphs=False)
    graphed, pipe = _run(update, per_frame, graphs=True)
    assert pipe._graphs.captures >= 4 and pipe._graphs.replays >= pipe._graphs.captures
    _assert_same(graphed, eager)


def test_a_wrongly_keyed_graph_would_be_caught():
    """The check above can fail: keying the graphs by parity alone (forgetting the plan: ring
    slots, who fires) replays ticks with another tick's slots, and the gradients differ."""
    eager, _ = _run("clip", False, graphs=False)
    original = TickPlan.phase

    def parity_only(self, lo=0, hi=None):
        return self.tick % 2
    TickPlan.phase = parity_only
    try:
        graphed, pipe = _run("clip", False, graphs=True)
    finally:
        TickPlan.phase = original
    assert pipe._graphs.replays > 0
    with pytest.raises(AssertionError):
        _assert_same(graphed, eager)


def test_graphs_are_dropped_when_what_they_baked_in_changes():
    """A new learning rate (baked into the fused update) or clip length means new graphs."""
    torch.manual_seed(2)
    net = classifier_net(TEMPORAL[:2])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pipe = _pipe(stages_of(net, 2), True, update="tick", optimizer=opt)
    clip = lambda T: (torch.randn(2, 3, T, 9, 8, dtype=DT), torch.randint(0, 7, (2,)))
    pipe.backward_clip(*clip(12))
    pipe.backward_clip(*clip(12))
    assert pipe._graphs.graphs
    signature = pipe._graphs.signature
    opt.param_groups[0]["lr"] = 0.01
    pipe.backward_clip(*clip(12))
    assert pipe._graphs.signature != signature
    signature = pipe._graphs.signature
    pipe.backward_clip(*clip(10))
    assert pipe._graphs.signature != signature


def test_cuda_graph_falls_back_with_a_warning_where_it_cannot_capture():
    torch.manual_seed(4)
    net = classifier_net(TEMPORAL[:2])
    video, target = torch.randn(2, 3, 8, 9, 8, dtype=DT), torch.randint(0, 7, (2,))
    expected = SidewaysPipeline(stages_of(net, 2)).backward_clip(video, target)
    for p in net.parameters():
        p.grad = None
    pipe = SidewaysPipeline(stages_of(net, 2), cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="one CUDA device.*run eagerly"):
        got = pipe.backward_clip(video, target)
    assert torch.equal(got.loss, expected.loss)
    with warnings.catch_warnings():  # said once, not every clip
        warnings.simplefilter("error")
        pipe.backward_clip(video, target)
    bp = _pipe(stages_of(net, 2), True, mode="bp")
    with pytest.warns(RuntimeWarning, match="mode='bp'"):
        bp.backward_clip(video, target)
    pipe = _pipe(stages_of(net, 2), True, smoothing=2)
    with pytest.warns(RuntimeWarning, match="smoothing > 1"):
        pipe.backward_clip(video, target)
    pipe = _pipe(stages_of(net, 2), True)
    with pytest.warns(RuntimeWarning, match="not a tensor"):
        pipe.loss_fn = lambda logits, y: F.cross_entropy(logits, torch.full((logits.shape[0],), y))
        pipe.backward_clip(video, 3)


class _SyncsWhileCapturing(torch.nn.Tanh):
    """Tanh that, like an op syncing with the host, cannot be captured."""
    capturing = False

    def forward(self, x):
        if _SyncsWhileCapturing.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return super().forward(x)


def test_a_failed_capture_warns_naming_the_node_and_the_clip_still_equals_eager(monkeypatch):
    def run(graphs: bool):
        torch.manual_seed(11)
        net = classifier_net(TEMPORAL, act=_SyncsWhileCapturing)
        pipe = _pipe(stages_of(net, 3), graphs)
        return _clips(pipe, net, (2, 3, 9, 9, 8), 7, seed=5), pipe

    eager, _ = run(False)
    original = _EmulatedGraph.capture

    def capture(self, fn, restore):
        _SyncsWhileCapturing.capturing = True
        try:
            return original(self, fn, restore)
        finally:
            _SyncsWhileCapturing.capturing = False
    monkeypatch.setattr(_EmulatedGraph, "capture", capture)
    with pytest.warns(RuntimeWarning, match="capturing a tick failed at node 'stage 0' .*not permitted"):
        graphed, pipe = run(True)
    assert pipe._graphs.replays == 0 and pipe._graphs.failed
    for (la, oa, ga), (lb, ob, gb) in zip(graphed, eager):
        assert torch.equal(la, lb) and torch.equal(oa, ob) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_the_default_is_graphs_on_one_cuda_device_and_silently_eager_elsewhere():
    """cuda_graph=None (the default): no graphs and no warning on CPU; a pipeline that can tick
    in graphs but not this clip (a target that is not a tensor) stays silent too; cuda_graph
    must be None, True or False."""
    torch.manual_seed(4)
    net = classifier_net(TEMPORAL[:2])
    video, target = torch.randn(2, 3, 8, 9, 8, dtype=DT), torch.randint(0, 7, (2,))
    pipe = SidewaysPipeline(stages_of(net, 2))
    assert pipe.cuda_graph is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.backward_clip(video, target)
        assert pipe._graphs is None
        pipe._graphs = TickGraphs(emulate=True)  # as on a GPU
        pipe.loss_fn = lambda logits, y: F.cross_entropy(logits, torch.full((logits.shape[0],), y))
        pipe.backward_clip(video, 3)
    assert pipe._graphs.captures == 0 and not pipe._graphs.graphs
    with pytest.raises(ValueError, match="cuda_graph must be None"):
        SidewaysPipeline(stages_of(net, 2), cuda_graph="yes")


def _converted(update: str, graphs: bool, clips: int = 3, T: int = 8):
    """A converted network with residual joins, a temporal stride, BatchNorm with per-frame
    statistics (in training mode) and a pooled head, on clips shorter than its lag: no tick of a
    clip is a steady one."""
    torch.manual_seed(7)
    model = Residuals().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pipe = SidewaysPipeline.from_model(model, stages=3, batchnorm="frame", update=update,
                                       optimizer=opt if update == "tick" else None)
    if graphs:
        pipe._graphs = TickGraphs(emulate=True)
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(clips):
        r = pipe.backward_clip(torch.randn(2, 3, T, 8, 7, dtype=DT, generator=g), torch.randint(0, 6, (2,), generator=g))
        rows.append((r.loss, r.outputs, [p.grad.clone() if p.grad is not None else None for p in model.parameters()],
                     [p.detach().clone() for p in model.parameters()],
                     [b.clone() for b in model.buffers()]))
        if update == "clip":
            opt.step()
        opt.zero_grad()
    return rows, pipe


@pytest.mark.parametrize("update", ["clip", "tick"])
def test_a_converted_network_replays_every_tick_from_the_third_clip(update):
    """Fill and drain ticks are captured too (a network whose lag exceeds the clip has no steady
    tick), and in update="tick" the momentum buffers the first clip creates do not drop the
    graphs: the second clip captures, the third replays — with the eager results bit for bit
    (losses, outputs, gradients, weights, BatchNorm running statistics)."""
    eager, pipe = _converted(update, graphs=False)
    assert not any(plan.steady for plan in pipe._schedule(8, "sideways", True))
    graphed, pipe = _converted(update, graphs=True)
    ticks = pipe.total_ticks(8, "sideways")
    assert pipe._graphs.replays == ticks and pipe._graphs.captures >= ticks - 2
    for (la, oa, ga, wa, ba), (lb, ob, gb, wb, bb) in zip(graphed, eager):
        assert torch.equal(la, lb) and torch.equal(oa, ob)
        assert all((x is None and (y is None or not y.any())) or torch.equal(x, y) for x, y in zip(ga, gb))
        assert all(torch.equal(x, y) for x, y in zip(wa, wb)) and all(torch.equal(x, y) for x, y in zip(ba, bb))


def test_a_phase_that_zeroes_a_ring_at_the_clip_start_has_its_own_graph():
    """A layer without delay (its whole temporal padding on the past side) fires on frame 0 in the
    same phase as on frame 6 — but only the first firing of a run zeroes its ring (the clip's
    start padding). That Python fact keys the graphs too: replaying frame 6's graph at the next
    clip's start would convolve the last clip's frames (with 14 frames the ring ends holding frame
    13 where frame 0's window reads the start padding)."""
    def run(graphs: bool):
        torch.manual_seed(5)
        net = classifier_net([(3, 2, 1), (1, 0, 1)], act=torch.nn.Tanh)
        pipe = _pipe(stages_of(net, 1), graphs)  # ticks 0, 6 and 12 share a phase
        return _clips(pipe, net, (2, 3, 14, 7, 6), 7, seed=6), pipe

    eager, _ = run(False)
    graphed, pipe = run(True)
    assert pipe._graphs.replays > pipe.total_ticks(14, "sideways")
    for (la, oa, ga), (lb, ob, gb) in zip(graphed, eager):
        assert torch.equal(la, lb) and torch.equal(oa, ob) and all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("how", ["set_to_none", "zeros", "kept"])
def test_clip_gradients_are_handed_over_and_taken_back_once_free(how):
    """update="clip": the graphs' gradient buffers become the parameters' .grad at a clip's end
    (no copy: graphs cost no second set of gradients) and are taken back by the next clip once
    nobody holds them (zero_grad), so the graphs keep replaying on them; a gradient the user
    keeps is never overwritten (the next clip gets a new buffer). Results equal eager ticks."""
    def run(graphs: bool):
        torch.manual_seed(1)
        net = classifier_net(TEMPORAL[:2])
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        pipe = _pipe(stages_of(net, 2), graphs)
        g = torch.Generator().manual_seed(2)
        rows, kept, buffers = [], [], set()
        for _ in range(4):
            pipe.backward_clip(torch.randn(2, 3, 9, 8, 7, dtype=DT, generator=g), torch.randint(0, 7, (2,), generator=g))
            rows.append([p.grad.clone() for p in net.parameters()] + [p.detach().clone() for p in net.parameters()])
            buffers.add(next(net.parameters()).grad.data_ptr())
            if how == "kept":
                kept += [(p.grad, p.grad.clone()) for p in net.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=how != "zeros")
        assert all(torch.equal(t, value) for t, value in kept)
        return rows, buffers, pipe

    eager, _, _ = run(False)
    graphed, buffers, pipe = run(True)
    assert all(torch.equal(a, b) for x, y in zip(eager, graphed) for a, b in zip(x, y))
    if how == "kept":
        assert len(buffers) == 4
    else:
        assert len(buffers) == 1 and pipe._graphs.replays >= pipe.total_ticks(9, "sideways")


def test_python_state_sets_and_clears_the_gradients_and_sets_the_fresh_flags():
    """What a replay sets after the graph ran (emulated replays re-run the tick's Python, which
    makes the gradients and clears the rings' ``fresh`` flags itself, so they never see the
    setter): another gradient, then none; each layer's flag as given."""
    net = classifier_net([(3, 1, 1), (2, 1, 1)])
    pipe = SidewaysPipeline(stages_of(net, 2), cuda_graph=False)
    pipe.backward_clip(torch.randn(2, 3, 7, 9, 8, dtype=DT), torch.randint(0, 7, (2,)))
    engine = pipe.engine
    params = engine._graph_params()
    _, fresh = engine.python_state()
    other = [torch.zeros_like(p) for p in params]
    engine.python_state((other, fresh))
    assert all(p.grad is o for p, o in zip(params, other))
    engine.python_state(([None] * len(params), fresh))
    assert all(p.grad is None for p in params)
    with engine._streaming("sideways", None, None):  # (a run's layers: each one's flag)
        fresh = engine.python_state()[1]
        flags = [i % 2 == 0 for i in range(len(fresh))]
        assert len(flags) == 3 and flags != list(fresh)  # (two convs and the head)
        engine.python_state(([None] * len(params), flags))
        assert [layer._stream.fresh for layer in engine._layers] == flags == engine.python_state()[1]


def test_staged_inputs_and_a_new_signature_never_let_a_graph_replay_on_what_it_was_not_captured_on():
    """TickGraphs' own bookkeeping, which an emulated replay (it re-runs the tick's Python) cannot
    show wrong: a staged input of another dtype or shape gets a buffer of its own (not rounded into
    the old one); a new buffer changes the addresses a replay is checked against; a clip of a new
    signature (lr, loss, mode, ...) drops every graph, one of the same keeps them."""
    graphs = TickGraphs(emulate=True)

    class Engine:
        def addresses(self):
            return ()
    engine = Engine()
    first = graphs.stage("target", torch.tensor([0.5, 1.0], dtype=torch.float32), "cpu")
    before = graphs._addresses(engine)
    precise = torch.tensor([1 / 3, 2.0], dtype=torch.float64)
    staged = graphs.stage("target", precise, "cpu")
    assert staged.dtype == torch.float64 and torch.equal(staged, precise)
    assert graphs._addresses(engine) != before and first.data_ptr() != staged.data_ptr()
    assert graphs.stage("target", precise * 2, "cpu").data_ptr() == staged.data_ptr()  # same kind: reused
    graphs.begin_clip(("lr", 0.1))
    graphs.graphs[("phase", ())] = None
    graphs.begin_clip(("lr", 0.1))
    assert graphs.graphs == {("phase", ()): None}
    graphs.begin_clip(("lr", 0.2))
    assert graphs.graphs == {}


def test_what_lives_across_ticks_is_counted_and_pins_a_tick_s_graph():
    """Engine.held_by_kind counts, and Engine.addresses (what a captured tick is valid on) holds,
    every kind of tensor that lives across ticks: the temporal pools' rings, any double buffer
    whatever its kind (the engine's own stages keep "in" and "conv error" ones), and the per-tick
    optimizer's momentum buffers (a resumed optimizer's state replaces them)."""
    from graphs import Pools
    from sideways_kernels.graph import PoolNode
    torch.manual_seed(0)
    model = Pools().to(DT)
    video = torch.randn(2, 3, 9, 8, 7, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pipe = SidewaysPipeline.from_model(model, stages=2, update="tick", optimizer=opt, example=video[:1])
    pipe.backward_clip(video, torch.randint(0, 4, (2,)))
    engine = pipe.engine
    rings = [n._ring for n in pipe.graph.nodes if isinstance(n, PoolNode) and n._ring is not None]
    held = engine.held_by_kind()
    assert rings and held["pool rings"] == sum(r.untyped_storage().nbytes() for r in rings)
    before = engine.addresses()
    assert all(r.data_ptr() in before[0] for r in rings)
    extra = torch.zeros(16, dtype=DT)
    engine.buffers[("in", 0, 1)] = extra
    assert engine.held_by_kind()["double buffers"] == held["double buffers"] + extra.untyped_storage().nbytes()
    assert extra.data_ptr() in engine.addresses()[0]
    del engine.buffers[("in", 0, 1)]
    assert engine.addresses() == before
    p = next(p for p in opt.state if "momentum_buffer" in opt.state[p])
    opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    assert engine.addresses() != before


def test_a_capture_that_fails_after_its_python_ran_leaves_the_tick_as_it_found_it(monkeypatch):
    """A real capture runs the tick's Python (a first firing clears its ring's flag) before a kernel
    may refuse to be captured; the tick then runs eagerly from the state it had, so the ring a clip
    starts with is still zeroed: the same numbers as eager ticks. (An emulated capture that
    succeeds hides this: it runs the tick for real.)"""
    capture = _EmulatedGraph.capture

    def failing(self, fn, restore):
        grads, fresh = restore()
        if not any(fresh):
            return capture(self, fn, restore)
        restore((grads, [False] * len(fresh)))  # what the capture's Python did before a kernel refused
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(_EmulatedGraph, "capture", failing)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        graphed, pipe = _run("clip", False, graphs=True)
    assert any("capturing a tick failed" in str(w.message) for w in said)
    eager, _ = _run("clip", False, graphs=False)
    for (loss, outputs, grads, _), (loss_e, outputs_e, grads_e, _) in zip(graphed, eager):
        assert torch.equal(loss, loss_e) and torch.equal(outputs, outputs_e)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_e))

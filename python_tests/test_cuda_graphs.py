"""CUDA-graph ticks, verified without a GPU: the pipeline's graph logic (which ticks are
steady, the phase a graph is keyed by, staged inputs and targets, gradient buffers, what the
pipeline redoes after a replay) runs with an emulated graph whose replay re-runs the captured
call with the Python state baked in at capture, as a real graph would. Its results must equal
eager ticks bit for bit (float64). Real capture and replay are tested in test_gpu.py."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from sideways_kernels import SidewaysPipeline
from sideways_kernels.cuda_graphs import TickGraphs, _EmulatedGraph
from sideways_kernels.schedule import TickPlan
from nets import DT, classifier_net, stages_of

# Temporal kernels 3, 2 and 3 with dilation: ring spans 3, 2 and 5. Every clip starts its rings
# afresh, so a clip's steady ticks meet the same phases as the last clip's: the first clip warms
# each phase up, the second captures it, the third and fourth replay it.
TEMPORAL = [(3, 1, 1), (2, 1, 1), (3, 2, 2)]


def _run(update: str, per_frame: bool, graphs: bool, clips=4, T=13, stages=3):
    torch.manual_seed(11)
    net = classifier_net(TEMPORAL, act=torch.nn.Tanh)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pipe = SidewaysPipeline(stages_of(net, stages), update=update, optimizer=opt if update == "tick" else None,
                            cuda_graph=graphs)
    if graphs:
        pipe._graphs = TickGraphs(emulate=True)
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
    pipe = SidewaysPipeline(stages_of(net, 2), update="tick", optimizer=opt, cuda_graph=True)
    pipe._graphs = TickGraphs(emulate=True)
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
    bp = SidewaysPipeline(stages_of(net, 2), mode="bp", cuda_graph=True)
    bp._graphs = TickGraphs(emulate=True)
    with pytest.warns(RuntimeWarning, match="mode='bp'"):
        bp.backward_clip(video, target)
    pipe = SidewaysPipeline(stages_of(net, 2), cuda_graph=True, smoothing=2)
    pipe._graphs = TickGraphs(emulate=True)
    with pytest.warns(RuntimeWarning, match="smoothing > 1"):
        pipe.backward_clip(video, target)
    pipe = SidewaysPipeline(stages_of(net, 2), cuda_graph=True)
    pipe._graphs = TickGraphs(emulate=True)
    with pytest.warns(RuntimeWarning, match="not a tensor"):
        pipe.loss_fn = lambda logits, y: F.cross_entropy(logits, torch.full((logits.shape[0],), y))
        pipe.backward_clip(video, 3)


def test_a_failed_capture_warns_and_the_clip_still_equals_eager(monkeypatch):
    eager, _ = _run("clip", True, graphs=False, clips=2)

    def broken(self, fn, restore):
        # The capture got part-way through the tick's Python (no kernel runs while capturing),
        # then the driver refused.
        grads = restore()
        restore([None] * len(grads))
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(_EmulatedGraph, "capture", broken)
    with pytest.warns(RuntimeWarning, match="capturing a tick failed.*not permitted"):
        graphed, pipe = _run("clip", True, graphs=True, clips=2)
    assert pipe._graphs.replays == 0 and pipe._graphs.failed
    _assert_same(graphed, eager)

"""Mixed precision: pipelines under ``torch.autocast`` (CPU here, bfloat16 and float16; CUDA
autocast in test_gpu.py). SidewaysConv3d casts its frames to the autocast dtype, so rings,
activations and errors are 16-bit while weights, gradients and optimizer state stay float32
masters; the ops themselves compute in the dtypes they are given on every backend.

Oracles: bp mode under autocast is autograd of the clip loss under autocast; Sideways under
autocast differs from Sideways in float32 by rounding only (float16 keeps 11 bits, so that
check is sharp); the ops give bit-equal results inside and outside autocast."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from sideways_kernels import SidewaysConv3d, SidewaysPipeline, ops
from sideways_kernels.cuda_graphs import TickGraphs, _EmulatedGraph
from graphs import Residuals, objective, randomize_norms
from nets import classifier_net, clip_loss, grads, rel_error, stages_of
from samples import GEOMETRIES, make

TEMPORAL = [(3, 1, 1), (2, 0, 1), (3, 2, 2)]
BACKENDS = ["cpp", "torch"]
# (bp vs autograd under autocast, Sideways under autocast vs Sideways in float32), relative:
# float16 measured <= 0.002 for both over 6 seeds, bfloat16 keeps 3 bits fewer; a wrong pairing
# or cast is O(1).
TOL = {torch.bfloat16: (4e-2, 4e-2), torch.float16: (5e-3, 5e-3)}
LOW = list(TOL)


def _scaled(dtype):
    """(loss_fn, scale): float16 errors deep in a network underflow unless the loss is scaled (as
    torch.amp.GradScaler does); bfloat16 has float32's range."""
    scale = 2.0 ** 12 if dtype == torch.float16 else 1.0
    return (lambda logits, y: F.cross_entropy(logits, y) * scale), scale


def _net():
    # tanh, not ReLU: a ReLU whose input rounds across zero flips a mask, which in a net this
    # small moves gradients by percents in float32 vs float16 autograd alike
    return classifier_net(TEMPORAL, dtype=torch.float32, act=torch.nn.Tanh)


def _clip(T=11):
    return torch.randn(2, 3, T, 9, 10), torch.randint(0, 7, (2,))


def _a(g):
    return list(g.stride), list(g.padding), list(g.dilation), g.dilation_t, g.groups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_compute_in_the_dtypes_they_are_given_under_autocast(backend, dtype):
    """Autocast stays out of the ops: float32 in, float32 out; a bfloat16 ring with float32
    master weights gives what it gives outside autocast, bit for bit."""
    from sideways_kernels.backend import kernels
    k = kernels(backend)
    g = GEOMETRIES[1]
    t = make(g, dtype, param_dtype=torch.float32)
    a = _a(g)

    def run():
        ring, weight, bias = t["ring"].clone(), t["weight"].clone(), t["bias"].clone()
        out = k.ring_conv_forward(ring, t["frame"], t["slot"], weight, bias, *a)
        grad_in = k.window_input_grad(t["grad_out"], weight, [g.height, g.width], *a[:3], g.groups)
        gw, gb = torch.zeros_like(weight), torch.zeros_like(bias)
        k.weight_grad_accumulate(gw, gb, t["grad_out"], ring, t["slot"], *a)
        buf = torch.zeros_like(weight)
        k.sgd_tick_update(weight, buf, None, None, t["grad_out"], ring, t["slot"], *a, 0.1, 0.9, 0.0, 1e-3, False,
                          True)
        return out, grad_in, gw, gb, weight, buf

    plain = run()
    with torch.autocast("cpu", torch.bfloat16):
        under = run()
    assert under[0].dtype == under[1].dtype == dtype and under[2].dtype == torch.float32
    for x, y in zip(under, plain):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bp_mode_under_autocast_is_autograd_under_autocast(dtype, backend):
    net = _net()
    video, target = _clip()
    with torch.autocast("cpu", dtype):
        loss = clip_loss(net, video, target)
    loss.backward()
    expected = grads(net)
    net.zero_grad()
    with torch.autocast("cpu", dtype):
        result = SidewaysPipeline(stages_of(net, 2), mode="bp", backend=backend).backward_clip(video, target)
    assert result.outputs.dtype == dtype
    assert abs(result.loss.item() - loss.item()) <= TOL[dtype][0] * abs(loss.item())
    assert rel_error(grads(net), expected) <= TOL[dtype][0]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sideways_under_autocast_differs_from_float32_by_rounding_only(dtype, backend):
    net = _net()
    video, target = _clip()
    SidewaysPipeline(stages_of(net, 3), backend=backend).backward_clip(video, target)
    expected = grads(net)
    net.zero_grad()
    loss_fn, scale = _scaled(dtype)
    pipe = SidewaysPipeline(stages_of(net, 3), loss_fn, backend=backend)
    with torch.autocast("cpu", dtype):
        pipe.backward_clip(video, target)
    got = [g / scale for g in grads(net)]
    assert all(g.dtype == torch.float32 for g in got)
    rings = [m._ring for m in net.modules() if isinstance(m, SidewaysConv3d)]
    assert rings and all(r.dtype == dtype for r in rings)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert rel_error(got, expected) <= TOL[dtype][1]


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_a_graph_model_under_autocast(dtype):
    """from_model (residuals, strided branches, max-pool, BatchNorm): bp under autocast is
    autograd of the per-frame objective under autocast; Sideways runs with 16-bit rings and
    float32 gradients (its ReLUs and max-pool make float32 a poor yardstick here)."""
    model = randomize_norms(Residuals()).eval()
    video = torch.randn(2, 3, 13, 8, 9)
    target = torch.randint(0, 6, (2,))
    loss_fn, scale = _scaled(dtype)
    with torch.autocast("cpu", dtype):
        loss = objective(model.frames(video), target, loss_fn)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pipe = SidewaysPipeline.from_model(model, stages=3, loss_fn=loss_fn, mode="bp", example=video[:1])
    with torch.autocast("cpu", dtype):
        pipe.backward_clip(video, target)
    assert rel_error([p.grad for p in model.parameters()], expected) <= TOL[dtype][0]
    model.zero_grad()
    pipe.mode = "sideways"
    with torch.autocast("cpu", dtype):
        result = pipe.backward_clip(video, target)
    assert torch.isfinite(result.loss) and result.outputs.dtype == dtype
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(m._ring.dtype == dtype for m in model.modules() if isinstance(m, SidewaysConv3d))


def test_per_tick_sgd_under_autocast_keeps_float32_state():
    net = _net()
    start = [p.detach().clone() for p in net.parameters()]
    video, target = _clip(T=9)
    finals = {}
    for amp in (False, True):
        with torch.no_grad():
            for p, s in zip(net.parameters(), start):
                p.copy_(s)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        pipe = SidewaysPipeline(stages_of(net, 2), update="tick", optimizer=opt)
        with torch.autocast("cpu", torch.float16, enabled=amp):
            pipe.backward_clip(video, target)
        finals[amp] = [p.detach().clone() for p in net.parameters()]
        assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())
    steps = [a - s for a, s in zip(finals[False], start)]
    assert rel_error([b - s for b, s in zip(finals[True], start)], steps) <= 1e-2


def test_predict_under_autocast_is_the_model_under_autocast():
    net = _net().eval()
    video, _ = _clip(T=10)
    pipe = SidewaysPipeline(stages_of(net, 3))
    with torch.no_grad(), torch.autocast("cpu", torch.float16):
        got, expected = pipe.predict(video), net(video)
    assert got.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected.float(), rtol=5e-3, atol=5e-3)


def test_switching_autocast_between_clips_leaves_nothing_stale():
    """Rings follow the autocast dtype clip by clip: a float32 clip after a bfloat16 one is the
    first float32 clip again, bit for bit."""
    net = _net()
    pipe = SidewaysPipeline(stages_of(net, 2))
    video, target = _clip()
    first = pipe.backward_clip(video, target)
    g0 = grads(net)
    net.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        pipe.backward_clip(video, target)
    net.zero_grad()
    again = pipe.backward_clip(video, target)
    assert torch.equal(again.outputs, first.outputs)
    assert all(torch.equal(a, b) for a, b in zip(grads(net), g0))


def test_cuda_graph_ticks_under_autocast_capture_without_the_cast_cache():
    """A capture must record the casts (autocast's cache would bake in a copy made before it):
    captures run with the cache off, results equal eager ticks, and turning autocast off
    drops the graphs captured under it."""
    seen = []
    original = _EmulatedGraph.capture

    def capture(self, fn, restore):
        seen.append(torch.is_autocast_cache_enabled())
        return original(self, fn, restore)

    def run(graphs: bool, clips=4):
        torch.manual_seed(3)
        net = _net()
        pipe = SidewaysPipeline(stages_of(net, 3), cuda_graph=graphs)
        if graphs:
            pipe._graphs = TickGraphs(emulate=True)
        g = torch.Generator().manual_seed(4)
        out = []
        for _ in range(clips):
            video = torch.randn(2, 3, 12, 9, 10, generator=g)
            with torch.autocast("cpu", torch.bfloat16):
                r = pipe.backward_clip(video, torch.randint(0, 7, (2,), generator=g))
            out.append((r.outputs, grads(net)))
            net.zero_grad()
        return out, pipe

    eager, _ = run(False)
    _EmulatedGraph.capture = capture
    try:
        graphed, pipe = run(True)
    finally:
        _EmulatedGraph.capture = original
    assert pipe._graphs.captures > 0 and seen and not any(seen)
    for (oa, ga), (ob, gb) in zip(graphed, eager):
        assert torch.equal(oa, ob) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.backward_clip(*_clip(T=12))  # autocast off: a new signature
    assert not pipe._graphs.graphs or all(g is None for g in pipe._graphs.graphs.values())


def test_empty_ring_and_ops_keep_a_float64_clip_float64_under_autocast():
    """Autocast leaves float64 alone (as nn.Conv3d does): so does a streaming layer."""
    net = classifier_net(TEMPORAL)  # float64
    video = torch.randn(2, 3, 9, 9, 10, dtype=torch.float64)
    with torch.autocast("cpu", torch.bfloat16):
        result = SidewaysPipeline(stages_of(net, 2)).backward_clip(video, torch.randint(0, 7, (2,)))
    assert result.outputs.dtype == torch.float64
    assert all(m._ring.dtype == torch.float64 for m in net.modules() if isinstance(m, SidewaysConv3d))
    assert ops.empty_ring(2, 1, 1, 1, 1).dtype == torch.float32

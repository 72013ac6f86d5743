"""bench/tick_model.py: its FLOPs against an independent count (torch.utils.flop_counter on the
clip forward and backward of the same network, per layer and output frame), and its launch
counts against what the engine launches (a run on real tensors, and the backend's op calls
counted by wrapping them)."""
import contextlib
import dataclasses
import io
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import tick_model as tm  # noqa: E402
from graphs import Residuals  # noqa: E402
from sideways_kernels import SidewaysConv3d, SidewaysPipeline, backend, models  # noqa: E402

T = 5


def _c3d():
    torch.manual_seed(0)
    net = models.c3d(5, widths=(4, 6, 8, 8), conv=SidewaysConv3d)
    return net, SidewaysPipeline(models.stages(net, 4))


def _residuals():
    torch.manual_seed(0)
    net = Residuals()
    return net, SidewaysPipeline.from_model(net, stages=2, batchnorm="frame")


@pytest.mark.parametrize("make", [_c3d, _residuals], ids=["c3d", "residuals"])
def test_flops_per_call_equal_the_clip_flops_per_output_frame(make):
    """Every conv's forward, and its input and weight gradient, per call = flop_counter's count
    for that layer on the whole clip (forward, and backward) over the frames it outputs."""
    net, pipe = make()
    ticks = tm.record(net, pipe, 2, 16, T, amp=False, fake=True).ticks
    per_call: dict = {}
    for tick in ticks:
        for launch in tick:
            if launch.layer is not None:
                assert per_call.setdefault((launch.layer, launch.kind), launch.flops) == launch.flops
    frames_out = {}
    convs = {n: m for n, m in net.named_modules() if isinstance(m, SidewaysConv3d)}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: frames_out.__setitem__(n, o.shape[2]))
             for n, m in convs.items()]
    with FlopCounterMode(display=False) as counter:
        out = net(torch.randn(2, 3, T, 16, 16))
        out.sum().backward()
    for h in hooks:
        h.remove()
    counts = counter.get_flop_counts()
    prefix = type(net).__name__
    assert {layer for layer, _ in per_call} == set(convs)
    for name, m in convs.items():
        got = {str(op): n for op, n in counts[f"{prefix}.{name}"].items()}
        t_out = frames_out[name]
        assert per_call[(name, "forward")] * t_out == got["aten.convolution"]
        if m.weight[0].numel() > m.in_channels:  # (flop_counter counts a strided 1x1x1 conv's backward otherwise)
            backward = per_call[(name, "weight_accumulate")] + per_call.get((name, "input_grad"), 0.0)
            assert backward * t_out == got["aten.convolution_backward"]


class _Counted:
    """The backend's ops, counted per tick."""

    def __init__(self):
        self.ticks: list = []
        self.real = backend.kernels

    def kernels(self, name):
        ops = self.real(name)
        wrapped = {}
        for op in backend.OPS:
            def call(*a, _op=op, _fn=getattr(ops, op), **kw):
                self.ticks[-1].append(_op)
                return _fn(*a, **kw)
            wrapped[op] = call
        return type(ops)(**wrapped)


@pytest.mark.parametrize("make,update", [(_c3d, "tick"), (_residuals, "clip")], ids=["c3d-tick", "residuals-clip"])
def test_launch_counts_are_what_the_engine_launches(make, update, monkeypatch):
    """Per tick, the launches counted on fake tensors are those of a run on real tensors, the
    sideways ops among them are the calls the engine makes to the backend, and the report prints
    the count of the tick it shows; a chain's tick is planned in at most 4 launches."""
    net, pipe = make()
    if update == "tick":
        pipe.update, pipe.optimizer = "tick", torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    got = tm.record(net, pipe, 2, 16, T, amp=False, fake=True)
    fake, plans = got.ticks, got.plans
    counted = _Counted()
    monkeypatch.setattr(backend, "kernels", counted.kernels)
    tick = pipe.engine._tick

    def each_tick(*a, **kw):
        counted.ticks.append([])
        return tick(*a, **kw)
    monkeypatch.setattr(pipe.engine, "_tick", each_tick)
    real = tm.record(net, pipe, 2, 16, T, amp=False, fake=False).ticks
    assert len(fake) == len(real) == len(plans) == len(counted.ticks) // 2  # (a warm-up clip, then the counted one)
    for f, r, calls in zip(fake, real, counted.ticks[len(real):]):
        assert [l.op for l in f] == [l.op for l in r]
        assert [l.op.split(".", 1)[1] for l in f if l.op.startswith("sideways.")] == calls
    shown = tm.summarize(fake, plans)
    assert shown.launches == fake[shown.index] and len(shown.launches) > 10
    schedule = pipe._schedule(T, "sideways", True)
    names = {id(m): n for n, m in net.named_modules()}
    for launches, plan in zip(fake, plans):  # the tick plan a grouped executor would take: the same GEMMs
        layers = lambda node: node.layers if hasattr(node, "layers") else [node.module]
        planned = [(names[id(layers(pipe.graph.nodes[q.node])[q.layer])], q.op) for q in schedule.problems(plan)]
        launched = [(l.layer, "weight" if l.kind.startswith("weight") else l.kind) for l in launches if l.layer]
        assert sorted(planned) == sorted(launched)
    if make is _c3d:  # one conv per stage but the head's in the last: two waves of forwards and input gradients
        assert tm.planned_launches(shown.launches, schedule.problems(plans[shown.index]))[0] == 2 + 2 + 1 + 1

    costs = tm.LaunchCosts(50, 0.5, 20.0, 100.0)
    monkeypatch.setattr(tm, "build", lambda *a, **kw: (net, pipe))
    monkeypatch.setattr(tm, "launch_costs", lambda: costs)
    out = io.StringIO()
    result = tm.report("c3d", 2, 16, T, 4, update, out=out)
    # (the report records bf16 ticks, as autocast runs them: the RGB stem's padded image is 16-bit only)
    shown = tm.record(net, pipe, 2, 16, T, fake=True).ticks[result["shown"]]
    assert result["launches"] == tm.launch_count(shown)
    sideways = [l for l in shown if l.op.startswith("sideways.")]
    assert (f"today: {result['launches']} kernel launches this tick ({len(sideways)} sideways ops in "
            f"{tm.launch_count(sideways)} kernels") in out.getvalue()


def test_the_frames_the_engine_counts_are_the_batch_norms_per_frame_adds_it_saves():
    """counted_frames — the kernels of the code the GPU measured that the engine now saves, a
    BatchNorm's num_batches_tracked add each frame — is what a run adds to those counters; a
    BatchNorm with momentum None counts its frames itself (each add still a kernel) and is not
    among them."""
    net, pipe = _residuals()
    net.bn2.momentum = None
    got = tm.record(net, pipe, 2, 16, T, amp=False, fake=False)
    counters = lambda: [m.num_batches_tracked.item() for m in (net.bn1, net.bn2)]
    before = counters()
    pipe.backward_clip(torch.randn(2, 3, T, 16, 16), torch.zeros(2, dtype=torch.long))
    added = [a - b for a, b in zip(counters(), before)]
    assert added[0] > 0 and added[1] > 0
    assert tm.counted_frames(pipe, got.plans) == added[0]


def test_a_stage_s_gradient_adds_count_one_launch_today_and_one_each_for_the_code_measured(monkeypatch):
    """The engine adds a stage's parameter gradients in one launch a tick (Engine._add_gradients)
    where autograd launched an add_ each, as the code the GPU measured did: per tick, the launches
    today are the per-parameter path's less those adds plus one, and the code measured's count is
    the per-parameter path's (what the launch price is inferred over)."""
    from sideways_kernels import engine
    net, pipe = _residuals()
    ours = tm.record(net, pipe, 2, 16, T, amp=False, fake=True).ticks
    monkeypatch.setattr(engine.Engine, "_accumulating_once", lambda self, k: contextlib.nullcontext())
    theirs = tm.record(net, pipe, 2, 16, T, amp=False, fake=True).ticks
    adds = [sum(l.op == "aten.add_" for l in tick) - sum(l.op == "aten.add_" for l in mine)
            for tick, mine in zip(theirs, ours)]
    assert sum(adds) > 0
    for tick, mine, n in zip(theirs, ours, adds):
        assert tm.launch_count(mine, held=False) == tm.launch_count(tick, held=False)
        assert tm.launch_count(mine) == tm.launch_count(tick) - n + (n > 0)


def test_the_loss_seed_counts_no_launch_today_and_two_for_the_code_measured():
    """The engine seeds a loss tick's backward with a kept 1/frames (Engine._loss_seed) where
    autograd launched ones_like and the division's backward, as the code the GPU measured did: a
    tick whose top stage takes a frame's loss and runs its backward records one LOSS_SEED, no
    kernel today and those two for the code measured (what the launch price is inferred over);
    no tick launches ones_like."""
    net, pipe = _residuals()
    got = tm.record(net, pipe, 2, 16, T, amp=False, fake=True)
    assert len(got.ticks) == len(got.plans)
    top = [plan.stages[-1] for plan in got.plans]
    expected = [int(sp.out is not None and sp.out[1] and sp.backward) for sp in top]
    assert sum(expected) > 0
    assert [sum(l.op == tm.LOSS_SEED for l in tick) for tick in got.ticks] == expected
    seeds = [l for tick in got.ticks for l in tick if l.op == tm.LOSS_SEED]
    assert all(l.kernels == 0 and l.kernels_derived == 2 for l in seeds)
    assert not any(l.op == "aten.ones_like" for tick in got.ticks for l in tick)


def test_a_launch_is_priced_from_the_reference_clip_s_measured_ticks(monkeypatch):
    """launch_costs: the reference clip's launches a tick as the code measured launched them (forms
    derived per call, every BatchNorm counting each frame), its modelled math, and the per-launch
    costs that close the gap to its measured graph and eager ticks."""
    net, pipe = _residuals()
    monkeypatch.setattr(tm, "build", lambda *a, **kw: (net, pipe))
    monkeypatch.setattr(tm, "REFERENCE_TICK", dict(model="residuals", batch=2, size=16, frames=T, stages=2,
                                                   update="clip", eager_fps=50.0, graph_fps=400.0))
    costs = tm.launch_costs()
    got = tm.record(net, pipe, 2, 16, T)
    ticks = [tm.summarize(got.ticks, got.plans, i) for i in range(len(got.ticks))]
    n = (sum(tm.launch_count(t.launches, held=False) for t in ticks) + tm.counted_frames(pipe, got.plans)) / len(ticks)
    assert tm.counted_frames(pipe, got.plans) > 0 and costs.launches == round(n)
    modelled = sum(t.gemm_us["today"] + t.other_us for t in ticks) / len(ticks) / 1e3
    graph, eager = (tm.measured_tick_ms(fps, 2, T, len(ticks)) for fps in (400.0, 50.0))
    assert costs.modelled_ms == pytest.approx(modelled)
    assert costs.graph_us == pytest.approx(max(graph - modelled, 0.0) * 1e3 / n)
    assert costs.eager_us == pytest.approx((eager - graph) * 1e3 / n)


@pytest.mark.parametrize("make,update", [(_residuals, "clip"), (_c3d, "tick")], ids=["residuals-clip", "c3d-tick"])
def test_the_engine_keeps_nothing_across_ticks_but_what_held_bytes_counts(make, update):
    """On real tensors, after a warm-up clip: whatever a tick allocates is gone when it ends, but
    for the gradients and what it hands its caller (outputs, losses) — so a clip's memory is the
    parameters, gradients, Engine.held_by_kind() and one tick's temporaries — and held_bytes is
    what the rings, FIFO slots, waiting errors and buffers hold."""
    net, pipe = make()
    if update == "tick":
        pipe.update, pipe.optimizer = "tick", torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    got = tm.record(net, pipe, 2, 16, T, amp=False, fake=False)
    assert tm.kept_across_ticks(got) == {}
    assert all(peak > 0 for peak in got.peaks)
    engine = pipe.engine
    expected = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in engine._persistent()}
    assert engine.held_bytes() == sum(got.held.values()) == sum(expected.values()) > 0
    assert got.held["rings"] == sum(m._ring.untyped_storage().nbytes() for m in net.modules()
                                    if isinstance(m, SidewaysConv3d))


def test_built_weight_launches_count_what_the_triton_backend_groups():
    """The report's "built so far" line, in a tick where all five convs of a small C3D update:
    the convs on the box path (8 -> 8 channels, and the stem 3 -> 8: its rings in 16-byte rows)
    grouped — one GEMM, one finish for their weights and biases —, the others (4 or 6 channels;
    the 5-class head) alone, 2 launches and a bias sum and step each. Widths 4, 6, 8, 8: 1 grouped
    (2) + 4 alone (16); widths 8, 8, 8, 8: 4 grouped (2) + the head (4)."""
    for widths, count, how in (((4, 6, 8, 8), 2 + 16, "1 layers grouped in 2 launches (1 kernel shapes), 4 alone in 16"),
                               ((8, 8, 8, 8), 2 + 4, "4 layers grouped in 2 launches (1 kernel shapes), 1 alone in 4")):
        net = models.c3d(5, widths=widths, conv=SidewaysConv3d)
        pipe = SidewaysPipeline(models.stages(net, 4))
        schedule = pipe._schedule(T, "sideways", True)
        full = [ps for ps in (schedule.problems(plan) for plan in schedule) if sum(q.op == "weight" for q in ps) == 5]
        assert full
        assert tm.built_weight_launches(pipe, full[0]) == (count, how)


def test_built_first_conv_launches_count_the_stages_first_convs_grouped():
    """The report's "built so far" lines of forwards and input gradients, in a tick where all
    five convs of a small C3D push a frame and run forwards, and one where four send errors down:
    each upper stage's first conv on the box path grouped with the others (one launch per kernel
    shape; a forward's also per epilogue: C3D's lower blocks, run by the engine with their pool,
    apart from the top's), the stem's forward too (the engine runs its stage: the video's frame
    copied into a channels-last one; it sends no error) and the head alone. Widths 8, 8, 8, 8:
    four forwards in two launches + 1, three input gradients in one + 2 (the head's too); widths
    4, 6, 8, 8: one on the box path, nothing to group."""
    for widths, grouped in (((4, 6, 8, 8), False), ((8, 8, 8, 8), True)):
        net = models.c3d(5, widths=widths, conv=SidewaysConv3d)
        pipe = SidewaysPipeline(models.stages(net, 4))
        schedule = pipe._schedule(8, "sideways", True)  # (at T=5 the stages all run only in the drain)
        problems = [schedule.problems(plan) for plan in schedule]
        forwards = [ps for ps in problems if [q.action for q in ps if q.op == "forward"] == ["push"] * 5]
        grads = [ps for ps in problems if sum(q.op == "input_grad" for q in ps) == 4]
        assert forwards and grads
        for op, ps, n in (("forward", forwards[0], 5), ("input_grad", grads[0], 4)):
            what = "forwards ahead" if op == "forward" else "input gradients after the backwards"
            launches, kinds, m = (2, "2 kernel shapes and epilogues", 4) if op == "forward" else (1, "1 kernel shapes", 3)
            expected = ((n - m + launches, f"{m} stages' first {what} in {launches} launches ({kinds}), {n - m} alone")
                        if grouped else (n, f"no two stages' first convs to group; {n} alone"))
            assert tm.built_first_conv_launches(pipe, ps, op) == expected, (widths, op)


def test_the_stages_the_engine_runs_itself_are_the_conv_relu_pool_stages_below_the_top():
    """The report's line on the stages the engine runs itself: in ``--model chain`` every stage but
    the top (its head and loss), stem included; C3D's blocks (conv, ReLU, 1x2x2 max pool) but the
    top's; R(2+1)D's (two convs a block) none; a hook on a stage's ReLU takes that stage out."""
    net = tm.chain(4, width=8)
    assert set(tm.own_stages(SidewaysPipeline(list(net)))) == {0, 1, 2}
    handle = net[1][1].register_forward_hook(lambda *args: None)
    assert set(tm.own_stages(SidewaysPipeline(list(net)))) == {0, 2}
    handle.remove()
    c3d = models.c3d(5, widths=(8, 8, 8, 8), conv=SidewaysConv3d)
    own = tm.own_stages(SidewaysPipeline(models.stages(c3d, 4)))
    assert set(own) == {0, 1, 2} and all(pool for _, _, pool in own.values())
    r21d = models.r2plus1d(5, widths=(8, 8, 8, 8), conv=SidewaysConv3d)
    assert tm.own_stages(SidewaysPipeline(models.stages(r21d, 4))) == {}


def test_today_s_count_groups_the_stages_first_input_gradients_the_dispatch_sends_to_triton():
    """Today's dispatch sends sm_90's bf16 input gradients to Triton, so the engine groups the
    stages' first convs' ones: in the recording those launches share one kernel a tick (the
    first counts it, the others 0); the forwards (cuDNN's, per layer) and every other layer's
    input gradient keep their own."""
    net = models.c3d(5, widths=(8, 8, 8, 8), conv=SidewaysConv3d)
    pipe = SidewaysPipeline(models.stages(net, 4))
    assert tm.today("input_grad") == "triton" and tm.today("forward") == "torch"
    firsts = {"1.0", "2.0", "3.0"}  # the upper stages' first convs (the stem sends no error; 4.1 is the head)
    grouped = 0
    for tick in tm.record(net, pipe, 2, 16, 8).ticks:
        mine = [l.kernels for l in tick if l.kind == "input_grad" and l.layer in firsts]
        if len(mine) >= 2:
            assert mine == [1] + [0] * (len(mine) - 1)
            grouped += 1
        else:
            assert all(k >= 1 for k in mine)
        assert all(l.kernels >= 1 for l in tick if (l.kind != "input_grad" or l.layer not in firsts)
                   and l.op != tm.LOSS_SEED)
    assert grouped >= 3


def test_an_op_is_priced_at_the_dispatch_s_backend_and_the_measured_shape_nearest_its_channels(monkeypatch):
    """gemm_us: a launch with the FLOPs of a measured shape takes that shape's measured GPU time
    (the table named, or "today": the backend dispatch.json picks for the op); a layer between
    shapes takes the rate of the nearest in (C_in, C_out, positions); a tick's time from a clip's
    frames/s."""
    shapes = tm.GPU["shapes"]
    flops = lambda s: 2 * s[2] * s[3] * s[3] * s[1] * s[0] * 27
    at = lambda s, kind="forward", f=None: tm.Launch("sideways.x", kind, "l", f or flops(s), 0.0,
                                                     f"{s[0]}->{s[1]} {s[3]}x{s[3]} k3x3x3")
    for i, s in enumerate(shapes):
        for table in ("cudnn", "triton"):
            assert tm.gemm_us(at(s), table) == pytest.approx(tm.GPU["graph_us"][table]["forward"][i])
    ops = {"forward": "ring_conv_forward", "input_grad": "window_input_grad",
           "weight_accumulate": "weight_grad_accumulate", "weight_sgd": "sgd_tick_update"}
    assert all(tm.today(kind) == backend.choose(op, torch.bfloat16, "sm_90") for kind, op in ops.items())
    on = lambda launch, backend_name: dataclasses.replace(launch, today=backend_name)  # (what today_for recorded)
    assert tm.gemm_us(on(at(shapes[1], "input_grad"), "triton"), "today") == pytest.approx(
        tm.GPU["graph_us"]["triton"]["input_grad"][1])
    assert tm.gemm_us(on(at(shapes[1], "input_grad"), "torch"), "today") == pytest.approx(
        tm.GPU["graph_us"]["torch"]["input_grad"][1])  # (a call the dispatch sends to cuDNN: a strided one's)
    assert tm.gemm_us(on(at(shapes[1], "weight_sgd"), "torch"), "today") == pytest.approx(
        tm.GPU["graph_us"]["torch"]["weight_sgd"][1])
    # a recorded call: Triton's input gradient where its box kernels take it (what the H100 measured),
    # cuDNN where it would take the general kernels (strided; channels not in 16-byte rows)
    bf16 = lambda *shape: torch.zeros(shape, dtype=torch.bfloat16)
    grad_in = lambda c_in, c_out, stride, size: ("window_input_grad", (
        bf16(2, c_out, size, size), torch.zeros(c_out, c_in, 3, 3, 3), [8, 8], stride, [1, 1], [1, 1], 1))
    assert tm.today_for(*grad_in(64, 64, [1, 1], 8)) == tm.today("input_grad") == "triton"
    assert tm.today_for(*grad_in(64, 64, [2, 2], 4)) == "torch"
    assert tm.today_for(*grad_in(45, 64, [1, 1], 8)) == "torch"
    # where the dispatch measured a layer's channels, that layer's choice (the nearest frame size's)
    sm_90 = backend.table()["measured"]["sm_90"]
    layer_64 = {"window_input_grad": {"bfloat16": [dict(channels=[64, 64], positions=2 * 8 * 8, backend="torch")]}}
    monkeypatch.setitem(sm_90, "shapes", {**sm_90.get("shapes", {}), **layer_64})
    assert tm.today_for(*grad_in(64, 64, [1, 1], 8)) == "torch"
    assert tm.today_for(*grad_in(64, 128, [1, 1], 8)) == "triton"  # channels not measured: the op's choice
    between = at((96, 200, 16, 28))  # nearest (128, 256, B16 28²): log distance 0.78; (128, 128, B8 28²): 2.06
    rate = lambda i: flops(shapes[i]) / tm.GPU["graph_us"]["cudnn"]["forward"][i]
    assert tm.gemm_us(between, "cudnn") == pytest.approx(flops((96, 200, 16, 28)) / rate(3))
    assert tm.measured_tick_ms(7542, 8, 48, 54) == pytest.approx(8 * 48 / 7542 / 54 * 1e3)
    # the RGB stem on Triton's box kernels: its 3 channels stepped through 16 at a time (cuDNN's rate as measured);
    # an input gradient steps through the error's channels (the layer's output channels): 24 in a block of 64
    stem = tm.Launch("sideways.x", "forward", "l", flops((64, 64, 8, 56)) * 3 / 64, 0.0, "3->64 56x56 k3x3x3")
    down = tm.Launch("sideways.x", "input_grad", "l", flops((64, 64, 8, 56)) * 24 / 64, 0.0, "64->24 56x56 k3x3x3")
    us = lambda launch, table: launch.flops / (tm._rate(table, launch.kind, tm._problem(launch)) * 1e12) * 1e6
    assert tm.channel_waste(stem) == 16 / 3 and tm.channel_waste(down) == 64 / 24 and tm.channel_waste(at(shapes[0])) == 1
    # r3d_18's, strided: the general kernels fold its 3 channels x 147 taps into 441 of K, 7 blocks of 64
    strided = dataclasses.replace(stem, shape="3->64 112x112 k3x7x7 s1x2x2")
    assert tm.channel_waste(strided) == tm.channel_waste(dataclasses.replace(strided, kind="weight_sgd")) == 448 / 441
    assert tm.channel_waste(dataclasses.replace(strided, shape="4->64 112x112 k3x7x7 s1x2x2")) == 640 / 588
    assert tm.channel_waste(dataclasses.replace(strided, shape="5->64 112x112 k3x7x7 s1x2x2")) == 16 / 5  # not folded
    assert tm.gemm_us(stem, "triton") == pytest.approx(16 / 3 * us(stem, "triton"))
    assert tm.gemm_us(dataclasses.replace(stem, today="triton"), "today") == pytest.approx(tm.gemm_us(stem, "triton"))
    assert tm.gemm_us(down, "triton") == pytest.approx(64 / 24 * us(down, "triton"))
    assert tm.gemm_us(stem, "cudnn") == pytest.approx(us(stem, "cudnn"))


def test_a_sideways_op_counts_the_kernels_it_launches_under_today_s_dispatch(monkeypatch):
    """kernels_today: the torch backend's forward is the ring write, the weight's two derivations,
    the convolution and the bias — three without the derivations where the run holds the weight's
    forms; Triton's input gradient one kernel, and its weight derivation's where not held; the SGD
    tick's fused step counted though it cannot run on fake tensors."""
    import sideways_kernels.triton as triton_backend
    from samples import Geometry, make
    g = Geometry(2, 8, 16, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    t = make(g, torch.bfloat16, torch.float32)
    conv = (list(g.stride), list(g.padding), list(g.dilation), 1, 1)
    forward = (t["ring"], t["frame"], 1, t["weight"], t["bias"], *conv)
    down = (t["grad_out"], t["weight"], [6, 7], *conv[:3], 1)
    monkeypatch.setattr(tm, "_KERNELS_TODAY", {})
    monkeypatch.setattr(tm, "today", lambda kind, layer=None: "torch")
    assert tm.kernels_today("ring_conv_forward", forward, held=False) == 5
    assert tm.kernels_today("ring_conv_forward", forward, held=True) == 3
    # the same shapes in another layout are another count (a ring not in the ops' layout is copied
    # into one to be read as an image): the count is kept per layout, not per shape
    other = (t["ring"].contiguous(),) + forward[1:]
    assert tm.kernels_today("ring_conv_forward", other, held=True) > 3
    # an RGB stem's ring image (3 channels x 3 slots) is padded to 16 channels on CUDA, as a GPU runs
    # it (these are CPU tensors): a layer's ring holds the zero channels itself, read in place; a
    # ring of another layout is copied into a zeroed image, two kernels more in the forward and the
    # weight gradient (the code the GPU measured had no pad)
    stem = Geometry(2, 3, 16, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    s = make(stem, torch.bfloat16, torch.float32)
    stem_forward = (s["ring"], s["frame"], 1, s["weight"], s["bias"], *conv)
    stem_update = (torch.zeros_like(s["weight"]), torch.zeros_like(s["bias"]), s["grad_out"], s["ring"], 1, *conv)
    assert tm.kernels_today("ring_conv_forward", stem_forward, held=True) == 3
    assert tm.kernels_today("ring_conv_forward", stem_forward, held=True, measured=True) == 3
    contiguous = (s["ring"].contiguous(),)
    assert tm.kernels_today("ring_conv_forward", contiguous + stem_forward[1:], held=True) == \
        tm.kernels_today("ring_conv_forward", contiguous + stem_forward[1:], held=True, measured=True) + 2
    assert tm.kernels_today("weight_grad_accumulate", stem_update, held=True) == \
        tm.kernels_today("weight_grad_accumulate", stem_update, held=True, measured=True)
    update = stem_update[:3] + contiguous + stem_update[4:]
    assert tm.kernels_today("weight_grad_accumulate", update, held=True) == \
        tm.kernels_today("weight_grad_accumulate", update, held=True, measured=True) + 2
    stem_sgd = (s["weight"], torch.zeros_like(s["weight"]), s["bias"], torch.zeros_like(s["bias"]), s["grad_out"],
                s["ring"], 1, *conv, 0.1, 0.9, 0.0, 0.0, False, False)
    assert tm.kernels_today("sgd_tick_update", stem_sgd, held=True) == \
        tm.kernels_today("sgd_tick_update", stem_sgd, held=True, measured=True)
    sgd = (t["weight"], torch.zeros_like(t["weight"]), t["bias"], torch.zeros_like(t["bias"]), t["grad_out"], t["ring"],
           1, *conv, 0.1, 0.9, 0.0, 0.0, False, False)
    assert tm.kernels_today("sgd_tick_update", sgd, held=False) >= 3  # the gradient, the bias's sum, the fused step
    monkeypatch.setattr(tm, "today_for", lambda name, args: "triton")  # (every call on Triton, strided ones too)
    assert tm.kernels_today("window_input_grad", down, held=True, measured=True) == 1
    derive = tm._Kernels()  # the taps' sum, flipped, cast and laid out: what the box input gradient derives
    with derive:
        triton_backend._derive(t["weight"], torch.bfloat16, True, True)
    assert derive.n > 2 and tm.kernels_today("window_input_grad", down, held=False, measured=True) == 1 + derive.n
    # where the box kernel splits over K on the GPU's SMs (256 channels at 14², B8), its partials' sum
    # too — not in the code the GPU measured (before the split)
    with torch.device("meta"):
        small = (torch.empty(8, 256, 14, 14, dtype=torch.bfloat16), torch.empty(256, 256, 3, 3, 3), [14, 14],
                 [1, 1], [1, 1], [1, 1], 1)
        large = (torch.empty(8, 256, 56, 56, dtype=torch.bfloat16),) + small[1:2] + ([56, 56],) + small[3:]
    assert tm.kernels_today("window_input_grad", small, held=True) == 2
    assert tm.kernels_today("window_input_grad", small, held=True, measured=True) == 1
    assert tm.kernels_today("window_input_grad", large, held=True) == 1
    # Triton's box forward pushes a channels-last frame itself; the video's (NCHW) frame, or any
    # frame of a strided layer, is copied into the ring by a launch of its own (as the code measured)
    with torch.device("meta"):  # (a frame large enough not to split over K)
        ring = torch.empty(3, 8, 64, 56, 56, dtype=torch.bfloat16)
        frame = torch.empty(8, 64, 56, 56, dtype=torch.bfloat16)
        fused = (ring, frame.contiguous(memory_format=torch.channels_last), 1, torch.empty(64, 64, 3, 3, 3), None,
                 *conv)
    strided = fused[:5] + ([2, 2],) + fused[6:]
    assert tm.kernels_today("ring_conv_forward", fused, held=True) == 1
    assert tm.kernels_today("ring_conv_forward", fused, held=True, measured=True) == 2
    assert tm.kernels_today("ring_conv_forward", fused[:1] + (frame,) + fused[2:], held=True) == 2
    assert tm.kernels_today("ring_conv_forward", strided, held=True) == 2
    assert tm.kernels_today("ring_conv_forward", fused[:1] + (None,) + fused[2:], held=True) == 1  # a held frame
    op = tm.Launch("sideways.ring_conv_forward", "forward", "l", 0.0, 0.0, kernels=3, kernels_derived=5)
    other = tm.Launch("aten.relu", "other", None, 0.0, 0.0)
    assert tm.launch_count([op, other]) == 4 and tm.launch_count([op, other], held=False) == 6
    # a recording holds the forms as today's code does: with update="clip", not with the per-tick update
    for update, held in (("clip", True), ("tick", False)):
        net, pipe = _c3d()
        if update == "tick":
            pipe.update, pipe.optimizer = "tick", torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        assert tm.record(net, pipe, 2, 16, T).held_forms is held


def test_a_sideways_op_counts_the_same_kernels_on_a_recording_s_fake_tensors_as_on_real_ones(monkeypatch):
    """A recording counts an op's kernels from its dispatch mode, below autograd, where ``reshape``
    and ``flatten`` reach the counter undecomposed: they are kernels only where they copy (the
    torch backend reads its ring and unfolds its weight gradient through views of them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from samples import Geometry, make
    g = Geometry(2, 8, 16, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    conv = [list(g.stride), list(g.padding), list(g.dilation), 1, 1]
    monkeypatch.setattr(tm, "today", lambda kind, layer=None: "torch")

    def counts():
        t = make(g, torch.bfloat16, torch.float32)
        forward = (t["ring"], t["frame"], 1, t["weight"], t["bias"], *conv)
        accumulate = (torch.zeros_like(t["weight"]), None, t["grad_out"], t["ring"], 1, *conv)
        monkeypatch.setattr(tm, "_KERNELS_TODAY", {})
        return [tm.kernels_today("ring_conv_forward", forward, held=True),
                tm.kernels_today("weight_grad_accumulate", accumulate, held=True)]
    real = counts()
    with FakeTensorMode(), torch._C._AutoDispatchBelowAutograd():
        recorded = counts()
    assert real == recorded == [3, 3]  # the ring write, the convolution, the bias; the weight gradient, its roll, the add
    copied = tm._Kernels()  # a reshape that must copy is one kernel; one that views is none
    with FakeTensorMode(), torch._C._AutoDispatchBelowAutograd(), copied:
        x = torch.empty(4, 6).t()
        x.reshape(24), x.t().reshape(24), x.flatten(), x.contiguous()
    assert copied.n == 3


def test_a_plan_s_problems_hold_the_input_gradients_within_the_stem_s_chain_and_a_drain_tick_is_not_steady():
    """Schedule.problems (what a grouped tick would execute, and what the tick model plans): a chain
    in stage 0 sends no error below its first conv, but each later conv's input gradient feeds the
    conv before it — those are problems too. And a tick past the clip's frames drains: not steady."""
    from sideways_kernels import SidewaysConv3d
    stem = torch.nn.Sequential(SidewaysConv3d(3, 4, (3, 1, 1), padding=(1, 0, 0)), torch.nn.ReLU(),
                               SidewaysConv3d(4, 4, (3, 1, 1), padding=(1, 0, 0)))
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool3d((None, 1, 1)), SidewaysConv3d(4, 5, 1))
    pipe = SidewaysPipeline([stem, head])
    schedule = pipe._schedule(6, "sideways", True)
    grads = {(q.stage, q.layer) for plan in schedule for q in schedule.problems(plan) if q.op == "input_grad"}
    assert (0, 1) in grads and (0, 0) not in grads and (1, 0) in grads
    one = SidewaysPipeline([torch.nn.Sequential(*stem, *head)])._schedule(6, "sideways", True)
    assert [plan.tick for plan in one if plan.steady] and not any(plan.steady for plan in one if plan.tick >= 6)

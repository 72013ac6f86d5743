"""The Triton backend on CPU, under Triton's interpreter (float32/float16; bfloat16 comes out
wrong in the interpreter, so it is checked only on a GPU): every op vs reference.py, and
whole pipelines with SIDEWAYS_BACKEND=triton against the torch backend."""
import collections
import contextlib
import functools
import os
import types

os.environ["TRITON_INTERPRET"] = "1"  # before sideways_kernels.triton is imported

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import sideways_kernels.triton as T  # noqa: E402
from sideways_kernels import SidewaysPipeline, reference as ref  # noqa: E402
from graphs import Residuals, randomize_norms  # noqa: E402
from nets import classifier_net, grads, rel_error, stages_of  # noqa: E402
from samples import GEOMETRIES, SGD_CONFIGS, Geometry, geometry_id, make, sgd_id  # noqa: E402

SMALL = T.Config(32, 32, 32, 1, 4)  # the general kernels' tiles for tests of tiny problems (the interpreter's
# time goes with the tile's size)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}
S = torch.ops.sideways_triton


def _a(g):
    return list(g.stride), list(g.padding), list(g.dilation), g.dilation_t, g.groups


def _close(actual, expected, dtype):
    scale = expected.abs().max().item() + 1
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


# every geometry in fp32, and in fp16 all but the 27-tap grouped one (interpreter time goes with
# taps; its fp16 path is the other geometries' and every config's)
OP_CASES = [(g, torch.float32) for g in GEOMETRIES] + [(g, torch.float16) for g in GEOMETRIES if g is not GEOMETRIES[2]]


@pytest.mark.parametrize("g,dtype", OP_CASES, ids=lambda v: geometry_id(v) if not isinstance(v, torch.dtype) else str(v))
def test_triton_ops_match_reference(g, dtype):
    t = make(g, dtype)
    a = _a(g)
    ring = t["ring"].clone()
    ring[t["slot"]] = float("nan")  # poison the slot the op must write
    expected_ring = t["ring"].double().clone()
    d = lambda x: None if x is None else x.double()
    out = S.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
    _close(out, ref.ring_conv_forward(expected_ring, d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]), *a), dtype)
    _close(ring, expected_ring, dtype)
    down = S.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *a[:3], g.groups)
    _close(down, ref.window_input_grad(d(t["grad_out"]), d(t["weight"]), [g.height, g.width], *a[:3], g.groups), dtype)
    grad_w, grad_b = torch.randn_like(t["weight"]), torch.randn_like(t["bias"])
    exp_w, exp_b = grad_w.double(), grad_b.double()
    S.weight_grad_accumulate(grad_w, grad_b, t["grad_out"], ring, t["slot"], *a)
    ref.weight_grad_accumulate(exp_w, exp_b, d(t["grad_out"]), d(ring), t["slot"], *a)
    _close(grad_w, exp_w, dtype)
    _close(grad_b, exp_b, dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 64, 9, 11), (1, 96, 33, 40), (2, 130, 4, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bias_grad_sums_the_error_per_channel_in_a_fixed_order(shape, dtype):
    """T.bias_grad: the error's sum over (b, h, w) in fp32 — channel counts below, at and above a
    tile's 64 and not powers of two, row counts not multiples of a tile's 64 —, added into a
    gradient in its dtype, the same bits on a second call, with two launches; an error that is not
    channels-last, ATen's sum."""
    g = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    expected = g.double().sum((0, 2, 3))
    before = T.launches["bias_grad"]
    got = T.bias_grad(g)
    assert T.launches["bias_grad"] == before + 1 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * shape[0] * shape[2] * shape[3])
    assert torch.equal(T.bias_grad(g), got)
    old = torch.randn(shape[1], dtype=torch.float32)
    into = old.clone()
    assert T.bias_grad(g, into) is into
    torch.testing.assert_close(into.double(), old.double() + expected, rtol=1e-5,
                               atol=1e-5 * shape[0] * shape[2] * shape[3])
    plain = g.contiguous()  # [B, C, H, W] rows: not the kernel's layout
    if not plain.is_contiguous(memory_format=torch.channels_last):
        launched = T.launches["bias_grad"]
        torch.testing.assert_close(T.bias_grad(plain).double(), expected, rtol=1e-5, atol=1e-3)
        assert T.launches["bias_grad"] == launched
    with pytest.raises(ValueError, match=rf"out must have shape \[{shape[1]}\]"):
        T.bias_grad(g, torch.zeros(shape[1] + 1))


def test_the_sgd_step_s_bias_gradient_is_summed_in_float32():
    """2049 fp16 ones per channel sum to 2049 in float32 (to 2048 rounded to fp16 first): a plain
    SGD step with lr 1 moves the fp32 bias by exactly that."""
    g = Geometry(1, 2, 2, 1, 2049, 3, (1, 1), layout="ring")
    t = make(g, torch.float16, torch.float32)
    bias = torch.zeros(2)
    S.sgd_tick_update(t["weight"].clone(), None, bias, None, torch.ones_like(t["grad_out"]).contiguous(
        memory_format=torch.channels_last), t["ring"], 0, *_a(g), 1.0, 0.0, 0.0, 0.0, False, True)
    assert torch.equal(bias, torch.full((2,), -2049.0))


def test_bias_grad_sums_more_partials_than_its_finish_takes_at_once(monkeypatch):
    """On a GPU the first pass leaves hundreds of partial rows; the finish takes them
    ``COLUMN_SUM.BLOCK_K`` at a time: here, with SMs enough for a program per block of rows, two
    such steps and a part."""
    monkeypatch.setattr(T, "_sms", lambda device: 10_000)
    steps = T.COLUMN_SUM.BLOCK_K
    g = torch.randn(1, 16, T.COLUMN_SUM.BLOCK_M, 2 * steps + 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(T.bias_grad(g).double(), g.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-3)


def _sgd_ticks_match_torch_optim_sgd(t, g, hyper):
    """Three ticks of S.sgd_tick_update (so the second and third run the dampened momentum
    step) against torch.optim.SGD.step on the reference gradient: weight, bias and the weight's
    momentum buffer after every tick."""
    w, b = t["weight"].clone(), t["bias"].clone()
    w_opt, b_opt = w.clone().requires_grad_(), b.clone().requires_grad_()
    opt = torch.optim.SGD([w_opt, b_opt], **hyper)
    momentum = hyper.get("momentum", 0.0)
    buf_w = torch.full_like(w, float("nan")) if momentum else None  # poison: the first tick must overwrite
    buf_b = torch.full_like(b, float("nan")) if momentum else None
    for tick in range(3):
        grad_out, ring = torch.randn_like(t["grad_out"]), torch.randn_like(t["ring"])
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        ref.weight_grad_accumulate(gw, gb, grad_out, ring, t["slot"], *_a(g))
        w_opt.grad, b_opt.grad = gw, gb
        opt.step()
        S.sgd_tick_update(w, buf_w, b, buf_b, grad_out, ring, t["slot"], *_a(g), hyper["lr"], momentum,
                          hyper.get("dampening", 0.0), hyper.get("weight_decay", 0.0), hyper.get("nesterov", False),
                          tick == 0)
        _close(w, w_opt.detach(), torch.float32)
        _close(b, b_opt.detach(), torch.float32)
        if momentum:
            _close(buf_w, opt.state[w_opt]["momentum_buffer"], torch.float32)


@pytest.mark.parametrize("g,hyper", [(GEOMETRIES[1], h) for h in SGD_CONFIGS] + [(GEOMETRIES[9], SGD_CONFIGS[3])],
                         ids=lambda v: sgd_id(v) if isinstance(v, dict) else geometry_id(v))
def test_triton_sgd_tick_update_equals_torch_optim_sgd(g, hyper):
    _sgd_ticks_match_torch_optim_sgd(make(g, torch.float32), g, hyper)


def test_triton_refuses_bad_input_naming_the_argument():
    t = make(GEOMETRIES[2], torch.float32)
    a = _a(GEOMETRIES[2])
    with pytest.raises(ValueError, match="slot"):
        S.ring_conv_forward(t["ring"], None, 99, t["weight"], None, *a)
    with pytest.raises(ValueError, match="grad_out"):
        S.weight_grad_accumulate(torch.zeros_like(t["weight"]), None, t["grad_out"][:, 1:], t["ring"], 0, *a)
    with pytest.raises(ValueError, match="float64"):
        S.ring_conv_forward(t["ring"].double(), None, 0, t["weight"].double(), None, *a)


@pytest.mark.parametrize("mode", ["sideways", "bp"])
def test_pipeline_really_runs_triton_and_matches_the_torch_backend(mode):
    net = classifier_net([(3, 1, 1), (2, 0, 2)], dtype=torch.float32)
    video, target = torch.randn(2, 3, 7, 8, 7), torch.randint(0, 7, (2,))
    results = {}
    for backend in ("torch", "triton"):
        T.launches.clear()
        net.zero_grad()
        out = SidewaysPipeline(stages_of(net, 2), mode=mode, backend=backend).backward_clip(video, target)
        results[backend] = (out.loss, grads(net), sum(T.launches.values()))
    assert results["torch"][2] == 0
    if mode == "sideways":  # bp mode runs the graph-connected window, not the ring ops
        assert results["triton"][2] > 0, "the Triton backend launched no Triton kernel"
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert rel_error(results["triton"][1], results["torch"][1]) < 1e-4


def test_a_converted_graph_runs_triton_and_matches_the_torch_backend():
    """Strides, a phase-offset residual, BatchNorm and a pooled head (from_model), Sideways mode."""
    torch.manual_seed(0)
    net = randomize_norms(Residuals()).eval()
    video, target = torch.randn(2, 3, 9, 8, 7), torch.randint(0, 6, (2,))
    results = {}
    for backend in ("torch", "triton"):
        T.launches.clear()
        net.zero_grad()
        out = SidewaysPipeline.from_model(net, stages=2, backend=backend).backward_clip(video, target)
        results[backend] = (out.loss, grads(net), sum(T.launches.values()))
    assert results["torch"][2] == 0 and results["triton"][2] > 0
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert rel_error(results["triton"][1], results["torch"][1]) < 1e-4


def test_sideways_under_autocast_runs_triton_on_16_bit_rings_with_float32_masters():
    """CPU autocast float16 (bfloat16 is wrong in the interpreter): the ring, the errors and the
    cached cast of the weight are float16, gradients float32, and the result is the torch
    backend's under the same autocast. The second conv (16 channels in and out) runs on the box
    kernels (its weight update grouped at the tick's end), the first (3 input channels) and the
    head (7 outputs) on the general ones."""
    net = classifier_net([(3, 1, 1), (2, 0, 1)], channels=(3, 16, 16), dtype=torch.float32, act=torch.nn.Tanh)
    video, target = torch.randn(1, 3, 6, 9, 8), torch.randint(0, 7, (1,))
    results = {}
    for backend in ("torch", "triton"):
        T.launches.clear()
        T.paths.clear()
        net.zero_grad()
        with torch.autocast("cpu", torch.float16):
            out = SidewaysPipeline(stages_of(net, 2), backend=backend).backward_clip(video, target)
        results[backend] = (out.loss, grads(net), T.launches["weight_grad_accumulate"])
    assert results["triton"][2] > 0 and all(g.dtype == torch.float32 for g in results["triton"][1])
    assert {op for op, path in T.paths if path == "box"} == {"ring_conv_forward", "window_input_grad"}
    assert ("weight_update", "grouped") in T.paths and ("weight_update", "general") in T.paths
    assert ("ring_conv_forward", "general") in T.paths
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=2e-3, atol=2e-3)
    assert rel_error(results["triton"][1], results["torch"][1]) < 5e-3


def test_pipeline_streams_with_triton_and_env_var_selects_it(monkeypatch):
    net = classifier_net([(3, 1, 1), (3, 0, 1)], dtype=torch.float32)
    video = torch.randn(1, 3, 8, 8, 7)
    monkeypatch.setenv("SIDEWAYS_BACKEND", "triton")
    T.launches.clear()
    streamed = torch.stack(list(SidewaysPipeline(stages_of(net, 2)).stream(video)), dim=2)
    assert T.launches["ring_conv_forward"] > 0
    with torch.no_grad():
        torch.testing.assert_close(streamed, net(video), rtol=1e-4, atol=1e-5)


from sideways_kernels.triton.configs import (CONFIGS, Config, box_waste, every_config, prune,  # noqa: E402
                                             prune_boxes, split_k)

EVERY_CONFIG = every_config()


@pytest.fixture
def strict_launches(monkeypatch):
    """Every Triton launch's keywords are the kernel's parameters or launch options: the interpreter
    drops any other, a compiled launch on a GPU refuses it."""
    import inspect
    import triton.runtime.interpreter as interpreter
    options = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid"}
    launch = interpreter.GridExecutor.__call__

    def checked(self, *args, **kwargs):
        unknown = set(kwargs) - set(inspect.signature(self.fn).parameters) - options
        assert not unknown, f"{self.fn.__name__} launched with unknown keywords {sorted(unknown)}"
        return launch(self, *args, **kwargs)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked)


@pytest.fixture
def poisoned_partials(monkeypatch):
    """Every weight update's split-K partials start as NaN, so a partial that the finish reads
    but no program wrote shows in the result."""
    original = T._partials

    def poisoned(device, floats):
        return original(device, floats).fill_(float("nan"))
    monkeypatch.setattr(T, "_partials", poisoned)


def _update_twice_matches_reference(g, t, ring, a, dtype=torch.float32):
    """weight_grad_accumulate and sgd_tick_update twice each against reference.py (the second
    accumulation adds to the first; the second step uses the momentum the first left); the
    tolerance of ``dtype`` activations."""
    d = lambda x: None if x is None else x.double()
    grad_w = torch.randn_like(t["weight"])
    expected = grad_w.double()
    for _ in range(2):
        S.weight_grad_accumulate(grad_w, None, t["grad_out"], ring, t["slot"], *a)
        ref.weight_grad_accumulate(expected, None, d(t["grad_out"]), d(ring), t["slot"], *a)
    _close(grad_w, expected, dtype)
    w, buf = t["weight"].clone(), torch.full_like(t["weight"], float("nan"))
    w_ref, buf_ref = t["weight"].double(), torch.zeros_like(t["weight"]).double()
    for step in range(2):
        S.sgd_tick_update(w, buf, None, None, t["grad_out"], ring, t["slot"], *a, 0.05, 0.9, 0.0, 1e-2, True, step == 0)
        ref.sgd_tick_update(w_ref, buf_ref, None, None, d(t["grad_out"]), d(ring), t["slot"], *a, 0.05, 0.9, 0.0, 1e-2,
                            True, step == 0)
    _close(w, w_ref, dtype)
    _close(buf, buf_ref, dtype)


@pytest.mark.parametrize("channels", [3, 5], ids=["folded", "tap_major"])
@pytest.mark.parametrize("cfg", EVERY_CONFIG, ids=lambda c: c.name)
def test_every_config_matches_the_reference_with_split_k(cfg, channels, poisoned_partials):
    """Whatever the autotuner picks on a GPU was checked here first: each tile of every
    architecture's list (warps and stages, which the interpreter ignores, change no result), on a
    problem with tails in every GEMM axis (forward M = 2·5·7 = 70, N = 5, K = 6 taps x 3
    channels, folded into 18 (tap, channel) pairs, or x 5 channels, a block per tap; weight update
    M = 5, N = 18 pairs or 5 channels per tap, K = 70), the weight update split over 1 and 3
    programs per tile, on partials poisoned with NaN."""
    from samples import Geometry
    g = Geometry(batch=2, channels=channels, out_channels=5, height=5, width=7, k_t=2, k_hw=(1, 3), padding=(0, 1))
    assert T.folds(channels) == (channels == 3)
    t = make(g, torch.float32)
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    with T.using(cfg, split=1):
        ring = t["ring"].clone()
        out = S.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
        expected_ring = t["ring"].double().clone()
        _close(out, ref.ring_conv_forward(expected_ring, d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]), *a),
               torch.float32)
        down = S.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *a[:3], g.groups)
        _close(down, ref.window_input_grad(d(t["grad_out"]), d(t["weight"]), [g.height, g.width], *a[:3], g.groups),
               torch.float32)
    for split in (1, 3):
        with T.using(cfg, split=split):
            _update_twice_matches_reference(g, t, ring, a)


# few channels per group, their taps folded into K: an RGB stem like r3d_18's (3x7x7, stride 2:
# 147 taps x 3 channels), a depthwise conv (1 channel a group of 8), the most channels folded (4,
# dilated in space and time: a ring slot no tap reads), and one more channel, which is not
FOLD_GEOMETRIES = [
    Geometry(batch=2, channels=3, out_channels=8, height=9, width=8, k_t=3, k_hw=(7, 7), stride=(2, 2),
             padding=(3, 3), layout="channels_last"),
    Geometry(batch=1, channels=8, out_channels=8, height=6, width=7, k_t=3, k_hw=(3, 3), padding=(1, 1), groups=8,
             layout="ring"),
    Geometry(batch=2, channels=4, out_channels=6, height=7, width=5, k_t=2, k_hw=(3, 2), dilation_t=2,
             dilation=(2, 1), padding=(2, 0), stride=(1, 2), layout="ring"),
    Geometry(batch=2, channels=5, out_channels=6, height=7, width=5, k_t=2, k_hw=(3, 2), padding=(1, 1),
             layout="ring"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("g", FOLD_GEOMETRIES, ids=geometry_id)
def test_few_channels_fold_their_taps_into_the_general_kernels_k(g, dtype, monkeypatch, poisoned_partials):
    """The general forward and weight update walk a problem of at most FOLD_CHANNELS channels per
    group as one run of (tap, channel) pairs — 32-wide K steps and tiles crossing taps, a tap's
    pairs split between tiles, the last tile partial —, the weight update in 3 splits: the
    reference's results in float64 (forward, two accumulations, two SGD steps with momentum), and
    only such problems fold. A ring slot no tap reads holds NaN: no pair past the last reads it."""
    folded = []
    launch = T._launch
    monkeypatch.setattr(T, "_launch", lambda kernel, name, grid, args, meta, *rest, **kw:
                        folded.append((name, meta["FOLD"])) or launch(kernel, name, grid, args, meta, *rest, **kw))
    t = make(g, dtype, torch.float32)
    read = {(t["slot"] - (g.k_t - 1 - j) * g.dilation_t) % g.span for j in range(g.k_t)}
    for unread in set(range(g.span)) - read:
        t["ring"][unread] = float("nan")
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    with T.using(SMALL, split=3, path="general"):
        ring = t["ring"].clone()
        out = S.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
        expected_ring = t["ring"].double().clone()
        _close(out, ref.ring_conv_forward(expected_ring, d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]), *a),
               dtype)
        _update_twice_matches_reference(g, t, ring, a, dtype)
    cg = g.channels // g.groups
    fold = cg if cg <= T.FOLD_CHANNELS else 0  # (the kernels' constant: the channels per group, or 0)
    assert folded == [("ring_conv_forward", fold)] + [("weight_update", fold)] * 4


def test_a_folded_weight_update_splits_over_its_few_tiles(monkeypatch):
    """r3d_18's stem (3x7x7, B8, 56x56 out) on 132 SMs: 147 taps of a 64-channel tile each fill a wave
    unsplit; folded, 441 pairs are 7 tiles, whose reduction the split count spreads over more
    programs — and the op counts its tiles so for a problem that folds."""
    from sideways_kernels.triton.configs import split_k
    monkeypatch.setattr(T, "_sms", lambda device: 132)
    cpu, positions = torch.device("cpu"), 8 * 56 * 56
    assert T._weight_update_splits(64, 3, 1, 147, 1, positions, cpu) == 1
    assert T._weight_update_splits(64, 3, 1, 147, 1, positions, cpu, fold=True) == split_k(7, positions, 64, 132) > 1
    seen, splits = [], T._weight_update_splits
    monkeypatch.setattr(T, "_weight_update_splits", lambda *a: seen.append(a[-1]) or splits(*a))
    for g in (FOLD_GEOMETRIES[1], FOLD_GEOMETRIES[-1]):
        t = make(g, torch.float32)
        with T.using(SMALL, path="general"):
            S.weight_grad_accumulate(torch.zeros_like(t["weight"]), None, t["grad_out"], t["ring"], t["slot"], *_a(g))
    # 3 channels in 16-byte rows on the box kernels: never folded
    from sideways_kernels import ops
    ring = ops.empty_ring(3, 1, 3, 4, 5, dtype=torch.float32, aligned=True).copy_(torch.randn(3, 1, 3, 4, 5))
    grad_out = torch.randn(1, 8, 4, 5).contiguous(memory_format=torch.channels_last)
    with T.using(path="box"):
        S.weight_grad_accumulate(torch.zeros(8, 3, 3, 3, 3), None, grad_out, ring, 2, [1, 1], [1, 1], [1, 1], 1, 1)
    assert seen == [True, False, False]
    # what the autotuner's channel block is chosen for: every tap's channels where folded
    for name in ("ring_conv_forward", "weight_update"):
        problem = dict(cg=3, KT=3, KH=7, KW=7)  # (the general kernels' channels per group)
        assert T._CHANNEL_BLOCK[name][0]({**problem, "FOLD": 3}) == 3 * 147
        assert T._CHANNEL_BLOCK[name][0]({**problem, "FOLD": 0}) == 3


def _gpu_check():
    """bench/gpu_check.py, the ahead-of-time check (it needs Triton only, no GPU)."""
    from scripts import load
    return load("bench/gpu_check.py")


def _general_launches(g, monkeypatch) -> list:
    """(kernel, name, grid, args, meta, keywords) of a geometry's forward, input gradient and
    weight update on the general kernels (fp16, the interpreter), at the ring's last slot."""
    launches, launch = [], T._launch

    def spy(kernel, name, grid, args, meta, device, **kw):
        launches.append((kernel, name, grid, args, meta, kw))
        return launch(kernel, name, grid, args, meta, device, **kw)
    monkeypatch.setattr(T, "_launch", spy)
    t = make(g, torch.float16, torch.float32)
    slot = g.span - 1
    with T.using(SMALL, path="general"):
        S.ring_conv_forward(t["ring"].clone(), t["frame"], slot, t["weight"], t["bias"], *_a(g))
        S.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *_a(g)[:3], g.groups)
        S.weight_grad_accumulate(torch.zeros_like(t["weight"]), None, t["grad_out"], t["ring"], slot, *_a(g))
    monkeypatch.setattr(T, "_launch", launch)
    assert [name for _, name, *_ in launches] == ["ring_conv_forward", "window_input_grad", "weight_update"]
    return launches


def _alignment_geometry(channels, out_channels, groups):
    from samples import Geometry
    return Geometry(batch=1, channels=channels, out_channels=out_channels, height=3, width=5, k_t=3, k_hw=(3, 3),
                    padding=(1, 1), groups=groups, layout="channels_last")


@pytest.mark.parametrize("channels, out_channels, groups, aligned", [
    (16, 32, 1, True), (32, 32, 2, True),  # 16 channels per group: the group's offset moves the bases
    (45, 64, 1, False), (16, 16, 2, False),  # R(2+1)D's 45 channels; 8 per group
    (3, 16, 1, False), (16, 16, 16, False),  # folded: an RGB stem; a depthwise conv (aligned strides)
], ids=["16", "32-groups2", "45", "16-groups2", "3-folded", "16-depthwise"])
def test_a_general_launch_takes_the_configs_compiled_for_its_alignment(channels, out_channels, groups, aligned,
                                                                       monkeypatch):
    """`make gpu-check` compiles the general kernels' CONFIGS lists for channel counts and strides
    that are multiples of 16 (Triton loads 16-byte vectors and pipelines them), the UNALIGNED
    lists for any other problem and for folded ones (element loads, whose addresses made the
    CONFIGS tiles spill on sm_90a): each launch's autotuner takes the list compiled for it, and
    the variant gpu-check compiles for it is the specialisation the launch makes — every int it
    assumes a multiple of 16 is one, every constant it fixes (a unit stride, the fold's channel
    count, a depthwise conv's 1 channel) has the launch's value (the ring's slot 2: any int)."""
    from sideways_kernels.triton.configs import UNALIGNED, configs_for
    gpu_check = _gpu_check()
    assert set(gpu_check.KIND) <= set(gpu_check.KERNELS)
    for kernel, variants in (("ring_conv_forward", ("_unaligned", "_fold", "_depthwise")),
                             ("window_input_grad", ("_unaligned", "_depthwise")),
                             ("weight_update", ("_unaligned", "_fold", "_depthwise"))):
        assert {kernel + v for v in ("", *variants)} <= set(gpu_check.KERNELS)
    for kernel, name, _, args, meta, _ in _general_launches(_alignment_geometry(channels, out_channels, groups),
                                                             monkeypatch):
        assert T._takes_aligned(name, kernel, args) == aligned, name
        for offset in (2, 8):  # a tensor off a 16-byte boundary (a view at an offset) is never aligned
            shifted = [torch.empty(a.numel() + offset, dtype=torch.uint8)[offset:] if isinstance(a, torch.Tensor)
                       else a for a in args]
            assert not T._takes_aligned(name, kernel, shifted), (name, offset)
        launched = {**dict(zip(kernel.arg_names, args)), **meta}
        depthwise = launched["cg"] == launched["mg"] == 1
        variant = name + ("_depthwise" if depthwise else "_fold" if meta.get("FOLD") else "" if aligned else
                          "_unaligned")
        fn, _, const, divisible = gpu_check._signature(variant, "bf16", SMALL)
        for (i,) in divisible:
            value = launched[fn.arg_names[i]]
            at = value.data_ptr() if isinstance(value, torch.Tensor) else value
            assert at % 16 == 0, (variant, fn.arg_names[i])
        fixed = {"FOLD", "cg", "mg", *gpu_check.UNIT[name]} & set(const)
        assert {a: const[a] for a in fixed} == {a: launched[a] for a in fixed}, variant
    # the lists differ where the CONFIGS tiles spill, and each keeps a config for few channels
    assert configs_for("gemm", 90, 2, is_aligned=False) == UNALIGNED["gemm"][90] != configs_for("gemm", 90)
    assert all(min(c.BLOCK_K for c in UNALIGNED["gemm"][a]) == min(c.BLOCK_N for c in UNALIGNED["weight_update"][a])
               == T.SMALL_CHANNELS for a in (80, 90))
    unaligned_tiles = {c.tile for lists in UNALIGNED.values() for cs in lists.values() for c in cs}
    assert unaligned_tiles <= {c.tile for c in EVERY_CONFIG}


def test_each_specialisation_autotunes_its_own_list_keyed_and_pruned_by_the_channels_per_group(monkeypatch):
    """On a GPU (here its autotuner stubbed: the interpreter never tunes) an aligned and an
    unaligned launch of the same kernel get autotuners of their own over their own lists, keyed
    by the channels per group; ``picked`` reports the latest launch's; the pruning sees a
    problem's per-group sizes (16 -> 32 channels: M, N of each kernel)."""
    from sideways_kernels.triton.configs import configs_for
    tuners = []

    class Tuner:
        def __init__(self, configs, key):
            self.configs, self.key, self.best_config = configs, key, configs[len(tuners) % len(configs)]

        def prune_configs(self, kwargs):
            return self.configs

    monkeypatch.setattr(T.triton, "autotune", lambda configs, key, prune_configs_by: lambda kernel: tuners.append(
        Tuner(configs, key)) or tuners[-1])
    monkeypatch.setattr(T, "wrap_triton", lambda kernel: collections.defaultdict(lambda: lambda *a, **kw: None))
    monkeypatch.setattr(T, "INTERPRET", False)
    monkeypatch.setattr(T, "_capability", lambda device: 90)
    monkeypatch.setattr(T, "_autotuned", {})
    monkeypatch.setattr(T, "_latest", {})
    aligned = _general_launches(_alignment_geometry(16, 32, 1), monkeypatch)
    unaligned = _general_launches(_alignment_geometry(24, 32, 1), monkeypatch)
    cuda = torch.device("cuda")  # only its type is read
    for launches, is_aligned in ((aligned, True), (unaligned, False), (aligned, True)):
        for kernel, name, grid, args, meta, kw in launches:
            T._launch(kernel, name, grid, args, meta, cuda, **kw)
            tuner = T._autotuned[T._latest[(name, 90, 2)]]
            assert [T._as_config(c) for c in tuner.configs] == configs_for(T._KIND[name], 90, 2, is_aligned), name
            assert {"cg", "mg"} <= set(tuner.key) <= set(kernel.arg_names)
            assert T.picked(name, cuda) == T._as_config(tuner.best_config).name
    assert len(tuners) == 6  # each kernel's two specialisations, the aligned one's reused
    problem = {**dict(zip(aligned[0][0].arg_names, aligned[0][3])), **aligned[0][4]}
    positions = problem["B"] * problem["H_OUT"] * problem["W_OUT"]
    assert T._PROBLEM["ring_conv_forward"](problem)[:2] == (positions, 32)
    problem = dict(zip(aligned[1][0].arg_names, aligned[1][3]))
    assert T._PROBLEM["window_input_grad"](problem)[:2] == (problem["B"] * problem["H"] * problem["W"], 16)
    problem = dict(zip(aligned[2][0].arg_names, aligned[2][3]))
    assert T._PROBLEM["weight_update"](problem)[:2] == (32, 16)


def test_an_autotuner_compiles_the_configs_it_times_in_parallel_before_timing_them():
    """Triton compiles each config as the autotuner times it (about a second each); ours compiles
    the configs that survive the pruning in parallel threads first, so that the timing finds every
    one compiled — and compiled for the launch the timing makes (each config once in all: the
    warm-ups' keys are the launches'). One thread compiles as Triton does. A bad thread count is
    refused by name."""
    import json
    import subprocess
    import sys
    # Triton compiling (no interpreter) for an sm_90 GPU that is not here, nothing launched: a
    # forward of 64 -> 64 channels, whose pruning leaves four configs (bench/autotune_compile.py)
    run = subprocess.run([sys.executable, "bench/autotune_compile.py", "--problem", "small", "--threads", "2", "1",
                          "--json"], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    parallel, serial = json.loads(run.stdout.splitlines()[-1])
    for r in (parallel, serial):
        del r["seconds"]
    assert parallel == dict(threads=2, timed=4, compiled=4, compiled_at_timing=[4, 4, 4, 4],
                            on_the_calling_thread=False)
    assert serial == dict(threads=1, timed=4, compiled=4, compiled_at_timing=[0, 1, 2, 3],
                          on_the_calling_thread=True)
    for bad in ("0", "two", "-1"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("SIDEWAYS_TRITON_COMPILE_THREADS", bad)
            with pytest.raises(ValueError, match="SIDEWAYS_TRITON_COMPILE_THREADS must be an int >= 1"):
                T._compile_threads()
    with pytest.MonkeyPatch.context() as m:  # the default: the CPUs, at most 8
        m.delenv("SIDEWAYS_TRITON_COMPILE_THREADS", raising=False)
        m.setattr(T.os, "cpu_count", lambda: 64)
        assert T._compile_threads() == 8
        m.setattr(T.os, "cpu_count", lambda: 3)
        assert T._compile_threads() == 3


def test_a_config_that_fails_to_compile_in_the_pool_is_left_to_the_timing(monkeypatch):
    """A config whose compile fails in the threads fails no launch there: the autotuner's timing
    compiles it again and skips it as it would have (Triton's own handling)."""
    import inspect
    monkeypatch.setenv("SIDEWAYS_TRITON_COMPILE_THREADS", "2")
    compiled = []

    def warmup(*args, BLOCK_M, **kwargs):  # as Triton's warm-up submits a compile to the active mode
        def compile_it():
            compiled.append(BLOCK_M)
            if BLOCK_M == 128:
                raise RuntimeError("ptxas failed")
        mode = T._async_compile.active_mode.get()
        callbacks = len(inspect.signature(mode.submit).parameters) - 2  # (3.6: finalize; 3.9: and cleanup)
        mode.submit(BLOCK_M, compile_it, *[lambda *a: None] * callbacks)

    config = lambda m: types.SimpleNamespace(all_kwargs=lambda: {"BLOCK_M": m})
    tuner = types.SimpleNamespace(prune_configs=lambda kwargs: [config(64), config(128)], nargs={"x": 0},
                                  fn=types.SimpleNamespace(warmup=warmup))
    assert [c.all_kwargs() for c in T._compiling_before_timing(tuner).prune_configs({})] == [{"BLOCK_M": 64},
                                                                                               {"BLOCK_M": 128}]
    assert sorted(compiled) == [64, 128]


# --- the box kernels (boxes.py: TMA boxes, persistent, taps sharing an error box) ----------------

def _box_geometry(layout="ring", **kw):
    from samples import Geometry
    return Geometry(layout=layout, **kw)


# channel counts that are whole 16-byte rows in fp16 (multiples of 8) but not of the block sizes
# (72 on the 1x1 kernel: two tiles of 64, the second partial, of a forward's output channels and a
# weight update's input channels, and K steps across two blocks),
# frames that are no multiple of a box, padding at every edge (more than the kernel reaches, too),
# dilation in space and time, and 27, 6, 8 and 1 taps (three, three, two and one taps per tile)
BOX_GEOMETRIES = [
    _box_geometry(batch=2, channels=16, out_channels=24, height=9, width=11, k_t=3, k_hw=(3, 3), padding=(1, 1)),
    _box_geometry(batch=1, channels=8, out_channels=16, height=7, width=13, k_t=2, k_hw=(1, 3), dilation_t=2,
                  padding=(0, 2), dilation=(1, 2)),
    _box_geometry(batch=3, channels=24, out_channels=8, height=6, width=5, k_t=2, k_hw=(2, 2), padding=(2, 1),
                  dilation=(2, 1)),
    # a 1x1 kernel padded in height: the input gradient's flipped padding dil*(k-1)-pad is -1
    _box_geometry(batch=2, channels=72, out_channels=72, height=5, width=6, k_t=1, k_hw=(1, 1), padding=(1, 0)),
]


def _grad_out_channels_last(t):
    t["grad_out"] = t["grad_out"].contiguous(memory_format=torch.channels_last)  # as the layers hand it
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("g, frame_layout", [(g, "channels_last") for g in BOX_GEOMETRIES]
                         + [(BOX_GEOMETRIES[-1], "contiguous")], ids=lambda x: x if isinstance(x, str) else geometry_id(x))
def test_box_kernels_match_reference(g, frame_layout, dtype, poisoned_partials):
    """Every op on the box path (fp32 forced there for an exact check; fp16 goes there by
    itself), the frame written into its slot — by the forward's own launch where its channels
    are innermost (a frame the layers hand on), by a copy before it otherwise (the video's) —
    the weight update split 1 and 3 ways on partials poisoned with NaN."""
    t = _grad_out_channels_last(make(g, dtype, param_dtype=torch.float32))
    if frame_layout == "channels_last":
        t["frame"] = t["frame"].contiguous(memory_format=torch.channels_last)
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    T.paths.clear()
    T.launches.clear()
    with T.using(path="box" if dtype == torch.float32 else None, split=1):
        ring = t["ring"].clone()
        ring[t["slot"]] = float("nan")  # poison the slot the op must write
        out = S.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
        expected_ring = d(t["ring"]).clone()
        _close(out, ref.ring_conv_forward(expected_ring, d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]), *a),
               dtype)
        assert torch.equal(ring.double(), expected_ring)  # the frame in its slot, every other slot as it was
        assert T.launches["ring_push"] == (frame_layout == "contiguous")
        down = S.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *a[:3], g.groups)
        _close(down, ref.window_input_grad(d(t["grad_out"]), d(t["weight"]), [g.height, g.width], *a[:3], g.groups),
               dtype)
    for split in (1, 3):
        with T.using(path="box" if dtype == torch.float32 else None, split=split):
            _update_twice_matches_reference(g, t, ring, a)
    assert set(T.paths) == {("ring_conv_forward", "box"), ("window_input_grad", "box"), ("weight_update", "box")}


@contextlib.contextmanager
def _descriptor_blocks():
    """The block shapes of the tensor descriptors the interpreted kernels make within."""
    import triton.language as tl
    made, make = [], tl.make_tensor_descriptor

    @functools.wraps(make)  # (a builtin to the interpreter, as the function it stands for)
    def spy(base, shape, strides, block_shape, *args, **kwargs):
        made.append([int(b) for b in block_shape])
        return make(base, shape, strides, block_shape, *args, **kwargs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tl, "make_tensor_descriptor", spy)
        yield made


def test_a_ring_of_few_channels_in_16_byte_rows_takes_the_box_kernels_alone_and_grouped(poisoned_partials,
                                                                                       strict_launches):
    """The RGB stem's ring: 3 fp16 channels are 6 bytes, so a ring in ops.empty_ring's plain layout
    has no TMA-able strides and takes the general path; stored in 16-byte rows (aligned=True) it
    takes the box kernels — the forward (its frame pushed by the launch from a channels-last frame
    of such rows, or copied first from an NCHW one) and the weight update, alone and in grouped
    launches beside an 8-channel layer of the same kernel shape — each descriptor zero-filling the
    channels past the third: reference.py's results, and the grouped ones the ops' to the bit. The
    grouped launches read both rings in blocks of SMALL_CHANNELS channels (a forward's K step, a
    weight update tile's input channels), not the launch's 64 (the wide blocks: every problem of
    more channels, test_grouped_forwards_equal_each_layer_s_op and the like)."""
    from sideways_kernels import ops
    dtype = torch.float16
    g = _box_geometry(batch=2, channels=3, out_channels=16, height=5, width=6, k_t=3, k_hw=(3, 3), padding=(1, 1))
    t = _grad_out_channels_last(make(g, dtype, param_dtype=torch.float32))
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    reason = T.box_path(t["ring"].device, dtype, g.stride, g.groups, (g.out_channels,), (t["ring"],))
    assert reason is not None and "16-byte units" in reason, reason
    aligned = lambda r: ops.empty_ring(*r.shape, dtype=dtype, aligned=True).copy_(r)  # (a clone would lose the rows)
    ring = aligned(t["ring"])
    frame = ops.empty_frame(*t["frame"].shape, dtype=dtype, aligned=True).copy_(t["frame"])
    assert ring.stride(0) == frame.stride(3) == 8 and T.box_path(ring.device, dtype, g.stride, g.groups,
                                                                  (g.out_channels,), (ring, frame)) is None
    T.paths.clear()
    T.launches.clear()
    for pushed in (frame, t["frame"]):  # pushed by the launch; copied first (NCHW)
        mine = aligned(ring)
        out = S.ring_conv_forward(mine, pushed, t["slot"], t["weight"], t["bias"], *a)
        expected_ring = d(ring).clone()
        _close(out, ref.ring_conv_forward(expected_ring, d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]), *a),
               dtype)
        assert torch.equal(mine.double(), expected_ring)
    assert T.launches["ring_push"] == 1
    for split in (1, 3):
        with T.using(split=split):
            _update_twice_matches_reference(g, t, ring, a)
    assert set(T.paths) == {("ring_conv_forward", "box"), ("weight_update", "box")}
    wide = _box_geometry(batch=2, channels=8, out_channels=16, height=5, width=6, k_t=3, k_hw=(3, 3), padding=(1, 1))
    u = _grad_out_channels_last(make(wide, dtype, param_dtype=torch.float32))
    u["frame"] = u["frame"].contiguous(memory_format=torch.channels_last)
    calls = [(aligned(ring), frame, t["slot"], t["weight"], t["bias"], *a),
             (u["ring"].clone(), u["frame"], u["slot"], u["weight"], u["bias"], *_a(wide))]
    T.paths.clear()
    rings = lambda blocks: {b[-1] for b in blocks if len(b) == 5}  # (the ring descriptors' channel blocks)
    with T.using(gemm_split=1):  # (the op alone may split K where its tiles are few: another order of the sum)
        alone = [S.ring_conv_forward(aligned(c[0]), *c[1:]) for c in calls]
        with _descriptor_blocks() as made:
            grouped = T.grouped_ring_conv_forwards(calls)
    assert T.paths[("ring_conv_forward", "grouped")] == 2
    assert all(torch.equal(x, y) for x, y in zip(grouped, alone))
    assert T.SMALL_CHANNELS in rings(made)  # the tiles' K steps (the frames' push into their slots: BLOCK_K)
    updates = [("weight_grad_accumulate", (torch.zeros_like(x["weight"]), torch.zeros_like(x["bias"]), x["grad_out"],
                                           r, x["slot"], *_a(geo))) for x, r, geo in ((t, ring, g), (u, u["ring"], wide))]
    own = [(*(v.clone() for v in args[:3]), aligned(args[3]), *args[4:]) for _, args in updates]
    with T.using(split=2):
        with _descriptor_blocks() as made:
            assert T.grouped_weight_updates(updates) == []
        for args in own:
            S.weight_grad_accumulate(*args)
    assert T.paths[("weight_update", "grouped")] == 2
    assert rings(made) == {T.SMALL_CHANNELS}
    for (_, args), mine in zip(updates, own):
        assert torch.equal(args[0], mine[0])
        torch.testing.assert_close(args[1], mine[1], rtol=0, atol=1e-3)  # (two orders of the bias's fp32 sum)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("g", BOX_GEOMETRIES[:2], ids=geometry_id)
def test_box_forward_and_input_grad_split_over_k_match_the_reference(g, splits, poisoned_partials):
    """The box forward and input gradient split over their K steps (taps x channel blocks): 27
    and 6 steps of the forward in 2, 3 or 7 splits (uneven chunks; more splits than the input
    gradient's 9 and 3 steps leave some empty), each split's partial on NaN-poisoned memory, then
    summed with the bias and cast by the second launch; float32 on the box path for an exact
    check."""
    t = _grad_out_channels_last(make(g, torch.float32))
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    T.launches.clear()
    with T.using(path="box", gemm_split=splits):
        ring = t["ring"].clone()
        out = S.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
        _close(out, ref.ring_conv_forward(d(t["ring"]).clone(), d(t["frame"]), t["slot"], d(t["weight"]),
                                          d(t["bias"]), *a), torch.float32)
        down = S.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *a[:3], 1)
        _close(down, ref.window_input_grad(d(t["grad_out"]), d(t["weight"]), [g.height, g.width], *a[:3], 1),
               torch.float32)
        # every split of the newest tap reads the frame, which the same launch pushes into its slot
        ring = t["ring"].clone()
        frame = t["frame"].contiguous(memory_format=torch.channels_last)
        out = S.ring_conv_forward(ring, frame, t["slot"], t["weight"], t["bias"], *a)
        expected_ring = d(t["ring"]).clone()
        _close(out, ref.ring_conv_forward(expected_ring, d(frame), t["slot"], d(t["weight"]), d(t["bias"]), *a),
               torch.float32)
        assert torch.equal(ring.double(), expected_ring)
    assert T.launches["split_sum"] == 3 and T.launches["ring_push"] == 1  # (the first forward's frame: NCHW)


def test_the_box_forward_splits_over_k_only_where_its_tiles_leave_sms_idle():
    """256 channels at 14², B8 (C3D's and r3d_18's layer): 32 tiles of 128x128 for 132 SMs, each
    108 K steps — split 4 ways; at 56² the same layer has 512 tiles and is not split; a short K
    (one tap of 64 channels) never is."""
    assert T._box_gemm_splits(8, 256, 256, 14, 14, 27, 132) == 4
    assert T._box_gemm_splits(8, 256, 256, 56, 56, 27, 132) == 1
    assert T._box_gemm_splits(1, 64, 64, 7, 7, 1, 132) == 1
    with T.using(gemm_split=3):
        assert T._box_gemm_splits(8, 256, 256, 56, 56, 27, 132) == 3


@pytest.mark.parametrize("cfg", every_config(box=True), ids=lambda c: c.name)
def test_every_box_config_matches_the_reference_with_split_k(cfg, poisoned_partials):
    """Each box tile of the lists (the autotuner's choices on sm_90), forced on float32."""
    g = BOX_GEOMETRIES[1]
    t = _grad_out_channels_last(make(g, torch.float32))
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    with T.using(box_config=cfg, path="box", split=1):
        ring = t["ring"].clone()
        out = S.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
        _close(out, ref.ring_conv_forward(d(t["ring"]).clone(), d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]),
                                          *a), torch.float32)
        down = S.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *a[:3], 1)
        _close(down, ref.window_input_grad(d(t["grad_out"]), d(t["weight"]), [g.height, g.width], *a[:3], 1),
               torch.float32)
    for split in (1, 3):
        with T.using(box_config=cfg, path="box", split=split):
            _update_twice_matches_reference(g, t, ring, a)


@pytest.mark.parametrize("hyper", SGD_CONFIGS[1:], ids=sgd_id)
def test_box_sgd_tick_update_equals_torch_optim_sgd(hyper):
    """The box path's SGD step (momentum, dampening, nesterov) on the smallest box geometry."""
    g = BOX_GEOMETRIES[3]
    T.paths.clear()
    with T.using(path="box", split=1):
        _sgd_ticks_match_torch_optim_sgd(_grad_out_channels_last(make(g, torch.float32)), g, hyper)
    assert set(T.paths) == {("weight_update", "box")}


# What the box kernels cannot take, each with the word its reason names; the general path
# computes the same thing.
FALLBACKS = {
    "stride": (_box_geometry(batch=2, channels=8, out_channels=8, height=7, width=6, k_t=2, k_hw=(3, 3), stride=(2, 1),
                             padding=(1, 1)), torch.float16, None),
    "groups": (_box_geometry(batch=2, channels=16, out_channels=16, height=5, width=6, k_t=2, k_hw=(3, 3), groups=2,
                             padding=(1, 1)), torch.float16, None),
    "multiples of 8": (_box_geometry(batch=2, channels=12, out_channels=8, height=5, width=6, k_t=2, k_hw=(3, 3),
                                     padding=(1, 1)), torch.float16, None),
    "innermost": (_box_geometry(batch=2, channels=8, out_channels=8, height=5, width=6, k_t=2, k_hw=(3, 3),
                                padding=(1, 1), layout="contiguous"), torch.float16, None),
    "aligned": (_box_geometry(batch=2, channels=8, out_channels=8, height=5, width=6, k_t=2, k_hw=(3, 3),
                              padding=(1, 1)), torch.float16, "offset"),
    "float32": (_box_geometry(batch=2, channels=8, out_channels=8, height=5, width=6, k_t=2, k_hw=(3, 3),
                              padding=(1, 1)), torch.float32, None),
}


@pytest.mark.parametrize("why", list(FALLBACKS))
def test_what_the_box_kernels_cannot_take_runs_the_general_path_with_the_same_result(why):
    g, dtype, twist = FALLBACKS[why]
    t = _grad_out_channels_last(make(g, dtype, param_dtype=torch.float32))
    ring = t["ring"]
    if twist == "offset":  # the same values one element past a 16-byte boundary
        flat = torch.empty(ring.numel() + 1, dtype=dtype)
        ring = flat[1:].view(ring.shape[1], ring.shape[3], ring.shape[4], ring.shape[0], ring.shape[2]).permute(
            3, 0, 4, 1, 2).copy_(ring)
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    reason = T.box_path(ring.device, dtype, g.stride, g.groups, (g.channels // g.groups, g.out_channels), (ring,))
    assert reason is not None and why in reason, reason
    if why != "float32":  # float32 is a choice (tests force it onto the box path), the rest are limits
        with pytest.raises(ValueError, match="cannot take the box kernels"), T.using(path="box"):
            S.ring_conv_forward(ring, None, t["slot"], t["weight"], t["bias"], *a)  # no frame: the ring stays as is
    T.paths.clear()
    out = S.ring_conv_forward(ring, None, t["slot"], t["weight"], t["bias"], *a)
    _close(out, ref.ring_conv_forward(d(ring), None, t["slot"], d(t["weight"]), d(t["bias"]), *a), dtype)
    grad_w, expected = torch.zeros_like(t["weight"]), torch.zeros_like(t["weight"]).double()
    S.weight_grad_accumulate(grad_w, None, t["grad_out"], ring, t["slot"], *a)
    ref.weight_grad_accumulate(expected, None, d(t["grad_out"]), d(ring), t["slot"], *a)
    _close(grad_w, expected, dtype)
    assert set(T.paths) == {("ring_conv_forward", "general"), ("weight_update", "general")}


@pytest.mark.parametrize("path", ["general", "box"])
def test_split_k_is_deterministic_whatever_the_program_order(path):
    """The finish sums the partials in split order: the same bits whichever program ran which
    split, and in whatever order they finished. Under the interpreter programs run in a fixed
    order, so renumber the splits (``rotation``): each rotation gives every program another
    split, and another split runs last. Every split has work
    (2·12·11 = 264 positions: 4 blocks of 64, 8 boxes of 8x8), so no partial is zero."""
    g = _box_geometry(batch=2, channels=8, out_channels=8, height=12, width=11, k_t=2, k_hw=(3, 3), padding=(1, 1))
    t = _grad_out_channels_last(make(g, torch.float32))
    results = []
    for rotation in range(4):
        with T.using(split=4, path=path, rotation=rotation):
            grad_w = torch.zeros_like(t["weight"])
            S.weight_grad_accumulate(grad_w, None, t["grad_out"], t["ring"], t["slot"], *_a(g))
        results.append(grad_w)
    d = lambda x: x.double()
    expected = torch.zeros_like(t["weight"]).double()
    ref.weight_grad_accumulate(expected, None, d(t["grad_out"]), d(t["ring"]), t["slot"], *_a(g))
    _close(results[0], expected, torch.float32)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_split_factor_and_pruning():
    assert split_k(tiles=200, k=10_000, block_k=64, sms=132) == 1  # enough tiles: no split
    assert split_k(tiles=14, k=25_088, block_k=64, sms=132) == 9  # 64->128, B8, 56x56 on an H100: one wave
    assert split_k(tiles=9, k=25_088, block_k=64, sms=132) == 14  # 126 programs; 15 would be 135 > 132
    assert split_k(tiles=72, k=6_272, block_k=64, sms=132) == 7  # 256->256, B32, 14x14: 4 waves of 1/7 each
    assert split_k(tiles=14, k=256, block_k=64, sms=132) == 1  # too short a reduction to share
    big = Config(128, 128, 64, 4, 8)
    assert big not in prune(CONFIGS["gemm"][90], m=16, n=30, element_size=2, capability=90)  # masked-off work
    assert big in prune(CONFIGS["gemm"][90], m=4096, n=4096, element_size=2, capability=90)
    # shared memory: 128x256x64 in 3 stages of fp32 is 288 KiB, over an A100's limit
    small = CONFIGS["gemm"][80][-1]
    assert prune([Config(128, 256, 64, 3, 8), small], 4096, 4096, 4, 80) == [small]


gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs a CUDA GPU: torch.compile and opcheck trace Triton kernels through wrap_triton, "
                                "which under TRITON_INTERPRET cannot run on fake tensors")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("g", GEOMETRIES[:3], ids=geometry_id)
def test_triton_opcheck_and_compile_on_gpu(g):
    t = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make(g, torch.float32).items()}
    a = _a(g)
    torch.library.opcheck(S.ring_conv_forward, (t["ring"].clone(), t["frame"], t["slot"], t["weight"], t["bias"], *a))
    torch.library.opcheck(S.weight_grad_accumulate, (torch.randn_like(t["weight"]), None, t["grad_out"], t["ring"],
                                                     t["slot"], *a))

    def tick(ring, frame, grad_w):
        out = S.ring_conv_forward(ring, frame, t["slot"], t["weight"], t["bias"], *a)
        S.weight_grad_accumulate(grad_w, None, t["grad_out"], ring, t["slot"], *a)
        return out.relu()

    ins = [t["ring"].clone(), t["frame"], torch.randn_like(t["weight"])]
    eager = [x.clone() for x in ins]
    torch.testing.assert_close(torch.compile(tick, fullgraph=True)(*ins), tick(*eager))
    torch.testing.assert_close(ins[2], eager[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_summed_and_cast_weights_are_recomputed_for_a_new_or_updated_weight(dtype):
    """The cached tap sum (input gradient) and 16-bit cast (forward) of float32 master weights
    follow the weight: a new weight at a freed one's address, an optimizer step, and the fused
    SGD op each give fresh ones."""
    from samples import Geometry
    g = Geometry(batch=2, channels=3, out_channels=4, height=5, width=6, k_t=2, k_hw=(3, 3), padding=(1, 1))
    a = _a(g)

    def check(t, w):
        _close(S.window_input_grad(t["grad_out"], w, [5, 6], *a[:3], 1),
               ref.window_input_grad(t["grad_out"], w, [5, 6], *a[:3], 1), dtype)
        _close(S.ring_conv_forward(t["ring"], None, t["slot"], w, None, *a),
               ref.ring_conv_forward(t["ring"], None, t["slot"], w, None, *a), dtype)

    for _ in range(3):  # new weights, often at the address the last one had
        t = make(g, dtype, param_dtype=torch.float32)
        check(t, t["weight"])
    w = t["weight"]
    with torch.no_grad():
        w.add_(1.0)  # as an optimizer step would
    check(t, w)
    S.sgd_tick_update(w, None, None, None, t["grad_out"], t["ring"], t["slot"], *a, 0.5, 0.0, 0.0, 0.0, False, True)
    check(t, w)
    # the same weight met by activations of another dtype: derived again in that dtype, not the last one's
    other = torch.float32 if dtype != torch.float32 else torch.float16
    u = make(g, other, param_dtype=torch.float32)
    u["ring"], u["grad_out"] = t["ring"].to(other), t["grad_out"].to(other)
    _close(S.ring_conv_forward(u["ring"], None, t["slot"], w, None, *a),
           ref.ring_conv_forward(u["ring"].double(), None, t["slot"], w.double(), None, *a), other)
    _close(S.window_input_grad(u["grad_out"], w, [5, 6], *a[:3], 1),
           ref.window_input_grad(u["grad_out"].double(), w.double(), [5, 6], *a[:3], 1), other)


def test_bias_grad_of_an_empty_error_is_zeros():
    """A batch of nothing: zeros (a new sum) or the accumulated sum unchanged, no launch over no rows."""
    empty = torch.empty(0, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(T.bias_grad(empty), torch.zeros(3))
    out = torch.tensor([1.0, 2.0, 3.0])
    T.bias_grad(empty, out=out)
    assert torch.equal(out, torch.tensor([1.0, 2.0, 3.0]))


def test_derived_weights_are_kept_only_for_live_whole_weights():
    """The 16-bit copies the ops derive from a weight are dropped when the weight dies, and a
    view (the live taps of a clip's edge: a new one every call) gets none kept: either would
    hold device memory that no call can use again."""
    w = torch.randn(6, 4, 3, 3, 3)
    for summed, flipped in ((False, False), (True, False), (True, True)):
        T._weight_as(w, torch.float16, summed=summed, flipped=flipped)
    keys = [(id(w), False, False), (id(w), True, False), (id(w), True, True)]
    assert all(k in T._derived for k in keys)
    before = len(T._derived)
    for live in (w.narrow(2, 1, 2), w.narrow(2, 0, 1)):
        made = T._weight_as(live, torch.float16, summed=True, flipped=True)
        torch.testing.assert_close(made.float(), live.sum(2).flip(2, 3).half().float())
    assert len(T._derived) == before
    del w, made, live
    assert not any(k in T._derived for k in keys)


def test_a_clip_update_run_reads_the_weights_forms_made_at_its_start(monkeypatch):
    """On the Triton backend a run that changes no weight (update="clip") derives each weight's
    forms (the forward's relayout, the input gradient's taps' sum both ways) once, at its start,
    and the ops read those where they would otherwise derive at every call (in a CUDA-graph
    capture or a compile: here, as under a compile), with the gradients of a run that derives at
    every call, to the bit."""
    from sideways_kernels import backend
    derived = []
    real = T._derive
    monkeypatch.setattr(T, "_derive", lambda *a: derived.append(a[2:]) or real(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # no eager cache: every call derives
    video, target = torch.randn(1, 3, 4, 4, 4), torch.randint(0, 7, (1,))

    def clip():
        torch.manual_seed(0)
        net = classifier_net([(3, 1, 1)], channels=(3, 8), dtype=torch.float32)
        derived.clear()
        with T.using(config=SMALL):  # (the interpreter's time goes with tile size: these frames are 4x4)
            SidewaysPipeline(stages_of(net, 2), backend="triton").backward_clip(video, target)
        return [p.grad for p in net.parameters()], list(derived)
    held, made = clip()
    assert sorted(made) == sorted([(False, False), (True, False), (True, True)] * 2)  # 2 convs, at the start only
    monkeypatch.setattr(backend, "constant_weights", lambda *a: contextlib.nullcontext())
    every_call, made_each = clip()
    assert len(made_each) > 2 * len(made) and all(torch.equal(a, b) for a, b in zip(held, every_call))


def test_held_forms_are_read_by_the_key_each_op_asks_for():
    """Within a run that holds them, _weight_as gives each op its own form: the forward's
    relayout, the general input gradient's taps' sum and the box kernel's flipped one — each the
    tensor held, equal to what _derive makes."""
    from sideways_kernels import forms
    w = torch.randn(8, 4, 3, 3, 3)
    with forms.held(T.forms_of(w, torch.float16, forward=True, input_grad=True)):
        for summed, flipped in [(False, False), (True, False), (True, True)]:
            got = T._weight_as(w, torch.float16, summed=summed, flipped=flipped)
            assert got is forms.get(w, ("triton", torch.float16, summed, flipped))
            assert torch.equal(got, T._derive(w, torch.float16, summed, flipped))


def test_launches_pass_unit_strides_where_the_ahead_of_time_check_assumes_them(monkeypatch):
    """bench/gpu_check.py compiles every kernel with its UNIT strides as the constant 1 (channels
    innermost: what lets Triton vectorise and pipeline the loads). Real pipelines must launch
    them so: a ring from the pipeline, errors from autograd, float32 master weights."""
    gpu_check = _gpu_check()
    seen = {}
    original, wrap = T._launch, T.wrap_triton

    def spy(kernel, name, grid, args, meta, device, *rest, **kw):
        seen.setdefault(name, []).append(dict(zip(kernel.arg_names, args)))
        return original(kernel, name, grid, args, meta, device, *rest, **kw)

    direct = {T.K._weight_finish_kernel: "weight_finish", T.K._column_sum_kernel: "column_sum",
              T.K._column_sum_finish_kernel: "column_sum_finish", T.K._split_sum_kernel: "split_sum"}

    def wrap_spy(kernel):  # the weight update's finish and the bias sums are launched directly, not through _launch
        if kernel not in direct:
            return wrap(kernel)
        launcher = wrap(kernel)
        record = lambda *args, **kw: seen.setdefault(direct[kernel], []).append({**dict(zip(kernel.arg_names, args)),
                                                                                   **kw})
        return type("Spy", (), {"__getitem__": lambda _, grid: lambda *a, **kw: (record(*a, **kw), launcher[grid](*a, **kw))})()
    monkeypatch.setattr(T, "_launch", spy)
    monkeypatch.setattr(T, "wrap_triton", wrap_spy)
    monkeypatch.setattr(T, "grouped_weight_updates", lambda calls: calls)  # each layer's op (the grouped
    net = classifier_net([(3, 1, 1), (2, 0, 1)], channels=(3, 16, 16), dtype=torch.float32)  # kernels: no unit strides)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    video, target = torch.randn(2, 3, 4, 6, 7), torch.randint(0, 7, (2,))
    with torch.autocast("cpu", torch.float16):
        with T.using(gemm_split=2):  # the box forward and input gradient split over K, as small frames are
            SidewaysPipeline(stages_of(net, 2), backend="triton").backward_clip(video, target)
        SidewaysPipeline(stages_of(net, 2), backend="triton", update="tick", optimizer=opt).backward_clip(video, target)
    assert set(seen) == {kernel for kernel in gpu_check.UNIT if "grouped" not in kernel}
    assert not gpu_check.UNIT["box_grouped_weight_update"] and not gpu_check.UNIT["grouped_weight_finish"]
    # the bias sums' finish both ways (accumulating into a gradient, a new sum for the SGD step): both compiled
    assert {launch["ACCUMULATE"] for launch in seen["column_sum_finish"]} == {True, False}
    assert {"column_sum_finish", "column_sum_finish_add"} <= set(gpu_check.KERNELS)
    for kernel, names in gpu_check.UNIT.items():
        for launch in seen.get(kernel, []):  # every layer's
            assert all(launch[n] == 1 for n in names), (kernel, {n: launch[n] for n in names})


def test_box_width_is_chosen_to_waste_least_at_the_frame_edge():
    # 128 positions on a 56x56 frame: 8 wide (16 rows) covers 64x56; 16 wide (8 rows) covers 56x64
    assert box_waste(56, 56, 128, 8) == box_waste(56, 56, 128, 16) == 64 * 56 / (56 * 56)
    assert box_waste(14, 14, 64, 8) == 16 * 16 / (14 * 14)
    wide, narrow = Config(128, 128, 64, 4, 8, 16), Config(128, 128, 64, 4, 8, 8)
    assert prune_boxes([narrow, wide], 56, 56, lambda c: c.BLOCK_M) == [wide]  # a tie: the wider rows
    assert prune_boxes([narrow, wide], 8, 64, lambda c: c.BLOCK_M) == [wide]  # 8x16 boxes fit exactly
    assert prune_boxes([wide, narrow], 64, 8, lambda c: c.BLOCK_M) == [narrow]  # 16x8 boxes fit exactly


@pytest.mark.parametrize("kind, arch", [("box_gemm", 90), ("box_weight_update", 90), ("gemm", 90), ("gemm", 80),
                                        ("weight_update", 90), ("weight_update", 80)])
def test_the_autotuner_steps_through_few_channels_in_narrow_blocks_and_many_in_wide_ones(kind, arch):
    """Of a kernel's 16-bit list, a problem of at most SMALL_CHANNELS channels (the RGB stem's 3, a
    grouped conv's few per group) keeps the configs whose channel block is that narrow — a
    forward's or input gradient's K step, a weight update tile's input channels — and any other
    problem the wider ones (a 64-channel block of 3 real ones is 21x the MMA work); a list without
    such configs (fp32's) is kept whole. Which block a kernel steps its channels by, and which
    channels: T._CHANNEL_BLOCK (per group on the general kernels)."""
    from sideways_kernels.triton.configs import SMALL_CHANNELS, configs_for, fit_channels
    field = "BLOCK_N" if "weight_update" in kind else "BLOCK_K"
    block = lambda c: getattr(c, field)
    kernels = [k for k, kk in T._KIND.items() if kk == kind]
    assert kernels and all(T._CHANNEL_BLOCK[k][1] == field for k in kernels)
    # the channels stepped through: the ring's (per group), an input gradient's error's; C=24, C_OUT=48, 8 groups
    # (the general kernels take the channels per group as arguments: cg, mg)
    stepped = {"ring_conv_forward": 3, "window_input_grad": 6, "weight_update": 3, "box_forward": 24,
               "box_input_grad": 24, "box_weight_update": 24}
    assert all(T._CHANNEL_BLOCK[k][0](dict(C=24, C_OUT=48, cg=3, mg=6)) == stepped[k] for k in kernels)
    listed = configs_for(kind, arch)
    for channels in (3, 8, SMALL_CHANNELS):
        kept = fit_channels(listed, channels, block)
        assert kept and {block(c) for c in kept} == {SMALL_CHANNELS}, (kind, channels)
    for channels in (SMALL_CHANNELS + 8, 64, 512):
        kept = fit_channels(listed, channels, block)
        assert kept and min(block(c) for c in kept) > SMALL_CHANNELS, (kind, channels)
    wide = [c for c in listed if block(c) > SMALL_CHANNELS]
    assert fit_channels(wide, 3, block) == wide
    if not kind.startswith("box"):  # fp32's list (the box kernels have none: 16-bit only)
        assert fit_channels(configs_for(kind, arch, 4), 3, block) == configs_for(kind, arch, 4)


def test_every_thread_launching_box_kernels_gets_the_descriptor_scratch_allocator():
    """Triton keeps its allocator in a context variable that each new thread starts without: a
    pipeline's stage threads launching the box kernels on the H100 (2026-11-27) failed with 'no
    allocator was set' while the main thread's calls worked. Each launch installs it where the
    calling thread has none, and leaves one the user set alone."""
    import contextvars
    import threading

    import triton
    from triton.runtime import _allocation

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    T._descriptor_scratch(cuda)  # the main thread first, as the benchmarks' op rows did
    seen = {}

    def launch(name, own=None):
        if own is not None:
            triton.set_allocator(own)
        T._descriptor_scratch(cuda)
        seen[name] = _allocation._allocator.get()

    mine = lambda size, alignment, stream: None  # noqa: E731
    for args in (("stage", None), ("user", mine)):
        worker = threading.Thread(target=contextvars.Context().run, args=(launch, *args))
        worker.start()
        worker.join()
    assert not isinstance(seen["stage"], _allocation.NullAllocator)
    assert seen["user"] is mine
    T._descriptor_scratch(torch.device("cpu"))  # CPU tensors (the interpreter) need none


# --- every layer's weight update of a tick in one launch ------------------------------------

# a tick's layers: two of each of two kernel shapes (channels, frames, padding and dilations differ), one of a
# third shape
_LAYER_SHAPES = [BOX_GEOMETRIES[0], _box_geometry(batch=2, channels=8, out_channels=12, height=6, width=10, k_t=3,
                                                  k_hw=(3, 3), padding=(0, 1), dilation=(2, 1)),
                 BOX_GEOMETRIES[2], _box_geometry(batch=3, channels=12, out_channels=4, height=4, width=9, k_t=2,
                                                  k_hw=(2, 2), padding=(1, 0), dilation_t=1),
                 BOX_GEOMETRIES[3]]


def _layer_updates(sgd: dict, *, seed=0):
    """Weight updates as one tick of a network would hand them over: two layers of each of two
    kernel shapes (so two launches of two problems each; their channels, frames, slots, padding
    and dilations differ) and one of a third shape; one layer without a bias; float32 forced onto
    the box path (exact). Each: (op, args) for the grouped call and a copy for the op itself."""
    torch.manual_seed(seed)
    grouped, alone = [], []
    for i, g in enumerate(_LAYER_SHAPES):
        t = _grad_out_channels_last(make(g, torch.float32, bias=i != 1))
        a = _a(g)
        if sgd is None:
            grad_w = torch.randn_like(t["weight"])
            grad_b = None if t["bias"] is None else torch.randn_like(t["bias"])
            args = (grad_w, grad_b, t["grad_out"], t["ring"], t["slot"], *a)
            op = "weight_grad_accumulate"
        else:
            momentum = sgd.get("momentum", 0.0)
            buf = torch.randn_like(t["weight"]) if momentum else None
            bias_buf = torch.randn_like(t["bias"]) if momentum and t["bias"] is not None else None
            args = (t["weight"], buf, t["bias"], bias_buf, t["grad_out"], t["ring"], t["slot"], *a, sgd["lr"], momentum,
                    sgd.get("dampening", 0.0), sgd.get("weight_decay", 0.0), sgd.get("nesterov", False), i % 2 == 0)
            op = "sgd_tick_update"
        copy = tuple(x.clone() if j < 4 and x is not None else x for j, x in enumerate(args))  # what is written
        grouped.append((op, args))
        alone.append((op, copy))
    return grouped, alone


# dampening without momentum: torch.optim.SGD ignores it (no momentum buffer is read or written); plain SGD
# and momentum alone are the ops' own tests' (the grouped finish takes the same factors)
@pytest.mark.parametrize("sgd", [None, *SGD_CONFIGS[2:], dict(lr=0.1, dampening=0.5)],
                         ids=lambda h: "accumulate" if h is None else sgd_id(h))
def test_grouped_weight_updates_equal_each_layer_s_op(sgd, poisoned_partials):
    """A tick's weight updates in grouped launches (one GEMM and one finish per kernel shape, the
    biases finished with the weights) leave what each layer's own op leaves, with the same split count: the
    weights and momentum buffers to the bit (the same sums in the same order), the biases (summed
    by the grouped kernel's own items instead of bias_grad's column sum) within float32 rounding
    of their sums; and both match float64
    reference.py. Momentum buffers fresh (first step) on some layers, old on others."""
    grouped, alone = _layer_updates(sgd)
    expected = [tuple(x.double() if isinstance(x, torch.Tensor) else x for x in args) for _, args in alone]
    T.launches.clear()
    T.paths.clear()
    with T.using(path="box", split=2):
        assert T.grouped_weight_updates(grouped) == []
        for op, args in alone:
            getattr(S, op)(*args)
    assert T.launches["grouped_weight_update"] == 3 and T.paths[("weight_update", "grouped")] == 5
    assert T.launches["grouped_weight_finish"] == 3  # three shapes: their weights and biases together
    for (op, args), (_, own), exp in zip(grouped, alone, expected):
        getattr(ref, op)(*exp)
        exact = (0,) if op == "weight_grad_accumulate" else (0, 1)  # the weight's (or its gradient's) tensors
        for k in range(4 if op == "sgd_tick_update" else 2):
            if args[k] is None:
                continue
            if k in exact:
                assert torch.equal(args[k], own[k]), (op, k)
            else:  # two orders of one fp32 sum: a few ulps of the sum of magnitudes apart (times lr after a step)
                g = args[2 if op == "weight_grad_accumulate" else 4]
                ulps = 8 * torch.finfo(torch.float32).eps * g.abs().sum((0, 2, 3)).max().item()
                torch.testing.assert_close(args[k], own[k], rtol=0, atol=ulps * max(1.0, (sgd or {}).get("lr", 1.0)))
            _close(args[k], exp[k], torch.float32)


def test_a_grouped_weight_update_s_finish_takes_its_biases_in_groups_of_sixteen():
    """Nine layers of one shape with biases: one GEMM launch, and their 18 finish problems (nine
    weights, nine biases) in two finish launches (a launch takes 16 problems' addresses); every
    gradient what the layer's own op leaves."""
    g = _box_geometry(batch=1, channels=8, out_channels=8, height=3, width=4, k_t=2, k_hw=(1, 1), padding=(0, 0))
    torch.manual_seed(3)
    grouped, alone = [], []
    for _ in range(9):
        t = _grad_out_channels_last(make(g, torch.float32, bias=True))
        args = (torch.randn_like(t["weight"]), torch.randn_like(t["bias"]), t["grad_out"], t["ring"], t["slot"], *_a(g))
        grouped.append(("weight_grad_accumulate", args))
        alone.append(tuple(x.clone() if j < 2 else x for j, x in enumerate(args)))
    T.launches.clear()
    with T.using(path="box", split=1):
        assert T.grouped_weight_updates(grouped) == []
        for args in alone:
            S.weight_grad_accumulate(*args)
    assert T.launches["grouped_weight_update"] == 1 and T.launches["grouped_weight_finish"] == 2
    for (_, args), own in zip(grouped, alone):
        assert torch.equal(args[0], own[0])
        torch.testing.assert_close(args[1], own[1], rtol=1e-6, atol=1e-5)


def test_grouped_weight_updates_leave_what_they_cannot_take_in_order():
    """What the grouped kernels cannot take comes back, in order, for the caller to run: a
    problem off the box path (spatial stride 2), a second update of a weight already in the
    group (it must run after the first); and bad arguments raise as the op would."""
    grouped, _ = _layer_updates(None)
    g, dtype, _ = FALLBACKS["stride"]
    t = _grad_out_channels_last(make(g, torch.float32))
    strided = ("weight_grad_accumulate", (torch.zeros_like(t["weight"]), None, t["grad_out"], t["ring"], t["slot"],
                                          *_a(g)))
    with T.using(path=None):  # float32 alone does not take the box path: every call comes back
        assert T.grouped_weight_updates(grouped[:2]) == grouped[:2]
    with T.using(path="box", split=1):  # comes back even when forced: the op itself then refuses it
        assert T.grouped_weight_updates([strided]) == [strided]
    with T.using(split=1):
        half = _grad_out_channels_last(make(BOX_GEOMETRIES[0], torch.float16))
        ok = ("weight_grad_accumulate", (torch.zeros_like(half["weight"]).float(), None, half["grad_out"],
                                         half["ring"], half["slot"], *_a(BOX_GEOMETRIES[0])))
        f16_strided = ("weight_grad_accumulate", (torch.zeros_like(t["weight"]), None, t["grad_out"].half(),
                                                  t["ring"].half(), t["slot"], *_a(g)))
        left = T.grouped_weight_updates([ok, f16_strided, ("weight_grad_accumulate", ok[1])])
        assert left == [f16_strided, ("weight_grad_accumulate", ok[1])]
        bad = ("weight_grad_accumulate", (ok[1][0], None, half["grad_out"][:, 1:], *ok[1][3:]))
        with pytest.raises(ValueError, match="grad_out must have shape"):
            T.grouped_weight_updates([bad])


@pytest.mark.parametrize("update", ["tick"])  # (update="clip": the depth-parallel tick's test below)
def test_a_tick_runs_its_layers_weight_updates_as_one_launch_per_kernel_shape(update, monkeypatch):
    """A Triton pipeline holds each layer's weight update (clip: accumulate; tick: the momentum
    SGD step) until the tick's end and runs them together: per tick one grouped GEMM per kernel
    shape among them (the three 3x3x3 convs, the 1x1x1 head), no per-layer update at all. The
    result is the torch backend's (per-layer cuDNN calls and SGD steps), in three stages."""
    make_net = lambda: classifier_net([(3, 1, 1), (3, 1, 1), (3, 0, 1)], channels=(4, 8, 8, 8), classes=8,
                                      dtype=torch.float32)
    video, target = torch.randn(2, 4, 5, 8, 7), torch.randint(0, 8, (2,))
    ticks = []
    original = T.grouped_weight_updates

    def counted(calls):
        before = T.launches["grouped_weight_update"]
        left = original(calls)
        ticks.append((len(calls), len({args[0].shape[2:] for _, args in calls}),
                      T.launches["grouped_weight_update"] - before, len(left)))
        return left
    monkeypatch.setattr(T, "grouped_weight_updates", counted)
    from sideways_kernels import backend
    from sideways_kernels.engine import Engine
    order = []  # the held updates run only once every stage's stream joined (they read the stages' errors)
    for cls, name in ((Engine, "_fork"), (Engine, "_join"), (backend.WeightUpdates, "run")):
        monkeypatch.setattr(cls, name, lambda *a, _f=getattr(cls, name), _n=name, **k: order.append(_n) or _f(*a, **k))
    results = {}
    torch.manual_seed(0)
    start = make_net().state_dict()
    for backend in ("torch", "triton"):
        net = make_net()
        net.load_state_dict(start)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) if update == "tick" else None
        T.paths.clear()
        T.launches.clear()
        ticks.clear()
        order.clear()  # (the Triton run's, last)
        with T.using(path="box"):  # float32 on the box path, as 16-bit activations take it on a GPU
            out = SidewaysPipeline(stages_of(net, 3), backend=backend, update=update, optimizer=opt).backward_clip(
                video, target)
        after = [p.detach().clone() for p in net.parameters()] if update == "tick" else grads(net)
        results[backend] = (out.loss, after)
    assert len(ticks) >= 4 and max(n for n, *_ in ticks) == 4  # every layer's update in the steady ticks
    assert all(launched == shapes and left == 0 for _, shapes, launched, left in ticks), ticks
    ticks_order = " ".join(order).split("_fork")[1:]  # each tick: its streams fork, join, then the updates run
    assert ticks_order and {t.split() == ["_join", "run"] for t in ticks_order} == {True}, set(ticks_order)
    assert set(T.paths) == {("ring_conv_forward", "box"), ("ring_conv_forward", "grouped"), ("window_input_grad", "box"),
                            ("window_input_grad", "grouped"), ("weight_update", "grouped")}
    # a layer's frame (channels-last, as the layers hand them on) goes into its ring with the forward;
    # only the video's own frames (NCDHW) take a copy of their own
    assert T.launches["ring_push"] == video.shape[2]
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert rel_error(results["triton"][1], results["torch"][1]) < 1e-4


def test_grouped_launches_split_what_they_must_and_take_every_problem_s_own_tensors(poisoned_partials):
    """17 layers of one kernel shape (more than one launch takes: two GEMM launches, each problem
    reading its own error, ring and weight out of the 16 address arguments), and in the same
    call updates of that shape that must not share a launch: an accumulation beside SGD steps,
    a nesterov step beside a plain one. Each equals its own op. A weight in channels-last memory
    (the finish writes in memory order) comes back to run alone."""
    g = _box_geometry(batch=1, channels=8, out_channels=8, height=3, width=5, k_t=1, k_hw=(1, 1))
    grouped, alone = [], []
    torch.manual_seed(1)
    for i in range(20):
        t = _grad_out_channels_last(make(g, torch.float32))
        if i < 17:
            op, tail = "weight_grad_accumulate", ()
            args = (torch.randn_like(t["weight"]), torch.randn_like(t["bias"]))
        else:
            op, tail = "sgd_tick_update", (0.1, 0.9, 0.0, 0.0, i == 19, False)
            args = (t["weight"].clone(), torch.randn_like(t["weight"]), t["bias"].clone(), torch.randn_like(t["bias"]))
        args = (*args, t["grad_out"], t["ring"], t["slot"], *_a(g), *tail)
        grouped.append((op, args))
        alone.append((op, tuple(x.clone() if j < 4 else x for j, x in enumerate(args))))
    t = _grad_out_channels_last(make(BOX_GEOMETRIES[0], torch.float32))
    strided = ("weight_grad_accumulate", (torch.zeros_like(t["weight"]).contiguous(memory_format=torch.channels_last_3d),
                                          None, t["grad_out"], t["ring"], t["slot"], *_a(BOX_GEOMETRIES[0])))
    T.launches.clear()
    with T.using(path="box", split=1):
        assert T.grouped_weight_updates(grouped + [strided]) == [strided]
        for op, args in alone:
            getattr(S, op)(*args)
    assert T.launches["grouped_weight_update"] == 4  # 16 + 1 accumulations, the plain step, the nesterov one
    for (op, args), (_, own) in zip(grouped, alone):
        for k in range(4 if op == "sgd_tick_update" else 2):
            exact = k == 0 or (k == 1 and op == "sgd_tick_update")
            if exact:
                assert torch.equal(args[k], own[k]), (op, k)
            else:
                torch.testing.assert_close(args[k], own[k], rtol=1e-6, atol=1e-6)


def test_grouped_launch_tables_are_reused_and_those_a_graph_reads_never_dropped(monkeypatch):
    """A grouped launch's tables are made once per content and reused (no copy from the host per
    tick); of the loose ones the last TABLES are kept, while one a CUDA-graph capture used (marked
    kept) stays whatever comes after: a replay reads it."""
    monkeypatch.setattr(T, "_tables", type(T._tables)())
    monkeypatch.setattr(T, "TABLES", 2)
    cpu = torch.device("cpu")
    first = T._table([1, 2, 3], torch.int64, cpu)
    assert T._table([1, 2, 3], torch.int64, cpu) is first
    T._tables[((9,), torch.int64, cpu)] = (torch.tensor([9]), True)  # as a capture leaves it
    for v in range(4):
        T._table([v], torch.int64, cpu)
    assert ((9,), torch.int64, cpu) in T._tables
    assert sum(not kept for _, kept in T._tables.values()) == 2 and ((1, 2, 3), torch.int64, cpu) not in T._tables


# --- every layer's forward of a tick in one launch -------------------------------------------

def _layer_forwards(dtype, *, push=True, seed=0):
    """Forwards as one tick of a network would run them: the layers of _layer_updates' five
    geometries (three kernel shapes; one layer without a bias), each pushing a channels-last frame
    (``push``) into a slot poisoned with NaN. (args for the grouped call, a copy for the op alone,
    the float64 expected output and ring)."""
    torch.manual_seed(seed)
    cases = []
    for i, g in enumerate(_LAYER_SHAPES):
        t = make(g, dtype, param_dtype=torch.float32, bias=i != 1)
        frame = t["frame"].contiguous(memory_format=torch.channels_last) if push else None
        ring = t["ring"].clone()
        if push:
            ring[t["slot"]] = float("nan")
        args = (ring, frame, t["slot"], t["weight"], t["bias"], *_a(g))
        d = lambda x: None if x is None else x.double()
        expected_ring = d(t["ring"]).clone()
        expected = ref.ring_conv_forward(expected_ring, d(frame), t["slot"], d(t["weight"]), d(t["bias"]), *_a(g))
        cases.append((args, (ring.clone(), *args[1:]), expected, expected_ring))
    return cases


@pytest.mark.parametrize("push", [True, False], ids=["push", "no_push"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_forwards_equal_each_layer_s_op(dtype, push):
    """A tick's forwards in grouped launches (one per kernel shape: three for five layers) give
    each layer's own op's output to the bit (the same sums in the same order: the op unsplit) and
    push each frame into its slot; both match float64 reference.py."""
    cases = _layer_forwards(dtype, push=push)
    T.launches.clear()
    T.paths.clear()
    with T.using(path="box" if dtype == torch.float32 else None, gemm_split=1):
        outs = T.grouped_ring_conv_forwards([args for args, *_ in cases])
        counted = dict(T.launches)
        own = [S.ring_conv_forward(*copy) for _, copy, *_ in cases]
    # fp16 rows of 12 or 4 channels are not whole 16-byte units: those layers run alone, on the general path
    boxed = [args for args, *_ in cases if dtype == torch.float32 or args[0].shape[2] % 8 == args[3].shape[0] % 8 == 0]
    assert T.paths[("ring_conv_forward", "grouped")] == len(boxed) == (5 if dtype == torch.float32 else 3)
    assert counted["grouped_forward"] == len({tuple(args[3].shape[2:]) for args in boxed})
    assert counted.get("ring_push", 0) == (push and 5 - len(boxed))
    for (args, copy, expected, expected_ring), out, mine in zip(cases, outs, own):
        assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == expected.shape
        assert torch.equal(out, mine)
        _close(out, expected, dtype)
        assert torch.equal(args[0].double(), expected_ring) and torch.equal(args[0], copy[0])


def test_grouped_stage_forwards_write_relu_outputs_and_mask_the_waiting_errors():
    """As chain stages (conv, ReLU): each grouped forward writes ReLU(its op's output) into the
    buffer given (a 5-D double buffer's frame) and masks the error waiting there in place as
    autograd's ReLU backward would — to the bit; fp16, so two of the five layers run alone (their
    rows are not 16-byte units) and do the same after their op. Positive and negative outputs
    both occur; one layer has no waiting error, one no ReLU."""
    cases = _layer_forwards(torch.float16)
    stages, expected = [], []
    for i, (args, copy, *_) in enumerate(cases):
        own = S.ring_conv_forward(*copy)
        relu = i != 2
        out = torch.full_like(own, float("nan")).unsqueeze(2)[:, :, 0]  # a [B, C, 1, H, W] buffer's frame
        error = None if i == 3 else torch.randn_like(own)
        y = torch.relu(own) if relu else own
        assert (y > 0).any() and (y <= 0).any()
        stages.append((out, relu, error, None))
        expected.append((y, None if error is None else torch.ops.aten.threshold_backward(error, y, 0)))
    T.launches.clear()
    got = T.grouped_ring_conv_forwards([args for args, *_ in cases], stages)
    boxed = [args for args, *_ in cases if args[0].shape[2] % 8 == args[3].shape[0] % 8 == 0]
    assert T.launches["grouped_forward"] == len({tuple(args[3].shape[2:]) for args in boxed}) and len(boxed) == 3
    assert T.launches["ring_conv_forward"] == 2
    for (out, _, error, _), g, (y, masked) in zip(stages, got, expected):
        assert g is out and torch.equal(out, y)
        assert error is None or torch.equal(error, masked)


def test_grouped_stage_forwards_pool_after_the_relu_as_c3d_s_blocks():
    """Chain stages of a conv, its ReLU and a 1x2x2 max pool (C3D's blocks): the pooled ReLU output
    into the buffer given, and the error at the conv's output — the pooled error at each window's
    first maximum where positive — what autograd through ReLU and max pool gives, to the bit.
    Integer-valued data (exact fp16 sums), so windows tie (the first maximum must win) and odd
    output sizes drop their last row or column (floor); the two layers off the box path do the same
    after their op."""
    import torch.nn.functional as F
    cases = _layer_forwards(torch.float16)
    with torch.no_grad():
        for args, copy, *_ in cases:
            for t in (args[0], copy[0], args[1], args[3], args[4]):
                if t is not None:
                    t.copy_((t * 2).round().clamp(-2, 2))
    stages, expected, ties = [], [], 0
    for args, copy, *_ in cases:
        own = S.ring_conv_forward(*copy).float().requires_grad_()
        pooled = F.max_pool2d(torch.relu(own), 2)
        error = torch.randn(pooled.shape).to(torch.float16).contiguous(memory_format=torch.channels_last)
        pooled.backward(error.float())
        windows = torch.relu(own.detach())[..., :pooled.shape[2] * 2, :pooled.shape[3] * 2].unfold(2, 2, 2).unfold(3, 2, 2)
        top = windows.flatten(-2).max(-1).values
        ties += int(((windows.flatten(-2) == top[..., None]).sum(-1) > 1)[top > 0].sum())
        nan = lambda shape: torch.full(shape, float("nan"), dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        stages.append((nan(pooled.shape), True, error.clone(), nan(own.shape)))
        expected.append((pooled.detach().half(), own.grad.half()))
    assert ties > 0
    T.launches.clear()
    got = T.grouped_ring_conv_forwards([args for args, *_ in cases], stages)
    assert T.launches["grouped_forward"] >= 1 and T.launches["ring_conv_forward"] == 2
    for (out, _, _, at_conv), g, (pooled, grad) in zip(stages, got, expected):
        assert g is out and torch.equal(out, pooled) and torch.equal(at_conv, grad)


def test_a_layer_s_ring_is_stored_as_its_backend_reads_it():
    """The stem's ring in 16-byte rows on the Triton backend (3 float32 channels in rows of 4), in
    plain rows of 3 on the torch backend, whose fold reads the ring as one image — made anew when
    a pipeline of the same layers runs on the other backend; the losses the same either way."""
    video, target = torch.randn(1, 3, 5, 2, 2), torch.tensor([1])
    stages = _conv_relu_chain(2, video_channels=3)
    stem = stages[0][0]
    losses = []
    for name, row in (("triton", 4), ("torch", 3), ("triton", 4)):
        losses.append(SidewaysPipeline(stages, backend=name).backward_clip(video, target).loss)
        assert stem._ring.stride(0) == row, name
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert losses[0] == losses[2]


def test_stage_epilogues_after_forwards_run_elsewhere_take_one_launch_per_pool_kind(strict_launches):
    """A chain stage's epilogue after its forward ran elsewhere (cuDNN's output, its bias not added):
    the bias, the ReLU, the 1x2x2 pool, the output into the buffer given and the waiting error
    through the pool's and the ReLU's backward — ATen's ops (the per-stage path's) to the bit, in
    one grouped launch per pool kind for every stage whose tensors TMA takes; a stage of 4 fp16
    channels (8-byte rows) gets ATen's ops. Odd frame sizes (the pool floors), one stage without a
    bias, one without a ReLU or a waiting error."""
    torch.manual_seed(0)
    dtype = torch.float16
    frame = lambda *shape: torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)
    specs = [(16, 5, 7, True, True, False, True), (8, 4, 4, False, False, False, False),
             (8, 6, 5, True, True, True, True), (16, 7, 9, True, True, True, False),
             (4, 4, 6, True, True, False, True)]  # (C_OUT, H, W, ReLU, error, pool, bias)
    convs, biases, stages, copies = [], [], [], []
    for c, h, w, relu, waiting, pool, has_bias in specs:
        conv = frame(2, c, h, w)
        bias = torch.randn(c) if has_bias else None
        size = (h // 2, w // 2) if pool else (h, w)
        stage = (torch.full((2, c, *size), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last),
                 relu, frame(2, c, *size) if waiting else None, frame(2, c, h, w) if pool else None)
        convs.append(conv)
        biases.append(bias)
        stages.append(stage)
        copies.append((conv.clone(), tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in stage)))
    T.launches.clear()
    T.paths.clear()
    outs = T.stage_epilogues(convs, biases, stages)
    assert T.launches["grouped_stage_epilogue"] == 2 and T.paths[("stage_epilogue", "grouped")] == 4
    for (conv, stage), bias, out, mine in zip(copies, biases, outs, stages):
        expected = T._stage_epilogue(conv, stage, bias)
        assert out is mine[0] and torch.equal(out, expected)
        for got, want in zip(mine[2:], stage[2:]):
            assert got is None or torch.equal(got, want)


def test_stage_epilogues_take_wide_stages_any_output_layout_mixed_bias_dtypes_and_more_than_a_group(strict_launches):
    """Stage epilogues as a GPU tick meets them: 80 output channels (two channel tiles of the
    interpreter's 64: C3D's 256 and 512 are several on the GPU), pooled or not; an output that is
    a view of a wider buffer (its strides not the error's); biases in fp32 and fp16 in one call
    (a launch per bias dtype); 17 stages (more than a launch takes) — ATen's ops to the bit. A
    pooled stage without the error that arrived for it is refused."""
    torch.manual_seed(1)
    dtype = torch.float16
    frame = lambda *shape: torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)

    def stage(c, h, w, pool, bias_dtype=torch.float32, wide_out=False):
        size = (h // 2, w // 2) if pool else (h, w)
        out = torch.full((2, *size, 2 * c if wide_out else c), float("nan"), dtype=dtype)[..., :c].permute(0, 3, 1, 2)
        return frame(2, c, h, w), torch.randn(c).to(bias_dtype), (out, True, frame(2, c, *size),
                                                                  frame(2, c, h, w) if pool else None)

    calls = {"wide": [stage(80, 4, 6, False), stage(80, 6, 4, True)],
             "layouts and bias dtypes": [stage(16, 4, 6, False, wide_out=True), stage(16, 5, 3, False, torch.float16),
                                         stage(8, 3, 4, False)],
             "more than a group": [stage(8, 2, 4, False) for _ in range(17)]}
    launches = {"wide": 2, "layouts and bias dtypes": 2, "more than a group": 2}
    for name, cases in calls.items():
        copies = [(conv.clone(), tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in st))
                  for conv, _, st in cases]
        T.launches.clear()
        T.paths.clear()
        outs = T.stage_epilogues([c for c, _, _ in cases], [b for _, b, _ in cases], [st for *_, st in cases])
        assert T.launches["grouped_stage_epilogue"] == launches[name], name
        assert T.paths[("stage_epilogue", "grouped")] == len(cases), name
        for (conv, st), (_, bias, mine), out in zip(copies, cases, outs):
            assert out is mine[0] and torch.equal(out, T._stage_epilogue(conv, st, bias)), name
            assert all(got is None or torch.equal(got, want) for got, want in zip(mine[2:], st[2:])), name
    conv, bias, (out, _, _, at_conv) = stage(16, 4, 6, True)
    with pytest.raises(ValueError, match="pool needs"):
        T.stage_epilogues([conv], [bias], [(out, True, None, at_conv)])


def test_grouped_input_grads_go_into_the_buffers_given():
    """``outs``: each input gradient written where the caller says (the double buffer below), the
    grouped ones and those run alone, to the bit."""
    torch.manual_seed(0)
    cases = []
    for g in _LAYER_SHAPES:
        t = _grad_out_channels_last(make(g, torch.float16, param_dtype=torch.float32))
        cases.append((t["grad_out"], t["weight"], [g.height, g.width], *_a(g)[:3], g.groups))
    own = [S.window_input_grad(*args) for args in cases]
    outs = [torch.full_like(o, float("nan")) for o in own]
    got = T.grouped_window_input_grads(cases, outs)
    for g, out, mine in zip(got, outs, own):
        assert g is out and torch.equal(out, mine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_input_grads_equal_each_layer_s_op(dtype):
    """A tick's input gradients in grouped launches (the box forward's kernel on each error, one
    launch per kernel shape) give each layer's own op's result to the bit, and float64
    reference.py's; what the box path cannot take (fp16 rows of 12 or 4 channels) runs alone."""
    torch.manual_seed(0)
    cases = []
    for g in _LAYER_SHAPES:
        t = _grad_out_channels_last(make(g, dtype, param_dtype=torch.float32))
        a = _a(g)
        cases.append((t["grad_out"], t["weight"], [g.height, g.width], *a[:3], g.groups))
    T.launches.clear()
    T.paths.clear()
    with T.using(path="box" if dtype == torch.float32 else None, gemm_split=1):
        got = T.grouped_window_input_grads(cases)
        counted = dict(T.launches)
        own = [S.window_input_grad(*args) for args in cases]
    boxed = [args for args in cases if dtype == torch.float32 or args[0].shape[1] % 8 == args[1].shape[1] % 8 == 0]
    assert T.paths[("window_input_grad", "grouped")] == len(boxed) == (5 if dtype == torch.float32 else 3)
    assert counted["grouped_input_grad"] == len({tuple(args[1].shape[3:]) for args in boxed})
    d = lambda x: x.double()
    for args, out, mine in zip(cases, got, own):
        assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, mine)
        _close(out, ref.window_input_grad(d(args[0]), d(args[1]), *args[2:]), dtype)


def test_every_stage_s_first_forward_and_input_gradient_run_in_one_launch_per_tick(monkeypatch):
    """Sideways' depth-parallel tick: a stage's first conv reads the sample that arrived from
    below last tick, so every stage's first forward of a tick runs before the stages, in one
    grouped launch per kernel shape, and each stage takes its output; that conv's input gradient
    goes only into the error its stage sends down, read next tick, so they all run after the
    stages' backwards, grouped too. A chain cut one conv per stage: the upper stages' 3x3x3
    forwards share a launch, the 2x3x3 one has its own, and their input gradients (3x3 kernels
    once the taps are summed) share one (the stem's forward, on the video's own NCDHW frames,
    runs alone; it sends no error). No grouped conv runs an op of its own; every weight
    update (accumulated: update="clip") is grouped at the tick's end. Losses and gradients are the
    torch backend's (each layer's cuDNN call)."""
    make_net = lambda: classifier_net([(3, 1, 1), (3, 1, 1), (2, 1, 1), (3, 0, 1)], channels=(8, 8, 16, 8),
                                      classes=8, dtype=torch.float32)
    video, target = torch.randn(1, 8, 5, 8, 7), torch.randint(0, 8, (1,))
    seen = {"forward": [], "input_grad": []}  # per grouped call: (calls, of them on the box path, kernel shapes, launches)

    def counting(kind, original, frame_of):
        def counted(calls, epilogues=None):
            before = T.launches[f"grouped_{kind}"]
            outs = original(calls, epilogues)
            boxed = [a for a in calls if T._tma_strides(frame_of(a)) is not None]  # not the video's frame
            shapes = {tuple(a[1].shape[-2:]) if kind == "input_grad" else tuple(a[3].shape[-3:]) for a in boxed}
            seen[kind].append((len(calls), len(boxed), len(shapes), T.launches[f"grouped_{kind}"] - before))
            return outs
        return counted
    monkeypatch.setattr(T, "grouped_ring_conv_forwards", counting("forward", T.grouped_ring_conv_forwards,
                                                                  lambda a: a[1]))
    monkeypatch.setattr(T, "grouped_window_input_grads", counting("input_grad", T.grouped_window_input_grads,
                                                                  lambda a: a[0]))
    from sideways_kernels import torch_backend
    ops = {"ring_conv_forward": 0, "window_input_grad": 0}  # the torch backend's: every call of the run
    for op in ops:
        monkeypatch.setattr(torch_backend, op, lambda *a, _f=getattr(torch_backend, op), _op=op:
                            ops.__setitem__(_op, ops[_op] + 1) or _f(*a))
    torch.manual_seed(0)
    start = make_net().state_dict()
    results = {}
    for backend in ("torch", "triton"):
        net = make_net()
        net.load_state_dict(start)
        T.paths.clear()
        T.launches.clear()
        for calls in seen.values():
            calls.clear()
        with T.using(path="box"):
            out = SidewaysPipeline(stages_of(net, 4), backend=backend).backward_clip(video, target)
        results[backend] = (out.loss, grads(net))
    for kind, op in (("forward", "ring_conv_forward"), ("input_grad", "window_input_grad")):
        calls = seen[kind]
        assert all(launched == shapes for _, _, shapes, launched in calls), (kind, calls)
        # three stages' convs: the forwards of the 3x3x3 ones together, the 2x3x3 apart; their input
        # gradients (the taps summed: a 3x3 kernel each) all in one launch
        launches = {"forward": 2, "input_grad": 1}[kind]
        assert any(boxed == 3 and launched == launches for _, boxed, _, launched in calls), (kind, calls)
        assert all(n - boxed in (0, 1) for n, boxed, *_ in calls)  # the stem's alone
        grouped = sum(boxed for _, boxed, *_ in calls)
        assert T.paths[(op, "grouped")] == grouped > 0
        assert T.launches[op] == ops[op] - grouped  # the others ran the op alone, once
    assert T.paths[("weight_update", "grouped")] and ("weight_update", "box") not in T.paths  # every update grouped
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert rel_error(results["triton"][1], results["torch"][1]) < 1e-4


# aten ops that only make or describe memory: no kernel runs for them on a GPU
_NO_KERNEL = {"empty.memory_format", "empty_strided.default", "empty_like.default", "detach.default", "view.default",
              "squeeze.dim", "squeeze_.dim", "unsqueeze.default", "unsqueeze_.default", "select.int", "slice.Tensor",
              "as_strided.default", "as_strided_.default", "alias.default", "t.default", "transpose.int",
              "permute.default", "expand.default", "lift_fresh.default", "_unsafe_view.default"}


@contextlib.contextmanager
def _kernels_per_tick(monkeypatch):
    """Per tick of the runs inside: (plan, Counter of the kernels it ran) — every aten op that runs
    a kernel and every Triton launch (by kernel name; the interpreter's own torch calls inside a
    launch are that kernel's work, not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    import triton.runtime.interpreter as interpreter
    from sideways_kernels.engine import Engine
    ticks = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func).removeprefix("aten.")
            if name not in _NO_KERNEL:
                ticks[-1][1][name] += 1
            return func(*args, **(kwargs or {}))

    launch, tick = interpreter.GridExecutor.__call__, Engine._tick

    def launched(self, *args, **kwargs):
        if ticks:
            ticks[-1][1]["triton:" + self.fn.__name__] += 1
        with _disable_current_modes():
            return launch(self, *args, **kwargs)

    def counted(self, plan, *args):
        ticks.append((plan, collections.Counter()))
        with Count():
            return tick(self, plan, *args)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launched)
    monkeypatch.setattr(Engine, "_tick", counted)
    yield ticks


def _conv_relu_chain(depth: int, video_channels: int = 8) -> list:
    """``depth`` stages: a 3x1x1 conv (8 channels, padded in time; the interpreter's cheapest window)
    and its ReLU each, the top one also a classifier's pooling and 1x1x1 head."""
    from sideways_kernels import SidewaysConv3d
    stages = [torch.nn.Sequential(SidewaysConv3d(8 if i else video_channels, 8, (3, 1, 1), padding=(1, 0, 0)),
                                  torch.nn.ReLU()) for i in range(depth)]
    stages[-1].extend([torch.nn.AdaptiveAvgPool3d((None, 1, 1)), SidewaysConv3d(8, 8, 1)])
    return stages


def test_a_chain_s_conv_relu_stages_cost_four_launches_a_tick_at_any_depth(monkeypatch):
    """A stage that is just a conv and its ReLU is the engine's to run: every such stage's forward
    in one grouped launch whose epilogue applies the ReLU, writes the next stage's double buffer and
    masks the error that arrived for the stage in place (the ReLU's backward); their input
    gradients in one grouped launch, straight into the double buffers below; their weight updates
    in the tick's grouped GEMM and finish. So a steady tick of a chain costs the same kernels at
    depth 2 and 3 (the top stage's head and loss besides), where the per-stage path runs a ReLU, its
    backward and buffer copies per stage; and the results are that path's to the bit, and the
    torch backend's. The stem reads an RGB video's NCDHW frames: each is copied into a
    channels-last frame of 16-byte rows, its ring stored in them too, and it joins the launches."""
    from sideways_kernels.engine import Engine
    video, target = torch.randn(1, 3, 10, 4, 4), torch.tensor([3])
    steady, results = {}, {}
    runs = [(2, "own"), (2, "torch"), (3, "own"), (3, "per stage"), (3, "torch")]
    with _kernels_per_tick(monkeypatch) as ticks:
        for depth, way in runs:
            torch.manual_seed(depth)
            stages = _conv_relu_chain(depth, video_channels=3)
            with monkeypatch.context() as m:
                if way == "per stage":
                    m.setattr(Engine, "_own_stage", lambda *args: None)
                ticks.clear()
                with T.using(path="box"):
                    out = SidewaysPipeline(stages, backend="torch" if way == "torch" else "triton").backward_clip(video,
                                                                                                                   target)
            results[depth, way] = (out.loss, grads(torch.nn.Sequential(*stages)))
            # (the first steady tick also makes the gradients' tensors)
            steady[depth, way] = [counts for plan, counts in ticks if plan.steady][1:]
    for depth, way in runs:
        if way == "torch":
            continue
        assert len(steady[depth, way]) >= 2, (depth, way, "too few steady ticks to test: a longer clip")
        assert all(counts == steady[depth, way][0] for counts in steady[depth, way])
        torch.testing.assert_close(results[depth, way][0], results[depth, "torch"][0], rtol=1e-5, atol=1e-6)
        assert rel_error(results[depth, way][1], results[depth, "torch"][1]) < 1e-4
    own, per_stage = steady[3, "own"][0], steady[3, "per stage"][0]
    assert steady[2, "own"][0] == own
    assert own["triton:_grouped_box_forward_kernel"] == 2  # every stage's first forward; their input gradients
    assert own["triton:_grouped_box_weight_update_kernel"] == own["triton:_grouped_weight_finish_kernel"] == 2
    assert own["relu.default"] == own["threshold_backward.default"] == 1  # the top stage's
    # the loss's share of the clip loss divided once; its backward seeded by a kept 1/frames
    assert own["div.Tensor"] == 1 and "ones_like.default" not in own
    assert per_stage["relu.default"] == per_stage["threshold_backward.default"] == 3  # each stage's
    assert sum(per_stage.values()) > sum(own.values())
    assert results[3, "own"][0] == results[3, "per stage"][0]
    assert all(torch.equal(a, b) for a, b in zip(results[3, "own"][1], results[3, "per stage"][1]))


def test_stages_the_engine_runs_itself_under_autocast_and_per_tick_sgd_equal_the_per_stage_path(monkeypatch):
    """Float16 autocast (a float32 RGB video, cast at the stem into the engine's channels-last frame),
    a stage whose conv the box kernels cannot take (two groups: its forward runs alone, the same
    epilogue after the op), per-tick SGD with momentum: the weights and momentum buffers after the
    clip are the per-stage path's to the bit, while the stages ran themselves — the stem's in the
    grouped forward's launch (never alone before an epilogue launch), from one frame the engine
    keeps across ticks."""
    from sideways_kernels import SidewaysConv3d
    from sideways_kernels.engine import Engine
    video, target = torch.randn(1, 3, 9, 4, 4), torch.tensor([5])
    after, owned, alone, frames = {}, set(), [], set()
    for way in ("own", "per stage"):
        torch.manual_seed(0)
        stages = _conv_relu_chain(3, video_channels=3)
        stages[1][0] = SidewaysConv3d(8, 8, (3, 1, 1), padding=(1, 0, 0), groups=2)
        params = [p for stage in stages for p in stage.parameters()]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        with monkeypatch.context() as m:
            if way == "per stage":
                m.setattr(Engine, "_own_stage", lambda *args: None)
            else:
                def ahead(self, *args, _ahead=Engine._forwards_ahead):
                    own = _ahead(self, *args)
                    owned.update(own)
                    return own

                def then_epilogues(forward, calls, staged, *args, _then=T.forwards_then_epilogues):
                    alone.extend(call[3] for call, stage in zip(calls, staged) if stage is not None)
                    return _then(forward, calls, staged, *args)

                def frame_buffer(self, kind, *args, _buffer=Engine._frame_buffer):
                    got = _buffer(self, kind, *args)
                    if kind == "in":
                        frames.add(got.data_ptr())
                    return got
                m.setattr(Engine, "_forwards_ahead", ahead)
                m.setattr(T, "forwards_then_epilogues", then_epilogues)
                m.setattr(Engine, "_frame_buffer", frame_buffer)
            with torch.autocast("cpu", torch.float16):
                SidewaysPipeline(stages, backend="triton", update="tick", optimizer=opt).backward_clip(video, target)
            if way == "own":
                stem, grouped_conv = stages[0][0].weight, stages[1][0].weight
        after[way] = [t.clone() for p in params for t in (p, opt.state[p]["momentum_buffer"])]
    assert owned == {0, 1}
    assert alone and all(w is grouped_conv for w in alone) and not any(w is stem for w in alone)
    assert len(frames) == 1  # the video's frames cast into one 16-byte-row frame of the engine's
    assert all(torch.equal(a, b) for a, b in zip(after["own"], after["per stage"]))


def _c3d_blocks() -> list:
    """Three stages of C3D's shape: two blocks (conv, in-place ReLU, 1x2x2 max pool; the first on
    an RGB video) each in a stage's nn.Sequential, and a top stage (conv, ReLU, head)."""
    from sideways_kernels import SidewaysConv3d
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.Sequential(SidewaysConv3d(c, 8, (3, 1, 1), padding=(1, 0, 0)),
                                                      torch.nn.ReLU(inplace=True), torch.nn.MaxPool3d((1, 2, 2))))
              for c in (3, 8)]  # (4x4 -> 2x2 -> 1x1)
    stages.append(torch.nn.Sequential(SidewaysConv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), torch.nn.ReLU(),
                                      torch.nn.AdaptiveAvgPool3d((None, 1, 1)), SidewaysConv3d(8, 8, 1)))
    return stages


def test_auto_s_cudnn_forwards_leave_the_stages_epilogues_to_one_launch_a_tick(monkeypatch, strict_launches):
    """Where the dispatch sends forwards and weight updates to cuDNN (the torch backend) and
    dispatch.json's ``stage_epilogue`` says Triton, C3D's blocks are still the engine's to run: each
    forward by the torch backend, its bias left to the epilogue (that backend adds it after the
    convolution), and every such stage's bias, ReLU, pool, output into the next stage's buffer
    and their backwards in one Triton launch a tick — the per-stage path's losses and gradients to
    the bit (its choice "torch": ATen's ops through autograd)."""
    from sideways_kernels import backend
    from sideways_kernels.engine import Engine
    monkeypatch.setattr(backend, "resolve", lambda device, name=None: "auto")  # (auto runs on CUDA only)
    monkeypatch.setattr(backend, "_arch", lambda device: "sm_90")
    owned = []  # per tick, how many stages the engine ran itself

    def ahead(self, *args, _ahead=Engine._forwards_ahead):
        own = _ahead(self, *args)
        owned.append(len(own))
        return own
    monkeypatch.setattr(Engine, "_forwards_ahead", ahead)
    video, target = torch.randn(1, 3, 9, 4, 4), torch.tensor([2])
    results, launched = {}, {}
    for way in ("triton", "torch"):
        owned.clear()
        route = {"window_input_grad": "triton", "stage_epilogue": way}
        monkeypatch.setattr(backend, "_choice", lambda op, t, layer=None, geometry=None, _r=route: _r.get(op, "torch"))
        stages = _c3d_blocks()
        T.launches.clear()
        with T.using(path="box"):
            out = SidewaysPipeline(stages).backward_clip(video, target)
        results[way] = (out.loss, grads(torch.nn.Sequential(*stages)))
        launched[way] = (T.launches["grouped_stage_epilogue"], T.launches["grouped_forward"], list(owned))
    ticks = launched["triton"][2]
    assert max(ticks) == 2 and launched["triton"][0] == sum(n > 0 for n in ticks)  # one launch a tick for both
    assert launched["torch"][0] == 0 and max(launched["torch"][2]) == 0
    assert launched["triton"][1] == launched["torch"][1]  # (the input gradients' grouped launches only)
    assert results["triton"][0] == results["torch"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["triton"][1], results["torch"][1]))


def test_auto_s_grouped_calls_that_the_dispatch_sends_elsewhere_keep_their_bias_and_go_where_told(monkeypatch):
    """``auto``'s grouped forwards and input gradients where the dispatch sends them to cuDNN (the
    torch backend): a forward that is no chain stage keeps its bias (only a stage's epilogue may
    take it over), and an input gradient goes into the buffer given — the torch backend's results
    to the bit."""
    from sideways_kernels import backend, ops, torch_backend
    monkeypatch.setattr(backend, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(backend, "_choice", lambda op, t, layer=None, geometry=None: "torch")
    auto = backend.kernels("auto")
    torch.manual_seed(0)
    dtype = torch.float16
    cl = lambda t: t.to(dtype).contiguous(memory_format=torch.channels_last)
    ring = ops.empty_ring(3, 2, 8, 5, 6, dtype=dtype).copy_(torch.randn(3, 2, 8, 5, 6))
    forward = (ring, cl(torch.randn(2, 8, 5, 6)), 1, torch.randn(16, 8, 3, 3, 3), torch.randn(16), [1, 1], [1, 1],
               [1, 1], 1, 1)
    mine = torch_backend.ring_conv_forward(ops.empty_ring(3, 2, 8, 5, 6, dtype=dtype).copy_(ring), *forward[1:])
    assert torch.equal(auto.group_forwards([forward], [None])[0], mine)
    down = (cl(torch.randn(2, 16, 5, 6)), forward[3], [5, 6], [1, 1], [1, 1], [1, 1], 1)
    out = cl(torch.full((2, 8, 5, 6), float("nan")))
    got = auto.group_input_grads([down], [out])[0]
    assert torch.equal(out, torch_backend.window_input_grad(*down)) and torch.equal(got, out)


def test_c3d_s_blocks_run_by_the_engine_itself_equal_the_per_stage_path(monkeypatch, strict_launches):
    """Stages of C3D's shape — a block (conv, in-place ReLU, 1x2x2 max pool) in a stage's
    nn.Sequential, the first on an RGB video — run by the engine itself (the pool in the forward's
    epilogue, the error at the conv's output through the pool's and the ReLU's backward there): the
    per-stage path's losses and gradients to the bit, and the torch backend's."""
    from sideways_kernels.engine import Engine
    video, target = torch.randn(1, 3, 9, 4, 4), torch.tensor([2])
    results, owned = {}, set()
    for way in ("own", "per stage", "torch"):
        stages = _c3d_blocks()
        with monkeypatch.context() as m:
            if way == "per stage":
                m.setattr(Engine, "_own_stage", lambda *args: None)
            elif way == "own":
                def own_stage(self, k, *args, _own=Engine._own_stage):
                    found = _own(self, k, *args)
                    if found is not None and found[2]:
                        owned.add(k)
                    return found
                m.setattr(Engine, "_own_stage", own_stage)
            with T.using(path="box"):
                out = SidewaysPipeline(stages, backend="torch" if way == "torch" else "triton").backward_clip(video,
                                                                                                              target)
        results[way] = (out.loss, grads(torch.nn.Sequential(*stages)))
    assert owned == {0, 1}
    assert results["own"][0] == results["per stage"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["own"][1], results["per stage"][1]))
    torch.testing.assert_close(results["own"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert rel_error(results["own"][1], results["torch"][1]) < 1e-4


def _odd_stages(variant: str):
    """A chain of conv-ReLU stages (3 stages, 8 channels, an RGB stem) with one thing the engine's
    own run of a stage must honour or refuse, and a context that sets up what lives outside the
    modules (a global hook)."""
    from sideways_kernels import SidewaysConv3d
    stages = _conv_relu_chain(3, video_channels=3)
    hold = contextlib.nullcontext()
    if variant == "frozen bias":
        stages[0][0].bias.requires_grad_(False)
    elif variant == "frozen weight":
        stages[1][0].weight.requires_grad_(False)
    elif variant == "ceil pool":  # on 5x5 frames a ceil-mode pool keeps a window of one column: no tile holds it
        for stage in stages[:2]:
            stage.append(torch.nn.MaxPool3d((1, 2, 2), ceil_mode=True))
    elif variant == "subclass":
        class Scaled(SidewaysConv3d):
            def forward(self, x):
                return super().forward(x) * 2
        stages[1][0] = Scaled(8, 8, (3, 1, 1), padding=(1, 0, 0))
    elif variant == "relu hook":
        stages[1][1].register_forward_hook(lambda m, args, out: out * 0.5)
    elif variant == "global hook":
        hold = torch.nn.modules.module.register_module_forward_hook(  # (its handle removes it on exit)
            lambda m, args, out: out * 0.5 if isinstance(m, torch.nn.ReLU) else None)
    return stages, hold


@pytest.mark.parametrize("variant", ["frozen bias", "frozen weight", "ceil pool", "subclass", "relu hook",
                                     "global hook"])
def test_stages_the_engine_would_run_itself_honour_frozen_parameters_hooks_and_odd_modules(monkeypatch, variant):
    """What the engine's own run of a conv-ReLU(-pool) stage must honour or leave to the per-stage
    path: a frozen bias or weight gets no gradient, and a ceil-mode pool (a window its tile cannot
    hold), a SidewaysConv3d subclass with a forward of its own, a hook on the stage's ReLU and a
    global forward hook each leave the stage to the per-stage path — the same losses and gradients
    to the bit either way."""
    from sideways_kernels.engine import Engine
    size = 5 if variant == "ceil pool" else 4
    video, target = torch.randn(1, 3, 9, size, size), torch.tensor([3])
    results = {}
    for way in ("own", "per stage"):
        torch.manual_seed(0)
        stages, hold = _odd_stages(variant)
        with monkeypatch.context() as m, hold:
            if way == "per stage":
                m.setattr(Engine, "_own_stage", lambda *args: None)
            with T.using(path="box"):
                out = SidewaysPipeline(stages, backend="triton").backward_clip(video, target)
        params = [p for stage in stages for p in stage.parameters()]
        results[way] = (out.loss, [p.grad for p in params], params)
    (loss, got, params), (ref_loss, ref, _) = results["own"], results["per stage"]
    assert loss == ref_loss
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, ref))
    assert all((g is None) == (not p.requires_grad) for g, p in zip(got, params))


def test_a_pipeline_says_once_which_convs_run_their_ops_alone_on_the_triton_backend():
    """One line per pipeline naming the convs the Triton backend cannot put in a tick's grouped
    launches and why (here two groups; not the 3-channel stem: its ring and frames are stored in
    16-byte rows, and it sends no error down); none where every conv can go there."""
    import warnings
    from sideways_kernels import SidewaysConv3d
    video, target = torch.randn(1, 3, 3, 2, 2), torch.tensor([1])
    stages = _conv_relu_chain(3, video_channels=3)
    stages[1][0] = SidewaysConv3d(8, 8, (3, 1, 1), padding=(1, 0, 0), groups=2)
    pipe = SidewaysPipeline(stages, backend="triton")
    with warnings.catch_warnings(record=True) as said, torch.autocast("cpu", torch.float16):
        warnings.simplefilter("always")
        pipe.backward_clip(video, target)
        pipe.backward_clip(video, target)
    alone = [str(w.message) for w in said if "run each op alone" in str(w.message)]
    assert alone == ["on the Triton backend 1 of 4 convs run each op alone, outside the tick's grouped launches "
                     "(the same results, more launches): groups=2: stage 1.0"]
    with warnings.catch_warnings(record=True) as said, torch.autocast("cpu", torch.float16):
        warnings.simplefilter("always")
        SidewaysPipeline(_conv_relu_chain(2), backend="triton").backward_clip(torch.randn(1, 8, 3, 2, 2), target)
    assert not [w for w in said if "run each op alone" in str(w.message)]


def test_a_conv_behind_a_hook_or_a_module_of_its_own_does_not_run_ahead():
    """Only a conv the stage's module surely applies first to its input runs ahead: down plain
    nn.Sequential modules without forward pre-hooks (which may change the input)."""
    from sideways_kernels import SidewaysConv3d
    from sideways_kernels.engine import _leading_conv
    conv = SidewaysConv3d(8, 8, 3, padding=1)
    assert _leading_conv(torch.nn.Sequential(torch.nn.Sequential(conv, torch.nn.ReLU()), torch.nn.ReLU())) is conv
    assert _leading_conv(torch.nn.Sequential(torch.nn.ReLU(), conv)) is None

    class Block(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x * 2)
    assert _leading_conv(Block(conv)) is None
    hooked = torch.nn.Sequential(conv)
    handle = hooked.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    assert _leading_conv(hooked) is None
    handle.remove()
    handle = conv.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    assert _leading_conv(hooked) is None
    handle.remove()
    assert _leading_conv(hooked) is conv

"""GPU benchmarks (skipped without a GPU), every ratio side by side in one run.

In the order they run (the important ones first, so a run cut short still has them):
1. the bf16 matmul ceiling of this GPU (a large ``torch.matmul``), measured here;
2. per op and layer shape (C3D's and r3d_18's 3x3x3 stride-1 layers; apart, ``test_other_layers``:
   r3d_18's strided and R(2+1)D's unaligned and factorised ones, which Triton runs on its general
   kernels), bf16 activations and fp32 master weights: our CUDA and Triton kernels
   (Triton autotuned; the picked config recorded) against the cuDNN path a plain-PyTorch user
   would write — ``F.conv3d`` of the window (forward), ``aten.convolution_backward`` summed over
   the window (input gradient) or for the weight + ``add_`` (accumulate) + ``SGD(fused=True)``
   (per-tick SGD) — with ``cudnn.benchmark`` on, on NCDHW and on channels_last_3d frames (the
   faster counts). Every implementation's result is first checked against reference.py in
   float64 (bf16 cuDNN convolutions have had wrong-result bugs);
3. a pipeline tick at batch 8, eager vs replayed from CUDA graphs;
4. end-to-end frames/s and peak memory (``end_to_end``): C3D and a converted r3d_18, clip BP beside
   Sideways per backend with and without CUDA graphs, T = 16 and 48 and a 256-frame clip, under
   bf16 autocast; Sideways at clip BP's memory.

Each benchmark appends its row (JSON) to ``$SIDEWAYS_BENCH_ROWS`` as soon as it is measured;
``bench/gpu_report.py`` turns the rows into RESULTS.md lines and a dispatch table.

    SIDEWAYS_BENCH_ROWS=rows.jsonl pytest bench/bench_gpu.py --benchmark-only    (bench/run_gpu.sh)
"""
import json
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import SidewaysConv3d, SidewaysPipeline, backend, models, ops, reference as ref
from sideways_kernels import forms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (C_in, C_out, batch, spatial) of C3D layers, then of a converted r3d_18's stride-1 layers at
# B8, 112x112 frames (layer1-4); 3x3x3 kernels, 'same' spatial padding
SHAPES = [(64, 128, 8, 56), (128, 256, 16, 28), (256, 256, 32, 14),
          (64, 64, 8, 56), (128, 128, 8, 28), (256, 256, 8, 14), (512, 512, 8, 7)]
# Layers of other kernels and strides at B8, 112x112 frames, as (C_in, C_out, batch, spatial, kt, kh,
# kw, spatial stride): on sm_90 Triton runs the strided and unaligned ones (channels not in 16-byte
# rows) on its general kernels, which the default keeps on cuDNN until their rows here say otherwise
# (backend.on_measured_kernels; gpu_report.dispatch writes a row per layer). r3d_18: the stem, the
# first conv of layers 2-4 and layer 2's projection; R(2+1)D: the stem's two halves (45 channels),
# layer 1's spatial half (144: aligned), layer 2's first pair (230 channels, the spatial half strided).
OTHER_SHAPES = [(3, 64, 8, 112, 3, 7, 7, 2), (64, 128, 8, 56, 3, 3, 3, 2), (128, 256, 8, 28, 3, 3, 3, 2),
                (256, 512, 8, 14, 3, 3, 3, 2), (64, 128, 8, 56, 1, 1, 1, 2),
                (3, 45, 8, 112, 1, 7, 7, 2), (45, 64, 8, 56, 3, 1, 1, 1), (64, 144, 8, 56, 1, 3, 3, 1),
                (64, 230, 8, 56, 1, 3, 3, 2), (230, 128, 8, 28, 3, 1, 1, 1)]
SHAPE_IDS = [f"{s[0]}to{s[1]}-B{s[2]}-{s[3]}" for s in SHAPES]
OTHER_IDS = [f"other-{s[0]}to{s[1]}-B{s[2]}-{s[3]}-k{s[4]}x{s[5]}x{s[6]}-s{s[7]}" for s in OTHER_SHAPES]
HYPER = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False)
IMPLS = ["cudnn_ncdhw", "cudnn_cl", "torch", "cuda", "triton"]  # torch: the torch backend's op (cuDNN on the ring)
OP_NAMES = {"forward": "ring_conv_forward", "input_grad": "window_input_grad",
            "weight_accumulate": "weight_grad_accumulate", "weight_sgd": "sgd_tick_update"}
TRITON_KERNEL = {"forward": "ring_conv_forward", "input_grad": "window_input_grad",
                 "weight_accumulate": "weight_update", "weight_sgd": "weight_update:sgd"}


def _row(**fields) -> None:
    path = os.environ.get("SIDEWAYS_BENCH_ROWS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(time=time.strftime("%H:%M:%S"), **fields)) + "\n")


def _timed(benchmark, fn, rounds=20, warmup=2) -> float:
    def run():
        fn()
        torch.cuda.synchronize()  # the timed call includes the GPU work

    run()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
    return benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def _cudnn_benchmark():
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = before


# --- 1. the ceiling -----------------------------------------------------------------------------

CEILING = {}


def test_bf16_matmul_ceiling(benchmark):
    benchmark.group = "gpu-ceiling"
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    median = _timed(benchmark, lambda: a @ b, rounds=20)
    CEILING["tflops"] = 2 * n ** 3 / median / 1e12
    benchmark.extra_info.update(tflops=CEILING["tflops"], shape=f"bf16 matmul {n}^3")
    _row(kind="ceiling", tflops=CEILING["tflops"], device=torch.cuda.get_device_name())


# --- 2. the ops against cuDNN -------------------------------------------------------------------

class _Layer:
    """One layer's tensors: a bf16 ring in the ops' layout, its window as a clip in both layouts,
    fp32 master weight and bias, a bf16 error, and the newest frame as the layer below hands it
    on (channels-last): our forwards push it into the ring at every call, as a pipeline's do (the
    slot already holds it, so every call computes the same window). A 3x3x3 stride-1 layer
    (``SHAPES``) unless kernel and stride are given (``OTHER_SHAPES``); 'same' spatial padding."""

    def __init__(self, c_in, c_out, batch, hw, kt=3, kh=3, kw=3, stride=1, device="cuda"):
        g = torch.Generator(device=device).manual_seed(0)
        self.slot = kt - 1  # the newest frame: tap j reads ring slot j
        self.args = ([stride, stride], [kh // 2, kw // 2], [1, 1], 1, 1)  # stride, padding, dilation, dilation_t, groups
        self.ring = ops.empty_ring(kt, batch, c_in, hw, hw, dtype=torch.bfloat16, device=device)
        self.ring.copy_(torch.randn(kt, batch, c_in, hw, hw, device=device, generator=g))
        self.frame = self.ring[self.slot].contiguous(memory_format=torch.channels_last)
        self.weight = torch.randn(c_out, c_in, kt, kh, kw, device=device, generator=g) * (c_in * kt * kh * kw) ** -0.5
        self.bias = torch.randn(c_out, device=device, generator=g) * 0.1
        out = [(hw + 2 * (k // 2) - k) // stride + 1 for k in (kh, kw)]
        self.grad_out = torch.randn(batch, c_out, *out, device=device, generator=g).to(torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        clip = ref.window(self.ring, self.slot)  # [B, C, kt, H, W], oldest first
        self.clips = {"cudnn_ncdhw": clip.contiguous(), "cudnn_cl": clip.contiguous(memory_format=torch.channels_last_3d)}
        self.hw = [hw, hw]
        self.flops = 2 * batch * out[0] * out[1] * c_out * c_in * kt * kh * kw


_EXPECTED = {}  # (op, shape) -> float64 reference


def _expected(op, shape, layer: _Layer):
    key = (op, shape)
    if key not in _EXPECTED:
        d = lambda t: t.double()
        if op == "forward":
            out = ref.ring_conv_forward(d(layer.ring), None, layer.slot, d(layer.weight), d(layer.bias),
                                        *layer.args)
        elif op == "input_grad":
            out = ref.window_input_grad(d(layer.grad_out), d(layer.weight), layer.hw, *layer.args[:3], 1)
        else:
            out = torch.zeros_like(layer.weight, dtype=torch.float64)
            ref.weight_grad_accumulate(out, None, d(layer.grad_out), d(layer.ring), layer.slot, *layer.args)
            if op == "weight_sgd":  # the weight after one SGD step from a fresh momentum buffer
                w = d(layer.weight).clone()
                ref.sgd_step(w, torch.empty_like(w), out, **HYPER, first_step=True)
                out = w
        _EXPECTED[key] = out
    return _EXPECTED[key]


def _implementation(op: str, impl: str, L: _Layer):
    """(the timed call, a call returning the result to check) for one op and implementation."""
    w16 = L.weight.to(torch.bfloat16)
    if impl.startswith("cudnn"):
        clip = L.clips[impl]
        g5 = L.grad_out.unsqueeze(2)
        if impl == "cudnn_ncdhw":
            g5 = g5.contiguous()
        else:
            g5 = g5.contiguous(memory_format=torch.channels_last_3d)
        stride, padding = [1, *L.args[0]], [0, *L.args[1]]
        backward = lambda mask: torch.ops.aten.convolution_backward(
            g5, clip, w16, None, stride, padding, [1, 1, 1], False, [0, 0, 0], 1, mask)
        if op == "forward":
            b16 = L.bias.to(torch.bfloat16)
            fn = lambda: F.conv3d(clip, w16, b16, stride=stride, padding=padding).squeeze(2)
            return fn, fn
        if op == "input_grad":
            fn = lambda: backward([True, False, False])[0].sum(2)
            return fn, fn
        grad = torch.zeros_like(L.weight)
        if op == "weight_accumulate":
            def fn():
                grad.add_(backward([False, True, False])[1])
            return fn, lambda: (grad.zero_(), fn(), grad)[2]
        w = L.weight.clone().requires_grad_()
        opt = torch.optim.SGD([w], fused=True, **HYPER)
        w.grad = torch.zeros_like(w)

        def step():
            w.grad.add_(backward([False, True, False])[1])
            opt.step()
            w.grad.zero_()

        def result():
            with torch.no_grad():
                w.copy_(L.weight)
            opt.state.clear()
            step()
            return w.detach()
        return step, result
    if impl == "triton":
        import sideways_kernels.triton  # noqa: F401  registers torch.ops.sideways_triton
        k = torch.ops.sideways_triton
    elif impl == "torch":
        k = backend.kernels("torch")
    else:
        k = torch.ops.sideways
    if op == "forward":
        fn = lambda: k.ring_conv_forward(L.ring, L.frame, L.slot, L.weight, L.bias, *L.args)
        return fn, fn
    if op == "input_grad":
        fn = lambda: k.window_input_grad(L.grad_out, L.weight, L.hw, *L.args[:3], 1)
        return fn, fn
    grad = torch.zeros_like(L.weight)
    if op == "weight_accumulate":
        fn = lambda: k.weight_grad_accumulate(grad, None, L.grad_out, L.ring, L.slot, *L.args)
        return fn, lambda: (grad.zero_(), fn(), grad)[2]
    w, buf = L.weight.clone(), torch.zeros_like(L.weight)
    step = lambda first=False: k.sgd_tick_update(w, buf, None, None, L.grad_out, L.ring, L.slot, *L.args, **HYPER,
                                                 first_step=first)
    return step, lambda: (w.copy_(L.weight), step(True), w)[2]


def _checked(op: str, impl: str, shape, L: _Layer, got: torch.Tensor) -> float:
    """The relative error of an op's result against reference.py in float64 (the SGD step: the
    step taken, not the weight), asserted below 2e-2."""
    got, expected = got.double(), _expected(op, shape, L)
    if op == "weight_sgd":
        got, expected = got - L.weight.double(), expected - L.weight.double()
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < 2e-2, f"{impl} {op} {shape}: relative error {error:.3g} against reference.py"
    return error


def _op_case(benchmark, op, shape, impl):
    if impl == "triton":
        pytest.importorskip("triton")
    if impl == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("sideways::ring_conv_forward", "CUDA"):
        pytest.skip("CUDA kernels not built")
    L = _Layer(*shape)
    if impl == "triton":
        from sideways_kernels.triton import paths
        paths.clear()
    timed, result = _implementation(op, impl, L)
    error = _checked(op, impl, shape, L, result())
    benchmark.group = f"gpu-{op}-{'-'.join(map(str, shape))}"
    median = _timed(benchmark, timed)
    tflops = L.flops / median / 1e12
    graph_s, graph_error = _graph_time(timed)
    config = None
    if impl == "triton":  # which kernel family ran (box: TMA + wgmma; general), and its picked config
        from sideways_kernels.triton import paths, picked
        path = "box" if any(p == "box" for _, p in paths) else "general"
        paths.clear()
        name = ("box_" if path == "box" else "") + TRITON_KERNEL[op]
        config = f"{path} {picked(name, L.ring.device)}"
    benchmark.extra_info.update(tflops=tflops, config=config, error=error,
                                shape=f"{shape} bf16 act, fp32 master")
    _row(kind="op", op=op, shape=list(shape), impl=impl, median_s=median, tflops=tflops,
         ceiling_fraction=tflops / CEILING["tflops"] if CEILING else None, config=config, error=error,
         graph_s=graph_s, graph_error=graph_error)


def _graph_time(fn, calls: int = 10, replays: int = 5):
    """The GPU time of one call without the host's part: ``calls`` calls captured in one CUDA
    graph, its replays timed with events (median, per call). A call's eager time (``_timed``)
    includes the Python and launch work around its kernels; the difference says how much of
    it is the host's. (None, why) when the call cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        return sorted(times)[len(times) // 2], None
    except Exception as e:  # noqa: BLE001  a row without the figure, saying why
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", ["weight_sgd", "weight_accumulate"])
def test_weight_update(benchmark, op, shape, impl):
    _op_case(benchmark, op, shape, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", ["forward", "input_grad"])
def test_forward_and_input_grad(benchmark, op, shape, impl):
    _op_case(benchmark, op, shape, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", OTHER_SHAPES, ids=OTHER_IDS)
@pytest.mark.parametrize("op", ["forward", "input_grad", "weight_accumulate", "weight_sgd"])
def test_other_layers(benchmark, op, shape, impl):
    """Each op on the strided, unaligned and non-3x3x3 layers of r3d_18 and R(2+1)D
    (``OTHER_SHAPES``): the rows that let the dispatch send such a layer to Triton's general
    kernels where they win (a row per layer: ``gpu_report.dispatch``)."""
    _op_case(benchmark, op, shape, impl)


# C3D's layers that update in one steady tick at B8, 112² (4 stages: the RGB stem, then each after a
# 2x2 pool), as (C_in, C_out, batch, spatial)
TICK_LAYERS = [(3, 64, 8, 112), (64, 128, 8, 56), (128, 256, 8, 28), (256, 256, 8, 14)]
TICK_IMPLS = ["torch", "triton", "triton-per-layer"]


def _tick_calls(op: str, layers: list) -> list:
    """(op, args) of each layer's weight update, as the engine holds them to the tick's end."""
    calls = []
    for L in layers:
        if op == "weight_accumulate":
            calls.append(("weight_grad_accumulate", (torch.zeros_like(L.weight), torch.zeros_like(L.bias),
                                                     L.grad_out, L.ring, L.slot, *L.args)))
        else:
            w, b = L.weight.clone(), L.bias.clone()
            calls.append(("sgd_tick_update", (w, torch.zeros_like(w), b, torch.zeros_like(b), L.grad_out, L.ring,
                                              L.slot, *L.args, *HYPER.values(), True)))
    return calls


@pytest.mark.parametrize("impl", TICK_IMPLS)
@pytest.mark.parametrize("op", ["weight_sgd", "weight_accumulate"])
def test_tick_weight_updates(benchmark, op, impl):
    """A tick's weight updates (C3D's four updating layers, with biases) as the engine runs them at
    the tick's end: each layer's op on the torch backend (cuDNN and ATen, what the dispatch of
    2026-11-27 runs), each on Triton, or Triton's grouped launches (``grouped_weight_updates``:
    what the Triton backend, and ``auto`` where it picks Triton, run). Checked against float64 per
    layer. Where these rows exist, the dispatch's entry for the op is the faster of torch and
    triton here: the ops' rows time one layer alone, without the grouping."""
    if impl.startswith("triton"):
        pytest.importorskip("triton")
    layers = [_Layer(*shape) for shape in TICK_LAYERS]
    k = backend.kernels("torch" if impl == "torch" else "triton")
    calls = _tick_calls(op, layers)
    grouped = impl == "triton"

    def tick():
        for name, args in (k.group(calls) if grouped else calls):
            getattr(k, name)(*args)
    tick()
    for shape, L, (_, args) in zip(TICK_LAYERS, layers, calls):  # the first call: from zero / a fresh buffer
        _checked(op, impl, shape, L, args[0])
    benchmark.group = f"gpu-tick-{op}"
    median = _timed(benchmark, tick)
    graph_s, graph_error = _graph_time(tick)
    _row(kind="tick_updates", op=op, impl=impl, layers=[list(s) for s in TICK_LAYERS], median_s=median,
         graph_s=graph_s, graph_error=graph_error)


@pytest.mark.parametrize("impl", TICK_IMPLS)
@pytest.mark.parametrize("op", ["forward", "input_grad"])
def test_tick_first_convs(benchmark, op, impl):
    """A tick's stage-first convs (C3D's three upper stages' first convs) as the engine runs them:
    their forwards (each pushing its frame) ahead of the stages, their input gradients after the
    stages' backwards — each layer's op on the torch backend (cuDNN), each on Triton, or Triton's
    grouped launch (``grouped_ring_conv_forwards``, ``grouped_window_input_grads``: what the
    Triton backend, and ``auto`` where it picks Triton, run). Checked against float64 per layer."""
    if impl.startswith("triton"):
        pytest.importorskip("triton")
    shapes = TICK_LAYERS[1:]  # (the stem reads the video's own frames and sends no error)
    layers = [_Layer(*shape) for shape in shapes]
    k = backend.kernels("torch" if impl == "torch" else "triton")
    if op == "forward":
        calls, one, grouped = ([(L.ring, L.frame, L.slot, L.weight, L.bias, *L.args) for L in layers],
                               k.ring_conv_forward,
                               k.group_forwards)
    else:
        calls, one, grouped = ([(L.grad_out, L.weight, L.hw, *L.args[:3], 1) for L in layers],
                               k.window_input_grad,
                               k.group_input_grads)

    def tick():
        return grouped(calls) if impl == "triton" else [one(*args) for args in calls]
    for shape, L, out in zip(shapes, layers, tick()):
        _checked(op, impl, shape, L, out)
    benchmark.group = f"gpu-tick-first-{op}"
    median = _timed(benchmark, tick)
    graph_s, graph_error = _graph_time(tick)
    _row(kind="tick_first_convs", op=op, impl=impl, layers=[list(s) for s in shapes], median_s=median,
         graph_s=graph_s, graph_error=graph_error)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bias_grad(benchmark, shape, impl):
    """The bias gradient of each shape's error (bf16, channels-last; fp32 sum): ATen's column
    reduction (torch, what the torch backend runs until this is measured) against Triton's
    (``sideways_kernels.triton.bias_grad``): dispatch.json's ``bias_grad`` entry."""
    L = _Layer(*shape)
    if impl == "triton":
        pytest.importorskip("triton")
        from sideways_kernels.triton import bias_grad
        fn = lambda: bias_grad(L.grad_out)
    else:
        fn = lambda: L.grad_out.sum((0, 2, 3), dtype=torch.float32)
    expected = L.grad_out.double().sum((0, 2, 3))
    error = ((fn().double() - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-4, f"{impl} bias_grad {shape}: relative error {error:.3g} against float64"
    benchmark.group = f"gpu-bias_grad-{'-'.join(map(str, shape))}"
    median = _timed(benchmark, fn)
    graph_s, graph_error = _graph_time(fn)
    gbps = L.grad_out.numel() * L.grad_out.element_size() / (graph_s or median) / 1e9
    benchmark.extra_info.update(gb_per_s=gbps, error=error)
    _row(kind="op", op="bias_grad", shape=list(shape), impl=impl, median_s=median, tflops=None, gb_per_s=gbps,
         error=error, graph_s=graph_s, graph_error=graph_error)


# --- 3. CUDA-graph ticks ------------------------------------------------------------------------

@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graph"])
def test_tick(benchmark, graphs):
    """Pipeline ticks at batch 8 under bf16 autocast, eager vs replayed from CUDA graphs: a whole
    64-frame clip (all but its fill and drain ticks are replays) after the warm-up, per tick."""
    benchmark.group = "gpu-tick"
    B, T, HW = 8, 64, 56
    torch.manual_seed(0)
    net = models.c3d(10, widths=(64, 128, 256, 256), conv=SidewaysConv3d).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    pipe = SidewaysPipeline(models.stages(net, 4), update="tick", optimizer=opt, cuda_graph=graphs)
    video, target = torch.randn(B, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (B,), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            pipe.backward_clip(video, target)
    step()  # warm-up (and captures)
    median = _timed(benchmark, step, rounds=5, warmup=1)
    if graphs:
        assert pipe._graphs.replays > 0 and not pipe._graphs.failed, pipe._graphs.failed
    ms = median / pipe.last_ticks * 1e3
    benchmark.extra_info.update(ms_per_tick=ms, shape=f"c3d(64,128,256,256) B{B} T{T} {HW}^2 bf16 autocast, "
                                                      "4 stages, per-tick SGD")
    _row(kind="tick", graphs=graphs, ms_per_tick=ms, batch=B)


# --- 4. end to end ------------------------------------------------------------------------------

def _c3d(conv, device="cuda", width: int = 64):
    """The C3D of these measurements (widths 64-256 at width 64; bench/tick_model.py builds it too)."""
    return models.c3d(10, widths=(width, 2 * width, 4 * width, 4 * width), conv=conv).to(device)


def _chain(conv, device="cuda", width: int = 64, stages: int = 4, classes: int = 10):
    """A chain of ``stages`` stages, each a 3x3x3 conv (``width`` channels; the stem takes the
    video's 3) and its ReLU, the top one also pooling and a 1x1x1 head: stages the engine runs
    itself on the Triton backend (engine.conv_relu_pool), but the top (bench/tick_model.py builds it
    too)."""
    mods = [nn.Sequential(conv(3 if k == 0 else width, width, 3, padding=1), nn.ReLU()) for k in range(stages)]
    mods[-1].extend([nn.AdaptiveAvgPool3d((None, 1, 1)), conv(width, classes, 1)])
    return nn.Sequential(*mods).to(device)


def _clip_bp(net, video, target):
    """Plain backprop of the clip: the mean over frames of a per-frame head's losses (C3D), or
    the loss of a clip classifier's logits (r3d_18 pools over time itself)."""
    with torch.autocast(video.device.type, torch.bfloat16):
        out = net(video)
        if out.dim() == 2:
            loss = F.cross_entropy(out, target)
        else:
            T = out.shape[2]
            loss = sum(F.cross_entropy(out[:, :, t].flatten(1), target) for t in range(T)) / T
    loss.backward()


def training_step(network: str, impl: str, T: int, *, backend=None, graphs=None, temporal_padding: str = "same",
                  batch: int = 8, size: int = 112, width: int = 64, device="cuda"):
    """(one training clip as a call, the network, the clip, the pipeline or None) under bf16
    autocast, as :func:`end_to_end` times it and ``bench/profile_clip.py`` profiles it. Each clip
    starts with the gradients set to None, as a training loop's ``zero_grad()`` leaves them.
    ``network``: "c3d" (4 stages of its blocks), "chain" (:func:`_chain`, 4 stages) or "r3d_18"
    (``from_model``, 4 stages, BatchNorm per frame, ``temporal_padding``); ``impl``: "clip_bp" (plain autograd over the clip,
    nn.Conv3d) or "sideways" with ``backend`` (None: the default) and ``graphs`` (None: the
    default)."""
    torch.manual_seed(0)
    device = torch.device(device)
    conv = nn.Conv3d if impl == "clip_bp" else SidewaysConv3d
    if network == "c3d":
        net = _c3d(conv, device, width)
    elif network == "chain":
        net = _chain(conv, device, width)
    else:
        net = models.r3d_18(10, width=width).to(device)
    video = torch.randn(batch, 3, T, size, size, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    pipe = None
    if impl == "clip_bp":
        def step():
            net.zero_grad(set_to_none=True)
            _clip_bp(net, video, target)
    else:
        kw = dict(backend=backend, cuda_graph=graphs)
        pipe = (SidewaysPipeline(models.stages(net, 4), **kw) if network == "c3d" else
                SidewaysPipeline(list(net), **kw) if network == "chain" else
                SidewaysPipeline.from_model(net, stages=4, batchnorm="frame", temporal_padding=temporal_padding,
                                            example=video[:1, :, :2], **kw))

        def step():
            net.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16):
                pipe.backward_clip(video, target)
    return step, net, video, pipe


def end_to_end(network: str, impl: str, T: int, *, backend=None, graphs=None, temporal_padding: str = "same",
               batch: int = 8, size: int = 112, width: int = 64, device="cuda", rounds: int = 3) -> dict:
    """One training clip end to end (:func:`training_step`), timed over ``rounds`` after a
    warm-up clip (the graphs' warm-up and capture), as a row: frames/s (frames of all B videos
    per second), peak memory (MiB, CUDA), ticks per clip and graph replays. The row also says
    where the memory went (MiB; :func:`_memory_parts`)."""
    step, net, video, pipe = training_step(network, impl, T, backend=backend, graphs=graphs,
                                           temporal_padding=temporal_padding, batch=batch, size=size, width=width,
                                           device=device)
    device = video.device
    cuda = device.type == "cuda"
    step()  # warm-up: autotuning, graph warm-up and capture
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    graphs_ = getattr(pipe, "_graphs", None) if pipe is not None else None
    return dict(kind="end_to_end", network=network,
                temporal_padding=temporal_padding if network == "r3d_18" and impl == "sideways" else None,
                impl=impl, backend=backend or ("default" if impl == "sideways" else None),
                graphs=None if pipe is None else bool(graphs_ is not None and not graphs_.failed and graphs_.replays),
                T=T, batch=batch, size=size, median_s=median, frames_per_s=batch * T / median,
                peak_mib=torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None,
                ticks=None if pipe is None else pipe.last_ticks,
                replays=None if graphs_ is None else graphs_.replays, **_memory_parts(net, video, pipe))


def _memory_parts(net, video, pipe) -> dict:
    """Where a clip's memory goes, in MiB, after it: what stays between clips on the device
    (``after_clip_mib``, CUDA), of it the parameters, their gradients and the input clip, what
    the pipeline holds across ticks (rings, FIFOs, double buffers, errors: ``held_mib``) and
    across clips (the graphs' staged inputs and gradient buffers: ``graph_held_mib``), the
    backends' 16-bit weight copies (``derived_mib``: Triton's cache, and the forms of the weights a
    run keeps, ``sideways_kernels.forms``), and the graphs captured. The peak
    less ``after_clip_mib`` is what a tick (or clip BP's backward) allocates and frees."""
    mib = lambda n: n / 2 ** 20
    storages = lambda ts: sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in ts}.values())
    parts = dict(params_mib=mib(storages(net.parameters())),
                 grads_mib=mib(storages(p.grad for p in net.parameters() if p.grad is not None)),
                 video_mib=mib(storages([video])),
                 after_clip_mib=mib(torch.cuda.memory_allocated(video.device)) if video.is_cuda else None)
    if pipe is not None:
        import sideways_kernels.triton as T
        graphs = getattr(pipe, "_graphs", None)
        ours = {id(p) for p in net.parameters()}  # this network's weights' copies, not another's in the process
        derived = [v[3] for v in list(T._derived.values()) if v[0]() is not None and id(v[0]()) in ours]
        derived += forms.tensors_of(net.parameters())  # the forms of the weights a run keeps (either backend)
        parts.update(held_mib=mib(pipe.engine.held_bytes()),
                     graph_held_mib=mib(graphs.held_bytes()) if graphs is not None else None,
                     graphs_captured=sum(c is not None for c in graphs.graphs.values()) if graphs is not None else None,
                     derived_mib=mib(storages(derived)))
    return parts


# What the GPU run measures end to end (issue 19): C3D and a converted r3d_18 (causal: its lag
# 7 instead of 54 frames; 'same' once, at the long clip), T = 16 and 48, clip BP beside Sideways
# per backend with graphs (the default) and without; a long clip (T = 256) where clip BP's
# memory grows and Sideways' does not. "triton-per-layer": the Triton backend with each layer's
# weight update and forward launched alone (as before a tick's were grouped), beside "triton".
# A chain of conv-ReLU stages (T = 48): "triton" with its stages run by the engine itself, beside
# "triton-per-stage" (the same launches grouped, each stage's ReLU, its backward and its buffer
# copies its own), the default and clip BP. "default-epilogues" (the chain and C3D, T = 48): the
# default dispatch with its stage_epilogue entry "triton" — the conv-ReLU(-pool) stages run by the
# engine, their forwards where the dispatch sends them (cuDNN), every stage's epilogue in one
# Triton launch a tick — beside the default (entry "torch": ATen's per stage); gpu_report.py
# writes the entry from these pairs.
E2E = ([(net, "same", "clip_bp", None, None, T) for net in ("c3d", "r3d_18") for T in (16, 48)]  # model(video)
       + [(net, pad, "sideways", backend, graphs, T) for net, pad in (("c3d", "same"), ("r3d_18", "causal"))
          for T in (16, 48) for backend in (None, "torch", "triton", "triton-per-layer", "cuda")
          for graphs in (None, False) if graphs is None or backend in (None, "torch")]
       + [("r3d_18", "same", "sideways", None, None, 48), ("c3d", "same", "clip_bp", None, None, 256),
          ("c3d", "same", "sideways", None, None, 256)]
       + [("chain", "same", impl, backend, None, 48) for impl, backend in
          (("clip_bp", None), ("sideways", None), ("sideways", "triton"), ("sideways", "triton-per-stage"))]
       + [(net, "same", "sideways", "default-epilogues", None, 48) for net in ("chain", "c3d")])


def _e2e_id(case) -> str:
    net, pad, impl, backend, graphs, T = case
    name = f"{net}{'-causal' if pad == 'causal' else ''}-T{T}-{impl}"
    return name if impl == "clip_bp" else f"{name}-{backend or 'default'}{'-eager' if graphs is False else ''}"


@pytest.mark.parametrize("case", E2E, ids=_e2e_id)
def test_end_to_end(benchmark, case, monkeypatch):
    """frames/s and peak memory, clip BP and Sideways, per network, clip length, backend and graphs."""
    net, pad, impl, backend, graphs, T = case
    benchmark.group = f"gpu-train-{net}-T{T}"
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("sideways::ring_conv_forward", "CUDA"):
        pytest.skip("CUDA kernels not built")
    if backend == "triton-per-layer":  # every weight update and forward launched alone
        import sideways_kernels.triton as triton_backend
        from sideways_kernels.engine import Engine
        monkeypatch.setattr(triton_backend, "grouped_weight_updates", lambda calls: calls)  # every call left
        monkeypatch.setattr(Engine, "_forwards_ahead", lambda self, plan, arrivals, down: {})
    if backend == "triton-per-stage":  # no stage run by the engine itself
        from sideways_kernels.engine import Engine
        monkeypatch.setattr(Engine, "_own_stage", lambda *args: None)
    if backend == "default-epilogues":  # the default dispatch, its stage_epilogue entry "triton"
        from sideways_kernels import backend as dispatch
        monkeypatch.setitem(dispatch.HELPERS, "stage_epilogue", "triton")
        monkeypatch.setattr(dispatch, "_chosen", {})
    named = backend and backend.split("-per-")[0]
    row = benchmark.pedantic(lambda: end_to_end(net, impl, T, backend=None if named == "default-epilogues" else named,
                                                graphs=graphs, temporal_padding=pad), rounds=1, iterations=1)
    row["backend"] = backend or row["backend"]
    benchmark.extra_info.update(row)
    _row(**row)


def test_end_to_end_sideways_at_equal_memory(benchmark):
    """Sideways at the largest batch (doubling from 8) whose peak memory stays within clip BP's at
    batch 8 (T = 16): frames/s at equal memory; compare with gpu-train-clip-T16's clip_bp."""
    benchmark.group = "gpu-train-clip-equal-memory"
    T, HW = 16, 112

    def peak(step):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    net = _c3d(nn.Conv3d)
    video, target = torch.randn(8, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    _clip_bp(net, video, target)
    budget = peak(lambda: _clip_bp(net, video, target))
    del net, video, target
    pipe = SidewaysPipeline(models.stages(_c3d(SidewaysConv3d), 4))

    def run(clip):
        with torch.autocast("cuda", torch.bfloat16):
            pipe.backward_clip(*clip)
    batch = 8
    while batch < 256:
        clip = (torch.randn(batch * 2, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (batch * 2,), device="cuda"))
        if peak(lambda: run(clip)) > budget:
            break
        batch *= 2
    clip = (torch.randn(batch, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (batch,), device="cuda"))
    median = _timed(benchmark, lambda: run(clip), rounds=3, warmup=1)
    fps = batch * T / median
    benchmark.extra_info.update(frames_per_s=fps, shape=f"c3d(64,128,256,256) B{batch} (BP's memory at B8: "
                                                        f"{budget / 2**20:.0f} MiB) T{T} {HW}^2 bf16 autocast")
    _row(kind="equal_memory", batch=batch, frames_per_s=fps, budget_mib=budget / 2**20)

"""On a CUDA GPU: the compiled CUDA ops (cuDNN convolutions, the fused weight-update kernel)
against reference.py, the fused path against the ATen path, and pipelines on the cuda
backend against the torch backend. Skipped, with the reason, where no GPU is visible."""
import pytest
import torch

import sideways_kernels as sk
from sideways_kernels import SidewaysPipeline, ops, reference as ref
from nets import classifier_net, grads, rel_error, stages_of
from samples import GEOMETRIES, Geometry, geometry_id, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cuda(t):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def _a(g):
    return list(g.stride), list(g.padding), list(g.dilation), g.dilation_t, g.groups


def test_cuda_kernels_are_registered():
    assert sk.backends()["cuda"], sk.backends()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", GEOMETRIES, ids=geometry_id)
def test_cuda_ops_match_reference(g, dtype):
    t = _cuda(make(g, dtype, torch.float32))
    a = _a(g)
    d = lambda x: None if x is None else x.double()
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    ring = t["ring"].clone()
    out = ops.ring_conv_forward(ring, t["frame"], t["slot"], t["weight"], t["bias"], *a)
    expected_ring = t["ring"].double().clone()
    expected = ref.ring_conv_forward(expected_ring, d(t["frame"]), t["slot"], d(t["weight"]), d(t["bias"]), *a)
    torch.testing.assert_close(out.double(), expected, **tol)
    grad_w, grad_b = torch.randn_like(t["weight"]), torch.randn_like(t["bias"])  # fp32 master buffers
    exp_w, exp_b = grad_w.double(), grad_b.double()
    ops.weight_grad_accumulate(grad_w, grad_b, t["grad_out"], ring, t["slot"], *a)
    ref.weight_grad_accumulate(exp_w, exp_b, d(t["grad_out"]), d(ring), t["slot"], *a)
    scale = exp_w.abs().max().item() + 1
    torch.testing.assert_close(grad_w.double(), exp_w, rtol=tol["rtol"], atol=tol["atol"] * scale)
    down = ops.window_input_grad(t["grad_out"], t["weight"], [g.height, g.width], *a[:3], g.groups)
    torch.testing.assert_close(down.double(), ref.window_input_grad(d(t["grad_out"]), d(t["weight"]),
                                                                   [g.height, g.width], *a[:3], g.groups), **tol)


@pytest.mark.parametrize("g", GEOMETRIES[1:4], ids=geometry_id)
def test_cuda_fused_sgd_equals_torch_optim_sgd(g):
    """The expected gradient is computed in float64: a float32 convolution on CUDA may run in
    TF32 (cuDNN's default), which is no reference for an fp32 kernel."""
    t = _cuda(make(g, torch.float32))
    w, b = t["weight"].contiguous(), t["bias"].clone()
    w_opt, b_opt = w.clone().requires_grad_(), b.clone().requires_grad_()
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, dampening=0.1)
    opt = torch.optim.SGD([w_opt, b_opt], **hyper)
    buf_w, buf_b = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
    for tick in range(3):
        grad_out, ring = torch.randn_like(t["grad_out"]), torch.randn_like(t["ring"])
        gw, gb = torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)
        ref.weight_grad_accumulate(gw, gb, grad_out.double(), ring.double(), t["slot"], *_a(g))
        w_opt.grad, b_opt.grad = gw.float(), gb.float()
        opt.step()
        ops.sgd_tick_update(w, buf_w, b, buf_b, grad_out, ring, t["slot"], *_a(g), first_step=tick == 0, **hyper)
        torch.testing.assert_close(w, w_opt.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, b_opt.detach(), rtol=1e-4, atol=1e-5)


# Channel counts the CUDA kernels read as 16-byte copies (8 per group), and reductions long
# enough (B*H_out*W_out = 1600) that the weight update splits over blocks on any GPU.
SPLIT_GEOMETRIES = [Geometry(4, 16, 32, 20, 20, 3, (3, 3), padding=(1, 1)),
                    Geometry(4, 16, 48, 21, 19, 2, (3, 3), stride=(1, 2), padding=(1, 1), groups=2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", SPLIT_GEOMETRIES, ids=geometry_id)
def test_cuda_split_k_and_16_byte_loads_match_reference_twice_in_a_row(g, dtype):
    """The layers' layouts (ops.empty_ring, channels-last errors): the pipelined, vectorised
    loads and the split-K weight update (its tile counters must be back at zero for the
    second call) against reference.py; the SGD epilogue against torch.optim.SGD. Seeded data;
    the input gradient's tolerance is derived from the rounding it must do (below)."""
    torch.manual_seed(0)
    a = _a(g)
    weight = (torch.randn(g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw, device="cuda") / 3)
    grad_w, expected = torch.randn_like(weight), None
    w, w_opt = weight.clone(), weight.clone().requires_grad_()
    opt = torch.optim.SGD([w_opt], lr=0.05, momentum=0.9, weight_decay=1e-2)
    buf = torch.full_like(w, float("nan"))
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    expected = grad_w.double()
    for tick in range(2):
        ring = ops.empty_ring(g.span, g.batch, g.channels, g.height, g.width, dtype=dtype, device="cuda")
        ring.copy_(torch.randn(ring.shape))
        grad_out = torch.randn(g.batch, g.out_channels, *g.out_hw(), device="cuda").to(dtype).contiguous(
            memory_format=torch.channels_last)
        slot = tick % g.span
        ops.weight_grad_accumulate(grad_w, None, grad_out, ring, slot, *a)
        step = torch.zeros_like(expected)
        ref.weight_grad_accumulate(step, None, grad_out.double(), ring.double(), slot, *a)
        expected += step
        scale = expected.abs().max().item() + 1
        torch.testing.assert_close(grad_w.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)
        w_opt.grad = step.float()
        opt.step()
        ops.sgd_tick_update(w, buf, None, None, grad_out, ring, slot, *a, lr=0.05, momentum=0.9,
                            weight_decay=1e-2, first_step=tick == 0)
        torch.testing.assert_close(w, w_opt.detach(), rtol=tol["rtol"], atol=tol["atol"] * 0.05 * scale)
        out = ops.ring_conv_forward(ring, None, slot, weight, None, *a)
        exp_out = ref.ring_conv_forward(ring.double(), None, slot, weight.double(), None, *a)
        torch.testing.assert_close(out.double(), exp_out, **tol)
        down = ops.window_input_grad(grad_out, weight, [g.height, g.width], *a[:3], g.groups)
        _close_to_rounding(down, grad_out, weight, [g.height, g.width], a, g.groups)


def _close_to_rounding(down, grad_out, weight, size, a, groups):
    """The input gradient against float64, within what its roundings allow element by element:
    the float32 master weight's taps are summed and rounded to the activations' type (relative
    error u = 2^-8 for bf16, 2^-11 for fp16, each term), the products accumulate in fp32, and
    the result is rounded to the activations' type once more (u of it). So
    |down - exact| <= u·(Σ|g|·|w|) + u·|exact| + fp32 accumulation, with Σ|g|·|w| the same
    transposed convolution on absolute values."""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -20}[down.dtype]
    exact = ref.window_input_grad(grad_out.double(), weight.double(), size, *a[:3], groups)
    magnitude = ref.window_input_grad(grad_out.double().abs(), weight.double().abs(), size, *a[:3], groups)
    bound = u * magnitude + u * exact.abs() + 1e-5 * magnitude
    excess = (down.double() - exact).abs() - bound
    assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} elements beyond their rounding bound"


@pytest.mark.parametrize("mode", ["sideways", "bp"])
def test_cuda_pipeline_matches_the_torch_backend(mode):
    net = classifier_net([(3, 1, 1), (2, 0, 2), (3, 0, 1)], dtype=torch.float32).cuda()
    video, target = torch.randn(2, 3, 9, 10, 9, device="cuda"), torch.randint(0, 7, (2,), device="cuda")
    out = {}
    for backend in ("torch", "cuda"):
        net.zero_grad()
        SidewaysPipeline(stages_of(net, 3), mode=mode, backend=backend).backward_clip(video, target)
        out[backend] = grads(net)
    assert rel_error(out["cuda"], out["torch"]) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_autocast_pipeline_matches_the_torch_backend(backend, dtype):
    """CUDA autocast: 16-bit rings and errors, float32 masters; the fused kernels (tensor cores)
    against the torch backend under the same autocast."""
    if backend == "triton" and not sk.backends()["triton"]:
        pytest.skip("triton is not installed")
    net = classifier_net([(3, 1, 1), (2, 0, 2), (3, 0, 1)], channels=(3, 16, 32, 16), dtype=torch.float32,
                         act=torch.nn.Tanh).cuda()
    video, target = torch.randn(4, 3, 9, 12, 11, device="cuda"), torch.randint(0, 7, (4,), device="cuda")
    out = {}
    for b in ("torch", backend):
        net.zero_grad()
        with torch.autocast("cuda", dtype):
            SidewaysPipeline(stages_of(net, 3), backend=b).backward_clip(video, target)
        out[b] = grads(net)
    assert all(g.dtype == torch.float32 for g in out[backend])
    assert rel_error(out[backend], out["torch"]) < (3e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("update,amp", [("clip", False), ("tick", False), ("clip", True)])
def test_cuda_graph_ticks_equal_eager_ticks(update, amp):
    """Real capture and replay (the CPU tests use an emulated graph): three clips, so phases
    are warmed up, captured and replayed; same losses, outputs, gradients and weights as eager
    ticks, on the same device and backend. With update="clip" an SGD step between clips changes
    the weights, whose forms the torch backend makes once a run: a replay must read this clip's."""
    results = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        net = classifier_net([(3, 1, 1), (2, 1, 1), (3, 2, 2)], dtype=torch.float32).cuda()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        pipe = SidewaysPipeline(stages_of(net, 3), update=update, optimizer=opt if update == "tick" else None,
                                cuda_graph=graphs)
        g = torch.Generator(device="cuda").manual_seed(1)
        rows = []
        for _ in range(3):
            video = torch.randn(2, 3, 13, 10, 9, device="cuda", generator=g)
            target = torch.randint(0, 7, (2,), device="cuda", generator=g)
            with torch.autocast("cuda", torch.bfloat16, enabled=amp):  # captures without autocast's cast cache
                r = pipe.backward_clip(video, target)
            rows.append((r.loss, r.outputs, [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                             for p in net.parameters()],
                         [p.detach().clone() for p in net.parameters()]))
            if update == "clip":
                opt.step()
            net.zero_grad()
        if graphs:
            assert pipe._graphs.replays > 0 and not pipe._graphs.failed, pipe._graphs.failed
        results[graphs] = rows
    for eager, graphed in zip(results[False], results[True]):
        torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graphed[1], eager[1], rtol=1e-5, atol=1e-6)
        assert rel_error(graphed[2], eager[2]) < 1e-4
        assert rel_error(graphed[3], eager[3]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_cached_cast_and_tap_sum_follow_the_weight(dtype):
    """The CUDA binding derives the 16-bit weight and its taps' sum once per weight version:
    a new weight (often at a freed one's address), an in-place step and the fused SGD op each
    give fresh ones."""
    g = Geometry(2, 16, 16, 9, 8, 3, (3, 3), padding=(1, 1), layout="ring")  # the kernels' own layouts
    a = _a(g)

    def check(t, w):
        t["grad_out"] = t["grad_out"].contiguous(memory_format=torch.channels_last)
        d = lambda x: x.double()
        expected = ref.ring_conv_forward(d(t["ring"]), None, t["slot"], d(w), None, *a)
        # the 16-bit rounding of the weight errs in proportion to the outputs' scale (x2 after mul_(-2))
        torch.testing.assert_close(ops.ring_conv_forward(t["ring"], None, t["slot"], w, None, *a).double(), expected,
                                   rtol=3e-2, atol=1e-2 * expected.abs().mean().item())
        down = ops.window_input_grad(t["grad_out"], w, [g.height, g.width], *a[:3], g.groups)
        _close_to_rounding(down, t["grad_out"], w, [g.height, g.width], a, g.groups)

    for _ in range(3):
        t = _cuda(make(g, dtype, torch.float32))
        check(t, t["weight"])
    w = t["weight"]
    with torch.no_grad():
        w.mul_(-2.0)
    check(t, w)
    version = w._version
    ops.sgd_tick_update(w, None, None, None, t["grad_out"], t["ring"], t["slot"], *a, lr=0.5)
    assert w._version > version, "the fused SGD op's in-place step must bump the weight's version"
    check(t, w)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_derived_weights_are_freed_with_their_weight_and_none_are_kept_for_views(backend):
    """The 16-bit copies an op derives from a weight (its cast, its taps' sum) go when the weight
    goes, and a view of a weight (a clip edge's live taps, new every call) leaves none behind:
    device memory returns to where it was after each weight is dropped."""
    import sideways_kernels.triton as T
    g = Geometry(2, 64, 64, 9, 8, 3, (3, 3), padding=(1, 1), layout="ring")
    a = _a(g)
    t = _cuda(make(g, torch.bfloat16, torch.float32))
    grad_out = t["grad_out"].contiguous(memory_format=torch.channels_last)
    forward = ops.ring_conv_forward if backend == "cuda" else T.ring_conv_forward
    input_grad = ops.window_input_grad if backend == "cuda" else T.window_input_grad

    def use(w):
        out = forward(t["ring"], None, t["slot"], w, None, *a)
        down = input_grad(grad_out, w, [g.height, g.width], *a[:3], g.groups)
        live = input_grad(grad_out, w.narrow(2, 1, 2), [g.height, g.width], *a[:3], g.groups)
        return out.float().sum() + down.float().sum() + live.float().sum()

    use(t["weight"].clone())  # the first call's lasting allocations (work buffers, scratch)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(4):
        w = torch.randn_like(t["weight"])
        assert torch.isfinite(use(w))
        del w
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("g", SPLIT_GEOMETRIES[:1] + [Geometry(8, 64, 64, 14, 14, 3, (3, 3), padding=(1, 1)),
                                                     Geometry(2, 24, 40, 9, 13, 2, (1, 3), padding=(0, 2),
                                                              dilation=(1, 2))], ids=geometry_id)
def test_triton_box_kernels_on_gpu(g, dtype):
    """The sm_90 TMA-box kernels (autotuned, descriptors made on the device): every op against
    float64, the weight update twice on the same tensors (the second adding to the first), and a
    forward + fused SGD step captured in a CUDA graph and replayed, equal to running them eagerly."""
    triton_ops = pytest.importorskip("sideways_kernels.triton")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the box kernels need sm_90 (TMA)")
    torch.manual_seed(0)
    S, a = torch.ops.sideways_triton, _a(g)
    ring = ops.empty_ring(g.span, g.batch, g.channels, g.height, g.width, dtype=dtype, device="cuda")
    ring.copy_(torch.randn(ring.shape))
    weight = torch.randn(g.out_channels, g.channels, g.k_t, *g.k_hw, device="cuda") / (g.channels * g.k_t * 9) ** 0.5
    grad_out = torch.randn(g.batch, g.out_channels, *g.out_hw(), device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    d = lambda x: x.double()
    triton_ops.paths.clear()
    out = S.ring_conv_forward(ring, None, 1 % g.span, weight, None, *a)
    torch.testing.assert_close(out.double(), ref.ring_conv_forward(d(ring), None, 1 % g.span, d(weight), None, *a),
                               rtol=3e-2, atol=5e-2)
    _close_to_rounding(S.window_input_grad(grad_out, weight, [g.height, g.width], *a[:3], 1), grad_out, weight,
                       [g.height, g.width], a, 1)
    grad_w, expected = torch.zeros_like(weight), torch.zeros_like(weight, dtype=torch.float64)
    for _ in range(2):
        S.weight_grad_accumulate(grad_w, None, grad_out, ring, 0, *a)
        ref.weight_grad_accumulate(expected, None, d(grad_out), d(ring), 0, *a)
    torch.testing.assert_close(grad_w.double(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    assert {op for op, path in triton_ops.paths if path == "box"} == {"ring_conv_forward", "window_input_grad",
                                                                     "weight_update"}

    def tick(w, buf):
        y = S.ring_conv_forward(ring, None, 0, w, None, *a)
        S.sgd_tick_update(w, buf, None, None, grad_out, ring, 0, *a, 0.01, 0.9, 0.0, 1e-4, False, False)
        return y

    w_eager, buf_eager = weight.clone(), torch.randn_like(weight)
    w_graph, buf_graph = w_eager.clone(), buf_eager.clone()
    tick(w_graph.clone(), buf_graph.clone())  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = tick(w_graph, buf_graph)
    w_graph.copy_(w_eager), buf_graph.copy_(buf_eager)
    for _ in range(2):
        graph.replay()
        y_eager = tick(w_eager, buf_eager)
        torch.testing.assert_close(y_graph, y_eager)
        torch.testing.assert_close(w_graph, w_eager)
        torch.testing.assert_close(buf_graph, buf_eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("g, aligned", [
    (Geometry(4, 32, 64, 14, 14, 3, (3, 3), stride=(2, 2), padding=(1, 1), groups=2), True),  # 16 per group
    (Geometry(4, 45, 64, 14, 14, 3, (3, 3), stride=(2, 2), padding=(1, 1)), False),  # R(2+1)D's 45 channels
    (Geometry(4, 3, 64, 28, 28, 3, (7, 7), stride=(2, 2), padding=(3, 3)), False),  # r3d_18's stem: folded
    (Geometry(4, 64, 64, 14, 14, 3, (3, 3), padding=(1, 1), groups=64), False),  # depthwise: folded
], ids=["grouped16", "unaligned45", "stem3-folded", "depthwise"])
def test_triton_general_kernels_on_gpu(g, aligned, dtype):
    """The general kernels compiled and autotuned on the device in the specialisations `make
    gpu-check` compiles ahead of time — channels per group and strides multiples of 16, or not,
    folded, depthwise: each op against float64 (the weight update twice on the same tensors), and
    each launch's autotuner picked from the list compiled for it (CONFIGS, or UNALIGNED)."""
    T = pytest.importorskip("sideways_kernels.triton")
    from sideways_kernels.triton.configs import configs_for
    torch.manual_seed(0)
    S, a, size = torch.ops.sideways_triton, _a(g), [g.height, g.width]
    ring = ops.empty_ring(g.span, g.batch, g.channels, g.height, g.width, dtype=dtype, device="cuda")
    ring.copy_(torch.randn(ring.shape))
    fan_in = g.channels // g.groups * g.k_t * g.k_hw[0] * g.k_hw[1]
    weight = torch.randn(g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw, device="cuda") / fan_in ** 0.5
    grad_out = torch.randn(g.batch, g.out_channels, *g.out_hw(), device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    d = lambda x: x.double()
    with T.using(path="general"):
        out = S.ring_conv_forward(ring, None, 1 % g.span, weight, None, *a)
        torch.testing.assert_close(out.double(), ref.ring_conv_forward(d(ring), None, 1 % g.span, d(weight), None, *a),
                                   rtol=3e-2, atol=5e-2)
        _close_to_rounding(S.window_input_grad(grad_out, weight, size, *a[:3], g.groups), grad_out, weight, size, a,
                           g.groups)
        grad_w, expected = torch.zeros_like(weight), torch.zeros_like(weight, dtype=torch.float64)
        for _ in range(2):
            S.weight_grad_accumulate(grad_w, None, grad_out, ring, 0, *a)
            ref.weight_grad_accumulate(expected, None, d(grad_out), d(ring), 0, *a)
        torch.testing.assert_close(grad_w.double(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    major, minor = torch.cuda.get_device_capability()
    for name, kind in (("ring_conv_forward", "gemm"), ("window_input_grad", "gemm"),
                       ("weight_update", "weight_update")):
        listed = {c.name for c in configs_for(kind, 10 * major + minor, 2, is_aligned=aligned)}
        assert T.picked(name, ring.device) in listed, (name, T.picked(name, ring.device))


def _bf16_layers(shapes: list) -> list:
    """Per geometry, a layer's tensors on the GPU as a pipeline hands them to the box kernels: (g,
    its bf16 ring, a bf16 error and the next frame, both channels-last, its fp32 weight and bias),
    as (g, ring, grad_out, weight, bias, frame)."""
    layers = []
    for g in shapes:
        ring = ops.empty_ring(g.span, g.batch, g.channels, g.height, g.width, dtype=torch.bfloat16, device="cuda")
        ring.copy_(torch.randn(ring.shape))
        grad_out = torch.randn(g.batch, g.out_channels, *g.out_hw(), device="cuda").to(torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(g.out_channels, g.channels, g.k_t, *g.k_hw, device="cuda") / (g.channels * 27) ** 0.5
        b = torch.randn(g.out_channels, device="cuda")
        frame = torch.randn(g.batch, g.channels, g.height, g.width, device="cuda").to(torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        layers.append((g, ring, grad_out, w, b, frame))
    return layers


def test_a_tick_s_grouped_weight_update_on_gpu_equals_each_layer_s_and_replays_in_a_graph():
    """The grouped weight update (every layer of a tick in one launch, sm_90 TMA boxes, bf16):
    the weights and momentum buffers each layer's own op leaves (same split count), the biases
    within float32 rounding; then captured in a CUDA graph (its tables made by the eager run
    before, as a pipeline's warm-up makes them) and replayed: the eager result again. A launch
    whose tables are new inside a capture comes back to the caller instead of failing it."""
    T = pytest.importorskip("sideways_kernels.triton")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the box kernels need sm_90 (TMA)")
    torch.manual_seed(0)
    shapes = [Geometry(8, 64, 128, 28, 28, 3, (3, 3), padding=(1, 1)), Geometry(8, 128, 128, 14, 14, 3, (3, 3),
                                                                                padding=(1, 1)),
              Geometry(8, 128, 256, 7, 7, 3, (3, 3), padding=(1, 1))]
    layers = _bf16_layers(shapes)

    def calls(params):
        return [("sgd_tick_update", (w, buf, b, b_buf, grad_out, ring, 1, *_a(g), 0.01, 0.9, 0.0, 1e-4, False, False))
                for (g, ring, grad_out, *_), (w, buf, b, b_buf) in zip(layers, params)]

    def fresh():
        return [(w.clone(), torch.ones_like(w), b.clone(), torch.ones_like(b)) for _, _, _, w, b, _ in layers]
    grouped, alone = fresh(), fresh()
    with T.using(split=3):
        T.launches.clear()
        assert T.grouped_weight_updates(calls(grouped)) == []
        assert T.launches["grouped_weight_update"] == 1
        for op, args in calls(alone):
            T.sgd_tick_update(*args)
    for p, q in zip(grouped, alone):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
        torch.testing.assert_close(p[2], q[2], rtol=1e-5, atol=1e-5)
    with T.using(split=3):
        captured, eager = fresh(), fresh()
        T.grouped_weight_updates(calls(eager))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert T.grouped_weight_updates(calls(captured)) == []
            left = T.grouped_weight_updates(calls(captured)[:1] + [("sgd_tick_update", calls(captured)[1][1][:-5]
                                                                     + (0.02, 0.9, 0.0, 1e-4, False, False))])
        assert len(left) == 2  # new learning rate: new tables, not made inside a capture
        graph.replay()
        torch.cuda.synchronize()
    for p, q in zip(captured, eager):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])


def test_a_tick_s_grouped_first_convs_on_gpu_equal_each_layer_s_and_replay_in_a_graph():
    """The stages' first forwards (pushing their frames) and input gradients grouped (sm_90 TMA
    boxes, bf16, one launch each for layers of three sizes): each layer's own op's results (unsplit,
    so to the bit); then captured in a CUDA graph (tables made by the eager run before) and
    replayed: the same again."""
    T = pytest.importorskip("sideways_kernels.triton")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the box kernels need sm_90 (TMA)")
    torch.manual_seed(0)
    shapes = [Geometry(8, 64, 128, 56, 56, 3, (3, 3), padding=(1, 1)), Geometry(8, 128, 256, 28, 28, 3, (3, 3),
                                                                                padding=(1, 1)),
              Geometry(8, 256, 256, 14, 14, 3, (3, 3), padding=(1, 1))]
    layers = _bf16_layers(shapes)
    forwards = lambda rings: [(r, frame, 1, w, b, *_a(g)) for (g, _, _, w, b, frame), r in zip(layers, rings)]
    grads = [(grad_out, w, [g.height, g.width], *_a(g)[:3], 1) for g, _, grad_out, w, _, _ in layers]
    with T.using(gemm_split=1):
        T.launches.clear()
        rings = [ring.clone() for _, ring, *_ in layers]
        outs, down = T.grouped_ring_conv_forwards(forwards(rings)), T.grouped_window_input_grads(grads)
        assert T.launches["grouped_forward"] == T.launches["grouped_input_grad"] == 1
        alone_rings = [ring.clone() for _, ring, *_ in layers]
        for args, out, r, mine in zip(forwards(alone_rings), outs, rings, alone_rings):
            assert torch.equal(out, T.ring_conv_forward(*args)) and torch.equal(r, mine)
        for args, got in zip(grads, down):
            assert torch.equal(got, T.window_input_grad(*args))
        graph = torch.cuda.CUDAGraph()
        captured = [ring.clone() for _, ring, *_ in layers]
        with torch.cuda.graph(graph):
            outs_g, down_g = T.grouped_ring_conv_forwards(forwards(captured)), T.grouped_window_input_grads(grads)
        graph.replay()
        torch.cuda.synchronize()
    for a, b in zip(outs_g + down_g + captured, outs + down + rings):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "default-epilogues"])
@pytest.mark.parametrize("pool", [False, True], ids=["conv_relu", "c3d_blocks"])
def test_a_chain_s_own_stages_on_gpu_equal_the_per_stage_path_eagerly_and_in_cuda_graphs(pool, backend, monkeypatch):
    """Stages that are a conv and its ReLU (and a 1x2x2 max pool: C3D's blocks; 28² -> 14² -> 7² ->
    3², the last one floor), the first on an RGB video (its ring and frame in 16-byte rows, TMA
    zero-filling the channels past the third), run by the engine itself (bf16 autocast) — on
    Triton (sm_90 TMA boxes: every such stage's forward in one launch with the ReLU, the pool, the
    next stage's buffer and the error's backward in its epilogue; their input gradients in one),
    or on the default dispatch with its stage_epilogue entry "triton" (the forwards where it sends
    them, the epilogues in one Triton launch): the per-stage path's losses and gradients to the
    bit; captured in CUDA graphs and replayed over two clips, the eager results."""
    pytest.importorskip("sideways_kernels.triton")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the box kernels need sm_90 (TMA)")
    from sideways_kernels import backend as dispatch
    from sideways_kernels.engine import Engine

    def chain():
        torch.manual_seed(0)
        stages = [torch.nn.Sequential(sk.SidewaysConv3d(64 if k else 3, 64, 3, padding=1), torch.nn.ReLU(),
                                      *([torch.nn.MaxPool3d((1, 2, 2))] if pool and k < 3 else []))
                  for k in range(4)]
        stages[-1].extend([torch.nn.AdaptiveAvgPool3d((None, 1, 1)), sk.SidewaysConv3d(64, 10, 1)])
        return [stage.cuda() for stage in stages]
    g = torch.Generator(device="cuda").manual_seed(1)
    clips = [(torch.randn(2, 3, 12, 28, 28, device="cuda", generator=g),
              torch.randint(0, 10, (2,), device="cuda", generator=g)) for _ in range(2)]
    import sideways_kernels.triton as T
    results = {}
    for way, graphs in (("own", False), ("per stage", False), ("own", True)):
        stages = chain()
        pipe = SidewaysPipeline(stages, backend="triton" if backend == "triton" else None, cuda_graph=graphs)
        T.launches.clear()
        rows = []
        with monkeypatch.context() as m:
            if backend != "triton":
                m.setitem(dispatch.HELPERS, "stage_epilogue", "triton" if way == "own" else "torch")
                m.setattr(dispatch, "_chosen", {})
            if way == "per stage":
                m.setattr(Engine, "_own_stage", lambda *args: None)
            for video, target in clips:
                with torch.autocast("cuda", torch.bfloat16):
                    r = pipe.backward_clip(video, target)
                rows.append((r.loss, [p.grad.clone() for s in stages for p in s.parameters()]))
                for s in stages:
                    s.zero_grad()
        if graphs:
            assert pipe._graphs.replays > 0 and not pipe._graphs.failed, pipe._graphs.failed
        elif way == "own":  # (the stem's forward grouped: its ring in 16-byte rows; cuDNN's forwards not)
            assert T.launches["grouped_stage_epilogue" if backend != "triton" else "grouped_forward"] > 0
        results[way, graphs] = rows
    for own, per_stage, graphed in zip(results["own", False], results["per stage", False], results["own", True]):
        assert torch.equal(own[0], per_stage[0]) and all(torch.equal(a, b) for a, b in zip(own[1], per_stage[1]))
        torch.testing.assert_close(graphed[0], own[0], rtol=1e-5, atol=1e-6)
        assert rel_error(graphed[1], own[1]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bias_grad_on_gpu_sums_in_fp32_and_the_dispatch_sends_it_where_measured(dtype, monkeypatch):
    """Triton's column sum on the GPU (C3D's first error, and a small odd one) against float64,
    the same bits twice and in a CUDA graph; backend.bias_grad runs it only where the dispatch
    table measured it faster (else ATen's sum, no launch of it)."""
    pytest.importorskip("triton")
    import sideways_kernels.triton as T
    from sideways_kernels import backend
    for shape in [(8, 64, 112, 112), (3, 10, 7, 9)]:
        g = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
        expected = g.double().sum((0, 2, 3))
        got = T.bias_grad(g)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * g[:, 0].numel() ** 0.5)
        assert torch.equal(T.bias_grad(g), got)
        graph = torch.cuda.CUDAGraph()
        T.bias_grad(g)  # warm (compiled) before the capture
        with torch.cuda.graph(graph):
            replayed = T.bias_grad(g)
        graph.replay()
        assert torch.equal(replayed, got)
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    name = str(dtype).replace("torch.", "")
    for choice in ("triton", "torch"):
        table = dict(backend.table(), measured={arch: dict(ops={"bias_grad": {name: choice}})})
        monkeypatch.setattr(backend, "_table", table)
        monkeypatch.setattr(backend, "_chosen", {})
        before = T.launches["bias_grad"]
        got = backend.bias_grad(g, torch.float32)
        assert T.launches["bias_grad"] - before == (choice == "triton")
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)

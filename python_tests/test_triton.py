"""The Triton backend on CPU, under Triton's interpreter (float32/float16; bfloat16 comes out
wrong in the interpreter, so it is checked only on a GPU): every op vs reference.py, and
whole pipelines with SIDEWAYS_BACKEND=triton against the torch backend."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before sideways_kernels.triton is imported

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import sideways_kernels.triton as T  # noqa: E402
from sideways_kernels import SidewaysPipeline, reference as ref  # noqa: E402
from graphs import Residuals, randomize_norms  # noqa: E402
from nets import classifier_net, grads, rel_error, stages_of  # noqa: E402
from samples import GEOMETRIES, geometry_id, make  # noqa: E402

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


@pytest.mark.parametrize("g", [GEOMETRIES[1], GEOMETRIES[9]], ids=geometry_id)
def test_triton_sgd_tick_update_equals_torch_optim_sgd(g):
    t = make(g, torch.float32)
    w, b = t["weight"].clone(), t["bias"].clone()
    w_opt, b_opt = w.clone().requires_grad_(), b.clone().requires_grad_()
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = torch.optim.SGD([w_opt, b_opt], **hyper)
    buf_w, buf_b = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
    for tick in range(2):
        grad_out, ring = torch.randn_like(t["grad_out"]), torch.randn_like(t["ring"])
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        ref.weight_grad_accumulate(gw, gb, grad_out, ring, t["slot"], *_a(g))
        w_opt.grad, b_opt.grad = gw, gb
        opt.step()
        S.sgd_tick_update(w, buf_w, b, buf_b, grad_out, ring, t["slot"], *_a(g), hyper["lr"], hyper["momentum"], 0.0,
                          hyper["weight_decay"], True, tick == 0)
        _close(w, w_opt.detach(), torch.float32)
        _close(b, b_opt.detach(), torch.float32)


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
    backend's under the same autocast."""
    net = classifier_net([(3, 1, 1), (2, 0, 2)], dtype=torch.float32, act=torch.nn.Tanh)
    video, target = torch.randn(2, 3, 7, 8, 7), torch.randint(0, 7, (2,))
    results = {}
    for backend in ("torch", "triton"):
        T.launches.clear()
        net.zero_grad()
        with torch.autocast("cpu", torch.float16):
            out = SidewaysPipeline(stages_of(net, 2), backend=backend).backward_clip(video, target)
        results[backend] = (out.loss, grads(net), T.launches["weight_grad_accumulate"])
    assert results["triton"][2] > 0 and all(g.dtype == torch.float32 for g in results["triton"][1])
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


from sideways_kernels.triton.configs import CONFIGS, DEFAULT, Config, every_config, prune, split_k  # noqa: E402

EVERY_CONFIG = every_config()


@pytest.mark.parametrize("cfg", EVERY_CONFIG, ids=lambda c: c.name)
def test_every_config_matches_the_reference_with_split_k(cfg):
    """Whatever the autotuner picks on a GPU was checked here first: each config of every
    architecture's list, on a problem with tails in every GEMM axis (forward M = 2·5·7 = 70,
    N = 5, K = 6 taps x 3 channels; weight update M = 5, N = 3 per tap, K = 70), the weight update
    split over 1 and 3 programs per tile, twice in a row (the per-tile counters must be back at
    zero)."""
    from samples import Geometry
    g = Geometry(batch=2, channels=3, out_channels=5, height=5, width=7, k_t=2, k_hw=(1, 3), padding=(0, 1))
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
            grad_w = torch.randn_like(t["weight"])
            expected = grad_w.double()
            for _ in range(2):  # twice: the second call finds the counters reset
                S.weight_grad_accumulate(grad_w, None, t["grad_out"], ring, t["slot"], *a)
                ref.weight_grad_accumulate(expected, None, d(t["grad_out"]), d(ring), t["slot"], *a)
            _close(grad_w, expected, torch.float32)
            w, buf = t["weight"].clone(), torch.full_like(t["weight"], float("nan"))
            w_ref, buf_ref = t["weight"].double(), torch.zeros_like(t["weight"]).double()
            for step in range(2):
                S.sgd_tick_update(w, buf, None, None, t["grad_out"], ring, t["slot"], *a, 0.05, 0.9, 0.0, 1e-2, True,
                                  step == 0)
                ref.sgd_tick_update(w_ref, buf_ref, None, None, d(t["grad_out"]), d(ring), t["slot"], *a, 0.05, 0.9,
                                    0.0, 1e-2, True, step == 0)
            _close(w, w_ref, torch.float32)
            _close(buf, buf_ref, torch.float32)


def test_split_k_is_deterministic_whatever_the_arrival_order():
    """The last program sums the partials in split order: the same bits whichever finished last.
    Under the interpreter programs run in order, so flip the split axis's order by running the
    reduction reversed: summing the partials in a fixed order must give the same bits as before."""
    from samples import Geometry
    g = Geometry(batch=3, channels=4, out_channels=6, height=6, width=5, k_t=3, k_hw=(3, 3), padding=(1, 1))
    t = make(g, torch.float32)
    results = []
    for _ in range(2):
        with T.using(DEFAULT, split=4):
            grad_w = torch.zeros_like(t["weight"])
            S.weight_grad_accumulate(grad_w, None, t["grad_out"], t["ring"], t["slot"], *_a(g))
        results.append(grad_w)
    assert torch.equal(results[0], results[1])


def test_split_factor_and_pruning():
    assert split_k(tiles=200, k=10_000, block_k=64, sms=132) == 1  # enough tiles: no split
    assert split_k(tiles=14, k=25_088, block_k=64, sms=132) == 10  # 64->128, B8, 56x56 on an H100
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


def test_launches_pass_unit_strides_where_the_ahead_of_time_check_assumes_them(monkeypatch):
    """bench/gpu_check.py compiles every kernel with its UNIT strides as the constant 1 (channels
    innermost: what lets Triton vectorise and pipeline the loads). Real pipelines must launch
    them so: a ring from the pipeline, errors from autograd, float32 master weights."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    seen = {}
    original = T._launch

    def spy(kernel, name, grid, args, meta, device, *rest, **kw):
        seen.setdefault(name.split(":")[0], []).append(dict(zip(kernel.arg_names, args)))
        return original(kernel, name, grid, args, meta, device, *rest, **kw)
    monkeypatch.setattr(T, "_launch", spy)
    net = classifier_net([(3, 1, 1), (2, 0, 1)], channels=(3, 16, 16), dtype=torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    video, target = torch.randn(2, 3, 5, 6, 7), torch.randint(0, 7, (2,))
    with torch.autocast("cpu", torch.float16):
        SidewaysPipeline(stages_of(net, 2), backend="triton").backward_clip(video, target)
        SidewaysPipeline(stages_of(net, 2), backend="triton", update="tick", optimizer=opt).backward_clip(video, target)
    assert set(seen) == set(gpu_check.UNIT)
    for kernel, names in gpu_check.UNIT.items():
        for launch in seen[kernel]:  # every layer's
            assert all(launch[n] == 1 for n in names), (kernel, {n: launch[n] for n in names})

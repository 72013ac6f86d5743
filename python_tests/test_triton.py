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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("g", GEOMETRIES, ids=geometry_id)
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


@pytest.mark.parametrize("g", GEOMETRIES[1:3], ids=geometry_id)
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


def test_pipeline_streams_with_triton_and_env_var_selects_it(monkeypatch):
    net = classifier_net([(3, 1, 1), (3, 0, 1)], dtype=torch.float32)
    video = torch.randn(1, 3, 8, 8, 7)
    monkeypatch.setenv("SIDEWAYS_BACKEND", "triton")
    T.launches.clear()
    streamed = torch.stack(list(SidewaysPipeline(stages_of(net, 2)).stream(video)), dim=2)
    assert T.launches["ring_conv_forward"] > 0
    with torch.no_grad():
        torch.testing.assert_close(streamed, net(video), rtol=1e-4, atol=1e-5)


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

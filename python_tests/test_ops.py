"""Oracle 1: every compiled op equals its pure-PyTorch reference on fresh random
inputs of odd shapes; opcheck, torch.compile, SGD equivalence, bad input, fuzzing."""
import os
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sideways_kernels import ops, reference as ref
from sideways_kernels.ops import conv_output_size
from conftest import requires_cpp
from samples import GEOMETRIES, SGD_CONFIGS, geometry_id, make, sgd_id

pytestmark = requires_cpp

# (rtol, atol) per activation dtype; low precision is compared to a float64 reference.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 1e-1),
       torch.float16: (5e-3, 2e-2)}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _args(t, g):
    return (*g.conv_args, g.dilation_t, g.groups)


def _double(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("with_frame", [True, False], ids=["push", "hold"])
def test_ring_conv_forward_matches_reference(geom, dtype, with_frame):
    t = make(geom, dtype)
    frame = t["frame"] if with_frame else None
    ring = t["ring"].clone()
    if with_frame:
        ring[t["slot"]] = float("nan")  # poison: the op must overwrite the slot
    expected_ring = t["ring"].double().clone()
    expected = ref.ring_conv_forward(expected_ring, _double(frame), t["slot"], _double(t["weight"]),
                                     _double(t["bias"]), *_args(t, geom))
    out = ops.ring_conv_forward(ring, frame, t["slot"], t["weight"], t["bias"], *_args(t, geom))
    assert out.dtype == dtype and out.shape == expected.shape
    _close(out, expected, dtype, "output")
    _close(ring, expected_ring, dtype, "ring after the write")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geometry_id)
def test_window_input_grad_matches_reference(geom, dtype):
    t = make(geom, dtype)
    size = (geom.height, geom.width)
    expected = ref.window_input_grad(_double(t["grad_out"]), _double(t["weight"]), size, geom.stride, geom.padding,
                                     geom.dilation, geom.groups)
    out = ops.window_input_grad(t["grad_out"], t["weight"], size, geom.stride, geom.padding, geom.dilation, geom.groups)
    assert out.shape == (geom.batch, geom.channels, geom.height, geom.width) and out.dtype == dtype
    _close(out, expected, dtype, "input gradient")


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float64, None), (torch.float32, None),
                                               (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.bfloat16, None)], ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geometry_id)
def test_weight_grad_accumulate_matches_reference(geom, dtype, param_dtype):
    t = make(geom, dtype, param_dtype)
    # Accumulate onto random values (never zeros), twice, so "+=" is really tested.
    grad_w = torch.randn_like(t["weight"])
    grad_b = torch.randn_like(t["bias"])
    exp_w, exp_b = grad_w.double(), grad_b.double()
    for _ in range(2):
        ops.weight_grad_accumulate(grad_w, grad_b, t["grad_out"], t["ring"], t["slot"], *_args(t, geom))
        ref.weight_grad_accumulate(exp_w, exp_b, _double(t["grad_out"]), _double(t["ring"]), t["slot"], *_args(t, geom))
    assert grad_w.dtype == t["weight"].dtype and grad_w.stride() == t["weight"].stride()
    _close(grad_w, exp_w, dtype, "grad_weight")
    _close(grad_b, exp_b, dtype, "grad_bias")


def test_weight_grad_accumulate_without_bias():
    g = GEOMETRIES[2]
    t = make(g, bias=False)
    grad_w = torch.randn_like(t["weight"])
    expected = grad_w.clone()
    ops.weight_grad_accumulate(grad_w, None, t["grad_out"], t["ring"], t["slot"], *_args(t, g))
    ref.weight_grad_accumulate(expected, None, t["grad_out"], t["ring"], t["slot"], *_args(t, g))
    _close(grad_w, expected, torch.float64, "grad_weight")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("hyper", SGD_CONFIGS, ids=sgd_id)
@pytest.mark.parametrize("geom", GEOMETRIES[1:4] + GEOMETRIES[4:5], ids=geometry_id)
def test_sgd_tick_update_equals_torch_optim_sgd(geom, hyper, dtype):
    """Three ticks of the fused update == torch.optim.SGD.step on the reference gradient."""
    t = make(geom, dtype)
    w_opt = t["weight"].detach().clone().requires_grad_()
    b_opt = t["bias"].detach().clone().requires_grad_()
    opt = torch.optim.SGD([w_opt, b_opt], **hyper)
    w, b = t["weight"].clone(), t["bias"].clone()
    momentum = hyper.get("momentum", 0.0)
    buf_w = torch.full_like(w, float("nan")) if momentum else None  # poison: first step must overwrite
    buf_b = torch.full_like(b, float("nan")) if momentum else None
    for tick in range(3):
        grad_out = torch.randn_like(t["grad_out"])
        ring = torch.randn_like(t["ring"])
        gw = torch.zeros_like(w_opt)
        gb = torch.zeros_like(b_opt)
        ref.weight_grad_accumulate(gw, gb, grad_out, ring, t["slot"], *_args(t, geom))
        w_opt.grad, b_opt.grad = gw, gb
        opt.step()
        ops.sgd_tick_update(w, buf_w, b, buf_b, grad_out, ring, t["slot"], *_args(t, geom), first_step=tick == 0,
                            **hyper)
        _close(w, w_opt.detach(), dtype, f"weight after tick {tick}")
        _close(b, b_opt.detach(), dtype, f"bias after tick {tick}")
        if momentum:
            _close(buf_w, opt.state[w_opt]["momentum_buffer"], dtype, f"momentum buffer after tick {tick}")


@pytest.mark.parametrize("hyper", SGD_CONFIGS, ids=sgd_id)
@pytest.mark.parametrize("geom", GEOMETRIES[1:6], ids=geometry_id)
def test_reference_sgd_tick_update_is_torch_optim_sgd_on_the_autograd_gradient(geom, hyper):
    """The oracle itself: reference.sgd_tick_update (what every kernel is tested against)
    equals torch.optim.SGD.step on the gradient autograd gives for conv3d of the window, the
    window built tap by tap from reference.tap_slots at a random slot each tick (float64)."""
    t = make(geom, torch.float64)
    stride, padding, dilation = geom.conv_args
    w_opt = t["weight"].detach().clone().requires_grad_()
    b_opt = t["bias"].detach().clone().requires_grad_()
    opt = torch.optim.SGD([w_opt, b_opt], **hyper)
    w, b = t["weight"].clone(), t["bias"].clone()
    momentum = hyper.get("momentum", 0.0)
    buf_w = torch.full_like(w, float("nan")) if momentum else None
    buf_b = torch.full_like(b, float("nan")) if momentum else None
    for tick in range(3):
        ring, grad_out = torch.randn_like(t["ring"]), torch.randn_like(t["grad_out"])
        slot = int(torch.randint(0, geom.span, ()))
        taps = ref.tap_slots(slot, geom.span, geom.k_t, geom.dilation_t)
        assert taps == [(slot - (geom.k_t - 1 - j) * geom.dilation_t) % geom.span for j in range(geom.k_t)]
        window = torch.stack([ring[s] for s in taps], dim=2)  # the taps in order: temporal dilation 1 now
        out = torch.nn.functional.conv3d(window, w_opt, b_opt, (1, *stride), (0, *padding), (1, *dilation),
                                         geom.groups)
        opt.zero_grad()
        (out.squeeze(2) * grad_out).sum().backward()
        opt.step()
        h = dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False), **hyper)
        ref.sgd_tick_update(w, buf_w, b, buf_b, grad_out, ring, slot, *_args(t, geom), h["lr"], h["momentum"],
                            h["dampening"], h["weight_decay"], h["nesterov"], tick == 0)
        _close(w, w_opt.detach(), torch.float64, f"weight after tick {tick}")
        _close(b, b_opt.detach(), torch.float64, f"bias after tick {tick}")


def test_sgd_tick_update_mixed_precision_master_weights():
    """bf16 activations, fp32 master weight and buffer: matches the fp32 reference."""
    g = GEOMETRIES[5]
    t = make(g, torch.bfloat16, torch.float32)
    w, buf = t["weight"].clone(), torch.randn_like(t["weight"])
    exp_w, exp_buf = w.double(), buf.double()
    ops.sgd_tick_update(w, buf, None, None, t["grad_out"], t["ring"], t["slot"], *_args(t, g), lr=0.1, momentum=0.9)
    gw = torch.zeros_like(exp_w)
    ref.weight_grad_accumulate(gw, None, t["grad_out"].double(), t["ring"].double(), t["slot"], *_args(t, g))
    ref.sgd_step(exp_w, exp_buf, gw, 0.1, 0.9, 0.0, 0.0, False, False)
    assert w.dtype == torch.float32
    _close(w, exp_w, torch.bfloat16, "weight")
    _close(buf, exp_buf, torch.bfloat16, "momentum buffer")


# --- opcheck and torch.compile ------------------------------------------------

def _opcheck_samples():
    for geom in GEOMETRIES:
        for dtype in (torch.float64, torch.float32):
            yield pytest.param(geom, dtype, id=f"{geometry_id(geom)}-{dtype}")


@pytest.mark.parametrize("geom,dtype", list(_opcheck_samples()))
def test_opcheck(geom, dtype):
    t = make(geom, dtype)
    a = _args(t, geom)
    size = [geom.height, geom.width]
    torch.library.opcheck(torch.ops.sideways.ring_conv_forward,
                          (t["ring"].clone(), t["frame"], t["slot"], t["weight"], t["bias"], *a))
    torch.library.opcheck(torch.ops.sideways.ring_conv_forward,
                          (t["ring"].clone(), None, t["slot"], t["weight"], None, *a))
    torch.library.opcheck(torch.ops.sideways.window_input_grad,
                          (t["grad_out"], t["weight"], size, geom.stride, geom.padding, geom.dilation, geom.groups))
    torch.library.opcheck(torch.ops.sideways.weight_grad_accumulate,
                          (torch.randn_like(t["weight"]), torch.randn_like(t["bias"]), t["grad_out"], t["ring"],
                           t["slot"], *a))
    torch.library.opcheck(torch.ops.sideways.sgd_tick_update,
                          (t["weight"].clone(), torch.randn_like(t["weight"]), t["bias"].clone(),
                           torch.randn_like(t["bias"]), t["grad_out"], t["ring"], t["slot"], *a,
                           0.1, 0.9, 0.0, 1e-3, True, False))


def test_torch_compile_fullgraph_calls_the_ops():
    g = GEOMETRIES[1]
    t = make(g, torch.float32)
    a = _args(t, g)

    def tick(ring, frame, weight, bias, grad_w, grad_b, grad_out):
        out = torch.ops.sideways.ring_conv_forward(ring, frame, t["slot"], weight, bias, *a)
        down = torch.ops.sideways.window_input_grad(grad_out, weight, [g.height, g.width], *g.conv_args, g.groups)
        torch.ops.sideways.weight_grad_accumulate(grad_w, grad_b, grad_out, ring, t["slot"], *a)
        return out.relu(), down * 2

    inputs = [t["ring"], t["frame"], t["weight"], t["bias"], torch.randn_like(t["weight"]),
              torch.randn_like(t["bias"]), t["grad_out"]]
    eager_inputs = [x.clone() for x in inputs]
    compiled = torch.compile(tick, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    expected = tick(*eager_inputs)
    for a_, e_ in zip(list(got) + inputs, list(expected) + eager_inputs):
        torch.testing.assert_close(a_, e_)


# --- bad input ------------------------------------------------------------------

def _good(geom=GEOMETRIES[2]):
    t = make(geom, torch.float32)
    return t, _args(t, geom)


def _bad_calls():
    """(description, thunk, words the message must contain)."""
    t, a = _good()
    S = torch.ops.sideways
    ring, frame, w, b, go, slot = t["ring"], t["frame"], t["weight"], t["bias"], t["grad_out"], t["slot"]
    stride, padding, dilation, dt, groups = a
    R = ring.shape[0]
    yield "ring rank", lambda: S.ring_conv_forward(ring[0], frame, 0, w, b, *a), "ring"
    yield "weight rank", lambda: S.ring_conv_forward(ring, frame, slot, w[:, :, 0], b, *a), "weight"
    yield "slot too big", lambda: S.ring_conv_forward(ring, frame, R, w, b, *a), "slot"
    yield "slot negative", lambda: S.ring_conv_forward(ring, frame, -1, w, b, *a), "slot"
    yield "frame shape", lambda: S.ring_conv_forward(ring, frame[:, :, 1:], slot, w, b, *a), "frame"
    yield "frame dtype", lambda: S.ring_conv_forward(ring, frame.double(), slot, w, b, *a), "frame"
    yield "weight dtype", lambda: S.ring_conv_forward(ring, frame, slot, w.double(), b, *a), "weight"
    yield "bias shape", lambda: S.ring_conv_forward(ring, frame, slot, w, b[1:], *a), "bias"
    yield "channels", lambda: S.ring_conv_forward(ring[:, :, 3:], None, slot, w, b, *a), "weight.size(1)"
    yield "span vs k_t", lambda: S.ring_conv_forward(ring[:2], None, 0, w, b, *a), "ring.size(0)"
    yield "negative stride", lambda: S.ring_conv_forward(ring, frame, slot, w, b, [-1, 1], padding, dilation, dt, groups), "stride"
    yield "zero stride", lambda: S.ring_conv_forward(ring, frame, slot, w, b, [0, 1], padding, dilation, dt, groups), "stride"
    yield "negative padding", lambda: S.ring_conv_forward(ring, frame, slot, w, b, stride, [-1, 0], dilation, dt, groups), "padding"
    yield "zero dilation", lambda: S.ring_conv_forward(ring, frame, slot, w, b, stride, padding, [1, 0], dt, groups), "dilation"
    yield "dilation_t", lambda: S.ring_conv_forward(ring, frame, slot, w, b, stride, padding, dilation, 0, groups), "dilation_t"
    yield "groups", lambda: S.ring_conv_forward(ring, frame, slot, w, b, stride, padding, dilation, dt, 2), "groups"
    yield "zero groups", lambda: S.ring_conv_forward(ring, frame, slot, w, b, stride, padding, dilation, dt, 0), "groups"
    yield "kernel too big", lambda: S.ring_conv_forward(ring[..., :1, :1], None, slot, w, b, stride, [0, 0], dilation, dt, groups), "kernel"
    yield "device mix", lambda: S.ring_conv_forward(ring, frame.to("meta"), slot, w, b, *a), "frame"
    yield "grad_out shape", lambda: S.weight_grad_accumulate(w.clone(), None, go[:, 1:], ring, slot, *a), "grad_out"
    yield "grad_out dtype", lambda: S.weight_grad_accumulate(w.clone(), None, go.double(), ring, slot, *a), "grad_out"
    yield "grad_bias shape", lambda: S.weight_grad_accumulate(w.clone(), b[:2].clone(), go, ring, slot, *a), "grad_bias"
    yield "accumulate slot", lambda: S.weight_grad_accumulate(w.clone(), None, go, ring, 99, *a), "slot"
    yield "input grad size", lambda: S.window_input_grad(go, w, [3, 3], stride, padding, dilation, groups), "grad_out.size"
    yield "input grad rank", lambda: S.window_input_grad(go[0], w, [9, 13], stride, padding, dilation, groups), "grad_out"
    yield "input grad channels", lambda: S.window_input_grad(go[:, 1:], w, [9, 13], stride, padding, dilation, groups), "grad_out.size(1)"
    yield "sgd missing buffer", lambda: S.sgd_tick_update(w.clone(), None, None, None, go, ring, slot, *a, 0.1, 0.9, 0.0, 0.0, False, False), "momentum_buffer"
    yield "sgd buffer shape", lambda: S.sgd_tick_update(w.clone(), w[1:].clone(), None, None, go, ring, slot, *a, 0.1, 0.9, 0.0, 0.0, False, False), "momentum_buffer"
    yield "sgd nesterov", lambda: S.sgd_tick_update(w.clone(), None, None, None, go, ring, slot, *a, 0.1, 0.0, 0.0, 0.0, True, False), "nesterov"
    yield "sgd lr", lambda: S.sgd_tick_update(w.clone(), None, None, None, go, ring, slot, *a, float("nan"), 0.0, 0.0, 0.0, False, False), "lr"
    yield "sgd weight_decay", lambda: S.sgd_tick_update(w.clone(), None, None, None, go, ring, slot, *a, 0.1, 0.0, 0.0, -1.0, False, False), "weight_decay"
    # the same through the Python wrappers
    yield "wrapper slot", lambda: ops.ring_conv_forward(ring, frame, R, w, b, *a), "slot"
    yield "wrapper stride", lambda: ops.ring_conv_forward(ring, frame, slot, w, b, (1, -2), padding, dilation, dt, groups), "stride"
    yield "wrapper ring type", lambda: ops.ring_conv_forward(ring.tolist(), frame, slot, w, b, *a), "ring"
    yield "wrapper sgd buffer", lambda: ops.sgd_tick_update(w.clone(), None, None, None, go, ring, slot, *a, lr=0.1, momentum=0.5), "momentum_buffer"


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda c: c[0])
def test_bad_input_is_refused_with_a_named_argument(case):
    _, thunk, word = case
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        thunk()
    assert word in str(info.value), f"message does not name {word!r}: {info.value}"


def test_refused_call_leaves_buffers_untouched():
    t, a = _good()
    grad_w = torch.randn_like(t["weight"])
    before = grad_w.clone()
    with pytest.raises(RuntimeError):
        torch.ops.sideways.weight_grad_accumulate(grad_w, t["bias"][:2].clone(), t["grad_out"], t["ring"], t["slot"], *a)
    assert torch.equal(grad_w, before)


_BREAKS = ("slot", "span", "channels", "groups", "stride", "padding", "dilation", "dilation_t", "grad_out", "small")


@st.composite
def _fuzz_case(draw):
    """One geometry and the tensors it implies (every call valid), or the same with one thing
    broken (about half the draws): (tensors and arguments, what was broken or None)."""
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k_t, dilation_t, batch = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = [draw(st.integers(1, 3)) for _ in range(2)]
    stride, padding = [draw(st.integers(1, 2)) for _ in range(2)], [draw(st.integers(0, 2)) for _ in range(2)]
    dilation = [draw(st.integers(1, 2)) for _ in range(2)]
    hw = [max(1, d * (kk - 1) + 1 - 2 * p) + draw(st.integers(0, 3)) for kk, p, d in zip(k, padding, dilation)]
    span = dilation_t * (k_t - 1) + 1
    slot = draw(st.integers(0, span - 1))
    broken = draw(st.sampled_from((None,) * len(_BREAKS) + _BREAKS))
    ring_span, w_in, arg_groups = span, c_in // groups, groups
    out_hw = [conv_output_size(n, kk, s, p, d) for n, kk, s, p, d in zip(hw, k, stride, padding, dilation)]
    if broken == "slot":
        slot = draw(st.sampled_from([-1, span]))
    elif broken == "span":
        ring_span += 1
    elif broken == "channels":
        w_in += 1
    elif broken == "groups":
        arg_groups = draw(st.sampled_from([0, groups + 1]))
    elif broken in ("stride", "dilation"):
        (stride if broken == "stride" else dilation)[draw(st.integers(0, 1))] = draw(st.integers(-1, 0))
    elif broken == "padding":
        padding[draw(st.integers(0, 1))] = -1
    elif broken == "dilation_t":
        dilation_t = 0
    elif broken == "grad_out":
        out_hw[draw(st.integers(0, 1))] += 1
    elif broken == "small":  # an input smaller than the kernel, even padded
        k[0], padding[0], hw[0] = 3, 0, draw(st.integers(1, 2 * dilation[0]))
    t = dict(ring=torch.randn(ring_span, batch, c_in, *hw, dtype=torch.float64),
             frame=torch.randn(batch, c_in, *hw, dtype=torch.float64) if draw(st.booleans()) else None,
             weight=torch.randn(c_out, w_in, k_t, *k, dtype=torch.float64),
             bias=torch.randn(c_out, dtype=torch.float64) if draw(st.booleans()) else None,
             grad_out=torch.randn(batch, c_out, *[max(n, 1) for n in out_hw], dtype=torch.float64),
             slot=slot, args=(stride, padding, dilation, dilation_t, arg_groups), size=hw)
    return t, broken


def test_fuzz_ops_refuse_or_match_reference():
    """Shapes drawn from one geometry go straight to torch.ops (no wrapper): a valid call must
    run and agree with the reference; with one thing broken each call either raises
    RuntimeError, leaving its buffers as they were, or agrees with the reference. Never a crash.
    Most calls must really be compared (and some really refused), or the test proves nothing."""
    counts = {"compared": 0, "refused": 0}
    S = torch.ops.sideways

    def attempt(broken, call, check, *untouched):
        before = [u.clone() for u in untouched]
        try:
            result = call()
        except RuntimeError:
            assert broken is not None, "a valid call was refused"
            assert all(torch.equal(u, b) for u, b in zip(untouched, before)), "a refused call wrote its buffers"
            counts["refused"] += 1
            return
        check(result)
        counts["compared"] += 1

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(case=_fuzz_case())
    def run(case):
        t, broken = case
        ring, frame, slot, weight, bias, grad_out, a = (t[k] for k in ("ring", "frame", "slot", "weight", "bias",
                                                                        "grad_out", "args"))
        expected_ring = ring.clone()

        def forward_matches(out):
            expected = ref.ring_conv_forward(expected_ring, frame, slot, weight, bias, *a)
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ring, expected_ring, rtol=0, atol=0)
        attempt(broken, lambda: S.ring_conv_forward(ring, frame, slot, weight, bias, *a), forward_matches, ring)
        grad_w = torch.randn_like(weight)
        grad_b = torch.randn(weight.shape[0], dtype=weight.dtype) if bias is not None else None
        expected_w, expected_b = grad_w.clone(), None if grad_b is None else grad_b.clone()

        def accumulated(_):
            ref.weight_grad_accumulate(expected_w, expected_b, grad_out, ring, slot, *a)
            torch.testing.assert_close(grad_w, expected_w, rtol=1e-10, atol=1e-10)
            if grad_b is not None:
                torch.testing.assert_close(grad_b, expected_b, rtol=1e-10, atol=1e-10)
        attempt(broken, lambda: S.weight_grad_accumulate(grad_w, grad_b, grad_out, ring, slot, *a), accumulated,
                *[x for x in (grad_w, grad_b) if x is not None])
        size = list(t["size"])
        attempt(broken, lambda: S.window_input_grad(grad_out, weight, size, *a[:3], a[4]),
                lambda down: torch.testing.assert_close(
                    down, ref.window_input_grad(grad_out, weight, size, *a[:3], a[4]), rtol=1e-10, atol=1e-10))

    run()
    calls = counts["compared"] + counts["refused"]
    assert counts["compared"] >= 0.3 * calls and counts["refused"] >= 0.1 * calls, counts


@pytest.mark.parametrize("name", ["torch", "cpp", "triton", "cuda"])
def test_in_place_ops_bump_the_versions_of_what_they_write(name):
    """A fused step is an in-place change like ATen's: the weight, its momentum buffer and an
    accumulated gradient get new versions on every backend (autograd's saved-tensor check and
    the CUDA binding's cache of the 16-bit weight rely on it; the CUDA kernels' writes did not
    bump them, so the next forward ran on a stale cast of the weight, H100 2026-11-27)."""
    from sideways_kernels import backend, backends

    device = "cuda" if name == "cuda" else "cpu"
    if not backends()[name] or (name == "cuda" and not torch.cuda.is_available()):
        pytest.skip(f"backend {name} not available here")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off in this process")
    geom = GEOMETRIES[1]
    t = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make(geom, torch.float32).items()}
    k = backend.kernels(name)
    w, buf, grad = t["weight"].clone(), torch.zeros_like(t["weight"]), torch.zeros_like(t["weight"])
    before = w._version, buf._version, grad._version
    k.sgd_tick_update(w, buf, None, None, t["grad_out"], t["ring"], t["slot"], *_args(t, geom), lr=0.1, momentum=0.9,
                      dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True)
    k.weight_grad_accumulate(grad, None, t["grad_out"], t["ring"], t["slot"], *_args(t, geom))
    after = w._version, buf._version, grad._version
    assert all(a > b for a, b in zip(after, before)), f"versions {before} -> {after} (weight, momentum, gradient)"


@requires_cpp
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_a_strided_1x1_weight_gradient_stays_off_onednn_s_overflowing_path(name, padding, capfd):
    """oneDNN's CPU weight gradient of a 1x1 kernel with a spatial stride, on channels-last input
    with fewer channels than its block, writes past its workspace (oneDNN issue 6035): it hangs,
    crashes or returns wrong numbers — it hung this test suite in the README's r(2+1)d example,
    whose downsampling 1x1 convs have 4 channels. The C++ and torch backends slice the strided
    positions and run at stride 1 (with padding: NCHW input). Checked by oneDNN's own log of the
    primitives it ran, and against float64."""
    from sideways_kernels import backend
    k = backend.kernels(name)
    torch.manual_seed(0)
    ring = ops.empty_ring(1, 2, 4, 8, 8, dtype=torch.float32).copy_(torch.randn(1, 2, 4, 8, 8))
    weight = torch.randn(8, 4, 1, 1, 1)
    out_hw = [conv_output_size(n, 1, 2, padding, 1) for n in (8, 8)]
    grad_out = torch.randn(2, 8, *out_hw).contiguous(memory_format=torch.channels_last)
    conv = ([2, 2], [padding, padding], [1, 1], 1, 1)
    grad_w, grad_b = torch.zeros_like(weight), torch.zeros(8)
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        k.weight_grad_accumulate(grad_w, grad_b, grad_out, ring, 0, *conv)
    ran = [line for line in capfd.readouterr().out.splitlines() if ",exec," in line and "backward_weights" in line]
    assert ran, "oneDNN logged no weight gradient: the check below would check nothing"
    # (whichever implementation oneDNN picks for the shape: jit_1x1 at 8x8, plain jit at 9x8)
    strided_nhwc = [line for line in ran if "src:f32::blocked:acdb:" in line and "kh1" in line and "kw1" in line
                    and ("sh2" in line or "sw2" in line)]
    assert not strided_nhwc, strided_nhwc
    expected_w, expected_b = torch.zeros_like(weight, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    ref.weight_grad_accumulate(expected_w, expected_b, grad_out.double(), ring.double(), 0, *conv)
    torch.testing.assert_close(grad_w.double(), expected_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b.double(), expected_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, rows", [(torch.float16, {1: 8, 3: 8, 8: 8, 9: 16, 16: 16}),
                                         (torch.bfloat16, {3: 8, 8: 8, 24: 24}),
                                         (torch.float32, {1: 4, 3: 4, 4: 4, 5: 8, 64: 64})])
def test_a_ring_or_frame_in_16_byte_rows_takes_the_fewest_whole_rows(dtype, rows):
    """``aligned=True``: each position's (a ring's: each slot's) channels start on a 16-byte
    boundary, in the fewest whole 16-byte units that hold them — no more (a channel count already
    whole keeps its rows); a ring starts zeroed."""
    for channels, row in rows.items():
        assert ops.aligned_channels(channels, dtype) == ops.row_length(channels, dtype, aligned=True) == row
        assert ops.row_length(channels, dtype) == channels
        ring = ops.empty_ring(3, 2, channels, 4, 5, dtype=dtype, aligned=True)
        frame = ops.empty_frame(2, channels, 4, 5, dtype=dtype, aligned=True)
        assert ring.shape == (3, 2, channels, 4, 5) and frame.shape == (2, channels, 4, 5)
        assert ring.stride(0) == frame.stride(3) == row and ring.stride(4) == 3 * row and ring.stride(2) == 1
        assert (row * ring.element_size()) % 16 == 0 and not ring.untyped_storage().nbytes() % (16 * 3)
        assert ring.count_nonzero() == 0


def test_a_ring_with_an_image_pad_reads_as_a_wider_zero_padded_image_and_says_so():
    """``image_pad``: zero channels after each position's span x C (a ring of 3 slots of 3 channels
    and 7 more: 16 a position); the ring itself is an ordinary ring of its shape, writes to it never
    reach the pad, and only it vouches for the pad (``zero_image_pad``: not a view, a copy or a
    ring without one). Sizes that are not ints of the right sign are refused, by name."""
    ring = ops.empty_ring(3, 2, 3, 4, 5, dtype=torch.float32, image_pad=7)
    assert ring.shape == (3, 2, 3, 4, 5) and ring.stride(0) == 3 and ring.stride(4) == 16
    assert ops.zero_image_pad(ring) == 7 and ops.zero_image_pad(ring[:]) == 0 and ops.zero_image_pad(ring.clone()) == 0
    assert ops.zero_image_pad(ops.empty_ring(3, 2, 3, 4, 5)) == 0
    ring.copy_(torch.randn(3, 2, 3, 4, 5))
    ring[1].fill_(2.0)
    memory = torch.as_strided(ring, (2, 4, 5, 16), (ring.stride(1), ring.stride(3), ring.stride(4), 1))
    assert memory[..., :9].count_nonzero() == 2 * 4 * 5 * 9 and memory[..., 9:].count_nonzero() == 0
    for bad, name in [(dict(image_pad=-2), "image_pad"), (dict(image_pad=1.5), "image_pad"), (dict(channels=0), "channels"),
                      (dict(span=True), "span")]:
        args = {**dict(span=3, batch=1, channels=3, height=4, width=4), **bad}
        with pytest.raises(ValueError, match=f"empty_ring: {name} must be an int"):
            ops.empty_ring(args.pop("span"), args.pop("batch"), args.pop("channels"), args.pop("height"),
                           args.pop("width"), **args)
